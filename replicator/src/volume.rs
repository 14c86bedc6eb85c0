//! A replicated volume: its backing block device or file, opened through the
//! I/O engine, plus the alignment rules the write path relies on.
//!
//! Every record the primary journals and ships is aligned to [`IO_ALIGN`]: an
//! unaligned client write becomes a read-modify-write of the whole blocks it
//! touches, sequenced like any other write (so it is serialised with every
//! request touching those blocks), and the record carries the whole blocks.
//! The secondary therefore only ever sees aligned records.

use std::path::PathBuf;

use replicator_protocol::record::{Record, RecordOp};

use crate::config::VolumeConfig;
use crate::io::{AlignedBuf, BlockFile, IoEngine, IoError, OpenOptions, IO_ALIGN};

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

impl Volume {
    /// Opens (creating a sparse file from `size` if the path does not exist).
    pub fn open(engine: &IoEngine, cfg: &VolumeConfig, index: u32) -> Result<Volume, VolumeError> {
        let opts = OpenOptions { create_size: cfg.size, direct: true, read_only: false };
        let file =
            engine.open(&cfg.path, &opts).map_err(|source| VolumeError::Open { name: cfg.name.clone(), source })?;
        let size = file.size();
        if size == 0 || size % IO_ALIGN as u64 != 0 {
            return Err(VolumeError::BadSize { name: cfg.name.clone(), path: cfg.path.clone(), size });
        }
        Ok(Volume { name: cfg.name.clone(), index, file })
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

    /// Writes a whole-block buffer at an aligned offset.
    pub async fn write_aligned(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, IoError> {
        let (res, buf) = self.file.write_at(buf, offset).await;
        res.map(|()| buf)
    }

    /// Like `write_aligned`, durable when it returns (RWF_DSYNC: FUA).
    pub async fn write_aligned_durable(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, IoError> {
        let (res, buf) = self.file.write_at_durable(buf, offset).await;
        res.map(|()| buf)
    }

    /// Applies a replicated or journaled record (always block-aligned).
    pub async fn apply(&self, rec: &Record) -> Result<(), IoError> {
        match rec.op {
            RecordOp::Write | RecordOp::Copy => {
                self.write_aligned(rec.offset, AlignedBuf::copy_from(&rec.payload)).await.map(|_| ())
            }
            RecordOp::WriteZeroes => self.file.write_zeroes(rec.offset, u64::from(rec.length)).await,
            RecordOp::Trim => self.file.discard(rec.offset, u64::from(rec.length)).await,
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
pub fn span_digests(data: &[u8], span: u64) -> bytes::Bytes {
    let span = usize::try_from(span).unwrap_or(usize::MAX).max(1);
    data.chunks(span).flat_map(|c| *blake3::hash(c).as_bytes()).collect::<Vec<u8>>().into()
}

#[cfg(test)]
mod tests {
    use super::*;

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
