//! Secondary side of a replication session, sans-IO.
//!
//! For each record received (already validated by
//! [`Record::from_pb`](crate::record::Record::from_pb)) the daemon calls
//! [`Applier::on_record`], which checks the record's place in the stream and
//! returns an [`ApplyId`] plus the earlier, not yet applied records that
//! overlap it on the same volume. The daemon writes the record to its volume
//! once those are applied, then calls [`Applier::on_applied`]. Records that do
//! not overlap are applied concurrently; `applied_seq` only counts the
//! contiguous prefix of applied write seqs.
//!
//! Durability on the volumes: when [`Applier::needs_flush`] says so (a FUA
//! record or a flush request is applied but not durable), or periodically,
//! the caller takes [`Applier::durable_barrier`], fsyncs the volumes, and
//! reports the barrier back with [`Applier::on_durable`]. The secondary's
//! session ([`crate::secondary`]) drives it, with its restore journal in
//! front.
//!
//! # Stream rules
//!
//! - Write records (Write, WriteZeroes, Trim) arrive in seq order without
//!   gaps, starting at `durable_seq + 1`.
//! - An OP_COPY record's seq (the last write it reflects) must be `<=` the
//!   last write seq received, and its `copy_index` must be the next one
//!   (starting at 1 on each stream).
//! - Copy data is stale for any write newer than its seq: the primary must put
//!   an OP_COPY record into the stream before any write record with a higher
//!   seq that overlaps its range (for example: keep the read barrier of
//!   [`RangeSequencer`](crate::sequencer::RangeSequencer) until the copy
//!   record is queued ahead of later overlapping writes). The applier rejects
//!   a violation it can see (the newer write is not applied yet:
//!   [`ApplyError::CopyBehindWrite`]) but cannot see one whose newer write
//!   was already applied.
//!
use std::collections::{BTreeSet, HashMap};

use crate::ranges::RangeIndex;
use crate::record::{Record, RecordError};
use crate::seqtrack::SeqTracker;

/// Identifies a received record until it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApplyId(pub u64);

/// A record that does not fit the stream; the session should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A write record out of sequence (gap, duplicate or reordering).
    #[error("record {got} out of order: expected seq {expected}")]
    OutOfOrder {
        /// Seq expected next.
        expected: u64,
        /// Seq received.
        got: u64,
    },
    /// A copy record reflects writes that have not been received yet.
    #[error("copy record reflects writes through seq {seq} but only {received} were received")]
    CopyAhead {
        /// The copy record's seq.
        seq: u64,
        /// Last write seq received.
        received: u64,
    },
    /// A copy record arrived after a newer write to the same range: its
    /// data is stale and would overwrite that write.
    #[error("copy record {copy_index} (reflecting writes through seq {copy_seq}) arrived after the newer overlapping write {write_seq}: the primary must send a copy chunk before any later write to its range")]
    CopyBehindWrite {
        /// The copy record's index.
        copy_index: u64,
        /// The copy record's seq.
        copy_seq: u64,
        /// The newer overlapping write.
        write_seq: u64,
    },
    /// A copy record with the wrong chunk number.
    #[error("copy record with copy_index {got}: expected {expected}")]
    CopyIndex {
        /// Index expected next.
        expected: u64,
        /// Index received.
        got: u64,
    },
    /// The record itself is malformed.
    #[error(transparent)]
    Invalid(#[from] RecordError),
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write(u64),
    Copy(u64),
}

/// Secondary-side applying state of one group session.
#[derive(Debug)]
pub struct Applier {
    received: u64,
    next_copy_index: u64,
    applied: SeqTracker,
    copy_applied: SeqTracker,
    durable: u64,
    copy_durable: u64,
    in_flight: RangeIndex<ApplyId>,
    kinds: HashMap<ApplyId, Kind>,
    next_id: u64,
    /// Write seqs that must become durable promptly (FUA records, flush
    /// requests), all above `durable`.
    flush_targets: BTreeSet<u64>,
    /// Copy indices that must become durable promptly.
    copy_flush_targets: BTreeSet<u64>,
}

