//! Deterministic simulation of a replicating pair, in the shape of
//! quinn-proto's `tests/random_interaction.rs`: proptest generates a list of
//! operations (client writes, byte delivery in both directions, applies,
//! flushes, checkpoints, link drops, secondary crashes) and replays it against
//! an in-memory primary and secondary built from this crate's state machines,
//! exchanging real frames. Invariants are checked after every step:
//!
//! - the primary's image is the image after exactly the writes it completed
//!   (range serialisation: overlapping writes land in seq order);
//! - the secondary's image is the primary's image after exactly the writes it
//!   applied, which include every seq `<= applied_seq` (write-order
//!   fidelity); after a crash this holds again once the replay has passed the
//!   highest seq the lost session had applied;
//! - acks never go backwards within a session and the checkpoint never goes
//!   backwards at all; the journal still holds every record after the
//!   secondary's checkpoint; a durable ack is backed by the secondary's last
//!   durable snapshot;
//! - after draining, both images are identical.
//!
//! A second test runs much longer seeded scenarios from a tiny PRNG.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use replicator_protocol::apply::{Applier, ApplyId};
use replicator_protocol::pb::{self, envelope::Body};
use replicator_protocol::record::{Record, RecordOp};
use replicator_protocol::sequencer::{Dep, RangeSequencer};
use replicator_protocol::ship::Shipper;
use replicator_protocol::wire::{encode_frame, envelope, FrameDecoder};

const VOLUMES: usize = 3;
const VOL_SIZE: usize = 8192;
const GROUP: &str = "g";
const GENERATION: u64 = 7;

type Image = Vec<Vec<u8>>;

fn blank() -> Image {
    vec![vec![0u8; VOL_SIZE]; VOLUMES]
}

