//! Deterministic simulation of a replicating pair, in the shape of
//! quinn-proto's `tests/random_interaction.rs`: proptest generates a list of
//! operations and replays it against the production session state machines of
//! both sides ([`PrimarySession`] and
//! [`replicator_protocol::secondary::Secondary`]) exchanging real frames, each
//! over a model disk that loses, at a power cut, any subset of what was not
//! synced. Operations: client writes (FUA or not) and flushes, byte delivery in
//! both directions, the initial copy and resyncs of random regions (copy reads
//! wait for their read barrier), completions of the secondary's journal syncs,
//! applies, volume syncs and state saves, time, the primary's housekeeping,
//! link drops, and crashes and power cuts of either side. A restarted primary
//! does what the daemon does after any unclean stop: replays its journal's
//! surviving run (but for the records the persisted dirty bitmaps and replay
//! fence rule out, [`plan_replay`]), starts a new generation, rebases the
//! secondary on it and resyncs the activity log's regions.
//!
//! The primary's journal holds a bounded number of bytes (chosen per run, from
//! a few records to unbounded); housekeeping frees it through the secondary's
//! acked checkpoint, as far as the local volume writes are done (lazily, as the
//! daemon's `release_journal`). A write that does not fit sends the primary
//! into bitmap mode, as the daemon with `on_journal_full = "suspend"`: the
//! write, and every later one, gets no journal seq, only marks the dirty bitmap
//! (persisted before the volume write, with the bitmap fence: the newest record
//! journaled before it) and reaches the
//! primary's volume without being shipped; the primary persists `resync_gap`
//! (the last record journaled, or an older gap still pending) and tells the
//! running session ([`PrimarySession::on_gap`]) and every later one at its
//! start; the copy stops. Housekeeping leaves bitmap mode once the journal is
//! less than half full. Before the resync hands out its first chunk, the
//! bitmap fence becomes the replay fence (persisted): a restart replays no
//! record up to it, as a chunk the resync clears no longer shows which older
//! records a bitmap-mode write overwrote. Until then, the dirty chunks alone
//! rule records out. The resync copies the bitmap's regions through the
//! production copy path, and the COPY_DONE reply clears the gap. Bitmap mode,
//! the gap and the bitmaps survive restarts of the primary. The secondary's
//! `Action::PreserveImage` is modelled as the daemon does it: the volumes are
//! synced and their image kept (durably) until `Action::ReleaseImage`, or until
//! a restart that finds the replica consistent. Invariants are checked after
//! every step:
//!
//! - the primary's image is the image after exactly the writes it
//!   completed, journaled or made in bitmap mode (range serialisation:
//!   overlapping writes land in admission order); its journal never holds
//!   more than its capacity, and bitmap mode always has a resync and a gap
//!   pending;
//! - I1: after a primary crash or power cut, every byte last written by a
//!   write acknowledged with FUA or before an acknowledged FLUSH holds it
//!   (bitmap-mode writes included);
//! - the secondary's live image is the primary's image after exactly the
//!   writes it applied, whenever it is consistent and no copy is running;
//! - I5 at every instant the secondary claims (on disk) to be consistent:
//!   were it to crash or lose power right now (keeping a random subset of
//!   unsynced pages), its restart would give the primary's image after
//!   exactly the writes `<= N`, with N at least every seq it acked as
//!   durable and every checkpoint the primary freed its journal through.
//!   Writes made in bitmap mode have no seq: those before record N count as
//!   `<= N` (a replica that applied later records without them fails), and
//!   a run of them right after N is wholly absent or wholly present (the
//!   resync copied it and no journaled write followed), nothing between;
//! - the same after every actual restart of the secondary, and for the
//!   image preserved at each `Action::PreserveImage`; a secondary that has
//!   persisted its inconsistency (a resync runs) is exempt from I5 but must
//!   hold such a preserved image, unless it never had a consistent one to
//!   preserve (initial copy, rebase on a restarted primary); only one is
//!   preserved at a time;
//! - acks never go backwards within a session; the journal still holds
//!   every record after the secondary's resume point;
//! - I2: after draining (which ends bitmap mode and the resync), both
//!   images are identical, the secondary is consistent, its preserved
//!   image released and the primary's gap cleared.
//!
//! A second test runs long seeded scenarios (phases with faults, quiet
//! ones so that copies finish and later faults hit a consistent replica,
//! and backlogs where the link carries nothing, so that the primary's
//! journal fills) and asserts the hard paths were reached, bitmap mode, a
//! resync gap told at a session start, an image preserved because of a
//! record after a gap and a restore journal sync made only once its delay
//! was up (nobody waited for it) among them. Two small deterministic tests walk one
//! journal fill through, and a primary crash after its resync but before
//! its journal was released.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use replicator_protocol::activity_log::ActivityLog;
use replicator_protocol::apply::ApplyId;
use replicator_protocol::bitmap::{plan_replay, DirtyBitmap};
use replicator_protocol::journal_format::{record_span, JOURNAL_SUPERBLOCK_LEN};
use replicator_protocol::pb::{self, envelope::Body};
use replicator_protocol::primary::{check_resume, CopyStep, PrimaryConfig, PrimarySession, Transmit};
use replicator_protocol::record::{Record, RecordOp, COPY_HASH_LEN};
use replicator_protocol::secondary::{Action, Barrier, Persist, Secondary, SecondaryConfig, SecondaryStart};
use replicator_protocol::sequencer::{Dep, RangeSequencer};
use replicator_protocol::wire::{encode_frame, envelope, FrameDecoder};

const VOLUMES: usize = 3;
const VOL_SIZE: usize = 8192;
const GROUP: &str = "g";
const GENERATION: u64 = 7;

type Image = Vec<Vec<u8>>;

fn blank() -> Image {
    vec![vec![0u8; VOL_SIZE]; VOLUMES]
}

/// What the primary's volumes hold before the pair is created: the initial
/// copy must bring it over.
fn base() -> Image {
    (0..VOLUMES).map(|v| (0..VOL_SIZE).map(|i| (i * 7 + v * 13 + 1) as u8).collect()).collect()
}

/// Copy chunks in the simulation: 256-byte bitmap chunks, at most 4 KiB per
/// chunk, 8 to 64 KiB in flight (the window follows what the copy made
/// durable, as over a long link: `Pair::copy`); each sent as its hash
/// first, as in production.
const COPY: PrimaryConfig =
    PrimaryConfig { copy_chunk: 4096, copy_window: 8192, copy_window_max: 65536, copy_by_hash: true, copy_reads: 1 };

