//! The replicated write record: what the primary journals and ships, and what
//! the secondary validates before applying.

use bytes::Bytes;

use crate::pb;

/// Largest payload of one record (Write and Copy): 32 MiB, the NBD
/// protocol's default maximum request, plus 8 KiB, a 4 KiB block at each
/// end for the read-modify-write that widens an unaligned write to whole
/// blocks (so a client that never asked for block sizes, as Linux's `nbd`
/// driver with its 32 MiB requests, is never refused). This is the one
/// limit on record sizes: the write path, the wire decoder and the journal
/// decoder all check records with [`check_range`]. Records without payload
/// (Trim, WriteZeroes) may cover any `u32` length.
pub const MAX_RECORD_PAYLOAD: u32 = 32 * 1024 * 1024 + 8 * 1024;

/// Largest sequence number a record (or a session's resume point) may
/// carry. 2^63 writes at ten million a second take 29,000 years: a larger
/// one comes from a broken peer or file, and refusing it keeps every
/// `seq + 1` exact.
pub const MAX_SEQ: u64 = 1 << 63;

/// Checks the range of a record: a sequence number at most [`MAX_SEQ`],
/// non-zero length, at most
/// [`MAX_RECORD_PAYLOAD`] for payload-carrying ops, and `offset + length`
/// within 64 bits. Shared by [`Record::check_shape`] (wire) and the journal
/// header decoder, so the two can never disagree about what is valid.
pub fn check_range(seq: u64, op: RecordOp, offset: u64, length: u32) -> Result<(), RecordError> {
    if seq > MAX_SEQ {
        return Err(RecordError::SeqTooLarge { seq });
    }
    if length == 0 {
        return Err(RecordError::Empty { seq });
    }
    if (op.has_payload() || op == RecordOp::CopyHash) && length > MAX_RECORD_PAYLOAD {
        return Err(RecordError::TooLarge { seq, length });
    }
    if offset.checked_add(u64::from(length)).is_none() {
        return Err(RecordError::Overflow { seq });
    }
    Ok(())
}

/// What a record does to its byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordOp {
    /// Write the payload (`length` bytes).
    Write,
    /// Zero the range; no payload.
    WriteZeroes,
    /// Discard the range (the secondary zeroes it); no payload.
    Trim,
    /// Initial copy / resync data (payload of `length` bytes); never journaled.
    Copy,
    /// A copy chunk sent as hashes of its `length` bytes (payload: one
    /// [`COPY_HASH_LEN`]-byte digest per `hash_span` bytes, the last span
    /// possibly shorter): the secondary compares its own region span by
    /// span and reports the spans that differ; never journaled.
    CopyHash,
}

/// Bytes of one digest in a [`RecordOp::CopyHash`] payload (BLAKE3).
pub const COPY_HASH_LEN: usize = 32;

/// Most digests in one [`RecordOp::CopyHash`] record.
pub const MAX_COPY_HASH_DIGESTS: u64 = 4096;

impl RecordOp {
    /// Whether records of this op carry `length` bytes of payload.
    pub fn has_payload(self) -> bool {
        matches!(self, RecordOp::Write | RecordOp::Copy)
    }

    /// Initial copy or resync (data or hash): never journaled, ordered by
    /// `copy_index`.
    pub fn is_copy(self) -> bool {
        matches!(self, RecordOp::Copy | RecordOp::CopyHash)
    }

    /// The wire enum value.
    pub fn to_pb(self) -> pb::Op {
        match self {
            RecordOp::Write => pb::Op::Write,
            RecordOp::WriteZeroes => pb::Op::WriteZeroes,
            RecordOp::Trim => pb::Op::Trim,
            RecordOp::Copy => pb::Op::Copy,
            RecordOp::CopyHash => pb::Op::CopyHash,
        }
    }