fn apply_to(img: &mut Image, r: &Record) {
    let v = &mut img[r.volume as usize];
    let (o, e) = (r.offset as usize, r.end() as usize);
    match r.op {
        RecordOp::Write | RecordOp::Copy => v[o..e].copy_from_slice(&r.payload),
        RecordOp::WriteZeroes | RecordOp::Trim => v[o..e].fill(0),
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
    fn max(&self) -> u64 {
        self.extras.last().copied().unwrap_or(self.prefix)
    }
}

/// Computes "the image after exactly the writes in a set", caching the image
/// after the longest prefix computed so far.
#[derive(Debug)]
struct ModelCache {
    through: u64,
    img: Image,
}

impl ModelCache {
    fn new() -> Self {
        ModelCache { through: 0, img: blank() }
    }
    fn image(&mut self, history: &[Record], set: &SeqSet) -> Image {
        if set.prefix < self.through {
            *self = ModelCache::new();
        }
        while self.through < set.prefix {
            apply_to(&mut self.img, &history[self.through as usize]);
            self.through += 1;
        }
        let mut img = self.img.clone();
        for &s in &set.extras {
            apply_to(&mut img, &history[(s - 1) as usize]);
        }
        img
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
    /// A client write begins on the primary (journaled and queued at once).
    Write { vol: u8, offset: u16, len: u16, kind: Kind, fua: bool },
    /// A ready in-flight primary write reaches the primary's volume.
    PrimaryComplete(usize),
    /// The shipper sends up to n records.
    Ship(u8),
    /// n bytes of the primary -> secondary pipe arrive.
    DeliverToSecondary(u16),
    /// The secondary finishes applying one ready record.
    SecondaryApply(usize),
    /// The secondary flushes (if `only_if_needed`, only when it says so).
    SecondaryFlush { only_if_needed: bool },
    /// The secondary persists its durable seq as its restart point.
    SecondaryCheckpoint,
    /// n bytes of the secondary -> primary pipe arrive.
    DeliverToPrimary(u16),
    /// The primary asks for a flush of everything sent.
    PrimaryFlush,
    /// The link drops (undelivered bytes are lost) and comes back; with
    /// `drain`, the secondary finishes applying and flushes first.
    LinkDrop { drain: bool },
    /// The secondary crashes: applied-but-not-durable data is lost, it
    /// restarts from its checkpoint.
    SecondaryCrash,
}

fn arb_op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![6 => Just(Kind::Write), 1 => Just(Kind::Zeroes), 1 => Just(Kind::Trim)];
    prop_oneof![
        8 => (0..VOLUMES as u8, any::<u16>(), 1u16..=1024, kind, prop::bool::weighted(0.15))
            .prop_map(|(vol, offset, len, kind, fua)| Op::Write { vol, offset, len, kind, fua }),
        4 => any::<usize>().prop_map(Op::PrimaryComplete),
        4 => (1u8..6).prop_map(Op::Ship),
        5 => (1u16..3000).prop_map(Op::DeliverToSecondary),
        6 => any::<usize>().prop_map(Op::SecondaryApply),
        2 => any::<bool>().prop_map(|only_if_needed| Op::SecondaryFlush { only_if_needed }),
        1 => Just(Op::SecondaryCheckpoint),
        3 => (1u16..200).prop_map(Op::DeliverToPrimary),
        1 => Just(Op::PrimaryFlush),
        1 => any::<bool>().prop_map(|drain| Op::LinkDrop { drain }),
        1 => Just(Op::SecondaryCrash),
    ]
}

/// The secondary's last durable state: what survives a crash.
#[derive(Debug, Clone)]
struct Snapshot {
    image: Image,
    applied: SeqSet,
}

#[derive(Debug)]
struct Primary {
    seqr: RangeSequencer,
    /// Retained journal records by seq.
    journal: BTreeMap<u64, Record>,
    shipper: Shipper,
    in_flight: Vec<(u64, Vec<Dep>)>,
    image: Image,
    done: SeqSet,
    acks_in: FrameDecoder,
    /// Highest checkpoint ever acked (it survives sessions).
    checkpoint_seen: u64,
    flush_waiting: Vec<u64>,
}

#[derive(Debug)]
struct Secondary {
    frames_in: FrameDecoder,
    applier: Applier,
    pending: Vec<(ApplyId, Record, Vec<ApplyId>)>,
    pending_ids: HashSet<ApplyId>,
    image: Image,
    /// Write seqs whose data the image holds.
    applied: SeqSet,
    snapshot: Snapshot,
    /// Persisted restart point.
    checkpoint: u64,
    /// Until `applied_seq` reaches this, a replay after a crash or link drop
    /// is still re-applying writes the image already had.
    replay_until: u64,
    last_ack_sent: Option<pb::Ack>,
    /// Seqs of FUA records and flush requests received in this session.
    flush_targets: BTreeSet<u64>,
}

/// What a run exercised, so the long runs can assert they reach the hard
/// paths.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    primary_out_of_order: usize,
    primary_waits: usize,
    secondary_out_of_order: usize,
    secondary_waits: usize,
    crashes: usize,
    replays_finished: usize,
    flushes_due: usize,
    frames_split: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.primary_out_of_order += o.primary_out_of_order;
        self.primary_waits += o.primary_waits;
        self.secondary_out_of_order += o.secondary_out_of_order;
        self.secondary_waits += o.secondary_waits;
        self.crashes += o.crashes;
        self.replays_finished += o.replays_finished;
        self.flushes_due += o.flushes_due;
        self.frames_split += o.frames_split;
    }
}

#[derive(Debug)]
struct Sim {
    history: Vec<Record>,
    p: Primary,
    s: Secondary,
    p2s: VecDeque<u8>,
    s2p: VecDeque<u8>,
    primary_model: ModelCache,
    secondary_model: ModelCache,
    steps: usize,
    stats: Stats,
    in_replay: bool,
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

impl Sim {
    fn new() -> Self {
        Sim {
            history: Vec::new(),
            p: Primary {
                seqr: RangeSequencer::new(1),
                journal: BTreeMap::new(),
                shipper: Shipper::new(0, 0),
                in_flight: Vec::new(),
                image: blank(),
                done: SeqSet::default(),
                acks_in: FrameDecoder::new(),
                checkpoint_seen: 0,
                flush_waiting: Vec::new(),
            },
            s: Secondary {
                frames_in: FrameDecoder::new(),
                applier: Applier::new(0),
                pending: Vec::new(),
                pending_ids: HashSet::new(),
                image: blank(),
                applied: SeqSet::default(),
                snapshot: Snapshot { image: blank(), applied: SeqSet::default() },
                checkpoint: 0,
                replay_until: 0,
                last_ack_sent: None,
                flush_targets: BTreeSet::new(),
            },
            p2s: VecDeque::new(),
            s2p: VecDeque::new(),
            primary_model: ModelCache::new(),
            secondary_model: ModelCache::new(),
            steps: 0,
            stats: Stats::default(),
            in_replay: false,
        }
    }