/// A 256-bit digest for hash-only copy chunks (four FNV-1a lanes: any
/// collision would show as a divergence, never as a false pass).
fn digest(data: &[u8]) -> [u8; COPY_HASH_LEN] {
    let mut out = [0u8; COPY_HASH_LEN];
    for (lane, chunk) in out.chunks_mut(8).enumerate() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (lane as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for b in data {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    out
}
const GRANULARITY: u64 = 256;
/// Activity log budget, in extents of 1 KiB (of 24 in all).
const AL_BUDGET: usize = 8;

fn apply_to(img: &mut Image, r: &Record) {
    let v = &mut img[r.volume as usize];
    let (o, e) = (r.offset as usize, r.end() as usize);
    match r.op {
        RecordOp::Write | RecordOp::Copy => v[o..e].copy_from_slice(&r.payload),
        RecordOp::WriteZeroes | RecordOp::Trim => v[o..e].fill(0),
        RecordOp::CopyHash => {}
    }
}

/// A set of seqs: every seq `<= prefix`, plus `extras` above it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SeqSet {
    prefix: u64,
    extras: BTreeSet<u64>,
}

impl SeqSet {
    fn insert(&mut self, seq: u64) {
        if seq <= self.prefix {
            return;
        }
        self.extras.insert(seq);
        while self.extras.first() == Some(&(self.prefix + 1)) {
            self.extras.pop_first();
            self.prefix += 1;
        }
    }
}

/// A client write as the primary admitted it. Every write has a place in
/// the range sequencer's order (its `wid`, the index in [`Sim::writes`] plus
/// one); a journaled write also has a journal seq (`jseq`), a write made in
/// bitmap mode (the journal was full) has none: it only dirties the bitmap.
#[derive(Debug, Clone)]
struct Wr {
    /// The write (`seq` is its journal seq, or 0 in bitmap mode).
    rec: Record,
    /// Its journal seq, if journaled.
    jseq: Option<u64>,
    /// The newest journal seq at its admission (its own when journaled):
    /// a bitmap-mode write belongs to the run of them after record `slot`.
    slot: u64,
}

/// Computes "the image after exactly the writes through `wid`" from a base
/// image holding every write through `base_wid`, caching the image after
/// the longest prefix computed so far.
#[derive(Debug)]
struct ModelCache {
    base: Image,
    base_wid: u64,
    through: u64,
    img: Image,
}

impl ModelCache {
    fn new(base: Image, base_wid: u64) -> Self {
        ModelCache { img: base.clone(), base, base_wid, through: base_wid }
    }
    fn through(&mut self, writes: &[Wr], wid: u64) -> &Image {
        assert!(wid >= self.base_wid, "asked for writes before the model's base");
        if wid < self.through {
            *self = ModelCache::new(self.base.clone(), self.base_wid);
        }
        while self.through < wid {
            apply_to(&mut self.img, &writes[self.through as usize].rec);
            self.through += 1;
        }
        &self.img
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write,
    Zeroes,
    Trim,
}

#[derive(Debug, Clone)]
enum Op {
    /// A client write begins on the primary: journaled and queued at once
    /// or, once the journal is full, only marked in the dirty bitmap.
    Write { vol: u8, offset: u16, len: u16, kind: Kind, fua: bool },
    /// A ready in-flight primary write reaches the primary's volume.
    PrimaryComplete(usize),
    /// The primary session puts up to n items on the stream.
    Ship(u8),
    /// The primary reads the next copy chunk (when no write to it is in
    /// flight: the read barrier).
    Copy,
    /// A resync of a region starts (as after tracking writes in the dirty
    /// bitmap): the primary marks it dirty and copies it again.
    Resync { vol: u8, offset: u16, len: u16 },
    /// n bytes of the primary -> secondary pipe arrive.
    DeliverToSecondary(u16),
    /// One of the secondary's restore-journal appends completes (a large
    /// record's waits for the disk, so they complete in any order).
    SecondaryAppendDone(usize),
    /// One of the secondary's volume writes completes.
    SecondaryApply(usize),
    /// The secondary's oldest restore-journal sync completes.
    JournalSyncDone,
    /// The secondary's volume sync completes.
    VolumeSyncDone,
    /// The secondary's state save completes.
    SaveDone,
    /// Time passes on the secondary.
    Tick,
    /// n bytes of the secondary -> primary pipe arrive.
    DeliverToPrimary(u16),
    /// The primary asks for a flush of everything sent.
    PrimaryFlush,
    /// The link drops (undelivered bytes are lost): the secondary drains
    /// its session, then both reconnect.
    LinkDrop,
    /// kill -9 of the secondary: the page cache survives, volume writes in
    /// flight land or not; it restarts.
    SecondaryCrash(u64),
    /// The secondary loses power: every page not synced survives or not
    /// (a random subset); it restarts.
    SecondaryPowerCut(u64),
    /// The primary's housekeeping retires activity-log regions, and leaves
    /// bitmap mode once the journal is less than half full.
    PrimaryHousekeeping,
    /// kill -9 of the primary; it restarts.
    PrimaryCrash(u64),
    /// The primary loses power; it restarts.
    PrimaryPowerCut(u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![6 => Just(Kind::Write), 1 => Just(Kind::Zeroes), 1 => Just(Kind::Trim)];
    prop_oneof![
        8 => (0..VOLUMES as u8, any::<u16>(), 1u16..=1024, kind, prop::bool::weighted(0.15))
            .prop_map(|(vol, offset, len, kind, fua)| Op::Write { vol, offset, len, kind, fua }),
        4 => any::<usize>().prop_map(Op::PrimaryComplete),
        4 => (1u8..6).prop_map(Op::Ship),
        3 => Just(Op::Copy),
        1 => (0..VOLUMES as u8, any::<u16>(), 1u16..=4096).prop_map(|(vol, offset, len)| Op::Resync { vol, offset, len }),
        5 => (1u16..3000).prop_map(Op::DeliverToSecondary),
        5 => any::<usize>().prop_map(Op::SecondaryAppendDone),
        6 => any::<usize>().prop_map(Op::SecondaryApply),
        3 => Just(Op::JournalSyncDone),
        2 => Just(Op::VolumeSyncDone),
        2 => Just(Op::SaveDone),
        1 => Just(Op::Tick),
        3 => (1u16..200).prop_map(Op::DeliverToPrimary),
        1 => Just(Op::PrimaryFlush),
        1 => Just(Op::LinkDrop),
        1 => any::<u64>().prop_map(Op::SecondaryCrash),
        1 => any::<u64>().prop_map(Op::SecondaryPowerCut),
        2 => Just(Op::PrimaryHousekeeping),
        1 => any::<u64>().prop_map(Op::PrimaryCrash),
        1 => any::<u64>().prop_map(Op::PrimaryPowerCut),
    ]
}

#[derive(Debug)]
struct Primary {
    /// Every write gets its wid here, journaled or not.
    seqr: RangeSequencer,
    /// Retained journal records by seq.
    journal: BTreeMap<u64, Record>,
    /// Journal bytes (`record_span`s) the retained records may take; a
    /// write that does not fit sends the primary into bitmap mode.
    journal_capacity: u64,
    session: PrimarySession,
    /// Regions still to copy (initial copy: everything), and those written
    /// in bitmap mode. Persisted before the volume write (the daemon's
    /// bitmap save), and with the copy chunks not yet durable on the
    /// secondary added back: a restart finds them as they are here.
    bitmaps: Vec<DirtyBitmap>,
    /// A copy or resync is due (persisted).
    copy_pending: bool,
    /// The journal filled: writes only dirty the bitmaps, without a journal
    /// seq, and the copy waits (persisted before such a write reaches the
    /// volume, as the daemon's state save under the group lock).
    bitmap_mode: bool,
    /// The last record journaled before bitmap mode, until a COPY_DONE
    /// reply (persisted with `bitmap_mode`); told to every new session.
    resync_gap: Option<u64>,
    /// The newest record journaled before a write made in bitmap mode
    /// (persisted before that write reaches the volume).
    bitmap_fence: u64,
    /// The bitmap fence, once a copy may clear chunks (persisted before the
    /// first is handed out): a restart does not replay it or any older
    /// record.
    replay_fence: u64,
    /// The session was started with a resync gap to announce, and nothing
    /// has been transmitted on it yet.
    gap_at_start: bool,
    /// The copy chunk waiting for its read barrier: (volume, offset, len, index).
    copy_reading: Option<(u32, u64, u64, u64, bool)>,
    /// Disk model: what survives a power cut, and the completed volume
    /// writes since the last sync (in order).
    durable_image: Image,
    volatile_writes: Vec<Record>,
    /// Journal records through here are durable.
    journal_durable: u64,
    /// Every write through journal seq here is durable locally (journal and
    /// volume).
    local_durable: u64,
    /// Writes (by wid) acknowledged with FUA or before an acknowledged FLUSH.
    flushed: SeqSet,
    /// The activity log (persisted at once in this model: a write waits
    /// for its save before it reaches the volume).
    al: ActivityLog,
    /// Writes admitted and not on the volume yet: (wid, dependencies).
    in_flight: Vec<(u64, Vec<Dep>)>,
    image: Image,
    /// Writes (by wid) on the volume.
    done: SeqSet,
    acks_in: FrameDecoder,
    /// Highest checkpoint ever acked (it survives sessions).
    checkpoint_seen: u64,
    flush_waiting: Vec<u64>,
}

/// The secondary: the production state machine over a model disk.
#[derive(Debug)]
struct SecondarySite {
    frames_in: FrameDecoder,
    machine: Secondary,
    now: Instant,
    /// Restore journal: records synced, and appended but not synced.
    rj_durable: BTreeMap<u64, Record>,
    rj_volatile: BTreeMap<u64, Record>,
    /// Appends handed out and not done: after a fault each one may or may
    /// not be in the file.
    appends: Vec<Record>,
    /// Volumes: what reads see, what survives a power cut, and the writes
    /// in between (in the order they were made).
    image: Image,
    durable_image: Image,
    volatile_writes: Vec<Record>,
    /// Write seqs whose data the live image holds.
    applied: SeqSet,
    /// I/O handed out by the machine and not completed yet.
    journal_syncs: VecDeque<u64>,
    applies: Vec<(ApplyId, Record)>,
    volume_syncs: VecDeque<(Barrier, usize)>,
    saves: VecDeque<Persist>,
    /// The persisted state: the checkpoint and whether a copy is unfinished.
    persisted_checkpoint: u64,
    persisted_copy_incomplete: bool,
    /// Newest write seq reflected by a copy chunk applied to the image.
    copy_reflects: u64,
    last_ack_sent: Option<pb::Ack>,
    /// The image preserved when a resync started on a consistent image
    /// (`Action::PreserveImage`: the daemon syncs the volumes and keeps
    /// their image by copy-on-write, durably) and its seq, until
    /// `Action::ReleaseImage`, or a restart that finds the image consistent
    /// (the daemon then removes the guard).
    preserved: Option<(u64, Image)>,
    /// The persisted inconsistency came without a preserved image (an
    /// initial copy, or a rebase on a restarted primary's journal).
    unguarded: bool,
    /// Whether the last thing handed to `on_record` was a copy chunk (the
    /// machine holds at most that one back, so it is what triggers an
    /// `Action::PreserveImage`).
    last_offered_copy: bool,
}

/// What a run exercised, so the long runs can assert they reach the hard
/// paths.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    primary_out_of_order: usize,
    primary_waits: usize,
    secondary_out_of_order: usize,
    journal_full: usize,
    crashes: usize,
    power_cuts: usize,
    unsynced_pages_lost: usize,
    recoveries_replaying: usize,
    checkpoints: usize,
    frames_split: usize,
    copy_chunks: usize,
    copy_waits: usize,
    primary_crashes: usize,
    primary_power_cuts: usize,
    copies_done: usize,
    copy_hashes: usize,
    copy_mismatches: usize,
    consistent_checks: usize,
    fault_checks: usize,
    images_preserved: usize,
    /// Writes held back because the activity log was at its budget.
    activity_log_full: usize,
    bitmap_mode_entries: usize,
    bitmap_writes: usize,
    bitmap_mode_exits: usize,
    gaps_at_session_start: usize,
    gap_preserves: usize,
    gaps_cleared: usize,
    replay_skips: usize,
    /// Replay fences armed as a resync began after bitmap mode.
    fences_armed: usize,
    runs_included: usize,
    guarded_checks: usize,
    /// Restore journal syncs nobody waited for, made when their delay was up.
    delayed_journal_syncs: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.primary_out_of_order += o.primary_out_of_order;
        self.primary_waits += o.primary_waits;
        self.secondary_out_of_order += o.secondary_out_of_order;
        self.journal_full += o.journal_full;
        self.crashes += o.crashes;
        self.power_cuts += o.power_cuts;
        self.unsynced_pages_lost += o.unsynced_pages_lost;
        self.recoveries_replaying += o.recoveries_replaying;
        self.copy_hashes += o.copy_hashes;
        self.copy_mismatches += o.copy_mismatches;
        self.checkpoints += o.checkpoints;
        self.frames_split += o.frames_split;
        self.copy_chunks += o.copy_chunks;
        self.copy_waits += o.copy_waits;
        self.primary_crashes += o.primary_crashes;
        self.primary_power_cuts += o.primary_power_cuts;
        self.copies_done += o.copies_done;
        self.consistent_checks += o.consistent_checks;
        self.images_preserved += o.images_preserved;
        self.activity_log_full += o.activity_log_full;
        self.fault_checks += o.fault_checks;
        self.bitmap_mode_entries += o.bitmap_mode_entries;
        self.bitmap_writes += o.bitmap_writes;
        self.bitmap_mode_exits += o.bitmap_mode_exits;
        self.gaps_at_session_start += o.gaps_at_session_start;
        self.gap_preserves += o.gap_preserves;
        self.gaps_cleared += o.gaps_cleared;
        self.replay_skips += o.replay_skips;
        self.fences_armed += o.fences_armed;
        self.runs_included += o.runs_included;
        self.guarded_checks += o.guarded_checks;
        self.delayed_journal_syncs += o.delayed_journal_syncs;
    }
}

#[derive(Debug)]
struct Sim {
    /// Journaled records by journal seq (index seq - 1).
    history: Vec<Record>,
    /// The wid of each journaled record (index seq - 1).
    jseq_wid: Vec<u64>,
    /// Every client write by wid (index wid - 1), journaled or not.
    writes: Vec<Wr>,
    p: Primary,
    s: SecondarySite,
    p2s: VecDeque<u8>,
    s2p: VecDeque<u8>,
    primary_model: ModelCache,
    secondary_model: ModelCache,
    /// The primary's image after every write through `base_seq` (its
    /// volumes at the start, or after its last restart), which is also
    /// every write through `base_wid`.
    base: Image,
    base_seq: u64,
    base_wid: u64,
    steps: usize,
    stats: Stats,
}

fn payload_for(seq: u64, len: usize) -> Bytes {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    Bytes::from(v)
}

fn push_frame(pipe: &mut VecDeque<u8>, body: Body) {
    let mut buf = BytesMut::new();
    encode_frame(&envelope(body), &mut buf);
    pipe.extend(buf.iter());
}

/// A restore journal of room for about a dozen of the largest records, so
/// that it fills up and wraps.
const JOURNAL_CAPACITY: u64 = JOURNAL_SUPERBLOCK_LEN + 16 * 1024;

fn machine(checkpoint: u64, copy_incomplete: bool, now: Instant) -> Secondary {
    let config = SecondaryConfig {
        journal_capacity: JOURNAL_CAPACITY,
        volume_sizes: vec![VOL_SIZE as u64; VOLUMES],
        checkpoint_interval: Duration::from_secs(1),
        copy_flush_bytes: COPY.copy_chunk,
        copy_sync_interval: Duration::from_millis(100),
        copy_applies: 2,
        // Syncs nobody waits for happen at the next tick (the daemon's
        // async-mode delay): the urgent ones (FUA, flush requests, drains,
        // resync starts) must not wait.
        journal_sync_delay: Duration::from_millis(5),
        journal_sync_batch: 0,
        journal_sync_delay_light: Duration::from_millis(5),
        // Writes wait for durability (FUA, flush) only, as in async mode:
        // acks nobody waits for go out at the next tick.
        receipt_acked_at_once: false,
        ack_delay: Duration::from_millis(5),
        // A few records' worth: input stops and resumes all the time.
        max_unapplied_bytes: 2048,
        // Byte-granular ranges: the model's volumes are small.
        block_size: 1,
    };
    let start = SecondaryStart {
        checkpoint,
        journal_head: JOURNAL_SUPERBLOCK_LEN,
        copy_incomplete,
        data_as_of_us: 0,
        generation: GENERATION,
    };
    Secondary::new(config, start, now)
}

/// A deterministic coin for the fault ops.
fn coin(seed: &mut u64) -> bool {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed & 1 == 1
}

/// What a restart of the secondary finds: the contiguous run of restore
/// journal records after the checkpoint, replayed over the surviving volume
/// image.
struct Recovery {
    image: Image,
    last: u64,
    replayed: bool,
    lost_pages: usize,
}

impl SecondarySite {
    /// With `copy`, a new pair whose initial copy has to run (the volumes
    /// here are blank); otherwise a pair created with identical volumes.
    fn new(copy: bool, now: Instant) -> Self {
        let volumes = if copy { blank() } else { base() };
        SecondarySite {
            frames_in: FrameDecoder::new(),
            machine: machine(0, copy, now),
            now,
            rj_durable: BTreeMap::new(),
            rj_volatile: BTreeMap::new(),
            appends: Vec::new(),
            image: volumes.clone(),
            durable_image: volumes,
            volatile_writes: Vec::new(),
            applied: SeqSet::default(),
            journal_syncs: VecDeque::new(),
            applies: Vec::new(),
            volume_syncs: VecDeque::new(),
            saves: VecDeque::new(),
            persisted_checkpoint: 0,
            persisted_copy_incomplete: copy,
            copy_reflects: 0,
            last_ack_sent: None,
            preserved: None,
            unguarded: copy,
            last_offered_copy: false,
        }
    }

    /// The state a restart would find after a fault now. `power`: unsynced
    /// pages survive per `seed`; otherwise (kill -9) all of them do, and
    /// volume writes in flight land per `seed`.
    fn recover(&self, power: bool, mut seed: u64) -> Recovery {
        let mut lost_pages = 0;
        let mut image = if power { self.durable_image.clone() } else { self.image.clone() };
        if power {
            for w in &self.volatile_writes {
                if coin(&mut seed) {
                    apply_to(&mut image, w);
                } else {
                    lost_pages += 1;
                }
            }
        } else {
            for (_, rec) in &self.applies {
                if coin(&mut seed) {
                    apply_to(&mut image, rec);
                }
            }
        }
        let mut survivors = self.rj_durable.clone();
        for (seq, rec) in &self.rj_volatile {
            if !power || coin(&mut seed) {
                survivors.insert(*seq, rec.clone());
            } else {
                lost_pages += 1;
            }
        }
        for rec in &self.appends {
            if coin(&mut seed) {
                survivors.insert(rec.seq, rec.clone());
            }
        }
        let mut last = self.persisted_checkpoint;
        while let Some(rec) = survivors.get(&(last + 1)) {
            apply_to(&mut image, rec);
            last += 1;
        }
        Recovery { image, last, replayed: last > self.persisted_checkpoint, lost_pages }
    }
}

impl Sim {
    /// `journal_capacity`: the primary's journal, in bytes of records.
    fn new(copy: bool, journal_capacity: u64) -> Self {
        let now = Instant::now();
        Sim {
            history: Vec::new(),
            jseq_wid: Vec::new(),
            writes: Vec::new(),
            p: Primary {
                seqr: RangeSequencer::new(1),
                journal: BTreeMap::new(),
                journal_capacity,
                session: PrimarySession::new(COPY, 0, 0),
                bitmaps: (0..VOLUMES)
                    .map(|_| {
                        let mut b = DirtyBitmap::new(VOL_SIZE as u64, GRANULARITY);
                        if copy {
                            b.set_all();
                        }
                        b
                    })
                    .collect(),
                copy_pending: copy,
                bitmap_mode: false,
                resync_gap: None,
                bitmap_fence: 0,
                replay_fence: 0,
                gap_at_start: false,
                copy_reading: None,
                durable_image: base(),
                volatile_writes: Vec::new(),
                journal_durable: 0,
                local_durable: 0,
                flushed: SeqSet::default(),
                al: {
                    let mut al = ActivityLog::new(1024);
                    al.set_budget(AL_BUDGET);
                    al
                },
                in_flight: Vec::new(),
                image: base(),
                done: SeqSet::default(),
                acks_in: FrameDecoder::new(),
                checkpoint_seen: 0,
                flush_waiting: Vec::new(),
            },
            s: SecondarySite::new(copy, now),
            p2s: VecDeque::new(),
            s2p: VecDeque::new(),
            primary_model: ModelCache::new(base(), 0),
            secondary_model: ModelCache::new(base(), 0),
            base: base(),
            base_seq: 0,
            base_wid: 0,
            steps: 0,
            stats: Stats::default(),
        }
    }

    fn last_seq(&self) -> u64 {
        self.history.len() as u64
    }

    fn last_wid(&self) -> u64 {
        self.writes.len() as u64
    }

    // ---- model ----

    /// The wid of journal record `jseq` (at least the base's).
    fn wid_of(&self, jseq: u64) -> u64 {
        assert!(jseq >= self.base_seq, "asked for writes before the model's base");
        if jseq == self.base_seq {
            self.base_wid
        } else {
            self.jseq_wid[(jseq - 1) as usize]
        }
    }

    /// The newest journal seq among the writes through `wid`.
    fn slot_of(&self, wid: u64) -> u64 {
        if wid == self.base_wid {
            self.base_seq
        } else {
            self.writes[(wid - 1) as usize].slot
        }
    }

    /// The wids of the bitmap-mode writes right after journal record `n`
    /// (before record `n + 1`, or the newest write).
    fn run_after(&self, n: u64) -> std::ops::Range<u64> {
        let end = if n < self.last_seq() { self.wid_of(n + 1) } else { self.last_wid() + 1 };
        self.wid_of(n) + 1..end
    }

    /// The primary's image after exactly the writes (by wid) in `set`.
    fn primary_image(&mut self, set: &SeqSet) -> Image {
        let mut img = self.primary_model.through(&self.writes, set.prefix).clone();
        for &w in &set.extras {
            apply_to(&mut img, &self.writes[(w - 1) as usize].rec);
        }
        img
    }

    /// The primary's image after exactly the journal records in `set`, and
    /// every write before the newest of its prefix; `with_run`: also the
    /// bitmap-mode writes right after that one.
    fn secondary_image(&mut self, set: &SeqSet, with_run: bool) -> Image {
        let wid = self.wid_of(set.prefix);
        let mut img = self.secondary_model.through(&self.writes, wid).clone();
        if with_run {
            for w in self.run_after(set.prefix) {
                apply_to(&mut img, &self.writes[(w - 1) as usize].rec);
            }
        }
        for &s in &set.extras {
            apply_to(&mut img, &self.history[(s - 1) as usize]);
        }
        img
    }

    /// Whether `img` is the primary's image after exactly the journal
    /// records in `set` (I5 when `set` is a prefix `<= N`). Writes made in
    /// bitmap mode have no seq: those before record N count as before it
    /// (a replica that applied records after them while claiming
    /// consistency without having them copied fails here); a run of them
    /// right after N is either wholly absent (not resynced yet) or wholly
    /// there (the resync copied it and no journaled write followed yet).
    /// Any other mix is not an image the primary ever had.
    fn holds_exactly(&mut self, img: &Image, set: &SeqSet) -> bool {
        if *img == self.secondary_image(set, false) {
            return true;
        }
        if self.run_after(set.prefix).is_empty() || *img != self.secondary_image(set, true) {
            return false;
        }
        self.stats.runs_included += 1;
        true
    }

    /// Journal bytes the retained records take.
    fn journal_bytes(&self) -> u64 {
        self.p.journal.values().map(|r| record_span(r.payload.len() as u64)).sum()
    }

    // ---- primary ----

    fn client_write(&mut self, vol: u8, offset: u16, len: u16, kind: Kind, fua: bool) {
        let len = u32::from(len);
        let offset = u64::from(offset) % (VOL_SIZE as u64 - u64::from(len) + 1);
        let payload_len = if matches!(kind, Kind::Write) { u64::from(len) } else { 0 };
        // Admission: journal space, or the journal is full (the policy is
        // not to block) and writes go to the dirty bitmap only.
        if !self.p.bitmap_mode && self.journal_bytes() + record_span(payload_len) > self.p.journal_capacity {
            self.enter_bitmap_mode();
        }
        let journaled = !self.p.bitmap_mode;
        // The activity log at its budget: a journaled write waits (here: does
        // not happen) until enough extents are durable on both sites.
        let both = self.p.local_durable.min(self.p.session.shipper().durable());
        if journaled && self.p.al.make_room(u32::from(vol), offset, u64::from(len), both).is_err() {
            self.stats.activity_log_full += 1;
            return;
        }
        let (wid, deps) = self.p.seqr.begin(u32::from(vol), offset, u64::from(len));
        assert_eq!(wid, self.last_wid() + 1, "sequencer must hand out consecutive ids");
        let jseq = journaled.then(|| self.last_seq() + 1);
        let seq = jseq.unwrap_or(0);
        let rec = match kind {
            Kind::Write => Record::with_payload(
                RecordOp::Write,
                seq,
                u32::from(vol),
                offset,
                GENERATION,
                payload_for(wid, len as usize),
                fua,
            ),
            Kind::Zeroes => {
                Record::without_payload(RecordOp::WriteZeroes, seq, u32::from(vol), offset, len, GENERATION, fua)
            }
            Kind::Trim => Record::without_payload(RecordOp::Trim, seq, u32::from(vol), offset, len, GENERATION, fua),
        };
        // Every dependency is an earlier, overlapping, still in-flight write.
        for d in &deps {
            let Dep::Seq(q) = *d else { panic!("no read barriers in this simulation: {d:?}") };
            assert!(q < wid && self.p.seqr.is_in_flight(q));
            let other = &self.writes[(q - 1) as usize].rec;
            assert!(other.volume == rec.volume && other.offset < rec.end() && rec.offset < other.end());
        }
        if let Some(seq) = jseq {
            // The region is in the activity log before the write reaches
            // the volume.
            let t = self.p.al.touch(rec.volume, rec.offset, u64::from(rec.length), seq, self.steps as u64, 0);
            assert!(
                self.p.al.len() <= AL_BUDGET.max(rec.length.div_ceil(1024) as usize + 1),
                "the activity log holds {} extents, over its budget: {t:?}",
                self.p.al.len()
            );
            self.history.push(rec.clone());
            self.jseq_wid.push(wid);
            self.p.journal.insert(seq, rec.clone());
            self.p.session.on_journaled(seq);
        } else {
            // Bitmap mode: the region is dirty (and that is persisted)
            // before the write reaches the volume; it is not shipped.
            self.p.bitmaps[usize::from(vol)].set_range(offset, u64::from(len));
            self.p.bitmap_fence = self.last_seq();
            self.stats.bitmap_writes += 1;
        }
        self.writes.push(Wr { rec, jseq, slot: self.last_seq() });
        if !deps.is_empty() {
            self.stats.primary_waits += 1;
        }
        self.p.in_flight.push((wid, deps));
    }

    /// The journal is full (as the daemon's `enter_bitmap_mode`): writes go
    /// to the bitmap from now on, a resync is due, and the records after
    /// the last one journaled follow writes the secondary lacks until it
    /// ends (persisted, and told to the running session).
    fn enter_bitmap_mode(&mut self) {
        let last = self.last_seq();
        let gap = self.p.resync_gap.map_or(last, |g| g.min(last));
        self.p.bitmap_mode = true;
        self.p.copy_pending = true;
        self.p.resync_gap = Some(gap);
        self.p.session.on_gap(gap);
        self.stats.bitmap_mode_entries += 1;
    }

    fn primary_ready(&self) -> Vec<usize> {
        (0..self.p.in_flight.len())
            .filter(|&i| {
                self.p.in_flight[i].1.iter().all(|d| match d {
                    Dep::Seq(q) => !self.p.seqr.is_in_flight(*q),
                    Dep::Ticket(_) => false,
                })
            })
            .collect()
    }

    fn primary_complete(&mut self, pick: usize) {
        let ready = self.primary_ready();
        if self.p.in_flight.is_empty() {
            return;
        }
        assert!(!ready.is_empty(), "the oldest in-flight write is always ready");
        let i = ready[pick % ready.len()];
        let (wid, _) = self.p.in_flight.swap_remove(i);
        let rec = self.writes[(wid - 1) as usize].rec.clone();
        apply_to(&mut self.p.image, &rec);
        self.p.volatile_writes.push(rec.clone());
        self.p.seqr.finish(wid);
        self.p.done.insert(wid);
        if rec.fua {
            self.primary_sync();
        }
        if !self.p.done.extras.is_empty() {
            self.stats.primary_out_of_order += 1;
        }
    }

    fn ship(&mut self, n: u8) {
        for _ in 0..n {
            let Some(t) = self.p.session.poll_transmit() else { break };
            if std::mem::take(&mut self.p.gap_at_start) && matches!(t, Transmit::ResyncGap(_)) {
                self.stats.gaps_at_session_start += 1;
            }
            let body = match t {
                Transmit::Record(seq) => {
                    let rec = self
                        .p
                        .journal
                        .get(&seq)
                        .unwrap_or_else(|| panic!("record {seq} to ship was already freed from the journal"));
                    Body::Record(rec.to_pb(GROUP))
                }
                Transmit::Copy(rec) => {
                    self.stats.copy_chunks += 1;
                    Body::Record(rec.to_pb(GROUP))
                }
                Transmit::Flush(seq) => Body::Flush(pb::FlushRequest { seq }),
                Transmit::CopyDone(seq) => {
                    Body::Command(pb::GroupCommand { command: pb::Command::CopyDone as i32, seq, ..Default::default() })
                }
                Transmit::ResyncGap(seq) => Body::Command(pb::GroupCommand {
                    command: pb::Command::ResyncGap as i32,
                    seq,
                    ..Default::default()
                }),
            };
            push_frame(&mut self.p2s, body);
        }
    }

    /// The primary reads the next copy chunk, under its read barrier: the
    /// read happens once no write to the range is in flight. No new chunk
    /// is handed out in bitmap mode (one already handed out is read).
    fn copy(&mut self) {
        // As if a 10 ms round trip took a millisecond per copy step: the
        // window grows with what the copy made durable, and shrinks again.
        self.p.session.on_copy_interval(Duration::from_millis(10), Duration::from_millis(1));
        if self.p.copy_reading.is_none() {
            let copying = self.p.copy_pending && !self.p.bitmap_mode;
            if copying && self.p.bitmap_fence > self.p.replay_fence {
                // The daemon's `Group::copy_may_clear_chunks`: persisted
                // before the first chunk is handed out.
                self.p.replay_fence = self.p.bitmap_fence;
                self.stats.fences_armed += 1;
            }
            let step = self.p.session.next_copy(&mut self.p.bitmaps, copying);
            if let CopyStep::Read { volume, offset, len, copy_index, hash } = step {
                self.p.copy_reading = Some((volume, offset, len, copy_index, hash));
            }
        }
        let Some((volume, offset, len, copy_index, hash)) = self.p.copy_reading else { return };
        let (o, e) = (offset as usize, (offset + len) as usize);
        let blocked = self.p.in_flight.iter().any(|(wid, _)| {
            let w = &self.writes[(wid - 1) as usize].rec;
            w.volume == volume && (w.offset as usize) < e && o < w.end() as usize
        });
        if blocked {
            self.stats.copy_waits += 1;
            return;
        }
        self.p.copy_reading = None;
        let region = &self.p.image[volume as usize][o..e];
        let rec = if hash {
            self.stats.copy_hashes += 1;
            let digests: Vec<u8> = region.chunks(GRANULARITY as usize).flat_map(digest).collect();
            let span = GRANULARITY as u32;
            Record::copy_hash(self.last_seq(), copy_index, volume, offset, len as u32, span, GENERATION, digests.into())
        } else {
            let data = Bytes::copy_from_slice(region);
            Record::copy_chunk(self.last_seq(), copy_index, volume, offset, GENERATION, data)
        };
        self.p.session.on_copy_read(rec);
    }

    /// FUA or FLUSH on the primary: the journal and the volumes are synced;
    /// every completed write is acknowledged as durable.
    fn primary_sync(&mut self) {
        self.p.journal_durable = self.last_seq();
        for w in self.p.volatile_writes.drain(..) {
            apply_to(&mut self.p.durable_image, &w);
        }
        self.p.local_durable = self.slot_of(self.p.done.prefix);
        self.p.flushed = self.p.done.clone();
    }

    /// Housekeeping: regions whose writes are durable on both sites leave
    /// the activity log; with the journal less than half full, bitmap mode
    /// ends and the resync of the bitmap's regions starts (the daemon's
    /// `release_journal`, with the secondary connected).
    fn primary_housekeeping(&mut self) {
        let both = self.p.local_durable.min(self.p.session.shipper().durable());
        self.p.al.retire(both, self.steps as u64);
        // Journal space is freed up to the secondary's checkpoint, as far
        // as the local volume writes are done.
        let release = self.p.checkpoint_seen.min(self.slot_of(self.p.done.prefix));
        self.p.journal = self.p.journal.split_off(&(release + 1));
        if self.p.bitmap_mode && self.journal_bytes() < self.p.journal_capacity / 2 {
            self.p.bitmap_mode = false;
            self.stats.bitmap_mode_exits += 1;
        }
    }

    /// The primary restarts after kill -9 (`power` false: the page cache
    /// survives) or a power cut (unsynced pages survive or not, per `seed`),
    /// exactly as the daemon does after any unclean stop: replay the
    /// journal's surviving run (skipping, and marking dirty, the records
    /// that touch a region dirty in the persisted bitmap: a write made in
    /// bitmap mode may have overwritten them), start a new generation,
    /// rebase the secondary on that run and resync the activity log's
    /// regions. Bitmap mode, the resync gap and the bitmaps were persisted
    /// before any write that relies on them reached the volume: they
    /// survive.
    fn primary_restart(&mut self, power: bool, mut seed: u64) {
        // What survives on the volumes.
        let mut image = if power { self.p.durable_image.clone() } else { self.p.image.clone() };
        if power {
            for w in &self.p.volatile_writes {
                if coin(&mut seed) {
                    apply_to(&mut image, w);
                }
            }
        }
        for (wid, _) in &self.p.in_flight {
            if coin(&mut seed) {
                apply_to(&mut image, &self.writes[(wid - 1) as usize].rec);
            }
        }
        // The persisted bitmaps: dirty regions, and the copy chunks not yet
        // durable on the secondary.
        let mut bitmaps = self.p.bitmaps.clone();
        for (vol, off, len) in self.p.session.copy_inflight() {
            bitmaps[vol as usize].set_range(off, len);
        }
        // The journal's contiguous run from its tail, replayed, but for the
        // records the persisted bitmaps rule out (the daemon's replay).
        let mut last = self.p.journal.keys().next().map_or(self.last_seq(), |k| k - 1);
        let mut run = Vec::new();
        while let Some(rec) = self.p.journal.get(&(last + 1)) {
            if power && rec.seq > self.p.journal_durable && !coin(&mut seed) {
                break;
            }
            run.push(rec);
            last += 1;
        }
        let ranges: Vec<_> = run.iter().map(|r| (r.seq, r.volume, r.offset, u64::from(r.length))).collect();
        for (rec, replay) in run.iter().zip(plan_replay(&mut bitmaps, &ranges, self.p.replay_fence)) {
            if replay {
                apply_to(&mut image, rec);
            } else {
                self.stats.replay_skips += 1;
            }
        }
        assert!(last >= self.p.journal_durable, "a durable journal record was lost");
        // I1: every byte last written by a flushed write holds that write.
        let all = self.primary_image(&SeqSet { prefix: self.last_wid(), extras: BTreeSet::new() });
        let mut writer = vec![vec![0u64; VOL_SIZE]; VOLUMES];
        for (i, w) in self.writes.iter().enumerate().skip(self.base_wid as usize) {
            writer[w.rec.volume as usize][w.rec.offset as usize..w.rec.end() as usize].fill(i as u64 + 1);
        }
        for (v, bytes) in writer.iter().enumerate() {
            for (b, &w) in bytes.iter().enumerate() {
                let flushed = w != 0 && (w <= self.p.flushed.prefix || self.p.flushed.extras.contains(&w));
                assert!(
                    !flushed || image[v][b] == all[v][b],
                    "step {}: the primary lost flushed write {w} (journal seq {:?}, volume {v} byte {b}) in a {}",
                    self.steps,
                    self.writes[(w - 1) as usize].jseq,
                    if power { "power cut" } else { "crash" }
                );
            }
        }
        if power {
            self.stats.primary_power_cuts += 1;
        } else {
            self.stats.primary_crashes += 1;
        }
        self.p.bitmaps = bitmaps;
        // The secondary's session ends (it drains), then it rebases.
        self.link_drop();
        // The new generation: writes through `last` are the new base.
        self.history.truncate(last as usize);
        self.jseq_wid.truncate(last as usize);
        self.base = image.clone();
        self.base_seq = last;
        self.base_wid = self.last_wid();
        self.primary_model = ModelCache::new(image.clone(), self.base_wid);
        self.secondary_model = ModelCache::new(image.clone(), self.base_wid);
        let p = &mut self.p;
        for (vol, off, len) in p.al.extents() {
            let b = &mut p.bitmaps[vol as usize];
            let end = (off + len).min(b.volume_size());
            if off < end {
                b.set_range(off, end - off);
            }
        }
        p.al.clear();
        p.copy_pending = true;
        p.copy_reading = None;
        p.seqr = RangeSequencer::new(self.base_wid + 1);
        p.in_flight.clear();
        p.image = image.clone();
        p.durable_image = image;
        p.volatile_writes.clear();
        p.journal.clear();
        p.journal_durable = last;
        p.local_durable = last;
        p.done = SeqSet { prefix: self.base_wid, extras: BTreeSet::new() };
        p.flushed = p.done.clone();
        p.checkpoint_seen = last;
        // Records of the new generation follow every write made so far.
        p.replay_fence = p.replay_fence.min(last);
        p.bitmap_fence = p.bitmap_fence.min(last);
        let s = &mut self.s;
        s.persisted_checkpoint = last;
        s.persisted_copy_incomplete = true;
        // A resync already guarded keeps its preserved image.
        s.unguarded = s.preserved.is_none();
        s.applied = SeqSet { prefix: last, extras: BTreeSet::new() };
        s.copy_reflects = 0;
        s.machine = machine(last, true, s.now);
        self.reconnect();
    }

    fn primary_flush(&mut self) {
        self.primary_sync();
        let seq = self.last_seq();
        self.p.session.on_flush_wanted(seq);
        if seq > self.p.session.shipper().durable() {
            self.p.flush_waiting.push(seq);
        }
    }

    fn deliver_to_primary(&mut self, n: usize) {
        let n = n.min(self.s2p.len());
        let bytes: Vec<u8> = self.s2p.drain(..n).collect();
        self.p.acks_in.extend_from_slice(&bytes);
        while let Some(env) = self.p.acks_in.decode().expect("acks decode") {
            let ack = match env.body {
                Some(Body::Ack(ack)) => ack,
                Some(Body::CommandReply(r)) if r.command == pb::Command::CopyDone as i32 => {
                    // The secondary is consistent: the copy is over unless
                    // more regions became dirty since (and with it the
                    // resync gap).
                    if self.p.bitmaps.iter().all(DirtyBitmap::is_clean) && self.p.session.copy_idle() {
                        self.p.copy_pending = false;
                        if self.p.resync_gap.take().is_some() {
                            self.stats.gaps_cleared += 1;
                        }
                        self.stats.copies_done += 1;
                    }
                    continue;
                }
                other => panic!("unexpected message to primary: {other:?}"),
            };
            let upd = self.p.session.on_ack(&ack).unwrap_or_else(|e| panic!("ack rejected: {e} ({ack:?})")).update;
            assert!(ack.checkpoint_seq >= self.p.checkpoint_seen, "checkpoint went backwards");
            self.p.checkpoint_seen = ack.checkpoint_seq;
            if let Some(d) = upd.newly_durable_through {
                self.p.flush_waiting.retain(|&f| f > d);
            }
        }
    }

    /// A new session: the secondary's OpenGroupReply carries its resume
    /// point.
    fn reconnect(&mut self) {
        self.p2s.clear();
        self.s2p.clear();
        self.p.acks_in = FrameDecoder::new();
        self.s.frames_in = FrameDecoder::new();
        self.s.last_ack_sent = None;
        self.p.flush_waiting.clear();
        let peer_durable = self.s.machine.checkpoint();
        let oldest = self.p.journal.keys().next().copied().unwrap_or(self.last_seq() + 1);
        check_resume(peer_durable, oldest, self.last_seq()).expect("the journal covers the secondary");
        let mut fresh = PrimarySession::new(COPY, peer_durable, self.last_seq());
        // The persisted resync gap is told at every session start.
        if let Some(gap) = self.p.resync_gap {
            fresh.on_gap(gap);
        }
        self.p.gap_at_start = self.p.resync_gap.is_some();
        let old = std::mem::replace(&mut self.p.session, fresh);
        self.p.copy_reading = None;
        old.end(&mut self.p.bitmaps);
    }

    // ---- secondary ----

    /// Performs the machine's actions: appends at once, the rest queued as
    /// outstanding I/O that the ops complete.
    fn secondary_perform(&mut self) {
        while let Some(action) = self.s.machine.poll_action(self.s.now) {
            match action {
                Action::Append { record, .. } => {
                    assert_eq!(record, self.history[(record.seq - 1) as usize], "record changed on its way");
                    // Like the daemon, which appends a small record at once
                    // and waits for the disk with a large one: every third
                    // record completes later, in any order.
                    let seq = record.seq;
                    if seq % 3 == 0 {
                        self.s.appends.push(record);
                    } else {
                        self.s.rj_volatile.insert(seq, record);
                        self.s.machine.on_appended(seq);
                    }
                }
                Action::SyncJournal { through } => self.s.journal_syncs.push_back(through),
                Action::Apply { id, record } => {
                    assert!(
                        record.op.is_copy() || self.s.rj_durable.contains_key(&record.seq),
                        "record {} applied before the restore journal holds it durably",
                        record.seq
                    );
                    self.s.applies.push((id, record));
                }
                Action::SyncVolumes(b) => self.s.volume_syncs.push_back((b, self.s.volatile_writes.len())),
                Action::Save(p) => self.s.saves.push_back(p),
                Action::PreserveImage { seq, .. } => {
                    assert!(self.s.applies.is_empty(), "an apply is in flight while the image is preserved");
                    assert!(self.s.preserved.is_none(), "a second image preserved before the first was released");
                    // The daemon syncs the volumes, then keeps their image
                    // by copy-on-write (durably): the snapshot of the
                    // durable image now.
                    let synced = self.s.volatile_writes.len();
                    for w in self.s.volatile_writes.drain(..) {
                        apply_to(&mut self.s.durable_image, &w);
                    }
                    for (_, n) in &mut self.s.volume_syncs {
                        *n = n.saturating_sub(synced);
                    }
                    let snapshot = self.s.durable_image.clone();
                    // What a failover in the middle of the resync rolls
                    // back to: exactly the primary's image after writes
                    // <= seq.
                    let set = SeqSet { prefix: seq, extras: BTreeSet::new() };
                    assert!(
                        self.s.applied == set && self.holds_exactly(&snapshot, &set),
                        "the image preserved for the resync is not the image after writes <= {seq} ({:?})",
                        self.s.applied
                    );
                    if !self.s.last_offered_copy {
                        // A record after a resync gap, not a copy chunk.
                        self.stats.gap_preserves += 1;
                    }
                    self.s.preserved = Some((seq, snapshot));
                    self.stats.images_preserved += 1;
                    self.s.machine.on_image_preserved(Ok(())).unwrap_or_else(|e| panic!("{e}"));
                }
                Action::ReleaseImage => {
                    assert!(
                        !self.s.machine.copy_incomplete() && !self.s.persisted_copy_incomplete,
                        "the preserved image released before the consistent image is persisted"
                    );
                    self.s.preserved = None;
                }
                Action::Send(body) => {
                    if let Body::Ack(ack) = &body {
                        if let Some(prev) = &self.s.last_ack_sent {
                            assert!(
                                ack.received_seq >= prev.received_seq
                                    && ack.applied_seq >= prev.applied_seq
                                    && ack.durable_seq >= prev.durable_seq
                                    && ack.checkpoint_seq >= prev.checkpoint_seq,
                                "ack went backwards: {prev:?} then {ack:?}"
                            );
                        }
                        self.s.last_ack_sent = Some(ack.clone());
                    }
                    push_frame(&mut self.s2p, body);
                }
            }
        }
    }

    fn deliver_to_secondary(&mut self, n: usize) {
        let n = n.min(self.p2s.len());
        let bytes: Vec<u8> = self.p2s.drain(..n).collect();
        self.s.frames_in.extend_from_slice(&bytes);
        loop {
            if !self.s.machine.wants_input() {
                self.stats.journal_full += 1;
                break;
            }
            let Some(env) = self.s.frames_in.decode().expect("frames decode") else { break };
            match env.body {
                Some(Body::Record(msg)) => {
                    let (group, rec) = Record::from_pb(msg).expect("valid record");
                    assert_eq!(group, GROUP);
                    if !rec.op.is_copy() {
                        assert_eq!(rec, self.history[(rec.seq - 1) as usize], "record changed in transit");
                    }
                    self.s.last_offered_copy = rec.op.is_copy();
                    self.s.machine.on_record(rec).unwrap_or_else(|e| panic!("record refused: {e}"));
                }
                Some(Body::Flush(f)) => self.s.machine.on_flush_request(f.seq),
                Some(Body::Command(c)) if c.command == pb::Command::CopyDone as i32 => {
                    self.s.machine.on_copy_done(c.seq, c.at_us).unwrap_or_else(|e| panic!("COPY_DONE refused: {e}"))
                }
                Some(Body::Command(c)) if c.command == pb::Command::ResyncGap as i32 => {
                    self.s.machine.on_resync_gap(c.seq)
                }
                other => panic!("unexpected message to secondary: {other:?}"),
            }
        }
        if self.s.frames_in.buffered_len() > 0 {
            // A frame is only partly here (or waits for journal space).
            self.stats.frames_split += 1;
        }
        self.secondary_perform();
    }

    /// Frames held back while the journal was full go in once there is room.
    fn secondary_input(&mut self) {
        self.deliver_to_secondary(0);
    }

    fn secondary_append_done(&mut self, pick: usize) {
        if self.s.appends.is_empty() {
            return;
        }
        let rec = self.s.appends.swap_remove(pick % self.s.appends.len());
        let seq = rec.seq;
        self.s.rj_volatile.insert(seq, rec);
        self.s.machine.on_appended(seq);
        self.secondary_perform();
    }

    fn secondary_apply(&mut self, pick: usize) {
        if self.s.applies.is_empty() {
            return;
        }
        let (id, rec) = self.s.applies.swap_remove(pick % self.s.applies.len());
        // Every earlier overlapping write is already applied.
        for (_, other) in &self.s.applies {
            let overlaps = other.volume == rec.volume && other.offset < rec.end() && rec.offset < other.end();
            let writes = !rec.op.is_copy() && !other.op.is_copy();
            assert!(
                !(writes && overlaps && other.seq < rec.seq),
                "record {} applied before overlapping {}",
                rec.seq,
                other.seq
            );
        }
        for (offset, len, d) in rec.hash_spans() {
            let (o, e) = (offset as usize, (offset + len) as usize);
            if digest(&self.s.image[rec.volume as usize][o..e])[..] != *d {
                self.stats.copy_mismatches += 1;
                self.s.machine.on_copy_mismatch(rec.copy_index, offset, len);
            }
        }
        apply_to(&mut self.s.image, &rec);
        self.s.volatile_writes.push(rec.clone());
        if rec.op.is_copy() {
            self.s.copy_reflects = self.s.copy_reflects.max(rec.seq);
        } else {
            self.s.applied.insert(rec.seq);
        }
        if !self.s.applied.extras.is_empty() {
            self.stats.secondary_out_of_order += 1;
        }
        self.s.machine.on_applied(id, Ok(())).expect("apply accepted");
        self.secondary_perform();
    }

    fn journal_sync_done(&mut self) {
        let Some(through) = self.s.journal_syncs.pop_front() else { return };
        let keep = self.s.rj_volatile.split_off(&(through + 1));
        let synced = std::mem::replace(&mut self.s.rj_volatile, keep);
        self.s.rj_durable.extend(synced);
        self.s.machine.on_journal_synced(through, Ok(())).expect("journal sync accepted");
        self.secondary_perform();
        self.secondary_input();
    }

    fn volume_sync_done(&mut self) {
        let Some((barrier, covered)) = self.s.volume_syncs.pop_front() else { return };
        for w in self.s.volatile_writes.drain(..covered) {
            apply_to(&mut self.s.durable_image, &w);
        }
        for (_, n) in &mut self.s.volume_syncs {
            *n -= covered;
        }
        self.s.machine.on_volumes_synced(barrier, Ok(())).expect("volume sync accepted");
        self.secondary_perform();
    }

    fn save_done(&mut self) {
        let Some(persist) = self.s.saves.pop_front() else { return };
        if persist.checkpoint > self.s.persisted_checkpoint {
            self.stats.checkpoints += 1;
        }
        assert!(persist.checkpoint >= self.s.persisted_checkpoint, "the checkpoint went backwards");
        self.s.persisted_checkpoint = persist.checkpoint;
        self.s.persisted_copy_incomplete = persist.copy_incomplete;
        if !persist.copy_incomplete {
            self.s.unguarded = false;
        }
        // The restore journal space before the checkpoint may be reused.
        self.s.rj_durable = self.s.rj_durable.split_off(&(persist.checkpoint + 1));
        self.s.machine.on_saved(&persist, Ok(()), self.s.now).expect("save accepted");
        self.secondary_perform();
        self.secondary_input();
    }

    fn tick(&mut self) {
        let m = &self.s.machine;
        let unsynced = m.received() > m.durable() && self.s.journal_syncs.is_empty();
        // The daemon sleeps until the machine's timeout: a record that
        // waits for a journal sync must come with one.
        assert!(!unsynced || m.deferred_until().is_some(), "records wait for a journal sync nobody will start");
        self.s.now += Duration::from_millis(400);
        self.secondary_perform();
        if unsynced && !self.s.journal_syncs.is_empty() {
            self.stats.delayed_journal_syncs += 1;
        }
    }

    /// End of session: the secondary drains, completing its own I/O.
    fn link_drop(&mut self) {
        self.s.machine.begin_drain();
        for round in 0.. {
            assert!(round < 1000, "drain does not finish");
            self.secondary_perform();
            if self.s.machine.is_drained() {
                break;
            }
            if !self.s.appends.is_empty() {
                self.secondary_append_done(0);
            } else if !self.s.applies.is_empty() {
                self.secondary_apply(0);
            } else if !self.s.journal_syncs.is_empty() {
                self.journal_sync_done();
            } else if !self.s.volume_syncs.is_empty() {
                self.volume_sync_done();
            } else {
                self.save_done();
            }
        }
        assert_eq!(self.s.machine.checkpoint(), self.s.machine.received(), "a drain checkpoints everything received");
        let now = self.s.now;
        self.s.machine = machine(self.s.machine.checkpoint(), self.s.persisted_copy_incomplete, now);
        self.reconnect();
    }

    /// The secondary restarts after a fault: it recovers its restore journal
    /// onto the volumes, syncs them and starts a session from there.
    fn secondary_restart(&mut self, power: bool, seed: u64) {
        let r = self.s.recover(power, seed);
        if power {
            self.stats.power_cuts += 1;
        } else {
            self.stats.crashes += 1;
        }
        self.stats.unsynced_pages_lost += r.lost_pages;
        if r.replayed {
            self.stats.recoveries_replaying += 1;
        }
        if !self.s.persisted_copy_incomplete {
            let set = SeqSet { prefix: r.last, extras: BTreeSet::new() };
            assert!(
                self.holds_exactly(&r.image, &set),
                "after a restart the replica is not the primary's image after writes <= {}",
                r.last
            );
            // The daemon removes a guard whose resync finished, or whose
            // inconsistency never reached the disk.
            self.s.preserved = None;
        }
        let s = &mut self.s;
        s.image = r.image.clone();
        s.durable_image = r.image;
        s.volatile_writes.clear();
        s.applied = SeqSet { prefix: r.last, extras: BTreeSet::new() };
        s.rj_durable.clear();
        s.rj_volatile.clear();
        s.appends.clear();
        s.journal_syncs.clear();
        s.applies.clear();
        s.volume_syncs.clear();
        s.saves.clear();
        s.persisted_checkpoint = r.last;
        s.machine = machine(r.last, s.persisted_copy_incomplete, s.now);
        self.reconnect();
    }

    // ---- driver ----

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Write { vol, offset, len, kind, fua } => self.client_write(vol, offset, len, kind, fua),
            Op::PrimaryComplete(i) => self.primary_complete(i),
            Op::Ship(n) => self.ship(n),
            Op::Copy => self.copy(),
            Op::Resync { vol, offset, len } => {
                let offset = u64::from(offset) % VOL_SIZE as u64;
                let len = u64::from(len).min(VOL_SIZE as u64 - offset);
                self.p.bitmaps[usize::from(vol)].set_range(offset, len);
                self.p.copy_pending = true;
            }
            Op::DeliverToSecondary(n) => self.deliver_to_secondary(usize::from(n)),
            Op::SecondaryAppendDone(i) => self.secondary_append_done(i),
            Op::SecondaryApply(i) => self.secondary_apply(i),
            Op::JournalSyncDone => self.journal_sync_done(),
            Op::VolumeSyncDone => self.volume_sync_done(),
            Op::SaveDone => self.save_done(),
            Op::Tick => self.tick(),
            Op::DeliverToPrimary(n) => self.deliver_to_primary(usize::from(n)),
            Op::PrimaryFlush => self.primary_flush(),
            Op::LinkDrop => self.link_drop(),
            Op::SecondaryCrash(seed) => self.secondary_restart(false, seed),
            Op::SecondaryPowerCut(seed) => self.secondary_restart(true, seed),
            Op::PrimaryHousekeeping => self.primary_housekeeping(),
            Op::PrimaryCrash(seed) => self.primary_restart(false, seed),
            Op::PrimaryPowerCut(seed) => self.primary_restart(true, seed),
        }
        self.steps += 1;
        self.check();
    }

    fn check(&mut self) {
        let step = self.steps;
        // Primary: image after exactly the completed writes, journaled or
        // made in bitmap mode.
        let done = self.p.done.clone();
        let want = self.primary_image(&done);
        assert!(self.p.image == want, "step {step}: primary image is not the image after its completed writes");
        assert!(self.journal_bytes() <= self.p.journal_capacity, "step {step}: the journal overflowed");
        assert!(
            !self.p.bitmap_mode || (self.p.copy_pending && self.p.resync_gap.is_some()),
            "step {step}: bitmap mode without a pending resync and a resync gap"
        );

        // Secondary: the live image holds exactly the applied writes (once
        // a copy is over and the writes its chunks reflect are applied).
        assert!(self.s.applied.prefix >= self.s.machine.applied(), "step {step}: applied_seq beyond the image");
        let consistent = !self.s.persisted_copy_incomplete && !self.s.machine.copy_incomplete();
        if consistent && self.s.applied.prefix >= self.s.copy_reflects {
            let (image, applied) = (self.s.image.clone(), self.s.applied.clone());
            assert!(
                self.holds_exactly(&image, &applied),
                "step {step}: secondary image is not the image after writes {applied:?}"
            );
            self.stats.consistent_checks += 1;
        }
        if self.s.persisted_copy_incomplete {
            // The image is inconsistent while a copy runs (and says so): a
            // failover would use the image preserved when the resync
            // started (checked to be a prefix then, and kept as it was),
            // unless there was no consistent image to preserve.
            assert!(
                self.s.unguarded || self.s.preserved.is_some(),
                "step {step}: the replica is inconsistent and no consistent image is preserved"
            );
            self.stats.guarded_checks += usize::from(self.s.preserved.is_some());
            return;
        }

        // I5 at every instant: a fault now leaves a write-order prefix that
        // covers every durable ack and every freed journal record.
        let seed = (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for (power, seed) in [(true, seed), (true, 0), (false, seed)] {
            self.stats.fault_checks += 1;
            let r = self.s.recover(power, seed);
            assert!(
                self.holds_exactly(&r.image, &SeqSet { prefix: r.last, extras: BTreeSet::new() }),
                "step {step}: a {} now would leave an image that is not the primary's after writes <= {}",
                if power { "power cut" } else { "crash" },
                r.last
            );
            let acked = self.s.last_ack_sent.as_ref().map_or(0, |a| a.durable_seq);
            assert!(r.last >= acked, "step {step}: durable ack {acked} but a fault now recovers only {}", r.last);
            assert!(
                r.last >= self.p.checkpoint_seen,
                "step {step}: the primary freed its journal through {} but a fault now recovers only {}",
                self.p.checkpoint_seen,
                r.last
            );
        }

        // The journal holds every record the secondary might still need.
        let last = self.last_seq();
        let resume = self.s.recover(true, 0).last;
        if last > resume {
            let first = *self.p.journal.keys().next().unwrap_or(&u64::MAX);
            assert!(
                first <= resume + 1 && self.p.journal.keys().next_back() == Some(&last),
                "step {step}: journal [{first}..] no longer covers what the secondary would resume from ({resume})"
            );
        }
    }

    /// Runs everything to completion and checks both sides converge.
    fn drain(&mut self) {
        for round in 0.. {
            assert!(
                round < 10_000,
                "simulation did not converge: primary copy_pending {} bitmap_mode {} resync_gap {:?}, secondary \
                 inconsistent {} (persisted {}), applied {} of {}",
                self.p.copy_pending,
                self.p.bitmap_mode,
                self.p.resync_gap,
                self.s.machine.copy_incomplete(),
                self.s.persisted_copy_incomplete,
                self.s.machine.applied(),
                self.last_seq()
            );
            while !self.p.in_flight.is_empty() {
                self.primary_complete(0);
            }
            self.copy();
            self.ship(u8::MAX);
            self.deliver_to_secondary(usize::MAX);
            while !self.s.appends.is_empty() {
                self.secondary_append_done(0);
            }
            while !self.s.applies.is_empty() {
                self.secondary_apply(0);
            }
            self.journal_sync_done();
            self.tick();
            self.volume_sync_done();
            self.save_done();
            self.deliver_to_primary(usize::MAX);
            self.primary_housekeeping();
            self.steps += 1;
            self.check();
            if self.p.session.shipper().durable() == self.last_seq()
                && !self.p.copy_pending
                && !self.p.bitmap_mode
                && !self.s.persisted_copy_incomplete
                && self.s.machine.applied() == self.last_seq()
                && self.p.session.sent_through() == self.last_seq()
                && self.p2s.is_empty()
                && self.s2p.is_empty()
                && self.s.frames_in.buffered_len() == 0
            {
                break;
            }
        }
        assert_eq!(self.p.session.shipper().lag_records(), 0);
        assert!(self.p.flush_waiting.is_empty(), "a flush was never acknowledged");
        assert!(self.p.journal.is_empty(), "journal space not freed after everything was acked");
        assert!(self.s.image == self.p.image, "images differ after draining");
        assert!(self.p.resync_gap.is_none(), "the resync is over but the primary keeps its resync gap");
        assert!(self.s.preserved.is_none(), "the resync is over but the preserved image was not released");
        let all = self.last_wid();
        assert!(self.p.image == *ModelCache::new(self.base.clone(), self.base_wid).through(&self.writes, all));
    }
}

