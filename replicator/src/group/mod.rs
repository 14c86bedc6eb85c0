//! A consistency group: one sequence, one journal, one pair state, for all
//! of its volumes. This is where the write path lives.
//!
//! Reading order for a newcomer:
//! 1. [`Group::write`] (in `write_path.rs`): the primary write path — range
//!    sequencing, journal reservation, record, local write, replication, ack.
//! 2. `task.rs`: the group's one task, which runs everything below.
//! 3. `shipper.rs`: the primary's replication session (records, copy, acks).
//! 4. `applier.rs`: the secondary's side of that session.
//!
//! `takeover.rs` holds switchover and failover; `verify.rs` the online
//! comparison of the two sites (`replicator verify`).
//!
//! Concurrency: the NBD connections (writes) and the control socket
//! (commands) run in their own tasks; everything the group does by itself
//! runs in its one task (`task.rs`). One `std::sync::Mutex` guards the
//! group's bookkeeping ([`Inner`]); it is held only for short, non-blocking
//! sections and never across an `.await`, and no file is written under it.
//! Progress that waiters care about (peer acks, state changes) is published
//! through a `watch` channel.

mod activity;
mod applier;
mod drill;
pub mod layout;
mod lifecycle;
mod pacing;
mod pair_query;
mod preserved;
mod resync_guard;
mod shipper;
mod slow_write;
mod takeover;
mod task;
mod verify;
mod write_path;
mod writeback_hint;

use std::collections::{hash_map, BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use replicator_protocol::activity_log::{ActivityLog, DEFAULT_EXTENT};
use replicator_protocol::bitmap::{plan_replay, DirtyBitmap, DEFAULT_GRANULARITY};
use replicator_protocol::catch_up::SyncCatchUp;
use replicator_protocol::journal_format::{JournalRing, JOURNAL_SUPERBLOCK_LEN};
use replicator_protocol::lifecycle::{on_refusal, Answer};
use replicator_protocol::pair::{PairEvent, PairState, Role, SuspendReason};
use replicator_protocol::pb;
use replicator_protocol::primary::PrimarySession;
use replicator_protocol::record::Record;
use replicator_protocol::seqtrack::SeqTracker;
use replicator_protocol::sequencer::RangeSequencer;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::{GroupConfig, LinkLossPolicy, Mode};
use crate::io::IoEngine;
use crate::journal::{Journal, JournalError, Stop};
use crate::state::{
    Announce, Blob, GroupState, PrimaryState, RoleState, SecondaryState, SimplexState, StateError, StateFile,
};
use crate::transport::Transport;
use crate::volume::Volume;

pub use drill::{
    export_name as drill_export_name, DrillExport, DrillMeta, DrillOutcome, DrillRecord, DrillStatus,
    DEFAULT_DRILL_CHUNK,
};
pub use pacing::Pacing;
pub use resync_guard::FailoverImage;
pub(crate) use takeover::format_time;
pub use task::IncomingSession;
pub use verify::serve_verify;
use write_path::{unix_micros, RangeWaits};
pub use write_path::{WriteError, WriteKind};

/// Group-level errors surfaced to the control socket and logs.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// Persisted state problem.
    #[error(transparent)]
    State(#[from] StateError),
    /// Journal problem.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The command is not possible in the current state.
    #[error("{0}")]
    Refused(String),
    /// Replaying the journal onto the local volumes failed.
    #[error("journal replay: {0}")]
    Replay(String),
    /// The command could not be carried out (nothing changed).
    #[error("{0}")]
    Failed(String),
    /// `verify` lost its session or stream to the peer (nothing changed).
    #[error("{0}")]
    Lost(String),
}

/// What sync-mode waiters and the status view watch.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The secondary has every record through here in its restore journal
    /// (written there: a sync-mode write waits for this).
    pub received: u64,
    /// ... and written it to its volumes.
    pub applied: u64,
    /// ... and made it durable (in its restore journal).
    pub durable: u64,
    /// ... and persisted that it resumes after here.
    pub checkpoint: u64,
    /// A replication session is up.
    pub connected: bool,
    /// Sync-mode writes must wait for the secondary (replication active, or
    /// suspended with `on_link_loss = "block"`).
    pub sync_wait: bool,
    /// ... and what the secondary receives is on a consistent replica that
    /// holds every write acknowledged before (RPO 0 in force): not during a
    /// copy or a catch-up, where a write it received may still be lost to
    /// a failover (a resync's rollback).
    pub rpo_zero: bool,
    /// Bumped on every state change.
    pub epoch: u64,
}

/// Metadata of a journaled record, kept until its space is freed.
#[derive(Debug)]
struct Entry {
    pos: u64,
    span: u64,
    /// Bytes journaled up to and including this record (for lag in bytes).
    cumulative: u64,
    /// When the client's write was taken (microseconds since the epoch; for
    /// records recovered at start, from their headers).
    written_at_us: u64,
    /// The record, while it is held in memory (None once evicted; then it is
    /// read back from the journal file).
    record: Option<Record>,
    journaled: bool,
}

/// Bookkeeping under the group lock.
#[derive(Debug)]
struct Inner {
    /// What `state.json` holds, this node's role with it (`state` is
    /// copied in with every save).
    persisted: GroupState,
    state: PairState,
    seq: RangeSequencer,
    /// Who waits for an in-flight range to be let go.
    awaited: RangeWaits,
    /// Journal ring (primary only).
    ring: Option<JournalRing>,
    journal: Option<Arc<Journal>>,
    /// Last journal sequence assigned.
    last_jseq: u64,
    /// Records in the journal (shippable), contiguous prefix.
    ready: SeqTracker,
    /// Records whose volume write finished, contiguous prefix: journal space
    /// is never freed above it.
    volume_written: SeqTracker,
    entries: BTreeMap<u64, Entry>,
    cached_bytes: u64,
    cumulative_bytes: u64,
    /// Dirty regions per volume (primary).
    bitmaps: Vec<DirtyBitmap>,
    /// Regions that may hold writes not yet durable on both sites
    /// (primary); saved with the bitmaps, before the first write to a
    /// region reaches the volume.
    activity: ActivityLog,
    /// Writes waiting for room in the activity log (`activity.rs`): while
    /// any does, each volume write that finishes wakes them.
    activity_waiters: usize,
    /// Every write up to here is durable on this node's volumes. Journal
    /// space is freed only below it: a FLUSH may have made a record
    /// durable in the journal alone (see [`Group::flush`]).
    local_durable: u64,
    /// Every record up to here is durable in the journal, or freed from it
    /// (a replay starts after it). Below both this and `local_durable`, no
    /// replay after a power cut can put an older write back over a newer
    /// one: the activity log may let a region go only there
    /// ([`Inner::replay_safe`]).
    journal_durable: u64,
    /// Writes that reached the volumes with no journal record (the group
    /// not paired, bitmap mode, a replica split with `--rw`), counted as
    /// they finish, and how many of them the last volume sync covered.
    /// While the two are equal, every acknowledged write the volumes may
    /// not hold durably is in the journal.
    unjournaled_written: u64,
    unjournaled_durable: u64,
    /// FLUSHes that made only the journal durable (see [`Group::flush`]),
    /// and how many of them the last volume sync covered. While some are
    /// not covered, the journal may hold the only durable copy of flushed
    /// writes: a metadata save that would stop a replay from putting them
    /// back (dirty bitmaps, a role without this journal) syncs the volumes
    /// first.
    journal_only_flushes: u64,
    journal_only_synced: u64,
    /// Every bitmap saved or being saved is clean: a replay after a power
    /// cut skips no record (`plan_replay`).
    saved_bitmaps_clean: bool,
    /// When housekeeping last synced the volumes so the activity log can
    /// retire regions.
    last_durability_sync: Instant,
    bitmap_dirty_since_save: bool,
    /// Bumped for every snapshot of `persisted` taken for writing.
    state_version: u64,
    /// `persisted` changed since the last metadata save was asked for: the
    /// next save writes `state.json` too (see [`Group::save_later`]).
    state_dirty: bool,
    /// No write may reach the volumes before this metadata save is on disk:
    /// a state change it depends on (bitmap mode, the first write while
    /// split or after the pair was left).
    write_barrier: u64,
    /// No copy chunk may be handed out before this metadata save is on
    /// disk: the replay fence it arms (see [`Group::copy_may_clear_chunks`]).
    copy_barrier: u64,
    /// Highest sequence asked of the secondary to make durable at once: by
    /// a sync-mode FLUSH, a switchover, or writes waiting for room in the
    /// activity log.
    flush_wanted: u64,
    /// When the journal was first found full (block policy).
    journal_full_since: Option<Instant>,
    /// When journal space was last freed (`release_journal`).
    journal_released_at: Instant,
    /// The primary's replication session state machine, while a session
    /// is up (stream order, acks, copy chunks in flight).
    session: Option<PrimarySession>,
    /// Identifies the current session task (see `shipper::spawn`).
    shipper_epoch: u64,
    link_down_since: Option<Instant>,
    /// Last link-down reason (primary) or session refusal (secondary)
    /// logged, and when: repeats are logged once a minute.
    last_link_log: Option<(String, Instant)>,
    last_error: Option<String>,
    /// Copy progress for status: bytes to compare or copy, done, and sent
    /// as data (regions that differed).
    copy_total: u64,
    copy_done: u64,
    copy_sent: u64,
    /// The peer's last refusal of a session that retrying cannot fix by
    /// itself (kind, for status), cleared by the next session that starts.
    refusal: Option<&'static str>,
    /// That refusal said the peer left the pair (`pair delete`) and was
    /// written standalone: a split brain with no pair to resync into
    /// (`failback` and `--discard-local` name the way out instead).
    peer_left_written: bool,
    /// Primary, during `pair delete`: told when the secondary confirms.
    delete_ack: Option<oneshot::Sender<Result<(), String>>>,
    /// The kernel boot this daemon runs in (recorded with every save).
    boot_id: String,
    /// The metadata save that recorded `acked_all_on_peer = false`: a sync
    /// write acknowledged without the secondary waits for it
    /// ([`Group::record_lone_ack`]).
    lone_ack_save: u64,
    /// Primary, during `switchover`: new writes are refused.
    switching: bool,
    /// Primary: why a switchover the secondary asked for did not go ahead,
    /// for the session (of this shipper epoch) to send back.
    switchover_answer: Option<(u64, pb::CommandReply)>,
    /// Secondary, during `failover`: no new replication session.
    taking_over: bool,
    /// During `pair create` (which writes a new journal over the file): no
    /// second one, and no session from a peer (which would write its
    /// restore journal over the same file).
    creating: bool,
    /// Primary, during `switchover`: the last record, whether the command
    /// went out, and who waits for the secondary's confirmation.
    switchover: Option<takeover::Switchover>,
    /// Primary, during `pair split` with the session up.
    split: Option<lifecycle::SplitRequest>,
    /// When the replication link last went up or down (wall clock).
    link_changed_at: SystemTime,
    /// The peer's role and pair state as it last said, and when this node
    /// last heard from it.
    peer_state: Option<String>,
    peer_contact: Option<SystemTime>,
    /// Sync primary: whether RPO 0 was in force at the last state change
    /// (a change is logged loudly), and since when it is not.
    rpo_zero: Option<bool>,
    rpo_zero_lost_at: Option<SystemTime>,
    /// Sync primary: catching up with writes it acknowledged without the
    /// secondary before its writes wait for it again.
    catch_up: SyncCatchUp,
    /// Secondary: when it last asked its peer whether it still holds the
    /// pair (`pair_query.rs`).
    pair_query_at: Option<Instant>,
    /// Secondary: commands for the attached session.
    session_cmd: Option<mpsc::UnboundedSender<SessionCommand>>,
    /// `drill start` is freezing the replica without a session: none may
    /// attach until it is done.
    drill_starting: bool,
    /// Secondary: an apply session is attached.
    secondary_attached: bool,
    /// A split secondary: the primary learned of the split (it asked for
    /// it, or was refused with `Refusal::Split`). A split made here reaches
    /// it only when it next dials (`pair resync --swap` waits for that).
    peer_knows_split: bool,
    /// Secondary: durable sequence (for status).
    secondary_durable: u64,
    secondary_applied: u64,
}

/// A command from the control socket to the secondary's session task.
#[derive(Debug)]
enum SessionCommand {
    /// `pair delete` on the secondary: end the pair on both sites; the
    /// answer is the message for the admin (an error if the delete could
    /// not be saved here).
    Delete(oneshot::Sender<Result<String, GroupError>>),
    /// `failover --force` on the secondary: end the session (after the
    /// drain, the node takes over).
    End,
    /// `switchover` on the secondary: ask the primary to hand over
    /// (`force`: with NBD clients attached there); `refused` is told if
    /// the primary answers that it will not.
    RequestSwitchover {
        /// `--force`.
        force: bool,
        /// Told the primary's refusal or failure.
        refused: oneshot::Sender<GroupError>,
    },
    /// `pair split` on the secondary: end the session, persist the split
    /// (`rw`: volumes writable), then answer.
    Split {
        /// `--rw`.
        rw: bool,
        /// Told once the split is persisted.
        done: oneshot::Sender<Result<(), String>>,
    },
    /// `drill start`: freeze the replica at a write-order-consistent point,
    /// report it on `frozen`, hold later applies until `thaw` fires (or is
    /// dropped).
    Freeze {
        /// Told once the replica is frozen, or why it cannot be.
        frozen: oneshot::Sender<Result<drill::Frozen, String>>,
        /// Applies resume when this fires or its sender is dropped.
        thaw: oneshot::Receiver<()>,
    },
}

