//! The activity log's budget in the write path (`activity_log_extents`;
//! the rules are in `replicator_protocol::activity_log`).
//!
//! Admission asks the log for room before a journaled write takes its
//! sequence: the least recently written extents whose every write is durable
//! on both sites are evicted (the smaller log is saved lazily: a larger one
//! on disk only resyncs more). When the log is full of extents with writes
//! not yet durable on both sites, the write waits, without the group lock:
//! - here, one volume sync (for every write waiting) makes the writes
//!   durable that only wait for it;
//! - on the secondary, the checkpoint is its restore journal's durable
//!   point, which it syncs by itself every few milliseconds; a waiting write
//!   asks for it at once instead (a flush request, as a switchover's); a
//!   checkpoint that does not move for `link_timeout` while writes wait is
//!   treated as a sync-mode write that waited that long for an ack (the pair
//!   suspends, per `on_link_loss`);
//!
//! then admission is tried again. While nothing can make writes durable on
//! the secondary (no session, the pair suspended), writes are not held up:
//! the log grows past its budget (logged), and shrinks back once the
//! secondary catches up. The regions it then holds are the ones the
//! secondary lacks anyway (a resync or the journal must bring them over).

use std::time::Duration;

use super::write_path::WriteError;
use super::{lock, CheckpointWatch, Group, Inner};

/// A waiting write re-checks at least this often, whatever wakes it: the
/// check that the secondary's checkpoint still moves runs on it.
const RECHECK: Duration = Duration::from_millis(50);

/// One write's wait for room in the activity log.
#[derive(Debug, Default)]
pub(super) struct RoomWait {
    /// Counted in `replicator_activity_log_waits_total`.
    counted: bool,
    /// The secondary's checkpoint, and since when it has not moved.
    checkpoint: CheckpointWatch,
}

impl Group {
    /// Admission, under the group lock, before a journaled write to
    /// `[off, off + len)` of `vol` takes its sequence: `None` when the log
    /// has room (or must grow: see the module documentation), or the
    /// sequence through which writes must be durable on both sites before
    /// admission is tried again.
    pub(super) fn activity_log_room(&self, g: &mut Inner, vol: u32, off: u64, len: u64) -> Option<u64> {
        let durable_both = self.progress.borrow().checkpoint.min(g.replay_safe());
        match g.activity.make_room(vol, off, len, durable_both) {
            Ok(0) => None,
            Ok(_) => {
                // Evicted: saved with the next save (housekeeping asks for
                // one); a write that adds an extent asks for it at once.
                g.bitmap_dirty_since_save = true;
                None
            }
            Err(full) if self.replicating(g) => Some(full.durable_through),
            Err(_) => {
                if g.activity.len() <= g.activity.budget() {
                    tracing::warn!(
                        group = %self.cfg.name,
                        budget = g.activity.budget(),
                        "the activity log grows past its budget (activity_log_extents): writes cannot become durable \
                         on the secondary while the pair does not replicate; a power cut now resynchronises every \
                         region written since (status: activity_log_bytes); it shrinks back once the secondary catches up"
                    );
                }
                None
            }
        }
    }

    /// A write found the activity log full: waits until writes through
    /// `needed` may be durable on both sites (or something else changed),
    /// for the caller to try admission again.
    ///
    /// Nothing is left to a timer that an event can end: the secondary is
    /// asked to make `needed` durable now (a flush request, answered at
    /// once, where its group commit and coalesced acks would take up to
    /// 10 ms in async mode), and this node's volume writes wake the wait
    /// as they finish, so the one volume sync follows the last of them.
    pub(super) async fn wait_for_activity_log(&self, needed: u64, wait: &mut RoomWait) -> Result<(), WriteError> {
        if !wait.counted {
            wait.counted = true;
            self.counters.activity_log_waits.inc();
            tracing::debug!(group = %self.cfg.name, needed, "activity log full: a write waits for room");
        }
        let mut progress = self.progress.subscribe();
        let checkpoint = progress.borrow_and_update().checkpoint;
        // Listening before the volume writes are looked at: one finishing
        // after the look wakes this wait (see `Group::volume_written`).
        let room = self.activity_room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        let (local, written, ask, _waiting) = {
            let mut g = lock(&self.inner);
            // (Only a sequence taken: a flush request beyond every record
            // would never be sent, nor any after it.)
            let ask = checkpoint < needed && g.flush_wanted < needed && needed <= g.last_jseq;
            if ask {
                g.flush_wanted = needed;
            }
            (g.replay_safe(), g.volume_written.completed_through(), ask, RoomWaiter::new(self, &mut g))
        };
        if ask {
            self.ship_wake.notify_one();
        }
        if local < needed && written >= needed {
            // One sync for every write waiting: those that queued behind it
            // find the writes durable already.
            let _one = self.activity_sync.lock().await;
            if lock(&self.inner).replay_safe() < needed {
                self.sync_all().await?;
            }
            return Ok(());
        }
        if checkpoint >= needed {
            // Only this node's volume writes are still in flight.
            wait.checkpoint.reset();
        } else if wait.checkpoint.stalled(checkpoint, self.cfg.link_timeout) {
            self.ack_timeout();
        }
        // Woken by every ack and state change, and by this node's volume
        // writes finishing; the timer only bounds the link-timeout check.
        tokio::select! {
            _ = progress.changed() => {}
            () = room => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
        Ok(())
    }
}

/// One write waiting for room, counted in `Inner::activity_waiters` while
/// it lives.
struct RoomWaiter<'a>(&'a Group);

impl<'a> RoomWaiter<'a> {
    fn new(group: &'a Group, g: &mut Inner) -> Self {
        g.activity_waiters += 1;
        RoomWaiter(group)
    }
}

impl Drop for RoomWaiter<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.0.inner);
        g.activity_waiters = g.activity_waiters.saturating_sub(1);
    }
}
