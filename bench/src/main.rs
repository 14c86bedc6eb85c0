//! `replicator-bench`: latency and throughput of the replicator against the
//! local disk, a plain NBD export, and QEMU's synchronous mirror, at WAN
//! round-trip times, plus replication-specific figures. One command runs
//! the whole matrix and writes a table (stdout), JSON, `RESULTS.md` and SVG
//! plots. See `bench/RESULTS.md` for the latest full run.
//!
//! ```text
//! cargo build --release -p replicator-bench -p replicator --bins
//! target/release/replicator-bench            # full matrix, a few minutes
//! target/release/replicator-bench --quick    # small matrix, under two minutes
//! ```

mod daemon;
mod figures;
mod local;
mod nbd;
mod placement;
mod qemu;
mod report;
mod svg;

use replicator_bench::{monitor, proxy, stats, workload};

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::daemon::{in_sync, Daemon, Env, GroupSpec, SitePair};
use crate::figures::FigureOpts;
use crate::nbd::NbdConn;
use crate::proxy::LinkSpec;
use crate::qemu::{NbdkitNull, QemuMirror, QemuNbd};
use crate::report::{Calibration, Cell, FioCheck, Results, CONFIGS};
use crate::stats::{DaemonCpu, RunOutcome, Summary};
use crate::svg::{Chart, Scale};
use crate::workload::Workload;

const MIB: u64 = 1 << 20;

/// Latency and throughput benchmarks of the replicator.
#[derive(Debug, Parser)]
#[command(name = "replicator-bench", version, about)]
struct Opts {
    /// Small matrix (RTT 0 and 5 ms, four workloads, short cells, small
    /// figures): under two minutes. Writes to <dir>/replicator-bench-quick
    /// unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Directory for volumes, journals and sockets (one fresh subdirectory per
    /// configuration, all on this filesystem). Default: $TMPDIR or /tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The `replicator` binary. Default: next to this binary.
    #[arg(long)]
    replicator: Option<PathBuf>,
    /// Where RESULTS.md, results.json and plots/ go. Default: the bench/
    /// directory of the source tree (full run).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Round-trip times in ms, comma separated. Default 0,1,5 (quick: 0,5).
    #[arg(long, value_delimiter = ',')]
    rtt: Option<Vec<f64>>,
    /// Jitter of every emulated link, ms (± uniform, FIFO).
    #[arg(long, default_value_t = 0.0)]
    jitter: f64,
    /// Bandwidth of every emulated link of the matrix, Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    bandwidth: f64,
    /// Datagram loss of every emulated link of the matrix, percent.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Measured seconds per cell. Default 2 (quick: 0.6).
    #[arg(long)]
    duration: Option<f64>,
    /// Configurations, comma separated (local,nbd-null,nbd,qemu-nbd,async,sync,qemu-mirror).
    #[arg(long, value_delimiter = ',')]
    configs: Option<Vec<String>>,
    /// Workloads, comma separated (qd1,qd8,qd32,seq,wal,mix or full names).
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Volume size in MiB for the matrix. Default 256 (quick: 128).
    #[arg(long)]
    volume_mib: Option<u64>,
    /// Skip the replication figures (lag, copy, resync, catch-up, RSS, many groups, drill).
    #[arg(long)]
    no_figures: bool,
    /// Replication figures to run, comma separated (lag,copy,resync,catchup,rss,groups,drill).
    /// Default: all.
    #[arg(long, value_delimiter = ',')]
    figures: Option<Vec<String>>,
    /// Skip the cross-check of our NBD client against fio.
    #[arg(long)]
    no_fio_check: bool,
    /// RTT (ms) and bandwidth (Mbit/s) of the lag and limited-copy figures.
    #[arg(long, default_value_t = 5.0)]
    figure_rtt: f64,
    /// Link bandwidth of the lag and limited-copy figures, Mbit/s.
    #[arg(long, default_value_t = 200.0)]
    figure_bandwidth: f64,
    /// Before each configuration, wait up to this many seconds for other
    /// processes to use less than 0.2 CPU cores (for shared machines).
    #[arg(long, default_value_t = 0.0)]
    wait_quiet: f64,
    /// Keep the temporary directory (volumes, logs) afterwards.
    #[arg(long)]
    keep: bool,
    /// Pin site A (this client, the delay emulator, the primary or unpaired
    /// export, QEMU's source) to CPU 0 and site B (the secondary, QEMU's
    /// mirror target) to CPU 1, so the sites do not compete for CPUs.
    #[arg(long)]
    pin: bool,
    /// Put site B's files (volumes, journal, state; QEMU's mirror target) in
    /// a fresh directory here, e.g. on another device or /dev/shm, so the
    /// sites do not share a disk.
    #[arg(long)]
    site_b_dir: Option<PathBuf>,
    /// `activity_log_extents` of the matrix's pairs (default: the daemon's,
    /// 1237 regions of 4 MiB). A log smaller than the regions a load writes
    /// at once makes its writes wait for room: what that costs.
    #[arg(long)]
    activity_log_extents: Option<u64>,
}

struct Plan {
    rtts: Vec<f64>,
    configs: Vec<String>,
    workloads: Vec<Workload>,
    warmup: Duration,
    duration: Duration,
    volume: u64,
    extra: LinkSpec,
    /// `--activity-log-extents`.
    activity_log_extents: Option<u64>,
}

fn log(msg: &str) {
    eprintln!("[{:>7.1}s] {msg}", START.with(|s| s.elapsed().as_secs_f64()));
}

