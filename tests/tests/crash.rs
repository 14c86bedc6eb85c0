//! `kill -9` of the primary during a write load (sync mode, RPO 0).
//!
//! 16 writers over 4 NBD connections write self-describing 4 KiB blocks
//! (block number + version, see `pattern::stamp`); each writer owns its own
//! blocks and writes them one at a time, so versions per block only grow.
//! Every write whose reply came back OK is recorded. After ~1.5 s the primary
//! daemon is killed with SIGKILL. The secondary is then stopped cleanly, and
//! its backing file must hold, for every acknowledged write, that block's
//! stamp with a version at least the acknowledged one — never a torn or
//! misplaced block. Then both sites restart: the primary must come back as
//! primary, reconnect (PAIR), converge, and replicate a further write.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::{read_stamp, stamp, Rng, StampRead, BLOCK};
use replicator_tests::{Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const WRITERS: u64 = 16;
const CONNECTIONS: usize = 4;
/// Blocks under load: 16 MiB.
const BLOCKS: u64 = 4096;
const LOAD_BEFORE_KILL: Duration = Duration::from_millis(1500);
/// Hard bounds on the load, whatever happens.
const MAX_WRITES_PER_WRITER: u64 = 100_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(20);

#[derive(Debug, Default)]
struct Ledger {
    /// Highest acknowledged version per block (0: none).
    acked: Vec<u64>,
    /// Highest version ever sent per block.
    issued: Vec<u64>,
}

/// What the load did.
#[derive(Debug)]
struct LoadResult {
    ledger: Ledger,
    acked_writes: u64,
    failed_writes: u64,
}

async fn load(socket: &Path, export: &str, daemon_pid: i32) -> LoadResult {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Arc::new(NbdClient::connect_unix(socket, export).await.expect("NBD connect to site-a")));
    }
    let ledger = Arc::new(Mutex::new(Ledger {
        acked: vec![0; BLOCKS as usize],
        issued: vec![0; BLOCKS as usize],
    }));
    let acked_writes = Arc::new(AtomicU64::new(0));
    let failed_writes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = clients[w as usize % CONNECTIONS].clone();
        let ledger = ledger.clone();
        let acked_writes = acked_writes.clone();
        let failed_writes = failed_writes.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0xC0FFEE + w);
            let mine = BLOCKS / WRITERS;
            for _ in 0..MAX_WRITES_PER_WRITER {
                if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_LOAD_TIME {
                    return;
                }
                let block = w + WRITERS * rng.below(mine);
                let version = {
                    let mut l = ledger.lock().expect("ledger");
                    l.issued[block as usize] += 1;
                    l.issued[block as usize]
                };
                match client.write(block * BLOCK as u64, &stamp(block, version), false).await {
                    Ok(()) => {
                        let mut l = ledger.lock().expect("ledger");
                        let a = &mut l.acked[block as usize];
                        assert!(*a < version, "block {block}: version {version} acked after {a}");
                        *a = version;
                        acked_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        // The daemon is gone: this writer is done.
                        failed_writes.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    // The killer: SIGKILL the primary daemon in the middle of the load.
    tokio::time::sleep(LOAD_BEFORE_KILL).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon_pid), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9 site-a");
    let deadline = Instant::now() + Duration::from_secs(30);
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, t).await {
            Ok(r) => r.expect("writer task panicked"),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                panic!("writers did not finish within 30s of kill -9 (requests hanging on a dead daemon?)");
            }
        }
    }
    drop(clients);
    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger"));
    LoadResult {
        ledger,
        acked_writes: acked_writes.load(Ordering::Relaxed),
        failed_writes: failed_writes.load(Ordering::Relaxed),
    }
}

/// Checks a backing file against the ledger: every acknowledged write is
/// there (or a newer version of the block), nothing is torn or misplaced.
fn check_image(c: &Cluster, site: Site, path: &Path, ledger: &Ledger) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(0)).expect("seek");
    let mut buf = vec![0u8; (BLOCKS as usize) * BLOCK];
    f.read_exact(&mut buf).expect("read image");
    let mut problems = Vec::new();
    let mut lost = 0u64;
    for b in 0..BLOCKS as usize {
        let got = read_stamp(&buf[b * BLOCK..(b + 1) * BLOCK]);
        let (acked, issued) = (ledger.acked[b], ledger.issued[b]);
        let ok = match got {
            StampRead::Zero => acked == 0,
            StampRead::Stamp { block, version } => {
                block == b as u64 && version >= acked && version <= issued && version >= 1
            }
            StampRead::Garbage => false,
        };
        if !ok {
            if matches!(got, StampRead::Zero) || matches!(got, StampRead::Stamp { version, .. } if version < acked) {
                lost += 1;
            }
            if problems.len() < 20 {
                problems.push(format!("block {b}: holds {got:?}, acknowledged version {acked}, highest issued {issued}"));
            }
        }
    }
    if !problems.is_empty() {
        panic!(
            "{site}'s image {} does not hold every acknowledged write ({lost} acknowledged write(s) lost):\n{}\n{}",
            path.display(),
            problems.join("\n"),
            c.diagnostics()
        );
    }
}

#[test]
fn kill9_primary_under_sync_load_loses_no_acknowledged_write() {
    let (group, vol) = ("crash", "crash-vol");
    let mut c = Cluster::new(ClusterOpts::group(
        GroupSpec::new(group, Mode::Sync).volume(vol, 64 * MIB).journal_size(128 * MIB),
    ));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let pid = c.pid(Site::A).expect("site-a runs");
    let result = rt.block_on(load(&c.nbd_socket(Site::A), vol, pid));
    eprintln!(
        "crash load: {} writes acknowledged, {} failed at the kill",
        result.acked_writes, result.failed_writes
    );
    assert!(result.acked_writes >= 200, "the load barely ran: {result:?}");
    c.kill9(Site::A);

    // The secondary finishes applying what it received and stops cleanly.
    c.stop(Site::B);
    check_image(&c, Site::B, &c.volume_path(Site::B, vol), &result.ledger);
    // The primary acknowledged only what it had written locally too.
    check_image(&c, Site::A, &c.volume_path(Site::A, vol), &result.ledger);

    // Both come back; the primary is still primary and resumes by itself.
    c.start(Site::B);
    c.start(Site::A);
    let s = c.status(Site::A, group);
    assert_eq!(s.role, "primary", "after kill -9 and restart: {s:?}");
    c.wait_pair(group, Duration::from_secs(60));
    c.wait_drained(group);

    // A further write replicates.
    let marker_block = BLOCKS + 100;
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("reconnect NBD");
        client.write(marker_block * BLOCK as u64, &stamp(marker_block, 1_000_000), true).await.expect("write after restart");
        client.flush().await.expect("flush after restart");
    });
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    let mut f = std::fs::File::open(c.volume_path(Site::B, vol)).expect("open secondary");
    let mut buf = vec![0u8; BLOCK];
    f.seek(SeekFrom::Start(marker_block * BLOCK as u64)).expect("seek");
    f.read_exact(&mut buf).expect("read");
    assert_eq!(
        read_stamp(&buf),
        StampRead::Stamp { block: marker_block, version: 1_000_000 },
        "the write after the restart did not reach the secondary"
    );
    check_image(&c, Site::B, &c.volume_path(Site::B, vol), &result.ledger);
    c.assert_volumes_identical(group);
}
