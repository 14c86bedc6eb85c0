//! On-disk journal layout: pure encoding/decoding and the accounting of the
//! journal ring. The daemon does the I/O.
//!
//! The journal is a preallocated file:
//!
//! ```text
//! 0                 4096                                         capacity
//! | superblock      | ring of records ...                              |
//! ```
//!
//! A record is a [`JOURNAL_HEADER_LEN`]-byte header followed by its payload,
//! the whole span padded up to a multiple of [`JOURNAL_RECORD_ALIGN`]
//! ([`record_span`]; the padding is never read, and is zeroes where it is
//! written). A large record (a payload of
//! [`PAGE_ALIGNED_PAYLOAD`] or more, flagged in its header) has zeroes
//! after its header up to the next [`JOURNAL_PAGE`] boundary of the file, and
//! its payload from there ([`JournalHeader::payload_pos`]): the payload's
//! whole pages are then exactly the pages of the buffer it arrived in, and go
//! to the disk from that buffer with `O_DIRECT`, never copied (the daemon's
//! journal). Such a record spans one page more than its payload, rounded up
//! to [`JOURNAL_RECORD_ALIGN`], wherever it lies. Records written before this
//! layout (no flag: the payload right after the header) are read as they
//! are; a build older than it refuses a journal holding flagged records
//! (unknown record flags) instead of misreading them. A record never straddles the
//! end of the ring: if it does not fit in the space left before the end, it is
//! written at the ring start and the tail space is skipped
//! ([`ring_placement`]).
//!
//! Recovery scans forward from a known `(position, seq)`: read the header at
//! the position; if it is not a valid header for the expected seq, look at the
//! ring start instead (the record may have wrapped; the one found there is
//! only genuine if its span did not fit before the end, see
//! [`ring_placement`]); if neither is valid, the scan ends. Stale records from
//! earlier laps carry lower seqs, and a torn write fails the header or payload
//! CRC, so the scan stops exactly after the last intact record.
//!
//! Record header checksums are keyed with the pair id and the epoch
//! ([`JournalKey`]): sequence numbers are reused across epochs (after a power
//! cut the primary continues with `last + 1` in a new epoch, and the secondary
//! rebases on it), so a record the lost epoch left on disk beyond the new head
//! can carry exactly the seq the scan expects next; under the new epoch's key
//! it is not a header at all.
//!
//! # Format versions
//!
//! The superblock's version is [`JOURNAL_FORMAT_VERSION`] (3: headers keyed
//! with pair id and epoch). A journal of version [`JOURNAL_FORMAT_V2`],
//! written by an older build (headers keyed with the pair id alone), is still
//! decoded, so an upgrade never strands acknowledged records: the daemon
//! recovers its run once with the version 2 key (exactly as the older build
//! would), rewrites the retained headers with the version 3 key, syncs, and
//! only then writes a version 3 superblock; nothing is appended before. Other
//! versions are refused.
//!
//! All integers are little-endian.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::record::{check_range, crc32, Record, RecordError, RecordOp};

/// Size of the superblock at offset 0; the ring starts right after it.
pub const JOURNAL_SUPERBLOCK_LEN: u64 = 4096;
/// Size of a record header.
pub const JOURNAL_HEADER_LEN: usize = 64;
/// Records start and end on multiples of this.
pub const JOURNAL_RECORD_ALIGN: u64 = 512;
/// The page a large record's payload is aligned to in the file.
pub const JOURNAL_PAGE: u64 = 4096;
/// Records with at least this much payload are laid out page-aligned (module
/// doc).
pub const PAGE_ALIGNED_PAYLOAD: u64 = 64 << 10;
/// At most this many records may be reserved beyond the contiguous run of
/// records already in the journal (the write path waits otherwise): bounds
/// the appends in flight, and so the records after a missing one that an
/// unclean stop can leave (recovery discards them).
pub const MAX_APPEND_WINDOW: u64 = 1024;
/// Longest group name a superblock can hold, in bytes.
pub const JOURNAL_MAX_GROUP_LEN: usize = 200;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"RPLJRNL1";
/// The journal format this build writes: record header checksums are keyed
/// with the pair id, salted per use of the file, and the epoch
/// ([`JournalKey::new`] of `pair_id ^ salt`). The salt (superblock) is new
/// each time the file starts over for a new pair or epoch, so that records
/// of its earlier uses never verify, even under the same pair id and epoch.
pub const JOURNAL_FORMAT_VERSION: u32 = 4;
/// The format before the salt (its superblocks read as salt 0): read and
/// appended to as it is; rewritten as version 4 when the file starts over.
pub const JOURNAL_FORMAT_V3: u32 = 3;
/// The format of older builds: record header checksums are keyed with the
/// pair id alone ([`JournalKey::v2`]). Read once and upgraded (module doc).
pub const JOURNAL_FORMAT_V2: u32 = 2;
const HEADER_MAGIC: &[u8; 4] = b"RPJR";
const FLAG_FUA: u8 = 1;
/// The payload starts on the first [`JOURNAL_PAGE`] boundary after the
/// header (module doc).
const FLAG_PAGE_ALIGNED: u8 = 2;