thread_local! {
    static START: Instant = Instant::now();
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    START.with(|_| ());
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicator-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn find_replicator(opts: &Opts) -> Result<PathBuf, String> {
    if let Some(p) = &opts.replicator {
        return if p.is_file() { Ok(p.clone()) } else { Err(format!("--replicator {}: no such file", p.display())) };
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let next = me.with_file_name("replicator");
    if next.is_file() {
        return Ok(next);
    }
    Err(format!(
        "cannot find the replicator binary next to {} — build it with `cargo build --release -p replicator-bench -p replicator --bins`, or pass --replicator PATH",
        me.display()
    ))
}

fn plan(opts: &Opts) -> Result<Plan, String> {
    let q = opts.quick;
    let rtts = opts.rtt.clone().unwrap_or(if q { vec![0.0, 5.0] } else { vec![0.0, 1.0, 5.0] });
    if rtts.iter().any(|r| !(0.0..=1000.0).contains(r)) {
        return Err("--rtt values must be between 0 and 1000 ms".into());
    }
    let configs = match &opts.configs {
        Some(c) => {
            for x in c {
                if !CONFIGS.contains(&x.as_str()) {
                    return Err(format!("unknown configuration {x:?} (known: {})", CONFIGS.join(",")));
                }
            }
            CONFIGS.iter().filter(|k| c.iter().any(|x| x == *k)).map(|s| (*s).to_string()).collect()
        }
        None => CONFIGS.iter().map(|s| (*s).to_string()).collect(),
    };
    let workloads = match &opts.workloads {
        Some(ws) => ws
            .iter()
            .map(|w| Workload::parse(w).ok_or_else(|| format!("unknown workload {w:?}")))
            .collect::<Result<Vec<_>, _>>()?,
        None if q => vec![Workload::RandWrite4kQd1, Workload::RandWrite4kQd32, Workload::Wal, Workload::SeqWrite1m],
        None => Workload::ALL.to_vec(),
    };
    let secs = opts.duration.unwrap_or(if q { 0.6 } else { 2.0 });
    if !(0.05..=60.0).contains(&secs) {
        return Err("--duration must be between 0.05 and 60 seconds".into());
    }
    let mib = opts.volume_mib.unwrap_or(if q { 128 } else { 256 });
    if !(16..=65536).contains(&mib) {
        return Err("--volume-mib must be between 16 and 65536".into());
    }
    Ok(Plan {
        rtts,
        configs,
        workloads,
        warmup: Duration::from_secs_f64(if q { 0.15 } else { 0.3 }),
        duration: Duration::from_secs_f64(secs),
        volume: mib * MIB,
        extra: LinkSpec {
            rtt: Duration::ZERO,
            jitter: Duration::from_secs_f64(opts.jitter.max(0.0) / 1e3),
            bandwidth: (opts.bandwidth > 0.0).then(|| (opts.bandwidth * 1e6 / 8.0) as u64),
            loss: (opts.loss / 100.0).clamp(0.0, 1.0),
        },
        activity_log_extents: opts.activity_log_extents,
    })
}

fn run(opts: Opts) -> Result<(), String> {
    let plan = plan(&opts)?;
    let exe = find_replicator(&opts)?;
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = base.join(format!("replicator-bench-{}", std::process::id()));
    let out = match &opts.out {
        Some(o) => o.clone(),
        None if opts.quick => base.join("replicator-bench-quick"),
        None => {
            let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            if src.is_dir() {
                src
            } else {
                PathBuf::from(".")
            }
        }
    };
    let built = std::fs::metadata(&exe).and_then(|m| m.modified()).ok();
    placement::init(opts.pin, opts.site_b_dir.as_deref())?;
    let env = Env::new(exe.clone(), root.clone())?;
    let command =
        std::iter::once("replicator-bench".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    log(&format!("replicator-bench: working directory {}, results to {}", root.display(), out.display()));
    let started = Instant::now();
    let mut results = Results {
        command,
        machine: machine(&base),
        cell_secs: plan.duration.as_secs_f64(),
        rtts_ms: plan.rtts.clone(),
        link_extra: if plan.extra.is_direct() { String::new() } else { plan.extra.describe() },
        cells: Vec::new(),
        calibration: Vec::new(),
        fio_check: Vec::new(),
        figures: figures::Figures::default(),
        targets: Vec::new(),
        notes: Vec::new(),
        wall_secs: 0.0,
    };
    let version = first_line(&env.exe.to_string_lossy(), &["--version"]).unwrap_or_default();
    let age = built
        .and_then(|b| b.elapsed().ok())
        .map_or(String::new(), |a| format!(", built {:.0} min before the run", a.as_secs_f64() / 60.0));
    results.machine.push(("replicator binary".into(), format!("{} ({version}{age})", exe.display())));
    results.machine.push(("placement".into(), placement::describe()));
    if let Some(n) = plan.activity_log_extents {
        results.machine.push(("pairs' activity log".into(), format!("activity_log_extents = {n} (4 MiB regions)")));
    }
    let outcome = run_everything(&env, &opts, &plan, &mut results);
    results.wall_secs = started.elapsed().as_secs_f64();
    if let Some(f) = env.monitor.foreign_overall() {
        results.machine.push(("CPU used by other processes during the run".into(), format!("{f:.2} cores on average")));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    results.machine.push(("load average at end".into(), load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")));
    results.evaluate();
    println!("\n{}", report::text_table(&results.table_rows()));
    let cpu = results.cpu_rows();
    if cpu.len() > 1 {
        println!("{}", report::text_table(&cpu));
    }
    println!("{}", report::text_table(&results.target_rows()));
    for n in &results.notes {
        println!("note: {n}");
    }
    write_outputs(&results, &out, opts.quick)?;
    log(&format!("wrote {}/RESULTS.md, results.json and plots/ in {:.0} s", out.display(), results.wall_secs));
    drop(env);
    if opts.keep {
        log(&format!("kept {}", root.display()));
    } else {
        let _ = std::fs::remove_dir_all(&root);
        placement::cleanup();
    }
    outcome
}

fn run_everything(env: &Env, opts: &Opts, plan: &Plan, results: &mut Results) -> Result<(), String> {
    // Proxy calibration: what a requested RTT really is.
    for &r in &plan.rtts {
        if r > 0.0 {
            let spec = LinkSpec { rtt: Duration::from_secs_f64(r / 1e3), ..plan.extra };
            match proxy::calibrate_udp(spec, if opts.quick { 50 } else { 200 }) {
                Ok((p50, p99)) => results.calibration.push(Calibration { rtt_ms: r, p50_us: p50, p99_us: p99 }),
                Err(e) => results.notes.push(format!("proxy calibration at {r} ms failed: {e}")),
            }
        }
    }
    for c in ["qemu-nbd", "qemu-mirror"] {
        let bin = if c == "qemu-nbd" { "qemu-nbd" } else { "qemu-storage-daemon" };
        if plan.configs.iter().any(|x| x == c) {
            if let Some(why) =
                qemu::missing(bin).or_else(|| if c == "qemu-mirror" { qemu::missing("qemu-nbd") } else { None })
            {
                results.notes.push(format!("{c} skipped: {why}"));
            }
        }
    }
    // Phases: every configuration at RTT 0 together, then the replicated
    // ones per further RTT. Inside a phase the configurations are measured
    // interleaved, workload by workload, so the ratios the targets use come
    // from cells measured within seconds of each other (this machine drifts
    // by tens of percent over minutes).
    let mut phases: Vec<(f64, Vec<String>)> = Vec::new();
    for &r in &plan.rtts {
        let configs: Vec<String> =
            plan.configs.iter().filter(|c| report::is_replicated(c) || (r == plan.rtts[0])).cloned().collect();
        if !configs.is_empty() {
            phases.push((r, configs));
        }
    }
    let mut disk_mbps = None;
    for (k, (rtt, configs)) in phases.iter().enumerate() {
        let link = LinkSpec { rtt: Duration::from_secs_f64(rtt / 1e3), ..plan.extra };
        log(&format!(
            "phase {}/{}: {} (replicated configurations at {})",
            k + 1,
            phases.len(),
            configs.join(", "),
            link.describe()
        ));
        let mut lives: Vec<Live> = configs
            .iter()
            .map(|c| setup(env, plan, c, if report::is_replicated(c) { *rtt } else { 0.0 }, link, results))
            .collect();
        for (i, &w) in plan.workloads.iter().enumerate() {
            if opts.wait_quiet > 0.0 {
                match env.monitor.wait_quiet(0.2, Duration::from_secs_f64(opts.wait_quiet.min(3600.0))) {
                    Some(s) if s > 0.5 => log(&format!("waited {s:.0} s for other processes to quieten")),
                    Some(_) => {}
                    None => log(&format!("other processes stayed busy for {:.0} s; measuring anyway", opts.wait_quiet)),
                }
            }
            log(&format!("  {} ({}/{})", w.name(), i + 1, plan.workloads.len()));
            // The fio cross-check runs before the 1 MiB cells, which leave
            // the disk busy writing back for a while.
            if w == Workload::SeqWrite1m && !opts.no_fio_check {
                for l in &lives {
                    if let LiveKind::Export { socket, export, .. } = &l.kind {
                        if matches!(l.config.as_str(), "nbd" | "nbd-null" | "qemu-nbd") {
                            results.fio_check.extend(fio_check(&l.config, socket, export, plan));
                        }
                    }
                }
            }
            for l in &lives {
                let c = measure(env, opts, plan, l, w, results);
                if l.config == "local" && w == Workload::SeqWrite1m {
                    disk_mbps = c.summary.as_ref().map(|s| s.mbps);
                }
                results.cells.push(c);
            }
        }
        // Drift: re-measure the floor's QD1 at the end of the phase.
        if let (Some(l), Some(first)) = (
            lives.iter().find(|l| l.config == "local"),
            results.get("local", 0.0, Workload::RandWrite4kQd1).map(|s| s.p50_us),
        ) {
            if let LiveKind::Local(path) = &l.kind {
                let w = Workload::RandWrite4kQd1;
                if let Ok(o) = local::run(&env.rt, path, w, plan.warmup, plan.duration, seed(w)) {
                    let again = Summary::from_outcome(o).p50_us;
                    log(&format!("drift check: local 4 KiB QD1 p50 {first:.0} µs at the start of the phase, {again:.0} µs at its end"));
                    results.notes.push(format!("drift check: local 4 KiB QD1 p50 was {first:.0} µs at the start of the RTT 0 phase and {again:.0} µs at its end"));
                }
            }
        }
        for l in lives.drain(..) {
            teardown(env, l, results);
        }
    }
    // Table order: configuration, RTT, workload.
    let wi = |c: &Cell| Workload::ALL.iter().position(|w| w.name() == c.workload).unwrap_or(usize::MAX);
    let ci = |c: &Cell| CONFIGS.iter().position(|x| *x == c.config).unwrap_or(usize::MAX);
    results.cells.sort_by(|a, b| {
        (ci(a), a.rtt_ms, wi(a)).partial_cmp(&(ci(b), b.rtt_ms, wi(b))).unwrap_or(std::cmp::Ordering::Equal)
    });
    if !opts.no_figures {
        if opts.wait_quiet > 0.0 {
            let _ = env.monitor.wait_quiet(0.2, Duration::from_secs_f64(opts.wait_quiet.min(3600.0)));
        }
        let fo = FigureOpts {
            quick: opts.quick,
            rtt: Duration::from_secs_f64(opts.figure_rtt.max(0.0) / 1e3),
            bandwidth: (opts.figure_bandwidth.max(1.0) * 1e6 / 8.0) as u64,
            disk_mbps,
            only: opts.figures.clone(),
        };
        results.figures = figures::run_all(env, &fo, &|m| log(m));
    }
    Ok(())
}

/// What keeps an NBD export alive during a phase.
#[allow(dead_code)] // the fields are held for their Drop
enum Holder {
    Daemon(Daemon),
    Pair(SitePair),
    Qemu(QemuNbd),
    Mirror(QemuMirror),
    Null(NbdkitNull),
}

/// A configuration ready to be measured.
struct Live {
    config: String,
    rtt: f64,
    dir: PathBuf,
    kind: LiveKind,
}

enum LiveKind {
    /// The floor: this backing file.
    Local(PathBuf),
    /// An NBD export.
    Export { holder: Box<Holder>, socket: PathBuf, export: String },
    /// Could not be set up (the reason).
    Skipped(String),
}

/// Sets a configuration up (fresh directory, prefilled volumes, processes).
fn setup(env: &Env, plan: &Plan, config: &str, rtt: f64, link: LinkSpec, results: &mut Results) -> Live {
    let dir = env.root.join(format!("{config}-rtt{rtt}"));
    let kind = (|| -> Result<LiveKind, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("failed: {e}"))?;
        if config == "local" {
            let path = dir.join("vol.img");
            local::prefill(&path, plan.volume, None).map_err(|e| format!("failed: {e}"))?;
            let i = local::probe(&path).map_err(|e| format!("failed: {e}"))?;
            if !i.direct || i.backend != "io_uring" {
                results.notes.push(format!("local floor ran with backend {} and O_DIRECT {}", i.backend, i.direct));
            }
            return Ok(LiveKind::Local(path));
        }
        if config.starts_with("qemu") {
            let bin = if config == "qemu-nbd" { "qemu-nbd" } else { "qemu-storage-daemon" };
            if let Some(why) = qemu::missing(bin).or_else(|| qemu::missing("qemu-nbd")) {
                return Err(format!("skipped: {why}"));
            }
        }
        if config == "nbd-null" && qemu::which("nbdkit").is_none() {
            return Err("skipped: nbdkit not found (apt-get install nbdkit)".into());
        }
        let (holder, socket, export) =
            setup_export(env, &dir, plan, config, link).map_err(|e| format!("failed: {e}"))?;
        if let Holder::Mirror(m) = &holder {
            results.notes.push(format!(
                "qemu-mirror at RTT {rtt} ms: initial mirror of {} MiB reached READY in {:.2} s",
                plan.volume / MIB,
                m.ready_secs
            ));
        }
        Ok(LiveKind::Export { holder: Box::new(holder), socket, export })
    })();
    let kind = kind.unwrap_or_else(|why| {
        log(&format!("    {config}: {why}"));
        LiveKind::Skipped(why)
    });
    Live { config: config.into(), rtt, dir, kind }
}

/// One cell of a live configuration.
fn measure(env: &Env, opts: &Opts, plan: &Plan, l: &Live, w: Workload, results: &mut Results) -> Cell {
    let (config, rtt) = (l.config.as_str(), l.rtt);
    match &l.kind {
        LiveKind::Skipped(why) => Cell {
            config: config.into(),
            rtt_ms: rtt,
            workload: w.name().into(),
            summary: None,
            note: Some(why.clone()),
            others_cpu: None,
        },
        LiveKind::Local(path) => {
            let mut run = || local::run(&env.rt, path, w, plan.warmup, plan.duration, seed(w));
            measure_cell(env, opts, config, rtt, w, &mut run, &|| {})
        }
        LiveKind::Export { holder, socket, export } => {
            // The next cell (of any configuration) starts with no replication
            // backlog left behind by this one.
            let drain = || match holder.as_ref() {
                Holder::Pair(p) => p.a.wait_for(env, config, Duration::from_secs(120), "drained", in_sync).map(|_| ()),
                _ => Ok(()),
            };
            let daemons: Vec<(&'static str, u32)> = match holder.as_ref() {
                Holder::Daemon(d) => d.pid().map(|pid| ("export", pid)).into_iter().collect(),
                Holder::Pair(p) => [("primary", p.a.pid()), ("secondary", p.b.pid())]
                    .into_iter()
                    .filter_map(|(role, pid)| Some((role, pid?)))
                    .collect(),
                Holder::Qemu(q) => vec![("export", q.pid())],
                Holder::Mirror(m) => {
                    let (source, target) = m.pids();
                    vec![("primary", source), ("secondary", target)]
                }
                Holder::Null(_) => Vec::new(),
            };
            let mut run = || {
                let before: Vec<_> = daemons.iter().map(|&(_, pid)| monitor::usage(pid)).collect();
                let mut r = NbdConn::connect(socket, export).map_err(|e| e.to_string()).and_then(|mut c| {
                    let r = c.run(w, plan.warmup, plan.duration, seed(w)).map_err(|e| e.to_string());
                    c.disconnect();
                    r
                });
                if let Ok(o) = r.as_mut() {
                    // Replicating what the cell wrote is part of its cost.
                    let _ = drain();
                    o.daemons = daemons
                        .iter()
                        .zip(before)
                        .filter_map(|(&(role, pid), b)| {
                            Some(DaemonCpu::between(role, b?, monitor::usage(pid)?, o.all_ops))
                        })
                        .collect();
                }
                r
            };
            let settle = || {
                let _ = drain();
            };
            let c = measure_cell(env, opts, config, rtt, w, &mut run, &settle);
            if let Err(e) = drain() {
                results.notes.push(format!("{config} at RTT {rtt} ms after {}: {e}", w.name()));
            }
            c
        }
    }
}

/// Stops a configuration; for a pair, checks that both sites hold the same bytes.
fn teardown(env: &Env, l: Live, results: &mut Results) {
    let (config, rtt) = (l.config.as_str(), l.rtt);
    let LiveKind::Export { holder, .. } = l.kind else { return };
    match *holder {
        Holder::Pair(mut p) => {
            if let Some(d) = p.udp_drops() {
                results.notes.push(format!("{config} at RTT {rtt} ms: {d}"));
            }
            let drained = match p.a.status(env, config) {
                Ok(s) if in_sync(&s) => true,
                Ok(s) => {
                    results.notes.push(format!(
                        "{config} at RTT {rtt} ms: {:.0} MiB were still to ship at the end (sites not compared)",
                        s.lag_bytes as f64 / MIB as f64
                    ));
                    false
                }
                Err(_) => false,
            };
            match p.stop() {
                Ok(()) if !drained => {}
                Ok(()) => {
                    let name = format!("{config}.img");
                    match same_bytes(&p.a.file(&name), &p.b.file(&name)) {
                        Ok(true) => {}
                        Ok(false) => results.notes.push(format!(
                            "{config} at RTT {rtt} ms: after a clean stop the two sites DIFFER (logs in {})",
                            l.dir.display()
                        )),
                        Err(e) => {
                            results.notes.push(format!("{config} at RTT {rtt} ms: cannot compare the sites: {e}"))
                        }
                    }
                }
                Err(e) => results.notes.push(format!("{config} at RTT {rtt} ms: {e}")),
            }
        }
        Holder::Daemon(mut d) => {
            if let Err(e) = d.stop() {
                results.notes.push(format!("{config}: {e}"));
            }
        }
        Holder::Qemu(_) | Holder::Mirror(_) | Holder::Null(_) => {}
    }
}

/// Runs one cell. With `--wait-quiet`, waits for the machine to be quiet
/// first, and measures once more (after `settle`) if other processes still
/// used 0.3 cores or more during the cell, keeping the quieter measurement.
fn measure_cell(
    env: &Env,
    opts: &Opts,
    config: &str,
    rtt: f64,
    w: Workload,
    run: &mut dyn FnMut() -> Result<RunOutcome, String>,
    settle: &dyn Fn(),
) -> Cell {
    let patience = Duration::from_secs_f64(opts.wait_quiet.clamp(0.0, 3600.0));
    if !patience.is_zero() {
        let _ = env.monitor.wait_quiet(0.2, patience);
    }
    let t0 = env.monitor.now();
    let first = run();
    let busy = env.monitor.foreign_between(t0, env.monitor.now());
    let disturbed = busy.is_some_and(|b| b >= 0.3);
    if patience.is_zero() || !disturbed || first.is_err() {
        return cell(config, rtt, w, first, busy);
    }
    let c1 = cell(config, rtt, w, first, busy);
    log("    (measured under contention: once more when the machine is quiet)");
    settle();
    let _ = env.monitor.wait_quiet(0.2, patience);
    let t1 = env.monitor.now();
    let second = run();
    let busy2 = env.monitor.foreign_between(t1, env.monitor.now());
    let c2 = cell(config, rtt, w, second, busy2);
    match (c2.summary.is_some(), busy2.unwrap_or(f64::MAX) < busy.unwrap_or(f64::MAX)) {
        (true, true) => c2,
        _ => c1,
    }
}

fn seed(w: Workload) -> u64 {
    0xbe4c_0000 + Workload::ALL.iter().position(|x| *x == w).unwrap_or(0) as u64
}

fn cell(config: &str, rtt: f64, w: Workload, r: Result<RunOutcome, String>, others_cpu: Option<f64>) -> Cell {
    let busy = others_cpu.filter(|x| *x >= 0.2).map_or(String::new(), |x| format!("  (others used {x:.1} cores)"));
    match r {
        Ok(o) => {
            let s = Summary::from_outcome(o);
            log(&format!(
                "    {:<11} {:<15} {:>9.0} IOPS {:>8.1} MB/s  p50 {:>7.0} µs  p99 {:>7.0} µs  p99.9 {:>7.0} µs{busy}",
                config,
                w.name(),
                s.iops,
                s.mbps,
                s.p50_us,
                s.p99_us,
                s.p999_us
            ));
            Cell {
                config: config.into(),
                rtt_ms: rtt,
                workload: w.name().into(),
                summary: Some(s),
                note: None,
                others_cpu,
            }
        }
        Err(e) => {
            log(&format!("    {config:<11} {:<15} FAILED: {e}", w.name()));
            Cell {
                config: config.into(),
                rtt_ms: rtt,
                workload: w.name().into(),
                summary: None,
                note: Some(format!("failed: {e}")),
                others_cpu,
            }
        }
    }
}

fn setup_export(
    env: &Env,
    dir: &Path,
    plan: &Plan,
    config: &str,
    link: LinkSpec,
) -> Result<(Holder, PathBuf, String), String> {
    match config {
        "nbd" => {
            let me = format!("127.0.0.1:{}", daemon::free_udp_port()?).parse().map_err(|e| format!("{e}"))?;
            let nobody = format!("127.0.0.1:{}", daemon::free_udp_port()?).parse().map_err(|e| format!("{e}"))?;
            let g = GroupSpec::single("plain", "async", 64 * MIB, plan.volume);
            let mut d = Daemon::configure(env, dir, "site-a", "site-b", me, nobody, &[g])?;
            local::prefill(&d.file("plain.img"), plan.volume, None)?;
            d.start(env)?;
            let s = d.status(env, "plain")?;
            if s.state != "SIMPLEX" {
                return Err(format!("expected an unpaired (SIMPLEX) group, found {}", s.state));
            }
            let sock = d.nbd();
            Ok((Holder::Daemon(d), sock, "plain-vol".into()))
        }
        "async" | "sync" => {
            let mode = if config == "sync" { "sync" } else { "async" };
            // A journal large enough that no cell fills it (a full journal
            // blocks writes, then suspends): 2 GiB (written full of zeroes
            // when the daemon creates it, as every journal is).
            let mut g = GroupSpec::single(config, mode, 2 << 30, plan.volume);
            g.activity_log_extents = plan.activity_log_extents;
            let mut p = SitePair::configure(env, dir, &[g], link)?;
            let file = format!("{config}.img");
            local::prefill(&p.a.file(&file), plan.volume, None)?;
            local::prefill(&p.b.file(&file), plan.volume, None)?;
            p.start(env)?;
            // Both sites hold the same zeroes: no initial copy needed.
            p.pair(env, config, true, Duration::from_secs(60))?;
            let sock = p.a.nbd();
            Ok((Holder::Pair(p), sock, format!("{config}-vol")))
        }
        "nbd-null" => {
            let sock = dir.join("nbd.sock");
            let n = NbdkitNull::unix(&sock, plan.volume, &dir.join("nbdkit.log"))?;
            Ok((Holder::Null(n), sock, "vol".into()))
        }
        "qemu-nbd" => {
            let file = dir.join("vol.img");
            local::prefill(&file, plan.volume, None)?;
            let sock = dir.join("nbd.sock");
            let q = QemuNbd::unix(&file, &sock, "vol", &dir.join("qemu-nbd.log"))?;
            Ok((Holder::Qemu(q), sock, "vol".into()))
        }
        "qemu-mirror" => {
            let (src, tgt) = (dir.join("src.img"), placement::site_b_file(dir, "tgt.img"));
            local::prefill(&src, plan.volume, None)?;
            local::prefill(&tgt, plan.volume, None)?;
            let m = QemuMirror::start(dir, &src, &tgt, link)?;
            let sock = m.socket.clone();
            Ok((Holder::Mirror(m), sock, "vol".into()))
        }
        other => Err(format!("unknown configuration {other}")),
    }
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool, String> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = std::fs::File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| e.to_string())?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| e.to_string())?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}

/// Runs our client and then fio's NBD engine on the same export and
/// workloads (QD1, QD32), back to back, and sets the numbers side by side.
fn fio_check(config: &str, socket: &Path, export: &str, plan: &Plan) -> Vec<FioCheck> {
    if qemu::which("fio").is_none() {
        log("    fio not found: client cross-check skipped (apt-get install fio)");
        return Vec::new();
    }
    let mut out = Vec::new();
    let ours = |w: Workload| {
        NbdConn::connect(socket, export)
            .and_then(|mut c| {
                let r = c.run(w, plan.warmup, plan.duration, seed(w));
                c.disconnect();
                r
            })
            .map(Summary::from_outcome)
            .map_err(|e| log(&format!("    fio check {}: our client failed: {e}", w.name())))
    };
    for w in [Workload::RandWrite4kQd1, Workload::RandWrite4kQd32] {
        // Ours, fio, ours again, back to back on the same export: the two
        // runs of ours bracket fio's and show the drift between runs.
        let Ok(before) = ours(w) else { continue };
        let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
        let res = std::process::Command::new("fio")
            .args([
                "--name=check",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--time_based",
                "--lat_percentiles=1",
                "--output-format=json",
            ])
            .arg(format!("--uri={uri}"))
            .arg(format!("--iodepth={}", w.queue_depth()))
            .arg(format!("--size={}", plan.volume))
            .arg(format!("--runtime={}ms", plan.duration.as_millis()))
            .arg(format!("--ramp_time={}ms", plan.warmup.as_millis()))
            .stdin(std::process::Stdio::null())
            .output();
        let parsed = res.ok().filter(|o| o.status.success()).and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            let json_start = text.find('{')?;
            let v: serde_json::Value = serde_json::from_str(&text[json_start..]).ok()?;
            let wr = &v["jobs"][0]["write"];
            Some((wr["iops"].as_f64()?, wr["lat_ns"]["percentile"]["50.000000"].as_f64()? / 1e3))
        });
        let Ok(after) = ours(w) else { continue };
        match parsed {
            Some((iops, p50)) => {
                log(&format!(
                    "    fio check {config} {}: fio {iops:.0} IOPS p50 {p50:.0} µs; ours {:.0} / {:.0} IOPS p50 {:.0} / {:.0} µs (before / after)",
                    w.name(),
                    before.iops,
                    after.iops,
                    before.p50_us,
                    after.p50_us
                ));
                out.push(FioCheck {
                    config: config.into(),
                    workload: w.name().into(),
                    ours_iops: [before.iops, after.iops],
                    ours_p50_us: [before.p50_us, after.p50_us],
                    fio_iops: iops,
                    fio_p50_us: p50,
                });
            }
            None => log(&format!("    fio check {}: fio failed or printed no JSON", w.name())),
        }
    }
    out
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(cmd).args(args).output().ok()?;
    String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string)
}

