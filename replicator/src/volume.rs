//! A replicated volume: its backing block device or file, opened through the
//! I/O engine, plus the alignment rules the write path relies on.
//!
//! Every record the primary journals and ships is aligned to [`IO_ALIGN`]: an
//! unaligned client write becomes a read-modify-write of the whole blocks it
//! touches, sequenced like any other write (so it is serialised with every
//! request touching those blocks), and the record carries the whole blocks.
//! The secondary therefore only ever sees aligned records.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use replicator_protocol::record::{Record, RecordOp};

use crate::config::VolumeConfig;
use crate::io::{AlignedBuf, BlockFile, IoEngine, IoError, OpenOptions, IO_ALIGN};
use crate::snapshot::Snapshot;

/// Volume set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The backing file or device could not be opened.
    #[error("volume {name}: {source}")]
    Open {
        /// Volume name.
        name: String,
        /// The I/O error.
        source: IoError,
    },
    /// The path does not exist (and may not be created), or its directory
    /// does not exist.
    #[error("volume {name}: {message}")]
    Path {
        /// Volume name.
        name: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A regular file another process holds open as a volume (another
    /// daemon, with another state_dir).
    #[error(
        "volume {name}: {path} is in use as a volume by another process (another replicator daemon?): a volume is \
         written through one daemon only"
    )]
    InUse {
        /// Volume name.
        name: String,
        /// Backing path.
        path: PathBuf,
    },
    /// The size is not usable.
    #[error("volume {name}: {path}: size {size} is not a non-zero multiple of 4096 bytes")]
    BadSize {
        /// Volume name.
        name: String,
        /// Backing path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// One volume of a group.
#[derive(Debug)]
pub struct Volume {
    /// NBD export name.
    pub name: String,
    /// Index within its group (the volume number on the wire).
    pub index: u32,
    file: BlockFile,
    /// For a regular file, an exclusive `flock` on it while the volume is
    /// open: two daemons (each with its own state_dir, whose lock does not
    /// see the other) never write one file. A block device is opened with
    /// `O_EXCL` instead.
    _lock: Option<Flock<File>>,
    /// Copy-on-write snapshots of this volume (a drill copy, the image a
    /// resync protects): every write waits until the chunks it touches are
    /// durably preserved in each.
    snapshots: std::sync::RwLock<Vec<Arc<Snapshot>>>,
}

/// `(offset, len)` widened to whole `IO_ALIGN` blocks.
pub fn align_range(offset: u64, len: u64) -> (u64, u64) {
    let a = IO_ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + len).div_ceil(a) * a;
    (start, end - start)
}

/// True when both offset and length are multiples of `IO_ALIGN`.
pub fn is_aligned(offset: u64, len: u64) -> bool {
    offset % IO_ALIGN as u64 == 0 && len % IO_ALIGN as u64 == 0
}

/// Checks that the volume's path exists, or, with `create = true`, that the
/// directory to create it in exists. `Err` says what is wrong and how to fix
/// it. Other errors (permissions...) are left to the open that follows.
pub fn check_path(cfg: &VolumeConfig) -> Result<(), String> {
    let path = &cfg.path;
    match std::fs::metadata(path) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(_) => return Ok(()),
    }
    if path.starts_with("/dev") {
        return Err(format!(
            "{} does not exist: no such device (a logical volume: is it, and its volume group, active? \
             `lvchange -ay`); fix the path. A device is never created by replicator",
            path.display()
        ));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    match std::fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "{} cannot exist: {} is not a directory; fix the path",
                path.display(),
                parent.display()
            ))
        }
        Err(_) => {
            return Err(format!(
                "{}: the directory {} does not exist; fix the path{}",
                path.display(),
                parent.display(),
                if cfg.create { ", or create that directory" } else { "" }
            ))
        }
    }
    if cfg.create {
        return Ok(());
    }
    Err(format!(
        "{} does not exist; fix the path, or add `create = true` (with `size`) to this [[group.volume]] \
         to create it as a sparse file",
        path.display()
    ))
}

