//! Replication-specific figures: async lag over time near and above the
//! link's bandwidth, initial copy throughput, resync bytes against changed
//! bytes, catch-up from the journal after the secondary was away, daemon RSS
//! against groups and journal size, throughput of many groups against one
//! at the same total queue depth, drill copies.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::daemon::{in_sync, Env, GroupSpec, SitePair};
use crate::local::prefill;
use crate::nbd::NbdConn;
use crate::proxy::LinkSpec;
use crate::stats::{percentile, percentile_f64, DaemonCpu, RunOutcome};
use crate::workload::{Rng, Workload};
use replicator::control::Request;

const MIB: u64 = 1 << 20;
/// The daemon's dirty-bitmap granularity (DESIGN: 64 KiB by default).
pub const BITMAP_GRANULARITY: u64 = 64 << 10;

/// How big the figures are.
#[derive(Debug, Clone)]
pub struct FigureOpts {
    /// Small and short (`--quick`).
    pub quick: bool,
    /// RTT of the lag and limited-link copy runs.
    pub rtt: Duration,
    /// Link bandwidth of those runs, bytes/s.
    pub bandwidth: u64,
    /// The local disk's 1 MiB sequential write MB/s, when measured.
    pub disk_mbps: Option<f64>,
    /// Only these figures (`--figures`); all when `None`.
    pub only: Option<Vec<String>>,
}

impl FigureOpts {
    fn wants(&self, figure: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|f| f == figure))
    }
}

/// One sample of the lag time series.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LagSample {
    /// Seconds since the start of the run.
    pub t: f64,
    /// Load phase: 0 below the link, 1 above it, 2 draining.
    pub phase: u8,
    /// Records not applied on the secondary.
    pub records: u64,
    /// Bytes not applied.
    pub bytes: u64,
    /// Age of the oldest unapplied record.
    pub seconds: f64,
}

/// Statistics of one load phase.
#[derive(Debug, Clone, Serialize)]
pub struct LagPhase {
    /// Label.
    pub label: String,
    /// Offered load, MB/s.
    pub offered_mbps: f64,
    /// Load the writer achieved, MB/s.
    pub achieved_mbps: f64,
    /// Lag in seconds: p50, p99, max.
    pub lag_p50_ms: f64,
    /// p99 lag, ms.
    pub lag_p99_ms: f64,
    /// Max lag, ms.
    pub lag_max_ms: f64,
    /// Max lag in bytes.
    pub lag_max_bytes: u64,
    /// Max lag in records.
    pub lag_max_records: u64,
    /// Client write latency p50 / p99, µs (async: not the link's business).
    pub write_p50_us: f64,
    /// p99.
    pub write_p99_us: f64,
}

/// The async lag figure.
#[derive(Debug, Clone, Serialize)]
pub struct LagFigure {
    /// The link.
    pub link: String,
    /// Link bandwidth, MB/s.
    pub link_mbps: f64,
    /// Phases: below, above.
    pub phases: Vec<LagPhase>,
    /// Seconds to drain after the load stopped (None: not within the limit).
    pub drain_secs: Option<f64>,
    /// Time series.
    pub samples: Vec<LagSample>,
    /// UDP receive-buffer drops seen during the run.
    pub drops: Option<String>,
}

/// One initial-copy measurement.
#[derive(Debug, Clone, Serialize)]
pub struct CopyRun {
    /// Link description.
    pub link: String,
    /// Over loopback, no emulated link (the initial copy and resync target).
    pub loopback: bool,
    /// The secondary already held the same data: every chunk was compared
    /// by hash and none sent (what a resync of unchanged data costs).
    pub identical: bool,
    /// Bytes copied.
    pub bytes: u64,
    /// Seconds from `pair create` until the session is up and the copy
    /// starts: mostly both journals being written full (once per pair).
    pub setup_secs: f64,
    /// Seconds from then to PAIR: the copy.
    pub secs: f64,
    /// MB/s.
    pub mbps: f64,
    /// min(disk, link) MB/s, when known.
    pub bound_mbps: Option<f64>,
    /// What the bound is.
    pub bound: String,
    /// UDP receive-buffer drops seen during the copy.
    pub drops: Option<String>,
    /// Loopback: what the disk allows the same copy between the two sites'
    /// files (read one, write or read the other; see
    /// [`crate::local::copy_floor`]), MB/s.
    pub floor_mbps: Option<f64>,
}

/// One resync measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncRun {
    /// What happened.
    pub scenario: String,
    /// Bytes the client changed (exact).
    pub changed_bytes: u64,
    /// Changed bytes rounded up to the bitmap granularity.
    pub changed_rounded: u64,
    /// Bytes shipped from the journal (records pending when the link returned).
    pub journal_bytes: u64,
    /// Bytes the resync copied (bitmap regions).
    pub copy_bytes: u64,
    /// (journal + copy) / changed_rounded.
    pub ratio: f64,
    /// Extra facts (journal replay, states).
    pub note: String,
}

/// One RSS measurement.
#[derive(Debug, Clone, Serialize)]
pub struct RssRow {
    /// What was measured.
    pub label: String,
    /// Groups.
    pub groups: usize,
    /// Journal size per group.
    pub journal_bytes: u64,
    /// Bytes written while the secondary was away.
    pub backlog_bytes: u64,
    /// Primary VmRSS, KiB.
    pub primary_kib: u64,
    /// Secondary VmRSS, KiB (0 when it was stopped).
    pub secondary_kib: u64,
}