    /// Parses a wire enum value (`OP_UNSPECIFIED` and unknown values: `None`).
    pub fn from_pb(op: i32) -> Option<RecordOp> {
        match pb::Op::try_from(op).ok()? {
            pb::Op::Unspecified => None,
            pb::Op::Write => Some(RecordOp::Write),
            pb::Op::WriteZeroes => Some(RecordOp::WriteZeroes),
            pb::Op::Trim => Some(RecordOp::Trim),
            pb::Op::Copy => Some(RecordOp::Copy),
            pb::Op::CopyHash => Some(RecordOp::CopyHash),
        }
    }

    /// Lower-case name for log lines ("write", "write-zeroes", "trim", "copy").
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOp::Write => "write",
            RecordOp::WriteZeroes => "write-zeroes",
            RecordOp::Trim => "trim",
            RecordOp::Copy => "copy",
            RecordOp::CopyHash => "copy-hash",
        }
    }
}

/// One replicated operation on one volume of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Group sequence number. For [`RecordOp::Copy`]: the last write sequence
    /// the copied data reflects.
    pub seq: u64,
    /// Index of the volume in the group's volume list.
    pub volume: u32,
    /// What the record does.
    pub op: RecordOp,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length of the affected range in bytes.
    pub length: u32,
    /// Generation of the primary that produced the record.
    pub generation: u64,
    /// CRC32 (IEEE) of `payload`.
    pub crc32: u32,
    /// Force unit access: make durable before acking past it.
    pub fua: bool,
    /// [`RecordOp::Copy`]: running chunk number within the stream (from 1).
    pub copy_index: u64,
    /// [`RecordOp::CopyHash`]: bytes covered by each digest of the payload
    /// (the last digest may cover fewer); 0 for every other op.
    pub hash_span: u32,
    /// The primary's wall-clock time of the write, in microseconds since
    /// the Unix epoch (0: unknown). Lets the secondary say how old its data
    /// is ("data as of") and a failover name its recovery point in time.
    pub written_at_us: u64,
    /// The data (`length` bytes for Write/Copy, empty otherwise).
    pub payload: Bytes,
}

/// CRC32 (IEEE, as in zlib/Ethernet) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Why a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The payload does not match its checksum.
    #[error("record {seq}: payload CRC32 mismatch (record says {expected:#010x}, payload has {actual:#010x})")]
    CrcMismatch {
        /// Record sequence.
        seq: u64,
        /// CRC carried by the record.
        expected: u32,
        /// CRC of the payload received.
        actual: u32,
    },
    /// The payload size disagrees with the length and op.
    #[error("record {seq}: length {length} does not match a payload of {payload} bytes")]
    LengthMismatch {
        /// Record sequence.
        seq: u64,
        /// Length field.
        length: u32,
        /// Payload bytes present.
        payload: usize,
    },
    /// The op is unspecified or from a newer wire version.
    #[error("record {seq}: unknown operation {op}")]
    UnknownOp {
        /// Record sequence.
        seq: u64,
        /// Raw op value.
        op: i32,
    },
    /// Length above [`MAX_RECORD_PAYLOAD`].
    #[error("record {seq}: length {length} exceeds the {max}-byte record limit", max = MAX_RECORD_PAYLOAD)]
    TooLarge {
        /// Record sequence.
        seq: u64,
        /// Length field.
        length: u32,
    },
    /// Zero-length record.
    #[error("record {seq}: zero length")]
    Empty {
        /// Record sequence.
        seq: u64,
    },
    /// A sequence number beyond [`MAX_SEQ`].
    #[error("record sequence number {seq} is beyond {MAX_SEQ}, which no pair ever reaches")]
    SeqTooLarge {
        /// Record sequence.
        seq: u64,
    },
    /// `offset + length` does not fit in 64 bits.
    #[error("record {seq}: offset + length overflows 64 bits")]
    Overflow {
        /// Record sequence.
        seq: u64,
    },
    /// A hash-only copy chunk whose digest span is zero or yields too many
    /// digests.
    #[error("record {seq}: a copy-hash record of {length} bytes cannot have digests every {span} bytes (0, or more than 4096 digests)")]
    HashSpan {
        /// Record sequence.
        seq: u64,
        /// Record length.
        length: u32,
        /// Its digest span.
        span: u32,
    },
}