impl Applier {
    /// Everything through `durable_seq` is durable here (after a restart:
    /// the persisted checkpoint); write seq `durable_seq + 1` is expected
    /// next, and copy index 1.
    pub fn new(durable_seq: u64) -> Self {
        Applier {
            received: durable_seq,
            next_copy_index: 1,
            applied: SeqTracker::new(durable_seq),
            copy_applied: SeqTracker::new(0),
            durable: durable_seq,
            copy_durable: 0,
            in_flight: RangeIndex::default(),
            kinds: HashMap::new(),
            next_id: 0,
            flush_targets: BTreeSet::new(),
            copy_flush_targets: BTreeSet::new(),
        }
    }

    /// Accepts `rec` into the stream: checks its order (see the module docs)
    /// and returns its id and the ids of earlier unapplied records
    /// overlapping it on the same volume, which must be applied first.
    pub fn on_record(&mut self, rec: &Record) -> Result<(ApplyId, Vec<ApplyId>), ApplyError> {
        rec.check_shape()?;
        let kind = if rec.op.is_copy() {
            if rec.seq > self.received {
                return Err(ApplyError::CopyAhead { seq: rec.seq, received: self.received });
            }
            if rec.copy_index != self.next_copy_index {
                return Err(ApplyError::CopyIndex { expected: self.next_copy_index, got: rec.copy_index });
            }
            Kind::Copy(rec.copy_index)
        } else {
            let expected = self.received.saturating_add(1);
            if rec.seq != expected || self.received == u64::MAX {
                return Err(ApplyError::OutOfOrder { expected, got: rec.seq });
            }
            Kind::Write(rec.seq)
        };
        let deps = self.in_flight.overlapping(rec.volume, rec.offset, rec.end());
        if let Kind::Copy(copy_index) = kind {
            let newer = deps.iter().find_map(|d| match self.kinds.get(d) {
                Some(Kind::Write(w)) if *w > rec.seq => Some(*w),
                _ => None,
            });
            if let Some(write_seq) = newer {
                return Err(ApplyError::CopyBehindWrite { copy_index, copy_seq: rec.seq, write_seq });
            }
        }
        match kind {
            Kind::Copy(i) => {
                self.next_copy_index = self.next_copy_index.saturating_add(1);
                if rec.fua {
                    self.copy_flush_targets.insert(i);
                }
            }
            Kind::Write(seq) => {
                self.received = seq;
                if rec.fua {
                    self.flush_targets.insert(seq);
                }
            }
        }
        let id = ApplyId(self.next_id);
        self.next_id += 1;
        // An earlier record this one covers is found through this one from
        // now on (every later record overlapping it overlaps this one, which
        // waits for it): a block rewritten N times while the applies lag
        // costs N dependencies, not N²/2.
        self.in_flight.remove_within(&deps, rec.volume, rec.offset, rec.end());
        self.in_flight.insert(id, rec.volume, rec.offset, rec.end());
        self.kinds.insert(id, kind);
        Ok((id, deps))
    }

    /// Record `id` is written to the volume. Unknown ids are ignored.
    pub fn on_applied(&mut self, id: ApplyId) {
        let Some(kind) = self.kinds.remove(&id) else {
            return;
        };
        self.in_flight.remove(id);
        match kind {
            Kind::Write(seq) => self.applied.complete(seq),
            Kind::Copy(i) => self.copy_applied.complete(i),
        }
    }

    /// What an fsync started now covers: (applied write seq, applied copy
    /// index). Report it back with [`on_durable`](Self::on_durable) once the
    /// fsync completed.
    pub fn durable_barrier(&self) -> (u64, u64) {
        (self.applied.completed_through(), self.copy_applied.completed_through())
    }

