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
/// Ranges waiting for the writeback thread beyond this many are merged
/// into one writeback of the whole file (a disk slower than the appends).
const MAX_PENDING: usize = 16;

/// The ranges (offset, length) of a journal of `capacity` bytes to write
/// back after an append of `pos..end`: the windows two before each window
/// the append entered. An append at the start of the ring (after the
/// superblock) follows the ring's last window.
pub fn ranges_after_append(pos: u64, end: u64, capacity: u64) -> Vec<(u64, u64)> {
    let windows = capacity.div_ceil(WINDOW);
    if windows < 4 || end <= pos || end > capacity {
        return Vec::new();
    }
    let before = if pos <= JOURNAL_SUPERBLOCK_LEN { capacity - 1 } else { pos - 1 };
    let (prev, last) = (before / WINDOW, (end - 1) / WINDOW);
    let entered = (last + windows - prev) % windows;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for i in 0..entered {
        // Window prev + 1 + i was entered: write back the one two before it.
        let w = (prev + 1 + i + windows - 2) % windows;
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
            if q.pending.len() > MAX_PENDING {
                // Length 0: to the end of the file.
                q.pending = vec![(0, 0)];
            }
            if q.running {
                return;
            }
            q.running = true;
        }
        let me = Arc::clone(self);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || me.run())),
            Err(_) => me.run(),
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
        // The first record after the wrap enters window 0: window 14 of 16.
        assert_eq!(ranges_after_append(SB, SB + 4608, 16 * W), vec![(14 * W, W)]);
        // Entering window 1 then writes back the ring's last window.
        assert_eq!(ranges_after_append(W - 512, W + 4096, 16 * W), vec![(15 * W, W)]);
        // A ring whose last window is short.
        let cap = 15 * W + W / 2;
        assert_eq!(ranges_after_append(W - 512, W + 4096, cap), vec![(15 * W, W / 2)]);
        // A record ending at the ring's end enters only its own window.
        assert_eq!(ranges_after_append(14 * W + 512, 16 * W, 16 * W), vec![(13 * W, W)]);
    }

    #[test]
    fn journals_under_four_windows_are_left_to_their_syncs() {
        assert!(ranges_after_append(2 * W - 512, 2 * W + 4096, 3 * W).is_empty());
    }
}
