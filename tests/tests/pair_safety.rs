//! Unsafe admin paths found in review (issue 7 items 3, 4, 6, 7, 8, 9), each
//! through the real CLI and real daemons:
//!
//! - `pair delete` on a connected secondary ends the pair on both sites, and
//!   no applier writes into the volume once it is standalone;
//! - `pair delete` then at once `pair create --wait` completes (it stalled);
//!   `pair create --wait` fails at once on a permanent refusal, and gives up
//!   after `--timeout`, even on a daemon that stops answering;
//! - a cut-off secondary never claims PAIR: it says since when no session is
//!   up and how old its data is, and `status` exits non-zero;
//! - a former primary that comes back after its secondary left the pair
//!   (and was written) stops presenting itself as a replicated primary;
//! - a standalone group never becomes secondary without local consent, nor
//!   while NBD clients have its volumes attached;
//! - a state file whose role does not parse stops the daemon from starting
//!   (with one group; with more, that group stays down and the others run).

use std::process::Command;
use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::random_bytes;
use replicator_tests::{describe_output, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Runs the CLI and returns (exit code, stdout + stderr).
fn cli(cluster: &Cluster, site: Site, args: &[&str]) -> (i32, String) {
    let out = cluster.cli(site, args);
    (out.status.code().unwrap_or(-1), describe_output(&out))
}

async fn write_blocks(client: &NbdClient, seed: u64, count: u64, at: u64) {
    for i in 0..count {
        client.write(at + i * 65536, &random_bytes(seed + i, 65536), false).await.expect("write");
    }
    client.flush().await.expect("flush");
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).expect("read volume")
}

#[test]
fn pair_delete_on_a_connected_secondary_ends_the_pair_on_both_sites() {
    let group = GroupSpec::new("pd", Mode::Async).volume("pd-vol", 16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("pd");
    cluster.wait_pair("pd", Duration::from_secs(60));
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "pd-vol")).expect("connect");
    rt.block_on(write_blocks(&client, 1, 64, 0));
    cluster.wait_drained("pd");

    let (code, out) = cli(&cluster, Site::B, &["pair", "delete", "pd"]);
    assert_eq!(code, 0, "pair delete on the secondary: {out}\n{}", cluster.diagnostics());
    assert!(out.contains("both sites"), "the admin must learn the primary ended the pair too: {out}");
    let a = cluster.wait_state(Site::A, "pd", "SIMPLEX", Duration::from_secs(10));
    assert_eq!(a.role, "none", "{a:?}");
    assert!(
        cluster.log(Site::A).contains("the secondary ran pair delete"),
        "the primary must log why it is SIMPLEX now"
    );
    let b = cluster.status(Site::B, "pd");
    assert_eq!((b.state.as_str(), b.role.as_str()), ("SIMPLEX", "none"), "{b:?}");

    // The primary keeps writing; nothing reaches site-b's (now standalone)
    // volume any more, and site-b's own clients may write it.
    let before = sha(&cluster.volume_path(Site::B, "pd-vol"));
    rt.block_on(write_blocks(&client, 100, 64, 0));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        before == sha(&cluster.volume_path(Site::B, "pd-vol")),
        "an applier wrote into site-b's volume after the pair was deleted"
    );
    let b_client = rt
        .block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "pd-vol"))
        .expect("site-b's volume is exported");
    rt.block_on(write_blocks(&b_client, 200, 4, 0));
    drop((client, b_client));
    cluster.stop(Site::A);
    cluster.stop(Site::B);
}

/// Sync writes waiting for a secondary that stopped answering are written
/// here when `pair delete` makes the volumes standalone: they complete,
/// they do not fail (an I/O error there makes filesystems go read-only).
#[test]
fn pair_delete_completes_the_sync_writes_waiting_for_the_secondary() {
    let group = GroupSpec::new("dw", Mode::Sync).volume("dw-vol", 16 * MIB).link_timeout(Duration::from_secs(60));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("dw");
    cluster.wait_pair("dw", Duration::from_secs(60));
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "dw-vol")).expect("connect");
    cluster.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    let data = random_bytes(7, 65536);
    let expected = data.clone();
    // A write, a FUA write and a FLUSH, all waiting for the secondary.
    let writes = rt.spawn(async move {
        let (write, fua, flush) =
            tokio::join!(client.write(0, &data, false), client.write(65536, &data, true), client.flush());
        write.and(fua).and(flush)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!writes.is_finished(), "the sync writes must wait for the frozen secondary");

    let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "dw"]);
    assert_eq!(code, 0, "{out}");
    let written = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), writes).await });
    cluster.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    let written = written.expect("the writes still wait after pair delete").expect("the write task");
    assert!(written.is_ok(), "a write waiting for the secondary failed at pair delete: {written:?}");
    let volume = sha(&cluster.volume_path(Site::A, "dw-vol"));
    assert_eq!(&volume[..65536], &expected[..], "the first write is on the volume");
    assert_eq!(&volume[65536..131072], &expected[..], "the FUA write is on the volume");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
}