fn run(copy: bool, journal_capacity: u64, ops: &[Op]) -> Stats {
    let mut sim = Sim::new(copy, journal_capacity);
    for op in ops {
        sim.step(op);
    }
    sim.drain();
    sim.stats
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn random_interaction(
        copy in any::<bool>(),
        journal_capacity in prop_oneof![1 => Just(u64::MAX), 2 => (3u64..=24).prop_map(|k| k * 1024)],
        ops in proptest::collection::vec(arb_op(), 1..250),
    ) {
        let _ = run(copy, journal_capacity, &ops);
    }
}

/// xorshift64*: a tiny deterministic PRNG for the long seeded runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a stretch of a long run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Resyncs, link drops, crashes and power cuts too.
    Faults,
    /// None of those: copies and resyncs finish, so that later faults (and
    /// journal fills) hit a consistent replica too.
    Quiet,
    /// Quiet, and the link carries nothing while clients write: the
    /// primary's journal fills.
    Backlog,
}

/// Each 2000 ops: faults, a quiet stretch, a backlog (where it starts and
/// how long it lasts depend on the run), quiet again.
fn phase(run: u64, i: usize) -> Phase {
    let backlog = [1000, 1300, 1500][run as usize % 3];
    let len = [100, 200][run as usize % 2];
    match i % 2000 {
        0..300 => Phase::Faults,
        x if (backlog..backlog + len).contains(&x) => Phase::Backlog,
        _ => Phase::Quiet,
    }
}

