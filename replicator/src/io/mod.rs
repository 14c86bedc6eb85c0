//! Volume and journal I/O: one engine per daemon, many open block files.
//!
//! Every byte the daemon reads from or writes to a replicated volume or a
//! journal goes through this module:
//!
//! * [`IoEngine`] is created once per daemon and cloned freely. By default it
//!   owns one io_uring instance: the calling task submits to it directly,
//!   and its completions are reaped in the tokio reactor (on a thread,
//!   `replicator-io-uring`, outside a runtime; see `uring.rs`). When the ring cannot be set up
//!   (old kernel, `kernel.io_uring_disabled`, a seccomp profile that blocks
//!   io_uring as Docker's default does, `RLIMIT_MEMLOCK` too low on kernels
//!   before 5.12), it falls back to the *threads* backend: blocking
//!   `pread`/`pwrite`/`fdatasync` on tokio's blocking pool (`threads.rs`).
//!   The environment variable `REPLICATOR_IO_BACKEND=threads` forces the
//!   threads backend, whatever the configuration asks for (for debugging, or
//!   for hosts where io_uring is distrusted); `REPLICATOR_IO_BACKEND=auto` or
//!   `io_uring` (or unset) leaves the choice to the caller.
//! * [`BlockFile`] is one open volume or journal: a regular file or a block
//!   device, opened with `O_DIRECT` when asked and when the filesystem allows
//!   it (`file.rs`).
//!
//! Buffers are [`AlignedBuf`]s, passed by value: the engine owns a buffer from
//! submission until the kernel has completed the operation, even if the
//! future that submitted it is dropped, and hands it back with the result.
//!
//! The async methods of [`BlockFile`] must run inside a tokio runtime (the
//! threads backend, and the block device ioctls of both backends, use
//! `tokio::task::spawn_blocking`). With io_uring, `fdatasync` and
//! `fallocate` go through the ring too.
//!
//! Decisions an admin may care about:
//! * An existing volume whose size differs from the configured one, in either
//!   direction, is refused (`SizeMismatch`); nothing is resized.
//! * A block device opened for writing is opened with `O_EXCL`: never while
//!   it is mounted or another daemon has it, and nobody mounts it or runs
//!   `mkfs` on it meanwhile (`IoError::DeviceBusy`).
//! * A missing path is created as a sparse file only outside `/dev`: a
//!   missing `/dev/vg0/db` means an inactive or mistyped device, not "create
//!   a file in devtmpfs".
//! * After `discard`, the range always reads back as zeroes, on every kind of
//!   storage; where the storage cannot promise that, zeroes are written.
//!
//! Lifetime: the io_uring reaper runs while any [`IoEngine`] or [`BlockFile`]
//! handle exists. When the last one is dropped, it completes the operations
//! still in flight (whose futures may be gone), then exits.

mod buf;
mod file;
mod threads;
mod uring;

#[cfg(test)]
mod tests;

pub use buf::{AlignedBuf, IO_ALIGN};
pub(crate) use file::start_writeback;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use uring::UringEngine;

/// Environment variable that forces the threads backend when set to `threads`.
pub const BACKEND_ENV: &str = "REPLICATOR_IO_BACKEND";

/// Largest zero buffer written at once when zeroing has to be done by hand.
const ZERO_CHUNK: usize = 1 << 20;

/// The I/O backend actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One io_uring instance, submitted to inline, reaped in the reactor.
    IoUring,
    /// Blocking `pread`/`pwrite` on tokio's blocking thread pool.
    Threads,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io_uring",
            Backend::Threads => "threads",
        })
    }
}

/// The backend the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring, falling back to threads (with a warning naming the reason)
    /// when the ring cannot be created.
    Auto,
    /// Always the threads backend.
    Threads,
}

/// The I/O engine shared by all files of a daemon. Cloning yields a handle to
/// the same engine (one io_uring instance).
#[derive(Clone)]
pub struct IoEngine {
    kind: EngineKind,
    fallback_reason: Option<Arc<str>>,
}

#[derive(Clone)]
enum EngineKind {
    Uring(Arc<UringEngine>),
    Threads,
}

