//! Unplanned failover: `replicator failover` on the secondary promotes the
//! last consistent image, prints the recovery point, and the old primary is
//! fenced when it comes back.
//!
//! - refused (exit 3, naming `--force`) while the primary is connected;
//!   exit 1 on a node that is not the secondary;
//! - async, after the primary dies with writes the secondary never got: the
//!   promoted volume is exactly the primary's image after the writes through
//!   the printed recovery point (sequence-stamped blocks), and it takes
//!   writes;
//! - sync: every write the primary acknowledged is on the promoted volume;
//! - switchover (run on the primary, or on the secondary) under load: no
//!   acknowledged write lost, replication reversed with nothing copied;
//! - the old primary, restarted, learns it was superseded: it accepts no
//!   writes (also after another restart); since it holds acknowledged
//!   writes the new primary never received, and the new primary took
//!   writes too, both report SPLIT-BRAIN (lifecycle.rs resolves it).

use std::io::Write;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use replicator::nbd_client::{NbdClient, NbdClientError};
use replicator_tests::pattern::{random_bytes, written_prefix};
use replicator_tests::{
    describe_output, reply_number, require, require_root, Cluster, ClusterOpts, GroupSpec, Mode, Site,
};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

fn cli(cluster: &Cluster, site: Site, args: &[&str]) -> (i32, String) {
    let out = cluster.cli(site, args);
    (out.status.code().unwrap_or(-1), describe_output(&out))
}

/// The writes a client saw acknowledged: block `i` holds `random_bytes(i + 1)`.
fn write_blocks(cluster: &Cluster, vol: &str, range: std::ops::Range<u64>) -> u64 {
    write_blocks_on(cluster, Site::A, vol, range)
}

/// [`write_blocks`] through `site`'s export.
fn write_blocks_on(cluster: &Cluster, site: Site, vol: &str, range: std::ops::Range<u64>) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(site), vol).await.expect("connect");
        let mut acked = 0;
        for i in range {
            if client.write(i * BLOCK, &random_bytes(i + 1, BLOCK as usize), false).await.is_err() {
                break;
            }
            acked = i + 1;
        }
        acked
    })
}

/// The sequence in "Recovery point: sequence N".
fn recovery_seq(out: &str) -> u64 {
    let at = out.find("Recovery point: sequence ").unwrap_or_else(|| panic!("no recovery point in:\n{out}"));
    out[at + "Recovery point: sequence ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("unreadable recovery point in:\n{out}"))
}

#[test]
fn failover_is_refused_while_the_primary_is_connected_and_on_a_non_secondary() {
    let group = GroupSpec::new("fr", Mode::Async).volume("fr-vol", 16 * MIB);
    let cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fr");
    cluster.wait_pair("fr", Duration::from_secs(60));
    let (code, out) = cli(&cluster, Site::B, &["failover", "fr"]);
    assert_eq!(code, 3, "refused as unsafe while the primary is connected:\n{out}");
    assert!(
        out.contains("--force") && out.contains("switchover"),
        "the refusal names the override and the alternative:\n{out}"
    );
    let (code, out) = cli(&cluster, Site::A, &["failover", "fr"]);
    assert_eq!(code, 1, "the primary has nothing to fail over to:\n{out}");
    assert!(out.contains("already the primary"), "{out}");
    // Nothing changed.
    assert_eq!(cluster.status(Site::B, "fr").state, "PAIR");
}

#[test]
fn async_failover_promotes_exactly_the_recovery_point_and_fences_the_old_primary() {
    const BLOCKS: u64 = 960;
    let group = GroupSpec::new("fa", Mode::Async)
        .volume("fa-vol", 64 * MIB)
        .journal_size(128 * MIB)
        .link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fa");
    cluster.wait_pair("fa", Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, "fa-vol", 0..BLOCKS / 2), BLOCKS / 2);
    cluster.wait_drained("fa");
    // The secondary stops receiving; the primary acknowledges more writes
    // (async) and dies with them.
    cluster.signal(Site::B, Signal::SIGSTOP);
    assert_eq!(write_blocks(&cluster, "fa-vol", BLOCKS / 2..BLOCKS), BLOCKS);
    cluster.kill9(Site::A);
    cluster.signal(Site::B, Signal::SIGCONT);
    cluster
        .wait_until(Site::B, "fa", "the session to the dead primary ends", Duration::from_secs(60), |s| !s.connected);

    let (code, out) = cli(&cluster, Site::B, &["failover", "fa"]);
    assert_eq!(code, 0, "{out}");
    let n = recovery_seq(&out);
    assert!(out.contains("now the primary"), "{out}");
    let b = cluster.status(Site::B, "fa");
    assert_eq!((b.role.as_str(), b.generation), ("primary", 2), "{b:?}");

    // The promoted volume is exactly the writes through the recovery point.
    cluster.stop(Site::B);
    let image = std::fs::read(cluster.volume_path(Site::B, "fa-vol")).expect("read the promoted volume");
    let prefix = written_prefix(&image, BLOCKS, BLOCK);
    assert_eq!(prefix, n, "the printed recovery point is the promoted image's last write");
    assert!((BLOCKS / 2..=BLOCKS).contains(&n), "{n}");
    eprintln!("recovery point {n} of {BLOCKS} acknowledged writes:\n{out}");

    // The new primary takes writes.
    cluster.start(Site::B);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "fa-vol").await.expect("connect");
        client.write(0, &[7u8; 4096], true).await.expect("the new primary accepts writes");
        assert_eq!(client.read(0, 4096).await.expect("read"), vec![7u8; 4096]);
    });

    // The old primary comes back: it is fenced, and stays fenced.
    for round in 0..2 {
        cluster.start(Site::A);
        let a = cluster.wait_until(Site::A, "fa", "fenced", Duration::from_secs(60), |s| s.superseded_by == 2);
        assert!(matches!(a.state.as_str(), "SUSPENDED" | "SPLIT-BRAIN"), "round {round}: {a:?}");
        assert!(!a.writable, "round {round}: {a:?}");
        rt.block_on(async {
            let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "fa-vol").await.expect("connect");
            let read_only = client.flags() & replicator::nbd::proto::FLAG_READ_ONLY != 0;
            assert!(read_only, "a fenced former primary exports its volumes read-only");
            assert!(client.write(0, &[9u8; 4096], false).await.is_err(), "a fenced former primary accepts no writes");
        });
        if round == 0 {
            cluster.kill9(Site::A);
        }
    }
    // The new primary, connecting to it, learns whether both sites hold
    // writes the other lacks (the old primary's acknowledged writes after
    // the recovery point, and its own since the failover): SPLIT-BRAIN on
    // both; or the old primary is merely behind: fenced.
    if n < BLOCKS {
        let b = cluster.wait_state(Site::B, "fa", "SPLIT-BRAIN", Duration::from_secs(60));
        assert_eq!(b.refusal.as_deref(), Some("split-brain"), "{b:?}");
        cluster.wait_state(Site::A, "fa", "SPLIT-BRAIN", Duration::from_secs(60));
    } else {
        let b = cluster.wait_until(Site::B, "fa", "the peer is fenced", Duration::from_secs(60), |s| {
            s.refusal.as_deref() == Some("peer-fenced")
        });
        assert_ne!(b.state, "SPLIT-BRAIN", "{b:?}");
    }
    assert!(cluster.log(Site::A).contains("took over as primary after a failover"));
}

