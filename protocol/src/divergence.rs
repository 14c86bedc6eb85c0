//! Where two sites of a pair may differ, and who must overwrite whom.
//!
//! Every lifecycle command that ends with one site overwriting the other
//! (failback, `pair resync --swap`, `pair resync --discard-local`, a resync
//! after `pair split --rw`) works the same way:
//!
//! 1. The side that loses (it becomes, or stays, the secondary) collects the
//!    regions where its volumes may differ from the last image both sites
//!    shared: its dirty bitmaps, plus every retained journal record beyond
//!    that image (all of them when it cannot tell where that image ends).
//!    It persists them as its own dirty bitmaps and marks itself as needing
//!    a rebase.
//! 2. Asked to resume, it refuses with `REFUSAL_NEEDS_REBASE` and those
//!    regions ([`to_extents`]).
//! 3. The primary adds them ([`apply_extents`]) and the regions of every
//!    record in its own journal to its dirty bitmaps, persists them, and
//!    opens again with `RESYNC`, rebasing the secondary on its newest
//!    journaled record: the copy covers the union of both sides' changes,
//!    records after the rebase point follow as usual.
//!
//! The loser drops its regions only when it accepts that `RESYNC`: by then
//! they are durable in the primary's bitmaps. So no fault between the steps
//! loses the knowledge of where the sites differ.

use crate::bitmap::DirtyBitmap;
use crate::pb;

/// Most extents one reply carries; beyond it whole volumes are named (the
/// reply stays well under the frame limit; the copy is then larger).
pub const MAX_EXTENTS: usize = 65_536;

/// The last record of the old generation a promoted primary's image held
/// (its takeover point), in the epoch that record belonged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakeoverPoint {
    /// Sequence of that record.
    pub seq: u64,
    /// Epoch of the sequence space it belongs to.
    pub epoch: u64,
}

/// What a former primary holds beyond a takeover point, as far as it can
/// tell without reading its journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormerPrimary {
    /// Its newest journaled record.
    pub last_seq: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Bytes its dirty bitmaps mark (writes not journaled, or regions not
    /// yet copied to the peer).
    pub bitmap_bytes: u64,
    /// A sync primary that knows every write it acknowledged reached the
    /// peer: whatever it holds beyond the takeover point was never
    /// acknowledged (a write in flight when it crashed).
    pub acked_all_on_peer: bool,
}

/// Whether a former primary holds acknowledged writes the promoted one
/// lacks: records after the takeover point, bitmap-tracked writes, or a
/// sequence space that is not the one the takeover point belongs to (it
/// restarted after a power cut: its records cannot be compared). Unknown
/// point: yes. Not when it acknowledged every write only once the peer had
/// it: its records beyond the point, and the regions its bitmaps mark
/// (those its activity log named after a power cut, writes in flight
/// then), hold nothing it acknowledged that the peer lacks, and discarding
/// them (failback copies the peer's data over them) loses nothing a client
/// was told is written. (Every way a primary's bitmaps take acknowledged
/// writes the peer lacks clears that flag first: writes acknowledged alone,
/// a journal-full suspension, `verify --fix`, a rebase of the peer; and it
/// is set again only once RPO 0 holds with nothing owed to the peer.)
pub fn wrote_beyond(former: FormerPrimary, point: Option<TakeoverPoint>) -> bool {
    if former.acked_all_on_peer {
        return false;
    }
    match point {
        Some(p) => former.bitmap_bytes > 0 || former.epoch != p.epoch || former.last_seq > p.seq,
        None => true,
    }
}

/// Which of a former primary's journal records may be missing on the peer
/// that took over at `point`: those after it, or all when the epochs differ
/// or the point is unknown.
pub fn records_beyond(point: Option<TakeoverPoint>, epoch: u64) -> u64 {
    match point {
        Some(p) if p.epoch == epoch => p.seq,
        _ => 0,
    }
}

/// The dirty chunks of `bitmaps` as extents (runs of dirty chunks). More
/// than [`MAX_EXTENTS`] runs: each volume with dirty chunks is named whole.
pub fn to_extents(bitmaps: &[DirtyBitmap]) -> Vec<pb::Extent> {
    let mut out = Vec::new();
    for (v, b) in bitmaps.iter().enumerate() {
        let mut chunk = 0;
        while let Some(first) = b.next_dirty(chunk) {
            let mut last = first;
            while b.is_chunk_dirty(last + 1) {
                last += 1;
            }
            let (offset, _) = b.chunk_range(first);
            let (end_off, end_len) = b.chunk_range(last);
            out.push(pb::Extent { volume: v as u32, offset, length: end_off + end_len - offset });
            chunk = last + 1;
        }
    }
    if out.len() > MAX_EXTENTS {
        out = bitmaps
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.is_clean())
            .map(|(v, b)| pb::Extent { volume: v as u32, offset: 0, length: b.volume_size() })
            .collect();
    }
    out
}

