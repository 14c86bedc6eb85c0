//! The results: cells of the matrix, the targets of issue 4 evaluated on
//! them, and their rendering as a text table, Markdown and JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::figures::{Figures, RssRow};
use crate::stats::Summary;
use crate::workload::Workload;

/// The configurations compared, in table order.
pub const CONFIGS: [&str; 7] = ["local", "nbd-null", "nbd", "qemu-nbd", "async", "sync", "qemu-mirror"];

/// Whether a configuration depends on the link (and is measured per RTT).
pub fn is_replicated(config: &str) -> bool {
    matches!(config, "async" | "sync" | "qemu-mirror")
}

/// One measured (or skipped) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Configuration.
    pub config: String,
    /// RTT in ms (0 for configurations without a link).
    pub rtt_ms: f64,
    /// Workload name.
    pub workload: String,
    /// The numbers, if measured.
    pub summary: Option<Summary>,
    /// Why not, or a remark.
    pub note: Option<String>,
    /// CPU cores used on average by processes outside the benchmark while
    /// this cell ran (a shared machine's noise).
    pub others_cpu: Option<f64>,
}

/// Pass, miss, or not measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Verdict {
    /// Target met.
    Pass,
    /// Target missed.
    Miss,
    /// Could not be evaluated (with the reason).
    NotMeasured(String),
}

impl Verdict {
    /// PASS when the target is met, MISS otherwise.
    fn of(met: bool) -> Verdict {
        if met {
            Verdict::Pass
        } else {
            Verdict::Miss
        }
    }

    fn label(&self) -> &str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::NotMeasured(_) => "n/a",
        }
    }
}

/// A target of the issue and where this run stands.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target as stated.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Verdict.
    pub verdict: Verdict,
}

impl Target {
    /// A target this run has no figures for, and why.
    fn not_measured(goal: String, why: String) -> Target {
        Target { goal, measured: "—".into(), verdict: Verdict::NotMeasured(why) }
    }
}

/// Round-trip calibration of the UDP proxy.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Asked-for RTT, ms.
    pub rtt_ms: f64,
    /// Measured p50, µs.
    pub p50_us: f64,
    /// Measured p99, µs.
    pub p99_us: f64,
}

/// Our client against fio on the same export.
#[derive(Debug, Clone, Serialize)]
pub struct FioCheck {
    /// Server (configuration).
    pub config: String,
    /// Workload.
    pub workload: String,
    /// Our IOPS, before and after fio's run.
    pub ours_iops: [f64; 2],
    /// Our p50 µs, before and after.
    pub ours_p50_us: [f64; 2],
    /// fio's IOPS.
    pub fio_iops: f64,
    /// fio's completion-latency p50.
    pub fio_p50_us: f64,
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The command line.
    pub command: String,
    /// Machine description.
    pub machine: Vec<(String, String)>,
    /// Seconds measured per cell.
    pub cell_secs: f64,
    /// RTTs measured, ms.
    pub rtts_ms: Vec<f64>,
    /// The link description (jitter, bandwidth, loss) of the matrix.
    pub link_extra: String,
    /// Cells.
    pub cells: Vec<Cell>,
    /// Proxy calibration.
    pub calibration: Vec<Calibration>,
    /// fio cross-check.
    pub fio_check: Vec<FioCheck>,
    /// Replication figures.
    pub figures: Figures,
    /// Targets.
    pub targets: Vec<Target>,
    /// Remarks (skipped peers etc.).
    pub notes: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub wall_secs: f64,
}

impl Results {
    /// The summary of a cell, if measured.
    pub fn get(&self, config: &str, rtt_ms: f64, w: Workload) -> Option<&Summary> {
        let rtt = if is_replicated(config) { rtt_ms } else { 0.0 };
        self.cells
            .iter()
            .find(|c| c.config == config && (c.rtt_ms - rtt).abs() < 1e-9 && c.workload == w.name())
            .and_then(|c| c.summary.as_ref())
    }

    /// Why a cell is missing.
    fn why_missing(&self, config: &str, rtt_ms: f64, w: Workload) -> String {
        let rtt = if is_replicated(config) { rtt_ms } else { 0.0 };
        self.cells
            .iter()
            .find(|c| c.config == config && (c.rtt_ms - rtt).abs() < 1e-9 && c.workload == w.name())
            .and_then(|c| c.note.clone())
            .unwrap_or_else(|| format!("{config} {} not in this run", w.name()))
    }