/// Errors decoding journal structures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalFormatError {
    /// The magic number is wrong: not a journal (or not a record header).
    #[error("bad magic number (not a replicator journal structure)")]
    BadMagic,
    /// The checksum of a superblock or record header does not match (torn or
    /// corrupted write).
    #[error("checksum mismatch (torn or corrupted write)")]
    BadCrc,
    /// The buffer is shorter than the structure.
    #[error("buffer too short for the structure")]
    Truncated,
    /// The record header names an unknown operation.
    #[error("unknown record operation {0}")]
    UnknownOp(u8),
    /// A structure passed its checksum but its contents are inconsistent, or a
    /// payload does not match its header.
    #[error("corrupt journal: {0}")]
    Corrupt(String),
    /// A record header passed its checksum, so it is what was written, but
    /// describes a record this build does not accept (see
    /// [`check_range`]). Recovery must never read this as "end of the log".
    #[error("journal record this build cannot accept: {0}")]
    Unacceptable(RecordError),
}

/// Bytes a record with `payload_len` bytes of payload occupies in the ring
/// as this build writes it: header plus payload (one page plus payload for a
/// page-aligned one), rounded up to [`JOURNAL_RECORD_ALIGN`] (saturating at
/// the largest multiple of it).
pub fn record_span(payload_len: u64) -> u64 {
    span_of(payload_len, is_page_aligned(payload_len))
}

/// Whether this build lays out a record with `payload_len` bytes of payload
/// page-aligned.
pub fn is_page_aligned(payload_len: u64) -> bool {
    payload_len >= PAGE_ALIGNED_PAYLOAD
}

fn span_of(payload_len: u64, page_aligned: bool) -> u64 {
    let lead = if page_aligned { JOURNAL_PAGE } else { JOURNAL_HEADER_LEN as u64 };
    let raw = payload_len.saturating_add(lead);
    raw.div_ceil(JOURNAL_RECORD_ALIGN)
        .checked_mul(JOURNAL_RECORD_ALIGN)
        .unwrap_or(u64::MAX - u64::MAX % JOURNAL_RECORD_ALIGN)
}

/// Where a record of `span` bytes goes when the write head is at `head` in a
/// journal file of `capacity` bytes: at `head` if it fits before the end,
/// otherwise at the ring start. `None` if the span is zero or larger than the
/// whole ring. (This ignores retained records; see [`JournalRing::reserve`].)
pub fn ring_placement(head: u64, span: u64, capacity: u64) -> Option<u64> {
    let start = JOURNAL_SUPERBLOCK_LEN;
    let end = capacity.max(start);
    if span == 0 || span > end - start {
        return None;
    }
    if head >= start && head.checked_add(span).is_some_and(|e| e <= end) {
        Some(head)
    } else {
        Some(start)
    }
}

/// What a record header's checksum is keyed with: the pair id and the
/// epoch the record was written in (format version 3), or, to read a journal
/// of an older build, the pair id alone (version 2).
///
/// The pair id makes a header valid only in the journal of its pair, so a
/// client cannot forge one inside the data it writes (which recovery scans
/// after an unclean stop). The epoch makes a header of an earlier epoch
/// invalid in a later one: sequence numbers restart at `last + 1` after a
/// power cut, and a record of the lost epoch left beyond the new head would
/// otherwise pass for the next one.
///
/// The epoch is part of the key rather than a header field checked after
/// the CRC: a stale header then fails the very check a torn or foreign one
/// fails, in every reader (the recovery walk, the scan for records beyond
/// the run, reads for shipping), with no extra comparison to forget, and the
/// layout stays as it was. The key goes into the CRC before the header bytes
/// (pair id, then epoch, little-endian); two epochs that differ only in
/// their low 32 bits differ in a burst of at most 32 bits of the checked
/// stream, which CRC32 always detects: a header of another epoch is never
/// accepted, not merely with probability 1 - 2^-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalKey {
    pair_id: u64,
    /// `None`: format version 2.
    epoch: Option<u64>,
}

impl JournalKey {
    /// The key of records written in `epoch` of pair `pair_id` (format
    /// version 3).
    pub const fn new(pair_id: u64, epoch: u64) -> Self {
        JournalKey { pair_id, epoch: Some(epoch) }
    }

    /// The key of records in a format version 2 journal of pair `pair_id`
    /// (only for reading one; see the module doc).
    pub const fn v2(pair_id: u64) -> Self {
        JournalKey { pair_id, epoch: None }
    }

    /// CRC32 of the key followed by `data`.
    fn crc(&self, data: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.pair_id.to_le_bytes());
        if let Some(epoch) = self.epoch {
            h.update(&epoch.to_le_bytes());
        }
        h.update(data);
        h.finalize()
    }
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The journal file's superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSuperblock {
    /// Group the journal belongs to (at most [`JOURNAL_MAX_GROUP_LEN`] bytes).
    pub group: String,
    /// Journal file size in bytes.
    pub capacity: u64,
    /// Pair id chosen at pair create.
    pub pair_id: u64,
    /// Format version: [`JOURNAL_FORMAT_VERSION`], or [`JOURNAL_FORMAT_V3`]
    /// or [`JOURNAL_FORMAT_V2`] for a journal of an older build.
    pub version: u32,
    /// Mixed into the pair id of every record key (0 before version 4).
    pub salt: u64,
}

// Superblock layout: magic[0..8] version[8..12] group_len[12..16]
// capacity[16..24] pair_id[24..32] group[32..232] salt[232..240] zero...
// crc32[4092..4096] over bytes [0..4092).
const SB_GROUP_AT: usize = 32;
const SB_SALT_AT: usize = 232;
const SB_CRC_AT: usize = JOURNAL_SUPERBLOCK_LEN as usize - 4;

