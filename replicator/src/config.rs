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

use replicator_protocol::wire::MAX_GROUP_VOLUMES;

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
        /// toml's message, kept whole: "TOML parse error at line L, column
        /// C", the offending line with a caret under the column, and what is
        /// wrong (several lines).
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

impl GroupConfig {
    /// `on_journal_full` and `journal_full_timeout`, as the journal-space
    /// rules take them.
    pub fn full_policy(&self) -> replicator_protocol::journal_space::FullPolicy {
        use replicator_protocol::journal_space::FullPolicy;
        match self.on_journal_full {
            JournalFullPolicy::Suspend => FullPolicy::Suspend,
            JournalFullPolicy::Block => FullPolicy::Block { timeout: self.journal_full_timeout },
        }
    }
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
    /// Whether NBD clients on `nbd_listen` must upgrade to TLS
    /// (`NBD_OPT_STARTTLS`) and present a certificate from `tls.ca`.
    pub nbd_tls: NbdTlsMode,
    /// With TLS: the names a client certificate may carry (any certificate
    /// from `tls.ca` when `None`).
    pub nbd_tls_clients: Option<Vec<String>>,
    /// Optional Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// `log`: the log filter (a level such as `"debug"`, or `tracing`
    /// directives), already expanded by [`log_filter_directives`]. `None`:
    /// `RUST_LOG`, or the default.
    pub log: Option<String>,
    /// Threads of the daemon's async runtime (`worker_threads`; default:
    /// [`default_worker_threads`]).
    pub worker_threads: usize,
}

/// Directories the whole system shares: never `state_dir` or `run_dir`.
const SHARED_DIRS: &[&str] = &[
    "/", "/run", "/var", "/var/lib", "/var/run", "/var/tmp", "/tmp", "/etc", "/usr", "/home", "/root", "/srv", "/opt",
];

/// Most `node.worker_threads` the daemon accepts.
pub const MAX_WORKER_THREADS: usize = 256;

/// The default `node.worker_threads`: half the CPUs this process may run
/// on, at least one. Every request's work stays on the thread that took
/// it as long as that thread is free, and each hand-off between runtime
/// threads costs a wake-up; the other half of the CPUs is left to the
/// kernel's I/O workers, the network and the peer (replicator-bench on two
/// vCPUs: sync QD1 p50 halved with one thread instead of two).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// `node.nbd_tls`: TLS on the NBD TCP listener (`nbd_listen`). The Unix
/// socket is never encrypted (it is local, mode 0660).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdTlsMode {
    /// Plain NBD; `NBD_OPT_STARTTLS` is refused. Only for a loopback
    /// `nbd_listen`.
    Off,
    /// The NBD protocol's FORCEDTLS mode: every option but `STARTTLS` and
    /// `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until the client has
    /// upgraded to TLS with a certificate from `tls.ca`.
    Require,
}

impl NbdTlsMode {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NbdTlsMode::Off => "off",
            NbdTlsMode::Require => "require",
        }
    }
}

/// The default log filter: `info`, with the QUIC and TLS libraries at
/// `warn` (quinn_udp at `error`: its failed `sendmsg` calls are raw Debug
/// dumps, and QUIC treats them as packet loss).
pub const DEFAULT_LOG_FILTER: &str = "info,quinn=warn,quinn_udp=error,rustls=warn";

/// What a `node.log` value (or `RUST_LOG`) means as filter directives: a
/// bare level (`"debug"`) keeps the dependencies at their default levels
/// (`"debug,quinn=warn,quinn_udp=error,rustls=warn"`); anything naming a
/// target (`"info,replicator::nbd=debug"`) is used as written.
pub fn log_filter_directives(value: &str) -> String {
    let value = value.trim();
    if value.contains('=') || value.contains(',') || value.contains('[') {
        value.to_string()
    } else {
        format!("{value},quinn=warn,quinn_udp=error,rustls=warn")
    }
}

/// Whether `addr` only accepts connections from this host.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
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
    /// Its QUIC address: an IP address or a DNS name, and a port.
    pub address: PeerAddress,
}

