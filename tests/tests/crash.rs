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
use replicator_tests::{write_backlog, Cluster, ClusterOpts, GroupSpec, Mode, Site};

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
    let ledger = Arc::new(Mutex::new(Ledger { acked: vec![0; BLOCKS as usize], issued: vec![0; BLOCKS as usize] }));
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
                problems
                    .push(format!("block {b}: holds {got:?}, acknowledged version {acked}, highest issued {issued}"));
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
    eprintln!("crash load: {} writes acknowledged, {} failed at the kill", result.acked_writes, result.failed_writes);
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
        client
            .write(marker_block * BLOCK as u64, &stamp(marker_block, 1_000_000), true)
            .await
            .expect("write after restart");
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

/// Async mode, `kill -9` of the primary while the secondary is catching up:
/// the secondary must hold a write-order-consistent image — exactly the
/// state after the first N writes, for some N (DESIGN: write-order
/// fidelity). One writer issues writes one at a time, so client order is
/// sequence order; each write's stamp carries its global index.
#[test]
fn kill9_primary_async_secondary_holds_a_prefix_of_the_writes() {
    const PREFIX_BLOCKS: u64 = 1024;
    let (group, vol) = ("order", "order-vol");
    let mut c = Cluster::new(ClusterOpts::group(
        GroupSpec::new(group, Mode::Async).volume(vol, 16 * MIB).journal_size(128 * MIB),
    ));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let pid_a = nix::unistd::Pid::from_raw(c.pid(Site::A).expect("site-a runs"));
    let pid_b = nix::unistd::Pid::from_raw(c.pid(Site::B).expect("site-b runs"));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let socket = c.nbd_socket(Site::A);
    // writes[i] = block written by write #(i+1); `acked` = how many were acknowledged.
    let (writes, acked) = rt.block_on(async {
        use nix::sys::signal::{kill, Signal};
        let client = NbdClient::connect_unix(&socket, vol).await.expect("connect");
        let mut rng = Rng::new(42);
        let mut writes = Vec::new();
        let mut acked = 0u64;
        let start = Instant::now();
        let (mut stopped, mut resumed) = (false, false);
        while start.elapsed() < MAX_LOAD_TIME && writes.len() < 200_000 {
            let t = start.elapsed();
            if !stopped && t >= Duration::from_millis(500) {
                // Freeze the secondary so a backlog builds up in the journal.
                kill(pid_b, Signal::SIGSTOP).expect("SIGSTOP site-b");
                stopped = true;
            }
            if !resumed && t >= Duration::from_millis(1500) {
                kill(pid_b, Signal::SIGCONT).expect("SIGCONT site-b");
                resumed = true;
            }
            if resumed && t >= Duration::from_millis(1530) {
                // Kill the primary while the secondary catches up.
                kill(pid_a, Signal::SIGKILL).expect("kill -9 site-a");
            }
            let block = rng.below(PREFIX_BLOCKS);
            writes.push(block);
            let idx = writes.len() as u64;
            match client.write(block * BLOCK as u64, &stamp(block, idx), false).await {
                Ok(()) => acked = idx,
                Err(_) => break,
            }
        }
        if !resumed {
            let _ = kill(pid_b, Signal::SIGCONT);
        }
        (writes, acked)
    });
    assert!(acked >= 200, "the load barely ran: {acked} writes acknowledged");
    c.kill9(Site::A);
    c.stop(Site::B);

    // Image after the first n writes.
    let state_after = |n: u64| {
        let mut img = vec![0u64; PREFIX_BLOCKS as usize];
        for (i, &b) in writes.iter().take(n as usize).enumerate() {
            img[b as usize] = i as u64 + 1;
        }
        img
    };
    let read_versions = |site: Site| {
        let data = std::fs::read(c.volume_path(site, vol)).expect("read image");
        (0..PREFIX_BLOCKS as usize)
            .map(|b| match read_stamp(&data[b * BLOCK..(b + 1) * BLOCK]) {
                StampRead::Zero => 0,
                StampRead::Stamp { block, version } if block == b as u64 => version,
                other => panic!("{site}: block {b} holds {other:?}\n{}", c.diagnostics()),
            })
            .collect::<Vec<u64>>()
    };
    let b_img = read_versions(Site::B);
    let n = b_img.iter().copied().max().unwrap_or(0);
    let want = state_after(n);
    if let Some(b) = (0..PREFIX_BLOCKS as usize).find(|&b| b_img[b] != want[b]) {
        panic!(
            "the secondary's image is not the state after any prefix of the writes: it holds write #{n} but block {b} \
             holds write #{} where the prefix through #{n} has #{} ({} of {} blocks differ; {acked} writes acknowledged)\n{}",
            b_img[b],
            want[b],
            (0..PREFIX_BLOCKS as usize).filter(|&x| b_img[x] != want[x]).count(),
            PREFIX_BLOCKS,
            c.diagnostics()
        );
    }
    eprintln!("async kill -9: secondary holds the first {n} of {acked} acknowledged writes");

    // The primary's own image holds every acknowledged write (plus perhaps
    // the one in flight at the kill), and after a restart the secondary
    // catches up to exactly that.
    let a_img = read_versions(Site::A);
    assert!(
        a_img == state_after(acked) || a_img == state_after(acked + 1),
        "after kill -9 the primary's image is neither the state after the {acked} acknowledged writes nor after one more\n{}",
        c.diagnostics()
    );
    c.start(Site::B);
    c.start(Site::A);
    c.wait_pair(group, Duration::from_secs(60));
    c.assert_converged(group);
}

