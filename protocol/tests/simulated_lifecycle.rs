//! Seeded simulation of the pair lifecycle: two nodes, random admin
//! commands (failover with and without --force, switchover, split with and
//! without --rw, resync, --swap, failback, --discard-local), writes, link
//! changes and restarts, in random order. Every replication session is
//! judged by the production decisions (`lifecycle::judge_open`,
//! `lifecycle::on_refusal`, `divergence::wrote_beyond`); the commands'
//! effects mirror `replicator/src/group/{takeover,lifecycle}.rs`.
//!
//! Checked after every step:
//! - never two primaries accepting writes in one generation (unless an
//!   admin forced a promotion), and never a primary accepting writes after
//!   it heard of a newer generation (fencing);
//! - never a resync in the wrong direction: a session only starts when the
//!   secondary's volumes hold nothing the primary lacks, except writes the
//!   secondary itself agreed to lose (failback, `--discard-local`, giving up
//!   for a swap, writes while split with `--rw`), and then only as a
//!   rebasing resync that copies them over;
//! - never a lost acknowledged sync write: every write a sync primary
//!   acknowledged while its secondary was connected is on both nodes, and
//!   stays there.

use std::collections::BTreeSet;

use replicator_protocol::divergence::{wrote_beyond, FormerPrimary, TakeoverPoint};
use replicator_protocol::lifecycle::{judge_open, on_refusal, Answer, Opening, Standing, Verdict};
use replicator_protocol::pair::Role;
use replicator_protocol::pb;

/// splitmix64: small, seedable, good enough for choosing events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Default)]
struct Node {
    st: Standing,
    /// Writes on its volumes (ids), and in its journal order.
    data: BTreeSet<u64>,
    /// Its newest write as primary (the journal's last sequence).
    last: u64,
    /// As secondary: the newest write received from its primary.
    received: u64,
    /// Promoted: what its image held of the old generation.
    takeover: Option<u64>,
    /// Fenced: the takeover point of the peer that superseded it.
    superseded_at: Option<u64>,
    /// Primary: the next session rebases the peer (RESYNC, `rebased`).
    rebased: bool,
    admin_resync: bool,
    swap: bool,
    /// Writes it agreed to lose.
    discardable: BTreeSet<u64>,
    /// Its volumes hold an image its primary wrote (false from giving up
    /// the primary role until the resync that follows).
    inconsistent: bool,
    /// The newest generation it heard of from its peer.
    seen: u64,
    /// Promoted by `failover --force` of an inconsistent image, or while
    /// the primary was connected: the admin overrode the safety checks.
    forced: bool,
    /// The daemon runs.
    up: bool,
}

impl Node {
    fn accepts_writes(&self) -> bool {
        self.up && self.st.role == Role::Primary && self.st.superseded_by == 0
    }
    fn former(&self) -> FormerPrimary {
        FormerPrimary { last_seq: self.last, epoch: 0, bitmap_bytes: 0, acked_all_on_peer: false }
    }
}

struct Sim {
    rng: Rng,
    nodes: [Node; 2],
    /// A replication session is up from `nodes[primary]` to the other.
    session: Option<usize>,
    link_up: bool,
    sync: bool,
    next_write: u64,
    /// Sync writes acknowledged while the secondary was connected.
    committed: BTreeSet<u64>,
    stats: Stats,
    /// The events so far (printed when a check fails).
    trace: Vec<String>,
}

#[derive(Debug, Default)]
struct Stats {
    sessions: u64,
    rebases: u64,
    fences: u64,
    split_brains: u64,
    failovers: u64,
    failbacks: u64,
    discards: u64,
    swaps: u64,
    switchovers: u64,
    splits: u64,
}

impl Sim {
    fn new(seed: u64, sync: bool) -> Self {
        let primary = Node {
            st: Standing { role: Role::Primary, pair_id: 7, generation: 1, ..Standing::default() },
            up: true,
            ..Node::default()
        };
        let secondary = Node {
            st: Standing { role: Role::Secondary, pair_id: 7, generation: 1, ..Standing::default() },
            up: true,
            ..Node::default()
        };
        Sim {
            rng: Rng(seed),
            nodes: [primary, secondary],
            session: Some(0),
            link_up: true,
            sync,
            next_write: 1,
            committed: BTreeSet::new(),
            stats: Stats::default(),
            trace: Vec::new(),
        }
    }

    fn end_session(&mut self) {
        self.session = None;
    }

