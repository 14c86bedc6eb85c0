//! Writing a journal's appended pages back to the disk behind the appends.
//!
//! Small records are appended into the page cache. Where no flush syncs
//! the journal (async mode, a client that seldom flushes), its pages stayed
//! dirty until the kernel's flusher took them, 30 s later
//! (`vm.dirty_expire_centisecs`), in bursts of hundreds of MB: every
//! O_DIRECT volume write on the disk, of any group or program, waited
//! behind each burst (writes of 34–175 ms in `replicator-bench`, see
//! bench/RESULTS.md). So the journal is cut into [`WINDOW`]-sized windows,
//! and an append that enters a window starts writing back the window two
//! before it (in ring order), whose appends are done by then
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), as databases bound their
//! logs' dirty data (RocksDB's `bytes_per_sync`, PostgreSQL's
//! `wal_writer_flush_after`).
//!
//! Only a head start: nothing is durable before the journal's `fdatasync`
//! (a FLUSH, a FUA write, a checkpoint), and an error changes nothing but
//! the speed. The writebacks run on one blocking thread per journal at a
//! time (`sync_file_range` can block while the disk's queue is full), so a
//! slow disk never ties up more than that thread.

use std::fs::File;
use std::sync::{Arc, Mutex};

use replicator_protocol::journal_format::JOURNAL_SUPERBLOCK_LEN;

/// The journal is written back in windows of this size.
pub const WINDOW: u64 = 4 << 20;
/// Ranges waiting for the writeback thread beyond this many (a disk
/// slower than the appends) are dropped, the oldest first: the kernel's
/// flusher takes their pages.
const MAX_PENDING: usize = 16;

/// The ranges (offset, length) of a journal of `capacity` bytes to write
/// back after an append of `pos..end`: the windows two before each window
/// the append entered.
///
/// An append at the start of the ring (after the superblock) follows a
/// wrap, which skipped the ring's tail where this record did not fit: the
/// previous pass ended less than a record's span before the ring's end, so
/// its last two windows lie within the span and a window of the end, and
/// all of that is written back (windows with nothing dirty cost a lookup).
pub fn ranges_after_append(pos: u64, end: u64, capacity: u64) -> Vec<(u64, u64)> {
    let windows = capacity.div_ceil(WINDOW);
    if windows < 4 || end <= pos || end > capacity {
        return Vec::new();
    }
    let last = (end - 1) / WINDOW;
    let mut wanted: Vec<u64> = Vec::new();
    if pos <= JOURNAL_SUPERBLOCK_LEN {
        let tail = (capacity.saturating_sub(end - pos) / WINDOW).saturating_sub(1);
        wanted.extend(tail.max(last + 1)..windows);
        wanted.extend(0..last.saturating_sub(1));
    } else {
        // Records never straddle the ring's end.
        let prev = (pos - 1) / WINDOW;
        wanted.extend((prev + 1..=last).filter_map(|w| w.checked_sub(2)));
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for w in wanted {
        let (off, len) = (w * WINDOW, WINDOW.min(capacity - w * WINDOW));
        match ranges.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => ranges.push((off, len)),
        }
    }
    ranges
}

/// One journal's writebacks: at most one running at a time, the ranges
/// asked for meanwhile queued behind it.
#[derive(Debug)]
pub struct WriteBehind {
    /// The journal file (its own descriptor).
    file: File,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    /// A blocking thread is writing back (and takes what is pending when
    /// it is done).
    running: bool,
    pending: Vec<(u64, u64)>,
}

impl WriteBehind {
    /// Write-behind for the journal open as `file`.
    pub fn new(file: File) -> Arc<WriteBehind> {
        Arc::new(WriteBehind { file, queue: Mutex::new(Queue::default()) })
    }