/// Memory budget for records kept for shipping (a payload is dropped as
/// soon as the secondary has received its record, see `Group::on_ack`);
/// beyond it the shipper reads them back from the journal: a backlog while
/// the secondary is slow or away. Per group: a daemon's memory grows with
/// its groups and this budget, not with a backlog or the journal's size.
pub const CACHE_BUDGET: u64 = 128 << 20;
/// Past the budget, the oldest payloads are dropped down to this much below
/// it: a little at a time, so that the buffers freed at once fit the I/O
/// buffer pool (`io::buf`), which new writes then take them from instead of
/// fresh memory (a page fault per 4 KiB on this kind of machine).
const CACHE_DROP: u64 = 16 << 20;

/// A consistency group on this node.
#[derive(Debug)]
pub struct Group {
    /// Its configuration.
    pub cfg: GroupConfig,
    /// Its volumes, in configuration order.
    pub volumes: Vec<Arc<Volume>>,
    engine: IoEngine,
    store: StateFile,
    transport: Arc<Transport>,
    /// The node's pacing of what its secondary sessions defer.
    pacing: Arc<Pacing>,
    inner: Mutex<Inner>,
    progress: watch::Sender<Progress>,
    /// Wakes the shipper: a flush was requested (`Inner::flush_wanted`),
    /// copy progress, a command (switchover, split), a region `verify`
    /// holds, a bitmap save a copy waits for, the state changed.
    ship_wake: Notify,
    /// Wakes the shipper: a record became ready (async mode lets a few
    /// gather first: `shipper::ASYNC_GATHER`).
    records_ready: Notify,
    /// Sync-mode writes between their journal append and their return
    /// (see `write_path.rs`, `SyncWrite`): a lone one's record is sent
    /// ahead of its volume write, without waiting for other records.
    sync_writes: AtomicUsize,
    /// Wakes writes blocked on journal space.
    space_freed: Notify,
    /// Contiguous prefix of journaled records (volume writes wait on it).
    /// A journal append notifies only while a receiver exists
    /// (`Group::journaled`): a receiver must look at the value after
    /// subscribing (`wait_for`, `borrow`), not wait for a change alone.
    journaled_through: watch::Sender<u64>,
    /// Bitmap group commit: epoch writes wait for, and epoch on disk.
    bitmap_wanted: watch::Sender<u64>,
    bitmap_persisted: watch::Sender<u64>,
    /// The last metadata save failed (why), until one succeeds.
    save_failed: watch::Sender<Option<String>>,
    /// Client writes waiting for a metadata save (their region's).
    writes_awaiting_save: AtomicUsize,
    /// Bumped to make the current replication session end (and reconnect).
    session_kick: watch::Sender<u64>,
    /// A new epoch of shipping started (`start_shipping`).
    shipping_started: Notify,
    /// Group streams peers opened, for the group's task; its end of the
    /// channel until the task takes it.
    incoming: mpsc::UnboundedSender<IncomingSession>,
    incoming_rx: Mutex<Option<mpsc::UnboundedReceiver<IncomingSession>>>,
    started: Instant,
    latency: crate::latency::LatencyHistogram,
    /// Running totals for the metrics endpoint.
    counters: Arc<crate::metrics::GroupCounters>,
    /// Version of the state snapshot last written to disk (see `write_state`).
    state_written: Mutex<u64>,
    /// NBD connections attached to this group's volumes.
    nbd_clients: AtomicUsize,
    /// `accept_pair_create` as the configuration last loaded says: from
    /// `cfg` at start, then from each SIGHUP's reload
    /// ([`Group::set_accept_pair_create`]). Only consulted when a peer asks
    /// this SIMPLEX group to become its secondary.
    accept_pair_create: AtomicBool,
    /// The bitmap and activity-log files open for saves, one save at a
    /// time, with the bytes last saved to each.
    bitmap_io: Mutex<HashMap<String, MetadataFile>>,
    /// Set when the group stopped taking writes after a local failure (see
    /// `fail_stop` in write_path.rs).
    stopped: std::sync::OnceLock<String>,
    /// The smaller of `journal_size` and the journal file found at start
    /// (a file made before `journal_size` changed keeps its size until
    /// the journal starts over): what [`Group::max_request`] must fit.
    smallest_journal: u64,
    /// The running drill (`drill.rs`), and one drill command at a time.
    drill: Mutex<Option<Arc<drill::ActiveDrill>>>,
    drill_op: tokio::sync::Mutex<()>,
    /// One `verify` at a time (`verify.rs`): more would only queue their
    /// held regions behind the secondary's bounded region reads.
    verify_one: tokio::sync::Mutex<()>,
    /// The consistent image preserved while a resync runs (`resync_guard.rs`).
    resync_guard: Mutex<Option<Arc<resync_guard::ResyncGuard>>>,
    /// One guard creation at a time (two sessions may race to start).
    guard_op: tokio::sync::Mutex<()>,
    /// The removal of the last released guard, while it runs.
    guard_removal: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One volume sync at a time for writes waiting for room in the
    /// activity log (`activity.rs`).
    activity_sync: tokio::sync::Mutex<()>,
    /// Wakes those writes when one of this node's volume writes finishes
    /// (only while `Inner::activity_waiters` counts one).
    activity_room: Notify,
    /// Whether journal appends start their writeback at once (clients that
    /// flush after few writes; `writeback_hint.rs`).
    writeback_hint: writeback_hint::WritebackHint,
    /// Slow writes, logged with where their time went (`slow_write.rs`).
    slow_writes: slow_write::SlowWriteLog,
}

impl Inner {
    /// This node's role.
    fn role(&self) -> Role {
        self.persisted.role()
    }

    /// A copy starts (a session's, or a resync that enters COPY): its
    /// progress counts from here, over the regions the bitmaps mark now.
    fn start_copy_progress(&mut self) {
        self.copy_total = self.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
        self.copy_done = 0;
        self.copy_sent = 0;
    }

    /// The bytes of the running copy: what it started with, or more if
    /// writes tracked in the bitmaps meanwhile (a journal-full resync)
    /// added regions to it.
    fn copy_total_now(&self) -> u64 {
        if self.role() != Role::Primary || self.state != PairState::Copy {
            return self.copy_total;
        }
        let remaining: u64 = self.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
        self.copy_total.max(self.copy_done.saturating_add(remaining))
    }

    /// The role lets clients write the volumes: a primary not fenced by a
    /// failover, a standalone node, a secondary split with `--rw`.
    fn role_writable(&self) -> bool {
        match self.role() {
            Role::Primary => self.persisted.role.superseded_by() == 0,
            Role::None => true,
            Role::Secondary => self.persisted.role.split_writable(),
        }
    }

    /// An admin split the pair here (`SUSPENDED(split)`).
    fn split(&self) -> bool {
        self.state == PairState::Suspended(SuspendReason::Split)
    }

    /// A split primary whose peer became the primary with `pair resync
    /// --swap`, waiting for its NBD clients to detach before it gives up
    /// the role: the peer's generation.
    fn swapped_away(&self) -> Option<u64> {
        self.persisted
            .role
            .as_primary()
            .map(|p| p.swapped_away_to)
            .filter(|&generation| generation > self.persisted.generation)
    }

