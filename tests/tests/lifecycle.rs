//! Pair lifecycle through the real CLI, with sequence-stamped blocks
//! written through NBD:
//!
//! - `pair split` keeps the secondary's image at the split point, readable
//!   (read-only) through NBD, and never resumes by itself; `pair resync`
//!   waits until readers detach and copies what the primary wrote since;
//!   `pair split --rw` (run on the secondary) makes the replica writable and
//!   the resync overwrites exactly its changes; `--swap` keeps them instead
//!   and reverses the roles;
//! - failover, then `failback` on the returning old primary: only the new
//!   primary's changes (and the old primary's discarded regions) are
//!   copied, far below the volume size, and the roles switch back;
//! - split brain (the old primary acknowledged writes the new one never
//!   received): both sites say SPLIT-BRAIN, neither replicates, nothing
//!   resolves it but `pair resync --discard-local` on the side to lose
//!   (tested on either side);
//! - an initial copy sends only the 64 KiB regions that differ, and writes
//!   landing on the regions being copied leave the sites identical;
//! - every refusal's exit code and message.

use std::time::Duration;

use nix::sys::signal::Signal;
use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::{random_bytes, written_prefix, Rng};
use replicator_tests::{describe_output, Cluster, ClusterOpts, GroupSpec, Immutable, Mode, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;
const MINUTE: Duration = Duration::from_secs(60);

fn cli(cluster: &Cluster, site: Site, args: &[&str]) -> (i32, String) {
    let out = cluster.cli(site, args);
    (out.status.code().unwrap_or(-1), describe_output(&out))
}

fn cli_ok(cluster: &Cluster, site: Site, args: &[&str]) -> String {
    let (code, out) = cli(cluster, site, args);
    assert_eq!(code, 0, "{site}: replicator {}:\n{out}\n{}", args.join(" "), cluster.diagnostics());
    out
}

/// Writes block `i` = `random_bytes(i + 1 + salt)` for `i` in `range`
/// through `site`; returns how many were acknowledged in a row.
fn write_blocks(cluster: &Cluster, site: Site, vol: &str, range: std::ops::Range<u64>, salt: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(site), vol).await.expect("connect");
        let mut acked = 0;
        for i in range {
            if client.write(i * BLOCK, &random_bytes(i + 1 + salt, BLOCK as usize), false).await.is_err() {
                break;
            }
            acked += 1;
        }
        client.flush().await.expect("flush");
        acked
    })
}

/// Whether block `i` of the file at `path` holds `random_bytes(i + 1 + salt)`.
fn block_is(image: &[u8], i: u64, salt: u64) -> bool {
    let at = (i * BLOCK) as usize;
    image[at..at + BLOCK as usize] == random_bytes(i + 1 + salt, BLOCK as usize)[..]
}

fn read_volume(cluster: &Cluster, site: Site, vol: &str) -> Vec<u8> {
    std::fs::read(cluster.volume_path(site, vol)).expect("read the volume file")
}

