//! Packaging and least privilege under systemd (issue 12, items 5 and 7),
//! through the real binary:
//! - the man pages (`replicator generate man`) render without groff
//!   warnings, one per command, the hidden `generate` left out;
//! - the completions (`replicator generate completions`) parse in bash, zsh
//!   and fish, and bash completes real subcommands (and not `generate`);
//! - the assets listed in `[package.metadata.deb]` exist once generated;
//! - `config systemd-dropin` for a config with a loop device, a volume file
//!   and a peer grants exactly those; `systemd-analyze verify` accepts the
//!   unit with that drop-in, and `systemd-analyze security` rates it ≤ 2.0;
//! - `config check` (the unit's ExecStartPre) fails on a volume on a
//!   read-only file system, which `run` could not open read-write.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use replicator_tests::{describe_output, replicator_bin, require, require_root, run_ok, run_with_timeout};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `replicator ARGS` and returns the files it printed (one per line).
fn generate(what: &str, dir: &Path) -> Vec<PathBuf> {
    let out = run_ok(Command::new(replicator_bin()).arg("generate").arg(what).arg(dir), T);
    stdout(&out).lines().map(PathBuf::from).collect()
}

/// The visible subcommands `replicator --help` lists.
fn top_level_commands() -> Vec<String> {
    let out = run_ok(Command::new(replicator_bin()).arg("--help"), T);
    let help = stdout(&out);
    let section = help.split("Commands:").nth(1).expect("--help lists commands");
    let section = section.split("Options:").next().unwrap_or(section);
    section.lines().filter_map(|l| l.split_whitespace().next()).filter(|c| *c != "help").map(str::to_string).collect()
}

