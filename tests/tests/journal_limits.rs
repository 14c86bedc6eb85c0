//! Record limits and the journal (review findings, issue 7 items 1 and 2).
//!
//! - A TRIM larger than the record payload limit is one journal record; it
//!   and every record after it survive a restart of the primary (the journal
//!   decoder once rejected it, silently dropping the acknowledged writes
//!   behind it while both sites reported PAIR, lag 0).
//! - A sync group with the smallest journal advertises a maximum request
//!   the journal can always hold, treats a full journal as back-pressure
//!   while the secondary is connected (never SUSPENDED(journal-full), RPO 0
//!   kept), and takes a request larger than it advertised (up to the
//!   protocol's 32 MiB, which a client may send without asking) as several
//!   records.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use replicator::nbd_client::NbdClient;
use replicator_tests::{require, run_ok, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

fn qemu_io(cluster: &Cluster, site: Site, export: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new(require("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(cluster.nbd_uri(site, export));
    let out = run_ok(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !stdout.contains("Pattern verification failed") && !stdout.contains("failed"),
        "qemu-io {cmds:?} on {site}: {stdout}\n{}",
        cluster.diagnostics()
    );
    stdout
}

#[test]
fn trim_beyond_the_payload_limit_and_later_writes_survive_a_primary_restart() {
    let group = GroupSpec::new("tr", Mode::Async).volume("tr-vol", 192 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("tr");
    cluster.wait_pair("tr", Duration::from_secs(60));
    // Something for the TRIM to discard on both sites.
    qemu_io(&cluster, Site::A, "tr-vol", &["write -P 0x33 0 8M", "write -P 0x44 120M 8M", "flush"]);
    cluster.wait_drained("tr");

    // Secondary paused: W1, a 128 MiB TRIM (one record), W2 and W3 with
    // FUA, and a FLUSH; all acknowledged by the primary (async mode).
    cluster.signal(Site::B, Signal::SIGSTOP);
    qemu_io(
        &cluster,
        Site::A,
        "tr-vol",
        &["write -P 0x01 130M 64k", "discard 0 128M", "write -f -P 0x02 64M 64k", "write -f -P 0x03 140M 64k", "flush"],
    );
    cluster.stop(Site::A);
    cluster.start(Site::A);
    cluster.signal(Site::B, Signal::SIGCONT);
    let s = cluster.wait_drained_within("tr", Duration::from_secs(90));
    assert!(s.last_seq >= 6, "the TRIM and the writes after it must still be in the journal after the restart: {s:?}");
    qemu_io(
        &cluster,
        Site::A,
        "tr-vol",
        &["read -P 0x01 130M 64k", "read -P 0 0 64M", "read -P 0x02 64M 64k", "read -P 0x03 140M 64k"],
    );
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("tr");
}

/// `block_size_maximum` of an export, from `nbdinfo --json`.
fn advertised_maximum(cluster: &Cluster, site: Site, export: &str) -> u64 {
    let out = run_ok(
        Command::new(require("nbdinfo")).arg("--json").arg(cluster.nbd_uri(site, export)),
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json");
    v["exports"][0]["block_size_maximum"].as_u64().unwrap_or_else(|| panic!("no block_size_maximum in {v}"))
}

#[test]
fn sync_mode_with_the_smallest_journal_keeps_rpo_zero() {
    let group = GroupSpec::new("sj", Mode::Sync).volume("sj-vol", 128 * MIB).journal_size(16 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("sj");
    cluster.wait_pair("sj", Duration::from_secs(60));

    let max = advertised_maximum(&cluster, Site::A, "sj-vol");
    assert!(max <= 8 * MIB, "a 16 MiB journal must not advertise requests it cannot hold (maximum {max})");
    assert!(max >= MIB, "the advertised maximum should stay useful (maximum {max})");

    // 32 MiB at once (qemu splits by the advertised maximum) and then 64 MiB
    // more: four times the journal, all acknowledged only with the
    // secondary, which never stops replicating.
    qemu_io(&cluster, Site::A, "sj-vol", &["write -P 0x5a 0 32M", "write -P 0x6b 32M 64M", "flush"]);
    let s = cluster.status(Site::A, "sj");
    assert_eq!((s.state.as_str(), s.connected, s.dirty_bytes), ("PAIR", true, 0), "{s:?}\n{}", cluster.diagnostics());
    // The flush (or FUA) made every acknowledged write durable on the
    // secondary; applying it to the volume may still be under way.
    assert!(s.durable_seq >= s.last_seq, "sync mode: every acknowledged write is durable on the secondary: {s:?}");
    let log = cluster.log(Site::A);
    assert!(
        !log.contains("journal full"),
        "a sync pair with a connected secondary must not suspend for journal-full:\n{log}"
    );

    // A client that never asked for block sizes may send the protocol's
    // default maximum of 32 MiB: taken as records of the advertised
    // maximum (it got EINVAL), replicated like any other write, RPO 0 kept.
    let before = cluster.status(Site::A, "sj").last_seq;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "sj-vol").await.expect("connect");
        let big = vec![0x7cu8; 32 * MIB as usize];
        client.write(0, &big, false).await.expect("a 32 MiB write above the advertised maximum");
        // Unaligned at both ends, with FUA.
        client.write(40 * MIB + 100, &big[..31 * MIB as usize], true).await.expect("an unaligned 31 MiB FUA write");
        client.write(0, &[0x7d; MIB as usize / 2], true).await.expect("a write within the maximum still works");
        // A read takes no journal space: served up to the protocol's 32 MiB
        // whatever the maximum (it got EINVAL).
        let read = client.read(0, 32 * MIB as u32).await.expect("a 32 MiB read above the advertised maximum");
        let (small, rest) = read.split_at(MIB as usize / 2);
        assert!(small.iter().all(|&b| b == 0x7d), "the 512 KiB write within the maximum");
        assert!(rest.iter().all(|&b| b == 0x7c), "the rest of the 32 MiB write");
        let read = client.read(40 * MIB, 32 * MIB as u32).await.expect("read");
        let (head, rest) = read.split_at(100);
        let (body, tail) = rest.split_at(31 * MIB as usize);
        assert!(head.iter().chain(tail).all(|&b| b == 0x6b), "qemu's bytes around the unaligned write");
        assert!(body.iter().all(|&b| b == 0x7c), "the unaligned 31 MiB write");
    });
    let s = cluster.status(Site::A, "sj");
    assert_eq!((s.state.as_str(), s.connected), ("PAIR", true), "{s:?}");
    assert!(s.last_seq - before >= 9, "32 and 31 MiB over a 16 MiB journal are several records each: {s:?}");
    // The flush (or FUA) made every acknowledged write durable on the
    // secondary; applying it to the volume may still be under way.
    assert!(s.durable_seq >= s.last_seq, "sync mode: every acknowledged write is durable on the secondary: {s:?}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("sj");
}

/// The NBD protocol's default maximum request is 32 MiB, and a client that
/// never asks for block sizes (Linux's `nbd` driver caps requests at 32 MiB)
/// may send that much at any offset; widened to whole blocks, an unaligned
/// one needs a record of 32 MiB + 8 KiB. Both were refused (the limit was
/// 32 MiB − 8 KiB).
#[test]
fn a_32_mib_write_at_any_offset_is_taken_and_replicated() {
    let group = GroupSpec::new("mx", Mode::Sync).volume("mx-vol", 128 * MIB).journal_size(256 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("mx");
    cluster.wait_pair("mx", Duration::from_secs(60));
    assert_eq!(advertised_maximum(&cluster, Site::A, "mx-vol"), 32 * MIB);

    let unaligned: Vec<u8> = (0..32 * MIB).map(|i| (i % 251) as u8).collect();
    let aligned = vec![0xa5u8; 32 * MIB as usize];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "mx-vol").await.expect("connect");
        client.write(4096 + 100, &unaligned, false).await.expect("32 MiB at an unaligned offset");
        client.write(64 * MIB, &aligned, true).await.expect("32 MiB at an aligned offset");
        let back = client.read(4096 + 100, 32 << 20).await.expect("read back");
        assert!(back == unaligned, "the unaligned 32 MiB write reads back changed");
    });
    let s = cluster.status(Site::A, "mx");
    assert_eq!((s.state.as_str(), s.connected), ("PAIR", true), "{s:?}");
    // The FUA write made both durable on the secondary (applying them to
    // its volume may still be under way: the CI once saw applied 1 of 2).
    assert!(s.durable_seq >= s.last_seq, "sync mode: both writes are durable on the secondary: {s:?}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("mx");
}
