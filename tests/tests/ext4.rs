//! A real file system on a replicated volume (root only: FUSE, loop devices,
//! mount): nbdfuse exposes the primary's export as a file, losetup makes it a
//! block device, mkfs.ext4 + mount + files with known content + sync +
//! umount. Then both sites stop, e2fsck must find the SECONDARY's backing
//! file clean, and the files read back from it (loop-mounted read-only) must
//! match what was written. Before that, a drill copy of the secondary,
//! taken while the file system is mounted on the primary, mounts, holds the
//! files, takes a write and fscks clean, and that write never reaches the
//! replica.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replicator_tests::pattern::random_bytes;
use replicator_tests::{
    describe_output, require, require_root, run_ok, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site,
};

const MIB: u64 = 1 << 20;
/// Limit for each external command (mkfs, mount, sync...).
const T: Duration = Duration::from_secs(60);

/// Undoes mounts, loop devices and the FUSE mount in reverse order, also when
/// the test fails half-way.
#[derive(Default)]
struct Cleanup {
    steps: Vec<(String, Box<dyn FnOnce()>)>,
}

impl Cleanup {
    fn push(&mut self, what: &str, f: impl FnOnce() + 'static) {
        self.steps.push((what.to_string(), Box::new(f)));
    }

    /// Runs the newest step now (the normal, checked path did it already).
    fn pop(&mut self) {
        self.steps.pop();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some((what, f)) = self.steps.pop() {
            eprintln!("ext4 test cleanup: {what}");
            f();
        }
    }
}

fn quiet(cmd: &Path, args: &[&str]) {
    let _ = Command::new(cmd).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn files() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (i, size) in [3 * MIB + 12345, MIB, 2 * MIB, 777, 4096, 5 * MIB / 2].iter().enumerate() {
        v.push((format!("file-{i}.bin"), random_bytes(1000 + i as u64, *size as usize)));
    }
    for i in 0..40 {
        v.push((format!("dir/small-{i}.txt"), format!("small file {i}\n").repeat(i + 1).into_bytes()));
    }
    v
}

fn write_files(root: &Path) {
    std::fs::create_dir_all(root.join("dir")).expect("mkdir");
    for (name, data) in files() {
        std::fs::write(root.join(&name), &data).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
}

fn check_files(root: &Path) {
    for (name, data) in files() {
        let got = std::fs::read(root.join(&name)).unwrap_or_else(|e| panic!("read {name} from the secondary: {e}"));
        assert_eq!(got.len(), data.len(), "{name}: length on the secondary");
        if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
            panic!("{name}: content differs on the secondary at byte {i}");
        }
    }
}

