//! What `replicator config check` verifies on the host, beyond the syntax
//! and values of the file ([`crate::config`]): everything `replicator run`
//! would otherwise only find out when it starts or dials a peer.
//!
//! - `node.state_dir`, `node.run_dir`: a directory, or missing in a
//!   directory that exists (the daemon creates them, not their parents),
//!   writable (under systemd: ReadWritePaths= outside the unit's own
//!   directories);
//! - `[tls]`: the files load, the key is private (0600), the certificate
//!   names `node.name`, the key belongs to the certificate, and the
//!   certificate verifies under the configured CA now;
//! - `[[peer]]` addresses resolve (a DNS name that resolves to nothing is an
//!   error here, although `run` resolves it again at each dial);
//! - `[[group.volume]]`: the path exists (or `create = true` and its
//!   directory exists), is a regular file or a block device, has exactly
//!   the configured `size`, and can be opened read-write (not on a
//!   read-only mount, permitted by the device cgroup and file modes: under
//!   systemd, what the generated drop-in grants).
//!
//! Nothing is created or written.

use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::config::{Config, ConfigError, PeerConfig};
use crate::io::{BackendChoice, IoEngine};
use crate::tls::{TlsError, TlsIdentity};

/// How long `config check` waits for one peer name to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `node.state_dir` and `node.run_dir`: the daemon creates the directory
/// itself (with its mode), but not the directories above it, so that a typo
/// does not silently start a node with an empty state. `Err` says what is
/// wrong and how to fix it.
pub fn check_daemon_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return crate::volume::check_writable(dir, "write in"),
        Ok(_) => return Err(format!("{} exists and is not a directory", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    match std::fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => crate::volume::check_writable(parent, &format!("create {} in", dir.display())),
        Ok(_) => Err(format!("{} cannot be created: {} is not a directory", dir.display(), parent.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
            "{}: the directory {} does not exist; the daemon creates {} itself but not the directories above it: \
             create {} or fix the path",
            dir.display(),
            parent.display(),
            dir.display(),
            parent.display()
        )),
        Err(e) => Err(format!("{}: {e}", parent.display())),
    }
}

/// The `[tls]` key a TLS error concerns.
fn tls_key(config: &Config, e: &TlsError) -> &'static str {
    match e {
        TlsError::KeyMismatch { .. } | TlsError::KeyPermissions { .. } => "tls.key",
        TlsError::Pem { path, .. } if *path == config.tls.key => "tls.key",
        TlsError::Pem { path, .. } if *path == config.tls.ca => "tls.ca",
        _ => "tls.cert",
    }
}

/// Resolves a peer's address, giving up after [`RESOLVE_TIMEOUT`].
fn resolve(peer: &PeerConfig) -> Result<(), String> {
    let address = peer.address.clone();
    let (tx, rx) = mpsc::channel();
    // getaddrinfo cannot be cancelled: a stuck lookup is left to finish on
    // its own thread.
    std::thread::spawn(move || {
        let _ = tx.send(address.resolve_blocking());
    });
    let host = &peer.address.host;
    match rx.recv_timeout(RESOLVE_TIMEOUT) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "cannot resolve {host:?}: {e}; the daemon resolves it at each connection attempt and could not reach \
             the peer: fix the name (or DNS, /etc/hosts), or write the peer's IP address"
        )),
        Err(_) => Err(format!(
            "resolving {host:?} took more than {}s; fix the name or DNS, or write the peer's IP address",
            RESOLVE_TIMEOUT.as_secs()
        )),
    }
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Problems that keep `run` from starting (a directory, a volume, TLS
    /// files that do not load) or that no waiting fixes (a certificate not
    /// issued by the configured CA).
    pub fatal: Vec<ConfigError>,
    /// Problems `run` starts with, serving its volumes locally, while the
    /// replication link cannot come up, and which may go away by
    /// themselves: a peer name that does not resolve now, a certificate
    /// expired or not valid yet by this host's clock (after a disaster the
    /// peer's site, with its DNS, may be gone and the clock not synced yet:
    /// the surviving node must still start, to take over). A certificate
    /// from another CA is fatal.
    pub link: Vec<ConfigError>,
    /// Problems that keep one group down (its volumes as the pair knows
    /// them moved, or a paired group renamed): `run` starts the others,
    /// that group `FAILED`.
    pub group: Vec<ConfigError>,
}