#[test]
fn man_pages_render_one_per_command() {
    let groff = require("groff");
    let man = require("man");
    let dir = tempfile::tempdir().expect("tempdir");
    let pages = generate("man", dir.path());
    let names: Vec<String> =
        pages.iter().map(|p| p.file_name().expect("file name").to_string_lossy().into_owned()).collect();
    let commands = top_level_commands();
    assert!(commands.len() >= 8, "replicator --help lists {commands:?}");
    assert!(!commands.iter().any(|c| c == "generate"), "the hidden `generate` shows in --help: {commands:?}");
    let mut expected = vec!["replicator.1".to_string()];
    expected.extend(commands.iter().map(|c| format!("replicator-{c}.1")));
    expected.extend(
        [
            "pair-create",
            "pair-resync",
            "cert-issue",
            "config-check",
            "config-systemd-dropin",
            "drill-run",
            "drill-start",
        ]
        .iter()
        .map(|c| format!("replicator-{c}.1")),
    );
    for e in &expected {
        assert!(names.contains(e), "no man page {e} among {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("generate") || n.contains("help")), "{names:?}");
    for page in &pages {
        // -ww: every warning; -z: parse and format, no output.
        let out = run_with_timeout(Command::new(&groff).args(["-mandoc", "-Tutf8", "-ww", "-z"]).arg(page), T);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff on {}:\n{}",
            page.display(),
            describe_output(&out)
        );
    }
    let out = run_ok(
        Command::new(&man)
            .arg("-l")
            .arg(dir.path().join("replicator-config-systemd-dropin.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        T,
    );
    let text = stdout(&out);
    for needle in ["NAME", "SYNOPSIS", "replicator config systemd-dropin", "--allow", "--output"] {
        assert!(text.contains(needle), "man -l output lacks {needle:?}:\n{text}");
    }
    let out = run_ok(Command::new(&man).arg("-l").arg(dir.path().join("replicator.1")).env("MANPAGER", "cat"), T);
    let text = stdout(&out);
    assert!(text.contains("switchover") && text.contains("REPLICATOR_CONFIG"), "replicator.1:\n{text}");
}

#[test]
fn completions_parse_and_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = generate("completions", dir.path());
    let bash_script = dir.path().join("replicator.bash");
    let zsh_script = dir.path().join("_replicator");
    let fish_script = dir.path().join("replicator.fish");
    assert_eq!(files, [bash_script.clone(), zsh_script.clone(), fish_script.clone()]);

    let bash = require("bash");
    run_ok(Command::new(&bash).arg("-n").arg(&bash_script), T);
    run_ok(Command::new(require("zsh")).arg("-n").arg(&zsh_script), T);
    run_ok(Command::new(require("fish")).arg("--no-execute").arg(&fish_script), T);

    // What bash offers after `replicator ` and after `replicator config `.
    let complete = |words: &[&str]| -> Vec<String> {
        let script = format!(
            "source {}; COMP_WORDS=({} ''); COMP_CWORD={}; COMP_LINE='{} '; COMP_POINT=${{#COMP_LINE}}; \
             _replicator replicator '' {}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash_script.display(),
            words.join(" "),
            words.len(),
            words.join(" "),
            words.last().expect("a word")
        );
        let out = run_ok(Command::new(&bash).arg("-c").arg(script), T);
        stdout(&out).lines().map(str::to_string).collect()
    };
    let top = complete(&["replicator"]);
    for c in top_level_commands() {
        assert!(top.contains(&c), "bash does not complete `replicator {c}`: {top:?}");
    }
    assert!(!top.iter().any(|c| c == "generate"), "bash completes the hidden `generate`: {top:?}");
    let config = complete(&["replicator", "config"]);
    assert!(config.contains(&"check".to_string()) && config.contains(&"systemd-dropin".to_string()), "{config:?}");
    // The fish script names the subcommands too.
    let fish_text = std::fs::read_to_string(&fish_script).expect("read fish script");
    assert!(fish_text.contains("systemd-dropin") && !fish_text.contains("generate"), "{fish_text}");
}

/// Every asset `[package.metadata.deb]` lists exists: in the repository, or
/// (`target/release/packaging/...`) among what `generate` writes, as
/// `replicator/packaging/build-deb.sh` lays it out; the unit and sysusers
/// snippets are where cargo-deb's systemd-units looks for them.
#[test]
fn deb_assets_exist() {
    let crate_dir = repo_root().join("replicator");
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).expect("read replicator/Cargo.toml");
    let manifest: toml::Table = toml::from_str(&manifest).expect("parse replicator/Cargo.toml");
    let deb = manifest
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("deb"))
        .and_then(toml::Value::as_table)
        .expect("[package.metadata.deb]");
    let generated = tempfile::tempdir().expect("tempdir");
    generate("man", &generated.path().join("man"));
    generate("completions", &generated.path().join("completions"));
    let gz = Command::new(require("gzip"))
        .arg("-9n")
        .args(std::fs::read_dir(generated.path().join("man")).expect("man dir").map(|e| e.expect("entry").path()))
        .status()
        .expect("gzip");
    assert!(gz.success());

    let assets = deb.get("assets").and_then(toml::Value::as_array).expect("assets");
    let mut dests = Vec::new();
    for asset in assets {
        let a = asset.as_array().expect("an asset is [source, dest, mode]");
        let (src, dest) = (a[0].as_str().expect("source"), a[1].as_str().expect("dest"));
        dests.push(dest.to_string());
        let (dir, pattern) = match src.strip_prefix("target/release/packaging/") {
            Some(rest) => (generated.path().to_path_buf(), rest.to_string()),
            None if src == "target/release/replicator" => {
                assert!(replicator_bin().is_file());
                continue;
            }
            None => (crate_dir.clone(), src.to_string()),
        };
        let (sub, name) = pattern.rsplit_once('/').unwrap_or(("", pattern.as_str()));
        let matches: Vec<PathBuf> = match name.strip_prefix('*') {
            Some(suffix) => std::fs::read_dir(dir.join(sub))
                .expect("asset directory")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect(),
            None => vec![dir.join(sub).join(name)].into_iter().filter(|p| p.is_file()).collect(),
        };
        assert!(!matches.is_empty(), "asset {src:?} (→ {dest}) matches no file");
    }
    for d in [
        "usr/bin/",
        "usr/share/man/man1/",
        "usr/share/bash-completion/completions/replicator",
        "usr/share/zsh/vendor-completions/",
        "usr/share/fish/vendor_completions.d/",
        "usr/lib/tmpfiles.d/replicator.conf",
        "etc/replicator/replicator.toml",
    ] {
        assert!(dests.iter().any(|x| x == d), "no asset installed to {d}: {dests:?}");
    }
    let scripts = deb.get("maintainer-scripts").and_then(toml::Value::as_str).expect("maintainer-scripts");
    for f in ["replicator.service", "replicator.sysusers"] {
        assert!(crate_dir.join(scripts).join(f).is_file(), "{scripts}{f} missing (cargo-deb systemd-units)");
    }
    let sysusers = std::fs::read_to_string(crate_dir.join(scripts).join("replicator.sysusers")).expect("sysusers");
    assert!(!sysusers.lines().any(|l| l.starts_with("m ")), "the user is put in a group:\n{sysusers}");
}

