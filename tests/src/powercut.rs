//! The volatile write cache and the volatile namespace of `powercut-fs` (the
//! FUSE file system the power-loss tests put each site's files on), without
//! FUSE, so that their logic is unit-tested on its own.
//!
//! A [`FileCache`] holds the dirty 4 KiB pages of one file, layered over the
//! file's backing store (a [`Backing`]: the real file in the backing
//! directory). Writes land in the cache; reads merge the cache over the
//! backing bytes; `fsync`/`fdatasync` ([`FileCache::flush`]) writes the dirty
//! pages to the backing file and syncs it; a power cut ([`FileCache::cut`])
//! drops the dirty pages, or keeps any subset of them, as a disk with a
//! volatile write cache may.
//!
//! A [`NameLog`] is the undo log of the namespace changes (create, mkdir,
//! unlink, rmdir, rename) not yet made durable by an fsync of the directories
//! they changed; a power cut undoes them ([`NameLog::roll_back`]). See its
//! documentation for the exact rule.
//!
//! Simplification (as LazyFS by default): the file size is metadata and is
//! durable at once — a write past the end of the file extends the backing
//! file (with zeroes) at once, a truncate shrinks it at once — so the backing
//! file's size is always the file's size, and after a cut the bytes a lost
//! write would have put past the old end read as zeroes. Attributes (mode,
//! owner, times) are durable at once too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::UnlinkatFlags;

/// Cache page size.
pub const PAGE: u64 = 4096;
const PAGE_USIZE: usize = PAGE as usize;

/// The durable store under a cache: the backing file.
pub trait Backing {
    /// Reads at `off` into `buf`; returns the bytes read (short at the end of
    /// the file).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Sets the size (truncates or extends with zeroes).
    fn set_size(&self, size: u64) -> io::Result<()>;
    /// Makes everything written durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

impl Backing for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        self.set_len(size)
    }

    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }
}

/// One dirty page.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Page {
    /// All zeroes (a punched hole or zeroed range), without storing them.
    Zero,
    /// Bytes.
    Data(Box<[u8]>),
}

impl Page {
    fn bytes(&self) -> Box<[u8]> {
        match self {
            Page::Zero => vec![0u8; PAGE_USIZE].into_boxed_slice(),
            Page::Data(b) => b.clone(),
        }
    }
}

/// What a cut did to one file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutResult {
    /// Dirty pages lost.
    pub dropped: u64,
    /// Dirty pages written to the backing file first (kept by the "disk").
    pub kept: u64,
}

/// The dirty pages of one file. See the module documentation.
#[derive(Debug, Default)]
pub struct FileCache {
    pages: BTreeMap<u64, Page>,
}