fn spawn_nbdfuse(c: &Cluster, site: Site, export: &str, mountpoint: &Path, pidfile: &Path) -> Child {
    let nbdfuse = require("nbdfuse");
    let log = std::fs::File::create(c.root().join("nbdfuse.log")).expect("nbdfuse log");
    let log2 = log.try_clone().expect("clone");
    let mut child = Command::new(nbdfuse)
        .arg("-P")
        .arg(pidfile)
        .arg(mountpoint.join("nbd"))
        .arg(c.nbd_uri(site, export))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("start nbdfuse");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(pidfile.exists() && mountpoint.join("nbd").exists()) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "nbdfuse exited with {st}: {}\n{}",
                std::fs::read_to_string(c.root().join("nbdfuse.log")).unwrap_or_default(),
                c.diagnostics()
            );
        }
        assert!(Instant::now() < deadline, "nbdfuse did not become ready within 30s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn ext4_on_primary_is_clean_and_readable_on_secondary() {
    require("nbdfuse");
    let losetup = require("losetup");
    let mkfs = require("mkfs.ext4");
    let e2fsck = require("e2fsck");
    let mount = require("mount");
    let umount = require("umount");
    let fusermount = require("fusermount3");
    if !require_root("ext4_on_primary_is_clean_and_readable_on_secondary") {
        return;
    }

    let (group, vol) = ("fs", "fs-vol");
    let mut c = Cluster::new(ClusterOpts::group(
        GroupSpec::new(group, Mode::Sync).volume(vol, 128 * MIB).journal_size(256 * MIB),
    ));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));

    let fuse_dir = c.root().join("fuse");
    let mnt = c.root().join("mnt");
    let mnt2 = c.root().join("mnt-secondary");
    for d in [&fuse_dir, &mnt, &mnt2] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mut cleanup = Cleanup::default();

    // nbdfuse: DIR/nbd is the export as a file.
    let mut nbdfuse = spawn_nbdfuse(&c, Site::A, vol, &fuse_dir, &c.root().join("nbdfuse.pid"));
    let nbdfuse_pid = nbdfuse.id() as i32;
    {
        let (fm, d) = (fusermount.clone(), fuse_dir.clone());
        cleanup.push("fusermount3 -u + kill nbdfuse", move || {
            quiet(&fm, &["-u", &d.display().to_string()]);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(nbdfuse_pid), nix::sys::signal::Signal::SIGKILL);
        });
    }

    // Loop device over it.
    let out = run_ok(Command::new(&losetup).arg("-f").arg("--show").arg(fuse_dir.join("nbd")), T);
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(loopdev.starts_with("/dev/loop"), "losetup printed {loopdev:?}");
    {
        let (l, d) = (losetup.clone(), loopdev.clone());
        cleanup.push(&format!("losetup -d {loopdev}"), move || quiet(&l, &["-d", &d]));
    }

    // mkfs.ext4 first discards the whole device (one 128 MiB TRIM) and zeroes
    // its journal: replicating those is part of the test.
    c.run_while_healthy(Command::new(&mkfs).args(["-q", "-F"]).arg(&loopdev), T);
    c.run_while_healthy(Command::new(&mount).arg(&loopdev).arg(&mnt), T);
    {
        let (u, m) = (umount.clone(), mnt.clone());
        cleanup.push("umount primary mount", move || quiet(&u, &["-l", &m.display().to_string()]));
    }
    write_files(&mnt);
    c.run_while_healthy(&mut Command::new("sync"), T);
    check_files(&mnt);

    // A drill copy of the replica, taken while the primary's file system is
    // mounted (as in a real drill): it mounts (replaying the ext4 journal
    // into the copy), holds the files, takes writes, and fscks clean.
    c.wait_drained(group);
    let out = c.cli(Site::B, &["drill", "start", group]);
    assert!(out.status.success(), "drill start: {}", describe_output(&out));
    let (drill_fuse, drill_mnt) = (c.root().join("fuse-drill"), c.root().join("mnt-drill"));
    for d in [&drill_fuse, &drill_mnt] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let mut drill_nbdfuse =
        spawn_nbdfuse(&c, Site::B, &format!("drill/{vol}"), &drill_fuse, &c.root().join("nbdfuse-drill.pid"));
    let out = run_ok(Command::new(&losetup).arg("-f").arg("--show").arg(drill_fuse.join("nbd")), T);
    let drill_loop = String::from_utf8_lossy(&out.stdout).trim().to_string();
    run_ok(Command::new(&mount).arg(&drill_loop).arg(&drill_mnt), T);
    check_files(&drill_mnt);
    std::fs::write(drill_mnt.join("written-in-the-drill"), b"drill").expect("write into the drill copy");
    run_ok(Command::new(&umount).arg(&drill_mnt), T);
    let fsck = run_with_timeout(Command::new(&e2fsck).arg("-fn").arg(&drill_loop), T);
    assert!(fsck.status.success(), "e2fsck -fn on the drill copy: {}\n{}", fsck.status, describe_output(&fsck));
    run_ok(Command::new(&losetup).arg("-d").arg(&drill_loop), T);
    run_ok(Command::new(&fusermount).arg("-u").arg(&drill_fuse), T);
    let _ = drill_nbdfuse.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped = loop {
        let out = c.cli(Site::B, &["drill", "stop", group]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(stopped.status.success(), "drill stop: {}", describe_output(&stopped));

    // Orderly teardown on the happy path (each step checked).
    run_ok(Command::new(&umount).arg(&mnt), T);
    cleanup.pop();
    run_ok(Command::new(&losetup).arg("-d").arg(&loopdev), T);
    cleanup.pop();
    run_ok(Command::new(&fusermount).arg("-u").arg(&fuse_dir), T);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = nbdfuse.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = nbdfuse.kill();
            let _ = nbdfuse.wait();
            panic!("nbdfuse did not exit after fusermount3 -u");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cleanup.pop();

    c.wait_drained(group);
    c.assert_no_session_breaks("after the file system work");
    c.stop(Site::A);
    c.stop(Site::B);

    let secondary: PathBuf = c.volume_path(Site::B, vol);
    let fsck = run_with_timeout(Command::new(&e2fsck).arg("-fn").arg(&secondary), T);
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the secondary's backing file failed: {}\n{}",
        fsck.status,
        describe_output(&fsck)
    );

    run_ok(Command::new(&mount).args(["-o", "ro,loop"]).arg(&secondary).arg(&mnt2), T);
    {
        let (u, m) = (umount.clone(), mnt2.clone());
        cleanup.push("umount secondary mount", move || quiet(&u, &["-l", &m.display().to_string()]));
    }
    check_files(&mnt2);
    assert!(!mnt2.join("written-in-the-drill").exists(), "a write into the drill copy reached the replica");
    run_ok(Command::new(&umount).arg(&mnt2), T);
    cleanup.pop();

    c.assert_volumes_identical(group);
}
