//! Pair lifecycle beyond failover and switchover: admin split and resync,
//! failback, and the end of a split brain.
//!
//! Every path that ends with one site overwriting the other goes through
//! one rebase (see `replicator_protocol::divergence`): the losing side
//! persists the regions where it differs as its dirty bitmaps and refuses
//! to resume (`REFUSAL_NEEDS_REBASE`, with those regions); the primary adds
//! them and its own changes to its bitmaps, persists them, and rebases the
//! secondary on its newest record (`RESYNC`). Only the union of both sides'
//! changes is copied, and no fault between the steps forgets a region.
//!
//! - `pair split [--rw]` (either site): replication stops; the secondary
//!   keeps its write-order-consistent image, with `--rw` it takes writes
//!   (tracked in its bitmaps). Only `pair resync` on the primary resumes.
//! - `pair resync --swap` (on a split secondary): it becomes the primary
//!   (a new generation); the split former primary gives up the role when
//!   they meet and its changes since the split are overwritten.
//! - `failback` / `pair resync --discard-local` on a former primary fenced
//!   by a failover (or in split brain): it becomes the secondary, its
//!   writes after the takeover point are discarded (reported before and
//!   logged after), and the new primary's changes are copied to it.
//! - `pair resync --discard-local` on the newer primary of a split brain:
//!   it gives up the role instead; the former primary takes over again
//!   when they meet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator_protocol::bitmap::DirtyBitmap;
use replicator_protocol::divergence::{self, FormerPrimary};
use replicator_protocol::journal_format::JOURNAL_SUPERBLOCK_LEN;
use replicator_protocol::lifecycle::{on_refusal, Answer};
use replicator_protocol::pair::{PairEvent, PairState, Role, SuspendReason};
use replicator_protocol::pb;
use tokio::sync::oneshot;

use super::{lock, takeover, Group, GroupError, Inner, SessionCommand};
use crate::config::human_bytes;
use crate::state::{Announce, RoleState, SecondaryState, TakeoverPoint};

/// A volume index, offset and length.
type Region = (u32, u64, u64);

/// How long `pair split` waits for the secondary's confirmation.
const SPLIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long giving up the primary role waits for writes in flight.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `pair resync --swap` waits for a reachable primary to learn of
/// a split made on this secondary (its redials back off up to 5 s).
const SPLIT_NEWS_WAIT: Duration = Duration::from_secs(6);

/// `pair split` on the primary while the session is up: the command goes
/// out after every record sent so far; the secondary's reply ends it.
#[derive(Debug)]
pub(super) struct SplitRequest {
    /// Make the secondary writable.
    pub(super) rw: bool,
    /// The command is on the stream.
    pub(super) sent: bool,
    /// Told when the secondary persisted the split (or refused).
    pub(super) confirmed: Option<oneshot::Sender<Result<(), String>>>,
}

