//! A failed `fdatasync` (write-back error), on the file system that really
//! loses what it failed to write (`powercut-fs fail-fsync`: the file's dirty
//! pages are dropped and the fsync fails with EIO once; as on Linux, the
//! next fsync finds nothing to write and succeeds); and a failed write
//! (`powercut-fs fail-write`).
//!
//! Before, a failure of the primary's periodic volume sync (the one the
//! activity log asks for every few seconds) was only logged, and a client's
//! FLUSH after it succeeded: the client was told writes were durable that
//! the disk had dropped. Now every later sync of that file fails
//! (`BlockFile::sync_data`) and the group stops (SUSPENDED(error)) until the
//! daemon restarts; on either site. A dirty-bitmap save whose volume sync
//! failed is not written (the replay would skip the records of its dirty
//! chunks, some of which only the journal still holds).
//!
//! And a secondary whose restore journal's sync hangs (`powercut-fs
//! hold-fsync`: a disk that takes its time).
//!
//! And `pair delete` (on either site) reaching a secondary whose applies
//! fail: the pair is not deleted there until a restart re-applied its
//! restore journal.
//!
//! Needs root and /dev/fuse (fuse3's fusermount3 is installed by run-all.sh).

use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::random_bytes;
use replicator_tests::{reply_number, require, require_root, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

/// An async pair of one 16 MiB volume `{name}-vol` on powercut-fs, in PAIR.
fn cluster(name: &str) -> Option<Cluster> {
    let group =
        GroupSpec::new(name, Mode::Async).volume(&format!("{name}-vol"), 16 * MIB).link_timeout(Duration::from_secs(1));
    cluster_with(name, group)
}

/// `group` (named `name`) paired on powercut-fs, in PAIR; `None` without
/// root.
fn cluster_with(name: &str, group: GroupSpec) -> Option<Cluster> {
    if !require_root(name) {
        return None;
    }
    require("fusermount3");
    assert!(std::path::Path::new("/dev/fuse").exists(), "/dev/fuse is missing: powercut-fs needs FUSE");
    let cluster = Cluster::new(ClusterOpts::group(group).with_power_cut_fs());
    cluster.pair_create(name);
    cluster.wait_pair(name, Duration::from_secs(60));
    Some(cluster)
}

/// Waits until `site`'s powercut-fs has failed an operation: its `stats`
/// counter `counter` ("failed_fsyncs", "failed_writes") is at least 1.
fn wait_failed(cluster: &Cluster, site: Site, counter: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let stats = cluster.fs_command(site, "stats");
        if reply_number(&stats, counter) >= 1 {
            return;
        }
        assert!(Instant::now() < deadline, "{site}: {counter} still 0 after {within:?}: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Blocks 0..8 written and flushed (W1), then blocks 8..16 (W2) without a
/// FLUSH; the primary's periodic sync of its volume fails and drops W2's
/// pages. The client's FLUSH must fail, and so must every write after it;
/// after a restart the sites converge, W1 intact and each W2 block either
/// written or untouched (never torn).
#[test]
fn a_failed_periodic_sync_on_the_primary_fails_the_next_flush_and_stops_the_group() {
    let Some(mut cluster) = cluster("sf") else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let w1 = |i: u64| random_bytes(100 + i, BLOCK as usize);
    let w2 = |i: u64| random_bytes(200 + i, BLOCK as usize);
    let client = rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sf-vol").await.expect("connect");
        for i in 0..8 {
            client.write(i * BLOCK, &w1(i), false).await.expect("write W1");
        }
        client.flush().await.expect("flush W1");
        for i in 8..16 {
            client.write(i * BLOCK, &w2(i), false).await.expect("write W2");
        }
        client
    });
    cluster.fs_command(Site::A, "fail-fsync sf-vol.img");
    // The activity log asks for the periodic sync once its regions are idle
    // (10 s), then every 5 s.
    wait_failed(&cluster, Site::A, "failed_fsyncs", Duration::from_secs(60));

    let s = cluster.wait_state(Site::A, "sf", "SUSPENDED", Duration::from_secs(10));
    let error = s.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("fdatasync of") && error.contains("sf-vol.img") && error.contains("stopped taking writes"),
        "the error names the sync and the file: {s:?}"
    );
    rt.block_on(async {
        let flushed = client.flush().await;
        assert!(flushed.is_err(), "a FLUSH after a failed sync must fail, not report dropped writes durable");
        let written = client.write(20 * BLOCK, &w1(20), false).await;
        assert!(written.is_err(), "the stopped group takes no write");
    });
    drop(client);
    // The volume may lack flushed writes only the journal holds: a resync
    // would copy it over the replica, so it waits for the restart's replay.
    let out = cluster.cli(Site::A, &["pair", "resync", "sf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "pair resync on a stopped group: {err}");
    assert!(err.contains("restart the daemon"), "{err}");
    let s = cluster.status(Site::A, "sf");
    assert_eq!(
        (s.state.as_str(), s.reason.as_deref(), s.health.as_str()),
        ("SUSPENDED", Some("error"), "critical"),
        "{s:?}"
    );

    // SIGTERM: the final flush fails too, so the stop is not clean and the
    // restart recovers the journal.
    let status = cluster.stop_status(Site::A);
    assert_eq!(status.code(), Some(1), "an unclean stop must exit 1: {status}");
    cluster.start(Site::A);
    let s = cluster.wait_until(Site::A, "sf", "PAIR again", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.dirty_bytes == 0
    });
    assert!(s.last_error.is_none() || !s.last_error.as_deref().unwrap_or("").contains("stopped"), "{s:?}");
    cluster.wait_drained("sf");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sf-vol").await.expect("connect");
        for i in 0..8 {
            assert!(client.read(i * BLOCK, BLOCK as u32).await.expect("read") == w1(i), "flushed block {i} lost");
        }
        for i in 8..16 {
            let got = client.read(i * BLOCK, BLOCK as u32).await.expect("read");
            assert!(got == w2(i) || got.iter().all(|b| *b == 0), "block {i} is neither written nor untouched");
        }
    });
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sf");
}