/// `drill start` on a sparse volume of one size.
#[derive(Debug, Clone, Serialize)]
pub struct DrillStartRun {
    /// Volume size, bytes.
    pub volume_bytes: u64,
    /// Time to ready as the daemon measured it (freeze, sync, snapshot
    /// files, export), ms.
    pub ready_ms: f64,
    /// The whole control request as the admin waits for it, ms.
    pub request_ms: f64,
}

/// Sync-mode write latency with and without a drill on the secondary.
#[derive(Debug, Clone, Serialize)]
pub struct DrillLatency {
    /// Rounds per case (alternating, medians reported).
    pub rounds: usize,
    /// 4 KiB random writes at QD1 per round.
    pub writes_per_round: usize,
    /// p50 / p99 without a drill, µs (median of the rounds).
    pub without_p50_us: f64,
    /// See above.
    pub without_p99_us: f64,
    /// p50 / p99 with a drill running, µs.
    pub with_p50_us: f64,
    /// See above.
    pub with_p99_us: f64,
    /// with / without, p50.
    pub ratio_p50: f64,
    /// Space the drill copy held at its last stop, bytes.
    pub space_used_bytes: u64,
}

/// Drill figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DrillFigure {
    /// Start time per volume size.
    pub start: Vec<DrillStartRun>,
    /// Sync latency during a drill.
    pub latency: Option<DrillLatency>,
}

/// One measurement of the many-groups figure.
#[derive(Debug, Clone, Serialize)]
pub struct GroupsRun {
    /// Groups written at once.
    pub groups: usize,
    /// Client connections, spread over the groups.
    pub connections: usize,
    /// Queue depth per connection.
    pub queue_depth_each: usize,
    /// Writes per second, all groups together.
    pub iops: f64,
    /// Median write latency, µs.
    pub p50_us: f64,
    /// Each daemon's CPU and context switches per write of the round
    /// (warm-up included), primary then secondary.
    pub daemons: Vec<DaemonCpu>,
}

/// Many groups against one, the same total queue depth, on one pair of
/// daemons (async, RTT 0): rounds alternate, means per case.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupsFigure {
    /// Every round, in the order run.
    pub runs: Vec<GroupsRun>,
    /// Mean IOPS of the many-groups rounds over that of the one-group
    /// rounds (one connection at the whole queue depth).
    pub ratio: f64,
    /// The same over one group written by as many QD1 connections as the
    /// many-groups rounds use: the client's shape alone.
    pub ratio_same_clients: f64,
    /// The most groups written at once.
    pub groups: usize,
    /// VmRSS after the last round, KiB: primary, secondary.
    pub primary_kib: u64,
    /// See `primary_kib`.
    pub secondary_kib: u64,
}

/// Every replication figure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// Async lag.
    pub lag: Option<LagFigure>,
    /// Initial copy.
    pub copy: Vec<CopyRun>,
    /// Resync.
    pub resync: Vec<ResyncRun>,
    /// RSS.
    pub rss: Vec<RssRow>,
    /// Drill copies.
    pub drill: Option<DrillFigure>,
    /// Many groups against one.
    pub groups: Option<GroupsFigure>,
    /// Catch-up from the journal.
    pub catch_up: Vec<CatchUpRun>,
    /// Figures that could not be measured: (figure, why).
    pub not_measurable: Vec<(String, String)>,
}

/// One catch-up run: a backlog journaled while the secondary was away,
/// shipped from the primary's journal once it is back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatchUpRun {
    /// What the client wrote while the secondary was away.
    pub backlog: String,
    /// Records in the backlog.
    pub records: u64,
    /// Journal bytes of the backlog.
    pub bytes: u64,
    /// Records per second the primary took while the secondary was away.
    pub written_per_s: f64,
    /// From starting the secondary until the session is up, seconds.
    pub reconnect_s: f64,
    /// From the session being up until nothing is left to apply, seconds.
    pub catch_up_s: f64,
}

fn mk_pair(env: &Env, name: &str, groups: &[GroupSpec], link: LinkSpec) -> Result<SitePair, String> {
    let dir = env.root.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    SitePair::configure(env, &dir, groups, link)
}

/// Runs every figure; a failing figure is recorded, the others still run.
pub fn run_all(env: &Env, o: &FigureOpts, log: &dyn Fn(&str)) -> Figures {
    let mut f = Figures::default();
    if o.wants("lag") {
        log("figure: async lag near and above the link bandwidth");
        match lag(env, o) {
            Ok(l) => f.lag = Some(l),
            Err(e) => f.not_measurable.push(("async lag".into(), format!("failed: {e}"))),
        }
    }
    if o.wants("copy") {
        log("figure: initial copy throughput");
        match copy(env, o) {
            Ok(c) => f.copy = c,
            Err(e) => f.not_measurable.push(("initial copy".into(), format!("failed: {e}"))),
        }
    }
    if o.wants("resync") {
        log("figure: resync bytes vs changed bytes");
        match resync(env, o) {
            Ok(r) => f.resync = r,
            Err(e) => f.not_measurable.push(("resync".into(), format!("failed: {e}"))),
        }
    }
    if o.wants("catchup") {
        log("figure: catch-up from the journal after the secondary was away");
        match catch_up(env, o) {
            Ok(c) => f.catch_up = c,
            Err(e) => f.not_measurable.push(("catch-up".into(), format!("failed: {e}"))),
        }
    }
    if o.wants("rss") {
        log("figure: daemon RSS vs groups and journal size");
        match rss(env, o) {
            Ok(r) => f.rss = r,
            Err(e) => f.not_measurable.push(("daemon RSS".into(), format!("failed: {e}"))),
        }
    }
    if o.wants("groups") {
        log("figure: many groups against one at the same total queue depth");
        match groups(env, o) {
            Ok(g) => f.groups = Some(g),
            Err(e) => f.not_measurable.push(("many groups".into(), format!("failed: {e}"))),
        }
    }
    if o.wants("drill") {
        log("figure: drill start time vs volume size, sync latency during a drill");
        match drill(env, o) {
            Ok(d) => f.drill = Some(d),
            Err(e) => f.not_measurable.push(("drill".into(), format!("failed: {e}"))),
        }
    }
    f
}

