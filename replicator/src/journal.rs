//! The on-disk journal of a consistency group (primary side).
//!
//! A preallocated file: a superblock, then a ring of records written in
//! sequence order (see `replicator_protocol::journal_format` for the layout
//! and the space accounting). Space is reserved in sequence order under the
//! group lock; the record bytes themselves may land out of order, since
//! recovery only trusts the contiguous prefix it can read back with valid
//! CRCs. Space is freed only below the secondary's persisted checkpoint.

use std::io::IoSlice;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use replicator_protocol::journal_format::{
    record_span, JournalFormatError, JournalHeader, JournalRing, JournalSuperblock, JOURNAL_HEADER_LEN,
    JOURNAL_RECORD_ALIGN, JOURNAL_SUPERBLOCK_LEN,
};
use replicator_protocol::record::Record;

use crate::io::{AlignedBuf, BlockFile, IoEngine, IoError, OpenOptions};

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// I/O on the journal file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        source: IoError,
    },
    /// The superblock or a record is not valid.
    #[error("journal {path}: {source}")]
    Format {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        source: JournalFormatError,
    },
    /// The journal belongs to another group or pair.
    #[error("journal {path}: belongs to group {group:?} pair {pair_id:#x}, expected group {expected_group:?} pair {expected_pair:#x}")]
    Foreign {
        /// The journal file.
        path: PathBuf,
        /// Group in the superblock.
        group: String,
        /// Pair id in the superblock.
        pair_id: u64,
        /// Expected group.
        expected_group: String,
        /// Expected pair id.
        expected_pair: u64,
    },
}

/// An open journal file.
///
/// Appends are plain `pwrite`s into the page cache from the calling task: a
/// memory copy of a few microseconds, cheaper than a round trip through an
/// io_uring worker (buffered writes are not truly asynchronous there). FUA
/// and FLUSH make the journal durable with `sync` (fdatasync through the I/O
/// engine); reads for shipping and recovery also go through the engine.
#[derive(Debug)]
pub struct Journal {
    file: BlockFile,
    appender: std::fs::File,
    path: PathBuf,
}

