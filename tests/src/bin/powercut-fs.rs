//! `powercut-fs BACKING_DIR MOUNTPOINT CONTROL_SOCKET`: a FUSE pass-through of
//! BACKING_DIR with a volatile write cache and a volatile namespace, in the
//! manner of LazyFS, for the end-to-end power-loss tests.
//!
//! File data written through the mount stays in memory (dirty 4 KiB pages per
//! inode, see `replicator_tests::powercut::FileCache`) until the file is
//! fsynced or fdatasynced, or written with O_DSYNC/O_SYNC/RWF_DSYNC (the
//! kernel marks such FUSE writes with O_DSYNC in the request's flags). Reads
//! merge the cache over the backing file. Closing a file does not make
//! anything durable.
//!
//! Names are volatile too (see `replicator_tests::powercut::NameLog`):
//! create, mknod, mkdir, unlink, rmdir and rename (also over an existing
//! target, RENAME_NOREPLACE and RENAME_EXCHANGE) are applied to the backing
//! directory at once, so every read sees them, and logged. The rule:
//! - a change is durable once every directory whose entries it changed has
//!   been fsynced since (FUSE `fsyncdir`): for a rename between two
//!   directories, *both* — and once every earlier pending change to one of
//!   those directories is durable (a directory's changes become durable in
//!   their order, as through a journal); once the removal of a directory
//!   is durable, the changes pending inside it count as durable too (it
//!   takes its entries with it);
//! - the fsync of a file makes its data durable, never its name (strict
//!   POSIX: a new file needs an fsync of its directory too, whatever ext4
//!   happens to do); sync(2)/syncfs(2) make nothing durable (the kernel does
//!   not send them to a FUSE server like this one);
//! - a file or directory that an unlink, rmdir or rename-over took away is
//!   kept, moved into a hidden directory of the backing root
//!   (`.powercut-fs-graveyard`: invisible through the mount, and neither
//!   creatable nor removable by that name), and deleted when the change is
//!   durable.
//!
//! A command on the control socket simulates a power cut: every namespace
//! change not yet durable is undone, the latest first (created names are
//! removed — a created directory with all it holds —, removed and replaced
//! files come back from the graveyard, renames are reversed); then every
//! dirty page is dropped (or a pseudo-random subset is kept, as a disk may
//! keep any subset of its volatile cache). Names go first so that the pages
//! of a file that does not survive count as dropped, never as kept.
//! Undoing moves backing inodes back, never recreates them, so the node ids
//! the kernel holds stay valid: a restored file keeps the node id it had
//! (if the kernel still holds one), a removed one answers with nlink 0 until
//! the kernel forgets it, and entry and attribute TTLs are zero, so the
//! kernel looks every name up again. The mount stays up across a cut (the
//! harness kills the daemon, cuts, and restarts the daemon on it).
//!
//! Other simplifications, as LazyFS by default: attributes are durable at
//! once (chmod, chown, utimes, truncate, the file size a write past the end
//! sets, fallocate preallocation). A rename moves the inode with its dirty
//! pages, so a file renamed without an fsync of its data loses that data at
//! a cut. An unlinked inode's dirty pages are dropped when its last handle
//! closes (if the unlink is undone, the file comes back with what was
//! durable).
//!
//! Every open is answered with FOPEN_DIRECT_IO, so the kernel's page cache
//! never holds data this file system could later drop, and entry/attribute
//! TTLs are zero. Lock requests are not implemented, so the kernel handles
//! flock and POSIX locks locally.
//!
//! Control socket (Unix stream, one command per line, one reply line each):
//! - `cut` → undo the pending names, drop every dirty page:
//!   `ok dropped N pages undone K names`
//! - `cut keep SEED FRACTION` → the same, but write a pseudo-random FRACTION
//!   (0..1) of the dirty pages to the backing files first:
//!   `ok dropped N pages kept M pages undone K names`
//! - `cut keep-only NAME` → the same, but every dirty page of the files
//!   whose backing path contains NAME is written back first (a disk that
//!   happened to write those back): `ok dropped N pages kept M pages undone K names`
//! - `fail-fsync NAME` → `ok armed`: the next fsync of a file whose backing
//!   path ends with NAME fails with EIO and drops that file's dirty pages (a
//!   failed write-back; as on Linux, the fsync after it succeeds)
//! - `fail-write NAME` → `ok armed`: the next write to a file whose backing
//!   path ends with NAME fails with EIO and changes nothing
//! - `hold-fsync NAME` → `ok armed`: the next fsync of a file whose backing
//!   path contains NAME waits (a disk that takes its time): until `release`,
//!   or 60 s, then it goes on as usual; or until the process that asked for
//!   it is killed, then it fails with EIO and makes nothing durable (a power
//!   cut that lands while the save is in progress; a killed process cannot
//!   exit while its request is with this server). `held` in `stats` counts
//!   the fsyncs waiting.
//! - `release` → `ok`: held fsyncs go on
//! - `stats` → `ok dirty N pages files F fsyncs S failed_fsyncs X dsync_writes D writes W failed_writes Y dir_fsyncs Z pending_names P held H`
//! - `files` → `ok PATH=PAGES ...`: the backing files with dirty pages
//! - `names` → `ok CHANGE; CHANGE; ...`: the pending namespace changes,
//!   oldest first ("create PATH", "remove PATH", "rename PATH to PATH", ...)
//!
//! Each change a cut undoes is logged on stderr.
//!
//! It runs in the foreground until unmounted or sent SIGTERM/SIGINT (then it
//! unmounts).
//!
//! Not implemented (the daemon needs none of them): symlinks, hard links,
//! RENAME_WHITEOUT, extended attributes, lseek SEEK_DATA/SEEK_HOLE (the
//! kernel falls back to treating the whole file as data). Requests are
//! served by two threads under one lock: correctness first.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use replicator_tests::powercut::{keep_page, CutResult, DirRef, FileCache, NameLog};