/// Both sites ran `pair create` (each while the other was down): neither
/// replicated as a pair, so meeting each other is no split brain. Both say
/// the other is a primary too (`peer-primary`); `pair delete` on one, as the
/// message says, lets the other's create proceed, and the pair works
/// (a FLUSH failed with EIO in the SPLIT-BRAIN this used to end in).
#[test]
fn two_pending_pair_creates_are_no_split_brain_and_a_delete_lets_one_proceed() {
    let group = GroupSpec::new("pp", Mode::Sync).volume("pp-vol", 16 * MIB);
    let mut opts = ClusterOpts::group(group);
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    cluster.start(Site::B);
    let (code, out) = cli(&cluster, Site::B, &["pair", "create", "pp"]);
    assert_eq!(code, 0, "{out}");
    cluster.stop(Site::B);
    cluster.start(Site::A);
    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "pp"]);
    assert_eq!(code, 0, "{out}");
    cluster.start(Site::B);
    for site in [Site::A, Site::B] {
        let s = cluster
            .wait_until(site, "pp", "told the peer is a primary too", Duration::from_secs(60), |s| s.refusal.is_some());
        assert_eq!(s.refusal.as_deref(), Some("peer-primary"), "{site}: {s:?}");
        assert_ne!(s.state, "SPLIT-BRAIN", "{site}: {s:?}");
        assert!(s.last_error.as_deref().unwrap_or("").contains("pair delete"), "{site}: {s:?}");
    }

    let (code, out) = cli(&cluster, Site::B, &["pair", "delete", "pp"]);
    assert_eq!(code, 0, "{out}");
    cluster.wait_pair("pp", Duration::from_secs(60));
    let b = cluster.status(Site::B, "pp");
    assert_eq!((b.role.as_str(), b.dirty_bytes), ("secondary", 0), "{b:?}");
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "pp-vol")).expect("connect");
    rt.block_on(write_blocks(&client, 11, 8, 0));
    drop(client);
    cluster.assert_converged("pp");
}

#[test]
fn pair_delete_then_create_at_once_completes_the_copy() {
    let group = GroupSpec::new("dc", Mode::Sync).volume("dc-vol", 16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("dc");
    cluster.wait_pair("dc", Duration::from_secs(60));
    for round in 0..3 {
        let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "dc"]);
        assert_eq!(code, 0, "round {round}: pair delete: {out}");
        assert!(out.contains("both sites"), "round {round}: the secondary must confirm the delete: {out}");
        let started = Instant::now();
        let (code, out) = cli(&cluster, Site::A, &["pair", "create", "dc", "--wait", "--timeout", "60s"]);
        assert_eq!(code, 0, "round {round}: pair create --wait right after a delete: {out}\n{}", cluster.diagnostics());
        println!("round {round}: delete + create --wait took {:?}", started.elapsed());
        let a = cluster.status(Site::A, "dc");
        assert_eq!((a.state.as_str(), a.connected), ("PAIR", true), "round {round}: {a:?}");
        cluster.wait_state(Site::B, "dc", "PAIR", Duration::from_secs(10));
    }
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("dc");
}

/// Two `pair create` at once (two admins, a retried script): one pairs, the
/// other is refused, and the journal the group runs on is the one on disk
/// (the refused one had rewritten it with its own pair id: the next start
/// found a foreign journal and the group did not start).
#[test]
fn two_pair_creates_at_once_leave_one_pair_and_a_journal_that_opens() {
    let group = GroupSpec::new("cc", Mode::Async).volume("cc-vol", 16 * MIB).journal_size(256 * MIB);
    let mut opts = ClusterOpts::group(group);
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    cluster.start(Site::A);
    for round in 0..3 {
        let (first, second) = std::thread::scope(|scope| {
            let a = scope.spawn(|| cli(&cluster, Site::A, &["pair", "create", "cc", "--nocopy"]));
            let b = scope.spawn(|| cli(&cluster, Site::A, &["pair", "create", "cc", "--nocopy"]));
            (a.join().expect("first"), b.join().expect("second"))
        });
        let mut codes = [first.0, second.0];
        codes.sort_unstable();
        assert_eq!(codes, [0, 3], "round {round}: one pairs, one is refused:\n{}\n{}", first.1, second.1);
        cluster.stop(Site::A);
        cluster.start(Site::A);
        let s = cluster.status(Site::A, "cc");
        assert_eq!(s.role, "primary", "round {round}: {s:?}\n{}", cluster.diagnostics());
        let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "cc"]);
        assert_eq!(code, 0, "round {round}: {out}");
    }
    cluster.stop(Site::A);
}

