//! Where a slow write's time went.
//!
//! Every client write carries a [`Stages`]: the time it spent in each step
//! of the write path (admission, earlier overlapping writes, the save of
//! a region new to the activity log or dirty bitmap, building the payload, the journal append, earlier
//! appends, the volume write, the sync, the secondary's receipt). A write
//! slower than [`SLOW_WRITE`] is logged with each step's share, at most one
//! line per group every [`LOG_EVERY_MS`] (with how many more were slow
//! since): "volume write 140 ms" points at the disk, "secondary" at the
//! link or the peer, "admission" at a full journal or activity log. The
//! write latency histogram (`status --json`, metrics) counts them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A write slower than this is logged with where its time went.
pub const SLOW_WRITE: Duration = Duration::from_millis(100);
/// At most one slow-write line per group this often (ms).
pub const LOG_EVERY_MS: u64 = 10_000;
/// The most distinct steps a write records (the write path has nine).
const MAX_STEPS: usize = 10;

/// The time a write spent in each step of its path, in the order first
/// seen (a zero-write done in pieces adds each piece's steps up).
#[derive(Debug)]
pub struct Stages {
    started: Instant,
    /// When the last step ended.
    last: Instant,
    steps: [(&'static str, Duration); MAX_STEPS],
    len: usize,
}

impl Stages {
    /// A write that starts now.
    pub fn start() -> Stages {
        let now = Instant::now();
        Stages { started: now, last: now, steps: [("", Duration::ZERO); MAX_STEPS], len: 0 }
    }

    /// The write has just finished `step`.
    pub fn mark(&mut self, step: &'static str) {
        self.mark_at(step, Instant::now());
    }

    fn mark_at(&mut self, step: &'static str, at: Instant) {
        let took = at.saturating_duration_since(self.last);
        self.last = at;
        if let Some((_, d)) = self.steps[..self.len].iter_mut().find(|(s, _)| *s == step) {
            *d += took;
        } else if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = (step, took);
            self.len += 1;
        }
    }

    /// No step finished yet (the write was not admitted).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Since the write started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// "admission 0.0 ms, volume write 141.3 ms": each step's share, then
    /// the time from the last step's end to `took` after the start when
    /// there is any to speak of (the step a failed write stopped in).
    pub fn describe(&self, took: Duration) -> String {
        self.describe_at(self.started + took)
    }

    fn describe_at(&self, now: Instant) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut out: Vec<String> =
            self.steps[..self.len].iter().map(|(step, d)| format!("{step} {:.1} ms", ms(*d))).collect();
        let rest = now.saturating_duration_since(self.last);
        if rest >= Duration::from_micros(50) {
            out.push(format!("after that {:.1} ms", ms(rest)));
        }
        out.join(", ")
    }
}

/// One group's slow-write lines, rate limited.
#[derive(Debug)]
pub struct SlowWriteLog {
    /// When the last line was logged (group clock, ms); `u64::MAX` before
    /// any.
    logged_at: AtomicU64,
    /// Slow writes since the last line.
    unlogged: AtomicU64,
}

impl Default for SlowWriteLog {
    fn default() -> Self {
        SlowWriteLog { logged_at: AtomicU64::new(u64::MAX), unlogged: AtomicU64::new(0) }
    }
}

impl SlowWriteLog {
    /// A write that took `took` finished at `now_ms`: `Some(n)` when it is
    /// to be logged, `n` being the slow writes not logged since the last
    /// line; `None` for a write that was not slow or within the rate limit.
    pub fn on_write(&self, took: Duration, now_ms: u64) -> Option<u64> {
        if took < SLOW_WRITE {
            return None;
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        let last = self.logged_at.load(Ordering::Relaxed);
        if last != u64::MAX && now_ms.saturating_sub(last) < LOG_EVERY_MS {
            return None;
        }
        // One of several writes finishing at once logs.
        self.logged_at.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        Some(self.unlogged.swap(0, Ordering::Relaxed).saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_each_step_share_in_order() {
        let mut s = Stages::start();
        let t0 = s.started;
        s.mark_at("admission", t0 + Duration::from_micros(200));
        s.mark_at("volume write", t0 + Duration::from_millis(141) + Duration::from_micros(500));
        let end = s.last;
        assert_eq!(s.describe_at(end), "admission 0.2 ms, volume write 141.3 ms");
        assert_eq!(
            s.describe_at(end + Duration::from_millis(80)),
            "admission 0.2 ms, volume write 141.3 ms, after that 80.0 ms",
            "a write that failed after its last step"
        );
    }

    #[test]
    fn a_write_in_pieces_adds_up_each_step() {
        let mut s = Stages::start();
        let t0 = s.started;
        let ms = Duration::from_millis;
        s.mark_at("admission", t0 + ms(1));
        s.mark_at("volume write", t0 + ms(11));
        s.mark_at("admission", t0 + ms(13));
        s.mark_at("volume write", t0 + ms(43));
        assert_eq!(s.describe_at(t0 + ms(43)), "admission 3.0 ms, volume write 40.0 ms");
    }

    #[test]
    fn logs_the_first_slow_write_then_one_line_per_interval_with_the_rest_counted() {
        let log = SlowWriteLog::default();
        let slow = SLOW_WRITE + Duration::from_millis(1);
        assert_eq!(log.on_write(Duration::from_millis(5), 0), None, "not slow");
        assert_eq!(log.on_write(slow, 1_000), Some(0));
        assert_eq!(log.on_write(slow, 2_000), None);
        assert_eq!(log.on_write(slow, 3_000), None);
        assert_eq!(log.on_write(Duration::from_millis(5), 9_000), None, "not slow");
        assert_eq!(log.on_write(slow, 1_000 + LOG_EVERY_MS - 1), None);
        assert_eq!(log.on_write(slow, 1_000 + LOG_EVERY_MS), Some(3), "three other slow writes since the last line");
        assert_eq!(log.on_write(slow, 1_000 + 2 * LOG_EVERY_MS), Some(0));
    }
}