/// Entry and attribute time-to-live: none, the kernel asks every time.
const TTL: Duration = Duration::ZERO;

type Res<T> = Result<T, Errno>;

fn nix_err(e: nix::Error) -> Errno {
    Errno::from_i32(e as i32)
}

fn io_err(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The longest a `hold-fsync` holds.
const HOLD_AT_MOST: Duration = Duration::from_secs(60);

/// Thread `tid` has a SIGKILL pending (it is being killed) or is gone.
fn killed(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else { return true };
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        let Some((key, mask)) = l.split_once(':') else { return false };
        matches!(key, "SigPnd" | "ShdPnd") && u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & sigkill != 0)
    }) || status.lines().any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead")))
}

/// `/proc/self/fd/N`: reopens (or names) what an O_PATH descriptor points at.
fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        SFlag::S_IFCHR => FileType::CharDevice,
        SFlag::S_IFBLK => FileType::BlockDevice,
        SFlag::S_IFIFO => FileType::NamedPipe,
        SFlag::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(id: u64, st: &FileStat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// One inode of the backing directory that the kernel knows (or that still
/// has dirty pages).
#[derive(Debug)]
struct Node {
    /// O_PATH descriptor: pins the backing inode (so its number is not
    /// reused while this node exists) and names it for *at calls. Shared
    /// with the name log's entries for a directory.
    opath: Arc<OwnedFd>,
    /// The backing inode number.
    backing_ino: u64,
    /// Kernel lookup count (FUSE forget protocol).
    nlookup: u64,
    /// Open handles.
    open: u32,
    /// Read-write descriptor of a regular file, opened at first use.
    rw: Option<File>,
    /// Dirty pages.
    cache: FileCache,
}

impl Node {
    fn stat(&self) -> Res<FileStat> {
        nix::sys::stat::fstat(&self.opath).map_err(nix_err)
    }

    /// The read-write descriptor (regular files only).
    fn rw(&mut self) -> Res<&File> {
        if self.rw.is_none() {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(proc_path(&self.opath)).map_err(io_err)?;
            self.rw = Some(f);
        }
        self.rw.as_ref().ok_or(Errno::EIO)
    }

    /// The backing file and the cache, for a data operation.
    fn data(&mut self) -> Res<(&File, &mut FileCache)> {
        self.rw()?;
        match self.rw.as_ref() {
            Some(f) => Ok((f, &mut self.cache)),
            None => Err(Errno::EIO),
        }
    }
}

#[derive(Debug)]
struct Handle {
    node: u64,
    /// Directory handles: the entries, read at opendir.
    entries: Option<Vec<(u64, FileType, OsString)>>,
}

#[derive(Debug, Default)]
struct Stats {
    fsyncs: u64,
    failed_fsyncs: u64,
    dsync_writes: u64,
    writes: u64,
    failed_writes: u64,
    dir_fsyncs: u64,
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<u64, Node>,
    by_ino: HashMap<u64, u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    stats: Stats,
    /// `fail-fsync NAME`: the next fsync of a file whose backing path ends
    /// with NAME fails.
    fail_fsync: Option<String>,
    /// `fail-write NAME`: the next write to a file whose backing path ends
    /// with NAME fails (EIO) and changes nothing.
    fail_write: Option<String>,
    /// `hold-fsync NAME`: the next fsync of a file whose backing path
    /// contains NAME waits (see the module documentation).
    hold_fsync: Option<String>,
    /// Fsyncs held now.
    held: u64,
    /// `release` commands so far (a hold goes on once this moves).
    releases: u64,
    /// Namespace changes not yet durable.
    names: NameLog,
}

impl Inner {
    fn new(root: OwnedFd, backing: &Path) -> Result<Self, String> {
        let st = nix::sys::stat::fstat(&root).map_err(|e| e.to_string())?;
        let names = NameLog::new(backing, st.st_ino).map_err(|e| format!("cannot set up the graveyard: {e}"))?;
        let mut nodes = HashMap::new();
        let root_node = Node {
            opath: Arc::new(root),
            backing_ino: st.st_ino,
            nlookup: u64::MAX / 2,
            open: 0,
            rw: None,
            cache: FileCache::new(),
        };
        nodes.insert(INodeNo::ROOT.0, root_node);
        let mut by_ino = HashMap::new();
        by_ino.insert(st.st_ino, INodeNo::ROOT.0);
        Ok(Self {
            nodes,
            by_ino,
            next_id: 2,
            handles: HashMap::new(),
            next_fh: 1,
            stats: Stats::default(),
            fail_fsync: None,
            fail_write: None,
            hold_fsync: None,
            held: 0,
            releases: 0,
            names,
        })
    }

    fn node(&mut self, id: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&id).ok_or(Errno::ESTALE)
    }

    /// Directory `id` as the name log refers to it.
    fn dir(&mut self, id: u64) -> Res<DirRef> {
        let n = self.node(id)?;
        Ok(DirRef { ino: n.backing_ino, fd: Arc::clone(&n.opath) })
    }

    /// Fails with `errno` if `name` in `parent` is the hidden graveyard.
    fn visible(&mut self, parent: u64, name: &OsStr, errno: Errno) -> Res<()> {
        let dir_ino = self.node(parent)?.backing_ino;
        if self.names.hides(dir_ino, name) {
            return Err(errno);
        }
        Ok(())
    }

    /// Looks `name` up in directory `parent` and counts one kernel lookup.
    fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<(u64, FileStat)> {
        self.visible(parent, name, Errno::ENOENT)?;
        let fd = {
            let p = self.node(parent)?;
            nix::fcntl::openat(&p.opath, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(nix_err)?
        };
        let st = nix::sys::stat::fstat(&fd).map_err(nix_err)?;
        let id = match self.by_ino.get(&st.st_ino) {
            Some(&id) => id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let node = Node {
                    opath: Arc::new(fd),
                    backing_ino: st.st_ino,
                    nlookup: 0,
                    open: 0,
                    rw: None,
                    cache: FileCache::new(),
                };
                self.nodes.insert(id, node);
                self.by_ino.insert(st.st_ino, id);
                id
            }
        };
        self.node(id)?.nlookup += 1;
        Ok((id, st))
    }

    /// After an unlink, a rename over a file, a release or a forget: an
    /// inode without links or handles loses its dirty pages; a node neither
    /// the kernel nor the cache needs is forgotten. An inode whose links
    /// are all in the graveyard counts as unlinked: nothing can read it
    /// until a cut brings it back, and then only with what was durable.
    fn settle(&mut self, id: u64) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        if id == INodeNo::ROOT.0 || node.open > 0 {
            return;
        }
        let buried = self.names.graveyard_links(node.backing_ino);
        let unlinked = node.stat().map(|st| st.st_nlink <= buried).unwrap_or(true);
        if unlinked {
            node.cache.discard();
        }
        if node.nlookup == 0 && node.cache.dirty_pages() == 0 {
            let ino = node.backing_ino;
            self.nodes.remove(&id);
            if self.by_ino.get(&ino) == Some(&id) {
                self.by_ino.remove(&ino);
            }
        }
    }

    fn new_handle(&mut self, node: u64, entries: Option<Vec<(u64, FileType, OsString)>>) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { node, entries });
        fh
    }

    fn dirty_pages(&self) -> (u64, u64) {
        let mut pages = 0;
        let mut files = 0;
        for n in self.nodes.values() {
            let d = n.cache.dirty_pages();
            if d > 0 {
                pages += d;
                files += 1;
            }
        }
        (pages, files)
    }

    /// Settles the node of backing inode `ino`, if there is one.
    fn settle_ino(&mut self, ino: u64) {
        if let Some(&id) = self.by_ino.get(&ino) {
            self.settle(id);
        }
    }

    /// The power cut: undoes the pending namespace changes, then drops (or
    /// keeps some of) the dirty pages. Returns what happened to the pages
    /// and how many changes were undone.
    fn cut(&mut self, keep: Keep) -> io::Result<(CutResult, u64)> {
        let rolled = self.names.roll_back();
        for note in &rolled.notes {
            eprintln!("powercut-fs: cut: {note}");
        }
        let mut total = CutResult::default();
        let mut ids: Vec<u64> = self.nodes.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            let Some(node) = self.nodes.get_mut(id) else { continue };
            if node.cache.dirty_pages() == 0 {
                continue;
            }
            // An inode whose name was undone (or that had none) is gone:
            // its pages with it, whatever the disk kept.
            if node.stat().map(|st| st.st_nlink == 0).unwrap_or(true) {
                total.dropped += node.cache.discard();
                continue;
            }
            let r = match (&keep, node.rw.as_ref()) {
                (Keep::Fraction(seed, fraction), Some(f)) => {
                    let ino = node.backing_ino;
                    node.cache.cut(f, |idx| keep_page(*seed, *fraction, ino, idx))?
                }
                (Keep::FilesNamed(name), Some(f))
                    if std::fs::read_link(proc_path(&node.opath)).is_ok_and(|p| p.to_string_lossy().contains(name)) =>
                {
                    node.cache.cut(f, |_| true)?
                }
                _ => CutResult { dropped: node.cache.discard(), kept: 0 },
            };
            total.dropped += r.dropped;
            total.kept += r.kept;
        }
        for id in ids {
            self.settle(id);
        }
        Ok((total, rolled.undone))
    }
}