#[test]
fn pair_create_wait_fails_at_once_on_a_permanent_refusal() {
    // site-b has a different volume size: the peer refuses for good.
    let group = GroupSpec::new("pr", Mode::Async).volume("pr-vol", 16 * MIB);
    let mut opts = ClusterOpts::group(group);
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    let path = cluster.config_path(Site::B).to_path_buf();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace(&format!("size = \"{}\"", 16 * MIB), &format!("size = \"{}\"", 32 * MIB)))
        .expect("config");
    cluster.start(Site::A);
    cluster.start(Site::B);
    let started = Instant::now();
    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "pr", "--wait"]);
    assert_eq!(code, 1, "pair create --wait against a mismatched peer must fail: {out}");
    assert!(out.contains("volumes differ"), "the peer's reason must be shown: {out}");
    assert!(out.contains("`replicator pair delete pr` here withdraws it"), "how to withdraw the create: {out}");
    assert!(started.elapsed() < Duration::from_secs(30), "it must fail at once, not after {:?}", started.elapsed());
    let s = cluster.status(Site::A, "pr");
    assert_eq!(s.refusal.as_deref(), Some("config"), "{s:?}");

    // --timeout bounds a wait for a peer that is simply not there.
    let (code, _) = cli(&cluster, Site::A, &["pair", "delete", "pr"]);
    assert_eq!(code, 0);
    cluster.stop(Site::B);
    let started = Instant::now();
    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "pr", "--wait", "--timeout", "3s"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not PAIR after"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());

    // ... and a wait on a daemon that stops answering (frozen once it took
    // the command): each status poll is bounded by what is left of it.
    let (code, _) = cli(&cluster, Site::A, &["pair", "delete", "pr"]);
    assert_eq!(code, 0);
    let mut child = Command::new(cluster.bin())
        .arg("--config")
        .arg(cluster.config_path(Site::A))
        .args(["pair", "create", "pr", "--wait", "--timeout", "6s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the CLI");
    let started = Instant::now();
    let mut first = String::new();
    // Kept open to the end: a progress line the CLI prints before the
    // freeze must not meet a closed pipe (SIGPIPE, exit 141).
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("read the CLI's output");
    assert!(first.contains("pr"), "pair create must be answered first: {first:?}");
    cluster.signal(Site::A, nix::sys::signal::Signal::SIGSTOP);
    while child.try_wait().expect("the CLI's status").is_none() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = started.elapsed();
    cluster.signal(Site::A, nix::sys::signal::Signal::SIGCONT);
    if waited >= Duration::from_secs(60) {
        let _ = child.kill();
        panic!("the CLI was still waiting on a frozen daemon after 60 s");
    }
    let out = child.wait_with_output().expect("the CLI's exit");
    drop(stdout);
    let text = describe_output(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("did not answer `status`"), "{text}");
    assert!(waited < Duration::from_secs(20), "the wait must end near its --timeout, not after {waited:?}");
    cluster.stop(Site::A);
}

/// An idle, healthy pair: the primary keeps hearing from the secondary
/// (its last ack repeated every 5 s), so "peer last heard" tells it from a
/// secondary that stopped answering: it named the session's start, ever
/// older, and a frozen secondary looked the same.
#[test]
fn an_idle_primary_keeps_hearing_from_its_secondary() {
    let group = GroupSpec::new("ka", Mode::Async).volume("ka-vol", 16 * MIB);
    let cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("ka");
    cluster.wait_pair("ka", Duration::from_secs(60));
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let started = Instant::now();
    let mut worst = 0;
    while started.elapsed() < Duration::from_secs(14) {
        let a = cluster.status(Site::A, "ka");
        let heard = a.peer_contact_unix.unwrap_or_else(|| panic!("never heard from the peer: {a:?}"));
        worst = worst.max(unix_now().saturating_sub(heard));
        std::thread::sleep(Duration::from_millis(500));
    }
    // 5 s between acks, rounding to whole seconds, a busy machine.
    assert!(worst <= 8, "the primary last heard from its idle secondary {worst} s before");
    let log = cluster.log(Site::B);
    assert_eq!(log.matches("replication session up").count(), 1, "one session throughout:\n{log}");
    // A frozen secondary: the time grows.
    cluster.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(10));
    let a = cluster.status(Site::A, "ka");
    cluster.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    let heard = a.peer_contact_unix.unwrap_or_default();
    assert!(unix_now().saturating_sub(heard) >= 9, "heard from a frozen secondary: {a:?}");
}

