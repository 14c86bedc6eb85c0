//! The on-disk journal of a consistency group (primary side).
//!
//! A preallocated file: a superblock, then a ring of records written in
//! sequence order (see `replicator_protocol::journal_format` for the layout
//! and the space accounting). Space is reserved in sequence order under the
//! group lock; the record bytes themselves may land out of order, since
//! recovery only trusts the contiguous prefix it can read back with valid
//! CRCs. Space is freed only below the secondary's persisted checkpoint.
//!
//! Record headers are keyed with the pair id and the epoch (journal format
//! version 3, see `journal_format`): a journal is opened with the epoch its
//! records were written in (the group's persisted epoch, known before the
//! file is read), and re-keyed with [`Journal::set_epoch`] (or reopened) when
//! the group enters a new one, so records of a lost epoch are never part of
//! a later epoch's run.
//!
//! A journal of format version 2 (an older build's, headers keyed with the
//! pair id alone) is read once: [`Journal::open`] accepts it, nothing may be
//! appended to it, and [`Journal::recover`] reads its run with either key,
//! rewrites the retained headers with the version 3 key, syncs, and then
//! writes a version 3 superblock. A crash in between leaves a version 2
//! superblock, and the next recovery simply does it again. No acknowledged
//! record is lost by the upgrade; its only cost is that this one recovery
//! is as exposed to stale records of an earlier epoch as the older build was.

use std::io::IoSlice;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use replicator_protocol::journal_format::{
    is_page_aligned, JournalFormatError, JournalHeader, JournalKey, JournalRing, JournalSuperblock, JOURNAL_FORMAT_V2,
    JOURNAL_FORMAT_VERSION, JOURNAL_HEADER_LEN, JOURNAL_PAGE, JOURNAL_RECORD_ALIGN, JOURNAL_SUPERBLOCK_LEN,
};
use replicator_protocol::record::Record;

use crate::io::{AlignedBuf, BlockFile, IoEngine, IoError, OpenOptions, IO_ALIGN};
use crate::write_behind::{self, WriteBehind};

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
    /// An append to a format version 2 journal before recovery upgraded it.
    #[error("journal {path}: format version 2 (written by an older build) is upgraded by recovery; nothing may be appended before")]
    NotUpgraded {
        /// The journal file.
        path: PathBuf,
    },
}

/// An open journal file.
///
/// Appends of small records are plain `pwrite`s into the page cache from
/// the calling task: a memory copy of a few microseconds, cheaper than a
/// round trip through an io_uring worker (buffered writes are not truly
/// asynchronous there). A large record (page-aligned, see
/// `journal_format`) has the whole pages of its payload written with
/// `O_DIRECT` through the I/O engine instead, straight from the buffer the
/// payload arrived in, and only its header and the partial last page of
/// its payload (pages shared with its neighbours) through the page cache:
/// copying a MiB into the page cache and writing it back later cost more
/// than the disk write itself, and filled the cache with dirty pages the
/// kernel then throttled the appending task on. No other record touches
/// those whole pages, so buffered and direct writes never meet in one page.
/// FUA and FLUSH make the journal durable with
/// `sync` (fdatasync through the I/O engine, which covers both); reads for
/// shipping and recovery also go through the engine.
///
/// Two things keep an append a memory copy and a sync a data write, as a
/// database keeps its write-ahead log:
/// * The file is written full of zeroes once, when it is created (and kept
///   when a new pair or epoch starts over in it), through the page cache,
///   so that the first pass of appends finds its pages cached and written
///   before, as every later pass of the ring does (see [`fill`]). Appends
///   into merely preallocated space would leave unwritten extents that every
///   fdatasync has to convert in a filesystem journal commit: measured on
///   ext4 here, ~140 µs for a 4 KiB append and fdatasync into written space
///   against 200–280 µs into preallocated space.
/// * Records are 512-byte aligned, not page aligned, so an append usually
///   fills part of a page. A page no longer cached (after a restart, or
///   evicted) would be read from disk inside `pwrite`, synchronously: ~60 µs
///   here instead of ~4. Each append that enters a new [`READAHEAD`] window
///   asks the kernel to read the next window ahead (`POSIX_FADV_WILLNEED`).
#[derive(Debug)]
pub struct Journal {
    file: BlockFile,
    appender: std::fs::File,
    /// Writes the appended pages back behind the appends.
    behind: Arc<WriteBehind>,
    /// The file opened with `O_DIRECT`, for the whole pages of large
    /// records; `None` where the filesystem refuses `O_DIRECT` (those pages
    /// then go through the page cache too).
    direct: Option<BlockFile>,
    path: PathBuf,
    /// The pair id: with the epoch, the key of every record header's
    /// checksum.
    pair_id: u64,
    /// The epoch records are appended (and recovered) in.
    epoch: u64,
    /// Mixed into the pair id of the key (superblock; 0 before format
    /// version 4): new each time the file starts over.
    salt: u64,
    /// The superblock says format version 2: headers may be keyed with the
    /// pair id alone until [`Journal::recover`] upgrades the file.
    legacy: bool,
}

/// Appends read ahead in windows of this size (see [`Journal`]).
const READAHEAD: u64 = 1 << 20;
/// The page size of the page cache (the unit in which buffered and direct
/// writes must not meet), which a page-aligned record's payload is aligned to.
const PAGE: u64 = IO_ALIGN as u64;
/// An existing journal file at least this large (the smallest
/// `journal_size`) is opened at its own size when `journal_size` differs.
const MIN_KEPT_SIZE: u64 = 16 << 20;
const _: () = assert!(PAGE == JOURNAL_PAGE);
/// The zeroes a new journal is written full of, per write. The page cache
/// keeps the folios a buffered write creates, sized by the write: 1 MiB
/// writes made 1 MiB folios, and every later small append walked the
/// buffer heads of a whole one (`ext4_block_write_begin` and
/// `block_commit_write` 9 % of the primary's CPU at sync QD32, 1 % with
/// 16 KiB; 4 KiB measured the same as 16 KiB with four times the calls).
const ZERO_FILL_CHUNK: usize = 16 << 10;

