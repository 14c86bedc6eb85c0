//! The secondary's side of a replication session: validates `OpenGroup`,
//! then drives the sans-IO [`Secondary`] state machine (protocol crate),
//! which puts each record into the restore journal, applies it to the
//! volumes once the journal holds it durably (non-overlapping records
//! concurrently, overlapping ones in order), checkpoints, and acks. This
//! module performs its actions: journal appends and syncs, volume writes and
//! syncs, state saves, messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use replicator_protocol::apply::ApplyId;
use replicator_protocol::bitmap::DirtyBitmap;
use replicator_protocol::lifecycle::{judge_open, Opening, Standing, Verdict};
use replicator_protocol::pair::{PairEvent, PairState, Role, SuspendReason};
use replicator_protocol::pb::{self, envelope::Body};
use replicator_protocol::record::{Record, RecordOp};
use replicator_protocol::secondary::{
    Action, Barrier, Persist, PreserveFailure, Secondary, SecondaryConfig, SecondaryError, SecondaryStart,
};
use replicator_protocol::{divergence, wire};
use tokio::sync::{mpsc, oneshot, watch};

use super::drill::Frozen;
use super::pacing::PaceMark;
use super::task::IncomingSession;
use super::{journal_path, lock, Group, GroupError, Inner, SessionCommand};
use crate::config::Mode;
use crate::journal::Journal;
use crate::state::{Announce, GroupState, RoleState, SecondaryState, TakeoverPoint};
use crate::transport::{FramedRecv, FramedSend, TransportError};
use crate::volume::Volume;

/// How often the session looks at the clock (checkpoint cadence, a delete
/// waiting for the primary).
const TICK: Duration = Duration::from_millis(100);
/// Copy data applied beyond this is made durable at once (the primary
/// keeps at most a 16 MiB copy window in flight).
const COPY_FLUSH_BYTES: u64 = 4 << 20;
/// Applied records are made durable on the volumes, and their restore
/// journal space freed, at least this often.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Copy chunks (up to 1 MiB each) written or compared at once: enough to
/// keep the disk busy, few enough that replicated writes do not queue
/// behind a whole copy window.
const COPY_APPLIES: usize = 4;
/// Group commit of the restore journal when nobody waits for it (no FUA,
/// no FLUSH lately; a sync-mode WRITE is answered once its record is
/// appended): one fdatasync and one batch of applies per 5 ms or so in
/// async mode, instead of one per record. The applied point lags by as much
/// (the acks that report it are coalesced over [`ACK_DELAY`] anyway). Each
/// group syncs its own restore journal: at 1 ms, 32 async groups under load
/// made 9,000 fdatasyncs a second (one per 1.7 writes, each a wake-up of an
/// io_uring worker), where one group as busy made 800. With more than a
/// few groups busy the node stretches this delay (`pacing.rs`). See
/// `SecondaryConfig::journal_sync_delay`.
const RESTORE_JOURNAL_SYNC_DELAY_ASYNC_MODE: Duration = Duration::from_millis(5);
/// The same in sync mode, where the receipt of the next records is on the
/// clients' path: 5 ms of applies, released at once after their sync,
/// delayed those receipts (sync QD32 measured 9 % lower than with 1 ms).
/// That is once [`RESTORE_JOURNAL_SYNC_BATCH_SYNC_MODE`] records wait; fewer
/// (a light load, such as one client writing at queue depth 1) wait up to
/// the async mode's delay: one fdatasync per 16 records or 5 ms instead of
/// one per 4, each an io_uring worker's wake-up and a device flush (sync
/// QD1, alternating rounds: the secondary's CPU per write 105 -> 79 and
/// 87 -> 76 us; QD32 level).
const RESTORE_JOURNAL_SYNC_DELAY_SYNC_MODE: Duration = Duration::from_millis(1);
/// See [`RESTORE_JOURNAL_SYNC_DELAY_SYNC_MODE`]: half of what a sync-mode
/// load at queue depth 32 hands a node in 1 ms on a 2-vCPU test machine
/// (about 30 records), four times what one client at queue depth 1 does.
const RESTORE_JOURNAL_SYNC_BATCH_SYNC_MODE: u64 = 16;
/// Acks nobody waits for (async mode's receipts and applies, group-committed
/// durability) are coalesced over this long: one datagram per few
/// milliseconds instead of up to three per record, on both daemons' CPUs.
/// The primary's view of the lag, and its journal space, trail by as much
/// (more with many groups busy: `pacing.rs`). See
/// `SecondaryConfig::ack_delay`.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// Payloads received and not applied yet, held in memory, at most (see
/// `SecondaryConfig::max_unapplied_bytes`): half the primary's shipping
/// cache, twice what 32 volume writes of 1 MiB in flight hold.
const UNAPPLIED_BUDGET: u64 = 64 << 20;

/// Completions of the I/O the session performs.
enum Event {
    /// A large record's append (the others are done at once).
    Appended(u64, Result<(), String>),
    JournalSynced(u64, Result<(), String>),
    /// A record was applied, or hash-only copy chunk `copy_index`
    /// compared: its spans that differ here, as (offset, length).
    Applied {
        id: ApplyId,
        copy_index: u64,
        result: Result<Vec<(u64, u64)>, String>,
    },
    VolumesSynced(Barrier, Result<(), String>),
    Saved(Persist, Result<(), String>),
    ImagePreserved(Result<(), PreserveFailure>),
}

/// The session's disk I/O in flight: futures polled by the session's own
/// task (no task per action), each ending in its completion.
type Io = FuturesUnordered<BoxFuture<'static, Event>>;

/// A refused `OpenGroup`: the kind (sent to the primary, which acts on
/// it) and the reason in words.
type Refused = (pb::Refusal, String);

/// An accepted `OpenGroup`.
struct Accepted {
    /// Where the session starts.
    start: SecondaryStart,
    /// A new pair, or a resync: the restore journal starts over, with a
    /// fresh key (nothing in it is needed: every session starts from a
    /// drained checkpoint).
    fresh_journal: bool,
    commands: mpsc::UnboundedReceiver<SessionCommand>,
    /// The metadata save that must be on disk before the primary hears yes.
    save: u64,
}