#[test]
fn a_cut_off_secondary_never_claims_pair_and_status_exits_non_zero() {
    let group = GroupSpec::new("co", Mode::Async).volume("co-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("co");
    cluster.wait_pair("co", Duration::from_secs(60));
    let (code, out) = cli(&cluster, Site::B, &["status", "co"]);
    assert_eq!(code, 0, "a healthy pair: status exits 0: {out}");
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "co-vol")).expect("connect");
    let before_writes =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    rt.block_on(write_blocks(&client, 1, 16, 0));
    cluster.wait_drained("co");
    drop(client);

    cluster.kill9(Site::A);
    let b = cluster.wait_until(Site::B, "co", "showing the lost session", Duration::from_secs(10), |s| !s.connected);
    assert_ne!(b.state, "PAIR", "a secondary without a live session must not claim PAIR: {b:?}");
    assert_eq!(b.health, "degraded", "{b:?}");
    assert!(b.disconnected_since_unix.is_some(), "status must say since when no session is up: {b:?}");
    // The checkpoint carrying "data as of" is persisted at least every 500 ms.
    let as_of = b.data_as_of_unix.unwrap_or_default();
    assert!(as_of >= before_writes - 1.0, "data as of must name the primary's time of the newest write: {b:?}");
    let (code, out) = cli(&cluster, Site::B, &["status", "co"]);
    assert_eq!(code, 4, "status must exit 4 (degraded) on a cut-off secondary: {out}");
    assert!(out.contains("NOT CONNECTED since") && out.contains("data as of"), "{out}");
    // After a restart of the secondary too: still not PAIR until a session is up.
    cluster.stop(Site::B);
    cluster.start(Site::B);
    let b = cluster.status(Site::B, "co");
    assert_ne!(b.state, "PAIR", "{b:?}");
    cluster.start(Site::A);
    cluster.wait_pair("co", Duration::from_secs(60));
    cluster.stop(Site::A);
    cluster.stop(Site::B);
}

#[test]
fn a_former_primary_learns_its_secondary_left_and_was_written() {
    let group = GroupSpec::new("sb", Mode::Sync).volume("sb-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sb");
    cluster.wait_pair("sb", Duration::from_secs(60));
    cluster.kill9(Site::A);
    // Takeover by hand on site-b: leave the pair, write.
    cluster.wait_until(Site::B, "sb", "without a session", Duration::from_secs(10), |s| !s.connected);
    let (code, out) = cli(&cluster, Site::B, &["pair", "delete", "sb"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("run `replicator pair delete sb` there too"), "{out}");
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "sb-vol")).expect("connect");
    rt.block_on(write_blocks(&client, 9, 4, 0));
    drop(client);

    cluster.start(Site::A);
    let a = cluster.wait_state(Site::A, "sb", "SPLIT-BRAIN", Duration::from_secs(30));
    assert_eq!(a.refusal.as_deref(), Some("split-brain"), "{a:?}");
    assert_eq!(a.health, "critical", "{a:?}");
    assert!(a.last_error.as_deref().unwrap_or("").contains("written since"), "{a:?}");
    let (code, out) = cli(&cluster, Site::A, &["status", "sb"]);
    assert_eq!(code, 5, "status must exit 5 (critical) on split brain: {out}");
    // Restarting does not make it forget.
    cluster.stop(Site::A);
    cluster.start(Site::A);
    let a = cluster.status(Site::A, "sb");
    assert_eq!(a.state, "SPLIT-BRAIN", "{a:?}");
    // No pair to rejoin: failback and --discard-local name the way out,
    // and change nothing.
    for args in [&["failback", "sb"][..], &["pair", "resync", "sb", "--discard-local"]] {
        let (code, out) = cli(&cluster, Site::A, args);
        assert_eq!(code, 3, "{args:?}: {out}");
        assert!(out.contains("pair delete sb` here"), "{args:?}: {out}");
    }
    assert_eq!(cluster.status(Site::A, "sb").state, "SPLIT-BRAIN");
    // The runbook's way out, keeping site-a's data: the pair ends where it
    // is still held (site-a), then site-a creates a new one (a full copy).
    let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "sb"]);
    assert_eq!(code, 0, "pair delete on the site still paired: {out}");
    let (code, out) = cli(&cluster, Site::B, &["pair", "delete", "sb"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to delete"), "{out}");
    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "sb", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "pair create from the keeper: {out}\n{}", cluster.diagnostics());
    cluster.assert_converged("sb");
}

