//! The write path of a group (every role; journaling and replication only on
//! the primary).
//!
//! 1. Widen the request to whole blocks (`volume::align_range`).
//! 2. Under the group lock: reserve journal space (primary), take a journal
//!    sequence number, and register the range with the `RangeSequencer`,
//!    which names the earlier in-flight writes that overlap it.
//! 3. Wait for those writes, so overlapping writes reach the volume in
//!    sequence order (and a read-modify-write reads settled blocks).
//! 4. Build the record (read-modify-write for partial blocks), append it
//!    to the journal (starting its writeback at once when a flush is likely
//!    to follow, `writeback_hint.rs`) and make it shippable; then write the
//!    volume, once every earlier record is journaled too (write-ahead).
//! 5. FUA: fdatasync volume and journal.
//! 6. Sync mode: wait until the secondary has the record in its restore
//!    journal (FUA: durable there), within `link_timeout` (then suspend or
//!    keep waiting, per `on_link_loss`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replicator_protocol::journal_format::{
    record_span, JOURNAL_RECORD_ALIGN, JOURNAL_SUPERBLOCK_LEN, MAX_APPEND_WINDOW,
};
use replicator_protocol::journal_space::{self, OnFull};
use replicator_protocol::pair::{PairEvent, PairState, Role};
use replicator_protocol::record::{Record, RecordOp, MAX_RECORD_PAYLOAD};
use replicator_protocol::sequencer::Dep;
use tokio::sync::watch;

use super::slow_write::{Stages, SLOW_WRITE};
use super::{lock, CheckpointWatch, Entry, Group, Inner, Progress, CACHE_BUDGET, CACHE_DROP};
use crate::config::{LinkLossPolicy, Mode};
use crate::io::{AlignedBuf, IoError, IO_ALIGN};
use crate::journal::Journal;
use crate::volume::{align_range, is_aligned};

/// What a client asked to write.
#[derive(Debug)]
pub enum WriteKind {
    /// Data.
    Data(AlignedBuf),
    /// Zeroes over `len` bytes.
    Zeroes(u64),
    /// Discard `len` bytes (the range then reads as zeroes on both sites).
    Trim(u64),
}

impl WriteKind {
    fn len(&self) -> u64 {
        match self {
            WriteKind::Data(b) => b.len() as u64,
            WriteKind::Zeroes(l) | WriteKind::Trim(l) => *l,
        }
    }
}

/// Why a write (or flush) failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node holds the secondary copy.
    #[error("group {0} is secondary here: its volumes are a read-only replica")]
    ReadOnly(String),
    /// A switchover is handing the primary role to the peer.
    #[error("group {0}: a switchover is handing the primary role to the peer; this node takes no writes")]
    SwitchingOver(String),
    /// A failover on the peer superseded this primary: it is fenced.
    #[error("group {group}: {peer} took over as primary after a failover; this former primary accepts no writes (see `replicator status {group}`)")]
    Superseded {
        /// The group.
        group: String,
        /// The node that took over.
        peer: String,
    },
    /// `pair resync --swap` made the peer the primary: this split former
    /// primary gives up the role once its NBD clients detach.
    #[error("group {group}: `pair resync --swap` made {peer} the primary; this node takes no writes and becomes its secondary once its NBD clients detach (see `replicator status {group}`)")]
    SwappedAway {
        /// The group.
        group: String,
        /// The new primary.
        peer: String,
    },
    /// Outside the volume.
    #[error("range {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// Request shape not supported.
    #[error("{0}")]
    Invalid(String),
    /// Local I/O failed.
    #[error("local I/O: {0}")]
    Io(#[from] IoError),
    /// Journal I/O failed.
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    /// Replication could not be confirmed (sync mode, on_link_loss=block,
    /// shutting down).
    #[error("{0}")]
    Replication(String),
}

impl WriteError {
    /// Refused because this node takes no writes (NBD `EPERM`).
    pub fn is_refusal(&self) -> bool {
        match self {
            WriteError::ReadOnly(_)
            | WriteError::Superseded { .. }
            | WriteError::SwitchingOver(_)
            | WriteError::SwappedAway { .. } => true,
            WriteError::OutOfRange { .. }
            | WriteError::Invalid(_)
            | WriteError::Io(_)
            | WriteError::Journal(_)
            | WriteError::Replication(_) => false,
        }
    }
}

/// Releases the write's range in the sequencer when the write ends, however
/// it ends.
pub(super) struct RangeGuard<'a> {
    group: &'a Group,
    dep: Dep,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.group.inner);
        match self.dep {
            Dep::Seq(id) => g.seq.finish(id),
            Dep::Ticket(t) => g.seq.finish_ticket(t),
        }
        let waited = g.awaited.released(self.dep);
        drop(g);
        // Wakes the writes and reads waiting for this one.
        drop(waited);
    }
}

/// The in-flight writes and copy reads that a later overlapping one waits
/// for: a channel per awaited range, made when its first waiter comes,
/// whose sender is dropped (which wakes every waiter) when the range is let
/// go. Non-overlapping writes, nearly all of them, make none: no allocation
/// and no wake-up per write (with the notification of journal appends
/// nobody waits for, about 5 % of the primary's CPU per write at QD32).
#[derive(Debug, Default)]
pub(super) struct RangeWaits(HashMap<Dep, watch::Sender<()>>);

impl RangeWaits {
    /// What resolves once every one of `deps` is let go. Each must be in
    /// flight (the sequencer returned it), so that [`RangeWaits::released`]
    /// comes for it.
    fn wait_for(&mut self, deps: &[Dep]) -> RangesDone {
        RangesDone(deps.iter().map(|d| self.0.entry(*d).or_insert_with(|| watch::channel(()).0).subscribe()).collect())
    }

    /// `dep`'s range is let go: its sender, if anyone waits, to be dropped
    /// once the group lock is released.
    fn released(&mut self, dep: Dep) -> Option<watch::Sender<()>> {
        if self.0.is_empty() {
            return None;
        }
        self.0.remove(&dep)
    }
}

/// See [`RangeWaits::wait_for`].
#[must_use = "a write must wait for the ranges it overlaps"]
pub(super) struct RangesDone(Vec<watch::Receiver<()>>);

impl RangesDone {
    /// Nothing is ever sent on these channels: `changed` returns when the
    /// sender is dropped.
    async fn wait(self) {
        for mut d in self.0 {
            let _ = d.changed().await;
        }
    }
}