/// The secondary's restore journal sync fails: the secondary stops (it
/// acknowledges nothing more as durable and takes no new session), the
/// primary keeps taking writes into its journal, and after the secondary's
/// restart the pair catches up and the sites are identical.
#[test]
fn a_failed_restore_journal_sync_stops_the_secondary_until_it_restarts() {
    let Some(mut cluster) = cluster("sg") else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    cluster.fs_command(Site::B, "fail-fsync groups/sg/journal");
    let data = |i: u64| random_bytes(300 + i, BLOCK as usize);
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sg-vol").await.expect("connect");
        for i in 0..16 {
            client.write(i * BLOCK, &data(i), false).await.expect("write");
        }
        client.flush().await.expect("flush (async: durable locally and in the journal)");
    });
    wait_failed(&cluster, Site::B, "failed_fsyncs", Duration::from_secs(30));
    let b = cluster.wait_state(Site::B, "sg", "SUSPENDED", Duration::from_secs(10));
    let error = b.last_error.clone().unwrap_or_default();
    assert!(error.contains("sync failed") && error.contains("groups/sg/journal"), "{b:?}");
    // No session while stopped: the primary stays disconnected.
    std::thread::sleep(Duration::from_secs(3));
    let a = cluster.status(Site::A, "sg");
    assert!(!a.connected, "the stopped secondary must take no new session: {a:?}");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sg-vol").await.expect("connect");
        client.write(20 * BLOCK, &data(20), false).await.expect("the primary keeps taking writes");
    });

    let status = cluster.stop_status(Site::B);
    assert_eq!(status.code(), Some(1), "an unclean stop must exit 1: {status}");
    cluster.start(Site::B);
    cluster.wait_until(Site::A, "sg", "PAIR again", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.dirty_bytes == 0
    });
    cluster.assert_converged("sg");
    let image = std::fs::read(cluster.volume_path(Site::B, "sg-vol")).expect("read the replica");
    for i in (0..16).chain([20]) {
        let at = (i * BLOCK) as usize;
        assert!(image[at..at + BLOCK as usize] == data(i)[..], "block {i} missing on the secondary");
    }
}

