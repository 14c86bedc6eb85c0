//! Sequence assignment and range serialisation on the primary.
//!
//! Every client write of a group gets the next group sequence number from
//! [`RangeSequencer::begin`], together with the earlier in-flight operations
//! whose byte ranges intersect it on the same volume. The daemon writes the
//! data to the volume only after those have finished, so overlapping writes
//! reach the primary's volume in sequence order, the same order in which the
//! secondary applies them. Non-overlapping writes proceed concurrently.
//!
//! Initial-copy and resync reads use [`RangeSequencer::begin_read_barrier`]:
//! the read waits for overlapping in-flight writes, and later overlapping
//! writes wait for the read, so the copied data reflects exactly the writes up
//! to the `last_seq()` observed when the barrier was taken.

use crate::ranges::RangeIndex;

/// A read barrier taken by [`RangeSequencer::begin_read_barrier`]; ids come
/// from their own space, distinct from sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Something an operation must wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dep {
    /// An in-flight write; wait until [`RangeSequencer::finish`] for it.
    Seq(u64),
    /// An in-flight read barrier; wait until [`RangeSequencer::finish_ticket`].
    Ticket(Ticket),
}

/// Assigns group sequence numbers and reports overlapping in-flight work.
///
/// A range of length 0 (for example a flush) gets a seq but overlaps nothing.
/// Ranges are `[offset, offset + len)`, saturating at `u64::MAX`.
#[derive(Debug)]
pub struct RangeSequencer {
    next_seq: u64,
    next_ticket: u64,
    in_flight: RangeIndex<Dep>,
}

impl RangeSequencer {
    /// `next_seq` is the first seq [`begin`](Self::begin) hands out.
    pub fn new(next_seq: u64) -> Self {
        RangeSequencer { next_seq, next_ticket: 0, in_flight: RangeIndex::default() }
    }

    /// Starts a write: returns its seq and every earlier in-flight write and
    /// read barrier intersecting it (sorted: seqs ascending, then tickets).
    pub fn begin(&mut self, volume: u32, offset: u64, len: u64) -> (u64, Vec<Dep>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let end = offset.saturating_add(len);
        let deps = self.in_flight.overlapping(volume, offset, end);
        self.in_flight.insert(Dep::Seq(seq), volume, offset, end);
        (seq, deps)
    }

    /// Starts a read barrier (initial copy / resync read): takes no seq,
    /// returns a ticket and the intersecting in-flight writes (never other
    /// tickets: reads do not conflict with reads). Later intersecting writes
    /// report the ticket as a dependency until
    /// [`finish_ticket`](Self::finish_ticket).
    pub fn begin_read_barrier(&mut self, volume: u32, offset: u64, len: u64) -> (Ticket, Vec<Dep>) {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let end = offset.saturating_add(len);
        let deps =
            self.in_flight.overlapping(volume, offset, end).into_iter().filter(|d| matches!(d, Dep::Seq(_))).collect();
        self.in_flight.insert(Dep::Ticket(ticket), volume, offset, end);
        (ticket, deps)
    }

    /// The write `seq` reached the volume (or failed); later writes need no
    /// longer wait for it. Unknown seqs are ignored.
    pub fn finish(&mut self, seq: u64) {
        self.in_flight.remove(Dep::Seq(seq));
    }

    /// The read barrier is done. Unknown tickets are ignored.
    pub fn finish_ticket(&mut self, t: Ticket) {
        self.in_flight.remove(Dep::Ticket(t));
    }

    /// Whether the write `seq` is still in flight.
    pub fn is_in_flight(&self, seq: u64) -> bool {
        self.in_flight.contains(Dep::Seq(seq))
    }

