//! The configuration file (`/etc/replicator/replicator.toml`, `--config`,
//! `REPLICATOR_CONFIG`): parsing, human sizes and durations, validation.
//!
//! Every error names the file, the key and what would be valid, so that
//! `replicator config check` tells an admin exactly what to fix.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the configuration is read from when neither `--config` nor
/// `REPLICATOR_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/replicator/replicator.toml";

/// A configuration problem, with the file and the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// TOML syntax error or an unknown / mistyped key.
    #[error("{path}: {message}")]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// toml's message, which includes line and column.
        message: String,
    },
    /// A key has a value that is not valid.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// Dotted key, e.g. `group[db].journal_size`.
        key: String,
        /// What is wrong and what would be valid.
        message: String,
    },
}

/// Replication mode of a consistency group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ack after the secondary has the write (RPO = 0).
    Sync,
    /// Ack after the local journal append; ship in order.
    Async,
}

impl Mode {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sync mode: what writes do when the peer is unreachable for `link_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLossPolicy {
    /// Keep serving; track dirty regions; resync when the link returns.
    Suspend,
    /// Writes wait until the link returns (never ack without the secondary).
    Block,
}

/// Async mode: what writes do when the journal is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalFullPolicy {
    /// Stop journaling, track dirty regions, resync later.
    Suspend,
    /// Wait up to `journal_full_timeout` for space, then suspend.
    Block,
}

/// `[node]`
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name; must equal the name in its certificate.
    pub name: String,
    /// QUIC listen address (UDP).
    pub listen: SocketAddr,
    /// Metadata, journals, bitmaps.
    pub state_dir: PathBuf,
    /// control.sock and nbd.sock.
    pub run_dir: PathBuf,
    /// Optional NBD over TCP.
    pub nbd_listen: Option<SocketAddr>,
    /// Optional Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

/// `[tls]`
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// CA certificate (PEM) that both nodes' certificates chain to.
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// `[[peer]]`
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The peer's node name (checked against its certificate).
    pub name: String,
    /// Its QUIC address.
    pub address: SocketAddr,
}

/// `[[group.volume]]`
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// NBD export name; the same on both sites.
    pub name: String,
    /// Block device or regular file.
    pub path: PathBuf,
    /// Size for a sparse file created when `path` does not exist.
    pub size: Option<u64>,
}

/// `[[group]]`: a consistency group (one journal, one sequence).
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Group name.
    pub name: String,
    /// Name of the `[[peer]]` it replicates with.
    pub peer: String,
    /// sync or async.
    pub mode: Mode,
    /// Journal file size in bytes.
    pub journal_size: u64,
    /// Sync mode link-loss policy.
    pub on_link_loss: LinkLossPolicy,
    /// How long the peer may be silent before the link counts as lost.
    pub link_timeout: Duration,
    /// Async mode journal-full policy.
    pub on_journal_full: JournalFullPolicy,
    /// With `on_journal_full = "block"`: how long a write waits for space.
    pub journal_full_timeout: Duration,
    /// `accept_pair_create`: this node consents to become the group's
    /// secondary when the peer runs `pair create` (its volumes are then
    /// overwritten by the initial copy). Off by default: a SIMPLEX group
    /// never turns into a replica without local consent.
    pub accept_pair_create: bool,
    /// Volumes, in order (their index is the volume number on the wire).
    pub volumes: Vec<VolumeConfig>,
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[node]`
    pub node: NodeConfig,
    /// `[tls]`
    pub tls: TlsPaths,
    /// `[[peer]]`
    pub peers: Vec<PeerConfig>,
    /// `[[group]]`
    pub groups: Vec<GroupConfig>,
}