#[test]
fn sync_failover_after_a_primary_crash_keeps_every_acknowledged_write() {
    const BLOCKS: u64 = 200;
    let group = GroupSpec::new("fs", Mode::Sync).volume("fs-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fs");
    cluster.wait_pair("fs", Duration::from_secs(60));
    let acked = write_blocks(&cluster, "fs-vol", 0..BLOCKS);
    cluster.kill9(Site::A);
    cluster
        .wait_until(Site::B, "fs", "the session to the dead primary ends", Duration::from_secs(60), |s| !s.connected);
    let (code, out) = cli(&cluster, Site::B, &["failover", "fs"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Sync mode"), "{out}");
    let n = recovery_seq(&out);
    cluster.stop(Site::B);
    let image = std::fs::read(cluster.volume_path(Site::B, "fs-vol")).expect("read the promoted volume");
    let prefix = written_prefix(&image, BLOCKS, BLOCK);
    assert!(prefix >= acked && n >= acked, "acknowledged {acked}, promoted {prefix}, recovery point {n}");
    assert_eq!(prefix, n);
}

/// A sync primary dies with a write in flight that the secondary never got
/// (the secondary frozen, then killed before it read its socket): after the
/// failover the old primary holds that record beyond the takeover point,
/// but it never acknowledged it (every write it acknowledged reached the
/// secondary first, which its state file says). It comes back fenced, not
/// in SPLIT-BRAIN (which stopped writes on a sync primary under
/// `on_link_loss = "block"`, and asked for a decision with nothing to
/// decide), and `failback` says the discarded write was never acknowledged.
#[test]
fn a_sync_write_in_flight_at_the_crash_is_no_split_brain() {
    let group = GroupSpec::new("fi", Mode::Sync).volume("fi-vol", 16 * MIB).link_timeout(Duration::from_secs(5));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fi");
    cluster.wait_pair("fi", Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, "fi-vol", 0..20), 20);
    cluster.wait_drained("fi");
    cluster.signal(Site::B, Signal::SIGSTOP);
    let in_flight = writer(&cluster, Site::A, "fi-vol", 50, 51);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!in_flight.is_finished(), "the write waits for the frozen secondary");
    cluster.kill9(Site::A);
    cluster.kill9(Site::B);
    assert_eq!(in_flight.join().expect("writer"), 50, "the write in flight was not acknowledged");
    cluster.start(Site::B);
    let (code, out) = cli(&cluster, Site::B, &["failover", "fi"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recovery_seq(&out), 20, "{out}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "fi-vol").await.expect("connect");
        for i in 30..35 {
            client.write(i * BLOCK, &random_bytes(i + 1, BLOCK as usize), false).await.expect("write on B");
        }
        client.flush().await.expect("flush");
    });

    fenced_then_failed_back(&mut cluster, "fi", (0..20).chain(30..35));
}