    /// Evaluates the targets of the issue on this run's cells and figures.
    pub fn evaluate(&mut self) {
        use Workload::{RandWrite4kQd1 as Qd1, RandWrite4kQd32 as Qd32, SeqWrite1m as Seq, Wal};
        let mut t = Vec::new();
        let rtts = self.rtts_ms.clone();
        let ratio = |goal: String,
                     num: Option<f64>,
                     den: Option<f64>,
                     what: &str,
                     ok: &dyn Fn(f64) -> bool,
                     missing: String| {
            match (num, den) {
                (Some(n), Some(d)) if d > 0.0 => {
                    let r = n / d;
                    Target { goal, measured: format!("{r:.2}× ({what})"), verdict: Verdict::of(ok(r)) }
                }
                _ => Target::not_measured(goal, missing),
            }
        };
        for &r in &rtts {
            let a = self.get("async", r, Qd1).map(|s| s.p50_us);
            let n = self.get("nbd", 0.0, Qd1).map(|s| s.p50_us);
            t.push(ratio(
                format!("async 4 KiB QD1 p50 ≤ 1.25× nbd (RTT {r} ms)"),
                a,
                n,
                &format!("{:.0} vs {:.0} µs", a.unwrap_or(0.0), n.unwrap_or(0.0)),
                &|x| x <= 1.25,
                self.why_missing("async", r, Qd1),
            ));
            let a = self.get("async", r, Qd32).map(|s| s.iops);
            let n = self.get("nbd", 0.0, Qd32).map(|s| s.iops);
            t.push(ratio(
                format!("async QD32 IOPS ≥ 0.8× nbd (RTT {r} ms)"),
                a,
                n,
                &format!("{:.0} vs {:.0} IOPS", a.unwrap_or(0.0), n.unwrap_or(0.0)),
                &|x| x >= 0.8,
                self.why_missing("async", r, Qd32),
            ));
            let a = self.get("async", r, Wal).map(|s| s.iops);
            let n = self.get("nbd", 0.0, Wal).map(|s| s.iops);
            t.push(ratio(
                format!("async WAL (4 KiB + FLUSH) IOPS ≥ 0.7× nbd (RTT {r} ms)"),
                a,
                n,
                &format!("{:.0} vs {:.0} IOPS", a.unwrap_or(0.0), n.unwrap_or(0.0)),
                &|x| x >= 0.7,
                self.why_missing("async", r, Wal),
            ));
        }
        for mode in ["async", "sync"] {
            let m = self.get(mode, 0.0, Seq).map(|s| s.mbps);
            let n = self.get("nbd", 0.0, Seq).map(|s| s.mbps);
            t.push(ratio(
                format!("{mode} 1 MiB sequential write ≥ 0.5× nbd (RTT 0)"),
                m,
                n,
                &format!("{:.0} vs {:.0} MB/s", m.unwrap_or(0.0), n.unwrap_or(0.0)),
                &|x| x >= 0.5,
                self.why_missing(mode, 0.0, Seq),
            ));
        }
        for (w, label, goal) in [(Qd1, "QD1", 1.5), (Qd32, "QD32", 2.0)] {
            let s = self.get("sync", 0.0, w).map(|s| s.iops);
            let q = self.get("qemu-mirror", 0.0, w).map(|s| s.iops);
            t.push(ratio(
                format!("sync {label} IOPS ≥ {goal}× QEMU write-blocking mirror (RTT 0)"),
                s,
                q,
                &format!("{:.0} vs {:.0} IOPS", s.unwrap_or(0.0), q.unwrap_or(0.0)),
                &|x| x >= goal,
                if q.is_none() { self.why_missing("qemu-mirror", 0.0, w) } else { self.why_missing("sync", 0.0, w) },
            ));
        }
        for &r in &rtts {
            let goal = format!("sync QD1 p50 ≤ RTT + 1.2× nbd p50 + 100 µs (RTT {r} ms)");
            // The RTT the packets really had: the emulator's measured round
            // trip (its wake-ups add a little to the asked-for delay).
            let (rtt_us, how) = match self.calibration.iter().find(|c| (c.rtt_ms - r).abs() < 1e-9) {
                Some(c) => (c.p50_us, format!("; RTT {:.2} ms as measured through the emulator", c.p50_us / 1e3)),
                None => (r * 1e3, String::new()),
            };
            match (self.get("sync", r, Qd1), self.get("nbd", 0.0, Qd1)) {
                (Some(s), Some(n)) => {
                    let bound = rtt_us + 1.2 * n.p50_us + 100.0;
                    t.push(Target {
                        goal,
                        measured: format!("{:.0} µs vs bound {bound:.0} µs{how}", s.p50_us),
                        verdict: Verdict::of(s.p50_us <= bound),
                    });
                }
                _ => t.push(Target::not_measured(goal, self.why_missing("sync", r, Qd1))),
            }
            let goal = format!("sync QD32 pipelines: IOPS ≥ 0.5 × min(32 × QD1 IOPS, nbd QD32 IOPS) (RTT {r} ms)");
            match (self.get("sync", r, Qd1), self.get("sync", r, Qd32), self.get("nbd", 0.0, Qd32)) {
                (Some(q1), Some(q32), Some(n)) => {
                    let ideal = (32.0 * q1.iops).min(n.iops);
                    t.push(Target {
                        goal,
                        measured: format!(
                            "QD32 {:.0} IOPS = {:.1}× QD1; {:.0}% of the ideal {ideal:.0}",
                            q32.iops,
                            q32.iops / q1.iops.max(1e-9),
                            100.0 * q32.iops / ideal.max(1e-9)
                        ),
                        verdict: Verdict::of(q32.iops >= 0.5 * ideal),
                    });
                }
                _ => t.push(Target::not_measured(goal, self.why_missing("sync", r, Qd32))),
            }
        }
        let n = self.get("nbd", 0.0, Qd1).map(|s| s.p50_us);
        let q = self.get("qemu-nbd", 0.0, Qd1).map(|s| s.p50_us);
        t.push(ratio(
            "nbd QD1 p50 ≤ 1.3× qemu-nbd plain".into(),
            n,
            q,
            &format!("{:.0} vs {:.0} µs", n.unwrap_or(0.0), q.unwrap_or(0.0)),
            &|x| x <= 1.3,
            if q.is_none() { self.why_missing("qemu-nbd", 0.0, Qd1) } else { self.why_missing("nbd", 0.0, Qd1) },
        ));
        let n = self.get("nbd", 0.0, Seq).map(|s| s.mbps);
        let l = self.get("local", 0.0, Seq).map(|s| s.mbps);
        t.push(ratio(
            "nbd 1 MiB sequential write ≥ 0.9× local".into(),
            n,
            l,
            &format!("{:.0} vs {:.0} MB/s", n.unwrap_or(0.0), l.unwrap_or(0.0)),
            &|x| x >= 0.9,
            self.why_missing("nbd", 0.0, Seq),
        ));
        let goal = "async lag p99 ≤ 100 ms while the load stays below the link's bandwidth".to_string();
        match self.figures.lag.as_ref().and_then(|l| l.phases.first().map(|p| (l, p))) {
            Some((l, p)) => t.push(Target {
                goal,
                measured: format!(
                    "p99 {:.1} ms at {:.1} MB/s on a {:.1} MB/s link ({})",
                    p.lag_p99_ms, p.achieved_mbps, l.link_mbps, l.link
                ),
                verdict: Verdict::of(p.lag_p99_ms <= 100.0),
            }),
            None => t.push(Target::not_measured(goal, "lag figure not run".into())),
        }
        let goal =
            "many groups: 32 groups each under load within 10 % of one group at the same total queue depth".to_string();
        match &self.figures.groups {
            Some(g) => t.push(Target {
                goal,
                measured: format!(
                    "{:.2}× ({} groups at QD1 each against 1 group at QD{})",
                    g.ratio, g.groups, g.groups
                ),
                verdict: if g.groups < 32 {
                    Verdict::NotMeasured(format!("only {} groups in this run (--quick)", g.groups))
                } else if g.ratio >= 0.9 {
                    Verdict::Pass
                } else {
                    Verdict::Miss
                },
            }),
            None => t.push(Target::not_measured(goal, "many-groups figure not run".into())),
        }
        for r in &self.figures.resync {
            t.push(Target {
                goal: format!("resync bytes ≤ 1.1× changed bytes rounded to 64 KiB — {}", r.scenario),
                measured: format!(
                    "{:.2}× ({:.1} MiB journal + {:.1} MiB copy vs {:.1} MiB changed)",
                    r.ratio,
                    r.journal_bytes as f64 / 1048576.0,
                    r.copy_bytes as f64 / 1048576.0,
                    r.changed_rounded as f64 / 1048576.0
                ),
                verdict: Verdict::of(r.ratio <= 1.1),
            });
        }
        t.push(self.rss_target());
        let disk = self.get("local", 0.0, Seq).map(|s| s.mbps);
        for identical in [false, true] {
            let goal = if identical {
                "resync on loopback (sites identical: every chunk compared by hash) ≥ 0.5× the disk's sequential speed"
            } else {
                "initial copy on loopback ≥ 0.5× the disk's sequential speed"
            };
            let run = self.figures.copy.iter().find(|c| c.loopback && c.identical == identical);
            let floor = run
                .and_then(|c| c.floor_mbps.map(|f| (c.mbps / f, f)))
                .map_or(String::new(), |(r, f)| format!("; {r:.2}× the same copy between the files, {f:.0} MB/s"));
            t.push(ratio(
                goal.into(),
                run.map(|c| c.mbps),
                disk,
                &format!("{:.0} vs {:.0} MB/s{floor}", run.map_or(0.0, |c| c.mbps), disk.unwrap_or(0.0)),
                &|x| x >= 0.5,
                if run.is_none() { "copy figure not run".into() } else { self.why_missing("local", 0.0, Seq) },
            ));
        }
        for mode in ["async", "sync"] {
            for (w, label) in [(Qd1, "QD1"), (Qd32, "QD32")] {
                let goal =
                    format!("CPU per 4 KiB write per daemon ≤ 60 µs and ≤ 3 context switches ({mode} {label}, RTT 0)");
                match self.get(mode, 0.0, w).filter(|s| !s.daemons.is_empty()) {
                    Some(s) => t.push(Target {
                        goal,
                        measured: s
                            .daemons
                            .iter()
                            .map(|d| format!("{} {:.0} µs, {:.1} switches", d.role, d.us_per_op, d.switches_per_op))
                            .collect::<Vec<_>>()
                            .join("; "),
                        verdict: Verdict::of(s.daemons.iter().all(|d| d.us_per_op <= 60.0 && d.switches_per_op <= 3.0)),
                    }),
                    None => t.push(Target::not_measured(goal, self.why_missing(mode, 0.0, w))),
                }
            }
        }
        self.targets = t;
    }