/// Checks an `OpenGroup` from the configured peer (see `serve_secondary`)
/// against this node's configuration and state, and
/// takes the secondary role if it asks to create the pair (with local
/// consent). Returns where the session starts, or the refusal to send back.
/// `stopping` is the daemon's shutdown signal, read under the group's lock
/// where the session attaches: the stop reads `session_attached` after
/// signalling, so a session either attaches before that read (and is
/// drained) or sees the signal and is refused.
fn accept_open(
    group: &Group,
    open: &pb::OpenGroup,
    peer: &str,
    stopping: &watch::Receiver<bool>,
) -> Result<Accepted, Refused> {
    let name = &group.cfg.name;
    let config = |msg: String| (pb::Refusal::Config, msg);
    let ours: Vec<(String, u64)> = group.volumes.iter().map(|v| (v.name.clone(), v.size())).collect();
    let theirs: Vec<(String, u64)> = open.volumes.iter().map(|v| (v.name.clone(), v.size)).collect();
    if ours != theirs {
        let theirs = wire::peer_text(&format!("{theirs:?}"));
        return Err(config(format!(
            "volumes differ: the primary has {theirs}, this node has {ours:?} (names, order and sizes must match)"
        )));
    }
    if open.rebase_seq > replicator_protocol::record::MAX_SEQ {
        return Err(config(format!("the primary resumes at sequence {}, which no pair ever reaches", open.rebase_seq)));
    }
    // Counters no pair ever reaches: taken in, the next `+ 1` would wrap
    // (a generation 0 would fence the rightful primary).
    let counters = [("generation", open.generation), ("epoch", open.epoch), ("takeover epoch", open.takeover_epoch)];
    if let Some((what, n)) = counters.into_iter().find(|&(_, n)| n > replicator_protocol::record::MAX_SEQ) {
        return Err(config(format!("the primary sent {what} {n}, which no pair ever reaches")));
    }
    let mode = if open.mode == pb::Mode::Sync as i32 { "sync" } else { "async" };
    if mode != group.cfg.mode.as_str() {
        return Err(config(format!(
            "mode differs: the primary replicates {mode}, this node's config says {}",
            group.cfg.mode
        )));
    }
    let intent = pb::OpenIntent::try_from(open.intent).unwrap_or(pb::OpenIntent::Unspecified);
    let mut g = lock(&group.inner);
    // Under the lock: a session that fail-stops the group does so before it
    // detaches (under this lock), so no new one can start past its stop.
    if let Some(why) = group.stopped.get() {
        return Err((
            pb::Refusal::Unspecified,
            format!("group {name} stopped after a local failure here ({why}); it takes no session until the daemon restarts"),
        ));
    }
    if *stopping.borrow() {
        return Err(stopping_refusal());
    }
    if g.taking_over {
        return Err((pb::Refusal::Unspecified, format!("group {name}: a failover is in progress here")));
    }
    if g.creating {
        return Err((
            pb::Refusal::Unspecified,
            format!("group {name}: `pair create` is running here; retry in a moment"),
        ));
    }
    if g.switching && g.role() == Role::Secondary {
        // A switchover's demotion is saved, its restore journal not ready.
        return Err((
            pb::Refusal::Unspecified,
            format!("group {name}: a switchover is finishing here; retry in a moment"),
        ));
    }
    if g.drill_starting {
        return Err((pb::Refusal::Unspecified, format!("group {name}: a drill is starting here; retry in a moment")));
    }
    if group.guard_rolling_back() {
        return Err((
            pb::Refusal::Unspecified,
            format!(
                "group {name}: a failover here was rolling the unfinished resync back when it stopped; run \
                 `replicator failover {name}` here again to finish it"
            ),
        ));
    }
    // Who may replicate into whom (protocol::lifecycle decides; this
    // performs and words it).
    let opening = Opening::of(open);
    if open.generation > g.persisted.generation {
        group.drop_stale_hand_over(&mut g);
    }
    let mut verdict = judge_open(&standing(group, &g), &opening, group.former_primary_diverged(&g));
    // The takeover point says where this node's records stand only for the
    // promotion right after its own generation.
    let point = (open.promoted && open.generation == g.persisted.generation + 1)
        .then_some(TakeoverPoint { seq: open.takeover_seq, epoch: open.takeover_epoch });
    // Fenced earlier without it (this node reached the new primary first
    // and was told only "superseded"): learn it now, before judging whether
    // this node wrote beyond it; otherwise an unknown point counts as
    // divergence and a clean failover looks like a split brain.
    let learns_point =
        g.persisted.role.as_primary().is_some_and(|p| p.superseded_by == open.generation && p.superseded_at.is_none())
            && g.persisted.pair_id == open.pair_id
            && point.is_some();
    if verdict == Verdict::Fence || learns_point {
        group.fence(&mut g, open.generation, point);
        verdict = judge_open(&standing(group, &g), &opening, group.former_primary_diverged(&g));
    }
    match verdict {
        Verdict::Proceed => {}
        Verdict::HandingOver => {
            // The peer took over in a switchover this node started (its
            // confirmation may have been lost): this node becomes its
            // secondary in a moment.
            Group::confirm_hand_over(&mut g, open.generation);
            return Err((
                pb::Refusal::Unspecified,
                format!("group {name}: a switchover is handing the primary role to {peer}; retry in a moment"),
            ));
        }
        Verdict::GiveUpForSwap | Verdict::Fence => {
            return Err((pb::Refusal::Unspecified, format!("group {name}: this node is changing its role; retry")));
        }
        Verdict::Refuse(kind) => return Err((kind, refusal(group, &mut g, kind, open, peer))),
    }
    if g.secondary_attached {
        return Err((
            pb::Refusal::Unspecified,
            "another replication session for this group is already attached".into(),
        ));
    }
    match intent {
        pb::OpenIntent::CreateFullCopy | pb::OpenIntent::CreateNocopy => {
            if g.role() == Role::Secondary && g.persisted.pair_id != open.pair_id {
                return Err((
                    pb::Refusal::Config,
                    format!("group {name} is already the secondary of another pair here; run `replicator pair delete {name}` here first"),
                ));
            }
            if g.role() == Role::None {
                if !group.accepts_pair_create() {
                    return Err((
                        pb::Refusal::NoConsent,
                        format!(
                            "group {name} on this node does not accept becoming a secondary (its volumes would be overwritten): \
                             set accept_pair_create = true in its [[group]] section here and reload the daemon (SIGHUP: systemctl reload): the pair create on {peer} then proceeds by itself (or withdraw it there with `replicator pair delete {name}`)"
                        ),
                    ));
                }
                let clients = group.nbd_clients.load(std::sync::atomic::Ordering::SeqCst);
                if clients > 0 {
                    return Err((
                        pb::Refusal::InUse,
                        format!("group {name}: {clients} NBD client(s) have its volumes attached here; detach them before pairing"),
                    ));
                }
            }
            let copy = intent == pb::OpenIntent::CreateFullCopy;
            let secondary = SecondaryState {
                durable_seq: open.rebase_seq,
                journal_tail_seq: open.rebase_seq.saturating_add(1),
                consistent: !copy,
                copy_incomplete: copy,
                ..SecondaryState::default()
            };
            g.persisted = GroupState {
                role: RoleState::Secondary(secondary),
                pair_id: open.pair_id,
                generation: open.generation,
                // The primary's (a power cut before the first session moved
                // it on): takeover points and restore-journal keys use it.
                epoch: open.epoch,
                clean_shutdown: false,
                ..GroupState::simplex()
            };
            g.state = if copy { PairState::Copy } else { PairState::Pair };
            g.copy_total = open.copy_bytes;
            g.copy_done = 0;
            // A new pair: nothing of an earlier one (this node's own pair
            // create that it gave up with `pair delete`, its regions marked
            // for a copy) describes these volumes any more.
            for b in &mut g.bitmaps {
                b.clear_all();
            }
            g.last_error = None;
            tracing::info!(group = %name, primary = %peer, copy, "pair create: this node is now secondary");
        }
        pb::OpenIntent::Resume | pb::OpenIntent::Resync => {
            let left = g.persisted.role.as_simplex().filter(|s| s.former_pair_id == open.pair_id && open.pair_id != 0);
            if let Some(left) = left {
                return Err(if left.written_standalone {
                    (
                        pb::Refusal::WrittenStandalone,
                        format!(
                            "group {name} left this pair here (pair delete) and its volumes were written since: \
                             both sites hold writes the other lacks (split brain); keep one site's data: run \
                             `replicator pair delete {name}` on {peer} (the site still paired), then `replicator pair \
                             create {name} --wait` on the site whose data is kept (a full copy; the other site needs \
                             accept_pair_create = true)"
                        ),
                    )
                } else {
                    (
                        pb::Refusal::NotPaired,
                        format!("group {name} left this pair here (pair delete); run `replicator pair delete {name}` on {peer} too"),
                    )
                });
            }
            let g = &mut *g;
            let secondary = match g.persisted.role.as_secondary_mut() {
                Some(s) if g.persisted.pair_id == open.pair_id => s,
                _ => {
                    return Err((
                        pb::Refusal::NotPaired,
                        format!(
                            "group {name} is not paired with {peer} here (it is {}); run `replicator pair delete {name}` and then `pair create {name}` on {peer}",
                            g.state
                        ),
                    ))
                }
            };
            if intent == pb::OpenIntent::Resync {
                // The primary lost power and starts a new generation: what
                // it may have lost is copied again; records follow its
                // recovered journal.
                if secondary.needs_rebase {
                    tracing::info!(group = %name, primary = %peer, rebase = open.rebase_seq,
                        "resync: the primary copies the regions this node discarded and its own changes");
                } else {
                    tracing::warn!(group = %name, primary = %peer, epoch = open.epoch, rebase = open.rebase_seq,
                        "resync: the primary restarted after a power cut (or had no record of what this node holds): resynchronising the regions that may differ");
                }
                if open.rebase_seq != secondary.durable_seq || open.epoch > g.persisted.epoch.saturating_add(1) {
                    // The image becomes the primary's after another write
                    // than the one whose time this node holds (the primary
                    // lost the newer writes, or this node lacks some; or,
                    // past more than one epoch, another write of the same
                    // number): that write's time is not known here, and a
                    // failover before the next record says so rather than
                    // name the other's.
                    secondary.data_as_of_us = 0;
                }
                secondary.durable_seq = open.rebase_seq;
                secondary.journal_tail_seq = open.rebase_seq.saturating_add(1);
                // The rebase may number records below those the restore
                // journal already holds (a failback: this node's own
                // journal): started over with a fresh key from its start,
                // so no old record can pass for a new one at a recovery.
                secondary.journal_tail_pos = 0;
                g.persisted.epoch = open.epoch;
                // Inconsistent until the copy of those regions is done
                // (COPY_DONE follows even when there is nothing to copy).
                secondary.copy_incomplete = true;
                if secondary.needs_rebase {
                    // The primary's bitmaps hold the regions this node
                    // discarded (`rebased`, checked above): forget them.
                    tracing::info!(group = %name, primary = %peer, "the primary copies the regions this node discarded");
                    secondary.needs_rebase = false;
                    for b in &mut g.bitmaps {
                        b.clear_all();
                    }
                    group.bitmap_wanted.send_modify(|w| *w += 1);
                }
                g.persisted.generation = g.persisted.generation.max(open.generation);
            }
            if secondary.split_writable || g.state == PairState::Suspended(SuspendReason::Split) {
                tracing::info!(group = %name, primary = %peer, "pair resync: the split ends");
                secondary.split_writable = false;
            }
            secondary.consistent = !secondary.copy_incomplete;
            g.state = if secondary.consistent { PairState::Pair } else { PairState::Copy };
        }
        pb::OpenIntent::Unspecified => return Err((pb::Refusal::Config, "OpenGroup without an intent".into())),
    }
    let Some(secondary) = g.persisted.role.as_secondary() else {
        return Err((pb::Refusal::Unspecified, format!("group {name}: this node is not the secondary")));
    };
    let start = SecondaryStart {
        checkpoint: secondary.durable_seq,
        journal_head: secondary.journal_tail_pos,
        copy_incomplete: secondary.copy_incomplete,
        data_as_of_us: secondary.data_as_of_us,
        generation: open.generation,
    };
    // What the peer said when asked (`pair_query.rs`) no longer holds: it
    // replicates into this node.
    if g.refusal.take().is_some() {
        g.last_error = None;
    }
    if let Some(s) = g.persisted.role.as_secondary_mut() {
        s.primary_left_pair = false;
    }
    // Saved before the primary hears yes (the caller waits for it): after a
    // restart this node must still know it is the secondary of this pair.
    let save = group.save_later(&mut g);
    // The session's command channel is in place before the lock drops: a
    // `pair delete` here from now on goes through the session.
    let (commands_tx, commands) = mpsc::unbounded_channel();
    g.session_cmd = Some(commands_tx);
    g.secondary_attached = true;
    g.link_changed_at = std::time::SystemTime::now();
    g.secondary_durable = start.checkpoint;
    g.secondary_applied = start.checkpoint;
    group.publish(&mut g);
    let fresh_journal =
        matches!(intent, pb::OpenIntent::CreateFullCopy | pb::OpenIntent::CreateNocopy | pb::OpenIntent::Resync);
    Ok(Accepted { start, fresh_journal, commands, save })
}