/// A loop device, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = run_ok(Command::new(require("losetup")).args(["-f", "--show"]).arg(file), T);
        let dev = stdout(&out).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A config for site-a with certificates in `dir` and the given volumes.
fn write_config(dir: &Path, peer: &str, volumes: &str) -> PathBuf {
    let ca = dir.join("ca");
    let certs = dir.join("certs");
    replicator::certs::init_ca(&ca).expect("cert init");
    replicator::certs::issue(&ca, "site-a", &certs, replicator::certs::Validity::days(2)).expect("cert issue");
    let text = format!(
        r#"[node]
name = "site-a"
listen = "127.0.0.1:7800"
state_dir = "{dir}/state"
run_dir = "{dir}/run"

[tls]
ca = "{ca}/ca.pem"
cert = "{certs}/site-a.pem"
key = "{certs}/site-a.key"

[[peer]]
name = "site-b"
address = "{peer}"

[[group]]
name = "db"
peer = "site-b"
mode = "sync"
journal_size = "16MiB"
{volumes}
"#,
        dir = dir.display(),
        ca = ca.display(),
        certs = certs.display(),
    );
    let path = dir.join("replicator.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).and_then(|f| f.set_len(size)).expect("create a sparse file");
}

fn settings(dropin: &str, key: &str) -> Vec<String> {
    dropin.lines().filter(|l| l.starts_with(&format!("{key}="))).map(str::to_string).collect()
}

#[test]
fn systemd_dropin_grants_exactly_the_configured_device_file_and_peer() {
    if !require_root("systemd_dropin_grants_exactly_the_configured_device_file_and_peer") {
        return;
    }
    let analyze = require("systemd-analyze");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    sparse_file(&dir.join("backing.img"), 16 * MIB);
    let lo = Loop::attach(&dir.join("backing.img"));
    // A second loop device that is not configured: it must not be granted.
    sparse_file(&dir.join("other.img"), 16 * MIB);
    let other = Loop::attach(&dir.join("other.img"));
    sparse_file(&dir.join("file-vol.img"), 16 * MIB);
    std::fs::create_dir_all(dir.join("state")).expect("state dir");
    let config = write_config(
        dir,
        "192.0.2.10:7800",
        &format!(
            r#"[[group.volume]]
name = "on-loop"
path = "{}"
size = "16MiB"

[[group.volume]]
name = "in-file"
path = "{}/file-vol.img"
size = "16MiB"
"#,
            lo.dev,
            dir.display()
        ),
    );
    let bin = replicator_bin();
    // As root, the host as configured passes the check.
    run_ok(Command::new(&bin).arg("--config").arg(&config).args(["config", "check"]), T);

    let out = run_ok(Command::new(&bin).arg("--config").arg(&config).args(["config", "systemd-dropin"]), T);
    let dropin = stdout(&out);
    assert!(dropin.lines().any(|l| l == "[Service]"), "{dropin}");
    assert_eq!(settings(&dropin, "DeviceAllow"), [format!("DeviceAllow={} rw", lo.dev)], "{dropin}");
    assert!(!dropin.contains(&other.dev), "the unconfigured {} is granted:\n{dropin}", other.dev);
    // The start waits for the device, named as systemd names it.
    let escaped = run_ok(Command::new("systemd-escape").args(["--path", "--suffix=device", &lo.dev]), T);
    let device_unit = stdout(&escaped).trim().to_string();
    assert!(dropin.lines().any(|l| l == "[Unit]"), "{dropin}");
    assert_eq!(settings(&dropin, "Wants"), [format!("Wants={device_unit}")], "{dropin}");
    assert_eq!(settings(&dropin, "After"), [format!("After={device_unit}")], "{dropin}");
    let gid = std::fs::metadata(&lo.dev).expect("stat the loop device").gid();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name);
    // udev gives loop devices to group disk; without udev (a container) they
    // stay root's, and the drop-in says so instead of granting group root.
    if gid == 0 {
        assert_eq!(settings(&dropin, "SupplementaryGroups"), Vec::<String>::new(), "{dropin}");
        assert!(dropin.contains("# NOTE: ") && dropin.contains("udev rule"), "{dropin}");
    } else {
        assert_eq!(settings(&dropin, "SupplementaryGroups"), [format!("SupplementaryGroups={group}")], "{dropin}");
    }
    let run_dir = dir.join("run");
    assert_eq!(
        settings(&dropin, "ReadWritePaths"),
        [
            format!("ReadWritePaths=-{}/file-vol.img", dir.display()),
            format!("ReadWritePaths=-{}/state", dir.display()),
            format!("ReadWritePaths=-{}", run_dir.display()),
        ],
        "{dropin}"
    );
    assert_eq!(settings(&dropin, "IPAddressAllow"), ["IPAddressAllow=192.0.2.10"], "{dropin}");

    // --output writes the same bytes (atomically) where systemd reads them.
    let root = dir.join("root");
    let unit_dir = root.join("etc/systemd/system");
    let dropin_path = unit_dir.join("replicator.service.d/50-config.conf");
    run_ok(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .args(["config", "systemd-dropin", "--output"])
            .arg(&dropin_path),
        T,
    );
    assert_eq!(std::fs::read_to_string(&dropin_path).expect("read the written drop-in"), dropin);

    // The shipped unit with this drop-in: `verify` without a single warning
    // (the commands pointed at the binary under test), `security` ≤ 2.0.
    let unit = std::fs::read_to_string(repo_root().join("systemd/replicator.service")).expect("read the unit");
    assert!(!unit.contains("block-*") && !unit.contains("SupplementaryGroups"), "the unit grants devices:\n{unit}");
    std::fs::write(unit_dir.join("replicator.service"), &unit).expect("write unit");
    let verify_dir = dir.join("verify");
    std::fs::create_dir_all(verify_dir.join("replicator.service.d")).expect("verify dir");
    std::fs::write(
        verify_dir.join("replicator.service"),
        unit.replace("/usr/bin/replicator", &bin.display().to_string()),
    )
    .expect("write unit");
    std::fs::copy(&dropin_path, verify_dir.join("replicator.service.d/50-config.conf")).expect("copy drop-in");
    let out = run_with_timeout(Command::new(&analyze).arg("verify").arg(verify_dir.join("replicator.service")), T);
    assert!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify:\n{}", describe_output(&out));

    let out = run_with_timeout(
        Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg("replicator.service"),
        T,
    );
    let report = stdout(&out);
    assert!(out.status.success(), "systemd-analyze security:\n{}", describe_output(&out));
    // It read the drop-in: the loop device is in the device ACL.
    assert!(report.contains(&format!("{}:rw", lo.dev)), "the drop-in was not applied:\n{report}");
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for replicator.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{report}");
}