    fn last_seq(&self) -> u64 {
        self.history.len() as u64
    }

    // ---- primary ----

    fn client_write(&mut self, vol: u8, offset: u16, len: u16, kind: Kind, fua: bool) {
        let len = u32::from(len);
        let offset = u64::from(offset) % (VOL_SIZE as u64 - u64::from(len) + 1);
        let (seq, deps) = self.p.seqr.begin(u32::from(vol), offset, u64::from(len));
        assert_eq!(seq, self.last_seq() + 1, "sequencer must hand out consecutive seqs");
        let rec = match kind {
            Kind::Write => Record::with_payload(
                RecordOp::Write,
                seq,
                u32::from(vol),
                offset,
                GENERATION,
                payload_for(seq, len as usize),
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
            assert!(q < seq && self.p.seqr.is_in_flight(q));
            let other = &self.history[(q - 1) as usize];
            assert!(other.volume == rec.volume && other.offset < rec.end() && rec.offset < other.end());
        }
        self.history.push(rec.clone());
        self.p.journal.insert(seq, rec);
        self.p.shipper.on_appended(seq);
        if !deps.is_empty() {
            self.stats.primary_waits += 1;
        }
        self.p.in_flight.push((seq, deps));
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
        let (seq, _) = self.p.in_flight.swap_remove(i);
        apply_to(&mut self.p.image, &self.history[(seq - 1) as usize]);
        self.p.seqr.finish(seq);
        self.p.done.insert(seq);
        if !self.p.done.extras.is_empty() {
            self.stats.primary_out_of_order += 1;
        }
    }

    fn ship(&mut self, n: u8) {
        for _ in 0..n {
            let Some(seq) = self.p.shipper.next_to_send() else { break };
            let rec = self
                .p
                .journal
                .get(&seq)
                .unwrap_or_else(|| panic!("record {seq} to ship was already freed from the journal"));
            push_frame(&mut self.p2s, Body::Record(rec.to_pb(GROUP)));
        }
    }

    fn primary_flush(&mut self) {
        let seq = self.p.shipper.sent_through();
        push_frame(&mut self.p2s, Body::Flush(pb::FlushRequest { seq }));
        if seq > self.p.shipper.durable() {
            self.p.flush_waiting.push(seq);
        }
    }

    fn deliver_to_primary(&mut self, n: usize) {
        let n = n.min(self.s2p.len());
        let bytes: Vec<u8> = self.s2p.drain(..n).collect();
        self.p.acks_in.extend_from_slice(&bytes);
        while let Some(env) = self.p.acks_in.decode().expect("acks decode") {
            let Some(Body::Ack(ack)) = env.body else { panic!("unexpected message to primary: {env:?}") };
            let upd = self.p.shipper.on_ack(&ack).unwrap_or_else(|e| panic!("ack rejected: {e} ({ack:?})"));
            // A durable ack is backed by the secondary's durable snapshot.
            assert!(
                self.s.snapshot.applied.prefix >= ack.durable_seq,
                "durable_seq {} acked but the durable snapshot only holds writes through {}",
                ack.durable_seq,
                self.s.snapshot.applied.prefix
            );
            assert!(ack.checkpoint_seq >= self.p.checkpoint_seen, "checkpoint went backwards");
            self.p.checkpoint_seen = ack.checkpoint_seq;
            if let Some(d) = upd.newly_durable_through {
                self.p.flush_waiting.retain(|&f| f > d);
            }
            if let Some(c) = upd.newly_checkpointed_through {
                // Free journal space, only up to the checkpoint.
                self.p.journal = self.p.journal.split_off(&(c + 1));
            }
        }
    }

    fn reconnect(&mut self) {
        self.p2s.clear();
        self.s2p.clear();
        self.p.acks_in = FrameDecoder::new();
        self.s.frames_in = FrameDecoder::new();
        self.s.last_ack_sent = None;
        self.p.flush_waiting.clear();
        // OpenGroupReply carries the secondary's durable seq.
        let peer_durable = self.s.applier.durable();
        self.p.shipper = Shipper::try_new(peer_durable, self.last_seq()).expect("peer is not ahead");
    }

    // ---- secondary ----

    fn send_ack(&mut self) {
        let ack = self.s.applier.ack();
        if self.s.last_ack_sent != Some(ack) {
            push_frame(&mut self.s2p, Body::Ack(ack));
            self.s.last_ack_sent = Some(ack);
        }
    }

    fn deliver_to_secondary(&mut self, n: usize) {
        let n = n.min(self.p2s.len());
        let bytes: Vec<u8> = self.p2s.drain(..n).collect();
        self.s.frames_in.extend_from_slice(&bytes);
        while let Some(env) = self.s.frames_in.decode().expect("frames decode") {
            match env.body {
                Some(Body::Record(msg)) => {
                    let (group, rec) = Record::from_pb(msg).expect("valid record");
                    assert_eq!(group, GROUP);
                    assert_eq!(rec, self.history[(rec.seq - 1) as usize], "record changed in transit");
                    let (id, deps) = self.s.applier.on_record(&rec).unwrap_or_else(|e| panic!("record refused: {e}"));
                    for d in &deps {
                        assert!(self.s.pending_ids.contains(d), "dependency on an unknown or applied record");
                    }
                    if rec.fua {
                        self.s.flush_targets.insert(rec.seq);
                    }
                    if !deps.is_empty() {
                        self.stats.secondary_waits += 1;
                    }
                    self.s.pending_ids.insert(id);
                    self.s.pending.push((id, rec, deps));
                }
                Some(Body::Flush(f)) => {
                    self.s.flush_targets.insert(f.seq);
                    self.s.applier.on_flush_request(f.seq);
                }
                other => panic!("unexpected message to secondary: {other:?}"),
            }
        }
        if self.s.frames_in.buffered_len() > 0 {
            // A frame is only partly here.
            self.stats.frames_split += 1;
        }
        self.send_ack();
    }

    fn secondary_ready(&self) -> Vec<usize> {
        (0..self.s.pending.len())
            .filter(|&i| self.s.pending[i].2.iter().all(|d| !self.s.pending_ids.contains(d)))
            .collect()
    }

    fn secondary_apply(&mut self, pick: usize) {
        if self.s.pending.is_empty() {
            return;
        }
        let ready = self.secondary_ready();
        assert!(!ready.is_empty(), "the oldest received record is always ready");
        let i = ready[pick % ready.len()];
        let (id, rec, _) = self.s.pending.swap_remove(i);
        // Every earlier overlapping record is already applied.
        for (_, other, _) in &self.s.pending {
            let overlaps = other.volume == rec.volume && other.offset < rec.end() && rec.offset < other.end();
            assert!(!(overlaps && other.seq < rec.seq), "record {} applied before overlapping {}", rec.seq, other.seq);
        }
        self.s.pending_ids.remove(&id);
        apply_to(&mut self.s.image, &rec);
        self.s.applied.insert(rec.seq);
        if !self.s.applied.extras.is_empty() {
            self.stats.secondary_out_of_order += 1;
        }
        self.s.applier.on_applied(id);
        self.send_ack();
    }

    fn secondary_flush(&mut self, only_if_needed: bool) {
        if self.s.applier.needs_flush() {
            self.stats.flushes_due += 1;
        } else if only_if_needed {
            return;
        }
        let (seq, copy) = self.s.applier.durable_barrier();
        // The fsync makes the current image durable.
        self.s.snapshot = Snapshot { image: self.s.image.clone(), applied: self.s.applied.clone() };
        self.s.applier.on_durable(seq, copy);
        assert!(!self.s.applier.needs_flush(), "a flush satisfies every applied FUA record and flush request");
        self.send_ack();
    }

    fn secondary_checkpoint(&mut self) {
        self.s.checkpoint = self.s.applier.durable();
        self.s.applier.on_checkpoint(self.s.checkpoint);
        self.send_ack();
    }

    fn drop_pending(&mut self) {
        self.s.pending.clear();
        self.s.pending_ids.clear();
        self.s.flush_targets.clear();
    }

    fn link_drop(&mut self, drain: bool) {
        if drain {
            while !self.s.pending.is_empty() {
                self.secondary_apply(0);
            }
            self.secondary_flush(false);
        } else {
            // Applied writes above durable_seq stay in the image and will be
            // applied again.
            self.s.replay_until = self.s.replay_until.max(self.s.applied.max());
        }
        self.drop_pending();
        self.s.applier = Applier::with_checkpoint(self.s.applier.durable(), self.s.checkpoint);
        self.reconnect();
    }

    fn secondary_crash(&mut self) {
        self.drop_pending();
        self.s.image = self.s.snapshot.image.clone();
        self.s.applied = self.s.snapshot.applied.clone();
        self.s.replay_until = self.s.applied.max();
        self.stats.crashes += 1;
        // Restart from the persisted checkpoint.
        self.s.applier = Applier::with_checkpoint(self.s.checkpoint, self.s.checkpoint);
        self.reconnect();
    }

    // ---- driver ----

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Write { vol, offset, len, kind, fua } => self.client_write(vol, offset, len, kind, fua),
            Op::PrimaryComplete(i) => self.primary_complete(i),
            Op::Ship(n) => self.ship(n),
            Op::DeliverToSecondary(n) => self.deliver_to_secondary(usize::from(n)),
            Op::SecondaryApply(i) => self.secondary_apply(i),
            Op::SecondaryFlush { only_if_needed } => self.secondary_flush(only_if_needed),
            Op::SecondaryCheckpoint => self.secondary_checkpoint(),
            Op::DeliverToPrimary(n) => self.deliver_to_primary(usize::from(n)),
            Op::PrimaryFlush => self.primary_flush(),
            Op::LinkDrop { drain } => self.link_drop(drain),
            Op::SecondaryCrash => self.secondary_crash(),
        }
        self.steps += 1;
        self.check();
    }