#[test]
fn a_former_primary_learns_its_secondary_left_the_pair() {
    let group = GroupSpec::new("lp", Mode::Async).volume("lp-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("lp");
    cluster.wait_pair("lp", Duration::from_secs(60));
    cluster.stop(Site::A);
    let (code, out) = cli(&cluster, Site::B, &["pair", "delete", "lp"]);
    assert_eq!(code, 0, "{out}");
    cluster.start(Site::A);
    let a = cluster.wait_until(Site::A, "lp", "told the peer left", Duration::from_secs(30), |s| s.refusal.is_some());
    assert_eq!(a.refusal.as_deref(), Some("not-paired"), "{a:?}");
    assert_eq!((a.state.as_str(), a.reason.as_deref()), ("SUSPENDED", Some("error")), "{a:?}");
    assert!(cluster.log(Site::A).contains("replication stopped"), "the primary must log that it stopped replicating");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
}

/// The mirror image: the primary runs `pair delete` while its secondary is
/// down. A primary out of the pair never dials again, so the secondary
/// asks it (after 10 s without a session) and says the pair is gone, with
/// what to run, instead of waiting in SUSPENDED(link) for ever; `pair
/// delete` there then makes its volumes standalone (a failover is refused,
/// naming it).
#[test]
fn a_secondary_learns_its_primary_left_the_pair_while_it_was_down() {
    let group = GroupSpec::new("ls", Mode::Async).volume("ls-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("ls");
    cluster.wait_pair("ls", Duration::from_secs(60));
    cluster.stop(Site::B);
    let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "ls"]);
    assert_eq!(code, 0, "{out}");
    cluster.start(Site::B);
    let b =
        cluster.wait_until(Site::B, "ls", "told the primary left", Duration::from_secs(60), |s| s.refusal.is_some());
    assert_eq!(b.refusal.as_deref(), Some("not-paired"), "{b:?}");
    assert_eq!(
        (b.state.as_str(), b.reason.as_deref(), b.role.as_str()),
        ("SUSPENDED", Some("error"), "secondary"),
        "{b:?}"
    );
    let error = b.last_error.clone().unwrap_or_default();
    assert!(error.contains("left this pair") && error.contains("pair delete ls"), "{error}");
    let (code, out) = cli(&cluster, Site::B, &["status", "ls"]);
    assert_ne!(code, 0, "status must not exit 0 with the pair gone: {out}");
    assert!(out.contains("pair delete ls"), "status must say what to run: {out}");
    let (code, out) = cli(&cluster, Site::B, &["failover", "ls"]);
    assert_eq!(code, 3, "a failover into a pair the primary left must be refused: {out}");
    assert!(out.contains("pair delete ls") && out.contains("--force"), "{out}");
    // What the primary said outlives a restart of this node, with the
    // primary out of reach by then (asked again, it could not answer).
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.start(Site::B);
    let b = cluster.status(Site::B, "ls");
    assert_eq!((b.state.as_str(), b.refusal.as_deref()), ("SUSPENDED", Some("not-paired")), "{b:?}");
    assert!(b.last_error.as_deref().unwrap_or_default().contains("pair delete ls"), "{b:?}");
    let (code, out) = cli(&cluster, Site::B, &["failover", "ls"]);
    assert_eq!(code, 3, "after a restart, a failover into a pair the primary left must be refused: {out}");
    cluster.start(Site::A);

    let (code, out) = cli(&cluster, Site::B, &["pair", "delete", "ls"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("had left the pair already") && !out.contains("there too"), "{out}");
    let b = cluster.status(Site::B, "ls");
    assert_eq!((b.state.as_str(), b.role.as_str(), b.refusal.as_deref()), ("SIMPLEX", "none", None), "{b:?}");
    assert_eq!(b.last_error, None, "the pair's end leaves no error to act on: {b:?}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
}

#[test]
fn a_standalone_group_never_becomes_secondary_without_consent_or_while_in_use() {
    let group = GroupSpec::new("nc", Mode::Async).volume("nc-vol", 16 * MIB).without_consent();
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    let rt = runtime();
    // site-b's own data, written by its own client.
    let b_client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "nc-vol")).expect("connect");
    rt.block_on(write_blocks(&b_client, 5, 16, 0));
    let before = sha(&cluster.volume_path(Site::B, "nc-vol"));
    drop(b_client);

    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "nc", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("accept_pair_create"), "the refusal must name the setting: {out}");
    let b = cluster.status(Site::B, "nc");
    assert_eq!((b.state.as_str(), b.role.as_str()), ("SIMPLEX", "none"), "{b:?}");
    // The refusing site says why too.
    assert!(
        b.last_error.as_deref().is_some_and(|e| e.contains("site-a's") && e.contains("accept_pair_create")),
        "{b:?}"
    );
    assert!(before == sha(&cluster.volume_path(Site::B, "nc-vol")), "site-b's data changed without consent");
    let (code, _) = cli(&cluster, Site::A, &["pair", "delete", "nc"]);
    assert_eq!(code, 0);

    // Consent given by a reload (SIGHUP), without restarting site-b's
    // daemon; but a client attached on site-b: refused too.
    let pid = cluster.pid(Site::B);
    let path = cluster.config_path(Site::B).to_path_buf();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace("accept_pair_create = false", "accept_pair_create = true")).expect("config");
    cluster.signal(Site::B, nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reloaded = loop {
        let log = cluster.log(Site::B);
        if let Some(line) = log.lines().find(|l| l.contains("SIGHUP: reloaded")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no reload line in site-b's log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(reloaded.contains("accept_pair_create = true for group nc"), "{reloaded}");
    assert!(!reloaded.contains("applied only at restart"), "consent needs no restart: {reloaded}");
    assert!(cluster.is_running(Site::B), "site-b's daemon still runs");
    assert_eq!(cluster.pid(Site::B), pid, "site-b's daemon was not restarted");
    let b_client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::B), "nc-vol")).expect("connect");
    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "nc", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NBD client"), "{out}");
    assert!(before == sha(&cluster.volume_path(Site::B, "nc-vol")), "site-b's data changed while in use");
    rt.block_on(b_client.disconnect()).expect("disconnect");
    // Detached: the pair forms (the primary keeps retrying).
    cluster.wait_pair("nc", Duration::from_secs(60));
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("nc");
}