/// A peer's QUIC address as configured: `IP:PORT`, `[IPv6]:PORT` or
/// `HOST:PORT`. A DNS name is resolved each time the peer is dialed (so a
/// changed DNS record is followed without a restart); `config check` fails
/// if it cannot be resolved at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddress {
    /// IP address literal (without brackets) or DNS name.
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl PeerAddress {
    /// Whether this is an IP address at which `listen` itself is reached
    /// (the same address, or loopback for a wildcard `listen`).
    pub fn is_own(&self, listen: SocketAddr) -> bool {
        let Ok(ip) = self.host.parse::<std::net::IpAddr>() else { return false };
        let local = listen.ip().to_canonical();
        self.port == listen.port() && (ip.to_canonical() == local || (ip.is_loopback() && local.is_unspecified()))
    }

    /// Parses `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (port 1-65535; a
    /// host name made of letters, digits, '-', '_' and '.').
    pub fn parse(value: &str) -> Result<PeerAddress, String> {
        let bad = || {
            format!(
                "{value:?} is not an address: write HOST:PORT or IP:PORT, e.g. \"site-b.example.net:7800\", \"192.0.2.10:7800\" or \"[2001:db8::10]:7800\""
            )
        };
        if let Ok(addr) = value.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!("{value:?}: port 0 cannot be dialed; use the port the peer's node.listen uses"));
            }
            return Ok(PeerAddress { host: addr.ip().to_string(), port: addr.port() });
        }
        let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("{value:?}: port 0 cannot be dialed; use the port the peer's node.listen uses"));
        }
        // A trailing dot (a fully qualified name) is allowed.
        let name = host.strip_suffix('.').unwrap_or(host);
        let host_ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !host_ok {
            return Err(bad());
        }
        Ok(PeerAddress { host: host.to_string(), port })
    }

    /// Resolves the address (DNS for a name), blocking. An error if the name
    /// resolves to nothing.
    pub fn resolve_blocking(&self) -> std::io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address"));
        }
        Ok(addrs)
    }

    /// Resolves the address (DNS for a name) without blocking the runtime.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port)).await?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address"));
        }
        Ok(addrs)
    }
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `[[group.volume]]`
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// NBD export name; the same on both sites.
    pub name: String,
    /// Block device or regular file.
    pub path: PathBuf,
    /// The volume size in bytes: an existing file or device must have
    /// exactly this size; with `create`, the size of the file created.
    pub size: Option<u64>,
    /// `create = true`: create `path` as a sparse file of `size` bytes if it
    /// does not exist. Off by default: a missing path is an error, so that a
    /// typo or an inactive logical volume never becomes a new, empty volume.
    pub create: bool,
}

/// Largest `activity_log_extents` (as DRBD's `al-extents`, about 65536):
/// 256 GiB of 4 MiB regions to resynchronise after a power cut.
pub const MAX_ACTIVITY_LOG_EXTENTS: u64 = 65536;

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
    /// `drill_chunk`: copy-on-write granularity of drill copies (a power of
    /// two from 4KiB to 16MiB; default 64KiB). Smaller chunks use less space
    /// for scattered small writes, larger ones copy less often.
    pub drill_chunk: u64,
    /// `activity_log_extents`: most 4 MiB regions the activity log holds
    /// (DRBD's `al-extents`; default 1237), so a power cut of the primary
    /// resynchronises at most this many × 4 MiB. A write to a region not in
    /// the log waits, when the log is full, until the least recently
    /// written region's writes are durable on both sites.
    pub activity_log_extents: usize,
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
        control_socket_in(&self.node.run_dir)
    }

    /// Path of the NBD Unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        nbd_socket_in(&self.node.run_dir)
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

    /// `node.run_dir` of a configuration file that may not validate as a
    /// whole (`None` when even that cannot be read): client commands reach
    /// a running daemon with it while an edit is in progress.
    pub fn run_dir_of(path: &Path) -> Option<PathBuf> {
        let text = std::fs::read_to_string(path).ok()?;
        let run_dir = match toml::from_str::<toml::Table>(&text) {
            Ok(table) => PathBuf::from(table.get("node")?.get("run_dir")?.as_str()?),
            // An edit in progress may not even parse: the `run_dir = "..."`
            // line of the `[node]` table is found line by line.
            Err(_) => run_dir_line(&text)?,
        };
        run_dir.is_absolute().then_some(run_dir)
    }

    /// Parses and validates configuration text (`path` is used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        // toml's Display shows line, column and the line with a caret under
        // the column: keep its lines as they are.
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator { path }.validate(raw)
    }
}

/// The value of a `run_dir = "..."` line in the `[node]` table of text that
/// may not parse as TOML.
fn run_dir_line(text: &str) -> Option<PathBuf> {
    let mut in_node = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_node = line.trim_start_matches('[').trim_end_matches(']').trim() == "node";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        if in_node && key.trim() == "run_dir" {
            // A basic or a literal string, then perhaps a comment.
            let value = value.trim();
            let quote = value.chars().next().filter(|q| *q == '"' || *q == '\'')?;
            let (inner, _) = value[1..].split_once(quote)?;
            return Some(PathBuf::from(inner));
        }
    }
    None
}

/// The control socket in a `run_dir`.
pub fn control_socket_in(run_dir: &Path) -> PathBuf {
    run_dir.join("control.sock")
}

