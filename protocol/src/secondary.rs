//! The secondary's side of a replication session as a sans-IO state machine.
//!
//! Records from the primary go first into the secondary's **restore
//! journal** (Hitachi Universal Replicator's model), in sequence order, and
//! reach the volumes only once the journal holds them durably. So whatever
//! happens to this node — a crash, a power cut that drops any unsynced
//! page — the volumes never hold a write whose predecessors could be lost:
//! after a restart the journal is replayed from the checkpoint and the group
//! image is again the primary's after exactly the writes `<= N`, across all
//! volumes. Non-overlapping records are still applied concurrently (the
//! [`Applier`] orders overlapping ones); the image a failover or a drill
//! uses is taken after those applies finished, when it is such a prefix.
//!
//! Copy chunks (initial copy, resync) bypass the journal: the image is
//! inconsistent while a copy runs, and that is persisted before the first
//! chunk reaches a volume. A restart replays the restore journal from the
//! persisted checkpoint, so a chunk is reported durable (and the primary
//! forgets it) only once that checkpoint has passed every write received
//! before it: no replay can then put an older write back over its data.
//!
//! The daemon drives one [`Secondary`] per session: it feeds messages and
//! completions in, and performs the [`Action`]s it polls out (append to the
//! journal, sync it, write a record to a volume, sync the volumes, persist
//! the resume point, send a message). Time comes in as arguments; nothing
//! here does I/O.
//!
//! Acks (see `proto/replication.proto`): `received_seq` = in the restore
//! journal (as safe as a plain write here), `applied_seq` = on the volumes,
//! `durable_seq` = durable in the restore journal, `checkpoint_seq` = the
//! same: after any fault this node resumes after it, so the primary may free
//! its journal through it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::apply::{Applier, ApplyError, ApplyId};
use crate::journal_format::{record_span, JournalRing};
use crate::pb::{self, envelope::Body};
use crate::record::Record;

/// Tunables of a secondary session.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// Size of the restore journal file.
    pub journal_capacity: u64,
    /// Size of each volume, in group order.
    pub volume_sizes: Vec<u64>,
    /// Applied records are made durable on the volumes and the journal space
    /// they hold is freed at least this often.
    pub checkpoint_interval: Duration,
    /// Copy data applied beyond this is made durable at once (the primary's
    /// copy window only moves when it is).
    pub copy_flush_bytes: u64,
    /// Copy data applied is made durable at least this often.
    pub copy_sync_interval: Duration,
    /// Copy chunks being written (or compared) at once, at most; the others
    /// wait, so that a copy does not flood the disk queue ahead of
    /// replicated writes.
    pub copy_applies: usize,
    /// Group commit of the restore journal: a record nobody waits for (no
    /// FUA, no flush request, no drain, no shortage of journal space, no
    /// COPY_DONE or freeze pending) is made durable at most this long after
    /// it was appended, with every record appended meanwhile: one fdatasync
    /// (and one batch of applies) for many writes. `ZERO`: at once. Not
    /// while flush requests come often (one within [`RECENT_FLUSH`]: the
    /// primary's clients flush, or its writes wait for room in its activity
    /// log): the next flush request would wait for a whole sync that could
    /// have started with the write. While fewer than
    /// [`SecondaryConfig::journal_sync_batch`] records wait, the sync waits
    /// up to [`SecondaryConfig::journal_sync_delay_light`] instead.
    pub journal_sync_delay: Duration,
    /// Records waiting for the restore journal's sync from which
    /// [`SecondaryConfig::journal_sync_delay`] applies; fewer wait up to
    /// [`SecondaryConfig::journal_sync_delay_light`], until this many have
    /// come. A light load then pays one fdatasync per this many records
    /// rather than one per few, and a heavy one keeps its short delay (its
    /// applies, released together after each sync, come in small batches).
    /// `0`: always `journal_sync_delay`.
    pub journal_sync_batch: u64,
    /// How long a record waits for the restore journal's sync while fewer
    /// than [`SecondaryConfig::journal_sync_batch`] wait (see there).
    pub journal_sync_delay_light: Duration,
    /// The primary answers client writes once this node has their records
    /// (sync mode): an ack that reports a new `received_seq` goes out at
    /// once. Otherwise (async mode) only the acks someone waits for do.
    pub receipt_acked_at_once: bool,
    /// An ack nobody waits for goes out at most this long after the first
    /// change it reports, with every change made meanwhile: one datagram
    /// for many records instead of up to three per record (received,
    /// durable, applied). Acks go out at once when they report a receipt
    /// the primary waits for ([`SecondaryConfig::receipt_acked_at_once`]),
    /// the durability of a journal sync someone waited for (FUA, flush
    /// requests, drains; see [`SecondaryConfig::journal_sync_delay`]), or
    /// copy progress (the primary's copy window). `ZERO`: every ack at
    /// once.
    pub ack_delay: Duration,
    /// Payload bytes of the records taken in and not applied yet that this
    /// node holds in memory, at most (one record more when it alone is
    /// larger): past it, [`Secondary::wants_input`] is false until applies
    /// complete, and what the primary sends meanwhile waits in QUIC's
    /// receive window and then in the primary's journal. Without it, a
    /// volume slower than the restore journal would let memory grow to the
    /// restore journal's size.
    pub max_unapplied_bytes: u64,
    /// Records cover whole blocks of this size (the primary rounds requests
    /// out to them; the volumes, written with `O_DIRECT`, take nothing
    /// else): a record that does not is refused.
    pub block_size: u64,
}

/// What a record counts against [`SecondaryConfig::max_unapplied_bytes`]
/// at least, whatever its payload.
pub const UNAPPLIED_RECORD_MIN: u64 = 512;

/// A flush request this recent makes the restore journal sync at once
/// (see [`SecondaryConfig::journal_sync_delay`]).
pub const RECENT_FLUSH: Duration = Duration::from_millis(100);

/// An idle session repeats its last ack this often: the primary's "peer
/// last heard" then tells a live, idle secondary from one that stopped
/// answering (a frozen process keeps its QUIC connection up for a while).
pub const ACK_KEEPALIVE: Duration = Duration::from_secs(5);

/// Where a session starts: everything through `checkpoint` is on the
/// volumes durably and the restore journal holds nothing newer (the daemon
/// replays it when it opens the group, and drains it when a session ends).
#[derive(Debug, Clone)]
pub struct SecondaryStart {
    /// Last write seq on the volumes; the next record is `checkpoint + 1`.
    pub checkpoint: u64,
    /// Restore journal position where the next record goes.
    pub journal_head: u64,
    /// A copy or resync is not finished: the image is not consistent.
    pub copy_incomplete: bool,
    /// The primary's write time (µs since the epoch) of the newest write
    /// held here.
    pub data_as_of_us: u64,
    /// The generation the primary opened the session in: no record it
    /// sends may carry a newer one (it takes writes in its own generation;
    /// records it took before its generation last moved, in a rebase after
    /// a refusal, carry an older one).
    pub generation: u64,
}

/// What the daemon persists (in the group's state file) when asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persist {
    /// Version of this snapshot; report it back with [`Secondary::on_saved`].
    pub version: u64,
    /// Every write through here is durable on the volumes.
    pub checkpoint: u64,
    /// Restore journal: the oldest record still needed after a restart has
    /// seq `checkpoint + 1` and sits at `journal_tail_pos`.
    pub journal_tail_pos: u64,
    /// A copy or resync is not finished.
    pub copy_incomplete: bool,
    /// The primary's write time of the newest write held here.
    pub data_as_of_us: u64,
}

/// What a volume sync covers: applied writes and copy chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Barrier {
    /// Every write seq through here is applied.
    pub seq: u64,
    /// Every copy chunk through here is applied.
    pub copy_index: u64,
}

/// Work for the daemon.
#[derive(Debug)]
pub enum Action {
    /// Write `record` into the restore journal at `pos` (positions are
    /// handed out in sequence order); report [`Secondary::on_appended`]
    /// (at once for an append that does not wait for the disk). Appends
    /// may complete in any order; a failure ends the session.
    Append {
        /// Reserved position.
        pos: u64,
        /// The record.
        record: Record,
    },
    /// fdatasync the restore journal; report [`Secondary::on_journal_synced`].
    SyncJournal {
        /// The newest record it covers.
        through: u64,
    },
    /// Write `record` to its volume; report [`Secondary::on_applied`].
    Apply {
        /// Its id.
        id: ApplyId,
        /// The record (its CRC is checked on arrival; check it again).
        record: Record,
    },
    /// fsync every volume of the group; report
    /// [`Secondary::on_volumes_synced`].
    SyncVolumes(Barrier),
    /// Persist the snapshot (fsync'd); report [`Secondary::on_saved`].
    Save(Persist),
    /// A resync is about to overwrite a consistent image: the volumes hold
    /// exactly the writes `<= seq` (nothing is being applied). Make that
    /// image durable and preserve it (copy-on-write) until
    /// [`Action::ReleaseImage`], so that a failover in the middle of the
    /// resync can roll back to it; report [`Secondary::on_image_preserved`].
    /// No copy data reaches the volumes before that report.
    PreserveImage {
        /// The image holds every write through here, none beyond.
        seq: u64,
        /// The primary's time of write `seq` (µs since the epoch; 0 unknown).
        written_at_us: u64,
    },
    /// The resync is finished and the consistent image is persisted: the
    /// image preserved by [`Action::PreserveImage`] may go.
    ReleaseImage,
    /// Send this to the primary.
    Send(Body),
}

/// Why the consistent image could not be preserved before a resync
/// ([`Secondary::on_image_preserved`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreserveFailure {
    /// The volumes could not be made durable first: what was applied may
    /// not be (the session fails, as after any failed sync).
    #[error("{0}")]
    Volumes(String),
    /// The image's own files could not be made (a full state directory):
    /// the applied prefix is intact and durable.
    #[error("{0}")]
    Image(String),
}