/// The end of a failover that found the old primary holding only a write
/// it never acknowledged (block 50, in flight): site-a, restarted, is
/// fenced and neither site says SPLIT-BRAIN; `failback --no-switch` says so
/// of what it discards; then the sites are identical, with the `kept`
/// blocks and without block 50.
fn fenced_then_failed_back(cluster: &mut Cluster, group: &str, kept: impl Iterator<Item = u64>) {
    cluster.start(Site::A);
    let a = cluster.wait_until(Site::A, group, "fenced", Duration::from_secs(60), |s| s.superseded_by == 2);
    assert!(!a.writable, "{a:?}");
    cluster.wait_until(Site::B, group, "told the old primary is fenced", Duration::from_secs(60), |s| {
        s.refusal.as_deref() == Some("peer-fenced")
    });
    std::thread::sleep(Duration::from_secs(2));
    for site in [Site::A, Site::B] {
        let s = cluster.status(site, group);
        assert_ne!(s.state, "SPLIT-BRAIN", "{site}: a write never acknowledged is no split brain: {s:?}");
    }
    let (code, out) = cli(cluster, Site::A, &["failback", group, "--no-switch", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("none of them was acknowledged"), "{out}");
    cluster.wait_until(Site::B, group, "PAIR, drained", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.lag_records == 0
    });
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical(group);
    let image = std::fs::read(cluster.volume_path(Site::A, &format!("{group}-vol"))).expect("read");
    let block = |i: u64| &image[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
    for i in kept {
        assert!(block(i) == &random_bytes(i + 1, BLOCK as usize)[..], "block {i}");
    }
    assert!(block(50).iter().all(|&b| b == 0), "the write never acknowledged is discarded");
}

/// The same after a *power cut* of the sync primary with a write in
/// flight: its restart marks the regions of its activity log for a resync
/// (the journal's tail and the volumes' unsynced writes may be gone), in a
/// new epoch. Those regions hold no acknowledged write the new primary
/// lacks (the state file still says every acknowledged write reached the
/// secondary): fenced, not SPLIT-BRAIN, and failback copies them back.
#[test]
fn a_power_cut_of_a_sync_primary_with_a_write_in_flight_is_no_split_brain() {
    let (mut cluster, _) = rpo_zero_on_disk("pf", Duration::from_secs(5));
    cluster.signal(Site::B, Signal::SIGSTOP);
    let in_flight = writer(&cluster, Site::A, "pf-vol", 50, 51);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!in_flight.is_finished(), "the write waits for the frozen secondary");
    cluster.power_cut(Site::A);
    cluster.kill9(Site::B);
    assert_eq!(in_flight.join().expect("writer"), 50, "the write in flight was not acknowledged");
    cluster.start(Site::B);
    let (code, out) = cli(&cluster, Site::B, &["failover", "pf"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recovery_seq(&out), 10, "{out}");
    assert_eq!(write_blocks_on(&cluster, Site::B, "pf-vol", 30..35), 35);

    fenced_then_failed_back(&mut cluster, "pf", (0..10).chain(30..35));
    let log = std::fs::read_to_string(cluster.log_path(Site::A)).expect("site-a's log");
    assert!(log.contains("region(s) of the activity log"), "the restart resynchronised the activity log's regions");
}

/// The other side of that: a sync write acknowledged without the
/// secondary (the link lost, the pair suspended) is acknowledged only once
/// the state file no longer says every acknowledged write is on the
/// secondary. With that save held on the primary's disk the write waits;
/// released, it is acknowledged; after a power cut of the primary and a
/// failover, the old primary meets the new one in SPLIT-BRAIN (it holds a
/// write it acknowledged and the new primary lacks).
#[test]
fn a_sync_write_acknowledged_alone_waits_until_the_state_file_says_so() {
    let (mut cluster, _) = rpo_zero_on_disk("la", Duration::from_secs(1));
    assert!(cluster.fs_command(Site::A, "hold-fsync state.json").starts_with("ok armed"));
    cluster.signal(Site::B, Signal::SIGSTOP);
    let alone = writer(&cluster, Site::A, "la-vol", 40, 41);
    // link_timeout passes, the pair suspends; the write still waits.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!alone.is_finished(), "acknowledged without the secondary before the state file says it may be");
    assert!(cluster.fs_command(Site::A, "release").starts_with("ok"));
    assert_eq!(alone.join().expect("writer"), 41, "acknowledged once saved");
    cluster.power_cut(Site::A);
    cluster.kill9(Site::B);
    cluster.start(Site::B);
    let (code, out) = cli(&cluster, Site::B, &["failover", "la"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recovery_seq(&out), 10, "{out}");
    cluster.start(Site::A);
    cluster.wait_state(Site::A, "la", "SPLIT-BRAIN", Duration::from_secs(60));
    cluster.wait_state(Site::B, "la", "SPLIT-BRAIN", Duration::from_secs(60));
    // A switchover changes no role in split brain: each site names the
    // two choices (it advised a failover, which the primary refuses).
    for (site, keep_peer, keep_here) in [
        (Site::A, "with `replicator failback la` here", "`replicator pair resync la --discard-local` on site-b"),
        (Site::B, "with `replicator pair resync la --discard-local` here", "`replicator failback la` on site-a"),
    ] {
        let (code, out) = cli(&cluster, site, &["switchover", "la"]);
        assert_eq!(code, 3, "{site}: {out}");
        assert!(
            out.contains("is in SPLIT-BRAIN") && out.contains(keep_peer) && out.contains(keep_here),
            "{site}: {out}"
        );
    }
}

/// A sync pair `<name>` (one 16 MiB volume `<name>-vol`, on powercut-fs) with blocks 0..10 written and on the secondary,
/// once the primary's state file says every acknowledged write is on the
/// secondary. Returns the cluster and that state file.
fn rpo_zero_on_disk(name: &str, link_timeout: Duration) -> (Cluster, std::path::PathBuf) {
    let vol = format!("{name}-vol");
    let group = GroupSpec::new(name, Mode::Sync).volume(&vol, 16 * MIB).link_timeout(link_timeout);
    let cluster = Cluster::new(ClusterOpts::group(group).with_power_cut_fs());
    cluster.pair_create(name);
    cluster.wait_pair(name, Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, &vol, 0..10), 10);
    cluster.wait_drained(name);
    let state = cluster.state_dir(Site::A).join("groups").join(name).join("state.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&state).unwrap_or_default().contains("\"acked_all_on_peer\": true") {
        assert!(Instant::now() < deadline, "the state file never said RPO 0 held");
        std::thread::sleep(Duration::from_millis(100));
    }
    (cluster, state)
}

/// The save that must precede a sync write acknowledged alone fails for
/// a few seconds (the state file's fsync: a full or failing disk): the
/// write waits for the retries, as a write waits for its region's save (it
/// failed at the first failure, while the group went on saying that writes
/// were acknowledged without the secondary).
#[test]
fn a_sync_write_acknowledged_alone_waits_through_a_failed_save() {
    let (cluster, state) = rpo_zero_on_disk("lf", Duration::from_secs(1));
    let pid = cluster.pid(Site::A).expect("site A runs");
    let fail_next_save = || {
        let armed = cluster.fs_command(Site::A, &format!("fail-fsync groups/lf/.state.json.{pid}.tmp"));
        assert!(armed.starts_with("ok armed"), "{armed}");
    };
    fail_next_save();
    cluster.signal(Site::B, Signal::SIGSTOP);
    let alone = writer(&cluster, Site::A, "lf-vol", 40, 41);
    // Every save fails for 4 s (retried each second), then they succeed.
    let failing = Instant::now();
    while failing.elapsed() < Duration::from_secs(4) {
        fail_next_save();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(alone.join().expect("writer"), 41, "not acknowledged after the retried save\n{}", cluster.diagnostics());
    let failed = reply_number(&cluster.fs_command(Site::A, "stats"), "failed_fsyncs");
    assert!(failed >= 3, "the saves failed {failed} time(s)");
    assert!(
        std::fs::read_to_string(&state).unwrap_or_default().contains("\"acked_all_on_peer\": false"),
        "acknowledged alone before the state file said so"
    );
    assert!(cluster.log(Site::A).contains("cannot persist"), "the failed save is logged");
    cluster.signal(Site::B, Signal::SIGCONT);
}

/// Writes sequence-stamped blocks `from..` through `site` from a background
/// thread until the first refused write or `until` blocks; returns the
/// thread (its result: the writes acknowledged).
fn writer(cluster: &Cluster, site: Site, vol: &str, from: u64, until: u64) -> std::thread::JoinHandle<u64> {
    let socket = cluster.nbd_socket(site);
    let vol = vol.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let client = NbdClient::connect_unix(&socket, &vol).await.expect("connect");
            let mut acked = from;
            for i in from..until {
                if client.write(i * BLOCK, &random_bytes(i + 1, BLOCK as usize), false).await.is_err() {
                    break;
                }
                acked = i + 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acked
        })
    })
}