/// Every problem found (none: `run` will find the host as configured).
pub fn check(config: &Config) -> Findings {
    let problem = |key: String, message: String| ConfigError::Invalid { path: config.path.clone(), key, message };
    let mut findings = Findings::default();
    for (key, dir) in [("node.state_dir", &config.node.state_dir), ("node.run_dir", &config.node.run_dir)] {
        if let Err(m) = check_daemon_dir(dir) {
            findings.fatal.push(problem(key.to_string(), m));
        }
    }
    match TlsIdentity::load(&config.tls, &config.node.name) {
        Ok(identity) => match identity.verify_own_chain(&config.tls, &config.node.name) {
            Ok(()) => {}
            Err(e @ TlsError::NotFromCa { clock: true, .. }) => {
                findings.link.push(problem(tls_key(config, &e).to_string(), e.to_string()));
            }
            Err(e) => findings.fatal.push(problem(tls_key(config, &e).to_string(), e.to_string())),
        },
        Err(e) => findings.fatal.push(problem(tls_key(config, &e).to_string(), e.to_string())),
    }
    for peer in &config.peers {
        if let Err(m) = resolve(peer) {
            findings.link.push(problem(format!("peer[{}].address", peer.name), m));
        }
    }
    let engine = IoEngine::new(BackendChoice::Threads);
    for group in &config.groups {
        for volume in &group.volumes {
            if let Err((field, m)) = crate::volume::probe(&engine, volume) {
                findings.fatal.push(problem(format!("group[{}].volume[{}].{field}", group.name, volume.name), m));
            }
        }
    }
    if let Err((key, m)) = check_volume_files(config) {
        findings.fatal.push(problem(key, m));
    }
    // What the state directory says of paired groups' volumes.
    for (group, why) in crate::group::layout::check(&config.node.state_dir, &config.groups) {
        findings.group.push(problem(format!("group[{group}].volume"), why));
    }
    findings
}

/// Every volume is a file of its own, outside `node.state_dir`: two paths
/// may name one file (`..`, a symbolic link, a hard link), which two
/// groups or exports would then write at once, and a volume inside the
/// state directory could be the file of a journal. Paths that do not exist
/// (yet) are skipped. `Err` names the volume's key and what is wrong.
pub fn check_volume_files(config: &Config) -> Result<(), (String, String)> {
    use std::os::unix::fs::MetadataExt;
    let state_dir = std::fs::canonicalize(&config.node.state_dir).unwrap_or_else(|_| config.node.state_dir.clone());
    let run_dir = std::fs::canonicalize(&config.node.run_dir).unwrap_or_else(|_| config.node.run_dir.clone());
    let mut seen: std::collections::HashMap<(u64, u64), String> = std::collections::HashMap::new();
    for group in &config.groups {
        for volume in &group.volumes {
            let key = format!("group[{}].volume[{}].path", group.name, volume.name);
            let Ok(meta) = std::fs::metadata(&volume.path) else { continue };
            let real = std::fs::canonicalize(&volume.path).unwrap_or_else(|_| volume.path.clone());
            if real.starts_with(&state_dir) {
                return Err((
                    key,
                    format!(
                        "{} is inside node.state_dir ({}), where the daemon keeps its journals and state: put \
                         volumes elsewhere",
                        volume.path.display(),
                        state_dir.display()
                    ),
                ));
            }
            if real.starts_with(&run_dir) {
                return Err((
                    key,
                    format!(
                        "{} is inside node.run_dir ({}), which holds the sockets and is emptied at every stop \
                         (systemd's RuntimeDirectory) and at reboot: put volumes elsewhere",
                        volume.path.display(),
                        run_dir.display()
                    ),
                ));
            }
            let name = format!("{} ({})", volume.name, volume.path.display());
            if let Some(other) = seen.insert((meta.dev(), meta.ino()), name) {
                return Err((
                    key,
                    format!(
                        "{} is the same file as volume {other} (through `..`, a symbolic or a hard link): two \
                         volumes would write one file",
                        volume.path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}
