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
    /// Recovery found an intact record header it cannot accept where the
    /// log continues: truncating there would drop every later record.
    #[error("journal {path}: record {seq} at offset {pos} is intact but not acceptable ({reason}); refusing to truncate the log there. Keep the file for analysis; `replicator pair delete` and a new `pair create` (full copy) start over")]
    Unacceptable {
        /// The journal file.
        path: PathBuf,
        /// Its sequence number.
        seq: u64,
        /// Its position.
        pos: u64,
        /// What is wrong with it.
        reason: JournalFormatError,
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
    /// The pair id: the key of every record header's checksum.
    key: u64,
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
        let opts = OpenOptions { create_size: Some(size), create: true, direct: false, read_only: false };
        let file = engine.open(path, &opts).map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
        // Created 0600; one from an older build (or copied in) may be wider.
        crate::perms::tighten_file(path, crate::perms::PRIVATE_FILE_MODE, "journal").map_err(|source| {
            JournalError::Io { path: path.to_path_buf(), source: IoError::Open { path: path.to_path_buf(), source } }
        })?;
        let appender = std::fs::OpenOptions::new().write(true).open(path).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source: IoError::Open { path: path.to_path_buf(), source },
        })?;
        let journal = Journal { file, appender, path: path.to_path_buf(), key: pair_id };
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
            match nix::fcntl::fallocate(
                &journal.appender,
                nix::fcntl::FallocateFlags::empty(),
                0,
                journal.file.size() as i64,
            ) {
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
        let header = JournalHeader::from_record(rec).encode(self.key);
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
        let header = match self.header_at(pos).await? {
            HeaderAt::Valid(h) => h,
            HeaderAt::Unacceptable { reason, .. } => return Err(self.format(reason)),
            HeaderAt::None => {
                return Err(self.format(JournalFormatError::Corrupt(format!("no valid record header at {pos}"))))
            }
        };
        if header.seq != seq {
            return Err(self.format(JournalFormatError::Corrupt(format!(
                "record at {pos} has seq {}, expected {seq}",
                header.seq
            ))));
        }
        let payload = self.read_payload(pos, &header).await?;
        header.into_record(payload).map_err(|e| self.format(e))
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
    /// expected sequence with valid header and payload CRCs.
    ///
    /// Where that run ends, recovery tells the end of the log from the case
    /// it must never truncate silently: the next record's header is intact
    /// but describes a record this build cannot accept
    /// ([`JournalError::Unacceptable`]). After an unclean stop
    /// ([`Stop::Unclean`]) the whole ring is also searched for records beyond
    /// the run: whether the process died or the machine lost power (a disk
    /// losing its volatile cache looks the same to the daemon), pages may be
    /// lost in any order, but no record after a missing one was made durable
    /// by an acknowledged FUA or FLUSH (its sync would have covered the
    /// missing one), and the activity log covers their regions. They are
    /// discarded and their headers overwritten on disk (their sequence
    /// numbers are never read again).
    pub async fn recover(&self, tail_seq: u64, tail_pos: u64, stop: Stop) -> Result<Recovered, JournalError> {
        let mut ring = JournalRing::new(self.capacity());
        let start = tail_pos.clamp(JOURNAL_SUPERBLOCK_LEN, self.capacity());
        ring.reset_at(start);
        let mut expected = tail_seq;
        loop {
            let mut found = None;
            for candidate in [ring.head(), JOURNAL_SUPERBLOCK_LEN] {
                match self.header_at(candidate).await? {
                    HeaderAt::Valid(h) if h.seq == expected => {
                        found = Some((candidate, h));
                        break;
                    }
                    HeaderAt::Unacceptable { seq, reason } if seq == expected => {
                        return Err(JournalError::Unacceptable { path: self.path.clone(), seq, pos: candidate, reason })
                    }
                    _ => {}
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
        let mut discarded = Vec::new();
        if stop == Stop::Unclean {
            for (seq, pos) in self.records_from(expected).await? {
                self.invalidate(pos)?;
                discarded.push(seq);
            }
            if !discarded.is_empty() {
                self.sync().await?;
                discarded.sort_unstable();
            }
        }
        Ok(Recovered { ring, last_seq: expected - 1, discarded })
    }

    /// Classifies the bytes at `pos` as a record header.
    async fn header_at(&self, pos: u64) -> Result<HeaderAt, JournalError> {
        if pos + JOURNAL_HEADER_LEN as u64 > self.capacity() {
            return Ok(HeaderAt::None);
        }
        let buf = self.read(pos, JOURNAL_HEADER_LEN as u64).await?;
        Ok(classify_header(&buf, self.key))
    }

    /// Every record header in the ring with a sequence number of at least
    /// `from`, as (seq, position). Reads the whole ring in large chunks.
    async fn records_from(&self, from: u64) -> Result<Vec<(u64, u64)>, JournalError> {
        const CHUNK: u64 = 4 << 20;
        let mut out = Vec::new();
        let mut at = JOURNAL_SUPERBLOCK_LEN;
        while at < self.capacity() {
            let len = CHUNK.min(self.capacity() - at);
            let buf = self.read(at, len).await?;
            let mut off = 0usize;
            while off + JOURNAL_HEADER_LEN <= buf.len() {
                if let Some(seq) = JournalHeader::peek_seq(&buf[off..], self.key) {
                    if seq >= from {
                        out.push((seq, at + off as u64));
                    }
                }
                off += JOURNAL_RECORD_ALIGN as usize;
            }
            at += len;
        }
        Ok(out)
    }

    /// Overwrites the header at `pos` with zeroes, so the record there is
    /// never read again (its sequence number is about to be reused).
    fn invalidate(&self, pos: u64) -> Result<(), JournalError> {
        let zero = [0u8; JOURNAL_HEADER_LEN];
        nix::sys::uio::pwrite(&self.appender, &zero, pos as i64)
            .map_err(|e| self.io(IoError::Io { op: "journal invalidate", offset: pos, source: e.into() }))?;
        Ok(())
    }
}

/// How the daemon stopped before a [`Journal::recover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Cleanly: every append finished and was synced.
    Clean,
    /// The process died or the machine lost power: anything not synced may
    /// be gone, in any order.
    Unclean,
}

/// What [`Journal::recover`] found.
#[derive(Debug)]
pub struct Recovered {
    /// The retained records, in sequence order.
    pub ring: JournalRing,
    /// Last sequence of the contiguous run (`tail_seq - 1` if none).
    pub last_seq: u64,
    /// Sequence numbers of records found beyond the run that were still
    /// being appended when the daemon stopped (never acknowledged); their
    /// headers are overwritten.
    pub discarded: Vec<u64>,
}

/// The bytes at a journal position, as a record header.
enum HeaderAt {
    /// A valid header.
    Valid(JournalHeader),
    /// Magic and checksum are valid, so the header is what a replicator
    /// wrote, but the record is not one this build accepts.
    Unacceptable { seq: u64, reason: JournalFormatError },
    /// Not a header (never written, torn, or padding).
    None,
}

fn classify_header(buf: &[u8], key: u64) -> HeaderAt {
    match JournalHeader::decode(buf, key) {
        Ok(h) => HeaderAt::Valid(h),
        Err(reason) => match JournalHeader::peek_seq(buf, key) {
            Some(seq) => HeaderAt::Unacceptable { seq, reason },
            None => HeaderAt::None,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use replicator_protocol::journal_format::MAX_APPEND_WINDOW;
    use replicator_protocol::record::RecordOp;

    use super::*;
    use crate::io::BackendChoice;

    const CAPACITY: u64 = 4 << 20;

    fn write(seq: u64) -> Record {
        Record::with_payload(RecordOp::Write, seq, 0, seq * 4096, 1, Bytes::from(vec![seq as u8; 4096]), false)
    }

    /// A journal holding records 1..=n appended in order; returns their
    /// positions (index 0 is seq 1).
    async fn journal_with(dir: &Path, n: u64) -> (Journal, Vec<u64>) {
        let engine = IoEngine::new(BackendChoice::Auto);
        let j = Journal::open(&engine, &dir.join("journal"), CAPACITY, "g", 7, true).await.unwrap();
        let mut ring = JournalRing::new(j.capacity());
        let mut positions = Vec::new();
        for seq in 1..=n {
            let rec = write(seq);
            let pos = ring.reserve(seq, record_span(rec.payload.len() as u64)).unwrap();
            j.append_at(pos, &rec).unwrap();
            positions.push(pos);
        }
        (j, positions)
    }

    #[tokio::test]
    async fn journal_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(journal_with(dir.path(), 1).await);
        assert_eq!(mode(&path), 0o600);
        // One left wider (an older build, a copy) is tightened at open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let engine = IoEngine::new(BackendChoice::Auto);
        drop(Journal::open(&engine, &path, CAPACITY, "g", 7, false).await.unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[tokio::test]
    async fn records_after_a_torn_one_are_discarded_and_invalidated() {
        let dir = tempfile::tempdir().unwrap();
        let (j, pos) = journal_with(dir.path(), 6).await;
        // Record 4's append never happened (5 and 6 were appended first).
        j.invalidate(pos[3]).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.as_slice()), (3, &[5u64, 6][..]));
        // They are gone for good: seq 5 will be reused by a new record.
        let again = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((again.last_seq, again.discarded.len()), (3, 0));
        // After a clean stop nothing is searched or discarded.
        let (j, _) = journal_with(dir.path(), 3).await;
        let clean = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Clean).await.unwrap();
        assert_eq!((clean.last_seq, clean.discarded.len()), (3, 0));
    }

    #[tokio::test]
    async fn after_an_unclean_stop_every_record_beyond_a_missing_one_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (j, pos) = journal_with(dir.path(), 3).await;
        // Record 2 is missing and a record far beyond the append window is
        // intact: a disk losing its volatile cache loses pages in any order.
        // No acknowledged FUA or FLUSH covered record 3 or the far one (its
        // sync would have covered record 2), and the activity log covers
        // their regions: all are discarded.
        j.invalidate(pos[1]).unwrap();
        let far = write(2 + MAX_APPEND_WINDOW + 5);
        j.append_at(pos[2] + record_span(4096), &far).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.as_slice()), (1, &[3, far.seq][..]));
    }

    #[tokio::test]
    async fn an_intact_record_it_cannot_accept_is_never_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (j, pos) = journal_with(dir.path(), 2).await;
        // Record 3: a header with a valid checksum that this build does not
        // accept (a payload op above the record limit).
        let mut big = JournalHeader::from_record(&write(3));
        big.length = replicator_protocol::record::MAX_RECORD_PAYLOAD + 4096;
        let at = pos[1] + record_span(4096);
        nix::sys::uio::pwrite(&j.appender, &big.encode(j.key), at as i64).unwrap();
        for stop in [Stop::Clean, Stop::Unclean] {
            match j.recover(1, JOURNAL_SUPERBLOCK_LEN, stop).await {
                Err(JournalError::Unacceptable { seq: 3, .. }) => {}
                other => panic!("expected a refusal of record 3, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_header_forged_in_client_data_is_not_taken_for_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let (j, pos) = journal_with(dir.path(), 2).await;
        // A client writes data that holds a well-formed header with a far
        // sequence number, but without the pair's key: after a crash the
        // scan must not see a gap in it.
        let forged = JournalHeader::from_record(&write(2 + MAX_APPEND_WINDOW + 9)).encode(0);
        let mut data = vec![0u8; 4096];
        data[448..448 + JOURNAL_HEADER_LEN].copy_from_slice(&forged);
        let rec = Record::with_payload(RecordOp::Write, 3, 0, 0, 1, Bytes::from(data), false);
        j.append_at(pos[1] + record_span(4096), &rec).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (3, 0));
    }

    #[tokio::test]
    async fn a_trim_larger_than_the_payload_limit_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (j, pos) = journal_with(dir.path(), 1).await;
        let trim = Record::without_payload(RecordOp::Trim, 2, 0, 0, 128 << 20, 1, false);
        j.append_at(pos[0] + record_span(4096), &trim).unwrap();
        let w = write(3);
        j.append_at(pos[0] + record_span(4096) + record_span(0), &w).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!(r.last_seq, 3);
        let (p, _) = r.ring.lookup(2).unwrap();
        assert_eq!(j.read_record(p, 2).await.unwrap(), trim);
    }
}