    /// Every write up to here is durable on this node where no replay of
    /// the journal after a power cut can undo it: on the volumes, and in
    /// the journal (or freed from it). A region whose newest write is
    /// durable on the volumes but not in the journal is not: a power cut
    /// may take that write from the journal and keep an older one to the
    /// region, which the restart's replay then puts back over it.
    fn replay_safe(&self) -> u64 {
        self.local_durable.min(self.journal_durable)
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock is a bug; the data is still the best we
    // have, so keep serving rather than poisoning every later request.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Group {
    /// Opens a group from its configuration and persisted state.
    pub async fn open(
        cfg: GroupConfig,
        volumes: Vec<Arc<Volume>>,
        engine: IoEngine,
        state_dir: &std::path::Path,
        transport: Arc<Transport>,
        pacing: Arc<Pacing>,
    ) -> Result<Arc<Group>, GroupError> {
        let store = StateFile::new(state_dir, &cfg.name);
        // Files a crash left half written (only this daemon, holding the
        // state_dir's lock, writes here).
        crate::durable::remove_temporaries(store.dir());
        let persisted = store.load()?.unwrap_or_else(GroupState::simplex);
        let role = persisted.role();
        if let Some(why) = layout::refusal_of(state_dir, &cfg)? {
            return Err(GroupError::Refused(why));
        }
        layout::adopt(&store, &cfg)?;
        let mut state = persisted.state;
        let was_clean = persisted.clean_shutdown;
        // Before anything writes the volumes (journal replays below): a
        // drill copy keeps its image through them.
        let drill = drill::load(&engine, store.dir(), &volumes)?;
        let resync_guard = resync_guard::load(&engine, store.dir(), &volumes, &persisted)?;
        let (mut bitmaps, bitmaps_lost) = load_bitmaps(&store, &volumes)?;
        let mut activity = load_activity_log(&store);
        let boot_id = current_boot_id();
        let unclean = !was_clean;
        // After an unclean stop, a different kernel boot (or none recorded)
        // means the machine lost power or crashed: the page cache and a
        // disk's volatile cache may have dropped anything not made durable.
        // The same boot means only the process died: every write it made is
        // still in the page cache.
        let rebooted = persisted.boot_id.is_empty() || persisted.boot_id != boot_id;
        // A failed sync is as bad: the disk may have dropped what it was to
        // make durable.
        let power_lost = unclean && (rebooted || persisted.sync_failed);
        // A primary whose journal file is gone (removed by hand, a state
        // directory restored from a backup) has lost the records its
        // secondary may lack: nothing says which regions they touched, so
        // the whole volumes are compared and resynchronised, as after a
        // power cut without an activity log. (Opening it would otherwise
        // create an empty journal and resume as if nothing were owed.)
        let journal_missing = role == Role::Primary && !journal_path(&store).exists();
        let mut power_lost = power_lost || journal_missing;
        let sync_failed = persisted.sync_failed;
        // A secondary's restore journal gone after an unclean stop: the
        // records it held beyond the checkpoint may have been applied in
        // part (applies overlap), so the volumes are no longer an image the
        // primary ever had and nothing says which regions differ. Asked
        // for like the regions of a failback: the primary compares and
        // copies the whole volumes (by hash, only what differs crosses).
        // After a clean stop the volumes hold the checkpoint exactly.
        let restore_journal_lost = role == Role::Secondary && unclean && !journal_path(&store).exists();
        let mut persisted = persisted;
        if restore_journal_lost {
            tracing::error!(
                group = %cfg.name,
                path = %journal_path(&store).display(),
                "restore journal: the file is missing after an unclean stop: the records it held are lost and the \
                 volumes may hold part of them; the replica is INCONSISTENT until the primary has compared and \
                 copied the whole volumes"
            );
            for b in &mut bitmaps {
                b.set_all();
            }
            if let Some(secondary) = persisted.role.as_secondary_mut() {
                secondary.needs_rebase = true;
                secondary.copy_incomplete = true;
                secondary.consistent = false;
            }
            // On disk before the journal file is made again: a later
            // start no longer sees it missing.
            for (v, b) in volumes.iter().zip(&bitmaps) {
                store.save_blob(&bitmap_name(&v.name), &b.encode())?;
            }
            store.save(&persisted)?;
        }
        persisted.boot_id = boot_id.clone();
        persisted.sync_failed = false;
        if let Some(p) = persisted.role.as_primary_mut().filter(|_| bitmaps_lost) {
            // An unreadable bitmap is marked dirty whole: the resync copies it.
            p.copy_pending = true;
        }
        // What the secondary held at the last session: the journal is freed
        // only below its persisted checkpoint, so it has every record before
        // the journal's tail (read before a power cut below moves the tail).
        // Status and the activity log start from it until a session reports
        // again: from 0, a primary restarted with its peer away showed every
        // write since the pair began as lag. Not for a pair still to be
        // announced, created or rebased (a power cut moved the tail past
        // records the secondary may lack): from 0, as before.
        let peer_checkpoint = persisted
            .role
            .as_primary()
            .filter(|p| p.announce == Announce::Resume)
            .map_or(0, |p| p.journal_tail_seq.saturating_sub(1));
        // Saved at the first save after the open (see the rebuild below).
        let mut activity_rebuilt = false;
        let mut ring = None;
        let mut journal = None;
        let mut last_jseq = 0;
        // When the recovered records were written: (first seq, times).
        let mut written_at: (u64, Vec<u64>) = (0, Vec::new());
        if let RoleState::Primary(primary) = &mut persisted.role {
            // Keyed with the epoch its records were written in (persisted
            // with the tail); a power cut below moves on to the next one.
            let mut j = Journal::open(
                &engine,
                &journal_path(&store),
                cfg.journal_size,
                &cfg.name,
                persisted.pair_id,
                persisted.epoch,
                false,
            )
            .await?;
            let stop = if was_clean { Stop::Clean } else { Stop::Unclean };
            let first = primary.journal_tail_seq.max(1);
            let recovered = j.recover(first, primary.journal_tail_pos, stop).await?;
            let (r, last) = (recovered.ring, recovered.last_seq);
            written_at = (first, recovered.written_at_us);
            tracing::info!(
                group = %cfg.name,
                records = r.len(),
                last_seq = last,
                "journal recovered"
            );
            if let (Some(first), Some(newest)) = (recovered.discarded.first(), recovered.discarded.last()) {
                tracing::warn!(
                    group = %cfg.name,
                    count = recovered.discarded.len(),
                    "journal: discarded records {first}..={newest}, which were still being appended when the daemon stopped \
                     (after the torn or missing record {}; none of them was acknowledged)",
                    last + 1
                );
            }
            last_jseq = last;
            let mut skipped = 0;
            if unclean {
                // A record may be journaled while its volume write never
                // happened: replay the journal's surviving run here.
                tracing::warn!(group = %cfg.name, "the daemon did not stop cleanly: replaying the journal");
                let plan = ReplayPlan { bitmaps: &mut bitmaps, fence: primary.replay_fence };
                skipped = redo_journal(&j, &r, last, &volumes, Some(plan)).await?.1;
                if skipped > 0 {
                    // Their regions are dirty now: the resync copies them.
                    primary.copy_pending = true;
                }
            }
            // A switchover synced the journal and the volumes through the
            // record it hands over after, saved the marker, and took no
            // write since: a power cut from then on lost nothing here if
            // the journal still ends at that record. A new epoch and the
            // activity log's regions would only make the peer that took
            // over copy them again (and read this node's records as another
            // sequence space); the peer's answer settles the role.
            // (Writes after an abandoned hand-over wait for the cleared
            // marker to be saved, `abandon_hand_over`; a record discarded
            // after the last one would say one was appended anyway.)
            let handed_over_intact = primary.handing_over.is_some_and(|p| p.seq == last && p.epoch == persisted.epoch)
                && recovered.discarded.is_empty()
                && !journal_missing
                && !sync_failed
                && skipped == 0;
            if power_lost && handed_over_intact {
                tracing::info!(
                    group = %cfg.name,
                    seq = last,
                    "power cut while a switchover waited for the peer's answer: the journal and the volumes were \
                     synced through the last record before, and nothing was written since: nothing to resynchronise"
                );
                power_lost = false;
            }
            if power_lost {
                // Anything not yet durable may be gone on either site: the
                // journal tail and volume writes here, applies there. The
                // activity log names every region that can differ; those are
                // copied, in a new epoch, and the secondary rebases on what
                // the journal still holds.
                let regions = match &activity {
                    _ if journal_missing => {
                        for b in &mut bitmaps {
                            b.set_all();
                        }
                        "whole volumes (the journal file was missing)".to_string()
                    }
                    Some(al) => {
                        for (vol, off, len) in al.extents() {
                            if let Some(b) = bitmaps.get_mut(vol as usize) {
                                let end = off.saturating_add(len).min(b.volume_size());
                                if off < end {
                                    b.set_range(off, end - off);
                                }
                            }
                        }
                        format!("the {} region(s) of the activity log", al.len())
                    }
                    None => {
                        for b in &mut bitmaps {
                            b.set_all();
                        }
                        "whole volumes (the activity log is missing or unreadable)".to_string()
                    }
                };
                let dirty: u64 = bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum();
                tracing::warn!(
                    group = %cfg.name,
                    epoch = persisted.epoch + 1,
                    bytes = dirty,
                    "{}: anything not yet durable may be lost on either site; resynchronising {regions}",
                    if journal_missing {
                        "the journal file is missing: the records it held are lost"
                    } else if rebooted {
                        "power cut detected (the machine rebooted since the unclean stop)"
                    } else {
                        "a sync failed before the stop, as a power cut would"
                    }
                );
                // Bitmaps first: a crash before the state below is saved
                // finds the stop still unclean and the regions still logged.
                for (v, b) in volumes.iter().zip(&bitmaps) {
                    store.save_blob(&bitmap_name(&v.name), &b.encode())?;
                }
                persisted.epoch += 1;
                // Sequence numbers continue at `last + 1` in the new epoch,
                // while records of the lost one may still sit beyond the
                // head: new records are keyed with the new epoch, so no
                // recovery ever takes an old one for the next (issue 8).
                // The state saved below names the new epoch before anything
                // is appended.
                j.set_epoch(persisted.epoch);
                primary.copy_pending = true;
                // A pair not yet announced keeps its create intent (the
                // copy then covers the regions), but one created --nocopy
                // has regions to copy now: its secondary must start
                // inconsistent, as for a copy, not take later records as a
                // consistent image while it lacks these. An existing pair
                // rebases.
                if primary.announce == Announce::Resume {
                    primary.announce = Announce::Resync;
                } else if primary.announce == Announce::CreateNocopy {
                    primary.announce = Announce::CreateCopy;
                }
                primary.journal_tail_seq = last + 1;
                primary.journal_tail_pos = r.head();
                primary.rebase_seq = last;
                let mut empty = JournalRing::new(j.capacity());
                empty.reset_at(r.head());
                ring = Some(empty);
                if matches!(
                    state,
                    PairState::Pair | PairState::Suspended(SuspendReason::Link | SuspendReason::JournalFull)
                ) {
                    state = PairState::Copy;
                }
            } else {
                if activity.is_none() && r.oldest_seq().is_some() {
                    // The activity log is missing or unreadable (after a
                    // kill or a clean stop): the records still in the
                    // journal (all the secondary may lack, and all whose
                    // volume writes may not be durable here) name the
                    // regions a later power cut could leave different.
                    // Rebuilt from their headers, saved with the next save
                    // (until then a power cut still finds no log, and
                    // resynchronises whole volumes). With no record, an
                    // empty log is exact.
                    let mut rebuilt = ActivityLog::new(DEFAULT_EXTENT);
                    for seq in r.oldest_seq().unwrap_or(last + 1)..=last {
                        if let Some((pos, _)) = r.lookup(seq) {
                            let h = j.read_header(pos, seq).await?;
                            rebuilt.touch(h.volume, h.offset, u64::from(h.length), seq, 0, 0);
                        }
                    }
                    tracing::warn!(
                        group = %cfg.name,
                        regions = rebuilt.len(),
                        "the activity log is missing or unreadable: rebuilt from the journal's records"
                    );
                    activity = Some(rebuilt);
                    activity_rebuilt = true;
                }
                ring = Some(r);
            }
            if !primary.copy_pending && !primary.bitmap_mode && bitmaps.iter().any(|b| !b.is_clean()) {
                // Dirty regions and no copy due (a state file saved ahead of
                // its bitmaps by an earlier release): copied, or RPO 0 would
                // not come back.
                primary.copy_pending = true;
            }
            if primary.copy_pending && state == PairState::Pair {
                // Regions to copy (a lost bitmap, records not replayed):
                // not PAIR until they are copied, as after a power cut.
                state = PairState::Copy;
            }
            journal = Some(Arc::new(j));
        } else if let RoleState::Secondary(secondary) = &mut persisted.role {
            journal = Some(Arc::new(
                recover_restore_journal(
                    &engine,
                    &store,
                    &cfg,
                    &volumes,
                    (persisted.pair_id, persisted.epoch),
                    secondary,
                    was_clean,
                )
                .await?,
            ));
        }
        let smallest_journal = journal.as_ref().map_or(cfg.journal_size, |j| j.capacity().min(cfg.journal_size));
        let mut activity = activity.take().unwrap_or_else(|| ActivityLog::new(DEFAULT_EXTENT));
        if power_lost {
            activity = ActivityLog::new(activity.extent());
        } else {
            // Extents from before the restart wait for what the journal holds.
            activity.assume_written(last_jseq, 0);
        }
        activity.set_budget(cfg.activity_log_extents);
        if role == Role::None {
            state = PairState::Simplex;
        }
        // An error that suspended a primary is judged again after the
        // restart (the journal is recovered and replayed by now; the peer's
        // verdict comes with the next session).
        let superseded_by = persisted.role.superseded_by();
        let primary_left = persisted.role.as_secondary().is_some_and(|s| s.primary_left_pair);
        if role == Role::Primary && state == PairState::Suspended(SuspendReason::Error) && superseded_by == 0 {
            tracing::warn!(group = %cfg.name, "the pair was SUSPENDED(error) before the restart: checking it again");
            state = PairState::Suspended(SuspendReason::Link);
        }
        // No replication session is up yet: a replica never claims PAIR
        // (or COPY progress) without one.
        if role == Role::Secondary && matches!(state, PairState::Pair | PairState::Copy) {
            state = PairState::Suspended(SuspendReason::Link);
        }
        // Loaded from disk, then only ever marked dirtier.
        let saved_bitmaps_clean = bitmaps.iter().all(|b| b.dirty_bytes() == 0);
        let mut entries = BTreeMap::new();
        let mut cumulative = 0;
        if let Some(r) = &ring {
            if let Some(oldest) = r.oldest_seq() {
                for seq in oldest..=last_jseq {
                    if let Some((pos, span)) = r.lookup(seq) {
                        cumulative += span;
                        let written_at_us = seq
                            .checked_sub(written_at.0)
                            .and_then(|i| written_at.1.get(i as usize).copied())
                            .unwrap_or_else(unix_micros);
                        entries
                            .insert(seq, Entry { pos, span, cumulative, written_at_us, record: None, journaled: true });
                    }
                }
            }
        }
        persisted.clean_shutdown = false;
        let durable_seq = persisted.role.as_secondary().map_or(0, |s| s.durable_seq);
        // A switchover asked the peer to take over and this node stopped
        // before it heard the answer: no writes until it does (`start`).
        let handing_over = persisted.role.as_primary().and_then(|p| p.handing_over);
        if let Some(point) = handing_over {
            tracing::warn!(group = %cfg.name, peer = %cfg.peer, seq = point.seq,
                "a switchover had asked the peer to take over after this record when this node stopped: no writes \
                 are taken until the peer answers, as the new primary or as this node's secondary still");
        }
        let mut inner = Inner {
            state,
            seq: RangeSequencer::new(1),
            awaited: RangeWaits::default(),
            ring,
            journal,
            last_jseq,
            ready: SeqTracker::new(last_jseq),
            volume_written: SeqTracker::new(last_jseq),
            entries,
            cached_bytes: 0,
            cumulative_bytes: cumulative,
            bitmaps,
            activity,
            activity_waiters: 0,
            local_durable: if was_clean { last_jseq } else { 0 },
            journal_durable: if was_clean { last_jseq } else { 0 },
            // After an unclean stop the volumes may hold writes of before it
            // that are not durable (page cache, the disk's cache): counted
            // as one, until a volume sync covers it.
            unjournaled_written: u64::from(!was_clean),
            unjournaled_durable: 0,
            journal_only_flushes: 0,
            journal_only_synced: 0,
            saved_bitmaps_clean,
            last_durability_sync: Instant::now(),
            bitmap_dirty_since_save: unclean || activity_rebuilt,
            state_version: 0,
            state_dirty: false,
            write_barrier: 0,
            copy_barrier: 0,
            flush_wanted: 0,
            journal_full_since: None,
            journal_released_at: Instant::now(),
            session: None,
            shipper_epoch: 0,
            link_down_since: Some(Instant::now()),
            last_link_log: None,
            last_error: (superseded_by > 0)
                .then(|| {
                    format!(
                        "{} took over as primary after a failover (generation {superseded_by}); this former primary \
                         accepts no writes",
                        cfg.peer
                    )
                })
                .or_else(|| {
                    let what = format!("the primary {} left this pair (it said so before this restart)", cfg.peer);
                    primary_left.then(|| pair_query::left_the_pair(&cfg.name, &what))
                }),
            copy_total: 0,
            copy_done: 0,
            copy_sent: 0,
            refusal: (superseded_by > 0).then_some("superseded").or(primary_left.then_some("not-paired")),
            peer_left_written: false,
            delete_ack: None,
            boot_id,
            switching: handing_over.is_some(),
            switchover_answer: None,
            taking_over: false,
            creating: false,
            switchover: handing_over.map(|p| takeover::Switchover {
                seq: p.seq,
                epoch: p.epoch,
                sent: true,
                confirmed: None,
            }),
            split: None,
            peer_state: None,
            peer_contact: None,
            rpo_zero: None,
            rpo_zero_lost_at: None,
            // A primary that opens replicating in sync mode waits for the
            // secondary at once, but claims RPO 0 only once it has received
            // what the journal holds past its checkpoint: a stop while
            // catching up left writes acknowledged without it there. One
            // that opens suspended is `Alone` at its first publish.
            catch_up: if last_jseq > peer_checkpoint {
                SyncCatchUp::Closing { through: last_jseq }
            } else {
                SyncCatchUp::Zero
            },
            link_changed_at: SystemTime::now(),
            pair_query_at: None,
            session_cmd: None,
            drill_starting: false,
            secondary_attached: false,
            peer_knows_split: false,
            lone_ack_save: 0,
            secondary_durable: durable_seq,
            secondary_applied: durable_seq,
            persisted,
        };
        if cfg.mode != Mode::Sync {
            // Async acknowledges without the secondary (the file may say
            // otherwise from an earlier run in sync mode): saved just below,
            // before any write.
            if let Some(p) = inner.persisted.role.as_primary_mut() {
                p.acked_all_on_peer = false;
            }
        }
        store.save(&inner.persisted)?;
        let (progress, _) = watch::channel(Progress {
            received: peer_checkpoint,
            applied: peer_checkpoint,
            durable: peer_checkpoint,
            checkpoint: peer_checkpoint,
            ..Progress::default()
        });
        let (session_kick, _) = watch::channel(0);
        let (journaled_through, _) = watch::channel(last_jseq);
        let (bitmap_wanted, _) = watch::channel(0);
        let (bitmap_persisted, _) = watch::channel(0);
        let (incoming, incoming_rx) = mpsc::unbounded_channel();
        let accept_pair_create = AtomicBool::new(cfg.accept_pair_create);
        // The bitmaps and the activity log were read through the page
        // cache, where a kill between a save's write and its sync leaves the
        // newest save alone, and writes admitted from here on rely on what
        // was read (a region in the loaded log waits for no save). Opening
        // them for saves makes that save durable (`SlottedFile::open`), after
        // every save above (a handle opened earlier would not know of those).
        let mut metadata_files = HashMap::new();
        for name in volumes.iter().map(|v| bitmap_name(&v.name)).chain([ACTIVITY_LOG.to_string()]) {
            let blob = store.open_blob(&name)?;
            metadata_files.insert(name, MetadataFile { blob, saved: None });
        }
        let group = Arc::new(Group {
            cfg,
            volumes,
            engine,
            store,
            transport,
            pacing,
            inner: Mutex::new(inner),
            progress,
            ship_wake: Notify::new(),
            records_ready: Notify::new(),
            sync_writes: AtomicUsize::new(0),
            space_freed: Notify::new(),
            journaled_through,
            bitmap_wanted,
            bitmap_persisted,
            save_failed: watch::channel(None).0,
            writes_awaiting_save: AtomicUsize::new(0),
            session_kick,
            shipping_started: Notify::new(),
            incoming,
            incoming_rx: Mutex::new(Some(incoming_rx)),
            started: Instant::now(),
            latency: crate::latency::LatencyHistogram::default(),
            counters: Arc::default(),
            state_written: Mutex::new(0),
            nbd_clients: AtomicUsize::new(0),
            accept_pair_create,
            bitmap_io: Mutex::new(metadata_files),
            stopped: std::sync::OnceLock::new(),
            smallest_journal,
            drill: Mutex::new(drill),
            drill_op: tokio::sync::Mutex::new(()),
            verify_one: tokio::sync::Mutex::new(()),
            resync_guard: Mutex::new(resync_guard),
            guard_op: tokio::sync::Mutex::new(()),
            guard_removal: Mutex::new(None),
            activity_sync: tokio::sync::Mutex::new(()),
            activity_room: Notify::new(),
            writeback_hint: writeback_hint::WritebackHint::default(),
            slow_writes: slow_write::SlowWriteLog::default(),
        });
        {
            let mut g = lock(&group.inner);
            group.publish(&mut g);
        }
        Ok(group)
    }

    /// Starts the group's task (`task.rs`), once.
    pub fn start(self: &Arc<Self>) {
        // A switchover found unanswered at the start finishes when the peer
        // confirms it took over (see `open`).
        let unanswered = {
            let mut g = lock(&self.inner);
            g.switchover.as_mut().filter(|s| s.sent && s.confirmed.is_none()).map(|s| {
                let (tx, rx) = oneshot::channel();
                s.confirmed = Some(tx);
                (s.seq, rx)
            })
        };
        if let Some((last, confirmation)) = unanswered {
            self.finish_when_confirmed(last, Instant::now(), confirmation);
        }
        if self.role() == Role::Primary {
            self.start_shipping();
        }
        if let Some(incoming) = self.incoming_rx.lock().unwrap_or_else(PoisonError::into_inner).take() {
            tokio::spawn(task::run(self.clone(), incoming));
        }
    }

    /// Starts a new epoch of replication sessions (this node became the
    /// primary, or its pair was created anew): the group's task ends the
    /// current ones and connects again.
    pub fn start_shipping(self: &Arc<Self>) {
        lock(&self.inner).shipper_epoch += 1;
        self.shipping_started.notify_one();
        // A run of an earlier role may be waiting to retry (up to
        // `RARE_RETRY` for a fenced node): it ends at once, so the new
        // sessions start now, not when it wakes (sync writes wait for them).
        self.session_kick.send_modify(|k| *k += 1);
    }

    /// A promotion whose save failed is in effect all the same (the
    /// flusher retries the save every second, and writes wait for it):
    /// its sessions start now, and each waits for the save to land before
    /// the peer hears of the new role. Without them the new primary, once
    /// saved, would never replicate (nor resync a former primary's
    /// failback) until a restart.
    fn promoted_unsaved(self: &Arc<Self>) {
        tracing::error!(group = %self.cfg.name, "the promotion is in effect but not saved yet; replication starts once it is");
        self.start_shipping();
    }

    /// A peer opened a group stream for this group: its session runs in
    /// the group's task.
    pub fn serve_secondary(&self, session: IncomingSession) {
        // The task holds the receiver for the group's lifetime.
        let _ = self.incoming.send(session);
    }

    /// Current role.
    pub fn role(&self) -> Role {
        lock(&self.inner).role()
    }

    /// Current pair state.
    pub fn state(&self) -> PairState {
        lock(&self.inner).state
    }

    /// Client write latency histogram.
    pub fn latency(&self) -> &crate::latency::LatencyHistogram {
        &self.latency
    }

    /// Running totals (records and bytes shipped, applied, resynced;
    /// errors) for the metrics endpoint.
    pub fn counters(&self) -> &crate::metrics::GroupCounters {
        &self.counters
    }

    /// A secondary replication session is attached.
    pub fn session_attached(&self) -> bool {
        lock(&self.inner).secondary_attached
    }

    /// Subscribes to progress updates.
    pub fn watch_progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    fn journal_handle(&self) -> Option<Arc<Journal>> {
        lock(&self.inner).journal.clone()
    }

    /// The secondary is known to hold every write through `n`, and nothing
    /// beyond: a session starts (`connected`, at the point the secondary
    /// reported), or this node starts as the primary of a pair or of a new
    /// generation after write `n` (what an earlier pair's or generation's
    /// secondary acknowledged says nothing about this one's).
    fn reset_progress(&self, n: u64, connected: bool) {
        self.progress.send_modify(|p| {
            p.connected = connected;
            p.received = n;
            p.applied = n;
            p.durable = n;
            p.checkpoint = n;
        });
    }

    /// Whether this primary's writes are acknowledged only once the
    /// secondary has them: sync mode in PAIR or COPY (once any backlog of
    /// writes acknowledged without the secondary is caught up), or with the
    /// link lost under `on_link_loss = "block"`.
    fn sync_wait(&self, g: &Inner) -> bool {
        self.sync_replicating(g) && g.catch_up.writes_wait()
    }

    /// Whether this primary replicates in sync mode: PAIR or COPY, or the
    /// link lost under `on_link_loss = "block"`.
    fn sync_replicating(&self, g: &Inner) -> bool {
        self.cfg.mode == Mode::Sync
            && g.role() == Role::Primary
            && match g.state {
                PairState::Pair | PairState::Copy => true,
                PairState::Suspended(SuspendReason::Link) => self.cfg.on_link_loss == LinkLossPolicy::Block,
                _ => false,
            }
    }

    /// Recomputes `Progress.sync_wait` and wakes everyone who watches.
    fn publish(&self, g: &mut Inner) {
        let (received, connected) = {
            let p = self.progress.borrow();
            (p.received, p.connected)
        };
        let was = g.catch_up;
        g.catch_up.on_replicating(self.sync_replicating(g), connected, g.last_jseq, received, self.clock_ms());
        if g.catch_up.pending() && !was.pending() {
            tracing::info!(group = %self.cfg.name, backlog_through = g.last_jseq, received,
                "sync mode: catching up with the writes acknowledged without the secondary; writes wait for it again \
                 once the backlog is nearly sent");
        }
        let sync_wait = self.sync_wait(g);
        // Not while anything is owed to the secondary: tracked regions or a
        // copy due (a link lost during a copy under `on_link_loss = "block"`
        // is SUSPENDED(link) with the copy still to finish).
        let owed = !g.bitmaps.iter().all(DirtyBitmap::is_clean)
            || g.persisted.role.as_primary().is_some_and(|p| p.copy_pending || p.bitmap_mode);
        let rpo_zero = sync_wait && g.state != PairState::Copy && !owed && g.catch_up.rpo_zero();
        self.progress.send_modify(|p| {
            p.sync_wait = sync_wait;
            p.rpo_zero = rpo_zero;
            p.epoch += 1;
        });
        self.note_rpo_zero(g, sync_wait, rpo_zero);
        self.ship_wake.notify_one();
        // Writes waiting for journal space re-decide on every state change.
        self.space_freed.notify_waiters();
    }

    /// A sync primary guarantees RPO 0 only while it replicates into a
    /// consistent replica (or stalls writes while the link is down, with
    /// `on_link_loss = "block"`) that has received every write acknowledged
    /// without it (`catch_up`): `rpo_zero`, as [`Self::publish`] computed
    /// it. Any change is logged loudly.
    fn note_rpo_zero(&self, g: &mut Inner, sync_wait: bool, rpo_zero: bool) {
        let now = (self.cfg.mode == Mode::Sync && g.role() == Role::Primary && g.persisted.role.superseded_by() == 0)
            .then_some(rpo_zero);
        if now == g.rpo_zero {
            return;
        }
        match now {
            Some(false) if sync_wait => {
                g.rpo_zero_lost_at = Some(SystemTime::now());
                tracing::warn!(group = %self.cfg.name, state = %g.state,
                    "RPO 0 IS NOT IN FORCE: writes wait for the secondary, but it does not have everything acknowledged \
                     before yet (a copy, a resync or a catch-up is running); a failover now would lose data");
            }
            Some(false) => {
                g.rpo_zero_lost_at = Some(SystemTime::now());
                tracing::warn!(group = %self.cfg.name, state = %g.state,
                    "RPO 0 IS NOT IN FORCE: sync-mode writes are acknowledged without a consistent secondary; a failover now would lose them");
            }
            Some(true) if g.rpo_zero == Some(false) => {
                g.rpo_zero_lost_at = None;
                tracing::info!(group = %self.cfg.name, "RPO 0 is in force again: every write is on the secondary before it is acknowledged");
            }
            _ => g.rpo_zero_lost_at = None,
        }
        if now == Some(true) {
            // Every write acknowledged so far is on the secondary (said
            // lazily: until this is on disk the file says less).
            if let Some(p) = g.persisted.role.as_primary_mut().filter(|p| !p.acked_all_on_peer) {
                p.acked_all_on_peer = true;
                self.save_later(g);
            }
        }
        g.rpo_zero = now;
    }

    /// Writes may be acknowledged without the secondary from now on: the
    /// next save says so ([`PrimaryState::acked_all_on_peer`] false).
    /// Returns that save: nothing may be acknowledged so before it is on
    /// disk.
    fn note_lone_acks(&self, g: &mut Inner) -> u64 {
        if let Some(p) = g.persisted.role.as_primary_mut().filter(|p| p.acked_all_on_peer) {
            p.acked_all_on_peer = false;
            g.lone_ack_save = self.save_later(g);
        }
        g.lone_ack_save
    }

    /// A write (or flush) is about to be acknowledged without the
    /// secondary having it: first the state file says that this primary
    /// may hold acknowledged writes the secondary lacks (a failover's
    /// newer primary then meets a split brain, not only a fenced node).
    pub(super) async fn record_lone_ack(&self) -> Result<(), WriteError> {
        let save = self.note_lone_acks(&mut lock(&self.inner));
        self.write_waits_for_save(save).await
    }

    /// This node's role and pair state in words, for the peer's status.
    fn describe_self(g: &Inner) -> String {
        match g.role() {
            Role::None => g.state.to_string(),
            role => format!("{} {}", role.as_str(), g.state),
        }
    }

    /// Heard from the peer (its state, when it says).
    fn heard_from_peer(&self, g: &mut Inner, state: Option<&str>) {
        g.peer_contact = Some(SystemTime::now());
        if let Some(s) = state.filter(|s| !s.is_empty()) {
            g.peer_state = Some(s.chars().take(64).collect());
        }
    }

    /// Applies a pair-state event, logs the change, persists it.
    fn transition(&self, g: &mut Inner, event: PairEvent, why: &str) {
        match g.state.apply(event) {
            Ok(next) if next != g.state => {
                tracing::info!(group = %self.cfg.name, from = %g.state, to = %next, reason = why, "pair state change");
                if next == PairState::Copy && g.role() == Role::Primary {
                    // A resync of a session already up (journal full, the
                    // peer's divergent regions): the copy's progress starts
                    // over with it.
                    g.start_copy_progress();
                }
                g.state = next;
                self.save_later(g);
                self.publish(g);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(group = %self.cfg.name, "{e} ({why})"),
        }
    }

    /// Logs an error and shows it in `status`.
    fn record_error(&self, msg: &str) {
        tracing::error!(group = %self.cfg.name, "{msg}");
        lock(&self.inner).last_error = Some(msg.to_string());
    }

    /// A snapshot of the persisted state to write (taken under the group
    /// lock, so a later version always includes every earlier change).
    fn snapshot_state(g: &mut Inner) -> (u64, GroupState) {
        g.persisted.state = g.state;
        // Every save records the boot it ran in (a state rebuilt from
        // scratch, e.g. at pair create, must not look like a reboot).
        g.persisted.boot_id.clone_from(&g.boot_id);
        g.state_version += 1;
        (g.state_version, g.persisted.clone())
    }

    /// Writes a snapshot unless a newer one is already on disk. Callable
    /// without the group lock, so frequent updates (journal tail, secondary
    /// checkpoint) never hold up the write path while they fsync.
    fn write_state(&self, (version, state): (u64, GroupState)) -> Result<(), StateError> {
        let mut written = self.state_written.lock().unwrap_or_else(PoisonError::into_inner);
        if *written >= version {
            return Ok(());
        }
        self.store.save(&state)?;
        *written = version;
        Ok(())
    }

    /// Sets `sync_failed` in the state on disk, leaving the rest as it is
    /// (see the metadata flusher). Blocking.
    fn mark_sync_failed_on_disk(&self) -> Result<(), StateError> {
        let _written = self.state_written.lock().unwrap_or_else(PoisonError::into_inner);
        match self.store.load()? {
            Some(mut on_disk) if !on_disk.sync_failed => {
                on_disk.sync_failed = true;
                self.store.save(&on_disk)
            }
            _ => Ok(()),
        }
    }

    /// Whether the running copy may hand out chunks, whose bits leave the
    /// persisted bitmaps once the secondary has them: first the bitmap
    /// fence becomes the replay fence, on disk (a cleared chunk no longer
    /// shows that a bitmap-mode write may have overwritten older records
    /// still in the journal; see `PrimaryState::replay_fence`).
    fn copy_may_clear_chunks(&self, g: &mut Inner) -> bool {
        if let Some(p) = g.persisted.role.as_primary_mut() {
            if p.bitmap_fence > p.replay_fence {
                p.replay_fence = p.bitmap_fence;
                g.copy_barrier = self.save_later(g);
            }
        }
        *self.bitmap_persisted.borrow() >= g.copy_barrier
    }

    /// Asks for `persisted` (and the bitmaps and activity log) to be saved
    /// by the metadata flusher, off the group lock; returns the save to wait
    /// for (see [`Group::saved`]) where the change must be durable before
    /// what follows it. Never does I/O itself: the lock it is called under
    /// is the write path's.
    fn save_later(&self, g: &mut Inner) -> u64 {
        g.state_dirty = true;
        self.request_save(g)
    }

    /// Asks the metadata flusher for a save of the bitmaps and the activity
    /// log (and `persisted`, when changed); returns its number. Called under
    /// the group lock, so a save's number covers every change made before.
    fn request_save(&self, _g: &mut Inner) -> u64 {
        let mut next = 0;
        self.bitmap_wanted.send_modify(|w| {
            *w += 1;
            next = *w;
        });
        next
    }

    /// Why a split primary whose peer became the primary in `generation`
    /// with `pair resync --swap` takes no writes.
    fn swapped_away_text(&self, generation: u64) -> String {
        let (name, peer) = (&self.cfg.name, &self.cfg.peer);
        format!(
            "group {name}: `pair resync --swap` on {peer} made it the primary (generation {generation}); this node \
             takes no more writes (EPERM) and becomes its secondary, its writes since the split overwritten, once \
             its NBD clients detach and {peer} dials again"
        )
    }

    /// The newest metadata save asked for.
    fn save_asked(&self) -> u64 {
        *self.bitmap_wanted.borrow()
    }

    /// Waits until metadata save `save` is on disk. A failing save is
    /// retried by the flusher every second; the waiter is told of the
    /// failure rather than left hanging (the change stays made in memory).
    async fn saved(&self, save: u64) -> Result<(), GroupError> {
        let mut done = self.bitmap_persisted.subscribe();
        let mut failed = self.save_failed.subscribe();
        failed.borrow_and_update();
        loop {
            if *done.borrow_and_update() >= save {
                return Ok(());
            }
            tokio::select! {
                changed = done.changed() => {
                    if changed.is_err() {
                        return Err(GroupError::Failed("the group is shutting down".into()));
                    }
                }
                changed = failed.changed() => {
                    if changed.is_err() {
                        return Err(GroupError::Failed("the group is shutting down".into()));
                    }
                    if let Some(e) = failed.borrow_and_update().clone() {
                        return Err(GroupError::Failed(format!(
                            "group {}: cannot persist the group's state: {e} (the change is in effect and saving it is \
                             retried every second; see `replicator status {}`)",
                            self.cfg.name, self.cfg.name
                        )));
                    }
                }
            }
        }
    }

    /// The bitmaps as they must be persisted: dirty regions plus copy chunks
    /// sent but not yet durable on the secondary (cleared in memory when
    /// read, they are not safe until acknowledged). Also whether they are
    /// all clean.
    fn bitmap_snapshot(&self, g: &Inner) -> (Vec<(String, Vec<u8>)>, bool) {
        let mut out = Vec::with_capacity(self.volumes.len());
        let mut clean = true;
        for (i, (v, b)) in self.volumes.iter().zip(&g.bitmaps).enumerate() {
            let mut b = b.clone();
            for (vol, off, len) in g.session.iter().flat_map(PrimarySession::copy_inflight) {
                if vol as usize == i {
                    b.set_range(off, len);
                }
            }
            clean &= b.dirty_bytes() == 0;
            out.push((bitmap_name(&v.name), b.encode()));
        }
        out.push((ACTIVITY_LOG.to_string(), g.activity.encode()));
        (out, clean)
    }

    fn write_bitmaps(&self, snapshot: &[(String, Vec<u8>)]) -> Result<(), StateError> {
        // The flusher and direct saves write the same files: one at a time.
        // A file whose bytes are already on disk is not written again (a
        // new activity-log region then costs one file save, not one per
        // volume bitmap as well).
        let mut files = self.bitmap_io.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, bytes) in snapshot {
            let file = match files.entry(name.clone()) {
                hash_map::Entry::Occupied(e) => e.into_mut(),
                hash_map::Entry::Vacant(e) => e.insert(MetadataFile { blob: self.store.open_blob(name)?, saved: None }),
            };
            if file.saved.as_ref() == Some(bytes) {
                continue;
            }
            file.saved = None;
            file.blob.save(bytes)?;
            file.saved = Some(bytes.clone());
        }
        Ok(())
    }

    /// Group commit of the group's metadata: the dirty bitmaps, the
    /// activity log and, when changed, `state.json`. A write that marks a
    /// clean region dirty (or depends on a state change, `write_barrier`)
    /// waits, before touching the volume, until a save covering it is on
    /// disk, so after any crash the persisted bitmaps and activity log still
    /// name every region that may differ from the secondary. One save serves
    /// every change made while the previous one was being written, and no
    /// file is written or fsynced under the group lock. Within a save the
    /// bitmaps go first, then the state: whatever a crash between them
    /// leaves, no write that waits for the save has reached a volume.
    ///
    /// A failing save is retried every second while writes wait for it, for
    /// [`SAVE_FAILING_LIMIT`] at most: then the group stops (its clients'
    /// writes fail instead of hanging; a restart replays the journal).
    async fn metadata_flusher(self: Arc<Self>) {
        // Since when saves fail while writes wait for one.
        let mut failing_since: Option<Instant> = None;
        loop {
            let mut rx = self.bitmap_wanted.subscribe();
            let persisted = *self.bitmap_persisted.borrow();
            let wanted = match rx.wait_for(|w| *w > persisted).await {
                Ok(w) => *w,
                Err(_) => return,
            };
            let (snapshot, clean, state, sync_first) = {
                let mut g = lock(&self.inner);
                g.bitmap_dirty_since_save = false;
                let state = std::mem::take(&mut g.state_dirty).then(|| Self::snapshot_state(&mut g));
                let (snapshot, clean) = self.bitmap_snapshot(&g);
                // A FLUSH from now on syncs the volumes while a dirty chunk
                // may be on disk.
                g.saved_bitmaps_clean &= clean;
                // A replay after a power cut skips records touching dirty
                // chunks, and a node no longer primary replays none: before
                // such a save reaches the disk, every write a FLUSH made
                // durable in the journal alone must be on the volumes.
                let forgets = !clean || g.role() != Role::Primary;
                (snapshot, clean, state, forgets && g.journal_only_flushes > g.journal_only_synced)
            };
            let synced = if sync_first { self.sync_volumes(false).await } else { Ok(()) };
            if let Err(e) = synced {
                // The volumes may have lost writes that a FLUSH made durable
                // in the journal alone, and only the replay at the next
                // start brings them back: this save would make it skip them
                // (their regions dirty, or this node no longer primary). It
                // is not written, nor is the state in memory (a role change
                // would skip the replay as well): the state on disk is
                // marked, saying that a sync failed (the next start is a
                // power cut's). Writes waiting for the save fail (the group
                // stopped); commands waiting for it get the error.
                self.save_failed.send_replace(Some(format!(
                    "the volumes could not be synced before saving the dirty bitmaps ({e}); restart the daemon \
                     once the disk is healthy (it replays the journal)"
                )));
                lock(&self.inner).state_dirty |= state.is_some();
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.mark_sync_failed_on_disk()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.record_error(&format!("cannot record the failed sync in state.json: {e}")),
                    Err(e) => self.record_error(&format!("cannot record the failed sync in state.json: {e}")),
                }
                // Again at the next request, not in a loop.
                let _ = rx.wait_for(|w| *w > wanted).await;
                continue;
            }
            let me = self.clone();
            let retry = state.is_some();
            let saved = tokio::task::spawn_blocking(move || {
                me.write_bitmaps(&snapshot)?;
                state.map_or(Ok(()), |s| me.write_state(s))
            })
            .await;
            let error = match saved {
                Ok(Ok(())) => {
                    if clean {
                        // No snapshot taken since, clean or not, is saved.
                        lock(&self.inner).saved_bitmaps_clean = true;
                    }
                    self.bitmap_persisted.send_modify(|p| *p = (*p).max(wanted));
                    // A copy may wait for this save (`copy_barrier`).
                    self.ship_wake.notify_one();
                    self.save_failed.send_if_modified(|f| f.take().is_some());
                    failing_since = None;
                    continue;
                }
                Ok(Err(e)) => format!("cannot persist the group's state and dirty bitmaps: {e}"),
                Err(e) => format!("the metadata save task failed: {e}"),
            };
            // Writes keep waiting: acknowledging them without their regions
            // persisted could lose them from a resync. Not for ever: a
            // write waiting here holds its journal sequence number, so the
            // group stops (every later write waits behind it anyway).
            lock(&self.inner).state_dirty |= retry;
            self.record_error(&error);
            if self.writes_awaiting_save.load(Ordering::Relaxed) == 0 {
                failing_since = None;
            } else if failing_since.get_or_insert_with(Instant::now).elapsed() >= SAVE_FAILING_LIMIT {
                self.fail_stop(format!(
                    "the group's metadata could not be saved for {} s while writes waited for it: {error}",
                    SAVE_FAILING_LIMIT.as_secs()
                ));
            }
            self.save_failed.send_replace(Some(error));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Periodic work: link-loss timer, bitmap persistence; on a secondary
    /// without a session, asking the peer whether it still holds the pair.
    async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let primary = {
                let mut g = lock(&self.inner);
                if g.role() == Role::Primary {
                    if let Some(since) = g.link_down_since {
                        if g.state.link_timed_out(since.elapsed(), self.cfg.link_timeout) {
                            self.transition(&mut g, PairEvent::LinkDown, "peer unreachable for link_timeout");
                        }
                    }
                    let idle_before = self.clock_ms().saturating_sub(ACTIVITY_IDLE.as_millis() as u64);
                    let durable_both = self.progress.borrow().checkpoint.min(g.replay_safe());
                    if g.activity.retire(durable_both, idle_before) {
                        // Saved by the flusher, off the write path's lock (a
                        // stale, larger log on disk is safe meanwhile).
                        self.bitmap_wanted.send_modify(|w| *w += 1);
                    }
                    if g.bitmap_dirty_since_save {
                        // Saved by the flusher, off the write path's lock.
                        self.bitmap_wanted.send_modify(|w| *w += 1);
                    }
                }
                g.role() == Role::Primary
            };
            if primary {
                self.release_journal().await;
                self.sync_for_activity_log().await;
            } else if let Some(pair_id) = self.pair_query_due() {
                tokio::spawn(self.clone().ask_peer_about_the_pair(pair_id));
            }
        }
    }

