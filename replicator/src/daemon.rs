//! `replicator run`: the daemon. Opens volumes and groups, binds the QUIC
//! endpoint, the control socket and the NBD sockets, tells systemd it is
//! ready, and on SIGTERM/SIGINT stops cleanly: NBD clients' in-flight
//! requests finish, the secondary finishes applying what it received, and
//! everything is flushed before exit.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::Config;
use crate::group::Group;
use crate::io::{BackendChoice, IoEngine};
use crate::node::Node;
use crate::transport::Transport;
use crate::volume::Volume;

/// Daemon start-up errors (each names what to fix).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A volume could not be opened.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// A group could not be opened.
    #[error("group {group}: {source}")]
    Group {
        /// Group.
        group: String,
        /// Error.
        source: crate::group::GroupError,
    },
    /// QUIC / TLS set-up.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
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

fn bind_unix(path: &Path, mode: u32, what: &'static str) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket { what, path: path.display().to_string(), source };
    if path.exists() {
        // A stale socket from a previous run; refuse if a daemon still answers.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another replicator daemon is already serving this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    for (what, dir) in [("state_dir", &config.node.state_dir), ("run_dir", &config.node.run_dir)] {
        std::fs::create_dir_all(dir)
            .map_err(|source| DaemonError::Socket { what, path: dir.display().to_string(), source })?;
    }
    let engine = IoEngine::new(BackendChoice::Auto);
    if let Some(reason) = engine.fallback_reason() {
        tracing::warn!("io_uring unavailable ({reason}); using the thread-pool I/O backend");
    }
    let transport = Arc::new(Transport::bind(&config)?);
    let mut groups = Vec::new();
    for gc in &config.groups {
        let mut volumes = Vec::new();
        for (i, vc) in gc.volumes.iter().enumerate() {
            volumes.push(Arc::new(Volume::open(&engine, vc, i as u32)?));
        }
        let group = Group::open(gc.clone(), volumes, engine.clone(), &config.node.state_dir, transport.clone())
            .await
            .map_err(|source| DaemonError::Group { group: gc.name.clone(), source })?;
        groups.push(group);
    }
    let node = Arc::new(Node::new(groups, transport.clone()));
    let (shutdown_tx, shutdown) = watch::channel(false);

    let control = bind_unix(&config.control_socket(), 0o660, "control socket")?;
    let nbd_unix = bind_unix(&config.nbd_socket(), 0o660, "NBD socket")?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::control::serve(control, node.clone(), shutdown.clone()));
    tasks.spawn(crate::nbd::serve_unix(nbd_unix, node.clone(), shutdown.clone()));
    if let Some(addr) = config.node.nbd_listen {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Socket { what: "NBD TCP listener", path: addr.to_string(), source })?;
        tasks.spawn(crate::nbd::serve_tcp(tcp, node.clone(), shutdown.clone()));
    }
    if let Some(addr) = config.node.metrics_listen {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Socket { what: "metrics listener", path: addr.to_string(), source })?;
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
    for g in &node.groups {
        g.start();
    }

    let summary = format!(
        "node {} serving {} group(s) on NBD {}; QUIC {}; I/O {}",
        config.node.name,
        node.groups.len(),
        config.nbd_socket().display(),
        transport.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        engine.backend()
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

    let mut term = signal(SignalKind::terminate())
        .map_err(|source| DaemonError::Socket { what: "signal handler", path: "SIGTERM".into(), source })?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|source| DaemonError::Socket { what: "signal handler", path: "SIGINT".into(), source })?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping cleanly"),
        _ = int.recv() => tracing::info!("SIGINT: stopping cleanly"),
    }
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    // NBD connections finish in-flight requests; secondary sessions drain.
    let _ = tokio::time::timeout(Duration::from_secs(30), async { while tasks.join_next().await.is_some() {} }).await;
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while node.groups.iter().any(|g| g.session_attached()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("a replication session did not drain within 30s");
    }
    for g in &node.groups {
        g.shutdown().await;
    }
    transport.close().await;
    let _ = std::fs::remove_file(config.control_socket());
    let _ = std::fs::remove_file(config.nbd_socket());
    tracing::info!("stopped");
    Ok(())
}