/// What `config check` verifies of a volume without creating or writing
/// anything, so that `run` does not fail on it: the path exists (or may be
/// created, see [`check_path`]), is a regular file or a block device, is
/// exactly the configured `size`, and its size is a non-zero multiple of
/// 4096. `Err((field, message))`: `field` is `"path"` or `"size"`.
pub fn probe(engine: &IoEngine, cfg: &VolumeConfig) -> Result<(), (&'static str, String)> {
    check_path(cfg).map_err(|m| ("path", m))?;
    if cfg.create && !cfg.path.exists() {
        let parent = cfg.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
        return check_writable(parent, "create the volume file in").map_err(|m| ("path", m));
    }
    let opts = OpenOptions { create_size: cfg.size, create: false, direct: false, read_only: true };
    let file = engine.open(&cfg.path, &opts).map_err(|e| match e {
        IoError::SizeMismatch { .. } => ("size", e.to_string()),
        IoError::Open { ref path, ref source } if source.raw_os_error() == Some(libc::EPERM) => (
            "path",
            format!(
                "{e}: the device cgroup forbids it: under systemd, the unit's DeviceAllow= must name {}: \
                 regenerate the drop-in (`replicator config systemd-dropin --output {}`, then `systemctl \
                 daemon-reload`)",
                path.display(),
                crate::packaging::DROPIN_PATH
            ),
        ),
        other => ("path", other.to_string()),
    })?;
    let size = file.size();
    if size == 0 || size % IO_ALIGN as u64 != 0 {
        return Err(("path", format!("{} is {size} bytes, not a non-zero multiple of 4096", cfg.path.display())));
    }
    // The probe opens read-only; `run` opens read-write: a read-only mount
    // (ProtectSystem=strict without ReadWritePaths=) or missing write
    // permission would only show there.
    check_writable(&cfg.path, "write").map_err(|m| ("path", m))
}

/// `access(2)` for read and write: what `run` needs to open `path` (or to
/// create a file in the directory `path`) read-write. `Err` says why not,
/// and how to fix it.
pub(crate) fn check_writable(path: &Path, what: &str) -> Result<(), String> {
    use nix::errno::Errno;
    use nix::unistd::AccessFlags;
    match nix::unistd::access(path, AccessFlags::R_OK | AccessFlags::W_OK) {
        Ok(()) => Ok(()),
        Err(Errno::EROFS) => Err(format!(
            "{}: read-only file system here, the daemon could not {what} it: under systemd, the unit's \
             ReadWritePaths= must include it: regenerate the drop-in (`replicator config systemd-dropin --output {}`, \
             then `systemctl daemon-reload`)",
            path.display(),
            crate::packaging::DROPIN_PATH
        )),
        Err(Errno::EACCES) => Err(format!(
            "{}: user {} may not read and write it, so the daemon could not {what} it: give it to the user or \
             group the daemon runs as (for a block device, the drop-in's SupplementaryGroups= names the group \
             owning it)",
            path.display(),
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map_or_else(|| nix::unistd::geteuid().to_string(), |u| u.name)
        )),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Takes the exclusive `flock` of a regular file's volume (see
/// `Volume::_lock`), on a descriptor of its own.
fn lock_file(cfg: &VolumeConfig) -> Result<Flock<File>, VolumeError> {
    let open = |source: io::Error| VolumeError::Open {
        name: cfg.name.clone(),
        source: IoError::Open { path: cfg.path.clone(), source },
    };
    // Read-write: where `flock` is emulated with `fcntl` locks (NFS), an
    // exclusive lock needs a descriptor open for writing.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&cfg.path).map_err(open)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(VolumeError::InUse { name: cfg.name.clone(), path: cfg.path.clone() })
        }
        Err((_, errno)) => Err(open(io::Error::from(errno))),
    }
}