    /// Milliseconds since the group opened (the activity log's clock).
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Regions of the activity log that only wait for this node's volumes
    /// to be durable get there: at most every few seconds, one sync of the
    /// volumes (a FLUSH that syncs them makes it happen sooner).
    async fn sync_for_activity_log(&self) {
        {
            let g = lock(&self.inner);
            let idle_before = self.clock_ms().saturating_sub(ACTIVITY_IDLE.as_millis() as u64);
            if g.last_durability_sync.elapsed() < DURABILITY_SYNC_INTERVAL
                || !g.activity.waits_for_durability(g.replay_safe(), idle_before)
            {
                return;
            }
        }
        // A failure stops the group, which says why (`sync_failed`).
        let _ = self.sync_all().await;
        lock(&self.inner).last_durability_sync = Instant::now();
    }

    /// The session ended or could not start.
    fn link_lost(&self, why: &str) {
        let mut g = lock(&self.inner);
        if g.link_down_since.is_none() {
            g.link_down_since = Some(Instant::now());
        }
        // One line per distinct reason (and a reminder every minute), so a
        // peer that never comes up says why, without flooding the journal.
        let repeat = g.last_link_log.as_ref().is_some_and(|(w, at)| w == why && at.elapsed() < Duration::from_secs(60));
        if !repeat {
            tracing::warn!(group = %self.cfg.name, peer = %self.cfg.peer, reason = why, "replication link down");
            g.last_link_log = Some((why.to_string(), Instant::now()));
        }
        // A fenced node or a split brain keeps its own explanation (what to
        // run), and a group no longer paired has no link to explain (its
        // session's end after a `pair delete`); the link error is only in
        // the log then.
        if g.persisted.role.superseded_by() == 0 && g.state != PairState::SplitBrain && g.role() != Role::None {
            g.last_error = Some(format!("replication link to {}: {why}", self.cfg.peer));
        }
        self.progress.send_modify(|p| p.connected = false);
        self.publish(&mut g);
    }