impl EngineKind {
    fn backend(&self) -> Backend {
        match self {
            EngineKind::Uring(_) => Backend::IoUring,
            EngineKind::Threads => Backend::Threads,
        }
    }
}

impl fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEngine")
            .field("backend", &self.backend())
            .field("fallback_reason", &self.fallback_reason)
            .finish()
    }
}

impl IoEngine {
    /// Starts the engine. Never fails: when io_uring was asked for but cannot
    /// be set up, logs a warning with the reason and uses the threads backend
    /// ([`IoEngine::fallback_reason`] then says why). `REPLICATOR_IO_BACKEND=threads`
    /// in the environment forces the threads backend.
    pub fn new(choice: BackendChoice) -> IoEngine {
        let env = std::env::var(BACKEND_ENV).ok();
        match env_decision(env.as_deref()) {
            EnvDecision::Keep => {}
            EnvDecision::ForceThreads => {
                tracing::info!("{BACKEND_ENV}=threads is set: using the threads I/O backend");
                let reason = (choice == BackendChoice::Auto).then(|| format!("{BACKEND_ENV}=threads is set"));
                return IoEngine::threads(reason);
            }
            EnvDecision::Invalid => tracing::warn!(
                "ignoring {BACKEND_ENV}={:?}: valid values are \"threads\", \"auto\" and \"io_uring\"",
                env.unwrap_or_default()
            ),
        }
        match choice {
            BackendChoice::Threads => IoEngine::threads(None),
            BackendChoice::Auto => IoEngine::uring_or_threads(uring::RING_ENTRIES),
        }
    }

    /// io_uring with a ring of `entries` SQEs, else threads with a warning.
    fn uring_or_threads(entries: u32) -> IoEngine {
        match UringEngine::start(entries) {
            Ok(engine) => IoEngine { kind: EngineKind::Uring(Arc::new(engine)), fallback_reason: None },
            Err(reason) => {
                tracing::warn!(
                    %reason,
                    "io_uring is unavailable; falling back to the threads I/O backend \
                     (blocking pread/pwrite on a thread pool, slower under load)"
                );
                IoEngine::threads(Some(reason))
            }
        }
    }

    fn threads(reason: Option<String>) -> IoEngine {
        IoEngine { kind: EngineKind::Threads, fallback_reason: reason.map(Arc::from) }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.kind.backend()
    }

    /// Why the threads backend is used although io_uring was asked for
    /// (`BackendChoice::Auto`): the ring could not be created, or
    /// `REPLICATOR_IO_BACKEND=threads` is set. `None` when io_uring is in use
    /// or the threads backend was chosen explicitly.
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason.as_deref().map(str::to_owned)
    }

    /// Opens (and, with `create_size`, creates) a volume or journal file.
    /// See [`OpenOptions`]. This is a blocking call (open, stat, and fsync
    /// when creating): call it at startup or from `spawn_blocking`.
    pub fn open(&self, path: &Path, opts: &OpenOptions) -> Result<BlockFile, IoError> {
        let opened = file::open(path, opts)?;
        Ok(BlockFile {
            inner: Arc::new(FileInner {
                path: path.to_path_buf(),
                file: Arc::new(opened.file),
                size: opened.size,
                direct: opened.direct,
                block_device: opened.block_device,
                read_only: opts.read_only,
                unsupported: AtomicU8::new(0),
                engine: self.kind.clone(),
                sync_calls: AtomicU64::new(0),
                synced: tokio::sync::Mutex::new(0),
                sync_failed: OnceLock::new(),
            }),
        })
    }

    #[cfg(test)]
    fn uring(&self) -> Option<&Arc<UringEngine>> {
        match &self.kind {
            EngineKind::Uring(e) => Some(e),
            EngineKind::Threads => None,
        }
    }
}

/// What the `REPLICATOR_IO_BACKEND` variable does to the configured choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnvDecision {
    Keep,
    ForceThreads,
    Invalid,
}

