//! Link faults: the secondary daemon is frozen with SIGSTOP (its socket stays
//! bound, nothing answers: a partition as the primary sees it) while the
//! primary keeps writing, then thawed with SIGCONT.
//!
//! - async: the group suspends for `link` after `link_timeout`, resumes by
//!   itself from the secondary's checkpoint, and both sites end identical;
//! - async with a journal too small for what is written meanwhile: writes go
//!   to the dirty bitmap, and the resync copies only dirty regions;
//! - sync with `on_link_loss = "suspend"`: writes stall at most about
//!   `link_timeout`, are then acknowledged locally, and replicate after;
//!   on a slow link (bench's UDP proxy in between) the backlog is caught up
//!   without new writes waiting behind it, and RPO 0 is claimed only after.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use replicator::nbd_client::NbdClient;
use replicator_bench::proxy::{LinkSpec, UdpProxy};
use replicator_tests::pattern::Rng;
use replicator_tests::{describe_output, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

/// Writes `count` blocks of `block` bytes at pseudo-random aligned offsets.
async fn write_random(client: &NbdClient, seed: u64, count: usize, block: usize) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; block];
    let slots = client.size() / block as u64;
    for _ in 0..count {
        rng.fill(&mut buf);
        let off = rng.below(slots) * block as u64;
        client.write(off, &buf, false).await.expect("write");
    }
    client.flush().await.expect("flush");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[test]
fn async_link_loss_suspends_and_resumes_from_the_checkpoint() {
    let group = GroupSpec::new("ln", Mode::Async).volume("ln-vol", 32 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("ln");
    cluster.wait_pair("ln", Duration::from_secs(60));
    // The secondary shows the copy's progress as the primary counts it.
    cluster.wait_until(Site::B, "ln", "the copy's progress heard", Duration::from_secs(10), |s| {
        s.copy_total_bytes == 32 * MIB && s.copy_done_bytes == s.copy_total_bytes
    });
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "ln-vol")).expect("connect");
    rt.block_on(write_random(&client, 1, 200, 4096));
    cluster.wait_drained("ln");

    cluster.signal(Site::B, Signal::SIGSTOP);
    rt.block_on(write_random(&client, 2, 500, 4096));
    let s = cluster.wait_until(Site::A, "ln", "suspended for link", Duration::from_secs(30), |s| {
        s.state == "SUSPENDED" && s.reason.as_deref() == Some("link")
    });
    assert!(s.lag_records > 0, "records written while the secondary is frozen must be lagging: {s:?}");
    let log = cluster.log(Site::A);
    assert!(log.contains("pair state change") && log.contains("link"), "no state-change log line:\n{log}");
    // Writes keep being acknowledged while suspended.
    rt.block_on(write_random(&client, 3, 300, 4096));

    cluster.signal(Site::B, Signal::SIGCONT);
    cluster.wait_drained_within("ln", Duration::from_secs(90));
    rt.block_on(write_random(&client, 4, 100, 4096));
    cluster.wait_drained("ln");
    // What ended the frozen session is history once a new one runs (the
    // log keeps it), and the secondary hears the primary's state since.
    for site in [Site::A, Site::B] {
        let s = cluster.status(site, "ln");
        assert!(s.last_error.is_none() && s.connected, "{site}: {s:?}");
    }
    cluster.wait_until(Site::B, "ln", "the primary's state heard", Duration::from_secs(10), |s| {
        s.peer_state.as_deref() == Some("primary PAIR")
    });
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("ln");
}

#[test]
fn journal_full_tracks_dirty_regions_and_resyncs_only_them() {
    let group = GroupSpec::new("jf", Mode::Async)
        .volume("jf-vol", 128 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("jf");
    cluster.wait_pair("jf", Duration::from_secs(60));
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "jf-vol")).expect("connect");

    cluster.signal(Site::B, Signal::SIGSTOP);
    // 48 MiB of 1 MiB writes into the first 64 MiB: three times the journal.
    rt.block_on(async {
        let mut rng = Rng::new(7);
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..48u64 {
            rng.fill(&mut buf);
            client.write((i % 64) * MIB, &buf, false).await.expect("write while the journal is full");
        }
        client.flush().await.expect("flush");
    });
    let s = cluster.status(Site::A, "jf");
    assert_eq!(s.state, "SUSPENDED", "{s:?}");
    assert!(s.dirty_bytes > 0, "writes beyond the journal must be tracked in the bitmap: {s:?}");
    assert!(s.dirty_bytes <= 64 * MIB, "only written regions may be dirty: {s:?}");

    cluster.signal(Site::B, Signal::SIGCONT);
    let started = Instant::now();
    cluster.wait_until(Site::A, "jf", "PAIR with a clean bitmap", Duration::from_secs(120), |s| {
        s.state == "PAIR" && s.dirty_bytes == 0 && s.connected
    });
    cluster.wait_drained("jf");
    println!("resync after journal-full took {:?}", started.elapsed());
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("jf");
}