/// An apply on the secondary fails (its volume write gets EIO): records the
/// restore journal holds, acknowledged as durable, may have reached the
/// volume out of order around it. The secondary must mark its replica
/// inconsistent and stop (no new session, no failover onto that image)
/// until a restart re-applies the restore journal; the session's failure
/// alone, with the drain that followed it, left it consistent and open.
#[test]
fn a_failed_apply_on_the_secondary_stops_it_until_the_restart_replays_its_journal() {
    let Some(mut cluster) = cluster("sw") else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    cluster.fs_command(Site::B, "fail-write sw-vol.img");
    let data = |i: u64| random_bytes(500 + i, BLOCK as usize);
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sw-vol").await.expect("connect");
        for i in 0..16 {
            client.write(i * BLOCK, &data(i), false).await.expect("write");
        }
        client.flush().await.expect("flush");
    });
    wait_failed(&cluster, Site::B, "failed_writes", Duration::from_secs(30));
    let b = cluster.wait_until(Site::B, "sw", "stopped", Duration::from_secs(10), |s| s.health == "critical");
    assert!(!b.consistent, "the replica may hold applies out of order: {b:?}");
    assert!(b.last_error.as_deref().unwrap_or("").contains("apply failed"), "{b:?}");
    // Its status says what makes it consistent again (it said a copy ran).
    let text = String::from_utf8_lossy(&cluster.cli(Site::B, &["status", "sw"]).stdout).into_owned();
    assert!(text.contains("none consistent until a restart of the daemon re-applies the restore journal"), "{text}");
    // Neither a new session nor a failover onto that image.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!cluster.status(Site::A, "sw").connected, "the stopped secondary took a new session");
    let out = cluster.cli(Site::B, &["failover", "sw", "--force"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "failover onto a stopped secondary: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let status = cluster.stop_status(Site::B);
    assert_eq!(status.code(), Some(1), "an unclean stop must exit 1: {status}");
    cluster.start(Site::B);
    cluster.wait_until(Site::A, "sw", "PAIR again", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.dirty_bytes == 0
    });
    cluster.assert_converged("sw");
    let image = std::fs::read(cluster.volume_path(Site::B, "sw-vol")).expect("read the replica");
    for i in 0..16 {
        let at = (i * BLOCK) as usize;
        assert!(image[at..at + BLOCK as usize] == data(i)[..], "block {i} missing on the secondary");
    }
}

/// Records the secondary `name` holds in its restore journal, not yet on
/// its volume (the journal's sync is held), and its next volume write
/// fails once: `delete` runs `pair delete` (on either site) and returns
/// its output once the secondary has drained. Returns the blocks written,
/// in order, from offset 0.
fn delete_while_applies_fail(cluster: &Cluster, name: &str, delete: Site) -> (Vec<Vec<u8>>, std::process::Output) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let blocks: Vec<Vec<u8>> = (0..12).map(|i| random_bytes(700 + i, BLOCK as usize)).collect();
    rt.block_on(async {
        let client =
            NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &format!("{name}-vol")).await.expect("connect");
        for (i, b) in blocks.iter().enumerate().take(4) {
            client.write(i as u64 * BLOCK, b, false).await.expect("write");
        }
        client.flush().await.expect("flush");
    });
    cluster.wait_drained(name);
    assert!(cluster.fs_command(Site::B, &format!("hold-fsync groups/{name}/journal")).starts_with("ok armed"));
    rt.block_on(async {
        let client =
            NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &format!("{name}-vol")).await.expect("connect");
        for (i, b) in blocks.iter().enumerate().skip(4) {
            client.write(i as u64 * BLOCK, b, false).await.expect("write");
        }
        client.flush().await.expect("flush (async: the primary's journal)");
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while reply_number(&cluster.fs_command(Site::B, "stats"), "held") < 1 {
        assert!(Instant::now() < deadline, "the secondary never synced its restore journal");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cluster.fs_command(Site::B, &format!("fail-write {name}-vol.img")).starts_with("ok armed"));
    // The secondary's word that the primary ended the pair (its own delete,
    // or the confirmation of one run on the secondary).
    let told = if delete == Site::A { "the primary ran pair delete" } else { "the primary ended the pair too" };
    let out = std::thread::scope(|s| {
        let deleting = s.spawn(|| cluster.cli(delete, &["pair", "delete", name]));
        // The delete reaches the secondary, which then drains: its held
        // sync completes and the applies it released fail.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster.log(Site::B).contains(told) {
            assert!(Instant::now() < deadline, "the secondary never heard of the delete\n{}", cluster.diagnostics());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(cluster.fs_command(Site::B, "release").starts_with("ok"));
        deleting.join().expect("pair delete")
    });
    assert_eq!(
        reply_number(&cluster.fs_command(Site::B, "stats"), "failed_writes"),
        1,
        "no apply failed: the test proves nothing"
    );
    (blocks, out)
}

