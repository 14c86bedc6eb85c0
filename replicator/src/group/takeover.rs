//! Unplanned failover (`replicator failover`) and the fencing of the
//! primary it supersedes.
//!
//! The secondary takes over: it ends its replication session (the drain
//! applies every record its restore journal holds, so its volumes are the
//! primary's image after exactly the writes through some N), starts a new
//! generation and becomes primary of the same pair, with an empty journal
//! that continues after N. It says which recovery point it achieved.
//!
//! The old primary learns it was superseded by the generation check when
//! the two meet again (whichever of them connects first) and fences itself:
//! it accepts no writes from then on, across restarts, and says what to do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator_protocol::activity_log::ActivityLog;
use replicator_protocol::bitmap::DirtyBitmap;
use replicator_protocol::journal_format::{JournalRing, JOURNAL_SUPERBLOCK_LEN};
use replicator_protocol::pair::{PairEvent, PairState, Role, SuspendReason};
use replicator_protocol::seqtrack::SeqTracker;
use replicator_protocol::sequencer::RangeSequencer;

use super::{journal_path, lock, Group, GroupError, Inner, SessionCommand};
use crate::config::Mode;
use crate::journal::Journal;
use crate::state::Announce;

/// How long a failover waits for the replication session to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

impl Group {
    /// `failover` on the secondary: promote the last consistent image.
    /// Refused while the primary is connected (unless `force`), and while
    /// the image is inconsistent (a copy or resync was running; unless
    /// `force`). Returns the report for the admin.
    pub async fn failover(self: &Arc<Self>, force: bool) -> Result<String, GroupError> {
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        let session = {
            let g = lock(&self.inner);
            if g.role != Role::Secondary {
                return Err(GroupError::Failed(format!(
                    "group {name} is {} here, not a secondary: there is nothing to fail over to on this node",
                    if g.role == Role::Primary { "already the primary" } else { "not paired (SIMPLEX)" }
                )));
            }
            if g.secondary_attached && !force {
                return Err(GroupError::Refused(format!(
                    "group {name}: the primary {peer} is connected and replicating ({}); a failover now would leave two \
                     primaries. For a planned change use `replicator switchover {name}`; if {peer} must be abandoned \
                     anyway, run `replicator failover {name} --force`",
                    g.state
                )));
            }
            g.session_cmd.clone()
        };
        if let Some(session) = session {
            let _ = session.send(SessionCommand::End);
        }
        // The session drains (every record in the restore journal is
        // applied and durable) and detaches.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while lock(&self.inner).secondary_attached {
            if Instant::now() >= deadline {
                return Err(GroupError::Failed(format!(
                    "group {name}: the replication session did not finish applying within {}s; nothing changed",
                    DRAIN_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (pair_id, inconsistent) = {
            let g = lock(&self.inner);
            (g.persisted.pair_id, g.persisted.copy_incomplete || !g.persisted.consistent)
        };
        if inconsistent && !force {
            return Err(GroupError::Refused(format!(
                "group {name}: this replica is not consistent (an initial copy or resync had not finished): its volumes \
                 hold a mix of old and new data that no application ever wrote. `replicator failover {name} --force` \
                 promotes it anyway"
            )));
        }
        // A fresh journal for the new generation (the restore journal is
        // fully applied by now).
        let journal =
            Journal::open(&self.engine, &journal_path(&self.store), self.cfg.journal_size, &name, pair_id, true)
                .await?;
        let report = {
            let mut g = lock(&self.inner);
            if g.role != Role::Secondary || g.secondary_attached {
                return Err(GroupError::Failed(format!(
                    "group {name}: the pair changed while the failover ran ({}); nothing changed",
                    g.state
                )));
            }
            let report = recovery_point(self.cfg.mode, &g, &peer);
            promote(&mut g, journal);
            // Writes wait for every earlier record to be journaled: all
            // through the recovery point are.
            let n = g.last_jseq;
            self.journaled_through.send_modify(|t| *t = (*t).max(n));
            self.save_bitmaps(&mut g);
            tracing::warn!(group = %name, generation = g.persisted.generation, "failover: this node is now the primary; {report}");
            self.save_locked(&mut g);
            self.publish(&mut g);
            report
        };
        self.start_shipping();
        Ok(format!(
            "group {name}: failover done; this node is now the primary (generation {}), its volumes are writable.\n{report}\n\
             The old primary {peer} is fenced when it reconnects: it will accept no writes.",
            lock(&self.inner).persisted.generation
        ))
    }

    /// A failover on the peer superseded this primary (generation
    /// `generation`): stop accepting writes, for good, and say so.
    pub(super) fn fence(&self, g: &mut Inner, generation: u64) {
        if g.persisted.superseded_by >= generation {
            return;
        }
        let name = &self.cfg.name;
        let msg = format!(
            "group {name}: {} took over as primary after a failover (generation {generation}); this node no longer \
             accepts writes. Its writes after the failover's recovery point are not on {}. To rejoin: \
             `replicator pair delete {name}` here and on {}, then `replicator pair create {name}` on {} (full copy)",
            self.cfg.peer, self.cfg.peer, self.cfg.peer, self.cfg.peer
        );
        tracing::error!(group = %name, "{msg}");
        g.persisted.superseded_by = generation;
        g.last_error = Some(msg.clone());
        g.refusal = Some("superseded");
        self.transition(g, PairEvent::Failure, &msg);
        self.save_locked(g);
        self.session_kick.send_modify(|k| *k += 1);
    }
}

/// What the promoted image holds, in words: the sequence, the primary's
/// time of that write, and (async) what the primary last reported beyond
/// it.
fn recovery_point(mode: Mode, g: &Inner, peer: &str) -> String {
    let p = &g.persisted;
    let n = p.durable_seq;
    let when = if p.data_as_of_us == 0 { "unknown time".to_string() } else { format_time(p.data_as_of_us) };
    let mut out = format!("Recovery point: sequence {n} (generation {}), written on {peer} at {when}.", p.generation);
    match mode {
        Mode::Sync => {
            out.push_str(" Sync mode: it holds every write the primary acknowledged while the pair was in PAIR.")
        }
        Mode::Async => {
            if p.primary_reported_seq > n {
                out.push_str(&format!(
                    " Async mode: {peer} last reported (at {}) records up to {}: {} record(s), {} byte(s) beyond the \
                     recovery point that this node never received.",
                    format_time(p.primary_reported_at_us),
                    p.primary_reported_seq,
                    p.primary_reported_seq - n,
                    p.primary_reported_bytes
                ));
            } else {
                out.push_str(&format!(" Async mode: {peer} had reported nothing beyond it."));
            }
        }
    }
    out
}

fn format_time(us: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| format!("{us} µs since the epoch"))
}

/// The role change itself: primary of the same pair in a new generation,
/// journal empty and continuing after the recovery point, no peer yet.
fn promote(g: &mut Inner, journal: Journal) {
    let n = g.persisted.durable_seq;
    let capacity = journal.capacity();
    g.role = Role::Primary;
    g.persisted.role = Role::Primary;
    g.persisted.generation += 1;
    g.persisted.journal_tail_seq = n + 1;
    g.persisted.journal_tail_pos = JOURNAL_SUPERBLOCK_LEN;
    g.persisted.copy_pending = false;
    g.persisted.bitmap_mode = false;
    g.persisted.announce = Announce::Resume;
    g.persisted.copy_incomplete = false;
    g.persisted.consistent = true;
    g.journal = Some(Arc::new(journal));
    let mut ring = JournalRing::new(capacity);
    ring.reset_at(JOURNAL_SUPERBLOCK_LEN);
    g.ring = Some(ring);
    g.seq = RangeSequencer::new(1);
    g.last_jseq = n;
    g.ready = SeqTracker::new(n);
    g.volume_written = SeqTracker::new(n);
    g.local_durable = n;
    g.entries.clear();
    g.cached_bytes = 0;
    g.cumulative_bytes = 0;
    for b in &mut g.bitmaps {
        *b = DirtyBitmap::new(b.volume_size(), b.granularity());
    }
    g.activity = ActivityLog::new(g.activity.extent());
    g.session = None;
    g.refusal = None;
    g.last_error = None;
    g.link_down_since = Some(Instant::now());
    g.state = PairState::Suspended(SuspendReason::Link);
}