fn machine(dir: &Path) -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = read("/proc/meminfo").lines().find_map(|l| {
        let kib: f64 = l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok()?;
        Some(format!("{:.1} GiB", kib / 1048576.0))
    });
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()));
    let dir_s = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = read("/proc/mounts");
    let fs = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir_s.starts_with(f[1])).then(|| (f[1].len(), format!("{} on {} ({})", f[0], f[1], f[2])))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s);
    let mut m = vec![
        ("CPU".to_string(), format!("{} × {}", cores, cpu.unwrap_or_else(|| "unknown".into()))),
        ("memory".into(), mem.unwrap_or_default()),
        ("kernel".into(), read("/proc/sys/kernel/osrelease").trim().to_string()),
        ("OS".into(), os.unwrap_or_default()),
        ("test directory".into(), format!("{} — {}", dir_s.display(), fs.unwrap_or_default())),
        (
            "load average at start".into(),
            read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        ),
    ];
    if let Some(v) = first_line("qemu-nbd", &["--version"]) {
        m.push(("QEMU".into(), v));
    }
    if let Some(v) = first_line("fio", &["--version"]) {
        m.push(("fio".into(), v));
    }
    if let Some(v) = first_line("git", &["-C", env!("CARGO_MANIFEST_DIR"), "describe", "--always", "--dirty"]) {
        m.push(("source".into(), format!("git {v}")));
    }
    m
}

