//! `replicator verify GROUP [--fix]`: compares the two sites online.
//!
//! Run on the primary, with the pair in PAIR and a live replication session.
//! Every volume is cut into regions of [`REGION`] bytes (the last one may be
//! shorter). For each region the primary:
//!
//! 1. lets the secondary catch up with what is journaled now (nothing is held
//!    yet, so a lagging secondary costs time, not write latency);
//! 2. holds the region against writes: a read barrier in the group's
//!    `RangeSequencer`, exactly as the copy reads a chunk (writes to it in
//!    flight finish first, new ones wait); S = the last write sequence
//!    assigned before it;
//! 3. waits until the secondary has applied every write through S
//!    ([`super::Progress::applied`]): both sites now hold the region as of S;
//!    if that takes longer than [`HOLD_LIMIT`] (writes admitted during step
//!    1 keep an async secondary behind), the region is let go and the steps
//!    start over, [`HOLD_ATTEMPTS`] times at most;
//! 4. asks the secondary for the BLAKE3 hash of the region (a
//!    `VerifyRequest` on a stream of this run's own) while it hashes its own copy;
//! 5. releases the region and compares.
//!
//! [`PIPELINE`] regions are in flight at once, so a run goes at about disk or
//! link speed while each region is held for one read and one round trip.
//! While a region is held, writes to it wait, and because volume writes
//! follow journal order, so do the writes admitted after them: the hold is
//! kept that short on purpose, and never longer than [`HOLD_LIMIT`] plus
//! one read and one round trip.
//!
//! Mismatching regions are listed and logged (exit 1). With `--fix` they are
//! marked dirty in the bitmaps with `copy_pending`, as the regions a power cut
//! leaves behind are: the running session's copy (`PrimarySession::next_copy`
//! looks at the bitmaps on every turn of the send loop) copies them at once,
//! the secondary calls itself inconsistent (COPY) until the copy is durable
//! there, and the command waits for that.
//!
//! The secondary's side is [`serve_verify`]: it checks each request against
//! its own state and answers with the hash of its copy, read through the
//! group's volumes (the I/O engine the applies use).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use replicator_protocol::pair::{PairEvent, PairState, Role};
use replicator_protocol::pb::{self, envelope::Body};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{lock, Group, GroupError, Inner};
use crate::transport::{FramedRecv, FramedSend, Transport};

/// Size of a compared region (and the largest request a secondary answers).
pub const REGION: u64 = 1 << 20;
/// Regions compared at once.
const PIPELINE: usize = 4;
/// Mismatching regions listed in the answer (and logged one per line).
const LIST_LIMIT: usize = 20;
/// How long a region waits for the secondary to answer, or to apply one
/// more write while it catches up.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a held region waits for the secondary to apply the writes
/// before it (writes to the region wait meanwhile, and every later write
/// of the group behind them): past it the region is let go, and held again
/// after the secondary caught up once more.
const HOLD_LIMIT: Duration = Duration::from_secs(2);
/// Times a region is held and let go before verify gives up on it (the
/// secondary lags too far behind a group that keeps writing).
const HOLD_ATTEMPTS: usize = 5;
/// A verify stream with no request for this long is closed by the secondary.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a run reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Region reads a secondary serves at once, over all verify streams (each
/// holds a buffer of up to [`REGION`] bytes).
static SECONDARY_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2 * PIPELINE);

/// A region of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    volume: u32,
    offset: u64,
    len: u64,
}

/// Every region of volumes of these sizes, in order.
fn regions(sizes: &[u64]) -> Vec<Region> {
    let mut out = Vec::new();
    for (volume, &size) in (0u32..).zip(sizes) {
        let mut offset = 0;
        while offset < size {
            let len = REGION.min(size - offset);
            out.push(Region { volume, offset, len });
            offset += len;
        }
    }
    out
}

fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