/// After `pair delete` has been asked of a secondary that is failing to
/// apply, it must stay where it is: a stopped secondary whose restore
/// journal holds acknowledged writes not on its volume. Then a power cut,
/// a restart that re-applies them, and its own `pair delete`; the volume
/// must hold every write. Before, the delete dissolved the group and forgot
/// the restore journal: the volume became standalone without them.
fn check_not_deleted_until_reapplied(mut cluster: Cluster, name: &str, blocks: &[Vec<u8>]) {
    let b = cluster.wait_until(Site::B, name, "stopped", Duration::from_secs(10), |s| s.health == "critical");
    assert_eq!((b.role.as_str(), b.consistent), ("secondary", false), "{b:?}");
    assert_eq!(cluster.status(Site::A, name).state, "SIMPLEX");

    cluster.power_cut(Site::B);
    cluster.start(Site::B);
    let b =
        cluster.wait_until(Site::B, name, "told the primary left", Duration::from_secs(60), |s| s.refusal.is_some());
    assert_eq!(b.refusal.as_deref(), Some("not-paired"), "{b:?}");
    let out = cluster.cli(Site::B, &["pair", "delete", name]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    cluster.wait_state(Site::B, name, "SIMPLEX", Duration::from_secs(10));
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    let image = std::fs::read(cluster.volume_path(Site::B, &format!("{name}-vol"))).expect("read the former replica");
    for (i, block) in blocks.iter().enumerate() {
        let at = i * BLOCK as usize;
        assert!(image[at..at + BLOCK as usize] == block[..], "block {i} missing on the former secondary");
    }
    cluster.assert_volumes_identical(name);
}

/// `pair delete` on the primary while the secondary fails to apply: the
/// primary's admin hears that the secondary did not delete the pair, and
/// why.
#[test]
fn pair_delete_by_the_primary_leaves_a_secondary_that_failed_to_apply_a_secondary() {
    let name = "da";
    let Some(cluster) = cluster(name) else { return };
    let (blocks, out) = delete_while_applies_fail(&cluster, name, Site::A);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("pair deleted here") && stderr.contains("not deleted there") && stderr.contains("restart"),
        "{stdout}{stderr}"
    );
    check_not_deleted_until_reapplied(cluster, name, &blocks);
}

/// The same with `pair delete` run on the secondary: its admin hears that
/// the delete did not happen there, and that the primary ended the pair.
#[test]
fn pair_delete_on_a_secondary_that_fails_to_apply_leaves_it_a_secondary() {
    let name = "db";
    let Some(cluster) = cluster(name) else { return };
    let (blocks, out) = delete_while_applies_fail(&cluster, name, Site::B);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("not deleted here") && stderr.contains("ended the pair"), "{stdout}{stderr}");
    check_not_deleted_until_reapplied(cluster, name, &blocks);
}

/// Sync mode with `on_link_loss = "block"`: a write waits for the
/// secondary, which is gone. Then the primary's group stops after a local
/// failure (its periodic volume sync fails): the waiting write fails, where
/// it was acknowledged although the replica never had it.
#[test]
fn a_sync_write_waiting_for_a_lost_secondary_fails_when_the_group_stops() {
    let name = "bw";
    let group = GroupSpec::new(name, Mode::Sync)
        .volume("bw-vol", 16 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_link_loss = \"block\"");
    let Some(mut cluster) = cluster_with(name, group) else { return };
    cluster.kill9(Site::B);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "bw-vol")).expect("connect");
    let waiting = rt.spawn(async move { client.write(0, &random_bytes(7, BLOCK as usize), false).await });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!waiting.is_finished(), "the write waits for the secondary (on_link_loss = block)");
    cluster.fs_command(Site::A, "fail-fsync bw-vol.img");
    wait_failed(&cluster, Site::A, "failed_fsyncs", Duration::from_secs(60));
    cluster.wait_state(Site::A, name, "SUSPENDED", Duration::from_secs(10));
    let written = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), waiting).await })
        .expect("the waiting write ends once the group stopped")
        .expect("join");
    assert!(written.is_err(), "acknowledged although the secondary never had it: {written:?}");
}