/// This node's standing in the pair, for `protocol::lifecycle`.
pub(super) fn standing(group: &Group, g: &Inner) -> Standing {
    Standing {
        role: g.role(),
        pair_id: g.persisted.pair_id,
        generation: g.persisted.generation,
        superseded_by: g.persisted.role.superseded_by(),
        split: g.split(),
        split_brain: g.state == PairState::SplitBrain,
        needs_rebase: g.persisted.role.needs_rebase(),
        split_writable: g.persisted.role.split_writable(),
        switching: g.switching,
        in_use: group.nbd_clients.load(std::sync::atomic::Ordering::SeqCst) > 0,
        pending_create: g
            .persisted
            .role
            .as_primary()
            .is_some_and(|p| matches!(p.announce, Announce::CreateCopy | Announce::CreateNocopy)),
    }
}

/// A refusal in words (and what declaring it changes here).
fn refusal(group: &Group, g: &mut Inner, kind: pb::Refusal, open: &pb::OpenGroup, peer: &str) -> String {
    let name = &group.cfg.name;
    match kind {
        pb::Refusal::SplitBrain => {
            let msg = format!(
                "group {name}: SPLIT-BRAIN: this node, a former primary, holds writes that {peer} never received \
                 ({}), and {peer} was made the primary by a failover since (generation {}; writes it took as \
                 primary, if any, are not here); neither site replicates. \
                 To keep {peer}'s data: `replicator failback {name}` here. To keep this node's data: \
                 `replicator pair resync {name} --discard-local` on {peer}",
                beyond(g),
                g.persisted.role.superseded_by()
            );
            if g.state != PairState::SplitBrain {
                group.transition(g, PairEvent::SplitBrainDetected, &msg);
                tracing::error!(group = %name, "{msg}");
            }
            g.last_error = Some(msg.clone());
            msg
        }
        pb::Refusal::Fenced => format!(
            "group {name} here is a former primary fenced after the failover to {peer} (generation {}); it accepts \
             no writes and waits for `replicator failback {name}` here",
            g.persisted.role.superseded_by()
        ),
        pb::Refusal::Superseded if g.role() == Role::Primary => format!(
            "group {name} was failed over to this node (generation {}); {peer} (generation {}) was superseded and \
             must not accept writes",
            g.persisted.generation, open.generation
        ),
        pb::Refusal::Superseded => format!(
            "group {name} here follows generation {}; {peer} (generation {}) was superseded and must not accept \
             writes",
            g.persisted.generation, open.generation
        ),
        pb::Refusal::Split => {
            g.peer_knows_split = true;
            format!("group {name} was split by an admin here; `replicator pair resync {name}` on {peer} resumes it")
        }
        pb::Refusal::InUse => format!(
            "group {name}: NBD clients have the split replica's volumes attached here; detach them before the \
             resync overwrites them"
        ),
        pb::Refusal::NeedsRebase => {
            if let Some(s) = g.persisted.role.as_secondary_mut().filter(|s| s.split_writable) {
                // The regions named now must stay all there is until the
                // resync: the volumes take no more writes.
                s.split_writable = false;
                group.save_later(g);
            }
            let bytes: u64 = g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
            format!(
                "group {name}: this node's volumes differ from {peer}'s in {bytes} bytes of regions (its own \
                 writes it discards, or a restore journal it lost); copy them and resync"
            )
        }
        _ if g.persisted.pair_id == open.pair_id => {
            let msg = format!(
                "group {name} is primary on this node too, in the same generation: both sites wrote as primary \
                 (split brain); resolve with `replicator pair resync {name} --discard-local` on the site whose data \
                 is to be discarded"
            );
            if g.state != PairState::SplitBrain {
                group.transition(g, PairEvent::SplitBrainDetected, &msg);
            }
            msg
        }
        _ if standing(group, g).pending_create && open.intent() != pb::OpenIntent::Resume => format!(
            "group {name}: both sites ran `pair create`: {peer} and this node each wait for the other to become \
             their secondary; run `replicator pair delete {name}` on the site that is not to be the primary: the \
             other's pair create then proceeds by itself (its accept_pair_create must be true)"
        ),
        _ => format!(
            "group {name} is primary of another pair on this node; `replicator pair delete {name}` on the site \
             whose data is to be discarded, then `pair create` from the other"
        ),
    }
}