impl Group {
    /// `pair split GROUP [--rw]`, on either site.
    pub async fn pair_split(self: &Arc<Self>, rw: bool) -> Result<String, GroupError> {
        self.refuse_if_stopped()?;
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        let role = lock(&self.inner).role();
        match role {
            Role::None => {
                Err(GroupError::Failed(format!("group {name} is not paired here (SIMPLEX): nothing to split")))
            }
            Role::Secondary => self.split_secondary(rw).await,
            Role::Primary => {
                let rx = {
                    let mut g = lock(&self.inner);
                    self.refuse_unless_replicating_primary(&g, "split")?;
                    if g.split() {
                        return Ok(format!("group {name} is already split"));
                    }
                    if rw && g.state == PairState::Copy {
                        return Err(GroupError::Refused(format!(
                            "group {name}: a copy to {peer} is running, so its replica is not consistent and its \
                             volumes cannot be made writable; split without --rw, or wait for PAIR"
                        )));
                    }
                    if !self.progress.borrow().connected || g.session.is_none() {
                        if rw {
                            return Err(GroupError::Refused(format!(
                                "group {name}: {peer} is not connected, so its volumes cannot be made writable from \
                                 here; run `replicator pair split {name} --rw` on {peer}, or split without --rw"
                            )));
                        }
                        self.transition(&mut g, PairEvent::AdminSplit, "pair split (the secondary was not connected)");
                        self.session_kick.send_modify(|k| *k += 1);
                        return Ok(format!(
                            "group {name}: split; this node tracks its writes for a later `pair resync`. {peer} was \
                             not connected: it learns of the split when it is resynced"
                        ));
                    }
                    let (tx, rx) = oneshot::channel();
                    g.split = Some(SplitRequest { rw, sent: false, confirmed: Some(tx) });
                    rx
                };
                self.ship_wake.notify_one();
                let answer = tokio::time::timeout(SPLIT_TIMEOUT, rx).await;
                let mut g = lock(&self.inner);
                g.split = None;
                let note = match answer {
                    Ok(Ok(Ok(()))) => String::new(),
                    Ok(Ok(Err(refused))) => {
                        return Err(GroupError::Failed(format!(
                            "group {name}: {peer} refused the split, nothing changed: {refused}"
                        )))
                    }
                    _ => format!(
                        " {peer} did not confirm within {} s: nothing is shipped to it until `pair resync {name}` \
                         here{}",
                        SPLIT_TIMEOUT.as_secs(),
                        if rw {
                            format!(
                                "; its volumes may not have become writable: check there (`replicator status \
                                 {name}`), and run `replicator pair split {name} --rw` there if they are not"
                            )
                        } else {
                            String::new()
                        }
                    ),
                };
                self.transition(&mut g, PairEvent::AdminSplit, "pair split");
                self.session_kick.send_modify(|k| *k += 1);
                Ok(format!(
                    "group {name}: split; {peer} keeps a write-order-consistent image{}; this node tracks its writes \
                     for `replicator pair resync {name}`.{note}",
                    if rw { " and its volumes are writable (its changes are overwritten at resync)" } else { "" }
                ))
            }
        }
    }

    /// `pair split` on the secondary: end the session (its drain applies
    /// everything received), persist the split.
    async fn split_secondary(self: &Arc<Self>, rw: bool) -> Result<String, GroupError> {
        let name = self.cfg.name.clone();
        let session = {
            let mut g = lock(&self.inner);
            if g.taking_over {
                return Err(GroupError::Failed(format!("group {name}: a failover is running here")));
            }
            if rw {
                self.refuse_writable_split(&g)?;
            }
            if g.secondary_attached {
                Err(g.session_cmd.clone())
            } else {
                Ok(self.split_here(&mut g, rw, "pair split on the secondary"))
            }
        };
        let session = match session {
            Ok(save) => {
                self.saved(save).await?;
                return Ok(self.split_report(rw));
            }
            Err(session) => session,
        };
        let (tx, rx) = oneshot::channel();
        if session.is_none_or(|s| s.send(SessionCommand::Split { rw, done: tx }).is_err()) {
            return Err(GroupError::Failed(format!("group {name}: the replication session is ending; try again")));
        }
        match tokio::time::timeout(SPLIT_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(self.split_report(rw)),
            Ok(Ok(Err(e))) => Err(GroupError::Failed(format!("group {name}: split failed: {e}"))),
            _ => Err(GroupError::Failed(format!(
                "group {name}: the replication session did not finish applying within {} s; see `replicator status {name}`",
                SPLIT_TIMEOUT.as_secs()
            ))),
        }
    }

    fn split_report(&self, rw: bool) -> String {
        let (name, peer) = (&self.cfg.name, &self.cfg.peer);
        format!(
            "group {name}: split; this replica holds a write-order-consistent image{}. Replication resumes only with \
             `replicator pair resync {name}` on {peer}",
            if rw {
                " and its volumes are writable now (changes made here are overwritten by the resync; \
                 `pair resync --swap` here keeps them instead)"
            } else {
                ""
            }
        )
    }

