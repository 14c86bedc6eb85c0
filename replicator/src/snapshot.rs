//! A copy-on-write snapshot of one volume on disk: a sparse data file as
//! large as the volume and a map file with one bit per chunk
//! (`replicator_protocol::snapshot` keeps the bookkeeping and states the
//! durability rule). Drill copies and the image a resync protects are such
//! snapshots.
//!
//! The volume calls [`Snapshot::preserve`] before each write; it returns once
//! every chunk the write touches is durably in the snapshot, copying the
//! chunks not yet there first. A group commit makes many chunks durable with
//! one sync of each file. The snapshot's own user (a drill client) reads and
//! writes through [`Snapshot::read`] and [`Snapshot::write`].
//!
//! Concurrency: chunks are guarded by striped async locks, taken in stripe
//! order. A copy into the snapshot holds its chunks' stripes exclusively, so
//! a reader never sees a chunk half copied, and a reader that chose the
//! volume for a chunk finishes before that chunk can be overwritten there.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use replicator_protocol::snapshot::{ChunkMap, Commit, SnapshotError};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::io::{AlignedBuf, BlockFile, IoEngine, IoError, OpenOptions};
use crate::volume::{align_range, Volume};

/// Striped chunk locks per snapshot.
const STRIPES: u64 = 64;
/// Largest piece zeroed at once by [`Snapshot::write_zeroes`].
const ZERO_PIECE: u64 = 1 << 20;

/// Snapshot file errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// Reading or writing a snapshot file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The data file.
    #[error(transparent)]
    Data(#[from] IoError),
    /// The map file's content.
    #[error("{path}: {source}")]
    Map {
        /// The file.
        path: PathBuf,
        /// The error.
        source: SnapshotError,
    },
}

/// One volume's snapshot.
#[derive(Debug)]
pub struct Snapshot {
    data: BlockFile,
    map_file: Arc<File>,
    map: Mutex<ChunkMap>,
    stripes: Box<[RwLock<()>]>,
    commit: tokio::sync::Mutex<()>,
    /// Set for a snapshot the volume's writes may give up (a drill copy):
    /// see [`Snapshot::give_up`].
    expendable: std::sync::OnceLock<Arc<GiveUp>>,
}

/// How the snapshots of one expendable image give up together: the record
/// naming them is renamed away on disk first (a restart then finds no
/// image, and discards its files), their data files are emptied, then they
/// refuse every access.
#[derive(Debug)]
pub struct GiveUp {
    record: PathBuf,
    why: Mutex<Option<String>>,
    /// Held through a give-up (rename, then freeing the space): a second
    /// write whose preserve failed waits for the space to come back too,
    /// while `why` is only locked to be read or set.
    giving_up: Mutex<()>,
}

impl GiveUp {
    /// For the image whose record is `record`.
    pub fn new(record: PathBuf) -> Arc<GiveUp> {
        Arc::new(GiveUp { record, why: Mutex::new(None), giving_up: Mutex::new(()) })
    }

    /// Why the image was given up, if it was.
    pub fn given_up(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Runs `f` unless the image was given up, holding a give-up off
    /// meanwhile: for a rewrite of the record, which a give-up renames
    /// away (a rewrite after it would bring the image back at a restart).
    pub fn unless_given_up<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let _giving_up = self.giving_up.lock().unwrap_or_else(PoisonError::into_inner);
        self.given_up().is_none().then(f)
    }
}

fn data_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}.data"))
}

fn map_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}.map"))
}

