//! The workloads and the generator of their operations.

use serde::Serialize;

/// One workload of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// 4 KiB random write, queue depth 1.
    RandWrite4kQd1,
    /// 4 KiB random write, queue depth 8.
    RandWrite4kQd8,
    /// 4 KiB random write, queue depth 32.
    RandWrite4kQd32,
    /// 1 MiB sequential write, queue depth 4.
    SeqWrite1m,
    /// Database log: 4 KiB sequential write, then FLUSH, one at a time.
    Wal,
    /// 70 % random 4 KiB reads, 30 % random 4 KiB writes, queue depth 8.
    Mix7030,
}

impl Workload {
    /// Every workload, in table order.
    /// The 1 MiB sequential write goes last: it leaves the most behind
    /// (journal pages to write back, replication backlog) for the next cell.
    pub const ALL: [Workload; 6] = [
        Workload::RandWrite4kQd1,
        Workload::RandWrite4kQd8,
        Workload::RandWrite4kQd32,
        Workload::Wal,
        Workload::Mix7030,
        Workload::SeqWrite1m,
    ];

    /// Short name used on the command line, in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandWrite4kQd1 => "4k-randw-qd1",
            Workload::RandWrite4kQd8 => "4k-randw-qd8",
            Workload::RandWrite4kQd32 => "4k-randw-qd32",
            Workload::SeqWrite1m => "1m-seqw-qd4",
            Workload::Wal => "wal-4k+flush",
            Workload::Mix7030 => "4k-rw70/30-qd8",
        }
    }

    /// Parses [`Workload::name`] or a short alias.
    pub fn parse(s: &str) -> Option<Workload> {
        let s = s.trim();
        Workload::ALL.into_iter().find(|w| w.name() == s).or(match s {
            "qd1" => Some(Workload::RandWrite4kQd1),
            "qd8" => Some(Workload::RandWrite4kQd8),
            "qd32" => Some(Workload::RandWrite4kQd32),
            "seq" => Some(Workload::SeqWrite1m),
            "wal" => Some(Workload::Wal),
            "mix" => Some(Workload::Mix7030),
            _ => None,
        })
    }

    /// Requests kept in flight.
    pub fn queue_depth(self) -> usize {
        match self {
            Workload::RandWrite4kQd1 | Workload::Wal => 1,
            Workload::RandWrite4kQd8 | Workload::Mix7030 => 8,
            Workload::RandWrite4kQd32 => 32,
            Workload::SeqWrite1m => 4,
        }
    }

    /// Bytes per data request.
    pub fn block_size(self) -> u64 {
        match self {
            Workload::SeqWrite1m => 1 << 20,
            _ => 4096,
        }
    }

    /// Most operations one cell may run, whatever its duration.
    pub fn max_ops(self) -> u64 {
        match self {
            Workload::SeqWrite1m => 20_000,
            _ => 400_000,
        }
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes.
    Read,
    /// Write `len` bytes.
    Write,
    /// Write `len` bytes, then FLUSH (counted as one operation).
    WriteFlush,
}

/// One operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Kind.
    pub kind: OpKind,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// xorshift64*: fast, deterministic pseudo-random numbers.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (a zero seed is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Generates the operations of a workload over a device of `size` bytes.
#[derive(Debug, Clone)]
pub struct OpGen {
    workload: Workload,
    rng: Rng,
    size: u64,
    next_seq: u64,
}

impl OpGen {
    /// A generator; `seed` fixes the sequence.
    pub fn new(workload: Workload, size: u64, seed: u64) -> OpGen {
        OpGen { workload, rng: Rng::new(seed), size, next_seq: 0 }
    }

    fn random_offset(&mut self, bs: u64) -> u64 {
        self.rng.below((self.size / bs).max(1)) * bs
    }

    fn sequential_offset(&mut self, bs: u64) -> u64 {
        if self.next_seq + bs > self.size {
            self.next_seq = 0;
        }
        let off = self.next_seq;
        self.next_seq += bs;
        off
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let bs = self.workload.block_size();
        match self.workload {
            Workload::RandWrite4kQd1 | Workload::RandWrite4kQd8 | Workload::RandWrite4kQd32 => {
                Op { kind: OpKind::Write, offset: self.random_offset(bs), len: bs }
            }
            Workload::SeqWrite1m => Op { kind: OpKind::Write, offset: self.sequential_offset(bs), len: bs },
            Workload::Wal => Op { kind: OpKind::WriteFlush, offset: self.sequential_offset(bs), len: bs },
            Workload::Mix7030 => {
                let kind = if self.rng.unit() < 0.7 { OpKind::Read } else { OpKind::Write };
                Op { kind, offset: self.random_offset(bs), len: bs }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_stay_inside_and_aligned() {
        for w in Workload::ALL {
            let size = 64 << 20;
            let mut g = OpGen::new(w, size, 42);
            let mut reads = 0;
            for _ in 0..10_000 {
                let op = g.next_op();
                assert!(op.offset + op.len <= size, "{w:?} {op:?}");
                assert_eq!(op.offset % op.len, 0);
                assert_eq!(op.len, w.block_size());
                reads += u32::from(op.kind == OpKind::Read);
            }
            if w == Workload::Mix7030 {
                assert!((6500..7500).contains(&reads), "{reads} reads of 10000");
            } else {
                assert_eq!(reads, 0);
            }
            assert_eq!(Workload::parse(w.name()), Some(w));
        }
    }

    #[test]
    fn sequential_wraps() {
        let mut g = OpGen::new(Workload::SeqWrite1m, 3 << 20, 1);
        let offs: Vec<u64> = (0..5).map(|_| g.next_op().offset >> 20).collect();
        assert_eq!(offs, vec![0, 1, 2, 0, 1]);
    }
}