impl Record {
    /// A Write or Copy record: `length` is the payload length and the CRC is
    /// computed. `copy_index` is 0; set it for Copy records (or use
    /// [`Record::copy_chunk`]). The payload must not exceed
    /// [`MAX_RECORD_PAYLOAD`] (a larger one makes a record that
    /// [`Record::validate`] rejects).
    pub fn with_payload(
        op: RecordOp,
        seq: u64,
        volume: u32,
        offset: u64,
        generation: u64,
        payload: Bytes,
        fua: bool,
    ) -> Record {
        Record {
            seq,
            volume,
            op,
            offset,
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            generation,
            crc32: crc32(&payload),
            fua,
            copy_index: 0,
            hash_span: 0,
            written_at_us: 0,
            payload,
        }
    }

    /// A WriteZeroes or Trim record: no payload, CRC of the empty payload.
    pub fn without_payload(
        op: RecordOp,
        seq: u64,
        volume: u32,
        offset: u64,
        length: u32,
        generation: u64,
        fua: bool,
    ) -> Record {
        Record {
            seq,
            volume,
            op,
            offset,
            length,
            generation,
            crc32: crc32(&[]),
            fua,
            copy_index: 0,
            hash_span: 0,
            written_at_us: 0,
            payload: Bytes::new(),
        }
    }

    /// A Copy record (initial copy / resync chunk) reflecting every write up
    /// to `seq`.
    pub fn copy_chunk(seq: u64, copy_index: u64, volume: u32, offset: u64, generation: u64, payload: Bytes) -> Record {
        let mut r = Record::with_payload(RecordOp::Copy, seq, volume, offset, generation, payload, false);
        r.copy_index = copy_index;
        r
    }