/// A FLUSH made W1 durable in the journal alone (its volume pages not
/// synced). The secondary is gone and the journal fills: the next write to
/// W1's 64 KiB chunk is tracked in the dirty bitmap, whose save first syncs
/// the volume, and that sync fails (dropping W1's pages). The save must not
/// then reach the disk: a replay skips the records of a dirty chunk, so W1
/// would be lost at the restart, on both sites once the resync copies the
/// chunk. Before, the save went ahead and W1's bytes read back as zeroes.
#[test]
fn a_bitmap_save_after_a_failed_volume_sync_does_not_hide_flushed_writes_from_the_replay() {
    let name = "sv";
    let group = GroupSpec::new(name, Mode::Async)
        .volume("sv-vol", 16 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(1));
    let Some(mut cluster) = cluster_with(name, group) else { return };
    cluster.kill9(Site::B);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let w1 = random_bytes(11, BLOCK as usize);
    let client = rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sv-vol").await.expect("connect");
        client.write(0, &w1, false).await.expect("write W1");
        client.flush().await.expect("flush W1");
        client
    });
    cluster.fs_command(Site::A, "fail-fsync sv-vol.img");
    // 4 KiB writes to the start of W1's chunk fill the journal; the first
    // one it cannot hold goes to the bitmap, and its save's volume sync
    // fails: the write fails (the group stopped).
    let client = std::sync::Arc::new(client);
    let mut hung = false;
    for i in 0..6000u64 {
        let c = client.clone();
        let small = random_bytes(1000 + i, 4096);
        let done =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), c.write(0, &small, false)).await });
        match done {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                hung = true;
                break;
            }
        }
        if i % 256 == 255 && cluster.status(Site::A, name).dirty_bytes > 0 {
            break;
        }
    }
    assert!(!hung, "a write waiting for a save that will never come must fail, not hang");
    wait_failed(&cluster, Site::A, "failed_fsyncs", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill9(Site::A);
    drop(client);
    cluster.start(Site::A);
    let got = rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sv-vol").await.expect("connect");
        client.read(0, BLOCK as u32).await.expect("read")
    });
    assert!(
        got[4096..] == w1[4096..],
        "W1, flushed, lost after the failed sync and the restart ({} of its bytes read back as zero)\n{}",
        got[4096..].iter().filter(|b| **b == 0).count(),
        cluster.diagnostics()
    );
}

/// `pair delete` on the secondary whose state cannot be saved (the fsync of
/// the new state.json fails): the admin hears that the delete is not
/// persisted, not "deleted on both sites", and once the save is retried the
/// secondary is standalone.
#[test]
fn pair_delete_on_a_secondary_that_cannot_save_it_says_so() {
    let Some(cluster) = cluster("pd") else { return };
    let pid = cluster.pid(Site::B).expect("site B runs");
    cluster.fs_command(Site::B, &format!("fail-fsync groups/pd/.state.json.{pid}.tmp"));
    let out = cluster.cli(Site::B, &["pair", "delete", "pd"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "reported a delete it could not save:\n{stdout}{stderr}");
    assert!(stderr.contains("could not save") && stderr.contains("retries"), "{stdout}{stderr}");
    assert_eq!(reply_number(&cluster.fs_command(Site::B, "stats"), "failed_fsyncs"), 1);
    // The retry (the fsync fails once) saves it.
    cluster.wait_state(Site::B, "pd", "SIMPLEX", Duration::from_secs(10));
}

/// The same on the primary's side: `pair delete` there, the secondary
/// cannot save it: the admin hears it, not "the peer did not confirm".
#[test]
fn pair_delete_on_the_primary_says_when_the_secondary_cannot_save_it() {
    let Some(cluster) = cluster("pe") else { return };
    let pid = cluster.pid(Site::B).expect("site B runs");
    cluster.fs_command(Site::B, &format!("fail-fsync groups/pe/.state.json.{pid}.tmp"));
    let out = cluster.cli(Site::A, &["pair", "delete", "pe"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("could not save"), "{stdout}{stderr}");
    assert_eq!(cluster.status(Site::A, "pe").state, "SIMPLEX");
}

/// A volume write on the primary fails (EIO): the group stops taking
/// writes, stops its copy (a copy chunk read without the failed write's
/// record could follow that record to the secondary and undo it there),
/// and goes on shipping what it journaled: the writes acknowledged before
/// the failure reach the secondary while the disk is being fixed. After
/// the restart (which replays the journal) the pair resumes and both sites
/// hold every write.
#[test]
fn a_failed_volume_write_on_the_primary_stops_it_and_its_journal_still_ships() {
    let Some(mut cluster) = cluster("pw") else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    cluster.fs_command(Site::A, "fail-write pw-vol.img");
    let data = |i: u64| random_bytes(700 + i, BLOCK as usize);
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "pw-vol").await.expect("connect");
        // The failed write and every one after it get an error.
        let mut failed = 0;
        for i in 0..16 {
            failed += usize::from(client.write(i * BLOCK, &data(i), false).await.is_err());
        }
        assert!(failed >= 1, "no write failed");
    });
    wait_failed(&cluster, Site::A, "failed_writes", Duration::from_secs(30));
    cluster.wait_until(Site::A, "pw", "stopped, its journal shipped", Duration::from_secs(30), |s| {
        s.health == "critical" && s.connected && s.applied_seq == s.last_seq
    });

    let status = cluster.stop_status(Site::A);
    assert_eq!(status.code(), Some(1), "an unclean stop must exit 1: {status}");
    cluster.start(Site::A);
    cluster.wait_until(Site::A, "pw", "PAIR again", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.dirty_bytes == 0
    });
    cluster.assert_converged("pw");
}