#[test]
fn sync_link_loss_stalls_writes_at_most_link_timeout_then_suspends() {
    let group = GroupSpec::new("sl", Mode::Sync)
        .volume("sl-vol", 32 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_link_loss = \"suspend\"");
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sl");
    cluster.wait_pair("sl", Duration::from_secs(60));
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sl-vol")).expect("connect");
    rt.block_on(write_random(&client, 11, 100, 4096));

    cluster.signal(Site::B, Signal::SIGSTOP);
    let t = Instant::now();
    rt.block_on(write_random(&client, 12, 50, 4096));
    let stalled = t.elapsed();
    assert!(stalled < Duration::from_secs(20), "sync writes stalled {stalled:?} with on_link_loss=suspend");
    let s = cluster.status(Site::A, "sl");
    assert_eq!((s.state.as_str(), s.reason.as_deref()), ("SUSPENDED", Some("link")), "{s:?}");

    cluster.signal(Site::B, Signal::SIGCONT);
    cluster.wait_drained_within("sl", Duration::from_secs(90));
    rt.block_on(write_random(&client, 13, 100, 4096));
    cluster.wait_drained("sl");
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sl");
}

/// The journal fills while the session stays up (the writes outrun a
/// 4 MB/s link): the writes beyond it go to the dirty bitmap, and the
/// resync that copies them runs in the same session. Its progress is that
/// copy's own: `copy_done_bytes` never passes `copy_total_bytes` (it went
/// on counting from the session's start against a total of 0 or of the
/// initial copy, and the ratio metric read 1 for the whole COPY).
#[test]
fn a_journal_full_resync_in_a_running_session_reports_its_own_progress() {
    let spec = GroupSpec::new("jp", Mode::Async)
        .volume("jp-vol", 64 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(2))
        .extra("on_journal_full = \"suspend\"");
    let (mut cluster, _proxy) = slow_link_pair(spec);
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "jp-vol")).expect("connect");
    // 40 MiB of 1 MiB writes into the first 32 MiB: the journal (16 MiB)
    // fills long before the link has shipped it.
    let writes_began = Instant::now();
    rt.block_on(async {
        let mut rng = Rng::new(11);
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..40u64 {
            rng.fill(&mut buf);
            client.write((i % 32) * MIB, &buf, false).await.expect("write while the journal is full");
        }
        client.flush().await.expect("flush");
    });
    let writes_ended = Instant::now();
    assert!(cluster.log(Site::A).contains("journal full"), "{}", cluster.diagnostics());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut copies_seen = 0;
    loop {
        let asked = Instant::now();
        let s = cluster.status(Site::A, "jp");
        // Until the resync completes the secondary lacks writes made by
        // the time the writes ended: the lag is at least that old, also
        // once the journal's records are applied and only the copy runs.
        let at_least = asked.duration_since(writes_ended).as_secs_f64();
        let at_most = Instant::now().duration_since(writes_began).as_secs_f64();
        if s.state == "COPY" || s.dirty_bytes > 0 {
            assert!(
                s.lag_seconds + 0.5 >= at_least && s.lag_seconds <= at_most + 0.5,
                "lag {:.3} s during the resync, the writes ended {at_least:.3} s ago: {s:?}",
                s.lag_seconds
            );
        }
        if s.state == "COPY" {
            copies_seen += 1;
            assert!(
                s.copy_done_bytes <= s.copy_total_bytes && s.copy_total_bytes <= 32 * MIB,
                "the resync's progress against its own regions: {s:?}"
            );
        }
        if s.state == "PAIR" && s.connected && s.dirty_bytes == 0 && s.lag_records == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no PAIR after the resync: {s:?}\n{}", cluster.diagnostics());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(copies_seen > 0, "the resync was never seen running");
    let s = cluster.status(Site::A, "jp");
    assert!(s.lag_seconds < 0.5, "the secondary has every write after the resync: {s:?}");
    let log = cluster.log(Site::A);
    let complete = log.lines().rev().find(|l| l.contains("copy complete")).expect("copy complete logged");
    let bytes: u64 = complete
        .split("bytes=")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count: {complete}"));
    assert!(bytes > 0 && bytes <= 32 * MIB, "the resync's own bytes: {complete}");
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("jp");
}