    /// A copy chunk of `length` bytes sent as their hashes: `digests` holds
    /// one [`COPY_HASH_LEN`]-byte digest per `hash_span` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_hash(
        seq: u64,
        copy_index: u64,
        volume: u32,
        offset: u64,
        length: u32,
        hash_span: u32,
        generation: u64,
        digests: Bytes,
    ) -> Record {
        let mut r = Record::with_payload(RecordOp::CopyHash, seq, volume, offset, generation, digests, false);
        r.length = length;
        r.copy_index = copy_index;
        r.hash_span = hash_span;
        r
    }

    /// [`RecordOp::CopyHash`]: the spans its digests cover, as (offset,
    /// length, digest), in order. Empty for other ops.
    pub fn hash_spans(&self) -> impl Iterator<Item = (u64, u64, &[u8])> + '_ {
        let span = u64::from(self.hash_span).max(1);
        let digests = if self.op == RecordOp::CopyHash {
            self.payload.chunks_exact(COPY_HASH_LEN)
        } else {
            [].chunks_exact(COPY_HASH_LEN)
        };
        digests.enumerate().map(move |(i, d)| {
            let off = i as u64 * span;
            (self.offset + off, span.min(u64::from(self.length).saturating_sub(off)), d)
        })
    }

    /// Checks the payload against the record's CRC.
    pub fn verify_crc(&self) -> Result<(), RecordError> {
        let actual = crc32(&self.payload);
        if actual == self.crc32 {
            Ok(())
        } else {
            Err(RecordError::CrcMismatch { seq: self.seq, expected: self.crc32, actual })
        }
    }

    /// End of the byte range (`offset + length`, saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }

    /// Checks everything [`Record::from_pb`] checks except the op (a `Record`
    /// always has a known op): non-zero length within
    /// [`MAX_RECORD_PAYLOAD`], payload size consistent with the op, no
    /// overflow of `offset + length`, and the CRC.
    pub fn validate(&self) -> Result<(), RecordError> {
        self.check_shape()?;
        self.verify_crc()
    }

    /// [`Record::validate`] without the CRC (cheap: no pass over the
    /// payload).
    pub fn check_shape(&self) -> Result<(), RecordError> {
        check_range(self.seq, self.op, self.offset, self.length)?;
        let want = match self.op {
            RecordOp::CopyHash => {
                let digests = match self.hash_span {
                    0 => 0,
                    span => u64::from(self.length).div_ceil(u64::from(span)),
                };
                if digests == 0 || digests > MAX_COPY_HASH_DIGESTS {
                    return Err(RecordError::HashSpan { seq: self.seq, length: self.length, span: self.hash_span });
                }
                digests as usize * COPY_HASH_LEN
            }
            op if op.has_payload() => self.length as usize,
            _ => 0,
        };
        if self.payload.len() != want {
            return Err(RecordError::LengthMismatch {
                seq: self.seq,
                length: self.length,
                payload: self.payload.len(),
            });
        }
        Ok(())
    }

    /// The wire message for this record in `group`.
    pub fn to_pb(&self, group: &str) -> pb::Record {
        pb::Record {
            group: group.to_owned(),
            seq: self.seq,
            volume: self.volume,
            op: self.op.to_pb() as i32,
            offset: self.offset,
            length: self.length,
            generation: self.generation,
            crc32: self.crc32,
            payload: self.payload.clone(),
            fua: self.fua,
            copy_index: self.copy_index,
            hash_span: self.hash_span,
            written_at_us: self.written_at_us,
        }
    }

    /// Validates a received record (see [`Record::validate`], plus a known
    /// op) and returns it with its group name.
    pub fn from_pb(msg: pb::Record) -> Result<(String, Record), RecordError> {
        let op = RecordOp::from_pb(msg.op).ok_or(RecordError::UnknownOp { seq: msg.seq, op: msg.op })?;
        let rec = Record {
            seq: msg.seq,
            volume: msg.volume,
            op,
            offset: msg.offset,
            length: msg.length,
            generation: msg.generation,
            crc32: msg.crc32,
            fua: msg.fua,
            copy_index: msg.copy_index,
            hash_span: msg.hash_span,
            written_at_us: msg.written_at_us,
            payload: msg.payload,
        };
        rec.validate()?;
        Ok((msg.group, rec))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = Record> {
        (0..=MAX_SEQ, any::<u32>(), 0..4u8, 0..u64::MAX / 2, 1u32..2000, any::<u64>(), any::<bool>(), any::<u64>())
            .prop_map(|(seq, volume, op, offset, len, generation, fua, ci)| {
                let op = [RecordOp::Write, RecordOp::WriteZeroes, RecordOp::Trim, RecordOp::Copy][op as usize];
                let mut r = if op.has_payload() {
                    let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ (seq as u8)).collect();
                    Record::with_payload(op, seq, volume, offset, generation, Bytes::from(payload), fua)
                } else {
                    Record::without_payload(op, seq, volume, offset, len, generation, fua)
                };
                r.copy_index = ci;
                r
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn pb_round_trip(r in arb_record(), group in "[a-z]{0,10}") {
            let (g, back) = Record::from_pb(r.to_pb(&group)).expect("valid record");
            prop_assert_eq!(g, group);
            prop_assert_eq!(back, r);
        }

        #[test]
        fn payload_flip_is_crc_mismatch(r in arb_record(), idx in any::<prop::sample::Index>(), x in 1u8..=255) {
            prop_assume!(r.op.has_payload());
            let mut msg = r.to_pb("g");
            let mut p = msg.payload.to_vec();
            let i = idx.index(p.len());
            p[i] ^= x;
            msg.payload = Bytes::from(p);
            prop_assert!(matches!(Record::from_pb(msg), Err(RecordError::CrcMismatch { .. })), "flip not detected");
        }

        #[test]
        fn crc_field_flip_is_crc_mismatch(r in arb_record(), x in 1u32..) {
            let mut msg = r.to_pb("g");
            msg.crc32 ^= x;
            let is_crc_mismatch = matches!(Record::from_pb(msg), Err(RecordError::CrcMismatch { .. }));
            prop_assert!(is_crc_mismatch);
        }

        #[test]
        fn wrong_length_rejected(r in arb_record(), delta in 1u32..100, up in any::<bool>()) {
            // Zeroes/trim have no payload to disagree with; only 0 is invalid for them.
            prop_assume!(r.op.has_payload());
            let mut msg = r.to_pb("g");
            msg.length = if up { msg.length + delta } else { msg.length.saturating_sub(delta) };
            prop_assert!(Record::from_pb(msg).is_err());
        }
    }

    fn good() -> pb::Record {
        Record::with_payload(RecordOp::Write, 5, 0, 4096, 1, Bytes::from_static(b"hello"), false).to_pb("g")
    }

    #[test]
    fn malformed_cases() {
        let mut m = good();
        m.op = 0;
        assert_eq!(Record::from_pb(m).unwrap_err(), RecordError::UnknownOp { seq: 5, op: 0 });
        let mut m = good();
        m.op = 99;
        assert_eq!(Record::from_pb(m).unwrap_err(), RecordError::UnknownOp { seq: 5, op: 99 });

        let mut m = good();
        m.length = 0;
        assert_eq!(Record::from_pb(m).unwrap_err(), RecordError::Empty { seq: 5 });

        let mut m = good();
        m.length = MAX_RECORD_PAYLOAD + 1;
        assert_eq!(Record::from_pb(m).unwrap_err(), RecordError::TooLarge { seq: 5, length: MAX_RECORD_PAYLOAD + 1 });

        let mut m = good();
        m.length = 4;
        assert_eq!(Record::from_pb(m).unwrap_err(), RecordError::LengthMismatch { seq: 5, length: 4, payload: 5 });

        // Zeroes / trim must not carry a payload.
        let mut m = good();
        m.op = pb::Op::WriteZeroes as i32;
        assert!(matches!(Record::from_pb(m).unwrap_err(), RecordError::LengthMismatch { .. }));
        let mut m = good();
        m.op = pb::Op::Trim as i32;
        assert!(matches!(Record::from_pb(m).unwrap_err(), RecordError::LengthMismatch { .. }));

        let mut m = good();
        m.offset = u64::MAX - 2;
        assert_eq!(Record::from_pb(m).unwrap_err(), RecordError::Overflow { seq: 5 });

        // A trim with a non-empty-payload CRC.
        let mut m = Record::without_payload(RecordOp::Trim, 9, 0, 0, 512, 1, false).to_pb("g");
        m.crc32 = 1;
        assert!(matches!(Record::from_pb(m).unwrap_err(), RecordError::CrcMismatch { .. }));

        // Exactly at the limit is fine for a trim.
        let m = Record::without_payload(
            RecordOp::Trim,
            9,
            0,
            u64::MAX - u64::from(MAX_RECORD_PAYLOAD),
            MAX_RECORD_PAYLOAD,
            1,
            false,
        )
        .to_pb("g");
        assert!(Record::from_pb(m).is_ok());
    }

    #[test]
    fn error_text() {
        let e = RecordError::TooLarge { seq: 3, length: 40_000_000 };
        assert_eq!(e.to_string(), "record 3: length 40000000 exceeds the 33562624-byte record limit");
        let e = RecordError::CrcMismatch { seq: 3, expected: 1, actual: 0xdeadbeef };
        assert_eq!(e.to_string(), "record 3: payload CRC32 mismatch (record says 0x00000001, payload has 0xdeadbeef)");
    }
}