    /// Whether this secondary's volumes may become writable by a split
    /// (`--rw`, asked here or by the primary): not while a drill copy is
    /// being taken of them, nor while they hold no image the primary had.
    pub(super) fn refuse_writable_split(&self, g: &Inner) -> Result<(), GroupError> {
        let name = &self.cfg.name;
        if g.drill_starting {
            // Writes here would reach the volumes under a drill copy
            // being taken of them (as for a failover: takeover.rs).
            return Err(GroupError::Failed(format!("group {name}: a drill is starting here; retry in a moment")));
        }
        let Some(s) = g.persisted.role.as_secondary() else { return Ok(()) };
        if s.copy_incomplete || !s.consistent {
            return Err(GroupError::Refused(format!(
                "group {name}: this replica is not consistent (a copy or resync is running); its volumes cannot be \
                 made writable. Split without --rw, or wait for PAIR"
            )));
        }
        if s.needs_rebase && !s.split_writable {
            // Its changes are discarded: the resync that follows clears
            // every region here once the peer copied those it was told
            // of, and writes made now would be among neither.
            return Err(GroupError::Refused(format!(
                "group {name}: this replica waits for {} to copy over what differs here (its own changes are \
                 discarded); writes made here now would be lost without being copied. Let that resync finish \
                 (`replicator status {name}`), then split again",
                self.cfg.peer
            )));
        }
        Ok(())
    }

    /// The secondary records an admin split (its session is over); returns
    /// the save that makes it durable.
    pub(super) fn split_here(&self, g: &mut Inner, rw: bool, why: &str) -> u64 {
        if let Some(s) = g.persisted.role.as_secondary_mut() {
            s.split_writable = rw;
        }
        g.peer_knows_split = false;
        self.transition(g, PairEvent::AdminSplit, why);
        let save = self.save_later(g);
        self.publish(g);
        if rw {
            tracing::warn!(group = %self.cfg.name, "split with --rw: the replica's volumes are writable; writes are tracked for the resync");
        }
        save
    }

    /// `pair resync GROUP [--swap] [--discard-local]`.
    pub async fn pair_resync(self: &Arc<Self>, swap: bool, discard_local: bool) -> Result<String, GroupError> {
        self.refuse_if_stopped()?;
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        if discard_local {
            return self.discard_local().await;
        }
        let role = lock(&self.inner).role();
        match (role, swap) {
            (Role::None, _) => Err(GroupError::Failed(format!("group {name} is not paired here (SIMPLEX)"))),
            (Role::Secondary, false) => Err(GroupError::Failed(format!(
                "group {name} is the secondary here: run `replicator pair resync {name}` on the primary {peer} (it \
                 overwrites this node's changes), or `pair resync {name} --swap` here to make this node the primary"
            ))),
            (Role::Primary, true) => Err(GroupError::Failed(format!(
                "group {name}: --swap makes the secondary the primary: run `replicator pair resync {name} --swap` on {peer}"
            ))),
            (Role::Secondary, true) => self.swap_here().await,
            (Role::Primary, false) => {
                let (save, report) = {
                    let mut g = lock(&self.inner);
                    self.refuse_unless_replicating_primary(&g, "resync")?;
                    let connected = self.progress.borrow().connected;
                    let full = match g.state {
                        PairState::Pair | PairState::Copy if connected => {
                            return Ok(format!("group {name} is {} and replicating: nothing to resync", g.state));
                        }
                        PairState::Suspended(SuspendReason::Error) => true,
                        _ => false,
                    };
                    if full {
                        // The sites were found to diverge with no record of
                        // where: everything is copied.
                        for b in &mut g.bitmaps {
                            b.set_all();
                        }
                        let through = g.ready.completed_through();
                        self.rebase(&mut g, through);
                    }
                    if let Some(p) = g.persisted.role.as_primary_mut() {
                        p.admin_resync = true;
                    }
                    // Asked again: an earlier refusal (readers attached to the
                    // split replica, say) stands only if the peer repeats it.
                    g.refusal = None;
                    self.transition(&mut g, PairEvent::AdminResync, "pair resync");
                    let save = self.save_later(&mut g);
                    let dirty: u64 = g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
                    let report = format!(
                        "group {name}: resync started{}: {} tracked here{}; `replicator status {name}` shows the progress",
                        if full { " (after an error: the whole volumes are copied)" } else { "" },
                        human_bytes(dirty),
                        if g.persisted.role.as_primary().is_some_and(|p| p.bitmap_mode) || dirty > 0 {
                            String::new()
                        } else {
                            format!(", plus any regions {peer} changed while split")
                        }
                    );
                    (save, report)
                };
                self.saved(save).await?;
                self.session_kick.send_modify(|k| *k += 1);
                Ok(report)
            }
        }
    }