/// The one group of `spec` paired without a copy (`pair create --nocopy`),
/// its primary reaching the secondary through a 4 MB/s link (bench's UDP
/// proxy, kept alive by the caller).
fn slow_link_pair(spec: GroupSpec) -> (Cluster, UdpProxy) {
    let group = spec.name.clone();
    let (cluster, proxy) = slow_link(spec);
    cluster.pair_create_opts(&group, true);
    cluster.wait_pair(&group, Duration::from_secs(60));
    (cluster, proxy)
}

/// Both sites of `spec` running, not paired, site-a reaching site-b
/// through a 4 MB/s link (bench's UDP proxy, kept alive by the caller).
fn slow_link(spec: GroupSpec) -> (Cluster, UdpProxy) {
    let mut opts = ClusterOpts::group(spec);
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    let link = LinkSpec { bandwidth: Some(4_000_000), ..LinkSpec::rtt(Duration::from_millis(1)) };
    let proxy =
        UdpProxy::start(SocketAddr::from(([127, 0, 0, 1], cluster.peer_port(Site::B))), link).expect("slow link");
    cluster.route_peer_via(Site::A, proxy.addr().port());
    cluster.start(Site::A);
    cluster.start(Site::B);
    (cluster, proxy)
}

/// A sync pair (`link_timeout` 2 s, `on_link_loss = "suspend"`) of one
/// 32 MiB volume `<group>-vol` whose primary reaches the secondary through
/// a 4 MB/s link (bench's UDP proxy), in PAIR with RPO 0, and a client.
fn slow_link_sync_pair(group: &str, rt: &tokio::runtime::Runtime) -> (Cluster, UdpProxy, NbdClient) {
    let vol = format!("{group}-vol");
    let spec = GroupSpec::new(group, Mode::Sync)
        .volume(&vol, 32 * MIB)
        .link_timeout(Duration::from_secs(2))
        .extra("on_link_loss = \"suspend\"");
    let (cluster, proxy) = slow_link_pair(spec);
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol)).expect("connect");
    rt.block_on(write_random(&client, 21, 20, 4096));
    cluster.wait_until(Site::A, group, "RPO 0 in force", Duration::from_secs(30), |s| s.rpo_zero == Some(true));
    (cluster, proxy, client)
}

/// An outage of the slow link's pair: the secondary frozen, one write waits
/// `link_timeout`, the pair suspends, 24 MiB (about 6 s of the link) are
/// acknowledged locally; then the secondary thawed and the session back.
/// Returns the newest write of that backlog.
fn outage_with_a_backlog(cluster: &Cluster, group: &str, rt: &tokio::runtime::Runtime, client: &NbdClient) -> u64 {
    cluster.signal(Site::B, Signal::SIGSTOP);
    rt.block_on(write_random(client, 22, 1, 4096));
    let s = cluster.status(Site::A, group);
    assert_eq!((s.state.as_str(), s.reason.as_deref(), s.rpo_zero), ("SUSPENDED", Some("link"), Some(false)), "{s:?}");
    rt.block_on(write_random(client, 23, 384, 64 << 10));
    let backlog_end = cluster.status(Site::A, group).last_seq;
    cluster.signal(Site::B, Signal::SIGCONT);
    cluster
        .wait_until(Site::A, group, "the session back", Duration::from_secs(60), |s| s.state == "PAIR" && s.connected);
    backlog_end
}

/// How often the primary's log says a sync write's secondary did not
/// acknowledge it in time (each time the pair suspended for it).
fn ack_timeouts(cluster: &Cluster) -> usize {
    cluster.log(Site::A).matches("secondary did not acknowledge within link_timeout").count()
}