/// One op of a long run in `phase`.
fn seeded_op(rng: &mut Rng, phase: Phase) -> Op {
    let kinds = [Kind::Write, Kind::Write, Kind::Write, Kind::Zeroes, Kind::Trim];
    let faults = phase == Phase::Faults;
    let roll = rng.below(100);
    // In a backlog, the deliveries are writes instead.
    if roll <= 9 || (phase == Phase::Backlog && matches!(roll, 32..=41 | 70..=78)) {
        return Op::Write {
            vol: rng.below(VOLUMES as u64) as u8,
            offset: rng.next() as u16,
            len: 1 + rng.below(1024) as u16,
            kind: kinds[rng.below(kinds.len() as u64) as usize],
            fua: rng.below(7) == 0,
        };
    }
    match roll {
        10..=23 => Op::PrimaryComplete(rng.next() as usize),
        24..=31 => Op::Ship(1 + rng.below(5) as u8),
        32..=41 => Op::DeliverToSecondary(1 + rng.below(3000) as u16),
        42..=44 => Op::SecondaryAppendDone(rng.next() as usize),
        45..=53 => Op::SecondaryApply(rng.next() as usize),
        54..=59 => Op::JournalSyncDone,
        60..=63 => Op::VolumeSyncDone,
        64..=67 => Op::SaveDone,
        68 | 69 => Op::Tick,
        70..=78 => Op::DeliverToPrimary(1 + rng.below(200) as u16),
        79 | 80 => Op::PrimaryFlush,
        81..=92 => Op::Copy,
        93 if faults => Op::Resync {
            vol: rng.below(VOLUMES as u64) as u8,
            offset: rng.next() as u16,
            len: 1 + rng.below(4096) as u16,
        },
        93..=98 if !faults => Op::PrimaryHousekeeping,
        94 if faults => Op::LinkDrop,
        95 if faults => Op::SecondaryCrash(rng.next()),
        96 if faults => Op::SecondaryPowerCut(rng.next()),
        97 if faults => Op::PrimaryCrash(rng.next()),
        98 if faults => Op::PrimaryPowerCut(rng.next()),
        99 => Op::PrimaryHousekeeping,
        _ => Op::SecondaryApply(rng.next() as usize),
    }
}