/// A session that cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecondaryError {
    /// The record does not fit the stream.
    #[error("rejected record: {0}")]
    Record(#[from] ApplyError),
    /// The record names a volume or range this group does not have.
    #[error("record {seq} is outside the group's volumes: {reason}")]
    OutOfRange {
        /// Its seq.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The record can never fit the restore journal.
    #[error("record {seq} needs {span} bytes of restore journal but the journal holds {capacity}: raise journal_size here to at least twice the primary's largest write (a journal file keeps its size until it starts over: a new pair or a role change)")]
    TooLarge {
        /// Its seq.
        seq: u64,
        /// Bytes it needs.
        span: u64,
        /// Ring size.
        capacity: u64,
    },
    /// Local I/O failed.
    #[error("{0}")]
    Io(String),
    /// COPY_DONE names records that did not arrive (the primary sends it
    /// after every record through its seq): a broken peer.
    #[error("COPY_DONE through record {seq}, but only records through {received} arrived")]
    CopyDoneAhead {
        /// Its seq.
        seq: u64,
        /// The newest record taken in.
        received: u64,
    },
    /// A record of a generation newer than the session's: a broken peer,
    /// or one that took writes as a newer primary without saying so.
    #[error("record {seq} carries generation {record}, newer than the session's generation {session}")]
    Generation {
        /// Its seq.
        seq: u64,
        /// Its generation.
        record: u64,
        /// The session's.
        session: u64,
    },
}

#[derive(Debug)]
struct InFlight {
    /// Taken when the apply is handed out.
    record: Option<Record>,
    /// Its payload's size, at least [`UNAPPLIED_RECORD_MIN`] (counted in
    /// `unapplied_bytes` until applied).
    payload_len: u64,
    /// Earlier overlapping records not applied yet.
    waiting_for: usize,
    /// Later records waiting for this one.
    dependents: Vec<ApplyId>,
    /// The primary's write time of a write record (0: a copy chunk, or
    /// not known).
    written_at_us: u64,
}

/// The secondary end of one replication session.
#[derive(Debug)]
pub struct Secondary {
    config: SecondaryConfig,
    /// See [`SecondaryStart::generation`].
    generation: u64,
    applier: Applier,
    ring: JournalRing,
    /// Restore journal: newest record handed out for appending, newest
    /// durable.
    appended: u64,
    /// Records handed out for appending whose append is not done yet:
    /// records from the first of them on are not received (nor covered by
    /// a journal sync).
    appending: BTreeSet<u64>,
    journal_durable: u64,
    journal_sync_in_flight: bool,
    /// Newest record a journal sync was asked for, and since when records
    /// after it wait for one.
    journal_sync_asked: u64,
    unsynced_since: Option<Instant>,
    /// A flush request arrived since the last plan; when the newest did.
    flush_request_new: bool,
    flush_requested_at: Option<Instant>,
    /// Records received but not admitted: no journal space yet, or the
    /// image's inconsistency is not persisted yet. Input stops meanwhile.
    pending: VecDeque<Record>,
    records: HashMap<ApplyId, InFlight>,
    /// Payload bytes of `records` (see [`SecondaryConfig::max_unapplied_bytes`]).
    unapplied_bytes: u64,
    /// Writes whose predecessors are applied but which are not durable in
    /// the journal yet, by seq.
    awaiting_journal: BTreeMap<u64, ApplyId>,
    applying: usize,
    /// Copy chunks among `applying`, and those waiting for a slot.
    copy_applying: BTreeSet<ApplyId>,
    copy_waiting: VecDeque<ApplyId>,
    volume_sync: Option<Barrier>,
    last_volume_sync_at: Instant,
    copy_bytes_since_sync: u64,
    checkpoint: u64,
    last_checkpoint_at: Instant,
    /// Copy chunks (by copy index, ascending) that followed writes beyond
    /// the persisted checkpoint on the stream, with the newest such write:
    /// until the checkpoint passes it, a restart would replay that write
    /// (or one before it) over the chunk's data, so the chunk is not
    /// reported durable (see [`Secondary::copy_reported`]).
    copy_fences: VecDeque<(u64, u64)>,
    copy_incomplete: bool,
    /// Persisted snapshots: newest asked for, newest done, one in flight.
    save_version: u64,
    saved_version: u64,
    save_in_flight: bool,
    save_wanted: bool,
    /// `copy_incomplete = true` must be on disk before copy data lands.
    inconsistency_saved_at: Option<u64>,
    /// [`Action::PreserveImage`] is out and not reported yet.
    preserving: bool,
    /// An [`Action::ReleaseImage`] was dropped by [`Secondary::fail`]: the
    /// resync's end is persisted, its preserved image is stale.
    release_owed: bool,
    /// [`Secondary::on_resync_gap`]: records after the first of those seqs
    /// follow writes this node lacks until the resync that covers them
    /// ends (only the first matters, so only it is kept, however many a
    /// peer announces). The first of those that came after the last
    /// COPY_DONE on the stream...
    gap: Option<u64>,
    /// ... and the first of those before it: that COPY_DONE covers them
    /// (the primary sends one only once the copy that started after them
    /// finished).
    gap_covered: Option<u64>,
    /// COPY_DONE received (its seq), and the save that records it.
    copy_done: Option<u64>,
    /// With COPY_DONE: the primary's time through which the copy holds
    /// every write (0 unknown).
    copy_done_as_of_us: u64,
    /// A finished copy's time and seq, until the writes through that seq
    /// are applied (then it is the applied image's time too).
    applied_as_of_due: Option<(u64, u64)>,
    /// The newest copy chunk taken in when COPY_DONE came: a chunk after
    /// it on the stream belongs to a later copy.
    copy_done_chunks: u64,
    copy_done_saved_at: Option<u64>,
    data_as_of_us: u64,
    /// The primary's write time of the newest write applied here: at a
    /// freeze, the time of the frozen point (`data_as_of_us` runs ahead
    /// with every write made durable in the restore journal).
    applied_as_of_us: u64,
    written_at: BTreeMap<u64, u64>,
    draining: bool,
    failed: bool,
    ack_dirty: bool,
    /// Since when the state has changed beyond `last_ack` (an ack that
    /// nobody waits for goes out [`SecondaryConfig::ack_delay`] later).
    ack_dirty_since: Option<Instant>,
    /// The journal sync in flight was asked for by someone waiting for it
    /// (see [`Secondary::journal_sync_urgent`]).
    journal_sync_waited: bool,
    /// [`Secondary::set_stretch`]: deferred journal syncs and acks wait
    /// this many times their configured delay.
    stretch: u32,
    /// The next ack reports such a sync: it goes out at once.
    ack_now: bool,
    last_ack: Option<pb::Ack>,
    /// When an ack last went out (see [`ACK_KEEPALIVE`]).
    last_ack_at: Option<Instant>,
    /// Hash-only copy chunks whose region differs here, not yet reported.
    copy_mismatch: Vec<pb::CopyMismatch>,
    /// Highest write seq handed out for applying.
    max_started: u64,
    /// [`Secondary::freeze`]: writes beyond this seq (and copy chunks) are
    /// held back in `held` until [`Secondary::thaw`].
    freeze_at: Option<u64>,
    held: VecDeque<ApplyId>,
    actions: VecDeque<Action>,
}

impl Secondary {
    /// A session starting at `start`.
    pub fn new(config: SecondaryConfig, start: SecondaryStart, now: Instant) -> Self {
        let mut ring = JournalRing::new(config.journal_capacity);
        ring.reset_at(start.journal_head);
        Secondary {
            config,
            generation: start.generation,
            applier: Applier::new(start.checkpoint),
            ring,
            appended: start.checkpoint,
            appending: BTreeSet::new(),
            journal_durable: start.checkpoint,
            journal_sync_in_flight: false,
            journal_sync_asked: start.checkpoint,
            unsynced_since: None,
            flush_request_new: false,
            flush_requested_at: None,
            pending: VecDeque::new(),
            records: HashMap::new(),
            unapplied_bytes: 0,
            awaiting_journal: BTreeMap::new(),
            applying: 0,
            copy_applying: BTreeSet::new(),
            copy_waiting: VecDeque::new(),
            volume_sync: None,
            last_volume_sync_at: now,
            copy_bytes_since_sync: 0,
            checkpoint: start.checkpoint,
            copy_fences: VecDeque::new(),
            last_checkpoint_at: now,
            copy_incomplete: start.copy_incomplete,
            save_version: 0,
            saved_version: 0,
            save_in_flight: false,
            save_wanted: false,
            inconsistency_saved_at: start.copy_incomplete.then_some(0),
            preserving: false,
            release_owed: false,
            gap: None,
            gap_covered: None,
            copy_done: None,
            copy_done_as_of_us: 0,
            applied_as_of_due: None,
            copy_done_chunks: 0,
            copy_done_saved_at: None,
            data_as_of_us: start.data_as_of_us,
            applied_as_of_us: start.data_as_of_us,
            written_at: BTreeMap::new(),
            draining: false,
            failed: false,
            ack_dirty: true,
            ack_dirty_since: None,
            journal_sync_waited: false,
            stretch: 1,
            ack_now: false,
            last_ack: None,
            last_ack_at: None,
            copy_mismatch: Vec::new(),
            max_started: start.checkpoint,
            freeze_at: None,
            held: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// Stretches what this session defers for nobody in particular: a
    /// journal sync nobody waits for and an ack nobody waits for wait
    /// `factor` times [`SecondaryConfig::journal_sync_delay`] and
    /// [`SecondaryConfig::ack_delay`] (at least once). The caller paces
    /// many sessions of one node this way, so that their fixed cost per
    /// sync and per ack stays bounded for the node as a whole. What
    /// someone waits for (FUA, flush requests, drains, journal space, a
    /// copy's progress, a sync-mode receipt) is not deferred and not
    /// stretched; a zero delay stays zero. Takes effect at once: deadlines
    /// are counted from when the deferred change was made.
    pub fn set_stretch(&mut self, factor: u32) {
        self.stretch = factor.max(1);
    }

    /// The journal sync delay for the records waiting now
    /// ([`SecondaryConfig::journal_sync_batch`]), as [`Secondary::set_stretch`]
    /// stretches it.
    fn journal_sync_delay(&self) -> Duration {
        let waiting = self.received().saturating_sub(self.journal_sync_asked);
        let delay = if waiting >= self.config.journal_sync_batch {
            self.config.journal_sync_delay
        } else {
            self.config.journal_sync_delay_light
        };
        delay.saturating_mul(self.stretch)
    }

    /// The ack delay [`Secondary::set_stretch`] gives.
    fn ack_delay(&self) -> Duration {
        self.config.ack_delay.saturating_mul(self.stretch)
    }

    /// Freezes the image at a write-order-consistent point (a drill starts):
    /// the writes already handed out for applying, and those before them,
    /// are applied; every later write (and copy chunk) is held back until
    /// [`Secondary::thaw`]. Receiving, journaling and acks go on. Once
    /// [`Secondary::frozen_at`] returns `Some(n)`, the volumes hold exactly
    /// the writes `<= n`. Refused (false, nothing frozen) while a copy or
    /// resync has made the image inconsistent: its chunks may be on the
    /// volumes already, so no frozen point would be an image the primary
    /// ever had (a resync that starts once frozen is held back with the
    /// rest).
    pub fn freeze(&mut self) -> bool {
        if self.copy_incomplete {
            return false;
        }
        if self.freeze_at.is_none() {
            self.freeze_at = Some(self.max_started.max(self.applier.applied()));
        }
        true
    }

    /// The frozen point, once every write up to it is applied and nothing
    /// else is being applied.
    pub fn frozen_at(&self) -> Option<u64> {
        self.freeze_at.filter(|&n| self.applying == 0 && self.applier.applied() >= n)
    }

    /// Ends a freeze: the held applies start, in order.
    pub fn thaw(&mut self) {
        self.freeze_at = None;
        for id in std::mem::take(&mut self.held) {
            self.start_apply(id);
        }
    }

    /// Whether the daemon should read more messages (false while records
    /// wait for journal space or for a save, while the payloads not applied
    /// yet fill [`SecondaryConfig::max_unapplied_bytes`], and while
    /// draining).
    pub fn wants_input(&self) -> bool {
        self.pending.is_empty() && !self.unapplied_full() && !self.draining && !self.failed
    }

    fn unapplied_full(&self) -> bool {
        self.unapplied_bytes >= self.config.max_unapplied_bytes
    }

    /// A message from the primary (records, flush requests, COPY_DONE).
    /// Other bodies are the daemon's business.
    pub fn on_record(&mut self, record: Record) -> Result<(), SecondaryError> {
        if self.draining || self.failed {
            return Ok(());
        }
        if record.generation > self.generation {
            return Err(SecondaryError::Generation {
                seq: record.seq,
                record: record.generation,
                session: self.generation,
            });
        }
        let size = self.config.volume_sizes.get(record.volume as usize).copied().ok_or_else(|| {
            SecondaryError::OutOfRange { seq: record.seq, reason: format!("volume #{} does not exist", record.volume) }
        })?;
        if record.end() > size {
            return Err(SecondaryError::OutOfRange {
                seq: record.seq,
                reason: format!("it ends at {} but volume #{} has {size} bytes", record.end(), record.volume),
            });
        }
        // A record that cannot apply must not reach the restore journal,
        // whose replay would fail on it at every start.
        let block = self.config.block_size.max(1);
        if record.offset % block != 0 || u64::from(record.length) % block != 0 {
            return Err(SecondaryError::OutOfRange {
                seq: record.seq,
                reason: format!(
                    "{} bytes at offset {} are not whole {block}-byte blocks",
                    record.length, record.offset
                ),
            });
        }
        if !record.op.is_copy() {
            let span = record_span(record.payload.len() as u64);
            if span > self.ring.capacity_bytes() {
                return Err(SecondaryError::TooLarge { seq: record.seq, span, capacity: self.ring.capacity_bytes() });
            }
        }
        self.pending.push_back(record);
        self.admit_pending()
    }

    /// The primary asks for every write through `seq` (and every copy chunk
    /// received so far) to be made durable and acked.
    pub fn on_flush_request(&mut self, seq: u64) {
        self.applier.on_flush_request(seq.min(self.taken_through()));
        self.flush_request_new = true;
        self.ack_dirty = true;
    }

    /// The primary tracked writes after record `seq` only in its dirty
    /// bitmaps: the first later record (like the first copy chunk) makes
    /// the image inconsistent until the resync's COPY_DONE, the first one
    /// after this on the stream. Kept even while a copy runs: a gap that
    /// opens after that copy's COPY_DONE was sent outlives it, whatever its
    /// seq (a primary still holding an older gap, its COPY_DONE reply not
    /// in yet, announces that one again). The records received before it
    /// on the stream precede those writes: it counts from the newest.
    pub fn on_resync_gap(&mut self, seq: u64) {
        let seq = seq.max(self.appended);
        self.gap = Some(self.gap.map_or(seq, |g| g.min(seq)));
    }

    /// The primary's copy (or resync) is complete through write `seq`; it
    /// covers the resync gaps announced before it. `as_of_us`: the
    /// primary's time through which the copied image holds every write (0
    /// unknown): once the copy is complete here, the replica's data is as
    /// of then, however old its newest record.
    pub fn on_copy_done(&mut self, seq: u64, as_of_us: u64) -> Result<(), SecondaryError> {
        let received = self.taken_through();
        if seq > received {
            return Err(SecondaryError::CopyDoneAhead { seq, received });
        }
        self.copy_done = Some(seq);
        self.copy_done_as_of_us = as_of_us;
        self.copy_done_chunks = self.copies_taken();
        if let Some(gap) = self.gap.take() {
            self.gap_covered = Some(self.gap_covered.map_or(gap, |g| g.min(gap)));
        }
        self.applier.on_flush_request(seq);
        Ok(())
    }

    /// The newest write seq taken in (applied, or waiting for journal
    /// space). The primary asks for flushes only through records it sent
    /// before: a target beyond this one (a broken peer) would never be
    /// reached and would stay in the applier for good; it counts as this.
    fn taken_through(&self) -> u64 {
        self.pending.iter().map(|r| r.seq).fold(self.applier.received(), u64::max)
    }

    /// The newest copy chunk taken in (applied, or waiting in `pending`).
    fn copies_taken(&self) -> u64 {
        let admitted = self.applier.next_copy_index().saturating_sub(1);
        self.pending.iter().filter(|r| r.op.is_copy()).map(|r| r.copy_index).fold(admitted, u64::max)
    }

    /// The [`Action::Append`] of record `seq` failed: the session stops. No
    /// later action goes out (a journal sync queued behind the failed append
    /// would claim it durable); only I/O already handed out completes.
    pub fn on_append_failed(&mut self, seq: u64, error: &str) -> SecondaryError {
        self.fail();
        SecondaryError::Io(format!("cannot append record {seq} to the restore journal: {error}"))
    }

    /// Stops the session after a local I/O failure: queued actions are
    /// dropped (their bookkeeping undone), nothing new is planned.
    fn fail(&mut self) {
        self.failed = true;
        for action in self.actions.drain(..) {
            match action {
                Action::Apply { id, .. } => {
                    self.applying = self.applying.saturating_sub(1);
                    self.copy_applying.remove(&id);
                }
                Action::SyncJournal { .. } => self.journal_sync_in_flight = false,
                Action::SyncVolumes(_) => self.volume_sync = None,
                Action::Save(_) => self.save_in_flight = false,
                Action::PreserveImage { .. } => self.preserving = false,
                // Asked for once the resync's end was saved: still due.
                Action::ReleaseImage => self.release_owed = true,
                Action::Append { .. } | Action::Send(_) => {}
            }
        }
    }

    /// Whether the session failed with an [`Action::ReleaseImage`] queued:
    /// the daemon releases the preserved image anyway (the end of the
    /// resync it guarded is persisted; a failover must not roll back to it).
    pub fn release_owed(&self) -> bool {
        self.release_owed
    }

    /// The restore journal is durable through `through`.
    pub fn on_journal_synced(&mut self, through: u64, result: Result<(), String>) -> Result<(), SecondaryError> {
        self.journal_sync_in_flight = false;
        if let Err(e) = result {
            self.fail();
            return Err(SecondaryError::Io(format!("restore journal sync failed: {e}")));
        }
        if through > self.journal_durable {
            self.journal_durable = through;
            let rest = self.written_at.split_off(&(through + 1));
            if let Some(t) = std::mem::replace(&mut self.written_at, rest).into_values().max() {
                self.data_as_of_us = self.data_as_of_us.max(t);
            }
            self.ack_dirty = true;
            self.ack_now |= std::mem::take(&mut self.journal_sync_waited);
        }
        while let Some((&seq, &id)) = self.awaiting_journal.first_key_value() {
            if seq > self.journal_durable {
                break;
            }
            self.awaiting_journal.pop_first();
            self.start_apply(id);
        }
        Ok(())
    }

    /// Record `id` reached its volume (or failed to).
    pub fn on_applied(&mut self, id: ApplyId, result: Result<(), String>) -> Result<(), SecondaryError> {
        self.applying = self.applying.saturating_sub(1);
        if let Err(e) = result {
            self.fail();
            return Err(SecondaryError::Io(format!("apply failed: {e}")));
        }
        self.applier.on_applied(id);
        self.note_applied_as_of();
        self.ack_dirty = true;
        if self.copy_applying.remove(&id) {
            while self.copy_applying.len() < self.config.copy_applies.max(1) {
                let Some(next) = self.copy_waiting.pop_front() else { break };
                self.start_apply(next);
            }
        }
        let dependents = match self.records.remove(&id) {
            Some(r) => {
                self.unapplied_bytes -= r.payload_len;
                self.applied_as_of_us = self.applied_as_of_us.max(r.written_at_us);
                r.dependents
            }
            None => Vec::new(),
        };
        for d in dependents {
            let ready = self.records.get_mut(&d).is_some_and(|r| {
                r.waiting_for = r.waiting_for.saturating_sub(1);
                r.waiting_for == 0
            });
            if ready {
                self.ready(d);
            }
        }
        if self.records.is_empty() && !self.copy_incomplete {
            // A copy chunk may wait for the image to settle.
            self.admit_pending()?;
        }
        Ok(())
    }

    /// The image of [`Action::PreserveImage`] is preserved (or could not
    /// be: the session stops, nothing was overwritten).
    pub fn on_image_preserved(&mut self, result: Result<(), PreserveFailure>) -> Result<(), SecondaryError> {
        self.preserving = false;
        match result {
            Ok(()) => {}
            Err(PreserveFailure::Volumes(e)) => {
                self.fail();
                return Err(SecondaryError::Io(format!(
                    "cannot preserve the consistent image before the resync overwrites it: {e}"
                )));
            }
            // Nothing went wrong with what was applied: the session ends
            // with the replica consistent, behind (the next one tries
            // again).
            Err(PreserveFailure::Image(e)) => {
                return Err(SecondaryError::Io(format!(
                    "cannot preserve the consistent image before the resync overwrites it: {e}; the replica stays \
                     consistent and behind until it can"
                )))
            }
        }
        self.copy_incomplete = true;
        self.inconsistency_saved_at = Some(self.want_save());
        self.admit_pending()
    }

    /// The volumes are durable through `barrier`.
    pub fn on_volumes_synced(&mut self, barrier: Barrier, result: Result<(), String>) -> Result<(), SecondaryError> {
        self.volume_sync = None;
        if let Err(e) = result {
            self.fail();
            return Err(SecondaryError::Io(format!("volume sync failed: {e}")));
        }
        let copy_before = self.copy_reported();
        self.applier.on_durable(barrier.seq, barrier.copy_index);
        if self.copy_reported() > copy_before {
            self.ack_dirty = true;
        }
        if self.applier.durable() > self.checkpoint {
            self.save_wanted = true;
        }
        Ok(())
    }

    /// Copy chunks through this index are durable on the volumes, and no
    /// restart can write an older record over them: the persisted
    /// checkpoint is past every write received before them (a restart
    /// replays the restore journal from there). What the acks report as
    /// `copy_durable`.
    fn copy_reported(&self) -> u64 {
        let durable = self.applier.copy_durable();
        match self.copy_fences.front() {
            Some(&(index, _)) => durable.min(index.saturating_sub(1)),
            None => durable,
        }
    }

    /// A copy chunk waits to be reported durable only for the checkpoint:
    /// the volumes hold it, and a write it follows is beyond the checkpoint.
    fn copy_waits_for_checkpoint(&self) -> bool {
        self.copy_fences.front().is_some_and(|&(index, _)| self.applier.copy_durable() >= index)
    }

    /// Snapshot `version` is persisted.
    pub fn on_saved(
        &mut self,
        persist: &Persist,
        result: Result<(), String>,
        now: Instant,
    ) -> Result<(), SecondaryError> {
        self.save_in_flight = false;
        if let Err(e) = result {
            self.fail();
            return Err(SecondaryError::Io(format!("cannot persist the checkpoint: {e}")));
        }
        self.saved_version = self.saved_version.max(persist.version);
        if persist.checkpoint > self.checkpoint {
            let copy_before = self.copy_reported();
            self.checkpoint = persist.checkpoint;
            self.ring.release_through(persist.checkpoint);
            while self.copy_fences.front().is_some_and(|&(_, seq)| seq <= persist.checkpoint) {
                self.copy_fences.pop_front();
            }
            if self.copy_reported() > copy_before {
                self.ack_dirty = true;
            }
        }
        self.last_checkpoint_at = now;
        if self.copy_done_saved_at.is_some_and(|v| self.saved_version >= v) {
            // The consistent image is persisted: the preserved one goes
            // (before a new resync, admitted below, preserves another).
            self.copy_done = None;
            self.copy_done_saved_at = None;
            self.actions.push_back(Action::ReleaseImage);
            self.actions.push_back(Action::Send(Body::CommandReply(pb::CommandReply {
                command: pb::Command::CopyDone as i32,
                ..Default::default()
            })));
        }
        self.admit_pending()
    }

    /// Stop taking records; finish every apply, make it durable on the
    /// volumes and persist the checkpoint (end of session, clean stop).
    /// Records not yet admitted are dropped (never acked as received).
    pub fn begin_drain(&mut self) {
        self.draining = true;
        self.thaw();
        self.pending.clear();
    }

    /// Whether local I/O failed in this session (an append, apply, sync,
    /// save or preserve): the volumes may hold applies beyond the
    /// checkpoint out of order, and only the restore journal's replay at
    /// the next start repairs them.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Draining is over: nothing in flight, and (unless an I/O error ended
    /// the session) everything applied is durable and persisted.
    pub fn is_drained(&self) -> bool {
        let idle = self.applying == 0
            && !self.journal_sync_in_flight
            && self.volume_sync.is_none()
            && !self.save_in_flight
            && self.actions.is_empty();
        if self.failed {
            return idle;
        }
        let copies_durable = self.applier.copy_durable() >= self.applier.durable_barrier().1;
        idle && self.records.is_empty()
            && copies_durable
            && self.checkpoint == self.appended
            && self.appending.is_empty()
            && !self.save_wanted
    }

    /// The next thing to do, given the time; `None` when there is nothing.
    /// An ack, when one is due, comes last (one per batch of work).
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        self.plan(now);
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self.ack_dirty && !self.failed {
            let mut ack = self.ack();
            if !self.ack_due(&ack, now) {
                self.ack_dirty_since.get_or_insert(now);
                return None;
            }
            self.ack_dirty = false;
            self.ack_dirty_since = None;
            self.ack_now = false;
            // Reported before (or with) the copy_durable that covers them.
            ack.copy_mismatch = std::mem::take(&mut self.copy_mismatch);
            if self.last_ack.as_ref() != Some(&ack) {
                self.last_ack = Some(ack.clone());
                self.last_ack_at = Some(now);
                return Some(Action::Send(Body::Ack(ack)));
            }
        }
        if self.keepalive_due().is_some_and(|t| now >= t) {
            self.last_ack_at = Some(now);
            return self.last_ack.clone().map(|ack| Action::Send(Body::Ack(ack)));
        }
        None
    }

    /// When the last ack is repeated if nothing else goes out before.
    fn keepalive_due(&self) -> Option<Instant> {
        self.last_ack_at.filter(|_| !self.failed && self.last_ack.is_some()).map(|t| t + ACK_KEEPALIVE)
    }

    /// Whether the (changed) `ack` must go out now rather than wait for
    /// more changes (see [`SecondaryConfig::ack_delay`]).
    fn ack_due(&self, ack: &pb::Ack, now: Instant) -> bool {
        let Some(last) = &self.last_ack else { return true };
        self.ack_now
            || self.config.ack_delay.is_zero()
            || (self.config.receipt_acked_at_once && ack.received_seq > last.received_seq)
            || ack.copy_durable > last.copy_durable
            || !self.copy_mismatch.is_empty()
            || self.journal_sync_urgent(now)
            || self.ack_dirty_since.is_some_and(|t| now >= t + self.ack_delay())
    }

    /// The ack describing the current state.
    pub fn ack(&self) -> pb::Ack {
        pb::Ack {
            received_seq: self.received(),
            applied_seq: self.applier.applied(),
            durable_seq: self.journal_durable,
            copy_durable: self.copy_reported(),
            checkpoint_seq: self.journal_durable,
            copy_mismatch: Vec::new(),
        }
    }

    /// A span (`offset`, `length`) of hash-only copy chunk `copy_index`
    /// ([`RecordOp::CopyHash`](crate::record::RecordOp::CopyHash)) differs here: the primary sends its data.
    /// Report it before [`Secondary::on_applied`] of that chunk.
    pub fn on_copy_mismatch(&mut self, copy_index: u64, offset: u64, length: u64) {
        self.copy_mismatch.push(pb::CopyMismatch { copy_index, offset, length });
        self.ack_dirty = true;
    }

    /// Newest write in the restore journal, with every one before it.
    pub fn received(&self) -> u64 {
        self.appending.first().map_or(self.appended, |&seq| seq - 1)
    }

    /// The [`Action::Append`] of record `seq` is done: the record is in the
    /// restore journal (durable once a journal sync covers it).
    pub fn on_appended(&mut self, seq: u64) {
        if self.appending.remove(&seq) {
            self.ack_dirty = true;
        }
    }

    /// Newest write applied to the volumes (with all before it).
    pub fn applied(&self) -> u64 {
        self.applier.applied()
    }

    /// Newest write durable here (in the restore journal).
    pub fn durable(&self) -> u64 {
        self.journal_durable
    }

    /// Newest write durable on the volumes and persisted as the checkpoint.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Whether a copy or resync is unfinished (the image is inconsistent).
    pub fn copy_incomplete(&self) -> bool {
        self.copy_incomplete
    }

    /// The primary's write time of the newest durable write here.
    pub fn data_as_of_us(&self) -> u64 {
        self.data_as_of_us
    }

    /// The primary's write time of the newest write applied here (at a
    /// freeze: of the frozen point).
    pub fn applied_as_of_us(&self) -> u64 {
        self.applied_as_of_us
    }

    /// Restore journal bytes in use.
    pub fn journal_used_bytes(&self) -> u64 {
        self.ring.used_bytes()
    }

    /// Admits queued records while there is journal space (and, for copy
    /// chunks, once the image's inconsistency is persisted).
    fn admit_pending(&mut self) -> Result<(), SecondaryError> {
        while let Some((op, seq, payload_len)) = self.pending.front().map(|r| (r.op, r.seq, r.payload.len() as u64)) {
            // A copy chunk, or a record after a gap, breaks write order.
            let gap = self.gap.into_iter().chain(self.gap_covered).min();
            if op.is_copy() || gap.is_some_and(|g| seq > g) {
                if !self.copy_incomplete {
                    // A resync starts on a consistent image: once every
                    // write admitted so far is applied (and nothing else
                    // is), the image is exactly a prefix; it is preserved
                    // before it turns inconsistent. Not while the image
                    // preserved for the previous resync is still held (its
                    // end is being persisted): that one is released first.
                    let releasing = self.copy_done_saved_at.is_some();
                    if !self.preserving && !releasing && self.records.is_empty() && !self.failed {
                        self.preserving = true;
                        let seq = self.applier.applied();
                        let written_at_us = self.written_at.get(&seq).copied().unwrap_or(self.data_as_of_us);
                        self.actions.push_back(Action::PreserveImage { seq, written_at_us });
                    }
                    return Ok(());
                }
                if self.inconsistency_saved_at.is_some_and(|v| v > self.saved_version) {
                    return Ok(());
                }
            }
            if !op.is_copy() && !self.ring.would_fit(record_span(payload_len)) {
                return Ok(());
            }
            let Some(record) = self.pending.pop_front() else { break };
            self.admit(record)?;
        }
        Ok(())
    }

    fn admit(&mut self, record: Record) -> Result<(), SecondaryError> {
        let (id, deps) = self.applier.on_record(&record)?;
        if record.op.is_copy() {
            self.copy_bytes_since_sync += u64::from(record.length);
            if self.appended > self.checkpoint {
                self.copy_fences.push_back((record.copy_index, self.appended));
            }
        } else {
            let span = record_span(record.payload.len() as u64);
            let pos = self.ring.reserve(record.seq, span).ok_or_else(|| {
                SecondaryError::Io(format!("restore journal: no space reserved for record {}", record.seq))
            })?;
            self.appended = record.seq;
            self.appending.insert(record.seq);
            if record.written_at_us != 0 {
                self.written_at.insert(record.seq, record.written_at_us);
            }
            self.actions.push_back(Action::Append { pos, record: record.clone() });
            self.ack_dirty = true;
        }
        let mut waiting_for = 0;
        for d in &deps {
            if let Some(r) = self.records.get_mut(d) {
                r.dependents.push(id);
                waiting_for += 1;
            }
        }
        // Records without payload (trims, zeroes, copy-hash chunks) count
        // too: their bookkeeping is memory as well.
        let payload_len = (record.payload.len() as u64).max(UNAPPLIED_RECORD_MIN);
        self.unapplied_bytes += payload_len;
        let written_at_us = if record.op.is_copy() { 0 } else { record.written_at_us };
        self.records.insert(
            id,
            InFlight { record: Some(record), payload_len, waiting_for, dependents: Vec::new(), written_at_us },
        );
        if waiting_for == 0 {
            self.ready(id);
        }
        Ok(())
    }

    /// Record `id` has no unapplied predecessor: apply it once it is durable
    /// in the restore journal (copy chunks: at once).
    fn ready(&mut self, id: ApplyId) {
        let Some(r) = self.records.get(&id) else { return };
        match &r.record {
            Some(rec) if !rec.op.is_copy() && rec.seq > self.journal_durable => {
                self.awaiting_journal.insert(rec.seq, id);
            }
            Some(rec) if rec.op.is_copy() && self.copy_applying.len() >= self.config.copy_applies.max(1) => {
                self.copy_waiting.push_back(id);
            }
            Some(_) => self.start_apply(id),
            None => {}
        }
    }

    fn start_apply(&mut self, id: ApplyId) {
        // After a failure nothing new reaches the volumes (a journal sync
        // or an apply handed out before it may still complete and make
        // records ready); the restart replays them.
        if self.failed {
            return;
        }
        let Some(r) = self.records.get_mut(&id) else { return };
        if let (Some(n), Some(rec)) = (self.freeze_at, &r.record) {
            if rec.op.is_copy() || rec.seq > n {
                self.held.push_back(id);
                return;
            }
        }
        if let Some(record) = r.record.take() {
            if !record.op.is_copy() {
                self.max_started = self.max_started.max(record.seq);
            }
            self.applying += 1;
            if record.op.is_copy() {
                self.copy_applying.insert(id);
            }
            self.actions.push_back(Action::Apply { id, record });
        }
    }

    fn want_save(&mut self) -> u64 {
        self.save_wanted = true;
        self.save_version + 1
    }

    /// Starts the syncs and saves that are due.
    fn plan(&mut self, now: Instant) {
        if self.failed {
            return;
        }
        let received = self.received();
        if received > self.journal_sync_asked && self.unsynced_since.is_none() {
            self.unsynced_since = Some(now);
        }
        if std::mem::take(&mut self.flush_request_new) {
            self.flush_requested_at = Some(now);
        }
        let urgent = self.journal_sync_urgent(now);
        let sync_due = urgent || self.journal_sync_due().is_some_and(|t| now >= t);
        if !self.journal_sync_in_flight && received > self.journal_durable && sync_due {
            self.journal_sync_in_flight = true;
            self.journal_sync_waited = urgent;
            self.journal_sync_asked = received;
            self.unsynced_since = None;
            self.actions.push_back(Action::SyncJournal { through: received });
        }
        if self.volume_sync.is_none() {
            let (seq, copy_index) = self.applier.durable_barrier();
            let barrier = Barrier { seq, copy_index };
            let copies_behind = copy_index > self.applier.copy_durable();
            let writes_behind = seq > self.applier.durable();
            // Every copy chunk received is applied: nothing to wait for,
            // and the primary's copy window opens only once they are durable.
            let copies_caught_up = copy_index + 1 >= self.applier.next_copy_index();
            let copy_due = copies_behind
                && (self.applier.needs_flush()
                    || copies_caught_up
                    || self.copy_bytes_since_sync >= self.config.copy_flush_bytes
                    || now.duration_since(self.last_volume_sync_at) >= self.config.copy_sync_interval
                    || self.copy_done.is_some()
                    || self.draining);
            let pressure = !self.pending.is_empty()
                || self.ring.used_bytes() > self.ring.capacity_bytes() / 2
                || self.draining
                || self.copy_waits_for_checkpoint()
                || now.duration_since(self.last_checkpoint_at) >= self.config.checkpoint_interval;
            if copy_due || (writes_behind && pressure) {
                self.volume_sync = Some(barrier);
                self.last_volume_sync_at = now;
                self.copy_bytes_since_sync = 0;
                self.actions.push_back(Action::SyncVolumes(barrier));
            }
        }
        self.plan_copy_done();
        if self.save_wanted && !self.save_in_flight {
            self.save_wanted = false;
            self.save_in_flight = true;
            self.save_version += 1;
            let checkpoint = self.applier.durable().max(self.checkpoint);
            let mut ring = self.ring.clone();
            ring.release_through(checkpoint);
            let journal_tail_pos = ring.oldest_position().unwrap_or(ring.head());
            self.actions.push_back(Action::Save(Persist {
                version: self.save_version,
                checkpoint,
                journal_tail_pos,
                copy_incomplete: self.copy_incomplete,
                data_as_of_us: self.data_as_of_us,
            }));
        }
    }

    /// Whether someone waits for the restore journal's durability: a FUA
    /// write or a flush request (the primary's answer), or soon will (the
    /// clients flushed recently), a drain, records waiting for journal
    /// space or for the applies before a resync, input stopped while the
    /// payloads not applied fill their budget, a COPY_DONE, a drill's
    /// freeze.
    fn journal_sync_urgent(&self, now: Instant) -> bool {
        self.config.journal_sync_delay.is_zero()
            || self.applier.flush_wanted_beyond(self.journal_durable)
            || self.flush_requested_at.is_some_and(|t| now.duration_since(t) < RECENT_FLUSH)
            || self.draining
            || !self.pending.is_empty()
            || self.unapplied_full()
            || self.ring.used_bytes() > self.ring.capacity_bytes() / 2
            || self.copy_done.is_some()
            || self.freeze_at.is_some()
    }

    /// When the oldest record not yet covered by a journal sync must be.
    fn journal_sync_due(&self) -> Option<Instant> {
        self.unsynced_since.map(|t| t + self.journal_sync_delay())
    }

    /// When [`Secondary::poll_action`] must be called again even if nothing
    /// else happens: deferred work falls due ([`Secondary::deferred_until`])
    /// or the idle session's keepalive ack.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deferred_until().into_iter().chain(self.keepalive_due()).min()
    }

    /// When deferred work falls due: a delayed journal sync or a delayed
    /// ack (None: nothing is deferred).
    pub fn deferred_until(&self) -> Option<Instant> {
        if self.failed {
            return None;
        }
        let sync = if self.journal_sync_in_flight || self.received() <= self.journal_durable {
            None
        } else {
            self.journal_sync_due()
        };
        let ack = self.ack_dirty_since.filter(|_| self.ack_dirty).map(|t| t + self.ack_delay());
        sync.into_iter().chain(ack).min()
    }

    /// COPY_DONE: once every copy chunk is durable on the volumes and the
    /// writes through its seq are durable in the journal, the image is
    /// consistent again (after a fault, the journal replay restores it).
    fn plan_copy_done(&mut self) {
        let Some(seq) = self.copy_done else { return };
        if self.copy_done_saved_at.is_some() {
            return;
        }
        let copies_received = self.applier.next_copy_index().saturating_sub(1);
        if copies_received > self.copy_done_chunks {
            // A chunk that came after this COPY_DONE is the next copy's
            // (the primary sends one only once no chunk is read or in
            // flight, and a new copy starts after a resync gap): the image
            // holds part of that copy, and only its COPY_DONE makes it
            // consistent. (Taken as this one's, the image was declared
            // consistent with a later bitmap-mode write copied and an
            // earlier one not, and the preserved image released.)
            self.copy_done = None;
            return;
        }
        let copies_durable = self.copy_reported() >= copies_received;
        if !copies_durable || self.journal_durable < seq || !self.pending.is_empty() {
            return;
        }
        self.gap_covered = None;
        if self.gap.is_some_and(|g| self.appended > g) {
            // A gap announced after this COPY_DONE, and records after it
            // already taken (the image was inconsistent anyway): the image
            // lacks writes only the next resync brings, whose COPY_DONE
            // follows the gap on the stream.
            self.copy_done = None;
            return;
        }
        self.copy_incomplete = false;
        self.data_as_of_us = self.data_as_of_us.max(self.copy_done_as_of_us);
        self.applied_as_of_due = Some((seq, self.copy_done_as_of_us));
        self.note_applied_as_of();
        self.copy_done_saved_at = Some(self.want_save());
    }

    /// A finished copy's time becomes the applied image's once the writes
    /// through its seq are applied.
    fn note_applied_as_of(&mut self) {
        if let Some((_, as_of_us)) = self.applied_as_of_due.filter(|(seq, _)| self.applier.applied() >= *seq) {
            self.applied_as_of_us = self.applied_as_of_us.max(as_of_us);
            self.applied_as_of_due = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::journal_format::JOURNAL_SUPERBLOCK_LEN;
    use crate::record::RecordOp;

    fn config(capacity: u64) -> SecondaryConfig {
        SecondaryConfig {
            journal_capacity: capacity,
            volume_sizes: vec![1 << 20],
            checkpoint_interval: Duration::from_secs(1),
            copy_flush_bytes: 4 << 20,
            copy_sync_interval: Duration::from_millis(100),
            copy_applies: 4,
            journal_sync_delay: Duration::ZERO,
            journal_sync_batch: 0,
            journal_sync_delay_light: Duration::ZERO,
            receipt_acked_at_once: true,
            ack_delay: Duration::ZERO,
            max_unapplied_bytes: 64 << 20,
            block_size: 1,
        }
    }

    fn start() -> SecondaryStart {
        SecondaryStart {
            checkpoint: 0,
            journal_head: JOURNAL_SUPERBLOCK_LEN,
            copy_incomplete: false,
            data_as_of_us: 0,
            generation: 1,
        }
    }

    fn write(seq: u64, offset: u64) -> Record {
        Record::with_payload(RecordOp::Write, seq, 0, offset, 1, Bytes::from(vec![seq as u8; 4096]), false)
    }

    /// Every action due now; appends complete at once.
    fn drain(s: &mut Secondary, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| {
            let a = s.poll_action(now)?;
            if let Action::Append { record, .. } = &a {
                s.on_appended(record.seq);
            }
            Some(a)
        })
        .collect()
    }

    #[test]
    fn a_write_reaches_the_volume_only_once_the_journal_holds_it_durably() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        let acts = drain(&mut s, now);
        assert!(matches!(acts[0], Action::Append { record: Record { seq: 1, .. }, .. }));
        assert!(matches!(acts[1], Action::Append { record: Record { seq: 2, .. }, .. }));
        assert!(matches!(acts[2], Action::SyncJournal { through: 2 }));
        assert!(!acts.iter().any(|a| matches!(a, Action::Apply { .. })), "{acts:?}");
        let Some(Action::Send(Body::Ack(ack))) = acts.last() else { panic!("{acts:?}") };
        assert_eq!((ack.received_seq, ack.durable_seq, ack.applied_seq), (2, 0, 0));
        s.on_journal_synced(2, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::Apply { .. })).count(), 2, "{acts:?}");
        assert_eq!(s.ack().durable_seq, 2);
    }

    #[test]
    fn a_record_that_is_not_whole_blocks_is_refused_before_the_journal() {
        let now = Instant::now();
        let mut s = Secondary::new(SecondaryConfig { block_size: 4096, ..config(1 << 20) }, start(), now);
        let misaligned = Record::with_payload(RecordOp::Write, 1, 0, 1, 1, Bytes::from(vec![1u8; 4096]), false);
        let err = s.on_record(misaligned).unwrap_err();
        assert!(err.to_string().contains("not whole 4096-byte blocks"), "{err}");
        let short = Record::without_payload(RecordOp::Trim, 1, 0, 4096, 512, 1, false);
        assert!(s.on_record(short).is_err());
        assert!(drain(&mut s, now).iter().all(|a| !matches!(a, Action::Append { .. })));
        s.on_record(write(1, 8192)).unwrap();
        assert!(matches!(drain(&mut s, now)[0], Action::Append { record: Record { seq: 1, .. }, .. }));
    }

    #[test]
    fn a_flush_request_beyond_the_records_received_counts_as_one_through_them() {
        let now = Instant::now();
        let run = |target: u64| {
            let mut s = Secondary::new(config(1 << 20), start(), now);
            s.on_record(write(1, 0)).unwrap();
            drain(&mut s, now);
            s.on_flush_request(target);
            s.on_journal_synced(1, Ok(())).unwrap();
            let acts = drain(&mut s, now);
            complete_applies(&mut s, acts);
            let acts = drain(&mut s, now);
            (format!("{acts:?}"), s.applier.flush_wanted_beyond(1))
        };
        let (within, _) = run(1);
        let (beyond, left) = run(1_000_000);
        assert_eq!(beyond, within);
        assert!(!left, "a target no record reaches stays behind");
    }

    #[test]
    fn a_copy_done_beyond_the_records_received_is_refused() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        s.on_record(write(1, 0)).unwrap();
        assert!(matches!(s.on_copy_done(2, 0), Err(SecondaryError::CopyDoneAhead { seq: 2, received: 1 })));
        s.on_copy_done(1, 0).unwrap();
    }

    #[test]
    fn input_stops_while_payloads_not_applied_fill_their_budget() {
        let now = Instant::now();
        let delay = Duration::from_secs(10);
        let cfg = SecondaryConfig { max_unapplied_bytes: 3 * 4096, journal_sync_delay: delay, ..config(1 << 20) };
        let mut s = Secondary::new(cfg, start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        assert!(s.wants_input());
        assert!(syncs(&drain(&mut s, now)).is_empty(), "group commit: nobody waits yet");
        s.on_record(write(3, 16384)).unwrap();
        assert!(!s.wants_input(), "three payloads of 4 KiB are held, not applied");
        // The journal sync the applies wait for goes out at once.
        assert_eq!(syncs(&drain(&mut s, now)), [3]);
        s.on_journal_synced(3, Ok(())).unwrap();
        let applies: Vec<ApplyId> = applies(drain(&mut s, now)).into_iter().map(|(id, _)| id).collect();
        assert_eq!(applies.len(), 3);
        assert!(!s.wants_input(), "handed out for applying is not applied");
        s.on_applied(applies[0], Ok(())).unwrap();
        assert!(s.wants_input());
        // A record larger than the whole budget is still taken in, alone.
        s.on_applied(applies[1], Ok(())).unwrap();
        s.on_applied(applies[2], Ok(())).unwrap();
        let large = Record::with_payload(RecordOp::Write, 4, 0, 0, 1, Bytes::from(vec![4u8; 65536]), false);
        s.on_record(large).unwrap();
        assert!(!s.wants_input());
        assert_eq!(drain(&mut s, now).iter().filter(|a| matches!(a, Action::Append { .. })).count(), 1);
    }

    #[test]
    fn a_record_is_received_and_synced_only_once_every_append_up_to_it_is_done() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        let poll = |s: &mut Secondary| std::iter::from_fn(|| s.poll_action(now)).collect::<Vec<_>>();
        let acts = poll(&mut s);
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::Append { .. })).count(), 2, "{acts:?}");
        assert!(syncs(&acts).is_empty(), "nothing is in the journal yet: {acts:?}");
        assert_eq!(s.ack().received_seq, 0);
        // The second append completes first (a large record's direct write
        // may): the first is still missing.
        s.on_appended(2);
        let acts = poll(&mut s);
        assert!(syncs(&acts).is_empty(), "{acts:?}");
        assert_eq!((s.received(), s.ack().received_seq), (0, 0));
        s.on_appended(1);
        let acts = poll(&mut s);
        assert_eq!(syncs(&acts), [2], "{acts:?}");
        assert_eq!(s.ack().received_seq, 2);
        assert_eq!(s.ack().durable_seq, 0);
    }

    fn syncs(acts: &[Action]) -> Vec<u64> {
        acts.iter()
            .filter_map(|a| match a {
                Action::SyncJournal { through } => Some(*through),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_journal_is_synced_for_many_records_at_once_unless_someone_waits() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(1);
        let mut s = Secondary::new(SecondaryConfig { journal_sync_delay: delay, ..config(1 << 20) }, start(), t0);
        s.on_record(write(1, 0)).unwrap();
        let acts = drain(&mut s, t0);
        assert!(syncs(&acts).is_empty(), "{acts:?}");
        // A plain write is received (as safe as a plain write here) at once.
        assert_eq!(s.ack().received_seq, 1);
        assert_eq!(s.poll_timeout(), Some(t0 + delay));
        let t1 = t0 + delay / 2;
        s.on_record(write(2, 8192)).unwrap();
        assert!(syncs(&drain(&mut s, t1)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t0 + delay), "the oldest record sets the deadline");
        assert_eq!(syncs(&drain(&mut s, t0 + delay)), vec![2], "one sync covers both");
        assert_eq!(s.deferred_until(), None, "a sync is in flight");
        // Appended while that sync runs: their delay counts from then.
        let t2 = t0 + 2 * delay;
        s.on_record(write(3, 16384)).unwrap();
        assert!(syncs(&drain(&mut s, t2)).is_empty());
        s.on_journal_synced(2, Ok(())).unwrap();
        assert_eq!(applies(drain(&mut s, t2)).len(), 2);
        assert_eq!(s.poll_timeout(), Some(t2 + delay));
        // A FUA write is waited for (the primary's answer): synced at once,
        // with what came before it.
        let mut fua = write(4, 24576);
        fua.fua = true;
        s.on_record(fua).unwrap();
        assert_eq!(syncs(&drain(&mut s, t2)), vec![4]);
        s.on_journal_synced(4, Ok(())).unwrap();
        // So is a write the primary's FLUSH asks for.
        s.on_record(write(5, 32768)).unwrap();
        assert!(syncs(&drain(&mut s, t2)).is_empty());
        s.on_flush_request(5);
        assert_eq!(syncs(&drain(&mut s, t2)), vec![5]);
        s.on_journal_synced(5, Ok(())).unwrap();
        // The clients flush often: the next write is synced at once (its
        // flush request would wait for the sync otherwise)...
        s.on_record(write(6, 40960)).unwrap();
        assert_eq!(syncs(&drain(&mut s, t2 + RECENT_FLUSH / 2)), vec![6]);
        s.on_journal_synced(6, Ok(())).unwrap();
        // ... until they stop for a while.
        let t3 = t2 + RECENT_FLUSH;
        s.on_record(write(7, 49152)).unwrap();
        assert!(syncs(&drain(&mut s, t3)).is_empty());
        // And a drain does not wait either.
        s.begin_drain();
        assert_eq!(syncs(&drain(&mut s, t3)), vec![7]);
    }

    #[test]
    fn a_light_load_waits_longer_for_the_journal_sync_until_a_batch_has_come() {
        let t0 = Instant::now();
        let (delay, light) = (Duration::from_millis(1), Duration::from_millis(5));
        let cfg = SecondaryConfig {
            journal_sync_delay: delay,
            journal_sync_batch: 3,
            journal_sync_delay_light: light,
            ..config(1 << 20)
        };
        let mut s = Secondary::new(cfg, start(), t0);
        // Two records: fewer than a batch, the sync waits the light delay.
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        assert!(syncs(&drain(&mut s, t0)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t0 + light));
        assert!(syncs(&drain(&mut s, t0 + delay)).is_empty(), "not at the short delay");
        assert_eq!(syncs(&drain(&mut s, t0 + light)), vec![2], "at the light one");
        s.on_journal_synced(2, Ok(())).unwrap();
        let acts = drain(&mut s, t0 + light);
        complete_applies(&mut s, acts);
        // A batch comes: the short delay, counted from the oldest record.
        let t1 = t0 + 2 * light;
        s.on_record(write(3, 16384)).unwrap();
        assert!(syncs(&drain(&mut s, t1)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t1 + light));
        s.on_record(write(4, 24576)).unwrap();
        s.on_record(write(5, 32768)).unwrap();
        assert!(syncs(&drain(&mut s, t1 + delay / 2)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t1 + delay), "the deadline moves up");
        assert_eq!(syncs(&drain(&mut s, t1 + delay)), vec![5]);
        s.on_journal_synced(5, Ok(())).unwrap();
        // Someone waiting still goes at once, batch or not.
        let mut fua = write(6, 40960);
        fua.fua = true;
        s.on_record(fua).unwrap();
        assert_eq!(syncs(&drain(&mut s, t1 + delay)), vec![6]);
    }

    #[test]
    fn an_idle_session_repeats_its_last_ack() {
        let t0 = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), t0);
        s.on_record(write(1, 0)).unwrap();
        let acts = drain(&mut s, t0);
        let sent = acks(&acts);
        assert!(!sent.is_empty(), "{acts:?}");
        assert!(acks(&drain(&mut s, t0 + ACK_KEEPALIVE / 2)).is_empty(), "nothing new, not yet due");
        assert_eq!(s.poll_timeout(), Some(t0 + ACK_KEEPALIVE));
        let again = acks(&drain(&mut s, t0 + ACK_KEEPALIVE));
        assert_eq!(again, sent[sent.len() - 1..], "the last ack, again");
        assert_eq!(s.poll_timeout(), Some(t0 + 2 * ACK_KEEPALIVE));
        s.fail();
        assert!(acks(&drain(&mut s, t0 + 3 * ACK_KEEPALIVE)).is_empty(), "a failed session says nothing");
    }

    fn acks(acts: &[Action]) -> Vec<(u64, u64, u64)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(Body::Ack(a)) => Some((a.received_seq, a.durable_seq, a.applied_seq)),
                _ => None,
            })
            .collect()
    }

    /// Applies everything `acts` started, successfully.
    fn complete_applies(s: &mut Secondary, acts: Vec<Action>) {
        for (id, _) in applies(acts) {
            s.on_applied(id, Ok(())).unwrap();
        }
    }

    #[test]
    fn acks_nobody_waits_for_are_coalesced_and_the_waited_ones_go_at_once() {
        let t0 = Instant::now();
        let (sync_delay, ack_delay) = (Duration::from_millis(1), Duration::from_millis(5));
        let cfg = SecondaryConfig {
            journal_sync_delay: sync_delay,
            receipt_acked_at_once: false,
            ack_delay,
            ..config(1 << 20)
        };
        let mut s = Secondary::new(cfg.clone(), start(), t0);
        assert_eq!(acks(&drain(&mut s, t0)), vec![(0, 0, 0)], "the session's first ack goes at once");
        // Async mode: receipt, group-committed durability and applies wait
        // for one ack, due `ack_delay` after the first change.
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        assert!(acks(&drain(&mut s, t0)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t0 + sync_delay), "the journal sync comes first");
        let acts = drain(&mut s, t0 + sync_delay);
        assert_eq!((syncs(&acts), acks(&acts)), (vec![2], vec![]));
        s.on_journal_synced(2, Ok(())).unwrap();
        let acts = drain(&mut s, t0 + sync_delay);
        assert!(acks(&acts).is_empty());
        complete_applies(&mut s, acts);
        assert!(acks(&drain(&mut s, t0 + sync_delay)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t0 + ack_delay), "counted from the first change");
        assert_eq!(acks(&drain(&mut s, t0 + ack_delay)), vec![(2, 2, 2)], "one ack for all of it");
        assert_eq!(s.deferred_until(), None);
        // A FUA write is waited for: the ack of its sync goes at once.
        let t1 = t0 + 2 * ack_delay;
        let mut fua = write(3, 16384);
        fua.fua = true;
        s.on_record(fua).unwrap();
        assert_eq!(syncs(&drain(&mut s, t1)), vec![3]);
        s.on_journal_synced(3, Ok(())).unwrap();
        assert_eq!(acks(&drain(&mut s, t1)), vec![(3, 3, 2)]);
        // So is the answer to a flush request, even for records already
        // durable.
        s.on_flush_request(3);
        assert!(acks(&drain(&mut s, t1)).is_empty(), "nothing changed");
        let t2 = t1 + 2 * RECENT_FLUSH;
        s.on_record(write(4, 24576)).unwrap();
        assert!(acks(&drain(&mut s, t2)).is_empty(), "no flush lately");
        let acts = drain(&mut s, t2 + sync_delay);
        assert_eq!(syncs(&acts), vec![4]);
        s.on_flush_request(4);
        s.on_journal_synced(4, Ok(())).unwrap();
        assert_eq!(acks(&drain(&mut s, t2 + sync_delay)), vec![(4, 4, 2)]);
        // Sync mode: the primary answers writes on receipt.
        let mut s = Secondary::new(SecondaryConfig { receipt_acked_at_once: true, ..cfg }, start(), t0);
        drain(&mut s, t0);
        s.on_record(write(1, 0)).unwrap();
        assert_eq!(acks(&drain(&mut s, t0)), vec![(1, 0, 0)]);
        // Its group-committed durability and applies are not waited for.
        let acts = drain(&mut s, t0 + sync_delay);
        assert_eq!(syncs(&acts), vec![1]);
        s.on_journal_synced(1, Ok(())).unwrap();
        let acts = drain(&mut s, t0 + sync_delay);
        complete_applies(&mut s, acts);
        assert!(acks(&drain(&mut s, t0 + sync_delay)).is_empty());
        assert_eq!(acks(&drain(&mut s, t0 + sync_delay + ack_delay)), vec![(1, 1, 1)]);
    }

    #[test]
    fn a_stretched_session_defers_syncs_and_acks_longer_but_never_what_is_waited_for() {
        let t0 = Instant::now();
        let (sync_delay, ack_delay) = (Duration::from_millis(5), Duration::from_millis(5));
        let cfg = SecondaryConfig {
            journal_sync_delay: sync_delay,
            receipt_acked_at_once: false,
            ack_delay,
            ..config(1 << 20)
        };
        let mut s = Secondary::new(cfg, start(), t0);
        drain(&mut s, t0);
        s.set_stretch(4);
        s.on_record(write(1, 0)).unwrap();
        let acts = drain(&mut s, t0);
        assert!(syncs(&acts).is_empty() && acks(&acts).is_empty(), "{acts:?}");
        assert_eq!(s.poll_timeout(), Some(t0 + 4 * sync_delay));
        assert!(syncs(&drain(&mut s, t0 + sync_delay)).is_empty(), "not at the configured delay");
        // The sync, and the ack of the receipt (counted from t0) with it.
        let t = t0 + 4 * sync_delay;
        let acts = drain(&mut s, t);
        assert_eq!((syncs(&acts), acks(&acts)), (vec![1], vec![(1, 0, 0)]));
        s.on_journal_synced(1, Ok(())).unwrap();
        let acts = drain(&mut s, t);
        complete_applies(&mut s, acts);
        assert!(acks(&drain(&mut s, t)).is_empty());
        assert_eq!(s.poll_timeout(), Some(t + 4 * ack_delay));
        assert!(acks(&drain(&mut s, t + ack_delay)).is_empty(), "not at the configured delay");
        assert_eq!(acks(&drain(&mut s, t + 4 * ack_delay)), vec![(1, 1, 1)]);
        // Taken back, the deadline of a change already made moves with it.
        let t1 = t0 + 10 * sync_delay;
        s.on_record(write(2, 8192)).unwrap();
        drain(&mut s, t1);
        assert_eq!(s.poll_timeout(), Some(t1 + 4 * sync_delay));
        s.set_stretch(0);
        assert_eq!(s.poll_timeout(), Some(t1 + sync_delay), "0 counts as 1");
        s.set_stretch(8);
        // A FUA write is waited for: synced and acked at once, stretched
        // or not.
        let mut fua = write(3, 16384);
        fua.fua = true;
        s.on_record(fua).unwrap();
        assert_eq!(syncs(&drain(&mut s, t1)), vec![3]);
        s.on_journal_synced(3, Ok(())).unwrap();
        assert_eq!(acks(&drain(&mut s, t1)), vec![(3, 3, 1)]);
    }

    #[test]
    fn copy_progress_is_acked_at_once_even_when_other_acks_wait() {
        let now = Instant::now();
        let cfg =
            SecondaryConfig { receipt_acked_at_once: false, ack_delay: Duration::from_secs(1), ..config(1 << 20) };
        let mut s = Secondary::new(cfg, start(), now);
        drain(&mut s, now);
        let mut copy = Record::with_payload(RecordOp::Copy, 0, 0, 0, 1, Bytes::from(vec![9u8; 4096]), false);
        copy.copy_index = 1;
        s.on_record(copy).unwrap();
        drain(&mut s, now);
        s.on_image_preserved(Ok(())).unwrap();
        let Some(Action::Save(p)) = drain(&mut s, now).into_iter().find(|a| matches!(a, Action::Save(_))) else {
            panic!("no save")
        };
        s.on_saved(&p, Ok(()), now).unwrap();
        let acts = drain(&mut s, now);
        complete_applies(&mut s, acts);
        // A differing span of a hash-only chunk is reported at once too.
        s.on_copy_mismatch(2, 0, 4096);
        let acts = drain(&mut s, now);
        let Some(Action::Send(Body::Ack(ack))) = acts.iter().find(|a| matches!(a, Action::Send(_))) else {
            panic!("the mismatch waits: {acts:?}")
        };
        assert_eq!(ack.copy_mismatch.len(), 1);
        let Some(Action::SyncVolumes(barrier)) = acts.into_iter().find(|a| matches!(a, Action::SyncVolumes(_))) else {
            panic!("no volume sync")
        };
        s.on_volumes_synced(barrier, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(Action::Send(Body::Ack(ack))) = acts.iter().find(|a| matches!(a, Action::Send(_))) else {
            panic!("the copy's durability waits: {acts:?}")
        };
        assert_eq!(ack.copy_durable, 1);
    }

    /// A resync's chunk follows writes on the stream; a restart replays
    /// the restore journal from the persisted checkpoint. Reported durable
    /// before the checkpoint passes those writes, a chunk could be
    /// overwritten by their replay after a crash, and the primary, which
    /// forgets a chunk once it is reported durable, would never send it
    /// again: the sites would differ with the pair in PAIR.
    #[test]
    fn a_copy_chunk_is_reported_durable_only_once_no_replay_can_overwrite_it() {
        let now = Instant::now();
        let copy_durable = |acts: &[Action]| {
            acts.iter()
                .filter_map(|a| match a {
                    Action::Send(Body::Ack(a)) => Some(a.copy_durable),
                    _ => None,
                })
                .max()
        };
        let start = SecondaryStart { copy_incomplete: true, ..start() };
        let mut s = Secondary::new(config(1 << 20), start, now);
        drain(&mut s, now);
        // Write 1 over the chunk's block, write 2 elsewhere, then the chunk.
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        drain(&mut s, now);
        s.on_journal_synced(2, Ok(())).unwrap();
        let started = applies(drain(&mut s, now));
        assert_eq!(started.iter().map(|a| a.1).collect::<Vec<_>>(), [1, 2]);
        // It reflects the primary's image after write 2.
        let mut copy = Record::with_payload(RecordOp::Copy, 2, 0, 0, 1, Bytes::from(vec![9u8; 4096]), false);
        copy.copy_index = 1;
        s.on_record(copy).unwrap();
        // Write 1 lands, then the chunk over it; write 2 is still in flight.
        s.on_applied(started[0].0, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        complete_applies(&mut s, acts);
        let acts = drain(&mut s, now);
        let Some(barrier) = acts.iter().find_map(|a| if let Action::SyncVolumes(b) = a { Some(*b) } else { None })
        else {
            panic!("the chunk is not made durable: {acts:?}")
        };
        assert_eq!((barrier.seq, barrier.copy_index), (1, 1));
        s.on_volumes_synced(barrier, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        assert_eq!(copy_durable(&acts).unwrap_or(0), 0, "the checkpoint on disk is 0: {acts:?}");
        let Some(p) = acts.iter().find_map(|a| if let Action::Save(p) = a { Some(p.clone()) } else { None }) else {
            panic!("no checkpoint saved: {acts:?}")
        };
        assert_eq!(p.checkpoint, 1);
        // Checkpoint 1 saved: a replay would still put write 2 back, which
        // came before the chunk on the stream (here not over it, but a
        // replay does not know).
        s.on_saved(&p, Ok(()), now).unwrap();
        assert_eq!(copy_durable(&drain(&mut s, now)).unwrap_or(0), 0);
        // Write 2 lands: the volumes are synced and the checkpoint saved
        // at once, for the chunk waiting on them; then it is reported.
        s.on_applied(started[1].0, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(barrier) = acts.iter().find_map(|a| if let Action::SyncVolumes(b) = a { Some(*b) } else { None })
        else {
            panic!("the chunk waits for a volume sync nobody plans: {acts:?}")
        };
        s.on_volumes_synced(barrier, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        assert_eq!(copy_durable(&acts).unwrap_or(0), 0, "{acts:?}");
        let Some(p) = acts.iter().find_map(|a| if let Action::Save(p) = a { Some(p.clone()) } else { None }) else {
            panic!("no checkpoint saved: {acts:?}")
        };
        assert_eq!(p.checkpoint, 2);
        s.on_saved(&p, Ok(()), now).unwrap();
        assert_eq!(copy_durable(&drain(&mut s, now)), Some(1));
    }

    #[test]
    fn overlapping_records_apply_in_order() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 0)).unwrap();
        drain(&mut s, now);
        s.on_journal_synced(2, Ok(())).unwrap();
        let applies: Vec<ApplyId> = applies(drain(&mut s, now)).into_iter().map(|(id, _)| id).collect();
        assert_eq!(applies.len(), 1, "the second write waits for the first");
        s.on_applied(applies[0], Ok(())).unwrap();
        let acts = drain(&mut s, now);
        assert!(matches!(acts[0], Action::Apply { record: Record { seq: 2, .. }, .. }), "{acts:?}");
    }

    fn applies(acts: Vec<Action>) -> Vec<(ApplyId, u64)> {
        acts.into_iter()
            .filter_map(|a| match a {
                Action::Apply { id, record } => Some((id, record.seq)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_freeze_lands_on_a_prefix_and_holds_later_writes() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        // 1 and 3 overlap; 2 does not: 2 is applied while 3 waits for 1.
        // Each written on the primary at seq × 1 ms.
        let write = |seq: u64, offset: u64| Record { written_at_us: seq * 1000, ..write(seq, offset) };
        for (seq, off) in [(1, 0), (2, 8192), (3, 0)] {
            s.on_record(write(seq, off)).unwrap();
        }
        drain(&mut s, now);
        s.on_journal_synced(3, Ok(())).unwrap();
        let started = applies(drain(&mut s, now));
        assert_eq!(started.iter().map(|a| a.1).collect::<Vec<_>>(), vec![1, 2]);
        // Frozen after 2 was handed out: the point is 2, and 3 is held.
        assert!(s.freeze());
        assert_eq!(s.frozen_at(), None, "applies are in flight");
        s.on_applied(started[1].0, Ok(())).unwrap();
        assert_eq!(s.frozen_at(), None, "1 is not applied yet");
        s.on_applied(started[0].0, Ok(())).unwrap();
        assert!(applies(drain(&mut s, now)).is_empty(), "3 is held");
        assert_eq!(s.frozen_at(), Some(2));
        // Records keep arriving and are journaled (and acked) meanwhile.
        s.on_record(write(4, 65536)).unwrap();
        s.on_journal_synced(4, Ok(())).unwrap();
        assert!(applies(drain(&mut s, now)).is_empty());
        assert_eq!(s.ack().durable_seq, 4);
        assert_eq!(s.frozen_at(), Some(2));
        // The frozen point's time is write 2's, not that of the newest
        // write durable in the restore journal.
        assert_eq!((s.applied_as_of_us(), s.data_as_of_us()), (2_000, 4_000));
        s.thaw();
        let started = applies(drain(&mut s, now));
        assert_eq!(started.iter().map(|a| a.1).collect::<Vec<_>>(), vec![3, 4]);
    }

    /// A drill checks that the replica is consistent before it asks for a
    /// freeze; a resync may start in between. Frozen then, the point could
    /// include chunks of it: the freeze is refused. A resync that starts
    /// after the freeze is held back with everything else.
    #[test]
    fn a_freeze_is_refused_once_a_resync_made_the_image_inconsistent() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        assert!(s.freeze());
        let mut copy = Record::with_payload(RecordOp::Copy, 0, 0, 0, 1, Bytes::from(vec![9u8; 4096]), false);
        copy.copy_index = 1;
        s.on_record(copy).unwrap();
        drain(&mut s, now);
        s.on_image_preserved(Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(p) = acts.iter().find_map(|a| if let Action::Save(p) = a { Some(p.clone()) } else { None }) else {
            panic!("{acts:?}")
        };
        s.on_saved(&p, Ok(()), now).unwrap();
        assert!(applies(drain(&mut s, now)).is_empty(), "the chunk is held while frozen");
        assert_eq!(s.frozen_at(), Some(0));
        s.thaw();
        assert_eq!(applies(drain(&mut s, now)).len(), 1, "the chunk goes once thawed");
        assert!(!s.freeze(), "the image is inconsistent now");
        assert_eq!(s.frozen_at(), None);
    }

    #[test]
    fn a_full_journal_stops_input_until_a_checkpoint_frees_it() {
        let now = Instant::now();
        // Room for about three 4 KiB records.
        let mut s = Secondary::new(config(JOURNAL_SUPERBLOCK_LEN + 3 * 4608), start(), now);
        for seq in 1..=4 {
            s.on_record(write(seq, seq * 8192)).unwrap();
        }
        assert!(!s.wants_input());
        drain(&mut s, now);
        assert_eq!(s.received(), 3);
        s.on_journal_synced(3, Ok(())).unwrap();
        let ids: Vec<ApplyId> = drain(&mut s, now)
            .into_iter()
            .filter_map(|a| match a {
                Action::Apply { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        for id in ids {
            s.on_applied(id, Ok(())).unwrap();
        }
        // Pressure: the volumes are synced and the checkpoint saved at once.
        let acts = drain(&mut s, now);
        let Some(Action::SyncVolumes(b)) = acts.iter().find(|a| matches!(a, Action::SyncVolumes(_))) else {
            panic!("{acts:?}")
        };
        s.on_volumes_synced(*b, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(Action::Save(p)) = acts.iter().find(|a| matches!(a, Action::Save(_))) else { panic!("{acts:?}") };
        assert_eq!(p.checkpoint, 3);
        s.on_saved(&p.clone(), Ok(()), now).unwrap();
        assert!(s.wants_input());
        drain(&mut s, now);
        assert_eq!(s.received(), 4);
    }

    #[test]
    fn copy_data_waits_until_the_inconsistency_is_persisted() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        let mut copy = Record::with_payload(RecordOp::Copy, 0, 0, 0, 1, Bytes::from(vec![9u8; 4096]), false);
        copy.copy_index = 1;
        s.on_record(copy).unwrap();
        let acts = drain(&mut s, now);
        assert!(matches!(acts.first(), Some(Action::PreserveImage { seq: 0, .. })), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Save(_) | Action::Apply { .. })), "{acts:?}");
        s.on_image_preserved(Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(Action::Save(p)) = acts.first() else { panic!("{acts:?}") };
        assert!(p.copy_incomplete);
        assert!(!acts.iter().any(|a| matches!(a, Action::Apply { .. })));
        s.on_saved(&p.clone(), Ok(()), now).unwrap();
        let acts = drain(&mut s, now);
        assert!(matches!(acts.first(), Some(Action::Apply { .. })), "{acts:?}");
    }

    #[test]
    fn a_resync_preserves_the_consistent_image_once_the_writes_before_it_are_applied() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        let mut copy = Record::with_payload(RecordOp::Copy, 0, 0, 0, 1, Bytes::from(vec![9u8; 4096]), false);
        copy.copy_index = 1;
        s.on_record(copy).unwrap();
        assert!(!s.wants_input(), "records behind the copy chunk wait");
        let acts = drain(&mut s, now);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::PreserveImage { .. })),
            "writes 1 and 2 are not applied: {acts:?}"
        );
        s.on_journal_synced(2, Ok(())).unwrap();
        let applies: Vec<ApplyId> = drain(&mut s, now)
            .into_iter()
            .filter_map(|a| if let Action::Apply { id, .. } = a { Some(id) } else { None })
            .collect();
        assert_eq!(applies.len(), 2);
        s.on_applied(applies[0], Ok(())).unwrap();
        assert!(!drain(&mut s, now).iter().any(|a| matches!(a, Action::PreserveImage { .. })), "write 2 is applying");
        s.on_applied(applies[1], Ok(())).unwrap();
        let acts = drain(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::PreserveImage { seq: 2, .. })), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Apply { .. })), "{acts:?}");
        // A failure to preserve it ends the session before the copy lands.
        let err = s.on_image_preserved(Err(PreserveFailure::Image("disk full".into()))).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(!drain(&mut s, now).iter().any(|a| matches!(a, Action::Apply { .. })));
        // Only a failed volume sync fails the session's applies.
        assert!(!s.failed, "the applied prefix is intact");
        let err = s.on_image_preserved(Err(PreserveFailure::Volumes("EIO".into()))).unwrap_err();
        assert!(err.to_string().contains("EIO"), "{err}");
        assert!(s.failed);
    }

    #[test]
    fn a_record_after_a_resync_gap_waits_for_the_image_to_be_preserved_and_marked_inconsistent() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_resync_gap(1);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        let acts = drain(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::Append { record, .. } if record.seq == 1)), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { record, .. } if record.seq == 2)), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::PreserveImage { .. })), "write 1 is not applied: {acts:?}");
        s.on_journal_synced(1, Ok(())).unwrap();
        let id = drain(&mut s, now)
            .into_iter()
            .find_map(|a| if let Action::Apply { id, .. } = a { Some(id) } else { None })
            .expect("write 1 applies");
        s.on_applied(id, Ok(())).unwrap();
        let acts = drain(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::PreserveImage { seq: 1, .. })), "{acts:?}");
        s.on_image_preserved(Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(Action::Save(p)) = acts.iter().find(|a| matches!(a, Action::Save(_))) else { panic!("{acts:?}") };
        assert!(p.copy_incomplete, "{p:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })), "write 2 before the save: {acts:?}");
        s.on_saved(&p.clone(), Ok(()), now).unwrap();
        let acts = drain(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::Append { record, .. } if record.seq == 2)), "{acts:?}");
        assert!(s.copy_incomplete());
    }

    /// Completes every action until none is left; returns them.
    fn settle(s: &mut Secondary, now: Instant) -> Vec<Action> {
        let mut all = Vec::new();
        for _ in 0..50 {
            let acts = drain(s, now);
            if acts.is_empty() {
                return all;
            }
            for a in acts {
                match &a {
                    Action::SyncJournal { through } => s.on_journal_synced(*through, Ok(())).unwrap(),
                    Action::Apply { id, .. } => s.on_applied(*id, Ok(())).unwrap(),
                    Action::SyncVolumes(b) => s.on_volumes_synced(*b, Ok(())).unwrap(),
                    Action::Save(p) => s.on_saved(p, Ok(()), now).unwrap(),
                    Action::PreserveImage { .. } => s.on_image_preserved(Ok(())).unwrap(),
                    Action::Append { .. } | Action::Send(_) | Action::ReleaseImage => {}
                }
                all.push(a);
            }
        }
        panic!("actions do not settle");
    }

    #[test]
    fn a_gap_that_opens_after_copy_done_outlives_that_copy() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        s.on_copy_done(2, 0).unwrap();
        // The primary's journal fills again right after it sent COPY_DONE.
        s.on_resync_gap(2);
        let acts = settle(&mut s, now);
        assert!(!s.copy_incomplete(), "COPY_DONE through 2 makes the image consistent");
        assert!(acts.iter().any(|a| matches!(a, Action::ReleaseImage)), "{acts:?}");
        s.on_record(write(3, 16384)).unwrap();
        let acts = drain(&mut s, now);
        assert!(
            acts.iter().any(|a| matches!(a, Action::PreserveImage { seq: 2, .. })),
            "write 3 follows the new gap: {acts:?}"
        );
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })), "{acts:?}");
    }

    #[test]
    fn a_finished_copy_dates_the_replica_as_of_the_primary_s_copy_done() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        let write = |seq: u64, offset: u64| Record { written_at_us: seq * 1000, ..write(seq, offset) };
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        // The copy holds every write the primary made up to 9 ms (the last
        // record is older: its later writes were copied, or none came).
        s.on_copy_done(2, 9_000).unwrap();
        settle(&mut s, now);
        assert!(!s.copy_incomplete());
        assert_eq!((s.applied(), s.data_as_of_us(), s.applied_as_of_us()), (2, 9_000, 9_000));
        // A peer that does not say (0) moves nothing back.
        s.on_record(write(3, 16384)).unwrap();
        settle(&mut s, now);
        assert_eq!((s.data_as_of_us(), s.applied_as_of_us()), (9_000, 9_000));
    }

    #[test]
    fn a_copy_done_covers_the_gaps_announced_before_it_even_through_the_same_seq() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        // The resync of the writes after record 2 finished with no record
        // journaled since: COPY_DONE through 2.
        s.on_resync_gap(2);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        s.on_copy_done(2, 0).unwrap();
        settle(&mut s, now);
        assert!(!s.copy_incomplete());
        // Record 3 follows nothing this node lacks: no new resync starts
        // (none would ever end it: the primary's resync is over).
        s.on_record(write(3, 16384)).unwrap();
        let acts = settle(&mut s, now);
        assert!(!acts.iter().any(|a| matches!(a, Action::PreserveImage { .. })), "{acts:?}");
        assert!(!s.copy_incomplete());
        assert_eq!(s.applied(), 3);
    }

    #[test]
    fn a_gap_announced_after_copy_done_outlives_it_whatever_its_seq() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        for seq in 1..=5 {
            s.on_record(write(seq, seq * 8192)).unwrap();
        }
        s.on_copy_done(5, 0).unwrap();
        // The primary's journal fills again before COPY_DONE's reply reaches
        // it: it announces the gap it still holds, older than 5.
        s.on_resync_gap(3);
        settle(&mut s, now);
        assert!(!s.copy_incomplete(), "COPY_DONE through 5 makes the image consistent");
        s.on_record(write(6, 65536)).unwrap();
        let acts = drain(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::PreserveImage { seq: 5, .. })), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })), "{acts:?}");
    }

    #[test]
    fn a_copy_done_passed_by_records_after_a_later_gap_leaves_the_image_inconsistent() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        s.on_record(write(1, 0)).unwrap();
        s.on_copy_done(1, 0).unwrap();
        // Before record 1 is durable, the journal fills again and records
        // after the gap arrive: taken at once (the image is inconsistent).
        s.on_resync_gap(1);
        s.on_record(write(2, 8192)).unwrap();
        let acts = settle(&mut s, now);
        assert_eq!(s.applied(), 2);
        assert!(s.copy_incomplete(), "the image lacks the writes before record 2");
        assert!(!acts.iter().any(|a| matches!(a, Action::ReleaseImage | Action::Send(Body::CommandReply(_)))));
        // The next resync's COPY_DONE ends it.
        s.on_copy_done(2, 0).unwrap();
        let acts = settle(&mut s, now);
        assert!(!s.copy_incomplete());
        assert!(acts.iter().any(|a| matches!(a, Action::ReleaseImage)), "{acts:?}");
    }

    /// A copy chunk after a COPY_DONE and a later gap (the journal filled
    /// again, the primary wrote in bitmap mode and started the next copy
    /// before this node acted on the COPY_DONE): that COPY_DONE does not
    /// make the image consistent, which holds part of the next copy; the
    /// next copy's does.
    #[test]
    fn a_copy_done_passed_by_a_chunk_of_the_next_copy_leaves_the_image_inconsistent() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { copy_incomplete: true, ..start() }, now);
        s.on_record(write(1, 0)).unwrap();
        s.on_copy_done(1, 0).unwrap();
        s.on_resync_gap(1);
        let mut copy = Record::with_payload(RecordOp::Copy, 1, 0, 1 << 16, 1, Bytes::from(vec![9u8; 4096]), false);
        copy.copy_index = 1;
        s.on_record(copy).unwrap();
        let acts = settle(&mut s, now);
        assert!(s.copy_incomplete(), "the image holds part of the next copy");
        assert!(!acts.iter().any(|a| matches!(a, Action::ReleaseImage | Action::Send(Body::CommandReply(_)))));
        // The next copy's COPY_DONE ends it.
        s.on_copy_done(1, 0).unwrap();
        let acts = settle(&mut s, now);
        assert!(!s.copy_incomplete());
        assert!(acts.iter().any(|a| matches!(a, Action::ReleaseImage)), "{acts:?}");
    }

    /// Chunks before a COPY_DONE on the stream still waiting to be taken in
    /// when it comes (a resync of a consistent image waits for its
    /// preservation) are that copy's: it completes once they are durable.
    #[test]
    fn chunks_still_pending_at_copy_done_are_covered_by_it() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        for i in 1..=2u64 {
            let mut copy = Record::with_payload(RecordOp::Copy, 0, 0, i << 16, 1, Bytes::from(vec![9u8; 4096]), false);
            copy.copy_index = i;
            s.on_record(copy).unwrap();
        }
        s.on_copy_done(0, 0).unwrap();
        let acts = settle(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::PreserveImage { .. })), "{acts:?}");
        assert_eq!(s.applier.next_copy_index(), 3, "both chunks taken in");
        assert!(!s.copy_incomplete());
        assert!(acts.iter().any(|a| matches!(a, Action::ReleaseImage)), "{acts:?}");
    }

    /// After a COPY_DONE: completes every action but the save that persists
    /// the consistent image, which it returns (nothing is released before).
    fn settle_but_the_consistent_save(s: &mut Secondary, now: Instant) -> Persist {
        let mut save = None;
        for _ in 0..20 {
            for a in drain(s, now) {
                match a {
                    Action::SyncJournal { through } => s.on_journal_synced(through, Ok(())).unwrap(),
                    Action::Apply { id, .. } => s.on_applied(id, Ok(())).unwrap(),
                    Action::SyncVolumes(b) => s.on_volumes_synced(b, Ok(())).unwrap(),
                    Action::Save(p) if !p.copy_incomplete => save = Some(p),
                    Action::Save(p) => s.on_saved(&p, Ok(()), now).unwrap(),
                    other => assert!(!matches!(other, Action::ReleaseImage), "released before the save"),
                }
            }
        }
        save.expect("the consistent image is being persisted")
    }

    #[test]
    fn a_new_resync_preserves_its_image_only_after_the_previous_one_is_released() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_resync_gap(0);
        s.on_record(write(1, 0)).unwrap();
        settle(&mut s, now);
        assert!(s.copy_incomplete());
        s.on_copy_done(1, 0).unwrap();
        let save = settle_but_the_consistent_save(&mut s, now);
        // A new gap (its COPY_DONE reply is not in the primary yet) and a
        // record after it: the previous resync still holds its preserved
        // image, so the new one waits.
        s.on_resync_gap(1);
        s.on_record(write(2, 8192)).unwrap();
        let acts = drain(&mut s, now);
        assert!(!acts.iter().any(|a| matches!(a, Action::PreserveImage { .. })), "{acts:?}");
        s.on_saved(&save, Ok(()), now).unwrap();
        let acts = drain(&mut s, now);
        let release = acts.iter().position(|a| matches!(a, Action::ReleaseImage));
        let preserve = acts.iter().position(|a| matches!(a, Action::PreserveImage { seq: 1, .. }));
        assert!(release.is_some() && preserve.is_some() && release < preserve, "{acts:?}");
    }

    #[test]
    fn a_session_failing_right_after_the_resync_ended_still_owes_the_release_of_its_image() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_resync_gap(0);
        s.on_record(write(1, 0)).unwrap();
        settle(&mut s, now);
        s.on_copy_done(1, 0).unwrap();
        let save = settle_but_the_consistent_save(&mut s, now);
        // The end of the resync is saved; in the same batch of completions
        // (before the daemon performs what that queued) an I/O error stops
        // the session.
        s.on_saved(&save, Ok(()), now).unwrap();
        assert!(!s.release_owed());
        assert!(s.on_journal_synced(1, Err("EIO".into())).is_err());
        assert!(s.release_owed(), "the preserved image of a finished resync must still go");
    }

    #[test]
    fn at_most_copy_applies_chunks_are_written_at_once() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        for i in 1..=6u64 {
            let mut copy = Record::with_payload(RecordOp::Copy, 0, 0, i << 16, 1, Bytes::from(vec![9u8; 4096]), false);
            copy.copy_index = i;
            s.on_record(copy).unwrap();
        }
        assert!(matches!(drain(&mut s, now).first(), Some(Action::PreserveImage { .. })));
        s.on_image_preserved(Ok(())).unwrap();
        let acts = drain(&mut s, now);
        let Some(Action::Save(p)) = acts.first() else { panic!("{acts:?}") };
        s.on_saved(&p.clone(), Ok(()), now).unwrap();
        let applies = |acts: &[Action]| -> Vec<ApplyId> {
            acts.iter().filter_map(|a| if let Action::Apply { id, .. } = a { Some(*id) } else { None }).collect()
        };
        let first = applies(&drain(&mut s, now));
        assert_eq!(first.len(), 4, "copy_applies = 4");
        // Each one done lets one more start, in order.
        s.on_applied(first[0], Ok(())).unwrap();
        let next = applies(&drain(&mut s, now));
        assert_eq!(next.len(), 1);
        for id in first[1..].iter().chain(&next) {
            s.on_applied(*id, Ok(())).unwrap();
        }
        let last = applies(&drain(&mut s, now));
        assert_eq!(last.len(), 1, "the sixth");
        s.on_applied(last[0], Ok(())).unwrap();
        assert_eq!(s.applied(), 0, "copies are not writes");
        assert!(applies(&drain(&mut s, now)).is_empty());
    }

    #[test]
    fn a_failed_append_stops_the_session_before_any_sync_claims_it() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        let Some(Action::Append { record, .. }) = s.poll_action(now) else { panic!() };
        let _ = s.on_append_failed(record.seq, "EIO");
        let rest = drain(&mut s, now);
        assert!(rest.is_empty(), "nothing may follow a failed append: {rest:?}");
        s.begin_drain();
        assert!(s.is_drained());
        assert_eq!(s.durable(), 0);
    }

    #[test]
    fn a_record_of_a_newer_generation_than_the_session_is_refused() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), SecondaryStart { generation: 2, ..start() }, now);
        s.on_record(write(1, 0)).unwrap();
        let newer = Record::with_payload(RecordOp::Write, 2, 0, 8192, 3, Bytes::from(vec![2u8; 4096]), false);
        let err = s.on_record(newer).unwrap_err();
        assert!(matches!(err, SecondaryError::Generation { seq: 2, record: 3, session: 2 }), "{err}");
        let acts = drain(&mut s, now);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::Append { record: Record { seq: 2, .. }, .. })),
            "the refused record reached the restore journal: {acts:?}"
        );
    }

    #[test]
    fn no_apply_starts_after_an_apply_failed() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        let acts = drain(&mut s, now);
        assert!(acts.iter().any(|a| matches!(a, Action::SyncJournal { through: 1 })), "{acts:?}");
        s.on_journal_synced(1, Ok(())).unwrap();
        s.on_record(write(2, 8192)).unwrap();
        let acts = drain(&mut s, now);
        let Some(id) = acts.iter().find_map(|a| match a {
            Action::Apply { id, .. } => Some(*id),
            _ => None,
        }) else {
            panic!("{acts:?}")
        };
        assert!(acts.iter().any(|a| matches!(a, Action::SyncJournal { through: 2 })), "{acts:?}");
        assert!(s.on_applied(id, Err("EIO".into())).is_err());
        // The journal sync handed out before the failure still completes.
        s.on_journal_synced(2, Ok(())).unwrap();
        let rest = drain(&mut s, now);
        assert!(
            !rest.iter().any(|a| matches!(a, Action::Apply { .. })),
            "record 2 applied after the failure: {rest:?}"
        );
    }

    #[test]
    fn a_drain_applies_syncs_and_checkpoints_everything_received() {
        let now = Instant::now();
        let mut s = Secondary::new(config(1 << 20), start(), now);
        s.on_record(write(1, 0)).unwrap();
        s.begin_drain();
        let mut rounds = 0;
        while !s.is_drained() {
            rounds += 1;
            assert!(rounds < 20, "drain does not finish");
            for a in drain(&mut s, now) {
                match a {
                    Action::SyncJournal { through } => s.on_journal_synced(through, Ok(())).unwrap(),
                    Action::Apply { id, .. } => s.on_applied(id, Ok(())).unwrap(),
                    Action::SyncVolumes(b) => s.on_volumes_synced(b, Ok(())).unwrap(),
                    Action::Save(p) => s.on_saved(&p, Ok(()), now).unwrap(),
                    Action::PreserveImage { .. } => s.on_image_preserved(Ok(())).unwrap(),
                    Action::Append { .. } | Action::Send(_) | Action::ReleaseImage => {}
                }
            }
        }
        assert_eq!(s.checkpoint(), 1);
    }
}