    /// Refuses commands meant for a primary that replicates normally.
    fn refuse_unless_replicating_primary(&self, g: &Inner, what: &str) -> Result<(), GroupError> {
        let name = &self.cfg.name;
        let fenced = g.persisted.role.superseded_by() > 0;
        if fenced || g.state == PairState::SplitBrain {
            return Err(GroupError::Refused(format!(
                "group {name} is {}: `pair {what}` does not apply; `replicator failback {name}` or `replicator pair \
                 resync {name} --discard-local` on the site whose writes are to be discarded",
                if g.state == PairState::SplitBrain { "in SPLIT-BRAIN" } else { "fenced after a failover" }
            )));
        }
        if g.switching {
            return Err(GroupError::Failed(format!("group {name}: a switchover is running")));
        }
        Ok(())
    }

    /// `pair resync --swap` on a split secondary: it becomes the primary;
    /// its own changes (while split --rw) are kept and copied back.
    async fn swap_here(self: &Arc<Self>) -> Result<String, GroupError> {
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        // The primary gives the role up only if it knows of the split: one
        // made here reaches it when it next dials and is refused, about a
        // second later. Promoted before that, this node would meet it as a
        // failover's newer generation, and fence it. Wait while it is
        // reachable (one that is not learns of the swap as of a failover:
        // the runbook's case of a split made while the primary was away).
        let not_split = |g: &Inner| {
            (!g.split() || g.secondary_attached).then(|| {
                GroupError::Refused(format!(
                    "group {name} is {}: --swap needs the pair split first (`replicator pair split {name}`), so that \
                     {peer} stops taking writes as primary",
                    g.state
                ))
            })
        };
        if let Some(refused) = not_split(&lock(&self.inner)) {
            return Err(refused);
        }
        let deadline = Instant::now() + SPLIT_NEWS_WAIT;
        while !lock(&self.inner).peer_knows_split && self.transport.rtt(&peer).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (pair_id, epoch) = {
            let mut g = lock(&self.inner);
            if let Some(refused) = not_split(&g) {
                return Err(refused);
            }
            if g.persisted
                .role
                .as_secondary()
                .is_none_or(|s| s.copy_incomplete || !s.consistent || s.needs_rebase && !s.split_writable)
            {
                return Err(GroupError::Refused(format!(
                    "group {name}: this replica is not consistent; it cannot become the primary with --swap \
                     (`replicator failover {name} --force` would promote it anyway)"
                )));
            }
            if g.taking_over {
                return Err(GroupError::Failed(format!("group {name}: a failover is running here")));
            }
            if g.drill_starting {
                // Writes of the new primary would reach the volumes under a
                // drill copy not attached yet (takeover.rs).
                return Err(GroupError::Failed(format!("group {name}: a drill is starting here; retry in a moment")));
            }
            g.taking_over = true;
            (g.persisted.pair_id, g.persisted.epoch)
        };
        let journal = match self.fresh_journal(pair_id, epoch).await {
            Ok(j) => j,
            Err(e) => {
                lock(&self.inner).taking_over = false;
                return Err(e);
            }
        };
        let (generation, save) = {
            let mut g = lock(&self.inner);
            // Its writes while split stay marked and are copied to the
            // former primary with its own changes (`Group::promote`).
            self.promote(&mut g, journal, true, &[]);
            if let Some(p) = g.persisted.role.as_primary_mut() {
                p.swap = true;
                p.admin_resync = true;
            }
            self.publish(&mut g);
            (g.persisted.generation, self.save_later(&mut g))
        };
        if let Err(e) = self.saved(save).await {
            self.promoted_unsaved();
            return Err(e);
        }
        tracing::warn!(group = %name, generation, "pair resync --swap: this node is now the primary; {peer} becomes the secondary when they meet");
        self.start_shipping();
        Ok(format!(
            "group {name}: this node is now the primary (generation {generation}) and its volumes are writable; {peer} \
             gives up the primary role when it connects, and its writes since the split are overwritten by this \
             node's data. `replicator status {name}` shows the resync"
        ))
    }

