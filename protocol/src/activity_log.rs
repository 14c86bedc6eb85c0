//! Activity log: the regions of a group's volumes that may hold writes not
//! yet durable on both sites (DRBD's al-extents are the model).
//!
//! A region (extent) becomes *hot* before the first write to it reaches the
//! primary's volume, and the log naming it is made durable first (the
//! daemon group-commits it, one save for every write that arrived
//! meanwhile). An extent is *retired* once every write to it is durable on
//! both sites and it has been idle for a while (so a busy extent does not
//! pay for a save again and again). After a power cut, which can drop any
//! write not yet made durable on either site, exactly the hot extents may
//! differ between the sites: the primary resynchronises them, and nothing
//! else.
//!
//! **Budget** (DRBD's `al-extents`). The log holds at most `budget` extents,
//! so a power cut resynchronises at most `budget` × extent bytes. Before a
//! write may make an extent hot, [`ActivityLog::make_room`] evicts the least
//! recently written extents (those whose newest write is the oldest), but
//! only extents whose every write is durable on both sites, idle or not; if
//! too few are, it evicts nothing and says through which sequence writes
//! must become durable on both sites first (the caller makes that happen,
//! waits, and asks again). Rules:
//! - A write only to extents already hot never needs room.
//! - One write spanning more extents than the budget is still admitted: the
//!   limit is then that write's own extents (every other extent must go
//!   first). So the log never holds more than `max(budget, extents of the
//!   largest single write)` extents through `make_room`.
//! - A caller that cannot wait (nothing can make writes durable on the
//!   secondary while the link is down) may [`ActivityLog::touch`] anyway:
//!   the log then grows past its budget, `touch` says so, and each later
//!   `make_room` evicts what it can until the log is back within budget
//!   (a new extent then costs at least one eviction, so the log does not
//!   grow further once the secondary is back).
//!
//! Encoded form (little-endian): magic `RPLACTL1`, extent size (u64), count
//! (u64), then `count` entries of volume (u32) and extent index (u64), then
//! a CRC32 of everything before it. The budget is configuration, not part
//! of the encoded form: a log saved with a larger one loads whole, and
//! shrinks as its extents become evictable.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::crc32;

/// Default extent: 4 MiB.
pub const DEFAULT_EXTENT: u64 = 4 << 20;

/// Default budget in extents (DRBD's `al-extents` default): 1237 × 4 MiB,
/// about 4.8 GiB resynchronised at most after a power cut.
pub const DEFAULT_BUDGET: usize = 1237;

const MAGIC: &[u8; 8] = b"RPLACTL1";
const HEADER_LEN: usize = 8 + 8 + 8;
const ENTRY_LEN: usize = 4 + 8;

/// Errors decoding an activity log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivityLogError {
    /// Not an activity log, or of the wrong length.
    #[error("not a replicator activity log (bad magic or length)")]
    Malformed,
    /// Checksum mismatch (torn or corrupted write).
    #[error("activity log checksum mismatch (torn or corrupted write)")]
    BadCrc,
    /// Extent size zero or not a power of two.
    #[error("activity log extent size {0} is not a power of two")]
    BadExtent(u64),
}

/// What is known of one hot extent while the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hot {
    /// Newest sequence written to it.
    newest_seq: u64,
    /// Logical time of the newest write (caller's clock, e.g. milliseconds).
    touched_at: u64,
    /// The save (caller's epoch) that first records it on disk: every
    /// write to it waits for that save, not only the one that made it hot.
    saved_in: u64,
}

/// What [`ActivityLog::touch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touched {
    /// An extent became hot: the save `next_save` must be started.
    pub became_hot: bool,
    /// The save this write must wait for before it reaches the volume (the
    /// latest that adds one of its extents; an extent that was already hot
    /// may still be waiting for its save).
    pub wait_for: u64,
    /// The log now holds more extents than its budget allows for this write
    /// (`max(budget, extents of the write)`): [`ActivityLog::make_room`]
    /// was not asked first, or it refused and the caller went ahead, or the
    /// log was over its budget already (then `make_room` keeps it from
    /// growing and shrinks it as extents become evictable).
    pub over_budget: bool,
}