/// The NBD Unix socket in a `run_dir`.
pub fn nbd_socket_in(run_dir: &Path) -> PathBuf {
    run_dir.join("nbd.sock")
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
    nbd_tls: Option<String>,
    nbd_tls_clients: Option<Vec<String>>,
    metrics_listen: Option<String>,
    log: Option<String>,
    worker_threads: Option<usize>,
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
    drill_chunk: Option<String>,
    activity_log_extents: Option<u64>,
    #[serde(default)]
    volume: Vec<RawVolume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    path: PathBuf,
    size: Option<String>,
    #[serde(default)]
    create: bool,
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

    /// A node's (or NBD client's) name: also the DNS name its certificate
    /// carries, which TLS checks.
    fn host_name(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        let name = self.name(key, value)?;
        if is_valid_host_name(&name) {
            Ok(name)
        } else {
            Err(self.err(
                key,
                format!(
                    "{value:?} cannot be the DNS name in a certificate (all digits, or ending in '-'), \
                     so TLS could never match it: name the node as its certificate does"
                ),
            ))
        }
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        let addr: SocketAddr = value.parse().map_err(|_| {
            self.err(
                key,
                format!("{value:?} is not an address: write IP:PORT, e.g. \"0.0.0.0:7800\" or \"[::1]:7800\""),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.err(
                key,
                format!("{value:?} has port 0, which the kernel replaces with a random one nobody else knows: write the port"),
            ));
        }
        Ok(addr)
    }

    fn size(&self, key: &str, value: &str) -> Result<u64, ConfigError> {
        parse_size(value).map_err(|m| self.err(key, m))
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        parse_duration(value).map_err(|m| self.err(key, m))
    }

    /// `node.nbd_tls` (default: `require` unless `nbd_listen` is a loopback
    /// address) and `node.nbd_tls_clients`. A non-loopback `nbd_listen`
    /// without TLS would serve every volume, read and write, to anyone who
    /// can reach the port: refused.
    fn nbd_tls(
        &self,
        listen: Option<SocketAddr>,
        mode: Option<&str>,
        clients: Option<&[String]>,
    ) -> Result<(NbdTlsMode, Option<Vec<String>>), ConfigError> {
        let loopback = listen.as_ref().is_none_or(is_loopback);
        let mode = match mode {
            None if loopback => NbdTlsMode::Off,
            None => NbdTlsMode::Require,
            Some("require") => NbdTlsMode::Require,
            Some("off") => NbdTlsMode::Off,
            Some(other) => {
                return Err(self.err("node.nbd_tls", format!("{other:?} is not valid: use \"require\" or \"off\"")))
            }
        };
        if let (NbdTlsMode::Off, Some(addr)) = (mode, listen) {
            if !loopback {
                return Err(self.err(
                    "node.nbd_tls",
                    format!(
                        "\"off\" with nbd_listen = \"{addr}\", which is not a loopback address: anyone who can reach \
                         that port could read and write every volume. Use nbd_tls = \"require\" (clients then need a \
                         certificate from tls.ca, see `replicator cert issue`), or listen on 127.0.0.1 / [::1], or use \
                         the Unix socket"
                    ),
                ));
            }
        }
        let clients =
            match clients {
                None => None,
                Some(_) if mode == NbdTlsMode::Off => return Err(self.err(
                    "node.nbd_tls_clients",
                    "names the client certificates NBD-TLS accepts, but nbd_tls is \"off\": set nbd_tls = \"require\" \
                     or remove nbd_tls_clients",
                )),
                Some([]) => return Err(self.err(
                    "node.nbd_tls_clients",
                    "is empty, which would refuse every client: list the names of the client certificates to accept, \
                     or remove the key to accept any certificate from tls.ca",
                )),
                Some(names) => Some(
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| self.host_name(&format!("node.nbd_tls_clients[{i}]"), n))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
        Ok((mode, clients))
    }

    fn log(&self, value: &str) -> Result<String, ConfigError> {
        let directives = log_filter_directives(value);
        let bare = !value.contains([',', '=', '[']);
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(value.trim())) {
            return Err(self.err(
                "node.log",
                format!("{value:?} is not a log level: write one of {} or directives such as \"info,replicator::nbd=debug\"", LEVELS.join(", ")),
            ));
        }
        match tracing_subscriber::EnvFilter::builder().parse(&directives) {
            Ok(_) => Ok(directives),
            Err(e) => Err(self.err(
                "node.log",
                format!("{value:?} is not a log filter ({e}): write a level (error, warn, info, debug, trace) or directives such as \"info,replicator::nbd=debug\""),
            )),
        }
    }

    /// Directories and TCP listeners that would clash with each other.
    fn check_node_places(&self, node: &NodeConfig) -> Result<(), ConfigError> {
        let (state, run) = (&node.state_dir, &node.run_dir);
        // The daemon makes its directories private (0700, 0750): a shared
        // system directory named by mistake (a path missing its last part)
        // would lose the access every other service and user relies on.
        for (key, dir) in [("node.state_dir", state), ("node.run_dir", run)] {
            if SHARED_DIRS.iter().any(|d| dir == Path::new(d)) {
                return Err(self.err(
                    key,
                    format!(
                        "{} is a directory the whole system shares, which the daemon would make private: give it \
                         a directory of its own (e.g. /var/lib/replicator, /run/replicator)",
                        dir.display()
                    ),
                ));
            }
        }
        if state.starts_with(run) {
            // systemd empties run_dir (RuntimeDirectory=) at every stop,
            // which would take the pair's state with it; one directory
            // cannot have both modes (0700, 0750).
            return Err(self.err(
                "node.run_dir",
                format!(
                    "{} holds node.state_dir {}: run_dir holds sockets and is emptied at every stop, state_dir the \
                     pair's state; give each its own directory (e.g. /run/replicator, /var/lib/replicator)",
                    run.display(),
                    state.display()
                ),
            ));
        }
        if let (Some(nbd), Some(metrics)) = (node.nbd_listen, node.metrics_listen) {
            let overlap = |a: std::net::IpAddr, b: std::net::IpAddr| a == b || a.is_unspecified() || b.is_unspecified();
            if nbd.port() == metrics.port() && overlap(nbd.ip(), metrics.ip()) {
                return Err(self.err(
                    "node.metrics_listen",
                    format!("{metrics} is the port of node.nbd_listen ({nbd}): give each its own port"),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let nbd_listen = raw.node.nbd_listen.as_deref().map(|v| self.addr("node.nbd_listen", v)).transpose()?;
        let (nbd_tls, nbd_tls_clients) =
            self.nbd_tls(nbd_listen, raw.node.nbd_tls.as_deref(), raw.node.nbd_tls_clients.as_deref())?;
        let node = NodeConfig {
            name: self.host_name("node.name", &raw.node.name)?,
            listen: self.addr("node.listen", &raw.node.listen)?,
            state_dir: self.absolute("node.state_dir", raw.node.state_dir)?,
            run_dir: self.absolute("node.run_dir", raw.node.run_dir)?,
            nbd_listen,
            nbd_tls,
            nbd_tls_clients,
            metrics_listen: raw
                .node
                .metrics_listen
                .as_deref()
                .map(|v| self.addr("node.metrics_listen", v))
                .transpose()?,
            log: raw.node.log.as_deref().map(|v| self.log(v)).transpose()?,
            worker_threads: match raw.node.worker_threads {
                None => default_worker_threads(),
                Some(n) if (1..=MAX_WORKER_THREADS).contains(&n) => n,
                Some(n) => {
                    return Err(self.err(
                        "node.worker_threads",
                        format!(
                            "{n} is out of range: write 1 to {MAX_WORKER_THREADS}, or leave it out for half the CPUs"
                        ),
                    ))
                }
            },
        };
        self.check_node_places(&node)?;
        let tls = TlsPaths {
            ca: self.relative_to_config(raw.tls.ca),
            cert: self.relative_to_config(raw.tls.cert),
            key: self.relative_to_config(raw.tls.key),
        };

        let mut peers = Vec::new();
        let mut peer_names = HashSet::new();
        for (i, p) in raw.peer.iter().enumerate() {
            let key = format!("peer[{i}]");
            let name = self.host_name(&format!("{key}.name"), &p.name)?;
            if name == node.name {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("{name:?} is this node's own name (node.name); a peer must be the other site"),
                ));
            }
            if !peer_names.insert(name.clone()) {
                return Err(self.err(format!("{key}.name"), format!("peer {name:?} is listed twice")));
            }
            let address = PeerAddress::parse(&p.address).map_err(|m| self.err(format!("peer[{name}].address"), m))?;
            if address.is_own(node.listen) {
                return Err(self.err(
                    format!("peer[{name}].address"),
                    format!("{address} is this node's own listen address (node.listen): write the other site's"),
                ));
            }
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
            let drill_chunk = match &g.drill_chunk {
                Some(v) => self.size(&format!("{key}.drill_chunk"), v)?,
                None => crate::group::DEFAULT_DRILL_CHUNK,
            };
            if !drill_chunk.is_power_of_two()
                || !(replicator_protocol::snapshot::MIN_CHUNK..=replicator_protocol::snapshot::MAX_CHUNK)
                    .contains(&drill_chunk)
            {
                return Err(self.err(
                    format!("{key}.drill_chunk"),
                    "must be a power of two from 4KiB to 16MiB (the copy-on-write granularity of drill copies)",
                ));
            }
            let activity_log_extents = match g.activity_log_extents {
                None => replicator_protocol::activity_log::DEFAULT_BUDGET,
                Some(n) if (1..=MAX_ACTIVITY_LOG_EXTENTS).contains(&n) => n as usize,
                Some(n) => {
                    return Err(self.err(
                        format!("{key}.activity_log_extents"),
                        format!(
                            "{n} is not valid: use 1 to {MAX_ACTIVITY_LOG_EXTENTS} regions of 4MiB (default {}; a power cut of \
                             the primary resynchronises at most this many regions)",
                            replicator_protocol::activity_log::DEFAULT_BUDGET
                        ),
                    ))
                }
            };
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
            // Settings that would do nothing where they stand: an admin who
            // wrote them expects a behaviour the group will not have.
            if on_link_loss == LinkLossPolicy::Block && mode == Mode::Async {
                return Err(self.err(
                    format!("{key}.on_link_loss"),
                    "\"block\" applies to sync groups: an async group acknowledges writes once they are in its \
                     journal and never waits for the link (remove it, or use mode = \"sync\")",
                ));
            }
            if g.journal_full_timeout.is_some() && on_journal_full != JournalFullPolicy::Block {
                return Err(self.err(
                    format!("{key}.journal_full_timeout"),
                    "applies only with on_journal_full = \"block\" (how long a write waits for journal space); remove \
                     it, or set on_journal_full = \"block\"",
                ));
            }
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
            if g.volume.len() > MAX_GROUP_VOLUMES {
                return Err(self.err(
                    format!("{key}.volume"),
                    format!(
                        "{} volumes: a group has at most {MAX_GROUP_VOLUMES} (spread them over several groups)",
                        g.volume.len()
                    ),
                ));
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
                if v.create && size.is_none() {
                    return Err(self.err(
                        format!("{vkey}.create"),
                        "create = true needs a size: add size = \"...\" (e.g. \"20GiB\") for the sparse file to create",
                    ));
                }
                if v.create && path.starts_with("/dev") {
                    return Err(self.err(
                        format!("{vkey}.create"),
                        format!(
                            "{} is under /dev: a block device is never created by replicator (a file there would live in RAM); remove create = true and make sure the device exists",
                            path.display()
                        ),
                    ));
                }
                if v.create && path.starts_with("/run") {
                    return Err(self.err(
                        format!("{vkey}.create"),
                        format!(
                            "{} is under /run, which lives in RAM and is emptied at reboot: a volume created there \
                             would come back empty (and be served as zeros); put it on a disk",
                            path.display()
                        ),
                    ));
                }
                volumes.push(VolumeConfig { name: vname, path, size, create: v.create });
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
                drill_chunk,
                activity_log_extents,
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

/// A valid name ([`is_valid_name`]) that is also a DNS name a certificate
/// can carry and TLS can match: not all digits, not ending in '-'. Node and
/// NBD client names.
pub fn is_valid_host_name(s: &str) -> bool {
    is_valid_name(s)
        && matches!(rustls::pki_types::ServerName::try_from(s), Ok(rustls::pki_types::ServerName::DnsName(_)))
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

/// What [`parse_size`] accepts, for error messages and docs.
pub const SIZE_HELP: &str = "write a byte count (\"4096\") or a number and a unit: KiB, MiB, GiB, TiB \
     (powers of 1024), kB/KB, MB, GB, TB (powers of 1000), or K, M, G, T (powers of 1024, as in LVM), \
     e.g. \"64KiB\", \"20GiB\", \"500GB\"";

/// Parses a human size: a plain byte count (`4096`, `4096B`), IEC units
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), SI units `kB` (or `KB`)/`MB`/
/// `GB`/`TB` (powers of 1000), or the bare suffixes `K`/`k`/`M`/`G`/`T`,
/// which are powers of 1024 (as in LVM, and as this parser always read
/// them). A decimal fraction is allowed if the result is a whole number of
/// bytes (`1.5GiB`); a space may separate number and unit. Exact integer
/// arithmetic; at most 2^63-1 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size: {SIZE_HELP}");
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u128 = match unit.trim() {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (num.contains('.') && frac.is_empty()) {
        return Err(bad());
    }
    let too_large = || format!("{s:?} is too large (at most {} bytes)", i64::MAX);
    // 20 integer digits exceed any valid size; 18 fraction digits are more
    // than any unit can turn into whole bytes.
    if int.len() > 20 || frac.len() > 18 {
        return Err(if int.len() > 20 { too_large() } else { format!("{s:?} is not a whole number of bytes") });
    }
    let scale = 10u128.pow(frac.len() as u32);
    let int_v: u128 = int.parse().map_err(|_| bad())?;
    let frac_v: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
    let scaled = int_v
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_v))
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    let bytes = scaled / scale;
    if bytes > i64::MAX as u128 {
        return Err(too_large());
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
    fn the_run_dir_of_a_file_that_does_not_parse_is_found_line_by_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("replicator.toml");
        let text =
            "[node]\nname = \"a\"\nrun_dir = '/run/x' # here\n[[group]]\nrun_dir = \"/elsewhere\"\ngarbage = [\n";
        let write = |text: &str| std::fs::write(&path, text).expect("write the file");
        write(text);
        assert_eq!(Config::run_dir_of(&path), Some(PathBuf::from("/run/x")));
        write("[node]\nrun_dir = \"relative\"\n[");
        assert_eq!(Config::run_dir_of(&path), None);
        write("[other]\nrun_dir = \"/run/y\"\n[");
        assert_eq!(Config::run_dir_of(&path), None);
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

    /// A group's OpenGroup lists its volumes, within the wire's limit on a
    /// frame's list elements.
    #[test]
    fn a_group_of_too_many_volumes_is_refused() {
        let volumes = |n: usize| {
            let mut text = GOOD.to_string();
            for i in 1..n {
                text.push_str(&format!("\n[[group.volume]]\nname = \"v{i}\"\npath = \"/dev/vg0/v{i}\"\n"));
            }
            text
        };
        assert_eq!(parse(&volumes(MAX_GROUP_VOLUMES)).expect("the most volumes").groups[0].volumes.len(), 4096);
        let e = parse(&volumes(MAX_GROUP_VOLUMES + 1)).expect_err("one volume too many").to_string();
        assert!(e.contains("group[db].volume") && e.contains("4097 volumes") && e.contains("at most 4096"), "{e}");
    }

    #[test]
    fn settings_that_would_do_nothing_where_they_stand_are_refused() {
        let sync_block = GOOD.replace("link_timeout = \"5s\"", "link_timeout = \"5s\"\non_link_loss = \"block\"");
        parse(&sync_block).expect("block on link loss is a sync setting");
        let e = parse(&sync_block.replace("mode = \"sync\"", "mode = \"async\""))
            .expect_err("block on an async group")
            .to_string();
        assert!(e.contains("group[db].on_link_loss") && e.contains("sync groups"), "{e}");

        let timeout = GOOD.replace("link_timeout = \"5s\"", "link_timeout = \"5s\"\njournal_full_timeout = \"10s\"");
        let e = parse(&timeout).expect_err("a timeout nothing waits for").to_string();
        assert!(e.contains("group[db].journal_full_timeout") && e.contains("on_journal_full"), "{e}");
        parse(&timeout.replace("journal_full_timeout", "on_journal_full = \"block\"\njournal_full_timeout"))
            .expect("a timeout for the block policy");
    }

    #[test]
    fn worker_threads_default_to_half_the_cpus_and_refuse_zero_and_absurd_values() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.node.worker_threads, default_worker_threads());
        assert!(c.node.worker_threads >= 1);
        let set = |n: &str| GOOD.replace("[tls]", &format!("worker_threads = {n}\n\n[tls]"));
        assert_eq!(parse(&set("3")).expect("valid").node.worker_threads, 3);
        for bad in ["0", "257", "-1"] {
            let e = parse(&set(bad)).expect_err(bad).to_string();
            assert!(e.contains("worker_threads"), "{bad}: {e}");
        }
        assert!(parse(&set("0")).expect_err("zero").to_string().contains("1 to 256"));
    }

    #[test]
    fn activity_log_extents_defaults_to_drbd_and_refuses_zero_and_absurd_values() {
        let g = parse(GOOD).expect("valid").groups.remove(0);
        assert_eq!(g.activity_log_extents, 1237);
        let set = |n: &str| {
            GOOD.replace("link_timeout = \"5s\"", &format!("link_timeout = \"5s\"\nactivity_log_extents = {n}"))
        };
        assert_eq!(parse(&set("4")).expect("valid").groups[0].activity_log_extents, 4);
        assert_eq!(parse(&set("65536")).expect("valid").groups[0].activity_log_extents, 65536);
        for bad in ["0", "65537", "1000000000000"] {
            let e = parse(&set(bad)).expect_err(bad).to_string();
            assert!(e.contains("group[db].activity_log_extents") && e.contains("1 to 65536"), "{bad}: {e}");
        }
        let e = parse(&set("-1")).expect_err("negative").to_string();
        assert!(e.contains("activity_log_extents"), "{e}");
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
    fn sizes_si_iec_and_bare_suffixes() {
        // IEC: powers of 1024.
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("4096MiB"), Ok(4096 << 20));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        // SI: powers of 1000.
        assert_eq!(parse_size("1kB"), Ok(1_000));
        assert_eq!(parse_size("1KB"), Ok(1_000));
        assert_eq!(parse_size("4096MB"), Ok(4_096_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("3TB"), Ok(3_000_000_000_000));
        // Bare suffixes: powers of 1024, as always.
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        // Plain bytes, spaces, fractions.
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 20 GiB "), Ok(20 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        // Exact: no float rounding on large values.
        assert_eq!(parse_size("8191.999999999G"), Err("\"8191.999999999G\" is not a whole number of bytes".into()));
        assert_eq!(parse_size("9007199254740993"), Ok(9_007_199_254_740_993));
        // Refused, with a message that lists the units.
        for bad in ["", "G", "1.5.5G", ".5G", "5.G", "-1G", "1e9", "1 gigabyte", "1gb", "1Gi", "1 iB", "0x10"] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("KiB") && e.contains("powers of 1000") && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_size("1.1").expect_err("fractional byte").contains("whole number of bytes"));
        assert!(parse_size("0.0001K").expect_err("fractional byte").contains("whole number of bytes"));
        for huge in ["9223372036854775808", "8388608TiB", "99999999999999999999999T"] {
            assert!(parse_size(huge).expect_err(huge).contains("too large"), "{huge}");
        }
        assert_eq!(parse_size("9223372036854775807"), Ok(i64::MAX as u64));
    }

    #[test]
    fn volume_sizes_in_si_units_must_still_be_4k_multiples() {
        let c = parse(&GOOD.replace("size = \"20GiB\"", "size = \"4096MB\"")).expect("4096MB is 4096 * 10^6");
        assert_eq!(c.groups[0].volumes[0].size, Some(4_096_000_000));
        let e = parse(&GOOD.replace("size = \"20GiB\"", "size = \"1GB\"")).expect_err("10^9 is not 4KiB-aligned");
        assert!(e.to_string().contains("volume[db-data].size") && e.to_string().contains("4KiB"), "{e}");
    }

    #[test]
    fn syntax_errors_keep_line_column_and_caret() {
        // Line 4 of the text (the leading newline ends line 1), column 13: the first `.`.
        let bad = GOOD.replacen("listen = \"0.0.0.0:7800\"", "listen = 0.0.0.0:7800", 1);
        let e = parse(&bad).expect_err("unquoted address").to_string();
        assert!(e.starts_with("/etc/replicator/replicator.toml: "), "{e}");
        assert!(e.contains("line 4, column 13"), "{e}");
        let lines: Vec<&str> = e.lines().collect();
        let src = lines.iter().position(|l| l.contains("listen = 0.0.0.0:7800")).expect("the offending line is shown");
        let caret = lines.get(src + 1).expect("a line under it");
        assert!(caret.trim_start_matches([' ', '|']).starts_with('^'), "{e}");
        // The caret sits under the column toml reports.
        let col_start = e.find("column ").expect("column") + "column ".len();
        let col: usize =
            e[col_start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("n");
        let text_start = lines[src].find("listen").expect("listen");
        assert_eq!(caret.find('^'), Some(text_start + col - 1), "{e}");

        // An unknown key: also line, column and caret.
        let e = parse(&GOOD.replace("[tls]\n", "[tls]\nbogus = 1\n")).expect_err("unknown key").to_string();
        assert!(e.contains("line ") && e.contains("column") && e.contains('^') && e.contains("bogus"), "{e}");
    }

    #[test]
    fn places_that_clash_are_refused() {
        let cases = [
            ("listen = \"0.0.0.0:7800\"", "listen = \"0.0.0.0:0\"", "node.listen"),
            ("nbd_listen = \"127.0.0.1:10809\"", "nbd_listen = \"127.0.0.1:0\"", "node.nbd_listen"),
            (
                "nbd_listen = \"127.0.0.1:10809\"",
                "nbd_listen = \"127.0.0.1:10809\"\nmetrics_listen = \"0.0.0.0:10809\"",
                "node.metrics_listen",
            ),
            ("state_dir = \"/var/lib/replicator\"", "state_dir = \"/run/replicator/state\"", "node.run_dir"),
            ("run_dir = \"/run/replicator\"", "run_dir = \"/var/lib/replicator\"", "node.run_dir"),
            ("state_dir = \"/var/lib/replicator\"", "state_dir = \"/var/lib\"", "node.state_dir"),
            ("run_dir = \"/run/replicator\"", "run_dir = \"/run\"", "node.run_dir"),
            ("address = \"192.0.2.10:7800\"", "address = \"127.0.0.1:7800\"", "peer[site-b].address"),
        ];
        for (from, to, key) in cases {
            let e = parse(&GOOD.replace(from, to)).expect_err(to).to_string();
            assert!(e.contains(key), "{to}: {e}");
        }
        // Another port on loopback, or metrics on another port, is fine.
        parse(&GOOD.replace("address = \"192.0.2.10:7800\"", "address = \"127.0.0.1:7801\"")).expect("other port");
        parse(&GOOD.replace(
            "nbd_listen = \"127.0.0.1:10809\"",
            "nbd_listen = \"127.0.0.1:10809\"\nmetrics_listen = \"127.0.0.1:9187\"",
        ))
        .expect("metrics port");
    }

    #[test]
    fn peer_addresses_may_be_dns_names() {
        let c = parse(&GOOD.replace("192.0.2.10:7800", "site-b.example.net:7800")).expect("dns name");
        assert_eq!(c.peers[0].address, PeerAddress { host: "site-b.example.net".into(), port: 7800 });
        assert_eq!(c.peers[0].address.to_string(), "site-b.example.net:7800");
        let c = parse(&GOOD.replace("192.0.2.10:7800", "[2001:db8::10]:7800")).expect("ipv6");
        assert_eq!(c.peers[0].address.host, "2001:db8::10");
        assert_eq!(c.peers[0].address.to_string(), "[2001:db8::10]:7800");
        assert_eq!(PeerAddress::parse("localhost:1").map(|a| a.host), Ok("localhost".into()));
        assert_eq!(PeerAddress::parse("b.example.:7800").map(|a| a.port), Ok(7800));
        for bad in [
            "site-b",
            "site-b:",
            ":7800",
            "site b:7800",
            "site-b:99999",
            "site-b:0",
            "-b:7800",
            "a..b:1",
            "2001:db8::10:7800",
        ] {
            let e = parse(&GOOD.replace("192.0.2.10:7800", bad)).expect_err(bad).to_string();
            assert!(e.contains("peer[site-b].address"), "{bad}: {e}");
        }
    }

    #[test]
    fn create_is_explicit_and_needs_a_size() {
        let c = parse(GOOD).expect("valid");
        assert!(!c.groups[0].volumes[0].create, "create defaults to false");
        let file = GOOD.replace("path = \"/dev/vg0/db-data\"", "path = \"/srv/db-data.img\"");
        let c = parse(&file.replace("size = \"20GiB\"", "size = \"20GiB\"\ncreate = true")).expect("create");
        assert!(c.groups[0].volumes[0].create);
        let e = parse(&file.replace("size = \"20GiB\"", "create = true")).expect_err("no size").to_string();
        assert!(e.contains("group[db].volume[db-data].create") && e.contains("size"), "{e}");
        let e = parse(&GOOD.replace("size = \"20GiB\"", "size = \"20GiB\"\ncreate = true")).expect_err("/dev");
        assert!(e.to_string().contains("volume[db-data].create") && e.to_string().contains("/dev"), "{e}");
        let in_ram = GOOD.replace("path = \"/dev/vg0/db-data\"", "path = \"/run/replicator/db-data.img\"");
        let e = parse(&in_ram.replace("size = \"20GiB\"", "size = \"20GiB\"\ncreate = true")).expect_err("/run");
        assert!(e.to_string().contains("volume[db-data].create") && e.to_string().contains("/run"), "{e}");
        let e = parse(&file.replace("size = \"20GiB\"", "size = \"20GiB\"\ncreate = \"yes\"")).expect_err("type");
        assert!(e.to_string().contains("create") && e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn nbd_tls_defaults_by_address_and_refuses_plaintext_off_loopback() {
        let with = |listen: &str, extra: &str| {
            parse(&GOOD.replace("nbd_listen = \"127.0.0.1:10809\"", &format!("nbd_listen = \"{listen}\"\n{extra}")))
        };
        let c = parse(GOOD).expect("loopback");
        assert_eq!((c.node.nbd_tls, c.node.nbd_tls_clients.as_deref()), (NbdTlsMode::Off, None));
        assert_eq!(with("[::1]:10809", "").expect("::1").node.nbd_tls, NbdTlsMode::Off);
        assert_eq!(with("127.0.0.1:10809", "nbd_tls = \"require\"").expect("opt in").node.nbd_tls, NbdTlsMode::Require);
        for addr in ["0.0.0.0:10809", "192.0.2.1:10809", "[::]:10809", "[::ffff:192.0.2.1]:10809"] {
            assert_eq!(with(addr, "").expect(addr).node.nbd_tls, NbdTlsMode::Require, "{addr}");
            let e = with(addr, "nbd_tls = \"off\"").expect_err(addr).to_string();
            assert!(e.contains("node.nbd_tls") && e.contains("not a loopback") && e.contains("require"), "{e}");
        }
        assert_eq!(
            with("[::ffff:127.0.0.1]:10809", "nbd_tls = \"off\"").expect("mapped").node.nbd_tls,
            NbdTlsMode::Off
        );
        let e = with("127.0.0.1:1", "nbd_tls = \"yes\"").expect_err("value").to_string();
        assert!(e.contains("node.nbd_tls") && e.contains("\"require\""), "{e}");
        let c = with("0.0.0.0:1", "nbd_tls_clients = [\"app-1\", \"app-2\"]").expect("allow-list");
        assert_eq!(c.node.nbd_tls_clients, Some(vec!["app-1".to_string(), "app-2".to_string()]));
        let e = with("127.0.0.1:1", "nbd_tls_clients = [\"app-1\"]").expect_err("no TLS").to_string();
        assert!(e.contains("node.nbd_tls_clients") && e.contains("off"), "{e}");
        let e = with("0.0.0.0:1", "nbd_tls_clients = []").expect_err("empty").to_string();
        assert!(e.contains("node.nbd_tls_clients") && e.contains("empty"), "{e}");
        let e = with("0.0.0.0:1", "nbd_tls_clients = [\"a/b\"]").expect_err("name").to_string();
        assert!(e.contains("node.nbd_tls_clients[0]"), "{e}");
    }

    #[test]
    fn log_filter() {
        let with = |log: &str| parse(&GOOD.replace("[tls]", &format!("log = {log:?}\n\n[tls]")));
        assert_eq!(parse(GOOD).expect("none").node.log, None);
        assert_eq!(
            with("debug").expect("level").node.log.as_deref(),
            Some("debug,quinn=warn,quinn_udp=error,rustls=warn")
        );
        assert_eq!(
            with("info,replicator::nbd=debug").expect("directives").node.log.as_deref(),
            Some("info,replicator::nbd=debug")
        );
        let e = with("loud").expect_err("bad").to_string();
        assert!(e.contains("node.log") && e.contains("\"loud\""), "{e}");
    }

    #[test]
    fn names() {
        assert!(is_valid_name("db-data_1"));
        assert!(!is_valid_name("-x"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(""));
        assert!(is_valid_name("123") && is_valid_name("a-"), "fine for groups and volumes");
        for host in ["site-a", "1a", "a_b", "12-3"] {
            assert!(is_valid_host_name(host), "{host}");
        }
        for not_host in ["123", "a-", "0x1", "-x"] {
            assert!(!is_valid_host_name(not_host), "{not_host}");
        }
        let e = parse(&GOOD.replace("name = \"site-a\"", "name = \"123\"")).expect_err("digits").to_string();
        assert!(e.contains("node.name") && e.contains("certificate"), "{e}");
    }
}