/// Reads blocks `0..n` through `site` and checks each holds its write.
fn assert_blocks(cluster: &Cluster, site: Site, vol: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(site), vol).await.expect("connect");
        for i in 0..n {
            let got = client.read(i * BLOCK, BLOCK as u32).await.expect("read");
            assert!(got == random_bytes(i + 1, BLOCK as usize), "{site}: acknowledged write {i} is missing");
        }
    });
}

#[test]
fn switchover_both_ways_under_load_loses_no_acknowledged_write_and_copies_nothing() {
    let group = GroupSpec::new("sw", Mode::Sync).volume("sw-vol", 64 * MIB).link_timeout(Duration::from_secs(2));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sw");
    cluster.wait_pair("sw", Duration::from_secs(60));

    // A -> B while a client writes to A: refused (the client would turn
    // read-only mid-use), nothing changes; --force switches all the same.
    // Each writer runs until the switchover refuses it (at most the
    // volume's blocks: 40 s and more).
    let blocks = 64 * MIB / BLOCK;
    let load = writer(&cluster, Site::A, "sw-vol", 0, blocks);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = cli(&cluster, Site::A, &["switchover", "sw"]);
    assert_eq!(code, 3, "a client is attached on the primary:\n{out}");
    eprintln!("{out}");
    assert!(out.contains("1 NBD client(s)") && out.contains("switchover sw --force"), "{out}");
    assert!(!load.is_finished(), "the refusal changed nothing: the client still writes");
    assert_eq!(cluster.status(Site::A, "sw").role, "primary");
    let (code, out) = cli(&cluster, Site::A, &["switchover", "sw", "--force"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("switchover done in"), "it says how long it took:\n{out}");
    eprintln!("{out}");
    let acked = load.join().expect("writer");
    assert!(acked > 0 && acked < blocks, "the old primary refuses writes once the switchover starts ({acked})");
    // The refused write is a refusal, not a write.
    assert_eq!(cluster.status(Site::A, "sw").writes, acked, "writes counted on the old primary");
    let b = cluster.wait_until(Site::B, "sw", "primary in PAIR", Duration::from_secs(60), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected
    });
    assert_eq!(b.generation, 2, "{b:?}");
    assert_eq!(b.copy_total_bytes, 0, "reversing the replication copies nothing: {b:?}");
    assert_eq!(cluster.status(Site::A, "sw").role, "secondary");
    assert_blocks(&cluster, Site::B, "sw-vol", acked);

    // B -> A, the same way back, run on the secondary this time: the
    // primary's refusal comes back with its reason.
    let load = writer(&cluster, Site::B, "sw-vol", acked, blocks);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = cli(&cluster, Site::A, &["switchover", "sw"]);
    assert_eq!(code, 3, "a client is attached on the primary:\n{out}");
    eprintln!("{out}");
    assert!(
        out.contains("site-b (the primary) did not hand over: 1 NBD client(s)") && out.contains("--force"),
        "{out}"
    );
    assert!(!load.is_finished(), "the refusal changed nothing: the client still writes");
    assert_eq!(cluster.status(Site::A, "sw").role, "secondary");
    let (code, out) = cli(&cluster, Site::A, &["switchover", "sw", "--force"]);
    assert_eq!(code, 0, "{out}");
    let acked = load.join().expect("writer");
    assert!(acked < blocks, "site-b refuses writes once the switchover starts ({acked})");
    let a = cluster.wait_until(Site::A, "sw", "primary in PAIR", Duration::from_secs(60), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected
    });
    assert_eq!((a.generation, a.copy_total_bytes), (3, 0), "{a:?}");
    assert_blocks(&cluster, Site::A, "sw-vol", acked);

    // Refused where it cannot be done with zero loss.
    cluster.stop(Site::B);
    cluster.wait_until(Site::A, "sw", "the peer is gone", Duration::from_secs(60), |s| !s.connected);
    let (code, out) = cli(&cluster, Site::A, &["switchover", "sw"]);
    assert_eq!(code, 3, "without the peer:\n{out}");
    assert!(out.contains("failover"), "{out}");
    cluster.start(Site::B);
    cluster.wait_pair("sw", Duration::from_secs(60));
    cluster.assert_converged("sw");
}