    /// `failback GROUP`: a former primary fenced by a failover (or in split
    /// brain) becomes the secondary of the new primary, discarding its
    /// writes after the takeover point. The CLI then waits for PAIR and
    /// switches back.
    pub async fn failback(self: &Arc<Self>) -> Result<String, GroupError> {
        self.refuse_if_stopped()?;
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        {
            let g = lock(&self.inner);
            if g.role() == Role::Secondary {
                // A failback interrupted after the demotion (or one run
                // with --no-switch): the CLI goes on with the wait and the
                // switch back.
                if g.persisted.role.as_secondary().is_some_and(|s| s.failing_back) {
                    return Ok(format!("group {name} is already the secondary of {peer} here ({})", g.state));
                }
                // Any other secondary: the switch back would hand a pair's
                // primary role over (a command run on the wrong site).
                return Err(GroupError::Refused(format!(
                    "group {name} is the secondary of {peer} here ({}) and was not a primary fenced by a failover: \
                     there is nothing to fail back (to change the roles, use `replicator switchover {name}`)",
                    g.state
                )));
            }
            if g.state == PairState::SplitBrain && g.peer_left_written {
                return Err(peer_left_refusal(&name, &peer));
            }
            if g.persisted.role.superseded_by() == 0 && g.state == PairState::SplitBrain {
                return Err(GroupError::Refused(format!(
                    "group {name}: this node is the newer primary of a split brain, not a primary fenced by a failover: \
                     to keep its data, run `replicator failback {name}` on {peer}; to keep {peer}'s, run `replicator \
                     pair resync {name} --discard-local` here"
                )));
            }
            if g.persisted.role.superseded_by() == 0 {
                return Err(GroupError::Refused(format!(
                    "group {name} is {} here and was not superseded by a failover: there is nothing to fail back \
                     (for a planned change of roles use `replicator switchover {name}`)",
                    if g.role() == Role::Primary { "the primary" } else { "not paired (SIMPLEX)" }
                )));
            }
        }
        self.discard_local().await
    }

