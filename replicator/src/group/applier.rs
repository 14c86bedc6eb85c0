//! The secondary's side of a replication session: validates `OpenGroup`,
//! then receives records, checks each one's CRC, applies non-overlapping
//! records concurrently and overlapping ones in sequence order, makes them
//! durable (on FUA, on a flush request, and at least every 100 ms), persists
//! the checkpoint it will resume from, and acks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator_protocol::apply::{Applier, ApplyId};
use replicator_protocol::pair::{PairEvent, PairState, Role};
use replicator_protocol::pb::{self, envelope::Body};
use replicator_protocol::record::{Record, RecordOp};
use tokio::sync::{mpsc, oneshot, watch};

use super::{lock, Group, SessionCommand};
use crate::state::GroupState;
use crate::transport::{FramedRecv, FramedSend, TransportError};

/// How often applied records are made durable when nobody asks.
const DURABLE_INTERVAL: Duration = Duration::from_millis(100);
/// Copy data applied beyond this is made durable at once (the primary
/// keeps at most a 16 MiB copy window in flight).
const COPY_FLUSH_BYTES: u64 = 4 << 20;
/// The apply horizon is persisted this many records ahead of the applies
/// (one state save per step; a catch-up after a crash never goes beyond
/// the primary's newest record, so a long step costs nothing there).
const HORIZON_STEP: u64 = 1 << 16;
/// How often the resume checkpoint is persisted.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

enum Event {
    Applied(ApplyId, Result<(), String>),
    Durable(u64, u64, Result<(), String>),
}

/// A refused `OpenGroup`: the kind (sent to the primary, which acts on
/// it) and the reason in words.
type Refused = (pb::Refusal, String);