impl Volume {
    /// Opens the volume's file or block device. A missing path is created as
    /// a sparse file of `size` bytes only with `create = true`; otherwise it
    /// is refused ([`VolumeError::Path`]), as is an existing file or device
    /// of another size than `size`.
    pub fn open(engine: &IoEngine, cfg: &VolumeConfig, index: u32) -> Result<Volume, VolumeError> {
        check_path(cfg).map_err(|message| VolumeError::Path { name: cfg.name.clone(), message })?;
        let opts = OpenOptions { create_size: cfg.size, create: cfg.create, direct: true, read_only: false };
        let file =
            engine.open(&cfg.path, &opts).map_err(|source| VolumeError::Open { name: cfg.name.clone(), source })?;
        let lock = if file.is_block_device() { None } else { Some(lock_file(cfg)?) };
        let size = file.size();
        if size == 0 || size % IO_ALIGN as u64 != 0 {
            return Err(VolumeError::BadSize { name: cfg.name.clone(), path: cfg.path.clone(), size });
        }
        Ok(Volume { name: cfg.name.clone(), index, file, _lock: lock, snapshots: std::sync::RwLock::new(Vec::new()) })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// The backing file.
    pub fn file(&self) -> &BlockFile {
        &self.file
    }

    /// Reads `len` bytes at any offset (widening to whole blocks when the
    /// file is opened with O_DIRECT).
    pub async fn read(&self, offset: u64, len: u64) -> Result<AlignedBuf, IoError> {
        if is_aligned(offset, len) || !self.file.is_direct() {
            let (res, buf) = self.file.read_at(AlignedBuf::for_overwrite(len as usize), offset).await;
            return res.map(|()| buf);
        }
        let (start, alen) = align_range(offset, len);
        let (res, buf) = self.file.read_at(AlignedBuf::for_overwrite(alen as usize), start).await;
        res?;
        let skip = (offset - start) as usize;
        Ok(AlignedBuf::copy_from(&buf[skip..skip + len as usize]))
    }

    /// Starts keeping `snapshot` of this volume: from now on every write
    /// preserves the chunks it touches there first.
    pub fn attach_snapshot(&self, snapshot: Arc<Snapshot>) {
        self.snapshots.write().unwrap_or_else(PoisonError::into_inner).push(snapshot);
    }

    /// Stops keeping `snapshot` (writes already preserving into it finish).
    pub fn detach_snapshot(&self, snapshot: &Arc<Snapshot>) {
        self.snapshots.write().unwrap_or_else(PoisonError::into_inner).retain(|s| !Arc::ptr_eq(s, snapshot));
    }

    /// Makes every completed write into each attached snapshot durable (a
    /// drill client's, at a clean stop: the chunks it wrote first are held
    /// in memory until then); a discarded one keeps nothing.
    pub async fn flush_snapshots(&self) -> Result<(), IoError> {
        let snapshots = self.snapshots.read().unwrap_or_else(PoisonError::into_inner).clone();
        for s in snapshots.iter().filter(|s| s.given_up().is_none()) {
            s.flush().await?;
        }
        Ok(())
    }

    /// Before any write of `[offset, offset + len)`: every snapshot holds
    /// those chunks durably.
    async fn preserve(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let snapshots = {
            let list = self.snapshots.read().unwrap_or_else(PoisonError::into_inner);
            if list.is_empty() {
                return Ok(());
            }
            list.clone()
        };
        for s in snapshots {
            if s.given_up().is_some() {
                // (A drill copy given up through another volume.)
                self.detach_snapshot(&s);
                continue;
            }
            if let Err(e) = s.preserve(&self.file, offset, len).await {
                if !s.give_up(&e) {
                    return Err(IoError::Preserve { offset, dir: s.dir().to_path_buf(), source: Box::new(e) });
                }
                self.detach_snapshot(&s);
            }
        }
        Ok(())
    }

    /// Writes whole blocks at an aligned offset, durable when it returns if
    /// `durable` (RWF_DSYNC: FUA). `data` is written without a copy when it
    /// is aligned in memory (see [`BlockFile::write_bytes`]).
    pub async fn write(&self, offset: u64, data: Bytes, durable: bool) -> Result<(), IoError> {
        self.preserve(offset, data.len() as u64).await?;
        self.file.write_bytes(data, offset, durable).await
    }

    /// Makes `[offset, offset + len)` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.preserve(offset, len).await?;
        self.file.write_zeroes(offset, len).await
    }

    /// Discards `[offset, offset + len)`.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.preserve(offset, len).await?;
        self.file.discard(offset, len).await
    }

    /// Applies a replicated or journaled record (always block-aligned).
    pub async fn apply(&self, rec: &Record) -> Result<(), IoError> {
        match rec.op {
            RecordOp::Write | RecordOp::Copy => self.write(rec.offset, rec.payload.clone(), false).await,
            RecordOp::WriteZeroes => self.write_zeroes(rec.offset, u64::from(rec.length)).await,
            RecordOp::Trim => self.discard(rec.offset, u64::from(rec.length)).await,
            // Nothing to write: the chunk is compared (`differing_spans`).
            RecordOp::CopyHash => Ok(()),
        }
    }

    /// The spans of a hash-only copy chunk ([`RecordOp::CopyHash`]) whose
    /// bytes here do not hash (BLAKE3) to the chunk's digests, as (offset,
    /// length): only those need data.
    pub async fn differing_spans(&self, rec: &Record) -> Result<Vec<(u64, u64)>, IoError> {
        let data = self.read(rec.offset, u64::from(rec.length)).await?;
        let differ = rec.hash_spans().filter(|&(off, len, digest)| {
            let at = (off - rec.offset) as usize;
            data.get(at..at + len as usize).is_none_or(|d| blake3::hash(d).as_bytes()[..] != *digest)
        });
        Ok(differ.map(|(off, len, _)| (off, len)).collect())
    }

    /// fdatasync.
    pub async fn sync(&self) -> Result<(), IoError> {
        self.file.sync_data().await
    }
}

