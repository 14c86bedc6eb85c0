//! What the package and the systemd unit are made of, generated from the
//! program itself so that they cannot drift from it:
//!
//! - man pages ([`clap_mangen`], one page per subcommand) and shell
//!   completions for bash, zsh and fish ([`clap_complete`]), written by the
//!   hidden `replicator generate man|completions DIR` that the .deb build
//!   runs (`replicator/packaging/build-deb.sh`);
//! - `replicator config systemd-dropin`: the part of the unit's sandbox that
//!   depends on the configuration — exactly the configured block devices
//!   (`DeviceAllow=`), volume files and directories (`ReadWritePaths=`) and
//!   peers (`IPAddressAllow=`); the shipped unit grants none of them.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::config::Config;

/// Where the shipped unit lets the daemon write anyway (`StateDirectory=`,
/// `RuntimeDirectory=`): no `ReadWritePaths=` is needed below these.
const UNIT_STATE_DIR: &str = "/var/lib/replicator";
const UNIT_RUNTIME_DIR: &str = "/run/replicator";

/// Where the generated drop-in is meant to be installed.
pub const DROPIN_PATH: &str = "/etc/systemd/system/replicator.service.d/50-config.conf";

/// The clap command tree, as `replicator` parses it.
fn command() -> clap::Command {
    crate::cli::Cli::command()
}

/// Writes one man page per (visible) command into `dir`: `replicator.1`,
/// `replicator-pair.1`, `replicator-pair-create.1`, ... Returns the files.
pub fn generate_man(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(command(), dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

/// Writes the completion scripts into `dir` under the names their shells
/// look for: `replicator.bash` (installed as
/// `/usr/share/bash-completion/completions/replicator`), `_replicator`
/// (zsh) and `replicator.fish`. Returns the files.
pub fn generate_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    // clap_complete offers hidden subcommands too (bash does): complete a
    // copy of the command without them.
    let full = command();
    let mut cmd = clap::Command::new("replicator");
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    cmd = cmd.version(env!("CARGO_PKG_VERSION"));
    cmd = cmd.args(full.get_arguments().cloned());
    cmd = cmd.subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    let mut files = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        files.push(clap_complete::generate_to(shell, &mut cmd, "replicator", dir)?);
    }
    Ok(files)
}