impl Group {
    /// `verify` on this node: compares every region with the secondary and,
    /// with `fix`, has the mismatching ones copied again. Progress lines go
    /// to `progress`. Mismatches without `fix` are an error (the list);
    /// refusals say what state the pair would need.
    pub async fn verify(
        self: &Arc<Self>,
        fix: bool,
        progress: &mpsc::UnboundedSender<String>,
    ) -> Result<String, GroupError> {
        let name = self.cfg.name.clone();
        let Ok(_one) = self.verify_one.try_lock() else {
            return Err(GroupError::Failed(format!(
                "a verify of group {name} is already running here: wait for it to finish, then run it again if \
                 need be"
            )));
        };
        let pair_id = {
            let g = lock(&self.inner);
            match g.role() {
                Role::Primary => {}
                Role::Secondary => {
                    return Err(GroupError::Failed(format!(
                        "group {name} is the secondary here: run `replicator verify {name}` on the primary, {}",
                        self.cfg.peer
                    )))
                }
                Role::None => {
                    return Err(GroupError::Failed(format!(
                        "group {name} is not paired (SIMPLEX): there is no second site to compare with"
                    )))
                }
            }
            self.verifiable(&g, g.persisted.pair_id)?;
            g.persisted.pair_id
        };
        let conn = self.transport.connect(&self.cfg.peer).await.map_err(|e| self.lost(e.to_string()))?;
        let peer = Arc::new(PeerHashes::new(conn, IDLE_TIMEOUT / 2));

        let all = regions(&self.volumes.iter().map(|v| v.size()).collect::<Vec<_>>());
        let total_bytes: u64 = all.iter().map(|r| r.len).sum();
        tracing::info!(group = %name, peer = %self.cfg.peer, regions = all.len(), bytes = total_bytes, fix, "verify started");
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut todo = all.iter().copied();
        let mut running = JoinSet::new();
        let (mut done, mut done_bytes) = (0usize, 0u64);
        let mut differing = Vec::new();
        loop {
            while running.len() < PIPELINE {
                let Some(region) = todo.next() else { break };
                running.spawn(compare(self.clone(), peer.clone(), pair_id, region));
            }
            let Some(joined) = running.join_next().await else { break };
            let (region, same) = match joined {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(GroupError::Failed(format!("verify {name}: a region task failed: {e}"))),
            };
            done += 1;
            done_bytes += region.len;
            if !same {
                if differing.len() < LIST_LIMIT {
                    let volume = self.volumes.get(region.volume as usize).map_or("?", |v| v.name.as_str());
                    tracing::warn!(group = %name, volume, offset = region.offset, len = region.len,
                        "verify: the sites differ in this region");
                }
                differing.push(region);
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let _ = progress.send(format!(
                    "verify {name}: {done} of {} regions ({} of {}) compared, {} differ so far",
                    all.len(),
                    mib(done_bytes),
                    mib(total_bytes),
                    differing.len()
                ));
            }
        }
        peer.finish().await;
        differing.sort_by_key(|r| (r.volume, r.offset));
        let summary = format!(
            "verify {name}: {} regions ({}) in {:.1} s",
            all.len(),
            mib(total_bytes),
            started.elapsed().as_secs_f64()
        );
        if differing.is_empty() {
            tracing::info!(group = %name, regions = all.len(), "verify: the sites match");
            return Ok(format!("{summary}: the sites match"));
        }
        tracing::warn!(group = %name, peer = %self.cfg.peer, differing = differing.len(), regions = all.len(),
            "verify: the sites differ");
        let list = self.describe(&differing);
        if !fix {
            return Err(GroupError::Failed(format!(
                "{summary}: {} of them DIFFER between this primary and {}:\n{list}\nrun `replicator verify {name} --fix` \
                 to copy them from here to {}",
                differing.len(),
                self.cfg.peer,
                self.cfg.peer
            )));
        }
        let bytes = self.fix(pair_id, &differing, progress).await?;
        Ok(format!(
            "{summary}: {} of them differed:\n{list}\nfixed {} regions ({bytes} bytes): copied from here to {}; \
             the pair is back in PAIR",
            differing.len(),
            differing.len(),
            self.cfg.peer
        ))
    }