impl Journal {
    /// Opens the journal at `path`, creating it (sparse, `size` bytes) with a
    /// fresh superblock when it does not exist or `reset` is set.
    pub async fn open(
        engine: &IoEngine,
        path: &Path,
        size: u64,
        group: &str,
        pair_id: u64,
        reset: bool,
    ) -> Result<Journal, JournalError> {
        if reset {
            let _ = std::fs::remove_file(path);
        }
        let existed = path.exists();
        let opts = OpenOptions { create_size: Some(size), direct: false, read_only: false };
        let file = engine
            .open(path, &opts)
            .map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
        let appender = std::fs::OpenOptions::new().write(true).open(path).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source: IoError::Open { path: path.to_path_buf(), source },
        })?;
        let journal = Journal { file, appender, path: path.to_path_buf() };
        if existed {
            let buf = journal.read(0, JOURNAL_SUPERBLOCK_LEN).await?;
            let sb = JournalSuperblock::decode(&buf).map_err(|source| journal.format(source))?;
            if sb.group != group || sb.pair_id != pair_id {
                return Err(JournalError::Foreign {
                    path: path.to_path_buf(),
                    group: sb.group,
                    pair_id: sb.pair_id,
                    expected_group: group.to_string(),
                    expected_pair: pair_id,
                });
            }
        } else {
            // Preallocate: a journal that hits ENOSPC halfway would turn a
            // full filesystem into failed client writes much later.
            match nix::fcntl::fallocate(&journal.appender, nix::fcntl::FallocateFlags::empty(), 0, journal.file.size() as i64) {
                Ok(()) => {}
                Err(nix::errno::Errno::EOPNOTSUPP) => {
                    tracing::warn!(path = %path.display(), "the filesystem cannot preallocate; the journal stays sparse")
                }
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    return Err(JournalError::Io {
                        path: path.to_path_buf(),
                        source: IoError::Io { op: "preallocate journal", offset: 0, source: e.into() },
                    });
                }
            }
            let sb = JournalSuperblock { group: group.to_string(), capacity: journal.file.size(), pair_id };
            journal.write(0, AlignedBuf::copy_from(&sb.encode())).await?;
            journal.sync().await?;
        }
        Ok(journal)
    }

    /// File size (the ring ends here).
    pub fn capacity(&self) -> u64 {
        self.file.size()
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self, source: JournalFormatError) -> JournalError {
        JournalError::Format { path: self.path.clone(), source }
    }

    fn io(&self, source: IoError) -> JournalError {
        JournalError::Io { path: self.path.clone(), source }
    }

    async fn read(&self, pos: u64, len: u64) -> Result<AlignedBuf, JournalError> {
        let (res, buf) = self.file.read_at(AlignedBuf::for_overwrite(len as usize), pos).await;
        res.map_err(|e| self.io(e))?;
        Ok(buf)
    }

    async fn write(&self, pos: u64, buf: AlignedBuf) -> Result<(), JournalError> {
        let (res, _) = self.file.write_at(buf, pos).await;
        res.map_err(|e| self.io(e))
    }

    /// Writes `rec` at `pos` (reserved with `JournalRing::reserve`).
    /// Header, payload and padding go out in one `pwritev`, straight from
    /// the record's buffers.
    pub fn append_at(&self, pos: u64, rec: &Record) -> Result<(), JournalError> {
        static PADDING: [u8; JOURNAL_RECORD_ALIGN as usize] = [0; JOURNAL_RECORD_ALIGN as usize];
        let header = JournalHeader::from_record(rec).encode();
        let span = record_span(rec.payload.len() as u64) as usize;
        let pad = span - JOURNAL_HEADER_LEN - rec.payload.len();
        let mut parts = [IoSlice::new(&header), IoSlice::new(&rec.payload), IoSlice::new(&PADDING[..pad])];
        let mut rest: &mut [IoSlice<'_>] = &mut parts;
        let mut at = pos;
        let err = |source: std::io::Error| self.io(IoError::Io { op: "journal append", offset: pos, source });
        while !rest.is_empty() {
            match nix::sys::uio::pwritev(&self.appender, rest, at as i64) {
                Ok(0) => return Err(err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    at += n as u64;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(err(e.into())),
            }
        }
        Ok(())
    }

    /// Reads back the record at `pos` and checks that it is `seq`.
    pub async fn read_record(&self, pos: u64, seq: u64) -> Result<Record, JournalError> {
        let header = self.read_header(pos).await?.ok_or_else(|| self.format(JournalFormatError::Corrupt(format!("no valid record header at {pos}"))))?;
        if header.seq != seq {
            return Err(self.format(JournalFormatError::Corrupt(format!(
                "record at {pos} has seq {}, expected {seq}",
                header.seq
            ))));
        }
        let payload = self.read_payload(pos, &header).await?;
        header.into_record(payload).map_err(|e| self.format(e))
    }

    async fn read_header(&self, pos: u64) -> Result<Option<JournalHeader>, JournalError> {
        if pos + JOURNAL_HEADER_LEN as u64 > self.capacity() {
            return Ok(None);
        }
        let buf = self.read(pos, JOURNAL_HEADER_LEN as u64).await?;
        Ok(JournalHeader::decode(&buf).ok())
    }

    async fn read_payload(&self, pos: u64, header: &JournalHeader) -> Result<Bytes, JournalError> {
        let len = header.payload_len();
        if len == 0 {
            return Ok(Bytes::new());
        }
        if pos + JOURNAL_HEADER_LEN as u64 + len > self.capacity() {
            return Err(self.format(JournalFormatError::Truncated));
        }
        let buf = self.read(pos + JOURNAL_HEADER_LEN as u64, len).await?;
        Ok(Bytes::copy_from_slice(&buf))
    }

    /// fdatasync.
    pub async fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_data().await.map_err(|e| self.io(e))
    }

    /// Rebuilds the ring after a restart: starting from the persisted tail
    /// (`tail_seq` at `tail_pos`), accepts records while each one is the
    /// expected sequence with valid header and payload CRCs. Returns the ring
    /// and the last sequence found (`tail_seq - 1` if none).
    pub async fn recover(&self, tail_seq: u64, tail_pos: u64) -> Result<(JournalRing, u64), JournalError> {
        let mut ring = JournalRing::new(self.capacity());
        let start = tail_pos.clamp(JOURNAL_SUPERBLOCK_LEN, self.capacity());
        ring.reset_at(start);
        let mut expected = tail_seq;
        loop {
            let mut found = None;
            for candidate in [ring.head(), JOURNAL_SUPERBLOCK_LEN] {
                if let Some(h) = self.read_header(candidate).await? {
                    if h.seq == expected {
                        found = Some((candidate, h));
                        break;
                    }
                }
            }
            let Some((pos, header)) = found else { break };
            let Ok(payload) = self.read_payload(pos, &header).await else { break };
            if header.clone().into_record(payload).is_err() {
                break;
            }
            let span = record_span(header.payload_len());
            match ring.reserve(expected, span) {
                Some(p) if p == pos => expected += 1,
                Some(_) | None => {
                    // The record is not where the writer would have put it:
                    // a stale record from an earlier lap. Undo and stop.
                    let mut fresh = JournalRing::new(self.capacity());
                    fresh.reset_at(start);
                    for seq in tail_seq..expected {
                        if let Some((_, s)) = ring.lookup(seq) {
                            let _ = fresh.reserve(seq, s);
                        }
                    }
                    ring = fresh;
                    break;
                }
            }
        }
        Ok((ring, expected - 1))
    }
}