/// The changes a setattr asks for.
#[derive(Debug)]
struct SetAttr {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

#[derive(Debug)]
struct PowerCutFs {
    inner: Arc<Mutex<Inner>>,
}

impl PowerCutFs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn entry(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lock().lookup(parent.0, name) {
            Ok((id, st)) => reply.entry(&TTL, &attr(id, &st), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn do_setattr(&self, ino: u64, a: SetAttr) -> Res<FileAttr> {
        let SetAttr { mode, uid, gid, size, atime, mtime } = a;
        let mut inner = self.lock();
        let node = inner.node(ino)?;
        if let Some(size) = size {
            let (f, cache) = node.data()?;
            cache.set_size(f, size).map_err(io_err)?;
        }
        if let Some(mode) = mode {
            std::fs::set_permissions(proc_path(&node.opath), std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(io_err)?;
        }
        if uid.is_some() || gid.is_some() {
            nix::unistd::fchownat(
                &node.opath,
                "",
                uid.map(nix::unistd::Uid::from_raw),
                gid.map(nix::unistd::Gid::from_raw),
                AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nix_err)?;
        }
        if atime.is_some() || mtime.is_some() {
            let ts = |t: Option<TimeOrNow>| match t {
                None => nix::sys::time::TimeSpec::UTIME_OMIT,
                Some(TimeOrNow::Now) => nix::sys::time::TimeSpec::UTIME_NOW,
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    nix::sys::time::TimeSpec::from_duration(d)
                }
            };
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &proc_path(&node.opath),
                &ts(atime),
                &ts(mtime),
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .map_err(nix_err)?;
        }
        Ok(attr(ino, &node.stat()?))
    }

    fn do_create(&self, parent: u64, name: &OsStr, mode: u32, flags: i32) -> Res<(FileAttr, u64)> {
        let mut inner = self.lock();
        inner.visible(parent, name, Errno::EPERM)?;
        let dir = inner.dir(parent)?;
        // Exclusively first, so that only a name this call made is logged:
        // the kernel sends CREATE for an O_CREAT open of an existing file
        // too.
        let excl = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(dir.fd.as_fd(), name, excl, Mode::from_bits_truncate(mode)) {
            Ok(fd) => {
                let st = nix::sys::stat::fstat(&fd).map_err(nix_err)?;
                inner.names.created(&dir, name, st.st_ino);
            }
            Err(nix::Error::EEXIST) if flags & libc::O_EXCL == 0 => {
                // It exists: open it as open(2) without O_CREAT would (so
                // that, e.g., a directory fails with EISDIR).
                let oflag = OFlag::O_RDWR | OFlag::O_CLOEXEC;
                drop(nix::fcntl::openat(dir.fd.as_fd(), name, oflag, Mode::empty()).map_err(nix_err)?);
            }
            Err(e) => return Err(nix_err(e)),
        }
        let (id, _) = inner.lookup(parent, name)?;
        let node = inner.node(id)?;
        if flags & libc::O_TRUNC != 0 {
            let (f, cache) = node.data()?;
            cache.set_size(f, 0).map_err(io_err)?;
        }
        node.rw()?;
        node.open += 1;
        let st = node.stat()?;
        let fh = inner.new_handle(id, None);
        Ok((attr(id, &st), fh))
    }

    fn do_open(&self, ino: u64, flags: OpenFlags) -> Res<u64> {
        let mut inner = self.lock();
        let node = inner.node(ino)?;
        let st = node.stat()?;
        if file_type(st.st_mode) == FileType::RegularFile {
            node.rw()?;
            if flags.0 & libc::O_TRUNC != 0 {
                let (f, cache) = node.data()?;
                cache.set_size(f, 0).map_err(io_err)?;
            }
        }
        node.open += 1;
        Ok(inner.new_handle(ino, None))
    }

    fn do_release(&self, fh: u64) {
        let mut inner = self.lock();
        if let Some(h) = inner.handles.remove(&fh) {
            if let Some(node) = inner.nodes.get_mut(&h.node) {
                node.open = node.open.saturating_sub(1);
            }
            inner.settle(h.node);
        }
    }

    fn do_write(&self, ino: u64, offset: u64, data: &[u8], flags: OpenFlags) -> Res<u32> {
        let mut inner = self.lock();
        let durable = flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0;
        if durable {
            inner.stats.dsync_writes += 1;
        } else {
            inner.stats.writes += 1;
        }
        let armed = inner.fail_write.clone();
        let node = inner.node(ino)?;
        let fail = armed.is_some_and(|name| {
            std::fs::read_link(proc_path(&node.opath)).is_ok_and(|p| p.to_string_lossy().ends_with(&name))
        });
        if fail {
            inner.fail_write = None;
            inner.stats.failed_writes += 1;
            return Err(Errno::EIO);
        }
        let (f, cache) = node.data()?;
        if durable {
            cache.write_durable(f, offset, data).map_err(io_err)?;
        } else {
            cache.write(f, offset, data).map_err(io_err)?;
        }
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    fn do_read(&self, ino: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        let mut inner = self.lock();
        let node = inner.node(ino)?;
        let (f, cache) = node.data()?;
        cache.read(f, offset, u64::from(size)).map_err(io_err)
    }

    fn do_fsync(&self, ino: u64) -> Res<()> {
        let mut inner = self.lock();
        inner.stats.fsyncs += 1;
        let armed = inner.fail_fsync.clone();
        let node = inner.node(ino)?;
        let st = node.stat()?;
        if file_type(st.st_mode) != FileType::RegularFile {
            return Ok(());
        }
        let fail = armed.is_some_and(|name| {
            std::fs::read_link(proc_path(&node.opath)).is_ok_and(|p| p.to_string_lossy().ends_with(&name))
        });
        if fail {
            // A failed write-back: the disk lost the dirty pages, and (as
            // on Linux) the next fsync finds nothing to write.
            node.cache.discard();
        } else {
            let (f, cache) = node.data()?;
            cache.flush(f).map_err(io_err)?;
            return Ok(());
        }
        inner.fail_fsync = None;
        inner.stats.failed_fsyncs += 1;
        Err(Errno::EIO)
    }

    /// `hold-fsync`: waits if the fsync of `ino` by thread `tid` is the one
    /// armed; `Err(EIO)` when that thread was killed meanwhile.
    fn hold(&self, ino: u64, tid: u32) -> Res<()> {
        let releases = {
            let mut inner = self.lock();
            let Some(name) = inner.hold_fsync.clone() else { return Ok(()) };
            let node = inner.node(ino)?;
            if !std::fs::read_link(proc_path(&node.opath)).is_ok_and(|p| p.to_string_lossy().contains(&name)) {
                return Ok(());
            }
            inner.hold_fsync = None;
            inner.held += 1;
            inner.releases
        };
        let deadline = std::time::Instant::now() + HOLD_AT_MOST;
        let outcome = loop {
            if killed(tid) {
                break Err(Errno::EIO);
            }
            if self.lock().releases != releases || std::time::Instant::now() > deadline {
                break Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.lock().held -= 1;
        outcome
    }

    fn do_fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        let mut inner = self.lock();
        let node = inner.node(ino)?;
        let (f, cache) = node.data()?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
        if rest == libc::FALLOC_FL_PUNCH_HOLE {
            if !keep_size {
                return Err(Errno::EINVAL);
            }
            cache.zero_range(f, offset, length, true).map_err(io_err)
        } else if rest == libc::FALLOC_FL_ZERO_RANGE {
            cache.zero_range(f, offset, length, keep_size).map_err(io_err)
        } else if rest == 0 {
            // Preallocation: no content change, metadata durable at once.
            let (off, len) = match (i64::try_from(offset), i64::try_from(length)) {
                (Ok(o), Ok(l)) => (o, l),
                _ => return Err(Errno::EFBIG),
            };
            let flags = if keep_size {
                nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE
            } else {
                nix::fcntl::FallocateFlags::empty()
            };
            nix::fcntl::fallocate(f.as_fd(), flags, off, len).map_err(nix_err)
        } else {
            Err(Errno::EOPNOTSUPP)
        }
    }

    fn do_opendir(&self, ino: u64) -> Res<u64> {
        let mut inner = self.lock();
        let node = inner.node(ino)?;
        let mut entries =
            vec![(ino, FileType::Directory, OsString::from(".")), (ino, FileType::Directory, "..".into())];
        let dir_ino = node.backing_ino;
        for e in std::fs::read_dir(proc_path(&node.opath)).map_err(io_err)? {
            let e = e.map_err(io_err)?;
            if inner.names.hides(dir_ino, &e.file_name()) {
                continue;
            }
            let md = e.metadata().map_err(io_err)?;
            entries.push((md.ino(), file_type(md.mode()), e.file_name()));
        }
        let node = inner.node(ino)?;
        node.open += 1;
        Ok(inner.new_handle(ino, Some(entries)))
    }

    /// unlink or rmdir: the object moves to the graveyard until the
    /// change is durable (see `NameLog`).
    fn do_remove(&self, parent: u64, name: &OsStr, rmdir: bool) -> Res<()> {
        let mut inner = self.lock();
        inner.visible(parent, name, Errno::ENOENT)?;
        let dir = inner.dir(parent)?;
        let ino = inner.names.remove(&dir, name, rmdir).map_err(io_err)?;
        inner.settle_ino(ino);
        Ok(())
    }

    /// rename, logged; a replaced target moves to the graveyard.
    fn do_rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: RenameFlags) -> Res<()> {
        let mut inner = self.lock();
        inner.visible(parent, name, Errno::ENOENT)?;
        inner.visible(newparent, newname, Errno::EPERM)?;
        let from = inner.dir(parent)?;
        let to = inner.dir(newparent)?;
        let nflags = nix::fcntl::RenameFlags::from_bits(flags.bits()).ok_or(Errno::EINVAL)?;
        if let Some(victim) = inner.names.rename(&from, name, &to, newname, nflags).map_err(io_err)? {
            inner.settle_ino(victim);
        }
        Ok(())
    }

    /// mkdir (`rdev` None) or mknod, logged.
    fn do_mk(&self, parent: u64, name: &OsStr, mode: u32, rdev: Option<u32>) -> Res<(u64, FileStat)> {
        let mut inner = self.lock();
        inner.visible(parent, name, Errno::EPERM)?;
        let dir = inner.dir(parent)?;
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        match rdev {
            None => nix::sys::stat::mkdirat(dir.fd.as_fd(), name, perm).map_err(nix_err)?,
            Some(rdev) => {
                let kind = SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits());
                nix::sys::stat::mknodat(dir.fd.as_fd(), name, kind, perm, u64::from(rdev)).map_err(nix_err)?
            }
        }
        let st = nix::sys::stat::fstatat(dir.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nix_err)?;
        inner.names.created(&dir, name, st.st_ino);
        inner.lookup(parent, name)
    }

    /// fsync of a directory: its changes so far are durable (and with them
    /// those that waited only for it).
    fn do_fsyncdir(&self, ino: u64) -> Res<()> {
        let mut inner = self.lock();
        inner.stats.dir_fsyncs += 1;
        let dir_ino = inner.node(ino)?.backing_ino;
        for freed in inner.names.dir_synced(dir_ino) {
            inner.settle_ino(freed);
        }
        Ok(())
    }

    fn do_copy(&self, ino_in: u64, off_in: u64, ino_out: u64, off_out: u64, len: u64) -> Res<u32> {
        let len = len.min(1 << 30);
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(1 << 20) as u32;
            let data = self.do_read(ino_in, off_in + done, chunk)?;
            if data.is_empty() {
                break;
            }
            self.do_write(ino_out, off_out + done, &data, OpenFlags(0))?;
            done += data.len() as u64;
        }
        u32::try_from(done).map_err(|_| Errno::EINVAL)
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(parent, name, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(&ino.0) {
            node.nlookup = node.nlookup.saturating_sub(nlookup);
        }
        inner.settle(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.lock().node(ino.0).and_then(|n| n.stat());
        match r {
            Ok(st) => reply.attr(&TTL, &attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(ino.0, SetAttr { mode, uid, gid, size, atime, mtime }) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.do_mk(parent.0, name, mode & !umask, Some(rdev)) {
            Ok((id, st)) => reply.entry(&TTL, &attr(id, &st), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.do_mk(parent.0, name, mode & !umask, None) {
            Ok((id, st)) => reply.entry(&TTL, &attr(id, &st), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.do_rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino.0, flags) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(ino.0, offset, data, flags) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsync(&self, req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.hold(ino.0, req.pid()).and_then(|()| self.do_fsync(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let inner = self.lock();
        let Some(entries) = inner.handles.get(&fh.0).and_then(|h| h.entries.as_ref()) else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.do_fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = {
            let mut inner = self.lock();
            inner.node(INodeNo::ROOT.0).and_then(|n| nix::sys::statvfs::fstatvfs(&n.opath).map_err(nix_err))
        };
        match r {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.do_create(parent.0, name, mode & !umask, flags) {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.do_fallocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.do_copy(ino_in.0, offset_in, ino_out.0, offset_out, len) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }
}

/// Which dirty pages a cut writes back before dropping the rest.
enum Keep {
    Nothing,
    /// `cut keep SEED FRACTION`: a pseudo-random fraction of every file's.
    Fraction(u64, f64),
    /// `cut keep-only NAME`: every page of the files whose backing path
    /// contains NAME (a disk that wrote those back first), none of others.
    FilesNamed(String),
}

/// One control command; returns the reply line.
fn control_command(inner: &Mutex<Inner>, line: &str) -> String {
    let mut inner = inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["cut"] => match inner.cut(Keep::Nothing) {
            Ok((r, undone)) => format!("ok dropped {} pages undone {undone} names", r.dropped),
            Err(e) => format!("error {e}"),
        },
        ["cut", "keep", seed, fraction] => {
            let (Ok(seed), Ok(fraction)) = (seed.parse::<u64>(), fraction.parse::<f64>()) else {
                return "error usage: cut keep SEED FRACTION".into();
            };
            match inner.cut(Keep::Fraction(seed, fraction)) {
                Ok((r, undone)) => format!("ok dropped {} pages kept {} pages undone {undone} names", r.dropped, r.kept),
                Err(e) => format!("error {e}"),
            }
        }
        ["cut", "keep-only", name] => match inner.cut(Keep::FilesNamed((*name).to_string())) {
            Ok((r, undone)) => format!("ok dropped {} pages kept {} pages undone {undone} names", r.dropped, r.kept),
            Err(e) => format!("error {e}"),
        },
        ["fail-fsync", name] => {
            inner.fail_fsync = Some((*name).to_string());
            "ok armed".into()
        }
        ["fail-write", name] => {
            inner.fail_write = Some((*name).to_string());
            "ok armed".into()
        }
        ["hold-fsync", name] => {
            inner.hold_fsync = Some((*name).to_string());
            "ok armed".into()
        }
        ["release"] => {
            inner.releases += 1;
            "ok".into()
        }
        ["stats"] => {
            let (pages, files) = inner.dirty_pages();
            format!(
                "ok dirty {pages} pages files {files} fsyncs {} failed_fsyncs {} dsync_writes {} writes {} failed_writes {} dir_fsyncs {} pending_names {} held {}",
                inner.stats.fsyncs,
                inner.stats.failed_fsyncs,
                inner.stats.dsync_writes,
                inner.stats.writes,
                inner.stats.failed_writes,
                inner.stats.dir_fsyncs,
                inner.names.pending(),
                inner.held
            )
        }
        ["names"] => {
            let changes = inner.names.describe();
            if changes.is_empty() {
                "ok".into()
            } else {
                format!("ok {}", changes.join("; "))
            }
        }
        ["files"] => {
            let mut out = String::from("ok");
            let mut files: Vec<(String, u64)> = inner
                .nodes
                .values()
                .filter(|n| n.cache.dirty_pages() > 0)
                .map(|n| {
                    let path = std::fs::read_link(proc_path(&n.opath))
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| format!("inode {}", n.backing_ino));
                    (path, n.cache.dirty_pages())
                })
                .collect();
            files.sort();
            for (path, pages) in files {
                out.push_str(&format!(" {path}={pages}"));
            }
            out
        }
        _ => "error unknown command (cut | cut keep SEED FRACTION | cut keep-only NAME | fail-fsync NAME | fail-write NAME | hold-fsync NAME | release | stats | files | names)"
            .into(),
    }
}

fn serve_control(inner: Arc<Mutex<Inner>>, stream: UnixStream) {
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let mut reply = control_command(&inner, &line);
        reply.push('\n');
        if w.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn run(backing: &Path, mountpoint: &Path, control: &Path) -> Result<(), String> {
    let root = nix::fcntl::open(backing, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("{}: {e}", backing.display()))?;
    let inner = Arc::new(Mutex::new(Inner::new(root, backing).map_err(|e| format!("{}: {e}", backing.display()))?));

    // SIGTERM and SIGINT are blocked in every thread and taken by the main
    // thread, which then unmounts.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.thread_block().map_err(|e| format!("cannot block signals: {e}"))?;

    match std::fs::remove_file(control) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", control.display())),
    }
    let listener = UnixListener::bind(control).map_err(|e| format!("{}: {e}", control.display()))?;
    let ctl_inner = Arc::clone(&inner);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let inner = Arc::clone(&ctl_inner);
                let _ =
                    std::thread::Builder::new().name("control-conn".into()).spawn(move || serve_control(inner, stream));
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;

    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("powercut-fs".into()), MountOption::Subtype("powercut".into())];
    config.n_threads = Some(2);
    let session = fuser::spawn_mount(PowerCutFs { inner }, mountpoint, &config)
        .map_err(|e| format!("cannot mount on {}: {e}", mountpoint.display()))?;
    eprintln!(
        "powercut-fs: {} mounted on {} (control socket {})",
        backing.display(),
        mountpoint.display(),
        control.display()
    );

    loop {
        if session.guard.is_finished() {
            eprintln!("powercut-fs: {} was unmounted", mountpoint.display());
            return session.join().map_err(|e| format!("session: {e}"));
        }
        let ts = libc::timespec { tv_sec: 0, tv_nsec: 200_000_000 };
        // SAFETY: `sigs` is a valid sigset_t for the call, the siginfo
        // pointer may be null, and `ts` lives across the call.
        let sig = unsafe { libc::sigtimedwait(sigs.as_ref(), std::ptr::null_mut(), &ts) };
        if sig > 0 {
            eprintln!("powercut-fs: signal {sig}, unmounting {}", mountpoint.display());
            return session.umount_and_join().map_err(|e| format!("unmount: {e}"));
        }
    }
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.len() != 3 || args.iter().any(|a| a.as_bytes().starts_with(b"-")) {
        eprintln!("usage: powercut-fs BACKING_DIR MOUNTPOINT CONTROL_SOCKET");
        std::process::exit(2);
    }
    if let Err(e) = run(Path::new(&args[0]), Path::new(&args[1]), Path::new(&args[2])) {
        eprintln!("powercut-fs: {e}");
        std::process::exit(1);
    }
}
