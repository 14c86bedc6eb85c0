//! A lock-free latency histogram (write latency per group, for metrics).

use std::fmt::Write as _;
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
        if let Some(i) = BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Appends the Prometheus text form.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, bound) in self.buckets.iter().zip(BOUNDS_US) {
            cumulative += b.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}", bound as f64 / 1e6);
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(40));
        h.record(Duration::from_micros(150));
        h.record(Duration::from_secs(10));
        let mut s = String::new();
        h.render(&mut s, "x", "g=\"a\"");
        assert!(s.contains("x_bucket{g=\"a\",le=\"0.00005\"} 1"), "{s}");
        assert!(s.contains("x_bucket{g=\"a\",le=\"0.0002\"} 2"), "{s}");
        assert!(s.contains("x_bucket{g=\"a\",le=\"+Inf\"} 3"), "{s}");
        assert!(s.contains("x_count{g=\"a\"} 3"), "{s}");
    }
}