/// Checks an `OpenGroup` against this node's configuration and state, and
/// takes the secondary role if it asks to create the pair (with local
/// consent). Returns the sequence to resume after, or the refusal to send
/// back.
fn accept_open(
    group: &Group,
    open: &pb::OpenGroup,
    peer: &str,
) -> Result<(u64, mpsc::UnboundedReceiver<SessionCommand>), Refused> {
    let name = &group.cfg.name;
    let config = |msg: String| (pb::Refusal::Config, msg);
    if group.cfg.peer != peer {
        return Err(config(format!("group {name} is configured here with peer {:?}, not {peer:?}", group.cfg.peer)));
    }
    let ours: Vec<(String, u64)> = group.volumes.iter().map(|v| (v.name.clone(), v.size())).collect();
    let theirs: Vec<(String, u64)> = open.volumes.iter().map(|v| (v.name.clone(), v.size)).collect();
    if ours != theirs {
        return Err(config(format!(
            "volumes differ: the primary has {theirs:?}, this node has {ours:?} (names, order and sizes must match)"
        )));
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
    if g.role == Role::Primary {
        return Err((
            pb::Refusal::AlsoPrimary,
            format!(
                "group {name} is primary on this node too: both sites wrote as primary (split brain); \
                 resolve with `replicator pair delete {name}` on the site whose data is to be discarded"
            ),
        ));
    }
    if g.secondary_attached {
        return Err((
            pb::Refusal::Unspecified,
            "another replication session for this group is already attached".into(),
        ));
    }
    match intent {
        pb::OpenIntent::CreateFullCopy | pb::OpenIntent::CreateNocopy => {
            if g.role == Role::Secondary && g.persisted.pair_id != open.pair_id {
                return Err((
                    pb::Refusal::Config,
                    format!("group {name} is already the secondary of another pair here; run `replicator pair delete {name}` here first"),
                ));
            }
            if g.role == Role::None {
                if !group.cfg.accept_pair_create {
                    return Err((
                        pb::Refusal::NoConsent,
                        format!(
                            "group {name} on this node does not accept becoming a secondary (its volumes would be overwritten): \
                             set accept_pair_create = true in its [[group]] section here and restart, then run pair create again"
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
            g.role = Role::Secondary;
            g.persisted = GroupState {
                role: Role::Secondary,
                pair_id: open.pair_id,
                generation: open.generation,
                durable_seq: open.rebase_seq,
                consistent: !copy,
                copy_incomplete: copy,
                clean_shutdown: false,
                ..GroupState::simplex()
            };
            g.state = if copy { PairState::Copy } else { PairState::Pair };
            g.copy_total = open.copy_bytes;
            g.copy_done = 0;
            tracing::info!(group = %name, primary = %peer, copy, "pair create: this node is now secondary");
        }
        pb::OpenIntent::Resume | pb::OpenIntent::Resync => {
            if g.role == Role::None && g.persisted.former_pair_id == open.pair_id && open.pair_id != 0 {
                return Err(if g.persisted.written_standalone {
                    (
                        pb::Refusal::WrittenStandalone,
                        format!(
                            "group {name} left this pair here (pair delete) and its volumes were written since: \
                             both sites hold writes the other lacks (split brain); keep one site's data: \
                             `replicator pair delete {name}` on the other, then `pair create` from the keeper"
                        ),
                    )
                } else {
                    (
                        pb::Refusal::NotPaired,
                        format!("group {name} left this pair here (pair delete); run `replicator pair delete {name}` on {peer} too"),
                    )
                });
            }
            if g.role != Role::Secondary || g.persisted.pair_id != open.pair_id {
                return Err((
                    pb::Refusal::NotPaired,
                    format!(
                        "group {name} is not paired with {peer} here (it is {}); run `replicator pair delete {name}` and then `pair create {name}` on {peer}",
                        g.state
                    ),
                ));
            }
            if intent == pb::OpenIntent::Resync {
                // The primary lost power and starts a new generation: what
                // it may have lost is copied again; records follow its
                // recovered journal.
                tracing::warn!(group = %name, primary = %peer, generation = open.generation, rebase = open.rebase_seq,
                    "the primary restarted after a power cut: resynchronising the regions it was writing");
                g.persisted.durable_seq = open.rebase_seq;
                g.persisted.generation = open.generation;
                // Inconsistent until the copy of those regions is done
                // (COPY_DONE follows even when there is nothing to copy).
                g.persisted.copy_incomplete = true;
            }
            if g.persisted.catch_up_seq > 0 {
                // Catching up after an unclean stop: the records up to what
                // the primary holds now cover every apply that may have
                // reached the volumes out of order.
                g.persisted.catch_up_seq = g.persisted.catch_up_seq.min(open.last_seq);
                if g.persisted.catch_up_seq <= g.persisted.durable_seq {
                    g.persisted.catch_up_seq = 0;
                }
            }
            g.persisted.consistent = !g.persisted.copy_incomplete && g.persisted.catch_up_seq == 0;
            g.state = if g.persisted.consistent { PairState::Pair } else { PairState::Copy };
        }
        pb::OpenIntent::Unspecified => return Err((pb::Refusal::Config, "OpenGroup without an intent".into())),
    }
    // Saved before the primary hears yes: after a restart this node must
    // still know it is the secondary of this pair.
    if let Err(e) = group.write_state(Group::snapshot_state(&mut g)) {
        return Err((pb::Refusal::Unspecified, format!("cannot persist the pair state here: {e}")));
    }
    // The session's command channel is in place before the lock drops: a
    // `pair delete` here from now on goes through the session.
    let (commands_tx, commands) = mpsc::unbounded_channel();
    g.session_cmd = Some(commands_tx);
    g.secondary_attached = true;
    g.link_changed_at = std::time::SystemTime::now();
    g.secondary_durable = g.persisted.durable_seq;
    g.secondary_applied = g.persisted.durable_seq;
    group.publish(&mut g);
    Ok((g.persisted.durable_seq, commands))
}

/// Serves one group stream opened by the primary `peer`. Returns when the
/// stream ends, the pair is deleted, or `shutdown` fires (then it finishes
/// applying what it received and makes it durable first).
pub async fn serve_secondary(
    group: Arc<Group>,
    open: pb::OpenGroup,
    mut send: FramedSend,
    mut recv: FramedRecv,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let (base, commands) = match accept_open(&group, &open, &peer) {
        Ok(accepted) => accepted,
        Err((refusal, msg)) => {
            // One line per distinct refusal (and a reminder every minute):
            // the primary retries every few seconds.
            let repeat = {
                let mut g = lock(&group.inner);
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
            let reply = pb::OpenGroupReply { error: msg, durable_seq: 0, generation: 0, refusal: refusal as i32 };
            let _ = send.send(Body::OpenGroupReply(reply)).await;
            send.finish();
            return;
        }
    };
    let generation = lock(&group.inner).persisted.generation;
    if let Err(e) = send
        .send(Body::OpenGroupReply(pb::OpenGroupReply {
            error: String::new(),
            durable_seq: base,
            generation,
            refusal: pb::Refusal::Unspecified as i32,
        }))
        .await
    {
        tracing::warn!(group = %group.cfg.name, "replication session ended at once: {e}");
        detach(&group);
        return;
    }
    tracing::info!(group = %group.cfg.name, %peer, resume_after = base, "replication session up (secondary)");
    let mut session = Session::new(group.clone(), base, commands);
    let result = session.run(&mut send, &mut recv, &mut shutdown).await;
    if let Err(e) = &result {
        // Tell the primary why, so its status and log say it too.
        send.queue(Body::Error(pb::Error { message: e.to_string() }));
    }
    session.drain(&mut send).await;
    // Every apply is finished and durable: only now may the volumes become
    // writable here.
    let deleted = match session.ending {
        Ending::Stream => None,
        Ending::DeletedByPrimary => Some("the primary ran pair delete"),
        Ending::DeletedHere { .. } => Some("pair delete on the secondary"),
    };
    if let Some(why) = deleted {
        let mut g = lock(&group.inner);
        group.dissolve(&mut g, why);
    }
    if session.ending == Ending::DeletedByPrimary {
        let reply = pb::CommandReply { command: pb::Command::Delete as i32, error: String::new() };
        let _ = send.send(Body::CommandReply(reply)).await;
    }
    send.finish();
    if let (Ending::DeletedHere { confirmed }, Some(reply)) = (&session.ending, session.delete_reply.take()) {
        let name = &group.cfg.name;
        let _ = reply.send(if *confirmed {
            format!("group {name}: pair deleted on both sites; {peer} stopped replicating and the volumes here are standalone (SIMPLEX)")
        } else {
            format!(
                "group {name}: pair deleted here (no applies run any more; the volumes are standalone); {peer} did not confirm \
                 within 10 s: it will find the pair gone when it reconnects; run `replicator pair delete {name}` there too"
            )
        });
    }
    match result {
        Ok(()) => tracing::info!(group = %group.cfg.name, "replication session closed"),
        Err(e) => {
            tracing::warn!(group = %group.cfg.name, "replication session ended: {e}");
            lock(&group.inner).last_error = Some(e.to_string());
        }
    }
    detach(&group);
}

/// The session is over: no replica claims PAIR without a live session.
fn detach(group: &Group) {
    let mut g = lock(&group.inner);
    g.secondary_attached = false;
    g.session_cmd = None;
    g.link_changed_at = std::time::SystemTime::now();
    if g.role == Role::Secondary && matches!(g.state, PairState::Pair | PairState::Copy) {
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
}

struct Session {
    group: Arc<Group>,
    applier: Applier,
    done: HashMap<ApplyId, watch::Sender<bool>>,
    waits: HashMap<ApplyId, watch::Receiver<bool>>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    applying: usize,
    flushing: bool,
    last_durable_at: Instant,
    last_checkpoint_at: Instant,
    checkpoint: u64,
    copy_done_pending: Option<u64>,
    ack_dirty: bool,
    /// Commands from the control socket (`pair delete` here).
    commands: mpsc::UnboundedReceiver<SessionCommand>,
    /// Why the loop ends (set before it returns).
    ending: Ending,
    /// `pair delete` here: the admin's answer, and until when the primary
    /// may take to confirm.
    delete_reply: Option<oneshot::Sender<String>>,
    leave_by: Option<Instant>,
    /// The primary's write time of records not yet in the applied prefix.
    written_at: BTreeMap<u64, u64>,
    /// Copy bytes applied since the last flush started: the primary's copy
    /// window only moves when they are durable.
    copy_bytes_since_flush: u64,
}

impl Session {
    fn new(group: Arc<Group>, base: u64, commands: mpsc::UnboundedReceiver<SessionCommand>) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            group,
            applier: Applier::new(base),
            done: HashMap::new(),
            waits: HashMap::new(),
            events_tx,
            events,
            applying: 0,
            flushing: false,
            last_durable_at: Instant::now(),
            last_checkpoint_at: Instant::now(),
            checkpoint: base,
            copy_done_pending: None,
            ack_dirty: false,
            commands,
            ending: Ending::Stream,
            delete_reply: None,
            leave_by: None,
            written_at: BTreeMap::new(),
            copy_bytes_since_flush: 0,
        }
    }

    async fn run(
        &mut self,
        send: &mut FramedSend,
        recv: &mut FramedRecv,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), TransportError> {
        let mut tick = tokio::time::interval(DURABLE_INTERVAL);
        loop {
            tokio::select! {
                frame = recv.recv() => {
                    match frame? {
                        None => return Ok(()),
                        Some(env) => self.on_frame(env).await?,
                    }
                    // Take every frame that arrived in the same read.
                    while !self.finished() {
                        let Some(env) = recv.try_next()? else { break };
                        self.on_frame(env).await?;
                    }
                    if self.finished() {
                        return Ok(());
                    }
                }
                Some(ev) = self.events.recv() => self.on_event(ev)?,
                Some(cmd) = self.commands.recv() => match cmd {
                    SessionCommand::Delete(reply) => {
                        // Stop applying, ask the primary to dissolve too; the
                        // volumes become writable here only after the drain.
                        tracing::info!(group = %self.group.cfg.name, "pair delete on the secondary: asking the primary to end the pair");
                        self.delete_reply = Some(reply);
                        self.ending = Ending::DeletedHere { confirmed: false };
                        self.leave_by = Some(Instant::now() + Duration::from_secs(10));
                        send.send(Body::Command(pb::GroupCommand { command: pb::Command::Delete as i32, seq: 0 })).await?;
                    }
                },
                _ = tick.tick() => {
                    if self.leave_by.is_some_and(|t| Instant::now() >= t) {
                        return Ok(());
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
            // Coalesce: one ack covers every apply that has finished by now.
            while let Ok(ev) = self.events.try_recv() {
                self.on_event(ev)?;
            }
            self.maybe_flush();
            self.maybe_checkpoint().await;
            self.maybe_finish_copy(send).await?;
            if self.ack_dirty {
                self.ack_dirty = false;
                let mut ack = self.applier.ack();
                ack.checkpoint_seq = self.checkpoint;
                send.send(Body::Ack(ack)).await?;
            }
        }
    }

    /// Finishes in-flight applies, makes them durable and persists the
    /// checkpoint (clean stop or end of session). The caller finishes the
    /// stream (a delete confirmation may still follow).
    async fn drain(&mut self, send: &mut FramedSend) {
        while self.applying > 0 || self.flushing {
            match self.events.recv().await {
                Some(ev) => {
                    if let Err(e) = self.on_event(ev) {
                        tracing::error!(group = %self.group.cfg.name, "{e}");
                    }
                }
                None => break,
            }
        }
        let (seq, ci) = self.applier.durable_barrier();
        if let Err(e) = self.group.sync_all().await {
            tracing::error!(group = %self.group.cfg.name, "final flush failed: {e}");
            let _ = send.flush().await;
            return;
        }
        self.applier.on_durable(seq, ci);
        self.persist_checkpoint(seq).await;
        let mut ack = self.applier.ack();
        ack.checkpoint_seq = self.checkpoint;
        let _ = send.send(Body::Ack(ack)).await;
    }

    /// The loop must end: the pair is being deleted and the primary has
    /// confirmed (or asked for it).
    fn finished(&self) -> bool {
        matches!(self.ending, Ending::DeletedByPrimary | Ending::DeletedHere { confirmed: true })
    }

    async fn on_frame(&mut self, env: pb::Envelope) -> Result<(), TransportError> {
        if matches!(self.ending, Ending::DeletedHere { .. }) {
            // Leaving the pair: nothing is applied any more; wait for the
            // primary's own delete.
            if let Some(Body::Command(c)) = &env.body {
                if c.command == pb::Command::Delete as i32 {
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
                self.on_record(rec).await
            }
            Some(Body::Flush(f)) => {
                self.applier.on_flush_request(f.seq);
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::CopyDone as i32 => {
                self.copy_done_pending = Some(c.seq);
                Ok(())
            }
            Some(Body::Command(c)) if c.command == pb::Command::Delete as i32 => {
                // Dissolved (and confirmed) after the drain, see
                // `serve_secondary`.
                self.ending = Ending::DeletedByPrimary;
                Ok(())
            }
            other => Err(TransportError::Protocol(format!("unexpected message on a group stream: {other:?}"))),
        }
    }

    async fn on_record(&mut self, rec: Record) -> Result<(), TransportError> {
        let vol = self.group.volumes.get(rec.volume as usize).cloned().ok_or_else(|| {
            TransportError::Protocol(format!("record {} names volume #{} which does not exist", rec.seq, rec.volume))
        })?;
        if rec.end() > vol.size() {
            return Err(TransportError::Protocol(format!("record {} ends beyond volume {}", rec.seq, vol.name)));
        }
        let (id, deps) =
            self.applier.on_record(&rec).map_err(|e| TransportError::Protocol(format!("rejected record: {e}")))?;
        if rec.op == RecordOp::Copy {
            self.mark_inconsistent().await;
            self.copy_bytes_since_flush += u64::from(rec.length);
        } else {
            self.extend_horizon(rec.seq).await?;
        }
        if rec.op != RecordOp::Copy && rec.written_at_us != 0 {
            self.written_at.insert(rec.seq, rec.written_at_us);
        }
        let waits: Vec<watch::Receiver<bool>> = deps.iter().filter_map(|d| self.waits.get(d).cloned()).collect();
        let (tx, rx) = watch::channel(false);
        self.done.insert(id, tx);
        self.waits.insert(id, rx);
        self.applying += 1;
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            for mut w in waits {
                let _ = w.wait_for(|d| *d).await;
            }
            // The CRC was checked on arrival; check it again right before the
            // bytes go to disk, so memory corruption in between is caught too.
            let result = match rec.verify_crc() {
                Ok(()) => vol.apply(&rec).await.map_err(|e| format!("volume {}: {e}", vol.name)),
                Err(e) => Err(format!("record {} failed its CRC check before apply: {e}", rec.seq)),
            };
            let _ = events.send(Event::Applied(id, result));
        });
        Ok(())
    }

    /// Before record `seq` may reach the volumes, the persisted apply
    /// horizon must be beyond it (moved ahead in steps, so this costs one
    /// state save per [`HORIZON_STEP`] records).
    async fn extend_horizon(&mut self, seq: u64) -> Result<(), TransportError> {
        let group = self.group.clone();
        let snapshot = {
            let mut g = lock(&group.inner);
            if seq < g.persisted.apply_horizon {
                return Ok(());
            }
            g.persisted.apply_horizon = seq.saturating_add(HORIZON_STEP);
            Group::snapshot_state(&mut g)
        };
        match tokio::task::spawn_blocking(move || group.write_state(snapshot)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TransportError::Protocol(format!("cannot persist the apply horizon: {e}"))),
            Err(e) => Err(TransportError::Protocol(format!("apply horizon task failed: {e}"))),
        }
    }

    async fn mark_inconsistent(&mut self) {
        let group = self.group.clone();
        let mut g = lock(&group.inner);
        if !g.persisted.copy_incomplete || g.persisted.consistent {
            g.persisted.copy_incomplete = true;
            g.persisted.consistent = false;
            g.state = PairState::Copy;
            group.save_locked(&mut g);
            group.publish(&mut g);
        }
    }

    fn on_event(&mut self, ev: Event) -> Result<(), TransportError> {
        match ev {
            Event::Applied(id, result) => {
                self.applying -= 1;
                if let Some(tx) = self.done.remove(&id) {
                    let _ = tx.send(true);
                }
                self.waits.remove(&id);
                if let Err(e) = result {
                    lock(&self.group.inner).last_error = Some(e.clone());
                    return Err(TransportError::Protocol(format!("apply failed: {e}")));
                }
                self.applier.on_applied(id);
                let applied = self.applier.ack().applied_seq;
                let rest = self.written_at.split_off(&(applied + 1));
                let newest = std::mem::replace(&mut self.written_at, rest).into_values().max();
                let mut g = lock(&self.group.inner);
                g.secondary_applied = applied;
                if let Some(t) = newest {
                    g.persisted.data_as_of_us = g.persisted.data_as_of_us.max(t);
                }
                if g.persisted.catch_up_seq > 0 && applied >= g.persisted.catch_up_seq {
                    g.persisted.catch_up_seq = 0;
                    if !g.persisted.copy_incomplete {
                        g.persisted.consistent = true;
                        g.state = PairState::Pair;
                        tracing::info!(group = %self.group.cfg.name, seq = applied,
                            "caught up past every record applied before the unclean stop: this replica is write-order consistent again");
                    }
                    self.group.save_locked(&mut g);
                    self.group.publish(&mut g);
                }
                self.ack_dirty = true;
            }
            Event::Durable(seq, ci, result) => {
                self.flushing = false;
                if let Err(e) = result {
                    return Err(TransportError::Protocol(format!("flush failed: {e}")));
                }
                self.applier.on_durable(seq, ci);
                lock(&self.group.inner).secondary_durable = seq;
                self.last_durable_at = Instant::now();
                self.ack_dirty = true;
            }
        }
        Ok(())
    }

    fn maybe_flush(&mut self) {
        if self.flushing {
            return;
        }
        let (seq, ci) = self.applier.durable_barrier();
        let ack = self.applier.ack();
        let behind = seq > ack.durable_seq || ci > ack.copy_durable;
        let copy_due = behind && self.copy_bytes_since_flush >= COPY_FLUSH_BYTES;
        if !(self.applier.needs_flush() || copy_due || (behind && self.last_durable_at.elapsed() >= DURABLE_INTERVAL)) {
            return;
        }
        self.flushing = true;
        self.copy_bytes_since_flush = 0;
        let group = self.group.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let r = group.sync_all().await.map_err(|e| e.to_string());
            let _ = events.send(Event::Durable(seq, ci, r));
        });
    }

    async fn maybe_checkpoint(&mut self) {
        let durable = self.applier.ack().durable_seq;
        if durable > self.checkpoint && self.last_checkpoint_at.elapsed() >= CHECKPOINT_INTERVAL {
            self.persist_checkpoint(durable).await;
        }
    }

    async fn persist_checkpoint(&mut self, durable: u64) {
        let group = self.group.clone();
        let snapshot = {
            let mut g = lock(&group.inner);
            if durable <= g.persisted.durable_seq {
                None
            } else {
                g.persisted.durable_seq = durable;
                Some(Group::snapshot_state(&mut g))
            }
        };
        let saved = match snapshot {
            None => Ok(Ok(())),
            Some(snapshot) => {
                tokio::task::spawn_blocking(move || group.write_state(snapshot).map_err(|e| e.to_string())).await
            }
        };
        match saved {
            Ok(Ok(())) => {
                self.checkpoint = self.checkpoint.max(durable);
                self.last_checkpoint_at = Instant::now();
                self.ack_dirty = true;
            }
            Ok(Err(e)) => tracing::error!(group = %self.group.cfg.name, "cannot persist the checkpoint: {e}"),
            Err(e) => tracing::error!(group = %self.group.cfg.name, "cannot persist the checkpoint: {e}"),
        }
    }

    /// COPY_DONE: once everything up to it is applied and durable, the image
    /// is consistent again.
    async fn maybe_finish_copy(&mut self, send: &mut FramedSend) -> Result<(), TransportError> {
        let Some(seq) = self.copy_done_pending else { return Ok(()) };
        let ack = self.applier.ack();
        let (bar_seq, bar_ci) = self.applier.durable_barrier();
        if self.applying > 0 || ack.durable_seq < seq || ack.durable_seq < bar_seq || ack.copy_durable < bar_ci {
            self.applier.on_flush_request(seq);
            return Ok(());
        }
        self.persist_checkpoint(ack.durable_seq).await;
        {
            let group = self.group.clone();
            let mut g = lock(&group.inner);
            g.persisted.copy_incomplete = false;
            g.persisted.consistent = g.persisted.catch_up_seq == 0;
            if g.persisted.consistent {
                g.state = PairState::Pair;
            }
            group.save_locked(&mut g);
            group.publish(&mut g);
        }
        tracing::info!(group = %self.group.cfg.name, "copy complete: this replica is consistent");
        self.copy_done_pending = None;
        send.send(Body::CommandReply(pb::CommandReply { command: pb::Command::CopyDone as i32, error: String::new() }))
            .await
    }
}
