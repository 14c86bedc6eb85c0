//! Role changes: planned switchover, unplanned failover, and the fencing
//! of a primary a failover superseded.
//!
//! Switchover (on the primary): new writes are refused, the ones in flight
//! finish, the secondary confirms it holds the last record durably, it
//! takes over (a new generation) and confirms, and this node becomes its
//! secondary with nothing to copy: the new primary's journal continues
//! after the last record both hold.
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

use replicator_protocol::bitmap::DirtyBitmap;
use replicator_protocol::journal_format::{JournalRing, JOURNAL_SUPERBLOCK_LEN};
use replicator_protocol::pair::{PairEvent, PairState, Role, SuspendReason};
use replicator_protocol::seqtrack::SeqTracker;

use tokio::sync::oneshot;

use super::{lock, Group, GroupError, Inner, SessionCommand};
use crate::config::Mode;
use crate::journal::Journal;
use crate::state::{PrimaryState, RoleState, SecondaryState, TakeoverPoint};

/// How long a failover waits for the replication session to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a failover without a session asks the primary whether it lives.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long each step of a switchover may take.
const SWITCHOVER_STEP: Duration = Duration::from_secs(30);
/// How long a switchover waits for NBD clients that are detaching before
/// it refuses for them.
const CLIENTS_DETACH_GRACE: Duration = Duration::from_secs(1);

/// A switchover in progress on the primary.
#[derive(Debug)]
pub(super) struct Switchover {
    /// The last record; the secondary must hold it durably.
    pub(super) seq: u64,
    /// The epoch of that record (a restart meanwhile starts a new one).
    pub(super) epoch: u64,
    /// The command is on the stream.
    pub(super) sent: bool,
    /// Told when the secondary took over (or refused to).
    pub(super) confirmed: Option<oneshot::Sender<Result<(), String>>>,
}

fn is_stale(g: &Inner) -> bool {
    g.switchover.as_ref().is_some_and(|s| s.sent && g.last_jseq > s.seq)
}

/// Why a switchover's hand-over did not complete.
enum HandOver {
    /// Before the secondary was asked to take over, or it refused: nothing
    /// changed.
    Abandoned(String),
    /// The secondary was asked and did not answer in time: it may have
    /// taken over.
    Unconfirmed { error: String, last: u64, confirmation: oneshot::Receiver<Result<(), String>> },
}