#[test]
fn a_state_file_whose_role_does_not_parse_stops_the_daemon() {
    let group = GroupSpec::new("cs", Mode::Async).volume("cs-vol", 8 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("cs");
    cluster.wait_pair("cs", Duration::from_secs(60));
    cluster.stop(Site::B);
    let state = cluster.root().join("site-b/state/groups/cs/state.json");
    let text = std::fs::read_to_string(&state).expect("state file");
    assert!(text.contains("\"secondary\""), "{text}");
    std::fs::write(&state, text.replace("\"secondary\"", "\"secondry\"")).expect("corrupt the state");
    let out = run_with_timeout(
        Command::new(cluster.bin())
            .arg("--config")
            .arg(cluster.config_path(Site::B))
            .arg("run")
            .env("RUST_LOG", "info"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "the daemon must refuse to start on a corrupt state file");
    let text = describe_output(&out);
    assert!(text.contains("corrupt state file") && text.contains("state.json"), "{text}");
    cluster.stop(Site::A);
}

/// A group that cannot be opened at start (here its state file does not
/// parse) stays down while the daemon's other groups run: `status` shows it
/// FAILED with the reason (exit 5), commands on it and NBD clients of its
/// volumes get that reason, and the peer's sessions for it are refused with
/// it. With the cause fixed and the daemon restarted, its pair resumes.
#[test]
fn a_group_that_cannot_open_stays_down_while_the_others_run() {
    let good = GroupSpec::new("up", Mode::Async).volume("up-vol", 8 * MIB);
    let bad = GroupSpec::new("dn", Mode::Async).volume("dn-vol", 8 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::new(vec![good, bad]));
    for g in ["up", "dn"] {
        cluster.pair_create(g);
        cluster.wait_pair(g, Duration::from_secs(60));
    }
    cluster.stop(Site::A);
    let state = cluster.root().join("site-a/state/groups/dn/state.json");
    let text = std::fs::read_to_string(&state).expect("state file");
    std::fs::write(&state, text.replace("\"primary\"", "\"primry\"")).expect("corrupt the state");
    cluster.start(Site::A);

    let (code, out) = cli(&cluster, Site::A, &["status"]);
    assert_eq!(code, 5, "a group down is critical: {out}");
    assert!(out.contains("group dn") && out.contains("FAILED") && out.contains("corrupt state file"), "{out}");
    let dn = cluster.status(Site::A, "dn");
    assert_eq!((dn.state.as_str(), dn.health.as_str()), ("FAILED", "critical"), "{dn:?}");
    let (code, out) = cli(&cluster, Site::A, &["pair", "split", "dn"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("did not open when the daemon started") && out.contains("restart"), "{out}");
    let rt = runtime();
    let refused = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "dn-vol"));
    let refused = refused.expect_err("the volume of a group that did not open is not served");
    assert!(refused.to_string().contains("did not open"), "{refused}");

    // The other group replicates as ever.
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "up-vol")).expect("connect");
    rt.block_on(write_blocks(&client, 10, 16, 0));
    drop(client);
    cluster.wait_drained("up");
    // Its secondary waits, a consistent replica (no session comes).
    let b = cluster.status(Site::B, "dn");
    assert_eq!((b.role.as_str(), b.consistent, b.connected), ("secondary", true, false), "{b:?}");
    assert!(cluster.log(Site::A).contains("NOT OPENED: dn"), "the start line names it");

    // Fixed and restarted: the pair resumes.
    cluster.stop(Site::A);
    std::fs::write(&state, text).expect("repair the state");
    cluster.start(Site::A);
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "dn-vol")).expect("connect");
    rt.block_on(write_blocks(&client, 20, 16, 0));
    drop(client);
    cluster.wait_drained("dn");

    // The secondary's group down: the primary's sessions are refused with
    // the reason, and resume once it is fixed.
    cluster.stop(Site::B);
    let state = cluster.root().join("site-b/state/groups/dn/state.json");
    let text = std::fs::read_to_string(&state).expect("state file");
    std::fs::write(&state, text.replace("\"secondary\"", "\"secondry\"")).expect("corrupt the state");
    cluster.start(Site::B);
    cluster.wait_until(Site::A, "dn", "refused: the group did not open", Duration::from_secs(60), |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("did not open when the daemon started"))
    });
    cluster.stop(Site::B);
    std::fs::write(&state, text).expect("repair the state");
    cluster.start(Site::B);
    cluster.wait_drained("dn");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("up");
    cluster.assert_volumes_identical("dn");
}