    fn step(&mut self) {
        let n = self.rng.below(2) as usize;
        let flag = self.rng.below(4) == 0;
        let event = self.rng.below(18);

        match event {
            0..=4 => self.write(n),
            5 => self.ship(),
            6 => {
                self.link_up = !self.link_up;
                if !self.link_up {
                    self.end_session();
                }
            }
            7 => self.restart(n),
            8 | 9 => self.connect(n),
            10 => self.failover(n, flag),
            11 => self.switchover(n),
            12 => self.split(n, flag),
            13 => self.resync(n),
            14 => self.swap(n),
            15 => self.failback(n),
            16 => self.discard_local(n),
            _ => self.connect(n),
        }
        let summary = |x: &Node| {
            format!(
                "{:?} g{} sup{} split{} rw{} sb{} rebase{} up{} swap{}",
                x.st.role,
                x.st.generation,
                x.st.superseded_by,
                u8::from(x.st.split),
                u8::from(x.st.split_writable),
                u8::from(x.st.split_brain),
                u8::from(x.st.needs_rebase),
                u8::from(x.up),
                u8::from(x.swap)
            )
        };
        self.trace.push(format!(
            "event {event:2} on {n} ({flag:5}) -> [{}] [{}] session {:?} link {}",
            summary(&self.nodes[0]),
            summary(&self.nodes[1]),
            self.session,
            self.link_up
        ));
        self.check();
    }

    fn write(&mut self, n: usize) {
        let w = self.next_write;
        let node = &self.nodes[n];
        if node.accepts_writes() {
            self.next_write += 1;
            self.nodes[n].data.insert(w);
            self.nodes[n].last = w;
            if self.session == Some(n) && self.sync {
                self.nodes[1 - n].data.insert(w);
                self.nodes[1 - n].received = w;
                self.committed.insert(w);
            }
        } else if node.up && node.st.role == Role::Secondary && node.st.split_writable {
            self.next_write += 1;
            let node = &mut self.nodes[n];
            node.data.insert(w);
            node.discardable.insert(w);
            node.st.needs_rebase = true;
        }
    }

    /// Async: the secondary receives everything the primary has.
    fn ship(&mut self) {
        if let Some(p) = self.session {
            let data = self.nodes[p].data.clone();
            self.nodes[1 - p].received = data.iter().next_back().copied().unwrap_or(0);
            self.nodes[1 - p].data.extend(data);
        }
    }

    fn restart(&mut self, n: usize) {
        if self.session.is_some() {
            self.end_session();
        }
        let node = &mut self.nodes[n];
        node.up = !node.up;
        node.st.switching = false;
    }

    /// `nodes[p]`, a primary, opens a session to its peer.
    fn connect(&mut self, p: usize) {
        let s = 1 - p;
        if self.session.is_some() || !self.link_up || !self.nodes[p].up || !self.nodes[s].up {
            return;
        }
        if self.nodes[p].st.role != Role::Primary || self.nodes[p].st.split {
            return;
        }
        for _ in 0..3 {
            let (pn, sn) = (&self.nodes[p], &self.nodes[s]);
            let opening = Opening {
                pair_id: 7,
                generation: pn.st.generation,
                intent: if pn.rebased { pb::OpenIntent::Resync } else { pb::OpenIntent::Resume },
                admin_resync: pn.admin_resync,
                swap: pn.swap,
                rebased: pn.rebased,
            };
            let beyond = wrote_beyond(sn.former(), sn.superseded_at.map(|seq| TakeoverPoint { seq, epoch: 0 }));
            let takeover = pn.takeover;
            let verdict = judge_open(&sn.st, &opening, beyond);
            self.nodes[s].seen = self.nodes[s].seen.max(opening.generation);
            match verdict {
                Verdict::Fence => {
                    let sn = &mut self.nodes[s];
                    let point = (opening.generation == sn.st.generation + 1).then_some(takeover).flatten();
                    sn.st.superseded_by = opening.generation;
                    sn.superseded_at = point;
                    self.stats.fences += 1;
                }
                Verdict::GiveUpForSwap => {
                    let generation = opening.generation;
                    self.give_up(s, generation);
                    self.stats.swaps += 1;
                }
                Verdict::HandingOver => return,
                Verdict::Refuse(kind) => {
                    if kind == pb::Refusal::SplitBrain && !self.nodes[s].st.split_brain {
                        self.nodes[s].st.split_brain = true;
                        self.stats.split_brains += 1;
                    }
                    if kind == pb::Refusal::AlsoPrimary {
                        self.nodes[s].st.split_brain = true;
                    }
                    let peer_generation = self.nodes[s].st.generation;
                    let pn = &mut self.nodes[p];
                    pn.seen = pn.seen.max(peer_generation);
                    match on_refusal(&pn.st, kind, peer_generation) {
                        Answer::Fence => {
                            pn.st.superseded_by = peer_generation;
                            self.stats.fences += 1;
                        }
                        Answer::SplitBrain => pn.st.split_brain = true,
                        Answer::Split => pn.st.split = true,
                        Answer::Rebase { take_over } => {
                            if take_over {
                                pn.st.generation = pn.st.generation.max(peer_generation) + 1;
                                pn.st.superseded_by = 0;
                                pn.superseded_at = None;
                            }
                            pn.st.split_brain = false;
                            pn.rebased = true;
                            self.stats.rebases += 1;
                            continue;
                        }
                        Answer::Retry => {}
                    }
                    return;
                }
                Verdict::Proceed => {
                    self.accept(p, opening.intent == pb::OpenIntent::Resync);
                    return;
                }
            }
        }
    }