fn env_decision(value: Option<&str>) -> EnvDecision {
    match value.map(str::trim) {
        None | Some("") => EnvDecision::Keep,
        Some(v) if v.eq_ignore_ascii_case("threads") => EnvDecision::ForceThreads,
        Some(v) if v.eq_ignore_ascii_case("auto") || v.eq_ignore_ascii_case("io_uring") => EnvDecision::Keep,
        Some(_) => EnvDecision::Invalid,
    }
}

/// How to open a volume or journal file.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Expected size in bytes. If the path does not exist and `create` is
    /// set (and `read_only` is not, and the path is not under `/dev`), a
    /// sparse regular file of this size is created (mode 0600, file and
    /// parent directory fsynced). If the path exists, a regular file or block
    /// device whose size differs is refused with [`IoError::SizeMismatch`],
    /// whether it is smaller or larger: the two sites must agree on the
    /// volume size to the byte.
    pub create_size: Option<u64>,
    /// Create a missing path as a sparse file of `create_size` bytes. Without
    /// it a missing path is an error ([`IoError::Open`], `NotFound`): a
    /// mistyped path or an inactive logical volume must not silently become
    /// a new, empty volume.
    pub create: bool,
    /// Try `O_DIRECT`; if the filesystem refuses it (`EINVAL`), open buffered
    /// instead ([`BlockFile::is_direct`] tells which).
    pub direct: bool,
    /// Open read-only: writes, zeroing and discards are refused. A block
    /// device opened for writing (`read_only` false) is opened exclusively
    /// (`O_EXCL`): refused with [`IoError::DeviceBusy`] while it is mounted
    /// or opened exclusively elsewhere, and kept from being mounted, or
    /// opened exclusively (a second daemon, `mkfs`), while it stays open.
    pub read_only: bool,
}

/// An open volume or journal file (regular file or block device). Cloning
/// yields another handle to the same open file.
#[derive(Clone)]
pub struct BlockFile {
    inner: Arc<FileInner>,
}

struct FileInner {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    direct: bool,
    block_device: bool,
    read_only: bool,
    /// Bits of `UNSUPPORTED_*`: methods the kernel or filesystem refused with
    /// "not supported", so they are not tried again.
    unsupported: AtomicU8,
    engine: EngineKind,
    /// Calls of [`BlockFile::sync_data`] so far: each call's ticket.
    sync_calls: AtomicU64,
    /// The highest ticket a completed `fdatasync` covers (one that started
    /// after that call). Held while an `fdatasync` runs: syncs of a file
    /// run one at a time, and callers queued behind one share the next.
    synced: tokio::sync::Mutex<u64>,
    /// The first `fdatasync` that failed. Linux reports a write-back error
    /// to one `fdatasync` of a file description only, and may have dropped
    /// the data: no later sync of this file can prove anything durable.
    sync_failed: OnceLock<String>,
}

const UNSUPPORTED_ZERO_RANGE: u8 = 1;
const UNSUPPORTED_PUNCH_HOLE: u8 = 2;
const UNSUPPORTED_BLKZEROOUT: u8 = 4;
const UNSUPPORTED_ALLOCATE: u8 = 8;

impl fmt::Debug for BlockFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("BlockFile")
            .field("path", &i.path)
            .field("size", &i.size)
            .field("direct", &i.direct)
            .field("block_device", &i.block_device)
            .field("read_only", &i.read_only)
            .field("backend", &i.engine.backend())
            .finish()
    }
}