/// A paired group's volumes cannot change under it: records, dirty bitmaps
/// and the activity log name a volume by its place in the list, so a
/// volume added on both sites was taken for identical (never copied: PAIR,
/// lag 0, the sites differing there), and one removed or reordered had
/// records replayed or shipped into another. The daemon refuses to start,
/// naming the way out; with the list restored it starts and the pair
/// resumes.
#[test]
fn a_paired_groups_volumes_cannot_change_under_it() {
    let group = GroupSpec::new("vl", Mode::Async).volume("vl-a", 8 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("vl");
    cluster.wait_pair("vl", Duration::from_secs(60));
    cluster.stop(Site::A);
    let config = cluster.config_path(Site::A).to_path_buf();
    let before = std::fs::read_to_string(&config).expect("config");
    let added = format!(
        "{before}\n[[group.volume]]\nname = \"vl-b\"\npath = \"{}\"\nsize = \"8MiB\"\ncreate = true\n",
        cluster.root().join("vl-b.img").display()
    );
    std::fs::write(&config, added).expect("add a volume");
    let text = run_refused(&cluster, Site::A);
    assert!(text.contains("paired with volumes [vl-a]") && text.contains("[vl-a, vl-b]"), "{text}");
    assert!(text.contains("pair delete vl"), "the way out: {text}");
    assert!(!cluster.root().join("vl-b.img").exists(), "the refused volume was created: {text}");
    std::fs::write(&config, before).expect("restore the config");
    cluster.start(Site::A);
    cluster.assert_converged("vl");
}

/// `replicator run` on `site`'s configuration, expected to refuse to
/// start; its output.
fn run_refused(cluster: &Cluster, site: Site) -> String {
    let out = run_with_timeout(
        Command::new(cluster.bin()).arg("--config").arg(cluster.config_path(site)).arg("run").env("RUST_LOG", "info"),
        Duration::from_secs(30),
    );
    let text = describe_output(&out);
    assert!(!out.status.success(), "the daemon started: {text}");
    text
}

/// A paired group's volume at another path (a typo, a path changed with
/// `create = true`: a new empty file), or a paired group renamed in the
/// configuration (its volumes then served as a group of their own,
/// writable), are refused by `config check` and at start, before any file
/// is created. Found by an admin's try-out: both started, the first in
/// PAIR with lag 0 and RPO 0 over a new empty replica (a failover would
/// have promoted it), the second serving the replica writable and, renamed
/// back, resuming PAIR over what was written there.
#[test]
fn a_paired_groups_volume_path_and_group_name_cannot_change_under_it() {
    let group = GroupSpec::new("vp", Mode::Async).volume("vp-vol", 8 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("vp");
    cluster.wait_pair("vp", Duration::from_secs(60));
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "vp-vol")).expect("connect");
    rt.block_on(write_blocks(&client, 1, 16, 0));
    drop(client);
    cluster.wait_drained("vp");
    cluster.stop(Site::B);
    let config = cluster.config_path(Site::B).to_path_buf();
    let before = std::fs::read_to_string(&config).expect("config");
    let old_path = cluster.volume_path(Site::B, "vp-vol");
    let moved = cluster.root().join("vp-moved.img");
    let path_line = format!("path = \"{}\"", old_path.display());
    assert!(before.contains(&path_line), "{before}");
    std::fs::write(&config, before.replace(&path_line, &format!("path = \"{}\"", moved.display()))).expect("move");
    let (code, out) = cli(&cluster, Site::B, &["config", "check"]);
    assert_eq!(code, 2, "config check passed a moved paired volume: {out}");
    let text = run_refused(&cluster, Site::B);
    for text in [&out, &text] {
        assert!(text.contains("Restore the path") && text.contains(&moved.display().to_string()), "{text}");
    }
    assert!(!moved.exists(), "the moved path was created");
    // As the unit's ExecStartPre (`--startup`): a warning, the other
    // groups may run.
    let (code, out) = cli(&cluster, Site::B, &["config", "check", "--startup"]);
    assert!(code == 0 && out.contains("warning:") && out.contains("Restore the path"), "{out}");

    std::fs::write(&config, before.replace("name = \"vp\"\n", "name = \"vq\"\n")).expect("rename the group");
    let (code, out) = cli(&cluster, Site::B, &["config", "check"]);
    assert_eq!(code, 2, "config check passed a renamed paired group: {out}");
    let text = run_refused(&cluster, Site::B);
    for text in [&out, &text] {
        assert!(text.contains("of group vp, which is paired here (secondary)"), "{text}");
    }

    // The volume file gone from its path (a filesystem not mounted): not
    // made anew with `create = true`.
    std::fs::write(&config, &before).expect("restore the config");
    let away = cluster.root().join("vp-away.img");
    std::fs::rename(&old_path, &away).expect("move the volume away");
    let (code, out) = cli(&cluster, Site::B, &["config", "check"]);
    assert_eq!(code, 2, "config check passed a paired volume gone from its path: {out}");
    let text = run_refused(&cluster, Site::B);
    for text in [&out, &text] {
        assert!(text.contains("is missing") && text.contains("nothing is created in its place"), "{text}");
    }
    assert!(!old_path.exists(), "an empty volume was created in its place");
    std::fs::rename(&away, &old_path).expect("put the volume back");

    cluster.start(Site::B);
    cluster.assert_converged("vp");
}