    /// The secondary accepts: the resync (or resume) brings it to the
    /// primary's image.
    fn accept(&mut self, p: usize, resync: bool) {
        let s = 1 - p;
        let (pdata, sdata) = (&self.nodes[p].data, &self.nodes[s].data);
        let extra: BTreeSet<u64> = sdata.difference(pdata).copied().collect();
        if resync {
            assert!(
                extra.is_subset(&self.nodes[s].discardable),
                "a resync overwrites writes {:?} the secondary never agreed to lose",
                extra.difference(&self.nodes[s].discardable).collect::<Vec<_>>()
            );
        } else {
            assert!(extra.is_empty(), "a resume leaves writes {extra:?} on the secondary that the primary lacks");
        }
        let generation = self.nodes[p].st.generation;
        let pdata = self.nodes[p].data.clone();
        let sn = &mut self.nodes[s];
        sn.received = pdata.iter().next_back().copied().unwrap_or(0);
        sn.data = pdata;
        sn.discardable.clear();
        sn.inconsistent = false;
        sn.forced = false;
        sn.st.needs_rebase = false;
        sn.st.split = false;
        sn.st.split_writable = false;
        sn.st.split_brain = false;
        sn.st.generation = sn.st.generation.max(generation);
        let pn = &mut self.nodes[p];
        pn.rebased = false;
        pn.admin_resync = false;
        pn.swap = false;
        pn.st.split_brain = false;
        self.session = Some(p);
        self.stats.sessions += 1;
    }

    /// A secondary takes over (failover, swap, switchover).
    fn promote(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.st.role = Role::Primary;
        node.st.generation += 1;
        node.takeover = Some(node.received);
        node.last = node.received;
        node.st.split = false;
        node.st.split_writable = false;
        node.st.needs_rebase = false;
        node.discardable.clear();
        node.forced = false;
    }

    /// A primary becomes the secondary, discarding what its peer lacks
    /// (`give_up_primary`).
    fn give_up(&mut self, n: usize, generation: u64) {
        let node = &mut self.nodes[n];
        node.st.role = Role::Secondary;
        node.st.generation = generation;
        node.st.superseded_by = 0;
        node.st.split = false;
        node.st.split_brain = false;
        node.st.needs_rebase = true;
        node.superseded_at = None;
        node.takeover = None;
        node.rebased = false;
        node.admin_resync = false;
        node.swap = false;
        node.discardable = node.data.clone();
        node.inconsistent = true;
        node.forced = false;
    }

    fn failover(&mut self, n: usize, force: bool) {
        let node = &self.nodes[n];
        if !node.up || node.st.role != Role::Secondary || (node.inconsistent || self.session.is_some()) && !force {
            return;
        }
        let forced = node.inconsistent || self.session.is_some();
        self.end_session();
        self.promote(n);
        self.nodes[n].forced = forced;
        self.stats.failovers += 1;
    }

    fn switchover(&mut self, n: usize) {
        // Zero loss: only with the session up and everything shipped.
        if self.session != Some(n) || self.nodes[n].st.superseded_by > 0 {
            return;
        }
        self.ship();
        let s = 1 - n;
        self.end_session();
        self.promote(s);
        let generation = self.nodes[s].st.generation;
        let node = &mut self.nodes[n];
        node.st.role = Role::Secondary;
        node.st.generation = generation;
        node.takeover = None;
        self.session = Some(s);
        self.stats.switchovers += 1;
    }