impl Snapshot {
    /// Creates an empty snapshot of a volume of `size` bytes in `dir`
    /// (files `VOLUME.data` and `VOLUME.map`; the caller removes a stale
    /// directory whole first). Both files are durable when it returns; the
    /// directory entry is the caller's to sync. Blocking.
    pub fn create(
        engine: &IoEngine,
        dir: &Path,
        volume: &str,
        size: u64,
        chunk: u64,
    ) -> Result<Snapshot, SnapshotFileError> {
        let map = ChunkMap::new(size, chunk).map_err(|source| SnapshotFileError::Map { path: dir.into(), source })?;
        let (dpath, mpath) = (data_path(dir, volume), map_path(dir, volume));
        let io = |source| SnapshotFileError::Io { path: mpath.clone(), source };
        let map_file =
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&mpath).map_err(io)?;
        map_file.set_len(ChunkMap::map_len(size, chunk) as u64).map_err(io)?;
        map_file.sync_all().map_err(io)?;
        let opts = OpenOptions { create_size: Some(size), create: true, direct: true, read_only: false };
        let data = engine.open(&dpath, &opts)?;
        Ok(Self::assemble(data, map_file, map))
    }

    /// Opens a snapshot written by [`Snapshot::create`] (after a restart).
    /// Blocking.
    pub fn open(
        engine: &IoEngine,
        dir: &Path,
        volume: &str,
        size: u64,
        chunk: u64,
    ) -> Result<Snapshot, SnapshotFileError> {
        let (dpath, mpath) = (data_path(dir, volume), map_path(dir, volume));
        let io = |source| SnapshotFileError::Io { path: mpath.clone(), source };
        let map_file = std::fs::OpenOptions::new().read(true).write(true).open(&mpath).map_err(io)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &map_file, &mut bytes).map_err(io)?;
        let map = ChunkMap::decode(size, chunk, &bytes)
            .map_err(|source| SnapshotFileError::Map { path: mpath.clone(), source })?;
        let opts = OpenOptions { create_size: Some(size), create: false, direct: true, read_only: false };
        let data = engine.open(&dpath, &opts)?;
        Ok(Self::assemble(data, map_file, map))
    }

    fn assemble(data: BlockFile, map_file: File, map: ChunkMap) -> Snapshot {
        Snapshot {
            data,
            map_file: Arc::new(map_file),
            map: Mutex::new(map),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            commit: tokio::sync::Mutex::new(()),
            expendable: std::sync::OnceLock::new(),
        }
    }

    /// Lets the volume's writes give this snapshot up (with the others of
    /// `give_up`) when preserving into it fails, rather than fail.
    pub fn make_expendable(&self, give_up: Arc<GiveUp>) {
        let _ = self.expendable.set(give_up);
    }

    /// What gives this snapshot up when preserving into it fails, if it is
    /// expendable.
    pub fn expendable(&self) -> Option<&Arc<GiveUp>> {
        self.expendable.get()
    }

    /// Why this snapshot was given up, if it was: it no longer holds its
    /// image, and every access to it fails.
    pub fn given_up(&self) -> Option<String> {
        self.expendable.get().and_then(|g| g.given_up())
    }

    /// The directory of its files.
    pub fn dir(&self) -> &Path {
        self.data.path().parent().unwrap_or(Path::new("/"))
    }

    fn check_usable(&self) -> Result<(), IoError> {
        match self.given_up() {
            Some(why) => Err(IoError::Io {
                op: "drill copy",
                offset: 0,
                source: std::io::Error::other(format!("this copy was discarded: {why}")),
            }),
            None => Ok(()),
        }
    }

    /// Preserving into this snapshot failed with `error`: if it is
    /// expendable, gives it up (durably, see [`GiveUp`]) and returns true,
    /// so that the volume's write goes on without it; otherwise, or if its
    /// record cannot be renamed away, false (the write fails).
    pub fn give_up(&self, error: &IoError) -> bool {
        let Some(g) = self.expendable.get() else { return false };
        let _giving_up = g.giving_up.lock().unwrap_or_else(PoisonError::into_inner);
        if g.given_up().is_some() {
            return true;
        }
        let renamed = match std::fs::rename(&g.record, g.record.with_extension("given-up")) {
            Ok(()) => crate::durable::sync_parent(&g.record),
            // `drill stop` removed the record first (it detaches the copy
            // next): a restart finds nothing to bring back either way.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        match renamed {
            Ok(()) => {
                tracing::error!(
                    record = %g.record.display(),
                    "copy-on-write into a drill copy failed ({error}): the drill copy is discarded (its exports fail \
                     from now on) and replication goes on; `replicator drill stop` ends the drill"
                );
                *g.why.lock().unwrap_or_else(PoisonError::into_inner) = Some(format!("copy-on-write failed: {error}"));
                // What the copies held is worthless now: their space goes
                // back before this volume write goes on (a full state_dir
                // stops the group's saves next, the restore journal's too),
                // but outside the lock a status asking why reads: freeing a
                // large copy's extents takes seconds.
                let dir = g.record.parent().unwrap_or(Path::new("."));
                for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "data") {
                        if let Err(e) = std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(0)) {
                            tracing::warn!(path = %path.display(), "cannot free a discarded drill copy's space: {e}");
                        }
                    }
                }
                true
            }
            Err(e) => {
                tracing::error!(record = %g.record.display(), "copy-on-write into a drill copy failed ({error}) and it cannot be discarded ({e})");
                false
            }
        }
    }

    fn map(&self) -> MutexGuard<'_, ChunkMap> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes held in the snapshot's own file (its space use).
    pub fn held_bytes(&self) -> u64 {
        self.map().held_bytes()
    }

    fn stripes_of(&self, chunks: std::ops::Range<u64>) -> Vec<usize> {
        let mut s: Vec<usize> = chunks.take(STRIPES as usize).map(|c| (c % STRIPES) as usize).collect();
        if s.len() >= STRIPES as usize {
            s = (0..STRIPES as usize).collect();
        }
        s.sort_unstable();
        s.dedup();
        s
    }

    async fn lock_write(&self, chunks: std::ops::Range<u64>) -> Vec<RwLockWriteGuard<'_, ()>> {
        let mut guards = Vec::new();
        for s in self.stripes_of(chunks) {
            guards.push(self.stripes[s].write().await);
        }
        guards
    }

    async fn lock_read(&self, chunks: std::ops::Range<u64>) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut guards = Vec::new();
        for s in self.stripes_of(chunks) {
            guards.push(self.stripes[s].read().await);
        }
        guards
    }

    /// Copies chunk `c` from the volume into the snapshot, with `overlay`
    /// (offset, bytes) written over it first. The caller holds its stripe.
    async fn copy_in(&self, volume: &BlockFile, c: u64, overlay: Option<(u64, &[u8])>) -> Result<(), IoError> {
        let (start, len) = self.map().chunk_range(c);
        let (res, mut buf) = volume.read_at(AlignedBuf::for_overwrite(len as usize), start).await;
        res?;
        if let Some((off, bytes)) = overlay {
            let at = (off - start) as usize;
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        }
        let (res, _) = self.data.write_at(buf, start).await;
        res?;
        self.map().hold(c);
        Ok(())
    }

    /// Called before `[offset, offset + len)` of the volume is written:
    /// returns once every chunk it touches is durably in the snapshot.
    pub async fn preserve(&self, volume: &BlockFile, offset: u64, len: u64) -> Result<(), IoError> {
        let chunks = {
            let m = self.map();
            if m.all_durable(offset, len) {
                return Ok(());
            }
            m.chunks_of(offset, len)
        };
        {
            let _guards = self.lock_write(chunks.clone()).await;
            for c in chunks {
                if self.given_up().is_some() {
                    // Another write's copy-on-write failed meanwhile and
                    // discarded this copy, freeing its space: copying
                    // more into it would take that space again (a full
                    // state_dir stops the group's next save).
                    return Ok(());
                }
                if !self.map().is_held(c) {
                    self.copy_in(volume, c, None).await?;
                }
            }
        }
        if self.given_up().is_some() {
            return Ok(());
        }
        self.commit(Some((offset, len))).await
    }

    /// Group commit: syncs the data file, then writes and syncs the map
    /// pages of every chunk held since the last commit. With `for_range`,
    /// returns at once when that range is already durable (another commit
    /// covered it); without, always syncs the data file (a flush).
    async fn commit(&self, for_range: Option<(u64, u64)>) -> Result<(), IoError> {
        let _one = self.commit.lock().await;
        let commit = {
            let mut m = self.map();
            if for_range.is_some_and(|(o, l)| m.all_durable(o, l)) {
                return Ok(());
            }
            m.take_commit()
        };
        let result = self.write_commit(commit.as_ref()).await;
        if let Some(c) = commit {
            let mut m = self.map();
            match &result {
                Ok(()) => m.commit_done(&c),
                Err(_) => m.commit_failed(c),
            }
        }
        result
    }

    async fn write_commit(&self, commit: Option<&Commit>) -> Result<(), IoError> {
        self.data.sync_data().await?;
        let Some(commit) = commit else { return Ok(()) };
        let (file, pages) = (self.map_file.clone(), commit.pages.clone());
        let op = "snapshot map write";
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for (p, bytes) in &pages {
                file.write_all_at(bytes, (p * replicator_protocol::snapshot::MAP_PAGE) as u64)?;
            }
            file.sync_data()
        })
        .await
        .map_err(|e| IoError::Io { op, offset: 0, source: std::io::Error::other(e.to_string()) })?
        .map_err(|source| IoError::Io { op, offset: 0, source })
    }

    /// Reads the snapshot's image, at any offset and length.
    pub async fn read(&self, volume: &BlockFile, offset: u64, len: u64) -> Result<AlignedBuf, IoError> {
        self.check_usable()?;
        let (start, alen) = align_range(offset, len);
        let chunks = self.map().chunks_of(start, alen);
        let _guards = self.lock_read(chunks).await;
        let buf = self.read_locked(volume, start, alen).await?;
        if (start, alen) == (offset, len) {
            return Ok(buf);
        }
        let skip = (offset - start) as usize;
        Ok(AlignedBuf::copy_from(&buf[skip..skip + len as usize]))
    }

    /// Reads the image of an aligned range whose stripes the caller holds.
    async fn read_locked(&self, volume: &BlockFile, offset: u64, len: u64) -> Result<AlignedBuf, IoError> {
        let chunks = self.map().chunks_of(offset, len);
        // Runs of chunks with the same source.
        let runs: Vec<(bool, u64, u64)> = {
            let m = self.map();
            let mut runs: Vec<(bool, u64, u64)> = Vec::new();
            for c in chunks {
                let (start, clen) = m.chunk_range(c);
                let (s, e) = (start.max(offset), (start + clen).min(offset + len));
                let held = m.is_held(c);
                match runs.last_mut() {
                    Some((h, _, end)) if *h == held && *end == s => *end = e,
                    _ => runs.push((held, s, e)),
                }
            }
            runs
        };
        if let [(held, _, _)] = runs[..] {
            let file = if held { &self.data } else { volume };
            let (res, buf) = file.read_at(AlignedBuf::for_overwrite(len as usize), offset).await;
            return res.map(|()| buf);
        }
        let mut out = AlignedBuf::zeroed(len as usize);
        for (held, s, e) in runs {
            let file = if held { &self.data } else { volume };
            let (res, buf) = file.read_at(AlignedBuf::for_overwrite((e - s) as usize), s).await;
            res?;
            let at = (s - offset) as usize;
            out[at..at + buf.len()].copy_from_slice(&buf);
        }
        Ok(out)
    }

    /// Writes into the snapshot's image, at any offset and length (partial
    /// 4 KiB blocks are read, modified and written under the chunk locks);
    /// never touches the volume. Durable after [`Snapshot::flush`].
    pub async fn write(&self, volume: &BlockFile, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.check_usable()?;
        let (start, alen) = align_range(offset, data.len() as u64);
        let chunks = self.map().chunks_of(start, alen);
        let _guards = self.lock_write(chunks).await;
        if (start, alen) == (offset, data.len() as u64) {
            return self.write_locked(volume, offset, data).await;
        }
        let mut whole = self.read_locked(volume, start, alen).await?;
        let at = (offset - start) as usize;
        whole[at..at + data.len()].copy_from_slice(data);
        self.write_locked(volume, start, &whole).await
    }

    /// Writes an aligned range whose stripes the caller holds.
    async fn write_locked(&self, volume: &BlockFile, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let len = data.len() as u64;
        let chunks = self.map().chunks_of(offset, len);
        for c in chunks {
            let (start, clen) = self.map().chunk_range(c);
            let (s, e) = (start.max(offset), (start + clen).min(offset + len));
            let piece = &data[(s - offset) as usize..(e - offset) as usize];
            let held = self.map().is_held(c);
            if held || (s == start && e == start + clen) {
                let (res, _) = self.data.write_at(AlignedBuf::copy_from(piece), s).await;
                res?;
                self.map().hold(c);
            } else {
                self.copy_in(volume, c, Some((s, piece))).await?;
            }
        }
        Ok(())
    }

    /// Writes zeroes into the snapshot's image, in pieces.
    pub async fn write_zeroes(&self, volume: &BlockFile, offset: u64, len: u64) -> Result<(), IoError> {
        let zeroes = AlignedBuf::zeroed(len.min(ZERO_PIECE) as usize);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_PIECE) as usize;
            self.write(volume, at, &zeroes[..n]).await?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes every completed [`Snapshot::write`] durable.
    pub async fn flush(&self) -> Result<(), IoError> {
        self.check_usable()?;
        self.commit(None).await
    }

    /// Writes every held chunk back into `volume` (through it, so other
    /// snapshots attached to it preserve what this overwrites; detach this
    /// one first) and syncs it: the volume then holds the snapshot's image.
    /// Returns the regions rewritten, as (offset, length), adjacent chunks
    /// merged (a resync's guard holds long runs of them: one entry per
    /// chunk would take memory in proportion to the volume).
    pub async fn roll_back(&self, volume: &Volume) -> Result<Vec<(u64, u64)>, IoError> {
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for c in self.map().held_iter() {
            match runs.last_mut() {
                Some(run) if run.end == c => run.end = c + 1,
                _ => runs.push(c..c + 1),
            }
        }
        let _guards = self.lock_write(0..STRIPES).await;
        let mut regions = Vec::with_capacity(runs.len());
        for run in runs {
            let (offset, _) = self.map().chunk_range(run.start);
            let mut end = offset;
            for c in run {
                let (start, len) = self.map().chunk_range(c);
                let (res, buf) = self.data.read_at(AlignedBuf::for_overwrite(len as usize), start).await;
                res?;
                volume.write(start, Bytes::from_owner(buf), false).await?;
                end = start + len;
            }
            regions.push((offset, end - offset));
        }
        volume.sync().await?;
        Ok(regions)
    }
}