/// A path as a systemd unit setting value: `%` doubled (specifiers), quoted
/// when it holds blanks, quotes or backslashes. Refused: relative paths,
/// paths that are not UTF-8 or hold control characters.
fn unit_path(path: &Path) -> Result<String, String> {
    let s = path.to_str().ok_or_else(|| format!("{}: not UTF-8; a systemd unit cannot name it", path.display()))?;
    if !path.is_absolute() {
        return Err(format!("{s:?} is relative: systemd needs an absolute path; write it absolute in the config"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{s:?} holds a control character; a systemd unit cannot name it"));
    }
    let s = s.replace('%', "%%");
    if s.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\')) {
        Ok(format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
    } else {
        Ok(s)
    }
}

/// The device unit systemd makes for the block device at `path`, as
/// `systemd-escape --path --suffix=device` names it: `/dev/vg0/my-lv` is
/// `dev-vg0-my\x2dlv.device`.
fn device_unit(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let parts: Vec<&[u8]> = bytes.split(|&b| b == b'/').filter(|p| !p.is_empty()).collect();
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in part.iter().enumerate() {
            let keep = b.is_ascii_alphanumeric() || b == b'_' || b == b':' || (b == b'.' && !(i == 0 && j == 0));
            if keep {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out + ".device"
}

/// The name of group `gid`, or its number when it has no name.
fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// The name servers of `/etc/resolv.conf` that are not on loopback (those
/// the unit allows already).
fn remote_name_servers() -> Vec<IpAddr> {
    let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next().and_then(|a| a.parse::<IpAddr>().ok()))
        .filter(|ip| !is_loopback_ip(*ip))
        .collect()
}

/// A line in the drop-in, with the comment saying why it is there.
struct Grant {
    why: String,
    line: String,
}

/// Builds the systemd drop-in for `config`: one `DeviceAllow=PATH rw` per
/// block-device volume (plus the group owning the devices), one
/// `ReadWritePaths=` per file volume (its directory with `create = true`)
/// and for a `state_dir` / `run_dir` outside the unit's own directories, and
/// `IPAddressAllow=` for each peer address (a DNS name resolved now, with
/// the remote name servers of `/etc/resolv.conf`) and each of `extra_allow`
/// (addresses or prefixes, e.g. a Prometheus server). The shipped unit has
/// `DevicePolicy=closed`, `IPAddressDeny=any` and `IPAddressAllow=localhost`.
///
/// Deterministic: the same config and host give the same bytes.
pub fn systemd_dropin(config: &Config, extra_allow: &[String]) -> Result<String, String> {
    let mut devices: Vec<Grant> = Vec::new();
    let mut device_units: Vec<String> = Vec::new();
    let mut groups: BTreeSet<String> = BTreeSet::new();
    let mut paths: Vec<Grant> = Vec::new();
    let mut seen_paths: BTreeSet<String> = BTreeSet::new();
    let mut notes: Vec<String> = Vec::new();

    for group in &config.groups {
        for volume in &group.volumes {
            let what = format!("group {}, volume {}", group.name, volume.name);
            let path = &volume.path;
            let meta = std::fs::metadata(path).ok();
            let is_block = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
            if is_block || path.starts_with("/dev") {
                if !path.starts_with("/dev") {
                    return Err(format!(
                        "{what}: {} is a block device outside /dev: systemd's DeviceAllow= only takes /dev/ paths; \
                         use the device's path under /dev (e.g. /dev/disk/by-id/...)",
                        path.display()
                    ));
                }
                let line = format!("DeviceAllow={} rw", unit_path(path)?);
                match &meta {
                    Some(m) if is_block => {
                        if m.mode() & 0o060 != 0o060 {
                            notes.push(format!(
                                "{}: mode {:o} grants its group no read-write access: the daemon (user replicator) \
                                 cannot open it; give it to a group (udev rule) or fix the mode",
                                path.display(),
                                m.mode() & 0o7777
                            ));
                        }
                        if m.gid() == 0 {
                            notes.push(format!(
                                "{}: owned by group root, which the daemon is not given; use a udev rule to give \
                                 it to group disk",
                                path.display()
                            ));
                        } else {
                            groups.insert(group_name(m.gid()));
                        }
                    }
                    Some(_) => {
                        return Err(format!("{what}: {} is under /dev but not a block device", path.display()));
                    }
                    None => {
                        // Not there now (an inactive logical volume): systemd
                        // resolves the path at each start, `config check`
                        // (ExecStartPre) says it is missing.
                        notes.push(format!("{}: does not exist now; assumed to belong to group disk", path.display()));
                        groups.insert("disk".to_string());
                    }
                }
                if !devices.iter().any(|d| d.line == line) {
                    device_units.push(device_unit(path));
                    devices.push(Grant { why: what, line });
                }
                continue;
            }
            // A volume in a regular file: writable in place; with
            // `create = true` and no file yet, its directory (to create it).
            let (target, why) = if volume.create && meta.is_none() {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
                (parent.to_path_buf(), format!("{what} (create = true: its directory)"))
            } else {
                (path.clone(), what)
            };
            if target.starts_with(UNIT_STATE_DIR) {
                continue;
            }
            let value = unit_path(&target)?;
            if seen_paths.insert(value.clone()) {
                // "-": a missing path does not fail the namespace setup
                // (exit 226/NAMESPACE, no message); `config check` explains.
                paths.push(Grant { why, line: format!("ReadWritePaths=-{value}") });
            }
        }
    }
    for (key, dir, unit_dir) in [
        ("node.state_dir", &config.node.state_dir, UNIT_STATE_DIR),
        ("node.run_dir", &config.node.run_dir, UNIT_RUNTIME_DIR),
    ] {
        if dir.starts_with(unit_dir) {
            continue;
        }
        let value = unit_path(dir)?;
        if seen_paths.insert(value.clone()) {
            paths.push(Grant {
                why: format!("{key} (outside {unit_dir}: it must exist before the service starts)"),
                line: format!("ReadWritePaths=-{value}"),
            });
        }
    }

    let mut allow: Vec<Grant> = Vec::new();
    let mut seen_ips: BTreeSet<String> = BTreeSet::new();
    let mut any_name = false;
    for peer in &config.peers {
        let literal = peer.address.host.parse::<IpAddr>().ok();
        let ips: Vec<IpAddr> = match literal {
            Some(ip) => vec![ip],
            None => {
                any_name = true;
                let mut ips: Vec<IpAddr> = peer
                    .address
                    .resolve_blocking()
                    .map_err(|e| {
                        format!(
                            "peer {}: cannot resolve {:?}: {e}; IPAddressAllow= takes addresses: fix DNS, or write \
                             the peer's IP address in the config",
                            peer.name, peer.address.host
                        )
                    })?
                    .iter()
                    .map(SocketAddr::ip)
                    .collect();
                ips.sort();
                ips.dedup();
                ips
            }
        };
        for ip in ips {
            if is_loopback_ip(ip) {
                continue;
            }
            if seen_ips.insert(ip.to_string()) {
                let why = match literal {
                    Some(_) => format!("peer {}", peer.name),
                    None => format!(
                        "peer {} ({} resolved now: regenerate when its DNS record changes)",
                        peer.name, peer.address.host
                    ),
                };
                allow.push(Grant { why, line: format!("IPAddressAllow={ip}") });
            }
        }
    }
    if any_name {
        for ip in remote_name_servers() {
            if seen_ips.insert(ip.to_string()) {
                allow.push(Grant {
                    why: "name server (/etc/resolv.conf): a peer is a DNS name".to_string(),
                    line: format!("IPAddressAllow={ip}"),
                });
            }
        }
    }
    for a in extra_allow {
        let a = a.trim();
        let (ip, prefix) = match a.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (a, None),
        };
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| format!("--allow {a:?}: not an IP address or prefix (e.g. 198.51.100.7, 10.0.0.0/8)"))?;
        if let Some(prefix) = prefix {
            let max = if parsed.is_ipv4() { 32 } else { 128 };
            match prefix.parse::<u8>() {
                Ok(n) if n <= max => {}
                _ => return Err(format!("--allow {a:?}: the prefix length must be 0-{max}")),
            }
        }
        if seen_ips.insert(a.to_string()) {
            allow.push(Grant { why: "--allow".to_string(), line: format!("IPAddressAllow={a}") });
        }
    }
    for (key, addr) in
        [("node.nbd_listen", config.node.nbd_listen), ("node.metrics_listen", config.node.metrics_listen)]
    {
        if let Some(addr) = addr.filter(|a| !is_loopback_ip(a.ip())) {
            notes.push(format!(
                "{key} = {addr} is not on loopback: only the peers and loopback may connect; add its clients \
                 with --allow ADDRESS[/PREFIX]"
            ));
        }
    }

    let mut out = String::new();
    let _ = writeln!(out, "# Generated by `replicator config systemd-dropin` from {}.", config.path.display());
    let _ = writeln!(out, "# The sandbox of replicator.service for this configuration: exactly its block");
    let _ = writeln!(out, "# devices, volume files and peers. Regenerate after changing volumes, peers,");
    let _ = writeln!(out, "# state_dir or run_dir (`config check`, run by ExecStartPre, fails on a volume");
    let _ = writeln!(out, "# the sandbox does not grant):");
    let _ = writeln!(out, "#   replicator config systemd-dropin --output {DROPIN_PATH}");
    let _ = writeln!(out, "#   systemctl daemon-reload && systemctl restart replicator");
    for n in &notes {
        let _ = writeln!(out, "# NOTE: {n}");
    }
    if !device_units.is_empty() {
        let _ = writeln!(out, "[Unit]");
        let _ = writeln!(out, "# Start once the block devices are there (a logical volume, iSCSI or multipath");
        let _ = writeln!(out, "# device that appears late would fail `config check` until the restarts ran");
        let _ = writeln!(out, "# into the start limit); one that never appears fails the start after systemd's");
        let _ = writeln!(out, "# device timeout, naming it.");
        for u in &device_units {
            let _ = writeln!(out, "Wants={u}");
            let _ = writeln!(out, "After={u}");
        }
    }
    let _ = writeln!(out, "[Service]");
    if !devices.is_empty() {
        let _ = writeln!(out, "# Block devices (the device cgroup lets the daemon open these and no other;");
        let _ = writeln!(out, "# systemd resolves each path, symbolic links followed, at every start).");
        for d in &devices {
            let _ = writeln!(out, "# {}", d.why);
            let _ = writeln!(out, "{}", d.line);
        }
        if !groups.is_empty() {
            let _ = writeln!(out, "# The group owning them (file permissions); the cgroup above limits it to them.");
            let _ = writeln!(out, "SupplementaryGroups={}", groups.iter().cloned().collect::<Vec<_>>().join(" "));
        }
    }
    if !paths.is_empty() {
        let _ = writeln!(out, "# Writable paths (ProtectSystem=strict makes the rest read-only).");
        for p in &paths {
            let _ = writeln!(out, "# {}", p.why);
            let _ = writeln!(out, "{}", p.line);
        }
    }
    let _ = writeln!(out, "# Network: the unit denies every address but localhost; these are the peers.");
    if allow.is_empty() {
        let _ = writeln!(out, "# (no peer outside loopback)");
    }
    for a in &allow {
        let _ = writeln!(out, "# {}", a.why);
        let _ = writeln!(out, "{}", a.line);
    }
    Ok(out)
}

/// Writes `text` to `path` atomically (a temporary file in the same
/// directory, then rename), creating the directory; mode 0644.
pub fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // The new name durable too: a power cut must not bring back the old
    // drop-in (the unit would start without the new volumes' grants).
    crate::durable::put_file(path, 0o644, crate::durable::Existing::Replace, |f| f.write_all(text.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_units_are_named_as_systemd_escape_names_them() {
        assert_eq!(device_unit(Path::new("/dev/sdb")), "dev-sdb.device");
        assert_eq!(device_unit(Path::new("/dev/vg0/my-lv")), "dev-vg0-my\\x2dlv.device");
        assert_eq!(
            device_unit(Path::new("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4")),
            "dev-disk-by\\x2did-wwn\\x2d0x5000c500a1b2c3d4.device"
        );
        assert_eq!(device_unit(Path::new("//dev//mapper/a.b")), "dev-mapper-a.b.device");
        assert_eq!(device_unit(Path::new("/dev/a b")), "dev-a\\x20b.device");
    }

    #[test]
    fn unit_paths_are_escaped() {
        assert_eq!(unit_path(Path::new("/dev/vg0/db")).unwrap(), "/dev/vg0/db");
        assert_eq!(unit_path(Path::new("/srv/a%b")).unwrap(), "/srv/a%%b");
        assert_eq!(unit_path(Path::new("/srv/my vol")).unwrap(), "\"/srv/my vol\"");
        assert_eq!(unit_path(Path::new("/srv/a\"b")).unwrap(), "\"/srv/a\\\"b\"");
        assert!(unit_path(Path::new("relative/x")).is_err());
        assert!(unit_path(Path::new("/srv/a\nb")).is_err());
    }

    fn config(volumes: &str, peer: &str) -> Config {
        let text = format!(
            r#"
[node]
name = "site-a"
listen = "0.0.0.0:7800"
state_dir = "/var/lib/replicator"
run_dir = "/run/replicator"
[tls]
ca = "/etc/replicator/ca.pem"
cert = "/etc/replicator/site-a.pem"
key = "/etc/replicator/site-a.key"
[[peer]]
name = "site-b"
address = "{peer}"
[[group]]
name = "db"
peer = "site-b"
mode = "sync"
journal_size = "64MiB"
{volumes}
"#
        );
        Config::parse(Path::new("/etc/replicator/replicator.toml"), &text).unwrap()
    }

    #[test]
    fn dropin_grants_files_and_peers_only() {
        let c = config(
            r#"[[group.volume]]
name = "a"
path = "/srv/volumes/a.img"
size = "1GiB"
[[group.volume]]
name = "b"
path = "/srv/new/b.img"
size = "1GiB"
create = true
[[group.volume]]
name = "c"
path = "/var/lib/replicator/c.img"
size = "1GiB"
"#,
            "192.0.2.10:7800",
        );
        let d = systemd_dropin(&c, &["198.51.100.0/24".to_string()]).unwrap();
        let settings: Vec<&str> = d.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            [
                "[Service]",
                "ReadWritePaths=-/srv/volumes/a.img",
                "ReadWritePaths=-/srv/new",
                "IPAddressAllow=192.0.2.10",
                "IPAddressAllow=198.51.100.0/24"
            ],
            "{d}"
        );
        assert!(systemd_dropin(&c, &["nonsense".to_string()]).is_err());
        assert!(systemd_dropin(&c, &["10.0.0.0/33".to_string()]).is_err());
    }

    /// The example config the .deb installs as /etc/replicator/replicator.toml.
    #[test]
    fn packaged_example_config_is_valid() {
        let text = include_str!("../packaging/replicator.toml");
        let c = Config::parse(Path::new("/etc/replicator/replicator.toml"), text).unwrap();
        assert_eq!(c.node.state_dir, Path::new(UNIT_STATE_DIR));
        assert_eq!(c.node.run_dir, Path::new(UNIT_RUNTIME_DIR));
        assert_eq!(c.groups[0].volumes[0].path, Path::new("/dev/vg0/db-data"));
    }

    #[test]
    fn dropin_names_devices_under_dev_even_when_absent() {
        let c = config(
            r#"[[group.volume]]
name = "a"
path = "/dev/replicator-test-absent/lv"
size = "1GiB"
"#,
            "127.0.0.1:7801",
        );
        let d = systemd_dropin(&c, &[]).unwrap();
        let settings: Vec<&str> = d.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            [
                "[Unit]",
                "Wants=dev-replicator\\x2dtest\\x2dabsent-lv.device",
                "After=dev-replicator\\x2dtest\\x2dabsent-lv.device",
                "[Service]",
                "DeviceAllow=/dev/replicator-test-absent/lv rw",
                "SupplementaryGroups=disk"
            ],
            "{d}"
        );
    }
}
