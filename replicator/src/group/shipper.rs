//! The primary's replication session, run by the group's task
//! (`task.rs`): it (re)connects to the peer with backoff, opens the group
//! stream, sends records in sequence order, flush requests and copy chunks,
//! and reads the secondary's acks, all as futures of that one task.
//!
//! What goes on the stream, and in which order, is decided by the sans-IO
//! [`PrimarySession`] (protocol crate); this module performs it. Copy chunks
//! (initial copy and resync) are read under a sequencer read barrier and
//! tagged with the last journal sequence they reflect; the session sends
//! them only after every record up to that sequence, so the secondary never
//! lets a chunk overwrite a newer write. Several chunks are read at once
//! (their barriers taken in copy order); each barrier holds writes to its
//! range off until the chunk is on the stream.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use replicator_protocol::journal_format::JournalRing;
use replicator_protocol::journal_space;
use replicator_protocol::pair::{PairEvent, PairState, Role};
use replicator_protocol::pb::{self, envelope::Body};
use replicator_protocol::primary::{check_resume, CopyStep, PrimaryConfig, PrimarySession, Transmit};
use replicator_protocol::record::Record;
use replicator_protocol::wire::{self, MAX_RECORD_PAYLOAD};

use super::write_path::RangeGuard;
use super::{lock, Group, GroupError, Inner};
use crate::config::{LinkLossPolicy, Mode};
use crate::state::Announce;
use crate::transport::{FramedRecv, FramedSend, Transport, TransportError};
use crate::volume::span_digests;

/// Copy chunks of at most 1 MiB, four read at once; 16 MiB sent but not yet
/// durable on the secondary, up to 256 MiB on a long fat link (twice its
/// bandwidth-delay product: 10 Gbit/s over 100 ms). A node with one group
/// gives its stream that much receive window; with more, each stream gets
/// its share of the connection's (`tls::receive_windows`: 15.5 MiB each
/// for 32 groups, 155 MB/s for one group's copy over 100 ms).
const COPY: PrimaryConfig = PrimaryConfig {
    copy_chunk: 1 << 20,
    copy_window: 16 << 20,
    copy_window_max: 256 << 20,
    copy_by_hash: true,
    copy_reads: 4,
};
/// Records are sent in batches of about this many bytes.
const BATCH: usize = 1 << 20;
/// Records no longer in the payload cache are read back from the journal
/// up to this many bytes (and [`READ_AHEAD_RECORDS`] records) ahead of the
/// stream, several reads at once (see [`ReadAhead`]).
const READ_AHEAD_BYTES: u64 = 8 << 20;
/// See [`READ_AHEAD_BYTES`].
const READ_AHEAD_RECORDS: usize = 64;
/// Async mode: once a record is ready while the stream is idle, the
/// records the clients write during this time go out with it. Each batch
/// is one write to the stream and one segmented send, and wakes the
/// secondary once: at QD1 a record per wake-up cost the primary about 15 µs
/// and the secondary about 20 µs of CPU per write more (0.9 datagrams per
/// write against 0.1), and made async QD1 p50 about a fifth longer
/// (`bench/ab.sh 3 async,sync qd1,qd32 A B`, both orders). The lag grows by
/// as much (the timer's granularity makes it 1–2 ms). Not while a copy
/// chunk holds writes to its range until the records before it are on the
/// stream (its read barrier), and anything else to send (a chunk read, a
/// command, a region `verify` holds) ends the wait. Under load the records
/// that become ready while a batch goes out follow it at once.
const ASYNC_GATHER: Duration = Duration::from_millis(1);
/// How often the primary tells the secondary how far its journal reaches.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often, at least, the copy window follows the link (and at most once
/// per two round trips): [`PrimarySession::on_copy_interval`].
const COPY_INTERVAL: Duration = Duration::from_millis(100);

/// Ships while this node is the primary: runs the sessions of each
/// `start_shipping` (a new epoch) in turn. A run from before a pair delete
/// + create sees the newer epoch and ends; the next one starts after it.
pub(super) async fn ship_while_primary(group: &Arc<Group>) {
    let mut ran = 0;
    loop {
        let epoch = {
            let g = lock(&group.inner);
            (g.role() == Role::Primary && g.shipper_epoch != ran).then_some(g.shipper_epoch)
        };
        match epoch {
            Some(epoch) => {
                ran = epoch;
                run(group, epoch).await;
            }
            None => group.shipping_started.notified().await,
        }
    }
}

/// Are these sessions still the group's current ones, for the same pair?
/// Whether this session's pair (`pair_id`, shipper `epoch`) is no longer
/// the one this node is primary of.
fn pair_changed(g: &Inner, epoch: u64, pair_id: u64) -> bool {
    g.shipper_epoch != epoch || g.role() != Role::Primary || g.persisted.pair_id != pair_id
}

/// Is this session (shipper `epoch`) still the one of this node's primary role?
fn is_current(g: &Inner, epoch: u64) -> bool {
    g.role() == Role::Primary && g.shipper_epoch == epoch
}

fn current(group: &Group, epoch: u64) -> bool {
    is_current(&lock(&group.inner), epoch)
}

