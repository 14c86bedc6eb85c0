//! `replicator verify GROUP [--fix]`: the online comparison of both sites.
//!
//! - after writes through a real NBD client (qemu-io), and while writes keep
//!   coming, verify says the sites match (each region is compared at the
//!   same write sequence on both sites);
//! - bytes planted directly into the secondary's backing file (nothing else
//!   writes there) make it exit 1 naming exactly those regions; `--fix`
//!   copies them again and waits for PAIR; verify then matches, and after a
//!   clean stop the backing files are identical byte for byte;
//! - refusals: on the secondary (exit 1, naming the primary), on a group not
//!   paired (exit 1), while the peer is down (exit 3, the pair's state), a
//!   second verify of a group while one runs (exit 1).

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use replicator_tests::{describe_output, require, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn cli(cluster: &Cluster, site: Site, args: &[&str]) -> (i32, String) {
    let out = cluster.cli(site, args);
    (out.status.code().unwrap_or(-1), describe_output(&out))
}

/// Runs qemu-io on site-a's export `vol` with `cmds`; panics on failure.
fn qemu_io(cluster: &Cluster, vol: &str, cmds: &[String]) {
    let mut cmd = Command::new(require("qemu-io"));
    cmd.args(["-f", "raw"]).arg(cluster.nbd_uri(Site::A, vol));
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !out.stderr.is_empty() || stdout.contains("failed") {
        panic!("qemu-io on {vol} failed: {}\n{}\n{}", out.status, describe_output(&out), cluster.diagnostics());
    }
}

/// Patterned writes (aligned, unaligned, zeroes, a discard) spread over the
/// first `mib` MiB of a volume, with a flush at the end.
fn writes(seed: u64, mib: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    for i in 0..mib {
        let at = i * MIB + (seed * 7919 + i * 104_729) % (MIB - 160 * KIB);
        cmds.push(format!("aio_write -P 0x{:x} {at} {}", (seed + i) % 250 + 1, 48 * KIB));
        cmds.push(format!("aio_write -P 0x{:x} {} 3000", (seed + i) % 250 + 3, at + 100 * KIB + 17));
    }
    cmds.push(format!("aio_write -z {} {}", 3 * MIB / 2, 64 * KIB));
    cmds.push(format!("aio_write -P 0xee {} {}", 5 * MIB / 2, MIB));
    cmds.push("aio_flush".into());
    cmds.push(format!("discard {} {}", 5 * MIB / 2 + 128 * KIB, 128 * KIB));
    cmds.push("flush".into());
    cmds
}

/// Overwrites `len` bytes at `offset` of a backing file with `byte` and
/// makes it durable (the daemon reads its volumes with O_DIRECT).
fn plant(path: &std::path::Path, offset: u64, len: usize, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all_at(&vec![byte; len], offset).expect("pwrite");
    f.sync_all().expect("fsync");
}

/// The lines of a verify answer that name a region.
fn region_lines(out: &str) -> Vec<String> {
    out.lines().map(str::trim).filter(|l| l.starts_with("volume ")).map(str::to_string).collect()
}

#[test]
fn verify_finds_planted_differences_and_fix_copies_them() {
    let (group, data, log) = ("vf", "vf-data", "vf-log");
    // 32 regions, then 8 full ones and a short (256 KiB) last one.
    let spec = GroupSpec::new(group, Mode::Sync).volume(data, 32 * MIB).volume(log, 8 * MIB + 256 * KIB);
    let mut c = Cluster::new(ClusterOpts::group(spec));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    qemu_io(&c, data, &writes(1, 32));
    qemu_io(&c, log, &writes(2, 8));

    // Right after the writes (the secondary may still be applying them).
    let (code, out) = cli(&c, Site::A, &["verify", group]);
    assert_eq!(code, 0, "verify after the writes:\n{out}");
    assert!(out.contains("verify vf: 41 regions (") && out.contains("the sites match"), "{out}");

    // Different bytes on the secondary only: in region 5 of the data volume
    // and in the short last region of the log volume.
    plant(&c.volume_path(Site::B, data), 5 * MIB + 12_345, 100, 0x5a);
    plant(&c.volume_path(Site::B, log), 8 * MIB + 4096, 4096, 0xa5);
    let (code, out) = cli(&c, Site::A, &["verify", group]);
    assert_eq!(code, 1, "verify must fail on differing regions:\n{out}");
    assert!(out.contains("2 of them DIFFER") && out.contains("--fix"), "{out}");
    assert_eq!(
        region_lines(&out),
        [
            format!("volume {data} offset {} (0x500000) length {MIB}", 5 * MIB),
            format!("volume {log} offset {} (0x800000) length {}", 8 * MIB, 256 * KIB),
        ],
        "exactly the planted regions:\n{out}"
    );
    assert!(c.log(Site::A).contains("verify: the sites differ"), "the primary logs the mismatch");

    let (code, out) = cli(&c, Site::A, &["verify", group, "--fix"]);
    assert_eq!(code, 0, "verify --fix:\n{out}");
    assert!(out.contains(&format!("fixed 2 regions ({} bytes)", MIB + 256 * KIB)), "{out}");
    assert_eq!(c.status(Site::A, group).state, "PAIR");
    // COPY while the regions were copied (the replica was inconsistent: a
    // sync pair did not claim RPO 0), PAIR after.
    let log = c.log(Site::A);
    assert!(
        log.lines().any(|l| l.contains("pair state change") && l.contains("to=COPY") && l.contains("verify --fix")),
        "the fix does not show COPY while it copies:\n{log}"
    );
    c.wait_state(Site::B, group, "PAIR", Duration::from_secs(30));
    assert!(c.status(Site::B, group).consistent, "the secondary is consistent again after the fix");

    let (code, out) = cli(&c, Site::A, &["verify", group]);
    assert_eq!(code, 0, "verify after --fix:\n{out}");
    assert!(out.contains("the sites match"), "{out}");
    c.assert_no_session_breaks("verify and verify --fix");

    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical(group);
}

/// Async mode (the secondary lags) with writes going on during the run:
/// every region is compared at one sequence on both sites, so no false
/// mismatch; the planted one is still found.
#[test]
fn async_verify_under_concurrent_writes() {
    let (group, vol) = ("va", "va-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Async).volume(vol, 24 * MIB)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    qemu_io(&c, vol, &writes(3, 24));

    // Verify again and again while qemu-io rounds keep writing, until at
    // least three rounds overlapped the runs.
    let (stop, rounds) = (AtomicBool::new(false), AtomicU64::new(0));
    let verified = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let round = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                qemu_io(&c, vol, &writes(10 + round, 24));
            }
        });
        let first = rounds.load(Ordering::SeqCst);
        let mut runs = Vec::new();
        while runs.len() < 3 || (rounds.load(Ordering::SeqCst) < first + 3 && runs.len() < 100) {
            runs.push(cli(&c, Site::A, &["verify", group]));
        }
        stop.store(true, Ordering::SeqCst);
        eprintln!("{} verify runs during {} write rounds", runs.len(), rounds.load(Ordering::SeqCst) - first);
        runs
    });
    for (code, out) in &verified {
        assert_eq!(*code, 0, "verify while writes run:\n{out}");
        assert!(out.contains("verify va: 24 regions (24 MiB)") && out.contains("the sites match"), "{out}");
    }

    plant(&c.volume_path(Site::B, vol), 20 * MIB, 512, 0x11);
    let (code, out) = cli(&c, Site::A, &["verify", group]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(region_lines(&out), [format!("volume {vol} offset {} (0x1400000) length {MIB}", 20 * MIB)], "{out}");
    let (code, out) = cli(&c, Site::A, &["verify", group, "--fix"]);
    assert_eq!(code, 0, "verify --fix:\n{out}");
    c.assert_no_session_breaks("verify under writes");
    c.assert_converged(group);
}