/// Armed while a write holds a journal sequence that is not in the journal
/// yet; dropped armed (an early return, a failed append), it stops the
/// group: see [`Group::fail_stop`].
struct HoleGuard<'a> {
    group: &'a Group,
    /// The sequence, while it is not journaled.
    seq: Option<u64>,
}

impl HoleGuard<'_> {
    fn disarm(&mut self) {
        self.seq = None;
    }
}

impl Drop for HoleGuard<'_> {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            self.group.fail_stop(format!("record {seq} could not be journaled"));
        }
    }
}

/// Counts a sync-mode journaled write in `Group::sync_writes` from before
/// its journal append until the write returns.
///
/// A lone sync write (no other sync write of its group between its journal
/// append and its return, as at queue depth 1) waits for the round trip to the
/// secondary and the secondary's append, not for its own volume write,
/// which runs meanwhile. So its record goes first: the write yields once
/// before it submits the volume write (on a virtual machine, submitting a
/// disk write costs an exit of some 20 µs, which would otherwise delay the
/// record), the shipper sends the record without waiting for other records,
/// and the QUIC driver sends it at once (`FramedSend::flush_now`), both
/// before the write resumes on the same worker thread. With other
/// writes in flight their records go out in batches instead (fewer stream
/// writes, packets and wake-ups), as in async mode.
type SyncWrite<'a> = Counted<'a>;

/// Counts itself in a counter from `begin` until it is dropped (also when
/// the write holding it is cancelled).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn begin(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Outcome of admission under the lock.
enum Admission<'a> {
    /// Sequenced (and journal space reserved if journaled).
    Admitted(Admitted<'a>),
    /// The journal is full and the write must wait for space (sync mode
    /// while replicating, or `on_journal_full = "block"`), then try again.
    WaitForSpace,
    /// Too many records are being appended ahead of the journaled run
    /// ([`MAX_APPEND_WINDOW`]): wait until records up to this one are in.
    WaitForAppends(u64),
    /// The activity log is at its budget: wait until writes through this
    /// sequence are durable on both sites (`activity.rs`), then try again.
    WaitForActivityLog(u64),
}

/// A sequenced write.
struct Admitted<'a> {
    guard: RangeGuard<'a>,
    deps: RangesDone,
    /// Journal sequence and position, and the journal, when journaled.
    journal: Option<(u64, u64, Arc<Journal>)>,
    generation: u64,
    /// Not journaled, and it dirtied a clean region: the bitmap save that
    /// must reach the disk before the volume write.
    bitmap_epoch: Option<u64>,
}

/// A sync write that the secondary, progressing, has not received after
/// this many `link_timeout`s suspends the pair all the same.
const SLOW_SECONDARY_WINDOWS: u32 = 4;

impl Group {
    fn volume_checked(&self, vol: u32) -> Result<&Arc<crate::volume::Volume>, WriteError> {
        self.volumes.get(vol as usize).ok_or_else(|| WriteError::Invalid(format!("no volume #{vol}")))
    }