impl Journal {
    /// Opens the journal at `path`, creating it (`size` bytes, written full
    /// of zeroes) with a fresh superblock when it does not exist. With
    /// `reset`, the journal starts over for a new pair or epoch: an existing
    /// file of the right size is kept (its old records are keyed with
    /// another pair or epoch, so they are not records of this one) and gets
    /// a fresh superblock. Records are read and appended keyed with
    /// `pair_id` and `epoch`: the epoch the records to recover were written
    /// in (the group's persisted epoch).
    pub async fn open(
        engine: &IoEngine,
        path: &Path,
        size: u64,
        group: &str,
        pair_id: u64,
        epoch: u64,
        reset: bool,
    ) -> Result<Journal, JournalError> {
        let (existed, size) = match std::fs::metadata(path) {
            // Made anew at the new size, renamed over the old file only
            // once whole: a crash while it is filled leaves the old one
            // (whose records are keyed with another pair, epoch or salt).
            Ok(m) if reset && m.len() != size => (false, size),
            // `journal_size` changed since the file was made: its records
            // sit where a ring of the file's size put them, so the journal
            // keeps that size until it starts over (`reset`).
            Ok(m) if m.len() != size && m.len() >= MIN_KEPT_SIZE && m.len() % PAGE == 0 => {
                tracing::warn!(
                    path = %path.display(),
                    configured = size,
                    file = m.len(),
                    "journal_size differs from the journal file's size: the journal keeps its size until it starts \
                     over (pair create, failover, switchover, failback), then takes journal_size"
                );
                (true, m.len())
            }
            Ok(_) => (true, size),
            Err(_) => (false, size),
        };
        let superblock = |salt| JournalSuperblock {
            group: group.to_string(),
            capacity: size,
            pair_id,
            version: JOURNAL_FORMAT_VERSION,
            salt,
        };
        // A new file appears under its name only with its superblock.
        let created_salt = if existed {
            None
        } else {
            let salt = fresh_salt(0);
            Self::create(path, size, superblock(salt).encode()).await?;
            Some(salt)
        };
        let opts = OpenOptions { create_size: Some(size), create: false, direct: false, read_only: false };
        let file = engine.open(path, &opts).map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
        // Created 0600; one from an older build (or copied in) may be wider.
        crate::perms::tighten_file(path, crate::perms::PRIVATE_FILE_MODE, "journal").map_err(|source| {
            JournalError::Io { path: path.to_path_buf(), source: IoError::Open { path: path.to_path_buf(), source } }
        })?;
        let appender = std::fs::OpenOptions::new().write(true).open(path).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source: IoError::Open { path: path.to_path_buf(), source },
        })?;
        let direct_opts = OpenOptions { direct: true, ..opts };
        let direct = match engine.open(path, &direct_opts) {
            Ok(f) if f.is_direct() => Some(f),
            Ok(_) => None,
            Err(e) => {
                tracing::info!(path = %path.display(), "journal: large records go through the page cache: {e}");
                None
            }
        };
        let behind = WriteBehind::new(appender.try_clone().map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source: IoError::Open { path: path.to_path_buf(), source },
        })?);
        let mut journal = Journal {
            file,
            appender,
            behind,
            direct,
            path: path.to_path_buf(),
            pair_id,
            epoch,
            salt: 0,
            legacy: false,
        };
        if let Some(salt) = created_salt {
            journal.salt = salt;
        } else if !reset {
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
            journal.legacy = sb.version == JOURNAL_FORMAT_V2;
            journal.salt = sb.salt;
            if journal.legacy {
                tracing::info!(path = %path.display(), "journal of format version 2 (an older build): recovery reads it and upgrades it to version {JOURNAL_FORMAT_VERSION}");
            }
        } else {
            // Starting over in this file (a new pair or epoch): a salt none
            // of its earlier records are keyed with. The superblock is one
            // page, rewritten in place: a power cut leaves the old one or
            // the new one (DESIGN.md's fault model keeps or drops pages).
            let old_salt = match journal.read(0, JOURNAL_SUPERBLOCK_LEN).await {
                Ok(buf) => JournalSuperblock::decode(&buf).map_or(0, |sb| sb.salt),
                Err(_) => 0,
            };
            journal.salt = fresh_salt(old_salt);
            journal.write(0, AlignedBuf::copy_from(&superblock(journal.salt).encode())).await?;
            journal.sync().await?;
        }
        journal.will_need(0, 2 * READAHEAD);
        Ok(journal)
    }

    /// Creates the file of a new journal at `path`: preallocated, written
    /// full of zeroes through the page cache (see [`Journal`]) with
    /// `superblock` at its start, under a temporary name, and renamed into
    /// place once durable, so that a crash meanwhile leaves no file without
    /// a superblock behind.
    async fn create(path: &Path, size: u64, superblock: Vec<u8>) -> Result<(), JournalError> {
        let tmp = path.with_extension("creating");
        let _ = std::fs::remove_file(&tmp);
        let (target, temp) = (path.to_path_buf(), tmp.clone());
        // Plain writes and syncs that take as long as the disk: on the
        // blocking pool, off the runtime's threads.
        let filled = tokio::task::spawn_blocking(move || fill(&temp, size, &superblock, &target)).await;
        let res = filled.unwrap_or_else(|join| {
            Err(JournalError::Io {
                path: path.to_path_buf(),
                source: IoError::Io {
                    op: "create journal",
                    offset: 0,
                    source: std::io::Error::other(join.to_string()),
                },
            })
        });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// File size (the ring ends here).
    pub fn capacity(&self) -> u64 {
        self.file.size()
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The epoch records are keyed with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Keys the records appended from now on, and those any later recovery
    /// through this handle accepts, with `epoch`: the group entered a new
    /// epoch (the primary after a power cut, once the old epoch's run is
    /// recovered). Records of the earlier epoch are no longer records.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The key of the records of this journal's epoch.
    fn key(&self) -> JournalKey {
        JournalKey::new(self.pair_id ^ self.salt, self.epoch)
    }

    /// The keys a header may carry: the current one, and while the file is
    /// still of format version 2, the pair id alone.
    fn keys(&self) -> Vec<JournalKey> {
        let mut keys = vec![self.key()];
        if self.legacy {
            keys.push(JournalKey::v2(self.pair_id));
        }
        keys
    }

    fn format(&self, source: JournalFormatError) -> JournalError {
        JournalError::Format { path: self.path.clone(), source }
    }

    fn io(&self, source: IoError) -> JournalError {
        JournalError::Io { path: self.path.clone(), source }
    }

    async fn read(&self, pos: u64, len: u64) -> Result<AlignedBuf, JournalError> {
        self.read_from(&self.file, pos, len).await
    }

    /// Reads `len` bytes at `pos` through `file` (this journal's buffered
    /// or direct descriptor).
    async fn read_from(&self, file: &BlockFile, pos: u64, len: u64) -> Result<AlignedBuf, JournalError> {
        let (res, buf) = file.read_at(AlignedBuf::for_overwrite(len as usize), pos).await;
        res.map_err(|e| self.io(e))?;
        Ok(buf)
    }

    async fn write(&self, pos: u64, buf: AlignedBuf) -> Result<(), JournalError> {
        let (res, _) = self.file.write_at(buf, pos).await;
        res.map_err(|e| self.io(e))
    }

    /// True when appending a record of `payload_len` bytes waits for the
    /// disk ([`Journal::append`] of a page-aligned record); false when
    /// [`Journal::append_at`] does it at once.
    pub fn appends_directly(&self, payload_len: usize) -> bool {
        self.direct.is_some() && is_page_aligned(payload_len as u64)
    }

    /// Writes `rec` at `pos` (reserved with `JournalRing::reserve`): a
    /// small record at once ([`Journal::append_at`]); the whole pages of a
    /// page-aligned record's payload with `O_DIRECT` from the payload's own
    /// buffer, waiting for the disk, and its header and partial last page
    /// through the page cache (see [`Journal`]).
    pub async fn append(&self, pos: u64, rec: &Record) -> Result<(), JournalError> {
        let header = JournalHeader::from_record(rec);
        let (Some(file), true) = (&self.direct, header.page_aligned) else {
            return self.append_at(pos, rec);
        };
        if self.legacy {
            return Err(JournalError::NotUpgraded { path: self.path.clone() });
        }
        let (span, at) = (header.span(), header.payload_pos(pos));
        let whole = rec.payload.len() as u64 / PAGE * PAGE;
        // The partial pages are read while the direct write runs, so the
        // buffered writes into them after it find them cached.
        if pos % PAGE != 0 {
            self.will_need(pos / PAGE * PAGE, PAGE);
        }
        if whole < rec.payload.len() as u64 {
            self.will_need(at + whole, PAGE);
        }
        let encoded = header.encode(self.key());
        let bytes = RecordBytes::new(&encoded, at - pos, &rec.payload, span);
        // Written as it is when the payload is page-aligned in memory (a
        // client's write, a payload received from the primary), else
        // copied into an aligned buffer first (see `BlockFile::write_bytes`).
        file.write_bytes(rec.payload.slice(..whole as usize), at, false).await.map_err(|e| self.io(e))?;
        // The header's page, then the payload's partial last page if any;
        // the zero padding after the payload is left as it is (no reader
        // looks there, and writing it would be one more partial page).
        let tail = (at - pos + whole) as usize;
        let payload_end = (at - pos) as usize + rec.payload.len();
        self.write_buffered(pos, bytes.slices(0, (at - pos) as usize))?;
        self.write_buffered(pos + tail as u64, bytes.slices(tail, payload_end))?;
        self.behind.request(write_behind::ranges_after_append(pos, pos + span, self.capacity()));
        Ok(())
    }

    /// Writes `rec` at `pos` (reserved with `JournalRing::reserve`) into the
    /// page cache: header, payload and padding in one `pwritev`, straight
    /// from the record's buffers.
    pub fn append_at(&self, pos: u64, rec: &Record) -> Result<(), JournalError> {
        if self.legacy {
            return Err(JournalError::NotUpgraded { path: self.path.clone() });
        }
        let header = JournalHeader::from_record(rec);
        let span = header.span();
        self.read_ahead(pos, &header);
        let encoded = header.encode(self.key());
        let bytes = RecordBytes::new(&encoded, header.payload_pos(pos) - pos, &rec.payload, span);
        self.write_buffered(pos, bytes.slices(0, span as usize))?;
        self.behind.request(write_behind::ranges_after_append(pos, pos + span, self.capacity()));
        Ok(())
    }

    /// `pwritev` of all of `parts` at `pos` (nothing when they are empty).
    fn write_buffered(&self, pos: u64, parts: [&[u8]; 4]) -> Result<(), JournalError> {
        let end = pos + parts.iter().map(|p| p.len() as u64).sum::<u64>();
        let mut slices = parts.map(IoSlice::new);
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        let mut at = pos;
        let err = |source: std::io::Error| self.io(IoError::Io { op: "journal append", offset: pos, source });
        while at < end {
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

    /// An append of the record with `header` at `pos` that enters a new
    /// [`READAHEAD`] window starts reading the window after it into the
    /// page cache, so that the appends there find their partial pages
    /// cached (see [`Journal`]). Page-aligned records mostly overwrite
    /// whole pages: reading what they overwrite would cost more than the
    /// partial pages at their ends, which [`Journal::append`] reads ahead
    /// itself. Only advice: an error changes nothing but the speed.
    fn read_ahead(&self, pos: u64, header: &JournalHeader) {
        let end = pos + header.span();
        if header.page_aligned || pos / READAHEAD == end / READAHEAD && pos % READAHEAD != 0 {
            return;
        }
        let mut next = (end / READAHEAD + 1) * READAHEAD;
        if next >= self.capacity() {
            // The ring wraps: its first records go right after the superblock.
            next = 0;
        }
        self.will_need(next, READAHEAD);
    }

    /// Starts writing the record at `pos..pos + span` back to the disk,
    /// without waiting: for an append a flush is likely to follow (see
    /// `write_path.rs`), whose `fdatasync` then has only the device's
    /// cache to flush instead of writing the pages first. Only a head
    /// start: nothing is durable before [`Journal::sync`], and an error
    /// changes nothing but the speed.
    pub fn start_writeback(&self, pos: u64, span: u64) {
        let _ = crate::io::start_writeback(&self.appender, pos, span);
    }

    /// Starts reading `len` bytes at `pos` (within the file) into the page
    /// cache, without waiting.
    fn will_need(&self, pos: u64, len: u64) {
        let len = len.min(self.capacity().saturating_sub(pos));
        let _ = nix::fcntl::posix_fadvise(
            &self.appender,
            pos as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }

    /// Reads back the record at `pos` and checks that it is `seq`.
    pub async fn read_record(&self, pos: u64, seq: u64) -> Result<Record, JournalError> {
        let header = self.read_header(pos, seq).await?;
        let payload = self.read_payload(pos, &header).await?;
        header.into_record(payload).map_err(|e| self.format(e))
    }

    /// The header of the record with sequence `seq` at `pos` (what it
    /// writes where, without its payload).
    pub async fn read_header(&self, pos: u64, seq: u64) -> Result<JournalHeader, JournalError> {
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
        Ok(header)
    }

    async fn read_payload(&self, pos: u64, header: &JournalHeader) -> Result<Bytes, JournalError> {
        let len = header.payload_len();
        if len == 0 {
            return Ok(Bytes::new());
        }
        let at = header.payload_pos(pos);
        if at.saturating_add(len) > self.capacity() {
            return Err(self.format(JournalFormatError::Truncated));
        }
        let file = match &self.direct {
            // Whole pages, page-aligned in the file: read with `O_DIRECT`
            // (the kernel writes back any cached dirty page of the range
            // first). Through the page cache, a cold MiB cost this machine
            // about 2 ms of the reader's CPU in the copy out of the cache,
            // most of the primary's CPU while it shipped a backlog of 1 MiB
            // records (the catch-up figure); a direct read costs it none.
            Some(direct) if header.page_aligned && len % PAGE == 0 => direct,
            _ => &self.file,
        };
        Ok(Bytes::from_owner(self.read_from(file, at, len).await?))
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
    /// numbers are never read again). Then the file is synced: the run read
    /// may sit only in the page cache (a kill leaves it there), and the
    /// caller replays it onto the volumes.
    ///
    /// Only records of this journal's epoch count ([`Journal::open`],
    /// [`Journal::set_epoch`]); a journal of format version 2 is upgraded
    /// here (see the module doc).
    pub async fn recover(&mut self, tail_seq: u64, tail_pos: u64, stop: Stop) -> Result<Recovered, JournalError> {
        let mut ring = JournalRing::new(self.capacity());
        let start = tail_pos.clamp(JOURNAL_SUPERBLOCK_LEN, self.capacity());
        ring.reset_at(start);
        let mut expected = tail_seq;
        let mut written_at_us = Vec::new();
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
            let payload = match self.read_payload(pos, &header).await {
                Ok(payload) => payload,
                // A payload its header places beyond the ring: the end of
                // the run, as a torn header would be.
                Err(JournalError::Format { .. }) => break,
                // A read that failed says nothing about the record: ending
                // the run here would discard it and every later one.
                Err(e) => return Err(e),
            };
            if header.clone().into_record(payload).is_err() {
                break;
            }
            match ring.reserve(expected, header.span()) {
                Some(p) if p == pos => {
                    expected += 1;
                    written_at_us.push(header.written_at_us);
                }
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
            discarded.sort_unstable();
            // The run was read from the page cache, where a kill leaves
            // appends whose sync never finished: it is made durable before
            // anything acts on it. The replay that follows writes the
            // volumes in any order; a power cut during it must find every
            // record it replays still in the run (and none it discarded).
            self.sync().await?;
        }
        if self.legacy {
            self.upgrade(&ring).await?;
        }
        Ok(Recovered { ring, last_seq: expected - 1, discarded, written_at_us })
    }

    /// Upgrades a format version 2 journal whose run `ring` holds: rewrites
    /// each retained header with this epoch's key, syncs, then writes a
    /// version 3 superblock and syncs. Until that superblock is on disk,
    /// recovery keeps accepting both keys, so a crash anywhere in between
    /// loses nothing.
    async fn upgrade(&mut self, ring: &JournalRing) -> Result<(), JournalError> {
        let key = self.key();
        let mut rewritten = 0u64;
        if let (Some(oldest), Some(newest)) = (ring.oldest_seq(), ring.newest_seq()) {
            for seq in oldest..=newest {
                let Some((pos, _)) = ring.lookup(seq) else { continue };
                let header = match self.header_at(pos).await? {
                    HeaderAt::Valid(h) if h.seq == seq => h,
                    _ => {
                        return Err(self.format(JournalFormatError::Corrupt(format!(
                            "record {seq} at {pos} changed while the journal was upgraded to format version                              {JOURNAL_FORMAT_VERSION}"
                        ))))
                    }
                };
                nix::sys::uio::pwrite(&self.appender, &header.encode(key), pos as i64)
                    .map_err(|e| self.io(IoError::Io { op: "journal upgrade", offset: pos, source: e.into() }))?;
                rewritten += 1;
            }
        }
        self.sync().await?;
        let buf = self.read(0, JOURNAL_SUPERBLOCK_LEN).await?;
        let sb = JournalSuperblock::decode(&buf).map_err(|source| self.format(source))?;
        // Version 2 had no salt: the rewritten headers are keyed with 0.
        let sb = JournalSuperblock { version: JOURNAL_FORMAT_VERSION, salt: self.salt, ..sb };
        self.write(0, AlignedBuf::copy_from(&sb.encode())).await?;
        self.sync().await?;
        self.legacy = false;
        tracing::info!(path = %self.path.display(), records = rewritten,
            "journal upgraded from format version 2 to {JOURNAL_FORMAT_VERSION} (headers keyed with pair id and epoch)");
        Ok(())
    }

    /// Classifies the bytes at `pos` as a record header.
    async fn header_at(&self, pos: u64) -> Result<HeaderAt, JournalError> {
        if pos + JOURNAL_HEADER_LEN as u64 > self.capacity() {
            return Ok(HeaderAt::None);
        }
        let buf = self.read(pos, JOURNAL_HEADER_LEN as u64).await?;
        Ok(classify_header(&buf, &self.keys()))
    }

    /// Every record header in the ring with a sequence number of at least
    /// `from`, as (seq, position). Reads the whole ring in large chunks.
    async fn records_from(&self, from: u64) -> Result<Vec<(u64, u64)>, JournalError> {
        const CHUNK: u64 = 4 << 20;
        let keys = self.keys();
        let mut out = Vec::new();
        let mut at = JOURNAL_SUPERBLOCK_LEN;
        while at < self.capacity() {
            let len = CHUNK.min(self.capacity() - at);
            let buf = self.read(at, len).await?;
            let mut off = 0usize;
            while off + JOURNAL_HEADER_LEN <= buf.len() {
                if let Some(seq) = keys.iter().find_map(|&k| JournalHeader::peek_seq(&buf[off..], k)) {
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
    /// When each retained record was written (microseconds since the
    /// epoch, from its header), in sequence order.
    pub written_at_us: Vec<u64>,
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

/// Writes the new journal file `tmp` (`size` bytes) full of zeroes, makes
/// it durable and renames it to `path` (see [`Journal::create`]).
///
/// The zeroes go through the page cache, not `O_DIRECT`: the pages the
/// first pass of appends lands in are then cached pages the CPU has written
/// before, as they are on every later pass of the ring. Appends into pages
/// only read from the disk (`POSIX_FADV_WILLNEED`) cost several times
/// more on a virtual machine like the one `bench/RESULTS.md` was measured
/// on (the copy into each page stalls on its first write): alternating
/// isolated rounds measured async QD32 and async 1 MiB writes ~60 % faster
/// with the journal filled this way.
/// A superblock salt other than 0 and `old`.
fn fresh_salt(old: u64) -> u64 {
    std::iter::repeat_with(crate::group::random_u64).find(|s| *s != 0 && *s != old).unwrap_or(old.wrapping_add(1))
}

fn fill(tmp: &Path, size: u64, superblock: &[u8], path: &Path) -> Result<(), JournalError> {
    let io = |op: &'static str, offset: u64, source: std::io::Error| JournalError::Io {
        path: path.to_path_buf(),
        source: IoError::Io { op, offset, source },
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::perms::PRIVATE_FILE_MODE)
        .open(tmp)
        .map_err(|e| io("create journal", 0, e))?;
    // Preallocate first: a journal that hits ENOSPC halfway would turn a
    // full filesystem into failed client writes much later.
    match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64) {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => {}
        Err(e) => return Err(io("preallocate journal", 0, e.into())),
    }
    let zeroes = vec![0u8; ZERO_FILL_CHUNK];
    let mut at = 0;
    while at < size {
        let len = (size - at).min(ZERO_FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeroes[..len], at).map_err(|e| io("zero journal", at, e))?;
        at += len as u64;
    }
    file.write_all_at(superblock, 0).map_err(|e| io("write journal superblock", 0, e))?;
    file.sync_data().map_err(|e| io("sync new journal", 0, e))?;
    std::fs::rename(tmp, path).map_err(|e| io("rename new journal into place", 0, e))?;
    crate::durable::sync_parent(path).map_err(|e| io("sync journal directory", 0, e))
}

/// A record's bytes as they lie in the journal (header, zeroes up to the
/// payload, payload, zero padding to its span), without copying them
/// together.
struct RecordBytes<'a> {
    parts: [&'a [u8]; 4],
}

impl<'a> RecordBytes<'a> {
    /// The record with `header`, its payload `payload_at` bytes from its
    /// start, and `span` bytes in all.
    fn new(header: &'a [u8], payload_at: u64, payload: &'a [u8], span: u64) -> Self {
        static ZEROES: [u8; PAGE as usize] = [0; PAGE as usize];
        let gap = (payload_at as usize).saturating_sub(header.len()).min(ZEROES.len());
        let pad = (span as usize).saturating_sub(header.len() + gap + payload.len()).min(ZEROES.len());
        RecordBytes { parts: [header, &ZEROES[..gap], payload, &ZEROES[..pad]] }
    }

    /// The pieces of bytes `from..to` of the record, in order (empty where
    /// a part lies outside).
    fn slices(&self, from: usize, to: usize) -> [&'a [u8]; 4] {
        let mut start = 0;
        self.parts.map(|part| {
            let (lo, hi) = (from.max(start), to.min(start + part.len()));
            let piece = if lo < hi { &part[lo - start..hi - start] } else { &[][..] };
            start += part.len();
            piece
        })
    }
}

/// Classifies `buf` as a header under the first of `keys` whose checksum
/// it carries.
fn classify_header(buf: &[u8], keys: &[JournalKey]) -> HeaderAt {
    for &key in keys {
        if let Some(seq) = JournalHeader::peek_seq(buf, key) {
            return match JournalHeader::decode(buf, key) {
                Ok(h) => HeaderAt::Valid(h),
                Err(reason) => HeaderAt::Unacceptable { seq, reason },
            };
        }
    }
    HeaderAt::None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use replicator_protocol::journal_format::{record_span, MAX_APPEND_WINDOW};
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
        let j = Journal::open(&engine, &dir.join("journal"), CAPACITY, "g", 7, 1, true).await.unwrap();
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
        drop(Journal::open(&engine, &path, CAPACITY, "g", 7, 1, false).await.unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    /// A journal starting over at another size is made whole under another
    /// name first: if that fails (or the daemon dies while it is filled),
    /// the old file is still there. It was removed first, and a restart
    /// then found no journal (a secondary: its restore journal lost).
    #[tokio::test]
    async fn a_journal_resized_at_a_start_over_keeps_the_old_file_until_the_new_one_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        drop(journal_with(dir.path(), 1).await);
        // The new file's temporary name is taken (by a directory), so
        // making it fails.
        std::fs::create_dir(path.with_extension("creating")).unwrap();
        let engine = IoEngine::new(BackendChoice::Auto);
        assert!(Journal::open(&engine, &path, 2 * CAPACITY, "g", 7, 2, true).await.is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY, "the old journal must stay");
        std::fs::remove_dir(path.with_extension("creating")).unwrap();
        let j = Journal::open(&engine, &path, 2 * CAPACITY, "g", 7, 2, true).await.unwrap();
        assert_eq!(j.capacity(), 2 * CAPACITY);
    }

    /// Extents of `path` that `filefrag` reports as unwritten.
    fn unwritten_extents(path: &Path) -> usize {
        let out = std::process::Command::new("filefrag").arg("-v").arg(path).output().unwrap();
        assert!(out.status.success(), "filefrag: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("unwritten")).count()
    }

    /// A new journal's file takes its name only once it holds its
    /// superblock: a crash while it is created leaves no file a restart
    /// would refuse to open.
    #[tokio::test]
    async fn a_new_journal_file_appears_with_its_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let sb = JournalSuperblock {
            group: "g".into(),
            capacity: CAPACITY,
            pair_id: 7,
            version: JOURNAL_FORMAT_VERSION,
            salt: 99,
        };
        Journal::create(&path, CAPACITY, sb.encode()).await.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len() as u64, CAPACITY);
        assert_eq!(JournalSuperblock::decode(&on_disk[..JOURNAL_SUPERBLOCK_LEN as usize]).unwrap(), sb);
        assert!(!path.with_extension("creating").exists());
        // Opened, it is that journal: its records are keyed with that salt.
        let engine = IoEngine::new(BackendChoice::Auto);
        let j = Journal::open(&engine, &path, CAPACITY, "g", 7, 1, false).await.unwrap();
        assert_eq!(j.salt, 99);
    }

    #[tokio::test]
    async fn a_new_journal_is_written_full_and_starting_over_keeps_the_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        // What merely preallocating leaves (the check can tell).
        let plain = dir.path().join("plain");
        let f = std::fs::File::create(&plain).unwrap();
        nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, CAPACITY as i64).unwrap();
        assert!(unwritten_extents(&plain) > 0, "this filesystem does not report unwritten extents");

        let (j, pos) = journal_with(dir.path(), 5).await;
        assert_eq!(unwritten_extents(&path), 0);
        assert!(!path.with_extension("creating").exists());
        let inode = std::fs::metadata(&path).unwrap().ino();
        drop(j);
        // Starting over, even for the same pair and epoch: the same file,
        // and none of its records verifies any more.
        let engine = IoEngine::new(BackendChoice::Auto);
        let mut j = Journal::open(&engine, &path, CAPACITY, "g", 7, 1, true).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert!(j.read_record(pos[0], 1).await.is_err());
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (0, 0));
        // A journal of another size is made anew.
        drop(j);
        let j = Journal::open(&engine, &path, 2 * CAPACITY, "g", 7, 1, true).await.unwrap();
        assert_eq!(j.capacity(), 2 * CAPACITY);
        assert_eq!(unwritten_extents(&path), 0);
    }

    #[tokio::test]
    async fn large_records_go_to_disk_directly_between_buffered_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = journal_with(dir.path(), 0).await;
        assert!(j.direct.is_some(), "the test directory's filesystem refuses O_DIRECT");
        let mut ring = JournalRing::new(j.capacity());
        // Large records start and end inside pages their small neighbours
        // share; one fills its first page from the page's start.
        // Payloads aligned in memory as a client's write is (written from
        // their own buffer) and not (copied first); one not a whole number
        // of pages.
        let sizes = [128usize << 10, 4096, 1 << 20, 4096, 300 << 10, 512, (64 << 10) - 64, 4096 - 64, 1000, 70_000];
        let mut records = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let seq = i as u64 + 1;
            let bytes: Vec<u8> = (0..len).map(|b| (b as u64 * 31 + seq) as u8).collect();
            let payload = match seq % 2 {
                0 => Bytes::from(bytes),
                _ => Bytes::from_owner(AlignedBuf::copy_from(&bytes)),
            };
            let rec = Record::with_payload(RecordOp::Write, seq, 0, seq << 21, 1, payload, false);
            let pos = ring.reserve(seq, record_span(len as u64)).unwrap();
            assert_eq!(j.appends_directly(len), len as u64 >= 64 << 10, "record {seq}");
            records.push((pos, rec));
        }
        assert_eq!(records[0].0 % PAGE, 0, "one large record starts on a page boundary");
        assert_ne!(records[2].0 % PAGE, 0, "one large record starts inside a page");
        // Appended concurrently, as the write path and the applier do.
        futures_util::future::try_join_all(records.iter().map(|(pos, rec)| j.append(*pos, rec))).await.unwrap();
        let file = std::fs::File::open(dir.path().join("journal")).unwrap();
        for (pos, rec) in &records {
            assert_eq!(j.read_record(*pos, rec.seq).await.unwrap().payload, rec.payload, "record {}", rec.seq);
            // A large record's payload lies on a page boundary of the file.
            let header = JournalHeader::from_record(rec);
            let at = header.payload_pos(*pos);
            assert_eq!(header.page_aligned, rec.payload.len() >= 64 << 10);
            assert!(!header.page_aligned || at % PAGE == 0, "record {}", rec.seq);
            let mut on_disk = vec![0u8; rec.payload.len()];
            file.read_exact_at(&mut on_disk, at).unwrap();
            assert!(on_disk == rec.payload, "record {}: payload not at {at}", rec.seq);
        }
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (sizes.len() as u64, 0));
    }

    /// Large records an earlier build wrote, their payload right after the
    /// header, are recovered and read back as they are, next to
    /// page-aligned ones.
    #[tokio::test]
    async fn large_records_of_the_earlier_layout_are_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = journal_with(dir.path(), 0).await;
        let mut ring = JournalRing::new(j.capacity());
        let large = |seq: u64| {
            let bytes = vec![seq as u8 ^ 0x5a; 256 << 10];
            Record::with_payload(RecordOp::Write, seq, 0, seq << 21, 1, Bytes::from(bytes), false)
        };
        let mut written = Vec::new();
        for seq in 1..=4 {
            let rec = large(seq);
            if seq % 2 == 1 {
                // The earlier layout, as that build wrote it: header,
                // payload, padding to 512 bytes.
                let header = JournalHeader { page_aligned: false, ..JournalHeader::from_record(&rec) };
                let pos = ring.reserve(seq, header.span()).unwrap();
                assert_eq!(header.payload_pos(pos), pos + JOURNAL_HEADER_LEN as u64);
                let mut bytes = header.encode(j.key()).to_vec();
                bytes.extend_from_slice(&rec.payload);
                bytes.resize(header.span() as usize, 0);
                j.appender.write_all_at(&bytes, pos).unwrap();
                written.push((pos, rec));
            } else {
                let pos = ring.reserve(seq, record_span(rec.payload.len() as u64)).unwrap();
                j.append(pos, &rec).await.unwrap();
                written.push((pos, rec));
            }
        }
        let path = dir.path().join("journal");
        drop(j);
        let engine = IoEngine::new(BackendChoice::Auto);
        let mut j = Journal::open(&engine, &path, CAPACITY, "g", 7, 1, false).await.unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (4, 0));
        for (pos, rec) in &written {
            assert_eq!(r.ring.lookup(rec.seq).map(|(p, _)| p), Some(*pos));
            assert_eq!(j.read_record(*pos, rec.seq).await.unwrap().payload, rec.payload, "record {}", rec.seq);
        }
    }

    #[tokio::test]
    async fn records_after_a_torn_one_are_discarded_and_invalidated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, pos) = journal_with(dir.path(), 6).await;
        // Record 4's append never happened (5 and 6 were appended first).
        j.invalidate(pos[3]).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.as_slice()), (3, &[5u64, 6][..]));
        // They are gone for good: seq 5 will be reused by a new record.
        let again = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((again.last_seq, again.discarded.len()), (3, 0));
        // After a clean stop nothing is searched or discarded.
        let (mut j, _) = journal_with(dir.path(), 3).await;
        let clean = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Clean).await.unwrap();
        assert_eq!((clean.last_seq, clean.discarded.len()), (3, 0));
    }

    #[tokio::test]
    async fn after_an_unclean_stop_every_record_beyond_a_missing_one_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, pos) = journal_with(dir.path(), 3).await;
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
    async fn a_payload_that_cannot_be_read_is_never_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, pos) = journal_with(dir.path(), 4).await;
        // Reading record 3's payload fails (here: the file ends inside it).
        // Recovery reports it instead of ending the run at record 2, which
        // would discard records 3 and 4 and reuse their sequence numbers.
        let file = std::fs::OpenOptions::new().write(true).open(dir.path().join("journal")).unwrap();
        file.set_len(pos[2] + 512).unwrap();
        for stop in [Stop::Clean, Stop::Unclean] {
            match j.recover(1, JOURNAL_SUPERBLOCK_LEN, stop).await {
                Err(JournalError::Io { .. }) => {}
                other => panic!("expected the read error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_intact_record_it_cannot_accept_is_never_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, pos) = journal_with(dir.path(), 2).await;
        // Record 3: a header with a valid checksum that this build does not
        // accept (a payload op above the record limit).
        let mut big = JournalHeader::from_record(&write(3));
        big.length = replicator_protocol::record::MAX_RECORD_PAYLOAD + 4096;
        let at = pos[1] + record_span(4096);
        nix::sys::uio::pwrite(&j.appender, &big.encode(j.key()), at as i64).unwrap();
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
        let (mut j, pos) = journal_with(dir.path(), 2).await;
        // A client writes data that holds a well-formed header with a far
        // sequence number, but without the pair's key: after a crash the
        // scan must not see a gap in it.
        let forged =
            JournalHeader::from_record(&write(2 + MAX_APPEND_WINDOW + 9)).encode(JournalKey::new(0, j.epoch()));
        let mut data = vec![0u8; 4096];
        data[448..448 + JOURNAL_HEADER_LEN].copy_from_slice(&forged);
        let rec = Record::with_payload(RecordOp::Write, 3, 0, 0, 1, Bytes::from(data), false);
        j.append_at(pos[1] + record_span(4096), &rec).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (3, 0));
    }

    /// Issue 8 (I4): records of a lost epoch that outlive the power cut
    /// beyond the new head must never continue the new epoch's run.
    #[tokio::test]
    async fn a_record_of_a_lost_epoch_never_continues_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(BackendChoice::Auto);
        let block = |b: u64| JOURNAL_SUPERBLOCK_LEN + b * JOURNAL_RECORD_ALIGN;
        // A ring of 19 blocks: a 4 KiB write spans 9, a trim 1.
        let capacity = block(19);
        let trim = |seq: u64| Record::without_payload(RecordOp::Trim, seq, 0, seq * 4096, 4096, 1, false);
        let mut j = Journal::open(&engine, &dir.path().join("journal"), capacity, "g", 7, 4, true).await.unwrap();
        // Epoch e (4): 1 (4 KiB, blocks [0, 9), freed once the secondary has
        // it), 2 (trim, block 9), 3 (4 KiB, [10, 19)) and 4 (4 KiB: no room
        // after 3, so at the ring start).
        let mut ring = JournalRing::new(capacity);
        for rec in [write(1), trim(2), write(3)] {
            let pos = ring.reserve(rec.seq, record_span(rec.payload.len() as u64)).unwrap();
            j.append_at(pos, &rec).unwrap();
            if rec.seq == 1 {
                ring.release_through(1);
            }
        }
        let stale = write(4);
        assert_eq!(ring.reserve(4, record_span(4096)), Some(block(0)));
        j.append_at(block(0), &stale).unwrap();
        // The power cut tears 3; 4 survives. The surviving run ends at 2,
        // and the ring restarts at its head: epoch e+1 writes its own 3, a
        // trim, where the old 3 began. (The primary's recovery after the
        // cut also overwrites the old 4's header; a secondary rebasing on
        // the new epoch runs no such scan over its restore journal, and
        // the new epoch's run must not depend on one.)
        j.invalidate(block(10)).unwrap();
        j.set_epoch(5);
        let mut ring = JournalRing::new(capacity);
        ring.reset_at(block(10));
        let new3 = trim(3);
        assert_eq!(ring.reserve(3, record_span(0)), Some(block(10)));
        j.append_at(block(10), &new3).unwrap();
        // Recovery starts where the new epoch did (the persisted tail: 3 at
        // block 10). Record 4 would not fit after the new 3, so the scan
        // looks at the ring start, where the old 4 is: it must not be taken.
        for stop in [Stop::Clean, Stop::Unclean] {
            let r = j.recover(3, block(10), stop).await.unwrap();
            assert_eq!(r.last_seq, 3, "{stop:?}: the run must end at the new epoch's record 3");
            assert_eq!(r.ring.lookup(3), Some((block(10), record_span(0))));
            assert_eq!(j.read_record(block(10), 3).await.unwrap(), new3);
            assert!(r.discarded.is_empty(), "{stop:?}: the old 4 is no record of epoch e+1: {:?}", r.discarded);
        }
        // The same through a reopen keyed with the new epoch (a restart, or
        // the secondary's restore journal after a resync).
        let mut again = Journal::open(&engine, &dir.path().join("journal"), capacity, "g", 7, 5, false).await.unwrap();
        let r = again.recover(3, block(10), Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (3, 0));
        // The old epoch's key still sees its own records (4 at the ring
        // start, intact): only the key keeps them out of the new run.
        let mut old = Journal::open(&engine, &dir.path().join("journal"), capacity, "g", 7, 4, false).await.unwrap();
        assert_eq!(old.read_record(block(0), 4).await.unwrap(), stale);
        let r = old.recover(2, block(9), Stop::Clean).await.unwrap();
        assert_eq!(r.last_seq, 2);
    }

    /// A journal of format version 2 (an older build's) holding records
    /// not yet shipped: read once, upgraded in place, nothing lost.
    #[tokio::test]
    async fn a_version_2_journal_is_recovered_and_upgraded() {
        use replicator_protocol::journal_format::{encode_journal_record, JOURNAL_FORMAT_V2};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let engine = IoEngine::new(BackendChoice::Auto);
        // Lay out what an older build leaves: a version 2 superblock and
        // records 1..=4 keyed with the pair id alone; 1 is released.
        let j = Journal::open(&engine, &path, CAPACITY, "g", 7, 0, true).await.unwrap();
        let sb = JournalSuperblock {
            group: "g".into(),
            capacity: j.capacity(),
            pair_id: 7,
            version: JOURNAL_FORMAT_V2,
            salt: 0,
        };
        nix::sys::uio::pwrite(&j.appender, &sb.encode(), 0).unwrap();
        let mut ring = JournalRing::new(j.capacity());
        let mut positions = Vec::new();
        for seq in 1..=4 {
            let rec = write(seq);
            let pos = ring.reserve(seq, record_span(4096)).unwrap();
            nix::sys::uio::pwrite(&j.appender, &encode_journal_record(&rec, pos, JournalKey::v2(7)), pos as i64)
                .unwrap();
            positions.push(pos);
        }
        drop(j);
        // The new build opens it in the group's epoch: nothing may be
        // appended before recovery upgrades it.
        let mut j = Journal::open(&engine, &path, CAPACITY, "g", 7, 2, false).await.unwrap();
        let end = positions[3] + record_span(4096);
        assert!(matches!(j.append_at(end, &write(5)), Err(JournalError::NotUpgraded { .. })));
        let r = j.recover(2, positions[1], Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len(), r.ring.oldest_seq()), (4, 0, Some(2)));
        for seq in 2..=4 {
            assert_eq!(j.read_record(positions[seq as usize - 1], seq).await.unwrap(), write(seq));
        }
        j.append_at(end, &write(5)).unwrap();
        // On disk: a version 3 superblock and the retained headers keyed
        // with pair id and epoch; a restart in the same epoch finds them all.
        let sb = JournalSuperblock::decode(&j.read(0, JOURNAL_SUPERBLOCK_LEN).await.unwrap()).unwrap();
        assert_eq!(sb.version, JOURNAL_FORMAT_VERSION);
        let mut j = Journal::open(&engine, &path, CAPACITY, "g", 7, 2, false).await.unwrap();
        assert!(!j.legacy);
        let r = j.recover(2, positions[1], Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (5, 0));
        assert_eq!(j.read_record(end, 5).await.unwrap(), write(5));
        // A crash after some headers were rewritten, before the superblock:
        // still version 2, mixed keys, and recovery finds the whole run.
        let sb2 = JournalSuperblock { version: JOURNAL_FORMAT_V2, ..sb };
        nix::sys::uio::pwrite(&j.appender, &sb2.encode(), 0).unwrap();
        let v2 = JournalHeader::from_record(&write(3)).encode(JournalKey::v2(7));
        nix::sys::uio::pwrite(&j.appender, &v2, positions[2] as i64).unwrap();
        let mut j = Journal::open(&engine, &path, CAPACITY, "g", 7, 2, false).await.unwrap();
        assert!(j.legacy);
        let r = j.recover(2, positions[1], Stop::Unclean).await.unwrap();
        assert_eq!((r.last_seq, r.discarded.len()), (5, 0));
        assert!(!j.legacy);
    }

    #[tokio::test]
    async fn a_trim_larger_than_the_payload_limit_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, pos) = journal_with(dir.path(), 1).await;
        let trim = Record::without_payload(RecordOp::Trim, 2, 0, 0, 128 << 20, 1, false);
        j.append_at(pos[0] + record_span(4096), &trim).unwrap();
        let w = write(3);
        j.append_at(pos[0] + record_span(4096) + record_span(0), &w).unwrap();
        let r = j.recover(1, JOURNAL_SUPERBLOCK_LEN, Stop::Unclean).await.unwrap();
        assert_eq!(r.last_seq, 3);
        let (p, _) = r.ring.lookup(2).unwrap();
        assert_eq!(j.read_record(p, 2).await.unwrap(), trim);
    }

    /// Dirty page-cache pages of `file` in `off..off + len`
    /// (`cachestat(2)`, Linux 6.5); `None` where the kernel does not offer
    /// it.
    fn dirty_pages(file: &std::fs::File, off: u64, len: u64) -> Option<u64> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        // x86_64's and aarch64's number (the tables were unified before it
        // was added); not in the libc crate for x86_64 yet.
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { off, len };
        let mut stat = Stat::default();
        // SAFETY: cachestat reads one `Range` and writes one `Stat` (both
        // laid out as the kernel's structs), alive for the call; the
        // descriptor belongs to `file`, open for the call.
        let rc = unsafe {
            libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range as *const Range, &mut stat as *mut Stat, 0)
        };
        (rc == 0).then_some(stat.nr_dirty)
    }

    /// Appends start writing the journal back two windows behind the
    /// newest one (see `write_behind.rs`).
    #[tokio::test]
    async fn appends_write_the_journal_back_behind_them() {
        use crate::write_behind::WINDOW;
        let dir = tempfile::tempdir().unwrap();
        let engine = IoEngine::new(BackendChoice::Auto);
        let j = Journal::open(&engine, &dir.path().join("journal"), 12 * WINDOW, "g", 7, 1, true).await.unwrap();
        let mut ring = JournalRing::new(j.capacity());
        let mut seq = 0;
        // Into the eighth window.
        while ring.head() < 7 * WINDOW + 4096 {
            seq += 1;
            let rec = write(seq);
            let pos = ring.reserve(seq, record_span(rec.payload.len() as u64)).unwrap();
            j.append_at(pos, &rec).unwrap();
        }
        let behind = 6 * WINDOW;
        // What cachestat sees of the newest appends: none dirty on a kernel
        // without it, a filesystem without writeback (tmpfs), or when the
        // kernel's flusher took them already.
        match dirty_pages(&j.appender, behind, 2 * WINDOW) {
            Some(n) if n > 0 => {}
            seen => {
                eprintln!(
                    "skipped: cachestat saw {seen:?} dirty pages at the journal's head in {}",
                    dir.path().display()
                );
                return;
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let dirty = dirty_pages(&j.appender, 0, behind).unwrap();
            if dirty == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{dirty} pages of the first {behind} bytes still dirty 10 s after the appends"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