/// `pair resync --swap` on the peer made it the primary: this node, the
/// split former primary, gives up the role (its writes since the split are
/// overwritten). Anything else passes through unchanged.
async fn give_up_for_swap(group: &Arc<Group>, open: &pb::OpenGroup, peer: &str) -> Result<(), Refused> {
    let applies = {
        let g = lock(&group.inner);
        group.cfg.peer == peer && judge_open(&standing(group, &g), &Opening::of(open), false) == Verdict::GiveUpForSwap
    };
    if !applies {
        return Ok(());
    }
    let point = open.promoted.then_some(TakeoverPoint { seq: open.takeover_seq, epoch: open.takeover_epoch });
    match group.give_up_primary(open.generation, point, false).await {
        Ok((regions, bytes)) => {
            tracing::warn!(group = %group.cfg.name, %peer, regions, bytes,
                "pair resync --swap on {peer}: this node is now its secondary; its writes since the split are overwritten");
            Ok(())
        }
        Err(GroupError::Refused(msg)) => {
            // NBD clients hold the volumes: the role is given up once they
            // detach (the peer dials again). Until then this node takes no
            // writes, across restarts: the swap would overwrite each one it
            // acknowledged.
            let save = {
                let mut g = lock(&group.inner);
                match g.persisted.role.as_primary_mut() {
                    Some(primary) if primary.swapped_away_to != open.generation => {
                        primary.swapped_away_to = open.generation;
                        tracing::error!(group = %group.cfg.name, "{} ({msg})", group.swapped_away_text(open.generation));
                        Some(group.save_later(&mut g))
                    }
                    _ => None,
                }
            };
            if let Some(save) = save {
                if let Err(e) = group.saved(save).await {
                    tracing::warn!(group = %group.cfg.name, "{e}");
                }
            }
            Err((pb::Refusal::InUse, msg))
        }
        Err(e) => Err((pb::Refusal::Unspecified, format!("cannot give up the primary role here: {e}"))),
    }
}

/// A former primary's writes beyond the takeover point, in words.
fn beyond(g: &Inner) -> String {
    let bitmap: u64 = g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
    let records = match g.persisted.role.as_primary().and_then(|p| p.superseded_at) {
        Some(p) if p.epoch == g.persisted.epoch => {
            format!("{} journal record(s) after sequence {}", g.last_jseq.saturating_sub(p.seq), p.seq)
        }
        Some(_) => "records of a later epoch (it restarted after a power cut)".to_string(),
        None => "records after an unknown takeover point".to_string(),
    };
    if bitmap > 0 {
        format!("{records}, and {bitmap} bytes of regions tracked in its dirty bitmap")
    } else {
        records
    }
}

/// Before an `OpenGroup` that resyncs a consistent replica here: preserves
/// its image (the volumes hold exactly the checkpoint's writes while no
/// session is attached). Returns whether it did; refuses the resync when
/// the image cannot be preserved (the replica stays consistent, behind).
async fn guard_for_resync(group: &Group, open: &pb::OpenGroup) -> Result<bool, Refused> {
    if open.intent != pb::OpenIntent::Resync as i32 {
        return Ok(false);
    }
    let (seq, written_at_us) = {
        let g = lock(&group.inner);
        if !group.wants_guard(&g) || g.secondary_attached || g.taking_over || g.persisted.pair_id != open.pair_id {
            return Ok(false);
        }
        let Some(s) = g.persisted.role.as_secondary() else {
            return Ok(false);
        };
        (s.durable_seq, s.data_as_of_us)
    };
    group.preserve_image(seq, written_at_us).await.map(|()| true).map_err(|e| {
        let msg = format!(
            "group {}: cannot preserve the consistent image here before the resync overwrites it ({e}); the replica \
             stays consistent and behind until this is fixed (free space in the state directory)",
            group.cfg.name
        );
        lock(&group.inner).last_error = Some(msg.clone());
        (pb::Refusal::Unspecified, msg)
    })
}

/// The daemon is stopping: no session starts (its saves and a fresh restore
/// journal would interleave with the final flush and save). The primary
/// retries, and meets the restarted daemon.
fn stopping_refusal() -> Refused {
    (pb::Refusal::Unspecified, "the daemon is stopping".into())
}

