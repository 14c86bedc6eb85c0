//! Latency samples, percentiles and the summary of one measured cell.

use serde::Serialize;

use crate::monitor::Usage;

/// Nearest-rank percentile of an ascending slice (`p` in 0..=1): the
/// smallest sample such that at least `p` of all samples are at or below it.
/// 0 for an empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let p = p.clamp(0.0, 1.0);
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Empirical CDF of ascending samples (nanoseconds), reduced to at most
/// `max_points` points `(microseconds, fraction at or below)`, always keeping
/// the first and the last sample (the tail is what a reader looks for).
pub fn cdf_points(sorted: &[u64], max_points: usize) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n == 0 || max_points == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(max_points.min(n) + 1);
    let step = (n as f64 / max_points as f64).max(1.0);
    let mut i = 0.0f64;
    while (i as usize) < n {
        let k = i as usize;
        out.push((sorted[k] as f64 / 1e3, (k + 1) as f64 / n as f64));
        i += step;
    }
    if out.last().map(|&(_, f)| f < 1.0).unwrap_or(true) {
        out.push((sorted[n - 1] as f64 / 1e3, 1.0));
    }
    out
}

/// Raw outcome of running one workload against one target.
#[derive(Debug, Default, Clone)]
pub struct RunOutcome {
    /// Completed operations (a WAL operation is a write plus its flush).
    pub ops: u64,
    /// Bytes moved (read + written).
    pub bytes: u64,
    /// Wall time of the measured phase, seconds.
    pub secs: f64,
    /// Latency of every completed operation, nanoseconds (unsorted).
    pub lat_ns: Vec<u64>,
    /// Operations that failed (server errors).
    pub errors: u64,
    /// Every operation completed, the warm-up's and those still in flight
    /// when the measured phase ended included.
    pub all_ops: u64,
    /// The CPU each daemon serving the export spent per operation.
    pub daemons: Vec<DaemonCpu>,
}

/// What one daemon spent per operation of a cell: its CPU and context
/// switches from the cell's start until it had replicated everything the
/// cell wrote, divided by every operation of the cell (warm-up included).
#[derive(Debug, Clone, Serialize)]
pub struct DaemonCpu {
    /// `export` (an unpaired volume), `primary` or `secondary`.
    pub role: &'static str,
    /// CPU time (user + system, all threads) per operation, µs.
    pub us_per_op: f64,
    /// Context switches per operation.
    pub switches_per_op: f64,
}

impl DaemonCpu {
    /// The difference of two samples of one daemon over `ops` operations.
    pub fn between(role: &'static str, before: Usage, after: Usage, ops: u64) -> DaemonCpu {
        let n = ops.max(1) as f64;
        DaemonCpu {
            role,
            us_per_op: (after.cpu_secs - before.cpu_secs).max(0.0) * 1e6 / n,
            switches_per_op: after.switches.saturating_sub(before.switches) as f64 / n,
        }
    }
}

/// The summary of one (configuration, RTT, workload) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Completed operations.
    pub ops: u64,
    /// Measured seconds.
    pub secs: f64,
    /// Operations per second.
    pub iops: f64,
    /// MB/s (10^6 bytes).
    pub mbps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Maximum, µs.
    pub max_us: f64,
    /// Failed operations.
    pub errors: u64,
    /// Latency CDF for the plots (µs, fraction).
    #[serde(skip)]
    pub cdf: Vec<(f64, f64)>,
    /// CPU per operation of each daemon serving the export.
    pub daemons: Vec<DaemonCpu>,
}

impl Summary {
    /// Sorts the samples and summarises them.
    pub fn from_outcome(mut o: RunOutcome) -> Summary {
        o.lat_ns.sort_unstable();
        let s = &o.lat_ns;
        let us = |ns: u64| ns as f64 / 1e3;
        let secs = o.secs.max(1e-9);
        let mean = if s.is_empty() { 0.0 } else { s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64 / 1e3 };
        Summary {
            ops: o.ops,
            secs: o.secs,
            iops: o.ops as f64 / secs,
            mbps: o.bytes as f64 / secs / 1e6,
            p50_us: us(percentile(s, 0.50)),
            p99_us: us(percentile(s, 0.99)),
            p999_us: us(percentile(s, 0.999)),
            mean_us: mean,
            max_us: us(s.last().copied().unwrap_or(0)),
            errors: o.errors,
            cdf: cdf_points(s, 400),
            daemons: o.daemons,
        }
    }
}

/// p-th percentile of unsorted floating-point samples (nearest rank).
pub fn percentile_f64(samples: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 0.999), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.999), 7);
        // 1000 samples: p99.9 is the 999th, not the maximum.
        let w: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&w, 0.999), 999);
        assert_eq!(percentile_f64(&[3.0, 1.0, 2.0, f64::NAN], 0.5), 2.0);
    }

    #[test]
    fn summary_rates_and_cdf() {
        let o = RunOutcome {
            ops: 4,
            bytes: 4 * 4096,
            secs: 2.0,
            lat_ns: vec![4000, 1000, 3000, 2000],
            ..RunOutcome::default()
        };
        let s = Summary::from_outcome(o);
        assert_eq!(s.iops, 2.0);
        assert!((s.mbps - 0.008192).abs() < 1e-9);
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.max_us, 4.0);
        assert_eq!(s.mean_us, 2.5);
        assert_eq!(s.cdf.first(), Some(&(1.0, 0.25)));
        assert_eq!(s.cdf.last(), Some(&(4.0, 1.0)));
        let big: Vec<u64> = (0..10_000).collect();
        let c = cdf_points(&big, 100);
        assert!(c.len() <= 102);
        assert_eq!(c.last().map(|p| p.1), Some(1.0));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