    /// `pair resync --discard-local` (and `failback`): this side of a split
    /// brain, or a fenced former primary, gives up its writes.
    async fn discard_local(self: &Arc<Self>) -> Result<String, GroupError> {
        let name = self.cfg.name.clone();
        let peer = self.cfg.peer.clone();
        let (generation, point, fenced, acked_all) = {
            let g = lock(&self.inner);
            if g.state == PairState::SplitBrain && g.peer_left_written {
                return Err(peer_left_refusal(&name, &peer));
            }
            let primary = match g.persisted.role.as_primary() {
                Some(p) if p.superseded_by > 0 || g.state == PairState::SplitBrain => p,
                _ => {
                    return Err(GroupError::Refused(format!(
                        "group {name} is {} {} here: --discard-local is for a site in SPLIT-BRAIN or a former primary \
                         fenced after a failover; it would throw away this site's data for nothing",
                        g.role().as_str(),
                        g.state
                    )))
                }
            };
            if primary.superseded_by > 0 {
                let acked_all = primary.acked_all_on_peer && !self.former_primary_diverged(&g);
                (primary.superseded_by.max(g.persisted.generation), primary.superseded_at, true, acked_all)
            } else {
                // The newer primary of a split brain: everything since its
                // promotion goes.
                (g.persisted.generation, None, false, false)
            }
        };
        let (regions, bytes) = self.give_up_primary(generation, point, fenced).await?;
        let discarded = format!("{regions} region(s), {} ({bytes} bytes)", human_bytes(bytes));
        tracing::warn!(group = %name, generation, "this node gave up the primary role and discards its writes in {discarded}; it becomes the secondary of {peer}");
        Ok(if fenced {
            format!(
                "group {name}: this node is now the secondary of {peer} (generation {generation}). Discarded here: \
                 {discarded} holding writes {peer} did not have when it took over{}{}. {peer} copies those regions \
                 and its own changes since the failover when it connects",
                match point {
                    Some(p) => format!(" (after sequence {} of epoch {})", p.seq, p.epoch),
                    None => " (the takeover point is unknown: every record this node still held counts)".into(),
                },
                if acked_all {
                    format!(
                        "; none of them was acknowledged to a client (sync mode: every write acknowledged here \
                         had reached {peer} first, on a consistent replica; a write acknowledged without FUA or a \
                         later FLUSH is missing there only if {peer} lost power before it took over)"
                    )
                } else {
                    String::new()
                }
            )
        } else {
            format!(
                "group {name}: this node gave up the primary role and is the secondary now; its writes since it \
                 became primary ({discarded}) are overwritten by {peer}'s data when {peer} connects (it becomes the \
                 primary of a new generation then)"
            )
        })
    }

    /// Demotes this primary, discarding its writes beyond `point`: waits
    /// for writes in flight, makes its volumes durable, persists the
    /// regions that may differ as its bitmaps, then becomes the secondary
    /// (in `generation`) that needs a rebase; `failing_back` for a former
    /// primary fenced by a failover ([`SecondaryState::failing_back`]).
    /// Returns the regions and bytes discarded.
    pub(super) async fn give_up_primary(
        self: &Arc<Self>,
        generation: u64,
        point: Option<TakeoverPoint>,
        failing_back: bool,
    ) -> Result<(u64, u64), GroupError> {
        let name = self.cfg.name.clone();
        let (pair_id, after) = {
            let mut g = lock(&self.inner);
            let clients = self.nbd_clients.load(std::sync::atomic::Ordering::SeqCst);
            if clients > 0 {
                return Err(GroupError::Refused(format!(
                    "group {name}: {clients} NBD client(s) have its volumes attached here; detach them first (the \
                     volumes are about to be overwritten)"
                )));
            }
            if g.switching || g.taking_over {
                return Err(GroupError::Failed(format!("group {name}: a switchover or failover is running here")));
            }
            // No new writes from here (and no NBD client is attached).
            g.switching = true;
            (g.persisted.pair_id, divergence::records_beyond(point.map(Into::into), g.persisted.epoch))
        };
        let result = self.give_up_primary_now(generation, pair_id, after, failing_back).await;
        if result.is_err() {
            lock(&self.inner).switching = false;
        }
        result
    }

