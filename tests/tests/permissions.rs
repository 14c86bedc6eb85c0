//! Least privilege on the file system (issue 12, item 4): the daemon's
//! directories and files get their modes whatever the umask, sockets are
//! never created through a symbolic link, a private key others may read is
//! refused, and `cert issue` refuses a validity that is not positive.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use replicator_tests::{describe_output, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn cluster(start: bool) -> Cluster {
    let mut o = ClusterOpts::group(GroupSpec::new("perms", Mode::Sync).volume("perms-vol", 16 * MIB));
    o.start = start;
    Cluster::new(o)
}

fn site_dir(c: &Cluster, site: Site) -> PathBuf {
    c.root().join(site.label())
}

/// Everything the daemon creates has its mode even when it runs with a
/// umask of 000 (inherited from this process: the daemons are spawned after
/// it is set).
#[test]
fn daemon_files_are_private_whatever_the_umask() {
    // Process-wide, but nothing else in this test binary depends on it.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let mut c = cluster(true);
    c.pair_create("perms");
    c.wait_pair("perms", Duration::from_secs(60));
    // A drill leaves its line in the secondary's drill history.
    for cmd in ["start", "stop"] {
        let out = c.cli(Site::B, &["drill", cmd, "perms"]);
        assert!(out.status.success(), "drill {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for site in [Site::A, Site::B] {
        let dir = site_dir(&c, site);
        // The harness created the site directory: proof the umask is 000.
        assert_eq!(mode_of(&dir), 0o777, "{site}: the test's umask did not apply");
        let state = dir.join("state");
        let group = state.join("groups").join("perms");
        let run = dir.join("run");
        let mut expected = vec![
            (state.clone(), 0o700),
            (state.join("groups"), 0o700),
            (group.clone(), 0o700),
            (state.join("lock"), 0o600),
            (run.clone(), 0o750),
            (c.control_socket(site), 0o660),
            (c.nbd_socket(site), 0o660),
            (c.volume_path(site, "perms-vol"), 0o600),
        ];
        // state.json, the journal (primary), bitmaps, the activity log, the
        // drill history (secondary).
        let files: Vec<PathBuf> =
            std::fs::read_dir(&group).expect("read group dir").map(|e| e.expect("dir entry").path()).collect();
        let names: Vec<String> =
            files.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
        assert!(names.iter().any(|n| n == "state.json"), "{site}: no state.json in {names:?}");
        if site == Site::A {
            assert!(names.iter().any(|n| n == "journal"), "{site}: no journal in {names:?}");
        } else {
            assert!(names.iter().any(|n| n == "drill-history.jsonl"), "{site}: no drill history in {names:?}");
        }
        expected.extend(files.into_iter().map(|p| (p, 0o600)));
        for (path, mode) in expected {
            assert_eq!(
                mode_of(&path),
                mode,
                "{site}: {} has mode {:04o}, expected {mode:04o}\n{}",
                path.display(),
                mode_of(&path),
                c.diagnostics()
            );
        }
    }

    // A run_dir and a state_dir left too wide are tightened at the next start.
    c.stop(Site::A);
    let dir = site_dir(&c, Site::A);
    std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o777)).expect("chmod run_dir");
    std::fs::set_permissions(dir.join("state"), std::fs::Permissions::from_mode(0o755)).expect("chmod state_dir");
    c.start(Site::A);
    assert_eq!(mode_of(&dir.join("run")), 0o750);
    assert_eq!(mode_of(&dir.join("state")), 0o700);
    assert!(c.log(Site::A).contains("tightened to 0750"), "the tightening is logged\n{}", c.log(Site::A));
}

/// A symbolic link planted where the control socket goes makes the daemon
/// refuse to start; the link and its target are left alone.
#[test]
fn symlink_at_the_control_socket_is_refused() {
    let c = cluster(false);
    let run = site_dir(&c, Site::A).join("run");
    std::fs::create_dir_all(&run).expect("mkdir run_dir");
    let victim = c.root().join("victim");
    std::fs::write(&victim, b"not a socket").expect("write victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod victim");
    let link = c.control_socket(Site::A);
    std::os::unix::fs::symlink(&victim, &link).expect("plant symlink");

    let out = run_with_timeout(
        Command::new(c.bin())
            .arg("--config")
            .arg(c.config_path(Site::A))
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("REPLICATOR_CONFIG"),
        Duration::from_secs(60),
    );
    assert_eq!(code(&out), 1, "the daemon must refuse to start\n{}", describe_output(&out));
    let err = stderr(&out);
    assert!(err.contains(&link.display().to_string()), "names the socket path\n{}", describe_output(&out));
    assert!(err.contains("symbolic link"), "says it is a symbolic link\n{}", describe_output(&out));
    assert!(
        std::fs::symlink_metadata(&link).expect("link").file_type().is_symlink(),
        "the link is left for the admin to inspect"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"not a socket");
    assert_eq!(mode_of(&victim), 0o600, "the link's target is not chmod-ed");
    assert!(!site_dir(&c, Site::A).join("perms-vol.img").exists(), "refused before any volume was created");
}

/// `config check` (and so the daemon) refuses a key its group or others
/// may read, naming the file, the mode and the fix.
#[test]
fn config_check_refuses_a_readable_key() {
    let c = cluster(false);
    let key = c.root().join("certs").join("site-a.key");
    assert_eq!(mode_of(&key), 0o600, "keys are issued 0600");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod key");
    let out = run_with_timeout(
        Command::new(c.bin())
            .arg("--config")
            .arg(c.config_path(Site::A))
            .args(["config", "check"])
            .env_remove("REPLICATOR_CONFIG"),
        Duration::from_secs(30),
    );
    assert_eq!(code(&out), 2, "a 0644 key is a configuration error\n{}", describe_output(&out));
    let err = stderr(&out);
    for needle in [key.display().to_string(), "0644".to_string(), format!("chmod 600 {}", key.display())] {
        assert!(err.contains(&needle), "stderr should contain {needle:?}\n{}", describe_output(&out));
    }
}

/// `cert issue --days N` with N <= 0 is a usage error and writes nothing.
#[test]
fn cert_issue_refuses_a_non_positive_validity() {
    let c = cluster(false);
    let out_dir = c.root().join("more-certs");
    for days in ["0", "-1"] {
        let out = run_with_timeout(
            Command::new(c.bin())
                .args(["cert", "issue", "--ca-dir"])
                .arg(c.root().join("ca"))
                .args(["--name", "site-c", "--out"])
                .arg(&out_dir)
                .arg(format!("--days={days}")),
            Duration::from_secs(30),
        );
        assert_eq!(code(&out), 2, "--days {days} must be refused\n{}", describe_output(&out));
        assert!(stderr(&out).contains("--days"), "names the option\n{}", describe_output(&out));
        assert!(!out_dir.join("site-c.key").exists(), "--days {days} wrote a key");
    }
    let out = run_with_timeout(
        Command::new(c.bin())
            .args(["cert", "issue", "--ca-dir"])
            .arg(c.root().join("ca"))
            .args(["--name", "site-c", "--out"])
            .arg(&out_dir)
            .arg("--days=1"),
        Duration::from_secs(30),
    );
    assert_eq!(code(&out), 0, "--days 1 works\n{}", describe_output(&out));
    assert_eq!(mode_of(&out_dir.join("site-c.key")), 0o600);
}