    /// Everything covered by a [`durable_barrier`](Self::durable_barrier) is
    /// now durable. Values never move backwards and are clamped to what was
    /// applied.
    pub fn on_durable(&mut self, seq: u64, copy_index: u64) {
        let seq = seq.min(self.applied.completed_through());
        let copy_index = copy_index.min(self.copy_applied.completed_through());
        self.durable = self.durable.max(seq);
        self.copy_durable = self.copy_durable.max(copy_index);
        let durable = self.durable;
        self.flush_targets.retain(|&t| t > durable);
        let copy_durable = self.copy_durable;
        self.copy_flush_targets.retain(|&t| t > copy_durable);
    }

    /// Whether a FUA record or a flush request wants a write newer than
    /// `seq` durable.
    pub fn flush_wanted_beyond(&self, seq: u64) -> bool {
        self.flush_targets.last().is_some_and(|&t| t > seq)
    }

    /// Whether a FUA record or a flush request is applied but not yet
    /// durable, so the daemon should flush now.
    pub fn needs_flush(&self) -> bool {
        let writes = self.flush_targets.first().is_some_and(|&t| t <= self.applied.completed_through());
        let copies = self.copy_flush_targets.first().is_some_and(|&t| t <= self.copy_applied.completed_through());
        writes || copies
    }

    /// The primary asks for everything through write `seq` (and every copy
    /// chunk received so far) to be made durable and acked.
    pub fn on_flush_request(&mut self, seq: u64) {
        if seq > self.durable {
            self.flush_targets.insert(seq);
        }
        let copies = self.next_copy_index.saturating_sub(1);
        if copies > self.copy_durable {
            self.copy_flush_targets.insert(copies);
        }
    }

    /// Last write seq received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Highest write seq applied with all below it.
    pub fn applied(&self) -> u64 {
        self.applied.completed_through()
    }

    /// Highest durable write seq.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Highest durable copy index.
    pub fn copy_durable(&self) -> u64 {
        self.copy_durable
    }