#[test]
fn split_holds_the_image_and_resync_copies_only_the_changes() {
    let group = GroupSpec::new("sp", Mode::Sync).volume("sp-vol", 32 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sp");
    cluster.wait_pair("sp", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "sp-vol", 0..100, 0), 100);

    // Split on the primary: both sites say so, the replica holds exactly
    // the writes before it, and the primary keeps taking writes.
    let out = cli_ok(&cluster, Site::A, &["pair", "split", "sp"]);
    assert!(out.contains("split"), "{out}");
    let b = cluster.wait_until(Site::B, "sp", "split", MINUTE, |s| s.reason.as_deref() == Some("split"));
    assert!(!b.writable && b.consistent, "{b:?}");
    assert!(
        b.peer_contact_unix.is_some() && b.peer_state.as_deref().is_some_and(|p| p.starts_with("primary")),
        "{b:?}"
    );
    // RPO 0 is no longer in force on the sync primary, and it says so.
    let a = cluster.status(Site::A, "sp");
    assert_eq!(a.rpo_zero, Some(false), "{a:?}");
    assert!(a.peer_state.as_deref().is_some_and(|p| p.starts_with("secondary")), "{a:?}");
    assert!(cluster.log(Site::A).contains("RPO 0 IS NOT IN FORCE"));
    let (code, out) = cli(&cluster, Site::A, &["status", "sp"]);
    assert_eq!(code, 4, "a split pair is degraded: {out}");
    assert!(out.contains("RPO 0 NOT IN FORCE") && out.contains("peer last heard"), "{out}");
    assert!(out.contains("acknowledged without a consistent secondary") && !a.writes_wait_for_secondary, "{out}");
    assert_eq!(write_blocks(&cluster, Site::A, "sp-vol", 100..200, 0), 100);
    assert_eq!(written_prefix(&read_volume(&cluster, Site::B, "sp-vol"), 200, BLOCK), 100);
    // A split never resumes by itself.
    std::thread::sleep(Duration::from_secs(3));
    let a = cluster.status(Site::A, "sp");
    assert_eq!((a.state.as_str(), a.reason.as_deref(), a.connected), ("SUSPENDED", Some("split"), false), "{a:?}");
    assert!(a.dirty_bytes > 0 || a.lag_records > 0, "the primary tracks its writes while split: {a:?}");

    // Refusals.
    let (code, out) = cli(&cluster, Site::B, &["pair", "resync", "sp"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("on the primary"), "{out}");
    let (code, out) = cli(&cluster, Site::A, &["pair", "resync", "sp", "--swap"]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = cli(&cluster, Site::A, &["pair", "resync", "sp", "--discard-local"]);
    assert_eq!(code, 3, "--discard-local on a healthy primary is refused as unsafe: {out}");
    assert!(out.contains("SPLIT-BRAIN"), "{out}");

    // The split replica can be attached read-only (a backup, a check): it
    // holds exactly the writes before the split, refuses writes, and a
    // resync waits until it is detached.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let reader =
        rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "sp-vol")).expect("attach read-only");
    let mut image = vec![0u8; (200 * BLOCK) as usize];
    for (i, chunk) in image.chunks_mut((4 * MIB) as usize).enumerate() {
        let data = rt.block_on(reader.read(i as u64 * 4 * MIB, chunk.len() as u32)).expect("read the split replica");
        chunk.copy_from_slice(&data);
    }
    assert_eq!(written_prefix(&image, 200, BLOCK), 100, "the replica as of the split");
    assert!(rt.block_on(reader.write(0, &vec![1u8; 4096], false)).is_err(), "a plain split replica is read-only");
    cli_ok(&cluster, Site::A, &["pair", "resync", "sp"]);
    let a = cluster.wait_until(Site::A, "sp", "refused: in use", MINUTE, |s| s.refusal.as_deref() == Some("in-use"));
    assert!(!a.connected, "{a:?}");
    assert_eq!(cluster.status(Site::B, "sp").reason.as_deref(), Some("split"));
    // `--wait` waits through that refusal: the resync goes on by itself
    // once the client detaches.
    let out = std::thread::scope(|s| {
        let waiting = s.spawn(|| cli(&cluster, Site::A, &["pair", "resync", "sp", "--wait", "--timeout", "60s"]));
        std::thread::sleep(Duration::from_secs(3));
        assert!(!waiting.is_finished(), "pair resync --wait gave up on a peer whose clients are still attached");
        drop(reader);
        drop(rt);
        waiting.join().expect("pair resync --wait")
    });
    assert_eq!(out.0, 0, "{}", out.1);
    assert!(out.1.contains("PAIR"), "{}", out.1);
    let a = cluster.wait_drained("sp");
    assert_eq!(a.rpo_zero, Some(true), "{a:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    assert!(
        rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "sp-vol")).is_err(),
        "a replicating secondary cannot be attached"
    );

    // Split --rw on the secondary: its volume becomes writable. First the
    // secondary's checkpoint (persisted at least every 500 ms) passes the
    // resync's writes: the primary copies its changes since that
    // checkpoint, which the bound below counts from the split.
    std::thread::sleep(Duration::from_secs(1));
    cli_ok(&cluster, Site::B, &["pair", "split", "sp", "--rw"]);
    cluster
        .wait_until(Site::A, "sp", "split (told by the secondary)", MINUTE, |s| s.reason.as_deref() == Some("split"));
    let b = cluster.status(Site::B, "sp");
    assert!(b.writable, "{b:?}");
    // Both sides write: the replica a few blocks with another pattern.
    assert_eq!(write_blocks(&cluster, Site::B, "sp-vol", 50..60, 1000), 10);
    assert_eq!(write_blocks(&cluster, Site::A, "sp-vol", 200..250, 0), 50);
    assert!(cluster.status(Site::B, "sp").needs_rebase);
    // A failover on the split secondary while the primary is up and taking
    // writes would make two primaries: refused, naming the ways out.
    let (code, out) = cli(&cluster, Site::B, &["failover", "sp"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("--swap") && out.contains("--force"), "{out}");
    assert_eq!(cluster.status(Site::B, "sp").role, "secondary");
    // Also once no connection is left from before the split (the failover
    // asks the primary).
    cluster.stop(Site::B);
    cluster.start(Site::B);
    let (code, out) = cli(&cluster, Site::B, &["failover", "sp"]);
    assert_eq!(code, 3, "after a restart: {out}");
    cli_ok(&cluster, Site::A, &["pair", "resync", "sp", "--wait", "--timeout", "60s"]);
    let a = cluster.wait_drained("sp");
    // Only the regions either side changed were copied: the replica's 10
    // blocks (plus what the primary wrote since the split).
    assert!(a.copy_total_bytes <= 60 * BLOCK, "copied {} bytes", a.copy_total_bytes);
    let b = cluster.status(Site::B, "sp");
    assert!(!b.writable && !b.needs_rebase && b.consistent, "{b:?}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sp");
    let image = read_volume(&cluster, Site::A, "sp-vol");
    assert_eq!(written_prefix(&image, 250, BLOCK), 250, "the primary's data won");
}

/// `pair split` on the secondary, then at once `pair resync --swap` there:
/// the primary learns of the split (it is told when it next dials, about a
/// second later) before the swap, so it gives up the role; it was fenced as
/// after a failover when the swap came first.
#[test]
fn split_on_the_secondary_then_swap_at_once_demotes_the_primary() {
    let group = GroupSpec::new("ss", Mode::Sync).volume("ss-vol", 16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("ss");
    cluster.wait_pair("ss", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "ss-vol", 0..20, 0), 20);
    cluster.wait_drained("ss");
    cli_ok(&cluster, Site::B, &["pair", "split", "ss"]);
    let out = cli_ok(&cluster, Site::B, &["pair", "resync", "ss", "--swap"]);
    assert!(out.contains("now the primary"), "{out}");
    let a = cluster.wait_until(Site::A, "ss", "the secondary after the swap, in PAIR", MINUTE, |s| {
        s.role == "secondary" && s.state == "PAIR" || s.superseded_by > 0
    });
    assert_eq!((a.role.as_str(), a.superseded_by), ("secondary", 0), "fenced instead of demoted: {a:?}");
    cluster.assert_converged("ss");
}