/// Async mode, a backlog only the journal holds: with the secondary away,
/// 1 MiB writes (page-aligned journal records, read back with `O_DIRECT`)
/// and 4 KiB writes between them go into the journal, then the primary is
/// killed (-9), so that after its restart no payload is in memory and the
/// whole backlog is read back from the journal, many records ahead of the
/// stream at once (`shipper.rs`, `ReadAhead`). The secondary must end up
/// with exactly the primary's volume, and that with exactly what was
/// written.
#[test]
fn kill9_primary_with_a_backlog_ships_it_from_the_journal() {
    const VOLUME: u64 = 64 * MIB;
    let (group, vol) = ("backlog", "backlog-vol");
    let mut c = Cluster::new(ClusterOpts::group(
        GroupSpec::new(group, Mode::Async).volume(vol, VOLUME).journal_size(160 * MIB),
    ));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    c.stop(Site::B);

    // 48 writes of 1 MiB over the volume's first 48 MiB, each followed by
    // sixteen 4 KiB writes into its last 16 MiB; the expected image is kept.
    let expect = write_backlog(&c.nbd_socket(Site::A), vol, VOLUME, 7);
    let lag = c.status(Site::A, group).lag_records;
    assert!(lag >= 48 * 17, "the backlog is not in the journal: lag {lag} records\n{}", c.diagnostics());
    std::thread::sleep(Duration::from_secs(2));
    c.kill9(Site::A);
    c.start(Site::A);
    // The lag's age is the oldest unshipped write's, from its journal
    // header: a restart does not make an old backlog look fresh.
    let s = c.status(Site::A, group);
    assert!(s.lag_seconds >= 2.0, "the restart reset the backlog's age: {s:?}");
    c.start(Site::B);
    c.wait_pair(group, Duration::from_secs(60));
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    let image = std::fs::read(c.volume_path(Site::A, vol)).expect("read the primary's volume");
    assert!(image == expect, "the primary's volume does not hold what was written\n{}", c.diagnostics());
    c.assert_volumes_identical(group);
}

/// After a `kill -9`, an activity log that cannot be read is rebuilt from
/// the records still in the journal (the writes the secondary may lack):
/// started empty, it would let a later power cut leave their regions
/// different from the secondary without a copy.
#[test]
fn kill9_with_an_unreadable_activity_log_rebuilds_it_from_the_journal() {
    let group = "alj";
    let spec = GroupSpec::new(group, Mode::Async).volume("alj-vol", 64 * MIB).link_timeout(Duration::from_secs(60));
    let mut c = Cluster::new(ClusterOpts::group(spec));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    c.wait_drained(group);
    // Records the journal keeps: the secondary takes none meanwhile.
    c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), "alj-vol").await.expect("connect");
        for (i, off) in [8 * MIB, 40 * MIB].into_iter().enumerate() {
            client.write(off, &stamp(off / BLOCK as u64, i as u64 + 1), false).await.expect("write");
        }
    });
    c.kill9(Site::A);
    let log = c.state_dir(Site::A).join(format!("groups/{group}/activity-log"));
    let len = std::fs::metadata(&log).expect("the activity log exists").len();
    std::fs::write(&log, vec![0x5a; len as usize]).expect("overwrite the activity log");

    c.start(Site::A);
    let a = c.status(Site::A, group);
    assert_eq!(
        a.activity_log_bytes,
        8 * MIB,
        "the two written regions (4 MiB each) are named again: {a:?}\n{}",
        c.log(Site::A)
    );
    c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    c.wait_pair(group, Duration::from_secs(60));
    c.assert_converged(group);
}
