//! Opening volumes and journals: regular file or block device, `O_DIRECT`
//! with a buffered fallback, sparse creation, size.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{IoError, OpenOptions};

/// Permissions of a volume or journal file the daemon creates: volume data
/// is as sensitive as the application's, so only the daemon's user.
const CREATE_MODE: u32 = 0o600;

/// Linux ioctl request encoding (`_IOC` in `asm-generic/ioctl.h`, with the
/// variants of MIPS, PowerPC and SPARC). The block ioctls below are not in
/// the `libc` crate.
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc {
    pub const NONE: u64 = 1;
    pub const READ: u64 = 2;
    pub const SIZE_BITS: u64 = 13;
}
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc {
    pub const NONE: u64 = 0;
    pub const READ: u64 = 2;
    pub const SIZE_BITS: u64 = 14;
}

const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << (16 + ioc::SIZE_BITS)) | (size << 16) | (ty << 8) | nr
}

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
pub(crate) const BLKGETSIZE64: u64 = ioc(ioc::READ, 0x12, 114, size_of::<usize>() as u64);
/// `_IO(0x12, 119)`: discard a byte range (`u64[2]` = start, length).
#[cfg(test)]
pub(crate) const BLKDISCARD: u64 = ioc(ioc::NONE, 0x12, 119, 0);
/// `_IO(0x12, 127)`: zero a byte range (`u64[2]` = start, length).
pub(crate) const BLKZEROOUT: u64 = ioc(ioc::NONE, 0x12, 127, 0);
/// `_IO(0x12, 104)`: logical block size (only used to check the encoding
/// against the `libc` crate's constant in tests).
#[cfg(test)]
pub(crate) const BLKSSZGET: u64 = ioc(ioc::NONE, 0x12, 104, 0);

/// A freshly opened file with what was learned while opening it.
#[derive(Debug)]
pub(crate) struct Opened {
    pub file: File,
    pub size: u64,
    pub direct: bool,
    pub block_device: bool,
}

fn open_err(path: &Path, source: io::Error) -> IoError {
    IoError::Open { path: path.to_path_buf(), source }
}

fn not_a_volume(kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {kind}; a volume or journal must be a regular file or a block device"),
    )
}

fn check_file_type(ft: fs::FileType) -> Result<bool, io::Error> {
    if ft.is_file() {
        Ok(false)
    } else if ft.is_block_device() {
        Ok(true)
    } else if ft.is_dir() {
        Err(not_a_volume("a directory"))
    } else if ft.is_char_device() {
        Err(not_a_volume("a character device"))
    } else if ft.is_fifo() {
        Err(not_a_volume("a FIFO"))
    } else if ft.is_socket() {
        Err(not_a_volume("a socket"))
    } else {
        Err(not_a_volume("neither a regular file nor a block device"))
    }
}

/// Opens `path` as described in [`OpenOptions`].
pub(crate) fn open(path: &Path, opts: &OpenOptions) -> Result<Opened, IoError> {
    // Look before opening, so that opening a FIFO or a character device can
    // have no side effect; the type is checked again on the open descriptor.
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !opts.read_only && opts.create => {
            match opts.create_size {
                Some(_) if path.starts_with("/dev") => {
                    // A missing /dev/vg0/db is an inactive or mistyped device;
                    // a sparse file there would live in RAM (devtmpfs).
                    return Err(open_err(
                        path,
                        io::Error::new(
                            e.kind(),
                            "no such device; refusing to create a regular file under /dev \
                             (is the logical volume active and the path correct?)",
                        ),
                    ));
                }
                Some(size) => {
                    create_sparse(path, size)?;
                    fs::metadata(path).map_err(|e| open_err(path, e))?
                }
                None => return Err(open_err(path, e)),
            }
        }
        Err(e) => return Err(open_err(path, e)),
    };
    let exclusive = check_file_type(meta.file_type()).map_err(|e| open_err(path, e))? && !opts.read_only;

    let (file, direct) = open_with_fallback(path, opts, exclusive)?;
    let meta = file.metadata().map_err(|e| open_err(path, e))?;
    let block_device = check_file_type(meta.file_type()).map_err(|e| open_err(path, e))?;
    let size = if block_device {
        block_device_size(&file).map_err(|e| {
            open_err(path, io::Error::new(e.kind(), format!("cannot read the block device size (BLKGETSIZE64): {e}")))
        })?
    } else {
        meta.len()
    };
    if let Some(expected) = opts.create_size {
        if expected != size {
            return Err(IoError::SizeMismatch { path: path.to_path_buf(), expected, actual: size });
        }
    }
    if opts.create && !opts.read_only && !block_device {
        // A file this daemon may have created: a crash between its rename
        // into place and the directory's fsync left its name not durable,
        // and nothing else fsyncs that directory; a power cut long after
        // would take the file (volume, drill data) away. A directory that
        // cannot be opened or fsynced (execute-only, a file system without
        // directory fsync) is said, not fatal: it was created elsewhere.
        if let Err(e) = crate::durable::sync_parent(path) {
            tracing::warn!(path = %path.display(), "{e}; a power cut may lose this file's name if it was just created");
        }
    }
    tracing::debug!(
        path = %path.display(),
        size,
        direct,
        block_device,
        read_only = opts.read_only,
        "opened"
    );
    Ok(Opened { file, size, direct, block_device })
}