    /// Can a verify (still) run: primary of `pair_id`, PAIR, a live session,
    /// no copy running, no switchover?
    fn verifiable(&self, g: &Inner, pair_id: u64) -> Result<(), GroupError> {
        let name = &self.cfg.name;
        let peer = &self.cfg.peer;
        if g.role() != Role::Primary || g.persisted.pair_id != pair_id {
            return Err(GroupError::Failed(format!("group {name}: the pair changed during verify (now {})", g.state)));
        }
        if let Some(why) = self.stopped.get() {
            return Err(GroupError::Refused(format!(
                "group {name} stopped taking writes after a local failure: {why}"
            )));
        }
        if g.state != PairState::Pair {
            return Err(GroupError::Refused(format!(
                "group {name}: the pair is {}; verify needs PAIR (with {peer} connected)",
                g.state
            )));
        }
        if !self.progress.borrow().connected {
            return Err(GroupError::Refused(format!(
                "group {name}: the replication session to {peer} is not up; verify needs PAIR with a live session"
            )));
        }
        if g.switching {
            return Err(GroupError::Refused(format!("group {name}: a switchover is running; verify needs PAIR")));
        }
        if g.persisted.role.as_primary().is_some_and(|p| p.copy_pending) {
            let dirty: u64 = g.bitmaps.iter().map(|b| b.dirty_bytes()).sum();
            return Err(GroupError::Refused(format!(
                "group {name}: a resync to {peer} is still running ({dirty} bytes to copy); verify needs it finished"
            )));
        }
        Ok(())
    }

    /// The session broke, or could not be reached, during a verify.
    fn lost(&self, why: String) -> GroupError {
        GroupError::Lost(format!(
            "verify {}: lost the replication session to {} ({why}); nothing was compared beyond that: run verify again",
            self.cfg.name, self.cfg.peer
        ))
    }

    /// Waits until the secondary has applied every write through `seq`;
    /// fails when the session ends or the secondary applies nothing for
    /// [`HOLD_TIMEOUT`].
    async fn applied_through(&self, seq: u64) -> Result<(), GroupError> {
        let mut rx = self.progress.subscribe();
        loop {
            let before = {
                let p = rx.borrow_and_update();
                if !p.connected {
                    return Err(self.lost("the session ended".into()));
                }
                if p.applied >= seq {
                    return Ok(());
                }
                p.applied
            };
            match tokio::time::timeout(HOLD_TIMEOUT, rx.wait_for(|p| p.applied > before || !p.connected)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(self.lost("the group is closing".into())),
                Err(_) => {
                    return Err(self.lost(format!(
                        "the secondary applied nothing for {HOLD_TIMEOUT:?} (it is at write {before}, verify waits for {seq})"
                    )))
                }
            }
        }
    }

    /// "  volume NAME offset O (0x..) length L" lines, at most [`LIST_LIMIT`].
    fn describe(&self, regions: &[Region]) -> String {
        let mut lines: Vec<String> = regions
            .iter()
            .take(LIST_LIMIT)
            .map(|r| {
                let volume = self.volumes.get(r.volume as usize).map_or("?", |v| v.name.as_str());
                format!("  volume {volume} offset {} (0x{:x}) length {}", r.offset, r.offset, r.len)
            })
            .collect();
        if regions.len() > LIST_LIMIT {
            lines.push(format!("  ... and {} more", regions.len() - LIST_LIMIT));
        }
        lines.join("\n")
    }

