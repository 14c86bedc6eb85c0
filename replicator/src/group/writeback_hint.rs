//! When to start writing a journal append back to the disk at once.
//!
//! Small records are appended into the page cache; a FLUSH (or FUA) then
//! makes the journal durable with `fdatasync`, which first writes those
//! pages and only then flushes the device's cache: two disk round trips in
//! a row, where an unpaired export pays one. A client that flushes after
//! every write or few (a database's write-ahead log, `fsync`-heavy
//! applications) is better served by starting each append's writeback
//! while the volume write runs, so that its flush finds the pages written.
//! A client that writes a lot between flushes is not: the kernel writes
//! the journal back in large sequential pieces at the flush, and early
//! writeback would send the partial page shared by two records twice.
//!
//! So an append starts its writeback when it is FUA, or when the last flush
//! came after at most [`FEW_WRITES`] writes, no longer ago than
//! [`RECENT_MS`], and at most [`FEW_WRITES`] writes have come since (a burst
//! after the flush is left to the kernel). Either way nothing is durable
//! before the `fdatasync`.

use std::sync::atomic::{AtomicU64, Ordering};

/// At most this many writes between two flushes: a flush-heavy client.
pub const FEW_WRITES: u64 = 8;
/// A flush this recent still describes the client's pattern.
pub const RECENT_MS: u64 = 100;

/// The flush pattern of a group's clients (all connections together).
#[derive(Debug)]
pub struct WritebackHint {
    /// Writes since the last flush.
    writes: AtomicU64,
    /// Writes between the two last flushes (`u64::MAX` before any).
    last_batch: AtomicU64,
    /// When the last flush came, in the group's clock (ms); `u64::MAX`
    /// before any.
    flushed_at: AtomicU64,
}

impl Default for WritebackHint {
    fn default() -> Self {
        WritebackHint {
            writes: AtomicU64::new(0),
            last_batch: AtomicU64::new(u64::MAX),
            flushed_at: AtomicU64::new(u64::MAX),
        }
    }
}

impl WritebackHint {
    /// A journaled write at `now_ms`: should its append start its writeback
    /// now?
    pub fn on_write(&self, now_ms: u64, fua: bool) -> bool {
        let since_flush = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if fua {
            return true;
        }
        let flushed_at = self.flushed_at.load(Ordering::Relaxed);
        flushed_at != u64::MAX
            && now_ms.saturating_sub(flushed_at) <= RECENT_MS
            && since_flush <= FEW_WRITES
            && self.last_batch.load(Ordering::Relaxed) <= FEW_WRITES
    }

    /// A FLUSH (or a FUA write, which flushes too) at `now_ms`.
    pub fn on_flush(&self, now_ms: u64) {
        let batch = self.writes.swap(0, Ordering::Relaxed);
        self.last_batch.store(batch, Ordering::Relaxed);
        self.flushed_at.store(now_ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_early_writeback_before_any_flush_except_for_fua() {
        let h = WritebackHint::default();
        assert!(!h.on_write(0, false));
        assert!(!h.on_write(5, false));
        assert!(h.on_write(6, true));
    }

    #[test]
    fn a_write_then_flush_pattern_turns_it_on() {
        let h = WritebackHint::default();
        for t in 0..10 {
            h.on_write(t, false);
            h.on_flush(t);
        }
        assert!(h.on_write(10, false));
        // Still on for a few writes more, while the last flush is recent...
        for _ in 1..FEW_WRITES {
            assert!(h.on_write(11, false));
        }
        // ...but a burst longer than the pattern's is left to the kernel.
        assert!(!h.on_write(11, false));
    }

    #[test]
    fn many_writes_between_flushes_keep_it_off() {
        let h = WritebackHint::default();
        for t in 0..=FEW_WRITES {
            h.on_write(t, false);
        }
        h.on_flush(20);
        assert!(!h.on_write(21, false));
    }

    #[test]
    fn an_old_flush_no_longer_counts() {
        let h = WritebackHint::default();
        h.on_write(0, false);
        h.on_flush(0);
        assert!(h.on_write(RECENT_MS, false));
        assert!(!h.on_write(RECENT_MS + 1, false));
    }
}
