//! Bookkeeping of a copy-on-write snapshot of one volume (a drill copy, or
//! the image a resync protects): which chunks the snapshot holds in its own
//! file, and which of those are known to be there durably.
//!
//! A snapshot freezes a volume at one instant. Its image is, chunk by chunk,
//! either still the volume's own bytes (nothing wrote there since the
//! freeze) or a copy in the snapshot's file, made before the volume was
//! first written there (copy-on-write) or when the snapshot's own user
//! (a drill client) first wrote there. The map records the second case.
//!
//! The durability rule that makes this survive a power cut: **the volume is
//! written in a chunk only once that chunk is durably in the snapshot**, its
//! copied bytes first, then its bit in the map file. Bits only ever go from
//! 0 to 1 while a snapshot lives, and the map file is written page by page,
//! so any subset of page writes that survives a cut is a subset of durable
//! chunks: a chunk whose bit was lost still reads from the volume, which was
//! not yet written there.
//!
//! [`ChunkMap`] keeps two views: `held` (in memory: reads and the snapshot's
//! own writes follow it) and `durable` (what the map file is known to hold:
//! the volume's writes wait for it). A group commit ([`ChunkMap::take_commit`],
//! [`ChunkMap::commit_done`]) moves every chunk held since the last commit to
//! durable with one sync of the data file and one of the map file.

use std::collections::BTreeSet;

/// Bytes of the map file per page; pages are written whole.
pub const MAP_PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = MAP_PAGE / 8;

/// Smallest and largest copy-on-write chunk.
pub const MIN_CHUNK: u64 = 4096;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: u64 = 16 << 20;

/// Errors decoding a map file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The chunk size is not a power of two within bounds.
    #[error("copy-on-write chunk {0} is not a power of two between 4 KiB and 16 MiB")]
    BadChunk(u64),
    /// The map file is shorter than the volume needs.
    #[error("snapshot map is {got} bytes; a volume of this size needs {need}")]
    ShortMap {
        /// Bytes found.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Bits set beyond the last chunk.
    #[error("snapshot map has chunks set beyond the end of the volume")]
    BitsBeyondEnd,
}

/// One pending group commit: the map pages to write (after the snapshot's
/// data file is synced), and the chunks that become durable with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// (page index, page bytes) in page order.
    pub pages: Vec<(usize, Vec<u8>)>,
    /// Chunks held since the last commit.
    pub chunks: Vec<u64>,
}

/// The chunk map of one snapshot (see the module documentation).
#[derive(Debug, Clone)]
pub struct ChunkMap {
    volume_size: u64,
    chunk: u64,
    chunks: u64,
    held: Vec<u64>,
    durable: Vec<u64>,
    held_count: u64,
    /// Chunks held since the last `take_commit`.
    fresh: Vec<u64>,
    fresh_pages: BTreeSet<usize>,
}

fn check_chunk(chunk: u64) -> Result<(), SnapshotError> {
    if !chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
        return Err(SnapshotError::BadChunk(chunk));
    }
    Ok(())
}

impl ChunkMap {
    /// An empty map (a snapshot just taken).
    pub fn new(volume_size: u64, chunk: u64) -> Result<Self, SnapshotError> {
        check_chunk(chunk)?;
        let chunks = volume_size.div_ceil(chunk);
        let words = Self::map_len(volume_size, chunk) / 8;
        Ok(ChunkMap {
            volume_size,
            chunk,
            chunks,
            held: vec![0; words],
            durable: vec![0; words],
            held_count: 0,
            fresh: Vec::new(),
            fresh_pages: BTreeSet::new(),
        })
    }

    /// Bytes of the map file for a volume: one bit per chunk, whole pages.
    pub fn map_len(volume_size: u64, chunk: u64) -> usize {
        let chunks = volume_size.div_ceil(chunk.max(1));
        let bytes = usize::try_from(chunks.div_ceil(8)).unwrap_or(usize::MAX);
        bytes.div_ceil(MAP_PAGE).max(1) * MAP_PAGE
    }