/// Errors of volume and journal I/O. Messages name the path or the operation
/// and offset; the caller adds which volume or journal it was.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The file or device could not be opened or created, or is not a
    /// regular file or block device.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The path given to [`IoEngine::open`].
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A block device opened for writing is mounted, or opened exclusively
    /// by another process (`O_EXCL` failed with `EBUSY`).
    #[error(
        "block device {} is in use by another process or mounted (opened exclusively, O_EXCL)",
        path.display()
    )]
    DeviceBusy {
        /// The path given to [`IoEngine::open`].
        path: PathBuf,
    },
    /// The existing file or device is not the configured size.
    #[error(
        "{} is {actual} bytes but the configured size is {expected} bytes; refusing to use it \
         (resize it, or correct the configured size)",
        path.display()
    )]
    SizeMismatch {
        /// The path given to [`IoEngine::open`].
        path: PathBuf,
        /// The configured size (`OpenOptions::create_size`).
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// Direct I/O needs offsets and lengths that are multiples of [`IO_ALIGN`].
    #[error(
        "I/O at offset {offset}, length {len} is not aligned to {IO_ALIGN} bytes, \
         which direct I/O (O_DIRECT) requires"
    )]
    Misaligned {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: usize,
    },
    /// The request reaches beyond the end of the file or device.
    #[error("I/O at offset {offset}, length {len} reaches beyond the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Size of the file or device.
        size: u64,
    },
    /// The kernel failed an operation.
    #[error("{op} at offset {offset} failed: {source}")]
    Io {
        /// The operation: "read", "write", "fdatasync", "fallocate", ...
        op: &'static str,
        /// Offset at which it failed (0 for whole-file operations).
        offset: u64,
        /// The error the kernel returned.
        source: io::Error,
    },
    /// The file ended before the buffer was filled.
    #[error("short read at offset {offset}: wanted {wanted} bytes, got {got} (unexpected end of file)")]
    ShortRead {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        wanted: usize,
        /// Bytes actually read.
        got: usize,
    },
    /// `fdatasync` failed: what was written before it may be lost.
    #[error("fdatasync of {} failed: {source}", path.display())]
    SyncFailed {
        /// The file's path.
        path: PathBuf,
        /// The error the kernel returned.
        source: io::Error,
    },
    /// An earlier `fdatasync` of this file failed: what was written before it
    /// may be lost, and no later sync can prove otherwise.
    #[error(
        "an earlier sync of {} failed ({first}): data written before it may not be on disk, and no later \
         sync can prove otherwise",
        path.display()
    )]
    SyncFailedBefore {
        /// The file's path.
        path: PathBuf,
        /// The first failure.
        first: String,
    },
    /// The copy-on-write into an image kept of the volume (a resync's guard
    /// of the replica's last consistent image) failed: the volume write
    /// that needed it is not made.
    #[error(
        "keeping the chunks at offset {offset} in the image preserved under {} before they are overwritten \
         failed, so they are not overwritten: {source}{}",
        dir.display(),
        if source.is_storage_full() {
            " (that filesystem is full: free space on it, then restart the daemon; the preserved image holds the \
             replica's last consistent state meanwhile)"
        } else {
            ""
        }
    )]
    Preserve {
        /// Offset of the volume write.
        offset: u64,
        /// The image's directory.
        dir: PathBuf,
        /// What failed.
        source: Box<IoError>,
    },
    /// The I/O engine has stopped (its thread died, or the runtime is shutting
    /// down); no further I/O is possible through it.
    #[error("the I/O engine has stopped; no further volume or journal I/O is possible")]
    EngineGone,
}

impl IoError {
    fn io(op: &'static str, offset: u64, source: io::Error) -> IoError {
        IoError::Io { op, offset, source }
    }

    /// Whether the kernel said the filesystem or device is full (ENOSPC,
    /// EDQUOT).
    pub fn is_storage_full(&self) -> bool {
        match self {
            IoError::Io { source, .. } | IoError::Open { source, .. } | IoError::SyncFailed { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            IoError::Preserve { source, .. } => source.is_storage_full(),
            _ => false,
        }
    }
}

/// Which data operation a read/write request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RwKind {
    Read,
    Write,
    /// A write that is durable when it completes (`RWF_DSYNC`).
    WriteDurable,
}

impl RwKind {
    fn name(self) -> &'static str {
        match self {
            RwKind::Read => "read",
            RwKind::Write => "write",
            RwKind::WriteDurable => "durable write (RWF_DSYNC)",
        }
    }
}