    async fn give_up_primary_now(
        self: &Arc<Self>,
        generation: u64,
        pair_id: u64,
        after: u64,
        failing_back: bool,
    ) -> Result<(u64, u64), GroupError> {
        let name = self.cfg.name.clone();
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            let idle = {
                let g = lock(&self.inner);
                g.seq.in_flight() == 0 && g.ready.completed_through() == g.last_jseq
            };
            if idle {
                break;
            }
            if Instant::now() >= deadline {
                return Err(GroupError::Failed(format!(
                    "group {name}: writes in flight did not finish within {} s; nothing changed",
                    QUIESCE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Every write the journal is about to forget must be on the volumes
        // durably: regions outside the divergent set are kept as they are.
        self.sync_all().await.map_err(|e| GroupError::Failed(format!("flushing the volumes failed: {e}")))?;
        let divergent = self.changes_after(after, u64::MAX).await?;
        let regions: u64 = divergent.iter().map(DirtyBitmap::dirty_chunks).sum();
        let bytes: u64 = divergent.iter().map(DirtyBitmap::dirty_bytes).sum();
        // The divergent regions are durable before the journal that names
        // them is dropped: a crash from here on still knows them.
        let save = {
            let mut g = lock(&self.inner);
            g.bitmaps = divergent;
            self.request_save(&mut g)
        };
        self.saved(save).await?;
        let epoch = lock(&self.inner).persisted.epoch;
        let journal = self.fresh_journal(pair_id, epoch).await?;
        let save = {
            let mut g = lock(&self.inner);
            let divergent = std::mem::take(&mut g.bitmaps);
            // A secondary that holds nothing the primary vouches for: its
            // restore journal starts at record 1, and its divergent regions
            // are copied over before it is consistent again.
            let secondary = SecondaryState {
                journal_tail_seq: 1,
                journal_tail_pos: JOURNAL_SUPERBLOCK_LEN,
                durable_seq: 0,
                consistent: false,
                copy_incomplete: true,
                needs_rebase: true,
                failing_back,
                ..SecondaryState::default()
            };
            takeover::change_role(&mut g, RoleState::Secondary(secondary), journal);
            g.bitmaps = divergent;
            g.persisted.generation = generation;
            g.ring = None;
            g.shipper_epoch += 1;
            g.switching = false;
            g.secondary_applied = 0;
            g.secondary_durable = 0;
            let save = self.save_later(&mut g);
            self.publish(&mut g);
            save
        };
        self.saved(save).await?;
        Ok((regions, bytes))
    }

    /// This primary's dirty bitmaps plus the regions of every journaled
    /// record in `(after, through]`.
    async fn changes_after(&self, after: u64, through: u64) -> Result<Vec<DirtyBitmap>, GroupError> {
        let (mut bitmaps, records, journal) = {
            let g = lock(&self.inner);
            let records: Vec<(u64, u64, Option<Region>)> = g
                .entries
                .range(after.saturating_add(1)..)
                .take_while(|(seq, _)| **seq <= through)
                .map(|(seq, e)| (*seq, e.pos, e.record.as_ref().map(|r| (r.volume, r.offset, u64::from(r.length)))))
                .collect();
            (g.bitmaps.clone(), records, g.journal.clone())
        };
        for (seq, pos, region) in records {
            let (vol, off, len) = match (region, &journal) {
                (Some(r), _) => r,
                (None, Some(j)) => {
                    let r = j.read_record(pos, seq).await?;
                    (r.volume, r.offset, u64::from(r.length))
                }
                (None, None) => return Err(GroupError::Failed(format!("record {seq} has no journal to read from"))),
            };
            if let Some(b) = bitmaps.get_mut(vol as usize) {
                b.set_range(off, len);
            }
        }
        Ok(bitmaps)
    }

    /// The secondary refused to resume because it discarded its own writes
    /// (`divergent`): copy those regions and every change this primary's
    /// journal holds, rebasing the secondary on the newest journaled
    /// record. A fenced former primary whose peer gave up the role (its
    /// `--discard-local`) takes over again, in a newer generation.
    pub(super) async fn rebase_peer(&self, divergent: &[pb::Extent], peer_generation: u64) -> Result<(), String> {
        let name = &self.cfg.name;
        let through = lock(&self.inner).ready.completed_through();
        let own = self.changes_after(0, through).await.map_err(|e| e.to_string())?;
        let (save, theirs, bytes) = {
            let mut g = lock(&self.inner);
            if g.role() != Role::Primary {
                return Err("this node is no longer the primary".into());
            }
            let mut marked = g.bitmaps.clone();
            let theirs = divergence::apply_extents(&mut marked, divergent).map_err(|e| e.to_string())?;
            for (m, o) in marked.iter_mut().zip(&own) {
                m.union_with(o).map_err(|e| e.to_string())?;
            }
            g.bitmaps = marked;
            let standing = super::applier::standing(self, &g);
            if let Answer::Rebase { take_over: true } = on_refusal(&standing, pb::Refusal::NeedsRebase, peer_generation)
            {
                // The peer gave up the primary role: this node's data wins.
                tracing::warn!(group = %name, "{} gave up the primary role and discarded its writes: this node is the primary again", self.cfg.peer);
                g.persisted.generation = g.persisted.generation.max(peer_generation) + 1;
                if let Some(p) = g.persisted.role.as_primary_mut() {
                    p.superseded_by = 0;
                    p.superseded_at = None;
                }
            }
            let save = self.rebase(&mut g, through);
            let bytes: u64 = g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
            (save, theirs, bytes)
        };
        tracing::warn!(group = %name, peer = %self.cfg.peer, peer_discarded = theirs, copy_bytes = bytes, rebase = through,
            "the peer discarded its own writes: copying its divergent regions and this node's changes");
        self.saved(save).await.map_err(|e| e.to_string())
    }

    /// A rebase of the secondary on record `rebase` (every journaled record
    /// up to it is covered by the bitmaps); returns the save that persists
    /// it (the bitmaps first, then the RESYNC intent, as every save does).
    fn rebase(&self, g: &mut Inner, rebase: u64) -> u64 {
        if let Some(p) = g.persisted.role.as_primary_mut() {
            p.rebase_seq = rebase;
            p.copy_pending = true;
            p.announce = Announce::Resync;
            p.rebased = true;
        }
        // The peer's image lacks (or may lack) regions this node holds,
        // acknowledged writes among them: until they are copied, a failover
        // leaves this node in split brain, not only fenced
        // (`divergence::wrote_beyond`). A write acknowledged alone from now
        // on waits for that save.
        self.note_lone_acks(g);
        g.refusal = None;
        g.last_error = None;
        if matches!(g.state, PairState::SplitBrain | PairState::Suspended(_)) {
            tracing::info!(group = %self.cfg.name, from = %g.state, "pair state change: resync of the peer's divergent regions");
            g.state = PairState::Suspended(SuspendReason::Link);
        } else {
            // Still PAIR (the peer came back within link_timeout, having
            // lost its restore journal): the replica is inconsistent until
            // the copy ends, and no switchover or RPO 0 claim meanwhile.
            self.transition(g, PairEvent::RegionsToCopy, "the peer's divergent regions are copied");
        }
        let save = self.save_later(g);
        self.publish(g);
        save
    }

    /// A fenced former primary: whether it holds writes the primary that
    /// superseded it lacks, judged against the takeover point it learned
    /// (`superseded_at`; unknown counts as yes). Then it is a split brain.
    pub(super) fn former_primary_diverged(&self, g: &Inner) -> bool {
        let former = FormerPrimary {
            last_seq: g.last_jseq,
            epoch: g.persisted.epoch,
            bitmap_bytes: g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum(),
            acked_all_on_peer: g.persisted.role.as_primary().is_some_and(|p| p.acked_all_on_peer),
        };
        divergence::wrote_beyond(former, g.persisted.role.as_primary().and_then(|p| p.superseded_at).map(Into::into))
    }
}

/// `failback` or `--discard-local` after the peer left the pair and was
/// written standalone: there is no pair to become its secondary in.
fn peer_left_refusal(name: &str, peer: &str) -> GroupError {
    GroupError::Refused(format!(
        "group {name}: {peer} left this pair (pair delete) and its volumes were written since: there is no pair to \
         rejoin. Keep one site's data: run `replicator pair delete {name}` here, then `replicator pair create {name} \
         --wait` on the site whose data is kept (a full copy; the other site needs accept_pair_create = true)"
    ))
}
