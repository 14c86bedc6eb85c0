//! Self-describing block contents and deterministic pseudo-random data.
//!
//! A [`Stamp`] block (4 KiB) names the block number and a version in its
//! header and fills the rest from a generator seeded by both, so a block read
//! back from a backing file tells exactly which write it holds — or that it
//! holds a torn or misplaced one.

/// Block size the stamps use.
pub const BLOCK: usize = 4096;

const MAGIC: &[u8; 8] = b"RPLSTAMP";

/// xorshift64*: deterministic pseudo-random bytes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills a buffer.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` deterministic pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// The 4 KiB content that stands for version `version` of block `block`.
pub fn stamp(block: u64, version: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&version.to_le_bytes());
    Rng::new(block.rotate_left(32) ^ version).fill(&mut buf[24..]);
    buf
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampRead {
    /// Never written (all zeroes).
    Zero,
    /// A complete, intact stamp.
    Stamp {
        /// Block number in the header.
        block: u64,
        /// Version in the header.
        version: u64,
    },
    /// Anything else: torn, mixed or foreign content.
    Garbage,
}

/// Decodes a 4 KiB block written with [`stamp`].
pub fn read_stamp(buf: &[u8]) -> StampRead {
    if buf.iter().all(|&b| b == 0) {
        return StampRead::Zero;
    }
    if buf.len() != BLOCK || &buf[..8] != MAGIC {
        return StampRead::Garbage;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[8..16]);
    let block = u64::from_le_bytes(b);
    b.copy_from_slice(&buf[16..24]);
    let version = u64::from_le_bytes(b);
    if stamp(block, version) == buf {
        StampRead::Stamp { block, version }
    } else {
        StampRead::Garbage
    }
}

/// What one stamped block may hold after a crash or power cut, given the
/// writes sent to it: its last durable version, or any version sent after
/// that (acknowledged or not; a cut may have kept any of them).
#[derive(Debug, Clone, Default)]
pub struct BlockState {
    /// Last version known durable (None: never written, zeroes).
    pub durable: Option<u64>,
    /// Versions sent since: any of them may be there.
    pub pending: Vec<u64>,
}

impl BlockState {
    /// Version `v` was sent to the block.
    pub fn sent(&mut self, v: u64) {
        self.pending.push(v);
    }

    /// Version `v` was acknowledged with FUA, or the block was found to
    /// hold `v` (None: zeroes) after a cut: it is what must survive now.
    pub fn durable_at(&mut self, v: Option<u64>) {
        self.durable = v;
        self.pending.clear();
    }

    /// A FLUSH was acknowledged after the block's last write was: that
    /// write must survive.
    pub fn flushed(&mut self) {
        if let Some(&v) = self.pending.last() {
            self.durable_at(Some(v));
        }
    }

    /// Checks block number `block`'s bytes: the version it holds, or why it
    /// may not hold what it does (a flushed write lost, a torn, misplaced
    /// or foreign block).
    pub fn check(&self, block: u64, data: &[u8]) -> Result<Option<u64>, String> {
        let found = match read_stamp(data) {
            StampRead::Zero => None,
            StampRead::Stamp { block: b, version } if b == block => Some(version),
            StampRead::Stamp { block: b, version } => {
                return Err(format!("block {block}: holds block {b}'s version {version} (misplaced)"));
            }
            StampRead::Garbage => return Err(format!("block {block}: torn or foreign content")),
        };
        if found == self.durable || found.is_some_and(|v| self.pending.contains(&v)) {
            return Ok(found);
        }
        let what = match found {
            None => "zeroes".to_string(),
            Some(v) => format!("version {v}"),
        };
        if self.pending.is_empty() {
            Err(format!(
                "block {block}: I1 VIOLATED: the flushed/FUA write (version {:?}) is lost, the block holds {what}",
                self.durable
            ))
        } else {
            Err(format!(
                "block {block}: holds {what}, neither the durable version {:?} nor one sent after it {:?}",
                self.durable, self.pending
            ))
        }
    }
}

/// How many leading `block`-sized blocks of `image` hold their write,
/// where write `i` put [`random_bytes`]`(i + 1, block)` into block `i`.
/// Panics unless the image is such a write-order prefix of `blocks`
/// writes: blocks `0..n` written, the rest untouched (zero).
pub fn written_prefix(image: &[u8], blocks: u64, block: u64) -> u64 {
    let written: Vec<bool> = (0..blocks)
        .map(|i| {
            let bytes = &image[(i * block) as usize..((i + 1) * block) as usize];
            if bytes.iter().all(|&x| x == 0) {
                false
            } else {
                assert!(
                    bytes == &random_bytes(i + 1, block as usize)[..],
                    "block {i} holds neither its write nor zeroes"
                );
                true
            }
        })
        .collect();
    let n = written.iter().take_while(|&&w| w).count();
    assert!(
        written[n..].iter().all(|&w| !w),
        "the image holds writes 0..{n} and then also {:?}: not a write-order prefix",
        written.iter().enumerate().skip(n).filter(|(_, &w)| w).map(|(i, _)| i).collect::<Vec<_>>()
    );
    n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_detect_tears() {
        let s = stamp(7, 3);
        assert_eq!(read_stamp(&s), StampRead::Stamp { block: 7, version: 3 });
        let mut torn = s.clone();
        torn[2048..].copy_from_slice(&stamp(7, 4)[2048..]);
        assert_eq!(read_stamp(&torn), StampRead::Garbage);
        assert_eq!(read_stamp(&[0u8; BLOCK]), StampRead::Zero);
        assert_ne!(random_bytes(1, 64), random_bytes(2, 64));
    }
}