/// The primary's journal capacity in each long run: from one that fills
/// often to one that never does.
const SEEDED_JOURNALS: [u64; 6] = [8 * 1024, 16 * 1024, u64::MAX, 12 * 1024, 24 * 1024, 48 * 1024];

/// Long deterministic scenarios (VOPR-style): same seed, same run. Also
/// asserts that the runs reach the interesting paths, so that a change that
/// makes the simulation trivial does not go unnoticed. Odd seeds start
/// with an initial copy, even ones with a pair created on identical
/// volumes; each has its own journal capacity and backlog layout. (18
/// runs: with the primary's `on_gap` at session starts left out, or its
/// `on_gap` not unfinishing a finished copy, one of them breaks I5.)
#[test]
fn seeded_long_runs() {
    let mut total = Stats::default();
    for seed in 1..=18u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let ops: Vec<Op> = (0..12_000).map(|i| seeded_op(&mut rng, phase(seed, i))).collect();
        total += run(seed % 2 == 1, SEEDED_JOURNALS[(seed as usize - 1) % SEEDED_JOURNALS.len()], &ops);
    }
    println!("{total:?}");
    assert!(total.primary_out_of_order > 0 && total.primary_waits > 0, "{total:?}");
    assert!(total.secondary_out_of_order > 0 && total.journal_full > 0, "{total:?}");
    assert!(total.crashes > 0 && total.power_cuts > 0 && total.unsynced_pages_lost > 0, "{total:?}");
    assert!(total.recoveries_replaying > 0 && total.checkpoints > 0 && total.frames_split > 0, "{total:?}");
    assert!(total.copy_chunks > 0 && total.copy_waits > 0 && total.copies_done > 0, "{total:?}");
    assert!(total.copy_hashes > 0 && total.copy_mismatches > 0, "{total:?}");
    assert!(total.primary_crashes > 0 && total.primary_power_cuts > 0, "{total:?}");
    assert!(total.consistent_checks > 0 && total.fault_checks > 0, "{total:?}");
    assert!(total.images_preserved > 0 && total.delayed_journal_syncs > 0, "{total:?}");
    assert!(total.activity_log_full > 0, "{total:?}");
    // The journal filled: writes went to the bitmap, the resync gap was
    // told at a session start, and a record after it (not a copy chunk)
    // had the secondary preserve its image.
    assert!(
        total.bitmap_mode_entries > 0
            && total.bitmap_writes > 0
            && total.bitmap_mode_exits > 0
            && total.fences_armed > 0,
        "{total:?}"
    );
    assert!(total.gaps_at_session_start > 0 && total.gap_preserves > 0 && total.gaps_cleared > 0, "{total:?}");
}