    /// A sync write waited `link_timeout` for the secondary: treat the link
    /// as lost (suspend, per `on_link_loss`) and end the session.
    fn ack_timeout(&self) {
        let mut g = lock(&self.inner);
        if self.cfg.on_link_loss == LinkLossPolicy::Suspend && matches!(g.state, PairState::Pair | PairState::Copy) {
            self.transition(&mut g, PairEvent::LinkDown, "secondary did not acknowledge within link_timeout");
            drop(g);
            self.session_kick.send_modify(|k| *k += 1);
        }
    }

    /// A new, empty journal (keyed by `pair_id` and `epoch`, the epoch the
    /// group is in once it is installed) for this node's role in the pair:
    /// at pair create and at every role change (the old one is fully
    /// applied and shipped by then).
    async fn fresh_journal(&self, pair_id: u64, epoch: u64) -> Result<Journal, GroupError> {
        let path = journal_path(&self.store);
        Ok(Journal::open(&self.engine, &path, self.cfg.journal_size, &self.cfg.name, pair_id, epoch, true).await?)
    }

    /// Waits until every record this node sequenced as a primary is in the
    /// journal file. Writes admitted before `pair delete` (or before the
    /// pair's end as a former primary) may still be on their way to it,
    /// through the old journal's descriptor; a fresh journal reuses the
    /// file (the same inode when its size is unchanged), and such an append
    /// landing after the new pair's records passed its position would end
    /// their run there at the next recovery. Call before starting a new
    /// journal in a file this node may have written as a primary.
    pub(super) async fn settle_appends(&self) -> Result<(), GroupError> {
        let last = lock(&self.inner).last_jseq;
        match tokio::time::timeout(SETTLE_APPENDS, self.wait_journaled_through(last)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(GroupError::Failed(format!("group {}: {e}", self.cfg.name))),
            Err(_) => {
                let why =
                    lock(&self.inner).last_error.clone().map(|e| format!(" (last error: {e})")).unwrap_or_default();
                Err(GroupError::Failed(format!(
                    "group {}: writes taken before the pair ended are still on their way to the journal{why}; retry \
                     in a moment",
                    self.cfg.name
                )))
            }
        }
    }