/// Sync mode after an outage: the writes acknowledged meanwhile reach the
/// secondary over a slow link ahead of anything newer. New writes must not
/// wait behind that backlog (it takes three times `link_timeout` to send):
/// they are acknowledged locally until it is nearly sent, the pair does not
/// suspend again, and `rpo_zero` stays false until the secondary has the
/// backlog.
#[test]
fn sync_catches_up_a_backlog_on_a_slow_link_without_suspending_again_or_claiming_rpo_zero_early() {
    let rt = runtime();
    let (mut cluster, _link, client) = slow_link_sync_pair("cu", &rt);
    let backlog_end = outage_with_a_backlog(&cluster, "cu", &rt, &client);

    // Writes go on while the backlog is sent; RPO 0 is never claimed while
    // the secondary is still far from having it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut writes, mut slowest, mut checked) = (0u64, Duration::ZERO, 0u32);
    loop {
        let a = cluster.status(Site::A, "cu");
        let b = cluster.status(Site::B, "cu");
        if b.applied_seq + 100 < backlog_end {
            assert_eq!(
                a.rpo_zero,
                Some(false),
                "RPO 0 claimed with the secondary at {} of {backlog_end}: {a:?}",
                b.applied_seq
            );
            // Not protected yet: PAIR, but not healthy (it said ok).
            assert_eq!(a.health, "degraded", "{a:?}");
            checked += 1;
        } else if a.rpo_zero == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "RPO 0 not back after 120 s: {a:?}\n{}", cluster.diagnostics());
        let t = Instant::now();
        rt.block_on(write_random(&client, 100 + writes, 1, 4096));
        slowest = slowest.max(t.elapsed());
        writes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{writes} writes while catching up, the slowest {slowest:?}; RPO 0 checked false {checked} times");
    assert!(checked > 0, "the backlog was gone before it could be checked");
    assert_eq!(ack_timeouts(&cluster), 1, "the pair suspended again while catching up:\n{}", cluster.log(Site::A));

    cluster.wait_drained("cu");
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("cu");
}