impl Config {
    /// Path of the control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.node.run_dir.join("control.sock")
    }

    /// Path of the NBD Unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.node.run_dir.join("nbd.sock")
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text (`path` is used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        Validator { path }.validate(raw)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    tls: RawTls,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    listen: String,
    state_dir: PathBuf,
    run_dir: PathBuf,
    nbd_listen: Option<String>,
    metrics_listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    address: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    peer: String,
    mode: String,
    journal_size: Option<String>,
    on_link_loss: Option<String>,
    link_timeout: Option<String>,
    on_journal_full: Option<String>,
    journal_full_timeout: Option<String>,
    compression: Option<String>,
    #[serde(default)]
    accept_pair_create: bool,
    #[serde(default)]
    volume: Vec<RawVolume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    path: PathBuf,
    size: Option<String>,
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_path_buf(), key: key.into(), message: message.into() }
    }

    fn name(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        if is_valid_name(value) {
            Ok(value.to_string())
        } else {
            Err(self.err(
                key,
                format!(
                    "{value:?} is not a valid name: use 1-63 characters from a-z, A-Z, 0-9, '-' and '_', starting with a letter or digit"
                ),
            ))
        }
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!("{value:?} is not an address: write IP:PORT, e.g. \"0.0.0.0:7800\" or \"[::1]:7800\""),
            )
        })
    }

    fn size(&self, key: &str, value: &str) -> Result<u64, ConfigError> {
        parse_size(value).map_err(|m| self.err(key, m))
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        parse_duration(value).map_err(|m| self.err(key, m))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let node = NodeConfig {
            name: self.name("node.name", &raw.node.name)?,
            listen: self.addr("node.listen", &raw.node.listen)?,
            state_dir: self.absolute("node.state_dir", raw.node.state_dir)?,
            run_dir: self.absolute("node.run_dir", raw.node.run_dir)?,
            nbd_listen: raw.node.nbd_listen.as_deref().map(|v| self.addr("node.nbd_listen", v)).transpose()?,
            metrics_listen: raw
                .node
                .metrics_listen
                .as_deref()
                .map(|v| self.addr("node.metrics_listen", v))
                .transpose()?,
        };
        let tls = TlsPaths {
            ca: self.relative_to_config(raw.tls.ca),
            cert: self.relative_to_config(raw.tls.cert),
            key: self.relative_to_config(raw.tls.key),
        };

        let mut peers = Vec::new();
        let mut peer_names = HashSet::new();
        for (i, p) in raw.peer.iter().enumerate() {
            let key = format!("peer[{i}]");
            let name = self.name(&format!("{key}.name"), &p.name)?;
            if name == node.name {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("{name:?} is this node's own name (node.name); a peer must be the other site"),
                ));
            }
            if !peer_names.insert(name.clone()) {
                return Err(self.err(format!("{key}.name"), format!("peer {name:?} is listed twice")));
            }
            let address = self.addr(&format!("peer[{name}].address"), &p.address)?;
            peers.push(PeerConfig { name, address });
        }

        let mut groups = Vec::new();
        let mut group_names = HashSet::new();
        let mut volume_names = HashSet::new();
        let mut volume_paths = HashSet::new();
        for (i, g) in raw.group.into_iter().enumerate() {
            let name = self.name(&format!("group[{i}].name"), &g.name)?;
            let key = format!("group[{name}]");
            if !group_names.insert(name.clone()) {
                return Err(self.err(format!("{key}.name"), format!("group {name:?} is defined twice")));
            }
            if !peer_names.contains(&g.peer) {
                return Err(self.err(
                    format!("{key}.peer"),
                    format!(
                        "{:?} is not a configured peer; define it in a [[peer]] section (known peers: {})",
                        g.peer,
                        list_or_none(peers.iter().map(|p| p.name.as_str()))
                    ),
                ));
            }
            let mode = match g.mode.as_str() {
                "sync" => Mode::Sync,
                "async" => Mode::Async,
                other => {
                    return Err(
                        self.err(format!("{key}.mode"), format!("{other:?} is not a mode: use \"sync\" or \"async\""))
                    )
                }
            };
            let journal_size = match &g.journal_size {
                Some(v) => self.size(&format!("{key}.journal_size"), v)?,
                None => 1 << 30,
            };
            if journal_size < 16 << 20 {
                return Err(self.err(
                    format!("{key}.journal_size"),
                    "must be at least 16MiB (size it for the writes of a link outage: beyond it, writes are tracked in the dirty bitmap and resynced)",
                ));
            }
            let on_link_loss = match g.on_link_loss.as_deref().unwrap_or("suspend") {
                "suspend" => LinkLossPolicy::Suspend,
                "block" => LinkLossPolicy::Block,
                other => {
                    return Err(self.err(
                        format!("{key}.on_link_loss"),
                        format!("{other:?} is not valid: use \"suspend\" (keep serving, track dirty regions) or \"block\" (writes wait for the link)"),
                    ))
                }
            };
            let link_timeout = match &g.link_timeout {
                Some(v) => self.duration(&format!("{key}.link_timeout"), v)?,
                None => Duration::from_secs(5),
            };
            if link_timeout < Duration::from_millis(100) {
                return Err(self.err(format!("{key}.link_timeout"), "must be at least 100ms"));
            }
            let on_journal_full = match g.on_journal_full.as_deref().unwrap_or("suspend") {
                "suspend" => JournalFullPolicy::Suspend,
                "block" => JournalFullPolicy::Block,
                other => {
                    return Err(self.err(
                        format!("{key}.on_journal_full"),
                        format!("{other:?} is not valid: use \"suspend\" (track dirty regions, resync later) or \"block\" (writes wait for journal space)"),
                    ))
                }
            };
            let journal_full_timeout = match &g.journal_full_timeout {
                Some(v) => self.duration(&format!("{key}.journal_full_timeout"), v)?,
                None => Duration::from_secs(30),
            };
            match g.compression.as_deref().unwrap_or("none") {
                "none" => {}
                "lz4" | "zstd" => {
                    return Err(self.err(
                        format!("{key}.compression"),
                        "this build ships records uncompressed; lz4 and zstd are not available yet, use \"none\"",
                    ))
                }
                other => {
                    return Err(self.err(format!("{key}.compression"), format!("{other:?} is not valid: use \"none\"")))
                }
            }
            if g.volume.is_empty() {
                return Err(
                    self.err(format!("{key}.volume"), "a group needs at least one [[group.volume]] with name and path")
                );
            }
            let mut volumes = Vec::new();
            for (j, v) in g.volume.into_iter().enumerate() {
                let vname = self.name(&format!("{key}.volume[{j}].name"), &v.name)?;
                let vkey = format!("{key}.volume[{vname}]");
                if !volume_names.insert(vname.clone()) {
                    return Err(self.err(
                        format!("{vkey}.name"),
                        format!("volume {vname:?} is defined twice (volume names are NBD export names and must be unique on a node)"),
                    ));
                }
                let path = self.absolute(&format!("{vkey}.path"), v.path)?;
                if !volume_paths.insert(path.clone()) {
                    return Err(self.err(format!("{vkey}.path"), format!("{} is used by two volumes", path.display())));
                }
                let size = match &v.size {
                    Some(s) => {
                        let size = self.size(&format!("{vkey}.size"), s)?;
                        if size == 0 || size % 4096 != 0 {
                            return Err(self.err(format!("{vkey}.size"), "must be a non-zero multiple of 4KiB"));
                        }
                        Some(size)
                    }
                    None => None,
                };
                volumes.push(VolumeConfig { name: vname, path, size });
            }
            groups.push(GroupConfig {
                name,
                peer: g.peer,
                mode,
                journal_size,
                on_link_loss,
                link_timeout,
                on_journal_full,
                journal_full_timeout,
                accept_pair_create: g.accept_pair_create,
                volumes,
            });
        }
        Ok(Config { path: self.path.to_path_buf(), node, tls, peers, groups })
    }

    fn absolute(&self, key: &str, p: PathBuf) -> Result<PathBuf, ConfigError> {
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(self.err(key, format!("{} must be an absolute path", p.display())))
        }
    }

    /// TLS files may be given relative to the configuration file's directory.
    fn relative_to_config(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.path.parent().unwrap_or(Path::new("/")).join(p)
        }
    }
}