    /// Lifecycle commands are refused once the group stopped after a local
    /// failure: its volumes may have lost writes only the journal (or the
    /// restore journal) holds, and only the replay at the next start puts
    /// them back. A resync would copy the damaged image over the replica, a
    /// delete would discard the journal, a takeover would promote it.
    pub(super) fn refuse_if_stopped(&self) -> Result<(), GroupError> {
        match self.stopped.get() {
            Some(why) => Err(GroupError::Refused(format!(
                "group {}: stopped after a local failure ({why}); restart the daemon once the disk is healthy \
                 (the restart replays the journal), then run the command again",
                self.cfg.name
            ))),
            None => Ok(()),
        }
    }

    /// `pair create` on the future primary.
    pub async fn pair_create(&self, nocopy: bool) -> Result<String, GroupError> {
        self.refuse_if_stopped()?;
        {
            let mut g = lock(&self.inner);
            self.refuse_unless_simplex(&g)?;
            if g.creating {
                return Err(GroupError::Refused(format!(
                    "group {}: `pair create` is already running here",
                    self.cfg.name
                )));
            }
            g.creating = true;
        }
        /// Ends `creating` however `pair create` ends.
        struct Creating<'a>(&'a Group);
        impl Drop for Creating<'_> {
            fn drop(&mut self) {
                lock(&self.0.inner).creating = false;
            }
        }
        let _creating = Creating(self);
        self.settle_appends().await?;
        let pair_id = random_u64();
        // A new pair starts in epoch 0.
        let journal = self.fresh_journal(pair_id, 0).await?;
        let save = {
            let mut g = lock(&self.inner);
            self.refuse_unless_simplex(&g)?;
            let capacity = journal.capacity();
            let primary = PrimaryState {
                journal_tail_seq: g.last_jseq + 1,
                journal_tail_pos: JOURNAL_SUPERBLOCK_LEN,
                copy_pending: !nocopy,
                announce: if nocopy { Announce::CreateNocopy } else { Announce::CreateCopy },
                ..PrimaryState::default()
            };
            g.journal = Some(Arc::new(journal));
            g.persisted = GroupState {
                role: RoleState::Primary(primary),
                pair_id,
                generation: 1,
                epoch: 0,
                clean_shutdown: false,
                ..GroupState::simplex()
            };
            for b in &mut g.bitmaps {
                *b = DirtyBitmap::new(b.volume_size(), b.granularity());
                if !nocopy {
                    b.set_all();
                }
            }
            g.activity.clear();
            let mut ring = JournalRing::new(capacity);
            ring.reset_at(JOURNAL_SUPERBLOCK_LEN);
            g.ring = Some(ring);
            g.entries.clear();
            g.cached_bytes = 0;
            g.refusal = None;
            g.link_down_since = Some(Instant::now());
            match g.state.apply(PairEvent::Create { copy: !nocopy }) {
                Ok(s) => g.state = s,
                Err(e) => return Err(GroupError::Refused(e.to_string())),
            }
            self.reset_progress(g.last_jseq, false);
            let save = self.save_later(&mut g);
            self.publish(&mut g);
            save
        };
        self.saved(save).await?;
        tracing::info!(group = %self.cfg.name, copy = !nocopy, "pair create: this node is now primary");
        Ok(if nocopy {
            format!("group {}: paired as primary without initial copy (--nocopy: you vouch that both sites hold identical data)", self.cfg.name)
        } else {
            format!(
                "group {}: paired as primary; the initial copy starts as soon as {} is reachable",
                self.cfg.name, self.cfg.peer
            )
        })
    }

    fn refuse_unless_simplex(&self, g: &Inner) -> Result<(), GroupError> {
        if g.role() == Role::None {
            return Ok(());
        }
        Err(GroupError::Refused(format!(
            "group {} is already paired here as {} ({}); run `replicator pair delete {}` first",
            self.cfg.name,
            g.role().as_str(),
            g.state,
            self.cfg.name
        )))
    }

    /// `pair delete`: ends the pair on both sites when the peer is
    /// reachable. On the primary the secondary is told in stream order
    /// (after every record already sent) and confirms once its last applies
    /// are durable; on the secondary the session stops applying, asks the
    /// primary to dissolve, and only then makes the volumes writable here.
    pub async fn pair_delete(&self) -> Result<String, GroupError> {
        let name = &self.cfg.name;
        let peer = &self.cfg.peer;
        enum Next {
            AskSession(mpsc::UnboundedSender<SessionCommand>),
            AwaitConfirmation(Option<oneshot::Receiver<Result<(), String>>>),
            Done(String),
        }
        let (next, save) = {
            let mut g = lock(&self.inner);
            // Under the lock: a session that fail-stops the group (its
            // restore journal holds writes not on the volumes) does so
            // before it detaches, so "no session" here means not stopped.
            self.refuse_if_stopped()?;
            match g.role() {
                // Nothing to end: said so, and not an error (a runbook may
                // delete on both sites, the first delete having ended both).
                Role::None => return Ok(format!("group {name} is not paired here (SIMPLEX): nothing to delete")),
                Role::Secondary => match g.session_cmd.clone() {
                    Some(session) => (Next::AskSession(session), None),
                    None if g.drill_starting => {
                        // Its volumes would become writable under a drill
                        // copy being taken of them.
                        return Err(GroupError::Failed(format!(
                            "group {name}: a drill is starting here; retry in a moment"
                        )));
                    }
                    None if g.persisted.role.as_secondary().is_some_and(|s| s.primary_left_pair) => {
                        let save = self.dissolve(&mut g, "pair delete on the secondary whose primary left the pair");
                        let done = Next::Done(format!(
                            "group {name}: pair deleted here; {peer} had left the pair already: the volumes here are \
                             standalone, nothing to run on {peer}"
                        ));
                        (done, Some(save))
                    }
                    None => {
                        let save =
                            self.dissolve(&mut g, "pair delete on the secondary while the primary is unreachable");
                        let done = Next::Done(format!(
                            "group {name}: pair deleted here; {peer} (the primary) was not connected and still considers itself paired: \
                             it will report that this node left the pair when it reconnects; run `replicator pair delete {name}` there too"
                        ));
                        (done, Some(save))
                    }
                },
                Role::Primary => {
                    if g.switchover.is_some() && !Self::awaiting_hand_over(&g) {
                        return Err(GroupError::Failed(format!(
                            "group {name}: a switchover is running; see `replicator status {name}` and try again"
                        )));
                    }
                    // A switchover whose request is unanswered (the peer is
                    // gone): the admin gives the peer up; the volumes here
                    // become standalone, whatever the peer did.
                    let _ = self.abandon_hand_over(&mut g, Some("the pair was deleted here".into()));
                    let confirmation = self.progress.borrow().connected.then(|| {
                        let (tx, rx) = oneshot::channel();
                        g.delete_ack = Some(tx);
                        rx
                    });
                    let save = self.dissolve(&mut g, "pair delete on the primary");
                    (Next::AwaitConfirmation(confirmation), Some(save))
                }
            }
        };
        if let Some(save) = save {
            self.dissolved(save).await?;
        }
        match next {
            Next::Done(msg) => Ok(msg),
            Next::AskSession(session) => {
                let (tx, rx) = oneshot::channel();
                if session.send(SessionCommand::Delete(tx)).is_err() {
                    return Err(GroupError::Refused(format!(
                        "group {name}: the replication session is ending; run the command again"
                    )));
                }
                match tokio::time::timeout(Duration::from_secs(30), rx).await {
                    Ok(Ok(answer)) => answer,
                    // Not "nothing changed": the session may still finish it.
                    _ => Err(GroupError::Failed(format!(
                        "group {name}: the replication session did not finish the delete within 30 s; check `replicator status {name}`"
                    ))),
                }
            }
            Next::AwaitConfirmation(confirmation) => {
                let told = confirmation.is_some();
                let confirmed = match confirmation {
                    Some(rx) => match tokio::time::timeout(Duration::from_secs(15), rx).await {
                        Ok(Ok(Ok(()))) => true,
                        Ok(Ok(Err(e))) => {
                            return Err(GroupError::Failed(format!(
                                "group {name}: pair deleted here; {peer} stopped replicating: {e}"
                            )))
                        }
                        _ => false,
                    },
                    None => false,
                };
                Ok(if confirmed {
                    format!("group {name}: pair deleted on both sites; the volumes here and on {peer} are now standalone (SIMPLEX)")
                } else if told {
                    format!(
                        "group {name}: pair deleted here; {peer} did not confirm within 15 s and may still consider \
                         itself paired: check `replicator status {name}` there, and run `replicator pair delete {name}` \
                         there if it is not SIMPLEX"
                    )
                } else {
                    format!(
                        "group {name}: pair deleted here; {peer} was not connected, so it was not told: unless it is \
                         SIMPLEX already (`replicator status {name}` there), run `replicator pair delete {name}` there \
                         too"
                    )
                })
            }
        }
    }

    /// Ends the pair on this node: SIMPLEX, volumes standalone, the journal
    /// closed, the replication session told to end. Returns the save that
    /// makes it durable, for [`Group::dissolved`].
    fn dissolve(&self, g: &mut Inner, why: &str) -> u64 {
        let simplex = SimplexState { former_pair_id: g.persisted.pair_id, written_standalone: false };
        g.state = PairState::Simplex;
        g.persisted = GroupState { role: RoleState::Simplex(simplex), clean_shutdown: false, ..GroupState::simplex() };
        g.ring = None;
        g.journal = None;
        g.entries.clear();
        g.cached_bytes = 0;
        g.refusal = None;
        g.peer_left_written = false;
        // What the pair's end leaves to say is the message of the command
        // or event that ended it, not a pair error (a group stopped after a
        // local failure keeps saying why).
        if self.stopped.get().is_none() {
            g.last_error = None;
        }
        let save = self.save_later(g);
        self.publish(g);
        tracing::info!(group = %self.cfg.name, reason = why, "pair deleted: group is SIMPLEX, volumes standalone");
        self.session_kick.send_modify(|k| *k += 1);
        save
    }

    /// The peer refused the session: record why; a refusal that means the
    /// pair no longer exists on the peer changes this node's state.
    fn peer_refused(&self, kind: pb::Refusal, msg: &str, peer_generation: u64) {
        let mut g = lock(&self.inner);
        if peer_generation > g.persisted.generation {
            self.drop_stale_hand_over(&mut g);
        }
        let standing = applier::standing(self, &g);
        g.peer_left_written = kind == pb::Refusal::WrittenStandalone;
        let label = match on_refusal(&standing, kind, peer_generation) {
            Answer::Fence => {
                self.fence(&mut g, peer_generation, None);
                return;
            }
            Answer::SplitBrain => {
                self.transition(&mut g, PairEvent::SplitBrainDetected, msg);
                Some("split-brain")
            }
            // An admin split the pair on the secondary: nothing resumes
            // until `pair resync` here.
            Answer::Split => {
                self.transition(&mut g, PairEvent::AdminSplit, "the secondary was split by an admin");
                g.last_error = None;
                return;
            }
            // The session rebases the peer (see `rebase_peer`).
            Answer::Rebase { .. } => return,
            Answer::Retry => match kind {
                pb::Refusal::Config => Some("config"),
                pb::Refusal::NoConsent => Some("no-consent"),
                pb::Refusal::InUse => Some("in-use"),
                pb::Refusal::NotPaired => {
                    self.transition(&mut g, PairEvent::Failure, "the peer is not in this pair: it left it");
                    Some("not-paired")
                }
                // A former primary that a failover here superseded: it takes
                // no writes and waits for an admin; this node stays primary.
                pb::Refusal::Fenced => Some("peer-fenced"),
                // Both sites ran `pair create`: an admin deletes one.
                pb::Refusal::AlsoPrimary => Some("peer-primary"),
                _ => None,
            },
        };
        g.last_error = Some(msg.to_string());
        if label.is_some() && g.refusal != label {
            tracing::error!(group = %self.cfg.name, peer = %self.cfg.peer, "{msg}");
        }
        g.refusal = label;
    }

    /// After [`Group::dissolve`]: once the end of the pair is on disk, the
    /// image a resync preserved is no longer needed.
    async fn dissolved(&self, save: u64) -> Result<(), GroupError> {
        self.saved(save).await?;
        self.release_image("pair deleted");
        Ok(())
    }

    /// The peer ran `pair delete` while connected (secondary -> primary).
    async fn peer_deleted(&self) {
        let save = {
            let mut g = lock(&self.inner);
            if g.role() == Role::None {
                return;
            }
            self.dissolve(&mut g, "the peer ran pair delete")
        };
        if let Err(e) = self.dissolved(save).await {
            tracing::error!(group = %self.cfg.name, "{e}");
        }
    }

    /// Whether this node consents, now, to become the group's secondary
    /// when the peer runs `pair create` (`accept_pair_create`).
    pub fn accepts_pair_create(&self) -> bool {
        self.accept_pair_create.load(Ordering::SeqCst)
    }

    /// Applies `accept_pair_create` from a reloaded configuration (SIGHUP).
    /// Returns `None` if it did not change, else whether this node is
    /// already the group's secondary: taken under the group lock, as the
    /// check of a peer's pair create is, so the answer is the truth at the
    /// change. A pair create the peer retries from then on meets the new
    /// answer; a pair already formed is not affected.
    pub fn set_accept_pair_create(&self, accept: bool) -> Option<bool> {
        let g = lock(&self.inner);
        (self.accept_pair_create.swap(accept, Ordering::SeqCst) != accept).then(|| g.role() == Role::Secondary)
    }

    /// An NBD client attached one of this group's volumes; the guard
    /// detaches it.
    pub fn attach_client(self: &Arc<Self>) -> ClientGuard {
        self.nbd_clients.fetch_add(1, Ordering::SeqCst);
        ClientGuard(self.clone())
    }

    /// Marks the group cleanly stopped (after every write finished), unless
    /// its final flush failed or it stopped after a local failure: then the
    /// next start replays its journal, and the reason is returned.
    pub async fn shutdown(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for v in &self.volumes {
            if let Err(e) = v.sync().await {
                problems.push(format!("volume {}: final flush failed: {e}", v.name));
            }
            if let Err(e) = v.flush_snapshots().await {
                problems.push(format!("volume {}: final flush of its drill copy failed: {e}", v.name));
            }
        }
        if let Some(j) = self.journal_handle() {
            if let Err(e) = j.sync().await {
                problems.push(format!("journal: final flush failed: {e}"));
            }
        }
        if let Some(why) = self.stopped.get() {
            problems.push(format!("stopped after a local failure ({why})"));
        }
        let save = {
            let mut g = lock(&self.inner);
            g.persisted.clean_shutdown = problems.is_empty();
            self.save_later(&mut g)
        };
        if let Err(e) = self.saved(save).await {
            problems.push(format!("saving its state failed: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("group {}: {}", self.cfg.name, problems.join("; ")))
        }
    }

    /// The status view of this group.
    pub fn status(&self) -> GroupStatus {
        // Outside the group lock: the transport has locks of its own.
        let link_rtt_seconds = self.transport.rtt(&self.cfg.peer).map(|d| d.as_secs_f64());
        let latency = self.latency().summary();
        let drill = self.drill_status();
        let g = lock(&self.inner);
        let p = self.progress.borrow().clone();
        let (applied, durable, connected) = match g.role() {
            Role::Secondary => (g.secondary_applied, g.secondary_durable, g.secondary_attached),
            _ => (p.applied, p.durable, p.connected),
        };
        let last = g.last_jseq;
        let lag_records = if g.role() == Role::Primary { last.saturating_sub(applied) } else { 0 };
        let lag_bytes = match (g.role(), g.entries.values().next(), g.entries.values().next_back()) {
            (Role::Primary, Some(first), Some(newest)) => {
                let base = g
                    .entries
                    .range(..=applied)
                    .next_back()
                    .map(|(_, e)| e.cumulative)
                    .unwrap_or(first.cumulative - first.span);
                newest.cumulative.saturating_sub(base)
            }
            _ => 0,
        };
        // The age of the oldest write the secondary has not applied: the
        // oldest such record, or the first write the journal never saw
        // (the secondary lacks it until the resync completes).
        let oldest_unapplied_us = match g.entries.range(applied + 1..).next() {
            Some((_, e)) if g.role() == Role::Primary => Some(e.written_at_us),
            _ => None,
        };
        let resync_gap_us = g.persisted.role.as_primary().map(|p| p.resync_gap_at_us).filter(|&t| t > 0);
        let lag_seconds = oldest_unapplied_us
            .into_iter()
            .chain(resync_gap_us)
            .min()
            .map_or(0.0, |t| unix_micros().saturating_sub(t) as f64 / 1_000_000.0);
        let (journal_used, journal_capacity) =
            g.ring.as_ref().map(|r| (r.used_bytes(), r.capacity_bytes())).unwrap_or((0, self.cfg.journal_size));
        // A group that stopped after a local failure takes no writes until
        // a restart, whatever its pair state says meanwhile.
        let health =
            if self.stopped.get().is_some() { Health::Critical } else { Health::of(g.state, connected, g.rpo_zero) };
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let data_as_of_us = g.persisted.role.as_secondary().map_or(0, |s| s.data_as_of_us);
        GroupStatus {
            group: self.cfg.name.clone(),
            health: health.as_str().to_string(),
            disconnected_since_unix: (g.role() != Role::None && !connected).then(|| unix(g.link_changed_at)),
            peer_state: g.peer_state.clone(),
            peer_contact_unix: g.peer_contact.map(unix),
            rpo_zero: g.rpo_zero,
            writes_wait_for_secondary: g.role() == Role::Primary && p.sync_wait,
            rpo_zero_lost_since_unix: g.rpo_zero_lost_at.map(unix),
            data_as_of_unix: (data_as_of_us > 0).then(|| data_as_of_us as f64 / 1e6),
            refusal: g.refusal.map(str::to_string),
            role: g.role().as_str().to_string(),
            state: g.state.name().to_string(),
            reason: g.state.reason().map(|r| r.as_str().to_string()),
            mode: self.cfg.mode.as_str().to_string(),
            peer: self.cfg.peer.clone(),
            connected,
            generation: g.persisted.generation,
            epoch: g.persisted.epoch,
            superseded_by: g.persisted.role.superseded_by(),
            last_seq: if g.role() == Role::Secondary { g.secondary_applied } else { last },
            applied_seq: applied,
            durable_seq: durable,
            lag_records,
            lag_bytes,
            lag_seconds,
            journal_used_bytes: journal_used,
            journal_capacity_bytes: journal_capacity,
            dirty_bytes: g.bitmaps.iter().map(DirtyBitmap::dirty_bytes).sum(),
            activity_log_bytes: if g.role() == Role::Primary {
                g.activity.len() as u64 * g.activity.extent()
            } else {
                0
            },
            copy_total_bytes: g.copy_total_now(),
            copy_done_bytes: g.copy_done,
            copy_sent_bytes: g.copy_sent,
            consistent: g.persisted.role.consistent(),
            // Not while the roles change here (writes are refused then,
            // and NBD clients cannot attach).
            writable: g.role_writable() && !g.switching && !g.taking_over && g.swapped_away().is_none(),
            needs_rebase: g.persisted.role.needs_rebase(),
            io_backend: self.engine.backend().to_string(),
            direct_io: self.volumes.iter().all(|v| v.file().is_direct()),
            // An unanswered switchover says why no writes are taken, over
            // whatever the attempts to reach the peer last said.
            last_error: match g.switchover.as_ref() {
                Some(s) if s.sent => Some(format!(
                    "switchover: {} was asked to take over after record {}; no writes are taken here until it \
                     answers, as the new primary or as this node's secondary still",
                    self.cfg.peer, s.seq
                )),
                _ if g.switching => Some(format!(
                    "a switchover is running: no writes are taken here until {} has every record (or it is \
                     abandoned)",
                    self.cfg.peer
                )),
                _ => match g.swapped_away() {
                    Some(generation) => Some(self.swapped_away_text(generation)),
                    None => g.last_error.clone(),
                },
            },
            volumes: self
                .volumes
                .iter()
                .map(|v| VolumeStatus { name: v.name.clone(), path: v.file().path().to_path_buf(), size: v.size() })
                .collect(),
            uptime_seconds: self.started.elapsed().as_secs(),
            // A connection whose session broke keeps its last estimate
            // until QUIC gives it up: not a link that answers.
            link_rtt_seconds: link_rtt_seconds.filter(|_| connected),
            shipped_bytes: self.counters.shipped_bytes.get(),
            writes: latency.count,
            write_latency_mean_seconds: latency.mean_seconds,
            write_latency_p99_at_most_seconds: latency.p99_at_most_seconds,
            drill,
            failover_image: self.failover_image(&g),
        }
    }
}

/// Counts an attached NBD client while it lives.
#[derive(Debug)]
pub struct ClientGuard(Arc<Group>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.nbd_clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `status --json` schema for one group (stable; documented in the README).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct GroupStatus {
    /// Group name.
    pub group: String,
    /// "ok" (SIMPLEX, or PAIR with a live session), "degraded" (COPY,
    /// SUSPENDED for link, journal-full or split, or no live session) or
    /// "critical" (SUSPENDED(error), SPLIT-BRAIN). `replicator status`
    /// exits 0, 4 or 5 accordingly (the worst group counts).
    pub health: String,
    /// When no replication session is up (paired groups): since when,
    /// in seconds since the Unix epoch (null while connected or SIMPLEX).
    pub disconnected_since_unix: Option<u64>,
    /// The peer's role and pair state as it last said ("secondary PAIR").
    #[serde(default)]
    pub peer_state: Option<String>,
    /// When this node last heard from the peer (seconds since the epoch).
    #[serde(default)]
    pub peer_contact_unix: Option<u64>,
    /// Sync-mode primary: whether RPO 0 is in force (every acknowledged
    /// write is on a consistent secondary); null otherwise.
    #[serde(default)]
    pub rpo_zero: Option<bool>,
    /// When RPO 0 stopped being in force (seconds since the epoch).
    #[serde(default)]
    pub rpo_zero_lost_since_unix: Option<u64>,
    /// Primary: a write is acknowledged only once the secondary has it
    /// (sync mode, caught up, also with the link lost under
    /// `on_link_loss = "block"`: writes then wait).
    #[serde(default)]
    pub writes_wait_for_secondary: bool,
    /// Secondary: the primary's time of the newest write this replica
    /// holds durably ("data as of"), seconds since the Unix epoch.
    pub data_as_of_unix: Option<f64>,
    /// The peer's last refusal that retrying alone cannot fix: "config",
    /// "no-consent", "in-use", "not-paired" or "split-brain"
    /// (`last_error` has the peer's words).
    pub refusal: Option<String>,
    /// "none", "primary" or "secondary".
    pub role: String,
    /// SIMPLEX, COPY, PAIR, SUSPENDED or SPLIT-BRAIN.
    pub state: String,
    /// With SUSPENDED: split, link, journal-full or error.
    pub reason: Option<String>,
    /// sync or async.
    pub mode: String,
    /// Peer node name.
    pub peer: String,
    /// A replication session with the peer is up.
    pub connected: bool,
    /// Promotion generation (pair create: 1; each failover adds one).
    pub generation: u64,
    /// Unclean restarts of the primary in this generation (each one
    /// resynchronises the activity log's regions).
    #[serde(default)]
    pub epoch: u64,
    /// A fenced former primary: the generation of the failover that
    /// superseded it (0: not fenced).
    #[serde(default)]
    pub superseded_by: u64,
    /// Newest sequence (primary: journaled; secondary: applied).
    pub last_seq: u64,
    /// Secondary has applied through here.
    pub applied_seq: u64,
    /// Secondary has made durable through here.
    pub durable_seq: u64,
    /// Records not yet applied on the secondary.
    pub lag_records: u64,
    /// Journal bytes not yet applied on the secondary.
    pub lag_bytes: u64,
    /// Age of the oldest write the secondary lacks: a record not applied,
    /// or one tracked in the dirty bitmaps until the resync completes.
    pub lag_seconds: f64,
    /// Journal bytes in use.
    pub journal_used_bytes: u64,
    /// Journal ring size.
    pub journal_capacity_bytes: u64,
    /// Bytes marked dirty in the bitmaps (to be copied by a resync).
    pub dirty_bytes: u64,
    /// Primary: bytes in the activity log's regions, which a power cut
    /// would resynchronise.
    pub activity_log_bytes: u64,
    /// Bytes the running copy has to send in all.
    pub copy_total_bytes: u64,
    /// Bytes the running copy has sent and had acknowledged durable.
    pub copy_done_bytes: u64,
    /// Of those, bytes sent as data: regions whose hash differed on the
    /// secondary (the rest matched and were skipped).
    #[serde(default)]
    pub copy_sent_bytes: u64,
    /// This node's volumes hold a write-order-consistent image.
    pub consistent: bool,
    /// Clients may write the volumes here (a primary not fenced, a
    /// standalone group, or a secondary split with `--rw`).
    #[serde(default)]
    pub writable: bool,
    /// Secondary: its volumes hold writes the primary lacks (failback,
    /// `--discard-local`, writes while split); the next resync copies those
    /// regions.
    #[serde(default)]
    pub needs_rebase: bool,
    /// "io_uring" or "threads".
    pub io_backend: String,
    /// Every volume is opened with O_DIRECT.
    pub direct_io: bool,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Volumes.
    pub volumes: Vec<VolumeStatus>,
    /// Seconds since the daemon opened the group.
    pub uptime_seconds: u64,
    /// Round-trip time of the connection to the peer as QUIC estimates it
    /// (null while none is open).
    #[serde(default)]
    pub link_rtt_seconds: Option<f64>,
    /// Bytes of volume covered by the records this node shipped since the
    /// daemon started (primary).
    #[serde(default)]
    pub shipped_bytes: u64,
    /// Client writes since the daemon started.
    #[serde(default)]
    pub writes: u64,
    /// Their mean latency (sync mode: with the secondary); null without
    /// writes.
    #[serde(default)]
    pub write_latency_mean_seconds: Option<f64>,
    /// Their 99th percentile lies at or under this histogram bound (null
    /// without writes, or past 5 s).
    #[serde(default)]
    pub write_latency_p99_at_most_seconds: Option<f64>,
    /// The running drill (`drill start`), if any.
    #[serde(default)]
    pub drill: Option<DrillStatus>,
    /// Secondary: the image a failover here would promote (null elsewhere).
    #[serde(default)]
    pub failover_image: Option<FailoverImage>,
}

/// How a group is doing, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    /// Not paired, or replicating with a live session.
    Ok,
    /// Paired but not protected right now (copy running, suspended, no
    /// live session).
    Degraded,
    /// Needs an admin: an error suspended the pair, or split brain.
    Critical,
}

impl Health {
    /// The health of a group in `state`, with or without a live session;
    /// `rpo_zero` on a sync primary (a PAIR catching up after writes
    /// acknowledged alone is not protected yet).
    pub fn of(state: PairState, connected: bool, rpo_zero: Option<bool>) -> Health {
        match state {
            PairState::Simplex => Health::Ok,
            PairState::Pair if connected && rpo_zero != Some(false) => Health::Ok,
            PairState::SplitBrain | PairState::Suspended(SuspendReason::Error) => Health::Critical,
            _ => Health::Degraded,
        }
    }

    /// "ok", "degraded" or "critical".
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Critical => "critical",
        }
    }

    /// Parses [`Health::as_str`] (an unknown string counts as critical).
    pub fn parse(s: &str) -> Health {
        match s {
            "ok" => Health::Ok,
            "degraded" => Health::Degraded,
            _ => Health::Critical,
        }
    }
}