/// Sets the switchover marker in a stopped site's state file: asked to take
/// over after record `seq` (of the file's epoch). `power_cut`: the file as
/// a power cut leaves it (an unclean stop in an earlier boot).
fn set_handing_over(cluster: &Cluster, site: Site, group: &str, state: &[u8], seq: u64, power_cut: bool) {
    let path = cluster.state_dir(site).join("groups").join(group).join("state.json");
    let mut v: serde_json::Value = serde_json::from_slice(state).expect("state.json");
    v["handing_over"] = serde_json::json!({ "seq": seq, "epoch": v["epoch"] });
    if power_cut {
        v["clean_shutdown"] = false.into();
        v["boot_id"] = "a-boot-before-the-power-cut".into();
    }
    // Durable (on powercut-fs a cut would otherwise undo it).
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).expect("open state.json");
    f.write_all(&serde_json::to_vec_pretty(&v).expect("json")).expect("write state.json");
    f.sync_all().expect("sync state.json");
}

/// A node that asked its peer to take over, the peer silent (stopped),
/// lets no NBD client attach (no write can reach it) and says why in
/// `status`.
fn assert_waits_for_the_answer(cluster: &Cluster, group: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let attach = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &format!("{group}-vol")));
    let s = cluster.status(Site::A, group);
    match attach {
        Err(NbdClientError::Protocol(e)) if e.contains("changing roles") => {}
        other => {
            panic!("a node that asked its peer to take over let a client attach before the answer: {other:?} {s:?}")
        }
    }
    assert_eq!(s.role, "primary", "{s:?}");
    assert!(!s.writable, "status must not call the volumes writable: {s:?}");
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("asked to take over")), "status says why: {s:?}");
}