#[test]
fn split_rw_then_swap_keeps_the_replicas_changes_and_reverses_the_roles() {
    let group = GroupSpec::new("sw", Mode::Async).volume("sw-vol", 32 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sw");
    cluster.wait_pair("sw", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "sw-vol", 0..100, 0), 100);
    cluster.wait_drained("sw");
    cli_ok(&cluster, Site::A, &["pair", "split", "sw", "--rw"]);
    cluster.wait_until(Site::B, "sw", "split and writable", MINUTE, |s| s.writable);
    // The old primary writes blocks 0..10 again (to be discarded), the
    // replica 20..30 (to be kept).
    assert_eq!(write_blocks(&cluster, Site::A, "sw-vol", 0..10, 500), 10);
    assert_eq!(write_blocks(&cluster, Site::B, "sw-vol", 20..30, 1000), 10);

    let (code, out) = cli(&cluster, Site::B, &["pair", "resync", "sw", "--swap", "--discard-local"]);
    assert_eq!(code, 2, "--swap and --discard-local conflict: {out}");
    let out = cli_ok(&cluster, Site::B, &["pair", "resync", "sw", "--swap"]);
    assert!(out.contains("now the primary"), "{out}");
    let a = cluster.wait_until(Site::A, "sw", "the secondary after the swap, in PAIR", MINUTE, |s| {
        s.role == "secondary" && s.state == "PAIR"
    });
    assert!(a.consistent, "{a:?}");
    let b = cluster.wait_until(Site::B, "sw", "drained primary", MINUTE, |s| {
        s.role == "primary" && s.state == "PAIR" && s.lag_records == 0
    });
    assert!(b.copy_total_bytes <= 30 * BLOCK, "copied {} bytes", b.copy_total_bytes);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sw");
    let image = read_volume(&cluster, Site::A, "sw-vol");
    for i in 0..100 {
        let want = if (20..30).contains(&i) { 1000 } else { 0 };
        assert!(block_is(&image, i, want), "block {i}: the new primary's data, the old primary's changes discarded");
    }
    assert!(cluster.log(Site::A).contains("pair resync --swap on site-b"));
}

/// `pair resync --swap` while an NBD client holds the old primary's
/// volume: the old primary learns of the swap when the new one dials, and
/// from then on refuses writes (EPERM) and new clients, as a switchover
/// does, across a power cut too: the swap would overwrite every write it
/// acknowledged. Once the client detaches it gives up the role.
#[test]
fn swap_while_a_client_holds_the_old_primary_refuses_its_writes_until_it_detaches() {
    let group = GroupSpec::new("sh", Mode::Async).volume("sh-vol", 16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group).with_power_cut_fs());
    cluster.pair_create("sh");
    cluster.wait_pair("sh", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "sh-vol", 0..20, 0), 20);
    cluster.wait_drained("sh");
    cli_ok(&cluster, Site::B, &["pair", "split", "sh", "--rw"]);
    cluster
        .wait_until(Site::A, "sh", "split (told by the secondary)", MINUTE, |s| s.reason.as_deref() == Some("split"));
    assert_eq!(write_blocks(&cluster, Site::B, "sh-vol", 30..40, 1000), 10);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sh-vol")).expect("attach");
    let block = |i: u64| random_bytes(i + 1 + 500, BLOCK as usize);
    rt.block_on(client.write(0, &block(0), false)).expect("the split primary takes writes");
    let out = cli_ok(&cluster, Site::B, &["pair", "resync", "sh", "--swap"]);
    assert!(out.contains("now the primary"), "{out}");
    let a = cluster.wait_until(Site::A, "sh", "told of the swap", MINUTE, |s| !s.writable);
    assert_eq!(a.role, "primary", "{a:?}");
    // Refused, the new primary has a connection but no session: no RTT.
    let b = cluster.wait_until(Site::B, "sh", "refused in-use", MINUTE, |s| s.refusal.as_deref() == Some("in-use"));
    assert!(!b.connected && b.link_rtt_seconds.is_none(), "{b:?}");
    assert!(a.last_error.as_deref().is_some_and(|e| e.contains("--swap") && e.contains("detach")), "{a:?}");
    let refused = rt.block_on(client.write(BLOCK, &block(1), false));
    assert!(refused.is_err(), "a write acknowledged now would be overwritten by the swap");
    assert!(
        rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sh-vol")).is_err(),
        "no new client attaches to a primary giving up its role"
    );
    // Across a power cut too: with the new primary away, the old one
    // comes back taking no writes (a client attaching at once would
    // otherwise write what the swap overwrites).
    cluster.stop(Site::B);
    cluster.power_cut(Site::A);
    drop(client);
    cluster.start(Site::A);
    let a = cluster.status(Site::A, "sh");
    assert!(a.role == "primary" && !a.writable, "{a:?}");
    assert!(a.last_error.as_deref().is_some_and(|e| e.contains("--swap") && e.contains("detach")), "{a:?}");
    assert!(
        rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sh-vol")).is_err(),
        "no client attaches to the old primary after its restart"
    );
    drop(rt);
    cluster.start(Site::B);
    cluster.wait_until(Site::A, "sh", "the secondary after the swap, in PAIR", MINUTE, |s| {
        s.role == "secondary" && s.state == "PAIR"
    });
    cluster.wait_until(Site::B, "sh", "drained primary", MINUTE, |s| {
        s.role == "primary" && s.state == "PAIR" && s.lag_records == 0
    });
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sh");
    let image = read_volume(&cluster, Site::A, "sh-vol");
    for i in 0..40 {
        let want = if (30..40).contains(&i) { 1000 } else { 0 };
        assert!((20..30).contains(&i) || block_is(&image, i, want), "block {i}: the new primary's data");
    }
    assert!(cluster.log(Site::A).contains("takes no more writes (EPERM)"));
}

/// Pairs, writes, kills the primary and fails over to B; B then takes
/// writes of its own. Returns the recovery point's block count.
fn fail_over(cluster: &mut Cluster, group: &str, vol: &str, before: u64) {
    assert_eq!(write_blocks(cluster, Site::A, vol, 0..before, 0), before);
    cluster.wait_drained(group);
    cluster.kill9(Site::A);
    cluster.wait_until(Site::B, group, "disconnected from the dead primary", MINUTE, |s| !s.connected);
    cli_ok(cluster, Site::B, &["failover", group]);
}