    /// Starts writing back `ranges` without waiting (inline when not on a
    /// runtime).
    pub fn request(self: &Arc<Self>, ranges: Vec<(u64, u64)>) {
        if ranges.is_empty() {
            return;
        }
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.pending.extend(ranges);
            let excess = q.pending.len().saturating_sub(MAX_PENDING);
            q.pending.drain(..excess);
            if q.running {
                return;
            }
            q.running = true;
        }
        let runner = Runner { behind: Arc::clone(self), done: false };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || runner.run())),
            Err(_) => runner.run(),
        }
    }

    /// Writes back what is pending until nothing is.
    fn run(&self) {
        loop {
            let batch = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.pending.is_empty() {
                    q.running = false;
                    return;
                }
                std::mem::take(&mut q.pending)
            };
            for (off, len) in batch {
                let _ = crate::io::start_writeback(&self.file, off, len);
            }
        }
    }
}

/// The one writeback thread of a journal. Dropped without having run to
/// the end (refused by a runtime shutting down, a panic), it lets the next
/// request start another.
struct Runner {
    behind: Arc<WriteBehind>,
    done: bool,
}

impl Runner {
    fn run(mut self) {
        self.behind.run();
        self.done = true;
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if !self.done {
            self.behind.queue.lock().unwrap_or_else(|p| p.into_inner()).running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = WINDOW;
    const SB: u64 = JOURNAL_SUPERBLOCK_LEN;

    #[test]
    fn an_append_within_a_window_writes_nothing_back() {
        assert!(ranges_after_append(SB + 8192, SB + 12288, 16 * W).is_empty());
        assert!(ranges_after_append(5 * W + 100, 6 * W, 16 * W).is_empty(), "ends on the boundary");
    }

    #[test]
    fn entering_a_window_writes_back_the_one_two_before() {
        assert_eq!(ranges_after_append(5 * W - 512, 5 * W + 4096, 16 * W), vec![(3 * W, W)]);
        assert_eq!(ranges_after_append(5 * W, 5 * W + 4096, 16 * W), vec![(3 * W, W)], "starts on the boundary");
    }

    #[test]
    fn a_record_over_several_windows_writes_back_each_entered_one_two_behind() {
        // From window 3 into window 11: windows 4..=11 entered.
        assert_eq!(ranges_after_append(3 * W + 512, 11 * W + 4096, 16 * W), vec![(2 * W, 8 * W)]);
    }

    #[test]
    fn after_the_wrap_the_ring_last_windows_are_written_back() {
        // A small record at the ring start: the previous pass ended within
        // its span of the end, in window 15: windows 14 and 15.
        assert_eq!(ranges_after_append(SB, SB + 4608, 16 * W), vec![(14 * W, 2 * W)]);
        // Entering window 1, then 2: nothing of the old pass is left.
        assert!(ranges_after_append(W - 512, W + 4096, 16 * W).is_empty());
        assert_eq!(ranges_after_append(2 * W - 512, 2 * W + 4096, 16 * W), vec![(0, W)]);
        // A 9 MiB record that skipped up to 9 MiB of the tail: the previous
        // pass may have ended in window 13, so windows 12..=15; and of its
        // own windows 0..=2, window 0, two behind its end.
        let big = 9 << 20;
        assert_eq!(ranges_after_append(SB, SB + big, 16 * W), vec![(12 * W, 4 * W), (0, W)]);
        // A ring whose last window is short.
        let cap = 15 * W + W / 2;
        assert_eq!(ranges_after_append(SB, SB + 4608, cap), vec![(14 * W, W + W / 2)]);
        // A record ending at the ring's end enters only its own window.
        assert_eq!(ranges_after_append(14 * W + 512, 16 * W, 16 * W), vec![(13 * W, W)]);
    }

    #[test]
    fn a_large_record_at_the_ring_start_writes_back_its_own_windows_two_behind_its_end() {
        // 20 MiB from the ring start: windows 0..=5 hold it; 0..=3 are two
        // or more behind its end; the tail from window 10 (16 - 5 - 1).
        let end = SB + (20 << 20);
        assert_eq!(ranges_after_append(SB, end, 16 * W), vec![(10 * W, 6 * W), (0, 4 * W)]);
    }

    #[test]
    fn journals_under_four_windows_are_left_to_their_syncs() {
        assert!(ranges_after_append(2 * W - 512, 2 * W + 4096, 3 * W).is_empty());
    }
}
