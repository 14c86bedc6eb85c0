//! How long the secondary sessions of one node defer what nobody waits
//! for.
//!
//! A secondary session group-commits its restore journal and coalesces its
//! acks (`applier.rs`: `RESTORE_JOURNAL_SYNC_DELAY_*`, `ACK_DELAY`). What
//! each of those costs is fixed, however few records the delay gathered:
//! an fdatasync (a wake-up of an io_uring worker, a flush of the disk's
//! cache) and an ack on the wire, with the wake-ups of both daemons they
//! bring. One busy group pays them a few hundred times a second. Many busy
//! groups on one node would pay them that often each, for the same total
//! load: 32 async groups written at once, each at QD1, did 1,000–4,000
//! restore-journal syncs a second where one group as busy did 180, and the
//! secondary spent 2.4 times as much CPU per write.
//!
//! So the node paces its sessions: while more than
//! [`BUSY_AT_CONFIGURED_DELAY`] of them have something deferred, every
//! session's delays are stretched in proportion
//! (`Secondary::set_stretch`), which keeps the node's rate of deferred
//! syncs and acks about where those few sessions would put it. Only what
//! nobody waits for is deferred: a FUA write, a flush request, a drain, a
//! sync-mode receipt or a copy's progress goes at once, stretched or not.
//! The cost is freshness where nobody waits: the secondary's volumes (and
//! a drill's next freeze), and the primary's view of the lag and its
//! journal space, trail by up to the stretched delay. What the secondary
//! has received stays in its page cache meanwhile: a power cut there
//! loses it, and the primary, which frees its journal only through what
//! the secondary reported durable, sends it again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Sessions that defer at their configured delays at once; with more
/// busy, delays stretch in proportion.
const BUSY_AT_CONFIGURED_DELAY: usize = 4;

/// The most a delay is stretched: 16 × 5 ms in async mode, an applied
/// point trailing by at most 80 ms (64 busy groups and more).
const MAX_STRETCH: u32 = 16;

/// The node's count of busy secondary sessions (one per node, shared by
/// its groups).
#[derive(Debug, Default)]
pub struct Pacing {
    busy: AtomicUsize,
}

impl Pacing {
    /// The factor every session's deferrals are stretched by now (also
    /// the metric `replicator_secondary_delay_stretch`).
    pub fn stretch(&self) -> u32 {
        let busy = self.busy.load(Ordering::Relaxed);
        // Bounded by MAX_STRETCH, so the cast cannot truncate.
        busy.div_ceil(BUSY_AT_CONFIGURED_DELAY).clamp(1, MAX_STRETCH as usize) as u32
    }
}

/// One session's place in its node's [`Pacing`]: counted busy while it
/// has something deferred.
#[derive(Debug)]
pub struct PaceMark {
    pacing: Arc<Pacing>,
    busy: bool,
}

impl PaceMark {
    /// A session not busy yet.
    pub fn new(pacing: Arc<Pacing>) -> Self {
        Self { pacing, busy: false }
    }

    /// Records whether the session has something deferred; returns the
    /// stretch for its deferrals (`Secondary::set_stretch`).
    pub fn update(&mut self, busy: bool) -> u32 {
        if busy != self.busy {
            self.busy = busy;
            if busy {
                self.pacing.busy.fetch_add(1, Ordering::Relaxed);
            } else {
                self.pacing.busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.pacing.stretch()
    }
}

impl Drop for PaceMark {
    fn drop(&mut self) {
        self.update(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stretch_with_the_busy_sessions_beyond_the_first_few_and_come_back() {
        let pacing = Arc::new(Pacing::default());
        let mut marks: Vec<PaceMark> = (0..100).map(|_| PaceMark::new(pacing.clone())).collect();
        for (i, m) in marks.iter_mut().enumerate().take(BUSY_AT_CONFIGURED_DELAY) {
            assert_eq!(m.update(true), 1, "{} busy", i + 1);
        }
        assert_eq!(marks[4].update(true), 2);
        // Reporting the same state again counts once.
        assert_eq!(marks[4].update(true), 2);
        for m in marks.iter_mut().take(32) {
            m.update(true);
        }
        assert_eq!(pacing.stretch(), 8, "32 busy");
        for m in marks.iter_mut() {
            m.update(true);
        }
        assert_eq!(pacing.stretch(), MAX_STRETCH, "bounded");
        // Idle, ended or dropped sessions no longer count.
        for m in marks.iter_mut().skip(3) {
            m.update(false);
        }
        assert_eq!(pacing.stretch(), 1);
        marks.truncate(2);
        assert_eq!(pacing.busy.load(Ordering::Relaxed), 2);
        drop(marks);
        assert_eq!(pacing.busy.load(Ordering::Relaxed), 0);
    }
}