/// A secondary that stops receiving while the primary catches up (frozen
/// again) is not caught up with for ever, writes acknowledged locally while
/// the pair says PAIR: after `link_timeout` without progress writes wait
/// for it, and the pair suspends (after `link_timeout` more without
/// progress, or at the QUIC connection's 5-s idle timeout, whichever comes
/// first on a loaded machine). Then it resumes.
#[test]
fn sync_catch_up_with_a_secondary_that_stops_receiving_suspends_the_pair() {
    let rt = runtime();
    let (mut cluster, _link, client) = slow_link_sync_pair("cs", &rt);
    let backlog_end = outage_with_a_backlog(&cluster, "cs", &rt, &client);
    let applied = cluster.status(Site::B, "cs").applied_seq;
    cluster.signal(Site::B, Signal::SIGSTOP);
    assert!(applied + 100 < backlog_end, "the backlog went faster than the link: {applied} of {backlog_end}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut writes = 0u64;
    loop {
        let t = Instant::now();
        rt.block_on(write_random(&client, 200 + writes, 1, 4096));
        writes += 1;
        let took = t.elapsed();
        assert!(took < Duration::from_secs(20), "a write waited {took:?} for a frozen secondary");
        let s = cluster.status(Site::A, "cs");
        assert_eq!(s.rpo_zero, Some(false), "{s:?}");
        if s.state == "SUSPENDED" {
            assert_eq!(s.reason.as_deref(), Some("link"), "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still {s:?} 30 s after the secondary stopped receiving");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The stall check made the writes wait (whichever then suspended the
    // pair first: the wait, or the connection's idle timeout).
    let log = cluster.log(Site::A);
    assert!(log.contains("received nothing for link_timeout while catching up"), "{log}");
    println!("suspended after {writes} writes, {} time(s) for a write not acknowledged", ack_timeouts(&cluster));

    cluster.signal(Site::B, Signal::SIGCONT);
    cluster.wait_until(Site::A, "cs", "RPO 0 back", Duration::from_secs(120), |s| s.rpo_zero == Some(true));
    cluster.wait_drained("cs");
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("cs");
}

#[test]
fn kill9_while_tracking_dirty_regions_resyncs_only_the_dirty_regions() {
    let group = GroupSpec::new("kb", Mode::Async)
        .volume("kb-vol", 128 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("kb");
    cluster.wait_pair("kb", Duration::from_secs(60));
    let rt = runtime();

    cluster.signal(Site::B, Signal::SIGSTOP);
    // The newest acknowledged bytes of each MiB: the last 8 writes land,
    // in bitmap mode, on MiBs first written while still journaled.
    let mut newest = vec![Vec::new(); 32];
    let dirty_before = {
        let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "kb-vol")).expect("connect");
        rt.block_on(async {
            let mut rng = Rng::new(9);
            let mut buf = vec![0u8; MIB as usize];
            for i in 0..40u64 {
                rng.fill(&mut buf);
                client.write((i % 32) * MIB, &buf, false).await.expect("write");
                newest[(i % 32) as usize] = buf.clone();
            }
        });
        let s = cluster.status(Site::A, "kb");
        assert!(s.dirty_bytes > 0, "the journal should have overflowed into the bitmap: {s:?}");
        s.dirty_bytes
    };
    // Acknowledged writes only ever land after the bitmap naming their
    // regions is on disk, so a kill -9 must not widen the resync: the
    // journal's records on MiBs no bitmap-mode write touched are replayed,
    // those on the others are within the dirty regions already.
    assert!(dirty_before < 32 * MIB, "some journaled MiBs were not written again in bitmap mode");
    cluster.kill9(Site::A);
    cluster.start(Site::A);
    let s = cluster.status(Site::A, "kb");
    assert_eq!(
        s.dirty_bytes, dirty_before,
        "after kill -9 the resync must cover only the regions written in bitmap mode"
    );
    cluster.signal(Site::B, Signal::SIGCONT);
    cluster.wait_until(Site::A, "kb", "PAIR with a clean bitmap", Duration::from_secs(120), |s| {
        s.state == "PAIR" && s.dirty_bytes == 0 && s.connected
    });
    cluster.assert_converged("kb");
    // The journal replay after the kill must not have undone the writes
    // made in bitmap mode over journaled ones.
    let image = std::fs::read(cluster.volume_path(Site::A, "kb-vol")).expect("read the primary's volume");
    for (m, want) in newest.iter().enumerate() {
        let got = &image[m * MIB as usize..(m + 1) * MIB as usize];
        assert!(got == &want[..], "MiB {m} does not hold its newest acknowledged write");
    }
}

/// Sync with `on_link_loss = "block"`: while the link is lost, writes wait
/// for it, including those that find the journal full. They were tracked in
/// the dirty bitmap and acknowledged without the secondary (the journal-full
/// policy took over from the link-loss one), which a failover then lost.
#[test]
fn sync_block_keeps_writes_waiting_when_the_journal_fills_without_the_link() {
    let group = GroupSpec::new("sb", Mode::Sync)
        .volume("sb-vol", 64 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_link_loss = \"block\"");
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sb");
    cluster.wait_pair("sb", Duration::from_secs(60));
    let rt = runtime();
    let client = std::sync::Arc::new(
        rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sb-vol")).expect("connect"),
    );
    rt.block_on(write_random(&client, 21, 16, 4096));

    cluster.signal(Site::B, Signal::SIGSTOP);
    // Twice the journal at once: half of it cannot be journaled.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writes: Vec<_> = (0..32u64)
        .map(|i| {
            let (client, acked) = (client.clone(), acked.clone());
            rt.spawn(async move {
                let data = replicator_tests::pattern::random_bytes(2200 + i, MIB as usize);
                client.write(i * MIB, &data, false).await.expect("write");
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    cluster.wait_state(Site::A, "sb", "SUSPENDED", Duration::from_secs(30));
    // Well past link_timeout: a write that went to the bitmap would be
    // acknowledged by now.
    std::thread::sleep(Duration::from_secs(3));
    let s = cluster.status(Site::A, "sb");
    assert_eq!(
        acked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "writes acknowledged without the secondary under on_link_loss = block: {s:?}\n{}",
        cluster.diagnostics()
    );
    assert_eq!((s.reason.as_deref(), s.dirty_bytes), (Some("link"), 0), "{s:?}");
    assert!(!cluster.log(Site::A).contains("journal full"), "{}", cluster.diagnostics());

    cluster.signal(Site::B, Signal::SIGCONT);
    for w in writes {
        rt.block_on(w).expect("writer");
    }
    cluster.wait_drained_within("sb", Duration::from_secs(90));
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sb");
}

/// A primary restarted while its peer is away still knows what the peer
/// has: the journal is freed only below the secondary's checkpoint, so
/// status (and the metrics drawn from it) show the writes since, not every
/// write since the pair began as lag.
#[test]
fn a_primary_restarted_without_its_peer_reports_the_lag_it_has() {
    let group = GroupSpec::new("rl", Mode::Async).volume("rl-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("rl");
    cluster.wait_pair("rl", Duration::from_secs(60));
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "rl-vol")).expect("connect");
    rt.block_on(write_random(&client, 1, 200, 4096));
    cluster.wait_drained("rl");
    // Every record freed: the secondary's checkpoint is past the last one.
    let freed = cluster.wait_until(Site::A, "rl", "journal freed", Duration::from_secs(60), |s| {
        s.journal_used_bytes == 0 && s.last_seq >= 200
    });
    drop(client);
    cluster.stop(Site::B);
    cluster.stop(Site::A);
    cluster.start(Site::A);

    let s = cluster.status(Site::A, "rl");
    assert!(!s.connected, "the peer is stopped: {s:?}");
    assert_eq!(s.last_seq, freed.last_seq, "{s:?}");
    assert_eq!(
        (s.applied_seq, s.durable_seq, s.lag_records),
        (freed.last_seq, freed.last_seq, 0),
        "the secondary holds every write the journal freed: {s:?}"
    );
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "rl-vol")).expect("connect");
    rt.block_on(write_random(&client, 2, 10, 4096));
    let s = cluster.status(Site::A, "rl");
    assert_eq!(s.lag_records, 10, "the ten writes since are the lag: {s:?}");

    cluster.start(Site::B);
    cluster.wait_drained_within("rl", Duration::from_secs(90));
    drop(client);
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("rl");
}

/// Under `on_link_loss = "block"` a sync primary whose link is lost during
/// a copy is SUSPENDED(link) with the copy still owed: RPO 0 is not in
/// force, and its state file does not say that every acknowledged write is
/// on the secondary (it claimed both: a failover onto the secondary, then a
/// failback, would have discarded the regions still to copy as never
/// acknowledged).
#[test]
fn a_copy_cut_short_under_block_is_no_rpo_zero() {
    let spec = GroupSpec::new("cb", Mode::Sync)
        .volume("cb-vol", 32 * MIB)
        .link_timeout(Duration::from_secs(2))
        .extra("on_link_loss = \"block\"");
    let (mut cluster, _link) = slow_link(spec);
    // 16 MiB to copy: about 4 s of the link.
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "cb-vol")).expect("connect");
    rt.block_on(write_random(&client, 31, 256, 64 << 10));
    drop(client);
    cluster.pair_create("cb");
    cluster.wait_until(Site::A, "cb", "copying", Duration::from_secs(60), |s| s.state == "COPY" && s.connected);
    cluster.signal(Site::B, Signal::SIGSTOP);
    cluster.wait_until(Site::A, "cb", "the link lost", Duration::from_secs(60), |s| s.state == "SUSPENDED");
    std::thread::sleep(Duration::from_secs(1));
    let a = cluster.status(Site::A, "cb");
    assert_eq!((a.reason.as_deref(), a.rpo_zero), (Some("link"), Some(false)), "{a:?}");
    // Its writes hang until the secondary returns: status says so (it said
    // they were acknowledged without the secondary).
    assert!(a.writes_wait_for_secondary, "{a:?}");
    let out = describe_output(&cluster.cli(Site::A, &["status", "cb"]));
    assert!(out.contains("RPO 0 NOT IN FORCE") && out.contains("writes wait for the secondary"), "{out}");
    assert!(!out.contains("acknowledged without a consistent secondary"), "{out}");
    let state = std::fs::read_to_string(cluster.state_dir(Site::A).join("groups/cb/state.json")).expect("state file");
    assert!(!state.contains("\"acked_all_on_peer\": true"), "{state}");
    cluster.signal(Site::B, Signal::SIGCONT);
    cluster.wait_pair("cb", Duration::from_secs(120));
    cluster.assert_converged("cb");
}

/// The link to the secondary is cut while the primary runs on: a failover
/// there (without `--force`) asks the primary first, which answers as this
/// pair's live primary: refused, nothing changes (the same window opens
/// right after a switchover, before the new primary's session is up).
#[test]
fn a_failover_is_refused_while_the_primary_answers_without_a_session() {
    let spec = GroupSpec::new("lp", Mode::Sync).volume("lp-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let (cluster, proxy) = slow_link_pair(spec);
    // Site-a reaches site-b only through the proxy; site-b reaches site-a
    // directly.
    drop(proxy);
    cluster.wait_until(Site::B, "lp", "the session gone", Duration::from_secs(60), |s| !s.connected);
    let out = cluster.cli(Site::B, &["failover", "lp"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("answers as this pair's primary (primary ") && text.contains("failover lp --force"),
        "{text}"
    );
    let (a, b) = (cluster.status(Site::A, "lp"), cluster.status(Site::B, "lp"));
    assert_eq!((a.role.as_str(), a.writable, a.generation), ("primary", true, 1), "{a:?}");
    assert_eq!((b.role.as_str(), b.generation), ("secondary", 1), "{b:?}");
}

/// An async primary whose secondary lags (a slow link) is restarted in
/// sync mode: it catches up once the session is up, new writes
/// acknowledged locally while the backlog ships (as when a lost link comes
/// back), instead of each waiting behind the whole backlog (found by an
/// admin's try-out: on a slow link the first write waited 4 ×
/// `link_timeout`, the pair went SUSPENDED(link), then caught up).
#[test]
fn a_primary_restarted_in_sync_mode_with_a_backlog_catches_up_in_the_session() {
    let spec = GroupSpec::new("cr", Mode::Async).volume("cr-vol", 32 * MIB).link_timeout(Duration::from_secs(2));
    let (mut cluster, _proxy) = slow_link_pair(spec);
    let rt = runtime();
    let client = rt.block_on(NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "cr-vol")).expect("connect");
    // 12 MiB the secondary lacks: 3 s of the link.
    rt.block_on(write_random(&client, 22, 192, 64 << 10));
    drop(client);
    let a = cluster.status(Site::A, "cr");
    assert!(a.state == "PAIR" && a.lag_records > 0, "{a:?}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    for site in [Site::A, Site::B] {
        let path = cluster.config_path(site).to_path_buf();
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, text.replace("mode = \"async\"", "mode = \"sync\"")).expect("config");
    }
    cluster.start(Site::B);
    cluster.start(Site::A);
    cluster.wait_until(Site::A, "cr", "catching up, writes not waiting", Duration::from_secs(60), |s| {
        s.connected && s.rpo_zero == Some(false) && !s.writes_wait_for_secondary
    });
    cluster.wait_until(Site::A, "cr", "RPO 0", Duration::from_secs(60), |s| s.rpo_zero == Some(true));
    cluster.assert_converged("cr");
}

/// A secondary frozen (a paused VM) while the primary's acknowledgements of
/// its packets were on their way takes the whole pause for one round trip
/// once it resumes, and QUIC's idle timeout grows with that estimate (3 ×
/// the probe timeout: about a minute after a 17 s pause). With the primary
/// gone meanwhile, the secondary showed PAIR, connected and healthy for
/// that long (found by an admin's try-out, diagnosed by a helper). A
/// connection that receives nothing for the configured idle timeout is
/// closed whatever QUIC estimates.
#[test]
fn a_secondary_drops_a_dead_primarys_session_after_a_late_ack() {
    let group = GroupSpec::new("la", Mode::Async).volume("la-vol", 16 * MIB).link_timeout(Duration::from_secs(5));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("la");
    cluster.wait_pair("la", Duration::from_secs(60));
    // site-b's keep-alives go unanswered, then site-a acknowledges them
    // into site-b's socket while site-b is frozen, and dies.
    cluster.signal(Site::A, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(800));
    cluster.signal(Site::B, Signal::SIGSTOP);
    cluster.signal(Site::A, Signal::SIGCONT);
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill9(Site::A);
    // Thawed before its own idle timer ran out: the late acknowledgement
    // is taken first.
    std::thread::sleep(Duration::from_millis(3500));
    cluster.signal(Site::B, Signal::SIGCONT);
    let thawed = Instant::now();
    cluster.wait_until(Site::B, "la", "the dead primary's session ended", Duration::from_secs(60), |s| {
        !s.connected && s.state != "PAIR"
    });
    // The idle timeout is 5 s; QUIC's grown estimate kept it some 13 s.
    assert!(
        thawed.elapsed() < Duration::from_secs(9),
        "site-b kept a dead primary's session for {:?}",
        thawed.elapsed()
    );
}