    fn check(&mut self) {
        let step = self.steps;
        // Primary: image after exactly the completed writes.
        let want = self.primary_model.image(&self.history, &self.p.done);
        assert!(self.p.image == want, "step {step}: primary image is not the image after its completed writes");

        // Secondary counters.
        let a = self.s.applier.ack();
        assert!(
            a.received_seq >= a.applied_seq && a.applied_seq >= a.durable_seq && a.durable_seq >= a.checkpoint_seq,
            "step {step}: inconsistent ack {a:?}"
        );
        assert!(a.checkpoint_seq == self.s.checkpoint);

        // FUA records and flush requests: a flush is due exactly when one of
        // them is applied but not durable.
        let due = self.s.flush_targets.iter().any(|&t| a.durable_seq < t && t <= a.applied_seq);
        assert_eq!(
            self.s.applier.needs_flush(),
            due,
            "step {step}: needs_flush wrong, targets {:?}, ack {a:?}",
            self.s.flush_targets
        );

        // Write-order fidelity.
        let replaying = self.s.applier.applied() < self.s.replay_until;
        if self.in_replay && !replaying {
            self.stats.replays_finished += 1;
        }
        self.in_replay = replaying;
        if !replaying {
            assert!(
                self.s.applied.prefix >= self.s.applier.applied(),
                "step {step}: applied_seq {} but the image misses a write at or below it (has through {})",
                self.s.applier.applied(),
                self.s.applied.prefix
            );
            let want = self.secondary_model.image(&self.history, &self.s.applied);
            assert!(
                self.s.image == want,
                "step {step}: secondary image is not the primary's image after writes {:?}",
                self.s.applied
            );
        }

        // The journal holds every record the secondary might still need.
        let last = self.last_seq();
        if last > self.s.checkpoint {
            let first = *self.p.journal.keys().next().unwrap_or(&u64::MAX);
            assert!(
                first <= self.s.checkpoint + 1 && self.p.journal.keys().next_back() == Some(&last),
                "step {step}: journal [{first}..] no longer covers the secondary's checkpoint {}",
                self.s.checkpoint
            );
        }
        assert!(self.p.shipper.durable() <= self.s.applier.durable().max(self.s.snapshot.applied.prefix));
    }