const READING_START: &str = "<!-- reading:start (kept across runs; edit by hand) -->";
const READING_END: &str = "<!-- reading:end -->";

fn write_outputs(r: &Results, out: &Path, quick: bool) -> Result<(), String> {
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| format!("{}: {e}", plots.display()))?;
    // Plots of an earlier run that this run does not redraw would mislead.
    if let Ok(rd) = std::fs::read_dir(&plots) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if (n.starts_with("latency-cdf-") || n.starts_with("async-lag-")) && n.ends_with(".svg") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(out.join("results.json"), json).map_err(|e| e.to_string())?;
    let mut plot_files = Vec::new();
    for &rtt in &r.rtts_ms {
        for w in [Workload::RandWrite4kQd1, Workload::RandWrite4kQd32] {
            let series: Vec<(String, Vec<(f64, f64)>)> = r
                .cells
                .iter()
                .filter(|c| {
                    c.workload == w.name() && (!report::is_replicated(&c.config) || (c.rtt_ms - rtt).abs() < 1e-9)
                })
                .filter_map(|c| c.summary.as_ref().map(|s| (c.config.clone(), s.cdf.clone())))
                .collect();
            if series.is_empty() {
                continue;
            }
            let chart = Chart {
                title: format!("{} latency CDF, replicated configurations at RTT {rtt} ms", w.name()),
                x_label: "latency (µs, log scale)".into(),
                y_label: "fraction of requests completed".into(),
                x_scale: Scale::Log,
                y_scale: Scale::Linear,
                series,
                y_range: Some((0.0, 1.0)),
                h_lines: vec![(0.5, "p50".into()), (0.99, "p99".into())],
            };
            let name =
                format!("latency-cdf-{}-rtt{rtt}ms.svg", if w == Workload::RandWrite4kQd1 { "qd1" } else { "qd32" });
            std::fs::write(plots.join(&name), chart.render()).map_err(|e| e.to_string())?;
            plot_files.push(name);
        }
    }
    if let Some(l) = &r.figures.lag {
        for (name, y_label, f, scale) in [
            ("async-lag-seconds.svg", "lag (ms, log scale; < 1 ms drawn at 1)", 0u8, Scale::Log),
            ("async-lag-bytes.svg", "lag (MiB)", 1u8, Scale::Linear),
        ] {
            let mut series = Vec::new();
            for (i, ph) in l.phases.iter().enumerate() {
                let pts: Vec<(f64, f64)> = l
                    .samples
                    .iter()
                    .filter(|s| s.phase == i as u8 || (i == 1 && s.phase == 2))
                    .map(|s| (s.t, if f == 0 { (s.seconds * 1e3).max(1.0) } else { s.bytes as f64 / MIB as f64 }))
                    .collect();
                series.push((
                    format!(
                        "{:.1} MB/s{}",
                        ph.offered_mbps,
                        if i == 0 { " (70 % of link)" } else { " (130 %), drain" }
                    ),
                    pts,
                ));
            }
            let chart = Chart {
                title: format!("async lag over time, link {} ({:.1} MB/s)", l.link, l.link_mbps),
                x_label: "time (s)".into(),
                y_label: y_label.into(),
                x_scale: Scale::Linear,
                y_scale: scale,
                series,
                y_range: None,
                h_lines: if f == 0 { vec![(100.0, "100 ms target".into())] } else { vec![] },
            };
            std::fs::write(plots.join(name), chart.render()).map_err(|e| e.to_string())?;
            plot_files.push(name.to_string());
        }
    }
    let md_path = out.join("RESULTS.md");
    let old = std::fs::read_to_string(&md_path).unwrap_or_default();
    let reading = match (old.find(READING_START), old.find(READING_END)) {
        (Some(a), Some(b)) if b > a => old[a + READING_START.len()..b].trim().to_string(),
        _ => "(No reading yet. After a full run, write a few sentences here on what the numbers say; this section is kept when the benchmark rewrites the file.)".into(),
    };
    let md = render_markdown(r, &reading, &plot_files, quick);
    std::fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    Ok(())
}