    fn split(&mut self, n: usize, rw: bool) {
        if !self.nodes[n].up || self.nodes[n].st.role == Role::None {
            return;
        }
        let secondary = if self.nodes[n].st.role == Role::Secondary { n } else { 1 - n };
        if self.session.is_some() {
            self.end_session();
            for node in &mut self.nodes {
                node.st.split = true;
            }
            self.nodes[secondary].st.split_writable = rw;
        } else if self.nodes[n].st.role == Role::Secondary || !rw {
            if self.nodes[n].st.role == Role::Primary && self.nodes[n].st.superseded_by > 0 {
                return;
            }
            self.nodes[n].st.split = true;
            self.nodes[n].st.split_writable = rw && n == secondary;
        }
        self.stats.splits += 1;
    }

    fn resync(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if node.up && node.st.role == Role::Primary && node.st.superseded_by == 0 && !node.st.split_brain {
            node.st.split = false;
            node.admin_resync = true;
        }
    }

    fn swap(&mut self, n: usize) {
        let node = &self.nodes[n];
        if !node.up || node.st.role != Role::Secondary || !node.st.split || self.session.is_some() || node.inconsistent
        {
            return;
        }
        self.promote(n);
        let node = &mut self.nodes[n];
        node.swap = true;
        node.admin_resync = true;
    }

    fn failback(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.up && node.st.role == Role::Primary && node.st.superseded_by > 0 {
            let generation = node.st.superseded_by.max(node.st.generation);
            self.give_up(n, generation);
            self.stats.failbacks += 1;
        }
    }

    fn discard_local(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.up && node.st.role == Role::Primary && (node.st.superseded_by > 0 || node.st.split_brain) {
            let generation = node.st.superseded_by.max(node.st.generation);
            self.give_up(n, generation);
            self.stats.discards += 1;
        }
    }

    fn check(&self) {
        let [a, b] = &self.nodes;
        // Unless an admin forced a promotion (of an inconsistent image, or
        // while the primary was connected), which the generations cannot
        // order: the two then meet as SPLIT-BRAIN.
        assert!(
            a.forced
                || b.forced
                || !(a.st.role == Role::Primary
                    && b.st.role == Role::Primary
                    && a.st.superseded_by == 0
                    && b.st.superseded_by == 0
                    && a.st.generation == b.st.generation),
            "two primaries accept writes in generation {}: {a:?} {b:?}",
            a.st.generation
        );
        for node in &self.nodes {
            assert!(
                !node.accepts_writes() || node.seen <= node.st.generation,
                "a primary that heard of generation {} still accepts writes: {node:?}",
                node.seen
            );
            let lost: Vec<_> = self.committed.difference(&node.data).collect();
            assert!(lost.is_empty(), "acknowledged sync writes {lost:?} are missing on {node:?}");
        }
    }
}

fn run(seed: u64, sync: bool, steps: usize) -> Stats {
    let mut sim = Sim::new(seed, sync);
    for _ in 0..steps {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.step()));
        if let Err(panic) = outcome {
            eprintln!("seed {seed}, sync {sync}: the events (0-4 write, 5 ship, 6 link, 7 restart, 8/9/17 connect, 10 failover, 11 switchover, 12 split, 13 resync, 14 swap, 15 failback, 16 discard-local):");
            for line in &sim.trace {
                eprintln!("  {line}");
            }
            std::panic::resume_unwind(panic);
        }
    }
    sim.stats
}

#[test]
fn seeded_lifecycle_runs() {
    let mut total = Stats::default();
    for seed in 0..400 {
        for sync in [true, false] {
            let s = run(seed, sync, 400);
            total.sessions += s.sessions;
            total.rebases += s.rebases;
            total.fences += s.fences;
            total.split_brains += s.split_brains;
            total.failovers += s.failovers;
            total.failbacks += s.failbacks;
            total.discards += s.discards;
            total.swaps += s.swaps;
            total.switchovers += s.switchovers;
            total.splits += s.splits;
        }
    }
    eprintln!("lifecycle simulation: {total:?}");
    // Every path was exercised, many times.
    for (what, n) in [
        ("sessions", total.sessions),
        ("rebases", total.rebases),
        ("fences", total.fences),
        ("split brains", total.split_brains),
        ("failovers", total.failovers),
        ("failbacks", total.failbacks),
        ("discards", total.discards),
        ("swaps", total.swaps),
        ("switchovers", total.switchovers),
        ("splits", total.splits),
    ] {
        assert!(n >= 50, "only {n} {what}");
    }
}