/// Drill copies: `drill start` time on sparse 1 GiB and 64 GiB volumes, and
/// sync-mode 4 KiB QD1 write latency with a drill running on the secondary
/// against without (rounds alternate; every write with a drill may be the
/// first to its copy-on-write chunk, the worst case).
pub fn drill(env: &Env, o: &FigureOpts) -> Result<DrillFigure, String> {
    let sizes: [u64; 2] = [1 << 30, 64 << 30];
    let mut groups: Vec<GroupSpec> =
        sizes.iter().map(|&size| GroupSpec::single(&format!("d{}", size >> 30), "sync", 16 * MIB, size)).collect();
    groups.push(GroupSpec::single("dl", "sync", 64 * MIB, 256 * MIB));
    let mut p = mk_pair(env, "fig-drill", &groups, LinkSpec::rtt(Duration::ZERO))?;
    p.start(env)?;
    let mut fig = DrillFigure::default();
    for &size in &sizes {
        let g = format!("d{}", size >> 30);
        p.pair(env, &g, true, Duration::from_secs(60))?;
        let t = Instant::now();
        env.call(&p.b.control(), Request::DrillStart { group: g.clone() })?;
        let request_ms = t.elapsed().as_secs_f64() * 1000.0;
        let ready_ms = p.b.status(env, &g)?.drill.map(|d| d.meta.ready_ms).ok_or("status shows no drill")?;
        env.call(&p.b.control(), Request::DrillStop { group: g, outcome: None, id: None })?;
        fig.start.push(DrillStartRun { volume_bytes: size, ready_ms, request_ms });
    }

    p.pair(env, "dl", true, Duration::from_secs(60))?;
    let mut conn = NbdConn::connect(&p.a.nbd(), "dl-vol").map_err(|e| e.to_string())?;
    let (rounds, writes) = if o.quick { (2, 500) } else { (3, 2000) };
    let blocks = conn.size() / 4096;
    let mut data = vec![0u8; 4096];
    let mut rng = Rng::new(91);
    rng.fill(&mut data);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut space_used_bytes = 0;
    for _ in 0..rounds {
        for drill_on in [false, true] {
            if drill_on {
                env.call(&p.b.control(), Request::DrillStart { group: "dl".into() })?;
            }
            let mut lat = Vec::with_capacity(writes);
            for _ in 0..writes {
                let t = Instant::now();
                conn.write_at(rng.below(blocks) * 4096, &data, false).map_err(|e| e.to_string())?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            lat.sort_unstable();
            let pair = (percentile(&lat, 0.5) as f64 / 1000.0, percentile(&lat, 0.99) as f64 / 1000.0);
            if drill_on {
                // Applies (and their copy-on-write) finish before the stop.
                p.a.wait_for(env, "dl", Duration::from_secs(60), "drained", in_sync)?;
                space_used_bytes = p.b.status(env, "dl")?.drill.map_or(0, |d| d.space_used_bytes);
                env.call(&p.b.control(), Request::DrillStop { group: "dl".into(), outcome: None, id: None })?;
                with.push(pair);
            } else {
                without.push(pair);
            }
        }
    }
    drop(conn);
    p.stop()?;
    let median = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let x: Vec<f64> = v.iter().map(pick).collect();
        percentile_f64(&x, 0.5)
    };
    let (wo50, wo99) = (median(&without, |x| x.0), median(&without, |x| x.1));
    let (w50, w99) = (median(&with, |x| x.0), median(&with, |x| x.1));
    fig.latency = Some(DrillLatency {
        rounds,
        writes_per_round: writes,
        without_p50_us: wo50,
        without_p99_us: wo99,
        with_p50_us: w50,
        with_p99_us: w99,
        ratio_p50: if wo50 > 0.0 { w50 / wo50 } else { 0.0 },
        space_used_bytes,
    });
    Ok(fig)
}

/// Paced writer: `rate` bytes/s in 64 KiB random writes until `stop`.
/// Returns (bytes written, latencies ns).
fn paced_writer(conn: &mut NbdConn, rate: f64, until: Instant, seed: u64) -> Result<(u64, Vec<u64>), String> {
    let bs = 64 << 10;
    let mut data = vec![0u8; bs];
    let mut rng = Rng::new(seed);
    rng.fill(&mut data);
    let interval = Duration::from_secs_f64(bs as f64 / rate);
    let blocks = conn.size() / bs as u64;
    let mut next = Instant::now();
    let mut written = 0u64;
    let mut lat = Vec::new();
    while Instant::now() < until && lat.len() < 1_000_000 {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_millis(100) {
            next = now; // fell behind: do not burst to catch up
        }
        let t = Instant::now();
        conn.write_at(rng.below(blocks) * bs as u64, &data, false).map_err(|e| e.to_string())?;
        lat.push(t.elapsed().as_nanos() as u64);
        written += bs as u64;
        next += interval;
    }
    Ok((written, lat))
}