impl JournalSuperblock {
    /// Encodes into exactly [`JOURNAL_SUPERBLOCK_LEN`] bytes. A group name
    /// longer than [`JOURNAL_MAX_GROUP_LEN`] bytes is truncated at a
    /// character boundary (the daemon's configuration should forbid such
    /// names).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; JOURNAL_SUPERBLOCK_LEN as usize];
        let mut glen = self.group.len().min(JOURNAL_MAX_GROUP_LEN);
        while !self.group.is_char_boundary(glen) {
            glen -= 1;
        }
        buf[0..8].copy_from_slice(SUPERBLOCK_MAGIC);
        buf[8..12].copy_from_slice(&self.version.to_le_bytes());
        buf[12..16].copy_from_slice(&(glen as u32).to_le_bytes());
        buf[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        buf[24..32].copy_from_slice(&self.pair_id.to_le_bytes());
        buf[SB_GROUP_AT..SB_GROUP_AT + glen].copy_from_slice(&self.group.as_bytes()[..glen]);
        buf[SB_SALT_AT..SB_SALT_AT + 8].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32(&buf[..SB_CRC_AT]);
        buf[SB_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes and validates a superblock (the first
    /// [`JOURNAL_SUPERBLOCK_LEN`] bytes of `buf`).
    pub fn decode(buf: &[u8]) -> Result<Self, JournalFormatError> {
        let buf = buf.get(..JOURNAL_SUPERBLOCK_LEN as usize).ok_or(JournalFormatError::Truncated)?;
        if &buf[0..8] != SUPERBLOCK_MAGIC {
            return Err(JournalFormatError::BadMagic);
        }
        if crc32(&buf[..SB_CRC_AT]) != get_u32(buf, SB_CRC_AT) {
            return Err(JournalFormatError::BadCrc);
        }
        let version = get_u32(buf, 8);
        if ![JOURNAL_FORMAT_V2, JOURNAL_FORMAT_V3, JOURNAL_FORMAT_VERSION].contains(&version) {
            return Err(JournalFormatError::Corrupt(format!(
                "unsupported journal format version {version} (this build reads versions {JOURNAL_FORMAT_V2} to \
                 {JOURNAL_FORMAT_VERSION})"
            )));
        }
        let glen = get_u32(buf, 12) as usize;
        if glen > JOURNAL_MAX_GROUP_LEN {
            return Err(JournalFormatError::Corrupt(format!(
                "group name length {glen} exceeds {JOURNAL_MAX_GROUP_LEN} bytes"
            )));
        }
        let group = std::str::from_utf8(&buf[SB_GROUP_AT..SB_GROUP_AT + glen])
            .map_err(|_| JournalFormatError::Corrupt("group name is not UTF-8".into()))?
            .to_owned();
        let capacity = get_u64(buf, 16);
        if capacity <= JOURNAL_SUPERBLOCK_LEN {
            return Err(JournalFormatError::Corrupt(format!(
                "capacity {capacity} leaves no room for records after the {JOURNAL_SUPERBLOCK_LEN}-byte superblock"
            )));
        }
        Ok(JournalSuperblock { group, capacity, pair_id: get_u64(buf, 24), version, salt: get_u64(buf, SB_SALT_AT) })
    }
}

/// The header in front of every journaled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalHeader {
    /// Group sequence.
    pub seq: u64,
    /// Generation of the primary that wrote it.
    pub generation: u64,
    /// Volume index.
    pub volume: u32,
    /// Operation.
    pub op: RecordOp,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length of the affected range.
    pub length: u32,
    /// CRC32 of the payload.
    pub payload_crc: u32,
    /// Force unit access.
    pub fua: bool,
    /// The primary's time of the write (see [`Record::written_at_us`]).
    pub written_at_us: u64,
    /// The payload starts on the first page boundary after the header
    /// ([`JournalHeader::payload_pos`]).
    pub page_aligned: bool,
}

// Header layout: magic[0..4] seq[4..12] generation[12..20] offset[20..28]
// volume[28..32] length[32..36] payload_crc[36..40] op[40] flags[41]
// reserved zero[42..44] written_at_us[44..52] reserved zero[52..60]
// crc32[60..64] over bytes [0..60).
const H_CRC_AT: usize = JOURNAL_HEADER_LEN - 4;

fn op_code(op: RecordOp) -> u8 {
    match op {
        RecordOp::Write => 1,
        RecordOp::WriteZeroes => 2,
        RecordOp::Trim => 3,
        RecordOp::Copy => 4,
        RecordOp::CopyHash => 5,
    }
}

fn op_from_code(code: u8) -> Option<RecordOp> {
    match code {
        1 => Some(RecordOp::Write),
        2 => Some(RecordOp::WriteZeroes),
        3 => Some(RecordOp::Trim),
        4 => Some(RecordOp::Copy),
        5 => Some(RecordOp::CopyHash),
        _ => None,
    }
}

impl JournalHeader {
    /// The header describing `r`.
    pub fn from_record(r: &Record) -> Self {
        JournalHeader {
            seq: r.seq,
            generation: r.generation,
            volume: r.volume,
            op: r.op,
            offset: r.offset,
            length: r.length,
            payload_crc: r.crc32,
            fua: r.fua,
            written_at_us: r.written_at_us,
            page_aligned: r.op.has_payload() && is_page_aligned(r.payload.len() as u64),
        }
    }

    /// Encodes the header (magic, fields, CRC32 of `key` and the preceding
    /// bytes): it is only valid in the journal of its pair and epoch (see
    /// [`JournalKey`]).
    pub fn encode(&self, key: JournalKey) -> [u8; JOURNAL_HEADER_LEN] {
        let mut b = [0u8; JOURNAL_HEADER_LEN];
        b[0..4].copy_from_slice(HEADER_MAGIC);
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..20].copy_from_slice(&self.generation.to_le_bytes());
        b[20..28].copy_from_slice(&self.offset.to_le_bytes());
        b[28..32].copy_from_slice(&self.volume.to_le_bytes());
        b[32..36].copy_from_slice(&self.length.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[40] = op_code(self.op);
        let fua = if self.fua { FLAG_FUA } else { 0 };
        let page_aligned = if self.page_aligned { FLAG_PAGE_ALIGNED } else { 0 };
        b[41] = fua | page_aligned;
        b[44..52].copy_from_slice(&self.written_at_us.to_le_bytes());
        let crc = key.crc(&b[..H_CRC_AT]);
        b[H_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header from the first [`JOURNAL_HEADER_LEN`] bytes of
    /// `buf`, checking magic, header CRC (keyed with `key`), op, flags and
    /// the range.
    pub fn decode(buf: &[u8], key: JournalKey) -> Result<Self, JournalFormatError> {
        let b = buf.get(..JOURNAL_HEADER_LEN).ok_or(JournalFormatError::Truncated)?;
        if &b[0..4] != HEADER_MAGIC {
            return Err(JournalFormatError::BadMagic);
        }
        if key.crc(&b[..H_CRC_AT]) != get_u32(b, H_CRC_AT) {
            return Err(JournalFormatError::BadCrc);
        }
        let op = op_from_code(b[40]).ok_or(JournalFormatError::UnknownOp(b[40]))?;
        let flags = b[41];
        if flags & !(FLAG_FUA | FLAG_PAGE_ALIGNED) != 0 {
            return Err(JournalFormatError::Corrupt(format!("unknown record flags {flags:#04x}")));
        }
        if flags & FLAG_PAGE_ALIGNED != 0 && !op.has_payload() {
            return Err(JournalFormatError::Corrupt(format!("a {op:?} record without payload flagged page-aligned")));
        }
        let h = JournalHeader {
            seq: get_u64(b, 4),
            generation: get_u64(b, 12),
            offset: get_u64(b, 20),
            volume: get_u32(b, 28),
            length: get_u32(b, 32),
            payload_crc: get_u32(b, 36),
            op,
            fua: flags & FLAG_FUA != 0,
            written_at_us: get_u64(b, 44),
            page_aligned: flags & FLAG_PAGE_ALIGNED != 0,
        };
        check_range(h.seq, h.op, h.offset, h.length).map_err(JournalFormatError::Unacceptable)?;
        Ok(h)
    }

    /// The sequence number of a header whose magic and checksum are valid,
    /// even if its contents are not acceptable (so it was written by a
    /// replicator in this pair and epoch, and its seq is genuine); `None` if
    /// it is not a header under `key`.
    pub fn peek_seq(buf: &[u8], key: JournalKey) -> Option<u64> {
        let b = buf.get(..JOURNAL_HEADER_LEN)?;
        (&b[0..4] == HEADER_MAGIC && key.crc(&b[..H_CRC_AT]) == get_u32(b, H_CRC_AT)).then(|| get_u64(b, 4))
    }

    /// Payload bytes following the header: `length` for Write and Copy, 0
    /// otherwise.
    pub fn payload_len(&self) -> u64 {
        if self.op.has_payload() {
            u64::from(self.length)
        } else {
            0
        }
    }

    /// Bytes the whole record occupies in the ring.
    pub fn span(&self) -> u64 {
        span_of(self.payload_len(), self.page_aligned)
    }

    /// Where the payload of this record starts when the record is at `pos`:
    /// right after the header, or on the first page boundary after it.
    pub fn payload_pos(&self, pos: u64) -> u64 {
        let after_header = pos.saturating_add(JOURNAL_HEADER_LEN as u64);
        match self.page_aligned {
            true => after_header.div_ceil(JOURNAL_PAGE).saturating_mul(JOURNAL_PAGE),
            false => after_header,
        }
    }

    /// Rebuilds the record from this header and its payload, verifying the
    /// payload's size and CRC.
    pub fn into_record(self, payload: Bytes) -> Result<Record, JournalFormatError> {
        if payload.len() as u64 != self.payload_len() {
            return Err(JournalFormatError::Corrupt(format!(
                "record {}: payload of {} bytes, header says {}",
                self.seq,
                payload.len(),
                self.payload_len()
            )));
        }
        let actual = crc32(&payload);
        if actual != self.payload_crc {
            return Err(JournalFormatError::Corrupt(format!(
                "record {}: payload CRC32 {actual:#010x} does not match the header's {:#010x} (torn write?)",
                self.seq, self.payload_crc
            )));
        }
        Ok(Record {
            seq: self.seq,
            volume: self.volume,
            op: self.op,
            offset: self.offset,
            length: self.length,
            generation: self.generation,
            crc32: self.payload_crc,
            fua: self.fua,
            copy_index: 0,
            hash_span: 0,
            written_at_us: self.written_at_us,
            payload,
        })
    }
}

/// Encodes `r` as it is laid out in the ring at `pos`: header, zeroes up
/// to the payload, payload, zero padding; exactly `record_span(payload
/// length)` bytes.
pub fn encode_journal_record(r: &Record, pos: u64, key: JournalKey) -> Vec<u8> {
    let header = JournalHeader::from_record(r);
    let span = header.span() as usize;
    let mut out = Vec::with_capacity(span);
    out.extend_from_slice(&header.encode(key));
    out.resize((header.payload_pos(pos) - pos) as usize, 0);
    out.extend_from_slice(&r.payload);
    out.resize(span, 0);
    out
}

/// Decodes a record laid out as by [`encode_journal_record`] at `pos` from
/// the start of `buf` (which may be longer).
pub fn decode_journal_record(buf: &[u8], pos: u64, key: JournalKey) -> Result<Record, JournalFormatError> {
    let h = JournalHeader::decode(buf, key)?;
    let at = (h.payload_pos(pos) - pos) as usize;
    let len = h.payload_len() as usize;
    let payload = buf.get(at..at + len).ok_or(JournalFormatError::Truncated)?;
    h.into_record(Bytes::copy_from_slice(payload))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RingEntry {
    seq: u64,
    pos: u64,
    span: u64,
}

/// Space accounting of the journal ring. Positions are absolute file offsets;
/// the ring is `[JOURNAL_SUPERBLOCK_LEN, capacity)`.
///
/// Records are retained from the oldest (the tail) to the newest; the next
/// one goes at the head (or at the ring start when it does not fit before the
/// end, see [`ring_placement`]). Space is freed only from the tail, by
/// [`release_through`](Self::release_through).
#[derive(Debug, Clone)]
pub struct JournalRing {
    end: u64,
    head: u64,
    entries: VecDeque<RingEntry>,
    last_seq: Option<u64>,
}

impl JournalRing {
    /// An empty ring over a journal file of `capacity` bytes, head at the
    /// ring start.
    pub fn new(capacity: u64) -> Self {
        JournalRing {
            end: capacity.max(JOURNAL_SUPERBLOCK_LEN),
            head: JOURNAL_SUPERBLOCK_LEN,
            entries: VecDeque::new(),
            last_seq: None,
        }
    }

    /// Reserves `span` bytes for record `seq` and returns its position, or
    /// `None` when it does not fit without overwriting retained records (the
    /// journal is full), when `span` is zero or larger than the ring, or when
    /// `seq` is not above the last reserved seq.
    pub fn reserve(&mut self, seq: u64, span: u64) -> Option<u64> {
        if self.last_seq.is_some_and(|last| seq <= last) {
            return None;
        }
        let pos = ring_placement(self.head, span, self.end)?;
        if let Some(tail) = self.entries.front().map(|e| e.pos) {
            let fits = if self.head > tail {
                // Retained: [tail, head). Free: [head, end) and [start, tail).
                pos == self.head || pos + span <= tail
            } else {
                // Retained: [tail, end) and [start, head). Free: [head, tail).
                pos == self.head && pos + span <= tail
            };
            if !fits {
                return None;
            }
        }
        self.entries.push_back(RingEntry { seq, pos, span });
        self.head = pos + span;
        self.last_seq = Some(seq);
        Some(pos)
    }

    /// Whether a record of `span` bytes would fit right now.
    pub fn would_fit(&self, span: u64) -> bool {
        let mut probe = JournalRing {
            end: self.end,
            head: self.head,
            entries: self.entries.iter().take(1).copied().collect(),
            last_seq: None,
        };
        probe.reserve(0, span).is_some()
    }

    /// Frees every record with seq <= `seq`.
    pub fn release_through(&mut self, seq: u64) {
        while self.entries.front().is_some_and(|e| e.seq <= seq) {
            self.entries.pop_front();
        }
    }

    /// Position and span of retained record `seq`.
    pub fn lookup(&self, seq: u64) -> Option<(u64, u64)> {
        let i = self.entries.binary_search_by_key(&seq, |e| e.seq).ok()?;
        self.entries.get(i).map(|e| (e.pos, e.span))
    }

    /// Oldest retained seq.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.entries.front().map(|e| e.seq)
    }

    /// Newest retained seq.
    pub fn newest_seq(&self) -> Option<u64> {
        self.entries.back().map(|e| e.seq)
    }

    /// Position of the oldest retained record (where recovery would start).
    pub fn oldest_position(&self) -> Option<u64> {
        self.entries.front().map(|e| e.pos)
    }

    /// Bytes held by retained records, including padding and space skipped
    /// at the ring end by a wrap.
    pub fn used_bytes(&self) -> u64 {
        let Some(tail) = self.entries.front().map(|e| e.pos) else {
            return 0;
        };
        if self.head > tail {
            self.head - tail
        } else {
            (self.end - tail) + (self.head - JOURNAL_SUPERBLOCK_LEN)
        }
    }

    /// Size of the ring (file capacity minus the superblock).
    pub fn capacity_bytes(&self) -> u64 {
        self.end - JOURNAL_SUPERBLOCK_LEN
    }

    /// Number of retained records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Empties the ring and puts the write head at `head` (after recovery:
    /// the end of the last valid record). A head outside the ring is moved to
    /// the ring start.
    pub fn reset_at(&mut self, head: u64) {
        self.entries.clear();
        self.last_seq = None;
        self.head = if (JOURNAL_SUPERBLOCK_LEN..=self.end).contains(&head) { head } else { JOURNAL_SUPERBLOCK_LEN };
    }

    /// Next write position, before the wrap decision.
    pub fn head(&self) -> u64 {
        self.head
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::record::MAX_SEQ;
    use proptest::prelude::*;

    /// The key (pair id and epoch) header checksums are made with.
    const K: JournalKey = JournalKey::new(0x5eed_f00d, 3);

    #[test]
    fn spans() {
        assert_eq!(record_span(0), 512);
        assert_eq!(record_span(448), 512);
        assert_eq!(record_span(449), 1024);
        assert_eq!(record_span(4096), 4608);
        assert_eq!(record_span(u64::MAX) % 512, 0);
        // Page-aligned from 64 KiB of payload: one page more, wherever the
        // record lies.
        assert_eq!(record_span(PAGE_ALIGNED_PAYLOAD - 1), PAGE_ALIGNED_PAYLOAD + 512);
        assert_eq!(record_span(PAGE_ALIGNED_PAYLOAD), PAGE_ALIGNED_PAYLOAD + 4096);
        assert_eq!(record_span(1 << 20), (1 << 20) + 4096);
        let large = Record::with_payload(RecordOp::Write, 1, 0, 0, 1, Bytes::from(vec![7u8; 1 << 20]), false);
        let h = JournalHeader::from_record(&large);
        assert!(h.page_aligned);
        for (pos, payload) in [(4096, 8192), (4608, 8192), (8192 - 512, 8192), (8192, 12288)] {
            assert_eq!(h.payload_pos(pos), payload, "record at {pos}");
            assert!(h.payload_pos(pos) + (1 << 20) <= pos + h.span());
        }
        let small = JournalHeader::from_record(&write_of(4096));
        assert!(!small.page_aligned);
        assert_eq!(small.payload_pos(4608), 4608 + 64);
    }

    fn write_of(len: usize) -> Record {
        Record::with_payload(RecordOp::Write, 1, 0, 0, 1, Bytes::from(vec![7u8; len]), false)
    }

    /// A header flagged page-aligned must carry a payload; flags this build
    /// does not know are refused (what an older build does with the
    /// page-aligned flag: it refuses the journal rather than misread it).
    #[test]
    fn record_flags() {
        let mut enc = JournalHeader::from_record(&write_of(PAGE_ALIGNED_PAYLOAD as usize)).encode(K);
        assert_eq!(enc[41], FLAG_PAGE_ALIGNED);
        let trim = Record::without_payload(RecordOp::Trim, 1, 0, 0, 1 << 20, 1, false);
        let h = JournalHeader { page_aligned: true, ..JournalHeader::from_record(&trim) };
        assert!(matches!(JournalHeader::decode(&h.encode(K), K), Err(JournalFormatError::Corrupt(_))));
        enc[41] |= 4;
        let crc = K.crc(&enc[..H_CRC_AT]);
        enc[H_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(JournalHeader::decode(&enc, K), Err(JournalFormatError::Corrupt(_))));
    }

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = JournalSuperblock {
            group: "db-é".into(),
            capacity: 1 << 30,
            pair_id: 0xfeed,
            version: JOURNAL_FORMAT_VERSION,
            salt: 0x5a17_5a17_5a17_5a17,
        };
        let buf = sb.encode();
        assert_eq!(buf.len(), 4096);
        assert_eq!(JournalSuperblock::decode(&buf).unwrap(), sb);
        assert_eq!(JournalSuperblock::decode(&buf[..4095]), Err(JournalFormatError::Truncated));
        for i in [0usize, 9, 13, 20, 30, 33, 233, 2000, 4095] {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            assert!(JournalSuperblock::decode(&b).is_err(), "flip at {i} undetected");
        }
        let mut b = buf.clone();
        b[0] = b'X';
        assert_eq!(JournalSuperblock::decode(&b), Err(JournalFormatError::BadMagic));
        // Long names are truncated on a char boundary.
        let long = JournalSuperblock {
            group: "é".repeat(150),
            capacity: 8192,
            pair_id: 1,
            version: JOURNAL_FORMAT_VERSION,
            salt: 0,
        };
        let back = JournalSuperblock::decode(&long.encode()).unwrap();
        assert_eq!(back.group, "é".repeat(100));
        // Too small a capacity is corrupt.
        let small = JournalSuperblock {
            group: "g".into(),
            capacity: 4096,
            pair_id: 1,
            version: JOURNAL_FORMAT_VERSION,
            salt: 0,
        };
        assert!(matches!(JournalSuperblock::decode(&small.encode()), Err(JournalFormatError::Corrupt(_))));
    }

    #[test]
    fn superblock_versions() {
        // An older build's journal (version 2) decodes, so it can be
        // upgraded; versions this build never wrote are refused.
        let v2 =
            JournalSuperblock { group: "g".into(), capacity: 1 << 20, pair_id: 9, version: JOURNAL_FORMAT_V2, salt: 0 };
        assert_eq!(JournalSuperblock::decode(&v2.encode()), Ok(v2.clone()));
        let v3 = JournalSuperblock { version: JOURNAL_FORMAT_V3, ..v2.clone() };
        assert_eq!(JournalSuperblock::decode(&v3.encode()), Ok(v3));
        for version in [0, 1, JOURNAL_FORMAT_VERSION + 1, u32::MAX] {
            let sb = JournalSuperblock { version, ..v2.clone() };
            match JournalSuperblock::decode(&sb.encode()) {
                Err(JournalFormatError::Corrupt(msg)) => assert!(msg.contains("unsupported journal format version")),
                other => panic!("version {version}: {other:?}"),
            }
        }
    }

    /// Records of every size class: mostly small, some page-aligned.
    fn arb_record() -> impl Strategy<Value = Record> {
        let len = prop_oneof![4 => 1u32..3000, 1 => 60_000u32..140_000];
        (0..=MAX_SEQ, any::<u32>(), 0..4usize, 0..u64::MAX / 2, len, any::<u64>(), any::<bool>()).prop_map(
            |(seq, vol, op, off, len, gen, fua)| {
                let op = [RecordOp::Write, RecordOp::WriteZeroes, RecordOp::Trim, RecordOp::Copy][op];
                if op.has_payload() {
                    let p: Vec<u8> = (0..len).map(|i| (i as u8) ^ (seq as u8)).collect();
                    Record::with_payload(op, seq, vol, off, gen, Bytes::from(p), fua)
                } else {
                    Record::without_payload(op, seq, vol, off, len, gen, fua)
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn header_round_trip(r in arb_record(), block in 8u64..100_000) {
            let pos = block * JOURNAL_RECORD_ALIGN;
            let h = JournalHeader::from_record(&r);
            let enc = h.encode(K);
            let back = JournalHeader::decode(&enc, K).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(back.payload_len(), r.payload.len() as u64);
            prop_assert_eq!(back.into_record(r.payload.clone()).unwrap(), r.clone());
            let span = encode_journal_record(&r, pos, K);
            prop_assert_eq!(span.len() as u64, record_span(r.payload.len() as u64));
            prop_assert_eq!(span.len() as u64, JournalHeader::from_record(&r).span());
            let at = JournalHeader::from_record(&r).payload_pos(pos);
            if JournalHeader::from_record(&r).page_aligned {
                prop_assert_eq!(at % JOURNAL_PAGE, 0);
            }
            prop_assert!(at >= pos + JOURNAL_HEADER_LEN as u64 && at + r.payload.len() as u64 <= pos + span.len() as u64);
            prop_assert_eq!(decode_journal_record(&span, pos, K).unwrap(), r);
        }

        #[test]
        fn header_flip_detected(r in arb_record(), i in 0..JOURNAL_HEADER_LEN, x in 1u8..=255) {
            let mut enc = JournalHeader::from_record(&r).encode(K);
            enc[i] ^= x;
            prop_assert!(JournalHeader::decode(&enc, K).is_err());
        }

        #[test]
        fn payload_flip_detected(r in arb_record(), i in any::<prop::sample::Index>(), x in 1u8..=255, block in 8u64..100_000) {
            prop_assume!(r.op.has_payload());
            let pos = block * JOURNAL_RECORD_ALIGN;
            let mut span = encode_journal_record(&r, pos, K);
            let i = (JournalHeader::from_record(&r).payload_pos(pos) - pos) as usize + i.index(r.payload.len());
            span[i] ^= x;
            prop_assert!(matches!(decode_journal_record(&span, pos, K), Err(JournalFormatError::Corrupt(_))));
        }

        /// A header written in one epoch is not a header in any other
        /// epoch, nor in the same epoch of another pair, nor in a version 2
        /// journal (issue 8: sequence numbers restart across epochs).
        #[test]
        fn header_keyed_by_pair_and_epoch(
            r in arb_record(),
            pair in any::<u64>(),
            epoch in 0..u64::from(u32::MAX),
            other in 0..u64::from(u32::MAX),
            other_pair in any::<u64>(),
        ) {
            prop_assume!(epoch != other && pair != other_pair);
            let h = JournalHeader::from_record(&r);
            let enc = h.encode(JournalKey::new(pair, epoch));
            prop_assert_eq!(JournalHeader::decode(&enc, JournalKey::new(pair, epoch)), Ok(h.clone()));
            prop_assert_eq!(JournalHeader::peek_seq(&enc, JournalKey::new(pair, epoch)), Some(r.seq));
            for wrong in [JournalKey::new(pair, other), JournalKey::new(other_pair, epoch), JournalKey::v2(pair)] {
                prop_assert_eq!(JournalHeader::decode(&enc, wrong), Err(JournalFormatError::BadCrc));
                prop_assert_eq!(JournalHeader::peek_seq(&enc, wrong), None);
            }
            // A version 2 header reads back only under the version 2 key.
            let old = h.encode(JournalKey::v2(pair));
            prop_assert_eq!(JournalHeader::decode(&old, JournalKey::v2(pair)), Ok(h));
            prop_assert_eq!(JournalHeader::peek_seq(&old, JournalKey::new(pair, epoch)), None);
        }

        #[test]
        fn header_decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = JournalHeader::decode(&buf, K);
            let _ = JournalSuperblock::decode(&buf);
        }
    }

    #[test]
    fn header_rejects_bad_fields() {
        let r = Record::without_payload(RecordOp::Trim, 1, 0, 0, 512, 1, false);
        let mut h = JournalHeader::from_record(&r);
        h.length = 0;
        assert!(matches!(
            JournalHeader::decode(&h.encode(K), K),
            Err(JournalFormatError::Unacceptable(RecordError::Empty { .. }))
        ));
        let mut h = JournalHeader::from_record(&r);
        h.offset = u64::MAX;
        assert!(matches!(
            JournalHeader::decode(&h.encode(K), K),
            Err(JournalFormatError::Unacceptable(RecordError::Overflow { .. }))
        ));
        // The same limits as the wire: a Trim may cover far more than a
        // payload record, a Write may not.
        let mut h = JournalHeader::from_record(&r);
        h.length = u32::MAX - 4095;
        assert_eq!(JournalHeader::decode(&h.encode(K), K), Ok(h.clone()));
        let big = Record::without_payload(RecordOp::Trim, 1, 0, 0, h.length, 1, false);
        assert_eq!(big.check_shape(), Ok(()));
        h.op = RecordOp::Write;
        let enc = h.encode(K);
        assert!(matches!(
            JournalHeader::decode(&enc, K),
            Err(JournalFormatError::Unacceptable(RecordError::TooLarge { .. }))
        ));
        assert_eq!(JournalHeader::peek_seq(&enc, K), Some(1), "an intact header's seq is readable even when refused");
        // An unknown op with a valid CRC.
        let mut enc = JournalHeader::from_record(&r).encode(K);
        enc[40] = 9;
        let crc = K.crc(&enc[..60]);
        enc[60..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(JournalHeader::decode(&enc, K), Err(JournalFormatError::UnknownOp(9)));
        assert_eq!(JournalHeader::decode(&enc[..63], K), Err(JournalFormatError::Truncated));
        // Trim with a payload handed in.
        let h = JournalHeader::from_record(&r);
        assert!(h.into_record(Bytes::from_static(b"x")).is_err());
    }

    /// A byte-level model of the ring: which bytes each retained record
    /// occupies; a reservation must succeed iff the placement rule puts it on
    /// free bytes.
    #[derive(Debug, Clone)]
    enum RingOp {
        Reserve(u64),
        Release(u8),
        Reset(u64),
    }

    fn arb_ring_op() -> impl Strategy<Value = RingOp> {
        prop_oneof![
            6 => (1u64..12).prop_map(|blocks| RingOp::Reserve(blocks * JOURNAL_RECORD_ALIGN)),
            3 => (0u8..4).prop_map(RingOp::Release),
            1 => (0u64..40).prop_map(|b| RingOp::Reset(JOURNAL_SUPERBLOCK_LEN + b * JOURNAL_RECORD_ALIGN)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn ring_matches_model(
            blocks in 4u64..32,
            odd_tail in prop_oneof![Just(0u64), 1u64..512],
            ops in proptest::collection::vec(arb_ring_op(), 1..120),
        ) {
            let capacity = JOURNAL_SUPERBLOCK_LEN + blocks * JOURNAL_RECORD_ALIGN + odd_tail;
            let mut ring = JournalRing::new(capacity);
            prop_assert_eq!(ring.capacity_bytes(), capacity - JOURNAL_SUPERBLOCK_LEN);
            // Model: retained (seq, pos, span) and the head.
            let mut model: VecDeque<(u64, u64, u64)> = VecDeque::new();
            let mut head = JOURNAL_SUPERBLOCK_LEN;
            let mut next_seq = 1u64;
            for op in ops {
                match op {
                    RingOp::Reserve(span) => {
                        let pos = if head + span <= capacity { head } else { JOURNAL_SUPERBLOCK_LEN };
                        let in_ring = pos + span <= capacity;
                        let overlaps = model.iter().any(|&(_, p, s)| pos < p + s && p < pos + span);
                        // Wrapping skips [head, end): it must not jump over
                        // retained records lying there (they would be
                        // overwritten on the next lap and break the scan).
                        let jumps = pos != head && model.iter().any(|&(_, p, _)| p >= head);
                        let expect = in_ring && !overlaps && !jumps;
                        prop_assert_eq!(ring.would_fit(span), expect);
                        let got = ring.reserve(next_seq, span);
                        if expect {
                            prop_assert_eq!(got, Some(pos));
                            model.push_back((next_seq, pos, span));
                            head = pos + span;
                            next_seq += 1;
                        } else {
                            prop_assert_eq!(got, None);
                        }
                    }
                    RingOp::Release(n) => {
                        let upto = model.get(n as usize).map(|e| e.0).unwrap_or(next_seq);
                        ring.release_through(upto);
                        while model.front().is_some_and(|e| e.0 <= upto) {
                            model.pop_front();
                        }
                    }
                    RingOp::Reset(h) => {
                        ring.reset_at(h);
                        model.clear();
                        head = if h <= capacity { h } else { JOURNAL_SUPERBLOCK_LEN };
                    }
                }
                prop_assert_eq!(ring.len(), model.len());
                prop_assert_eq!(ring.is_empty(), model.is_empty());
                prop_assert_eq!(ring.head(), head);
                prop_assert_eq!(ring.oldest_seq(), model.front().map(|e| e.0));
                prop_assert_eq!(ring.newest_seq(), model.back().map(|e| e.0));
                for &(seq, pos, span) in &model {
                    prop_assert_eq!(ring.lookup(seq), Some((pos, span)));
                }
                // Used bytes: from the oldest record to the head, going round.
                let used = match model.front() {
                    None => 0,
                    Some(&(_, tail, _)) if head > tail => head - tail,
                    Some(&(_, tail, _)) => (capacity - tail) + (head - JOURNAL_SUPERBLOCK_LEN),
                };
                prop_assert_eq!(ring.used_bytes(), used);
                let live: u64 = model.iter().map(|e| e.2).sum();
                prop_assert!(used >= live && used <= ring.capacity_bytes());
            }
        }
    }

    #[test]
    fn ring_wraps_and_fills() {
        // Ring of 8 blocks.
        let cap = JOURNAL_SUPERBLOCK_LEN + 8 * 512;
        let mut r = JournalRing::new(cap);
        assert_eq!(r.reserve(1, 1536), Some(4096));
        assert_eq!(r.reserve(2, 1536), Some(4096 + 1536));
        // 2 blocks left at the end; 3 blocks do not fit and the start is taken.
        assert_eq!(r.reserve(3, 1536), None);
        r.release_through(1);
        // Now it wraps to the start; the skipped 2 blocks count as used.
        assert_eq!(r.reserve(3, 1536), Some(4096));
        assert_eq!(r.used_bytes(), 8 * 512);
        assert_eq!(r.reserve(4, 512), None);
        r.release_through(2);
        assert_eq!(r.used_bytes(), 1536);
        assert_eq!(r.reserve(4, 512 * 5), Some(4096 + 1536));
        assert_eq!(r.used_bytes(), 8 * 512);
        assert_eq!(r.reserve(5, 512), None);
        // Too big for the ring at all.
        let mut e = JournalRing::new(cap);
        assert_eq!(e.reserve(1, 9 * 512), None);
        assert_eq!(e.reserve(1, 0), None);
        assert_eq!(e.reserve(1, 8 * 512), Some(4096));
        // Seqs must increase.
        e.release_through(1);
        assert_eq!(e.reserve(1, 512), None);
        assert_eq!(e.reserve(2, 512), Some(4096));
    }
}