/// Sync mode, a 16 MiB journal on the primary, and a secondary whose
/// restore journal's sync hangs (for up to a minute): its checkpoint, which
/// frees the primary's journal, stands still, and so (on powercut-fs, which
/// holds the file's writes behind its held fsync) does what it receives.
/// Writes must neither wait for that disk nor be lost: after `link_timeout`
/// the pair suspends (a write waiting for the secondary, or for journal
/// space its checkpoint would free) and they go on, tracked for the resync.
/// Then the disk answers and the sites end identical.
#[test]
fn sync_writes_go_on_when_the_secondarys_journal_sync_hangs() {
    let name = "sstall";
    if !require_root(name) {
        return;
    }
    require("fusermount3");
    let group = GroupSpec::new(name, Mode::Sync)
        .volume("sstall-vol", 64 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_link_loss = \"suspend\"");
    let mut opts = ClusterOpts::group(group).with_power_cut_fs();
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    let config = std::fs::read_to_string(cluster.config_path(Site::B)).expect("read site-b's config");
    let small = format!("journal_size = \"{}\"", 16 * MIB);
    assert!(config.contains(&small), "{config}");
    std::fs::write(cluster.config_path(Site::B), config.replace(&small, &format!("journal_size = \"{}\"", 128 * MIB)))
        .expect("write site-b's config");
    cluster.start(Site::A);
    cluster.start(Site::B);
    cluster.pair_create_opts(name, true);
    cluster.wait_pair(name, Duration::from_secs(60));
    assert!(cluster.fs_command(Site::B, "hold-fsync groups/sstall/journal").starts_with("ok armed"));

    // 48 MiB, three of the primary's journals.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sstall-vol").await.expect("connect");
        for i in 0..48u64 {
            client.write(i * MIB, &random_bytes(900 + i, MIB as usize), false).await.expect("write");
        }
        client.flush().await.expect("flush");
    });
    let took = started.elapsed();
    let held = reply_number(&cluster.fs_command(Site::B, "stats"), "held");
    assert_eq!(held, 1, "the secondary's journal sync is no longer held: the test proves nothing");
    assert!(
        took < Duration::from_secs(30),
        "writes waited {took:?} for a secondary whose journal sync hangs\n{}",
        cluster.diagnostics()
    );
    assert!(
        cluster.log(Site::A).contains("secondary did not acknowledge within link_timeout"),
        "{}",
        cluster.diagnostics()
    );
    println!("48 MiB written in {took:?} with the secondary's journal sync held");

    assert!(cluster.fs_command(Site::B, "release").starts_with("ok"));
    cluster.wait_pair(name, Duration::from_secs(120));
    cluster.assert_converged(name);
}