#[test]
fn failback_copies_only_what_changed_and_switches_back() {
    let group = GroupSpec::new("fb", Mode::Sync).volume("fb-vol", 64 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fb");
    cluster.wait_pair("fb", MINUTE);
    fail_over(&mut cluster, "fb", "fb-vol", 200);
    // The new primary takes writes: 40 blocks overwritten, 40 new ones.
    assert_eq!(write_blocks(&cluster, Site::B, "fb-vol", 100..140, 2000), 40);
    assert_eq!(write_blocks(&cluster, Site::B, "fb-vol", 200..240, 2000), 40);

    // Refusals: failback on the new primary; failover on a primary.
    let (code, out) = cli(&cluster, Site::B, &["failback", "fb"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not superseded") || out.contains("was not superseded"), "{out}");

    cluster.start(Site::A);
    let a = cluster.wait_until(Site::A, "fb", "fenced", MINUTE, |s| s.superseded_by == 2);
    assert!(!a.writable, "{a:?}");
    let out = cli_ok(&cluster, Site::A, &["failback", "fb", "--no-switch", "--wait", "--timeout", "60s"]);
    assert!(out.contains("Discarded here"), "the discarded data is reported: {out}");
    let b = cluster
        .wait_until(Site::B, "fb", "PAIR, drained", MINUTE, |s| s.state == "PAIR" && s.connected && s.lag_records == 0);
    assert!(
        b.copy_total_bytes < 64 * MIB / 4,
        "failback copied {} bytes of a 64 MiB volume (80 blocks changed)",
        b.copy_total_bytes
    );
    eprintln!("failback copied {} bytes", b.copy_total_bytes);
    let a = cluster.status(Site::A, "fb");
    assert_eq!((a.role.as_str(), a.state.as_str(), a.consistent), ("secondary", "PAIR", true), "{a:?}");

    // Switch back: A is the primary again, with every write.
    let out = cli_ok(&cluster, Site::A, &["switchover", "fb"]);
    assert!(out.contains("switchover done"), "{out}");
    // Its session comes up at once: sync writes wait for it. (The run of
    // its fenced past retried every 10 s, and writes waited link_timeout,
    // then went on alone: SUSPENDED.)
    cluster.wait_until(Site::A, "fb", "replicating again", Duration::from_secs(3), |s| s.connected);
    cluster.wait_pair("fb", MINUTE);
    cluster.assert_converged("fb");
    let image = read_volume(&cluster, Site::A, "fb-vol");
    for i in 0..240 {
        let salt = if (100..140).contains(&i) || i >= 200 { 2000 } else { 0 };
        assert!(block_is(&image, i, salt), "block {i} after failback and switch back");
    }
}

/// A primary that was frozen (not restarted) through a failover and failed
/// back shows no copy figures of its own past as primary: its `--wait`
/// lines and status said "32 MiB of 32 MiB compared or copied" (its initial
/// copy) with nothing being copied.
#[test]
fn a_failed_back_primary_shows_no_copy_figures_of_its_past() {
    let group = GroupSpec::new("fc", Mode::Sync).volume("fc-vol", 32 * MIB).link_timeout(Duration::from_secs(1));
    let cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fc");
    cluster.wait_pair("fc", MINUTE);
    assert_eq!(cluster.status(Site::A, "fc").copy_total_bytes, 32 * MIB, "the initial copy's figures");
    cluster.signal(Site::A, Signal::SIGSTOP);
    cluster.wait_until(Site::B, "fc", "disconnected from the frozen primary", MINUTE, |s| !s.connected);
    cli_ok(&cluster, Site::B, &["failover", "fc"]);
    cluster.signal(Site::A, Signal::SIGCONT);
    cluster.wait_until(Site::A, "fc", "fenced", MINUTE, |s| s.superseded_by > 0);
    cli_ok(&cluster, Site::A, &["failback", "fc", "--no-switch", "--wait", "--timeout", "60s"]);
    let a = cluster.status(Site::A, "fc");
    assert_eq!(a.role, "secondary", "{a:?}");
    assert_eq!((a.copy_total_bytes, a.copy_done_bytes), (0, 0), "{a:?}");
}

/// A failover whose promotion cannot be saved at once (the state directory
/// refuses writes) says so and is in effect all the same, its save retried:
/// once the save lands, the new primary replicates, and the former
/// primary's failback is resynced by it. (Its sessions were never started:
/// the failback waited for a resync nobody ran, until a restart.)
#[test]
fn a_failover_saved_late_still_replicates() {
    if !replicator_tests::require_root("a_failover_saved_late_still_replicates") {
        return;
    }
    let group = GroupSpec::new("fl", Mode::Async).volume("fl-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fl");
    cluster.wait_pair("fl", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "fl-vol", 0..50, 0), 50);
    cluster.wait_drained("fl");
    cluster.kill9(Site::A);
    cluster.wait_until(Site::B, "fl", "disconnected from the dead primary", MINUTE, |s| !s.connected);

    let frozen = Immutable::set(cluster.state_dir(Site::B).join("groups").join("fl"));
    let (code, out) = cli(&cluster, Site::B, &["failover", "fl"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot persist") && out.contains("Recovery point"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    drop(frozen);
    let b = cluster.wait_until(Site::B, "fl", "the promotion saved", MINUTE, |s| s.role == "primary");
    assert_eq!(b.generation, 2, "{b:?}");
    assert_eq!(write_blocks(&cluster, Site::B, "fl-vol", 10..20, 3000), 10);

    cluster.start(Site::A);
    cluster.wait_until(Site::A, "fl", "fenced", MINUTE, |s| s.superseded_by == 2);
    cli_ok(&cluster, Site::A, &["failback", "fl", "--no-switch", "--wait", "--timeout", "60s"]);
    cluster
        .wait_until(Site::B, "fl", "PAIR, drained", MINUTE, |s| s.state == "PAIR" && s.connected && s.lag_records == 0);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("fl");
    let image = read_volume(&cluster, Site::A, "fl-vol");
    for i in 0..50 {
        let want = if (10..20).contains(&i) { 3000 } else { 0 };
        assert!(block_is(&image, i, want), "block {i}: the new primary's data on the former primary");
    }
}

/// The replica is split with --rw and written, then failed over to: the
/// writes it took while split are part of what the former primary lacks,
/// and failback copies them with the rest. (The primary stops cleanly, so
/// no region of its own is resynchronised and nothing else covers them.)
#[test]
fn failover_after_split_rw_keeps_the_split_writes_for_failback() {
    let group = GroupSpec::new("fs", Mode::Async).volume("fs-vol", 32 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("fs");
    cluster.wait_pair("fs", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "fs-vol", 0..100, 0), 100);
    cluster.wait_drained("fs");
    cli_ok(&cluster, Site::B, &["pair", "split", "fs", "--rw"]);
    cluster.wait_until(Site::B, "fs", "split and writable", MINUTE, |s| s.writable);
    // Far from anything the primary wrote.
    assert_eq!(write_blocks(&cluster, Site::B, "fs-vol", 400..410, 1000), 10);
    cluster.stop(Site::A);
    let out = cli_ok(&cluster, Site::B, &["failover", "fs"]);
    assert!(out.contains("written here while split with --rw"), "the report names the split writes: {out}");
    assert!(
        out.contains("split by an admin at that point") && !out.contains("reported nothing beyond"),
        "the report says the primary's writes since the split are not here: {out}"
    );
    assert_eq!(write_blocks(&cluster, Site::B, "fs-vol", 100..110, 2000), 10);
    cluster.start(Site::A);
    cluster.wait_until(Site::A, "fs", "fenced", MINUTE, |s| s.superseded_by > 0);
    // Failed back while the new primary is away: the old primary waits for
    // its copy, and takes no writes the copy would overwrite unseen.
    cluster.stop(Site::B);
    cli_ok(&cluster, Site::A, &["failback", "fs", "--no-switch"]);
    let (code, out) = cli(&cluster, Site::A, &["pair", "split", "fs", "--rw"]);
    assert_eq!(code, 3, "{out}");
    assert!(!cluster.status(Site::A, "fs").writable);
    let (_, out) = cli(&cluster, Site::A, &["status", "fs"]);
    assert!(out.contains("failover image: none consistent (a copy into it is due or running"), "{out}");
    cluster.start(Site::B);
    cli_ok(&cluster, Site::A, &["failback", "fs", "--no-switch", "--wait", "--timeout", "60s"]);
    cluster
        .wait_until(Site::B, "fs", "PAIR, drained", MINUTE, |s| s.state == "PAIR" && s.connected && s.lag_records == 0);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("fs");
    let image = read_volume(&cluster, Site::A, "fs-vol");
    for (blocks, salt) in [(0..100, 0), (100..110, 2000), (400..410, 1000)] {
        for i in blocks {
            assert!(block_is(&image, i, salt), "block {i} after failover from a split replica and failback");
        }
    }
}

/// An async pair whose primary acknowledged writes the secondary never got,
/// then died; B fails over and takes writes; A comes back.
fn split_brain(cluster: &mut Cluster) {
    cluster.pair_create("sb");
    cluster.wait_pair("sb", MINUTE);
    assert_eq!(write_blocks(cluster, Site::A, "sb-vol", 0..100, 0), 100);
    cluster.wait_drained("sb");
    // The secondary freezes; the primary acknowledges 50 more writes and
    // dies; the secondary dies too before it could read them from its
    // socket, and restarts.
    cluster.signal(Site::B, Signal::SIGSTOP);
    assert_eq!(write_blocks(cluster, Site::A, "sb-vol", 100..150, 0), 50);
    cluster.kill9(Site::A);
    cluster.kill9(Site::B);
    cluster.start(Site::B);
    let out = cli_ok(cluster, Site::B, &["failover", "sb"]);
    assert!(out.contains("Recovery point: sequence 100 "), "{out}");
    assert_eq!(write_blocks(cluster, Site::B, "sb-vol", 0..20, 3000), 20);
    cluster.start(Site::A);
    for site in [Site::A, Site::B] {
        let s = cluster.wait_state(site, "sb", "SPLIT-BRAIN", MINUTE);
        assert!(!s.connected, "{site}: {s:?}");
    }
    // Nothing resolves it by itself, and the old primary takes no writes.
    std::thread::sleep(Duration::from_secs(3));
    for site in [Site::A, Site::B] {
        assert_eq!(cluster.status(site, "sb").state, "SPLIT-BRAIN");
    }
    assert!(!cluster.status(Site::A, "sb").writable);
    let (code, out) = cli(cluster, Site::B, &["pair", "resync", "sb"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("--discard-local"), "{out}");
    // The commands on the wrong site name the ways out, and change nothing.
    let (code, out) = cli(cluster, Site::B, &["failback", "sb"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("failback sb` on site-a") && out.contains("--discard-local` here"), "{out}");
    let (code, out) = cli(cluster, Site::A, &["switchover", "sb"]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("is in SPLIT-BRAIN")
            && out.contains("`replicator failback sb` here")
            && out.contains("`replicator pair resync sb --discard-local` on site-b"),
        "{out}"
    );
    for site in [Site::A, Site::B] {
        assert_eq!(cluster.status(site, "sb").state, "SPLIT-BRAIN");
    }
}

/// Ends [`split_brain`] keeping the new primary's data (`pair resync
/// --discard-local` on the old one), waits until both are in PAIR and
/// drained, stops both and checks them identical. Returns the image.
fn discard_on_the_old_primary(cluster: &mut Cluster) -> Vec<u8> {
    let out = cli_ok(cluster, Site::A, &["pair", "resync", "sb", "--discard-local"]);
    assert!(out.contains("Discarded here"), "{out}");
    cluster
        .wait_until(Site::B, "sb", "PAIR, drained", MINUTE, |s| s.state == "PAIR" && s.connected && s.lag_records == 0);
    cluster.wait_state(Site::A, "sb", "PAIR", MINUTE);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sb");
    read_volume(cluster, Site::A, "sb-vol")
}

fn split_brain_group() -> GroupSpec {
    GroupSpec::new("sb", Mode::Async)
        .volume("sb-vol", 32 * MIB)
        .journal_size(64 * MIB)
        .link_timeout(Duration::from_secs(1))
}

#[test]
fn split_brain_is_reported_on_both_sites_and_the_old_primary_discards_by_command() {
    let mut cluster = Cluster::new(ClusterOpts::group(split_brain_group()));
    split_brain(&mut cluster);
    let image = discard_on_the_old_primary(&mut cluster);
    for i in 0..150 {
        let ok = match i {
            0..20 => block_is(&image, i, 3000),
            20..100 => block_is(&image, i, 0),
            // The old primary's writes the failover left behind are gone.
            _ => !block_is(&image, i, 0),
        };
        assert!(ok, "block {i}");
    }
}

/// Sync mode under `on_link_loss = "suspend"`: the new primary of a split
/// brain, the site clients now use, keeps taking writes and FLUSHes
/// (acknowledged locally, as while suspended, RPO 0 not in force; before,
/// each was written and then failed with EIO), and they are what the resync
/// keeps when the old primary discards its own.
#[test]
fn a_sync_primary_in_split_brain_takes_writes_and_the_resync_keeps_them() {
    let group = GroupSpec::new("sb", Mode::Sync)
        .volume("sb-vol", 32 * MIB)
        .journal_size(64 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_link_loss = \"suspend\"");
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    split_brain(&mut cluster);
    assert_eq!(write_blocks(&cluster, Site::B, "sb-vol", 20..40, 4000), 20, "writes in SPLIT-BRAIN failed");
    let b = cluster.status(Site::B, "sb");
    assert_eq!((b.state.as_str(), b.rpo_zero), ("SPLIT-BRAIN", Some(false)), "{b:?}");

    let image = discard_on_the_old_primary(&mut cluster);
    for i in 0..100 {
        let salt = match i {
            0..20 => 3000,
            20..40 => 4000,
            _ => 0,
        };
        assert!(block_is(&image, i, salt), "block {i}");
    }
}

#[test]
fn split_brain_resolved_on_the_newer_primary_keeps_the_old_primarys_data() {
    let mut cluster = Cluster::new(ClusterOpts::group(split_brain_group()));
    split_brain(&mut cluster);
    let out = cli_ok(&cluster, Site::B, &["pair", "resync", "sb", "--discard-local"]);
    assert!(out.contains("gave up the primary role"), "{out}");
    let a = cluster.wait_until(Site::A, "sb", "the primary again, PAIR, drained", Duration::from_secs(90), |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected && s.lag_records == 0
    });
    assert!(a.writable && a.superseded_by == 0 && a.generation == 3, "{a:?}");
    cluster.wait_state(Site::B, "sb", "PAIR", MINUTE);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sb");
    let image = read_volume(&cluster, Site::B, "sb-vol");
    assert_eq!(written_prefix(&image, 150, BLOCK), 150, "the old primary's data won, every block of it");
}

/// Failback and split --rw with power cuts at the moments their state
/// changes: right after `failback` returned (the divergent regions and the
/// new role must be durable), of the new primary after the rebase, and of
/// a split writable replica after its own writes (their regions must be
/// durable before the writes were acknowledged). Flushed writes only, so
/// every block's expected content is known.
#[test]
fn failback_and_split_rw_survive_power_cuts() {
    if !replicator_tests::require_root("failback_and_split_rw_survive_power_cuts") {
        return;
    }
    replicator_tests::require("fusermount3");
    let group = GroupSpec::new("pc", Mode::Sync).volume("pc-vol", 32 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group).with_power_cut_fs());
    cluster.pair_create("pc");
    cluster.wait_pair("pc", MINUTE);
    fail_over(&mut cluster, "pc", "pc-vol", 100);
    assert_eq!(write_blocks(&cluster, Site::B, "pc-vol", 50..70, 2000), 20);
    cluster.start(Site::A);
    cluster.wait_until(Site::A, "pc", "fenced", MINUTE, |s| s.superseded_by == 2);

    // Failback, and the old primary loses power at once.
    cli_ok(&cluster, Site::A, &["failback", "pc", "--no-switch"]);
    cluster.power_cut(Site::A);
    cluster.start(Site::A);
    let a = cluster.status(Site::A, "pc");
    assert_eq!((a.role.as_str(), a.needs_rebase), ("secondary", true), "{a:?}");
    cluster
        .wait_until(Site::B, "pc", "PAIR, drained", MINUTE, |s| s.state == "PAIR" && s.connected && s.lag_records == 0);

    // The new primary loses power after more writes.
    assert_eq!(write_blocks(&cluster, Site::B, "pc-vol", 200..220, 3000), 20);
    cluster.power_cut(Site::B);
    cluster.start(Site::B);
    cluster.wait_until(Site::B, "pc", "PAIR, drained after the power cut", MINUTE, |s| {
        s.state == "PAIR" && s.connected && s.lag_records == 0
    });

    // The replica is split writable, written, and loses power.
    cli_ok(&cluster, Site::A, &["pair", "split", "pc", "--rw"]);
    assert_eq!(write_blocks(&cluster, Site::A, "pc-vol", 300..310, 4000), 10);
    cluster.power_cut(Site::A);
    cluster.start(Site::A);
    let a = cluster.status(Site::A, "pc");
    assert_eq!((a.reason.as_deref(), a.writable, a.needs_rebase), (Some("split"), true, true), "{a:?}");
    cli_ok(&cluster, Site::B, &["pair", "resync", "pc", "--wait", "--timeout", "60s"]);
    cluster.wait_until(Site::B, "pc", "drained", MINUTE, |s| s.state == "PAIR" && s.lag_records == 0);

    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("pc");
    let image = read_volume(&cluster, Site::A, "pc-vol");
    for i in 0..320 {
        let ok = match i {
            50..70 => block_is(&image, i, 2000),
            0..100 => block_is(&image, i, 0),
            200..220 => block_is(&image, i, 3000),
            // The split replica's writes were overwritten by the primary's
            // (never written) blocks.
            // Never written by anyone.
            _ => image[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize].iter().all(|&b| b == 0),
        };
        assert!(ok, "block {i}");
    }
}

/// `pair create` of volumes that already hold the same data (restored from
/// the same backup, say) sends only the regions that differ: every chunk
/// goes as its hash first.
#[test]
fn initial_copy_sends_only_the_regions_that_differ() {
    let group = GroupSpec::new("hc", Mode::Async).volume("hc-vol", 32 * MIB);
    let mut opts = ClusterOpts::group(group);
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    let image: Vec<u8> = (0..32 * MIB / BLOCK).flat_map(|i| random_bytes(i + 1, BLOCK as usize)).collect();
    for site in [Site::A, Site::B] {
        std::fs::write(cluster.volume_path(site, "hc-vol"), &image).expect("write the volume file");
    }
    // Two 64 KiB blocks differ, in two different MiB.
    let mut b = std::fs::OpenOptions::new().write(true).open(cluster.volume_path(Site::B, "hc-vol")).expect("open");
    for block in [3u64, 200] {
        std::io::Seek::seek(&mut b, std::io::SeekFrom::Start(block * BLOCK)).expect("seek");
        std::io::Write::write_all(&mut b, &vec![0xee; BLOCK as usize]).expect("write");
    }
    drop(b);
    cluster.start(Site::A);
    cluster.start(Site::B);
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let created = unix_now();
    cli_ok(&cluster, Site::A, &["pair", "create", "hc", "--wait", "--timeout", "60s"]);
    let a = cluster.wait_drained("hc");
    assert_eq!(a.copy_total_bytes, 32 * MIB, "{a:?}");
    assert_eq!(a.copy_sent_bytes, 2 * BLOCK, "only the two differing 64 KiB regions are sent: {a:?}");
    // No write was made: the replica's data is as of the copy's end (it
    // named no time, and a drill's report "the primary's time unknown").
    let b = cluster.wait_until(Site::B, "hc", "data as of the copy's end", MINUTE, |s| s.data_as_of_unix.is_some());
    let as_of = b.data_as_of_unix.unwrap_or_default();
    assert!(as_of >= created - 1.0 && as_of <= unix_now() + 1.0, "data as of {as_of}, the pair created at {created}");
    cli_ok(&cluster, Site::B, &["drill", "start", "hc"]);
    let drill = cluster.status(Site::B, "hc").drill.expect("a drill runs");
    assert!(drill.meta.recovery_time_us as f64 / 1e6 >= created - 1.0, "{drill:?}");
    cli_ok(&cluster, Site::B, &["drill", "stop", "hc"]);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("hc");
}

/// Writes keep landing on the regions being copied while an initial copy
/// runs, with chunks in flight both as hashes (the secondary's first half
/// already matches) and as data (its second half differs): the sites end
/// byte-identical.
#[test]
fn writes_during_the_initial_copy_end_identical() {
    let size = 192 * MIB;
    let group = GroupSpec::new("wc", Mode::Async).volume("wc-vol", size);
    let mut opts = ClusterOpts::group(group);
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    let mut image: Vec<u8> = (0..size / BLOCK).flat_map(|i| random_bytes(i + 1, BLOCK as usize)).collect();
    std::fs::write(cluster.volume_path(Site::A, "wc-vol"), &image).expect("write the volume file");
    let half = image.len() / 2;
    image[half..].copy_from_slice(&random_bytes(4242, half));
    std::fs::write(cluster.volume_path(Site::B, "wc-vol"), &image).expect("write the volume file");
    drop(image);
    cluster.start(Site::A);
    cluster.start(Site::B);
    // Four writers, each on its own NBD connection, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let socket = cluster.nbd_socket(Site::A);
    let writers = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let mut tasks = Vec::new();
                for w in 0..4u64 {
                    let client = NbdClient::connect_unix(&socket, "wc-vol").await.expect("connect");
                    let (stop, done) = (stop.clone(), done.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut rng = Rng::new(99 + w);
                        for n in 0..5_000u64 {
                            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                break;
                            }
                            let len = 4096 * (1 + rng.below(16));
                            let offset = rng.below((size - len) / 4096) * 4096;
                            let data = random_bytes(1_000_000 * (w + 1) + n, len as usize);
                            client.write(offset, &data, false).await.expect("write");
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        client.flush().await.expect("flush");
                    }));
                }
                for t in tasks {
                    t.await.expect("writer");
                }
            });
        })
    };
    // Writes that completed after `pair create` began and before the copy
    // was last seen running landed while it ran.
    let before = done.load(std::sync::atomic::Ordering::Relaxed);
    cli_ok(&cluster, Site::A, &["pair", "create", "wc"]);
    let mut during = 0;
    let deadline = std::time::Instant::now() + MINUTE;
    while std::time::Instant::now() < deadline {
        let seen = done.load(std::sync::atomic::Ordering::Relaxed);
        if cluster.status(Site::A, "wc").state != "COPY" {
            break;
        }
        during = seen - before;
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writers.join().expect("writers");
    assert!(during >= 32, "only {during} writes landed while the copy ran");
    let a = cluster.wait_drained("wc");
    assert!(a.copy_sent_bytes >= size / 2, "the differing half went as data: {a:?}");
    assert!(a.copy_sent_bytes < size, "the matching half went as hashes: {a:?}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("wc");
}

/// Every lifecycle refusal: exit 3 (unsafe, with the way out named) or
/// exit 1 (not applicable here), and nothing changes.
#[test]
fn lifecycle_refusals_name_the_way_out_and_change_nothing() {
    let group = GroupSpec::new("rf", Mode::Sync).volume("rf-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("rf");
    cluster.wait_pair("rf", MINUTE);
    let refusals: [(Site, &[&str], i32, &str); 7] = [
        (Site::A, &["failback", "rf"], 3, "switchover"),
        // On the wrong site, a healthy secondary: it handed the roles over.
        (Site::B, &["failback", "rf"], 3, "switchover"),
        (Site::B, &["failback", "rf", "--no-switch"], 3, "nothing to fail back"),
        (Site::B, &["pair", "resync", "rf", "--swap"], 3, "pair split"),
        (Site::B, &["pair", "resync", "rf", "--discard-local"], 3, "SPLIT-BRAIN"),
        (Site::A, &["pair", "resync", "rf"], 0, "nothing to resync"),
        (Site::B, &["pair", "resync", "rf"], 1, "on the primary"),
    ];
    for (site, args, want, hint) in refusals {
        let (code, out) = cli(&cluster, site, args);
        assert_eq!(code, want, "{site}: replicator {}:\n{out}", args.join(" "));
        assert!(out.contains(hint), "{site}: replicator {} should mention {hint:?}:\n{out}", args.join(" "));
    }
    cluster.wait_pair("rf", MINUTE);
    let b = cluster.status(Site::B, "rf");
    assert_eq!((b.role.as_str(), b.generation), ("secondary", 1), "the roles did not change: {b:?}");
    // With the secondary gone, split --rw cannot reach it: refused; a plain
    // split is local.
    cluster.kill9(Site::B);
    cluster.wait_until(Site::A, "rf", "disconnected", MINUTE, |s| !s.connected);
    let (code, out) = cli(&cluster, Site::A, &["pair", "split", "rf", "--rw"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("pair split rf --rw` on site-b"), "{out}");
    assert_ne!(cluster.status(Site::A, "rf").reason.as_deref(), Some("split"));
    let out = cli_ok(&cluster, Site::A, &["pair", "split", "rf"]);
    assert!(out.contains("not connected"), "{out}");
    let (code, out) = cli(&cluster, Site::A, &["pair", "split", "rf"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already split"), "{out}");
}

/// `pair split --rw` on the primary while the initial copy runs: the
/// secondary's volumes hold no image the primary ever had, so they must not
/// become writable (as `--rw` on the secondary itself is refused then).
/// Before, the primary asked and the secondary split writable.
#[test]
fn split_rw_on_the_primary_is_refused_while_the_copy_runs() {
    if !replicator_tests::require_root("split_rw_on_the_primary_is_refused_while_the_copy_runs") {
        return;
    }
    replicator_tests::require("fusermount3");
    let group = GroupSpec::new("sc", Mode::Async).volume("sc-vol", 16 * MIB);
    let cluster = Cluster::new(ClusterOpts::group(group).with_power_cut_fs());
    assert_eq!(write_blocks(&cluster, Site::A, "sc-vol", 0..64, 0), 64);
    // The secondary's first volume sync hangs: the copy stays unfinished.
    assert!(cluster.fs_command(Site::B, "hold-fsync sc-vol.img").starts_with("ok armed"));
    cluster.pair_create("sc");
    cluster.wait_until(Site::A, "sc", "copying", MINUTE, |s| s.state == "COPY" && s.connected);
    let (code, out) = cli(&cluster, Site::A, &["pair", "split", "sc", "--rw"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("cannot be made writable"), "{out}");
    // (Site B's file system holds its sync: its daemon is not asked.)
    let a = cluster.status(Site::A, "sc");
    assert_eq!((a.state.as_str(), a.connected), ("COPY", true), "the refused split changed the pair: {a:?}");
    assert!(cluster.fs_command(Site::B, "release").starts_with("ok"));
    cluster.wait_pair("sc", MINUTE);
    let mut cluster = cluster;
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sc");
}

/// `pair split` on the primary while its secondary is down. Nothing may be
/// shipped from then on, also over a session that was being set up
/// meanwhile: before, the dial under way when the link was lost came up as
/// soon as the peer was back, and the "split" pair went on replicating. Then
/// `--rw` with the peer just frozen, still connected: the primary waits
/// 30 s, splits and says what to check there.
#[test]
fn a_split_the_secondary_did_not_confirm_ships_nothing_more() {
    let group = GroupSpec::new("su", Mode::Async).volume("su-vol", 16 * MIB).link_timeout(Duration::from_secs(2));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("su");
    cluster.wait_pair("su", MINUTE);
    assert_eq!(write_blocks(&cluster, Site::A, "su-vol", 0..4, 0), 4);
    cluster.wait_drained("su");

    // The secondary is gone; the primary dials again (for up to 10 s, the
    // QUIC handshake's limit) and splits meanwhile; the secondary is back
    // before that dial gives up.
    cluster.kill9(Site::B);
    cluster.wait_until(Site::A, "su", "disconnected", MINUTE, |s| !s.connected);
    std::thread::sleep(Duration::from_millis(500));
    let out = cli_ok(&cluster, Site::A, &["pair", "split", "su"]);
    assert!(out.contains("not connected"), "{out}");
    cluster.start(Site::B);
    let shipped_nothing = |cluster: &Cluster, from: u64| {
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(write_blocks(cluster, Site::A, "su-vol", from..from + 4, 0), 4);
        std::thread::sleep(Duration::from_secs(3));
        let a = cluster.status(Site::A, "su");
        assert_eq!((a.reason.as_deref(), a.connected), (Some("split"), false), "{a:?}");
        let b = cluster.status(Site::B, "su");
        assert!(b.applied_seq < a.last_seq, "the split primary shipped its new writes: {b:?}\n{a:?}");
    };
    shipped_nothing(&cluster, 4);
    cli_ok(&cluster, Site::A, &["pair", "resync", "su"]);
    cluster.wait_pair("su", MINUTE);
    cluster.wait_drained("su");

    cluster.signal(Site::B, Signal::SIGSTOP);
    let out = cli_ok(&cluster, Site::A, &["pair", "split", "su", "--rw"]);
    cluster.signal(Site::B, Signal::SIGCONT);
    assert!(out.contains("did not confirm") && out.contains("pair split su --rw"), "{out}");
    shipped_nothing(&cluster, 8);
    cli_ok(&cluster, Site::A, &["pair", "resync", "su"]);
    cluster.wait_pair("su", MINUTE);
    cluster.assert_converged("su");
}
