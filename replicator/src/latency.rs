//! A lock-free latency histogram (write latency per group, for metrics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds.
const BOUNDS_US: [u64; 16] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
    5_000_000,
];

/// Cumulative-bucket histogram in the Prometheus sense.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BOUNDS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        // The total first, the bucket after it with Release: a snapshot that
        // sees the bucket (Acquire) sees the total too (`snapshot`).
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        if let Some(i) = BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Release);
        }
    }

    /// Sum of the observations in seconds, their count, and the buckets
    /// as (upper bound in seconds, observations in that bucket alone), the
    /// last one `f64::MAX` for +Inf: the form prometheus-client encodes.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        // Buckets first (Acquire): `record` counts the total before the
        // bucket (Release), so the total read afterwards covers every
        // observation seen in a bucket (one whose bucket is not counted yet
        // shows in +Inf until the next scrape).
        let mut buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .zip(BOUNDS_US)
            .map(|(b, bound)| (bound as f64 / 1e6, b.load(Ordering::Acquire)))
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let counted: u64 = buckets.iter().map(|(_, n)| n).sum();
        // Observations past the last bound go to +Inf, so the buckets add up
        // to `count`.
        buckets.push((f64::MAX, count.saturating_sub(counted)));
        (sum, count, buckets)
    }
}

/// What `status` shows of a histogram: how many observations, their mean,
/// and the bucket bound the 99th percentile lies under (`None` past the
/// last bound, or with no observation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Observations.
    pub count: u64,
    /// Their mean, in seconds.
    pub mean_seconds: Option<f64>,
    /// The 99th percentile is at most this many seconds.
    pub p99_at_most_seconds: Option<f64>,
}

impl LatencyHistogram {
    /// See [`LatencySummary`].
    pub fn summary(&self) -> LatencySummary {
        let (sum, count, buckets) = self.snapshot();
        let wanted = count - count / 100;
        let mut seen = 0;
        let p99 = buckets.iter().find_map(|&(bound, n)| {
            seen += n;
            (seen >= wanted).then_some(bound)
        });
        LatencySummary {
            count,
            mean_seconds: (count > 0).then(|| sum / count as f64),
            p99_at_most_seconds: p99.filter(|b| count > 0 && *b < f64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_each_observation_once() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(40));
        h.record(Duration::from_micros(150));
        h.record(Duration::from_secs(10));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 10.00019).abs() < 1e-9, "{sum}");
        assert_eq!(buckets.len(), BOUNDS_US.len() + 1);
        assert_eq!(buckets[0], (0.00005, 1));
        assert_eq!(buckets[2], (0.0002, 1));
        assert_eq!(buckets.last(), Some(&(f64::MAX, 1)));
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }

    #[test]
    fn the_summary_bounds_the_99th_percentile() {
        let h = LatencyHistogram::default();
        assert_eq!(h.summary(), LatencySummary { count: 0, mean_seconds: None, p99_at_most_seconds: None });
        for _ in 0..99 {
            h.record(Duration::from_micros(80));
        }
        h.record(Duration::from_micros(3000));
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.p99_at_most_seconds, Some(0.0001), "99 of 100 under 100 µs");
        assert!((s.mean_seconds.unwrap_or(0.0) - 0.0001092).abs() < 1e-9, "{s:?}");
        h.record(Duration::from_secs(10));
        h.record(Duration::from_secs(10));
        assert_eq!(h.summary().p99_at_most_seconds, None, "past the last bound");
    }
}
