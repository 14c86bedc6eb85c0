//! `replicator run`: the daemon. Locks its `state_dir` (one daemon per
//! state_dir, see [`crate::state_lock`]), opens volumes (block devices
//! exclusively) and groups, binds the QUIC endpoint, the control socket and
//! the NBD sockets, tells systemd it is ready, and on SIGTERM/SIGINT stops
//! cleanly: NBD clients' in-flight requests finish, the secondary finishes
//! applying what it received, and everything is flushed before exit.
//!
//! A group is recorded as cleanly shut down (`clean_shutdown`, which skips
//! the journal replay at the next start) only when nothing can still write
//! to its volumes: every NBD request finished in time and every replication
//! session drained. Otherwise the daemon exits without that mark, and the
//! next start replays the journals: the safe path.
//!
//! SIGHUP reloads what can change while running ([`reload`]): the log filter
//! and the TLS certificate, key and CA (for new QUIC and NBD-TLS
//! connections), `node.nbd_tls_clients`, and each group's
//! `accept_pair_create`; it logs one line saying what
//! was reloaded, what was kept and why, and which changed settings need a
//! restart.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::{Config, GroupConfig, NbdTlsMode};
use crate::group::{Group, Pacing};
use crate::io::{BackendChoice, IoEngine};
use crate::nbd::{Drain, NbdTls, ServeOptions, SharedLimits, SHUTDOWN_BACKSTOP};
use crate::node::{FailedGroup, Node};
use crate::state_lock::{StateDirLock, StateLockError};
use crate::tls::TlsIdentity;
use crate::transport::{Transport, TransportError};
use crate::volume::Volume;

/// How long, after SIGTERM, the NBD servers and the metrics listener may
/// take to stop: the NBD servers' own limit (grace
/// period plus backstop) and a margin.
fn stop_timeout() -> Duration {
    ServeOptions::default().shutdown_grace + SHUTDOWN_BACKSTOP + Duration::from_secs(5)
}

/// How long, after the NBD servers stopped, replication sessions may take
/// to drain (the secondary applies what it received).
const SESSION_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the signal a clean stop waits for admin commands still
/// running: longer than a switchover waits for the peer's answer.
const ADMIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(40);

/// How long the runtime may take to stop once [`run`] has returned, for
/// blocking I/O still running (the threads backend). After an unclean stop
/// a request may hang in a volume forever; [`run`] has already refused to
/// mark the groups clean, and the process must still exit.
pub const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Mode of the control and NBD sockets: the daemon's user and group.
const SOCKET_MODE: u32 = 0o660;
const CONTROL_SOCKET: &str = "control socket";
const NBD_SOCKET: &str = "NBD socket";

