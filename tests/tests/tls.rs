//! Mutual TLS refusals, each with a log line that says why, and garbage on
//! the QUIC port.
//!
//! (a) site-b's certificate is issued by another CA;
//! (b) site-b runs as "site-c" with a valid certificate for site-c, while
//!     site-a expects "site-b" at that address;
//! (c) site-b's certificate has expired;
//! (d) plaintext UDP datagrams sent to site-a's QUIC port: dropped with a log
//!     line, the pair keeps working.
//!
//! In (a)-(c) `pair create` succeeds locally on site-a (roles are local), but
//! no session may come up: site-a stays not connected, site-b never becomes
//! secondary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::config::Config;
use replicator::nbd_client::NbdClient;
use replicator::transport::Transport;
use replicator_tests::pattern::random_bytes;
use replicator_tests::{CertKind, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

fn opts(cert: CertKind, b_name: &str) -> ClusterOpts {
    let mut o = ClusterOpts::group(GroupSpec::new("tls", Mode::Sync).volume("tls-vol", 16 * MIB));
    o.site_b_cert = cert;
    o.site_b_node_name = b_name.to_string();
    o
}

/// Lines of either log that contain every one of `all` and at least one of
/// `any`.
fn matching_lines(c: &Cluster, all: &[&str], any: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for site in [Site::A, Site::B] {
        for line in c.log(site).lines() {
            if all.iter().all(|n| line.contains(n)) && any.iter().any(|n| line.contains(n)) {
                out.push(format!("{site}: {line}"));
            }
        }
    }
    out
}

/// Pairs on site-a, then checks for `secs` seconds that no session comes up,
/// and that a log line explains the refusal (one that mentions the
/// handshake/connection failure and one of `reason_any`).
fn assert_refused(c: &Cluster, reason_any: &[&str]) {
    c.pair_create("tls");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines;
    loop {
        lines = matching_lines(c, &[], reason_any)
            .into_iter()
            .filter(|l| l.contains("handshake failed") || l.contains("cannot connect") || l.contains("refused"))
            .collect::<Vec<_>>();
        if !lines.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let a few reconnection attempts happen before judging the state.
    std::thread::sleep(Duration::from_secs(2));
    let a = c.status(Site::A, "tls");
    assert!(!a.connected, "site-a must not be connected: {a:?}\n{}", c.diagnostics());
    assert_ne!(a.state, "PAIR", "site-a must not reach PAIR: {a:?}");
    let b = c.status(Site::B, "tls");
    assert_eq!(b.role, "none", "site-b must not have become secondary: {b:?}\n{}", c.diagnostics());
    assert!(!b.connected, "site-b must not be connected: {b:?}");
    assert!(
        !lines.is_empty(),
        "no log line on either site explains the refusal (wanted a handshake/connect failure naming one of {reason_any:?})\n{}",
        c.diagnostics()
    );
    eprintln!("refusal logged:\n{}", lines.iter().take(4).cloned().collect::<Vec<_>>().join("\n"));
    assert!(
        matching_lines(c, &["peer connected"], &[""]).is_empty()
            && matching_lines(c, &["connected to peer"], &[""]).is_empty(),
        "a peer connection was accepted\n{}",
        c.diagnostics()
    );
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let c = Cluster::new(opts(CertKind::ForeignCa, "site-b"));
    assert_refused(&c, &["UnknownIssuer", "UnknownCA", "unknown issuer", "unknown CA", "certificate"]);
}

#[test]
fn wrong_peer_name_is_refused() {
    let c = Cluster::new(opts(CertKind::Valid, "site-c"));
    assert_refused(&c, &["NotValidForName", "not valid for name", "site-c", "certificate"]);
}

#[test]
fn expired_certificate_is_refused() {
    let c = Cluster::new(opts(CertKind::Expired, "site-b"));
    assert_refused(&c, &["Expired", "expired"]);
}

/// Garbage datagrams on the QUIC port: logged as not QUIC, nothing breaks.
#[test]
fn plaintext_datagrams_are_dropped_and_logged() {
    let mut c = Cluster::new(opts(CertKind::Valid, "site-b"));
    c.pair_create("tls");
    c.wait_pair("tls", Duration::from_secs(60));

    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let me = sock.local_addr().expect("addr");
    let target = c.quic_addr(Site::A);
    // The daemon rate-limits this log line to one a second: send a few
    // seconds' worth.
    let garbage: [&[u8]; 4] = [b"hello, plaintext", b"GET / HTTP/1.0\r\n\r\n", &[0u8; 64], &[0x10u8; 1300]];
    for round in 0..3 {
        for g in garbage {
            sock.send_to(g, target).expect("send");
        }
        if round < 2 {
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let remote = format!("remote={me}");
    while matching_lines(&c, &["not a QUIC", &remote], &[""]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "site-a did not log that it dropped a datagram that is not QUIC from {me}\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The pair is unharmed: still connected, and a write replicates.
    let s = c.status(Site::A, "tls");
    assert!(s.connected && s.state == "PAIR", "the pair suffered from garbage datagrams: {s:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let data = random_bytes(7, 256 * 1024);
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), "tls-vol").await.expect("connect");
        client.write(MIB, &data, false).await.expect("write");
        client.flush().await.expect("flush");
    });
    c.wait_drained("tls");
    c.stop(Site::A);
    c.stop(Site::B);
    let b = std::fs::read(c.volume_path(Site::B, "tls-vol")).expect("read secondary");
    assert!(b[MIB as usize..MIB as usize + data.len()] == data[..], "the write after the garbage did not replicate");
    c.assert_volumes_identical("tls");
}

/// The non-QUIC log line must not fire for the peer's own, valid QUIC
/// traffic (an admin would chase a plaintext client that does not exist).
#[test]
fn peer_quic_traffic_is_not_reported_as_non_quic() {
    let mut c = Cluster::new(opts(CertKind::Valid, "site-b"));
    c.pair_create("tls");
    c.wait_pair("tls", Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), "tls-vol").await.expect("connect");
        for i in 0..64u64 {
            client.write(i * 65536, &random_bytes(i, 65536), false).await.expect("write");
        }
        client.flush().await.expect("flush");
    });
    c.wait_drained("tls");
    c.stop(Site::A);
    c.stop(Site::B);
    let a_peer = format!("remote={}", c.quic_addr(Site::B));
    let b_peer = format!("remote={}", c.quic_addr(Site::A));
    let false_alarms: Vec<String> = matching_lines(&c, &["not a QUIC"], &[&a_peer, &b_peer]);
    assert!(
        false_alarms.is_empty(),
        "valid QUIC packets from the peer were logged as not QUIC ({} line(s)), e.g.:\n{}",
        false_alarms.len(),
        false_alarms.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    );
    c.assert_volumes_identical("tls");
}