/// [`ActivityLog::make_room`] refused: the log is at its budget and too few
/// of its extents have every write durable on both sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Once every write through this sequence is durable on both sites,
    /// enough extents can be evicted (unless more writes arrive first: ask
    /// again).
    pub durable_through: u64,
}

/// The hot extents of a group's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityLog {
    extent: u64,
    /// At most this many extents (see the module documentation).
    budget: usize,
    hot: BTreeMap<(u32, u64), Hot>,
    /// The hot extents by (newest sequence, volume, index): least recently
    /// written first. Sequences are handed out in admission order, so this
    /// is the LRU order.
    lru: BTreeSet<(u64, u32, u64)>,
}

impl ActivityLog {
    /// An empty log with extents of `extent` bytes (rounded up to a power
    /// of two; 0 means [`DEFAULT_EXTENT`]) and the [`DEFAULT_BUDGET`].
    pub fn new(extent: u64) -> Self {
        let extent = if extent == 0 { DEFAULT_EXTENT } else { extent.checked_next_power_of_two().unwrap_or(1 << 63) };
        ActivityLog { extent, budget: DEFAULT_BUDGET, hot: BTreeMap::new(), lru: BTreeSet::new() }
    }

    /// Extent size in bytes.
    pub fn extent(&self) -> u64 {
        self.extent
    }

    /// The budget, in extents.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Sets the budget (at least 1 extent). A log already larger keeps its
    /// extents; [`ActivityLog::make_room`] evicts them as they become
    /// evictable.
    pub fn set_budget(&mut self, extents: usize) {
        self.budget = extents.max(1);
    }

    /// Number of hot extents.
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// No hot extent.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// Forgets every extent (extent size and budget stay).
    pub fn clear(&mut self) {
        self.hot.clear();
        self.lru.clear();
    }