    /// Registers a range with the sequencer (caller holds the lock).
    fn register<'a>(
        &'a self,
        g: &mut Inner,
        vol: u32,
        off: u64,
        len: u64,
        barrier: bool,
    ) -> (RangeGuard<'a>, RangesDone) {
        let (dep, deps) = if barrier {
            let (t, deps) = g.seq.begin_read_barrier(vol, off, len);
            (Dep::Ticket(t), deps)
        } else {
            let (id, deps) = g.seq.begin(vol, off, len);
            (Dep::Seq(id), deps)
        };
        let waits = g.awaited.wait_for(&deps);
        (RangeGuard { group: self, dep }, waits)
    }

    /// Takes a read barrier over a range: waits until earlier overlapping
    /// writes are done and holds later ones off until the guard drops. Used
    /// by the copy to read a consistent chunk. Returns the guard and the last
    /// journal sequence the chunk reflects.
    pub(super) async fn read_barrier(&self, vol: u32, off: u64, len: u64) -> (RangeGuard<'_>, u64) {
        let (guard, wait, last) = self.begin_read_barrier(vol, off, len);
        wait.await;
        (guard, last)
    }

    /// [`Group::read_barrier`] in two steps: the barrier is taken now, in
    /// order with the writes admitted so far (so barriers taken one after
    /// another reflect non-decreasing sequences); the returned future
    /// resolves once the earlier overlapping writes are done.
    pub(super) fn begin_read_barrier(
        &self,
        vol: u32,
        off: u64,
        len: u64,
    ) -> (RangeGuard<'_>, impl std::future::Future<Output = ()> + Send + 'static, u64) {
        let mut g = lock(&self.inner);
        let (guard, waits) = self.register(&mut g, vol, off, len, true);
        (guard, waits.wait(), g.last_jseq)
    }

    /// The largest write this group takes as one record (and advertises to
    /// NBD clients as its maximum block size; a longer one is split,
    /// `write_pieces`): even widened to whole blocks by a
    /// read-modify-write, its record fits the record limit and half of the
    /// journal ring, so the journal can always take it once the secondary
    /// has caught up.
    pub fn max_request(&self) -> u32 {
        let ring = self.smallest_journal.saturating_sub(JOURNAL_SUPERBLOCK_LEN);
        let by_journal = (ring / 2).saturating_sub(JOURNAL_RECORD_ALIGN);
        let widened = u64::from(MAX_RECORD_PAYLOAD).min(by_journal).saturating_sub(2 * IO_ALIGN as u64);
        let aligned = widened / IO_ALIGN as u64 * IO_ALIGN as u64;
        u32::try_from(aligned).unwrap_or(MAX_RECORD_PAYLOAD).max(IO_ALIGN as u32)
    }

    /// Replicating right now: a session is up and the pair is PAIR or COPY.
    pub(super) fn replicating(&self, g: &Inner) -> bool {
        self.progress.borrow().connected && matches!(g.state, PairState::Pair | PairState::Copy)
    }

    fn admit(&self, vol: u32, off: u64, len: u64, payload_len: u64) -> Result<Admission<'_>, WriteError> {
        if let Some(why) = self.stopped.get() {
            return Err(self.stopped_error(why));
        }
        let mut g = lock(&self.inner);
        let split_writable = g.persisted.role.split_writable();
        if g.role() == Role::Secondary && !split_writable {
            return Err(WriteError::ReadOnly(self.cfg.name.clone()));
        }
        if let Some(s) = g.persisted.role.as_secondary_mut().filter(|s| s.split_writable && !s.needs_rebase) {
            // The first write to a replica split with --rw: from now on the
            // primary must copy what it changed before the pair resumes.
            s.needs_rebase = true;
            g.write_barrier = self.save_later(&mut g);
        }
        if g.persisted.role.superseded_by() > 0 {
            return Err(WriteError::Superseded { group: self.cfg.name.clone(), peer: self.cfg.peer.clone() });
        }
        if g.state == PairState::SplitBrain && !self.serves_in_split_brain() {
            return Err(WriteError::Replication(format!(
                "group {}: SPLIT-BRAIN: with on_link_loss = \"block\", sync-mode writes are refused until an admin \
                 resolves it (see `replicator status {}`)",
                self.cfg.name, self.cfg.name
            )));
        }
        if g.switching {
            return Err(WriteError::SwitchingOver(self.cfg.name.clone()));
        }
        if g.swapped_away().is_some() {
            return Err(WriteError::SwappedAway { group: self.cfg.name.clone(), peer: self.cfg.peer.clone() });
        }
        if let Some(s) = g.persisted.role.as_simplex_mut().filter(|s| s.former_pair_id != 0 && !s.written_standalone) {
            // The first write after leaving a pair: remember it durably, so
            // a former primary that comes back learns the sites diverged.
            s.written_standalone = true;
            g.write_barrier = self.save_later(&mut g);
        }
        let mut journal = None;
        if g.persisted.role.as_primary().is_some_and(|p| !p.bitmap_mode) {
            let next = g.last_jseq + 1;
            let appended = g.ready.completed_through();
            if next > appended + MAX_APPEND_WINDOW {
                return Ok(Admission::WaitForAppends(next - MAX_APPEND_WINDOW));
            }
            if let Some(needed) = self.activity_log_room(&mut g, vol, off, len) {
                return Ok(Admission::WaitForActivityLog(needed));
            }
            let span = record_span(payload_len);
            let reserved = g.ring.as_mut().and_then(|r| r.reserve(next, span));
            match (reserved, g.journal.clone()) {
                (Some(pos), Some(j)) => {
                    g.journal_full_since = None;
                    g.last_jseq = next;
                    journal = Some((next, pos, j));
                }
                _ => {
                    let full = journal_space::Full {
                        sync_wait: self.sync_wait(&g),
                        policy: self.cfg.full_policy(),
                        full_for: g.journal_full_since.get_or_insert_with(Instant::now).elapsed(),
                    };
                    match journal_space::on_full(full) {
                        OnFull::Wait => return Ok(Admission::WaitForSpace),
                        OnFull::TrackInBitmap => self.enter_bitmap_mode(&mut g),
                    }
                }
            }
        }
        let mut bitmap_epoch = None;
        if g.role() == Role::Primary || split_writable {
            // Journaled: the region joins the activity log; not journaled
            // (bitmap mode): the dirty bitmap. Either way a region new to it
            // is on disk before the volume write (group commit).
            // (`bitmap_wanted` only moves under the group lock.)
            let next_save = *self.bitmap_wanted.borrow() + 1;
            let (newly_dirty, wait_for) = match &journal {
                Some((seq, ..)) => {
                    let now = self.clock_ms();
                    let t = g.activity.touch(vol, off, len, *seq, now, next_save);
                    (t.became_hot, t.wait_for)
                }
                None => {
                    // A chunk already dirty in memory may still wait for its
                    // save: wait for the newest save asked for.
                    let b = &mut g.bitmaps[vol as usize];
                    let gran = b.granularity();
                    let newly_dirty = (off / gran..(off + len).div_ceil(gran)).any(|c| !b.is_chunk_dirty(c));
                    b.set_range(off, len);
                    (newly_dirty, if newly_dirty { next_save } else { next_save - 1 })
                }
            };
            if newly_dirty {
                self.bitmap_wanted.send_modify(|w| *w = next_save);
            }
            if wait_for > *self.bitmap_persisted.borrow() {
                bitmap_epoch = Some(wait_for);
            }
        }
        if g.write_barrier > *self.bitmap_persisted.borrow() {
            bitmap_epoch = bitmap_epoch.max(Some(g.write_barrier));
        }
        let (guard, deps) = self.register(&mut g, vol, off, len, false);
        let generation = g.persisted.generation;
        if let Some((seq, pos, _)) = &journal {
            let (seq, pos) = (*seq, *pos);
            let span = record_span(payload_len);
            let cumulative = g.cumulative_bytes + span;
            g.cumulative_bytes = cumulative;
            g.entries.insert(
                seq,
                Entry { pos, span, cumulative, written_at_us: unix_micros(), record: None, journaled: false },
            );
        }
        Ok(Admission::Admitted(Admitted { guard, deps, journal, generation, bitmap_epoch }))
    }

    /// The journal is full: track writes in the dirty bitmap from now on.
    fn enter_bitmap_mode(&self, g: &mut Inner) {
        let Some(p) = g.persisted.role.as_primary_mut() else {
            return;
        };
        p.bitmap_mode = true;
        p.copy_pending = true;
        // Every later record follows writes the secondary lacks until the
        // resync: it must hear so before it applies one.
        let gap = p.resync_gap.map_or(g.last_jseq, |s| s.min(g.last_jseq));
        p.resync_gap = Some(gap);
        if p.resync_gap_at_us == 0 {
            p.resync_gap_at_us = unix_micros();
        }
        // Records journaled so far may be overwritten by writes the journal
        // never sees: a replay after a crash must not put them back. While
        // the chunks those writes dirty stay dirty, the bitmaps say where;
        // the resync arms the replay fence before it clears any
        // (`Group::copy_may_clear_chunks`).
        p.bitmap_fence = g.last_jseq;
        if let Some(session) = g.session.as_mut() {
            session.on_gap(gap);
        }
        g.journal_full_since = None;
        // Writes now go on without the secondary (saved below, before any
        // reaches a volume; a journaled write acknowledged alone meanwhile
        // waits for the same save, `record_lone_ack`).
        self.note_lone_acks(g);
        tracing::warn!(group = %self.cfg.name, "journal full: tracking writes in the dirty bitmap; a resync will copy them");
        if g.state == PairState::Pair {
            self.transition(g, PairEvent::JournalFull, "journal full");
        }
        // No write in bitmap mode reaches a volume before bitmap mode and
        // the resync gap are on disk.
        g.write_barrier = self.save_later(g);
    }

    /// Performs a client write. See the module documentation for the steps.
    pub async fn write(&self, vol: u32, offset: u64, kind: WriteKind, fua: bool) -> Result<(), WriteError> {
        let mut stages = Stages::start();
        let len = kind.len();
        let result = match kind {
            WriteKind::Zeroes(len) => self.write_zeroes(vol, offset, len, fua, &mut stages).await,
            WriteKind::Data(data) if data.len() as u64 > u64::from(self.max_request()) => {
                self.write_pieces(vol, offset, data, fua, &mut stages).await
            }
            kind => self.write_inner(vol, offset, kind, fua, &mut stages).await,
        };
        let took = stages.elapsed();
        // Refused before admission, it wrote nothing: a refusal (counted as
        // `client_refused`), not a write. One refused later (a sync write
        // whose node was fenced while it waited) was written here.
        if !(stages.is_empty() && result.as_ref().is_err_and(WriteError::is_refusal)) {
            self.latency.record(took);
        }
        let logged = (took >= SLOW_WRITE).then(|| self.slow_writes.on_write(took, self.clock_ms())).flatten();
        if let Some(unlogged) = logged {
            let volume = self.volumes.get(vol as usize).map_or("?", |v| v.name.as_str());
            let more = match unlogged {
                0 => String::new(),
                1 => "; 1 other slow write since the last such line".to_string(),
                n => format!("; {n} other slow writes since the last such line"),
            };
            tracing::warn!(
                group = %self.cfg.name,
                "slow write: {} ms for {len} bytes at {offset} of volume {volume}{}{} ({}){more}",
                took.as_millis(),
                if fua { " (FUA)" } else { "" },
                if result.is_err() { ", failed" } else { "" },
                stages.describe(took)
            );
        }
        result
    }

    /// Zeroes: a range that is not whole blocks goes as its partial first
    /// and last blocks (read-modify-written, a block each) and the whole
    /// blocks between (one record without payload), in that order, instead
    /// of one read-modify-write of the whole range, whose buffer, journal
    /// record and shipped payload would be as large as the range. NBD
    /// promises no atomicity for a request.
    async fn write_zeroes(
        &self,
        vol: u32,
        offset: u64,
        len: u64,
        fua: bool,
        stages: &mut Stages,
    ) -> Result<(), WriteError> {
        let a = IO_ALIGN as u64;
        let Some(end) = offset.checked_add(len) else {
            return self.write_inner(vol, offset, WriteKind::Zeroes(len), fua, stages).await;
        };
        let (first_whole, last_whole) = (offset.div_ceil(a) * a, end / a * a);
        if is_aligned(offset, len) || last_whole <= first_whole {
            return self.write_inner(vol, offset, WriteKind::Zeroes(len), fua, stages).await;
        }
        for (o, l) in
            [(offset, first_whole - offset), (first_whole, last_whole - first_whole), (last_whole, end - last_whole)]
        {
            if l > 0 {
                self.write_inner(vol, o, WriteKind::Zeroes(l), fua, stages).await?;
            }
        }
        Ok(())
    }

    /// A write longer than the group's maximum request (a small journal's,
    /// which a client that never asked for block sizes may exceed: the
    /// protocol lets it send 32 MiB) goes as pieces that each fit it, one
    /// after the other, each cut at a multiple of the maximum in the volume
    /// so that it widens to whole blocks within it; with FUA each piece is
    /// durable before the next starts. NBD promises no atomicity for a
    /// request; the pieces are copied out of the client's buffer (one
    /// memory copy, on this path only).
    async fn write_pieces(
        &self,
        vol: u32,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
        stages: &mut Stages,
    ) -> Result<(), WriteError> {
        let piece = u64::from(self.max_request());
        let size = self.volume_checked(vol)?.size();
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len).filter(|&end| end <= size) else {
            // Refused whole, before any piece is written.
            return Err(WriteError::OutOfRange { offset, len, size });
        };
        let mut at = offset;
        while at < end {
            let until = (at / piece + 1).saturating_mul(piece).min(end);
            let bytes = &data[(at - offset) as usize..(until - offset) as usize];
            self.write_inner(vol, at, WriteKind::Data(AlignedBuf::copy_from(bytes)), fua, stages).await?;
            at = until;
        }
        Ok(())
    }

    async fn write_inner(
        &self,
        vol: u32,
        offset: u64,
        kind: WriteKind,
        fua: bool,
        stages: &mut Stages,
    ) -> Result<(), WriteError> {
        let volume = self.volume_checked(vol)?.clone();
        let len = kind.len();
        let size = volume.size();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(WriteError::OutOfRange { offset, len, size });
        }
        // Trim is advisory: discard only whole blocks inside the range.
        let (a_off, a_len) = match &kind {
            WriteKind::Trim(_) => {
                let a = IO_ALIGN as u64;
                let start = offset.div_ceil(a) * a;
                let end = (offset + len) / a * a;
                if end <= start {
                    return Ok(());
                }
                (start, end - start)
            }
            _ => align_range(offset, len),
        };
        let rmw = !matches!(kind, WriteKind::Trim(_)) && !is_aligned(offset, len);
        let op = match (&kind, rmw) {
            (WriteKind::Data(_), _) | (WriteKind::Zeroes(_), true) => RecordOp::Write,
            (WriteKind::Zeroes(_), false) => RecordOp::WriteZeroes,
            (WriteKind::Trim(_), _) => RecordOp::Trim,
        };
        // Payload-carrying records are bounded by what the journal can
        // always hold (advertised to NBD clients as the maximum block size).
        let max = u64::from(self.max_request());
        if op == RecordOp::Write && len > max {
            return Err(WriteError::Invalid(format!(
                "a write of {len} bytes is larger than this group's {max}-byte maximum (advertised as the NBD maximum block size)"
            )));
        }
        if op != RecordOp::Write && a_len > u64::from(u32::MAX) {
            return Err(WriteError::Invalid("request too large".into()));
        }
        let payload_len = if op == RecordOp::Write { a_len } else { 0 };

        // Admission: journal space (or the block policy's wait), room in the
        // activity log, sequencing.
        let mut room = super::activity::RoomWait::default();
        let mut space_wait = CheckpointWatch::default();
        let admitted = loop {
            match self.admit(vol, a_off, a_len, payload_len)? {
                Admission::Admitted(a) => break a,
                Admission::WaitForSpace => {
                    self.note_space_wait(&mut space_wait);
                    // Woken when space is freed or the pair state changes; the
                    // timeout covers a wake-up that came before we listened.
                    let _ = tokio::time::timeout(Duration::from_millis(100), self.space_freed.notified()).await;
                }
                Admission::WaitForAppends(seq) => self.wait_journaled_through(seq).await?,
                Admission::WaitForActivityLog(seq) => self.wait_for_activity_log(seq, &mut room).await?,
            }
        };
        stages.mark("admission");
        let Admitted { guard, deps, journal, generation, bitmap_epoch } = admitted;
        // From here until the record is in the journal, any early return
        // leaves a hole no later record may pass: the guard stops the group.
        let mut hole = journal.as_ref().map(|(seq, ..)| HoleGuard { group: self, seq: Some(*seq) });
        deps.wait().await;
        stages.mark("earlier writes");
        if let Some(epoch) = bitmap_epoch {
            self.write_waits_for_save(epoch).await?;
            stages.mark("region save");
        }

        // Build the block-aligned buffer that goes to disk and on the wire,
        // shared from here on: the journal, the shipper and the volume write
        // all read this one buffer (a client's aligned write is the buffer
        // its payload was read into from the socket).
        let buf = match kind {
            WriteKind::Data(data) if !rmw => Some(data),
            WriteKind::Data(data) => {
                let mut blocks = volume.read(a_off, a_len).await?;
                let at = (offset - a_off) as usize;
                blocks[at..at + data.len()].copy_from_slice(&data);
                Some(blocks)
            }
            WriteKind::Zeroes(_) if rmw => {
                let mut blocks = volume.read(a_off, a_len).await?;
                let at = (offset - a_off) as usize;
                blocks[at..at + len as usize].fill(0);
                Some(blocks)
            }
            WriteKind::Zeroes(_) | WriteKind::Trim(_) => None,
        }
        .map(Bytes::from_owner);
        stages.mark("payload");

        // Write-ahead: the record reaches the journal before the volume, and
        // the volume write waits until every earlier record is journaled too.
        // After a crash the journal therefore covers every volume write that
        // may have happened, and replaying it (see `Group::open`) makes the
        // primary's volumes equal to what the secondary will receive.
        let mut shipped_seq = None;
        let mut journal_file = None;
        // Counted before the shipper learns of the record.
        let sync_write =
            (self.cfg.mode == Mode::Sync && journal.is_some()).then(|| SyncWrite::begin(&self.sync_writes));
        if let Some((seq, pos, j)) = journal {
            let mut record = match &buf {
                Some(b) => Record::with_payload(op, seq, vol, a_off, generation, b.clone(), fua),
                None => Record::without_payload(op, seq, vol, a_off, a_len as u32, generation, fua),
            };
            record.written_at_us = unix_micros();
            // A failed append returns with the hole guard armed.
            j.append(pos, &record).await?;
            stages.mark("journal append");
            if self.writeback_hint.on_write(self.clock_ms(), fua) {
                // A flush is likely to follow: let the disk have the
                // record's pages while the volume write runs.
                j.start_writeback(pos, record_span(payload_len));
            }
            journal_file = Some(j);
            self.journaled(seq, record);
            if let Some(mut h) = hole.take() {
                h.disarm();
            }
            self.wait_journaled_through(seq).await?;
            stages.mark("earlier appends");
            shipped_seq = Some(seq);
            if sync_write.is_some() && self.lone_sync_write() && self.progress.borrow().sync_wait {
                // The record leaves before the volume write is submitted.
                tokio::task::yield_now().await;
            }
        }
        // FUA: a journaled write is durable once the journal is, where a
        // replay after a power cut would put it back on the volume (see
        // [`Group::flush`]); otherwise its data goes to the volume with
        // RWF_DSYNC, durable when it completes.
        let journal_may_do = fua && shipped_seq.is_some() && Self::journal_covers_flush(&lock(&self.inner));
        let volume_fua = fua && !journal_may_do;
        let volume_durable = volume_fua && buf.is_some();
        let local_res = match buf {
            Some(b) => volume.write(a_off, b, volume_fua).await,
            None if op == RecordOp::Trim => volume.discard(a_off, a_len).await,
            None => volume.write_zeroes(a_off, a_len).await,
        };
        stages.mark("volume write");
        if let Err(e) = &local_res {
            // The record is journaled (and may be shipped) but the volume
            // did not take it: stop; a restart replays the journal onto it.
            // Before its range is let go: a copy read of it waiting behind
            // this write sees the stop and is not sent (it lacks the record;
            // `CopyReads::finish`).
            self.fail_stop(format!("local write of record {shipped_seq:?} failed: {e}"));
        }
        if shipped_seq.is_none() && local_res.is_ok() {
            // Counted before its range is let go: a copy read waiting for it
            // finds it unsynced (`CopyReads::start`).
            lock(&self.inner).unjournaled_written += 1;
        }
        drop(guard);
        // Only what the volume took counts as written: a volume sync after a
        // failed write must not cover it, or journal space could be freed
        // past a record the volume lacks (the restart replays it from there).
        if let (Some(seq), true) = (shipped_seq, local_res.is_ok()) {
            self.volume_written(seq);
        }
        local_res?;

        if fua {
            self.writeback_hint.on_flush(self.clock_ms());
            // Checked again now that the volume write is done (see
            // `journal_only_flushes`).
            let journal_only = journal_may_do && Self::journal_only_durability(&mut lock(&self.inner));
            self.sync_local(vol, !journal_only && !volume_durable, journal_file).await?;
            stages.mark("sync");
        }
        if let Some(seq) = shipped_seq {
            if self.cfg.mode == Mode::Sync {
                self.wait_secondary(seq, fua).await?;
                stages.mark("secondary");
            }
        }
        Ok(())
    }

    /// A write waits for metadata save `epoch` (its region's, or that
    /// writes go on without the secondary). A failing save is retried
    /// meanwhile; saves that keep failing while writes wait stop the group
    /// (counted here for the flusher), and a stopped group may never save
    /// (its volume sync failed): the write fails then, before it is
    /// acknowledged.
    pub(super) async fn write_waits_for_save(&self, epoch: u64) -> Result<(), WriteError> {
        let mut rx = self.bitmap_persisted.subscribe();
        let waiting = Counted::begin(&self.writes_awaiting_save);
        let saved = rx.wait_for(|p| *p >= epoch || self.stopped.get().is_some()).await.map(|p| *p >= epoch);
        drop(waiting);
        match (saved, self.stopped.get()) {
            (Ok(true), _) => Ok(()),
            (Ok(false), Some(why)) => Err(self.stopped_error(why)),
            _ => Err(WriteError::Replication("the group's metadata could not be persisted".into())),
        }
    }

    /// True in sync mode while exactly one write is between its journal
    /// append and its return (see [`SyncWrite`]).
    pub(super) fn lone_sync_write(&self) -> bool {
        self.cfg.mode == Mode::Sync && self.sync_writes.load(Ordering::Relaxed) == 1
    }

    /// Record `seq` is in the journal: hand it to the shipper and let later
    /// volume writes proceed.
    fn journaled(&self, seq: u64, record: Record) {
        let mut g = lock(&self.inner);
        let bytes = record.payload.len() as u64;
        if let Some(e) = g.entries.get_mut(&seq) {
            e.record = Some(record);
            e.journaled = true;
            g.cached_bytes += bytes;
        }
        g.ready.complete(seq);
        let through = g.ready.completed_through();
        // Keep memory bounded: drop payloads of the oldest journaled records
        // (a backlog while the secondary is away can be the whole journal);
        // the shipper reads them back from the journal when it gets there.
        if g.cached_bytes > CACHE_BUDGET {
            let mut excess = g.cached_bytes - (CACHE_BUDGET - CACHE_DROP);
            let mut freed = 0;
            for e in g.entries.values_mut() {
                if excess == 0 {
                    break;
                }
                if e.journaled {
                    if let Some(r) = e.record.take() {
                        let n = r.payload.len() as u64;
                        freed += n;
                        excess = excess.saturating_sub(n);
                    }
                }
            }
            g.cached_bytes = g.cached_bytes.saturating_sub(freed);
        }
        drop(g);
        // Receivers exist only while a write waits (`wait_journaled_through`):
        // without one, notifying (a lock per slot of tokio's notifier) is
        // skipped. The count is read under the channel's write lock; a new
        // receiver counts itself before its first look at the value, under
        // the read lock: it sees the new value, or is counted here and woken.
        self.journaled_through.send_if_modified(|t| {
            let advanced = through > *t;
            *t = (*t).max(through);
            advanced && self.journaled_through.receiver_count() > 0
        });
        self.records_ready.notify_one();
    }

    pub(super) async fn wait_journaled_through(&self, seq: u64) -> Result<(), WriteError> {
        // Usually every earlier record is already in the journal: no need to
        // subscribe (and be woken by every later journal append).
        if *self.journaled_through.borrow() < seq {
            let mut rx = self.journaled_through.subscribe();
            let _ = rx.wait_for(|t| *t >= seq || self.stopped.get().is_some()).await;
        }
        match self.stopped.get() {
            Some(why) if *self.journaled_through.borrow() < seq => Err(self.stopped_error(why)),
            _ => Ok(()),
        }
    }

    /// A write failed between taking its journal sequence and reaching the
    /// journal, or its volume write failed: no later record may pass that
    /// point, so the group stops taking writes (fail-stop, SUSPENDED(error))
    /// until the daemon restarts, recovers the journal and replays it.
    pub(super) fn fail_stop(&self, why: String) {
        if self.stopped.set(why.clone()).is_ok() {
            self.record_error(&format!(
                "{why}: this group stopped taking writes (and copying; records it journaled still ship); fix the disk and restart the daemon (the journal is recovered and replayed)"
            ));
            let mut g = lock(&self.inner);
            self.transition(&mut g, PairEvent::Failure, &why);
            drop(g);
            // Wake writes waiting for earlier records or for a save: they
            // fail now. (The session goes on shipping journaled records;
            // the copy stops, see `CopyReads::start`.)
            self.journaled_through.send_modify(|_| {});
            self.bitmap_persisted.send_modify(|_| {});
        }
    }

    fn stopped_error(&self, why: &str) -> WriteError {
        WriteError::Replication(format!(
            "group {} stopped taking writes after a local failure ({why}); restart the daemon once the disk is fixed",
            self.cfg.name
        ))
    }

    /// The volume write of record `seq` finished (or will never happen).
    fn volume_written(&self, seq: u64) {
        let room_waits = {
            let mut g = lock(&self.inner);
            g.volume_written.complete(seq);
            g.activity_waiters > 0
        };
        if room_waits {
            self.activity_room.notify_waiters();
        }
    }

    /// FUA: fdatasync of the volume and/or the journal, concurrently.
    async fn sync_local(&self, vol: u32, sync_volume: bool, journal: Option<Arc<Journal>>) -> Result<(), WriteError> {
        let volume = self.volume_checked(vol)?.clone();
        let (a, b) = tokio::join!(
            async {
                match sync_volume {
                    true => volume.sync().await,
                    false => Ok(()),
                }
            },
            async {
                match journal {
                    Some(j) => j.sync().await,
                    None => Ok(()),
                }
            }
        );
        a.map_err(WriteError::from).and(b.map_err(WriteError::from)).map_err(|e| self.sync_failed(e))
    }

    /// A sync of a volume or the journal failed: what it was to make
    /// durable may be lost, and no later sync can prove otherwise (see
    /// [`crate::io::BlockFile::sync_data`]), so the group stops.
    fn sync_failed(&self, e: WriteError) -> WriteError {
        self.stop_after_failed_sync(&e.to_string());
        e
    }

    /// Fail-stop after a failed sync (either role), recorded so that the
    /// next start treats the stop as a power cut.
    pub(super) fn stop_after_failed_sync(&self, error: &str) {
        {
            let mut g = lock(&self.inner);
            if !g.persisted.sync_failed {
                g.persisted.sync_failed = true;
                self.save_later(&mut g);
            }
        }
        self.fail_stop(format!("a sync failed: {error}"));
    }

    /// Sync mode: waits until the secondary has written `seq` into its
    /// restore journal (`durable`: made it durable there), or until
    /// replication no longer requires waiting.
    ///
    /// A secondary that makes progress for `link_timeout` without reaching
    /// `seq` is slow, not gone (a write waits behind others on a slow
    /// link): one that makes none, or that has not reached `seq` after
    /// [`SLOW_SECONDARY_WINDOWS`] times `link_timeout`, suspends the pair
    /// (`ack_timeout`, per `on_link_loss`).
    async fn wait_secondary(&self, seq: u64, durable: bool) -> Result<(), WriteError> {
        let mut rx = self.progress.subscribe();
        if !rx.borrow().sync_wait {
            self.check_catch_up_stall();
        }
        let moved = |p: &Progress| if durable { p.durable } else { p.received };
        let mut seen = moved(&rx.borrow());
        let mut windows = 0;
        loop {
            let waited = tokio::time::timeout(self.cfg.link_timeout, rx.wait_for(|p| !p.sync_wait || moved(p) >= seq))
                .await
                .map(|r| r.map(|p| (moved(&p) >= seq, p.rpo_zero)));
            let (reached, rpo_zero) = match waited {
                Ok(Ok(got)) => got,
                Ok(Err(_)) => return Err(WriteError::Replication("group is shutting down".into())),
                Err(_) => {
                    let now = moved(&self.progress.borrow());
                    windows += 1;
                    if now == seen || windows >= SLOW_SECONDARY_WINDOWS {
                        self.ack_timeout();
                    }
                    seen = now;
                    continue;
                }
            };
            if reached && rpo_zero {
                return Ok(());
            }
            if !reached {
                self.stopped_waiting()?;
            }
            // Acknowledged without the secondary, or while what it received
            // may still be lost to a failover (a copy or catch-up runs).
            return self.record_lone_ack().await;
        }
    }

    /// A write waits for journal space. In sync mode that is back-pressure
    /// from a secondary that frees the space as its checkpoint moves; one
    /// whose checkpoint does not move for `link_timeout` counts as not
    /// acknowledging (the pair suspends, per `on_link_loss`), as it does for
    /// a write waiting for the secondary or for room in the activity log.
    /// (Otherwise the policy's own timeout bounds the wait: `on_full`.)
    fn note_space_wait(&self, watch: &mut CheckpointWatch) {
        let (checkpoint, sync_wait) = {
            let p = self.progress.borrow();
            (p.checkpoint, p.sync_wait)
        };
        // A secondary with everything checkpointed waits for nothing: the
        // space waits for this node's own volume writes or sync.
        if !sync_wait || checkpoint >= lock(&self.inner).last_jseq {
            watch.reset();
        } else if watch.stalled(checkpoint, self.cfg.link_timeout) {
            self.ack_timeout();
        }
    }

    /// Sync mode, catching up after writes were acknowledged without the
    /// secondary: one that has received nothing for `link_timeout` is not
    /// caught up with but waited for (and is a lost link after
    /// `link_timeout` more without progress).
    fn check_catch_up_stall(&self) {
        let mut g = lock(&self.inner);
        let timeout_ms = u64::try_from(self.cfg.link_timeout.as_millis()).unwrap_or(u64::MAX);
        let last = g.last_jseq;
        if g.catch_up.on_stall(last, self.clock_ms(), timeout_ms) {
            tracing::warn!(group = %self.cfg.name, "sync mode: the secondary received nothing for link_timeout while \
                catching up; writes wait for it again");
            self.publish(&mut g);
        }
    }

    /// A sync write stopped waiting for the secondary before it had the
    /// record: fine where the write stays tracked for a resync that this
    /// node will run (a link lost under `on_link_loss = "suspend"`, an admin
    /// split, a full journal, a split brain whose resync keeps this site's
    /// data: [`Self::serves_in_split_brain`]) or where there is no replica
    /// any more (`pair delete` made the volumes standalone: the write is on
    /// them, and the save of that role syncs them first), an error where the
    /// write will not reach the replica as written: this node was superseded
    /// by a failover (its writes since are discarded at failback), became a
    /// secondary, found a split brain under `on_link_loss = "block"`, or
    /// stopped after a local failure.
    fn stopped_waiting(&self) -> Result<(), WriteError> {
        if let Some(why) = self.stopped.get() {
            return Err(self.stopped_error(why));
        }
        let g = lock(&self.inner);
        if g.persisted.role.superseded_by() > 0 {
            return Err(WriteError::Superseded { group: self.cfg.name.clone(), peer: self.cfg.peer.clone() });
        }
        if g.role() == Role::Secondary || (g.state == PairState::SplitBrain && !self.serves_in_split_brain()) {
            return Err(WriteError::Replication(format!(
                "group {}: the write could not be replicated: this node is {} ({}) now",
                self.cfg.name,
                g.role(),
                g.state
            )));
        }
        Ok(())
    }

    /// A primary in SPLIT-BRAIN that is not fenced (the new primary of a
    /// failover, or a former primary whose peer left the pair and was
    /// written) keeps taking writes, acknowledged locally and tracked like
    /// any write while suspended: which site's data is kept is the admin's
    /// choice, and the resync (or the new pair's copy) carries them if it is
    /// this one's. Not a sync
    /// primary under `on_link_loss = "block"`: it acknowledges no write the
    /// secondary lacks, and the pair does not come back by itself, so its
    /// writes are refused before they are written.
    fn serves_in_split_brain(&self) -> bool {
        self.cfg.mode == Mode::Async || self.cfg.on_link_loss == LinkLossPolicy::Suspend
    }

    /// FLUSH: every earlier acknowledged write durable locally and, in sync
    /// mode while replicating, on the secondary.
    ///
    /// Locally, the journal is a redo log: every write acknowledged since
    /// the volumes were last synced is in it (while no write went to the
    /// volumes without a record), and after a power cut the primary replays
    /// it onto the volumes before anything reads them (`Group::open`). So a
    /// FLUSH makes only the journal durable, one fdatasync and one device
    /// flush instead of two, where [`Group::journal_covers_flush`] allows.
    /// The volumes are synced before journal space is freed
    /// (`release_journal`) and before a metadata save after which a replay
    /// would skip records or not run at all (dirty bitmap chunks, a role
    /// without this journal: `metadata_flusher`).
    pub async fn flush(&self) -> Result<(), WriteError> {
        self.writeback_hint.on_flush(self.clock_ms());
        let (target, journal, appended) = {
            let mut g = lock(&self.inner);
            let target = if g.role() == Role::Primary && self.cfg.mode == Mode::Sync {
                let t = g.last_jseq;
                g.flush_wanted = g.flush_wanted.max(t);
                Some(t)
            } else {
                None
            };
            let journal = g.journal.clone().filter(|_| Self::journal_only_durability(&mut g));
            (target, journal, g.ready.completed_through())
        };
        if target.is_some() {
            self.ship_wake.notify_one();
        }
        match journal {
            Some(j) => {
                self.sync_journal(&j).await?;
                // Every record appended when it began is durable in the
                // journal (for the activity log: `Inner::replay_safe`).
                let mut g = lock(&self.inner);
                g.journal_durable = g.journal_durable.max(appended);
            }
            None => self.sync_all().await?,
        }
        if let Some(t) = target {
            if t > 0 {
                self.wait_secondary(t, true).await?;
            }
        }
        Ok(())
    }

    /// fdatasync of every volume and the journal, concurrently. Every write
    /// whose volume write had finished when it started is then durable
    /// here (the activity log retires regions on that).
    pub async fn sync_all(&self) -> Result<(), WriteError> {
        if let Some(why) = self.stopped.get() {
            return Err(self.stopped_error(why));
        }
        self.sync_volumes(true).await
    }

    /// fdatasync of every volume, and of the journal too with
    /// `with_journal`, concurrently, even after the group stopped taking
    /// writes; [`Group::sync_all`] without the journal is what freeing
    /// journal space and the metadata saves wait for (every write a FLUSH
    /// made durable in the journal alone then is on the volumes).
    pub(super) async fn sync_volumes(&self, with_journal: bool) -> Result<(), WriteError> {
        let (covered, unjournaled, journal_only) = {
            let g = lock(&self.inner);
            (g.volume_written.completed_through(), g.unjournaled_written, g.journal_only_flushes)
        };
        let journal = if with_journal { self.journal_handle() } else { None };
        let journal_sync = async {
            match &journal {
                Some(j) => j.sync().await.map_err(WriteError::from),
                None => Ok(()),
            }
        };
        // In this task, concurrently; every sync finishes before the answer.
        let (volumes, journal) = tokio::join!(
            futures_util::future::join_all(self.volumes.iter().map(|v| async move { v.sync().await })),
            journal_sync
        );
        let result = volumes.into_iter().try_for_each(|r| r.map_err(WriteError::from)).and(journal);
        if result.is_ok() {
            let mut g = lock(&self.inner);
            g.local_durable = g.local_durable.max(covered);
            if with_journal {
                // Each record through `covered` was appended before its
                // volume write began.
                g.journal_durable = g.journal_durable.max(covered);
            }
            g.unjournaled_durable = g.unjournaled_durable.max(unjournaled);
            // Each of those FLUSHes covered writes acknowledged before it
            // started: their volume writes had finished before this sync.
            g.journal_only_synced = g.journal_only_synced.max(journal_only);
        }
        result.map_err(|e| self.sync_failed(e))
    }

    /// Whether the volumes may hold finished writes that no journal record
    /// covers and no volume sync made durable yet.
    pub(super) fn unjournaled_unsynced(&self) -> bool {
        let g = lock(&self.inner);
        g.unjournaled_written > g.unjournaled_durable
    }

    /// Whether a copy is due while the volumes may hold writes that no
    /// journal record covers and no volume sync made durable yet.
    pub(super) fn copy_source_unsynced(&self) -> bool {
        let g = lock(&self.inner);
        g.unjournaled_written > g.unjournaled_durable
            && g.persisted.role.as_primary().is_some_and(|p| p.copy_pending && !p.bitmap_mode)
    }

    /// Whether a FLUSH may make only the journal durable: this node is the
    /// primary, every acknowledged write the volumes may not hold durably
    /// has a record in the journal, and a replay after a power cut would
    /// put every such record back (`plan_replay` skips none: no dirty chunk
    /// in the bitmaps, in memory or on disk, and every record up to the
    /// replay fence is durable on the volumes).
    fn journal_covers_flush(g: &Inner) -> bool {
        g.persisted.role.as_primary().is_some_and(|p| g.local_durable >= p.replay_fence)
            && g.unjournaled_written == g.unjournaled_durable
            && g.saved_bitmaps_clean
            && g.bitmaps.iter().all(|b| b.dirty_bytes() == 0)
    }

    /// Under the group lock, by a FLUSH or a FUA write whose writes to
    /// cover have all reached the volumes: whether it may make only the
    /// journal durable (then counted in `journal_only_flushes`).
    fn journal_only_durability(g: &mut Inner) -> bool {
        let yes = Self::journal_covers_flush(g);
        if yes {
            g.journal_only_flushes += 1;
        }
        yes
    }

    /// fdatasync of the journal alone (a FLUSH while it covers every write
    /// the volumes may not hold durably).
    async fn sync_journal(&self, journal: &Journal) -> Result<(), WriteError> {
        if let Some(why) = self.stopped.get() {
            return Err(self.stopped_error(why));
        }
        journal.sync().await.map_err(|e| self.sync_failed(e.into()))
    }

    /// Reads for NBD (any role).
    pub async fn read(&self, vol: u32, offset: u64, len: u64) -> Result<AlignedBuf, WriteError> {
        let volume = self.volume_checked(vol)?;
        let size = volume.size();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(WriteError::OutOfRange { offset, len, size });
        }
        Ok(volume.read(offset, len).await?)
    }

    /// May clients write the volumes (NBD exports them read-only if not)?
    /// Not on the secondary, unless it is split with `--rw`, nor on a
    /// primary fenced by a failover (until failback or a resync). A
    /// replication error never takes writes away from the primary's
    /// applications: the journal (or the dirty bitmap) keeps tracking them.
    pub fn writable(&self) -> bool {
        lock(&self.inner).role_writable()
    }

    /// A role change is under way here (a switchover, a failover, giving
    /// the primary role to the peer, also the wait for NBD clients to
    /// detach after its `pair resync --swap`): no new NBD client may attach, its
    /// volumes may be about to be overwritten (checked again with the client
    /// counted, as for [`Self::attachable`]).
    pub fn changing_role(&self) -> bool {
        let g = lock(&self.inner);
        g.switching || g.taking_over || g.swapped_away().is_some()
    }

    /// May NBD clients attach the volumes? Where they are writable, and on a
    /// replica split by an admin (read-only: nothing replicates into it
    /// until `pair resync`, which waits until they detach).
    pub fn attachable(&self) -> bool {
        let g = lock(&self.inner);
        g.role() != Role::Secondary || g.persisted.role.split_writable() || g.split()
    }
}