/// The admin ran `pair create` on site-a and watches site-a: its status or
/// its log must say why the peer is not connected (here: site-b presents a
/// certificate site-a cannot verify — the failure is site-a's own
/// verification, not only an alert site-b received).
#[test]
fn primary_reports_why_it_cannot_connect() {
    let c = Cluster::new(opts(CertKind::ForeignCa, "site-b"));
    c.pair_create("tls");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status(Site::A, "tls");
        // What to check, not only rustls' words.
        let in_status =
            s.last_error.as_deref().is_some_and(|e| e.contains("not issued by the CA in this node's tls.ca"));
        let in_log = c
            .log(Site::A)
            .lines()
            .any(|l| (l.contains("cannot connect") || l.contains("link down")) && l.contains("not issued by the CA"));
        if in_status || in_log {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "after 20 s site-a shows {} (connected {}, last_error {:?}) and its log has no line saying why \
                 the connection to site-b fails (the certificate site-b presents is not from our CA)\n{}",
                s.state,
                s.connected,
                s.last_error,
                c.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A peer that speaks no common wire version is refused, and both sides say
/// so. site-b is played in-process by a transport that speaks only version
/// 99, with site-b's configuration (identity and address): the daemon has
/// no switch to claim other versions. Both directions: site-a dials the
/// fake peer (site-a's status and log, and the fake's accept, report the
/// mismatch), then the fake dials site-a (site-a's log and the fake's
/// connect report it).
#[test]
fn wire_version_mismatch_is_a_clear_error_on_both_sides() {
    let mut opts = ClusterOpts::group(GroupSpec::new("wv", Mode::Sync).volume("wv-vol", 8 << 20));
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    cluster.start(Site::A);
    let b_config = Config::load(cluster.config_path(Site::B)).expect("site-b configuration");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let fake = {
        let _rt = rt.enter();
        Arc::new(Transport::bind_with_versions(&b_config, &[99]).expect("bind the fake site-b"))
    };
    // Every incoming connection, as the fake peer saw it (site-a retries).
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    rt.spawn({
        let fake = fake.clone();
        async move {
            while let Some(result) = fake.accept_next().await {
                let seen = result.map(|pc| pc.peer).map_err(|refused| (refused.peer, refused.reason.to_string()));
                if accepted_tx.send(seen).is_err() {
                    break;
                }
            }
        }
    });

    // site-a dials site-b.
    cluster.pair_create("wv");
    let s = cluster.wait_until(Site::A, "wv", "reporting the version mismatch", Duration::from_secs(30), |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("no common wire version"))
    });
    assert!(!s.connected, "{s:?}");
    match accepted.recv_timeout(Duration::from_secs(30)) {
        Ok(Err((peer, reason))) => {
            assert_eq!(peer.as_deref(), Some("site-a"), "{reason}");
            assert!(
                reason.contains("no common wire version") && reason.contains("we speak [99]"),
                "the fake peer's refusal does not explain the mismatch: {reason}"
            );
        }
        Ok(Ok(peer)) => panic!("the fake site-b speaking only version 99 accepted {peer}"),
        Err(e) => panic!("site-a never reached the fake site-b: {e}\n{}", cluster.diagnostics()),
    }
    let wait = Instant::now() + Duration::from_secs(10);
    while !cluster.log(Site::A).lines().any(|l| l.contains("no common wire version") && l.contains("[99]")) {
        assert!(Instant::now() < wait, "site-a's log does not report the version mismatch\n{}", cluster.diagnostics());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The fake site-b dials site-a.
    let err = rt.block_on(fake.connect("site-a")).expect_err("site-a must refuse a peer speaking only version 99");
    let msg = err.to_string();
    assert!(
        msg.contains("no common wire version") && msg.contains("the peer speaks [99]"),
        "the dialing peer's error does not explain the mismatch: {msg}"
    );
    let wait = Instant::now() + Duration::from_secs(10);
    while !cluster.log(Site::A).lines().any(|l| {
        l.contains("refused connection") && l.contains("no common wire version") && l.contains("the peer speaks [99]")
    }) {
        assert!(
            Instant::now() < wait,
            "site-a's log does not say it refused the peer for its wire version\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = cluster.status(Site::A, "wv");
    assert!(!a.connected && a.state != "PAIR", "site-a paired with a peer of another wire version: {a:?}");
    rt.block_on(fake.close());
    cluster.stop(Site::A);
}

/// The shipped binary has no test-only switches: the environment variable
/// that used to make a daemon claim other wire versions
/// (`REPLICATOR_TEST_WIRE_VERSIONS`) must change nothing, so a site-b
/// started with it pairs as usual.
#[test]
fn the_daemon_ignores_the_former_wire_version_test_switch() {
    let mut opts = ClusterOpts::group(GroupSpec::new("nosw", Mode::Sync).volume("nosw-vol", 8 << 20));
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    cluster.start(Site::A);
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(cluster.log_path(Site::B)).expect("site-b log");
    let child = std::process::Command::new(cluster.bin())
        .arg("--config")
        .arg(cluster.config_path(Site::B))
        .arg("run")
        .env("REPLICATOR_TEST_WIRE_VERSIONS", "99")
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("REPLICATOR_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("clone"))
        .stderr(log)
        .spawn()
        .expect("start site-b");
    let mut site_b = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.control(Site::B, &replicator_tests::Request::Status { group: None }).is_err() {
        if let Ok(Some(status)) = site_b.0.try_wait() {
            panic!("site-b exited at start-up with {status}\n{}", cluster.diagnostics());
        }
        assert!(Instant::now() < deadline, "site-b did not start\n{}", cluster.diagnostics());
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.pair_create("nosw");
    cluster.wait_pair("nosw", Duration::from_secs(60));
    assert!(
        !cluster.log(Site::A).contains("no common wire version")
            && !cluster.log(Site::B).contains("no common wire version"),
        "an environment variable changed the wire versions of the shipped binary\n{}",
        cluster.diagnostics()
    );
    cluster.stop(Site::A);
    let pid = nix::unistd::Pid::from_raw(site_b.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM site-b");
    let status = site_b.0.wait().expect("wait for site-b");
    assert!(status.success(), "site-b did not stop cleanly: {status}\n{}", cluster.diagnostics());
}

/// A daemon started by the test itself, killed if the test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Handshakes that start and never finish (genuine Initial packets sent
/// from ports that never answer: no credentials needed) must not keep the
/// configured peer out: each incoming handshake runs in its own task with a
/// timeout, a cap, and QUIC Retry beyond the cap. site-a (the primary) is
/// restarted while site-b's endpoint is flooded with abandoned handshakes
/// (30 s), and must be replicating again before the flood ends — when
/// handshakes were awaited one after another, each abandoned one held
/// site-b's accept loop for the whole idle timeout.
#[test]
fn abandoned_handshakes_do_not_keep_the_peer_out() {
    let group = GroupSpec::new("hs", Mode::Async).volume("hs-vol", 8 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("hs");
    cluster.wait_pair("hs", Duration::from_secs(60));
    cluster.kill9(Site::A);

    // Genuine Initial packets, each of a new connection: site-a's identity
    // dials a UDP socket of ours instead of site-b; we forward only that
    // first packet to site-b, from a new port that never answers.
    let a_config = Config::load(cluster.config_path(Site::A)).expect("site-a configuration");
    let identity = replicator::tls::TlsIdentity::load(&a_config.tls, "site-a").expect("site-a identity");
    let client_config = identity.client_config(1).expect("client config");
    let target = cluster.quic_addr(Site::B);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let flood = rt.spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut sent = 0u32;
        while tokio::time::Instant::now() < until && sent < 600 {
            let capture = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("capture socket");
            let capture_addr = capture.local_addr().expect("addr");
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
            let connecting = endpoint.connect_with(client_config.clone(), capture_addr, "site-b").expect("connect");
            let mut packet = vec![0u8; 65536];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), capture.recv(&mut packet)).await {
                let replay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("replay socket");
                if replay.send_to(&packet[..n], target).await.is_ok() {
                    sent += 1;
                }
            }
            drop(connecting);
            endpoint.close(0u32.into(), b"");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(2));
    let restarted = Instant::now();
    cluster.start(Site::A);
    cluster.wait_until(Site::A, "hs", "replicating again under the flood", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected
    });
    println!("site-a replicating again {:?} after its restart, under the flood", restarted.elapsed());
    // Judged by the flood, not by a clock: site-a must be back while the
    // abandoned handshakes still arrive (one after another, each held the
    // old accept loop for the 5 s idle timeout, so the backlog only grew).
    assert!(!flood.is_finished(), "site-a got through only after the flood had stopped\n{}", cluster.diagnostics());
    let sent = rt.block_on(flood).expect("flood task");
    assert!(sent >= 50, "the flood did not run ({sent} packets)");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
}

/// A peer (or a stolen peer key) opening connection after connection: each
/// holds a receive window and streams on this node, so past
/// `MAX_CONNECTIONS_PER_PEER` (8) open at once the new ones are closed, and
/// site-a says why. site-b is played in-process by transports with site-b's
/// identity, each on a port of its own.
#[test]
fn a_peer_may_hold_only_so_many_connections_open() {
    let mut opts = ClusterOpts::group(GroupSpec::new("cc", Mode::Async).volume("cc-vol", 8 << 20));
    opts.start = false;
    let mut cluster = Cluster::new(opts);
    cluster.start(Site::A);
    let mut b_config = Config::load(cluster.config_path(Site::B)).expect("site-b configuration");
    b_config.node.listen = "127.0.0.1:0".parse().expect("address");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut conns = Vec::new();
    let mut fakes = Vec::new();
    for i in 0..10 {
        let fake = {
            let _rt = rt.enter();
            Arc::new(Transport::bind(&b_config).expect("bind a fake site-b"))
        };
        // The ninth and tenth are closed right after the handshake: their
        // dial fails, or succeeds and the connection closes.
        match rt.block_on(fake.connect("site-a")) {
            Ok(conn) => conns.push(conn),
            Err(e) => assert!(i >= 8, "connection {i}: {e}\n{}", cluster.diagnostics()),
        }
        fakes.push(fake);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = conns.iter().filter(|c| c.close_reason().is_none()).count();
        if open == 8 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} connections from site-b stay open\n{}", cluster.diagnostics());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        cluster.log(Site::A).contains("8 connections from this peer are open already"),
        "site-a's log does not say why\n{}",
        cluster.diagnostics()
    );
    // Once they close, site-b is welcome again.
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    drop(conns);
    std::thread::sleep(Duration::from_millis(500));
    let fresh = {
        let _rt = rt.enter();
        Arc::new(Transport::bind(&b_config).expect("bind a fake site-b"))
    };
    let conn = rt.block_on(fresh.connect("site-a")).expect("a new connection after the old ones closed");
    std::thread::sleep(Duration::from_millis(500));
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    drop(fakes);
}