/// Daemon start-up errors (each names what to fix).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A volume could not be opened.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// Another daemon runs on this state_dir (or its lock file is unusable).
    #[error(transparent)]
    StateLock(#[from] StateLockError),
    /// A group could not be opened.
    #[error("group {group}: {source}")]
    Group {
        /// Group.
        group: String,
        /// Error.
        source: crate::group::GroupError,
    },
    /// No configured group could be opened (each one's reason).
    #[error("no group could be opened: {0}")]
    NoGroupOpened(String),
    /// QUIC / TLS set-up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A socket path is unsafe to use (a symbolic link, not a socket).
    #[error("{what} {path}: {reason}")]
    Refused {
        /// What.
        what: &'static str,
        /// Path.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A socket or directory could not be created.
    #[error("{what} {path}: {source}")]
    Socket {
        /// What.
        what: &'static str,
        /// Path or address.
        path: String,
        /// Error.
        source: std::io::Error,
    },
}

/// Makes `path` free for a socket: refuses a symbolic link there (never
/// followed, never removed), anything else that is not a socket, and a
/// socket a daemon still answers on; removes a stale socket.
/// File descriptors kept for everything but NBD connections: volumes,
/// journals, the QUIC socket, control (32) and metrics (8) connections, the
/// runtime.
const FDS_RESERVED: u64 = 128;

/// The NBD connection cap under a file descriptor limit of `fd_limit`:
/// `default`, or less so that NBD clients take at most half of what is left
/// after [`FDS_RESERVED`] (the daemon never runs out of descriptors for
/// `status` or its own files because of them).
fn nbd_connection_cap(default: usize, fd_limit: u64) -> usize {
    let fits = usize::try_from(fd_limit.saturating_sub(FDS_RESERVED) / 2).unwrap_or(usize::MAX);
    default.min(fits).max(1)
}

fn clear_socket_path(path: &Path, what: &'static str) -> Result<(), DaemonError> {
    let err = |source| DaemonError::Socket { what, path: path.display().to_string(), source };
    let refuse = |reason: String| DaemonError::Refused { what, path: path.display().to_string(), reason };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
            return Err(refuse(format!(
                "is a symbolic link (to {target}); refusing to create the socket through it. Remove the link, \
                 and find out who created it: run_dir should be writable by the daemon's user only"
            )));
        }
        Ok(meta) if meta.file_type().is_socket() => {
            // A stale socket from a previous run; refuse if a daemon still answers.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another replicator daemon is already serving this socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(refuse("exists and is not a socket; refusing to replace it (move it away)".to_string()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    Ok(())
}

/// Binds a Unix socket at `path` (see [`clear_socket_path`]) and gives it
/// `mode`.
fn bind_unix(path: &Path, mode: u32, what: &'static str) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket { what, path: path.display().to_string(), source };
    let refuse = |reason: String| DaemonError::Refused { what, path: path.display().to_string(), reason };
    clear_socket_path(path, what)?;
    // bind(2) never follows a symbolic link: one planted since the check
    // above makes it fail with "address in use".
    let listener = UnixListener::bind(path).map_err(err)?;
    // chmod(2) would follow one, though: check again (run_dir, 0750, keeps
    // others from planting anything there in the first place).
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => return Err(refuse("was replaced right after it was created; refusing to use it".to_string())),
        Err(e) => return Err(err(e)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// How a daemon stopped.
#[must_use]
#[derive(Debug)]
pub struct Stopped {
    /// The lock on `state_dir`: the caller drops it only once the runtime
    /// has stopped, since after an unclean stop tasks may still write the
    /// volumes and journals until then, and another daemon must not replay
    /// them meanwhile.
    pub lock: StateDirLock,
    /// Why groups were not marked cleanly shut down (their journals are
    /// replayed at the next start); empty after a clean stop. `run` then
    /// exits 1, so that systemd and a runbook see the stop as failed.
    pub unclean: Vec<String>,
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// Start-up fails, before any group, journal or volume is opened, if
/// another process holds the `state_dir` lock; a volume on a block device
/// that is mounted or opened exclusively elsewhere fails it too, as any
/// group that cannot be opened does when it is the only one (with more,
/// that group is left out as FAILED and the others run).
///
/// On SIGTERM/SIGINT the groups are flushed and marked cleanly shut down
/// only if the NBD servers report every request finished in the export
/// ([`Drain::Complete`]), the metrics listener stopped, all
/// within [`stop_timeout`], and every replication session drained within
/// [`SESSION_DRAIN_TIMEOUT`]. Otherwise an error is logged ("not marking
/// the groups clean: ...") and nothing is marked, so that the next start
/// replays the journals instead of trusting volumes that something may
/// still have been writing to.
///
/// Returns the lock on `state_dir` and what kept the stop from being clean
/// (see [`Stopped`]).
pub async fn run(config: Config) -> Result<Stopped, DaemonError> {
    let state_dir = &config.node.state_dir;
    // The daemon creates state_dir and run_dir, not the directories above
    // them: a mistyped path must not start a node with an empty state.
    for (what, dir) in [("state_dir", state_dir), ("run_dir", &config.node.run_dir)] {
        crate::preflight::check_daemon_dir(dir).map_err(|m| DaemonError::Socket {
            what,
            path: dir.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, m),
        })?;
    }
    crate::perms::ensure_dir(state_dir, crate::perms::STATE_DIR_MODE, "state_dir")
        .map_err(|source| DaemonError::Socket { what: "state_dir", path: state_dir.display().to_string(), source })?;
    // Held until this function returns (the kernel drops it if we die).
    let state_lock = StateDirLock::acquire(state_dir)?;
    // The names of state_dir and of its `groups` directory are durable
    // before anything in them is relied on: a crash between their creation
    // and its directory fsync left them not durable, and only this fsyncs
    // them again (each group directory is fsynced with its state saves).
    let groups_dir = state_dir.join("groups");
    for dir in [state_dir.parent(), Some(state_dir.as_path()), Some(groups_dir.as_path())].into_iter().flatten() {
        if dir.as_os_str().is_empty() || !dir.exists() {
            continue;
        }
        // Said, not fatal: a parent the daemon may not read (execute-only)
        // or a file system without directory fsync.
        if let Err(e) = crate::durable::sync_dir(dir) {
            tracing::warn!("{e}: a power cut may lose names in it");
        }
    }
    let run_dir = &config.node.run_dir;
    crate::perms::ensure_dir(run_dir, crate::perms::RUN_DIR_MODE, "run_dir").map_err(|source| DaemonError::Socket {
        what: "run_dir",
        path: run_dir.display().to_string(),
        source,
    })?;
    if run_dir.starts_with(&config.node.state_dir) {
        // Said, not refused: a node administered as root works.
        tracing::warn!(
            "run_dir {} is inside state_dir {}, which only the daemon's user may enter (0700): members of the admin \
             group cannot reach the control socket; give run_dir a directory of its own (e.g. /run/replicator)",
            run_dir.display(),
            config.node.state_dir.display()
        );
    }
    // Before any volume or journal is opened.
    clear_socket_path(&config.control_socket(), CONTROL_SOCKET)?;
    clear_socket_path(&config.nbd_socket(), NBD_SOCKET)?;
    // The TCP listeners too: a port another program holds (10809 is
    // qemu-nbd's and nbdkit's) stops the start before any group is opened
    // and marked in use, so restarts do not replay journals in a loop.
    let bind_tcp = |what: &'static str, addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| DaemonError::Socket { what, path: addr.to_string(), source })
    };
    let nbd_tcp = match config.node.nbd_listen {
        Some(addr) => Some((addr, bind_tcp("NBD TCP listener", addr).await?)),
        None => None,
    };
    let metrics_tcp = match config.node.metrics_listen {
        Some(addr) => Some(bind_tcp("metrics listener", addr).await?),
        None => None,
    };
    let engine = IoEngine::new(BackendChoice::Auto);
    if let Some(reason) = engine.fallback_reason() {
        tracing::warn!("io_uring unavailable ({reason}); using the thread-pool I/O backend");
    }
    let transport = Arc::new(Transport::bind(&config)?);
    // A group whose volumes, state or journal cannot be opened stays down
    // while the others run (a disk gone after a reboot must not stop the
    // replication of every other group on the host); with no group left
    // the daemon does not start.
    // A paired group whose volumes moved, or that would take a volume of a
    // paired group no longer configured, is refused before any of its
    // volume files is opened (or created).
    let layout_refused = crate::group::layout::check(&config.node.state_dir, &config.groups);
    let mut opened = Vec::new();
    for gc in &config.groups {
        let volumes: Result<Vec<Arc<Volume>>, DaemonError> = match layout_refused.iter().find(|(g, _)| *g == gc.name) {
            Some((_, why)) => Err(DaemonError::Group {
                group: gc.name.clone(),
                source: crate::group::GroupError::Refused(why.clone()),
            }),
            None => gc
                .volumes
                .iter()
                .enumerate()
                .map(|(i, vc)| Volume::open(&engine, vc, i as u32).map(Arc::new).map_err(DaemonError::Volume))
                .collect(),
        };
        opened.push(volumes);
    }
    // Every volume exists now (created where `create = true`).
    crate::preflight::check_volume_files(&config).map_err(|(key, reason)| DaemonError::Refused {
        what: "volume",
        path: key,
        reason,
    })?;
    let mut groups = Vec::new();
    let mut failed = Vec::new();
    let pacing = Arc::new(Pacing::default());
    for (gc, volumes) in config.groups.iter().zip(opened) {
        let opened = match volumes {
            Ok(volumes) => Group::open(
                gc.clone(),
                volumes,
                engine.clone(),
                &config.node.state_dir,
                transport.clone(),
                pacing.clone(),
            )
            .await
            .map_err(|source| DaemonError::Group { group: gc.name.clone(), source }),
            Err(e) => Err(e),
        };
        match opened {
            Ok(group) => groups.push(group),
            Err(e) if config.groups.len() == 1 => return Err(e),
            Err(e) => {
                let failure = FailedGroup { cfg: gc.clone(), error: e.to_string() };
                tracing::error!(group = %gc.name, "{}", failure.explain());
                failed.push(failure);
            }
        }
    }
    if groups.is_empty() && !failed.is_empty() {
        return Err(DaemonError::NoGroupOpened(
            failed.iter().map(|f| format!("group {}: {}", f.cfg.name, f.error)).collect::<Vec<_>>().join("; "),
        ));
    }
    let node = Arc::new(Node::new(config.node.name.clone(), groups, failed, transport.clone(), pacing));
    let (shutdown_tx, shutdown) = watch::channel(false);

    let control = bind_unix(&config.control_socket(), SOCKET_MODE, CONTROL_SOCKET)?;
    let nbd_unix = bind_unix(&config.nbd_socket(), SOCKET_MODE, NBD_SOCKET)?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut nbd_servers = tokio::task::JoinSet::new();
    // The control socket stays up through the stop: `status` answers, and
    // a command that would change something is refused as the daemon
    // stopping (`node.admin`), where a closed socket said it was not running.
    let (control_stop, control_stopped) = watch::channel(false);
    let control_task = tokio::spawn(crate::control::serve(control, node.clone(), control_stopped));
    // One connection cap and one in-flight byte budget for both listeners.
    let mut nbd_options = ServeOptions::default();
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            let cap = nbd_connection_cap(nbd_options.max_connections, soft);
            if cap < nbd_options.max_connections {
                tracing::warn!(
                    fd_limit = soft,
                    max_connections = cap,
                    "low file descriptor limit (RLIMIT_NOFILE / LimitNOFILE=): NBD connections capped to fit it"
                );
            }
            nbd_options.max_connections = cap;
        }
        Err(e) => tracing::warn!("cannot read the file descriptor limit: {e}"),
    }
    let nbd_limits = SharedLimits::new(&nbd_options);
    nbd_servers.spawn(crate::nbd::serve_shared(
        nbd_unix,
        node.clone(),
        shutdown.clone(),
        nbd_options,
        nbd_limits.clone(),
    ));
    let mut nbd_tls = None;
    if let Some((addr, tcp)) = nbd_tcp {
        match config.node.nbd_tls {
            NbdTlsMode::Off => {
                nbd_servers.spawn(crate::nbd::serve_shared(
                    tcp,
                    node.clone(),
                    shutdown.clone(),
                    nbd_options,
                    nbd_limits,
                ));
            }
            NbdTlsMode::Require => {
                let identity = TlsIdentity::load(&config.tls, &config.node.name).map_err(TransportError::from)?;
                let tls = NbdTls::new(
                    identity.nbd_server_config().map_err(TransportError::from)?,
                    config.node.nbd_tls_clients.clone(),
                );
                nbd_tls = Some(tls.clone());
                tracing::info!(
                    %addr,
                    clients = ?config.node.nbd_tls_clients,
                    "NBD over TCP requires TLS (NBD_OPT_STARTTLS) with a client certificate from {}",
                    config.tls.ca.display()
                );
                nbd_servers.spawn(crate::nbd::serve_shared_tls(
                    tcp,
                    node.clone(),
                    shutdown.clone(),
                    nbd_options,
                    nbd_limits,
                    tls,
                ));
            }
        }
    }
    if let Some(tcp) = metrics_tcp {
        tasks.spawn(crate::metrics::serve(tcp, node.clone(), shutdown.clone()));
    }
    {
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while let Some(pc) = node.transport.accept().await {
                tokio::spawn(node.clone().serve_peer(pc, shutdown.clone()));
            }
        });
    }
    // Before the groups start and systemd hears READY: a stop or reload
    // signal from then on finds its handler (the default actions kill).
    let mut term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Socket {
        what: "signal handler",
        path: "SIGTERM".into(),
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Socket {
        what: "signal handler",
        path: "SIGINT".into(),
        source,
    })?;
    // SIGHUP would kill the daemon without a clean stop (its default
    // action); it reloads what can be reloaded instead.
    let mut hup = signal(SignalKind::hangup()).map_err(|source| DaemonError::Socket {
        what: "signal handler",
        path: "SIGHUP".into(),
        source,
    })?;
    for g in &node.groups {
        g.start();
    }

    let summary = format!(
        "node {} serving {} group(s){} on NBD {}; QUIC {}; I/O {}; state_dir {} locked",
        config.node.name,
        node.groups.len(),
        if node.failed.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = node.failed.iter().map(|f| f.cfg.name.as_str()).collect();
            format!(" (NOT OPENED: {})", names.join(", "))
        },
        config.nbd_socket().display(),
        transport.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        engine.backend(),
        state_dir.display()
    );
    tracing::info!("{summary}");
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(&summary)]);
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
        let period = Duration::from_micros(watchdog_usec / 2);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            }
        });
    }

    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping cleanly");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping cleanly");
                break;
            }
            _ = hup.recv() => reload(&config, &node, &transport, nbd_tls.as_deref()),
        }
    }
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    let stopping_since = Instant::now();
    node.admin.close();
    // NBD connections finish in-flight requests; secondary sessions drain.
    let mut unclean = Vec::new();
    let limit = stop_timeout();
    match tokio::time::timeout(limit, stop_listeners(&mut nbd_servers, &mut tasks)).await {
        Ok(problems) => unclean.extend(problems),
        Err(_) => unclean.push(format!(
            "the NBD servers and the metrics listener did not stop within {limit:?} ({} NBD server(s) still busy)",
            nbd_servers.len()
        )),
    }
    let drained = tokio::time::timeout(SESSION_DRAIN_TIMEOUT, async {
        while node.groups.iter().any(|g| g.session_attached()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        unclean.push(format!(
            "a replication session did not drain within {SESSION_DRAIN_TIMEOUT:?} (the secondary may still be applying records)"
        ));
    }
    // Admin commands still running finish first (a failover's roll-back,
    // a switchover, which waits up to 30 s for the peer's answer): one cut
    // off half way leaves what a clean stop must not vouch for. Their time
    // runs from the signal, alongside the waits above.
    let left = ADMIN_DRAIN_TIMEOUT.saturating_sub(stopping_since.elapsed());
    if tokio::time::timeout(left, node.admin.idle()).await.is_err() {
        unclean.push(format!("admin commands were still running {ADMIN_DRAIN_TIMEOUT:?} after the signal"));
    }
    if unclean.is_empty() {
        for g in &node.groups {
            if let Err(e) = g.shutdown().await {
                tracing::error!("not marked clean: {e}; its journal is replayed at the next start");
                unclean.push(e);
            }
        }
    } else {
        tracing::error!(
            "not marking the groups clean: {}; their journals are replayed at the next start",
            unclean.join("; ")
        );
    }
    let _ = control_stop.send(true);
    if let Err(e) = control_task.await {
        tracing::error!("the control socket's task failed: {e}");
    }
    transport.close().await;
    let _ = std::fs::remove_file(config.control_socket());
    let _ = std::fs::remove_file(config.nbd_socket());
    tracing::info!(lock = %state_lock.path().display(), "stopped");
    Ok(Stopped { lock: state_lock, unclean })
}

/// SIGHUP: reads the configuration file again and applies what can change
/// while running, each part on its own (one failing keeps its previous
/// value and says why, the others still apply):
/// - the log filter (`node.log`, else `RUST_LOG`, else the default);
/// - `[tls]`: the certificate, key and CA, loaded and checked as at start
///   (the key private, the certificate naming this node, belonging to the
///   key and verifying under the CA now) for new QUIC connections (both
///   directions) and new NBD-TLS connections; connections already up keep
///   their session;
/// - `node.nbd_tls_clients`, when NBD-TLS runs;
/// - each running group's `accept_pair_create` (a consent given or taken
///   back without restarting the daemon, and with it every other group's
///   replication and NBD clients; given only to a group whose section is
///   otherwise unchanged, see [`reload_consent`]).
///
/// Everything else (groups, volumes, peers, addresses, `nbd_tls` itself,
/// directories) needs a restart; the line names the sections that changed.
/// A configuration that does not load changes nothing.
fn reload(running: &Config, node: &Node, transport: &Transport, nbd_tls: Option<&NbdTls>) {
    let fresh = match Config::load(&running.path) {
        Ok(fresh) => fresh,
        Err(e) => {
            tracing::error!("SIGHUP: nothing reloaded: the configuration does not load: {e}");
            return;
        }
    };
    let mut reloaded = Vec::new();
    let mut kept = Vec::new();
    match crate::cli::reload_log_filter(fresh.node.log.as_deref()) {
        Ok(what) => reloaded.push(format!("log filter ({what})")),
        Err(e) => kept.push(format!("the log filter ({e})")),
    }
    let name = &running.node.name;
    let identity = TlsIdentity::load(&fresh.tls, name)
        .and_then(|identity| identity.verify_own_chain(&fresh.tls, name).map(|()| identity))
        .map_err(TransportError::from)
        .and_then(|identity| {
            // Both built before either is applied.
            let nbd = nbd_tls.map(|_| identity.nbd_server_config()).transpose()?;
            transport.reload_tls(&identity)?;
            transport.note_certificates(&fresh.tls);
            Ok((identity, nbd))
        });
    match identity {
        Ok((identity, nbd)) => {
            let mut what = format!(
                "TLS certificate {} ({}) and CA {} for new QUIC",
                fresh.tls.cert.display(),
                identity.describe(),
                fresh.tls.ca.display()
            );
            if let (Some(tls), Some(config)) = (nbd_tls, nbd) {
                what.push_str(" and NBD-TLS");
                tls.replace_config(config);
            }
            reloaded.push(format!("{what} connections"));
        }
        Err(e) => kept.push(format!("the previous TLS certificate, key and CA ({e})")),
    }
    // The allow-list applies whether or not the certificate did. (Turning
    // NBD-TLS off needs a restart, which keeps the list in force until
    // then: the one last reloaded, not the one of the start, which may
    // name a client revoked since.)
    if let Some(tls) = nbd_tls.filter(|_| fresh.node.nbd_tls == NbdTlsMode::Require) {
        let clients = fresh.node.nbd_tls_clients.clone();
        reloaded.push(format!("nbd_tls_clients {clients:?}"));
        tls.replace_clients(clients);
    }
    reload_consent(running, &fresh, node, &mut reloaded, &mut kept);
    let restart = settings_needing_restart(running, &fresh);
    let mut line =
        format!("SIGHUP: reloaded {}", if reloaded.is_empty() { "nothing".into() } else { reloaded.join("; ") });
    if !kept.is_empty() {
        line.push_str(&format!(". Kept {}", kept.join("; ")));
    }
    if !restart.is_empty() {
        line.push_str(&format!(". Changed but applied only at restart: {}", restart.join(", ")));
    }
    if !kept.is_empty() {
        tracing::error!("{line}");
    } else if !restart.is_empty() {
        tracing::warn!("{line}");
    } else {
        tracing::info!("{line}");
    }
}

/// The settings that differ between the running and the reloaded
/// configuration and that only a restart applies.
fn settings_needing_restart(running: &Config, fresh: &Config) -> Vec<String> {
    let (a, b) = (&running.node, &fresh.node);
    let same = |x: &dyn std::fmt::Debug, y: &dyn std::fmt::Debug| format!("{x:?}") == format!("{y:?}");
    let mut changed = Vec::new();
    for (key, differs) in [
        ("node.name", a.name != b.name),
        ("node.listen", a.listen != b.listen),
        ("node.state_dir", a.state_dir != b.state_dir),
        ("node.run_dir", a.run_dir != b.run_dir),
        ("node.nbd_listen", a.nbd_listen != b.nbd_listen),
        ("node.nbd_tls", a.nbd_tls != b.nbd_tls),
        ("node.metrics_listen", a.metrics_listen != b.metrics_listen),
        ("node.worker_threads", a.worker_threads != b.worker_threads),
        ("[[peer]]", !same(&running.peers, &fresh.peers)),
    ] {
        if differs {
            changed.push(key.to_string());
        }
    }
    changed.extend(groups_changed(&running.groups, &fresh.groups));
    changed
}

/// The groups added, removed or changed (naming the settings), but for
/// `accept_pair_create`, which a reload applies.
fn groups_changed(running: &[GroupConfig], fresh: &[GroupConfig]) -> Vec<String> {
    let mut changed = Vec::new();
    for g in running {
        let Some(f) = fresh.iter().find(|f| f.name == g.name) else {
            changed.push(format!("group {} (removed)", g.name));
            continue;
        };
        let keys: Vec<&str> = [
            ("peer", g.peer != f.peer),
            ("mode", g.mode != f.mode),
            ("journal_size", g.journal_size != f.journal_size),
            ("on_link_loss", g.on_link_loss != f.on_link_loss),
            ("link_timeout", g.link_timeout != f.link_timeout),
            ("on_journal_full", g.on_journal_full != f.on_journal_full),
            ("journal_full_timeout", g.journal_full_timeout != f.journal_full_timeout),
            ("drill_chunk", g.drill_chunk != f.drill_chunk),
            ("activity_log_extents", g.activity_log_extents != f.activity_log_extents),
            ("volumes", format!("{:?}", g.volumes) != format!("{:?}", f.volumes)),
        ]
        .into_iter()
        .filter_map(|(key, differs)| differs.then_some(key))
        .collect();
        if !keys.is_empty() {
            changed.push(format!("group {} ({})", g.name, keys.join(", ")));
        } else if consent_aside(std::slice::from_ref(g)) != consent_aside(std::slice::from_ref(f)) {
            changed.push(format!("group {} (its section)", g.name));
        }
    }
    for f in fresh.iter().filter(|f| !running.iter().any(|g| g.name == f.name)) {
        changed.push(format!("group {} (added)", f.name));
    }
    changed
}

/// The groups' settings but `accept_pair_create`, which a reload applies,
/// in a form to compare.
fn consent_aside(groups: &[GroupConfig]) -> String {
    let groups: Vec<GroupConfig> =
        groups.iter().map(|g| GroupConfig { accept_pair_create: false, ..g.clone() }).collect();
    format!("{groups:?}")
}

/// Applies each running group's `accept_pair_create` from the reloaded
/// configuration (see [`consent_after_reload`]).
fn reload_consent(running: &Config, fresh: &Config, node: &Node, reloaded: &mut Vec<String>, kept: &mut Vec<String>) {
    for group in &node.groups {
        let name = &group.cfg.name;
        let before = running.groups.iter().find(|g| &g.name == name);
        let after = fresh.groups.iter().find(|g| &g.name == name);
        let Some((accept, why)) = consent_after_reload(before, after) else {
            if !group.accepts_pair_create() {
                kept.push(format!(
                    "accept_pair_create = false for group {name} (its [[group]] section changed otherwise: \
                     consent applies at the restart that applies the rest)"
                ));
            }
            continue;
        };
        match group.set_accept_pair_create(accept) {
            None => {}
            Some(false) => reloaded.push(format!("accept_pair_create = {accept} for group {name}{why}")),
            Some(true) => reloaded.push(format!(
                "accept_pair_create = {accept} for group {name}{why} (it is already a secondary: \
                 `replicator pair delete {name}` ends that pair)"
            )),
        }
    }
}

/// A running group's consent after a reload, with what to add to the
/// reload line; `None` keeps the running consent. Consent is given only to
/// a group whose section is otherwise unchanged: with another volume path,
/// say, a pair create would overwrite the volumes the daemon still runs,
/// not those the admin consented for (that waits for the restart). Taking
/// consent back always applies, also for a group no longer in the file.
fn consent_after_reload(before: Option<&GroupConfig>, after: Option<&GroupConfig>) -> Option<(bool, &'static str)> {
    match (before, after) {
        (_, None) => Some((false, " (no longer in the configuration)")),
        (Some(b), Some(a)) if consent_aside(std::slice::from_ref(b)) == consent_aside(std::slice::from_ref(a)) => {
            Some((a.accept_pair_create, ""))
        }
        (_, Some(a)) if !a.accept_pair_create => Some((false, "")),
        (_, Some(_)) => None,
    }
}

/// Waits for the NBD servers, then the metrics listener, to
/// return; lists what keeps the shutdown from being a clean one.
async fn stop_listeners(
    nbd_servers: &mut tokio::task::JoinSet<Drain>,
    others: &mut tokio::task::JoinSet<()>,
) -> Vec<String> {
    let mut problems = Vec::new();
    while let Some(done) = nbd_servers.join_next().await {
        match done {
            Ok(Drain::Complete) => {}
            Ok(Drain::Incomplete { requests }) => {
                problems.push(format!("{requests} NBD request(s) were still running in the volumes"))
            }
            Err(e) => problems.push(format!("an NBD server task failed: {e}")),
        }
    }
    while let Some(done) = others.join_next().await {
        if let Err(e) = done {
            tracing::error!("the metrics task failed: {e}");
        }
    }
    problems
}

#[cfg(test)]
mod consent_tests {
    use super::*;
    use crate::config::VolumeConfig;

    fn group(text: &str) -> GroupConfig {
        let toml = format!(
            "[node]\nname = \"site-b\"\nlisten = \"0.0.0.0:7800\"\nstate_dir = \"/var/lib/replicator\"\nrun_dir = \"/run/replicator\"\n\
             [tls]\nca = \"/ca.pem\"\ncert = \"/b.pem\"\nkey = \"/b.key\"\n\
             [[peer]]\nname = \"site-a\"\naddress = \"192.0.2.10:7800\"\n\
             [[group]]\nname = \"db\"\npeer = \"site-a\"\nmode = \"sync\"\n{text}\n\
             [[group.volume]]\nname = \"db-data\"\npath = \"/dev/vg0/db-data\"\nsize = \"1GiB\"\n"
        );
        let config = Config::parse(Path::new("/etc/replicator/replicator.toml"), &toml).expect("valid");
        config.groups[0].clone()
    }

    #[test]
    fn consent_is_given_only_to_an_otherwise_unchanged_group_and_taken_back_always() {
        let without = group("accept_pair_create = false");
        let with = group("accept_pair_create = true");
        assert_eq!(consent_after_reload(Some(&without), Some(&with)), Some((true, "")), "given");
        assert_eq!(consent_after_reload(Some(&with), Some(&without)), Some((false, "")), "taken back");
        assert_eq!(consent_after_reload(Some(&with), Some(&with)), Some((true, "")), "unchanged");

        // Another volume path with it: the running group still has the old
        // one, and a pair create would overwrite that.
        let moved = GroupConfig {
            volumes: with
                .volumes
                .iter()
                .map(|v| VolumeConfig { path: v.path.with_file_name("db-data-new"), ..v.clone() })
                .collect(),
            ..with.clone()
        };
        assert_eq!(consent_after_reload(Some(&without), Some(&moved)), None, "kept until the restart");
        let moved_without = GroupConfig { accept_pair_create: false, ..moved.clone() };
        assert_eq!(consent_after_reload(Some(&with), Some(&moved_without)), Some((false, "")), "taken back anyway");

        // Gone from the file: no consent any more.
        assert_eq!(consent_after_reload(Some(&with), None).map(|(a, _)| a), Some(false));
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    /// The shipped unit lets a clean stop run its bounded waits (the NBD
    /// drain, then the sessions', the admin commands' within them, the
    /// transport and the runtime) with a minute left for the final flush:
    /// systemd's SIGKILL past `TimeoutStopSec` makes the stop unclean.
    #[test]
    fn the_units_stop_timeout_covers_a_clean_stop() {
        let unit = include_str!("../../systemd/replicator.service");
        let secs: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|v| v.trim().parse().ok())
            .expect("TimeoutStopSec in seconds");
        let waits = (stop_timeout() + SESSION_DRAIN_TIMEOUT).max(ADMIN_DRAIN_TIMEOUT)
            + Duration::from_secs(2) // the transport's close
            + RUNTIME_SHUTDOWN_TIMEOUT;
        assert!(
            Duration::from_secs(secs) >= waits + Duration::from_secs(60),
            "TimeoutStopSec={secs} leaves less than a minute after the stop's waits ({waits:?})"
        );
    }

    #[test]
    fn nbd_connections_fit_the_file_descriptor_limit() {
        assert_eq!(nbd_connection_cap(256, 65536), 256);
        assert_eq!(nbd_connection_cap(256, 1024), 256);
        assert_eq!(nbd_connection_cap(256, 200), 36);
        assert_eq!(nbd_connection_cap(256, 100), 1);
        assert_eq!(nbd_connection_cap(256, u64::MAX), 256);
    }
}