/// How the session task goes on after a session ended.
enum Retry {
    /// With the usual backoff.
    Backoff,
    /// Rarely, and quietly: an admin must act on one of the sites (this
    /// node is fenced, or in split brain), and a command on the peer
    /// (`failback`, `--discard-local`) is noticed at the next attempt.
    Rarely,
    /// Not at all: the peer left the pair (`pair delete` ends it here).
    Stop(&'static str),
}

/// Poll interval of [`Retry::Rarely`].
const RARE_RETRY: Duration = Duration::from_secs(10);

fn retry(group: &Group) -> Retry {
    let g = lock(&group.inner);
    if g.refusal == Some("not-paired") {
        Retry::Stop("the peer is no longer in this pair")
    } else if g.persisted.role.superseded_by() > 0 || g.state == PairState::SplitBrain {
        Retry::Rarely
    } else {
        Retry::Backoff
    }
}

async fn run(group: &Arc<Group>, epoch: u64) {
    let mut backoff = Duration::from_millis(100);
    let mut kick = group.session_kick.subscribe();
    loop {
        if !current(group, epoch) {
            return;
        }
        let (switching, asked) = {
            let g = lock(&group.inner);
            (g.switching, Group::awaiting_hand_over(&g))
        };
        if switching && !asked {
            // A switchover hands the role over: no new session until the
            // peer is asked to take over, nor once it answered. (Asked and
            // unanswered, a session asks again: see `session`.)
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if lock(&group.inner).split() {
            // An admin split: only `pair resync` (which kicks) resumes.
            let _ = tokio::time::timeout(Duration::from_secs(1), kick.changed()).await;
            continue;
        }
        let result = session(group, epoch).await;
        cleanup_session(group, epoch);
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                group.counters.error(crate::metrics::ErrorKind::Session);
                if current(group, epoch) {
                    group.link_lost(&e.to_string());
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if !current(group, epoch) {
            return;
        }
        match retry(group) {
            Retry::Backoff => {}
            Retry::Rarely => backoff = RARE_RETRY,
            Retry::Stop(why) => {
                tracing::error!(
                    group = %group.cfg.name,
                    peer = %group.cfg.peer,
                    "replication stopped: {why}; see `replicator status {}`; `replicator pair delete {}` here ends the pair",
                    group.cfg.name,
                    group.cfg.name
                );
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = kick.changed() => {}
        }
    }
}

/// Copy chunks that were sent but not made durable go back into the bitmap.
/// Only the group's current session task may touch the shared session
/// state: a task from before a `pair delete` + `pair create` must not
/// clear the new session's.
fn cleanup_session(group: &Group, epoch: u64) {
    let mut g = lock(&group.inner);
    if g.shipper_epoch != epoch {
        return;
    }
    if let Some(session) = g.session.take() {
        session.end(&mut g.bitmaps);
        g.link_changed_at = std::time::SystemTime::now();
    }
    g.bitmap_dirty_since_save = true;
    group.progress.send_modify(|p| p.connected = false);
}

fn intent_and_base(group: &Group) -> (pb::OpenIntent, u64) {
    let g = lock(&group.inner);
    // (Not the primary any more: the session ends once it sees so.)
    let Some(p) = g.persisted.role.as_primary() else {
        return (pb::OpenIntent::Resume, 0);
    };
    match p.announce {
        Announce::CreateCopy => (pb::OpenIntent::CreateFullCopy, p.journal_tail_seq.saturating_sub(1)),
        Announce::CreateNocopy => (pb::OpenIntent::CreateNocopy, p.journal_tail_seq.saturating_sub(1)),
        Announce::Resync => (
            pb::OpenIntent::Resync,
            match p.rebase_seq {
                0 => p.journal_tail_seq.saturating_sub(1),
                rebase => rebase,
            },
        ),
        Announce::Resume => (pb::OpenIntent::Resume, 0),
    }
}

async fn session(group: &Arc<Group>, epoch: u64) -> Result<(), TransportError> {
    // The peer never hears of a state this node has not yet persisted.
    group.saved(group.save_asked()).await.map_err(|e| TransportError::Protocol(e.to_string()))?;
    let conn = group.transport.connect(&group.cfg.peer).await?;
    let (mut send, mut recv) = Transport::open_stream(&conn).await?;
    let (intent, rebase) = intent_and_base(group);
    let (generation, restarts, pair_id, copy_bytes, last_seq, lifecycle) = {
        let g = lock(&group.inner);
        // The save and the connection may have taken long: a session that
        // is no longer the current one (a demotion, or a pair deleted and
        // created again meanwhile) must not open the group with what the
        // node holds now.
        if !is_current(&g, epoch) {
            return Err(TransportError::Protocol("the pair changed while the session started".into()));
        }
        if g.split() {
            // Split while this session was being set up (the peer away):
            // nothing goes out, not even an OpenGroup, whose resync intent
            // would end the secondary's split.
            return Ok(());
        }
        let dirty: u64 = g.bitmaps.iter().map(|b| b.dirty_bytes()).sum();
        let p = &g.persisted;
        let primary = p.role.as_primary().cloned().unwrap_or_default();
        let lifecycle = pb::OpenGroup {
            sender_state: Group::describe_self(&g),
            admin_resync: primary.admin_resync,
            swap: primary.swap,
            rebased: primary.rebased && intent == pb::OpenIntent::Resync,
            promoted: primary.takeover.is_some(),
            takeover_seq: primary.takeover.map_or(0, |t| t.seq),
            takeover_epoch: primary.takeover.map_or(0, |t| t.epoch),
            ..Default::default()
        };
        (p.generation, p.epoch, p.pair_id, dirty, g.last_jseq, lifecycle)
    };
    send.send(Body::OpenGroup(pb::OpenGroup {
        group: group.cfg.name.clone(),
        generation,
        mode: match group.cfg.mode {
            Mode::Sync => pb::Mode::Sync as i32,
            Mode::Async => pb::Mode::Async as i32,
        },
        volumes: group.volumes.iter().map(|v| pb::VolumeInfo { name: v.name.clone(), size: v.size() }).collect(),
        intent: intent as i32,
        pair_id,
        rebase_seq: rebase,
        copy_bytes,
        last_seq,
        epoch: restarts,
        ..lifecycle
    }))
    .await?;
    let reply = match tokio::time::timeout(Duration::from_secs(15), recv.expect("OpenGroupReply")).await {
        Ok(Ok(Body::OpenGroupReply(r))) => r,
        Ok(Ok(_)) => return Err(TransportError::Protocol("peer answered OpenGroup with something else".into())),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(TransportError::Timeout("waiting for OpenGroupReply")),
    };
    {
        // A reply to an OpenGroup of an earlier pair or session (a pair
        // delete and create here meanwhile) says nothing about this one.
        let mut g = lock(&group.inner);
        if pair_changed(&g, epoch, pair_id) {
            return Err(TransportError::Protocol("the pair changed while the session started".into()));
        }
        if g.split() {
            return Ok(());
        }
        group.heard_from_peer(&mut g, Some(&reply.state));
    }
    if reply.generation > replicator_protocol::record::MAX_SEQ {
        return Err(TransportError::Protocol(format!(
            "{} answered with generation {}, which no pair ever reaches",
            group.cfg.peer, reply.generation
        )));
    }
    if !reply.error.is_empty() {
        let msg = format!("{} refused group {}: {}", group.cfg.peer, group.cfg.name, wire::peer_text(&reply.error));
        let kind = pb::Refusal::try_from(reply.refusal).unwrap_or(pb::Refusal::Unspecified);
        {
            let mut g = lock(&group.inner);
            if kind == pb::Refusal::Superseded && Group::confirm_hand_over(&mut g, reply.generation) {
                return Err(TransportError::Protocol(format!("{msg}: it took over; this node becomes its secondary")));
            }
            let still_secondary = matches!(kind, pb::Refusal::Split | pb::Refusal::InUse | pb::Refusal::NeedsRebase)
                && reply.generation <= g.persisted.generation;
            if still_secondary && Group::awaiting_hand_over(&g) {
                // Refused by a secondary of this generation with no session
                // attached: it did not take over.
                tracing::warn!(group = %group.cfg.name, "switchover abandoned: {msg}; this node stays the primary");
                let _ = group.abandon_hand_over(&mut g, Some(msg.clone()));
            }
        }
        if kind == pb::Refusal::NeedsRebase {
            // The peer discarded its own writes: rebase it, then open
            // again at once with RESYNC.
            return match group.rebase_peer(&reply.divergent, reply.generation).await {
                Ok(()) => Ok(()),
                Err(e) => Err(TransportError::Protocol(format!("cannot rebase {}: {e}", group.cfg.peer))),
            };
        }
        group.peer_refused(kind, &msg, reply.generation);
        return Err(TransportError::Protocol(msg));
    }
    let peer_durable = reply.durable_seq;

    // Check the journal can resume from the peer's checkpoint.
    let (pair_id, save) = {
        let mut g = lock(&group.inner);
        if pair_changed(&g, epoch, pair_id) {
            return Err(TransportError::Protocol("the pair changed while the session started".into()));
        }
        let last = g.ready.completed_through();
        let oldest = g.ring.as_ref().and_then(|r| r.oldest_seq()).unwrap_or(g.last_jseq + 1);
        if let Err(e) = check_resume(peer_durable, oldest, g.last_jseq) {
            let msg = format!("{}: {e}; run a resync", group.cfg.peer);
            g.last_error = Some(msg.clone());
            group.transition(&mut g, PairEvent::Failure, &msg);
            return Err(TransportError::Protocol(msg));
        }
        if Group::awaiting_hand_over(&g) {
            // Asked to take over, the peer answers as this node's
            // secondary: it never got the request, or could not take over
            // (it holds its session until that is settled). This node stays
            // the primary.
            let why = format!("{} is still this node's secondary: it did not take over", group.cfg.peer);
            tracing::warn!(group = %group.cfg.name, "switchover abandoned: {why}; this node takes writes again");
            // (Its save, if any, goes with the session's below.)
            let _ = group.abandon_hand_over(&mut g, Some(why));
        }
        let Some(primary) = g.persisted.role.as_primary_mut() else {
            return Err(TransportError::Protocol("the pair changed while the session started".into()));
        };
        primary.announce = Announce::Resume;
        primary.rebase_seq = 0;
        primary.admin_resync = false;
        primary.swap = false;
        primary.rebased = false;
        let (resync_gap, needs_resync) = (primary.resync_gap, primary.copy_pending);
        g.refusal = None;
        g.link_changed_at = std::time::SystemTime::now();
        g.link_down_since = None;
        g.last_link_log = None;
        g.last_error = None;
        let mut session = PrimarySession::new(COPY, peer_durable, last);
        if let Some(gap) = resync_gap {
            session.on_gap(gap);
        }
        g.session = Some(session);
        g.start_copy_progress();
        let save = group.save_later(&mut g);
        // The secondary resumes after its persisted checkpoint, which is
        // what it just reported: the journal up to it may be freed.
        group.reset_progress(peer_durable, true);
        if matches!(g.state, PairState::Suspended(_)) {
            group.transition(&mut g, PairEvent::LinkUp { needs_resync }, "link restored");
        }
        // A sync primary restarted with a backlog of writes it acknowledged
        // alone (switched from async, say) catches up in this session
        // instead of making each write wait behind the backlog (try-out:
        // 20 s, then SUSPENDED(link), on a slow link). Not while every
        // acknowledged write is on the secondary: RPO 0 is not given up
        // for a session that merely restarted.
        let rpo_zero_kept = g.persisted.role.as_primary().is_some_and(|p| p.acked_all_on_peer);
        g.catch_up.on_session_up(group.cfg.on_link_loss != LinkLossPolicy::Block && !rpo_zero_kept);
        group.publish(&mut g);
        (g.persisted.pair_id, save)
    };
    // What was announced is settled before any record follows it.
    group.saved(save).await.map_err(|e| TransportError::Protocol(e.to_string()))?;
    tracing::info!(group = %group.cfg.name, peer = %group.cfg.peer, resume_after = peer_durable, "replication session up");

    // Sending and reading acks go on side by side, in this task: a send
    // waiting for stream credit never holds an ack up.
    let deleting = AtomicBool::new(false);
    tokio::select! {
        sent = send_loop(group, &conn, epoch, pair_id, &mut send, &deleting) => sent,
        read = read_acks(group, recv, epoch) => match read {
            // The secondary confirmed the delete and ended the stream.
            _ if deleting.load(Ordering::Relaxed) => Ok(()),
            Ok(()) => Err(TransportError::Connection("the secondary closed the stream".into())),
            Err(e) => Err(e),
        },
    }
}

/// Sends what the session puts on the stream. Ends with an error when the
/// session must restart; a `pair delete` sets `deleting` and waits (up to
/// 15 s) for the secondary to end the stream (the ack reader then ends the
/// session).
async fn send_loop(
    group: &Arc<Group>,
    conn: &quinn::Connection,
    epoch: u64,
    pair_id: u64,
    send: &mut FramedSend,
    deleting: &AtomicBool,
) -> Result<(), TransportError> {
    let mut kick = group.session_kick.subscribe();
    let mut progress_at = tokio::time::Instant::now();
    let mut copy_interval_at = tokio::time::Instant::now();
    let mut copy = CopyReads::default();
    let mut read_ahead = ReadAhead::default();
    loop {
        let (pair_gone, superseded, split) = {
            let g = lock(&group.inner);
            (g.role() != Role::Primary || g.persisted.pair_id != pair_id, g.shipper_epoch != epoch, g.split())
        };
        if split {
            // Split here without the secondary's answer (it did not answer
            // in time, or was away: see `session`): nothing more goes out
            // until `pair resync`.
            send.finish();
            return Ok(());
        }
        if pair_gone {
            // The copy's reads hold their ranges against writes, which the
            // now standalone volumes take at once.
            drop(copy);
            // pair delete (here or by the peer): tell the secondary after
            // every record already sent; it confirms once its last applies
            // are durable and then ends the stream.
            send.queue(Body::Command(pb::GroupCommand { command: pb::Command::Delete as i32, ..Default::default() }));
            send.flush().await?;
            send.finish();
            deleting.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(15)).await;
            return Ok(());
        }
        if superseded {
            return Ok(());
        }
        let wake = group.ship_wake.notified();
        let records = group.records_ready.notified();
        tokio::pin!(wake, records);
        wake.as_mut().enable();
        records.as_mut().enable();

        // Copy chunks: start reading the next ones, take those read (the
        // session sends them in order below; the end of the copy too). Its
        // window follows the link (`PrimarySession::on_copy_interval`).
        let elapsed = copy_interval_at.elapsed();
        if elapsed >= COPY_INTERVAL && elapsed >= conn.rtt() * 2 {
            copy_interval_at = tokio::time::Instant::now();
            if let Some(s) = lock(&group.inner).session.as_mut() {
                s.on_copy_interval(conn.rtt(), elapsed);
            }
        }
        // A chunk leaves the persisted bitmap once the secondary has it, so
        // what the copy reads must be durable here first: a write only the
        // bitmap tracks (made unpaired, in bitmap mode, split --rw, or
        // before an unclean restart) may still be in a cache a power cut
        // empties, and the secondary would keep what this node lost, with
        // nothing left to say the region differs. (While a copy runs,
        // every write is journaled, and its region is in the activity log.)
        // Not after a failed volume write or sync (`Group::fail_stop`): the
        // copy is off, and a sync that succeeds after a failed one (Linux
        // reports a write-back error once) would count lost pages durable.
        if group.stopped.get().is_none() && (!group.copy_source_unsynced() || group.sync_volumes(false).await.is_ok()) {
            copy.start(group, epoch);
        }
        while let Some(Some(done)) = copy.reads.next().now_or_never() {
            copy.finish(group, epoch, done)?;
        }

        // What the session puts on the stream next, in order.
        while send.queued() < BATCH {
            let next = {
                let mut g = lock(&group.inner);
                let (ready, flush_wanted) = (g.ready.completed_through(), g.flush_wanted);
                let Some(s) = g.session.as_mut() else { break };
                s.on_journaled(ready);
                s.on_flush_wanted(flush_wanted);
                match s.poll_transmit() {
                    None => break,
                    Some(Transmit::Record(seq)) => {
                        let cached = g.entries.get(&seq).and_then(|e| e.record.clone());
                        let pos = g.entries.get(&seq).map(|e| e.pos);
                        Next::Record(seq, cached, pos, g.journal.clone())
                    }
                    Some(Transmit::Copy(rec)) => {
                        group.counters.copy_sent(&rec);
                        Next::Copy(rec.copy_index, Body::Record(rec.to_pb(&group.cfg.name)))
                    }
                    Some(Transmit::Flush(seq)) => Next::Body(Body::Flush(pb::FlushRequest { seq })),
                    Some(Transmit::CopyDone(seq)) => Next::Body(Body::Command(pb::GroupCommand {
                        command: pb::Command::CopyDone as i32,
                        seq,
                        // The time through which the copied image holds
                        // every write: now, when no write was journaled
                        // after `seq` (a later one follows on the stream
                        // with its own time); else that of write `seq`.
                        at_us: if g.last_jseq <= seq {
                            super::write_path::unix_micros()
                        } else {
                            g.entries.get(&seq).map_or(0, |e| e.written_at_us)
                        },
                        ..Default::default()
                    })),
                    Some(Transmit::ResyncGap(seq)) => Next::Body(Body::Command(pb::GroupCommand {
                        command: pb::Command::ResyncGap as i32,
                        seq,
                        ..Default::default()
                    })),
                }
            };
            let body = match next {
                Next::Record(_, Some(r), _, _) => {
                    group.counters.shipped(&r);
                    Body::Record(r.to_pb(&group.cfg.name))
                }
                Next::Record(seq, None, Some(pos), Some(j)) => {
                    let r = read_ahead.take(group, seq, pos, &j).await?;
                    group.counters.shipped(&r);
                    Body::Record(r.to_pb(&group.cfg.name))
                }
                Next::Record(seq, ..) => {
                    return Err(TransportError::Protocol(format!("record {seq} is missing from the journal")))
                }
                Next::Body(body) => body,
                Next::Copy(copy_index, body) => {
                    // On the stream: writes to its range may go on.
                    send.queue(body);
                    copy.barriers.remove(&copy_index);
                    continue;
                }
            };
            send.queue(body);
        }

        // Switchover: once every record is on the stream, ask the secondary
        // to take over.
        {
            let mut g = lock(&group.inner);
            let sent_through = g.session.as_ref().map_or(0, PrimarySession::sent_through);
            if let Some(sw) = g.switchover.as_mut().filter(|s| !s.sent && sent_through >= s.seq) {
                sw.sent = true;
                let seq = sw.seq;
                send.queue(Body::Command(pb::GroupCommand {
                    command: pb::Command::Switchover as i32,
                    seq,
                    ..Default::default()
                }));
            }
            // `pair split`: after every record sent so far.
            if let Some(split) = g.split.as_mut().filter(|s| !s.sent) {
                split.sent = true;
                send.queue(Body::Command(pb::GroupCommand {
                    command: pb::Command::Split as i32,
                    seq: sent_through,
                    rw: split.rw,
                    ..Default::default()
                }));
            }
            // A switchover this session's secondary asked for that does
            // not go ahead (an earlier session's answer is dropped).
            if let Some((for_epoch, answer)) = g.switchover_answer.take() {
                if for_epoch == epoch {
                    send.queue(Body::CommandReply(answer));
                }
            }
        }

        // How far the journal reaches, so that a failover on the secondary
        // can say what it leaves behind.
        if progress_at.elapsed() >= PROGRESS_INTERVAL {
            progress_at = tokio::time::Instant::now();
            let report = {
                let g = lock(&group.inner);
                let durable = g.session.as_ref().map_or(0, |s| s.shipper().durable());
                pb::GroupCommand {
                    command: pb::Command::PrimaryProgress as i32,
                    seq: g.last_jseq,
                    bytes: g.entries.range(durable + 1..).map(|(_, e)| e.span).sum(),
                    at_us: super::write_path::unix_micros(),
                    state: Group::describe_self(&g),
                    copy_total: g.copy_total_now(),
                    copy_done: g.copy_done,
                    copy_sent: g.copy_sent,
                    ..Default::default()
                }
            };
            send.queue(Body::Command(report));
        }

        if send.queued() > 0 {
            if group.lone_sync_write() {
                send.flush_now().await?;
            } else {
                send.flush().await?;
            }
            continue;
        }
        tokio::select! {
            Some(done) = copy.reads.next(), if !copy.reads.is_empty() => copy.finish(group, epoch, done)?,
            _ = wake.as_mut() => {}
            _ = records.as_mut() => {
                if group.cfg.mode == Mode::Async && copy.barriers.is_empty() {
                    // No write waits for its record to arrive: gather what
                    // the clients write for a while first (see
                    // [`ASYNC_GATHER`]); anything else to send ends the wait.
                    tokio::select! {
                        _ = tokio::time::sleep(ASYNC_GATHER) => {}
                        _ = wake.as_mut() => {}
                        Some(done) = copy.reads.next(), if !copy.reads.is_empty() => copy.finish(group, epoch, done)?,
                    }
                } else if !group.lone_sync_write() {
                    // Let the other writes that are ready run first and
                    // append their records too: they go out in one batch
                    // (one stream write, packets sent together) instead of
                    // one each. (A copy chunk's barrier holds writes until
                    // the records before the chunk are on the stream.) A
                    // lone sync write's record goes at once (`SyncWrite`).
                    tokio::task::yield_now().await;
                }
            }
            _ = kick.changed() => {
                let g = lock(&group.inner);
                if g.role() == Role::Primary && g.persisted.pair_id == pair_id && g.shipper_epoch == epoch {
                    return Err(TransportError::Protocol("session restarted".into()));
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Records read back from the journal ahead of the stream: a backlog the
/// payload cache no longer holds (the secondary was away, or slower than
/// the clients). When the record to send next has to be read, the
/// journaled records after it that are not cached either are read too,
/// concurrently, up to [`READ_AHEAD_BYTES`] and [`READ_AHEAD_RECORDS`]
/// ahead, each read a task of its own, so the disk reads while earlier
/// records are sent. (Read one at a time, each after the previous batch
/// went out, a backlog was shipped more slowly than the clients had
/// written it: bench/RESULTS.md, catch-up figure.)
#[derive(Default)]
struct ReadAhead {
    /// Reads under way, in sequence order: (seq, span, task).
    reads: std::collections::VecDeque<(u64, u64, ReadTask)>,
}

type ReadTask = tokio::task::JoinHandle<Result<Record, crate::journal::JournalError>>;

impl ReadAhead {
    /// Record `seq`, at `pos` in journal `j`: read ahead already, or read
    /// now; the reads of the uncached records after it start as well.
    async fn take(
        &mut self,
        group: &Group,
        seq: u64,
        pos: u64,
        j: &Arc<crate::journal::Journal>,
    ) -> Result<Record, TransportError> {
        // Reads for records the stream went past (it restarted at a later
        // point) or that do not lead up to `seq` are of no use.
        while self.reads.front().is_some_and(|(s, ..)| *s < seq) {
            if let Some((_, _, read)) = self.reads.pop_front() {
                read.abort();
            }
        }
        if self.reads.front().is_some_and(|(s, ..)| *s != seq) {
            self.abort_all();
        }
        if self.reads.is_empty() {
            let span = lock(&group.inner).entries.get(&seq).map_or(0, |e| e.span);
            self.start(j, seq, pos, span);
        }
        self.read_more(group, j);
        let Some((_, _, read)) = self.reads.pop_front() else {
            return Err(TransportError::Protocol(format!("record {seq} is missing from the journal")));
        };
        match read.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(TransportError::Protocol(format!("cannot read record {seq} back from the journal: {e}"))),
            Err(e) => Err(TransportError::Protocol(format!("reading record {seq} back from the journal failed: {e}"))),
        }
    }

    /// Starts reading the journaled, uncached records that follow the last
    /// read under way, within the read-ahead bounds.
    fn read_more(&mut self, group: &Group, j: &Arc<crate::journal::Journal>) {
        let Some(&(last, ..)) = self.reads.back() else { return };
        let mut bytes: u64 = self.reads.iter().map(|(_, span, _)| span).sum();
        let wanted: Vec<(u64, u64, u64)> = {
            let g = lock(&group.inner);
            g.entries
                .range(last + 1..)
                .take_while(|(_, e)| e.journaled && e.record.is_none())
                .take(READ_AHEAD_RECORDS.saturating_sub(self.reads.len()))
                .take_while(|(_, e)| {
                    bytes += e.span;
                    bytes <= READ_AHEAD_BYTES
                })
                .map(|(&s, e)| (s, e.pos, e.span))
                .collect()
        };
        for (s, pos, span) in wanted {
            self.start(j, s, pos, span);
        }
    }

    fn start(&mut self, j: &Arc<crate::journal::Journal>, seq: u64, pos: u64, span: u64) {
        let j = j.clone();
        self.reads.push_back((seq, span, tokio::spawn(async move { j.read_record(pos, seq).await })));
    }

    fn abort_all(&mut self) {
        for (_, _, read) in self.reads.drain(..) {
            read.abort();
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// The next item of the stream, taken under the group lock: a journal
/// record (cached, or its journal position), a copy chunk (by copy index),
/// or a message ready to send.
enum Next {
    Record(u64, Option<Record>, Option<u64>, Option<Arc<crate::journal::Journal>>),
    Copy(u64, Body),
    Body(Body),
}

/// What a copy read brings back: the chunk's data, or its digests.
enum CopyPayload {
    Data(bytes::Bytes),
    Digests(bytes::Bytes),
}

/// A finished copy read: (copy index, what was read).
type CopyRead = (u64, Result<CopyPayload, String>);

/// The copy chunks of one session being read, and the read barriers of
/// those not yet on the stream.
#[derive(Default)]
struct CopyReads<'a> {
    /// The reads, polled by the session's task.
    reads: FuturesUnordered<BoxFuture<'static, CopyRead>>,
    /// Copy index -> its barrier and what it covers.
    barriers: BTreeMap<u64, (RangeGuard<'a>, CopyChunk)>,
}

/// A chunk being read.
#[derive(Clone, Copy)]
struct CopyChunk {
    volume: u32,
    offset: u64,
    len: u64,
    /// Bytes per digest when the chunk goes as hashes.
    span: u64,
    reflects: u64,
}

impl<'a> CopyReads<'a> {
    /// Starts reading every chunk the session hands out now, each under a
    /// read barrier taken here, in copy order.
    fn start(&mut self, group: &'a Arc<Group>, epoch: u64) {
        loop {
            let (step, span) = {
                let mut g = lock(&group.inner);
                if g.shipper_epoch != epoch {
                    return;
                }
                // Not after a failed volume write (`Group::fail_stop`): a
                // read could lack its record, which the secondary has.
                // Journaled records still ship: the restart replays them
                // here, and they were acknowledged.
                let copying = group.stopped.get().is_none()
                    && g.persisted.role.as_primary().is_some_and(|p| p.copy_pending && !p.bitmap_mode)
                    && group.copy_may_clear_chunks(&mut g);
                let g = &mut *g;
                let step = match g.session.as_mut() {
                    Some(s) => s.next_copy(&mut g.bitmaps, copying),
                    None => CopyStep::Idle,
                };
                // One digest per bitmap chunk: a mismatch resends just it.
                let span = match step {
                    CopyStep::Read { volume, .. } => g.bitmaps.get(volume as usize).map_or(0, |b| b.granularity()),
                    _ => 0,
                };
                (step, span)
            };
            let CopyStep::Read { volume, offset, len, copy_index, hash } = step else { return };
            debug_assert!(len <= u64::from(MAX_RECORD_PAYLOAD));
            let Some(vol) = group.volumes.get(volume as usize).cloned() else {
                let mut g = lock(&group.inner);
                let g = &mut *g;
                if let Some(s) = g.session.as_mut() {
                    s.on_copy_read_failed(copy_index, &mut g.bitmaps);
                }
                return;
            };
            let (guard, wait, reflects) = group.begin_read_barrier(volume, offset, len);
            self.barriers.insert(copy_index, (guard, CopyChunk { volume, offset, len, span, reflects }));
            let group = Arc::clone(group);
            self.reads.push(Box::pin(async move {
                wait.await;
                // The writes this chunk waited for are on the volume now. One
                // that no journal record covers (made in bitmap mode and
                // still running when the copy began, after `send_loop`'s
                // sync) must be durable before the chunk leaves, as there:
                // else a power cut here keeps it only on the secondary, its
                // region clean.
                if group.unjournaled_unsynced() {
                    if let Err(e) = group.sync_volumes(false).await {
                        return (copy_index, Err(format!("syncing the volumes before it: {e}")));
                    }
                }
                let read = vol.read(offset, len).await.map_err(|e| e.to_string()).map(|data| {
                    if hash {
                        CopyPayload::Digests(span_digests(&data, span))
                    } else {
                        CopyPayload::Data(bytes::Bytes::from_owner(data))
                    }
                });
                (copy_index, read)
            }));
        }
    }

    /// A read finished: the chunk goes to the session, which sends it in
    /// order; a failed read returns it to the bitmap and ends the session.
    fn finish(&mut self, group: &Group, epoch: u64, (copy_index, read): CopyRead) -> Result<(), TransportError> {
        let Some(&(_, c)) = self.barriers.get(&copy_index) else { return Ok(()) };
        let mut g = lock(&group.inner);
        let g = &mut *g;
        // The session may have ended meanwhile (its chunks went back to the
        // bitmap), or a new one started after a pair delete and create.
        let Some(session) = g.session.as_mut().filter(|_| g.shipper_epoch == epoch) else { return Ok(()) };
        let generation = g.persisted.generation;
        if let Some(why) = group.stopped.get() {
            // A volume write failed (`Group::fail_stop`, set before its
            // range was let go): this read may lack a record the secondary
            // has, and sent after it would undo it there. Its region stays
            // to copy.
            session.on_copy_read_failed(copy_index, &mut g.bitmaps);
            return Err(TransportError::Protocol(format!("the group stopped: {why}")));
        }
        match read {
            Ok(CopyPayload::Digests(digests)) => {
                let (len, span) = (c.len as u32, u32::try_from(c.span).unwrap_or(u32::MAX));
                let rec = Record::copy_hash(c.reflects, copy_index, c.volume, c.offset, len, span, generation, digests);
                session.on_copy_read(rec);
                Ok(())
            }
            Ok(CopyPayload::Data(data)) => {
                g.copy_sent += c.len;
                session.on_copy_read(Record::copy_chunk(c.reflects, copy_index, c.volume, c.offset, generation, data));
                Ok(())
            }
            Err(e) => {
                session.on_copy_read_failed(copy_index, &mut g.bitmaps);
                let name = group.volumes.get(c.volume as usize).map_or("?", |v| v.name.as_str());
                Err(TransportError::Protocol(format!("copy read of volume {name} failed: {e}")))
            }
        }
    }
}

/// How `release_journal` persists a new journal tail.
enum TailSave {
    /// Through the metadata flusher (bitmaps first): this save.
    Flusher(u64),
    /// The state file alone, at once: this snapshot.
    Alone(Box<(u64, crate::state::GroupState)>),
}

async fn read_acks(group: &Arc<Group>, mut recv: FramedRecv, epoch: u64) -> Result<(), TransportError> {
    loop {
        match recv.recv().await? {
            None => return Err(TransportError::Connection("the secondary ended the stream".into())),
            Some(pb::Envelope { body: Some(Body::Ack(ack)) }) => group.on_ack(&ack, epoch)?,
            Some(pb::Envelope { body: Some(Body::CommandReply(r)) }) if r.command == pb::Command::Split as i32 => {
                // The secondary persisted the split; the session is over.
                let answer = if r.error.is_empty() { Ok(()) } else { Err(wire::peer_text(&r.error)) };
                if let Some(tx) = lock(&group.inner).split.as_mut().and_then(|s| s.confirmed.take()) {
                    let _ = tx.send(answer);
                }
                return Ok(());
            }
            Some(pb::Envelope { body: Some(Body::CommandReply(r)) }) if r.command == pb::Command::Switchover as i32 => {
                // The secondary took over (or refused to): the switchover
                // demotes this node, or abandons; this session is over.
                let answer = if r.error.is_empty() { Ok(()) } else { Err(wire::peer_text(&r.error)) };
                if let Some(tx) = lock(&group.inner).switchover.as_mut().and_then(|s| s.confirmed.take()) {
                    let _ = tx.send(answer);
                }
                return Ok(());
            }
            Some(pb::Envelope { body: Some(Body::CommandReply(r)) }) if r.command == pb::Command::Delete as i32 => {
                // The secondary dissolved the pair after its last apply (or
                // could not save that it did).
                let answer = if r.error.is_empty() { Ok(()) } else { Err(wire::peer_text(&r.error)) };
                if let Some(tx) = lock(&group.inner).delete_ack.take() {
                    let _ = tx.send(answer);
                }
            }
            Some(pb::Envelope { body: Some(Body::CommandReply(r)) }) => {
                if !r.error.is_empty() {
                    return Err(TransportError::Protocol(format!("secondary: {}", wire::peer_text(&r.error))));
                }
                if r.command == pb::Command::CopyDone as i32 {
                    group.copy_finished();
                }
            }
            Some(pb::Envelope { body: Some(Body::Command(c)) })
                if c.command == pb::Command::SwitchoverRequest as i32 =>
            {
                tracing::info!(group = %group.cfg.name, peer = %group.cfg.peer, force = c.force, "the secondary asked for a switchover");
                if lock(&group.inner).switching {
                    // One already runs: its outcome (the secondary takes
                    // over, or not) answers this request too.
                    continue;
                }
                let group = group.clone();
                tokio::spawn(async move {
                    if let Err(e) = group.switchover(c.force).await {
                        tracing::warn!(group = %group.cfg.name, "switchover asked by the secondary: {e}");
                        // A switchover that runs meanwhile (one that fails
                        // lets `switching` go first) answers by its outcome.
                        if c.seq != 0 && !lock(&group.inner).switching {
                            let answer = pb::CommandReply {
                                command: pb::Command::SwitchoverRequest as i32,
                                error: e.to_string(),
                                refused: matches!(e, GroupError::Refused(_)),
                                seq: c.seq,
                            };
                            lock(&group.inner).switchover_answer = Some((epoch, answer));
                            group.ship_wake.notify_one();
                        }
                    }
                });
            }
            Some(pb::Envelope { body: Some(Body::Command(c)) }) if c.command == pb::Command::Delete as i32 => {
                // `pair delete` on the secondary: it stopped applying and
                // waits for us to dissolve too (the send loop then confirms).
                tracing::warn!(group = %group.cfg.name, peer = %group.cfg.peer, "the secondary ran pair delete: ending the pair here too");
                group.peer_deleted().await;
            }
            Some(pb::Envelope { body: Some(Body::Error(e)) }) => {
                return Err(TransportError::Protocol(format!("secondary reported: {}", wire::peer_text(&e.message))))
            }
            Some(pb::Envelope { body: Some(other) }) => {
                let kind = wire::body_kind(&other);
                return Err(TransportError::Protocol(format!("unexpected message from the secondary: {kind}")));
            }
            Some(pb::Envelope { body: None }) => {
                return Err(TransportError::Protocol("empty envelope from the secondary".into()))
            }
        }
    }
}

impl Group {
    /// Applies an ack from the secondary.
    fn on_ack(&self, ack: &pb::Ack, epoch: u64) -> Result<(), TransportError> {
        let mut g = lock(&self.inner);
        if g.shipper_epoch != epoch {
            // An ack on the stream of a pair deleted since: not ours.
            return Ok(());
        }
        g.peer_contact = Some(std::time::SystemTime::now());
        let Some(s) = g.session.as_mut() else { return Ok(()) };
        let received_before = s.shipper().received();
        let acked = s.on_ack(ack).map_err(|e| TransportError::Protocol(format!("bad ack: {e}")))?;
        let s = s.shipper();
        let (received, applied, durable) = (s.received(), s.applied(), s.durable());
        let checkpoint = ack.checkpoint_seq.min(durable);
        g.copy_done += acked.copy_bytes;
        // The secondary has these records: their payloads go back to the
        // buffer pool for new writes (a session after a break resends what
        // the secondary lacks from the journal). Kept until the journal
        // frees them instead, they held up to the cache budget of fresh
        // memory, a page fault per 4 KiB on a virtual machine.
        if received > received_before {
            let freed: u64 = g
                .entries
                .range_mut(received_before + 1..=received)
                .filter_map(|(_, e)| e.record.take())
                .map(|r| r.payload.len() as u64)
                .sum();
            g.cached_bytes = g.cached_bytes.saturating_sub(freed);
        }
        self.progress.send_modify(|p| {
            p.received = received;
            p.applied = applied;
            p.durable = durable;
            p.checkpoint = checkpoint;
        });
        let last = g.last_jseq;
        if g.catch_up.pending() && g.catch_up.on_received(received, last, self.clock_ms()) {
            // Writes wait for the secondary again, or RPO 0 is back:
            // published before the lock is let go, so that no write
            // sequenced after `last` is acknowledged alone.
            if g.catch_up.rpo_zero() {
                tracing::info!(group = %self.cfg.name, received, "sync mode: the secondary has every write acknowledged without it");
            } else {
                tracing::info!(group = %self.cfg.name, received, last, "sync mode: backlog nearly sent; writes wait for the secondary again");
            }
            self.publish(&mut g);
        }
        drop(g);
        if acked.copy_progress {
            self.ship_wake.notify_one();
        }
        Ok(())
    }

    /// The secondary confirmed the copy is complete and it is consistent.
    fn copy_finished(&self) {
        let mut g = lock(&self.inner);
        if self.stopped.get().is_some() {
            // A failed volume write stopped the group: its record's region
            // may be what the copy read without it.
            return;
        }
        if g.bitmaps.iter().all(|b| b.is_clean()) && g.session.as_ref().is_none_or(PrimarySession::copy_done_answered) {
            if let Some(p) = g.persisted.role.as_primary_mut() {
                p.copy_pending = false;
                p.resync_gap = None;
                p.resync_gap_at_us = 0;
            }
            self.save_later(&mut g);
            self.transition(&mut g, PairEvent::CopyDone, "copy complete");
            tracing::info!(group = %self.cfg.name, bytes = g.copy_done, "copy complete; secondary is consistent");
        }
    }

    /// Frees journal space below the secondary's persisted checkpoint and
    /// what the volumes here hold durably, after persisting the new tail
    /// (called from housekeeping), when it is due
    /// (`journal_space::release_due`), then leaves bitmap mode once the
    /// journal has room again. The state file is written outside the group
    /// lock.
    pub(super) async fn release_journal(self: &Arc<Self>) {
        let due = |g: &Inner| {
            let waiting =
                g.journal_full_since.is_some() || g.persisted.role.as_primary().is_some_and(|p| p.bitmap_mode);
            g.ring.as_ref().is_some_and(|r| {
                journal_space::release_due(r.used_bytes(), r.capacity_bytes(), waiting, g.journal_released_at.elapsed())
            })
        };
        // Space is freed only below what the volumes hold durably (a FLUSH
        // may have made records durable in the journal alone): first one
        // sync for what the secondary has and the volumes took.
        let sync_first = {
            let g = lock(&self.inner);
            let freeable = self.progress.borrow().checkpoint.min(g.volume_written.completed_through());
            due(&g) && freeable > g.local_durable
        };
        if sync_first && (self.stopped.get().is_some() || self.sync_volumes(false).await.is_err()) {
            // The group stopped, and says why (`sync_failed`).
            return;
        }
        let release = {
            let mut g = lock(&self.inner);
            let checkpoint = if due(&g) {
                journal_space::release_through(
                    self.progress.borrow().checkpoint,
                    g.local_durable,
                    g.ring.as_ref().and_then(JournalRing::oldest_seq),
                )
            } else {
                None
            };
            if checkpoint.is_some() {
                g.journal_released_at = Instant::now();
            }
            match (checkpoint, g.ring.as_ref()) {
                (Some(checkpoint), Some(ring)) => {
                    let new_tail_seq = checkpoint + 1;
                    let new_tail_pos = ring.lookup(new_tail_seq).map(|(p, _)| p).unwrap_or_else(|| ring.head());
                    if let Some(p) = g.persisted.role.as_primary_mut() {
                        p.journal_tail_seq = new_tail_seq;
                        p.journal_tail_pos = new_tail_pos;
                    }
                    // The state file alone may go ahead of the bitmaps only
                    // when no change waits for the metadata flusher (which
                    // writes the bitmaps first): a rebase's RESYNC intent, or
                    // a finished copy, on disk without the bitmaps that go
                    // with it would lose regions to copy at a crash.
                    let pending = g.state_dirty || *self.bitmap_persisted.borrow() < self.save_asked();
                    let save = if pending {
                        TailSave::Flusher(self.save_later(&mut g))
                    } else {
                        TailSave::Alone(Box::new(Self::snapshot_state(&mut g)))
                    };
                    Some((save, checkpoint))
                }
                _ => None,
            }
        };
        if let Some((save, checkpoint)) = release {
            let written = match save {
                TailSave::Flusher(save) => self.saved(save).await.map_err(|e| e.to_string()),
                TailSave::Alone(snapshot) => {
                    let me = self.clone();
                    match tokio::task::spawn_blocking(move || me.write_state(*snapshot)).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("journal tail task failed: {e}")),
                    }
                }
            };
            if let Err(e) = written {
                return self.record_error(&format!("cannot persist the journal tail: {e}"));
            }
            let mut g = lock(&self.inner);
            if let Some(r) = g.ring.as_mut() {
                r.release_through(checkpoint);
            }
            // A replay after a power cut starts past them now.
            g.journal_durable = g.journal_durable.max(checkpoint);
            let keep = g.entries.split_off(&(checkpoint + 1));
            let freed: u64 = g.entries.values().filter_map(|e| e.record.as_ref()).map(|r| r.payload.len() as u64).sum();
            g.entries = keep;
            g.cached_bytes = g.cached_bytes.saturating_sub(freed);
        }
        {
            // Journal space is back (an empty ring counts): leave bitmap
            // mode and start the resync.
            let mut g = lock(&self.inner);
            let room = g.ring.as_ref().is_some_and(|r| {
                journal_space::may_leave_bitmap_mode(
                    r.used_bytes(),
                    r.capacity_bytes(),
                    self.progress.borrow().connected,
                )
            });
            if let Some(p) = g.persisted.role.as_primary_mut().filter(|p| p.bitmap_mode && room) {
                p.bitmap_mode = false;
                tracing::info!(group = %self.cfg.name, "journal has room again: resyncing the regions tracked in the bitmap");
                self.transition(&mut g, PairEvent::LinkUp { needs_resync: true }, "journal space freed");
                self.save_later(&mut g);
            }
        }
        self.space_freed.notify_waiters();
    }
}
