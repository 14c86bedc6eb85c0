//! Highest contiguous completed sequence number, from completions that arrive
//! in any order.

use std::collections::BTreeSet;

/// Tracks completions of sequence numbers and reports the highest `n` such
/// that every sequence `<= n` has completed.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    through: u64,
    pending: BTreeSet<u64>,
}

impl SeqTracker {
    /// Everything up to and including `completed_through` is already complete.
    pub fn new(completed_through: u64) -> Self {
        SeqTracker { through: completed_through, pending: BTreeSet::new() }
    }

    /// Records that `seq` completed. Completing a seq twice, or one already
    /// covered, is harmless.
    pub fn complete(&mut self, seq: u64) {
        if seq <= self.through {
            return;
        }
        if Some(seq) == self.through.checked_add(1) {
            self.through = seq;
            while self.through.checked_add(1).is_some_and(|n| self.pending.first() == Some(&n)) {
                self.pending.pop_first();
                self.through += 1;
            }
        } else {
            self.pending.insert(seq);
        }
    }

    /// Highest seq such that it and every lower seq completed.
    pub fn completed_through(&self) -> u64 {
        self.through
    }

    /// Completions above a gap, waiting for the gap to fill.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether `seq` has completed.
    pub fn is_complete(&self, seq: u64) -> bool {
        seq <= self.through || self.pending.contains(&seq)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn contiguous_prefix(start in 0u64..1000, seqs in proptest::collection::vec(0u64..40, 0..80)) {
            let mut t = SeqTracker::new(start);
            let mut done = BTreeSet::new();
            for s in seqs {
                let seq = start.saturating_sub(5) + s;
                t.complete(seq);
                done.insert(seq);
                let mut want = start;
                while done.contains(&(want + 1)) {
                    want += 1;
                }
                prop_assert_eq!(t.completed_through(), want);
                prop_assert_eq!(t.pending(), done.iter().filter(|&&d| d > want + 1).count());
                prop_assert!(t.is_complete(seq));
            }
        }
    }

    #[test]
    fn top_of_range() {
        let mut t = SeqTracker::new(u64::MAX - 2);
        t.complete(u64::MAX);
        t.complete(u64::MAX - 1);
        assert_eq!(t.completed_through(), u64::MAX);
        t.complete(u64::MAX);
        assert_eq!(t.pending(), 0);
    }
}