/// One journal fill, walked through: 3 KiB hold two records of 1000 bytes
/// (1536 each), so the third write and the next two go to the bitmap; the drain frees the journal, leaves
/// bitmap mode and resyncs. The secondary preserved its image when the
/// resync started, and with no write journaled since the gap it ends
/// consistent at the gap with the whole run copied.
#[test]
fn a_journal_fill_resyncs_the_bitmap_run() {
    let w = |offset: u16| Op::Write { vol: 0, offset, len: 1000, kind: Kind::Write, fua: false };
    let ops = [w(0), w(2000), w(4000), w(6000), w(100), Op::Ship(2), Op::DeliverToSecondary(u16::MAX)];
    let st = run(false, 3 * 1024, &ops);
    assert_eq!((st.bitmap_mode_entries, st.bitmap_writes, st.bitmap_mode_exits), (1, 3, 1), "{st:?}");
    assert!(st.images_preserved == 1 && st.copies_done == 1 && st.gaps_cleared == 1, "{st:?}");
    assert!(st.runs_included > 0, "{st:?}");
}

/// A crash in bitmap mode, before the resync began: no chunk was cleared,
/// so the dirty chunks alone say which records a bitmap-mode write may
/// have overwritten. The record in a chunk written since is not replayed
/// (the resync copies it); the one elsewhere is, and its region needs no
/// copy (the I1 check at the restart holds either way).
#[test]
fn a_restart_in_bitmap_mode_replays_the_records_no_bitmap_write_touched() {
    let mut sim = Sim::new(false, 3 * 1024);
    sim.client_write(0, 0, 1000, Kind::Write, false);
    sim.client_write(0, 4096, 100, Kind::Write, true);
    sim.primary_complete(0);
    sim.primary_complete(0);
    // 1536 + 512 bytes journaled: the next 1536 do not fit.
    sim.client_write(0, 500, 1000, Kind::Write, true);
    sim.primary_complete(0);
    assert!(sim.p.bitmap_mode && sim.p.bitmap_fence == 2 && sim.p.replay_fence == 0);
    sim.primary_restart(false, 1);
    assert_eq!(sim.stats.replay_skips, 1, "only record 1 shares a chunk with the bitmap-mode write");
    sim.drain();
}