    /// Runs everything to completion and checks both sides converge.
    fn drain(&mut self) {
        for round in 0.. {
            assert!(round < 10_000, "simulation did not converge");
            while !self.p.in_flight.is_empty() {
                self.primary_complete(0);
            }
            self.ship(u8::MAX);
            self.deliver_to_secondary(usize::MAX);
            while !self.s.pending.is_empty() {
                self.secondary_apply(0);
            }
            self.secondary_flush(false);
            self.secondary_checkpoint();
            self.deliver_to_primary(usize::MAX);
            self.steps += 1;
            self.check();
            if self.p.shipper.checkpoint() == self.last_seq()
                && self.p.shipper.sent_through() == self.last_seq()
                && self.p2s.is_empty()
                && self.s2p.is_empty()
            {
                break;
            }
        }
        assert_eq!(self.s.applier.applied(), self.last_seq());
        assert_eq!(self.p.shipper.lag_records(), 0);
        assert!(self.p.flush_waiting.is_empty(), "a flush was never acknowledged");
        assert!(self.p.journal.is_empty(), "journal space not freed after everything was acked");
        assert!(self.s.image == self.p.image, "images differ after draining");
        let all = SeqSet { prefix: self.last_seq(), extras: BTreeSet::new() };
        assert!(self.p.image == ModelCache::new().image(&self.history, &all));
    }
}