/// Serves one group stream opened by the primary `peer`. Returns when the
/// stream ends, the pair is deleted, or `shutdown` fires (then it finishes
/// applying what it received and makes it durable first).
pub(super) async fn serve_secondary(group: Arc<Group>, incoming: IncomingSession) {
    let IncomingSession { open, mut send, mut recv, peer, mut shutdown } = incoming;
    if group.cfg.peer != peer {
        // Another configured node: nothing of this group's state is its
        // business (no image preserved for it, no "peer last heard").
        let error = format!("group {} is configured here with peer {:?}, not {peer:?}", group.cfg.name, group.cfg.peer);
        tracing::warn!(group = %group.cfg.name, %peer, "refused replication session: {error}");
        let reply = pb::OpenGroupReply { error, refusal: pb::Refusal::Config as i32, ..Default::default() };
        let _ = send.send(Body::OpenGroupReply(reply)).await;
        send.finish();
        return;
    }
    if *shutdown.borrow() {
        // Refused before any preservation starts; `accept_open` checks
        // again where the session attaches.
        let (refusal, error) = stopping_refusal();
        let reply = pb::OpenGroupReply {
            error,
            generation: lock(&group.inner).persisted.generation,
            refusal: refusal as i32,
            ..Default::default()
        };
        let _ = send.send(Body::OpenGroupReply(reply)).await;
        send.finish();
        return;
    }
    if let Err(refused) = give_up_for_swap(&group, &open, &peer).await {
        let reply = pb::OpenGroupReply {
            error: refused.1,
            generation: lock(&group.inner).persisted.generation,
            refusal: refused.0 as i32,
            ..Default::default()
        };
        let _ = send.send(Body::OpenGroupReply(reply)).await;
        send.finish();
        return;
    }
    // A resync after the primary lost power overwrites a consistent image
    // here: preserve it first (resync_guard.rs).
    let guard = guard_for_resync(&group, &open).await;
    let guarded = matches!(guard, Ok(true));
    let accepted = match guard.and_then(|_| accept_open(&group, &open, &peer, &shutdown)) {
        Ok(a) => {
            let ready = match group.saved(a.save).await {
                Ok(()) => restore_journal(&group, open.pair_id, a.fresh_journal).await,
                Err(e) => Err((pb::Refusal::Unspecified, format!("cannot persist the pair state here: {e}"))),
            };
            match ready {
                Ok(journal) => {
                    // The session runs: what ended the last one (a lost
                    // connection, say) is history, in the log (as on the
                    // primary).
                    lock(&group.inner).last_error = None;
                    Ok((a, journal))
                }
                Err(refused) => {
                    lock(&group.inner).last_error = Some(refused.1.clone());
                    detach(&group);
                    Err(refused)
                }
            }
        }
        Err(refused) => Err(refused),
    };
    let (Accepted { start, commands, .. }, journal) = match accepted {
        Ok(accepted) => accepted,
        Err((refusal, msg)) => {
            // A NeedsRebase names the regions the primary must copy: the
            // save that stopped this replica's writes is on disk first, so
            // a restart cannot make it writable again behind the primary's
            // back (the resync that follows clears every region here).
            // Likewise a Superseded: an old primary that asked this node to
            // take over demotes itself on it, so the promotion is on disk
            // first (its save may still fail: this node then stops).
            let (refusal, msg) = match refusal {
                pb::Refusal::NeedsRebase | pb::Refusal::Superseded => match group.saved(group.save_asked()).await {
                    Ok(()) => (refusal, msg),
                    Err(e) => (pb::Refusal::Unspecified, format!("cannot persist the pair state here: {e}")),
                },
                _ => (refusal, msg),
            };
            if guarded && lock(&group.inner).persisted.role.consistent() {
                group.release_image("the resync was refused");
            }
            // One line per distinct refusal (and a reminder every minute):
            // the primary retries every few seconds.
            let repeat = {
                let mut g = lock(&group.inner);
                // What only an admin fixes here is said here too, not only
                // on the primary (a secondary showing no reason sent its
                // admin looking at the network).
                if matches!(refusal, pb::Refusal::Config | pb::Refusal::NoConsent) {
                    g.last_error = Some(format!("refused {peer}'s replication session: {msg}"));
                }
                let repeat =
                    g.last_link_log.as_ref().is_some_and(|(m, at)| *m == msg && at.elapsed() < Duration::from_secs(60));
                if !repeat {
                    g.last_link_log = Some((msg.clone(), Instant::now()));
                }
                repeat
            };
            if !repeat {
                tracing::warn!(group = %group.cfg.name, %peer, "refused replication session: {msg}");
            }
            // The generation lets a superseded primary learn who took over.
            let reply = {
                let mut g = lock(&group.inner);
                group.heard_from_peer(&mut g, Some(&open.sender_state));
                pb::OpenGroupReply {
                    error: msg,
                    generation: g.persisted.generation,
                    refusal: refusal as i32,
                    divergent: match refusal {
                        pb::Refusal::NeedsRebase => divergence::to_extents(&g.bitmaps),
                        _ => Vec::new(),
                    },
                    state: Group::describe_self(&g),
                    ..Default::default()
                }
            };
            let _ = send.send(Body::OpenGroupReply(reply)).await;
            send.finish();
            return;
        }
    };
    let base = start.checkpoint;
    let (generation, state) = {
        let mut g = lock(&group.inner);
        group.heard_from_peer(&mut g, Some(&open.sender_state));
        (g.persisted.generation, Group::describe_self(&g))
    };
    if let Err(e) = send
        .send(Body::OpenGroupReply(pb::OpenGroupReply {
            error: String::new(),
            durable_seq: base,
            generation,
            refusal: pb::Refusal::Unspecified as i32,
            divergent: Vec::new(),
            state,
        }))
        .await
    {
        tracing::warn!(group = %group.cfg.name, "replication session ended at once: {e}");
        detach(&group);
        return;
    }
    tracing::info!(group = %group.cfg.name, %peer, resume_after = base, "replication session up (secondary)");
    let mut session = Session::new(group.clone(), journal, start, commands);
    let result = session.run(&mut send, &mut recv, &mut shutdown).await;
    if let Err(e) = &result {
        // Tell the primary why, so its status and log say it too.
        send.queue(Body::Error(pb::Error { message: e.to_string() }));
    }
    let drained = session.drain(&mut send).await;
    if session.machine.release_owed() {
        group.release_image("the resync ended and the replica is consistent (its session then failed)");
    }
    if !drained {
        // Applies may have reached the volumes beyond the checkpoint out of
        // order; the restore journal still holds them, and the next start
        // applies them again.
        let save = {
            let mut g = lock(&group.inner);
            if let Some(s) = g.persisted.role.as_secondary_mut() {
                s.consistent = false;
            }
            group.save_later(&mut g)
        };
        if let Err(e) = group.saved(save).await {
            tracing::error!(group = %group.cfg.name, "{e}");
        }
        // The restore journal holds records acknowledged as durable that are
        // not on the volumes: no new session until a restart replays it.
        group.fail_stop("local I/O failed on the secondary while applying; restart the daemon once the disk is healthy (it re-applies the restore journal)".into());
    }
    // Every apply is finished and durable: only now may the volumes become
    // writable here.
    if let Ending::Split { rw, asked_by_primary } = session.ending {
        let result = if drained {
            // Writable only if this replica may be (the primary does not
            // know all of it): refused, nothing changed but the session.
            let save = {
                let mut g = lock(&group.inner);
                let refused = if rw { group.refuse_writable_split(&g).err() } else { None };
                match refused {
                    Some(e) => Err(e),
                    None => {
                        let why = if asked_by_primary { "pair split on the primary" } else { "pair split" };
                        let save = group.split_here(&mut g, rw, why);
                        g.peer_knows_split = asked_by_primary;
                        Ok(save)
                    }
                }
            };
            match save {
                Ok(save) => group.saved(save).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            Err("applying failed; the split did not happen".to_string())
        };
        if asked_by_primary {
            let error = result.as_ref().err().cloned().unwrap_or_default();
            let _ = send
                .send(Body::CommandReply(pb::CommandReply {
                    command: pb::Command::Split as i32,
                    error,
                    ..Default::default()
                }))
                .await;
        }
        send.finish();
        detach(&group);
        if let Some(done) = session.split_done.take() {
            let _ = done.send(result);
        }
        return;
    }
    if let Ending::Switchover { seq } = session.ending {
        let taken = if drained {
            group.take_over_after_switchover(seq).await
        } else {
            Err(GroupError::Failed("applying failed".into()))
        };
        let error = match &taken {
            Ok(()) => String::new(),
            Err(e) => {
                tracing::error!(group = %group.cfg.name, "switchover: cannot take over: {e}");
                e.to_string()
            }
        };
        // Promoted here but not saved (the group stopped): neither yes nor
        // no is true. No answer leaves the old primary waiting, taking no
        // writes, until this node is back; "refused" would let it take
        // writes while a later save could still land the promotion.
        let promoted_unsaved = taken.is_err() && lock(&group.inner).role() == Role::Primary;
        if !promoted_unsaved {
            let reply = pb::CommandReply { command: pb::Command::Switchover as i32, error, ..Default::default() };
            let _ = send.send(Body::CommandReply(reply)).await;
        }
        send.finish();
        detach(&group);
        if taken.is_ok() {
            group.start_shipping();
        }
        return;
    }
    let deleted = match session.ending {
        Ending::Stream | Ending::Switchover { .. } | Ending::Split { .. } => None,
        Ending::DeletedByPrimary => Some("the primary ran pair delete"),
        Ending::DeletedHere { .. } => Some("pair delete on the secondary"),
    };
    // Why the delete did not happen here, or is not persisted: the peer and
    // the admin hear that the pair is deleted only once it is (until then
    // the daemon retries the save, and a restart would bring the pair back).
    let mut not_deleted = None;
    if let Some(why) = deleted {
        if drained {
            let save = {
                let mut g = lock(&group.inner);
                group.dissolve(&mut g, why)
            };
            if let Err(e) = group.dissolved(save).await {
                tracing::error!(group = %group.cfg.name, "{e}");
                not_deleted = Some(format!(
                    "the pair is deleted in memory but the secondary could not save it: {e} (the daemon retries; \
                     client writes there wait until it is saved)"
                ));
            }
        } else {
            // As for a split: the restore journal holds acknowledged writes
            // that did not reach the volumes, which a dissolved group would
            // forget. The group stopped (above) and stays a secondary; a
            // restart applies them again, and `pair delete` then ends it.
            let name = &group.cfg.name;
            tracing::error!(group = %name, reason = why, "pair delete not done here: applying failed");
            not_deleted = Some(if matches!(session.ending, Ending::DeletedHere { .. }) {
                format!(
                    "applying failed here, so the pair is not deleted here: the restore journal holds acknowledged \
                     writes that are not on the volumes yet; restart this daemon once the disk is healthy (it \
                     applies them again), then run `replicator pair delete {name}` again"
                )
            } else {
                format!(
                    "applying failed on the secondary, so the pair is not deleted there: its restore journal holds \
                     acknowledged writes that are not on its volumes yet; restart its daemon once the disk is \
                     healthy (it applies them again), then run `replicator pair delete {name}` there"
                )
            });
        }
    }
    if session.ending == Ending::DeletedByPrimary {
        let error = not_deleted.clone().unwrap_or_default();
        let reply = pb::CommandReply { command: pb::Command::Delete as i32, error, ..Default::default() };
        let _ = send.send(Body::CommandReply(reply)).await;
    }
    send.finish();
    if let (Ending::DeletedHere { confirmed }, Some(reply)) = (&session.ending, session.delete_reply.take()) {
        let name = &group.cfg.name;
        let _ = reply.send(if let Some(e) = not_deleted {
            let primary = if *confirmed {
                format!("{peer} ended the pair")
            } else {
                format!("{peer} did not confirm within 10 s: run `replicator pair delete {name}` there too")
            };
            Err(GroupError::Failed(format!("group {name}: {e}; {primary}")))
        } else if *confirmed {
            Ok(format!("group {name}: pair deleted on both sites; {peer} stopped replicating and the volumes here are standalone (SIMPLEX)"))
        } else {
            Ok(format!(
                "group {name}: pair deleted here (no applies run any more; the volumes are standalone); {peer} did not confirm \
                 within 10 s: it will find the pair gone when it reconnects; run `replicator pair delete {name}` there too"
            ))
        });
    }
    match result {
        Ok(()) => tracing::info!(group = %group.cfg.name, "replication session closed"),
        Err(e) => {
            group.counters.error(crate::metrics::ErrorKind::Session);
            tracing::warn!(group = %group.cfg.name, "replication session ended: {e}");
            // After a `pair delete` there is no link left to explain.
            let mut g = lock(&group.inner);
            if g.role() != Role::None {
                g.last_error = Some(e.to_string());
            }
        }
    }
    detach(&group);
}

/// The restore journal for a session, keyed with the pair id and the epoch
/// `accept_open` persisted: the one opened with the group, or, for a new
/// pair, a fresh one. After a resync adopted the primary's new epoch the
/// journal is reopened keyed with it: the session reuses sequence numbers
/// after the rebase point, and records of the old epoch left in the file
/// must not pass for them at the next recovery (nothing in it is needed any
/// more: every record was applied before the session was accepted, and the
/// rebase drops those beyond its point).
async fn restore_journal(group: &Group, pair_id: u64, fresh: bool) -> Result<Arc<Journal>, Refused> {
    let (current, epoch) = {
        let g = lock(&group.inner);
        (g.journal.clone(), g.persisted.epoch)
    };
    if !fresh {
        if let Some(j) = current.filter(|j| j.epoch() == epoch) {
            return Ok(j);
        }
    }
    if fresh {
        group.settle_appends().await.map_err(|e| (pb::Refusal::Unspecified, e.to_string()))?;
    }
    let path = journal_path(&group.store);
    let journal = Journal::open(&group.engine, &path, group.cfg.journal_size, &group.cfg.name, pair_id, epoch, fresh)
        .await
        .map_err(|e| (pb::Refusal::Unspecified, format!("cannot open the restore journal here: {e}")))?;
    let journal = Arc::new(journal);
    lock(&group.inner).journal = Some(journal.clone());
    Ok(journal)
}

/// The session is over: no replica claims PAIR without a live session.
fn detach(group: &Group) {
    let mut g = lock(&group.inner);
    g.secondary_attached = false;
    g.session_cmd = None;
    g.link_changed_at = std::time::SystemTime::now();
    if g.role() == Role::Secondary && matches!(g.state, PairState::Pair | PairState::Copy) {
        group.transition(&mut g, PairEvent::LinkDown, "the replication session ended");
    }
    group.publish(&mut g);
}

/// Why the session loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The stream ended, failed, or the daemon is stopping.
    Stream,
    /// The primary sent `pair delete`.
    DeletedByPrimary,
    /// `pair delete` ran here; `confirmed` when the primary dissolved too.
    DeletedHere {
        /// The primary answered with its own delete.
        confirmed: bool,
    },
    /// The primary asked this node to take over (switchover); every record
    /// through `seq` is on the stream.
    Switchover {
        /// The primary's last record.
        seq: u64,
    },
    /// `pair split`, here or on the primary.
    Split {
        /// `--rw`: the volumes become writable.
        rw: bool,
        /// The primary sent the command (it waits for the reply).
        asked_by_primary: bool,
    },
}