/// Reads `buf.len()` bytes at `off` from `b`, zero-filling past its end.
fn read_full(b: &dyn Backing, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match b.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn end_of(off: u64, len: u64) -> io::Result<u64> {
    off.checked_add(len).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl FileCache {
    /// An empty cache (nothing dirty).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of dirty pages.
    pub fn dirty_pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// The page `idx` as it currently reads (cached, or from the backing
    /// file), for a partial update.
    fn page_for_update(&mut self, b: &dyn Backing, idx: u64) -> io::Result<&mut Box<[u8]>> {
        let page = match self.pages.remove(&idx) {
            Some(p) => p.bytes(),
            None => {
                let mut buf = vec![0u8; PAGE_USIZE].into_boxed_slice();
                read_full(b, &mut buf, idx * PAGE)?;
                buf
            }
        };
        let slot = self.pages.entry(idx).or_insert(Page::Data(page));
        match slot {
            Page::Data(bytes) => Ok(bytes),
            // Just inserted as Data; unreachable in practice, but answer
            // with an error rather than panic.
            Page::Zero => Err(io::Error::other("cache page changed kind during an update")),
        }
    }

    /// Applies `data` at `off` to the cached pages (no size change).
    fn put(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE_USIZE - in_page).min(data.len() - pos);
            if n == PAGE_USIZE {
                self.pages.insert(idx, Page::Data(data[pos..pos + n].to_vec().into_boxed_slice()));
            } else {
                let page = self.page_for_update(b, idx)?;
                page[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        Ok(())
    }

    /// Extends the backing file to `end` if it is shorter (size is durable
    /// at once).
    fn extend_to(b: &dyn Backing, end: u64) -> io::Result<()> {
        if b.size()? < end {
            b.set_size(end)?;
        }
        Ok(())
    }

    /// A volatile write: the data is in the cache (and reads see it) until a
    /// flush makes it durable or a cut drops it.
    pub fn write(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let end = end_of(off, data.len() as u64)?;
        Self::extend_to(b, end)?;
        self.put(b, off, data)
    }

    /// A durable write (O_DSYNC, RWF_DSYNC, FUA): `data` goes to the backing
    /// file, which is synced, before this returns. Pages it covers entirely
    /// are no longer dirty; a partly covered dirty page stays dirty for its
    /// other bytes (a cut then leaves the new bytes with the old rest).
    pub fn write_durable(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let end = end_of(off, data.len() as u64)?;
        Self::extend_to(b, end)?;
        b.write_all_at(data, off)?;
        b.sync_data()?;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE_USIZE - in_page).min(data.len() - pos);
            if n == PAGE_USIZE {
                self.pages.remove(&idx);
            } else if self.pages.contains_key(&idx) {
                let page = self.page_for_update(b, idx)?;
                page[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `off` in the cache (fallocate PUNCH_HOLE or
    /// ZERO_RANGE: volatile like a write). Without `keep_size` the file is
    /// first extended to cover the range.
    pub fn zero_range(&mut self, b: &dyn Backing, off: u64, len: u64, keep_size: bool) -> io::Result<()> {
        let end = end_of(off, len)?;
        let size = b.size()?;
        if !keep_size && size < end {
            b.set_size(end)?;
        }
        // Past the old end the backing file reads as zeroes already.
        let end = end.min(size);
        let mut at = off;
        while at < end {
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE - at % PAGE).min(end - at);
            if n == PAGE {
                self.pages.insert(idx, Page::Zero);
            } else {
                let page = self.page_for_update(b, idx)?;
                page[in_page..in_page + n as usize].fill(0);
            }
            at += n;
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `off`: the backing bytes with the cached
    /// pages over them, ending at the end of the file.
    pub fn read(&self, b: &dyn Backing, off: u64, len: u64) -> io::Result<Vec<u8>> {
        let size = b.size()?;
        if off >= size {
            return Ok(Vec::new());
        }
        let end = end_of(off, len)?.min(size);
        let mut buf = vec![0u8; (end - off) as usize];
        read_full(b, &mut buf, off)?;
        let (first, last) = (off / PAGE, (end - 1) / PAGE);
        for (&idx, page) in self.pages.range(first..=last) {
            let page_start = idx * PAGE;
            let from = page_start.max(off);
            let to = (page_start + PAGE).min(end);
            let dst = &mut buf[(from - off) as usize..(to - off) as usize];
            let src_range = (from - page_start) as usize..(to - page_start) as usize;
            match page {
                Page::Zero => dst.fill(0),
                Page::Data(bytes) => dst.copy_from_slice(&bytes[src_range]),
            }
        }
        Ok(buf)
    }

    /// Truncates (or extends) the file to `size`, durably at once, dropping
    /// cached bytes past it.
    pub fn set_size(&mut self, b: &dyn Backing, size: u64) -> io::Result<()> {
        b.set_size(size)?;
        let first_gone = size.div_ceil(PAGE);
        let _ = self.pages.split_off(&first_gone);
        if size % PAGE != 0 {
            if let Some(Page::Data(bytes)) = self.pages.get_mut(&(size / PAGE)) {
                bytes[(size % PAGE) as usize..].fill(0);
            }
        }
        Ok(())
    }

    /// Writes the pages `keep` selects to the backing file (each clipped to
    /// the file's size, so a flush never extends the file) and drops every
    /// page. The caller syncs.
    fn write_back(&mut self, b: &dyn Backing, mut keep: impl FnMut(u64) -> bool) -> io::Result<CutResult> {
        let size = b.size()?;
        let pages = std::mem::take(&mut self.pages);
        let mut result = CutResult::default();
        // Runs of consecutive kept pages, written with one call each.
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let flush_run = |run: &mut Vec<u8>, start: u64| -> io::Result<()> {
            if !run.is_empty() && start < size {
                let n = (run.len() as u64).min(size - start) as usize;
                b.write_all_at(&run[..n], start)?;
            }
            run.clear();
            Ok(())
        };
        for (idx, page) in pages {
            if !keep(idx) {
                result.dropped += 1;
                continue;
            }
            result.kept += 1;
            let start = idx * PAGE;
            if run.is_empty() || run_start + run.len() as u64 != start || run.len() >= (8 << 20) {
                flush_run(&mut run, run_start)?;
                run_start = start;
            }
            match page {
                Page::Zero => run.resize(run.len() + PAGE_USIZE, 0),
                Page::Data(bytes) => run.extend_from_slice(&bytes),
            }
        }
        flush_run(&mut run, run_start)?;
        Ok(result)
    }

    /// fsync/fdatasync: every dirty page is written to the backing file,
    /// which is then synced; nothing is dirty afterwards. Returns the pages
    /// written.
    pub fn flush(&mut self, b: &dyn Backing) -> io::Result<u64> {
        let r = self.write_back(b, |_| true)?;
        b.sync_data()?;
        Ok(r.kept)
    }

    /// A power cut: every dirty page is lost, except those `keep` selects
    /// (given the page index), which the "disk" had written after all.
    pub fn cut(&mut self, b: &dyn Backing, keep: impl FnMut(u64) -> bool) -> io::Result<CutResult> {
        let r = self.write_back(b, keep)?;
        if r.kept > 0 {
            b.sync_data()?;
        }
        Ok(r)
    }

    /// Drops every dirty page without writing anything (the file is gone).
    pub fn discard(&mut self) -> u64 {
        let n = self.pages.len() as u64;
        self.pages.clear();
        n
    }
}

/// A deterministic choice of pages for `cut keep SEED FRACTION`: page
/// `(file, idx)` is kept when a hash of (seed, file, idx) falls below
/// `fraction`. Independent of iteration order.
pub fn keep_page(seed: u64, fraction: f64, file: u64, idx: u64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    // splitmix64 over the three inputs.
    let mut z = seed ^ file.rotate_left(21) ^ idx.rotate_left(42) ^ 0x9E37_79B9_7F4A_7C15;
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

// ---------------------------------------------------------------------------
// Names: the volatile namespace.
// ---------------------------------------------------------------------------

/// The directory, in the backing root, where the objects an uncommitted
/// unlink, rmdir or rename-over took away wait until that change is durable
/// (then they are deleted) or a cut brings them back. `powercut-fs` hides
/// this name in its root: lookups and unlinks find nothing, creating it is
/// refused (EPERM).
pub const GRAVEYARD: &str = ".powercut-fs-graveyard";

/// `/proc/self/fd/N`: names what a descriptor points at.
fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn errno(e: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// A directory of the backing tree as the name log refers to it: its inode
/// number, which an fsync of the directory is matched by, and an `O_PATH`
/// descriptor, which names it for the `*at` calls whatever later happens to
/// the directory's own name, and pins the inode so that its number is not
/// reused while a logged change refers to it.
#[derive(Debug, Clone)]
pub struct DirRef {
    /// Backing inode number.
    pub ino: u64,
    /// `O_PATH` descriptor of the directory.
    pub fd: Arc<OwnedFd>,
}

impl DirRef {
    /// Opens the directory at `path`.
    pub fn open(path: &Path) -> io::Result<DirRef> {
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        let st = nix::sys::stat::fstat(&fd)?;
        Ok(DirRef { ino: st.st_ino, fd: Arc::new(fd) })
    }

    fn stat(&self, name: &OsStr) -> io::Result<FileStat> {
        Ok(nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)?)
    }

    /// `dir/name` for messages (the directory's current backing path).
    fn show(&self, name: &OsStr) -> String {
        match std::fs::read_link(fd_path(&*self.fd)) {
            Ok(p) => p.join(name).display().to_string(),
            Err(_) => format!("(directory inode {})/{}", self.ino, name.to_string_lossy()),
        }
    }
}

/// An object in the graveyard: its name there and its inode number.
#[derive(Debug)]
struct Grave {
    name: OsString,
    ino: u64,
    /// A directory (removed by rmdir or replaced by a rename: empty).
    dir: bool,
}

/// One namespace change, with what undoing it needs.
#[derive(Debug)]
enum Change {
    /// `name` was created in `dir` (file, node or directory) as inode `ino`.
    Created { dir: DirRef, name: OsString, ino: u64 },
    /// `name` was removed from `dir` (unlink or rmdir); the object is `grave`.
    Removed { dir: DirRef, name: OsString, grave: Grave },
    /// Inode `ino` was renamed from `from/name` to `to/newname`, replacing
    /// `victim` (now in the graveyard) if the target existed.
    Renamed { from: DirRef, name: OsString, to: DirRef, newname: OsString, ino: u64, victim: Option<Grave> },
    /// `a/name` and `b/newname` were exchanged (RENAME_EXCHANGE).
    Exchanged { a: DirRef, name: OsString, b: DirRef, newname: OsString },
}

impl Change {
    /// The directories whose entries the change altered (one or two).
    fn dirs(&self) -> Vec<u64> {
        let (a, b) = match self {
            Change::Created { dir, .. } | Change::Removed { dir, .. } => (dir.ino, dir.ino),
            Change::Renamed { from, to, .. } => (from.ino, to.ino),
            Change::Exchanged { a, b, .. } => (a.ino, b.ino),
        };
        if a == b {
            vec![a]
        } else {
            vec![a, b]
        }
    }

    fn describe(&self) -> String {
        match self {
            Change::Created { dir, name, .. } => format!("create {}", dir.show(name)),
            Change::Removed { dir, name, .. } => format!("remove {}", dir.show(name)),
            Change::Renamed { from, name, to, newname, victim, .. } => format!(
                "rename {} to {}{}",
                from.show(name),
                to.show(newname),
                if victim.is_some() { " (replacing it)" } else { "" }
            ),
            Change::Exchanged { a, name, b, newname } => format!("exchange {} and {}", a.show(name), b.show(newname)),
        }
    }
}

/// A change not yet durable.
#[derive(Debug)]
struct Pending {
    change: Change,
    /// Its directories not yet fsynced since the change.
    unsynced: Vec<u64>,
}

/// What [`NameLog::roll_back`] did.
#[derive(Debug, Default)]
pub struct RollBack {
    /// Changes undone (every pending one).
    pub undone: u64,
    /// One line per change undone, and per problem met (see
    /// [`NameLog::roll_back`]).
    pub notes: Vec<String>,
}

/// The undo log of the namespace changes made through `powercut-fs` that
/// are not yet durable.
///
/// Each change (create, mknod, mkdir, unlink, rmdir, rename with or without
/// a replaced target, RENAME_NOREPLACE, RENAME_EXCHANGE) is made in the
/// backing tree at once, so that everything reads as it should, and logged
/// here. The rule for durability:
///
/// - a change is *committed* (durable) once every directory whose entries
///   it changed has been fsynced since ([`NameLog::dir_synced`]) — for a
///   rename between two directories, both of them — **and** every earlier
///   pending change that altered one of those directories is committed:
///   a directory's changes become durable in their order, as through a
///   journal. Only then may a later change be durable without an earlier
///   one, never the other way round, so undoing a change always finds its
///   directories exactly as the change left them.
/// - the fsync of a file commits nothing here (strict POSIX: a new file's
///   name needs an fsync of its directory, whatever ext4 happens to do).
/// - a removed or replaced object is moved into the [`GRAVEYARD`], not
///   deleted, and deleted when the change commits.
///
/// A power cut ([`NameLog::roll_back`]) undoes every pending change, the
/// latest first: created names are removed (a created directory with all it
/// holds, even names in it that were committed: without its own name they
/// are lost), removed and replaced objects come back from the graveyard,
/// renames and exchanges are reversed. Objects move back, never get copied,
/// so inode numbers stay what they were.
///
/// Once the removal of a directory is durable (rmdir, or a rename over it,
/// committed), the changes pending inside it count as synced: a removed
/// directory takes its entries with it, whatever they were. (Without this,
/// `rm -r dir` followed by an fsync of the parent would leave the unlinks
/// inside `dir` pending for ever.) If undoing a change still meets a
/// directory that is gone (only through a rename between directories),
/// the object that would come back is deleted (an orphan a real file
/// system would lose) or, for a rename, left where it is, and the failure
/// is noted.
#[derive(Debug)]
pub struct NameLog {
    /// Backing inode of the root, where [`GRAVEYARD`] is hidden.
    root_ino: u64,
    /// The graveyard: `O_PATH` descriptor and absolute path.
    grave_fd: OwnedFd,
    grave_path: PathBuf,
    next_grave: u64,
    /// Pending changes, oldest first.
    pending: Vec<Pending>,
    /// Inodes with links in the graveyard: how many (`nlink_t`, to compare
    /// with `st_nlink` on every architecture).
    buried: HashMap<u64, libc::nlink_t>,
}

impl NameLog {
    /// A log for the backing tree `root`, whose root inode is `root_ino`:
    /// (re)creates an empty [`GRAVEYARD`] in it (what a previous run left
    /// there belonged to changes that stayed applied).
    pub fn new(root: &Path, root_ino: u64) -> io::Result<NameLog> {
        let grave_path = root.canonicalize()?.join(GRAVEYARD);
        match std::fs::remove_dir_all(&grave_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::DirBuilder::new().mode(0o700).create(&grave_path)?;
        let grave_fd =
            nix::fcntl::open(&grave_path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok(NameLog { root_ino, grave_fd, grave_path, next_grave: 0, pending: Vec::new(), buried: HashMap::new() })
    }

    /// Is `name` in directory `dir_ino` the graveyard (hidden)?
    pub fn hides(&self, dir_ino: u64, name: &OsStr) -> bool {
        dir_ino == self.root_ino && name == GRAVEYARD
    }

    /// How many links of inode `ino` are in the graveyard: an inode with no
    /// other link is removed, as far as the mount shows.
    pub fn graveyard_links(&self, ino: u64) -> libc::nlink_t {
        self.buried.get(&ino).copied().unwrap_or(0)
    }

    fn unbury_ino(&mut self, ino: u64) {
        if let Some(n) = self.buried.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                self.buried.remove(&ino);
            }
        }
    }

    /// Number of pending (not yet durable) changes.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The pending changes, oldest first, one line each.
    pub fn describe(&self) -> Vec<String> {
        self.pending.iter().map(|p| p.change.describe()).collect()
    }

    fn push(&mut self, change: Change) {
        let unsynced = change.dirs();
        self.pending.push(Pending { change, unsynced });
    }

    /// Records that `name` was just created in `dir` as inode `ino`.
    pub fn created(&mut self, dir: &DirRef, name: &OsStr, ino: u64) {
        self.push(Change::Created { dir: dir.clone(), name: name.to_owned(), ino });
    }

    /// Moves `dir/name` (whose status is `st`) into the graveyard.
    fn bury(&mut self, dir: &DirRef, name: &OsStr, st: &FileStat) -> io::Result<Grave> {
        let grave = Grave { name: OsString::from(self.next_grave.to_string()), ino: st.st_ino, dir: is_dir(st) };
        self.next_grave += 1;
        nix::fcntl::renameat2(
            dir.fd.as_fd(),
            name,
            self.grave_fd.as_fd(),
            grave.name.as_os_str(),
            RenameFlags::RENAME_NOREPLACE,
        )?;
        *self.buried.entry(grave.ino).or_insert(0) += 1;
        Ok(grave)
    }

    /// Moves `grave` back to `dir/name` (which must be free).
    fn unbury(&mut self, grave: &Grave, dir: &DirRef, name: &OsStr) -> io::Result<()> {
        nix::fcntl::renameat2(
            self.grave_fd.as_fd(),
            grave.name.as_os_str(),
            dir.fd.as_fd(),
            name,
            RenameFlags::RENAME_NOREPLACE,
        )?;
        self.unbury_ino(grave.ino);
        Ok(())
    }

    /// Deletes `grave` for good (a directory with all it holds).
    fn delete(&mut self, grave: &Grave) -> io::Result<()> {
        self.unbury_ino(grave.ino);
        if grave.dir {
            std::fs::remove_dir_all(self.grave_path.join(&grave.name))
        } else {
            Ok(nix::unistd::unlinkat(self.grave_fd.as_fd(), grave.name.as_os_str(), UnlinkatFlags::NoRemoveDir)?)
        }
    }

    /// Is the directory `dir/name` empty?
    fn is_empty_dir(dir: &DirRef, name: &OsStr) -> io::Result<bool> {
        let fd = nix::fcntl::openat(
            dir.fd.as_fd(),
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        match std::fs::read_dir(fd_path(&fd))?.next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(e),
        }
    }

    /// unlink (`rmdir` false) or rmdir of `dir/name`, logged: the object
    /// goes to the graveyard. Fails as unlink(2)/rmdir(2) would (EISDIR,
    /// ENOTDIR, ENOTEMPTY, ENOENT) without changing anything. Returns the
    /// object's inode number.
    pub fn remove(&mut self, dir: &DirRef, name: &OsStr, rmdir: bool) -> io::Result<u64> {
        let st = dir.stat(name)?;
        match (rmdir, is_dir(&st)) {
            (false, true) => return Err(errno(libc::EISDIR)),
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (true, true) if !Self::is_empty_dir(dir, name)? => return Err(errno(libc::ENOTEMPTY)),
            _ => {}
        }
        let grave = self.bury(dir, name, &st)?;
        self.push(Change::Removed { dir: dir.clone(), name: name.to_owned(), grave });
        Ok(st.st_ino)
    }

    /// renameat2(2) of `from/name` to `to/newname` with `flags` (none,
    /// RENAME_NOREPLACE or RENAME_EXCHANGE; others are refused with
    /// EINVAL), logged; a replaced target goes to the graveyard. Fails as
    /// rename would, without changing anything. Returns the replaced
    /// object's inode number, if any.
    pub fn rename(
        &mut self,
        from: &DirRef,
        name: &OsStr,
        to: &DirRef,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<Option<u64>> {
        let known = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) || flags == known {
            // RENAME_WHITEOUT (overlayfs) is not logged, so not done; and
            // NOREPLACE with EXCHANGE is invalid.
            return Err(errno(libc::EINVAL));
        }
        let src = from.stat(name)?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            nix::fcntl::renameat2(from.fd.as_fd(), name, to.fd.as_fd(), newname, flags)?;
            self.push(Change::Exchanged {
                a: from.clone(),
                name: name.to_owned(),
                b: to.clone(),
                newname: newname.to_owned(),
            });
            return Ok(None);
        }
        let target = match to.stat(newname) {
            Ok(st) => Some(st),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        let victim = match target {
            None => None,
            Some(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(errno(libc::EEXIST)),
            // Two names of one inode: rename(2) does nothing.
            Some(t) if t.st_ino == src.st_ino && t.st_dev == src.st_dev => return Ok(None),
            Some(t) => {
                // rename(2)'s own checks on the target, made here because
                // the target leaves before the rename.
                match (is_dir(&src), is_dir(&t)) {
                    (false, true) => return Err(errno(libc::EISDIR)),
                    (true, false) => return Err(errno(libc::ENOTDIR)),
                    (true, true) if !Self::is_empty_dir(to, newname)? => return Err(errno(libc::ENOTEMPTY)),
                    _ => {}
                }
                Some(self.bury(to, newname, &t)?)
            }
        };
        if let Err(e) = nix::fcntl::renameat2(from.fd.as_fd(), name, to.fd.as_fd(), newname, flags) {
            // E.g. a directory moved into itself (EINVAL): the target
            // comes back, nothing changed.
            if let Some(v) = &victim {
                if let Err(e2) = self.unbury(v, to, newname) {
                    eprintln!("powercut-fs: cannot put {} back after a failed rename: {e2}", to.show(newname));
                }
            }
            return Err(e.into());
        }
        let victim_ino = victim.as_ref().map(|v| v.ino);
        self.push(Change::Renamed {
            from: from.clone(),
            name: name.to_owned(),
            to: to.clone(),
            newname: newname.to_owned(),
            ino: src.st_ino,
            victim,
        });
        Ok(victim_ino)
    }

    /// The directory `dir_ino` was fsynced: the changes to it so far are
    /// durable, and each change whose every directory is now synced commits
    /// unless an earlier pending change shares a directory with it (see
    /// the type's documentation). Returns the inodes whose graveyard copy
    /// was deleted (the caller lets go of their cached pages).
    pub fn dir_synced(&mut self, dir_ino: u64) -> Vec<u64> {
        let mut freed = Vec::new();
        let mut synced = vec![dir_ino];
        while !synced.is_empty() {
            for p in &mut self.pending {
                p.unsynced.retain(|d| !synced.contains(d));
            }
            synced = self.commit(&mut freed);
        }
        freed
    }

    /// Commits what can be (see [`NameLog::dir_synced`]); the inodes of the
    /// graveyard copies deleted go to `freed`. Returns the directories
    /// whose removal was committed: what was pending in them is moot now
    /// (a durably removed directory takes its entries with it, whatever
    /// they were), so they count as synced.
    fn commit(&mut self, freed: &mut Vec<u64>) -> Vec<u64> {
        let mut removed_dirs = Vec::new();
        // Directories of the earlier changes that stay pending.
        let mut blocked: HashSet<u64> = HashSet::new();
        for p in std::mem::take(&mut self.pending) {
            let dirs = p.change.dirs();
            if !p.unsynced.is_empty() || dirs.iter().any(|d| blocked.contains(d)) {
                blocked.extend(dirs);
                self.pending.push(p);
                continue;
            }
            let grave = match p.change {
                Change::Removed { grave, .. } => Some(grave),
                Change::Renamed { victim, .. } => victim,
                Change::Created { .. } | Change::Exchanged { .. } => None,
            };
            if let Some(g) = grave {
                if let Err(e) = self.delete(&g) {
                    eprintln!("powercut-fs: cannot delete {} from the graveyard: {e}", g.name.to_string_lossy());
                }
                if g.dir {
                    removed_dirs.push(g.ino);
                }
                freed.push(g.ino);
            }
        }
        removed_dirs
    }

    /// Removes `dir/name`, created as inode `ino`, with all it holds.
    fn remove_created(&mut self, dir: &DirRef, name: &OsStr, ino: u64) -> io::Result<()> {
        let st = dir.stat(name)?;
        if st.st_ino != ino {
            return Err(io::Error::other(format!("it is inode {} now, not {ino}", st.st_ino)));
        }
        if is_dir(&st) {
            // Through the graveyard: remove_dir_all wants a path, and the
            // graveyard's is known.
            let grave = self.bury(dir, name, &st)?;
            self.delete(&grave)
        } else {
            Ok(nix::unistd::unlinkat(dir.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir)?)
        }
    }

    /// Puts `grave` back as `dir/name`; if that fails, deletes it (an
    /// object nothing durable names any more). Problems go to `notes`.
    fn restore(&mut self, grave: &Grave, dir: &DirRef, name: &OsStr, notes: &mut Vec<String>) {
        if let Err(e) = self.unbury(grave, dir, name) {
            notes.push(format!("cannot bring {} back ({e}): it is lost", dir.show(name)));
            if let Err(e) = self.delete(grave) {
                notes.push(format!("cannot delete {} from the graveyard: {e}", grave.name.to_string_lossy()));
            }
        }
    }

    fn undo(&mut self, change: Change, notes: &mut Vec<String>) {
        notes.push(format!("undo {}", change.describe()));
        match change {
            Change::Created { dir, name, ino } => {
                if let Err(e) = self.remove_created(&dir, &name, ino) {
                    notes.push(format!("cannot remove {}: {e}", dir.show(&name)));
                }
            }
            Change::Removed { dir, name, grave } => self.restore(&grave, &dir, &name, notes),
            Change::Renamed { from, name, to, newname, ino, victim } => {
                let back = to.stat(&newname).and_then(|st| {
                    if st.st_ino != ino {
                        return Err(io::Error::other(format!("it is inode {} now, not {ino}", st.st_ino)));
                    }
                    nix::fcntl::renameat2(
                        to.fd.as_fd(),
                        newname.as_os_str(),
                        from.fd.as_fd(),
                        name.as_os_str(),
                        RenameFlags::RENAME_NOREPLACE,
                    )
                    .map_err(io::Error::from)
                });
                if let Err(e) = back {
                    notes.push(format!(
                        "cannot move {} back to {} ({e}): left there",
                        to.show(&newname),
                        from.show(&name)
                    ));
                }
                if let Some(v) = victim {
                    self.restore(&v, &to, &newname, notes);
                }
            }
            Change::Exchanged { a, name, b, newname } => {
                if let Err(e) = nix::fcntl::renameat2(
                    a.fd.as_fd(),
                    name.as_os_str(),
                    b.fd.as_fd(),
                    newname.as_os_str(),
                    RenameFlags::RENAME_EXCHANGE,
                ) {
                    notes.push(format!("cannot exchange {} and {} back: {e}", a.show(&name), b.show(&newname)));
                }
            }
        }
    }

    /// A power cut: undoes every pending change, the latest first (see the
    /// type's documentation). Afterwards nothing is pending and the
    /// graveyard is empty.
    pub fn roll_back(&mut self) -> RollBack {
        let mut r = RollBack::default();
        while let Some(p) = self.pending.pop() {
            r.undone += 1;
            self.undo(p.change, &mut r.notes);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// An in-memory backing file that counts syncs and remembers what was
    /// synced (the "durable" image).
    #[derive(Default)]
    struct Mem {
        data: RefCell<Vec<u8>>,
        durable: RefCell<Vec<u8>>,
        syncs: Cell<u32>,
    }

    impl Backing for Mem {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let d = self.data.borrow();
            if off as usize >= d.len() {
                return Ok(0);
            }
            let n = buf.len().min(d.len() - off as usize);
            buf[..n].copy_from_slice(&d[off as usize..off as usize + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut d = self.data.borrow_mut();
            let end = off as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.data.borrow().len() as u64)
        }
        fn set_size(&self, size: u64) -> io::Result<()> {
            self.data.borrow_mut().resize(size as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            self.syncs.set(self.syncs.get() + 1);
            *self.durable.borrow_mut() = self.data.borrow().clone();
            Ok(())
        }
    }

    fn filled(len: usize, v: u8) -> Vec<u8> {
        vec![v; len]
    }

    #[test]
    fn reads_merge_cached_pages_over_the_backing_file() {
        let b = Mem::default();
        b.write_all_at(&filled(5 * PAGE_USIZE, 1), 0).expect("seed");
        let mut c = FileCache::new();
        // A partial page, a page-crossing range, a full page.
        c.write(&b, 100, &filled(10, 2)).expect("write");
        c.write(&b, PAGE * 2 - 5, &filled(10, 3)).expect("write");
        c.write(&b, PAGE * 3, &filled(PAGE_USIZE, 4)).expect("write");
        assert_eq!(c.dirty_pages(), 4);
        // The backing file is untouched.
        assert!(b.data.borrow().iter().all(|&x| x == 1));
        let r = c.read(&b, 0, 5 * PAGE).expect("read");
        let mut want = filled(5 * PAGE_USIZE, 1);
        want[100..110].fill(2);
        want[2 * PAGE_USIZE - 5..2 * PAGE_USIZE + 5].fill(3);
        want[3 * PAGE_USIZE..4 * PAGE_USIZE].fill(4);
        assert_eq!(r, want);
        // An unaligned read window.
        assert_eq!(c.read(&b, 95, 20).expect("read"), want[95..115]);
        // Reads stop at the end of the file.
        assert_eq!(c.read(&b, 5 * PAGE - 3, 100).expect("read").len(), 3);
        assert!(c.read(&b, 6 * PAGE, 100).expect("read").is_empty());
    }

    #[test]
    fn a_write_past_the_end_extends_the_file_at_once_and_a_cut_leaves_zeroes() {
        let b = Mem::default();
        b.write_all_at(b"hello", 0).expect("seed");
        let mut c = FileCache::new();
        c.write(&b, 10, b"world").expect("write");
        assert_eq!(b.size().expect("size"), 15, "size is durable at once");
        assert_eq!(c.read(&b, 0, 100).expect("read"), b"hello\0\0\0\0\0world");
        let r = c.cut(&b, |_| false).expect("cut");
        assert_eq!(r, CutResult { dropped: 1, kept: 0 });
        assert_eq!(c.read(&b, 0, 100).expect("read"), b"hello\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn flush_makes_pages_durable_and_never_extends_the_file() {
        let b = Mem::default();
        let mut c = FileCache::new();
        c.write(&b, 0, &filled(PAGE_USIZE + 10, 7)).expect("write");
        assert_eq!(b.size().expect("size"), PAGE + 10);
        assert_eq!(c.flush(&b).expect("flush"), 2);
        assert_eq!(c.dirty_pages(), 0);
        assert_eq!(*b.durable.borrow(), filled(PAGE_USIZE + 10, 7), "the partial last page is written up to EOF");
        // A flush with nothing dirty still syncs (fsync must not fail).
        let before = b.syncs.get();
        assert_eq!(c.flush(&b).expect("flush"), 0);
        assert_eq!(b.syncs.get(), before + 1);
    }

    #[test]
    fn truncate_drops_pages_past_the_end_and_zeroes_the_tail_of_the_last() {
        let b = Mem::default();
        let mut c = FileCache::new();
        c.write(&b, 0, &filled(3 * PAGE_USIZE, 9)).expect("write");
        c.set_size(&b, PAGE + 100).expect("truncate");
        assert_eq!(c.dirty_pages(), 2);
        assert_eq!(c.read(&b, 0, 10 * PAGE).expect("read"), filled(PAGE_USIZE + 100, 9));
        // Extending again shows zeroes, not the old cached bytes.
        c.set_size(&b, 3 * PAGE).expect("extend");
        let r = c.read(&b, 0, 10 * PAGE).expect("read");
        assert_eq!(r.len(), 3 * PAGE_USIZE);
        assert!(r[..PAGE_USIZE + 100].iter().all(|&x| x == 9));
        assert!(r[PAGE_USIZE + 100..].iter().all(|&x| x == 0));
        c.flush(&b).expect("flush");
        assert_eq!(*b.durable.borrow(), r);
    }

    #[test]
    fn durable_writes_survive_a_cut_and_leave_other_dirty_bytes_volatile() {
        let b = Mem::default();
        b.write_all_at(&filled(2 * PAGE_USIZE, 1), 0).expect("seed");
        let mut c = FileCache::new();
        c.write(&b, 0, &filled(2 * PAGE_USIZE, 2)).expect("write");
        // A durable write covering page 1 whole and 10 bytes of page 0.
        c.write_durable(&b, PAGE - 10, &filled(PAGE_USIZE + 10, 3)).expect("dsync write");
        assert_eq!(c.dirty_pages(), 1, "page 1 is clean, page 0 still dirty");
        let mut want = filled(2 * PAGE_USIZE, 2);
        want[PAGE_USIZE - 10..].fill(3);
        assert_eq!(c.read(&b, 0, 2 * PAGE).expect("read"), want);
        c.cut(&b, |_| false).expect("cut");
        let mut want = filled(2 * PAGE_USIZE, 1);
        want[PAGE_USIZE - 10..].fill(3);
        assert_eq!(c.read(&b, 0, 2 * PAGE).expect("read"), want);
    }

    #[test]
    fn zero_range_is_volatile_and_respects_keep_size() {
        let b = Mem::default();
        b.write_all_at(&filled(3 * PAGE_USIZE, 5), 0).expect("seed");
        let mut c = FileCache::new();
        c.zero_range(&b, 100, 2 * PAGE, true).expect("punch");
        let r = c.read(&b, 0, 3 * PAGE).expect("read");
        assert!(r[..100].iter().all(|&x| x == 5));
        assert!(r[100..2 * PAGE_USIZE + 100].iter().all(|&x| x == 0));
        assert!(r[2 * PAGE_USIZE + 100..].iter().all(|&x| x == 5));
        // KEEP_SIZE past the end: no growth.
        c.zero_range(&b, 3 * PAGE - 10, 100, true).expect("punch past EOF");
        assert_eq!(b.size().expect("size"), 3 * PAGE);
        // Without KEEP_SIZE the file grows.
        c.zero_range(&b, 3 * PAGE, PAGE, false).expect("zero range");
        assert_eq!(b.size().expect("size"), 4 * PAGE);
        c.cut(&b, |_| false).expect("cut");
        assert!(c.read(&b, 0, 3 * PAGE).expect("read").iter().all(|&x| x == 5), "the punch was lost");
    }

    #[test]
    fn a_cut_may_keep_any_subset_of_pages() {
        let b = Mem::default();
        b.set_size(8 * PAGE).expect("size");
        let mut c = FileCache::new();
        for i in 0..8u64 {
            c.write(&b, i * PAGE, &filled(PAGE_USIZE, i as u8 + 1)).expect("write");
        }
        let r = c.cut(&b, |idx| idx % 3 == 0).expect("cut");
        assert_eq!(r, CutResult { dropped: 5, kept: 3 });
        assert_eq!(c.dirty_pages(), 0);
        let data = c.read(&b, 0, 8 * PAGE).expect("read");
        for i in 0..8usize {
            let want = if i % 3 == 0 { i as u8 + 1 } else { 0 };
            assert!(data[i * PAGE_USIZE..(i + 1) * PAGE_USIZE].iter().all(|&x| x == want), "page {i}");
        }
        assert_eq!(*b.durable.borrow(), data, "kept pages were synced");
    }

    #[test]
    fn keep_page_is_deterministic_and_roughly_the_fraction() {
        let kept = (0..10_000u64).filter(|&i| keep_page(7, 0.3, 1, i)).count();
        assert!((2_500..3_500).contains(&kept), "{kept}");
        assert_eq!(keep_page(7, 0.3, 1, 42), keep_page(7, 0.3, 1, 42));
        assert!(!keep_page(7, 0.0, 1, 42));
        assert!(keep_page(7, 1.0, 1, 42));
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A backing tree in a temporary directory, with its log.
    struct Tree {
        tmp: tempfile::TempDir,
        root: DirRef,
        log: NameLog,
    }

    impl Tree {
        fn new() -> Tree {
            let tmp = tempfile::tempdir().expect("tempdir");
            let root = DirRef::open(tmp.path()).expect("open root");
            let log = NameLog::new(tmp.path(), root.ino).expect("name log");
            Tree { tmp, root, log }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.tmp.path().join(rel)
        }

        fn read(&self, rel: &str) -> Option<Vec<u8>> {
            std::fs::read(self.path(rel)).ok()
        }

        /// Creates the file `name` in `dir` with `data`, logged.
        fn create(&mut self, dir: &DirRef, name: &str, data: &[u8]) -> u64 {
            let path = std::fs::read_link(fd_path(&*dir.fd)).expect("dir path").join(name);
            std::fs::write(&path, data).expect("write");
            let ino = std::fs::metadata(&path).expect("stat").ino();
            self.log.created(dir, OsStr::new(name), ino);
            ino
        }

        fn mkdir(&mut self, dir: &DirRef, name: &str) -> DirRef {
            let path = std::fs::read_link(fd_path(&*dir.fd)).expect("dir path").join(name);
            std::fs::create_dir(&path).expect("mkdir");
            let d = DirRef::open(&path).expect("open");
            self.log.created(dir, OsStr::new(name), d.ino);
            d
        }

        /// Names in the root, without the graveyard.
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.tmp.path())
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n != GRAVEYARD)
                .collect();
            v.sort();
            v
        }

        fn graveyard_len(&self) -> usize {
            std::fs::read_dir(self.path(GRAVEYARD)).expect("graveyard").count()
        }
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn a_created_name_is_durable_only_once_its_directory_is_synced() {
        let mut t = Tree::new();
        let root = t.root.clone();
        t.create(&root, "synced", b"1");
        t.log.dir_synced(root.ino);
        t.create(&root, "unsynced", b"2");
        assert_eq!(t.log.pending(), 1);
        let r = t.log.roll_back();
        assert_eq!(r.undone, 1, "{:?}", r.notes);
        assert_eq!(t.names(), vec!["synced".to_string()], "the synced create stays, the other is undone");
        assert_eq!(t.log.pending(), 0);
    }

    #[test]
    fn an_unlinked_file_comes_back_with_its_inode_until_the_unlink_commits() {
        let mut t = Tree::new();
        let root = t.root.clone();
        let ino = t.create(&root, "f", b"old");
        t.log.dir_synced(root.ino);
        assert_eq!(t.log.remove(&root, os("f"), false).expect("unlink"), ino);
        assert!(t.read("f").is_none(), "gone at once for readers");
        assert_eq!(t.log.graveyard_links(ino), 1);
        assert_eq!(t.graveyard_len(), 1);
        t.log.roll_back();
        assert_eq!(t.read("f").as_deref(), Some(&b"old"[..]));
        assert_eq!(std::fs::metadata(t.path("f")).expect("stat").ino(), ino, "the same inode is back");
        assert_eq!(t.log.graveyard_links(ino), 0);
        // Committed, the graveyard copy goes.
        t.log.remove(&root, os("f"), false).expect("unlink");
        assert_eq!(t.log.dir_synced(root.ino), vec![ino]);
        assert_eq!(t.graveyard_len(), 0);
        assert_eq!(t.log.roll_back().undone, 0);
        assert!(t.read("f").is_none());
    }

    #[test]
    fn a_rename_over_a_file_is_undone_with_the_old_file_back() {
        let mut t = Tree::new();
        let root = t.root.clone();
        t.create(&root, "state", b"old");
        t.log.dir_synced(root.ino);
        t.create(&root, "state.tmp", b"new");
        let victim = t.log.rename(&root, os("state.tmp"), &root, os("state"), RenameFlags::empty()).expect("rename");
        assert!(victim.is_some());
        assert_eq!(t.read("state").as_deref(), Some(&b"new"[..]));
        assert_eq!(t.names(), vec!["state".to_string()]);
        let r = t.log.roll_back();
        assert_eq!(r.undone, 2, "{:?}", r.notes);
        assert_eq!(t.names(), vec!["state".to_string()], "the temporary file was never durable");
        assert_eq!(t.read("state").as_deref(), Some(&b"old"[..]));
        assert_eq!(t.graveyard_len(), 0);
    }

    #[test]
    fn rename_fails_as_rename_would_and_logs_nothing() {
        let mut t = Tree::new();
        let root = t.root.clone();
        t.create(&root, "a", b"a");
        t.create(&root, "b", b"b");
        let d = t.mkdir(&root, "d");
        t.create(&d, "inside", b"x");
        t.mkdir(&root, "e");
        t.log.dir_synced(root.ino);
        t.log.dir_synced(d.ino);
        assert_eq!(t.log.pending(), 0);
        let err = |r: io::Result<Option<u64>>| r.expect_err("must fail").raw_os_error();
        assert_eq!(
            err(t.log.rename(&root, os("a"), &root, os("b"), RenameFlags::RENAME_NOREPLACE)),
            Some(libc::EEXIST)
        );
        assert_eq!(err(t.log.rename(&root, os("a"), &root, os("d"), RenameFlags::empty())), Some(libc::EISDIR));
        assert_eq!(err(t.log.rename(&root, os("e"), &root, os("a"), RenameFlags::empty())), Some(libc::ENOTDIR));
        assert_eq!(err(t.log.rename(&root, os("e"), &root, os("d"), RenameFlags::empty())), Some(libc::ENOTEMPTY));
        assert_eq!(err(t.log.rename(&root, os("d"), &d, os("sub"), RenameFlags::empty())), Some(libc::EINVAL));
        assert_eq!(err(t.log.rename(&root, os("nope"), &root, os("x"), RenameFlags::empty())), Some(libc::ENOENT));
        assert_eq!(t.log.remove(&root, os("d"), false).expect_err("must fail").raw_os_error(), Some(libc::EISDIR));
        assert_eq!(t.log.remove(&root, os("a"), true).expect_err("must fail").raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(t.log.remove(&root, os("d"), true).expect_err("must fail").raw_os_error(), Some(libc::ENOTEMPTY));
        assert_eq!(t.log.pending(), 0);
        assert_eq!(t.graveyard_len(), 0);
        assert_eq!(t.names(), vec!["a", "b", "d", "e"]);
    }

    #[test]
    fn a_cross_directory_rename_commits_once_both_directories_are_synced() {
        let mut t = Tree::new();
        let root = t.root.clone();
        let x = t.mkdir(&root, "x");
        let y = t.mkdir(&root, "y");
        t.create(&x, "f", b"f");
        for d in [root.ino, x.ino, y.ino] {
            t.log.dir_synced(d);
        }
        t.log.rename(&x, os("f"), &y, os("g"), RenameFlags::empty()).expect("rename");
        t.log.dir_synced(y.ino);
        assert_eq!(t.log.pending(), 1, "the source directory is not synced yet");
        t.log.dir_synced(x.ino);
        assert_eq!(t.log.pending(), 0);
        assert_eq!(t.log.roll_back().undone, 0);
        assert!(t.read("y/g").is_some());
    }

    #[test]
    fn a_later_change_to_a_directory_does_not_commit_before_an_earlier_one() {
        let mut t = Tree::new();
        let root = t.root.clone();
        let x = t.mkdir(&root, "x");
        let y = t.mkdir(&root, "y");
        t.create(&x, "f", b"f");
        for d in [root.ino, x.ino, y.ino] {
            t.log.dir_synced(d);
        }
        // x/f -> y/g, then a new x/f: x is synced, y is not.
        t.log.rename(&x, os("f"), &y, os("g"), RenameFlags::empty()).expect("rename");
        t.create(&x, "f", b"new");
        t.log.dir_synced(x.ino);
        assert_eq!(t.log.pending(), 2, "the new x/f waits for the rename out of x");
        let r = t.log.roll_back();
        assert_eq!(r.undone, 2);
        assert!(r.notes.iter().all(|n| n.starts_with("undo ")), "no conflict: {:?}", r.notes);
        assert_eq!(t.read("x/f").as_deref(), Some(&b"f"[..]));
        assert!(t.read("y/g").is_none());
    }

    #[test]
    fn an_undone_mkdir_takes_everything_in_it() {
        let mut t = Tree::new();
        let root = t.root.clone();
        let d = t.mkdir(&root, "d");
        let sub = t.mkdir(&d, "sub");
        t.create(&sub, "f", b"f");
        t.log.dir_synced(d.ino);
        t.log.dir_synced(sub.ino);
        assert_eq!(t.log.pending(), 1, "only d itself is pending");
        t.log.roll_back();
        assert!(t.names().is_empty());
        assert_eq!(t.graveyard_len(), 0);
    }

    #[test]
    fn rmdir_and_exchange_are_undone() {
        let mut t = Tree::new();
        let root = t.root.clone();
        let d = t.mkdir(&root, "d");
        t.create(&root, "a", b"a");
        t.create(&root, "b", b"b");
        t.log.dir_synced(root.ino);
        t.log.remove(&root, os("d"), true).expect("rmdir");
        t.log.rename(&root, os("a"), &root, os("b"), RenameFlags::RENAME_EXCHANGE).expect("exchange");
        assert_eq!(t.read("a").as_deref(), Some(&b"b"[..]));
        assert_eq!(t.log.roll_back().undone, 2);
        assert_eq!(t.read("a").as_deref(), Some(&b"a"[..]));
        assert_eq!(DirRef::open(&t.path("d")).expect("d is back").ino, d.ino);
    }

    #[test]
    fn a_durable_rmdir_takes_the_changes_pending_inside_the_directory_with_it() {
        let mut t = Tree::new();
        let root = t.root.clone();
        let d = t.mkdir(&root, "d");
        t.create(&d, "f", b"f");
        t.log.dir_synced(root.ino);
        t.log.dir_synced(d.ino);
        // rm -r d, then an fsync of the root only.
        t.log.remove(&d, os("f"), false).expect("unlink");
        t.log.remove(&root, os("d"), true).expect("rmdir");
        assert_eq!(t.log.pending(), 2);
        t.log.dir_synced(root.ino);
        assert_eq!(t.log.pending(), 0, "the unlink in d is moot once d is durably gone");
        assert_eq!(t.graveyard_len(), 0);
        assert_eq!(t.log.roll_back().undone, 0);
        assert!(t.names().is_empty());
    }

    #[test]
    fn the_graveyard_is_hidden_only_in_the_root() {
        let mut t = Tree::new();
        let root = t.root.clone();
        assert!(t.log.hides(root.ino, os(GRAVEYARD)));
        let d = t.mkdir(&root, "d");
        assert!(!t.log.hides(d.ino, os(GRAVEYARD)));
        assert!(!t.log.hides(root.ino, os("d")));
    }
}