fn list_or_none<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// Node, group and volume names: 1-63 of `[A-Za-z0-9_-]`, starting with an
/// alphanumeric (they appear in file names, certificate names and NBD export
/// names).
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A byte count for people: "512 B", "1.5 GiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Parses a human size: `4096`, `512K`, `64KiB`, `1GiB`, `1.5G`, `2TB`.
/// K/M/G/T with or without `iB` are binary (powers of 1024), as storage admins
/// expect from LVM; `KB`/`MB`/`GB`/`TB` are decimal.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(format!("{s:?} is not a size: write e.g. \"4096\", \"64KiB\", \"20GiB\" or \"1TiB\"")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. \"4096\", \"64KiB\", \"20GiB\" or \"1TiB\""))?;
    let bytes = value * mult as f64;
    if !(0.0..=(u64::MAX / 2) as f64).contains(&bytes) || bytes.fract() != 0.0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Parses a human duration: `500ms`, `5s`, `2m`, `1h`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let secs_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?} is not a duration: write e.g. \"500ms\", \"5s\", \"2m\" or \"1h\"")),
    };
    let value: f64 =
        num.parse().map_err(|_| format!("{s:?} is not a duration: write e.g. \"500ms\", \"5s\", \"2m\" or \"1h\""))?;
    let secs = value * secs_per_unit;
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "site-a"
listen = "0.0.0.0:7800"
state_dir = "/var/lib/replicator"
run_dir = "/run/replicator"
nbd_listen = "127.0.0.1:10809"