fn render_markdown(r: &Results, reading: &str, plots: &[String], quick: bool) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let _ = writeln!(s, "# replicator-bench results{}\n", if quick { " (quick run)" } else { "" });
    let _ = writeln!(
        s,
        "Latest {} run on this machine, {date}, {:.0} s wall time:\n",
        if quick { "quick" } else { "full" },
        r.wall_secs
    );
    let _ = writeln!(
        s,
        "```sh\ncargo build --release -p replicator-bench -p replicator --bins\ntarget/release/{}\n```\n",
        r.command
    );
    let _ = writeln!(
        s,
        "Each cell runs {:.1} s (after a short warm-up) through the benchmark's own pipelined NBD client over a Unix socket. \
         Every configuration at RTT 0 is set up at once and measured interleaved, workload by workload (then the replicated ones \
         likewise for each further RTT), so the ratios below compare cells measured seconds apart. \
         Every configuration gets a fresh directory with volumes written full of zeroes beforehand (no first-touch allocation), \
         all on the same filesystem. `local` is the backing file through io_uring with O_DIRECT; `nbd` the replicator exporting an \
         unpaired volume; `nbd-null` is `nbdkit null` (stores nothing: the ceiling of NBD over a Unix socket with this client on this machine); `async`/`sync` a paired group between two daemons on loopback, QUIC through a userspace UDP delay proxy \
         (RTT 0 = direct); `qemu-nbd` a plain qemu-nbd export; `qemu-mirror` qemu-storage-daemon exporting the source with \
         `blockdev-mirror copy-mode=write-blocking` to a qemu-nbd target behind the equivalent TCP delay proxy. All use cache=none \
         (O_DIRECT) and io_uring.{}\n",
        r.cell_secs,
        if r.link_extra.is_empty() { String::new() } else { format!(" Every emulated link also has: {}.", r.link_extra) }
    );
    let _ = writeln!(s, "## Machine\n");
    for (k, v) in &r.machine {
        let _ = writeln!(s, "- **{k}**: {v}");
    }
    let _ = writeln!(s, "\n## Reading\n\n{READING_START}\n{reading}\n{READING_END}\n");
    let _ = writeln!(s, "## Targets\n\n{}", report::markdown_table(&r.target_rows()));
    let _ = writeln!(s, "## Latency and throughput\n\n{}", report::markdown_table(&r.table_rows()));
    let _ = writeln!(
        s,
        "Ratios: `IOPS ×local` and `IOPS ×nbd` divide this row's IOPS by the same workload's on `local` and `nbd`; \
         `p50 ×nbd` divides the median latency. `wal-4k+flush` counts a 4 KiB write plus its FLUSH as one operation. \
         `others' CPU` is the CPU (in cores) that processes outside the benchmark used on average during the cell: \
         this machine is shared, and a cell with a high value there was measured under contention.\n"
    );
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    if !r.notes.is_empty() {
        s.push('\n');
    }
    let cpu = r.cpu_rows();
    if cpu.len() > 1 {
        let _ = writeln!(
            s,
            "### CPU per operation of each daemon\n\n{}\nSite A is the unpaired export or the primary (for `qemu-mirror`, qemu-storage-daemon exporting the source and running the mirror job), site B the secondary (the mirror's target qemu-nbd). \
             Each daemon's CPU time (user + system, all its threads: `utime` + `stime` of `/proc/PID/stat`, in 10-ms ticks) \
             and context switches (voluntary + involuntary, summed over `/proc/PID/task/*/status`; a thread that exits \
             during the cell takes its count with it) from the start of the cell until everything it wrote was replicated, \
             divided by every operation of the cell (its warm-up's included): what `perf stat -e task-clock,context-switches \
             -p PID` counts over the same span (`bench/perf-per-write.sh` agrees within a few per cent). `wal-4k+flush` \
             counts a write and its FLUSH as one operation. At a few hundred operations a second (sync at RTT 5 ms) \
             the daemons' idle work (timers, the benchmark's status polls) is a visible part of each operation's share.\n",
            report::markdown_table(&cpu)
        );
    }
    if !r.calibration.is_empty() {
        let _ = writeln!(
            s,
            "### WAN emulation (UDP proxy round trip, measured)\n\n| asked RTT | p50 | p99 |\n|---:|---:|---:|"
        );
        for c in &r.calibration {
            let _ = writeln!(s, "| {} ms | {:.0} µs | {:.0} µs |", c.rtt_ms, c.p50_us, c.p99_us);
        }
        s.push('\n');
    }
    if !r.fio_check.is_empty() {
        let _ = writeln!(
            s,
            "### Our NBD client against `fio --ioengine=nbd` (same export; ours runs just before and just after fio)\n\n| server | workload | ours IOPS (before / after) | fio IOPS | ours p50 (before / after) | fio p50 (total latency) |\n|---|---|---:|---:|---:|---:|"
        );
        for f in &r.fio_check {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} µs | {:.0} µs |",
                f.config,
                f.workload,
                f.ours_iops[0],
                f.ours_iops[1],
                f.fio_iops,
                f.ours_p50_us[0],
                f.ours_p50_us[1],
                f.fio_p50_us
            );
        }
        s.push('\n');
    }
    let f = &r.figures;
    let _ = writeln!(s, "## Replication figures\n");
    if let Some(l) = &f.lag {
        let _ = writeln!(
            s,
            "### Async lag over time (link {}, {:.1} MB/s)\n\n| phase | offered | achieved | lag p50 | lag p99 | lag max | max backlog | write p50 | write p99 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            l.link, l.link_mbps
        );
        for p in &l.phases {
            let _ = writeln!(
                s,
                "| {} | {:.1} MB/s | {:.1} MB/s | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} MiB / {} records | {:.0} µs | {:.0} µs |",
                p.label,
                p.offered_mbps,
                p.achieved_mbps,
                p.lag_p50_ms,
                p.lag_p99_ms,
                p.lag_max_ms,
                p.lag_max_bytes as f64 / MIB as f64,
                p.lag_max_records,
                p.write_p50_us,
                p.write_p99_us
            );
        }
        if let Some(d) = &l.drops {
            let _ = writeln!(s, "\nDuring this run, {d}.");
        }
        let _ = writeln!(
            s,
            "\nDrained {} after the load stopped. Lag is sampled every 100 ms from `status` (lag_seconds = age of the oldest record the secondary has not applied).\n",
            l.drain_secs.map_or("not within the limit".to_string(), |d| format!("in {d:.1} s"))
        );
        let _ =
            writeln!(s, "![async lag](plots/async-lag-seconds.svg)\n![async lag bytes](plots/async-lag-bytes.svg)\n");
    }
    if !f.copy.is_empty() {
        let _ = writeln!(
            s,
            "### Initial copy\n\n| link | bytes | setup | copy time | throughput | min(disk, link) | ratio | same-disk copy floor | ratio to floor |\n|---|---:|---:|---:|---:|---|---:|---:|---:|"
        );
        for c in &f.copy {
            let _ = writeln!(
                s,
                "| {} | {} MiB | {:.2} s | {:.2} s | {:.0} MB/s | {} | {} | {} | {} |",
                c.link,
                c.bytes / MIB,
                c.setup_secs,
                c.secs,
                c.mbps,
                c.bound,
                c.bound_mbps.map_or("—".into(), |b| format!("{:.2}", c.mbps / b)),
                c.floor_mbps.map_or("—".into(), |b| format!("{b:.0} MB/s")),
                c.floor_mbps.map_or("—".into(), |b| format!("{:.2}", c.mbps / b)),
            );
        }
        let _ = writeln!(
            s,
            "\nThe same-disk copy floor is the copy done straight between the two sites' files on this machine's one \
             disk (1 MiB blocks, four in flight, O_DIRECT): each byte is read on one side and written (identical \
             sites: read) on the other, so with both sites on one disk it is the fastest any copy can go. \
             *Setup* is the time from `pair create` until the replication session is up and the copy starts \
             (status polled every 20 ms): mostly the two sites writing their journals (256 MiB each here) full \
             of zeroes and making them durable, one after the other, once per pair; *copy time* and the \
             throughput are from then until PAIR."
        );
        s.push('\n');
        for c in &f.copy {
            if let Some(d) = &c.drops {
                let _ = writeln!(s, "- copy over {}: {d}", c.link);
            }
        }
        s.push('\n');
    }
    if !f.resync.is_empty() {
        let _ = writeln!(s, "### Resync bytes against changed bytes (bitmap granularity 64 KiB)\n\n| scenario | changed (exact) | changed (rounded) | journal shipped | resync copy | ratio | note |\n|---|---:|---:|---:|---:|---:|---|");
        for x in &f.resync {
            let m = |b: u64| format!("{:.1} MiB", b as f64 / MIB as f64);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2}× | {} |",
                x.scenario,
                m(x.changed_bytes),
                m(x.changed_rounded),
                m(x.journal_bytes),
                m(x.copy_bytes),
                x.ratio,
                x.note
            );
        }
        s.push('\n');
    }
    if let Some(d) = &f.drill {
        let _ = writeln!(
            s,
            "### Drill copies\n\n`drill start` on the secondary, sparse volumes, sync pair:\n\n| volume | time to ready (daemon) | control request |\n|---:|---:|---:|"
        );
        for x in &d.start {
            let _ = writeln!(s, "| {} GiB | {:.1} ms | {:.1} ms |", x.volume_bytes >> 30, x.ready_ms, x.request_ms);
        }
        if let Some(l) = &d.latency {
            let _ = writeln!(
                s,
                "\nSync-mode 4 KiB random writes at QD1 (our NBD client), {} alternating rounds of {} writes, medians:\n\n| | p50 | p99 |\n|---|---:|---:|\n| no drill | {:.0} µs | {:.0} µs |\n| drill running | {:.0} µs | {:.0} µs |\n\nRatio (p50, drill / none): **{:.2}×** (target ≤ 1.3×); the drill copy held {:.1} MiB at its stop.",
                l.rounds,
                l.writes_per_round,
                l.without_p50_us,
                l.without_p99_us,
                l.with_p50_us,
                l.with_p99_us,
                l.ratio_p50,
                l.space_used_bytes as f64 / MIB as f64
            );
        }
        s.push('\n');
    }
    if !f.catch_up.is_empty() {
        let _ = writeln!(
            s,
            "### Catch-up from the journal\n\nAsync, RTT 0: with the secondary stopped the client writes for a while and the primary journals it; the journal's pages are dropped from the page cache (as after a longer outage), the secondary starts again, and the backlog is shipped from the journal. Catch-up is timed from the moment the session is up until the secondary has applied everything.\n\n| backlog | records | journal bytes | written at | reconnect | catch-up | records/s | MB/s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for x in &f.catch_up {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} MiB | {:.0} records/s | {:.2} s | {:.2} s | {:.0} | {:.0} |",
                x.backlog,
                x.records,
                x.bytes as f64 / MIB as f64,
                x.written_per_s,
                x.reconnect_s,
                x.catch_up_s,
                x.records as f64 / x.catch_up_s.max(1e-9),
                x.bytes as f64 / 1e6 / x.catch_up_s.max(1e-9)
            );
        }
        s.push('\n');
    }
    if let Some(g) = &f.groups {
        let _ = writeln!(
            s,
            "### Many groups\n\nAsync, RTT 0, one pair of daemons holding {} groups (64 MiB volumes): one group written alone through one connection at the whole queue depth, every group written at once (each by its own QD1 connection), and one group written through as many QD1 connections (the client's shape alone). Rounds alternate, in this order. CPU per write: each daemon's CPU time (user + system, all threads) through the round, warm-up included, over every write of it; then context switches per write.\n\n| groups written | connections | QD each | IOPS (all together) | p50 | primary CPU per write | secondary CPU per write |\n|---:|---:|---:|---:|---:|---:|---:|",
            g.groups
        );
        for r in &g.runs {
            let cpu = |role: &str| {
                r.daemons
                    .iter()
                    .find(|d| d.role == role)
                    .map_or("—".into(), |d| format!("{:.0} µs, {:.1}", d.us_per_op, d.switches_per_op))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.0} µs | {} | {} |",
                r.groups,
                r.connections,
                r.queue_depth_each,
                r.iops,
                r.p50_us,
                cpu("primary"),
                cpu("secondary")
            );
        }
        let _ = writeln!(
            s,
            "\nRatio (mean IOPS, {} groups / 1 group): **{:.2}×** (target ≥ 0.9×); against one group through as many connections: {:.2}×. VmRSS after the rounds: primary {:.1} MiB, secondary {:.1} MiB.\n",
            g.groups,
            g.ratio,
            g.ratio_same_clients,
            g.primary_kib as f64 / 1024.0,
            g.secondary_kib as f64 / 1024.0
        );
    }
    if !f.rss.is_empty() {
        let _ = writeln!(s, "### Daemon memory (VmRSS)\n\n| case | primary | secondary |\n|---|---:|---:|");
        for x in &f.rss {
            let sec = if x.secondary_kib == 0 {
                "—".to_string()
            } else {
                format!("{:.1} MiB", x.secondary_kib as f64 / 1024.0)
            };
            let _ = writeln!(s, "| {} | {:.1} MiB | {sec} |", x.label, x.primary_kib as f64 / 1024.0);
        }
        s.push('\n');
    }
    if !f.not_measurable.is_empty() {
        let _ = writeln!(s, "### Not measured\n");
        for (fig, why) in &f.not_measurable {
            let _ = writeln!(s, "- {fig}: {why}");
        }
        s.push('\n');
    }
    let cdfs: Vec<&String> = plots.iter().filter(|p| p.starts_with("latency-cdf")).collect();
    if !cdfs.is_empty() {
        let _ = writeln!(s, "## Latency CDFs\n");
        for p in cdfs {
            let _ = writeln!(s, "![{p}](plots/{p})");
        }
        s.push('\n');
    }
    s
}