/// A switchover saves, before it asks the secondary to take over, that it
/// is handing over; a primary that stops before it has saved its demotion
/// (a crash, a power cut) restarts taking no writes until the peer answers:
/// - the peer did not take over (it never got the request): it answers as
///   the secondary still, and this node takes writes again;
/// - the peer took over: this node becomes its secondary. (It used to start
///   as the primary of the old generation beside the new one, taking
///   writes until the two met: lost or split-brain.)
/// - the peer is lost for good: `pair delete` here gives it up.
///
/// The files are those a crash at that instant leaves (the state with the
/// marker, the journal as it was when the request went out).
#[test]
fn a_primary_stopped_in_a_switchover_takes_no_writes_until_the_peer_answers() {
    let group = GroupSpec::new("ho", Mode::Sync).volume("ho-vol", 64 * MIB).link_timeout(Duration::from_secs(2));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("ho");
    cluster.wait_pair("ho", Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, "ho-vol", 0..32), 32);
    let last = cluster.wait_drained("ho").last_seq;
    cluster.stop(Site::A);
    let dir = cluster.state_dir(Site::A).join("groups").join("ho");
    let state = std::fs::read(dir.join("state.json")).expect("state.json");

    // Asked, the peer never heard it, and the power went: no writes while
    // the peer is silent, then the primary stays, in its epoch, owing the
    // peer nothing (the journal and the volumes were synced through the
    // handed-over record).
    let epoch = cluster.status(Site::B, "ho").epoch;
    set_handing_over(&cluster, Site::A, "ho", &state, last, true);
    cluster.signal(Site::B, Signal::SIGSTOP);
    cluster.start(Site::A);
    assert_waits_for_the_answer(&cluster, "ho");
    cluster.signal(Site::B, Signal::SIGCONT);
    let a = cluster.wait_until(Site::A, "ho", "primary in PAIR", Duration::from_secs(60), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected
    });
    assert_eq!((a.generation, a.epoch, a.copy_total_bytes), (1, epoch, 0), "nothing to copy: {a:?}");
    let log = cluster.log(Site::A);
    assert!(log.contains("switchover abandoned") && log.contains("nothing to resynchronise"), "{log}");
    assert_eq!(write_blocks(&cluster, "ho-vol", 32..48), 48, "the primary takes writes again");
    let last = cluster.wait_drained("ho").last_seq;
    cluster.stop(Site::A);
    let (state, journal) = (
        std::fs::read(dir.join("state.json")).expect("state.json"),
        std::fs::read(dir.join("journal")).expect("journal"),
    );
    assert!(!String::from_utf8_lossy(&state).contains("handing_over"), "the marker is cleared");
    cluster.start(Site::A);
    cluster.wait_pair("ho", Duration::from_secs(60));

    // Asked, the peer took over, the demotion never reached the disk here
    // (a power cut, after the journal and the volumes were synced through
    // the handed-over record: the restart keeps the epoch and owes the
    // peer nothing).
    let (code, out) = cli(&cluster, Site::A, &["switchover", "ho"]);
    assert_eq!(code, 0, "{out}");
    cluster.kill9(Site::A);
    set_handing_over(&cluster, Site::A, "ho", &state, last, true);
    std::fs::write(dir.join("journal"), &journal).expect("journal");
    cluster.signal(Site::B, Signal::SIGSTOP);
    cluster.start(Site::A);
    assert_waits_for_the_answer(&cluster, "ho");
    cluster.signal(Site::B, Signal::SIGCONT);
    let a = cluster.wait_until(Site::A, "ho", "the new primary's secondary", Duration::from_secs(60), |s| {
        s.role == "secondary" && s.state == "PAIR" && s.connected
    });
    // The journal and the volumes were synced through the hand-over's
    // record before the marker: the power-cut restart starts no new epoch
    // and marks no regions (it did, and reaching the new primary first
    // this node's session then had it copy the volume again, 1 run in 9).
    let b = cluster.wait_until(Site::B, "ho", "primary in PAIR", Duration::from_secs(60), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected
    });
    assert_eq!((a.generation, a.epoch), (b.generation, b.epoch), "{a:?}\n{b:?}");
    assert_eq!((b.generation, b.copy_total_bytes), (2, 0), "nothing to copy: {b:?}");
    assert!(cluster.log(Site::A).contains("nothing to resynchronise"), "{}", cluster.log(Site::A));
    assert!(writer(&cluster, Site::B, "ho-vol", 48, 64).join().expect("writer") == 64);
    cluster.wait_drained("ho");
    assert_blocks(&cluster, Site::B, "ho-vol", 64);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("ho");

    // The peer lost for good while this node waits for its answer: `pair
    // delete` here gives it up, and the volumes take writes standalone.
    set_handing_over(&cluster, Site::A, "ho", &state, last, false);
    std::fs::write(dir.join("journal"), &journal).expect("journal");
    cluster.start(Site::A);
    assert_waits_for_the_answer(&cluster, "ho");
    let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "ho"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(cluster.status(Site::A, "ho").state, "SIMPLEX");
    assert_eq!(write_blocks(&cluster, "ho-vol", 0..1), 1, "standalone, the volume takes writes");
}

/// A switchover's request the secondary never got, and meanwhile the
/// secondary split with --rw, took writes and failed over: the old primary
/// takes the new generation for its switchover's answer and becomes its
/// secondary at the handed-over record, so the regions the new primary
/// wrote while split (in its bitmap, not its journal) must be copied to it.
/// They were not (the new primary had nothing to copy): PAIR, lag 0, and
/// the sites differed at those blocks.
#[test]
fn a_switchover_answered_by_a_failover_gets_the_regions_written_while_split() {
    let group = GroupSpec::new("hf", Mode::Sync).volume("hf-vol", 64 * MIB).link_timeout(Duration::from_secs(2));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("hf");
    cluster.wait_pair("hf", Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, "hf-vol", 0..32), 32);
    let last = cluster.wait_drained("hf").last_seq;
    cluster.stop(Site::A);
    let dir = cluster.state_dir(Site::A).join("groups").join("hf");
    let state = std::fs::read(dir.join("state.json")).expect("state.json");
    set_handing_over(&cluster, Site::A, "hf", &state, last, false);

    // The secondary, its primary gone: split --rw, writes far from the
    // primary's, then failover.
    cluster.wait_until(Site::B, "hf", "detached", Duration::from_secs(60), |s| !s.connected);
    let (code, out) = cli(&cluster, Site::B, &["pair", "split", "hf", "--rw"]);
    assert_eq!(code, 0, "{out}");
    cluster.wait_until(Site::B, "hf", "split and writable", Duration::from_secs(60), |s| s.writable);
    assert_eq!(writer(&cluster, Site::B, "hf-vol", 500, 510).join().expect("writer"), 510);
    let (code, out) = cli(&cluster, Site::B, &["failover", "hf"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("written here while split with --rw"), "{out}");

    // The old primary comes back waiting for its switchover's answer.
    cluster.start(Site::A);
    cluster.wait_until(Site::A, "hf", "the new primary's secondary", Duration::from_secs(60), |s| {
        s.role == "secondary" && s.state == "PAIR" && s.connected
    });
    cluster.wait_until(Site::B, "hf", "primary in PAIR, drained", Duration::from_secs(60), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected && s.lag_records == 0
    });
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("hf");
}