struct Session {
    group: Arc<Group>,
    machine: Secondary,
    journal: Arc<Journal>,
    /// Disk I/O in flight.
    io: Io,
    /// Commands from the control socket (`pair delete` here).
    commands: mpsc::UnboundedReceiver<SessionCommand>,
    /// Why the loop ends (set before it returns).
    ending: Ending,
    /// `pair delete` here: the admin's answer, and until when the primary
    /// may take to confirm.
    delete_reply: Option<oneshot::Sender<Result<String, GroupError>>>,
    leave_by: Option<Instant>,
    /// `pair split` here: told once the split is persisted.
    split_done: Option<oneshot::Sender<Result<(), String>>>,
    /// `switchover` here: the last request's id (the count sent), told if
    /// the primary will not hand over.
    switchover_requests: u64,
    switchover_refused: Option<oneshot::Sender<GroupError>>,
    /// A frame arrived since the last tick (the peer's last contact).
    heard: bool,
    /// The image was inconsistent at the last save (logs the change).
    copy_incomplete: bool,
    /// `drill start`: told the frozen point once reached; applies resume
    /// when `thaw` fires.
    freeze_reply: Option<oneshot::Sender<Result<Frozen, String>>>,
    thaw: Option<oneshot::Receiver<()>>,
    /// Counted among the node's busy sessions while something is deferred
    /// (see `pacing.rs`).
    pace: PaceMark,
}

impl Session {
    fn new(
        group: Arc<Group>,
        journal: Arc<Journal>,
        start: SecondaryStart,
        commands: mpsc::UnboundedReceiver<SessionCommand>,
    ) -> Self {
        let config = SecondaryConfig {
            journal_capacity: journal.capacity(),
            volume_sizes: group.volumes.iter().map(|v| v.size()).collect(),
            checkpoint_interval: CHECKPOINT_INTERVAL,
            copy_flush_bytes: COPY_FLUSH_BYTES,
            copy_sync_interval: TICK,
            copy_applies: COPY_APPLIES,
            journal_sync_delay: match group.cfg.mode {
                Mode::Sync => RESTORE_JOURNAL_SYNC_DELAY_SYNC_MODE,
                Mode::Async => RESTORE_JOURNAL_SYNC_DELAY_ASYNC_MODE,
            },
            journal_sync_batch: match group.cfg.mode {
                Mode::Sync => RESTORE_JOURNAL_SYNC_BATCH_SYNC_MODE,
                Mode::Async => 0,
            },
            journal_sync_delay_light: RESTORE_JOURNAL_SYNC_DELAY_ASYNC_MODE,
            receipt_acked_at_once: group.cfg.mode == Mode::Sync,
            ack_delay: ACK_DELAY,
            max_unapplied_bytes: UNAPPLIED_BUDGET,
            block_size: crate::io::IO_ALIGN as u64,
        };
        let copy_incomplete = start.copy_incomplete;
        let pace = PaceMark::new(group.pacing.clone());
        Self {
            group,
            machine: Secondary::new(config, start, Instant::now()),
            journal,
            io: Io::new(),
            commands,
            ending: Ending::Stream,
            delete_reply: None,
            leave_by: None,
            split_done: None,
            switchover_requests: 0,
            switchover_refused: None,
            heard: false,
            copy_incomplete,
            freeze_reply: None,
            thaw: None,
            pace,
        }
    }

