//! The physical floor: the workload straight onto the backing file through
//! the daemon's own io_uring engine with O_DIRECT (no NBD, no daemon).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replicator::io::{AlignedBuf, BackendChoice, IoEngine, OpenOptions};

use crate::stats::RunOutcome;
use crate::workload::{OpGen, OpKind, Rng, Workload};

/// What the floor ran on.
#[derive(Debug, Clone)]
pub struct LocalInfo {
    /// `io_uring` or `threads`.
    pub backend: String,
    /// O_DIRECT in effect.
    pub direct: bool,
}

/// Opens `path` (which must exist) and reports the backend.
pub fn probe(path: &Path) -> Result<LocalInfo, String> {
    let engine = IoEngine::new(BackendChoice::Auto);
    let f = engine
        .open(path, &OpenOptions { create_size: None, create: false, direct: true, read_only: true })
        .map_err(|e| e.to_string())?;
    Ok(LocalInfo { backend: f.backend().to_string(), direct: f.is_direct() })
}

/// Runs `workload` on `path` with `queue_depth` tasks.
pub fn run(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    workload: Workload,
    warmup: Duration,
    duration: Duration,
    seed: u64,
) -> Result<RunOutcome, String> {
    rt.block_on(run_async(path, workload, warmup, duration, seed))
}

async fn run_async(
    path: &Path,
    workload: Workload,
    warmup: Duration,
    duration: Duration,
    seed: u64,
) -> Result<RunOutcome, String> {
    let engine = IoEngine::new(BackendChoice::Auto);
    let file = engine
        .open(path, &OpenOptions { create_size: None, create: false, direct: true, read_only: false })
        .map_err(|e| e.to_string())?;
    let gen = Arc::new(Mutex::new(OpGen::new(workload, file.size(), seed)));
    let begin = Instant::now() + warmup;
    let end = begin + duration;
    let completed = Arc::new(AtomicU64::new(0));
    let max_ops = workload.max_ops();
    let mut tasks = Vec::new();
    for t in 0..workload.queue_depth() {
        let (file, gen, completed) = (file.clone(), gen.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = AlignedBuf::zeroed(workload.block_size() as usize);
            Rng::new(seed ^ (t as u64 + 1)).fill(&mut buf);
            let mut out = RunOutcome::default();
            let mut last = begin;
            loop {
                let now = Instant::now();
                if now >= end || completed.load(Ordering::Relaxed) >= max_ops {
                    break;
                }
                let op = gen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next_op();
                let start = Instant::now();
                let res = match op.kind {
                    OpKind::Read => {
                        let (r, b) = file.read_at(buf, op.offset).await;
                        buf = b;
                        r
                    }
                    OpKind::Write => {
                        let (r, b) = file.write_at(buf, op.offset).await;
                        buf = b;
                        r
                    }
                    OpKind::WriteFlush => {
                        let (r, b) = file.write_at(buf, op.offset).await;
                        buf = b;
                        match r {
                            Ok(()) => file.sync_data().await,
                            Err(e) => Err(e),
                        }
                    }
                };
                let done = Instant::now();
                if let Err(e) = res {
                    return Err(format!("{} at {}: {e}", workload.name(), op.offset));
                }
                if done >= begin && done <= end {
                    out.ops += 1;
                    out.bytes += op.len;
                    out.lat_ns.push(done.duration_since(start).as_nanos() as u64);
                    completed.fetch_add(1, Ordering::Relaxed);
                    last = done;
                }
            }
            out.secs = last.saturating_duration_since(begin).as_secs_f64();
            Ok(out)
        }));
    }
    let mut total = RunOutcome::default();
    for t in tasks {
        let o = t.await.map_err(|e| e.to_string())??;
        total.ops += o.ops;
        total.bytes += o.bytes;
        total.lat_ns.extend(o.lat_ns);
    }
    total.secs = if completed.load(Ordering::Relaxed) >= max_ops {
        Instant::now().min(end).saturating_duration_since(begin).as_secs_f64()
    } else {
        duration.as_secs_f64()
    };
    Ok(total)
}

/// Writes `size` bytes of zeroes (or pseudo-random data) to a new file with
/// O_DIRECT, so that measurements do not include first-touch block
/// allocation, and the page cache holds nothing of it.
pub fn prefill(path: &Path, size: u64, random: Option<u64>) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let chunk = 4usize << 20;
    let mut buf = AlignedBuf::zeroed(chunk);
    let mut rng = random.map(Rng::new);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        buf.set_len(n);
        if let Some(r) = rng.as_mut() {
            r.fill(&mut buf);
        }
        f.write_all_at(&buf, off).map_err(|e| format!("{}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// What the disk allows a copy between two files on it, in MB/s of one
/// file: each 1 MiB block of `a` is read and written to `b` (or, with
/// `compare`, read from both: what a copy of identical volumes does), four
/// blocks in flight, O_DIRECT, then `b` is synced. With both sites on one
/// machine this is the floor of the initial copy: every byte copied is read
/// on one site and written (or read) on the other, on the same disk.
pub fn copy_floor(rt: &tokio::runtime::Runtime, a: &Path, b: &Path, compare: bool) -> Result<f64, String> {
    rt.block_on(async {
        let engine = IoEngine::new(BackendChoice::Auto);
        let open = |p: &Path, read_only| {
            engine
                .open(p, &OpenOptions { create_size: None, create: false, direct: true, read_only })
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let (src, dst) = (open(a, true)?, open(b, compare)?);
        let size = src.size().min(dst.size());
        let block = 1u64 << 20;
        let lanes = 4u64;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for lane in 0..lanes {
            let (src, dst) = (src.clone(), dst.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = AlignedBuf::zeroed(block as usize);
                let mut other = AlignedBuf::zeroed(block as usize);
                let mut off = lane * block;
                while off + block <= size {
                    let (r, b) = src.read_at(buf, off).await;
                    buf = b;
                    r.map_err(|e| e.to_string())?;
                    let r = if compare {
                        let (r, b) = dst.read_at(other, off).await;
                        other = b;
                        r
                    } else {
                        let (r, b) = dst.write_at(buf, off).await;
                        buf = b;
                        r
                    };
                    r.map_err(|e| e.to_string())?;
                    off += lanes * block;
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        if !compare {
            dst.sync_data().await.map_err(|e| e.to_string())?;
        }
        Ok(size as f64 / start.elapsed().as_secs_f64() / 1e6)
    })
}