/// Under ProtectSystem=strict a volume file without ReadWritePaths= sits on
/// a read-only mount: the read-only probe alone would pass and `run` fail
/// (and Restart=on-failure loop). A read-only tmpfs stands in for it.
#[test]
fn config_check_fails_on_a_volume_it_could_not_write() {
    if !require_root("config_check_fails_on_a_volume_it_could_not_write") {
        return;
    }
    let mount = require("mount");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    run_ok(Command::new(&mount).args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"]).arg(&mnt), T);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    sparse_file(&mnt.join("vol.img"), 16 * MIB);
    std::fs::create_dir_all(dir.join("state")).expect("state dir");
    let config = write_config(
        dir,
        "127.0.0.1:7801",
        &format!(
            r#"[[group.volume]]
name = "vol"
path = "{}/vol.img"
size = "16MiB"

[[group.volume]]
name = "new"
path = "{}/new.img"
size = "16MiB"
create = true
"#,
            mnt.display(),
            mnt.display()
        ),
    );
    let check =
        || run_with_timeout(Command::new(replicator_bin()).arg("--config").arg(&config).args(["config", "check"]), T);
    let out = check();
    assert!(out.status.success(), "writable: {}", describe_output(&out));
    run_ok(Command::new(&mount).args(["-o", "remount,ro"]).arg(&mnt), T);
    let out = check();
    assert_eq!(out.status.code(), Some(2), "read-only: {}", describe_output(&out));
    let err = stderr(&out);
    for key in ["group[db].volume[vol].path", "group[db].volume[new].path"] {
        assert!(err.contains(key), "no problem reported for {key}:\n{err}");
    }
    assert!(
        err.contains("read-only file system") && err.contains("ReadWritePaths=") && err.contains("systemd-dropin"),
        "{err}"
    );
}