/// The journal is released lazily (at housekeeping), after the acks: a
/// crash of the primary once the resync has copied a region written in
/// bitmap mode, and before the journal is released past an older record
/// that the write overwrote, finds that record in the journal and the
/// bitmap clean there. The replay must not put it back over the write
/// (flushed here: the I1 check at the restart fails if it does).
#[test]
fn a_restart_after_a_resync_does_not_replay_records_older_than_the_bitmap_writes() {
    let mut sim = Sim::new(false, 3 * 1024);
    sim.client_write(0, 0, 1000, Kind::Write, false);
    sim.client_write(0, 2000, 100, Kind::Write, false);
    sim.primary_complete(0);
    sim.primary_complete(0);
    // 1536 + 512 bytes journaled: the next 1536 do not fit.
    sim.client_write(0, 2050, 1000, Kind::Write, true);
    sim.primary_complete(0);
    assert!(sim.p.bitmap_mode && sim.p.resync_gap == Some(2));
    let settle = |sim: &mut Sim| {
        for _ in 0..20 {
            sim.deliver_to_secondary(usize::MAX);
            while !sim.s.appends.is_empty() {
                sim.secondary_append_done(0);
            }
            while !sim.s.applies.is_empty() {
                sim.secondary_apply(0);
            }
            sim.journal_sync_done();
            sim.tick();
            sim.volume_sync_done();
            sim.save_done();
            sim.deliver_to_primary(usize::MAX);
            sim.steps += 1;
            sim.check();
        }
    };
    // The gap and record 1 only: the release frees record 1, not 2, and
    // bitmap mode ends.
    sim.ship(2);
    settle(&mut sim);
    sim.primary_housekeeping();
    assert!(!sim.p.bitmap_mode && sim.p.journal.keys().eq([2].iter()));
    // The resync runs to its end; no housekeeping since.
    for _ in 0..30 {
        sim.copy();
        sim.ship(u8::MAX);
        settle(&mut sim);
    }
    assert!(sim.p.resync_gap.is_none() && !sim.p.copy_pending && sim.p.bitmaps.iter().all(DirtyBitmap::is_clean));
    assert!(sim.p.checkpoint_seen >= 2 && sim.p.journal.contains_key(&2));
    sim.primary_restart(false, 1);
    assert_eq!(sim.stats.replay_skips, 1);
    sim.drain();
}