    /// Copy index expected next.
    pub fn next_copy_index(&self) -> u64 {
        self.next_copy_index
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::record::{RecordOp, MAX_SEQ};
    use bytes::Bytes;

    fn w(seq: u64, vol: u32, off: u64, len: usize, fua: bool) -> Record {
        Record::with_payload(RecordOp::Write, seq, vol, off, 1, Bytes::from(vec![seq as u8; len]), fua)
    }

    /// A block rewritten many times while the applies lag: each record waits
    /// for the one before it only, not for all of them.
    #[test]
    fn a_hot_block_costs_one_dependency_per_record() {
        let mut a = Applier::new(0);
        let mut ids = Vec::new();
        for seq in 1..=10_000 {
            let (id, deps) = a.on_record(&w(seq, 0, 8192, 4096, false)).unwrap();
            assert_eq!(deps, ids.last().copied().into_iter().collect::<Vec<_>>(), "record {seq}");
            ids.push(id);
        }
        assert_eq!(a.in_flight.len(), 1);
        // A record partly over the block still waits for the newest writer.
        let (_, deps) = a.on_record(&w(10_001, 0, 10240, 4096, false)).unwrap();
        assert_eq!(deps, [ids[9_999]]);
        // Applied in order, they all count.
        for id in ids {
            a.on_applied(id);
        }
        assert_eq!(a.applied(), 10_000);
    }

    #[test]
    fn order_and_deps() {
        let mut a = Applier::new(10);
        assert_eq!(a.on_record(&w(12, 0, 0, 10, false)), Err(ApplyError::OutOfOrder { expected: 11, got: 12 }));
        let (i11, d) = a.on_record(&w(11, 0, 0, 10, false)).unwrap();
        assert!(d.is_empty());
        let (i12, d) = a.on_record(&w(12, 1, 0, 10, false)).unwrap();
        assert!(d.is_empty());
        let (i13, d) = a.on_record(&w(13, 0, 5, 10, true)).unwrap();
        assert_eq!(d, vec![i11]);
        assert_eq!(a.on_record(&w(13, 0, 5, 10, false)), Err(ApplyError::OutOfOrder { expected: 14, got: 13 }));
        a.on_applied(i12);
        assert_eq!((a.received(), a.applied(), a.durable()), (13, 10, 10));
        a.on_applied(i11);
        assert_eq!(a.applied(), 12);
        assert!(!a.needs_flush());
        a.on_applied(i13);
        assert!(a.needs_flush());
        let (s, c) = a.durable_barrier();
        assert_eq!((s, c), (13, 0));
        a.on_durable(s, c);
        assert!(!a.needs_flush());
        assert_eq!((a.received(), a.applied(), a.durable()), (13, 13, 13));
        // Stale or too-high durable reports do not move things wrongly.
        a.on_durable(5, 0);
        a.on_durable(99, 99);
        assert_eq!(a.durable(), 13);
    }

    #[test]
    fn copy_records() {
        let mut a = Applier::new(3);
        let c = |seq, idx, off| Record::copy_chunk(seq, idx, 0, off, 1, Bytes::from_static(b"abcd"));
        assert!(matches!(a.on_record(&c(4, 1, 0)), Err(ApplyError::CopyAhead { .. })));
        assert!(matches!(a.on_record(&c(3, 2, 0)), Err(ApplyError::CopyIndex { expected: 1, got: 2 })));
        let (c1, _) = a.on_record(&c(3, 1, 0)).unwrap();
        let (w4, d) = a.on_record(&w(4, 0, 2, 4, false)).unwrap();
        assert_eq!(d, vec![c1]);
        let (c2, d) = a.on_record(&c(4, 2, 4)).unwrap();
        assert_eq!(d, vec![w4]);
        // A chunk reflecting writes through 3 after the unapplied write 4 to
        // the same range is stale.
        assert_eq!(
            a.on_record(&c(3, 3, 0)),
            Err(ApplyError::CopyBehindWrite { copy_index: 3, copy_seq: 3, write_seq: 4 })
        );
        assert_eq!(a.next_copy_index(), 3);
        a.on_flush_request(4);
        a.on_applied(c1);
        a.on_applied(w4);
        assert!(a.needs_flush());
        assert_eq!(a.durable_barrier(), (4, 1));
        a.on_durable(4, 1);
        // Copy chunk 2 still owed to the flush request.
        assert!(!a.needs_flush());
        a.on_applied(c2);
        assert!(a.needs_flush());
        let (s, ci) = a.durable_barrier();
        a.on_durable(s, ci);
        assert_eq!(a.copy_durable(), 2);
        assert!(!a.needs_flush());
    }

    #[test]
    fn malformed_record_rejected() {
        let mut a = Applier::new(0);
        let mut r = w(1, 0, 0, 4, false);
        r.length = 5;
        assert!(matches!(a.on_record(&r), Err(ApplyError::Invalid(RecordError::LengthMismatch { .. }))));
        assert_eq!(a.received(), 0);
        let mut a = Applier::new(u64::MAX);
        assert!(a.on_record(&w(0, 0, 0, 1, false)).is_err());
        // The last seq a record may carry applies, becomes durable, and
        // nothing overflows; one beyond it is refused.
        let mut a = Applier::new(MAX_SEQ - 1);
        let (id, _) = a.on_record(&w(MAX_SEQ, 0, 0, 1, true)).unwrap();
        a.on_applied(id);
        assert!(a.needs_flush());
        let (s, c) = a.durable_barrier();
        a.on_durable(s, c);
        a.on_flush_request(u64::MAX);
        assert_eq!(a.durable(), MAX_SEQ);
        assert!(!a.needs_flush());
        let mut a = Applier::new(MAX_SEQ);
        assert_eq!(
            a.on_record(&w(MAX_SEQ + 1, 0, 0, 1, false)),
            Err(ApplyError::Invalid(RecordError::SeqTooLarge { seq: MAX_SEQ + 1 }))
        );
    }
}
