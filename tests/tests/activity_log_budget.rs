//! The activity log's budget (issue 8, I3 "bounded recovery"): with
//! `activity_log_extents = 4`, random writes over a 128 MiB volume (32
//! regions of 4 MiB) keep at most 4 regions in the primary's activity log,
//! writes wait for room when it is full, and a power cut of the primary
//! under that load resynchronises at most 4 × 4 MiB (plus whatever the
//! dirty bitmaps held at the cut). Every flushed write survives and the
//! sites end byte-identical.
//!
//! Without the budget, every region the load wrote in the last 10 s is in
//! the log, and the cut resynchronises nearly the whole volume.
//!
//! Each site's state_dir and volume live on `powercut-fs` (see
//! power_loss.rs): the cut drops everything not made durable. Two NBD
//! clients write self-describing 4 KiB blocks (`pattern::stamp`, 4–64 KiB
//! per write) at random over their half of the volume, with a FLUSH about
//! every 20 writes and FUA on about one write in 30; each block keeps its
//! last version known durable and the versions sent since.
//!
//! Needs root and /dev/fuse.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::exposition;
use replicator_tests::pattern::{stamp, BlockState, Rng, BLOCK};
use replicator_tests::{require, require_root, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
/// The activity log's region (extent) size.
const EXTENT: u64 = 4 * MIB;
/// `activity_log_extents` under test.
const BUDGET: u64 = 4;
/// 32 regions: eight times the budget.
const VOLUME_SIZE: u64 = 128 * MIB;
const BLOCKS: u64 = VOLUME_SIZE / BLOCK as u64;
/// Client tasks, each with its own half of the volume and connection.
const TASKS: u64 = 2;
/// A write is 1..=16 blocks (4 KiB to 64 KiB).
const MAX_WRITE_BLOCKS: u64 = 16;
/// The load runs this long before the cut (the cut ends it).
const LOAD_TIME: Duration = Duration::from_secs(5);
/// One NBD request may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Recovery to PAIR with lag 0 and nothing left to copy.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Default, Clone, Copy)]
struct LoadStats {
    writes: u64,
    flushes: u64,
    /// Requests that failed (the cut).
    failed: u64,
}

/// Writes at random over blocks `first..first + states.len()` until `stop`
/// or the first failed request (the cut).
async fn writer(
    socket: PathBuf,
    export: String,
    first: u64,
    mut states: Vec<BlockState>,
    seed: u64,
    versions: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (Vec<BlockState>, LoadStats) {
    let mut stats = LoadStats::default();
    let client = match NbdClient::connect_unix(&socket, &export).await {
        Ok(c) => c,
        Err(e) => panic!("NBD connect to {}: {e}", socket.display()),
    };
    let mut rng = Rng::new(seed);
    let blocks = states.len() as u64;
    // Blocks written (acknowledged) since the last acknowledged FLUSH.
    let mut touched: Vec<u64> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if rng.below(20) == 0 {
            match tokio::time::timeout(REQUEST_TIMEOUT, client.flush()).await {
                Ok(Ok(())) => {
                    stats.flushes += 1;
                    for b in touched.drain(..) {
                        states[b as usize].flushed();
                    }
                }
                _ => {
                    stats.failed += 1;
                    break;
                }
            }
            continue;
        }
        let n = 1 + rng.below(MAX_WRITE_BLOCKS);
        let start = rng.below(blocks - n + 1);
        let fua = rng.below(30) == 0;
        let v = versions.fetch_add(1, Ordering::Relaxed);
        let mut data = Vec::with_capacity(n as usize * BLOCK);
        for b in start..start + n {
            data.extend_from_slice(&stamp(first + b, v));
            // Sent: from now on it may be on the disk.
            states[b as usize].sent(v);
        }
        let offset = (first + start) * BLOCK as u64;
        match tokio::time::timeout(REQUEST_TIMEOUT, client.write(offset, &data, fua)).await {
            Ok(Ok(())) => {
                stats.writes += 1;
                if fua {
                    for st in &mut states[start as usize..(start + n) as usize] {
                        st.durable_at(Some(v));
                    }
                } else {
                    touched.extend(start..start + n);
                }
            }
            _ => {
                stats.failed += 1;
                break;
            }
        }
    }
    let _ = client.disconnect().await;
    (states, stats)
}

/// Checks a whole volume image against what each block may hold; returns
/// the violations (at most 10).
fn check_image(states: &[BlockState], mut read: impl FnMut(u64, usize) -> Vec<u8>) -> Vec<String> {
    let mut bad = Vec::new();
    let chunk = MIB as usize;
    for off in (0..VOLUME_SIZE).step_by(chunk) {
        let data = read(off, chunk);
        assert_eq!(data.len(), chunk, "short read at {off}");
        for (i, blk) in data.chunks(BLOCK).enumerate() {
            let block = off / BLOCK as u64 + i as u64;
            if let Err(e) = states[block as usize].check(block, blk) {
                bad.push(e);
            }
        }
    }
    bad.truncate(10);
    bad
}

/// `replicator_activity_log_waits_total` of the group on the primary.
fn budget_waits(cluster: &Cluster, group: &str) -> f64 {
    let (code, _, body) = cluster.scrape(Site::A, "/metrics").unwrap_or_else(|e| panic!("scrape: {e}"));
    assert_eq!(code, 200, "/metrics answered {code}:\n{body}");
    let e = exposition::parse(&body).unwrap_or_else(|e| panic!("unparsable exposition: {e}"));
    e.value("replicator_activity_log_waits_total", &[("group", group)]).unwrap_or_else(|e| panic!("{e}"))
}

/// The bytes the primary said it resynchronises after the power cut (the
/// `bytes=` field of its last "power cut detected" line).
fn resync_after_cut(cluster: &Cluster) -> u64 {
    let log = cluster.log(Site::A);
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("power cut detected"))
        .unwrap_or_else(|| panic!("the primary did not say it detected the power cut\n{}", cluster.diagnostics()));
    let at = line.find("bytes=").unwrap_or_else(|| panic!("no bytes= in {line:?}"));
    let digits: String = line[at + 6..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|e| panic!("bytes= in {line:?}: {e}"))
}