/// The secondary accepted a new pair (its state saved) and stopped before
/// its restore journal was started over for it: the file still carries the
/// earlier pair's superblock. The restart starts it over (it holds nothing
/// of the new pair) instead of refusing to start the node.
#[test]
fn a_secondary_whose_restore_journal_is_still_the_earlier_pairs_starts() {
    let group = GroupSpec::new("rj", Mode::Async).volume("rj-vol", 16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("rj");
    cluster.wait_pair("rj", Duration::from_secs(60));
    let journal = cluster.state_dir(Site::B).join("groups/rj/journal");
    let earlier = cluster.root().join("earlier-pair-journal");
    cluster.stop(Site::B);
    std::fs::copy(&journal, &earlier).expect("keep the first pair's restore journal");
    cluster.start(Site::B);
    cluster.wait_drained("rj");
    let (code, out) = cli(&cluster, Site::A, &["pair", "delete", "rj"]);
    assert_eq!(code, 0, "pair delete: {out}");
    assert!(out.contains("both sites"), "the secondary must confirm the delete: {out}");
    let (code, out) = cli(&cluster, Site::A, &["pair", "create", "rj", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "pair create: {out}");
    let rt = runtime();
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "rj-vol").await.expect("connect");
        client.write(0, &random_bytes(77, 65536), false).await.expect("write");
        client.flush().await.expect("flush");
    });
    cluster.wait_drained("rj");
    cluster.stop(Site::B);
    std::fs::copy(&earlier, &journal).expect("put the first pair's restore journal back");
    let log_len = cluster.log(Site::B).len();
    cluster.start(Site::B);
    assert!(
        cluster.log(Site::B)[log_len..].contains("starting it over for pair"),
        "the restart must say it started the restore journal over\n{}",
        cluster.diagnostics()
    );
    cluster.wait_drained("rj");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "rj-vol").await.expect("connect");
        client.write(65536, &random_bytes(78, 65536), false).await.expect("write");
        client.flush().await.expect("flush");
    });
    cluster.assert_converged("rj");
}