/// One volume in `GroupStatus`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VolumeStatus {
    /// Volume (export) name.
    pub name: String,
    /// Backing device or file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// Replays every retained journal record onto this node's volumes, in
/// sequence order, and syncs them. On the primary after an unclean stop (a
/// record may be journaled while its volume write never happened, and the
/// secondary will receive it); on a secondary at every start (its restore
/// journal holds what it received beyond its checkpoint). Returns the
/// primary's write time of the newest record (0 when none).
///
/// On the primary, a record overlapping a region dirty in the bitmaps is not
/// replayed: later writes (tracked there while the journal was full) may
/// have overwritten it on the volume, and replaying it would undo them. Its
/// whole range is marked dirty instead, so the resync copies the volume's
/// current bytes.
/// What a primary's journal replay must not undo: its dirty bitmaps and
/// its replay fence (see [`replicator_protocol::bitmap::plan_replay`]).
struct ReplayPlan<'a> {
    bitmaps: &'a mut Vec<DirtyBitmap>,
    fence: u64,
}

/// Replays a journal's run through `last` onto the volumes and syncs them;
/// returns the primary's time of the newest record replayed and how many
/// records `plan` left to the resync instead (their regions marked dirty).
async fn redo_journal(
    j: &Journal,
    ring: &JournalRing,
    last: u64,
    volumes: &[Arc<Volume>],
    plan: Option<ReplayPlan<'_>>,
) -> Result<(u64, usize), GroupError> {
    let Some(oldest) = ring.oldest_seq() else { return Ok((0, 0)) };
    let mut run = Vec::new();
    for seq in oldest..=last {
        if let Some((pos, _)) = ring.lookup(seq) {
            run.push((seq, pos));
        }
    }
    let replay = match plan {
        // A primary: decided from the headers, newest first, before any
        // byte is written.
        Some(ReplayPlan { bitmaps, fence }) => {
            let mut extents = Vec::with_capacity(run.len());
            for &(seq, pos) in &run {
                let h = j.read_header(pos, seq).await?;
                extents.push((seq, h.volume, h.offset, u64::from(h.length)));
            }
            plan_replay(bitmaps, &extents, fence)
        }
        None => vec![true; run.len()],
    };
    let mut newest = 0;
    for (&(seq, pos), _) in run.iter().zip(&replay).filter(|(_, replay)| **replay) {
        let rec = j.read_record(pos, seq).await?;
        let vol = volumes.get(rec.volume as usize).ok_or_else(|| {
            GroupError::Replay(format!("record {seq} names volume #{} which is not configured", rec.volume))
        })?;
        vol.apply(&rec).await.map_err(|e| GroupError::Replay(format!("record {seq}: {e}")))?;
        newest = newest.max(rec.written_at_us);
    }
    for v in volumes {
        v.sync().await.map_err(|e| GroupError::Replay(e.to_string()))?;
    }
    let skipped = replay.iter().filter(|r| !**r).count();
    tracing::info!(records = run.len(), skipped, "replayed the journal onto the local volumes");
    Ok((newest, skipped))
}