#[test]
fn verify_is_refused_on_the_secondary_when_unpaired_and_while_the_peer_is_down() {
    let (group, vol) = ("vr", "vr-vol");
    let spec = GroupSpec::new(group, Mode::Async).volume(vol, 4 * MIB).link_timeout(Duration::from_secs(1));
    let mut c = Cluster::new(ClusterOpts::group(spec));

    let (code, out) = cli(&c, Site::A, &["verify", group]);
    assert_eq!(code, 1, "SIMPLEX:\n{out}");
    assert!(out.contains("not paired"), "{out}");

    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let (code, out) = cli(&c, Site::B, &["verify", group]);
    assert_eq!(code, 1, "on the secondary:\n{out}");
    assert!(out.contains("run `replicator verify vr` on the primary, site-a"), "{out}");

    c.stop(Site::B);
    c.wait_until(Site::A, group, "SUSPENDED", Duration::from_secs(30), |s| s.state == "SUSPENDED");
    let (code, out) = cli(&c, Site::A, &["verify", group]);
    assert_eq!(code, 3, "refused while the peer is down:\n{out}");
    assert!(out.contains("the pair is SUSPENDED(link); verify needs PAIR"), "{out}");
}

#[test]
fn a_second_verify_is_refused_while_one_runs_and_a_stop_says_it_cut_one_short() {
    let (group, vol) = ("v2", "v2-vol");
    let spec = GroupSpec::new(group, Mode::Async).volume(vol, 8 * MIB);
    let c = Cluster::new(ClusterOpts::group(spec));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    // The secondary frozen: the first verify waits for its answers.
    c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    let first = Command::new(c.bin())
        .arg("--config")
        .arg(c.config_path(Site::A))
        .args(["verify", group])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("verify");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !c.log(Site::A).contains("verify started") {
        assert!(std::time::Instant::now() < deadline, "the first verify did not start\n{}", c.log(Site::A));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out) = cli(&c, Site::A, &["verify", group]);
    c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(code, 1, "a second verify at once:\n{out}");
    assert!(out.contains("a verify of group v2 is already running"), "{out}");
    let out = first.wait_with_output().expect("verify");
    let text = describe_output(&out);
    assert_eq!(out.status.code(), Some(0), "the first verify:\n{text}");
    assert!(text.contains("the sites match"), "{text}");

    // A verify cut short by this daemon's clean stop: the admin hears that
    // the stop, not the peer, ended it (with and without --fix).
    let mut c = c;
    for fix in [false, true] {
        let started = c.log(Site::A).matches("verify started").count();
        c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
        let verify = Command::new(c.bin())
            .arg("--config")
            .arg(c.config_path(Site::A))
            .args(["verify", group])
            .args(fix.then_some("--fix"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("verify");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while c.log(Site::A).matches("verify started").count() == started {
            assert!(std::time::Instant::now() < deadline, "the verify did not start\n{}", c.log(Site::A));
            std::thread::sleep(Duration::from_millis(50));
        }
        c.stop(Site::A);
        c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
        let out = verify.wait_with_output().expect("verify");
        let text = describe_output(&out);
        assert_eq!(out.status.code(), Some(1), "verify (fix: {fix}) during a stop:\n{text}");
        // Nothing holds up the stop for a verify without --fix: its answer
        // may lose the race with the daemon's exit.
        let closed = !fix && text.contains("closed the connection without answering");
        assert!(closed || text.contains("was cut short: this daemon is stopping"), "{text}");
        assert!(closed || text.contains("a verify without --fix does not hold up a clean stop") != fix, "{text}");
        c.start(Site::A);
        c.wait_pair(group, Duration::from_secs(60));
    }
}

/// `verify --fix` on a sync pair: the regions it copies hold acknowledged
/// writes the secondary lacks, so until their copy is durable there the
/// primary's state file no longer says every acknowledged write reached
/// the secondary (a failover meanwhile leaves this node in split brain, not
/// merely fenced: a failback would discard them); once the pair is PAIR
/// again it says so again.
#[test]
fn a_sync_verify_fix_is_no_rpo_zero_until_its_copy_is_durable() {
    require("fusermount3");
    let (group, vol) = ("vk", "vk-vol");
    let spec = GroupSpec::new(group, Mode::Sync).volume(vol, 8 * MIB);
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    qemu_io(&c, vol, &writes(3, 8));
    let state = c.state_dir(Site::A).join("groups").join(group).join("state.json");
    let says_rpo_zero = |flag: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&state).unwrap_or_default().contains(&format!("\"acked_all_on_peer\": {flag}")) {
            assert!(std::time::Instant::now() < deadline, "the state file never said acked_all_on_peer: {flag}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    says_rpo_zero(true);
    plant(&c.volume_path(Site::B, vol), 3 * MIB, 4096, 0x77);
    // The secondary's volume syncs hang: the fix's copy stays not durable.
    assert!(c.fs_command(Site::B, &format!("hold-fsync {vol}.img")).starts_with("ok armed"));
    let fix = Command::new(c.bin())
        .arg("--config")
        .arg(c.config_path(Site::A))
        .args(["verify", group, "--fix"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("verify --fix");
    says_rpo_zero(false);
    assert!(c.fs_command(Site::B, "release").starts_with("ok"));
    let out = fix.wait_with_output().expect("verify --fix");
    let text = describe_output(&out);
    assert_eq!(out.status.code(), Some(0), "verify --fix:\n{text}");
    assert!(text.contains("fixed 1 regions"), "{text}");
    says_rpo_zero(true);
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical(group);
}
