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
//! Encoded form (little-endian): magic `RPLACTL1`, extent size (u64), count
//! (u64), then `count` entries of volume (u32) and extent index (u64), then
//! a CRC32 of everything before it.

use std::collections::BTreeMap;

use crate::record::crc32;

/// Default extent: 4 MiB.
pub const DEFAULT_EXTENT: u64 = 4 << 20;

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

/// The hot extents of a group's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityLog {
    extent: u64,
    hot: BTreeMap<(u32, u64), Hot>,
}

impl ActivityLog {
    /// An empty log with extents of `extent` bytes (rounded up to a power
    /// of two; 0 means [`DEFAULT_EXTENT`]).
    pub fn new(extent: u64) -> Self {
        let extent = if extent == 0 { DEFAULT_EXTENT } else { extent.checked_next_power_of_two().unwrap_or(1 << 63) };
        ActivityLog { extent, hot: BTreeMap::new() }
    }

    /// Extent size in bytes.
    pub fn extent(&self) -> u64 {
        self.extent
    }

    /// Number of hot extents.
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// No hot extent.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// Records write `seq` to `[offset, offset + len)` of `volume` at time
    /// `now`; extents that become hot are to be saved in save `next_save`.
    /// Returns whether an extent became hot (so save `next_save` must be
    /// started) and the save this write must wait for before it reaches the
    /// volume (the latest that adds one of its extents; an extent that was
    /// already hot may still be waiting for its save).
    pub fn touch(&mut self, volume: u32, offset: u64, len: u64, seq: u64, now: u64, next_save: u64) -> (bool, u64) {
        let first = offset / self.extent;
        let last = offset.saturating_add(len.max(1) - 1) / self.extent;
        let mut became_hot = false;
        let mut wait_for = 0;
        for index in first..=last {
            let entry = self.hot.entry((volume, index)).or_insert_with(|| {
                became_hot = true;
                Hot { newest_seq: 0, touched_at: now, saved_in: next_save }
            });
            entry.newest_seq = entry.newest_seq.max(seq);
            entry.touched_at = entry.touched_at.max(now);
            wait_for = wait_for.max(entry.saved_in);
        }
        (became_hot, wait_for)
    }

    /// Retires every extent whose newest write is at most `durable_seq`
    /// (durable on both sites) and that was not touched after
    /// `idle_before`. Returns whether any was retired (the smaller log may
    /// then be saved; a stale, larger one on disk is safe).
    pub fn retire(&mut self, durable_seq: u64, idle_before: u64) -> bool {
        let before = self.hot.len();
        self.hot.retain(|_, h| h.newest_seq > durable_seq || h.touched_at >= idle_before);
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

    /// Decodes [`ActivityLog::encode`]'s output. Its extents never retire
    /// until [`ActivityLog::assume_written`] says what they wait for.
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
        let mut hot = BTreeMap::new();
        for entry in body[HEADER_LEN..].chunks_exact(ENTRY_LEN) {
            let v = u32::from_le_bytes(entry[..4].try_into().unwrap_or([0; 4]));
            let i = u64::from_le_bytes(entry[4..].try_into().unwrap_or([0; 8]));
            hot.insert((v, i), Hot { newest_seq: u64::MAX, touched_at: 0, saved_in: 0 });
        }
        Ok(ActivityLog { extent, hot })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn touch_retire_and_round_trip() {
        let mut al = ActivityLog::new(4096);
        assert_eq!(al.touch(0, 0, 4096, 1, 10, 5), (true, 5), "a cold extent becomes hot in save 5");
        assert_eq!(al.touch(0, 100, 10, 2, 11, 6), (false, 5), "a hot extent needs no new save, but waits for save 5");
        assert_eq!(al.touch(1, 4095, 2, 3, 12, 6), (true, 6), "a write across two extents of another volume");
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
}