[tls]
ca = "/etc/replicator/ca.pem"
cert = "site-a.pem"
key = "/etc/replicator/site-a.key"

[[peer]]
name = "site-b"
address = "192.0.2.10:7800"

[[group]]
name = "db"
peer = "site-b"
mode = "sync"
journal_size = "1GiB"
link_timeout = "5s"

[[group.volume]]
name = "db-data"
path = "/dev/vg0/db-data"
size = "20GiB"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/replicator/replicator.toml"), text)
    }

    #[test]
    fn parses_the_design_example() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.node.name, "site-a");
        assert_eq!(c.tls.cert, PathBuf::from("/etc/replicator/site-a.pem"));
        let g = c.group("db").expect("group");
        assert_eq!(g.mode, Mode::Sync);
        assert_eq!(g.journal_size, 1 << 30);
        assert_eq!(g.link_timeout, Duration::from_secs(5));
        assert_eq!(g.volumes[0].size, Some(20 << 30));
    }

    #[test]
    fn errors_name_file_and_key() {
        let bad = GOOD.replace("mode = \"sync\"", "mode = \"fast\"");
        let e = parse(&bad).expect_err("bad mode").to_string();
        assert!(e.contains("replicator.toml") && e.contains("group[db].mode") && e.contains("\"sync\""), "{e}");

        let bad = GOOD.replace("peer = \"site-b\"", "peer = \"site-c\"");
        let e = parse(&bad).expect_err("bad peer").to_string();
        assert!(e.contains("group[db].peer") && e.contains("site-b"), "{e}");

        let bad = GOOD.replace("size = \"20GiB\"", "size = \"20 parsecs\"");
        let e = parse(&bad).expect_err("bad size").to_string();
        assert!(e.contains("volume[db-data].size"), "{e}");

        let bad = GOOD.replace("[tls]", "[tls]\nbogus = 1");
        let e = parse(&bad).expect_err("unknown key").to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("12 furlongs").is_err());
        assert!(parse_size("-1G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
    }

    #[test]
    fn names() {
        assert!(is_valid_name("db-data_1"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(""));
    }
}
