//! Dirty-region bitmap: which chunks of a volume changed while the pair could
//! not replicate (suspended), so that resync copies only those.
//!
//! Chunk `i` covers bytes `[i * granularity, (i + 1) * granularity)` of the
//! volume; the last chunk may be short.
//!
//! Encoded form (little-endian): magic `RPLBMAP1`, volume size (u64),
//! granularity (u64), the bits as u64 words (chunk `i` is bit `i % 64` of word
//! `i / 64`), then a CRC32 of everything before it.

use crate::record::crc32;

/// Default chunk size: 64 KiB.
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;

const MAGIC: &[u8; 8] = b"RPLBMAP1";
const HEADER_LEN: usize = 8 + 8 + 8;
const CRC_LEN: usize = 4;

/// Errors decoding or combining bitmaps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// Shorter than the fixed header.
    #[error("dirty bitmap truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// Not a dirty bitmap.
    #[error("bad magic number (not a replicator dirty bitmap)")]
    BadMagic,
    /// Checksum mismatch (torn or corrupted write).
    #[error("dirty bitmap checksum mismatch (torn or corrupted write)")]
    BadCrc,
    /// Granularity is zero or not a power of two.
    #[error("dirty bitmap granularity {0} is not a power of two")]
    BadGranularity(u64),
    /// The encoded length does not match the volume size and granularity.
    #[error("dirty bitmap is {actual} bytes but its geometry needs {expected}")]
    SizeMismatch {
        /// Length the header implies.
        expected: u64,
        /// Length present.
        actual: u64,
    },
    /// Two bitmaps of different geometry were combined.
    #[error("dirty bitmaps differ in geometry: {0}")]
    GeometryMismatch(String),
    /// Inconsistent contents (bits set past the last chunk).
    #[error("corrupt dirty bitmap: {0}")]
    Corrupt(String),
}

/// Dirty-chunk bitmap of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    volume_size: u64,
    granularity: u64,
    chunks: u64,
    words: Vec<u64>,
    dirty: u64,
}

fn chunk_count(volume_size: u64, granularity: u64) -> u64 {
    volume_size.div_ceil(granularity)
}

impl DirtyBitmap {
    /// A clean bitmap for a volume of `volume_size` bytes. `granularity`
    /// should be a power of two; any other value is rounded up to the next
    /// one (0 becomes [`DEFAULT_GRANULARITY`]).
    pub fn new(volume_size: u64, granularity: u64) -> Self {
        let granularity = if granularity == 0 {
            DEFAULT_GRANULARITY
        } else {
            granularity.checked_next_power_of_two().unwrap_or(1 << 63)
        };
        let chunks = chunk_count(volume_size, granularity);
        let nwords = chunks.div_ceil(64) as usize;
        DirtyBitmap { volume_size, granularity, chunks, words: vec![0; nwords], dirty: 0 }
    }