/// A peer's extent that does not fit the group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    /// More extents than any honest peer sends.
    #[error("{0} divergent extents (at most {MAX_EXTENTS})")]
    TooMany(usize),
    /// Volume index or range outside the group's volumes.
    #[error("divergent extent {volume}:{offset}+{length} is outside the group's volumes")]
    OutOfRange {
        /// Volume index.
        volume: u32,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
}

/// Marks the peer's `extents` in `bitmaps`, all or nothing.
pub fn apply_extents(bitmaps: &mut [DirtyBitmap], extents: &[pb::Extent]) -> Result<u64, ExtentError> {
    if extents.len() > MAX_EXTENTS {
        return Err(ExtentError::TooMany(extents.len()));
    }
    for e in extents {
        let fits = bitmaps
            .get(e.volume as usize)
            .is_some_and(|b| e.offset.checked_add(e.length).is_some_and(|end| end <= b.volume_size()));
        if !fits {
            return Err(ExtentError::OutOfRange { volume: e.volume, offset: e.offset, length: e.length });
        }
    }
    let mut bytes = 0;
    for e in extents {
        bitmaps[e.volume as usize].set_range(e.offset, e.length);
        bytes += e.length;
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn extents_round_trip() {
        let mut a = vec![DirtyBitmap::new(8 * MIB, 64 << 10), DirtyBitmap::new(MIB + 5, 64 << 10)];
        a[0].set_range(0, 100);
        a[0].set_range(MIB, 3 * MIB);
        a[1].set_range(MIB, 1);
        let ext = to_extents(&a);
        assert_eq!(ext.len(), 3);
        assert_eq!((ext[2].volume, ext[2].offset, ext[2].length), (1, MIB, 5));
        let mut b = vec![DirtyBitmap::new(8 * MIB, 64 << 10), DirtyBitmap::new(MIB + 5, 64 << 10)];
        apply_extents(&mut b, &ext).unwrap();
        assert_eq!(a[0].encode(), b[0].encode());
        assert_eq!(a[1].encode(), b[1].encode());
    }

    #[test]
    fn many_runs_name_whole_volumes() {
        let mut a = vec![DirtyBitmap::new(20_000 * MIB, 64 << 10)];
        for i in 0..(MAX_EXTENTS as u64 + 1) {
            a[0].set_range((i * 256) << 10, 1);
        }
        let ext = to_extents(&a);
        assert_eq!(ext.len(), 1);
        assert_eq!((ext[0].offset, ext[0].length), (0, 20_000 * MIB));
    }

    #[test]
    fn hostile_extents_change_nothing() {
        let mut b = vec![DirtyBitmap::new(MIB, 64 << 10)];
        let bad =
            [pb::Extent { volume: 0, offset: 0, length: 1 }, pb::Extent { volume: 0, offset: u64::MAX, length: 2 }];
        assert!(apply_extents(&mut b, &bad).is_err());
        assert!(b[0].is_clean());
        assert!(apply_extents(&mut b, &[pb::Extent { volume: 1, offset: 0, length: 1 }]).is_err());
        let many = vec![pb::Extent::default(); MAX_EXTENTS + 1];
        assert_eq!(apply_extents(&mut b, &many), Err(ExtentError::TooMany(MAX_EXTENTS + 1)));
    }

    #[test]
    fn beyond_the_takeover_point() {
        let p = Some(TakeoverPoint { seq: 10, epoch: 2 });
        let f =
            |last_seq, epoch, bitmap_bytes| FormerPrimary { last_seq, epoch, bitmap_bytes, acked_all_on_peer: false };
        assert!(!wrote_beyond(f(10, 2, 0), p));
        assert!(!wrote_beyond(f(7, 2, 0), p));
        assert!(wrote_beyond(f(11, 2, 0), p));
        assert!(wrote_beyond(f(10, 3, 0), p));
        assert!(wrote_beyond(f(10, 2, 4096), p));
        assert!(wrote_beyond(f(0, 0, 0), None));
        // A sync primary that acknowledged nothing the peer lacks: records
        // beyond the point and the regions of its activity log after a
        // power cut (in flight when it went down) were never acknowledged.
        let sync =
            |last_seq, epoch, bitmap_bytes| FormerPrimary { last_seq, epoch, bitmap_bytes, acked_all_on_peer: true };
        assert!(!wrote_beyond(sync(11, 2, 0), p));
        assert!(!wrote_beyond(sync(10, 3, 0), p));
        assert!(!wrote_beyond(sync(11, 2, 0), None));
        assert!(!wrote_beyond(sync(11, 3, 4096), p));
        assert_eq!(records_beyond(p, 2), 10);
        assert_eq!(records_beyond(p, 3), 0);
        assert_eq!(records_beyond(None, 2), 0);
    }
}
