//! What the primary does about its journal's space: whether a write that
//! finds the journal full waits or is tracked in the dirty bitmap instead
//! (bitmap mode), when bitmap mode ends, and how far journal space may be
//! freed. Decisions only; the daemon (`replicator/src/group/`) and the
//! simulation act on them.
//!
//! The rules, for an admin:
//! - **Sync mode while writes wait for the secondary** (PAIR or COPY, or
//!   the link lost with `on_link_loss = "block"`): a full journal is
//!   back-pressure. The write waits for the secondary to confirm records,
//!   however long; it never leaves the journal, because a write tracked in
//!   the bitmap is acknowledged without the secondary: that would drop RPO
//!   0 where only the link-loss policy may.
//! - **`on_journal_full = "block"`:** the write waits up to
//!   `journal_full_timeout` (measured from when the journal was first found
//!   full, not per write), then the group goes to bitmap mode.
//! - **`on_journal_full = "suspend"`** (the default): bitmap mode at once.
//! - **Leaving bitmap mode** needs the secondary connected and the journal
//!   at most half full, so that the resync that follows does not fill it
//!   again at once.
//! - **Journal space** is freed through the secondary's persisted
//!   checkpoint, and never above a record whose volume write here has not
//!   finished (its replay after a crash needs it).
//! - **When** it is freed: every [`RELEASE_INTERVAL`], or sooner once the
//!   journal is a quarter full or a write waits for space. Freeing persists
//!   the new tail first (a metadata save with two fsyncs); doing that on
//!   every housekeeping tick cost 5 saves a second per busy group (160 for
//!   32 groups) while the journal was nearly empty. A journal that is freed
//!   later only replays more (idempotent) records after a crash.

use std::time::Duration;

/// `on_journal_full` in the group's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Stop journaling at once and track writes in the dirty bitmap.
    Suspend,
    /// Wait up to `timeout` for space, then as [`FullPolicy::Suspend`].
    Block {
        /// `journal_full_timeout`.
        timeout: Duration,
    },
}

/// What a write that found no room in the journal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Wait for space (released as the secondary confirms records).
    Wait,
    /// Enter bitmap mode: the write, and every write after it until the
    /// resync, is tracked in the dirty bitmap instead of the journal.
    TrackInBitmap,
}

/// The situation of a write that found no room in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Sync mode, and writes are acknowledged only once the secondary has
    /// them (the pair is PAIR or COPY, or the link is lost with
    /// `on_link_loss = "block"`).
    pub sync_wait: bool,
    /// The configured policy.
    pub policy: FullPolicy,
    /// How long the journal has been full (since a write first found it
    /// so, with no write journaled since).
    pub full_for: Duration,
}

/// Decides what a write that found the journal full does.
pub fn on_full(full: Full) -> OnFull {
    if full.sync_wait {
        return OnFull::Wait;
    }
    match full.policy {
        FullPolicy::Block { timeout } if full.full_for < timeout => OnFull::Wait,
        FullPolicy::Block { .. } | FullPolicy::Suspend => OnFull::TrackInBitmap,
    }
}

/// Whether bitmap mode may end: the secondary is connected and the journal
/// is at most half full (`used` of `capacity` bytes).
pub fn may_leave_bitmap_mode(used: u64, capacity: u64, connected: bool) -> bool {
    connected && used < capacity / 2
}

/// A busy journal's space is freed at least this often (see the module
/// documentation).
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(2);

/// Whether to free journal space now: `used` of `capacity` bytes hold
/// records, `waiting` when a write waits for space or the group is in
/// bitmap mode, `since_last` since space was last freed.
pub fn release_due(used: u64, capacity: u64, waiting: bool, since_last: Duration) -> bool {
    waiting || used >= capacity / 4 || since_last >= RELEASE_INTERVAL
}

/// The record journal space may be freed through, if any: the secondary's
/// persisted checkpoint, capped by the records durable on the volumes here
/// (a contiguous prefix; the journal is the only durable copy of the others
/// a FLUSH covered), when that reaches the oldest retained record (`None`
/// when the journal is empty or nothing can be freed).
pub fn release_through(checkpoint: u64, volume_durable: u64, oldest: Option<u64>) -> Option<u64> {
    let through = checkpoint.min(volume_durable);
    oldest.filter(|&o| through >= o).map(|_| through)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn full(sync_wait: bool, policy: FullPolicy, full_for: Duration) -> OnFull {
        on_full(Full { sync_wait, policy, full_for })
    }

    #[test]
    fn a_full_journal_waits_or_goes_to_the_bitmap() {
        let block = FullPolicy::Block { timeout: 5 * SECOND };
        // Writes waiting for the secondary (sync): back-pressure, whatever
        // the policy and wait.
        assert_eq!(full(true, FullPolicy::Suspend, 100 * SECOND), OnFull::Wait);
        assert_eq!(full(true, block, 100 * SECOND), OnFull::Wait);
        // Async, or sync once the link-loss policy let writes go on: the
        // journal-full policy decides.
        assert_eq!(full(false, FullPolicy::Suspend, Duration::ZERO), OnFull::TrackInBitmap);
        assert_eq!(full(false, block, 4 * SECOND), OnFull::Wait);
        assert_eq!(full(false, block, 5 * SECOND), OnFull::TrackInBitmap);
    }

    #[test]
    fn bitmap_mode_ends_connected_with_the_journal_half_empty() {
        assert!(may_leave_bitmap_mode(0, 100, true));
        assert!(may_leave_bitmap_mode(49, 100, true));
        assert!(!may_leave_bitmap_mode(50, 100, true));
        assert!(!may_leave_bitmap_mode(0, 100, false));
    }

    #[test]
    fn space_is_freed_when_it_may_be_needed_or_every_interval() {
        let soon = RELEASE_INTERVAL / 4;
        assert!(!release_due(0, 100, false, soon), "an empty journal waits for the interval");
        assert!(!release_due(24, 100, false, soon));
        assert!(release_due(25, 100, false, soon), "a quarter full");
        assert!(release_due(0, 100, true, soon), "a write waits for space");
        assert!(release_due(0, 100, false, RELEASE_INTERVAL));
    }

    #[test]
    fn space_is_freed_through_the_checkpoint_and_the_volume_writes() {
        assert_eq!(release_through(10, 20, Some(5)), Some(10));
        assert_eq!(release_through(20, 10, Some(5)), Some(10), "a record not yet durable on the volume is kept");
        assert_eq!(release_through(4, 20, Some(5)), None, "nothing older than the checkpoint");
        assert_eq!(release_through(10, 20, None), None, "an empty journal");
        assert_eq!(release_through(5, 5, Some(5)), Some(5));
    }
}