    /// Chunk size in bytes.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.chunks
    }

    /// Sets chunks `first..=last` (both < chunks).
    fn set_chunks(&mut self, first: u64, last: u64) {
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let word = &mut self.words[w];
            self.dirty += u64::from((mask & !*word).count_ones());
            *word |= mask;
        }
    }

    /// Marks every chunk touched by `[offset, offset + len)`, clamped to the
    /// volume size.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.volume_size);
        if offset >= end {
            return;
        }
        self.set_chunks(offset / self.granularity, (end - 1) / self.granularity);
    }

    /// Marks the whole volume dirty.
    pub fn set_all(&mut self) {
        if self.chunks > 0 {
            self.set_chunks(0, self.chunks - 1);
        }
    }

    /// Marks every chunk clean.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.dirty = 0;
    }

    /// Marks `chunk` clean (out of range: ignored).
    pub fn clear_chunk(&mut self, chunk: u64) {
        if chunk >= self.chunks {
            return;
        }
        let bit = 1u64 << (chunk % 64);
        let word = &mut self.words[(chunk / 64) as usize];
        if *word & bit != 0 {
            *word &= !bit;
            self.dirty -= 1;
        }
    }

    /// Whether `chunk` is dirty (out of range: false).
    pub fn is_chunk_dirty(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.words[(chunk / 64) as usize] & (1u64 << (chunk % 64)) != 0
    }

    /// Number of dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
    }

    /// Bytes covered by dirty chunks (the last chunk may be short).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.dirty.saturating_mul(self.granularity);
        if self.chunks > 0 && self.is_chunk_dirty(self.chunks - 1) {
            bytes -= self.granularity - self.chunk_range(self.chunks - 1).1;
        }
        bytes
    }

    /// Byte offset and length of `chunk` (length 0 past the end).
    pub fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let offset = chunk.saturating_mul(self.granularity);
        let len = self.volume_size.saturating_sub(offset).min(self.granularity);
        (offset, len)
    }

    /// First dirty chunk `>= from_chunk`.
    pub fn next_dirty(&self, from_chunk: u64) -> Option<u64> {
        if from_chunk >= self.chunks {
            return None;
        }
        let mut w = (from_chunk / 64) as usize;
        let mut word = self.words[w] & (u64::MAX << (from_chunk % 64));
        loop {
            if word != 0 {
                return Some(w as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// Whether no chunk is dirty.
    pub fn is_clean(&self) -> bool {
        self.dirty == 0
    }

    /// Marks dirty every chunk dirty in `other` (for resync after
    /// `split --rw` or failover, where both sides' changes must be copied).
    pub fn union_with(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if self.volume_size != other.volume_size || self.granularity != other.granularity {
            return Err(BitmapError::GeometryMismatch(format!(
                "{} bytes in {}-byte chunks vs {} bytes in {}-byte chunks",
                self.volume_size, self.granularity, other.volume_size, other.granularity
            )));
        }
        let mut dirty = 0;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
            dirty += u64::from(a.count_ones());
        }
        self.dirty = dirty;
        Ok(())
    }

    /// Encodes the bitmap (see the module docs for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.words.len() * 8 + CRC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.volume_size.to_le_bytes());
        out.extend_from_slice(&self.granularity.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates an encoded bitmap.
    pub fn decode(buf: &[u8]) -> Result<Self, BitmapError> {
        let min = HEADER_LEN + CRC_LEN;
        if buf.len() < min {
            return Err(BitmapError::Truncated { len: buf.len(), min });
        }
        if &buf[..8] != MAGIC {
            return Err(BitmapError::BadMagic);
        }
        let le64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let volume_size = le64(8);
        let granularity = le64(16);
        let nwords = if granularity.is_power_of_two() { chunk_count(volume_size, granularity).div_ceil(64) } else { 0 };
        let expected = nwords.checked_mul(8).and_then(|n| n.checked_add(min as u64)).unwrap_or(u64::MAX);
        // The CRC first (it covers the header), then the geometry.
        let (body, crc) = buf.split_at(buf.len() - CRC_LEN);
        let mut cb = [0u8; 4];
        cb.copy_from_slice(crc);
        if crc32(body) != u32::from_le_bytes(cb) {
            return Err(BitmapError::BadCrc);
        }
        if !granularity.is_power_of_two() {
            return Err(BitmapError::BadGranularity(granularity));
        }
        if expected != buf.len() as u64 {
            return Err(BitmapError::SizeMismatch { expected, actual: buf.len() as u64 });
        }
        let chunks = chunk_count(volume_size, granularity);
        let words: Vec<u64> = body[HEADER_LEN..]
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        if chunks % 64 != 0 {
            if let Some(last) = words.last() {
                if last >> (chunks % 64) != 0 {
                    return Err(BitmapError::Corrupt("bits set beyond the last chunk of the volume".into()));
                }
            }
        }
        let dirty = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(DirtyBitmap { volume_size, granularity, chunks, words, dirty })
    }
}

/// Which records of the journal's surviving run a primary restarting after
/// an unclean stop may replay onto its volumes. `records` are the run's
/// (seq, volume, offset, length), oldest first; `bitmaps` the persisted
/// dirty bitmaps; `fence` the newest record journaled before a write made
/// in bitmap mode, once a resync may have cleared that write's chunk
/// (persisted before the resync handed out its first chunk; 0: none).
///
/// A record at or before the fence is not replayed: a newer write made in
/// bitmap mode may have overwritten it, and the bitmap no longer shows
/// where once the resync copied the region (the journal is released
/// later, lazily). Nor is a record touching a dirty chunk (such a write, or
/// a region not copied yet: before the resync, this alone rules out every
/// record a bitmap-mode write overwrote). Either way its whole range is
/// marked dirty instead, for the resync to copy. So is every older record that touches
/// a chunk dirty by then: replaying it would put its bytes back over a
/// newer record that is not replayed, and which may have reached the
/// volume (an acknowledged, even flushed, write lost on both sites once
/// the resync copies the region). Hence the pass from the newest record
/// back: each record replayed is newer than every record not replayed that
/// shares a chunk with it, and than every bitmap-mode write to a chunk it
/// touches (before any such chunk may have been cleared, the dirty chunks
/// say which; after, the fence rules out every record older than any
/// bitmap-mode write).
pub fn plan_replay(bitmaps: &mut [DirtyBitmap], records: &[(u64, u32, u64, u64)], fence: u64) -> Vec<bool> {
    let mut replay = vec![false; records.len()];
    for (i, &(seq, volume, offset, len)) in records.iter().enumerate().rev() {
        let Some(b) = bitmaps.get_mut(volume as usize) else { continue };
        let g = b.granularity;
        let end = offset.saturating_add(len);
        if seq <= fence || (offset / g..end.div_ceil(g)).any(|c| b.is_chunk_dirty(c)) {
            b.set_range(offset, len);
        } else {
            replay[i] = true;
        }
    }
    replay
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_chunks(size: u64, g: u64, ranges: &[(u64, u64)]) -> Vec<bool> {
        let n = size.div_ceil(g);
        let mut v = vec![false; n as usize];
        for &(o, l) in ranges {
            for c in 0..n {
                let (co, ce) = (c * g, ((c + 1) * g).min(size));
                if o < ce && co < o.saturating_add(l) && l > 0 {
                    v[c as usize] = true;
                }
            }
        }
        v
    }

    #[test]
    fn a_record_older_than_one_not_replayed_and_sharing_a_chunk_is_not_replayed_either() {
        // 256-byte chunks; chunk 3 is dirty (a write made in bitmap mode).
        let dirty = || {
            let mut b = vec![DirtyBitmap::new(8192, 256)];
            b[0].set_range(768, 1);
            b
        };
        // Record 2 overwrote part of record 1 and touches chunk 3: it is
        // not replayed. Replaying record 1 would put its old bytes back
        // over record 2's (on the volume, perhaps flushed).
        let mut bitmaps = dirty();
        let records = [(1, 0, 2238, 91), (2, 0, 700, 1700), (3, 0, 4096, 10)];
        assert_eq!(plan_replay(&mut bitmaps, &records, 0), vec![false, false, true]);
        // Both ranges are dirty now, for the resync; record 3's is not.
        assert!((700 / 256..2329u64.div_ceil(256)).all(|c| bitmaps[0].is_chunk_dirty(c)));
        assert!(!bitmaps[0].is_chunk_dirty(16));
        // A record newer than one not replayed is replayed (it is the
        // newest write there); an older one apart from it too.
        let mut bitmaps = dirty();
        let records = [(1, 0, 4096, 100), (2, 0, 700, 1400), (3, 0, 0, 1024)];
        assert_eq!(plan_replay(&mut bitmaps, &records, 0), vec![true, false, false]);
        let mut bitmaps = dirty();
        assert_eq!(plan_replay(&mut bitmaps, &[(1, 0, 700, 1400), (2, 0, 1536, 100)], 0), vec![false, true]);
    }

    #[test]
    fn records_journaled_before_a_bitmap_mode_write_are_not_replayed() {
        // Record 2 was journaled before the journal filled; a write made in
        // bitmap mode then overwrote bytes of it, and the resync copied that
        // region (the bitmap is clean again) before the journal was
        // released past record 2. Replaying it would undo that write.
        let mut bitmaps = vec![DirtyBitmap::new(8192, 256)];
        let records = [(1, 0, 0, 1000), (2, 0, 2000, 100), (3, 0, 4096, 100)];
        assert_eq!(plan_replay(&mut bitmaps, &records, 2), vec![false, false, true]);
        assert!(bitmaps[0].is_chunk_dirty(0) && bitmaps[0].is_chunk_dirty(7) && !bitmaps[0].is_chunk_dirty(16));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn range_semantics_and_round_trip(
            size in 0u64..300_000,
            gshift in 9u32..15,
            ranges in proptest::collection::vec((0u64..320_000, 0u64..70_000), 0..12),
            clears in proptest::collection::vec(0u64..700, 0..10),
        ) {
            let g = 1u64 << gshift;
            let mut b = DirtyBitmap::new(size, g);
            prop_assert!(b.is_clean());
            for &(o, l) in &ranges {
                b.set_range(o, l);
            }
            let mut model = model_chunks(size, g, &ranges);
            for &c in &clears {
                b.clear_chunk(c);
                if let Some(m) = model.get_mut(c as usize) {
                    *m = false;
                }
            }
            let n = model.len() as u64;
            prop_assert_eq!(b.chunk_count(), n);
            let mut want_next = None;
            for c in (0..n + 3).rev() {
                let dirty = model.get(c as usize).copied().unwrap_or(false);
                if dirty {
                    want_next = Some(c);
                }
                prop_assert_eq!(b.is_chunk_dirty(c), dirty);
                prop_assert_eq!(b.next_dirty(c), want_next);
            }
            let dirty = model.iter().filter(|&&d| d).count() as u64;
            prop_assert_eq!(b.dirty_chunks(), dirty);
            prop_assert_eq!(b.is_clean(), dirty == 0);
            let bytes: u64 = (0..n).filter(|&c| model[c as usize]).map(|c| b.chunk_range(c).1).sum();
            prop_assert_eq!(b.dirty_bytes(), bytes);
            let enc = b.encode();
            prop_assert_eq!(DirtyBitmap::decode(&enc).unwrap(), b.clone());
            let mut all = b.clone();
            all.set_all();
            prop_assert_eq!(all.dirty_chunks(), n);
            prop_assert_eq!(all.dirty_bytes(), size);
            let mut u = DirtyBitmap::new(size, g);
            u.union_with(&b).unwrap();
            prop_assert_eq!(&u, &b);
        }

        #[test]
        fn corruption_detected(size in 1u64..100_000, ranges in proptest::collection::vec((0u64..100_000, 1u64..5000), 0..5),
                               idx in any::<prop::sample::Index>(), x in 1u8..=255) {
            let mut b = DirtyBitmap::new(size, 512);
            for (o, l) in ranges { b.set_range(o, l); }
            let mut enc = b.encode();
            let i = idx.index(enc.len());
            enc[i] ^= x;
            prop_assert!(DirtyBitmap::decode(&enc).is_err());
            prop_assert!(DirtyBitmap::decode(&enc[..i]).is_err());
        }

        #[test]
        fn decode_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = DirtyBitmap::decode(&buf);
        }
    }

    #[test]
    fn edges() {
        let mut b = DirtyBitmap::new(64 * 1024 * 10 + 100, DEFAULT_GRANULARITY);
        assert_eq!(b.chunk_count(), 11);
        assert_eq!(b.chunk_range(10), (655_360, 100));
        assert_eq!(b.chunk_range(11), (720_896, 0));
        b.set_range(655_400, 1);
        assert_eq!(b.dirty_bytes(), 100);
        b.set_range(0, 0);
        assert_eq!(b.dirty_chunks(), 1);
        b.set_range(u64::MAX - 5, 100);
        assert_eq!(b.dirty_chunks(), 1);
        assert_eq!(DirtyBitmap::new(100, 1000).granularity(), 1024);
        assert_eq!(DirtyBitmap::new(100, 0).granularity(), DEFAULT_GRANULARITY);
        let empty = DirtyBitmap::new(0, 512);
        assert_eq!(empty.next_dirty(0), None);
        assert_eq!(DirtyBitmap::decode(&empty.encode()).unwrap(), empty);
        assert!(b.clone().union_with(&empty).is_err());
        // A valid CRC over a length that does not match the geometry.
        let mut enc = DirtyBitmap::new(64 * 512, 512).encode();
        enc.truncate(enc.len() - 4);
        enc.extend_from_slice(&[0; 8]);
        let crc = crc32(&enc);
        enc.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(DirtyBitmap::decode(&enc), Err(BitmapError::SizeMismatch { .. })));
        // Stray bit past the end with a valid CRC.
        let mut enc = DirtyBitmap::new(3 * 512, 512).encode();
        enc[HEADER_LEN] = 0b1000;
        let n = enc.len();
        let crc = crc32(&enc[..n - 4]);
        enc[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(DirtyBitmap::decode(&enc), Err(BitmapError::Corrupt(_))));
    }
}