    /// The seq [`begin`](Self::begin) hands out next.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The last seq handed out (`next_seq - 1`, saturating).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// In-flight writes and read barriers.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u32, u64, u64),
        Read(u32, u64, u64),
        Finish(prop::sample::Index),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u32..3, 0u64..4096, 0u64..600).prop_map(|(v, o, l)| Op::Write(v, o, l)),
            2 => (0u32..3, 0u64..4096, 1u64..600).prop_map(|(v, o, l)| Op::Read(v, o, l)),
            5 => any::<prop::sample::Index>().prop_map(Op::Finish),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a brute-force model: every in-flight entry with its range.
        #[test]
        fn matches_brute_force(first in 0u64..1_000_000, ops in proptest::collection::vec(arb_op(), 1..200)) {
            let mut s = RangeSequencer::new(first);
            let mut model: BTreeMap<Dep, (u32, u64, u64)> = BTreeMap::new();
            let mut next = first;
            let overl = |m: &BTreeMap<Dep, (u32, u64, u64)>, v: u32, o: u64, e: u64, writes_only: bool| -> Vec<Dep> {
                m.iter()
                    .filter(|(d, &(mv, mo, me))| {
                        mv == v && mo < e && o < me && mo < me && o < e && (!writes_only || matches!(d, Dep::Seq(_)))
                    })
                    .map(|(d, _)| *d)
                    .collect()
            };
            for op in ops {
                match op {
                    Op::Write(v, o, l) => {
                        let (seq, deps) = s.begin(v, o, l);
                        prop_assert_eq!(seq, next);
                        next += 1;
                        prop_assert_eq!(deps, overl(&model, v, o, o + l, false));
                        model.insert(Dep::Seq(seq), (v, o, o + l));
                    }
                    Op::Read(v, o, l) => {
                        let (t, deps) = s.begin_read_barrier(v, o, l);
                        prop_assert_eq!(deps, overl(&model, v, o, o + l, true));
                        prop_assert!(!model.contains_key(&Dep::Ticket(t)));
                        model.insert(Dep::Ticket(t), (v, o, o + l));
                    }
                    Op::Finish(i) => {
                        if !model.is_empty() {
                            let d = *model.keys().nth(i.index(model.len())).unwrap();
                            model.remove(&d);
                            match d {
                                Dep::Seq(q) => { prop_assert!(s.is_in_flight(q)); s.finish(q); prop_assert!(!s.is_in_flight(q)); }
                                Dep::Ticket(t) => s.finish_ticket(t),
                            }
                        }
                    }
                }
                prop_assert_eq!(s.in_flight(), model.len());
                prop_assert_eq!(s.next_seq(), next);
                prop_assert_eq!(s.last_seq(), next.saturating_sub(1));
            }
        }
    }

    #[test]
    fn basic() {
        let mut s = RangeSequencer::new(10);
        assert_eq!(s.begin(0, 0, 4096), (10, vec![]));
        assert_eq!(s.begin(1, 0, 4096), (11, vec![]));
        assert_eq!(s.begin(0, 4096, 4096), (12, vec![]));
        assert_eq!(s.begin(0, 4000, 200), (13, vec![Dep::Seq(10), Dep::Seq(12)]));
        let (t, deps) = s.begin_read_barrier(0, 0, 8192);
        assert_eq!(deps, vec![Dep::Seq(10), Dep::Seq(12), Dep::Seq(13)]);
        assert_eq!(s.begin_read_barrier(0, 0, 1).1, vec![Dep::Seq(10)]);
        s.finish(10);
        assert_eq!(s.begin(0, 0, 1).1, vec![Dep::Ticket(t), Dep::Ticket(Ticket(1))]);
        // Zero-length: a seq, no deps, blocks nothing.
        assert_eq!(s.begin(0, 100, 0), (15, vec![]));
        assert_eq!(s.begin(0, 99, 2).1, vec![Dep::Ticket(t)]);
        // Saturating range at the end of the address space.
        assert_eq!(s.begin(2, u64::MAX - 1, 10).1, vec![]);
        assert_eq!(s.begin(2, u64::MAX - 2, 10).1, vec![Dep::Seq(17)]);
    }
}
