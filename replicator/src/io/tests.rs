//! Functional tests of the I/O module, run against both backends.
//!
//! The io_uring cases are skipped, with a note, where the ring cannot be
//! created (e.g. a container whose seccomp profile blocks io_uring). The loop
//! device test needs root and `losetup`.

use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::Command;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::*;

const MIB: u64 = 1 << 20;

/// Both engines: io_uring first (when available here), then threads.
fn engines() -> Vec<IoEngine> {
    let auto = IoEngine::new(BackendChoice::Auto);
    let mut all = Vec::new();
    if auto.backend() == Backend::IoUring {
        all.push(auto);
    } else {
        eprintln!(
            "NOTE: io_uring unavailable here ({}); testing the threads backend only",
            auto.fallback_reason().unwrap_or_default()
        );
    }
    let threads = IoEngine::new(BackendChoice::Threads);
    assert_eq!(threads.backend(), Backend::Threads);
    assert_eq!(threads.fallback_reason(), None);
    all.push(threads);
    all
}

fn tempdir() -> tempfile::TempDir {
    // Not /tmp-specific: std::env::temp_dir, wherever that is.
    tempfile::Builder::new().prefix("replicator-io-test").tempdir_in(std::env::temp_dir()).expect("create temp dir")
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(seed: u64, len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    buf
}

fn create(engine: &IoEngine, path: &Path, size: u64, direct: bool) -> BlockFile {
    let opts = OpenOptions { create_size: Some(size), create: true, direct, read_only: false };
    engine.open(path, &opts).expect("open")
}

async fn write(file: &BlockFile, buf: AlignedBuf, offset: u64) -> AlignedBuf {
    let (r, buf) = file.write_at(buf, offset).await;
    r.unwrap_or_else(|e| panic!("{:?}: write at {offset}: {e}", file.backend()));
    buf
}

async fn read(file: &BlockFile, len: usize, offset: u64) -> AlignedBuf {
    let (r, buf) = file.read_at(AlignedBuf::zeroed(len), offset).await;
    r.unwrap_or_else(|e| panic!("{:?}: read at {offset}: {e}", file.backend()));
    assert_eq!(buf.len(), len);
    buf
}

fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn backend_names_and_env_values() {
    assert_eq!(Backend::IoUring.to_string(), "io_uring");
    assert_eq!(Backend::Threads.to_string(), "threads");
    assert_eq!(env_decision(None), EnvDecision::Keep);
    assert_eq!(env_decision(Some("")), EnvDecision::Keep);
    assert_eq!(env_decision(Some("auto")), EnvDecision::Keep);
    assert_eq!(env_decision(Some("io_uring")), EnvDecision::Keep);
    assert_eq!(env_decision(Some("threads")), EnvDecision::ForceThreads);
    assert_eq!(env_decision(Some(" THREADS ")), EnvDecision::ForceThreads);
    assert_eq!(env_decision(Some("uring")), EnvDecision::Invalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_threads_when_the_ring_cannot_be_created() {
    // A ring of 0 entries is refused by every kernel (EINVAL).
    let engine = IoEngine::uring_or_threads(0);
    assert_eq!(engine.backend(), Backend::Threads);
    let reason = engine.fallback_reason().expect("a reason");
    assert!(reason.contains("io_uring"), "{reason}");
    // And the fallback engine works.
    let dir = tempdir();
    let file = create(&engine, &dir.path().join("fallback"), MIB, true);
    assert_eq!(file.backend(), Backend::Threads);
    write(&file, pattern(2, 4096), 0).await;
    assert!(read(&file, 4096, 0).await[..] == pattern(2, 4096)[..]);
}

#[test]
fn ioctl_numbers() {
    // libc's ioctl request type is c_ulong on glibc, c_int on musl.
    #[allow(clippy::unnecessary_cast)]
    let libc_value = libc::BLKSSZGET as u64;
    assert_eq!(file::BLKSSZGET, libc_value);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        assert_eq!(file::BLKGETSIZE64, 0x8008_1272);
        assert_eq!(file::BLKDISCARD, 0x1277);
        assert_eq!(file::BLKZEROOUT, 0x127f);
    }
}

#[test]
fn error_messages_name_what_failed() {
    let e = IoError::SizeMismatch { path: "/dev/vg0/db".into(), expected: 20, actual: 10 };
    let msg = e.to_string();
    assert!(msg.contains("/dev/vg0/db") && msg.contains("20") && msg.contains("10"), "{msg}");
    let e = IoError::io("write", 4096, io::Error::from_raw_os_error(libc::EIO));
    let msg = e.to_string();
    assert!(msg.contains("write") && msg.contains("4096") && msg.contains("Input/output"), "{msg}");
    // A failed copy-on-write names the preserved image, not the volume,
    // and a full filesystem says what to do.
    let preserve = |errno| IoError::Preserve {
        offset: 6160384,
        dir: "/var/lib/replicator/groups/db/resync-guard".into(),
        source: Box::new(IoError::io("write", 65536, io::Error::from_raw_os_error(errno))),
    };
    let msg = preserve(libc::ENOSPC).to_string();
    assert!(msg.contains("6160384") && msg.contains("groups/db/resync-guard") && msg.contains("free space"), "{msg}");
    assert!(preserve(libc::ENOSPC).is_storage_full());
    let msg = preserve(libc::EIO).to_string();
    assert!(msg.contains("resync-guard") && !msg.contains("free space"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_patterns() {
    let dir = tempdir();
    for engine in engines() {
        for direct in [true, false] {
            let path = dir.path().join(format!("rt-{}-{direct}", engine.backend()));
            let size = 16 * MIB;
            let file = create(&engine, &path, size, direct);
            assert_eq!(file.size(), size);
            assert!(!file.is_block_device());
            assert_eq!(file.backend(), engine.backend());
            if direct && !file.is_direct() {
                eprintln!("NOTE: {} refuses O_DIRECT; tested buffered", dir.path().display());
            }
            // Aligned pieces of several sizes, including one larger than the
            // zero-fill chunk and one ending exactly at the end of the file.
            let pieces: [(u64, usize); 5] =
                [(0, 4096), (8192, 65536), (MIB, 3 * MIB as usize), (5 * MIB + 4096, 128 * 1024), (size - 4096, 4096)];
            for (i, &(off, len)) in pieces.iter().enumerate() {
                write(&file, pattern(i as u64 + 1, len), off).await;
            }
            for (i, &(off, len)) in pieces.iter().enumerate() {
                let got = read(&file, len, off).await;
                assert!(got[..] == pattern(i as u64 + 1, len)[..], "{:?} piece {i}", engine.backend());
            }
            // Untouched ranges of the sparse file read as zeroes.
            assert!(read(&file, 4096, 4096).await.iter().all(|&b| b == 0));
            // Zero-length I/O is a no-op.
            let (r, _) = file.read_at(AlignedBuf::zeroed(0), 0).await;
            r.expect("empty read");
            // Cross-check through the page cache / plain std I/O.
            file.sync_data().await.expect("sync");
            let on_disk = std::fs::read(&path).expect("read back with std");
            assert!(on_disk[8192..8192 + 65536] == pattern(2, 65536)[..]);
            if !file.is_direct() {
                // Buffered: any offset and length.
                write(&file, pattern(99, 1000), 123).await;
                assert!(read(&file, 1000, 123).await[..] == pattern(99, 1000)[..]);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_ops() {
    let dir = tempdir();
    for engine in engines() {
        // 64 tasks as the daemon would issue them, then far more than the
        // ring holds (256 SQEs / 512 CQEs) to exercise the backlog.
        for tasks in [64u64, 2048] {
            let path = dir.path().join(format!("conc-{}-{tasks}", engine.backend()));
            let file = create(&engine, &path, tasks * 4096, true);
            let mut handles = Vec::new();
            for i in 0..tasks {
                let file = file.clone();
                handles.push(tokio::spawn(async move {
                    write(&file, pattern(i + 1000, 4096), i * 4096).await;
                }));
            }
            for h in handles {
                h.await.expect("writer task");
            }
            let mut handles = Vec::new();
            for i in 0..tasks {
                let file = file.clone();
                handles.push(tokio::spawn(async move {
                    let got = read(&file, 4096, i * 4096).await;
                    assert!(got[..] == pattern(i + 1000, 4096)[..], "block {i}");
                }));
            }
            for h in handles {
                h.await.expect("reader task");
            }
        }
    }
}

/// An operation that joins the backlog because enough reads and writes are
/// in flight (io_uring's batching at depth) is submitted by the next
/// completion, even when nothing else is submitted after it and its own
/// future is the only one awaited.
#[tokio::test]
async fn an_operation_batched_behind_others_completes_on_its_own() {
    let dir = tempdir();
    let engine = IoEngine::new(BackendChoice::Auto);
    if engine.backend() != Backend::IoUring {
        eprintln!("NOTE: io_uring unavailable here; nothing to test");
        return;
    }
    let file = create(&engine, &dir.path().join("batched"), 64 * 4096, true);
    // Submitted at once: the first BATCH_DEPTH, polled once, are in flight.
    let mut ahead: Vec<_> = (0..8u64).map(|i| Box::pin(write(&file, pattern(i, 4096), i * 4096))).collect();
    for fut in &mut ahead {
        let _ = poll_once(fut.as_mut());
    }
    // Batched behind them; awaited alone, it must still complete.
    let data = pattern(99, 4096);
    tokio::time::timeout(Duration::from_secs(10), write(&file, data.clone(), 63 * 4096)).await.expect("batched write");
    tokio::time::timeout(Duration::from_secs(10), file.sync_data()).await.expect("batched sync").expect("sync");
    for fut in ahead {
        tokio::time::timeout(Duration::from_secs(10), fut).await.expect("write ahead");
    }
    assert!(read(&file, 4096, 63 * 4096).await[..] == data[..]);
    for i in 0..8u64 {
        assert!(read(&file, 4096, i * 4096).await[..] == pattern(i, 4096)[..], "block {i}");
    }
}

/// Waits until `len` bytes at `offset` of `path` read (with std) as `want`.
async fn wait_for_data(path: &Path, offset: u64, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let data = std::fs::read(path).expect("read file");
        let start = offset as usize;
        if data.get(start..start + want.len()) == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "dropped write never landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_futures_still_complete_safely() {
    let dir = tempdir();
    for engine in engines() {
        let path = dir.path().join(format!("drop-{}", engine.backend()));
        let blocks = 256u64;
        let file = create(&engine, &path, blocks * 4096 + MIB, true);

        // A write whose future is dropped right after it was submitted.
        {
            let fut = pin!(file.write_at(pattern(7, MIB as usize), blocks * 4096));
            // Usually pending; a fast device may complete it within the poll.
            let _ = poll_once(fut);
        }
        wait_for_data(&path, blocks * 4096, &pattern(7, MIB as usize)).await;

        // Many reads dropped in flight, into buffers the engine now owns. If
        // the engine freed a buffer before its completion, the kernel would
        // write 0xAB into memory reused by the fresh buffers below.
        write(&file, AlignedBuf::copy_from(&vec![0xAB; (blocks * 4096) as usize]), 0).await;
        for i in 0..blocks {
            let fut = pin!(file.read_at(AlignedBuf::zeroed(4096), i * 4096));
            let _ = poll_once(fut);
        }
        let fresh: Vec<AlignedBuf> = (0..blocks).map(|_| AlignedBuf::zeroed(4096)).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(fresh.iter().all(|b| b.iter().all(|&x| x == 0)), "memory corrupted");

        // The engine still works.
        write(&file, pattern(8, 4096), 0).await;
        assert!(read(&file, 4096, 0).await[..] == pattern(8, 4096)[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_exits_after_the_last_handle_finishing_in_flight_ops() {
    let engine = IoEngine::new(BackendChoice::Auto);
    let Some(uring) = engine.uring() else {
        eprintln!("NOTE: io_uring unavailable here; skipping");
        return;
    };
    let exited = uring.exit_probe();
    let dir = tempdir();
    let path = dir.path().join("exit");
    let file = create(&engine, &path, 4 * MIB, true);
    {
        let fut = pin!(file.write_at(pattern(11, 4 * MIB as usize), 0));
        let _ = poll_once(fut);
    }
    drop(engine);
    assert!(!exited(), "a BlockFile still holds the engine");
    drop(file);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited() {
        assert!(Instant::now() < deadline, "the io_uring reaper did not exit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for_data(&path, 0, &pattern(11, 4 * MIB as usize)).await;
}

/// Reads back what a few writes put at their offsets, through `file`.
async fn write_and_check(file: &BlockFile, seed: u64) {
    for i in 0..8u64 {
        write(file, pattern(seed + i, 64 * 1024), i * 64 * 1024).await;
    }
    for i in 0..8u64 {
        assert!(read(file, 64 * 1024, i * 64 * 1024).await[..] == pattern(seed + i, 64 * 1024)[..]);
    }
}

#[test]
fn an_engine_made_outside_a_runtime_reaps_on_a_thread() {
    let engine = IoEngine::new(BackendChoice::Auto);
    if engine.uring().is_none() {
        eprintln!("NOTE: io_uring unavailable here; skipping");
        return;
    }
    let dir = tempdir();
    let file = create(&engine, &dir.path().join("thread"), 4 * MIB, true);
    for flavor in ["current-thread", "multi-thread"] {
        let rt = match flavor {
            "current-thread" => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build(),
        }
        .expect("runtime");
        rt.block_on(write_and_check(&file, 20));
    }
}

#[test]
fn the_reaper_outlives_the_runtime_it_started_in() {
    let dir = tempdir();
    let first = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (engine, file) = first.block_on(async {
        let engine = IoEngine::new(BackendChoice::Auto);
        let file = create(&engine, &dir.path().join("moved"), 4 * MIB, true);
        write_and_check(&file, 30).await;
        (engine, file)
    });
    if engine.uring().is_none() {
        eprintln!("NOTE: io_uring unavailable here; skipping");
        return;
    }
    // Its reaper task goes with this runtime: a thread takes over.
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    second.block_on(write_and_check(&file, 40));
    let exited = engine.uring().map(|u| u.exit_probe()).expect("io_uring");
    drop((engine, file));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited() {
        assert!(Instant::now() < deadline, "the reaper thread did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_data_and_durable_writes() {
    let dir = tempdir();
    for engine in engines() {
        let file = create(&engine, &dir.path().join(format!("sync-{}", engine.backend())), MIB, true);
        write(&file, pattern(3, 4096), 4096).await;
        file.sync_data().await.expect("sync_data");
        file.sync_data().await.expect("sync_data again");
        // Concurrent syncs queue behind one another and share one.
        let syncs = (0..16).map(|_| file.sync_data());
        for r in futures_util::future::join_all(syncs).await {
            r.expect("concurrent sync_data");
        }
        let (r, _) = file.write_at_durable(pattern(12, 8192), 8192).await;
        r.expect("durable write");
        assert!(read(&file, 8192, 8192).await[..] == pattern(12, 8192)[..]);
        let (r, _) = file.write_at_durable(AlignedBuf::zeroed(4096), MIB).await;
        assert!(matches!(r, Err(IoError::OutOfRange { .. })), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_writes_from_aligned_and_unaligned_memory() {
    let dir = tempdir();
    for engine in engines() {
        for direct in [true, false] {
            let file =
                create(&engine, &dir.path().join(format!("shared-{}-{direct}", engine.backend())), 4 * MIB, direct);
            // Aligned memory: the engine writes from it as it is.
            let aligned = Bytes::from_owner(pattern(21, 256 * 1024));
            assert_eq!(aligned.as_ptr() as usize % IO_ALIGN, 0);
            file.write_bytes(aligned.clone(), MIB, false).await.expect("aligned shared write");
            assert!(read(&file, 256 * 1024, MIB).await[..] == aligned[..], "{:?} direct={direct}", engine.backend());
            // Memory off the alignment (a payload inside a received frame):
            // copied into an aligned buffer first, same bytes on disk.
            let mut framed = vec![7u8; 3];
            framed.extend_from_slice(&pattern(22, 8192));
            let unaligned = Bytes::from(framed).slice(3..);
            file.write_bytes(unaligned.clone(), 2 * MIB, true).await.expect("unaligned durable shared write");
            assert!(read(&file, 8192, 2 * MIB).await[..] == unaligned[..], "{:?} direct={direct}", engine.backend());
            // The same checks as every write.
            let r = file.write_bytes(aligned.slice(..4096), 4 * MIB, false).await;
            assert!(matches!(r, Err(IoError::OutOfRange { .. })), "{r:?}");
            if file.is_direct() {
                let r = file.write_bytes(aligned.slice(..4096), 512, false).await;
                assert!(matches!(r, Err(IoError::Misaligned { .. })), "{r:?}");
            }
            // A shared write whose future is dropped still completes: the
            // engine holds its own reference to the bytes.
            {
                let data = Bytes::from_owner(pattern(23, MIB as usize));
                let fut = pin!(file.write_bytes(data, 3 * MIB, false));
                let _ = poll_once(fut);
            }
            wait_for_data(&file.inner.path, 3 * MIB, &pattern(23, MIB as usize)).await;
        }
    }
}

async fn check_zeroing(file: &BlockFile, discard: bool, offset: u64, len: u64) {
    let size = file.size();
    write(file, pattern(5, size as usize), 0).await;
    if discard {
        file.discard(offset, len).await.expect("discard");
    } else {
        file.write_zeroes(offset, len).await.expect("write_zeroes");
    }
    let all = read(file, size as usize, 0).await;
    let want = pattern(5, size as usize);
    let (o, e) = (offset as usize, (offset + len) as usize);
    assert!(all[..o] == want[..o], "bytes before the range changed");
    assert!(all[o..e].iter().all(|&b| b == 0), "range not zeroed");
    assert!(all[e..] == want[e..], "bytes after the range changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_and_discard_read_back_zeroes() {
    let dir = tempdir();
    for engine in engines() {
        let b = engine.backend();
        let file = create(&engine, &dir.path().join(format!("z-{b}")), 4 * MIB, true);
        check_zeroing(&file, false, 4096, 64 * 1024).await;
        check_zeroing(&file, true, MIB, 2 * MIB).await;
        // The last-resort path: writing zero buffers, in several chunks.
        write(&file, pattern(6, 4 * MIB as usize), 0).await;
        file.write_zero_buffers(4096, 2 * MIB + 8192).await.expect("zero buffers");
        let got = read(&file, 4 * MIB as usize, 0).await;
        assert!(got[4096..4096 + 2 * MIB as usize + 8192].iter().all(|&x| x == 0));
        assert!(got[..4096] == pattern(6, 4096)[..]);

        // Buffered: unaligned ranges are fine.
        let file = create(&engine, &dir.path().join(format!("zb-{b}")), MIB, false);
        check_zeroing(&file, false, 100, 5000).await;
        check_zeroing(&file, true, 777, 70_000).await;
        file.write_zeroes(0, 0).await.expect("empty range");

        // Discard releases the space of a regular file (ext4, xfs, btrfs,
        // tmpfs all punch holes).
        let path = dir.path().join(format!("zspace-{b}"));
        let file = create(&engine, &path, 8 * MIB, true);
        write(&file, pattern(9, 8 * MIB as usize), 0).await;
        file.sync_data().await.expect("sync");
        let before = std::fs::metadata(&path).expect("stat").blocks();
        file.discard(0, 8 * MIB).await.expect("discard");
        let after = std::fs::metadata(&path).expect("stat").blocks();
        assert!(after < before, "discard freed nothing ({before} -> {after} blocks)");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 8 * MIB);
    }
}

/// NBD's WRITE_ZEROES with NO_HOLE needs the range fully provisioned
/// afterwards; on tmpfs, which has no `FALLOC_FL_ZERO_RANGE`, zeroing fell
/// back to punching a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_keeps_the_range_allocated() {
    let tmp = tempdir();
    let shm = Path::new("/dev/shm");
    let mut dirs = vec![tmp.path().to_path_buf()];
    // tmpfs: /dev/shm where the system has one (the fallback path). The
    // files are made beforehand: the engine makes no file under /dev.
    let shm_dir = shm.is_dir().then(|| tempfile::tempdir_in(shm).expect("temp dir in /dev/shm"));
    dirs.extend(shm_dir.as_ref().map(|d| d.path().to_path_buf()));
    for dir in dirs {
        for engine in engines() {
            let path = dir.join(format!("alloc-{}", engine.backend()));
            File::create(&path).and_then(|f| f.set_len(4 * MIB)).expect("make the file");
            let opts = OpenOptions { create_size: None, create: false, direct: false, read_only: false };
            let file = engine.open(&path, &opts).expect("open");
            write(&file, pattern(11, 4 * MIB as usize), 0).await;
            file.sync_data().await.expect("sync");
            let before = std::fs::metadata(&path).expect("stat").blocks();
            check_zeroing(&file, false, MIB, 2 * MIB).await;
            let after = std::fs::metadata(&path).expect("stat").blocks();
            assert_eq!(after, before, "{}: write_zeroes left a hole ({before} -> {after} blocks)", path.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_alignment_is_checked() {
    let dir = tempdir();
    for engine in engines() {
        let file = create(&engine, &dir.path().join(format!("al-{}", engine.backend())), MIB, true);
        if !file.is_direct() {
            eprintln!("NOTE: no O_DIRECT on {} for {}; alignment test skipped", dir.path().display(), engine.backend());
            continue;
        }
        let (r, buf) = file.read_at(AlignedBuf::zeroed(4096), 512).await;
        assert!(matches!(r, Err(IoError::Misaligned { offset: 512, len: 4096 })), "{r:?}");
        assert_eq!(buf.len(), 4096);
        let (r, _) = file.write_at(AlignedBuf::zeroed(1000), 0).await;
        assert!(matches!(r, Err(IoError::Misaligned { offset: 0, len: 1000 })), "{r:?}");
        let r = file.write_zeroes(4096, 100).await;
        assert!(matches!(r, Err(IoError::Misaligned { .. })), "{r:?}");
        let r = file.discard(100, 4096).await;
        assert!(matches!(r, Err(IoError::Misaligned { .. })), "{r:?}");
        assert!(r.expect_err("misaligned").to_string().contains("O_DIRECT"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_is_refused() {
    let dir = tempdir();
    for engine in engines() {
        let file = create(&engine, &dir.path().join(format!("oor-{}", engine.backend())), MIB, true);
        let (r, _) = file.read_at(AlignedBuf::zeroed(8192), MIB - 4096).await;
        assert!(
            matches!(r, Err(IoError::OutOfRange { offset, len: 8192, size }) if offset == MIB - 4096 && size == MIB),
            "{r:?}"
        );
        let (r, _) = file.write_at(AlignedBuf::zeroed(4096), MIB).await;
        assert!(matches!(r, Err(IoError::OutOfRange { .. })), "{r:?}");
        let (r, _) = file.read_at(AlignedBuf::zeroed(4096), u64::MAX - 4095).await;
        assert!(matches!(r, Err(IoError::OutOfRange { .. })), "{r:?}");
        assert!(matches!(file.write_zeroes(0, 2 * MIB).await, Err(IoError::OutOfRange { .. })));
        assert!(matches!(file.discard(MIB, 4096).await, Err(IoError::OutOfRange { .. })));
        // The file did not grow.
        assert_eq!(std::fs::metadata(file.path()).expect("stat").len(), MIB);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_read_when_the_file_shrank() {
    let dir = tempdir();
    for engine in engines() {
        let path = dir.path().join(format!("short-{}", engine.backend()));
        let file = create(&engine, &path, 64 * 1024, true);
        write(&file, pattern(1, 64 * 1024), 0).await;
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(32 * 1024)).expect("truncate");
        let (r, buf) = file.read_at(AlignedBuf::zeroed(8192), 28 * 1024).await;
        assert!(
            matches!(r, Err(IoError::ShortRead { offset, wanted: 8192, got: 4096 }) if offset == 28 * 1024),
            "{:?}: {r:?}",
            engine.backend()
        );
        assert_eq!(buf.len(), 8192);
        assert!(buf[..4096] == pattern(1, 32 * 1024)[28 * 1024..]);
    }
}

#[test]
fn sparse_creation_and_size_checks() {
    let dir = tempdir();
    for engine in engines() {
        let b = engine.backend();
        let path = dir.path().join(format!("sparse-{b}"));
        let size = 1 << 30;
        let file = create(&engine, &path, size, true);
        assert_eq!(file.size(), size);
        assert_eq!(file.path(), path);
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() * 512 < MIB, "not sparse: {} blocks", meta.blocks());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(file);

        // Reopening with the same size is fine; any other size is refused.
        create(&engine, &path, size, true);
        for other in [size - 4096, size + 4096] {
            match engine
                .open(&path, &OpenOptions { create_size: Some(other), create: true, direct: true, read_only: false })
            {
                Err(IoError::SizeMismatch { path: p, expected, actual }) => {
                    assert_eq!((p.as_path(), expected, actual), (path.as_path(), other, size));
                }
                other => panic!("{b}: expected SizeMismatch, got {other:?}"),
            }
        }
        // Without create_size, an existing file opens with its own size.
        let file = engine.open(&path, &OpenOptions::default()).expect("open");
        assert_eq!(file.size(), size);
        assert!(!file.is_direct());

        // Missing file without create_size, or read-only: not created.
        let missing = dir.path().join(format!("missing-{b}"));
        let err = engine.open(&missing, &OpenOptions::default()).expect_err("missing");
        assert!(matches!(&err, IoError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound));
        assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");
        let ro = OpenOptions { create_size: Some(MIB), create: true, direct: false, read_only: true };
        assert!(matches!(engine.open(&missing, &ro), Err(IoError::Open { .. })));
        assert!(!missing.exists());
        // A size but no `create`: refused as missing, not created.
        let no_create = OpenOptions { create_size: Some(MIB), create: false, direct: false, read_only: false };
        let err = engine.open(&missing, &no_create).expect_err("missing without create");
        assert!(matches!(&err, IoError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound), "{err:?}");
        assert!(!missing.exists());

        // Never a regular file under /dev: the device is missing.
        let dev = Path::new("/dev/replicator-io-test-no-such-volume");
        let err = engine
            .open(dev, &OpenOptions { create_size: Some(MIB), create: true, ..OpenOptions::default() })
            .expect_err("missing device");
        assert!(err.to_string().contains("refusing to create"), "{err}");
        assert!(!dev.exists());

        // Parent directory missing.
        let deep = dir.path().join("no/such/dir/vol");
        let err = engine
            .open(&deep, &OpenOptions { create_size: Some(MIB), create: true, ..OpenOptions::default() })
            .expect_err("no parent");
        assert!(matches!(err, IoError::Open { .. }), "{err:?}");
    }
}

#[test]
fn directories_and_char_devices_are_refused() {
    let dir = tempdir();
    let engine = IoEngine::new(BackendChoice::Auto);
    for read_only in [false, true] {
        let opts = OpenOptions { create_size: None, create: false, direct: true, read_only };
        let err = engine.open(dir.path(), &opts).expect_err("directory");
        assert!(matches!(err, IoError::Open { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("directory") && msg.contains("block device"), "{msg}");
        let err = engine.open(Path::new("/dev/null"), &opts).expect_err("char device");
        assert!(err.to_string().contains("character device"), "{err}");
    }
    // With create_size, an existing directory is still refused (not a size mismatch).
    let opts = OpenOptions { create_size: Some(MIB), create: true, direct: false, read_only: false };
    assert!(matches!(engine.open(dir.path(), &opts), Err(IoError::Open { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_refuses_writes() {
    let dir = tempdir();
    for engine in engines() {
        let path = dir.path().join(format!("ro-{}", engine.backend()));
        let file = create(&engine, &path, MIB, false);
        write(&file, pattern(4, 4096), 0).await;
        drop(file);
        let ro = engine
            .open(&path, &OpenOptions { create_size: Some(MIB), create: true, direct: true, read_only: true })
            .expect("open read-only");
        assert!(read(&ro, 4096, 0).await[..] == pattern(4, 4096)[..]);
        let (r, _) = ro.write_at(AlignedBuf::zeroed(4096), 0).await;
        assert!(
            matches!(&r, Err(IoError::Io { source, .. }) if source.kind() == io::ErrorKind::PermissionDenied),
            "{r:?}"
        );
        assert!(ro.write_zeroes(0, 4096).await.is_err());
        assert!(ro.discard(0, 4096).await.is_err());
        ro.sync_data().await.expect("fdatasync on a read-only descriptor");
    }
}

/// A loop device, detached on drop.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup").arg("-f").arg("--show").arg(backing).output().ok()?;
        if !out.status.success() {
            eprintln!("NOTE: losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice { dev })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loop_block_device() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("losetup").arg("--version").output().is_err() {
        eprintln!("NOTE: not root or no losetup: loop device test skipped");
        return;
    }
    let dir = tempdir();
    let backing = dir.path().join("loop-backing");
    let size = 32 * MIB;
    File::create(&backing).and_then(|f| f.set_len(size)).expect("backing file");
    let Some(lo) = LoopDevice::attach(&backing) else {
        eprintln!("NOTE: no loop device available: loop device test skipped");
        return;
    };
    for engine in engines() {
        let b = engine.backend();
        let wrong = OpenOptions { create_size: Some(size + 4096), create: true, direct: true, read_only: false };
        assert!(matches!(engine.open(&lo.dev, &wrong), Err(IoError::SizeMismatch { .. })));
        let opts = OpenOptions { create_size: Some(size), create: true, direct: true, read_only: false };
        let file = engine.open(&lo.dev, &opts).expect("open loop device");
        assert!(file.is_block_device());
        assert!(file.is_direct(), "block devices accept O_DIRECT");
        assert_eq!(file.size(), size, "BLKGETSIZE64");

        // Opened for writing means opened exclusively: a second writer (a
        // second daemon, mkfs) is refused, a reader is not.
        let busy = engine.open(&lo.dev, &opts);
        assert!(matches!(&busy, Err(IoError::DeviceBusy { path }) if *path == lo.dev), "{busy:?}");
        let msg = busy.expect_err("busy").to_string();
        assert!(msg.contains("in use by another process or mounted"), "{msg}");
        let ro = OpenOptions { read_only: true, ..opts.clone() };
        drop(engine.open(&lo.dev, &ro).expect("read-only open next to the writer"));

        // Concurrent round trip of 1 MiB pieces.
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let file = file.clone();
            tasks.push(tokio::spawn(async move {
                write(&file, pattern(i + 500, MIB as usize), i * MIB).await;
                assert!(read(&file, MIB as usize, i * MIB).await[..] == pattern(i + 500, MIB as usize)[..]);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        file.sync_data().await.expect("sync loop device");
        // The data is in the backing file, offset for offset.
        let backing_data = std::fs::read(&backing).expect("read backing");
        assert!(backing_data[3 * MIB as usize..4 * MIB as usize] == pattern(503, MIB as usize)[..], "{b}");

        check_zeroing(&file, false, 4096, 256 * 1024).await;
        check_zeroing(&file, true, 2 * MIB, 3 * MIB).await;
        assert!(matches!(file.read_at(AlignedBuf::zeroed(512), 0).await.0, Err(IoError::Misaligned { .. })));
        assert!(matches!(file.write_zeroes(size, 4096).await, Err(IoError::OutOfRange { .. })));
    }
}