impl BlockFile {
    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Size in bytes: a regular file's length, a block device's
    /// `BLKGETSIZE64`, both taken at open time.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// True when `O_DIRECT` is in effect: offsets and lengths must then be
    /// multiples of [`IO_ALIGN`] (otherwise [`IoError::Misaligned`]).
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.inner.block_device
    }

    /// The backend serving this file.
    pub fn backend(&self) -> Backend {
        self.inner.engine.backend()
    }

    /// Reads exactly `buf.len()` bytes at `offset`; reaching the end of the
    /// file first is [`IoError::ShortRead`]. The buffer is returned in every
    /// case (on [`IoError::EngineGone`] it may be a fresh zeroed buffer of the
    /// same length).
    pub async fn read_at(&self, buf: AlignedBuf, offset: u64) -> (Result<(), IoError>, AlignedBuf) {
        if let Err(e) = self.check(offset, buf.len()) {
            return (Err(e), buf);
        }
        self.rw(RwKind::Read, buf, offset).await
    }

    /// Writes all of `buf` at `offset` (short writes are continued). The
    /// buffer is returned in every case, as for [`BlockFile::read_at`].
    pub async fn write_at(&self, buf: AlignedBuf, offset: u64) -> (Result<(), IoError>, AlignedBuf) {
        if let Err(e) = self.check_writable(offset).and_then(|()| self.check(offset, buf.len())) {
            return (Err(e), buf);
        }
        self.rw(RwKind::Write, buf, offset).await
    }

    /// Writes all of `buf` at `offset` and makes it durable before returning,
    /// as a client's WRITE with FUA requires: `RWF_DSYNC` with io_uring (a
    /// FUA write on devices that support it, cheaper than a separate
    /// flush); `pwrite` then `fdatasync` with the threads backend. Other
    /// writes are not made durable by it (use [`BlockFile::sync_data`]).
    pub async fn write_at_durable(&self, buf: AlignedBuf, offset: u64) -> (Result<(), IoError>, AlignedBuf) {
        if let Err(e) = self.check_writable(offset).and_then(|()| self.check(offset, buf.len())) {
            return (Err(e), buf);
        }
        self.rw(RwKind::WriteDurable, buf, offset).await
    }

    /// Writes all of the shared `data` at `offset`, and makes it durable
    /// before returning when `durable` (as [`BlockFile::write_at_durable`]).
    /// Data aligned in memory for direct I/O (an [`AlignedBuf`] shared with
    /// `Bytes::from_owner`, or a payload received aligned) is written as it
    /// is, never copied: a client write's payload goes to the volume, the
    /// journal and the network from the one buffer it was read into. Other
    /// data is copied into an aligned buffer first.
    pub async fn write_bytes(&self, data: Bytes, offset: u64, durable: bool) -> Result<(), IoError> {
        self.check_writable(offset).and_then(|()| self.check(offset, data.len()))?;
        let kind = if durable { RwKind::WriteDurable } else { RwKind::Write };
        if self.inner.direct && data.as_ptr() as usize % IO_ALIGN != 0 {
            return self.rw(kind, AlignedBuf::copy_from(&data), offset).await.0;
        }
        if data.is_empty() {
            return Ok(());
        }
        let file = Arc::clone(&self.inner.file);
        match &self.inner.engine {
            EngineKind::Uring(engine) => engine.write_shared(durable, file, data, offset).await,
            EngineKind::Threads => threads::write_shared(durable, file, data, offset).await,
        }
    }

    /// `fdatasync`: every write completed before this call is durable when it
    /// returns (for a block device, the device's volatile cache is flushed).
    ///
    /// Syncs of one file run one at a time, and callers that queued behind
    /// a running one share the next (group commit). Once one has failed,
    /// every later call fails too ([`IoError::SyncFailedBefore`]): Linux
    /// reports a write-back error to a single `fdatasync` and may drop the
    /// data, so a later sync that succeeds proves nothing. Each sync runs
    /// in a task of its own, so its result is recorded even if the caller
    /// stops waiting.
    pub async fn sync_data(&self) -> Result<(), IoError> {
        let ticket = self.inner.sync_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let me = self.clone();
        let sync = tokio::spawn(async move {
            let mut synced = me.inner.synced.lock().await;
            if let Some(first) = me.inner.sync_failed.get() {
                return Err(IoError::SyncFailedBefore { path: me.inner.path.clone(), first: first.clone() });
            }
            if *synced >= ticket {
                return Ok(());
            }
            // Every call with a ticket up to here came after its writes
            // completed, so this sync covers them.
            let covers = me.inner.sync_calls.load(Ordering::SeqCst);
            let file = Arc::clone(&me.inner.file);
            let result = match &me.inner.engine {
                EngineKind::Uring(engine) => engine.fsync(file).await,
                EngineKind::Threads => threads::sync_data(file).await,
            }
            .map_err(|e| match e {
                IoError::Io { source, .. } => IoError::SyncFailed { path: me.inner.path.clone(), source },
                other => other,
            });
            match &result {
                Ok(()) => *synced = covers,
                Err(e) => {
                    tracing::error!("{e}");
                    let _ = me.inner.sync_failed.set(e.to_string());
                }
            }
            result
        });
        sync.await.unwrap_or(Err(IoError::EngineGone))
    }

    /// Makes `len` bytes at `offset` read back as zeroes, keeping them
    /// allocated (NBD's `NO_HOLE` asks for that: the range must be fully
    /// provisioned; a hole is what TRIM, [`Self::discard`], is for).
    /// Regular file: `fallocate(FALLOC_FL_ZERO_RANGE)`; where the file
    /// system lacks it (tmpfs), `PUNCH_HOLE|KEEP_SIZE` followed by
    /// allocating the range again (`KEEP_SIZE`; where that is unsupported,
    /// zero buffers are written over the hole; where it fails for lack of
    /// space, the hole stays: the bytes are right, only their provisioning
    /// is not); else writing zero buffers. Block device:
    /// `BLKZEROOUT` (which does not unmap), else writing zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.check_writable(offset)?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.inner.block_device {
            if self.try_blkzeroout(offset, len).await? {
                return Ok(());
            }
        } else {
            let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            if self.try_fallocate(zero_range, UNSUPPORTED_ZERO_RANGE, offset, len).await? {
                return Ok(());
            }
            // (Not where allocating is unsupported: the hole would stay.)
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let can_allocate = self.inner.unsupported.load(Ordering::Relaxed) & UNSUPPORTED_ALLOCATE == 0;
            if can_allocate && self.try_fallocate(punch, UNSUPPORTED_PUNCH_HOLE, offset, len).await? {
                match self.try_fallocate(libc::FALLOC_FL_KEEP_SIZE, UNSUPPORTED_ALLOCATE, offset, len).await {
                    Ok(true) => {}
                    // The range reads as zeroes already; written, it is
                    // allocated.
                    Ok(false) => return self.write_zero_buffers(offset, len).await,
                    Err(e) => tracing::warn!(path = %self.inner.path.display(),
                        "zeroes at {offset}+{len} read back right but are left unallocated: {e}"),
                }
                return Ok(());
            }
        }
        self.write_zero_buffers(offset, len).await
    }

    /// Discards (trims) `len` bytes at `offset`, releasing the space where the
    /// storage allows. Afterwards the range always reads back as zeroes (a
    /// replica must read the same bytes as its primary), so when the storage
    /// cannot guarantee that, zeroes are written instead.
    ///
    /// Regular file: `fallocate(PUNCH_HOLE|KEEP_SIZE)`, else `ZERO_RANGE`,
    /// else writing zeroes. Block device: `fallocate(PUNCH_HOLE|KEEP_SIZE)`
    /// on the device (the kernel unmaps the blocks *and* guarantees zeroes,
    /// via REQ_OP_WRITE_ZEROES with unmap), else `BLKZEROOUT`, else writing
    /// zeroes. `BLKDISCARD` is deliberately not used: after it, a device may
    /// return the old data or garbage.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.check_writable(offset)?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.try_fallocate(punch, UNSUPPORTED_PUNCH_HOLE, offset, len).await? {
            return Ok(());
        }
        if self.inner.block_device {
            if self.try_blkzeroout(offset, len).await? {
                return Ok(());
            }
        } else {
            let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            if self.try_fallocate(zero_range, UNSUPPORTED_ZERO_RANGE, offset, len).await? {
                return Ok(());
            }
        }
        self.write_zero_buffers(offset, len).await
    }

    async fn rw(&self, kind: RwKind, buf: AlignedBuf, offset: u64) -> (Result<(), IoError>, AlignedBuf) {
        if buf.is_empty() {
            return (Ok(()), buf);
        }
        let file = Arc::clone(&self.inner.file);
        match &self.inner.engine {
            EngineKind::Uring(engine) => engine.rw(kind, file, buf, offset).await,
            EngineKind::Threads => threads::rw(kind, file, buf, offset).await,
        }
    }

    fn check_writable(&self, offset: u64) -> Result<(), IoError> {
        if self.inner.read_only {
            return Err(IoError::io(
                "write",
                offset,
                io::Error::new(io::ErrorKind::PermissionDenied, "the volume was opened read-only"),
            ));
        }
        Ok(())
    }

    /// Alignment (for direct I/O) and range checks of a read or write.
    fn check(&self, offset: u64, len: usize) -> Result<(), IoError> {
        self.check_range(offset, len as u64)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let size = self.inner.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => return Err(IoError::OutOfRange { offset, len, size }),
        }
        if self.inner.direct && !is_aligned(offset, len) {
            return Err(IoError::Misaligned { offset, len: usize::try_from(len).unwrap_or(usize::MAX) });
        }
        Ok(())
    }

    /// One `fallocate` mode; `Ok(false)` when the filesystem or device does
    /// not support it (remembered for `EOPNOTSUPP`, so it is not retried).
    async fn try_fallocate(&self, mode: i32, flag: u8, offset: u64, len: u64) -> Result<bool, IoError> {
        if self.inner.unsupported.load(Ordering::Relaxed) & flag != 0 {
            return Ok(false);
        }
        let file = Arc::clone(&self.inner.file);
        let result = match &self.inner.engine {
            EngineKind::Uring(engine) => engine.fallocate(file, mode, offset, len).await,
            EngineKind::Threads => threads::fallocate(file, mode, offset, len).await,
        };
        self.interpret_unsupported(result, "fallocate", flag, offset)
    }

    async fn try_blkzeroout(&self, offset: u64, len: u64) -> Result<bool, IoError> {
        let flag = UNSUPPORTED_BLKZEROOUT;
        if self.inner.unsupported.load(Ordering::Relaxed) & flag != 0 {
            return Ok(false);
        }
        let file = Arc::clone(&self.inner.file);
        let result = threads::blk_range_ioctl(file, file::BLKZEROOUT, offset, len).await;
        self.interpret_unsupported(result, "BLKZEROOUT", flag, offset)
    }

    fn interpret_unsupported(
        &self,
        result: Result<(), IoError>,
        what: &'static str,
        flag: u8,
        offset: u64,
    ) -> Result<bool, IoError> {
        match result {
            Ok(()) => Ok(true),
            Err(IoError::Io { source, .. }) if is_unsupported(&source) => {
                // EINVAL can depend on the range (alignment to the logical
                // block size); the others mean "never works here".
                if source.raw_os_error() != Some(libc::EINVAL) {
                    self.inner.unsupported.fetch_or(flag, Ordering::Relaxed);
                    tracing::debug!(
                        path = %self.inner.path.display(),
                        "{what} is not supported ({source}); using a fallback from now on"
                    );
                }
                Ok(false)
            }
            Err(IoError::Io { source, .. }) => Err(IoError::io(what, offset, source)),
            Err(e) => Err(e),
        }
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let chunk = usize::try_from(len).map_or(ZERO_CHUNK, |l| l.min(ZERO_CHUNK));
        let mut buf = AlignedBuf::zeroed(chunk);
        let mut done = 0u64;
        while done < len {
            let this = usize::try_from(len - done).map_or(chunk, |l| l.min(chunk));
            buf.set_len(this);
            let (result, returned) = self.rw(RwKind::Write, buf, offset + done).await;
            buf = returned;
            result?;
            done += this as u64;
        }
        Ok(())
    }
}

fn is_aligned(offset: u64, len: u64) -> bool {
    let align = IO_ALIGN as u64;
    offset % align == 0 && len % align == 0
}

/// Errors meaning "this method is not available here; try the next one".
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS | libc::EINVAL))
}