/// A secondary that applied a record, not yet behind its persisted
/// checkpoint, takes a resync chunk over the same range (the primary wrote
/// there again in bitmap mode) and makes it durable. A restart replays the
/// restore journal from the checkpoint, record included: had the chunk been
/// acknowledged durable before the checkpoint passed the record, the
/// primary would have forgotten it, and the replay's older data would stay
/// on the secondary (the final comparison in `drain` fails).
#[test]
fn a_secondary_restart_does_not_replay_a_record_over_a_resync_chunk_it_acknowledged() {
    let mut sim = Sim::new(false, 3 * 1024);
    sim.client_write(0, 0, 1000, Kind::Write, false);
    sim.client_write(0, 2000, 100, Kind::Write, false);
    sim.primary_complete(0);
    sim.primary_complete(0);
    // The journal is full: the write over record 1's range goes to the bitmap.
    sim.client_write(0, 0, 1000, Kind::Write, false);
    sim.primary_complete(0);
    assert!(sim.p.bitmap_mode && sim.p.resync_gap == Some(2));
    // Records 1 and 2 are applied on the secondary; no volume sync, no
    // checkpoint yet.
    sim.ship(u8::MAX);
    sim.deliver_to_secondary(usize::MAX);
    while !sim.s.appends.is_empty() {
        sim.secondary_append_done(0);
    }
    // Async mode: the restore journal's sync is group-committed.
    sim.tick();
    sim.journal_sync_done();
    while !sim.s.applies.is_empty() {
        sim.secondary_apply(0);
    }
    assert_eq!((sim.s.machine.applied(), sim.s.persisted_checkpoint), (2, 0));
    // Durable in the restore journal: the primary frees its journal and
    // leaves bitmap mode.
    sim.tick();
    sim.deliver_to_primary(usize::MAX);
    sim.primary_housekeeping();
    assert!(!sim.p.bitmap_mode && sim.p.copy_pending);
    // The resync's chunks arrive; the inconsistency is persisted (still at
    // checkpoint 0), the chunks are applied and made durable, and every
    // ack goes back to the primary. The checkpoint save that follows is
    // not done when the secondary crashes.
    for _ in 0..4 {
        sim.copy();
        sim.ship(u8::MAX);
        sim.deliver_to_secondary(usize::MAX);
        if !sim.s.persisted_copy_incomplete {
            sim.save_done();
        }
        while !sim.s.applies.is_empty() {
            sim.secondary_apply(0);
        }
        sim.volume_sync_done();
        sim.deliver_to_primary(usize::MAX);
    }
    assert!(sim.stats.copy_chunks > 0 && sim.s.persisted_copy_incomplete);
    assert_eq!(sim.s.persisted_checkpoint, 0, "the checkpoint save is not done");
    sim.secondary_restart(false, 7);
    sim.drain();
}