/// BLAKE3 digests of `data`, one per `span` bytes (the last span may be
/// shorter): the payload of a hash-only copy chunk.
pub fn span_digests(data: &[u8], span: u64) -> Bytes {
    let span = usize::try_from(span).unwrap_or(usize::MAX).max(1);
    data.chunks(span).flat_map(|c| *blake3::hash(c).as_bytes()).collect::<Vec<u8>>().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(path: PathBuf, size: Option<u64>, create: bool) -> VolumeConfig {
        VolumeConfig { name: "v".into(), path, size, create }
    }

    #[test]
    fn missing_paths_are_created_only_with_create() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = IoEngine::new(crate::io::BackendChoice::Threads);
        let missing = dir.path().join("v.img");
        let e = check_path(&cfg(missing.clone(), Some(1 << 20), false)).expect_err("missing");
        assert!(e.contains("does not exist") && e.contains("create = true"), "{e}");
        let e = Volume::open(&engine, &cfg(missing.clone(), Some(1 << 20), false), 0).expect_err("not created");
        assert!(matches!(e, VolumeError::Path { .. }), "{e}");
        assert!(!missing.exists());
        let e = check_path(&cfg(PathBuf::from("/dev/replicator-no-such-lv"), None, false)).expect_err("lv");
        assert!(e.contains("lvchange"), "{e}");

        // create = true: probe creates nothing, open creates the sparse file.
        probe(&engine, &cfg(missing.clone(), Some(1 << 20), true)).expect("may be created");
        assert!(!missing.exists());
        let v = Volume::open(&engine, &cfg(missing.clone(), Some(1 << 20), true), 0).expect("created");
        assert_eq!(v.size(), 1 << 20);
        drop(v);

        // Existing: the size must match exactly.
        probe(&engine, &cfg(missing.clone(), Some(1 << 20), false)).expect("same size");
        probe(&engine, &cfg(missing.clone(), None, false)).expect("no size configured");
        for other in [(1 << 20) - 4096, (1 << 20) + 4096] {
            let (field, m) = probe(&engine, &cfg(missing.clone(), Some(other), false)).expect_err("size");
            assert_eq!(field, "size", "{m}");
            assert!(m.contains(&format!("{}", 1u64 << 20)) && m.contains(&other.to_string()), "{m}");
        }

        // A missing directory, with or without create.
        let deep = dir.path().join("no-such-dir").join("v.img");
        for create in [false, true] {
            let (field, m) = probe(&engine, &cfg(deep.clone(), Some(1 << 20), create)).expect_err("no dir");
            assert_eq!(field, "path");
            assert!(m.contains("no-such-dir") && m.contains("does not exist"), "{m}");
        }
    }

    /// A regular file is a volume of one daemon at a time (two daemons
    /// with their own state_dirs do not see each other's state lock): a
    /// second open for writing is refused until the first is closed; a
    /// read-only probe (`config check`) is not.
    #[test]
    fn a_regular_file_is_opened_as_a_volume_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = IoEngine::new(crate::io::BackendChoice::Threads);
        let c = cfg(dir.path().join("v.img"), Some(1 << 20), true);
        let first = Volume::open(&engine, &c, 0).expect("open");
        let e = Volume::open(&engine, &c, 0).expect_err("a second writer");
        assert!(matches!(e, VolumeError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("in use as a volume by another process"), "{e}");
        probe(&engine, &c).expect("a read-only probe next to the writer");
        drop(first);
        Volume::open(&engine, &c, 0).expect("open once the first is closed");
    }

    /// A snapshot written back into its volume restores what it preserved
    /// and names the regions rewritten, adjacent chunks as one.
    #[tokio::test]
    async fn a_rolled_back_snapshot_names_its_runs_of_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = IoEngine::new(crate::io::BackendChoice::Threads);
        let size = 1 << 20;
        let v = Volume::open(&engine, &cfg(dir.path().join("v.img"), Some(size), true), 0).expect("open");
        let chunk = 64 << 10;
        let before = Bytes::from(vec![0x11; size as usize]);
        v.write(0, before.clone(), true).await.expect("fill");
        let snap = Arc::new(Snapshot::create(&engine, dir.path(), "v", size, chunk).expect("snapshot"));
        v.attach_snapshot(snap.clone());
        // Chunks 0 and 1 (one write across both), and 3.
        v.write(chunk - 4096, Bytes::from(vec![0x22; 8192]), false).await.expect("write");
        v.write(3 * chunk, Bytes::from(vec![0x33; 4096]), false).await.expect("write");
        v.detach_snapshot(&snap);
        let regions = snap.roll_back(&v).await.expect("roll back");
        assert_eq!(regions, vec![(0, 2 * chunk), (3 * chunk, chunk)]);
        let after = v.read(0, size).await.expect("read");
        assert!(after[..] == before[..], "the volume holds its image from before the writes again");
    }

    #[test]
    fn alignment() {
        assert_eq!(align_range(0, 4096), (0, 4096));
        assert_eq!(align_range(1, 1), (0, 4096));
        assert_eq!(align_range(4095, 2), (0, 8192));
        assert_eq!(align_range(8192, 4097), (8192, 8192));
        assert!(is_aligned(4096, 8192));
        assert!(!is_aligned(4096, 512));
    }
}