    async fn run(
        &mut self,
        send: &mut FramedSend,
        recv: &mut FramedRecv,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), TransportError> {
        let mut tick = tokio::time::interval(TICK);
        // One timer for the state machine's deadline, moved only when the
        // deadline moves: a timer made anew for every turn of this loop
        // enters tokio's timer wheel each time, and each entry earlier than
        // the one the runtime last slept for wakes the runtime's driver (a
        // write to its eventfd, then a wasted turn of its poll loop): about
        // one write in five at sync QD1.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_at: Option<Instant> = None;
        loop {
            let reading = self.machine.wants_input() && !self.finished();
            let stretch = self.pace.update(self.machine.deferred_until().is_some());
            self.machine.set_stretch(stretch);
            let timeout = self.machine.poll_timeout();
            if let Some(at) = timeout.filter(|&at| timer_at != Some(at)) {
                timer.as_mut().reset(at.into());
                timer_at = Some(at);
            }
            tokio::select! {
                frame = recv.recv(), if reading => {
                    match frame? {
                        None => return Ok(()),
                        Some(env) => self.on_frame(env)?,
                    }
                    // Take every frame that arrived in the same read.
                    while self.machine.wants_input() && !self.finished() {
                        let Some(env) = recv.try_next()? else { break };
                        self.on_frame(env)?;
                    }
                    if self.finished() {
                        return Ok(());
                    }
                }
                Some(ev) = self.io.next(), if !self.io.is_empty() => self.on_event(ev)?,
                Some(cmd) = self.commands.recv() => match cmd {
                    SessionCommand::Delete(reply) => {
                        // Stop applying, ask the primary to dissolve too; the
                        // volumes become writable here only after the drain.
                        tracing::info!(group = %self.group.cfg.name, "pair delete on the secondary: asking the primary to end the pair");
                        self.delete_reply = Some(reply);
                        self.ending = Ending::DeletedHere { confirmed: false };
                        self.leave_by = Some(Instant::now() + Duration::from_secs(10));
                        send.send(Body::Command(pb::GroupCommand { command: pb::Command::Delete as i32, ..Default::default() })).await?;
                    }
                    SessionCommand::RequestSwitchover { force, refused } => {
                        // A newer request replaces the one waiting: its
                        // command keeps waiting for the role change alone.
                        self.switchover_requests += 1;
                        self.switchover_refused = Some(refused);
                        let ask = pb::GroupCommand {
                            command: pb::Command::SwitchoverRequest as i32,
                            seq: self.switchover_requests,
                            force,
                            ..Default::default()
                        };
                        send.send(Body::Command(ask)).await?;
                    }
                    SessionCommand::Split { rw, done } => {
                        tracing::info!(group = %self.group.cfg.name, rw, "pair split on the secondary: ending the replication session");
                        self.ending = Ending::Split { rw, asked_by_primary: false };
                        self.split_done = Some(done);
                        return Ok(());
                    }
                    SessionCommand::End => {
                        tracing::warn!(group = %self.group.cfg.name, "failover --force: ending the replication session");
                        return Ok(());
                    }
                    SessionCommand::Freeze { frozen, thaw } => {
                        if self.machine.freeze() {
                            self.freeze_reply = Some(frozen);
                            self.thaw = Some(thaw);
                        } else {
                            let _ = frozen.send(Err("a resync has made the replica inconsistent since".into()));
                        }
                    }
                },
                _ = wait_thaw(&mut self.thaw), if self.thaw.is_some() => {
                    self.thaw = None;
                    self.freeze_reply = None;
                    self.machine.thaw();
                }
                () = &mut timer, if timeout.is_some() => {}
                _ = tick.tick() => {
                    if self.leave_by.is_some_and(|t| Instant::now() >= t) {
                        return Ok(());
                    }
                    if std::mem::take(&mut self.heard) {
                        self.group.heard_from_peer(&mut lock(&self.group.inner), None);
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
            // Coalesce: one ack covers every completion that arrived by now.
            while let Some(Some(ev)) = self.io.next().now_or_never() {
                self.on_event(ev)?;
            }
            let queued_io = self.io.len();
            self.perform(send)?;
            self.report_frozen();
            if self.group.cfg.mode == Mode::Sync && send.queued() > 0 {
                // What a sync-mode turn sends (a receipt, durability a FUA
                // or FLUSH asked for) is what clients' writes wait for: the
                // QUIC driver sends it at once, and the I/O this turn
                // queued (applies, a journal sync) is submitted after it.
                // Its first poll submits it to the disk, on a virtual
                // machine an exit of some 20 µs (see `SyncWrite` on the
                // primary).
                send.flush_now().await?;
                if self.io.len() > queued_io {
                    tokio::task::yield_now().await;
                }
            } else {
                send.flush().await?;
            }
        }
    }

    /// Tells `drill start` the frozen point once the replica reached it.
    fn report_frozen(&mut self) {
        if let (Some(seq), Some(_)) = (self.machine.frozen_at(), &self.freeze_reply) {
            let frozen =
                Frozen { seq, data_as_of_us: self.machine.applied_as_of_us(), received: self.machine.received() };
            if let Some(reply) = self.freeze_reply.take() {
                let _ = reply.send(Ok(frozen));
            }
        }
    }

    /// Finishes in-flight applies, makes everything received durable on the
    /// volumes and persists the checkpoint (clean stop or end of session).
    /// The caller finishes the stream (a delete confirmation may still
    /// follow). Returns whether it completed (false after an I/O error,
    /// during the drain or before it).
    async fn drain(&mut self, send: &mut FramedSend) -> bool {
        // The drain applies what a drill's freeze holds back. Once `drill
        // start` knows the frozen point, it takes its copy of the volumes
        // as they are: the drain waits until that copy is attached (its
        // copy-on-write then preserves what the drain overwrites), or given
        // up. (It used to go on at once, and the drill discarded a copy not
        // attached yet; but a stop or a crash before that discard kept a
        // copy holding writes past its recovery point.) A freeze not yet
        // answered ends here: the drill hears it (its channel closes).
        if self.thaw.is_some() && self.freeze_reply.is_none() {
            wait_thaw(&mut self.thaw).await;
        }
        self.thaw = None;
        self.freeze_reply = None;
        self.machine.begin_drain();
        let mut failed = false;
        loop {
            if let Err(e) = self.perform(send) {
                tracing::error!(group = %self.group.cfg.name, "{e}");
                failed = true;
            }
            if self.io.is_empty() && self.machine.is_drained() {
                break;
            }
            match self.io.next().await {
                Some(ev) => {
                    if let Err(e) = self.on_event(ev) {
                        tracing::error!(group = %self.group.cfg.name, "{e}");
                        failed = true;
                    }
                }
                None => break,
            }
        }
        let _ = send.flush().await;
        if !failed && !self.machine.has_failed() && !self.machine.is_drained() {
            // No I/O left to wait for, yet records not applied: never
            // reached (every undrained state has I/O in flight), and taken
            // as a failed drain if it were: the volumes are not used as the
            // checkpoint's image, a restart replays the restore journal.
            tracing::error!(group = %self.group.cfg.name, "the drain ended with records not applied and no I/O in flight");
            return false;
        }
        !failed && !self.machine.has_failed()
    }

    /// The loop must end: the pair is being deleted and the primary has
    /// confirmed (or asked for it).
    fn finished(&self) -> bool {
        matches!(
            self.ending,
            Ending::DeletedByPrimary
                | Ending::DeletedHere { confirmed: true }
                | Ending::Switchover { .. }
                | Ending::Split { .. }
        )
    }

    fn on_frame(&mut self, env: pb::Envelope) -> Result<(), TransportError> {
        self.heard = true;
        if matches!(self.ending, Ending::DeletedHere { .. }) {
            // Leaving the pair: nothing is applied any more; wait for the
            // primary's own delete.
            if let Some(Body::Command(c)) = &env.body {
                if c.command == pb::Command::Delete as i32 {
                    tracing::info!(group = %self.group.cfg.name, "the primary ended the pair too; finishing the applies received");
                    self.ending = Ending::DeletedHere { confirmed: true };
                }
            }
            return Ok(());
        }
        match env.body {
            Some(Body::Record(msg)) => {
                let (group_name, rec) =
                    Record::from_pb(msg).map_err(|e| TransportError::Protocol(format!("rejected record: {e}")))?;
                if group_name != self.group.cfg.name {
                    return Err(TransportError::Protocol(format!(
                        "record for group {group_name:?} on the stream of {}",
                        self.group.cfg.name
                    )));
                }
                self.machine.on_record(rec).map_err(protocol)
            }
            Some(Body::Flush(f)) => {
                self.machine.on_flush_request(f.seq);
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::CopyDone as i32 => {
                self.machine.on_copy_done(c.seq, c.at_us).map_err(protocol)
            }
            Some(Body::Command(c)) if c.command == pb::Command::ResyncGap as i32 => {
                self.machine.on_resync_gap(c.seq);
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::Switchover as i32 => {
                if self.machine.received() < c.seq {
                    return Err(TransportError::Protocol(format!(
                        "switchover after record {} but only {} arrived",
                        c.seq,
                        self.machine.received()
                    )));
                }
                self.ending = Ending::Switchover { seq: c.seq };
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::Split as i32 => {
                self.ending = Ending::Split { rw: c.rw, asked_by_primary: true };
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::PrimaryProgress as i32 => {
                let mut g = lock(&self.group.inner);
                self.group.heard_from_peer(&mut g, Some(&c.state));
                // The copy's progress is counted on the primary.
                g.copy_total = c.copy_total;
                g.copy_done = c.copy_done;
                g.copy_sent = c.copy_sent;
                if let Some(s) = g.persisted.role.as_secondary_mut() {
                    s.primary_reported_seq = c.seq;
                    s.primary_reported_bytes = c.bytes;
                    // The primary's time of the report (it may arrive late,
                    // behind the records queued before it).
                    s.primary_reported_at_us = if c.at_us != 0 { c.at_us } else { super::write_path::unix_micros() };
                }
                Ok(())
            }
            Some(Body::CommandReply(r)) if r.command == pb::Command::SwitchoverRequest as i32 => {
                // The primary will not hand over (a switchover that goes
                // ahead ends this session instead).
                let (name, peer) = (&self.group.cfg.name, &self.group.cfg.peer);
                let text = wire::peer_text(&r.error);
                let text = text.strip_prefix(&format!("group {name}: ")).unwrap_or(&text);
                let why = format!("{peer} (the primary) did not hand over: {text}");
                tracing::warn!(group = %self.group.cfg.name, "switchover: {why}");
                if r.seq == self.switchover_requests {
                    if let Some(tx) = self.switchover_refused.take() {
                        let _ = tx.send(if r.refused { GroupError::Refused(why) } else { GroupError::Failed(why) });
                    }
                }
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::Delete as i32 => {
                // Dissolved (and confirmed) after the drain, see
                // `serve_secondary`.
                tracing::info!(group = %self.group.cfg.name, "the primary ran pair delete; finishing the applies received");
                self.ending = Ending::DeletedByPrimary;
                Ok(())
            }
            Some(other) => Err(TransportError::Protocol(format!(
                "unexpected message on a group stream: {}",
                wire::body_kind(&other)
            ))),
            None => Err(TransportError::Protocol("empty envelope on a group stream".into())),
        }
    }

    fn on_event(&mut self, ev: Event) -> Result<(), TransportError> {
        let synced_failed = matches!(&ev, Event::JournalSynced(_, Err(_)) | Event::VolumesSynced(_, Err(_)));
        let result = match ev {
            Event::Appended(seq, Ok(())) => {
                self.machine.on_appended(seq);
                Ok(())
            }
            Event::Appended(seq, Err(e)) => Err(self.machine.on_append_failed(seq, &e)),
            Event::JournalSynced(through, r) => self.machine.on_journal_synced(through, r),
            Event::Applied { id, copy_index, result } => {
                // Mismatches first: reported no later than the chunk's
                // copy_durable.
                let r = result.map(|spans| {
                    for (offset, length) in spans {
                        self.machine.on_copy_mismatch(copy_index, offset, length);
                    }
                });
                self.machine.on_applied(id, r)
            }
            Event::VolumesSynced(barrier, r) => self.machine.on_volumes_synced(barrier, r),
            Event::Saved(persist, r) => {
                if r.is_ok() {
                    self.saved(&persist);
                }
                self.machine.on_saved(&persist, r, Instant::now())
            }
            Event::ImagePreserved(r) => self.machine.on_image_preserved(r),
        };
        if let Err(e) = &result {
            if synced_failed {
                // Nothing synced later proves anything: no new session may
                // start here.
                self.group.stop_after_failed_sync(&e.to_string());
            }
            lock(&self.group.inner).last_error = Some(e.to_string());
        }
        result.map_err(protocol)
    }

    /// A snapshot is on disk: the status follows it.
    fn saved(&mut self, persist: &Persist) {
        let mut g = lock(&self.group.inner);
        if g.role() != Role::Secondary {
            return;
        }
        if self.copy_incomplete && !persist.copy_incomplete {
            tracing::info!(group = %self.group.cfg.name, "copy complete: this replica is consistent");
        }
        self.copy_incomplete = persist.copy_incomplete;
        let state = if persist.copy_incomplete { PairState::Copy } else { PairState::Pair };
        if g.state != state && matches!(g.state, PairState::Pair | PairState::Copy) {
            g.state = state;
            self.group.publish(&mut g);
        }
    }

    /// Performs what the state machine asks for: appends here and now,
    /// everything that waits on a disk as a future of this task.
    fn perform(&mut self, send: &mut FramedSend) -> Result<(), TransportError> {
        let now = Instant::now();
        while let Some(action) = self.machine.poll_action(now) {
            match action {
                Action::Append { pos, record } if self.journal.appends_directly(record.payload.len()) => {
                    let journal = self.journal.clone();
                    self.io.push(Box::pin(async move {
                        Event::Appended(record.seq, journal.append(pos, &record).await.map_err(|e| e.to_string()))
                    }));
                }
                Action::Append { pos, record } => {
                    if let Err(e) = self.journal.append_at(pos, &record) {
                        let e = self.machine.on_append_failed(record.seq, &e.to_string());
                        lock(&self.group.inner).last_error = Some(e.to_string());
                        return Err(protocol(e));
                    }
                    self.machine.on_appended(record.seq);
                }
                Action::SyncJournal { through } => {
                    let journal = self.journal.clone();
                    self.io.push(Box::pin(async move {
                        Event::JournalSynced(through, journal.sync().await.map_err(|e| e.to_string()))
                    }));
                }
                Action::Apply { id, record } => {
                    let vol = self.group.volumes.get(record.volume as usize).cloned();
                    let counters = self.group.counters.clone();
                    self.io.push(Box::pin(async move {
                        let copy_index = record.copy_index;
                        let result = apply(vol, &record).await;
                        match &result {
                            Ok(_) => counters.applied(&record),
                            Err(_) => counters.error(crate::metrics::ErrorKind::Apply),
                        }
                        Event::Applied { id, copy_index, result }
                    }));
                }
                Action::SyncVolumes(barrier) => {
                    let volumes = self.group.volumes.clone();
                    self.io.push(Box::pin(async move { Event::VolumesSynced(barrier, sync_volumes(&volumes).await) }));
                }
                Action::Save(persist) => {
                    let group = self.group.clone();
                    let snapshot = {
                        let mut g = lock(&group.inner);
                        if let Some(s) = g.persisted.role.as_secondary_mut() {
                            s.durable_seq = persist.checkpoint;
                            s.journal_tail_seq = persist.checkpoint + 1;
                            s.journal_tail_pos = persist.journal_tail_pos;
                            s.copy_incomplete = persist.copy_incomplete;
                            s.consistent = !persist.copy_incomplete;
                            s.data_as_of_us = s.data_as_of_us.max(persist.data_as_of_us);
                        }
                        Group::snapshot_state(&mut g)
                    };
                    // fsync and rename block: on the blocking pool.
                    let saving = tokio::task::spawn_blocking(move || group.write_state(snapshot));
                    self.io.push(Box::pin(async move {
                        let r = match saving.await {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(e) => Err(format!("the state save failed: {e}")),
                        };
                        Event::Saved(persist, r)
                    }));
                }
                Action::PreserveImage { seq, written_at_us } => {
                    let group = self.group.clone();
                    self.io.push(Box::pin(async move {
                        Event::ImagePreserved(group.preserve_image(seq, written_at_us).await)
                    }));
                }
                Action::ReleaseImage => self.group.release_image("the resync ended and the replica is consistent"),
                Action::Send(body) => send.queue(body),
            }
        }
        let mut g = lock(&self.group.inner);
        g.secondary_applied = self.machine.applied();
        g.secondary_durable = self.machine.durable();
        if let Some(s) = g.persisted.role.as_secondary_mut() {
            s.data_as_of_us = s.data_as_of_us.max(self.machine.data_as_of_us());
        }
        Ok(())
    }
}

/// Resolves when `drill start` lets applies resume (or gave up).
async fn wait_thaw(thaw: &mut Option<oneshot::Receiver<()>>) {
    match thaw {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

fn protocol(e: SecondaryError) -> TransportError {
    TransportError::Protocol(e.to_string())
}

/// Applies one record to its volume; a hash-only copy chunk is compared
/// instead, returning the spans that differ here.
async fn apply(vol: Option<Arc<Volume>>, record: &Record) -> Result<Vec<(u64, u64)>, String> {
    let Some(vol) = vol else {
        return Err(format!("record {} names a volume that does not exist", record.seq));
    };
    // The CRC was checked on arrival; check it again right before the bytes
    // go to disk, so memory corruption in between is caught too.
    if let Err(e) = record.verify_crc() {
        return Err(format!("record {} failed its CRC check before apply: {e}", record.seq));
    }
    let result = if record.op == RecordOp::CopyHash {
        vol.differing_spans(record).await
    } else {
        vol.apply(record).await.map(|()| Vec::new())
    };
    result.map_err(|e| format!("volume {}: {e}", vol.name))
}

/// fsyncs every volume of the group, concurrently.
pub(super) async fn sync_volumes(volumes: &[Arc<Volume>]) -> Result<(), String> {
    let syncs = volumes.iter().map(|v| async move { v.sync().await.map_err(|e| format!("volume {}: {e}", v.name)) });
    // Every sync finishes (none is dropped half way) before the answer.
    futures_util::future::join_all(syncs).await.into_iter().collect()
}
