//! The fallback backend: blocking `pread`/`pwrite`/`fdatasync` on tokio's
//! blocking thread pool. Also used by both backends for the rare block
//! device ioctls.
//!
//! Ownership is the same as with io_uring: the buffer moves into the blocking
//! task, so if the awaiting future is dropped the task still completes and
//! then drops the buffer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{file, AlignedBuf, IoError, RwKind};

/// Reads or writes all of `buf` at `offset` on the blocking pool.
pub(crate) async fn rw(
    kind: RwKind,
    file: Arc<File>,
    mut buf: AlignedBuf,
    offset: u64,
) -> (Result<(), IoError>, AlignedBuf) {
    let len = buf.len();
    let task = tokio::task::spawn_blocking(move || {
        let result = match kind {
            RwKind::Read => pread_full(&file, &mut buf, offset),
            RwKind::Write => pwrite_full(&file, &buf, offset),
            RwKind::WriteDurable => pwrite_full(&file, &buf, offset)
                .and_then(|()| file.sync_data().map_err(|e| IoError::io("fdatasync", offset, e))),
        };
        (result, buf)
    });
    match task.await {
        Ok(done) => done,
        // The task panicked (a bug) or the runtime is shutting down: the
        // buffer is gone with the task.
        Err(_) => (Err(IoError::EngineGone), AlignedBuf::zeroed(len)),
    }
}

/// Writes all of the shared `data` at `offset` on the blocking pool, then
/// `fdatasync`s when `durable`.
pub(crate) async fn write_shared(durable: bool, file: Arc<File>, data: Bytes, offset: u64) -> Result<(), IoError> {
    blocking(move || {
        pwrite_full(&file, &data, offset)?;
        if durable {
            file.sync_data().map_err(|e| IoError::io("fdatasync", offset, e))?;
        }
        Ok(())
    })
    .await
}

fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> Result<(), IoError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => return Err(IoError::ShortRead { offset, wanted: buf.len(), got: done }),
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => return Err(IoError::io("read", at, e)),
        }
    }
    Ok(())
}

fn pwrite_full(file: &File, buf: &[u8], offset: u64) -> Result<(), IoError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.write_at(&buf[done..], at) {
            Ok(0) => {
                return Err(IoError::io(
                    "write",
                    at,
                    io::Error::new(io::ErrorKind::WriteZero, "the kernel accepted 0 bytes"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => return Err(IoError::io("write", at, e)),
        }
    }
    Ok(())
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
}

/// Runs a blocking closure on the pool, mapping a lost task to `EngineGone`.
async fn blocking<F>(f: F) -> Result<(), IoError>
where
    F: FnOnce() -> Result<(), IoError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or(Err(IoError::EngineGone))
}

/// `fdatasync` on the blocking pool.
pub(crate) async fn sync_data(file: Arc<File>) -> Result<(), IoError> {
    blocking(move || file.sync_data().map_err(|e| IoError::io("fdatasync", 0, e))).await
}

/// `fallocate(mode)` on the blocking pool.
pub(crate) async fn fallocate(file: Arc<File>, mode: i32, offset: u64, len: u64) -> Result<(), IoError> {
    blocking(move || {
        let flags = nix::fcntl::FallocateFlags::from_bits_retain(mode);
        let (off, count) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(off), Ok(count)) => (off, count),
            _ => return Err(IoError::io("fallocate", offset, io::Error::from_raw_os_error(libc::EFBIG))),
        };
        loop {
            match nix::fcntl::fallocate(&*file, flags, off, count) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(IoError::io("fallocate", offset, io::Error::from(errno))),
            }
        }
    })
    .await
}

/// A block device range ioctl (`BLKZEROOUT`, ...) on the blocking pool.
pub(crate) async fn blk_range_ioctl(file: Arc<File>, request: u64, offset: u64, len: u64) -> Result<(), IoError> {
    blocking(move || loop {
        match file::blk_range_ioctl(&file, request, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(IoError::io("block device ioctl", offset, e)),
        }
    })
    .await
}