    /// The map as read back from its file (after a restart): every chunk in
    /// it is durable.
    pub fn decode(volume_size: u64, chunk: u64, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut map = Self::new(volume_size, chunk)?;
        let need = Self::map_len(volume_size, chunk);
        if bytes.len() < need {
            return Err(SnapshotError::ShortMap { got: bytes.len(), need });
        }
        for (w, b) in map.durable.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            *w = u64::from_le_bytes(word);
        }
        // Bits past the last chunk would read from a file region that does
        // not exist: a corrupt map.
        let last = map.chunks;
        let beyond = map.durable.iter().enumerate().any(|(i, &w)| {
            let first = i as u64 * 64;
            (0..64).any(|b| w & (1 << b) != 0 && first + b >= last)
        });
        if beyond {
            return Err(SnapshotError::BitsBeyondEnd);
        }
        map.held.clone_from(&map.durable);
        map.held_count = map.held.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(map)
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Chunks touched by `[offset, offset + len)`, clamped to the volume.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.volume_size);
        if offset >= end {
            return 0..0;
        }
        offset / self.chunk..(end - 1) / self.chunk + 1
    }

    /// Byte range of chunk `c`, clamped to the volume.
    pub fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk;
        (start, self.chunk.min(self.volume_size.saturating_sub(start)))
    }

    fn bit(words: &[u64], c: u64) -> bool {
        words.get((c / 64) as usize).is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    /// Whether the snapshot holds chunk `c` in its own file.
    pub fn is_held(&self, c: u64) -> bool {
        Self::bit(&self.held, c)
    }

    /// Whether chunk `c` is durably held (the volume may be written there).
    pub fn is_durable(&self, c: u64) -> bool {
        Self::bit(&self.durable, c)
    }

    /// Whether every chunk of `[offset, offset + len)` is durably held.
    pub fn all_durable(&self, offset: u64, len: u64) -> bool {
        self.chunks_of(offset, len).all(|c| self.is_durable(c))
    }

    /// Chunk `c` is now in the snapshot's file (its bytes written there).
    /// Out-of-range chunks are ignored.
    pub fn hold(&mut self, c: u64) {
        if c >= self.chunks || self.is_held(c) {
            return;
        }
        let w = (c / 64) as usize;
        self.held[w] |= 1 << (c % 64);
        self.held_count += 1;
        self.fresh.push(c);
        self.fresh_pages.insert(w / WORDS_PER_PAGE);
    }

    /// Chunks held (in memory).
    pub fn held_chunks(&self) -> u64 {
        self.held_count
    }

    /// Bytes the snapshot holds in its own file (the volume's last chunk
    /// may be shorter than the others).
    pub fn held_bytes(&self) -> u64 {
        let whole = self.held_count.saturating_mul(self.chunk);
        match self.chunks.checked_sub(1) {
            Some(last) if self.is_held(last) => whole - (self.chunk - self.chunk_range(last).1),
            _ => whole,
        }
    }

    /// Every held chunk, in order (a rollback copies them back).
    pub fn held_iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.chunks).filter(|&c| self.is_held(c))
    }

    /// Starts a group commit of every chunk held since the last one; `None`
    /// when there is none. The caller syncs the data file, writes the pages,
    /// syncs the map file, then calls [`ChunkMap::commit_done`].
    pub fn take_commit(&mut self) -> Option<Commit> {
        if self.fresh.is_empty() {
            return None;
        }
        let pages = std::mem::take(&mut self.fresh_pages)
            .into_iter()
            .map(|p| {
                let words = &self.held[p * WORDS_PER_PAGE..((p + 1) * WORDS_PER_PAGE).min(self.held.len())];
                let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                bytes.resize(MAP_PAGE, 0);
                (p, bytes)
            })
            .collect();
        Some(Commit { pages, chunks: std::mem::take(&mut self.fresh) })
    }

    /// The commit's pages are durable in the map file.
    pub fn commit_done(&mut self, commit: &Commit) {
        for &c in &commit.chunks {
            if c < self.chunks {
                self.durable[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
    }

    /// A commit failed: its chunks are held but not durable; the next
    /// commit writes them again.
    pub fn commit_failed(&mut self, commit: Commit) {
        for c in commit.chunks {
            self.fresh_pages.insert((c / 64) as usize / WORDS_PER_PAGE);
            self.fresh.push(c);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file_after(commits: &[Commit], len: usize) -> Vec<u8> {
        let mut file = vec![0u8; len];
        for c in commits {
            for (p, bytes) in &c.pages {
                file[p * MAP_PAGE..(p + 1) * MAP_PAGE].copy_from_slice(bytes);
            }
        }
        file
    }

    #[test]
    fn chunks_become_durable_only_through_a_commit() {
        let mut m = ChunkMap::new(1 << 20, 64 << 10).unwrap();
        assert_eq!(m.chunks_of(0, 1 << 20), 0..16);
        assert_eq!(m.chunks_of(65535, 2), 0..2);
        assert_eq!(m.chunks_of(1 << 20, 4096), 0..0);
        m.hold(3);
        m.hold(3);
        assert!(m.is_held(3) && !m.is_durable(3));
        assert_eq!(m.held_chunks(), 1);
        let c = m.take_commit().unwrap();
        assert_eq!(c.chunks, vec![3]);
        assert!(m.take_commit().is_none(), "nothing new since");
        assert!(!m.all_durable(3 << 16, 4096));
        m.commit_done(&c);
        assert!(m.all_durable(3 << 16, 4096));
        assert!(!m.all_durable(2 << 16, 2 << 16));
    }

    #[test]
    fn a_short_last_chunk_counts_its_own_length() {
        // 100 KiB: one whole chunk of 64 KiB and a last one of 36 KiB.
        let mut m = ChunkMap::new(100 << 10, 64 << 10).unwrap();
        m.hold(1);
        assert_eq!(m.held_bytes(), 36 << 10);
        m.hold(0);
        assert_eq!(m.held_bytes(), 100 << 10);
    }

    #[test]
    fn the_map_file_reads_back_as_the_durable_chunks() {
        let size = 3 << 30; // 49,152 chunks of 64 KiB: two pages
        let len = ChunkMap::map_len(size, 64 << 10);
        assert_eq!(len, 2 * MAP_PAGE);
        let mut m = ChunkMap::new(size, 64 << 10).unwrap();
        for c in [0, 5, 40_000, 49_151] {
            m.hold(c);
        }
        let c1 = m.take_commit().unwrap();
        assert_eq!(c1.pages.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        m.commit_done(&c1);
        m.hold(7);
        let c2 = m.take_commit().unwrap();
        assert_eq!(c2.pages.len(), 1);
        let back = ChunkMap::decode(size, 64 << 10, &file_after(&[c1.clone(), c2.clone()], len)).unwrap();
        assert_eq!(back.held_iter().collect::<Vec<_>>(), vec![0, 5, 7, 40_000, 49_151]);
        assert!(back.is_durable(7));
        // A cut that kept only the first commit's pages loses chunk 7 only.
        let back = ChunkMap::decode(size, 64 << 10, &file_after(&[c1], len)).unwrap();
        assert!(!back.is_held(7) && back.is_held(5));
    }

    #[test]
    fn a_failed_commit_is_written_again() {
        let mut m = ChunkMap::new(1 << 20, 4096).unwrap();
        m.hold(1);
        let c = m.take_commit().unwrap();
        m.commit_failed(c);
        let again = m.take_commit().unwrap();
        assert_eq!(again.chunks, vec![1]);
        assert_eq!(again.pages.len(), 1);
    }

    #[test]
    fn bad_maps_and_chunks_are_refused() {
        assert_eq!(ChunkMap::new(1 << 20, 3000).unwrap_err(), SnapshotError::BadChunk(3000));
        assert_eq!(ChunkMap::new(1 << 20, 2048).unwrap_err(), SnapshotError::BadChunk(2048));
        assert!(matches!(ChunkMap::decode(1 << 20, 4096, &[0; 16]), Err(SnapshotError::ShortMap { .. })));
        let mut file = vec![0u8; MAP_PAGE];
        file[100] = 1; // chunk 800 of a 256-chunk volume
        assert_eq!(ChunkMap::decode(1 << 20, 4096, &file).unwrap_err(), SnapshotError::BitsBeyondEnd);
        // The last, partial chunk is a chunk.
        let m = ChunkMap::new((1 << 20) + 4096, 64 << 10).unwrap();
        assert_eq!(m.chunk_range(16), (1 << 20, 4096));
    }
}
