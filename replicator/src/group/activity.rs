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
//!   point, which it syncs continuously (no FLUSH needs to be asked for); a
//!   checkpoint that does not move for `link_timeout` while writes wait is
//!   treated as a sync-mode write that waited that long for an ack (the pair
//!   suspends, per `on_link_loss`);
//!
//! then admission is tried again. While nothing can make writes durable on
//! the secondary (no session, the pair suspended), writes are not held up:
//! the log grows past its budget (logged), and shrinks back once the
//! secondary catches up. The regions it then holds are the ones the
//! secondary lacks anyway (a resync or the journal must bring them over).

use std::time::{Duration, Instant};

use super::write_path::WriteError;
use super::{lock, Group, Inner};

/// A waiting write re-checks at least this often (a volume write it waits
/// for may finish without anything else waking it).
const RECHECK: Duration = Duration::from_millis(50);

/// One write's wait for room in the activity log.
#[derive(Debug, Default)]
pub(super) struct RoomWait {
    /// Counted in `replicator_activity_log_waits_total`.
    counted: bool,
    /// The secondary's checkpoint, and since when it has not moved.
    checkpoint_since: Option<(u64, Instant)>,
}

impl Group {
    /// Admission, under the group lock, before a journaled write to
    /// `[off, off + len)` of `vol` takes its sequence: `None` when the log
    /// has room (or must grow: see the module documentation), or the
    /// sequence through which writes must be durable on both sites before
    /// admission is tried again.
    pub(super) fn activity_log_room(&self, g: &mut Inner, vol: u32, off: u64, len: u64) -> Option<u64> {
        let durable_both = self.progress.borrow().checkpoint.min(g.local_durable);
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
    pub(super) async fn wait_for_activity_log(&self, needed: u64, wait: &mut RoomWait) -> Result<(), WriteError> {
        if !wait.counted {
            wait.counted = true;
            self.counters.activity_log_waits.inc();
            tracing::debug!(group = %self.cfg.name, needed, "activity log full: a write waits for room");
        }
        let mut progress = self.progress.subscribe();
        let (local, written) = {
            let g = lock(&self.inner);
            (g.local_durable, g.volume_written.completed_through())
        };
        if local < needed && written >= needed {
            // One sync for every write waiting: those that queued behind it
            // find the writes durable already.
            let _one = self.activity_sync.lock().await;
            if lock(&self.inner).local_durable < needed {
                self.sync_all().await?;
            }
            return Ok(());
        }
        let checkpoint = progress.borrow_and_update().checkpoint;
        if checkpoint >= needed {
            // Only this node's volume writes are still in flight.
            wait.checkpoint_since = None;
        } else {
            match wait.checkpoint_since {
                Some((seen, since)) if seen == checkpoint => {
                    if since.elapsed() >= self.cfg.link_timeout {
                        self.ack_timeout();
                        wait.checkpoint_since = None;
                    }
                }
                _ => wait.checkpoint_since = Some((checkpoint, Instant::now())),
            }
        }
        // Woken by every ack and state change.
        let _ = tokio::time::timeout(RECHECK, progress.changed()).await;
        Ok(())
    }
}
