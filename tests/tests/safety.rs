//! A volume is never writable through two paths (DESIGN: "Safety of admin
//! commands and of shared resources"):
//!
//! - a second daemon on the same `state_dir` is refused at start-up, before
//!   it opens a journal or a volume, with a message naming the state_dir,
//!   its lock file and the holder's pid; the first daemon is untouched;
//! - a volume on a block device is opened exclusively (`O_EXCL`): a second
//!   daemon with its own state_dir on the same device is refused, and so is
//!   `mkfs.ext4` (root only: loop devices);
//! - a daemon whose NBD requests are still running in a volume when it stops
//!   does not record a clean shutdown, so the next start replays the journal
//!   (root only: FUSE; the volume is an nbdfuse file over nbdkit's pause
//!   filter, paused to make a write hang in the volume).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::random_bytes;
use replicator_tests::{
    compare_files, describe_output, exit, free_udp_port, require, require_root, run_ok, run_with_timeout, Cluster,
    ClusterOpts, FileDiff, GroupSpec, Immutable, Mode, Site,
};

const MIB: u64 = 1 << 20;
/// A daemon refused at start-up must say so well within this.
const REFUSAL: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Writes `blocks` 64 KiB blocks of known data through site-a's NBD socket.
fn write_blocks(rt: &tokio::runtime::Runtime, c: &Cluster, export: &str, seed: u64, blocks: u64) {
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), export).await.expect("NBD connect");
        for i in 0..blocks {
            client.write(i * 65536, &random_bytes(seed + i, 65536), false).await.expect("NBD write");
        }
        client.flush().await.expect("NBD flush");
    });
}

fn state_dir(c: &Cluster, site: Site) -> PathBuf {
    c.root().join(site.label()).join("state")
}

fn state_json_path(c: &Cluster, site: Site, group: &str) -> PathBuf {
    state_dir(c, site).join("groups").join(group).join("state.json")
}

fn state_json(c: &Cluster, site: Site, group: &str) -> serde_json::Value {
    let path = state_json_path(c, site, group);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

fn clean_shutdown(c: &Cluster, site: Site, group: &str) -> bool {
    state_json(c, site, group)["clean_shutdown"].as_bool().expect("clean_shutdown is a bool")
}

/// What a second daemon must not change in state.json: everything but the
/// journal tail, which the first daemon itself advances lazily after
/// acknowledgements.
fn pair_identity(c: &Cluster, site: Site, group: &str) -> serde_json::Value {
    let mut v = state_json(c, site, group);
    let map = v.as_object_mut().expect("state.json is an object");
    map.remove("journal_tail_seq");
    map.remove("journal_tail_pos");
    v
}

/// `replicator --config CONFIG run`, expected to give up at start-up.
fn run_daemon_expecting_refusal(c: &Cluster, config: &Path) -> Output {
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new(c.bin())
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("REPLICATOR_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID"),
        REFUSAL,
    );
    eprintln!(
        "second daemon ({}) exited after {:?}: {}\n{}",
        config.display(),
        started.elapsed(),
        out.status,
        describe_output(&out)
    );
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit::FAILED)),
        "a daemon refused at start-up must exit {}\n{}\n{}",
        exit::FAILED,
        describe_output(&out),
        c.diagnostics()
    );
    out
}