    /// "RSS linear in configured buffers", on the memory figure: a backlog
    /// of any size keeps the primary within its idle size plus the payload
    /// cache (`CACHE_BUDGET`, +10 %), whatever the journal's size; and each
    /// group added costs no more memory from 8 to 32 groups than from 1 to
    /// 8 (linear, or better).
    fn rss_target(&self) -> Target {
        let cache_mib = replicator::group::CACHE_BUDGET >> 20;
        let goal = format!(
            "RSS linear in configured buffers: a backlog holds the primary within idle + the {cache_mib} MiB payload \
             cache (+10 %) whatever the journal's size; each added idle group costs no more from 8 to 32 groups than \
             from 1 to 8"
        );
        let rows = &self.figures.rss;
        let idle = |n: usize| rows.iter().find(|r| r.groups == n && r.backlog_bytes == 0);
        let most = rows.iter().filter(|r| r.backlog_bytes == 0).max_by_key(|r| r.groups);
        let (Some(one), Some(eight), Some(most)) = (idle(1), idle(8), most) else {
            return Target::not_measured(goal, "memory figure not run".into());
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        let cap = (mib(one.primary_kib) + cache_mib as f64) * 1.1;
        let backlog: Vec<f64> = rows.iter().filter(|r| r.backlog_bytes > 0).map(|r| mib(r.primary_kib)).collect();
        let worst = backlog.iter().copied().fold(0.0, f64::max);
        let mut measured = format!("backlog: primary at most {worst:.1} MiB against {cap:.1}");
        let mut ok = !backlog.is_empty() && worst <= cap;
        if most.groups > eight.groups {
            for site in ["primary", "secondary"] {
                let kib = |r: &RssRow| if site == "primary" { r.primary_kib } else { r.secondary_kib };
                // MiB per group added between two idle rows.
                let per_group = |a: &RssRow, b: &RssRow| (mib(kib(b)) - mib(kib(a))) / (b.groups - a.groups) as f64;
                let (early, late) = (per_group(one, eight), per_group(eight, most));
                measured.push_str(&format!(
                    "; {site} {early:.2} MiB per group from 1 to 8, {late:.2} from 8 to {}",
                    most.groups
                ));
                // (a twentieth of a MiB per group is the noise of idle RSS)
                ok &= late <= early.max(0.05);
            }
        }
        Target { goal, measured, verdict: Verdict::of(ok) }
    }

    /// Rows of the table of each daemon's CPU per operation: header first;
    /// one row per measured cell served by daemons (ours and QEMU's).
    pub fn cpu_rows(&self) -> Vec<Vec<String>> {
        let mut rows = vec![[
            "config",
            "RTT",
            "workload",
            "IOPS",
            "site A µs/op",
            "site A switches/op",
            "site B µs/op",
            "site B switches/op",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect::<Vec<_>>()];
        for c in &self.cells {
            let Some(s) = c.summary.as_ref().filter(|s| !s.daemons.is_empty()) else { continue };
            let rtt = if is_replicated(&c.config) { format!("{} ms", c.rtt_ms) } else { "—".into() };
            let mut row = vec![c.config.clone(), rtt, c.workload.clone(), format!("{:.0}", s.iops)];
            // Site A: the export or the primary; site B: the secondary.
            for site_b in [false, true] {
                match s.daemons.iter().find(|d| (d.role == "secondary") == site_b) {
                    Some(d) => row.extend([format!("{:.1}", d.us_per_op), format!("{:.2}", d.switches_per_op)]),
                    None => row.extend(["—".to_string(), "—".to_string()]),
                }
            }
            rows.push(row);
        }
        rows
    }

    /// Rows of the main table: header first.
    pub fn table_rows(&self) -> Vec<Vec<String>> {
        let mut rows = vec![[
            "config",
            "RTT",
            "workload",
            "IOPS",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "IOPS ×local",
            "IOPS ×nbd",
            "p50 ×nbd",
            "others' CPU",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect::<Vec<_>>()];
        for c in &self.cells {
            let Some(w) = Workload::ALL.into_iter().find(|w| w.name() == c.workload) else { continue };
            let rtt = if is_replicated(&c.config) { format!("{} ms", c.rtt_ms) } else { "—".into() };
            let mut row = vec![c.config.clone(), rtt, c.workload.clone()];
            match &c.summary {
                Some(s) => {
                    let local = self.get("local", 0.0, w);
                    let nbd = self.get("nbd", 0.0, w);
                    let ratio = |a: f64, b: Option<f64>| {
                        b.filter(|b| *b > 0.0).map_or("—".to_string(), |b| format!("{:.2}", a / b))
                    };
                    row.extend([
                        format!("{:.0}", s.iops),
                        format!("{:.1}", s.mbps),
                        format!("{:.0}", s.p50_us),
                        format!("{:.0}", s.p99_us),
                        format!("{:.0}", s.p999_us),
                        ratio(s.iops, local.map(|l| l.iops)),
                        ratio(s.iops, nbd.map(|n| n.iops)),
                        ratio(s.p50_us, nbd.map(|n| n.p50_us)),
                        c.others_cpu.map_or(String::new(), |x| format!("{x:.2}")),
                    ]);
                }
                None => {
                    row.push(c.note.clone().unwrap_or_else(|| "not measured".into()));
                    row.extend(std::iter::repeat_n(String::new(), 8));
                }
            }
            rows.push(row);
        }
        rows
    }

    /// Target rows: header first.
    pub fn target_rows(&self) -> Vec<Vec<String>> {
        let mut rows = vec![vec!["target".to_string(), "measured".into(), "verdict".into()]];
        for t in &self.targets {
            let measured = match &t.verdict {
                Verdict::NotMeasured(why) => why.clone(),
                _ => t.measured.clone(),
            };
            rows.push(vec![t.goal.clone(), measured, t.verdict.label().into()]);
        }
        rows
    }
}

/// Renders rows as an aligned text table (numbers right-aligned). A row
/// with a single long message after the first cells is left as it is.
pub fn text_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0usize; cols];
    for r in rows {
        let filled = r.iter().filter(|c| !c.is_empty()).count();
        for (i, c) in r.iter().enumerate() {
            // A note spanning the numeric columns does not widen them.
            if filled < r.len() && i + 1 == filled {
                continue;
            }
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (n, r) in rows.iter().enumerate() {
        let filled = r.iter().filter(|c| !c.is_empty()).count();
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i >= filled {
                break;
            }
            let pad = width[i].saturating_sub(c.chars().count());
            let numeric = c.chars().next().is_some_and(|ch| ch.is_ascii_digit() || ch == '—') && n > 0 && i >= 3;
            if i > 0 {
                line.push_str("  ");
            }
            if numeric {
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            } else if i + 1 == filled {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if n == 0 {
            let total: usize = width.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
            out.push_str(&"-".repeat(total.min(160)));
            out.push('\n');
        }
    }
    out
}

/// Renders rows as a Markdown table (first row is the header).
pub fn markdown_table(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let Some(head) = rows.first() else { return out };
    let esc = |s: &str| s.replace('|', "\\|");
    let _ = writeln!(out, "| {} |", head.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(
        out,
        "|{}|",
        head.iter().enumerate().map(|(i, _)| if i >= 3 { "---:" } else { "---" }).collect::<Vec<_>>().join("|")
    );
    for r in &rows[1..] {
        let mut cells: Vec<String> = r.iter().map(|c| esc(c)).collect();
        cells.resize(head.len(), String::new());
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{DaemonCpu, RunOutcome, Summary};

    fn summary(iops: f64, p50_us: u64) -> Summary {
        let n = iops as u64;
        Summary::from_outcome(RunOutcome {
            ops: n,
            bytes: n * 4096,
            secs: 1.0,
            lat_ns: vec![p50_us * 1000; 10],
            ..RunOutcome::default()
        })
    }

    fn cell(config: &str, rtt: f64, w: Workload, s: Option<Summary>) -> Cell {
        Cell {
            config: config.into(),
            rtt_ms: rtt,
            workload: w.name().into(),
            note: s.is_none().then(|| "skipped: qemu-storage-daemon not found".into()),
            summary: s,
            others_cpu: None,
        }
    }

    fn results(cells: Vec<Cell>) -> Results {
        Results {
            command: "replicator-bench".into(),
            machine: vec![],
            cell_secs: 1.0,
            rtts_ms: vec![0.0, 5.0],
            link_extra: String::new(),
            cells,
            calibration: vec![],
            fio_check: vec![],
            figures: Figures::default(),
            targets: vec![],
            notes: vec![],
            wall_secs: 0.0,
        }
    }

    #[test]
    fn targets_pass_miss_and_not_measured() {
        use Workload::*;
        let mut r = results(vec![
            cell("local", 0.0, RandWrite4kQd1, Some(summary(20000.0, 40))),
            cell("nbd", 0.0, RandWrite4kQd1, Some(summary(10000.0, 100))),
            cell("nbd", 0.0, RandWrite4kQd32, Some(summary(50000.0, 600))),
            cell("async", 0.0, RandWrite4kQd1, Some(summary(8000.0, 120))),
            cell("async", 0.0, RandWrite4kQd32, Some(summary(30000.0, 900))),
            cell("sync", 5.0, RandWrite4kQd1, Some(summary(190.0, 5200))),
            cell("sync", 5.0, RandWrite4kQd32, Some(summary(5000.0, 6000))),
            cell("qemu-mirror", 0.0, RandWrite4kQd1, None),
        ]);
        r.evaluate();
        let find = |prefix: &str| r.targets.iter().find(|t| t.goal.starts_with(prefix)).map(|t| t.verdict.clone());
        // 120 / 100 = 1.2 ≤ 1.25.
        assert_eq!(find("async 4 KiB QD1 p50 ≤ 1.25× nbd (RTT 0 ms)"), Some(Verdict::Pass));
        // 30000 / 50000 = 0.6 < 0.8.
        assert_eq!(find("async QD32 IOPS ≥ 0.8× nbd (RTT 0 ms)"), Some(Verdict::Miss));
        // Not measured at RTT 5 ms.
        assert!(matches!(find("async QD32 IOPS ≥ 0.8× nbd (RTT 5 ms)"), Some(Verdict::NotMeasured(_))));
        // The skipped peer's note is carried into the target.
        match find("sync QD1 IOPS ≥ 1.5×") {
            Some(Verdict::NotMeasured(why)) => assert!(why.contains("qemu-storage-daemon"), "{why}"),
            other => panic!("{other:?}"),
        }
        // 5200 ≤ 5000 + 120 + 100.
        assert_eq!(find("sync QD1 p50 ≤ RTT + 1.2× nbd p50 + 100 µs (RTT 5 ms)"), Some(Verdict::Pass));
        // ideal = min(32 × 190, 50000) = 6080; 5000 ≥ 3040.
        assert_eq!(
            find("sync QD32 pipelines: IOPS ≥ 0.5 × min(32 × QD1 IOPS, nbd QD32 IOPS) (RTT 5 ms)"),
            Some(Verdict::Pass)
        );
    }

    #[test]
    fn the_many_groups_target_needs_32_groups_within_a_tenth_of_one() {
        let many =
            |r: &Results| r.targets.iter().find(|t| t.goal.starts_with("many groups")).map(|t| t.verdict.clone());
        let mut r = results(Vec::new());
        r.evaluate();
        assert!(matches!(many(&r), Some(Verdict::NotMeasured(_))), "not run");
        for (groups, ratio, verdict) in
            [(8, 0.95, None), (32, 0.85, Some(Verdict::Miss)), (32, 0.95, Some(Verdict::Pass))]
        {
            r.figures.groups = Some(crate::figures::GroupsFigure { groups, ratio, ..Default::default() });
            r.evaluate();
            match verdict {
                Some(v) => assert_eq!(many(&r), Some(v), "{groups} groups at {ratio}"),
                None => assert!(matches!(many(&r), Some(Verdict::NotMeasured(_))), "only {groups} groups"),
            }
        }
    }

    #[test]
    fn the_cpu_target_holds_every_daemon_to_60_us_and_3_switches() {
        use Workload::*;
        let with = |daemons: &[(&'static str, f64, f64)]| {
            let mut s = summary(30000.0, 900);
            s.daemons = daemons
                .iter()
                .map(|&(role, us_per_op, switches_per_op)| DaemonCpu { role, us_per_op, switches_per_op })
                .collect();
            Some(s)
        };
        let mut r = results(vec![
            cell("nbd", 0.0, RandWrite4kQd32, with(&[("export", 11.0, 0.1)])),
            cell("async", 0.0, RandWrite4kQd1, with(&[("primary", 90.0, 2.0), ("secondary", 50.0, 1.0)])),
            cell("async", 0.0, RandWrite4kQd32, with(&[("primary", 20.0, 0.3), ("secondary", 15.0, 0.2)])),
            cell("sync", 0.0, RandWrite4kQd32, with(&[("primary", 40.0, 3.5), ("secondary", 15.0, 0.2)])),
            cell("sync", 0.0, RandWrite4kQd1, None),
        ]);
        r.evaluate();
        let find = |goal: &str| r.targets.iter().find(|t| t.goal.contains(goal)).map(|t| t.verdict.clone());
        assert_eq!(find("(async QD1, RTT 0)"), Some(Verdict::Miss), "the primary's 90 µs");
        assert_eq!(find("(async QD32, RTT 0)"), Some(Verdict::Pass));
        assert_eq!(find("(sync QD32, RTT 0)"), Some(Verdict::Miss), "3.5 switches");
        assert!(matches!(find("(sync QD1, RTT 0)"), Some(Verdict::NotMeasured(_))));
        let rows = r.cpu_rows();
        assert_eq!(rows.len(), 5, "a header and one row per cell with daemons: {rows:?}");
        assert_eq!(rows[1][4..], ["11.0", "0.10", "—", "—"]);
        assert_eq!(rows[2][4..], ["90.0", "2.00", "50.0", "1.00"]);
    }

    #[test]
    fn the_copy_and_resync_targets_compare_with_the_disk() {
        use Workload::*;
        let mut r = results(vec![cell("local", 0.0, SeqWrite1m, Some(summary(1000.0, 1000)))]);
        let disk = r.get("local", 0.0, SeqWrite1m).map(|s| s.mbps).unwrap_or(0.0);
        let run = |identical: bool, mbps: f64| crate::figures::CopyRun {
            link: "RTT 0ms".into(),
            loopback: true,
            identical,
            bytes: 1 << 29,
            setup_secs: 1.0,
            secs: 1.0,
            mbps,
            bound_mbps: Some(disk),
            bound: String::new(),
            drops: None,
            floor_mbps: Some(disk / 2.0),
        };
        let find = |r: &Results, goal: &str| {
            r.targets.iter().find(|t| t.goal.starts_with(goal)).map(|t| (t.verdict.clone(), t.measured.clone()))
        };
        r.evaluate();
        assert!(matches!(find(&r, "initial copy on loopback"), Some((Verdict::NotMeasured(_), _))));
        r.figures.copy = vec![run(false, disk * 0.6), run(true, disk * 0.4)];
        r.evaluate();
        let (v, measured) = find(&r, "initial copy on loopback").unwrap_or((Verdict::Miss, String::new()));
        assert_eq!(v, Verdict::Pass);
        assert!(measured.contains("1.20× the same copy between the files"), "{measured}");
        assert_eq!(find(&r, "resync on loopback").map(|x| x.0), Some(Verdict::Miss));
    }

    #[test]
    fn the_memory_target_bounds_a_backlog_by_the_cache_and_groups_linearly() {
        let row = |groups: usize, backlog_mib: u64, primary_mib: u64, secondary_mib: u64| RssRow {
            label: String::new(),
            groups,
            journal_bytes: 0,
            backlog_bytes: backlog_mib << 20,
            primary_kib: primary_mib << 10,
            secondary_kib: secondary_mib << 10,
        };
        let verdict = |rows: Vec<RssRow>| {
            let mut r = results(Vec::new());
            r.figures.rss = rows;
            r.evaluate();
            r.targets.iter().find(|t| t.goal.starts_with("RSS linear")).map(|t| t.verdict.clone())
        };
        assert!(matches!(verdict(Vec::new()), Some(Verdict::NotMeasured(_))));
        // Idle 12, 15, 17 MiB (0.43 then 0.08 MiB per group); a backlog of 384 MiB at 142.
        let good = vec![row(1, 0, 12, 14), row(8, 0, 15, 20), row(32, 0, 17, 27), row(1, 384, 142, 0)];
        assert_eq!(verdict(good), Some(Verdict::Pass));
        // A backlog past the payload cache: memory grows with the data.
        let leaky = vec![row(1, 0, 12, 14), row(8, 0, 15, 20), row(32, 0, 17, 27), row(1, 384, 300, 0)];
        assert_eq!(verdict(leaky), Some(Verdict::Miss));
        // Each group past 8 costs more than the first ones did.
        let superlinear = vec![row(1, 0, 12, 14), row(8, 0, 15, 20), row(32, 0, 40, 27), row(1, 384, 142, 0)];
        assert_eq!(verdict(superlinear), Some(Verdict::Miss));
    }

    #[test]
    fn tables_render_ratios_and_notes() {
        use Workload::*;
        let r = results(vec![
            cell("local", 0.0, RandWrite4kQd1, Some(summary(20000.0, 40))),
            cell("nbd", 0.0, RandWrite4kQd1, Some(summary(10000.0, 100))),
            cell("qemu-mirror", 5.0, RandWrite4kQd1, None),
        ]);
        let rows = r.table_rows();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[2][0], "nbd");
        assert_eq!(rows[2][1], "—");
        assert_eq!(rows[2][8], "0.50"); // IOPS × local
        assert_eq!(rows[2][9], "1.00"); // IOPS × nbd
        assert_eq!(rows[3][1], "5 ms");
        assert!(rows[3][3].starts_with("skipped"));
        let text = text_table(&rows);
        assert!(text.lines().nth(1).is_some_and(|l| l.starts_with("----")));
        assert!(text.contains("skipped: qemu-storage-daemon not found"));
        let md = markdown_table(&rows);
        assert!(md.starts_with("| config | RTT | workload | IOPS |"));
        assert_eq!(md.lines().count(), 5);
        assert!(md.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
    }
}