impl Group {
    /// `failover` on the secondary: promote the last consistent image.
    /// Refused while the primary is connected (unless `force`), and while
    /// the image is inconsistent (a copy or resync was running; unless
    /// `force`). Returns the report for the admin.
    pub async fn failover(self: &Arc<Self>, force: bool) -> Result<String, GroupError> {
        self.refuse_if_stopped()?;
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        // Without a session nothing here tells whether the primary lives:
        // it is asked (one that answers as this pair's primary takes
        // writes, or will: right after a switchover, say, before its
        // session is up; a split one most likely still takes writes).
        let (split, attached, pair_id) = {
            let g = lock(&self.inner);
            (g.split(), g.secondary_attached, g.persisted.pair_id)
        };
        let answer = if force || attached { None } else { self.query_peer(pair_id, PROBE_TIMEOUT).await };
        let primary_reachable = split && answer.is_some();
        let session = {
            let mut g = lock(&self.inner);
            if g.role() != Role::Secondary {
                return Err(GroupError::Failed(format!(
                    "group {name} is {} here, not a secondary: there is nothing to fail over to on this node",
                    if g.role() == Role::Primary { "already the primary" } else { "not paired (SIMPLEX)" }
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
            if g.split() && !force && primary_reachable {
                // The split stopped the replication, not the primary: it
                // is reachable, and most likely still takes writes.
                return Err(GroupError::Refused(format!(
                    "group {name} was split by an admin and the primary {peer} is reachable (it most likely still \
                     takes writes): a failover now would leave two primaries (SPLIT-BRAIN). To make this site the \
                     primary with its data, run `replicator pair resync {name} --swap` here ({peer}'s writes since \
                     the split are overwritten); if {peer} must be abandoned anyway, run `replicator failover {name} \
                     --force`"
                )));
            }
            if let Some(live) = answer.as_ref().filter(|a| a.live_primary && !split && !force) {
                return Err(GroupError::Refused(format!(
                    "group {name}: the primary {peer} is up and answers as this pair's primary ({}), but its \
                     replication session to this node is not running yet: a failover now would leave two primaries. \
                     Wait for the session (after a switchover it comes within seconds: `replicator status {name}` \
                     says connected); for a planned change use `replicator switchover {name}`; if {peer} must be \
                     abandoned anyway, run `replicator failover {name} --force`",
                    replicator_protocol::wire::peer_text(&live.state)
                )));
            }
            if g.refusal == Some("not-paired") && !force {
                // The peer said it left the pair (`pair_query.rs`): there
                // is no pair to take over, and a primary here would only be
                // refused by it.
                return Err(GroupError::Refused(format!(
                    "group {name}: the primary {peer} left this pair (see last_error): there is no pair to fail over \
                     in. Run `replicator pair delete {name}` here to make this node's volumes standalone and \
                     writable, then `replicator pair create {name}` here to pair again with this site's data (a \
                     full copy; {peer} needs accept_pair_create = true); `failover {name} --force` makes this node \
                     a primary of the old pair all the same"
                )));
            }
            if g.taking_over {
                return Err(GroupError::Failed(format!("group {name}: a failover is already running here")));
            }
            if g.switching {
                // A switchover's demotion is being finished: its journal
                // is about to be replaced.
                return Err(GroupError::Failed(format!(
                    "group {name}: a switchover is finishing here; retry in a moment"
                )));
            }
            if g.drill_starting {
                // Its copy-on-write image is not attached yet: writes of the
                // new primary would reach the volumes under it.
                return Err(GroupError::Failed(format!("group {name}: a drill is starting here; retry in a moment")));
            }
            // From here no new replication session is accepted, so the
            // restore journal stays this command's until the promotion.
            g.taking_over = true;
            g.session_cmd.clone()
        };
        let result = self.take_over_now(force, session).await;
        if result.is_err() {
            lock(&self.inner).taking_over = false;
        }
        result
    }

    /// The failover after its claim: drain the session, judge the image,
    /// promote it.
    async fn take_over_now(
        self: &Arc<Self>,
        force: bool,
        session: Option<tokio::sync::mpsc::UnboundedSender<SessionCommand>>,
    ) -> Result<String, GroupError> {
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
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
        // A drain that failed stopped the group: the restore journal holds
        // records the volumes lack, and only the restart's replay puts them
        // there; promoting would drop it (even with `force`).
        self.refuse_if_stopped()?;
        let (pair_id, epoch, inconsistent) = {
            let g = lock(&self.inner);
            let inconsistent = g.persisted.role.as_secondary().is_some_and(|s| s.copy_incomplete || !s.consistent);
            (g.persisted.pair_id, g.persisted.epoch, inconsistent)
        };
        // In the middle of a resync: back to the consistent image it
        // preserved (resync_guard.rs), if it did.
        let rolled_back = if inconsistent { self.roll_back_resync().await? } else { None };
        let inconsistent = inconsistent && rolled_back.is_none();
        if inconsistent && !force {
            return Err(GroupError::Refused(format!(
                "group {name}: this replica is not consistent (an initial copy or resync had not finished): its volumes \
                 hold a mix of old and new data that no application ever wrote. `replicator failover {name} --force` \
                 promotes it anyway"
            )));
        }
        // A fresh journal for the new generation (the restore journal is
        // fully applied by now), keyed with the epoch of the image it
        // continues: the preserved one's after a roll-back.
        let epoch = rolled_back.as_ref().map_or(epoch, |(guard, _)| guard.epoch);
        let journal = self.fresh_journal(pair_id, epoch).await?;
        let (report, save) = {
            let mut g = lock(&self.inner);
            let g = &mut *g;
            let secondary = match g.persisted.role.as_secondary_mut() {
                Some(s) if !g.secondary_attached => s,
                _ => {
                    return Err(GroupError::Failed(format!(
                        "group {name}: the pair changed while the failover ran ({}); nothing changed",
                        g.state
                    )))
                }
            };
            if let Some((guard, _)) = &rolled_back {
                secondary.durable_seq = guard.seq;
                secondary.data_as_of_us = guard.written_at_us;
                secondary.copy_incomplete = false;
                secondary.consistent = true;
                g.persisted.epoch = guard.epoch;
            }
            let split = g.state == PairState::Suspended(SuspendReason::Split);
            let mut report = recovery_point(self.cfg.mode, secondary, g.persisted.generation, &peer, split);
            if let Some((_, regions)) = &rolled_back {
                let bytes: u64 = regions.iter().flatten().map(|(_, len)| len).sum();
                report.push_str(&format!(
                    " A resync was running: it is rolled back ({bytes} bytes rewritten) to the consistent image \
                     preserved when it started; what it had begun to copy is not in this image."
                ));
            }
            if g.bitmaps.iter().any(|b| !b.is_clean()) {
                let bytes: u64 = g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
                report.push_str(&format!(
                    " Its volumes differ from what {peer} last sent in {bytes} bytes of regions (written here \
                     while split with --rw, or a restore journal that was lost); they are copied to {peer} when \
                     it next becomes the secondary (at failback)."
                ));
            }
            if inconsistent {
                report.push_str(
                    " FORCED: the image was not consistent (an initial copy or resync had not finished): its volumes \
                     mix old and new data; `status` says consistent: false.",
                );
            }
            let rewritten = rolled_back.as_ref().map_or(&[][..], |(_, r)| r.as_slice());
            let save = self.promote(g, journal, !inconsistent, rewritten);
            self.publish(g);
            tracing::warn!(group = %name, generation = g.persisted.generation, "failover: this node is now the primary; {report}");
            (report, save)
        };
        if let Err(e) = self.saved(save).await {
            self.promoted_unsaved();
            if rolled_back.is_some() {
                // The rolled-back resync's preserved image goes once the
                // promotion is on disk (before, a restart would find the
                // replica mid-resync, over volumes already rolled back);
                // kept, it would refuse every later session here.
                let group = Arc::clone(self);
                tokio::spawn(async move {
                    while group.saved(save).await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    group.release_image("failover done");
                    group.image_removed().await;
                });
            }
            return Err(GroupError::Failed(format!("{e}\n{report}")));
        }
        if rolled_back.is_some() {
            self.release_image("failover done");
            self.image_removed().await;
        }
        self.start_shipping();
        Ok(format!(
            "group {name}: failover done; this node is now the primary (generation {}), its volumes are writable.\n{report}\n\
             The old primary {peer} is fenced when it reconnects: it will accept no writes.",
            lock(&self.inner).persisted.generation
        ))
    }

    /// `switchover` on the primary: hand the primary role to the peer with
    /// zero loss, then replicate back to this node without a copy. Refused
    /// while NBD clients have the volumes attached here, unless `force`:
    /// becoming the secondary turns them read-only mid-use.
    pub async fn switchover(self: &Arc<Self>, force: bool) -> Result<String, GroupError> {
        self.refuse_if_stopped()?;
        let started = Instant::now();
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        let secondary = lock(&self.inner).role() == Role::Secondary;
        if secondary {
            return self.switchover_from_secondary(force).await;
        }
        // A client that just disconnected is counted until its connection's
        // end is seen (a script's `disconnect; switchover`).
        let grace = Instant::now() + CLIENTS_DETACH_GRACE;
        while !force && self.nbd_clients.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        {
            let mut g = lock(&self.inner);
            if g.state == PairState::SplitBrain && !g.peer_left_written {
                return Err(GroupError::Refused(split_brain_choice(
                    &name,
                    &peer,
                    g.persisted.role.superseded_by() > 0,
                )));
            }
            if g.persisted.role.superseded_by() > 0 {
                return Err(GroupError::Failed(format!(
                    "group {name}: this node was fenced by a failover to {peer} ({}): there is no role to switch here; \
                     to rejoin as {peer}'s secondary and then take the primary role back, run `replicator failback {name}`",
                    g.state
                )));
            }
            if g.role() != Role::Primary {
                return Err(GroupError::Failed(format!(
                    "group {name} is not paired here ({}, {}): there is no role to switch",
                    g.role().as_str(),
                    g.state
                )));
            }
            if g.switching {
                return Err(GroupError::Failed(format!(
                    "group {name}: a switchover (or another change of role) is already under way here; `replicator \
                     status {name}` shows when it is done"
                )));
            }
            if g.state != PairState::Pair || !self.progress.borrow().connected {
                return Err(GroupError::Refused(format!(
                    "group {name}: a switchover needs the pair in PAIR with {peer} connected (now {}{}); without it \
                     the roles cannot change with zero loss. Right after a switchover or failback the session comes \
                     back within seconds: retry then. If {peer} is lost and must take over, run `replicator \
                     failover {name}` there",
                    g.state,
                    if self.progress.borrow().connected { "" } else { ", not connected" }
                )));
            }
            let clients = self.nbd_clients.load(std::sync::atomic::Ordering::SeqCst);
            if clients > 0 && !force {
                return Err(GroupError::Refused(format!(
                    "group {name}: {clients} NBD client(s) have its volumes attached on the primary: a switchover \
                     would turn them read-only mid-use (their writes fail, and their reads see {peer}'s writes \
                     arrive). Stop the applications and detach them from the primary first (unmount, disconnect), \
                     then switch; `replicator switchover {name} --force` switches with them attached"
                )));
            }
            g.switching = true;
        }
        tracing::info!(group = %name, peer = %peer, "switchover: new writes are refused from now on");
        match self.hand_over().await {
            Ok(last) => self.finish_switchover(last, started).await,
            Err(HandOver::Abandoned(e)) => {
                let save = {
                    let mut g = lock(&self.inner);
                    self.abandon_hand_over(&mut g, None)
                };
                self.hand_over_marker_cleared(save).await;
                tracing::warn!(group = %name, "switchover abandoned, nothing changed: {e}");
                Err(GroupError::Failed(format!("group {name}: switchover abandoned, nothing changed: {e}")))
            }
            Err(HandOver::Unconfirmed { error, last, confirmation }) => {
                // The peer may have taken over: taking writes again here could
                // make two primaries. Keep waiting: its confirmation, or its
                // answer as the primary of the next generation, finishes the
                // switchover; its answer as this node's secondary still (the
                // session task asks again) abandons it.
                lock(&self.inner).last_error = Some(format!("switchover: {error}"));
                tracing::error!(group = %name, "switchover: {error}; no writes are taken here until {peer} answers");
                self.finish_when_confirmed(last, started, confirmation);
                Err(GroupError::Failed(format!(
                    "group {name}: switchover interrupted after {peer} was asked to take over ({error}); this node \
                     takes no writes until {peer} answers (across restarts): it becomes the secondary if {peer} \
                     took over, and takes writes again if {peer} is still its secondary"
                )))
            }
        }
    }

    /// Finishes the switchover once the peer confirms it took over
    /// (directly, or by answering as the primary of a newer generation).
    pub(super) fn finish_when_confirmed(
        self: &Arc<Self>,
        last: u64,
        started: Instant,
        confirmation: oneshot::Receiver<Result<(), String>>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = confirmation.await {
                if let Err(e) = me.finish_switchover(last, started).await {
                    tracing::error!(group = %me.cfg.name, "switchover: {e}");
                }
            }
        });
    }

    /// A switchover that did not hand the role over: writes are taken
    /// again, the waiting command hears `why`, and the marker saved before
    /// the request was sent (if it was) is cleared: returns that save.
    pub(super) fn abandon_hand_over(&self, g: &mut Inner, why: Option<String>) -> Option<u64> {
        if let (Some(why), Some(tx)) = (why, g.switchover.as_mut().and_then(|s| s.confirmed.take())) {
            let _ = tx.send(Err(why));
        }
        g.switchover = None;
        g.switching = false;
        let primary = g.persisted.role.as_primary_mut()?;
        primary.handing_over.take()?;
        // Writes wait for the cleared marker on disk: a power cut finding
        // the marker takes the journal's end for the whole story (`open`).
        let save = self.save_later(g);
        g.write_barrier = g.write_barrier.max(save);
        Some(save)
    }

    /// Whether a switchover asked the peer to take over and waits for its
    /// answer (not when the answer is in and the switchover finishing).
    pub(super) fn awaiting_hand_over(g: &Inner) -> bool {
        g.switchover.as_ref().is_some_and(|s| s.sent && s.confirmed.is_some())
    }

    /// A peer of a newer generation answers a switchover: confirms it (this
    /// node becomes its secondary) unless the hand-over is stale; returns
    /// whether it confirmed. Any takeover holds every record: the peer held
    /// the last one durably before it was asked, and none followed.
    pub(super) fn confirm_hand_over(g: &mut Inner, peer_generation: u64) -> bool {
        if peer_generation <= g.persisted.generation || is_stale(g) {
            return false;
        }
        match g.switchover.as_mut().filter(|s| s.sent).and_then(|s| s.confirmed.take()) {
            Some(tx) => tx.send(Ok(())).is_ok(),
            None => false,
        }
    }

    /// Drops a stale hand-over: this node holds records after the one the
    /// peer was asked to take over after (the hand-over was abandoned and
    /// writes taken, and a crash came before the cleared marker reached the
    /// disk). The peer cannot hold them: this node is judged as any primary
    /// a newer generation meets (fenced; split brain if both wrote). Call
    /// under the lock that judges it.
    pub(super) fn drop_stale_hand_over(&self, g: &mut Inner) {
        if is_stale(g) {
            tracing::warn!(group = %self.cfg.name, "a switchover's marker was stale (records follow it here): it is dropped");
            let _ = self.abandon_hand_over(g, Some("records follow the hand-over here".into()));
        }
    }

    /// Waits for the save that cleared the switchover's marker; a failure
    /// is said, not fatal (the marker, should it stay on disk, only keeps
    /// writes out after a restart until the peer answers).
    pub(super) async fn hand_over_marker_cleared(&self, save: Option<u64>) {
        let Some(save) = save else { return };
        if let Err(e) = self.saved(save).await {
            tracing::warn!(group = %self.cfg.name, "switchover: the end of the hand-over could not be saved ({e}): \
                after a restart this node takes no writes until {} answers", self.cfg.peer);
        }
    }

    /// The peer took over: this node becomes its secondary, its journal an
    /// empty restore journal (every record in it is on both sites).
    async fn finish_switchover(self: &Arc<Self>, last: u64, started: Instant) -> Result<String, GroupError> {
        let (name, peer) = (&self.cfg.name, &self.cfg.peer);
        // The demotion is on disk before the journal is emptied: a crash in
        // between restarts a secondary whose restore journal (the old
        // journal, in which no record follows `last`) holds nothing, where
        // the other order restarted a primary of the old generation that
        // had forgotten its writes through `last` and would number new ones
        // as if they were those. `switching` stays set (no session starts
        // here) until the new restore journal is in place.
        let (pair_id, epoch, generation, save) = {
            let mut g = lock(&self.inner);
            // Still this hand-over (a `pair delete` may have abandoned it
            // since the peer's answer).
            let asked = g.switchover.as_ref().filter(|s| s.sent && s.seq == last).map(|s| s.epoch);
            let Some(epoch) = asked.filter(|_| g.role() == Role::Primary) else {
                return Err(GroupError::Failed(format!("group {name}: the switchover was abandoned meanwhile")));
            };
            // The records through `last` are of this epoch, whatever a
            // restart since began: the new primary's takeover point says
            // so, and a later failover here must name the same.
            g.persisted.epoch = epoch;
            demote(&mut g, last);
            let save = self.save_later(&mut g);
            self.publish(&mut g);
            (g.persisted.pair_id, g.persisted.epoch, g.persisted.generation, save)
        };
        if let Err(e) = self.saved(save).await {
            // The demotion may still reach the disk (the flusher retries),
            // while the journal in memory is the primary's: no session and
            // no command may use it. The restart settles the role.
            let why = format!("switchover: the demotion could not be saved ({e})");
            self.fail_stop(why.clone());
            return Err(GroupError::Failed(format!("group {name}: {why}; restart the daemon")));
        }
        let journal = match self.fresh_journal(pair_id, epoch).await {
            Ok(journal) => journal,
            Err(e) => {
                // The in-memory journal is still the primary's: no session
                // may use it. The restart opens the file as the (empty)
                // restore journal the saved state describes.
                let why = format!("switchover: emptying the journal for the secondary role failed: {e}");
                self.fail_stop(why.clone());
                return Err(GroupError::Failed(format!("group {name}: {why}; restart the daemon")));
            }
        };
        {
            let mut g = lock(&self.inner);
            g.journal = Some(Arc::new(journal));
            g.switching = false;
            g.switchover = None;
            self.publish(&mut g);
        }
        self.session_kick.send_modify(|k| *k += 1);
        let took = started.elapsed();
        tracing::info!(group = %name, peer = %peer, seq = last, generation, ms = took.as_millis() as u64,
            "switchover done: this node is now the secondary");
        Ok(format!(
            "group {name}: switchover done in {:.2} s: {peer} is now the primary (generation {generation}) and this \
             node its secondary; both hold every write through sequence {last}; nothing to copy",
            took.as_secs_f64()
        ))
    }

    /// `switchover` run on the secondary: ask the primary (over the
    /// replication session) to hand over, and wait until this node is the
    /// primary.
    async fn switchover_from_secondary(self: &Arc<Self>, force: bool) -> Result<String, GroupError> {
        let started = Instant::now();
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        let session = {
            let g = lock(&self.inner);
            match (&g.session_cmd, g.state) {
                (Some(s), PairState::Pair) if g.secondary_attached => s.clone(),
                _ => {
                    return Err(GroupError::Refused(format!(
                        "group {name}: a switchover needs the pair in PAIR with the primary {peer} connected (now {}); \
                         right after a switchover or failback the session comes back within seconds: retry then. If \
                         {peer} is lost and must be abandoned, run `replicator failover {name}` here",
                        g.state
                    )))
                }
            }
        };
        let (tx, mut refused) = oneshot::channel();
        if session.send(SessionCommand::RequestSwitchover { force, refused: tx }).is_err() {
            return Err(GroupError::Failed(format!("group {name}: the replication session is ending; try again")));
        }
        let deadline = Instant::now() + 3 * SWITCHOVER_STEP;
        let mut detached_since = None;
        loop {
            let (role, generation, state, attached) = {
                let g = lock(&self.inner);
                (g.role(), g.persisted.generation, g.state, g.secondary_attached)
            };
            if role == Role::Primary {
                return Ok(format!(
                    "group {name}: switchover done in {:.2} s: this node is now the primary (generation {generation}); \
                     {peer} becomes its secondary with nothing to copy",
                    started.elapsed().as_secs_f64()
                ));
            }
            // A primary that hands over ends the session just before this
            // node takes over; one gone for longer is not handing over.
            if attached {
                detached_since = None;
            }
            let gone = (!attached).then(|| *detached_since.get_or_insert_with(Instant::now));
            let why = if Instant::now() >= deadline {
                Some(format!("did not hand over within {} s", deadline.duration_since(started).as_secs()))
            } else {
                gone.filter(|t| t.elapsed() >= SWITCHOVER_LINK_GONE)
                    .map(|t| format!("is no longer connected (for {} s)", t.elapsed().as_secs()))
            };
            if let Ok(e) = refused.try_recv() {
                // Its message says why and what overrides it.
                return Err(match e {
                    GroupError::Refused(why) => GroupError::Refused(format!("group {name}: {why}")),
                    e => GroupError::Failed(format!("group {name}: {e}; this node is still its secondary")),
                });
            }
            if let Some(why) = why {
                return Err(GroupError::Failed(format!(
                    "group {name}: {peer} {why}: nothing changed here, this node is still its secondary ({state}). \
                     If {peer} took the request, it either hands over when it can (then this node takes over by \
                     itself) or keeps the primary role; see `replicator status {name}` here and on {peer}, and its \
                     log. If {peer} is lost, `replicator failover {name}` here"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The switchover's wait: writes in flight finish, the secondary holds
    /// every record durably, the volumes here are synced, the secondary
    /// takes over. Returns the last record, or why not and whether the
    /// secondary was asked to take over.
    async fn hand_over(self: &Arc<Self>) -> Result<u64, HandOver> {
        let deadline = Instant::now() + SWITCHOVER_STEP;
        let last = loop {
            let (idle, last) = {
                let g = lock(&self.inner);
                let last = g.last_jseq;
                (g.seq.in_flight() == 0 && g.ready.completed_through() == last, last)
            };
            if idle {
                break last;
            }
            if Instant::now() >= deadline {
                return Err(HandOver::Abandoned("writes in flight did not finish within 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        {
            let mut g = lock(&self.inner);
            g.flush_wanted = g.flush_wanted.max(last);
        }
        self.ship_wake.notify_one();
        let mut progress = self.progress.subscribe();
        let durable = tokio::time::timeout(SWITCHOVER_STEP, progress.wait_for(|p| !p.connected || p.durable >= last))
            .await
            .is_ok_and(|r| r.is_ok_and(|p| p.durable >= last));
        if !durable {
            return Err(HandOver::Abandoned(format!("the secondary did not make record {last} durable")));
        }
        self.sync_all().await.map_err(|e| HandOver::Abandoned(format!("flushing the local volumes failed: {e}")))?;
        // Saved before the request can leave: from here a crash restarts a
        // node that takes no writes until the peer answers (see
        // `PrimaryState::handing_over`), never a primary beside a new one.
        let (save, epoch) = {
            let mut g = lock(&self.inner);
            let epoch = g.persisted.epoch;
            if let Some(primary) = g.persisted.role.as_primary_mut() {
                primary.handing_over = Some(TakeoverPoint { seq: last, epoch });
            }
            (self.save_later(&mut g), epoch)
        };
        self.saved(save).await.map_err(|e| HandOver::Abandoned(format!("saving the hand-over failed: {e}")))?;
        let (tx, mut rx) = oneshot::channel();
        lock(&self.inner).switchover = Some(Switchover { seq: last, epoch, sent: false, confirmed: Some(tx) });
        self.ship_wake.notify_one();
        match tokio::time::timeout(SWITCHOVER_STEP, &mut rx).await {
            Ok(Ok(Ok(()))) => Ok(last),
            Ok(Ok(Err(refused))) => Err(HandOver::Abandoned(format!("the secondary refused to take over: {refused}"))),
            _ => {
                // Judged and withdrawn under one lock: the shipper cannot
                // send the command after it was judged unsent.
                let sent = {
                    let mut g = lock(&self.inner);
                    let sent = g.switchover.as_ref().is_some_and(|s| s.sent);
                    if !sent {
                        g.switchover = None;
                    }
                    sent
                };
                let error = "the secondary did not confirm the takeover within 30 s".to_string();
                if sent {
                    Err(HandOver::Unconfirmed { error, last, confirmation: rx })
                } else {
                    Err(HandOver::Abandoned(error))
                }
            }
        }
    }

    /// The secondary takes over after the primary asked for it (switchover)
    /// and this session drained: every record through `seq` is here.
    pub(super) async fn take_over_after_switchover(self: &Arc<Self>, seq: u64) -> Result<(), GroupError> {
        let (pair_id, epoch, checkpoint, consistent) = {
            let g = lock(&self.inner);
            let s = g.persisted.role.as_secondary();
            (g.persisted.pair_id, g.persisted.epoch, s.map_or(0, |s| s.durable_seq), g.persisted.role.consistent())
        };
        if !consistent {
            // A copy into this replica has not finished: its image is no
            // write-order-consistent one (the primary may not have known).
            return Err(GroupError::Failed(
                "switchover: this replica is inconsistent (a copy into it is not finished)".into(),
            ));
        }
        if checkpoint < seq {
            return Err(GroupError::Failed(format!(
                "switchover: this node holds records through {checkpoint}, the primary's last is {seq}"
            )));
        }
        let journal = self.fresh_journal(pair_id, epoch).await?;
        let save = {
            let mut g = lock(&self.inner);
            self.promote(&mut g, journal, true, &[]);
            // The old primary becomes the secondary in a moment: until it is
            // back (or link_timeout passes, as for any link blip in PAIR),
            // sync writes wait for it, so RPO 0 holds across the switchover.
            // Regions this replica holds that the old primary lacks (none
            // in a switchover from PAIR) would be copied first: COPY, as
            // `Group::open` says of such a primary.
            let copy = g.persisted.role.as_primary().is_some_and(|p| p.copy_pending);
            g.state = if copy { PairState::Copy } else { PairState::Pair };
            g.link_down_since = Some(Instant::now());
            let save = self.save_later(&mut g);
            self.publish(&mut g);
            tracing::info!(group = %self.cfg.name, seq, generation = g.persisted.generation,
                "switchover: this node is now the primary");
            save
        };
        if let Err(e) = self.saved(save).await {
            // Primary here in memory, not on disk, while the old primary
            // hears "refused" and takes writes again: this node must take
            // none (nor a session) until a restart settles which role the
            // disk holds; should a later save still land it, the two meet as
            // primaries of different generations, which fences or reports
            // split brain, never silently.
            self.fail_stop(format!("switchover: the promotion could not be saved ({e})"));
            return Err(e);
        }
        Ok(())
    }

    /// Makes this secondary the primary (see [`promote`]); returns the save
    /// that makes it durable. The caller publishes the new role once its
    /// state is set. `rewritten`: regions per volume that differ
    /// from what the old primary was told this node holds (a resync rolled
    /// back): dirty from the start, so a failback copies them.
    pub(super) fn promote(
        &self,
        g: &mut Inner,
        journal: Journal,
        consistent: bool,
        rewritten: &[Vec<(u64, u64)>],
    ) -> u64 {
        // The writes this replica took while split with --rw stay marked:
        // its volumes hold them and the former primary does not, so the
        // failback or resync that follows copies them.
        let own = g.bitmaps.clone();
        promote(g, journal, consistent);
        g.bitmaps = own;
        self.reset_progress(g.last_jseq, false);
        for (bitmap, regions) in g.bitmaps.iter_mut().zip(rewritten) {
            for &(offset, len) in regions {
                bitmap.set_range(offset, len);
            }
        }
        // Regions these volumes hold that the peer was never sent (written
        // while split with --rw, a rolled-back resync, a lost restore
        // journal) are copied to the next secondary: a former primary that
        // rebases has them copied with its own, but one that takes this
        // promotion for its stalled switchover's answer becomes the
        // secondary at the takeover point, holding everything else.
        if g.bitmaps.iter().any(|b| !b.is_clean()) {
            if let Some(p) = g.persisted.role.as_primary_mut() {
                p.copy_pending = true;
            }
        }
        // Writes wait for every earlier record to be journaled: all
        // through the recovery point are, and none after it (this role's
        // first record is n + 1). Set, not raised: a node primary before,
        // up to a later record than n, would let its new writes through
        // that many numbers without waiting for the appends before them.
        let n = g.last_jseq;
        self.journaled_through.send_replace(n);
        // Published by the caller, once it has set the role's state: a
        // state published in between (the secondary's) would be logged as
        // the primary's (RPO 0 lost, then in force again, at a switchover).
        self.save_later(g)
    }

    /// A failover on the peer superseded this primary (generation
    /// `generation`): stop accepting writes, for good, and say so.
    pub(super) fn fence(&self, g: &mut Inner, generation: u64, point: Option<TakeoverPoint>) {
        if g.switching {
            return;
        }
        let Some(primary) = g.persisted.role.as_primary_mut() else {
            return;
        };
        if primary.superseded_by == generation && point.is_some() && primary.superseded_at != point {
            // Fenced before without the takeover point (this node asked
            // first): remember it now.
            primary.superseded_at = point;
            self.save_later(g);
            return;
        }
        if primary.superseded_by >= generation {
            return;
        }
        primary.superseded_by = generation;
        primary.superseded_at = point;
        let name = &self.cfg.name;
        let msg = format!(
            "group {name}: {peer} took over as primary after a failover (generation {generation}); this node no \
             longer accepts writes. To rejoin as {peer}'s secondary (copying only what differs): `replicator \
             failback {name}` here",
            peer = self.cfg.peer
        );
        tracing::error!(group = %name, "{msg}");
        g.last_error = Some(msg.clone());
        g.refusal = Some("superseded");
        // Writes are refused from now on; the fence is durable with the next
        // save (a restart before it is fenced again by the peer).
        self.transition(g, PairEvent::Failure, &msg);
        self.save_later(g);
        self.session_kick.send_modify(|k| *k += 1);
    }
}

/// How long a switchover asked on the secondary waits for the primary
/// once the session is gone (the primary ends it just before the hand-over
/// completes here).
const SWITCHOVER_LINK_GONE: Duration = Duration::from_secs(10);

/// A switchover asked in SPLIT-BRAIN: no role changes until an admin
/// chooses whose data is kept, and how (`fenced`: this node is the former
/// primary a failover superseded).
fn split_brain_choice(name: &str, peer: &str, fenced: bool) -> String {
    let (keep_peer, keep_here) = if fenced {
        (
            format!("`replicator failback {name}` here"),
            format!("`replicator pair resync {name} --discard-local` on {peer}"),
        )
    } else {
        (
            format!("`replicator pair resync {name} --discard-local` here"),
            format!("`replicator failback {name}` on {peer}"),
        )
    };
    format!(
        "group {name} is in SPLIT-BRAIN: both sites hold writes the other lacks, and no switchover or failover \
         changes that. Choose whose data is kept: {peer}'s with {keep_peer}; this node's with {keep_here} (the other \
         side's writes are overwritten; the runbook's split-brain section)"
    )
}

/// What the promoted image holds, in words: the sequence, the site and
/// generation that wrote it, the time through which it holds every write
/// (`data as of`), and what the primary last reported beyond it (`split`:
/// an admin split the pair, and reports stopped there).
fn recovery_point(mode: Mode, p: &SecondaryState, generation: u64, peer: &str, split: bool) -> String {
    let n = p.durable_seq;
    // A former primary demoted by a switchover holds its own writes up to
    // where the new primary's begin.
    let (site, generation) = if p.own_writes_through > 0 && n <= p.own_writes_through {
        ("this node (as the primary)", p.own_writes_generation)
    } else {
        (peer, generation)
    };
    let when = if p.data_as_of_us == 0 {
        "(their time unknown)".to_string()
    } else {
        format!("up to {}", format_time(p.data_as_of_us))
    };
    let mut out = format!("Recovery point: sequence {n} (generation {generation}): every write made on {site} {when}.");
    let beyond = (p.primary_reported_seq > n).then(|| {
        format!(
            "{peer} last reported (at {}, its clock) records up to {}: {} record(s), {} byte(s) beyond the recovery \
             point that this node never made durable",
            format_time(p.primary_reported_at_us),
            p.primary_reported_seq,
            p.primary_reported_seq - n,
            p.primary_reported_bytes
        )
    });
    match (mode, beyond) {
        (Mode::Sync, beyond) => {
            out.push_str(
                " Sync mode: it holds every write the primary acknowledged while the pair was in PAIR with RPO 0 in \
                 force (writes acknowledged without FUA or a later FLUSH only if this node has not lost power since).",
            );
            if let Some(beyond) = beyond {
                out.push_str(&format!(
                    " {beyond}; those it acknowledged without this node (RPO 0 not in force: catching up after a \
                     suspension or split, or a copy running) are lost here."
                ));
            }
        }
        (Mode::Async, Some(beyond)) => out.push_str(&format!(" Async mode: {beyond}.")),
        (Mode::Async, None) if split => {}
        (Mode::Async, None) => out.push_str(&format!(" Async mode: {peer} had reported nothing beyond it.")),
    }
    if split {
        out.push_str(&format!(
            " The pair was split by an admin at that point: {peer} sent nothing since, and any write it took after \
             the split is not in this image."
        ));
    }
    out
}

pub(crate) fn format_time(us: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| format!("{us} µs since the epoch"))
}

/// What every role change does: `role` (with all its state: nothing of
/// the old role's stays) of the same pair in the next generation, its
/// journal `journal` (empty), no copy due, nothing tracked, no peer yet.
pub(super) fn change_role(g: &mut Inner, role: RoleState, journal: Journal) {
    g.journal = Some(Arc::new(journal));
    change_role_keeping_journal(g, role);
}

/// [`change_role`], the journal handle left as it is (the caller replaces
/// it).
fn change_role_keeping_journal(g: &mut Inner, role: RoleState) {
    g.persisted.role = role;
    g.persisted.generation += 1;
    g.split = None;
    // Asked of the old role's secondary: the new role's sequences may
    // start below it (a rebase after a failover), and a flush request is
    // sent only once it is passed.
    g.flush_wanted = 0;
    g.entries.clear();
    g.cached_bytes = 0;
    g.cumulative_bytes = 0;
    for b in &mut g.bitmaps {
        *b = DirtyBitmap::new(b.volume_size(), b.granularity());
    }
    g.activity.clear();
    g.session = None;
    // The old role's copy figures describe nothing of the new one (a new
    // primary counts its copy when its session starts).
    g.copy_total = 0;
    g.copy_done = 0;
    g.copy_sent = 0;
    g.refusal = None;
    g.last_error = None;
    g.link_down_since = Some(Instant::now());
    g.state = PairState::Suspended(SuspendReason::Link);
}

/// The old primary after a switchover: secondary of the same pair in the
/// new generation, holding every write through `last` durably, with an
/// empty restore journal (the caller empties the journal once this is
/// saved; `switching` stays set until then).
fn demote(g: &mut Inner, last: u64) {
    let secondary = SecondaryState {
        journal_tail_seq: last + 1,
        journal_tail_pos: JOURNAL_SUPERBLOCK_LEN,
        durable_seq: last,
        consistent: true,
        // Writes stopped at the switchover's start: the image holds every
        // write made here until now.
        data_as_of_us: super::write_path::unix_micros(),
        own_writes_through: last,
        own_writes_generation: g.persisted.generation,
        ..SecondaryState::default()
    };
    change_role_keeping_journal(g, RoleState::Secondary(secondary));
    g.ring = None;
    // The shipper task of the primary role ends.
    g.shipper_epoch += 1;
    g.secondary_applied = last;
    g.secondary_durable = last;
}

/// A secondary becomes primary of the same pair in a new generation, its
/// journal empty and continuing after the recovery point.
fn promote(g: &mut Inner, journal: Journal, consistent: bool) {
    // (Callers checked it is the secondary, under the same lock.)
    let n = g.persisted.role.as_secondary().map_or(g.last_jseq, |s| s.durable_seq);
    let mut ring = JournalRing::new(journal.capacity());
    ring.reset_at(JOURNAL_SUPERBLOCK_LEN);
    let primary = PrimaryState {
        journal_tail_seq: n + 1,
        journal_tail_pos: JOURNAL_SUPERBLOCK_LEN,
        consistent,
        // Where this image left the old generation: a former primary that
        // comes back compares its own records with it.
        takeover: Some(TakeoverPoint { seq: n, epoch: g.persisted.epoch }),
        ..PrimaryState::default()
    };
    change_role(g, RoleState::Primary(primary), journal);
    g.taking_over = false;
    g.ring = Some(ring);
    // The range sequencer carries on (its numbers are its own, not journal
    // sequences): a write that began before the promotion (a drill's split
    // replica takes writes) still holds its range, so a new overlapping
    // write waits for it, and its end finishes its own entry, not a new
    // write's or read's of the same number.
    g.last_jseq = n;
    g.ready = SeqTracker::new(n);
    g.volume_written = SeqTracker::new(n);
    g.local_durable = n;
    g.journal_durable = n;
}