/// A copy of `site`'s configuration with its own QUIC port and run_dir
/// (control and NBD sockets), so that nothing but the state_dir is shared.
fn config_sharing_only_the_state_dir(c: &Cluster, site: Site) -> PathBuf {
    let text = std::fs::read_to_string(c.config_path(site)).expect("read config");
    let run_dir = c.root().join(format!("{}-intruder-run", site.label()));
    let mut out = String::new();
    let (mut saw_listen, mut saw_run_dir) = (false, false);
    for line in text.lines() {
        if line.starts_with("listen = ") {
            out.push_str(&format!("listen = \"127.0.0.1:{}\"\n", free_udp_port()));
            saw_listen = true;
        } else if line.starts_with("run_dir = ") {
            out.push_str(&format!("run_dir = \"{}\"\n", run_dir.display()));
            saw_run_dir = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(saw_listen && saw_run_dir, "unexpected configuration layout:\n{text}");
    let path = c.root().join(format!("{}-intruder.toml", site.label()));
    std::fs::write(&path, out).expect("write config");
    path
}

/// Replaces the backing path of `volume` in `site`'s configuration with an
/// existing device or file, and drops the volume's `create = true` (a device
/// is never created, and `create` under /dev is refused).
fn set_volume_path(c: &Cluster, site: Site, volume: &str, path: &Path) {
    let config = c.config_path(site);
    let text = std::fs::read_to_string(config).expect("read config");
    let old = format!("path = \"{}\"", c.volume_path(site, volume).display());
    let at = text.find(&old).unwrap_or_else(|| panic!("no {old} in\n{text}"));
    let (head, tail) = text.split_at(at);
    // The harness writes `create = true` after the volume's path and size.
    let tail = tail.replacen("\ncreate = true\n", "\n", 1);
    let text = format!("{head}{tail}");
    std::fs::write(config, text.replace(&old, &format!("path = \"{}\"", path.display()))).expect("write config");
}

/// An nbdfuse mount; unmounted (lazily: a daemon may still hold the file)
/// and stopped on drop, also when the test fails half-way.
struct FuseMount {
    child: Child,
    mnt: PathBuf,
    fusermount: PathBuf,
}

impl FuseMount {
    /// Mounts the NBD server on `sock` as the file `mnt/disk`.
    fn start(mnt: &Path, sock: &Path, log: &Path) -> (FuseMount, PathBuf) {
        let (nbdfuse, fusermount) = (require("nbdfuse"), require("fusermount3"));
        std::fs::create_dir_all(mnt).expect("mkdir");
        let log_file = std::fs::File::create(log).expect("nbdfuse log");
        let child = Command::new(&nbdfuse)
            .arg(mnt.join("disk"))
            .arg("--unix")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone"))
            .stderr(log_file)
            .spawn()
            .expect("start nbdfuse");
        let mut mount = FuseMount { child, mnt: mnt.to_path_buf(), fusermount };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mnt.join("disk").exists() {
            if let Ok(Some(st)) = mount.child.try_wait() {
                panic!("nbdfuse exited with {st}: {}", std::fs::read_to_string(log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nbdfuse did not mount within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        (mount, mnt.join("disk"))
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        quiet(&self.fusermount, &["-u", "-z", &self.mnt.display().to_string()]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quiet(cmd: &Path, args: &[&str]) {
    let _ = Command::new(cmd).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

#[test]
fn second_daemon_on_the_same_state_dir_is_refused_and_the_first_is_untouched() {
    let (group, vol) = ("lock", "lock-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Sync).volume(vol, 16 * MIB)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    // Records in the journal: what a second daemon would replay onto the
    // live volume.
    write_blocks(&rt, &c, vol, 100, 32);
    c.wait_drained(group);
    let before = pair_identity(&c, Site::A, group);
    assert!(!clean_shutdown(&c, Site::A, group), "a running daemon's state must say it has not stopped cleanly");
    let pid = c.pid(Site::A).expect("site-a runs");
    let dir = state_dir(&c, Site::A);
    let lock = dir.join("lock");

    // A configuration that shares only the state_dir (nothing else would
    // stop it: it has its own QUIC port and sockets), then the same
    // configuration (a second `run` by mistake).
    let intruder = config_sharing_only_the_state_dir(&c, Site::A);
    for config in [intruder, c.config_path(Site::A).to_path_buf()] {
        let out = run_daemon_expecting_refusal(&c, &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in [dir.display().to_string(), lock.display().to_string(), format!("pid {pid}")] {
            assert!(stderr.contains(&needle), "the refusal must name {needle:?}:\n{}", describe_output(&out));
        }
        assert!(
            !stderr.contains("replaying the journal") && !stderr.contains("journal recovered"),
            "the second daemon touched the journal:\n{}",
            describe_output(&out)
        );
    }

    // The first daemon is untouched: same state on disk, still paired and
    // replicating, still the lock holder.
    assert_eq!(
        pair_identity(&c, Site::A, group),
        before,
        "site-a's state.json changed while the second daemon tried to start"
    );
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap_or_default().trim(),
        pid.to_string(),
        "the lock file names the daemon holding it"
    );
    let s = c.status(Site::A, group);
    assert!(s.state == "PAIR" && s.connected, "site-a after the refused second daemon: {s:?}\n{}", c.diagnostics());
    write_blocks(&rt, &c, vol, 200, 16);
    c.wait_drained(group);
    c.assert_no_session_breaks("after the refused second daemon");

    // A normal stop is still a clean one, and the next start trusts it.
    c.stop(Site::A);
    c.stop(Site::B);
    assert!(clean_shutdown(&c, Site::A, group), "SIGTERM must still record a clean shutdown\n{}", c.diagnostics());
    c.assert_volumes_identical(group);
    let log_len = c.log(Site::A).len();
    c.start(Site::A);
    let restarted = c.log(Site::A)[log_len..].to_string();
    assert!(
        !restarted.contains("did not stop cleanly"),
        "the restart after a clean stop replayed the journal:\n{restarted}"
    );
    c.stop(Site::A);
}

/// A loop device, detached on drop.
struct LoopDevice {
    losetup: PathBuf,
    dev: String,
}

impl LoopDevice {
    fn attach(backing: &Path) -> LoopDevice {
        let losetup = require("losetup");
        let out = run_ok(Command::new(&losetup).arg("-f").arg("--show").arg(backing), Duration::from_secs(30));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDevice { losetup, dev }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        quiet(&self.losetup, &["-d", &self.dev]);
    }
}

#[test]
fn a_volume_on_a_block_device_is_opened_exclusively() {
    let mkfs = require("mkfs.ext4");
    if !require_root("a_volume_on_a_block_device_is_opened_exclusively") {
        return;
    }
    let (group, vol, size) = ("excl", "excl-vol", 32 * MIB);
    let mut opts = ClusterOpts::group(GroupSpec::new(group, Mode::Sync).volume(vol, size));
    opts.start = false;
    let mut c = Cluster::new(opts);
    let backing = c.root().join("loop-backing.img");
    std::fs::File::create(&backing).and_then(|f| f.set_len(size)).expect("backing file");
    let lo = LoopDevice::attach(&backing);
    let dev = PathBuf::from(&lo.dev);
    // Both sites name the same block device, each with its own state_dir:
    // only the exclusive open can keep the second one out.
    set_volume_path(&c, Site::A, vol, &dev);
    set_volume_path(&c, Site::B, vol, &dev);

    c.start(Site::A);
    let rt = runtime();
    write_blocks(&rt, &c, vol, 300, 8);

    let out = run_daemon_expecting_refusal(&c, c.config_path(Site::B));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let wanted = format!("volume {vol}: block device {} is in use by another process or mounted", lo.dev);
    assert!(stderr.contains(&wanted), "wanted {wanted:?} in:\n{}", describe_output(&out));

    let mkfs_out = run_with_timeout(Command::new(&mkfs).args(["-q", "-F"]).arg(&lo.dev), Duration::from_secs(60));
    assert!(
        !mkfs_out.status.success(),
        "mkfs.ext4 formatted a block device the daemon is serving as a volume\n{}",
        describe_output(&mkfs_out)
    );
    eprintln!("mkfs.ext4 refused as expected: {}", String::from_utf8_lossy(&mkfs_out.stderr).trim());
    // What site-a wrote is still there, through the daemon.
    let first = rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("NBD connect");
        client.read(0, 65536).await.expect("NBD read")
    });
    assert!(first == random_bytes(300, 65536), "the volume changed under the daemon");

    // Stopping releases the device: now site-b may have it.
    c.stop(Site::A);
    c.start(Site::B);
    c.stop(Site::B);
    drop(lo);
}

/// nbdkit serving a memory disk through its pause filter, on a Unix socket.
struct PausableDisk {
    child: Child,
    control: PathBuf,
}

impl PausableDisk {
    fn start(dir: &Path, size: u64) -> (PausableDisk, PathBuf) {
        let nbdkit = require("nbdkit");
        let (sock, control) = (dir.join("nbdkit.sock"), dir.join("nbdkit-pause.sock"));
        let log = std::fs::File::create(dir.join("nbdkit.log")).expect("nbdkit log");
        let child = Command::new(nbdkit)
            .arg("--foreground")
            .arg("--unix")
            .arg(&sock)
            .arg("--filter=pause")
            .arg("memory")
            .arg(format!("size={size}"))
            .arg(format!("pause-control={}", control.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .spawn()
            .expect("start nbdkit");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(sock.exists() && control.exists()) {
            assert!(Instant::now() < deadline, "nbdkit did not create its sockets within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        (PausableDisk { child, control }, sock)
    }

    /// Sends `p` (pause: requests from now on hang) or `r` (resume) and
    /// waits for the filter's acknowledgement.
    fn command(&self, cmd: u8) {
        let mut s = UnixStream::connect(&self.control).expect("connect to nbdkit's pause control");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        s.write_all(&[cmd]).expect("send pause command");
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).expect("pause acknowledgement");
        assert_eq!(ack[0], cmd.to_ascii_uppercase(), "nbdkit pause filter answered {:?}", ack[0] as char);
    }
}

impl Drop for PausableDisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a daemon with a write hanging in its volume may take to stop:
/// the NBD grace period and backstop (35 s), and a margin.
const STUCK_STOP_LIMIT: Duration = Duration::from_secs(60);

/// True once process `pid` (a child not yet reaped) has exited: its
/// thread-group leader is a zombie or gone.
fn has_exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

#[test]
fn a_stop_with_a_write_stuck_in_the_volume_is_not_recorded_as_clean() {
    for tool in ["nbdkit", "nbdfuse", "fusermount3"] {
        require(tool);
    }
    if !require_root("a_stop_with_a_write_stuck_in_the_volume_is_not_recorded_as_clean") {
        return;
    }
    let (group, vol, size) = ("stuck", "stuck-vol", 16 * MIB);
    let mut opts = ClusterOpts::group(GroupSpec::new(group, Mode::Sync).volume(vol, size));
    opts.start = false;
    let mut c = Cluster::new(opts);

    // site-a's volume: a file on FUSE (nbdfuse) backed by nbdkit, whose pause
    // filter makes every request hang on demand. Declared after the cluster:
    // on a failure they go first, which unblocks a daemon stuck on them.
    let helper_dir = c.root().join("pausable");
    std::fs::create_dir_all(&helper_dir).expect("mkdir");
    let (disk, sock) = PausableDisk::start(&helper_dir, size);
    let (fuse, volume) = FuseMount::start(&helper_dir.join("mnt"), &sock, &helper_dir.join("nbdfuse.log"));
    set_volume_path(&c, Site::A, vol, &volume);

    c.start(Site::A);
    c.start(Site::B);
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 400, 16);
    c.wait_drained(group);

    // Pause the disk, then write: the write is journaled and shipped, and
    // hangs in site-a's volume.
    disk.command(b'p');
    let stuck = random_bytes(500, 65536);
    let stuck_write = {
        let (socket, data) = (c.nbd_socket(Site::A), stuck.clone());
        rt.spawn(async move {
            let client = NbdClient::connect_unix(&socket, vol).await.expect("NBD connect");
            client.write(4 * MIB, &data, false).await
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(!stuck_write.is_finished(), "the write did not hang on the paused disk");

    // SIGTERM: the daemon waits for the NBD request (grace period), gives up,
    // and exits without recording a clean shutdown. Judged before the disk
    // resumes: a daemon that waits for the volume instead (to flush it and
    // mark it clean) would be stuck until then.
    let pid = c.pid(Site::A).expect("site-a runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let started = Instant::now();
    let exited = loop {
        if has_exited(pid) {
            break Some(started.elapsed());
        }
        if started.elapsed() > STUCK_STOP_LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = c.log(Site::A);
    let clean = clean_shutdown(&c, Site::A, group);
    disk.command(b'r');
    let status = c.stop_status(Site::A);
    eprintln!("site-a exited after {exited:?} with {status}");
    assert!(
        exited.is_some(),
        "site-a did not exit within {STUCK_STOP_LIMIT:?} of SIGTERM while a write hung in its volume\n{}",
        c.diagnostics()
    );
    assert!(
        log.contains("not marking the groups clean") && log.contains("NBD request(s) were still running"),
        "site-a's log does not say why the stop was not clean\n{}",
        c.diagnostics()
    );
    assert!(
        !clean,
        "site-a recorded a clean shutdown while a write was still running in its volume\n{}",
        c.diagnostics()
    );
    // The stop failed: systemd and a runbook must see it.
    assert_eq!(status.code(), Some(1), "site-a exited with {status} after an unclean stop\n{}", c.diagnostics());

    // The disk works again; the next start replays the journal, so the
    // write that hung lands in site-a's volume as it did on site-b.
    let log_len = c.log(Site::A).len();
    c.start(Site::A);
    let restarted = c.log(Site::A)[log_len..].to_string();
    assert!(
        restarted.contains("did not stop cleanly: replaying the journal"),
        "the restart after an unclean stop did not replay the journal:\n{restarted}"
    );
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    let secondary = c.volume_path(Site::B, vol);
    match compare_files(&volume, &secondary) {
        FileDiff::Identical => {}
        diff => panic!("group {group} volume {vol}: the sites differ: {diff:?}\n{}", c.diagnostics()),
    }
    let landed = std::fs::read(&secondary).expect("read secondary");
    assert!(landed[4 * MIB as usize..][..stuck.len()] == stuck[..], "the write that hung is missing");
    drop(fuse);
    drop(disk);
}

/// A local read error in the middle of a write (the read-modify-write of an
/// unaligned request, after the write took its journal sequence) leaves a
/// hole no later record may pass. The group stops taking writes at once
/// (SUSPENDED(error), writes fail instead of hanging behind the hole), and a
/// restart recovers the journal and replicates again.
#[test]
fn a_local_read_error_during_a_write_stops_the_group_instead_of_hanging_it() {
    for tool in ["nbdkit", "nbdfuse", "fusermount3"] {
        require(tool);
    }
    if !require_root("a_local_read_error_during_a_write_stops_the_group_instead_of_hanging_it") {
        return;
    }
    let (group, vol, size) = ("failing", "failing-vol", 16 * MIB);
    let mut opts = ClusterOpts::group(GroupSpec::new(group, Mode::Async).volume(vol, size));
    opts.start = false;
    let mut c = Cluster::new(opts);
    // site-a's volume: nbdfuse over nbdkit's memory disk behind its error
    // filter, which fails every read while the trigger file exists.
    let helper_dir = c.root().join("failing");
    std::fs::create_dir_all(&helper_dir).expect("mkdir");
    let (sock, trigger) = (helper_dir.join("nbdkit.sock"), helper_dir.join("fail-reads"));
    let log = std::fs::File::create(helper_dir.join("nbdkit.log")).expect("nbdkit log");
    let nbdkit = Command::new(require("nbdkit"))
        .args(["--foreground", "--unix"])
        .arg(&sock)
        .args(["--filter=error", "memory", &format!("size={size}"), "error=EIO", "error-pread-rate=100%"])
        .arg(format!("error-pread-file={}", trigger.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone"))
        .stderr(log)
        .spawn()
        .expect("start nbdkit");
    // Killed and reaped however the test ends.
    let _nbdkit = KillOnDrop(nbdkit);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not create its socket within 30s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (fuse, volume) = FuseMount::start(&helper_dir.join("mnt"), &sock, &helper_dir.join("nbdfuse.log"));
    set_volume_path(&c, Site::A, vol, &volume);
    c.start(Site::A);
    c.start(Site::B);
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 700, 8);
    c.wait_drained(group);
    if !c.status(Site::A, group).direct_io {
        // Reads would come from the page cache and never fail.
        eprintln!("skipping: the FUSE volume is not opened with O_DIRECT here");
        drop(fuse);
        return;
    }

    std::fs::write(&trigger, b"").expect("trigger");
    let (unaligned, after) = rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("NBD connect");
        let unaligned = client.write(6 * MIB + 512, &[7u8; 1000], false).await;
        let after = tokio::time::timeout(Duration::from_secs(10), client.write(8 * MIB, &[8u8; 4096], false)).await;
        (unaligned, after)
    });
    assert!(unaligned.is_err(), "the write whose read-modify-write failed must fail");
    match after {
        Ok(Err(_)) => {}
        Ok(Ok(())) => panic!("a later write must not be acknowledged past the hole"),
        Err(_) => panic!("a later write hung behind the hole instead of failing\n{}", c.diagnostics()),
    }
    let s = c.status(Site::A, group);
    assert_eq!((s.state.as_str(), s.reason.as_deref()), ("SUSPENDED", Some("error")), "{s:?}");
    assert!(s.last_error.as_deref().unwrap_or("").contains("stopped taking writes"), "{s:?}");

    std::fs::remove_file(&trigger).expect("clear the fault");
    // A stopped group is not marked clean: the stop says it failed.
    let status = c.stop_status(Site::A);
    assert_eq!(status.code(), Some(1), "stopping a daemon whose group had stopped: {status}\n{}", c.diagnostics());
    c.start(Site::A);
    c.wait_pair(group, Duration::from_secs(60));
    write_blocks(&rt, &c, vol, 800, 8);
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    assert_eq!(compare_files(&volume, &c.volume_path(Site::B, vol)), FileDiff::Identical, "{}", c.diagnostics());
    drop(fuse);
}

/// A write to a region the activity log does not hold waits for the log's
/// save; a save that keeps failing (here the file is made immutable, as a
/// failing `state_dir` would) does not hold it for ever: the group stops and
/// the write fails, and a restart once the file is writable again replays
/// the journal and replicates.
#[test]
fn writes_waiting_for_a_metadata_save_that_keeps_failing_fail_and_the_group_stops() {
    if !require_root("writes_waiting_for_a_metadata_save_that_keeps_failing_fail_and_the_group_stops") {
        return;
    }
    let (group, vol) = ("ms", "ms-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Async).volume(vol, 64 * MIB)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 900, 8);
    c.wait_drained(group);

    let log = state_dir(&c, Site::A).join("groups").join(group).join("activity-log");
    assert!(log.exists(), "no activity log at {}", log.display());
    let immutable = Immutable::set(log);
    let started = Instant::now();
    let written = rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("NBD connect");
        // 48 MiB: a region no earlier write touched.
        tokio::time::timeout(Duration::from_secs(90), client.write(48 * MIB, &random_bytes(901, 4096), false)).await
    });
    match written {
        Ok(Err(_)) => {}
        Ok(Ok(())) => panic!("a write was acknowledged while its region could not be recorded"),
        Err(_) => panic!("the write still waits for the failing save after 90 s\n{}", c.diagnostics()),
    }
    eprintln!("the write failed after {:?}", started.elapsed());
    let s = c.status(Site::A, group);
    assert_eq!((s.state.as_str(), s.reason.as_deref()), ("SUSPENDED", Some("error")), "{s:?}");
    assert!(s.last_error.as_deref().unwrap_or("").contains("could not be saved"), "{s:?}");

    drop(immutable);
    let status = c.stop_status(Site::A);
    assert_eq!(status.code(), Some(1), "stopping a daemon whose group had stopped: {status}\n{}", c.diagnostics());
    c.start(Site::A);
    c.wait_pair(group, Duration::from_secs(60));
    write_blocks(&rt, &c, vol, 902, 8);
    c.assert_converged(group);
}

/// A helper process, killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `journal_size` changed in the config of a paired node (SIGHUP says it
/// applies at the restart): the restart keeps the journal file, and its
/// records, at the size they were written in, instead of refusing to start
/// the node; the pair resumes and the journal takes the new size when it
/// starts over.
#[test]
fn a_changed_journal_size_does_not_keep_a_paired_node_from_starting() {
    let (group, vol) = ("js", "js-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Async).volume(vol, 16 * MIB)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 900, 16);
    c.wait_drained(group);
    // Journaled while the secondary is away: only the journal holds them
    // for site-b.
    c.kill9(Site::B);
    write_blocks(&rt, &c, vol, 901, 16);
    c.stop(Site::A);
    let journal = state_dir(&c, Site::A).join("groups").join(group).join("journal");
    assert_eq!(std::fs::metadata(&journal).expect("journal").len(), 64 * MIB);
    for site in [Site::A, Site::B] {
        let path = c.config_path(site).to_path_buf();
        let text = std::fs::read_to_string(&path).expect("read config");
        let changed = text.replace(&format!("journal_size = \"{}\"", 64 * MIB), "journal_size = \"32MiB\"");
        assert_ne!(changed, text, "the harness's config names journal_size");
        std::fs::write(&path, changed).expect("write config");
    }
    let log_len = c.log(Site::A).len();
    c.start(Site::A);
    assert!(
        c.log(Site::A)[log_len..].contains("journal_size differs from the journal file's size"),
        "the start must say the journal keeps its size\n{}",
        c.diagnostics()
    );
    assert_eq!(std::fs::metadata(&journal).expect("journal").len(), 64 * MIB, "the journal was rewritten");
    c.start(Site::B);
    c.assert_converged(group);
}

/// The primary's journal file is gone at a start (removed by hand, a state
/// directory restored from a backup) while it held writes the secondary
/// never received: the start says so and resynchronises the whole volumes,
/// where it created an empty journal and resumed as if nothing were owed
/// (the secondary then stayed without those writes, in PAIR).
#[test]
fn a_primary_whose_journal_is_missing_resyncs_instead_of_forgetting_writes() {
    let (group, vol) = ("jm", "jm-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Async).volume(vol, 16 * MIB)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 910, 16);
    c.wait_drained(group);
    c.stop(Site::B);
    write_blocks(&rt, &c, vol, 911, 16);
    c.stop(Site::A);
    let journal = state_dir(&c, Site::A).join("groups").join(group).join("journal");
    std::fs::remove_file(&journal).expect("remove the primary's journal");
    let log_len = c.log(Site::A).len();
    c.start(Site::A);
    assert!(
        c.log(Site::A)[log_len..].contains("the journal file is missing"),
        "the start must say the journal is missing\n{}",
        c.diagnostics()
    );
    c.start(Site::B);
    c.assert_converged(group);
}

/// A secondary's restore journal is gone at a start after an unclean stop
/// (removed by hand, a state directory restored from a backup): the records
/// it held beyond the checkpoint may have reached the volumes in part, so
/// the replica is no longer an image the primary ever had. The start says
/// so, the replica is inconsistent (a failover would refuse it), and the
/// primary compares and copies the whole volumes; before, it started as
/// consistent with an empty journal.
#[test]
fn a_secondary_whose_restore_journal_is_missing_is_inconsistent_until_compared_whole() {
    let (group, vol) = ("rjm", "rjm-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Async).volume(vol, 16 * MIB)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 920, 16);
    c.wait_drained(group);
    c.kill9(Site::B);
    c.stop(Site::A);
    std::fs::remove_file(state_dir(&c, Site::B).join("groups").join(group).join("journal"))
        .expect("remove the secondary's restore journal");
    // Stands for the part of the lost records that reached the volume:
    // nothing the primary will send again covers it.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(c.volume_path(Site::B, vol)).expect("open volume");
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(9 * MIB)).expect("seek");
        f.write_all(&random_bytes(921, 64 * 1024)).expect("write the volume");
        f.sync_all().expect("sync the volume");
    }
    let log_len = c.log(Site::B).len();
    c.start(Site::B);
    assert!(
        c.log(Site::B)[log_len..].contains("restore journal: the file is missing after an unclean stop"),
        "the start must say the restore journal is missing\n{}",
        c.diagnostics()
    );
    let status = c.status(Site::B, group);
    assert!(!status.consistent && status.needs_rebase, "the replica must not claim consistency: {status:?}");
    // Again after a restart: the journal file exists by now.
    c.kill9(Site::B);
    c.start(Site::B);
    let status = c.status(Site::B, group);
    assert!(!status.consistent && status.needs_rebase, "a restart must not forget it: {status:?}");
    c.start(Site::A);
    c.wait_pair(group, Duration::from_secs(60));
    c.wait_drained(group);
    assert!(c.status(Site::B, group).consistent, "the replica is consistent once compared");
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical(group);
}

/// The secondary comes back with its restore journal gone before the
/// primary noticed it was away (within `link_timeout`, the primary still
/// in PAIR): the primary must show COPY while it compares and copies the
/// whole volumes (the replica is inconsistent meanwhile: no RPO 0 claim,
/// no switchover onto it), and PAIR again after.
#[test]
fn a_peer_back_without_its_restore_journal_puts_the_primary_in_copy() {
    let (group, vol) = ("rjp", "rjp-vol");
    let spec = GroupSpec::new(group, Mode::Sync).volume(vol, 16 * MIB).link_timeout(Duration::from_secs(60));
    let mut c = Cluster::new(ClusterOpts::group(spec));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = runtime();
    write_blocks(&rt, &c, vol, 930, 16);
    c.wait_drained(group);
    c.kill9(Site::B);
    std::fs::remove_file(state_dir(&c, Site::B).join("groups").join(group).join("journal"))
        .expect("remove the secondary's restore journal");
    assert_eq!(c.status(Site::A, group).state, "PAIR", "the primary has not noticed yet");
    c.start(Site::B);
    c.wait_pair(group, Duration::from_secs(60));
    let log = c.log(Site::A);
    assert!(
        log.lines().any(|l| l.contains("pair state change") && l.contains("to=COPY")),
        "the primary never showed COPY while it copied into an inconsistent replica\n{}",
        c.diagnostics()
    );
    c.wait_drained(group);
    assert!(c.status(Site::B, group).consistent);
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical(group);
}