/// Opens a secondary's restore journal and applies what it holds beyond the
/// checkpoint, so the volumes are again the primary's image after exactly
/// the writes through the newest record it holds, whatever stopped the
/// daemon (a clean stop drains it first; after a crash or a power cut only
/// records durable in it were ever applied). Moves the checkpoint there.
async fn recover_restore_journal(
    engine: &IoEngine,
    store: &StateFile,
    cfg: &GroupConfig,
    volumes: &[Arc<Volume>],
    (pair_id, epoch): (u64, u64),
    persisted: &mut SecondaryState,
    was_clean: bool,
) -> Result<Journal, GroupError> {
    // Keyed with the epoch this node rebased in: its records since were
    // written in it.
    let path = journal_path(store);
    let mut j = match Journal::open(engine, &path, cfg.journal_size, &cfg.name, pair_id, epoch, false).await {
        // The pair was accepted (its state saved) and the daemon stopped
        // before the restore journal was started over for it: the
        // superblock is the one of an earlier pair, and since records of a
        // pair are appended only after its superblock is durable, the file
        // holds none of this one's. The volumes hold the checkpoint.
        Err(JournalError::Foreign { group, pair_id: found, .. }) if group == cfg.name => {
            tracing::warn!(
                group = %cfg.name,
                path = %path.display(),
                "restore journal: the file is still the one of pair {found:016x}, which this node left; starting it \
                 over for pair {pair_id:016x}"
            );
            Journal::open(engine, &path, cfg.journal_size, &cfg.name, pair_id, epoch, true).await?
        }
        opened => opened?,
    };
    let stop = if was_clean { Stop::Clean } else { Stop::Unclean };
    let from = persisted.durable_seq + 1;
    let recovered = j.recover(from, persisted.journal_tail_pos, stop).await?;
    let last = recovered.last_seq;
    if last >= from {
        let (newest, _) = redo_journal(&j, &recovered.ring, last, volumes, None).await?;
        persisted.data_as_of_us = persisted.data_as_of_us.max(newest);
        tracing::info!(
            group = %cfg.name,
            from,
            through = last,
            "restore journal: applied the records it held beyond the checkpoint; the replica is the primary's image after write {last}"
        );
    }
    persisted.durable_seq = last;
    persisted.journal_tail_seq = last + 1;
    persisted.journal_tail_pos = recovered.ring.head();
    persisted.consistent = !persisted.copy_incomplete;
    Ok(j)
}

fn journal_path(store: &StateFile) -> PathBuf {
    store.dir().join("journal")
}

/// A bitmap or activity-log file open for saves, with the bytes last
/// saved to it (`None` until a save succeeds).
#[derive(Debug)]
struct MetadataFile {
    blob: Blob,
    saved: Option<Vec<u8>>,
}

fn bitmap_name(volume: &str) -> String {
    format!("bitmap-{volume}")
}

/// Longest [`Group::settle_appends`] waits for the appends of writes
/// admitted before a pair ended.
const SETTLE_APPENDS: Duration = Duration::from_secs(10);

/// File name of the activity log in the group directory.
const ACTIVITY_LOG: &str = "activity-log";

/// How long writes wait for a metadata save that keeps failing (a full or
/// failing `state_dir`) before the group stops and fails them.
const SAVE_FAILING_LIMIT: Duration = Duration::from_secs(20);
/// A region leaves the activity log once its writes are durable on both
/// sites and it has been idle this long (a busy region is saved once).
const ACTIVITY_IDLE: Duration = Duration::from_secs(10);
/// How often housekeeping syncs the volumes so regions can retire.
const DURABILITY_SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// The persisted activity log, `None` when absent or unreadable (after a
/// power cut that means: resync whole volumes).
fn load_activity_log(store: &StateFile) -> Option<ActivityLog> {
    match store.load_blob(ACTIVITY_LOG) {
        Ok(Some(bytes)) => match ActivityLog::decode(&bytes) {
            Ok(al) => Some(al),
            Err(e) => {
                tracing::warn!(dir = %store.dir().display(), "activity log unreadable: {e}");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}

/// This kernel boot's id (empty if unknown; an empty id recorded before is
/// never taken for a reboot).
fn current_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The persisted dirty bitmaps, and whether one was unreadable (and so
/// marked dirty whole).
fn load_bitmaps(store: &StateFile, volumes: &[Arc<Volume>]) -> Result<(Vec<DirtyBitmap>, bool), GroupError> {
    let mut out = Vec::new();
    let mut lost = false;
    for v in volumes {
        let fresh = || DirtyBitmap::new(v.size(), DEFAULT_GRANULARITY);
        let readable = match store.load_blob(&bitmap_name(&v.name)) {
            Ok(None) => Some(fresh()),
            Ok(Some(bytes)) => DirtyBitmap::decode(&bytes).ok().filter(|b| b.volume_size() == v.size()),
            // Neither copy intact: as unreadable as a bitmap that does not decode.
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::InvalidData => None,
            Err(e) => return Err(e.into()),
        };
        out.push(readable.unwrap_or_else(|| {
            tracing::warn!(volume = %v.name, "dirty bitmap unreadable or for another size: marking the whole volume dirty");
            lost = true;
            let mut b = fresh();
            b.set_all();
            b
        }));
    }
    Ok((out, lost))
}

/// A random 64-bit id (pair ids), from the kernel's CSPRNG.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// A write's watch on the secondary's checkpoint while it waits for what
/// only the checkpoint's progress frees (room in the activity log, journal
/// space in sync mode): a checkpoint that does not move for `link_timeout`
/// is a secondary that does not acknowledge (`Group::ack_timeout`).
#[derive(Debug, Default)]
pub(super) struct CheckpointWatch(Option<(u64, Instant)>);

impl CheckpointWatch {
    /// True once `checkpoint` has not moved for `timeout` since this watch
    /// first saw it (the watch then starts over).
    pub(super) fn stalled(&mut self, checkpoint: u64, timeout: Duration) -> bool {
        match self.0 {
            Some((seen, since)) if seen == checkpoint => {
                let stalled = since.elapsed() >= timeout;
                if stalled {
                    self.0 = None;
                }
                stalled
            }
            _ => {
                self.0 = Some((checkpoint, Instant::now()));
                false
            }
        }
    }

    /// Nothing waits for the checkpoint any more.
    pub(super) fn reset(&mut self) {
        self.0 = None;
    }
}