/// Wall-clock time in microseconds since the Unix epoch (0 if the clock is
/// before it).
pub(super) fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use replicator_protocol::sequencer::Ticket;

    use super::*;

    fn ready(f: std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())) == Poll::Ready(())
    }

    #[test]
    fn a_range_wait_ends_when_every_awaited_range_is_let_go() {
        let mut waits = RangeWaits::default();
        let (a, b) = (Dep::Seq(1), Dep::Ticket(Ticket(1)));
        let mut both = pin!(waits.wait_for(&[a, b]).wait());
        let mut only_a = pin!(waits.wait_for(&[a]).wait());
        assert!(!ready(both.as_mut()) && !ready(only_a.as_mut()));
        // A range nobody waits for changes nothing.
        assert!(waits.released(Dep::Seq(2)).is_none());
        drop(waits.released(a));
        assert!(ready(only_a.as_mut()), "a waiter of the released range is woken");
        assert!(!ready(both.as_mut()), "a waiter of two ranges still waits for the read barrier");
        drop(waits.released(b));
        assert!(ready(both.as_mut()));
        assert!(waits.0.is_empty());
    }

    #[test]
    fn a_write_overlapping_nothing_makes_no_channel() {
        let mut waits = RangeWaits::default();
        let mut none = pin!(waits.wait_for(&[]).wait());
        assert!(ready(none.as_mut()));
        assert!(waits.0.is_empty() && waits.released(Dep::Seq(1)).is_none());
    }
}