/// A clean stop lets the admin commands still running finish first, and
/// they get their answer: here a switchover waiting for a silent peer's
/// confirmation (up to 30 s) answers with its own outcome, and the daemon
/// then stops cleanly. (The stop used to exit under such a command: its
/// caller lost the connection, and a failover rolling a resync back over
/// the volumes was cut off half way under a clean mark.)
#[test]
fn a_clean_stop_lets_a_running_switchover_answer_first() {
    let group = GroupSpec::new("cs", Mode::Sync).volume("cs-vol", 16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("cs");
    cluster.wait_pair("cs", Duration::from_secs(60));
    cluster.signal(Site::B, Signal::SIGSTOP);
    let switchover = std::process::Command::new(cluster.bin())
        .arg("--config")
        .arg(cluster.config_path(Site::A))
        .args(["switchover", "cs"])
        .env_remove("REPLICATOR_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CLI");
    // It has asked the peer and waits for the answer.
    std::thread::sleep(Duration::from_secs(2));
    let status = cluster.stop_status(Site::A);
    let out = switchover.wait_with_output().expect("the CLI");
    let text = describe_output(&out);
    cluster.signal(Site::B, Signal::SIGCONT);
    assert!(status.success(), "{status}: {text}\n{}", cluster.diagnostics());
    assert!(text.contains("switchover interrupted"), "the switchover's own answer: {text}");
}

/// While a clean stop waits (here for a sync write the frozen secondary
/// holds up), the control socket still answers: `status` works, and a
/// command that would change something is refused as the daemon stopping
/// (a socket closed at the signal said the daemon was not running).
#[test]
fn a_stopping_daemon_answers_status_and_refuses_commands() {
    let group = GroupSpec::new("st", Mode::Sync).volume("st-vol", 16 * MIB).link_timeout(Duration::from_secs(10));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("st");
    cluster.wait_pair("st", Duration::from_secs(60));
    cluster.signal(Site::B, Signal::SIGSTOP);
    let socket = cluster.nbd_socket(Site::A);
    let writer = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let client = NbdClient::connect_unix(&socket, "st-vol").await.expect("connect");
            client.write(0, &random_bytes(1, 4096), false).await
        })
    });
    // The write waits for the frozen secondary (journaled, it has its
    // sequence number); the stop waits for it.
    cluster.wait_until(Site::A, "st", "the write in flight", Duration::from_secs(30), |s| s.last_seq >= 1);
    cluster.signal(Site::A, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    let a = cluster.status(Site::A, "st");
    assert_eq!(a.role, "primary", "{a:?}");
    let split = cluster.cli(Site::A, &["pair", "split", "st"]);
    let text = describe_output(&split);
    assert_eq!(split.status.code(), Some(1), "{text}");
    assert!(text.contains("the daemon is stopping"), "{text}");
    // The link timeout suspends the pair and answers the write; the stop
    // then ends cleanly.
    let written = writer.join().expect("writer");
    assert!(written.is_ok(), "{written:?}");
    let status = cluster.stop_status(Site::A);
    cluster.signal(Site::B, Signal::SIGCONT);
    assert!(status.success(), "{status}\n{}", cluster.diagnostics());
}