/// Async lag over time: 70 % of the link's bandwidth, then 130 %, then drain.
pub fn lag(env: &Env, o: &FigureOpts) -> Result<LagFigure, String> {
    let link = LinkSpec { rtt: o.rtt, jitter: Duration::ZERO, bandwidth: Some(o.bandwidth), loss: 0.0 };
    let size = 256 * MIB;
    let g = GroupSpec::single("lag", "async", 1 << 30, size);
    let mut p = mk_pair(env, "fig-lag", &[g], link)?;
    prefill(&p.a.file("lag.img"), size, None)?;
    prefill(&p.b.file("lag.img"), size, None)?;
    p.start(env)?;
    p.pair(env, "lag", true, Duration::from_secs(60))?;
    let phase_len = if o.quick { Duration::from_secs(3) } else { Duration::from_secs(8) };
    let loads = [("below the link (70 %)", 0.7), ("above the link (130 %)", 1.3)];
    let start = Instant::now();
    let phase = Arc::new(Mutex::new(0u8));
    let done = Arc::new(AtomicBool::new(false));
    let sock = p.a.nbd();
    let bw = o.bandwidth as f64;
    let (phase_w, done_w) = (phase.clone(), done.clone());
    let writer = std::thread::spawn(move || -> Result<Vec<(f64, u64, Vec<u64>)>, String> {
        let mut conn = NbdConn::connect(&sock, "lag-vol").map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for (i, (_, frac)) in loads.iter().enumerate() {
            *phase_w.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = i as u8;
            let t = Instant::now();
            let r = paced_writer(&mut conn, bw * frac, t + phase_len, 77 + i as u64);
            let secs = t.elapsed().as_secs_f64();
            match r {
                Ok((bytes, lat)) => out.push((secs, bytes, lat)),
                Err(e) => {
                    done_w.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        *phase_w.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = 2;
        done_w.store(true, Ordering::Relaxed);
        conn.disconnect();
        Ok(out)
    });
    let mut samples = Vec::new();
    let mut drained_at = None;
    let limit = start + phase_len * 2 + Duration::from_secs(if o.quick { 20 } else { 60 });
    let mut load_end = None;
    while Instant::now() < limit {
        let s = p.a.status(env, "lag")?;
        let ph = *phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.push(LagSample {
            t: start.elapsed().as_secs_f64(),
            phase: ph,
            records: s.lag_records,
            bytes: s.lag_bytes,
            seconds: s.lag_seconds,
        });
        if done.load(Ordering::Relaxed) {
            let end = *load_end.get_or_insert_with(Instant::now);
            if s.lag_records == 0 {
                drained_at = Some(end.elapsed().as_secs_f64());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let phases_out = writer.join().map_err(|_| "lag writer panicked".to_string())??;
    let mut phases = Vec::new();
    for (i, ((label, frac), (secs, bytes, mut lat))) in loads.iter().zip(phases_out).enumerate() {
        lat.sort_unstable();
        let ss: Vec<&LagSample> = samples.iter().filter(|s| s.phase == i as u8).collect();
        let secs_v: Vec<f64> = ss.iter().map(|s| s.seconds).collect();
        phases.push(LagPhase {
            label: (*label).into(),
            offered_mbps: bw * frac / 1e6,
            achieved_mbps: bytes as f64 / secs.max(1e-9) / 1e6,
            lag_p50_ms: percentile_f64(&secs_v, 0.5) * 1e3,
            lag_p99_ms: percentile_f64(&secs_v, 0.99) * 1e3,
            lag_max_ms: secs_v.iter().copied().fold(0.0, f64::max) * 1e3,
            lag_max_bytes: ss.iter().map(|s| s.bytes).max().unwrap_or(0),
            lag_max_records: ss.iter().map(|s| s.records).max().unwrap_or(0),
            write_p50_us: percentile(&lat, 0.5) as f64 / 1e3,
            write_p99_us: percentile(&lat, 0.99) as f64 / 1e3,
        });
    }
    let drops = p.udp_drops();
    p.stop()?;
    Ok(LagFigure { link: link.describe(), link_mbps: bw / 1e6, phases, drain_secs: drained_at, samples, drops })
}

/// The long fat link of the copy figure: 100 ms, 4 Gbit/s.
const LONG_LINK_RTT: Duration = Duration::from_millis(100);
/// See [`LONG_LINK_RTT`].
const LONG_LINK_BYTES_PER_S: u64 = 4_000_000_000 / 8;

/// Initial copy: `pair create` with copy, timed until PAIR.
pub fn copy(env: &Env, o: &FigureOpts) -> Result<Vec<CopyRun>, String> {
    let mut runs = Vec::new();
    let size = if o.quick { 128 * MIB } else { 512 * MIB };
    // (link, size, the secondary already holds the same data: the copy
    // compares hashes and sends nothing)
    let mut cases = vec![(LinkSpec::rtt(Duration::ZERO), size, false), (LinkSpec::rtt(Duration::ZERO), size, true)];
    if !o.quick {
        cases.push((
            LinkSpec { rtt: o.rtt, jitter: Duration::ZERO, bandwidth: Some(o.bandwidth), loss: 0.0 },
            128 * MIB,
            false,
        ));
        // A long fat link (a continent, 4 Gbit/s): what a fixed window of
        // chunks in flight would cap (16 MiB per 100 ms round trip is
        // 168 MB/s, a third of the link).
        let long =
            LinkSpec { rtt: LONG_LINK_RTT, jitter: Duration::ZERO, bandwidth: Some(LONG_LINK_BYTES_PER_S), loss: 0.0 };
        cases.push((long, 1024 * MIB, false));
    }
    for (i, (link, size, identical)) in cases.into_iter().enumerate() {
        let g = GroupSpec::single("copy", "async", 256 * MIB, size);
        let mut p = mk_pair(env, &format!("fig-copy-{i}"), &[g], link)?;
        prefill(&p.a.file("copy.img"), size, Some(99))?;
        prefill(&p.b.file("copy.img"), size, identical.then_some(99))?;
        // The same copy straight between the files (into a scratch file when
        // the data would change), on the same disk, as the floor.
        let floor_mbps = if link.is_direct() {
            let scratch = p.b.file("floor.img");
            let target = if identical { p.b.file("copy.img") } else { scratch.clone() };
            if !identical {
                prefill(&scratch, size, None)?;
            }
            let floor = crate::local::copy_floor(&env.rt, &p.a.file("copy.img"), &target, identical);
            let _ = std::fs::remove_file(&scratch);
            Some(floor?)
        } else {
            None
        };
        p.start(env)?;
        let t = Instant::now();
        p.request_pair(env, "copy", false)?;
        // The session is up (status polled every 20 ms): the copy starts.
        let started = |s: &replicator::group::GroupStatus| s.connected && s.state != "SIMPLEX";
        p.a.wait_for(env, "copy", Duration::from_secs(120), "copying", started)?;
        let setup_secs = t.elapsed().as_secs_f64();
        p.wait_pair(env, "copy", Duration::from_secs(300))?;
        let secs = t.elapsed().as_secs_f64() - setup_secs;
        let s = p.a.status(env, "copy")?;
        let drops = p.udp_drops();
        p.stop()?;
        let bytes = s.copy_done_bytes.max(s.copy_total_bytes);
        let link_mbps = link.bandwidth.map(|b| b as f64 / 1e6);
        let (bound_mbps, bound) = match (o.disk_mbps, link_mbps) {
            (Some(d), Some(l)) if l < d => (Some(l), format!("link {l:.0} MB/s")),
            (Some(d), _) => (Some(d), format!("disk {d:.0} MB/s (1 MiB seq write, local)")),
            (None, Some(l)) => (Some(l), format!("link {l:.0} MB/s")),
            (None, None) => (None, "disk not measured in this run".into()),
        };
        runs.push(CopyRun {
            link: if identical { format!("{}, sites already identical", link.describe()) } else { link.describe() },
            loopback: link.is_direct(),
            identical,
            bytes,
            setup_secs,
            secs,
            mbps: bytes as f64 / secs / 1e6,
            bound_mbps,
            bound,
            drops,
            floor_mbps,
        });
    }
    Ok(runs)
}

/// Writes a pattern whose changed bytes are known: `n64` 64 KiB writes and
/// `n4` 4 KiB writes, each in a different 64 KiB region. Returns the changed
/// bytes (exact, rounded up to the bitmap granularity).
fn write_pattern(conn: &mut NbdConn, n64: usize, n4: usize, seed: u64) -> Result<(u64, u64), String> {
    let mut rng = Rng::new(seed);
    let regions = conn.size() / BITMAP_GRANULARITY;
    let mut used = BTreeSet::new();
    let mut ops = Vec::new();
    while ops.len() < n64 + n4 && (used.len() as u64) < regions {
        let r = rng.below(regions);
        if used.insert(r) {
            let len = if ops.len() < n64 { BITMAP_GRANULARITY } else { 4096 };
            // A 4 KiB write anywhere inside its region.
            let off = r * BITMAP_GRANULARITY + if len == 4096 { rng.below(16) * 4096 } else { 0 };
            ops.push((off, len));
        }
    }
    // Interleave the two sizes.
    for i in (1..ops.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        ops.swap(i, j);
    }
    let mut data = vec![0u8; BITMAP_GRANULARITY as usize];
    let (mut exact, mut rounded) = (0, 0);
    for (off, len) in ops {
        rng.fill(&mut data[..len as usize]);
        conn.write_at(off, &data[..len as usize], false).map_err(|e| e.to_string())?;
        exact += len;
        rounded += BITMAP_GRANULARITY;
    }
    conn.flush().map_err(|e| e.to_string())?;
    Ok((exact, rounded))
}

/// Resync after the journal filled while the secondary was away, after a
/// `kill -9` of the primary in that state, and after a `kill -9` in PAIR.
pub fn resync(env: &Env, o: &FigureOpts) -> Result<Vec<ResyncRun>, String> {
    let size = if o.quick { 128 * MIB } else { 512 * MIB };
    let mut g = GroupSpec::single("rs", "async", 16 * MIB, size);
    g.on_journal_full = "suspend";
    let mut p = mk_pair(env, "fig-resync", &[g], LinkSpec::rtt(Duration::ZERO))?;
    p.start(env)?;
    p.pair(env, "rs", true, Duration::from_secs(60))?;
    // Enough 64 KiB writes to fill the 16 MiB journal, the rest goes to the bitmap.
    let (n64, n4) = if o.quick { (256, 256) } else { (384, 1024) };
    let mut runs = Vec::new();
    let timeout = Duration::from_secs(if o.quick { 60 } else { 180 });

    // 1. Journal full while the secondary is away, then it comes back.
    p.b.stop()?;
    let mut conn = NbdConn::connect(&p.a.nbd(), "rs-vol").map_err(|e| e.to_string())?;
    let (exact, rounded) = write_pattern(&mut conn, n64, n4, 11)?;
    std::thread::sleep(Duration::from_millis(500)); // housekeeping persists the bitmap
    let before = p.a.status(env, "rs")?;
    let journal_bytes = before.journal_used_bytes;
    p.b.start(env)?;
    let after = p.a.wait_for(env, "rs", timeout, "resynced", in_sync)?;
    runs.push(ResyncRun {
        scenario: "journal full while the secondary was down, then it returns".into(),
        changed_bytes: exact,
        changed_rounded: rounded,
        journal_bytes,
        copy_bytes: after.copy_done_bytes,
        ratio: (journal_bytes + after.copy_done_bytes) as f64 / rounded as f64,
        note: format!(
            "state before return {}{}, bitmap {} MiB, journal {} MiB",
            before.state,
            before.reason.map(|r| format!("({r})")).unwrap_or_default(),
            before.dirty_bytes / MIB,
            journal_bytes / MIB
        ),
    });

    // 2. The same, but the primary is killed (-9) while tracking the bitmap.
    p.b.stop()?;
    let (exact, rounded) = write_pattern(&mut conn, n64, n4, 12)?;
    drop(conn);
    std::thread::sleep(Duration::from_millis(500));
    let before = p.a.status(env, "rs")?;
    p.a.kill9();
    p.a.start(env)?;
    let restarted = p.a.status(env, "rs")?;
    p.b.start(env)?;
    let after = p.a.wait_for(env, "rs", timeout, "resynced", in_sync)?;
    runs.push(ResyncRun {
        scenario: "kill -9 of the primary while the journal was full (bitmap mode)".into(),
        changed_bytes: exact,
        changed_rounded: rounded,
        journal_bytes: before.journal_used_bytes,
        copy_bytes: after.copy_done_bytes,
        ratio: (before.journal_used_bytes + after.copy_done_bytes) as f64 / rounded as f64,
        note: format!(
            "bitmap before the crash {} MiB, after restart {} MiB",
            before.dirty_bytes / MIB,
            restarted.dirty_bytes / MIB
        ),
    });

    // 3. kill -9 of the primary with a replication backlog that fits in the
    // journal (the secondary is away): no bitmap involved.
    p.b.stop()?;
    let mut conn = NbdConn::connect(&p.a.nbd(), "rs-vol").map_err(|e| e.to_string())?;
    let n = if o.quick { 800 } else { 1500 };
    let mut rng = Rng::new(13);
    let mut data = vec![0u8; 4096];
    let mut blocks = BTreeSet::new();
    for _ in 0..n {
        rng.fill(&mut data);
        let b = rng.below(size / 4096);
        blocks.insert(b);
        conn.write_at(b * 4096, &data, false).map_err(|e| e.to_string())?;
    }
    let before = p.a.status(env, "rs")?;
    p.a.kill9();
    drop(conn);
    let log_before = std::fs::read_to_string(&p.a.log).unwrap_or_default().len();
    p.a.start(env)?;
    p.b.start(env)?;
    let after = p.a.wait_for(env, "rs", timeout, "in sync", in_sync)?;
    let log = std::fs::read_to_string(&p.a.log).unwrap_or_default();
    let replayed = log
        .get(log_before..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("replayed the journal"))
        .find_map(|l| l.split("records=").nth(1).and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok()));
    let exact = blocks.len() as u64 * 4096;
    let rounded =
        blocks.iter().map(|b| b * 4096 / BITMAP_GRANULARITY).collect::<BTreeSet<_>>().len() as u64 * BITMAP_GRANULARITY;
    runs.push(ResyncRun {
        scenario: "kill -9 of the primary with a backlog in the journal (secondary away)".into(),
        changed_bytes: exact,
        changed_rounded: rounded,
        journal_bytes: before.lag_bytes,
        copy_bytes: after.copy_done_bytes,
        ratio: (before.lag_bytes + after.copy_done_bytes) as f64 / rounded as f64,
        note: format!(
            "state at the kill {}; the restart replayed {} journal records locally, then shipping resumed ({} records pending)",
            before.state,
            replayed.map_or("?".into(), |r| r.to_string()),
            before.lag_records
        ),
    });

    // 4. Failover and failback: the primary dies (in sync), site-b takes
    // over and takes writes, the old primary comes back and fails back as
    // its secondary: only the new primary's changes are copied (each chunk
    // compared by hash first).
    p.a.kill9();
    p.b.wait_for(env, "rs", timeout, "disconnected", |s| !s.connected)?;
    env.call(&p.b.control(), Request::Failover { group: "rs".into(), force: false })?;
    let mut conn = NbdConn::connect(&p.b.nbd(), "rs-vol").map_err(|e| e.to_string())?;
    let (exact, rounded) = write_pattern(&mut conn, n64, n4, 14)?;
    drop(conn);
    p.a.start(env)?;
    p.a.wait_for(env, "rs", timeout, "fenced", |s| s.superseded_by > 0)?;
    let t = Instant::now();
    env.call(&p.a.control(), Request::Failback { group: "rs".into() })?;
    let after = p.b.wait_for(env, "rs", timeout, "in sync with the failed-back secondary", in_sync)?;
    let secs = t.elapsed().as_secs_f64();
    runs.push(ResyncRun {
        scenario: "after a failover, failback of the old primary".into(),
        changed_bytes: exact,
        changed_rounded: rounded,
        journal_bytes: 0,
        copy_bytes: after.copy_sent_bytes,
        ratio: after.copy_sent_bytes as f64 / rounded as f64,
        note: format!(
            "{} MiB compared by hash, {} MiB of it sent as data, in {secs:.2} s from the failback request ({:.0} MB/s compared)",
            after.copy_done_bytes / MIB,
            after.copy_sent_bytes / MIB,
            after.copy_done_bytes as f64 / secs.max(1e-9) / 1e6
        ),
    });
    p.stop()?;
    Ok(runs)
}

/// Many groups: 32 async groups on one pair of daemons (8 with `--quick`),
/// each written at QD1 by its own connection, against one of them written
/// alone at QD32 (QD8): the same total queue depth. A third case writes
/// one group through as many QD1 connections as the many-groups case, to
/// tell the client's shape from the groups'. The cases alternate (two
/// rounds each), seconds apart on the same daemons; every volume is
/// prefilled on both sites and paired without a copy, with a journal no
/// round fills.
pub fn groups(env: &Env, o: &FigureOpts) -> Result<GroupsFigure, String> {
    let (n, alone, each) = if o.quick {
        (8, Workload::RandWrite4kQd8, Workload::RandWrite4kQd1)
    } else {
        (32, Workload::RandWrite4kQd32, Workload::RandWrite4kQd1)
    };
    let size = 64 * MIB;
    let (warmup, duration) = if o.quick {
        (Duration::from_millis(300), Duration::from_secs(1))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    // Group m0 takes the whole load alone: a journal its rounds do not
    // fill; the others take a 32nd each. (Journals are preallocated.)
    let specs: Vec<GroupSpec> = (0..n)
        .map(|i| GroupSpec::single(&format!("m{i}"), "async", if i == 0 { 512 * MIB } else { 64 * MIB }, size))
        .collect();
    let mut p = mk_pair(env, "fig-groups", &specs, LinkSpec::rtt(Duration::ZERO))?;
    for g in &specs {
        let file = format!("{}.img", g.name);
        prefill(&p.a.file(&file), size, None)?;
        prefill(&p.b.file(&file), size, None)?;
    }
    p.start(env)?;
    for g in &specs {
        env.call(&p.a.control(), Request::PairCreate { group: g.name.clone(), nocopy: true })?;
    }
    for g in &specs {
        p.a.wait_for(env, &g.name, Duration::from_secs(60), "in PAIR", in_sync)?;
    }
    let socket = p.a.nbd();
    let pids = [("primary", p.a.pid()), ("secondary", p.b.pid())];
    let run = |groups: usize, connections: usize, w: Workload, seed: u64| -> Result<GroupsRun, String> {
        let before: Vec<_> = pids.iter().map(|&(_, pid)| pid.and_then(crate::monitor::usage)).collect();
        let outcomes: Vec<Result<RunOutcome, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..connections)
                .map(|i| {
                    let socket = socket.clone();
                    scope.spawn(move || {
                        let export = format!("m{}-vol", i % groups);
                        let mut c = NbdConn::connect(&socket, &export).map_err(|e| e.to_string())?;
                        let r = c.run(w, warmup, duration, seed + i as u64).map_err(|e| e.to_string());
                        c.disconnect();
                        r
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("client thread panicked".into()))).collect()
        });
        let (mut ops, mut all_ops, mut secs, mut lat) = (0u64, 0u64, 0f64, Vec::new());
        for o in outcomes {
            let o = o?;
            ops += o.ops;
            all_ops += o.all_ops;
            secs = secs.max(o.secs);
            lat.extend(o.lat_ns);
        }
        lat.sort_unstable();
        Ok(GroupsRun {
            groups,
            connections,
            queue_depth_each: w.queue_depth(),
            iops: ops as f64 / secs.max(1e-9),
            p50_us: percentile(&lat, 0.50) as f64 / 1e3,
            daemons: pids
                .iter()
                .zip(before)
                .filter_map(|(&(role, pid), b)| {
                    Some(DaemonCpu::between(role, b?, crate::monitor::usage(pid?)?, all_ops))
                })
                .collect(),
        })
    };
    let mut fig = GroupsFigure { groups: n, ..GroupsFigure::default() };
    for round in 0..2u64 {
        fig.runs.push(run(1, 1, alone, 100 + round)?);
        fig.runs.push(run(n, n, each, 200 + round * 64)?);
        fig.runs.push(run(1, n, each, 300 + round * 64)?);
    }
    let mean = |groups: usize, connections: usize| {
        let v: Vec<f64> =
            fig.runs.iter().filter(|r| r.groups == groups && r.connections == connections).map(|r| r.iops).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    fig.ratio = mean(n, n) / mean(1, 1).max(1e-9);
    fig.ratio_same_clients = mean(n, n) / mean(1, n).max(1e-9);
    fig.primary_kib = p.a.rss_kib().unwrap_or(0);
    fig.secondary_kib = p.b.rss_kib().unwrap_or(0);
    p.stop()?;
    // Several GiB of journals: not kept until the end of the run.
    let _ = std::fs::remove_dir_all(env.root.join("fig-groups"));
    Ok(fig)
}

/// Catch-up from the journal: with the secondary stopped, the client writes
/// a backlog (4 KiB random at QD32, then 1 MiB sequential at QD4) that the
/// primary journals; the journal's pages are dropped from the page cache
/// (as after an outage longer than the cache holds them), the secondary
/// starts again, and the time until it has applied everything is measured
/// from the moment the session is up.
pub fn catch_up(env: &Env, o: &FigureOpts) -> Result<Vec<CatchUpRun>, String> {
    let size = if o.quick { 256 * MIB } else { 1024 * MIB };
    let journal = if o.quick { 512 * MIB } else { 2048 * MIB };
    let g = GroupSpec::single("cu", "async", journal, size);
    let mut p = mk_pair(env, "fig-catch-up", &[g], LinkSpec::rtt(Duration::ZERO))?;
    prefill(&p.a.file("cu.img"), size, None)?;
    prefill(&p.b.file("cu.img"), size, None)?;
    p.start(env)?;
    p.pair(env, "cu", true, Duration::from_secs(60))?;
    let timeout = Duration::from_secs(if o.quick { 60 } else { 180 });
    let scale = if o.quick { 0.25 } else { 1.0 };
    let mut runs = Vec::new();
    for (i, (backlog, w, secs)) in [
        ("4 KiB random writes, QD32", Workload::RandWrite4kQd32, 2.0 * scale),
        ("1 MiB sequential writes, QD4", Workload::SeqWrite1m, 1.0 * scale),
    ]
    .into_iter()
    .enumerate()
    {
        p.b.stop()?;
        let mut conn = NbdConn::connect(&p.a.nbd(), "cu-vol").map_err(|e| e.to_string())?;
        let wrote =
            conn.run(w, Duration::ZERO, Duration::from_secs_f64(secs), 40 + i as u64).map_err(|e| e.to_string())?;
        conn.disconnect();
        let before = p.a.status(env, "cu")?;
        if before.connected || before.lag_records == 0 {
            return Err(format!(
                "expected a backlog with the secondary away, found {} (connected {}) with {} records",
                before.state, before.connected, before.lag_records
            ));
        }
        drop_from_page_cache(&journal_file(&p.a.dir)?)?;
        let started = Instant::now();
        p.b.start(env)?;
        p.a.wait_for(env, "cu", timeout, "connected", |s| s.connected)?;
        let connected = Instant::now();
        p.a.wait_for(env, "cu", timeout, "caught up", in_sync)?;
        runs.push(CatchUpRun {
            backlog: backlog.into(),
            records: before.lag_records,
            bytes: before.lag_bytes,
            written_per_s: wrote.ops as f64 / wrote.secs.max(1e-9),
            reconnect_s: connected.duration_since(started).as_secs_f64(),
            catch_up_s: connected.elapsed().as_secs_f64(),
        });
    }
    p.stop()?;
    let _ = std::fs::remove_dir_all(env.root.join("fig-catch-up"));
    Ok(runs)
}

/// The journal file of the one group under a site's directory.
fn journal_file(site: &std::path::Path) -> Result<std::path::PathBuf, String> {
    fn find(dir: &std::path::Path) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let path = e.path();
            if path.is_dir() {
                if let Some(f) = find(&path) {
                    return Some(f);
                }
            } else if path.file_name().is_some_and(|n| n == "journal") {
                return Some(path);
            }
        }
        None
    }
    find(site).ok_or_else(|| format!("no journal file under {}", site.display()))
}

/// Writes a file's dirty pages back and drops its pages from the page cache.
fn drop_from_page_cache(path: &std::path::Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_data().map_err(|e| format!("{}: {e}", path.display()))?;
    nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Daemon RSS against the number of groups and against the journal size.
pub fn rss(env: &Env, o: &FigureOpts) -> Result<Vec<RssRow>, String> {
    let mut rows = Vec::new();
    let counts: &[usize] = if o.quick { &[1, 8] } else { &[1, 8, 32] };
    for &n in counts {
        let groups: Vec<GroupSpec> =
            (0..n).map(|i| GroupSpec::single(&format!("g{i}"), "async", 64 * MIB, 64 * MIB)).collect();
        let mut p = mk_pair(env, &format!("fig-rss-{n}"), &groups, LinkSpec::rtt(Duration::ZERO))?;
        p.start(env)?;
        for g in &groups {
            env.call(&p.a.control(), Request::PairCreate { group: g.name.clone(), nocopy: true })?;
        }
        for g in &groups {
            p.a.wait_for(env, &g.name, Duration::from_secs(60), "in PAIR", in_sync)?;
        }
        // One MiB into every group, so each has a session and some journal.
        let mut data = vec![0u8; MIB as usize];
        Rng::new(5).fill(&mut data);
        for g in &groups {
            let mut c = NbdConn::connect(&p.a.nbd(), &format!("{}-vol", g.name)).map_err(|e| e.to_string())?;
            c.write_at(0, &data, false).map_err(|e| e.to_string())?;
            c.disconnect();
        }
        std::thread::sleep(Duration::from_millis(500));
        rows.push(RssRow {
            label: format!("{n} async group{}, paired, idle", if n == 1 { "" } else { "s" }),
            groups: n,
            journal_bytes: 64 * MIB,
            backlog_bytes: 0,
            primary_kib: p.a.rss_kib().unwrap_or(0),
            secondary_kib: p.b.rss_kib().unwrap_or(0),
        });
        p.stop()?;
    }
    let journals: &[u64] = if o.quick { &[64 * MIB, 256 * MIB] } else { &[64 * MIB, 256 * MIB, 1024 * MIB] };
    for &j in journals {
        let g = GroupSpec::single("j", "async", j, 512 * MIB);
        let mut p = mk_pair(env, &format!("fig-rss-j{}", j / MIB), &[g], LinkSpec::rtt(Duration::ZERO))?;
        p.start(env)?;
        p.pair(env, "j", true, Duration::from_secs(60))?;
        p.b.stop()?;
        let backlog = (j * 3 / 4).min(384 * MIB);
        let mut c = NbdConn::connect(&p.a.nbd(), "j-vol").map_err(|e| e.to_string())?;
        let mut data = vec![0u8; MIB as usize];
        Rng::new(6).fill(&mut data);
        for i in 0..backlog / MIB {
            c.write_at((i * MIB) % (512 * MIB), &data, false).map_err(|e| e.to_string())?;
        }
        c.disconnect();
        std::thread::sleep(Duration::from_millis(300));
        rows.push(RssRow {
            label: format!(
                "1 async group, journal {} MiB, {} MiB written with the secondary down",
                j / MIB,
                backlog / MIB
            ),
            groups: 1,
            journal_bytes: j,
            backlog_bytes: backlog,
            primary_kib: p.a.rss_kib().unwrap_or(0),
            secondary_kib: 0,
        });
        p.stop()?;
    }
    Ok(rows)
}