fn run(ops: &[Op]) -> Stats {
    let mut sim = Sim::new();
    for op in ops {
        sim.step(op);
    }
    sim.drain();
    sim.stats
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn random_interaction(ops in proptest::collection::vec(arb_op(), 1..250)) {
        let _ = run(&ops);
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

fn seeded_op(rng: &mut Rng) -> Op {
    let kinds = [Kind::Write, Kind::Write, Kind::Write, Kind::Zeroes, Kind::Trim];
    match rng.below(40) {
        0..=7 => Op::Write {
            vol: rng.below(VOLUMES as u64) as u8,
            offset: rng.next() as u16,
            len: 1 + rng.below(1024) as u16,
            kind: kinds[rng.below(kinds.len() as u64) as usize],
            fua: rng.below(7) == 0,
        },
        8..=11 => Op::PrimaryComplete(rng.next() as usize),
        12..=15 => Op::Ship(1 + rng.below(5) as u8),
        16..=20 => Op::DeliverToSecondary(1 + rng.below(3000) as u16),
        21..=27 => Op::SecondaryApply(rng.next() as usize),
        28..=30 => Op::SecondaryFlush { only_if_needed: rng.below(2) == 0 },
        31 => Op::SecondaryCheckpoint,
        32..=35 => Op::DeliverToPrimary(1 + rng.below(200) as u16),
        36 => Op::PrimaryFlush,
        37 | 38 => Op::LinkDrop { drain: rng.below(2) == 0 },
        _ => Op::SecondaryCrash,
    }
}

/// Long deterministic scenarios (VOPR-style): same seed, same run. Also
/// asserts that the runs reach the interesting paths, so that a change that
/// makes the simulation trivial does not go unnoticed.
#[test]
fn seeded_long_runs() {
    let mut total = Stats::default();
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let ops: Vec<Op> = (0..2500).map(|_| seeded_op(&mut rng)).collect();
        total += run(&ops);
    }
    println!("{total:?}");
    assert!(total.primary_out_of_order > 0 && total.primary_waits > 0, "{total:?}");
    assert!(total.secondary_out_of_order > 0 && total.secondary_waits > 0, "{total:?}");
    assert!(total.crashes > 0 && total.replays_finished > 0, "{total:?}");
    assert!(total.flushes_due > 0 && total.frames_split > 0, "{total:?}");
}