/// A hand-over the peer never took (it answers as the secondary still)
/// clears the marker, and writes wait until that save is on disk: a power
/// cut before it finds the marker, and the restart takes the journal's end
/// for the whole story (`Group::open`: nothing to resynchronise). A write
/// let through meanwhile is journaled, shipped and applied by the peer but
/// not durable here: after the cut the peer holds it and this side does
/// not, and nothing resynchronises it (with the barrier removed: answered
/// within the 3 s, or not, and the sites differ at its blocks). On
/// powercut-fs, with the fsync of that save held until the power goes.
#[test]
fn after_an_abandoned_hand_over_no_write_goes_through_before_the_cleared_marker_is_durable() {
    let label = "after_an_abandoned_hand_over_no_write_goes_through_before_the_cleared_marker_is_durable";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    // A long link timeout: no suspension (and its state save) while the
    // peer is stopped, so the save held below is the abandonment's.
    let group = GroupSpec::new("hb", Mode::Sync).volume("hb-vol", 64 * MIB).link_timeout(Duration::from_secs(30));
    let mut cluster = Cluster::new(ClusterOpts::group(group).with_power_cut_fs());
    cluster.pair_create("hb");
    cluster.wait_pair("hb", Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, "hb-vol", 0..32), 32);
    let last = cluster.wait_drained("hb").last_seq;
    let epoch = cluster.status(Site::B, "hb").epoch;
    cluster.stop(Site::A);
    cluster.power_cut_stopped(Site::A);
    let state = std::fs::read(cluster.state_dir(Site::A).join("groups/hb/state.json")).expect("state.json");

    // The power went while the primary waited for the answer; it restarts
    // waiting for it, the peer silent.
    set_handing_over(&cluster, Site::A, "hb", &state, last, true);
    cluster.signal(Site::B, Signal::SIGSTOP);
    cluster.start(Site::A);
    assert_waits_for_the_answer(&cluster, "hb");
    // The written region is still in the activity log (restored at the
    // start, it waits for no save): the write below waits for nothing but
    // the barrier.
    let a = cluster.status(Site::A, "hb");
    assert!(a.activity_log_bytes > 0, "the written region left the activity log: {a:?}");
    // The peer answers; the save clearing the marker hangs in its fsync.
    assert!(cluster.fs_command(Site::A, "hold-fsync groups/hb/.state.json").starts_with("ok armed"));
    cluster.signal(Site::B, Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(cluster.fs_command(Site::A, "stats").ends_with(" held 1")
        && cluster.log(Site::A).contains("switchover abandoned"))
    {
        assert!(
            Instant::now() < deadline,
            "the hand-over was not abandoned, or its save not held\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client writes meanwhile: nothing may be acknowledged.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let written = rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "hb-vol").await.expect("connect");
        let data = random_bytes(1000, BLOCK as usize);
        tokio::time::timeout(Duration::from_secs(3), client.write(40 * BLOCK, &data, false)).await
    });
    assert!(
        written.is_err(),
        "a write was answered ({written:?}) before the save clearing the hand-over marker was durable\n{}",
        cluster.diagnostics()
    );
    drop(rt);

    // The power goes before that save is durable: the marker is found again.
    let cut = cluster.power_cut(Site::A);
    assert!(cut.undone > 0 || cut.dropped > 0, "the save was in progress: {cut:?}");
    cluster.start(Site::A);
    let a = cluster.wait_until(Site::A, "hb", "primary in PAIR", Duration::from_secs(60), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected
    });
    assert_eq!((a.generation, a.epoch, a.copy_total_bytes), (1, epoch, 0), "nothing to copy: {a:?}");
    cluster.wait_drained("hb");
    assert_blocks(&cluster, Site::A, "hb-vol", 32);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("hb");
}

/// A switchover, then the new primary dies before it takes a write: the
/// old primary, now its secondary, dates its replica from the switchover
/// on, and its failover names the writes it made itself as the recovery
/// point (this node, the generation it was primary in, their time). It
/// showed no `data as of`, and the failover named the peer, the new
/// generation and "unknown time".
#[test]
fn a_failover_right_after_a_switchover_names_the_writes_this_node_made() {
    let group = GroupSpec::new("so", Mode::Async).volume("so-vol", 16 * MIB);
    let cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("so");
    cluster.wait_pair("so", Duration::from_secs(60));
    assert_eq!(write_blocks(&cluster, "so-vol", 0..5), 5);
    cluster.wait_drained("so");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let (code, out) = cli(&cluster, Site::A, &["switchover", "so"]);
    assert_eq!(code, 0, "{out}");
    let a = cluster.status(Site::A, "so");
    assert_eq!(a.role, "secondary", "{a:?}");
    let dated = a.data_as_of_unix.unwrap_or_else(|| panic!("no data as of after the switchover: {a:?}"));
    assert!(dated >= before - 1.0, "data as of {dated}, the switchover began at {before}");
    let mut cluster = cluster;
    cluster.kill9(Site::B);
    cluster.wait_until(Site::A, "so", "disconnected", Duration::from_secs(60), |s| !s.connected);
    let (code, out) = cli(&cluster, Site::A, &["failover", "so"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(recovery_seq(&out), 5, "{out}");
    assert!(out.contains("(generation 1): every write made on this node (as the primary) up to 20"), "{out}");
}

/// `switchover` asked on the secondary while the primary is frozen: the
/// secondary gives up soon after the session is gone, and says that
/// nothing changed here (it waited 90 s and said only that the primary did
/// not hand over).
#[test]
fn a_switchover_asked_of_a_frozen_primary_says_nothing_changed() {
    let group = GroupSpec::new("sf", Mode::Async).volume("sf-vol", 16 * MIB).link_timeout(Duration::from_secs(2));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sf");
    cluster.wait_pair("sf", Duration::from_secs(60));
    cluster.signal(Site::A, Signal::SIGSTOP);
    let started = Instant::now();
    let (code, out) = cli(&cluster, Site::B, &["switchover", "sf"]);
    let took = started.elapsed();
    cluster.signal(Site::A, Signal::SIGCONT);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is no longer connected") && out.contains("nothing changed here"), "{out}");
    assert!(took < Duration::from_secs(60), "gave up after {took:?}");
    assert_eq!(cluster.status(Site::B, "sf").role, "secondary");
    cluster.wait_until(Site::A, "sf", "connected again", Duration::from_secs(60), |s| s.connected);
    cluster.kill9(Site::A);
    cluster.kill9(Site::B);
}