    /// First and last extent index of `[offset, offset + len)`.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.extent, offset.saturating_add(len.max(1) - 1) / self.extent)
    }

    /// Most extents the log may hold after a write to `first..=last`.
    fn limit(&self, first: u64, last: u64) -> usize {
        self.budget.max(usize::try_from(last - first + 1).unwrap_or(usize::MAX))
    }

    /// Makes room for a write to `[offset, offset + len)` of `volume`, with
    /// every write through `durable_both` durable on both sites: evicts
    /// least recently written extents that hold no newer write (never one
    /// of this write's own) until touching the range keeps the log within
    /// its budget, and, while the log is over its budget, further such
    /// extents, back down to it. Returns how many it evicted (the smaller
    /// log may be saved lazily: a larger one on disk is only conservative).
    ///
    /// Refuses, evicting nothing, when that needs an extent with a write
    /// newer than `durable_both`.
    pub fn make_room(&mut self, volume: u32, offset: u64, len: u64, durable_both: u64) -> Result<usize, Full> {
        let (first, last) = self.span(offset, len);
        let own = |v: u32, i: u64| v == volume && (first..=last).contains(&i);
        let new = (first..=last).filter(|&i| !self.hot.contains_key(&(volume, i))).count();
        let excess = (self.hot.len() + new).saturating_sub(self.limit(first, last));
        if excess == 0 {
            return Ok(0);
        }
        // Each new extent needs one eviction (while over budget, that keeps
        // the log from growing); the rest of the excess goes if it can.
        let required = excess.min(new);
        let candidates = || self.lru.iter().filter(|&&(_, v, i)| !own(v, i));
        // In LRU order: every evictable one comes first.
        let victims: Vec<(u64, u32, u64)> =
            candidates().take(excess).take_while(|&&(seq, ..)| seq <= durable_both).copied().collect();
        if victims.len() < required {
            // Through the sequence of the last extent that must go. (The
            // other extents always cover the excess; if they did not, never
            // claim room that is not there.)
            let needed = candidates().nth(required - 1).map_or(u64::MAX, |&(seq, ..)| seq);
            return Err(Full { durable_through: needed });
        }
        for key @ (_, v, i) in &victims {
            self.lru.remove(key);
            self.hot.remove(&(*v, *i));
        }
        Ok(victims.len())
    }

    /// Records write `seq` to `[offset, offset + len)` of `volume` at time
    /// `now`; extents that become hot are to be saved in save `next_save`.
    /// Call [`ActivityLog::make_room`] first: `touch` itself never evicts,
    /// and reports when the log went over its budget.
    pub fn touch(&mut self, volume: u32, offset: u64, len: u64, seq: u64, now: u64, next_save: u64) -> Touched {
        let (first, last) = self.span(offset, len);
        let mut became_hot = false;
        let mut wait_for = 0;
        for index in first..=last {
            let entry = self.hot.entry((volume, index)).or_insert_with(|| {
                became_hot = true;
                Hot { newest_seq: 0, touched_at: now, saved_in: next_save }
            });
            let old = entry.newest_seq;
            entry.newest_seq = entry.newest_seq.max(seq);
            entry.touched_at = entry.touched_at.max(now);
            wait_for = wait_for.max(entry.saved_in);
            let newest = entry.newest_seq;
            self.lru.remove(&(old, volume, index));
            self.lru.insert((newest, volume, index));
        }
        Touched { became_hot, wait_for, over_budget: self.hot.len() > self.limit(first, last) }
    }

    /// Retires every extent whose newest write is at most `durable_seq`
    /// (durable on both sites) and that was not touched after
    /// `idle_before`. Returns whether any was retired (the smaller log may
    /// then be saved; a stale, larger one on disk is safe).
    pub fn retire(&mut self, durable_seq: u64, idle_before: u64) -> bool {
        let before = self.hot.len();
        let lru = &mut self.lru;
        self.hot.retain(|&(v, i), h| {
            let keep = h.newest_seq > durable_seq || h.touched_at >= idle_before;
            if !keep {
                lru.remove(&(h.newest_seq, v, i));
            }
            keep
        });
        self.hot.len() != before
    }

    /// Whether some extent waits only for its writes to become durable
    /// through `seq` to be retired (idle since `idle_before`).
    pub fn waits_for_durability(&self, seq: u64, idle_before: u64) -> bool {
        self.hot.values().any(|h| h.newest_seq > seq && h.touched_at < idle_before)
    }

    /// After a restart that kept the page cache (a process crash, a clean
    /// stop), the writes behind a loaded log are the journal's: they become
    /// retirable once everything through `seq` is durable on both sites.
    pub fn assume_written(&mut self, seq: u64, now: u64) {
        for h in self.hot.values_mut() {
            *h = Hot { newest_seq: seq, touched_at: now, saved_in: 0 };
        }
        self.lru = self.hot.iter().map(|(&(v, i), h)| (h.newest_seq, v, i)).collect();
    }

    /// The hot extents as (volume, offset, length); the last extent of a
    /// volume may reach past its end (callers clip).
    pub fn extents(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.hot.keys().map(|&(v, i)| (v, i * self.extent, self.extent))
    }

    /// Encodes the set of hot extents (times and sequences are not kept:
    /// after a restart every logged extent is resynchronised).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.hot.len() * ENTRY_LEN + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.extent.to_le_bytes());
        out.extend_from_slice(&(self.hot.len() as u64).to_le_bytes());
        for &(v, i) in self.hot.keys() {
            out.extend_from_slice(&v.to_le_bytes());
            out.extend_from_slice(&i.to_le_bytes());
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes [`ActivityLog::encode`]'s output (with the
    /// [`DEFAULT_BUDGET`]). Its extents never retire until
    /// [`ActivityLog::assume_written`] says what they wait for.
    pub fn decode(buf: &[u8]) -> Result<Self, ActivityLogError> {
        if buf.len() < HEADER_LEN + 4 || &buf[..8] != MAGIC {
            return Err(ActivityLogError::Malformed);
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32(body).to_le_bytes() != crc {
            return Err(ActivityLogError::BadCrc);
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
        let extent = u64_at(8);
        if extent == 0 || !extent.is_power_of_two() {
            return Err(ActivityLogError::BadExtent(extent));
        }
        let count = u64_at(16);
        let expected = (count as usize).checked_mul(ENTRY_LEN).and_then(|n| n.checked_add(HEADER_LEN));
        if expected != Some(body.len()) {
            return Err(ActivityLogError::Malformed);
        }
        let mut al = ActivityLog::new(extent);
        for entry in body[HEADER_LEN..].chunks_exact(ENTRY_LEN) {
            let v = u32::from_le_bytes(entry[..4].try_into().unwrap_or([0; 4]));
            let i = u64::from_le_bytes(entry[4..].try_into().unwrap_or([0; 8]));
            al.hot.insert((v, i), Hot { newest_seq: u64::MAX, touched_at: 0, saved_in: 0 });
            al.lru.insert((u64::MAX, v, i));
        }
        Ok(al)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const E: u64 = 4096;

    fn touched(became_hot: bool, wait_for: u64) -> Touched {
        Touched { became_hot, wait_for, over_budget: false }
    }

    /// Hot extents of volume 0 by index.
    fn hot0(al: &ActivityLog) -> Vec<u64> {
        al.extents().filter(|e| e.0 == 0).map(|e| e.1 / al.extent()).collect()
    }

    #[test]
    fn touch_retire_and_round_trip() {
        let mut al = ActivityLog::new(4096);
        assert_eq!(al.touch(0, 0, 4096, 1, 10, 5), touched(true, 5), "a cold extent becomes hot in save 5");
        assert_eq!(
            al.touch(0, 100, 10, 2, 11, 6),
            touched(false, 5),
            "a hot extent needs no new save, but waits for save 5"
        );
        assert_eq!(al.touch(1, 4095, 2, 3, 12, 6), touched(true, 6), "a write across two extents of another volume");
        assert_eq!(al.extents().collect::<Vec<_>>(), vec![(0, 0, 4096), (1, 0, 4096), (1, 4096, 4096)]);
        // Not durable on both sites yet: nothing retires.
        assert!(!al.retire(1, 100));
        assert!(al.waits_for_durability(1, 100));
        // Durable through 3, but volume 1's extents were touched at 12: only
        // those idle since before 12 retire.
        assert!(al.retire(3, 12));
        assert_eq!(al.len(), 2);
        let decoded = ActivityLog::decode(&al.encode()).unwrap();
        assert_eq!(decoded.extents().collect::<Vec<_>>(), al.extents().collect::<Vec<_>>());
        // A decoded log never retires by itself (its writes are unknown)...
        let mut d = decoded;
        assert!(!d.retire(u64::MAX - 1, u64::MAX - 1));
        // ... until told which sequence its extents wait for.
        d.assume_written(7, 50);
        assert!(!d.retire(6, 51));
        assert!(d.retire(7, 51));
        assert!(d.is_empty());
        let mut bad = al.encode();
        let n = bad.len();
        bad[n - 10] ^= 1;
        assert_eq!(ActivityLog::decode(&bad), Err(ActivityLogError::BadCrc));
        assert_eq!(ActivityLog::decode(b"nonsense"), Err(ActivityLogError::Malformed));
    }

    /// `make_room` then `touch`, as the daemon admits a write.
    fn admit(al: &mut ActivityLog, index: u64, seq: u64, durable_both: u64) -> Result<usize, Full> {
        let evicted = al.make_room(0, index * E, E, durable_both)?;
        let t = al.touch(0, index * E, E, seq, seq, seq);
        assert!(!t.over_budget, "room was made, yet the log is over its budget: {t:?}");
        Ok(evicted)
    }

    #[test]
    fn the_budget_holds_and_the_least_recently_written_extent_goes_first() {
        let mut al = ActivityLog::new(E);
        al.set_budget(4);
        for i in 0..4 {
            assert_eq!(admit(&mut al, i, i + 1, 0), Ok(0), "room for the first four extents");
        }
        // Extent 0 is written again: extent 1 is now the least recently
        // written.
        assert_eq!(admit(&mut al, 0, 5, 0), Ok(0), "a write to a hot extent needs no room");
        assert_eq!(al.len(), 4);
        // Everything durable on both sites: one eviction per new extent, LRU
        // first, idle or not.
        assert_eq!(admit(&mut al, 10, 6, 6), Ok(1));
        assert_eq!(hot0(&al), vec![0, 2, 3, 10], "extent 1 (newest write 2) went first");
        assert_eq!(admit(&mut al, 11, 7, 7), Ok(1));
        assert_eq!(hot0(&al), vec![0, 3, 10, 11], "then extent 2 (newest write 3)");
        for (n, i) in (20..60).enumerate() {
            let seq = 8 + n as u64;
            assert_eq!(admit(&mut al, i, seq, seq), Ok(1));
            assert_eq!(al.len(), 4, "never more than the budget");
        }
        assert_eq!(hot0(&al), vec![56, 57, 58, 59], "the four most recently written");
        // The encoded log shrinks with it.
        assert_eq!(ActivityLog::decode(&al.encode()).unwrap().len(), 4);
    }

    #[test]
    fn only_extents_durable_on_both_sites_are_evicted_and_otherwise_the_write_must_wait() {
        let mut al = ActivityLog::new(E);
        al.set_budget(3);
        for i in 0..3 {
            admit(&mut al, i, 10 + i, 0).unwrap();
        }
        let before = al.clone();
        // Writes through 9 are durable on both sites, but extent 0's newest
        // write is 10: nothing may go, and nothing changes.
        assert_eq!(al.make_room(0, 7 * E, E, 9), Err(Full { durable_through: 10 }));
        assert_eq!(al, before, "a refusal evicts nothing");
        // Durable through 10: exactly extent 0 can go, and goes.
        assert_eq!(admit(&mut al, 7, 13, 10), Ok(1));
        assert_eq!(hot0(&al), vec![1, 2, 7]);
        // A write of two new extents needs two evictions: extents 1 (11) and
        // 2 (12); with only 11 durable it waits for 12.
        assert_eq!(al.make_room(0, 8 * E, 2 * E, 11), Err(Full { durable_through: 12 }));
        assert_eq!(al.make_room(0, 8 * E, 2 * E, 12), Ok(2));
        al.touch(0, 8 * E, 2 * E, 14, 14, 14);
        assert_eq!(hot0(&al), vec![7, 8, 9]);
        // Idleness does not matter for eviction (retire still needs it).
        assert!(!al.retire(14, 0), "nothing idle: nothing retires");
        assert_eq!(admit(&mut al, 3, 15, 14), Ok(1));
    }

    #[test]
    fn a_write_spanning_more_extents_than_the_budget_still_goes_in() {
        let mut al = ActivityLog::new(E);
        al.set_budget(2);
        admit(&mut al, 0, 1, 0).unwrap();
        admit(&mut al, 1, 2, 0).unwrap();
        // Five extents (4..=8), two of them overlapping nothing hot: every
        // other extent must go first, then the write alone fills the log.
        assert_eq!(al.make_room(0, 4 * E, 5 * E, 1), Err(Full { durable_through: 2 }));
        assert_eq!(al.make_room(0, 4 * E, 5 * E, 2), Ok(2));
        let t = al.touch(0, 4 * E, 5 * E, 3, 3, 3);
        assert!(t.became_hot && !t.over_budget, "{t:?}");
        assert_eq!(hot0(&al), vec![4, 5, 6, 7, 8]);
        // The next write with a new extent brings the log back towards the
        // budget: it waits until the big write is durable on both sites...
        assert_eq!(al.make_room(0, 8 * E, 2 * E, 2), Err(Full { durable_through: 3 }));
        // ... then takes the extents that can go, never its own (8).
        assert_eq!(al.make_room(0, 8 * E, 2 * E, 3), Ok(4));
        al.touch(0, 8 * E, 2 * E, 4, 4, 4);
        assert_eq!(hot0(&al), vec![8, 9]);
        // A trim over a whole 4 GiB volume (1024 extents of 4 MiB) with a
        // budget of 7: admitted once everything else can go.
        let mut big = ActivityLog::new(DEFAULT_EXTENT);
        big.set_budget(7);
        for i in 0..7 {
            big.make_room(1, i * DEFAULT_EXTENT, 1, i).unwrap();
            big.touch(1, i * DEFAULT_EXTENT, 1, i + 1, 0, 0);
        }
        assert_eq!(big.make_room(0, 0, 4 << 30, 6), Err(Full { durable_through: 7 }));
        assert_eq!(big.make_room(0, 0, 4 << 30, 7), Ok(7));
        assert!(!big.touch(0, 0, 4 << 30, 8, 0, 0).over_budget);
        assert_eq!(big.len(), 1024);
    }

    #[test]
    fn over_budget_when_the_caller_cannot_wait_then_back_within_it() {
        let mut al = ActivityLog::new(E);
        al.set_budget(2);
        // The secondary is away (nothing durable there): the caller goes
        // ahead anyway, and `touch` says the log is over its budget.
        for i in 0..5 {
            let seq = i + 1;
            let refused = al.make_room(0, i * E, E, 0);
            assert_eq!(refused.is_err(), i >= 2, "extent {i}: {refused:?}");
            let t = al.touch(0, i * E, E, seq, seq, seq);
            assert_eq!(t.over_budget, i >= 2, "extent {i}: {t:?}");
        }
        assert_eq!(al.len(), 5);
        // Back: writes through 3 are durable on both sites. A new extent
        // costs one eviction and takes the others that can go: 0, 1, 2.
        assert_eq!(al.make_room(0, 9 * E, E, 3), Ok(3));
        al.touch(0, 9 * E, E, 6, 6, 6);
        assert_eq!(hot0(&al), vec![3, 4, 9]);
        // A write to a hot extent needs no room, but still brings the log
        // back within budget as far as it can.
        assert_eq!(al.make_room(0, 9 * E, E, 4), Ok(1));
        assert_eq!(hot0(&al), vec![4, 9]);
        assert_eq!(al.make_room(0, 9 * E, E, 100), Ok(0), "within budget: nothing more goes");
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A write of `n` extents from `first` on `volume`; `force`: the
        /// caller goes ahead even if `make_room` refuses (link down).
        Write { volume: u32, first: u64, n: u64, force: bool },
        /// More writes become durable on both sites.
        Durable(u64),
        /// Housekeeping retires idle, durable extents.
        Retire(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..2u32, 0..24u64, 1..6u64, proptest::bool::weighted(0.1))
                .prop_map(|(volume, first, n, force)| Op::Write { volume, first, n, force }),
            3 => (0..4u64).prop_map(Op::Durable),
            1 => (0..20u64).prop_map(Op::Retire),
        ]
    }

    proptest::proptest! {
        /// Whatever happens, every extent with a write not durable on both
        /// sites is in the log (what a power cut resyncs), and the log
        /// stays within its budget unless a caller went ahead anyway.
        #[test]
        fn never_drops_an_extent_with_a_write_not_durable_on_both_sites(
            budget in 1..8usize,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut al = ActivityLog::new(E);
            al.set_budget(budget);
            let mut seq = 0u64;
            let mut durable_both = 0u64;
            let mut writes: Vec<(u32, u64, u64, u64)> = Vec::new();
            for (now, op) in ops.into_iter().enumerate() {
                let now = now as u64;
                match op {
                    Op::Write { volume, first, n, force } => {
                        let (offset, len) = (first * E + 100, n * E - 200);
                        let before = al.clone();
                        let room = al.make_room(volume, offset, len, durable_both);
                        match room {
                            Err(Full { durable_through }) => {
                                proptest::prop_assert_eq!(&al, &before, "a refusal changes nothing");
                                proptest::prop_assert!(durable_through > durable_both);
                                let mut later = al.clone();
                                proptest::prop_assert!(
                                    later.make_room(volume, offset, len, durable_through).is_ok(),
                                    "durable through {} is enough", durable_through
                                );
                                if !force {
                                    continue;
                                }
                            }
                            Ok(evicted) => proptest::prop_assert_eq!(before.len() - al.len(), evicted),
                        }
                        seq += 1;
                        let t = al.touch(volume, offset, len, seq, now, seq);
                        writes.push((volume, first, first + n - 1, seq));
                        let limit = budget.max(n as usize);
                        if room.is_ok() {
                            proptest::prop_assert!(
                                al.len() <= limit || al.len() <= before.len(),
                                "grew from {} to {} past {}", before.len(), al.len(), limit
                            );
                        }
                        proptest::prop_assert_eq!(t.over_budget, al.len() > limit);
                    }
                    Op::Durable(k) => durable_both = (durable_both + k).min(seq),
                    Op::Retire(idle) => {
                        al.retire(durable_both, now.saturating_sub(idle));
                    }
                }
                for &(v, first, last, s) in writes.iter().filter(|w| w.3 > durable_both) {
                    for i in first..=last {
                        proptest::prop_assert!(
                            al.hot.contains_key(&(v, i)),
                            "extent {}/{} of write {} (durable through {}) left the log", v, i, s, durable_both
                        );
                    }
                }
                let lru: BTreeSet<_> = al.hot.iter().map(|(&(v, i), h)| (h.newest_seq, v, i)).collect();
                proptest::prop_assert_eq!(&lru, &al.lru, "the LRU index follows the log");
            }
        }
    }
}