fn power_cut_under_random_load_resyncs_at_most_the_budget(mode: Mode, label: &str, seed: u64) {
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    assert!(Path::new("/dev/fuse").exists(), "{label}: /dev/fuse is missing (modprobe fuse)");
    let group = format!("alb{}", mode.as_str());
    let vol = format!("{group}-vol");
    let spec = GroupSpec::new(&group, mode)
        .volume(&vol, VOLUME_SIZE)
        .link_timeout(Duration::from_secs(2))
        .extra(&format!("activity_log_extents = {BUDGET}"));
    let mut cluster = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs().with_metrics());
    cluster.pair_create(&group);
    cluster.wait_pair(&group, Duration::from_secs(120));
    cluster.wait_drained(&group);
    let bound = BUDGET * EXTENT;

    // Random writes over the whole volume, then the cut in the middle.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let versions = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = Rng::new(seed);
    let per = BLOCKS / TASKS;
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            rt.spawn(writer(
                cluster.nbd_socket(Site::A),
                vol.clone(),
                t * per,
                vec![BlockState::default(); per as usize],
                rng.next_u64(),
                versions.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    let mut max_logged = 0;
    while started.elapsed() < LOAD_TIME {
        let s = cluster.status(Site::A, &group);
        max_logged = max_logged.max(s.activity_log_bytes);
        assert!(
            s.activity_log_bytes <= bound,
            "{label}: the activity log holds {} bytes, over its budget of {BUDGET} regions ({bound} bytes): {s:?}",
            s.activity_log_bytes
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let waits = budget_waits(&cluster, &group);
    let at_cut = cluster.status(Site::A, &group);
    max_logged = max_logged.max(at_cut.activity_log_bytes);
    let cut = cluster.power_cut(Site::A);
    stop.store(true, Ordering::Relaxed);
    let mut states = Vec::with_capacity(BLOCKS as usize);
    let mut load = LoadStats::default();
    for h in handles {
        let (s, stats) = rt.block_on(h).expect("writer task");
        states.extend(s);
        load.writes += stats.writes;
        load.flushes += stats.flushes;
        load.failed += stats.failed;
    }
    assert!(load.writes > 0 && load.flushes > 0, "{label}: the load wrote nothing: {load:?}");
    assert!(
        waits > 0.0,
        "{label}: no write waited for room in the activity log ({load:?}): the budget was not reached"
    );

    // Recovery: the power cut is detected and only the logged regions are
    // copied.
    cluster.start(Site::A);
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut copy_total = 0;
    loop {
        let a = cluster.status(Site::A, &group);
        let b = cluster.status(Site::B, &group);
        copy_total = copy_total.max(a.copy_total_bytes);
        if a.state == "PAIR"
            && a.connected
            && a.lag_records == 0
            && a.applied_seq >= a.last_seq
            && a.dirty_bytes == 0
            && b.state == "PAIR"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{label}: no recovery to PAIR with lag 0:\nsite-a: {a:?}\nsite-b: {b:?}\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let resynced = resync_after_cut(&cluster);
    eprintln!(
        "ACTIVITY-LOG-BUDGET {label}: {} writes, {} flushes, {waits} waited for room; log at most {max_logged} bytes \
         (budget {bound}); cut dropped {} page(s); resynced {resynced} bytes (copy_total_bytes {copy_total}; dirty \
         bitmaps at the cut {} bytes)",
        load.writes, load.flushes, cut.dropped, at_cut.dirty_bytes
    );
    assert!(resynced > 0, "{label}: a cut under load must find regions in the activity log");
    assert!(
        resynced <= bound + at_cut.dirty_bytes && copy_total <= bound + at_cut.dirty_bytes,
        "{label}: the power cut resynchronised {resynced} bytes (copy_total_bytes {copy_total}), more than the budget \
         of {BUDGET} regions ({bound} bytes) plus the {} dirty bytes at the cut",
        at_cut.dirty_bytes
    );

    // Every flushed write survived on the primary (read through NBD)...
    let bad = rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("NBD connect");
        let mut chunks = Vec::new();
        for off in (0..VOLUME_SIZE).step_by(MIB as usize) {
            chunks.push(client.read(off, MIB as u32).await.unwrap_or_else(|e| panic!("NBD read at {off}: {e}")));
        }
        let _ = client.disconnect().await;
        let mut chunks = chunks.into_iter();
        check_image(&states, |_, _| chunks.next().unwrap_or_default())
    });
    assert!(bad.is_empty(), "{label}: the primary's volume after recovery:\n{}", bad.join("\n"));
    // ... and after a clean stop the sites are byte-identical.
    cluster.assert_converged(&group);
    let file = std::fs::File::open(cluster.volume_path(Site::B, &vol)).expect("secondary volume");
    let bad = check_image(&states, |off, len| {
        let mut buf = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, off).expect("read the secondary's volume");
        buf
    });
    assert!(bad.is_empty(), "{label}: the secondary's volume:\n{}", bad.join("\n"));
}

#[test]
fn async_primary_power_cut_under_random_writes_resyncs_at_most_the_budget() {
    power_cut_under_random_load_resyncs_at_most_the_budget(
        Mode::Async,
        "async_primary_power_cut_under_random_writes_resyncs_at_most_the_budget",
        51,
    );
}

#[test]
fn sync_primary_power_cut_under_random_writes_resyncs_at_most_the_budget() {
    power_cut_under_random_load_resyncs_at_most_the_budget(
        Mode::Sync,
        "sync_primary_power_cut_under_random_writes_resyncs_at_most_the_budget",
        52,
    );
}