    /// `--fix`: marks the regions dirty (persisted), lets the running
    /// session copy them, and waits until the pair is back in PAIR with
    /// nothing left to copy. Returns the bytes marked.
    async fn fix(
        &self,
        pair_id: u64,
        regions: &[Region],
        progress: &mpsc::UnboundedSender<String>,
    ) -> Result<u64, GroupError> {
        let name = &self.cfg.name;
        let bytes: u64 = regions.iter().map(|r| r.len).sum();
        let save = {
            let mut g = lock(&self.inner);
            self.verifiable(&g, pair_id)?;
            for r in regions {
                if let Some(b) = g.bitmaps.get_mut(r.volume as usize) {
                    b.set_range(r.offset, r.len);
                }
            }
            if let Some(p) = g.persisted.role.as_primary_mut() {
                p.copy_pending = true;
            }
            // Acknowledged writes these regions hold here are not on the
            // secondary until copied: a failover meanwhile leaves this node
            // in split brain, not only fenced (`divergence`).
            self.note_lone_acks(&mut g);
            // The replica is inconsistent until they are copied (a sync
            // pair does not claim RPO 0 meanwhile).
            if g.state == PairState::Pair {
                self.transition(&mut g, PairEvent::RegionsToCopy, "verify --fix: copying the differing regions");
            }
            // The running session's copy progress starts over with them.
            g.start_copy_progress();
            // Durable before the copy starts: after a crash from here on,
            // the regions are still copied by the next session.
            self.save_later(&mut g)
        };
        self.saved(save).await?;
        self.ship_wake.notify_one();
        tracing::warn!(group = %name, peer = %self.cfg.peer, regions = regions.len(), bytes,
            "verify --fix: copying the differing regions to the secondary");
        let mut last_report = Instant::now();
        loop {
            {
                let g = lock(&self.inner);
                if g.role() != Role::Primary || g.persisted.pair_id != pair_id {
                    return Err(GroupError::Failed(format!("verify {name} --fix: the pair changed (now {})", g.state)));
                }
                match g.state {
                    PairState::Pair if g.persisted.role.as_primary().is_some_and(|p| !p.copy_pending) => return Ok(bytes),
                    PairState::Pair | PairState::Copy => {}
                    other => {
                        return Err(GroupError::Failed(format!(
                            "verify {name} --fix: the pair became {other} while the {} differing regions were being copied; \
                             they stay marked dirty here and are copied when the pair resumes (`replicator status {name}`)",
                            regions.len()
                        )))
                    }
                }
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    let dirty: u64 = g.bitmaps.iter().map(|b| b.dirty_bytes()).sum();
                    let _ =
                        progress.send(format!("verify {name} --fix: copying to {}: {dirty} bytes left", self.cfg.peer));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Compares one region (see the module documentation). Returns it and
/// whether both sites hold the same bytes.
async fn compare(
    group: Arc<Group>,
    peer: Arc<PeerHashes>,
    pair_id: u64,
    region: Region,
) -> Result<(Region, bool), GroupError> {
    let volume = group
        .volumes
        .get(region.volume as usize)
        .cloned()
        .ok_or_else(|| GroupError::Failed(format!("no volume #{}", region.volume)))?;
    let mut attempt = 0;
    let (held, seq) = loop {
        // Catch up first, holding nothing.
        let now = lock(&group.inner).last_jseq;
        group.applied_through(now).await?;
        let (held, seq) = group.read_barrier(region.volume, region.offset, region.len).await;
        // Writes to the region wait: its records go out now, not after an
        // async batch's gathering time.
        group.ship_wake.notify_one();
        group.verifiable(&lock(&group.inner), pair_id)?;
        match tokio::time::timeout(HOLD_LIMIT, group.applied_through(seq)).await {
            Ok(caught_up) => {
                caught_up?;
                break (held, seq);
            }
            Err(_) => {
                // Writes admitted while catching up keep the secondary
                // behind: let the region (and the writes behind it) go.
                drop(held);
                attempt += 1;
                if attempt == HOLD_ATTEMPTS {
                    return Err(GroupError::Failed(format!(
                        "verify {}: the secondary stays more than {HOLD_LIMIT:?} behind this primary's writes, and \
                         comparing a region would hold the group's writes that long ({HOLD_ATTEMPTS} tries); run \
                         verify when the lag is lower",
                        group.cfg.name
                    )));
                }
            }
        }
    };
    let request = pb::VerifyRequest {
        group: group.cfg.name.clone(),
        pair_id,
        id: 0,
        volume: region.volume,
        offset: region.offset,
        length: region.len as u32,
        seq,
    };
    let ours = async {
        let data = volume.read(region.offset, region.len).await.map_err(|e| {
            GroupError::Failed(format!("verify: reading volume {} at {}: {e}", volume.name, region.offset))
        })?;
        Ok::<_, GroupError>(blake3::hash(&data))
    };
    let (ours, theirs) = tokio::join!(ours, peer.hash(request));
    drop(held);
    let theirs = theirs.map_err(|e| GroupError::Lost(format!("verify {}: {}: {e}", group.cfg.name, group.cfg.peer)))?;
    Ok((region, theirs.as_ref() == ours?.as_bytes()))
}

/// A reply as the waiting region sees it: the hash, or the secondary's
/// reason.
type Answer = Result<Bytes, String>;

/// Regions waiting for their reply, by request id, with the number of the
/// stream their request went out on.
type Waiting = Arc<Mutex<HashMap<u64, (u64, oneshot::Sender<Answer>)>>>;

/// The primary's end of a run's verify streams: requests go out as regions
/// are held, replies are matched to them by id.
///
/// The secondary closes a stream after [`IDLE_TIMEOUT`] without a request,
/// and a region's catch-up (step 1) may take longer than that while an
/// async secondary works off its lag. So a request that would go out on a
/// stream idle for half that long goes out on a new stream instead (the old
/// one is finished: its replies still arrive).
struct PeerHashes {
    conn: quinn::Connection,
    /// The stream requests go out on, once one was opened.
    current: tokio::sync::Mutex<Option<RequestStream>>,
    waiting: Waiting,
    next_id: AtomicU64,
    /// Streams opened so far (a stream's number, for its reader).
    streams_opened: AtomicU64,
    /// A stream idle this long is replaced before the next request.
    reopen_after: Duration,
    /// The tasks reading replies, one per stream (they end with it).
    readers: Mutex<JoinSet<()>>,
}

struct RequestStream {
    number: u64,
    send: FramedSend,
    last_request: Instant,
}

impl PeerHashes {
    fn new(conn: quinn::Connection, reopen_after: Duration) -> Self {
        PeerHashes {
            conn,
            current: tokio::sync::Mutex::new(None),
            waiting: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            streams_opened: AtomicU64::new(0),
            reopen_after,
            readers: Mutex::new(JoinSet::new()),
        }
    }

    /// The secondary's hash of the requested region.
    async fn hash(&self, mut request: pb::VerifyRequest) -> Answer {
        request.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut current = self.current.lock().await;
            let stream = match current.take() {
                Some(stream) if stream.last_request.elapsed() < self.reopen_after => stream,
                old => {
                    if let Some(mut old) = old {
                        old.send.finish();
                    }
                    let number = self.streams_opened.fetch_add(1, Ordering::Relaxed);
                    // Bounded: the region is held against writes meanwhile.
                    let (send, recv) =
                        match tokio::time::timeout(HOLD_TIMEOUT, Transport::open_stream(&self.conn)).await {
                            Ok(opened) => opened.map_err(|e| format!("cannot open a verify stream: {e}"))?,
                            Err(_) => return Err(format!("cannot open a verify stream within {HOLD_TIMEOUT:?}")),
                        };
                    self.readers.lock().unwrap_or_else(PoisonError::into_inner).spawn(read_replies(
                        self.waiting.clone(),
                        number,
                        recv,
                    ));
                    RequestStream { number, send, last_request: Instant::now() }
                }
            };
            let stream = current.insert(stream);
            self.waiting.lock().unwrap_or_else(PoisonError::into_inner).insert(request.id, (stream.number, tx));
            stream.last_request = Instant::now();
            if let Err(e) = stream.send.send(Body::VerifyRequest(request)).await {
                return Err(format!("cannot send the request: {e}"));
            }
        }
        match tokio::time::timeout(HOLD_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the verify stream ended before its answer (the peer stopped or restarted, or runs a replicator that does not know `verify`)".into()),
            Err(_) => Err(format!("no answer within {HOLD_TIMEOUT:?}")),
        }
    }

    /// Ends the stream cleanly (the secondary's loop then ends).
    async fn finish(&self) {
        if let Some(stream) = self.current.lock().await.as_mut() {
            stream.send.finish();
        }
    }
}

/// Hands each reply on stream `number` to the region waiting for it; when
/// the stream ends, every region still waiting for a reply on it learns so.
async fn read_replies(waiting: Waiting, number: u64, mut recv: FramedRecv) {
    loop {
        let reply = match recv.recv().await {
            Ok(Some(pb::Envelope { body: Some(Body::VerifyReply(reply)) })) => reply,
            other => {
                match other {
                    Err(e) => tracing::warn!("verify stream: {e}"),
                    Ok(Some(unexpected)) => tracing::warn!(
                        "verify stream: unexpected message {}",
                        unexpected.body.as_ref().map_or("(empty)", replicator_protocol::wire::body_kind)
                    ),
                    Ok(None) => {}
                }
                waiting.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, (on, _)| *on != number);
                return;
            }
        };
        let mut waiting = waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.get(&reply.id).is_some_and(|(on, _)| *on == number) {
            if let Some((_, tx)) = waiting.remove(&reply.id) {
                let _ = tx.send(if reply.error.is_empty() {
                    Ok(reply.blake3)
                } else {
                    Err(replicator_protocol::wire::peer_text(&reply.error))
                });
            }
        }
    }
}

/// Serves one verify stream from `peer` (the secondary's side): answers each
/// `VerifyRequest` in order with the hash of the region on this node, or
/// the reason it cannot. Ends when the primary finishes the stream, after
/// [`IDLE_TIMEOUT`] without a request, or on a protocol error.
pub async fn serve_verify(
    groups: &[Arc<Group>],
    first: pb::VerifyRequest,
    send: FramedSend,
    recv: FramedRecv,
    peer: &str,
) {
    serve_verify_until_idle(groups, first, send, recv, peer, IDLE_TIMEOUT).await;
}

/// [`serve_verify`], closing the stream after `idle` without a request.
async fn serve_verify_until_idle(
    groups: &[Arc<Group>],
    first: pb::VerifyRequest,
    mut send: FramedSend,
    mut recv: FramedRecv,
    peer: &str,
    idle: Duration,
) {
    let mut next = Some(first);
    loop {
        let request = match next.take() {
            Some(r) => r,
            None => match tokio::time::timeout(idle, recv.recv()).await {
                Ok(Ok(Some(pb::Envelope { body: Some(Body::VerifyRequest(r)) }))) => r,
                Ok(Ok(None)) => break,
                Ok(Ok(Some(other))) => {
                    let kind = other.body.as_ref().map_or("(empty)", replicator_protocol::wire::body_kind);
                    tracing::warn!(%peer, "verify stream: unexpected message {kind}");
                    let message = "only VerifyRequest is allowed on a verify stream".to_string();
                    let _ = send.send(Body::Error(pb::Error { message })).await;
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "verify stream: {e}");
                    break;
                }
                Err(_) => {
                    tracing::warn!(%peer, "verify stream: no request for {idle:?}: closing it");
                    break;
                }
            },
        };
        let (id, what) = (request.id, format!("{} volume #{} at {}", request.group, request.volume, request.offset));
        let reply = match hash_region(groups, &request, peer).await {
            Ok(hash) => pb::VerifyReply { id, blake3: Bytes::copy_from_slice(hash.as_bytes()), error: String::new() },
            Err(error) => {
                tracing::warn!(%peer, "verify request for {what} refused: {error}");
                pb::VerifyReply { id, blake3: Bytes::new(), error }
            }
        };
        if send.send(Body::VerifyReply(reply)).await.is_err() {
            return;
        }
    }
    send.finish();
}

/// Checks a request against this node's state and hashes the region.
async fn hash_region(groups: &[Arc<Group>], request: &pb::VerifyRequest, peer: &str) -> Result<blake3::Hash, String> {
    let group = groups
        .iter()
        .find(|g| g.cfg.name == request.group)
        .ok_or_else(|| format!("no group named {:?} is configured on this node", request.group))?;
    let name = &group.cfg.name;
    if group.cfg.peer != peer {
        return Err(format!("group {name} is configured here with peer {:?}, not {peer:?}", group.cfg.peer));
    }
    {
        let g = lock(&group.inner);
        if g.role() != Role::Secondary || g.persisted.pair_id != request.pair_id {
            return Err(format!(
                "group {name} here is not the secondary of this pair (it is {} {})",
                g.role().as_str(),
                g.state
            ));
        }
        if g.secondary_applied < request.seq {
            return Err(format!(
                "group {name} here has applied the writes through {} only, not through {}",
                g.secondary_applied, request.seq
            ));
        }
    }
    let sizes: Vec<u64> = group.volumes.iter().map(|v| v.size()).collect();
    let region = check_range(request, &sizes)?;
    let volume = group.volumes.get(region.volume as usize).ok_or("no such volume")?;
    let _slot = SECONDARY_READS.acquire().await.map_err(|e| e.to_string())?;
    let data =
        volume.read(region.offset, region.len).await.map_err(|e| format!("reading volume {}: {e}", volume.name))?;
    Ok(blake3::hash(&data))
}

/// The region a request names, if it lies inside a volume of these sizes
/// and is 1..=[`REGION`] bytes long.
fn check_range(request: &pb::VerifyRequest, sizes: &[u64]) -> Result<Region, String> {
    let size = *sizes
        .get(request.volume as usize)
        .ok_or_else(|| format!("no volume #{} (the group has {})", request.volume, sizes.len()))?;
    let len = u64::from(request.length);
    if len == 0 || len > REGION {
        return Err(format!("length {len} is not within 1..={REGION}"));
    }
    if request.offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!("range {}+{len} is beyond the end of the volume ({size} bytes)", request.offset));
    }
    Ok(Region { volume: request.volume, offset: request.offset, len })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn regions_cover_every_volume_in_1_mib_pieces_the_last_one_shorter() {
        let r = regions(&[3 * REGION + 4096, REGION]);
        assert_eq!(r.len(), 5);
        assert_eq!(r[3], Region { volume: 0, offset: 3 * REGION, len: 4096 });
        assert_eq!(r[4], Region { volume: 1, offset: 0, len: REGION });
        assert!(regions(&[]).is_empty());
    }

    fn request(volume: u32, offset: u64, length: u32) -> pb::VerifyRequest {
        pb::VerifyRequest { group: "g".into(), pair_id: 1, id: 1, volume, offset, length, seq: 0 }
    }

    #[test]
    fn requests_outside_a_volume_or_too_long_are_refused() {
        let sizes = [4 * REGION, REGION];
        assert_eq!(
            check_range(&request(1, 0, REGION as u32), &sizes),
            Ok(Region { volume: 1, offset: 0, len: REGION })
        );
        assert_eq!(check_range(&request(0, 3 * REGION + 512, 4096), &sizes).map(|r| r.len), Ok(4096));
        let refused = |r: pb::VerifyRequest| check_range(&r, &sizes).unwrap_err();
        assert!(refused(request(2, 0, 4096)).contains("no volume #2"));
        assert!(refused(request(0, 0, 0)).contains("not within"));
        assert!(refused(request(0, 0, REGION as u32 + 1)).contains("not within"));
        assert!(refused(request(1, 4096, REGION as u32)).contains("beyond the end"));
        assert!(refused(request(0, u64::MAX - 10, 4096)).contains("beyond the end"));
    }

    /// The secondary's side of a test connection: serves each verify stream
    /// it accepts (no group is configured: each request is answered with
    /// the refusal), closing one after `idle` without a request.
    async fn serve_streams(conn: quinn::Connection, idle: Duration) {
        let mut streams = JoinSet::new();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
            streams.spawn(async move {
                let Ok(Some(pb::Envelope { body: Some(Body::VerifyRequest(first)) })) = recv.recv().await else {
                    return;
                };
                serve_verify_until_idle(&[], first, send, recv, "site-a", idle).await;
            });
        }
    }

    /// A region whose catch-up outlasted the secondary's idle timeout sends
    /// its request on a new stream, not on the one the secondary closed.
    #[tokio::test]
    async fn a_request_after_a_long_catch_up_goes_out_on_a_new_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (dialed, accepted) = crate::transport::tests::connection_pair(dir.path()).await;
        let idle = Duration::from_millis(300);
        let secondary = tokio::spawn(serve_streams(accepted, idle));
        let peer = PeerHashes::new(dialed, idle / 2);
        let refused = |answer: Answer| answer.is_err_and(|e| e.contains("no group named"));
        // Two at once share the stream; one after a pause longer than the
        // secondary's idle timeout still reaches it.
        let (first, second) = tokio::join!(peer.hash(request(0, 0, 4096)), peer.hash(request(0, 4096, 4096)));
        assert!(refused(first.clone()) && refused(second.clone()), "{first:?} {second:?}");
        tokio::time::sleep(idle * 3).await;
        let late = peer.hash(request(0, 0, 4096)).await;
        assert!(refused(late.clone()), "the request after the pause: {late:?}");
        peer.finish().await;
        secondary.abort();
    }

    #[test]
    fn sizes_read_as_mib() {
        assert_eq!(mib(64 << 20), "64 MiB");
        assert_eq!(mib(3 << 19), "1.5 MiB");
    }
}