/// Opens with `O_DIRECT` if asked (falling back to buffered I/O where the
/// filesystem refuses it), and with `O_EXCL` if `exclusive`: for a block
/// device, Linux then fails with `EBUSY` if it is mounted or opened with
/// `O_EXCL` elsewhere (another daemon, `mkfs`), and keeps those out while
/// it stays open.
fn open_with_fallback(path: &Path, opts: &OpenOptions, exclusive: bool) -> Result<(File, bool), IoError> {
    let open = |direct: bool| {
        let mut o = fs::OpenOptions::new();
        o.read(true).write(!opts.read_only);
        let mut flags = 0;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if exclusive {
            flags |= libc::O_EXCL;
        }
        o.custom_flags(flags);
        o.open(path).map_err(|e| {
            if exclusive && e.raw_os_error() == Some(libc::EBUSY) {
                IoError::DeviceBusy { path: path.to_path_buf() }
            } else {
                open_err(path, e)
            }
        })
    };
    if opts.direct {
        match open(true) {
            Ok(file) => return Ok((file, true)),
            Err(IoError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    path = %path.display(),
                    "the filesystem refuses O_DIRECT; using buffered I/O (the page cache) for this file"
                );
            }
            Err(e) => return Err(e),
        }
    }
    open(false).map(|file| (file, false))
}

/// Creates a sparse regular file of `size` bytes, durably
/// ([`crate::durable::put_file`]: made whole under a temporary name, put in
/// place without replacing anything, the directory fsynced). A crash leaves
/// no file of the wrong size under `path`, at most a temporary
/// `.NAME.PID.tmp`. Losing a creation race to another process is not an
/// error: the caller then checks the size of what exists.
fn create_sparse(path: &Path, size: u64) -> Result<(), IoError> {
    match crate::durable::put_file(path, CREATE_MODE, crate::durable::Existing::Keep, |file| file.set_len(size)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => {
            return Err(open_err(
                path,
                io::Error::new(e.kind(), format!("cannot create a sparse file of {size} bytes: {e}")),
            ))
        }
    }
    tracing::info!(path = %path.display(), size, "created sparse volume file");
    Ok(())
}

/// Size of an open block device in bytes.
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to `size`, alive and exclusively borrowed for the call; the descriptor
    // belongs to `file`, open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Starts writing back the dirty page-cache pages of `offset..offset + len`
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`) without waiting for them:
/// a later `fdatasync` then finds them written or on their way. Makes
/// nothing durable by itself.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (i64::try_from(offset), i64::try_from(len));
    let (Ok(offset), Ok(len)) = (offset, len) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: sync_file_range takes no pointers; the descriptor belongs to
    // `file`, open for the duration of the call.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A range ioctl on a block device (`BLKZEROOUT`, `BLKDISCARD`): blocking.
pub(crate) fn blk_range_ioctl(file: &File, request: u64, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: the range ioctls read two u64 through the pointer, which points
    // to `range`, alive for the call; the descriptor belongs to `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
