//! Accept loops (Unix and TCP), one task per connection, shutdown, and the
//! single log line written when a connection closes.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{tcp, unix, TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};

use super::handshake::{self, Negotiated, Outcome, TlsState};
use super::tls::NbdTls;
use super::transmission::{self, Limits, Pace, RunningRequests};
use super::ExportCatalog;

/// Buffer in front of the socket for requests (large write payloads bypass
/// it and land directly in their `AlignedBuf`).
const REQUEST_BUFFER: usize = 16 * 1024;

/// Extra time the accept loop gives connections beyond the grace period
/// (which each connection enforces itself) before aborting them, and
/// running requests before reporting them (see [`Drain`]).
pub const SHUTDOWN_BACKSTOP: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Pause between two "too many connections" warnings, so a client
/// hammering the socket cannot flood the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Tunables of [`serve_unix_with`] and [`serve_shared`]; the defaults are
/// what [`serve_unix`] and [`serve_tcp`] use.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A client must reach the transmission phase within this time, or it
    /// is disconnected (default 30 s).
    pub handshake_timeout: Duration,
    /// Connections open at once, in the handshake or transmission phase,
    /// across every server sharing one [`SharedLimits`] (default 256). A
    /// connection beyond it is accepted and closed at once, with a warning.
    pub max_connections: usize,
    /// Requests in flight per connection (default 256); beyond this the
    /// server stops reading from the socket until replies are sent.
    pub max_in_flight_requests: usize,
    /// Read and write data bytes in flight per connection (default 256 MiB),
    /// and at most a quarter of its budget group's share of
    /// [`Self::max_total_in_flight_bytes`] (half of it: 64 MiB at the
    /// defaults) so that one client cannot hold its group's whole share.
    pub max_in_flight_bytes: usize,
    /// Read and write data bytes in flight across all connections of every
    /// server sharing one [`SharedLimits`] (default 512 MiB): a request
    /// waits (and its connection stops reading) until it fits.
    pub max_total_in_flight_bytes: usize,
    /// A client that takes no reply bytes for this long while replies are
    /// waiting is disconnected, which returns the budget its replies hold
    /// (default 60 s).
    pub reply_timeout: Duration,
    /// A client that sends no bytes of a write payload it has started for
    /// this long is disconnected (default 60 s): the payload's buffer holds
    /// the shared data budget, which a client that stopped mid-payload
    /// would otherwise keep from every other client for good. The same
    /// holds for the rest of a request header once its first byte is in.
    pub payload_timeout: Duration,
    /// The slowest a client may send a request header or a write payload,
    /// or take a reply, on average over that transfer, in bytes per second
    /// (default 64 KiB/s): each must end within its timeout above plus its
    /// length at this rate (a 32 MiB payload: 60 s + 512 s), or the client is
    /// disconnected. One that sends or takes a byte just within each
    /// timeout would otherwise hold the budget its transfer holds
    /// indefinitely.
    pub min_transfer_rate: u32,
    /// After shutdown, how long a connection may take to send the replies of
    /// its in-flight requests (to a client that has stopped reading them)
    /// before its socket is closed regardless (default 30 s). Export futures
    /// already started are never cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_in_flight_requests: 256,
            max_in_flight_bytes: 256 * 1024 * 1024,
            max_total_in_flight_bytes: 512 * 1024 * 1024,
            reply_timeout: Duration::from_secs(60),
            payload_timeout: Duration::from_secs(60),
            min_transfer_rate: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The connection slots and the data byte budget that several servers (the
/// daemon's Unix and TCP listeners) share; sized from
/// [`ServeOptions::max_connections`] and
/// [`ServeOptions::max_total_in_flight_bytes`].
#[derive(Debug, Clone)]
pub struct SharedLimits {
    connections: Arc<Semaphore>,
    max_connections: usize,
    bytes: Arc<Semaphore>,
    /// Capacity of `bytes`; a single larger request takes all of it.
    max_bytes: u32,
    /// Each budget group's share of `bytes` (see
    /// [`super::Export::budget_group`]): half of it, so that the requests of
    /// one replication group stuck waiting (a sync group waiting for its
    /// peer, a full journal under the `block` policy) leave the other half
    /// to every other group.
    exports: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>>,
}

impl SharedLimits {
    /// Fresh slots and budget sized by `options`.
    pub fn new(options: &ServeOptions) -> Self {
        let max_connections = options.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let max_bytes = u32::try_from(options.max_total_in_flight_bytes).unwrap_or(u32::MAX).max(1);
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
            exports: Arc::default(),
        }
    }

    /// The shared byte budget and its capacity.
    pub(super) fn bytes(&self) -> (Arc<Semaphore>, u32) {
        (Arc::clone(&self.bytes), self.max_bytes)
    }

    /// Budget group `name`'s share of the shared byte budget and its
    /// capacity.
    pub(super) fn export_bytes(&self, name: &str) -> (Arc<Semaphore>, u32) {
        let max = (self.max_bytes / 2).max(1);
        let mut exports = self.exports.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let share = exports.entry(name.to_string()).or_insert_with(|| Arc::new(Semaphore::new(max as usize)));
        (Arc::clone(share), max)
    }
}

/// How a server's shutdown ended: whether every export operation it
/// started has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a shutdown that left requests running in the export is not a clean one"]
pub enum Drain {
    /// Every connection is closed and every request the server started has
    /// finished in the export.
    Complete,
    /// [`ServeOptions::shutdown_grace`] plus [`SHUTDOWN_BACKSTOP`] after
    /// shutdown, requests were still running in the export. Their futures
    /// are not cancelled and may still write to it after the server has
    /// returned.
    Incomplete {
        /// Requests still running.
        requests: usize,
    },
}

/// Accept loop; one task per connection; returns when `shutdown` becomes true (connections then finish their in-flight requests, reply, and close).
///
/// Uses [`ServeOptions::default`]; see [`serve_unix_with`].
pub async fn serve_unix<C: ExportCatalog>(
    listener: UnixListener,
    catalog: Arc<C>,
    shutdown: watch::Receiver<bool>,
) -> Drain {
    serve_unix_with(listener, catalog, shutdown, ServeOptions::default()).await
}

/// Accept loop over TCP (`TCP_NODELAY` is set on every connection);
/// otherwise as [`serve_unix`].
pub async fn serve_tcp<C: ExportCatalog>(
    listener: TcpListener,
    catalog: Arc<C>,
    shutdown: watch::Receiver<bool>,
) -> Drain {
    let options = ServeOptions::default();
    let limits = SharedLimits::new(&options);
    accept_loop(listener, catalog, shutdown, options, limits, None).await
}

/// Serves NBD on a Unix socket until `shutdown` becomes true (or its sender
/// is dropped). Then it stops accepting (the listener is dropped), lets each
/// connection finish its in-flight requests and send their replies, and
/// returns once every connection is closed and every request has finished
/// in the export. A connection whose client does not read its replies is
/// closed [`ServeOptions::shutdown_grace`] after shutdown. It returns
/// [`Drain::Incomplete`] if requests are still running in the export
/// [`ServeOptions::shutdown_grace`] plus [`SHUTDOWN_BACKSTOP`] after
/// shutdown: the caller must then not treat the export as quiescent.
pub async fn serve_unix_with<C: ExportCatalog>(
    listener: UnixListener,
    catalog: Arc<C>,
    shutdown: watch::Receiver<bool>,
    options: ServeOptions,
) -> Drain {
    let limits = SharedLimits::new(&options);
    accept_loop(listener, catalog, shutdown, options, limits, None).await
}

/// As [`serve_unix_with`], on any listener (the Unix socket or TCP), with
/// connection slots and a byte budget shared with other servers (`limits`;
/// its sizes win over those in `options`).
pub async fn serve_shared<L: Listener, C: ExportCatalog>(
    listener: L,
    catalog: Arc<C>,
    shutdown: watch::Receiver<bool>,
    options: ServeOptions,
    limits: SharedLimits,
) -> Drain {
    accept_loop(listener, catalog, shutdown, options, limits, None).await
}

/// As [`serve_shared`], in the protocol's FORCEDTLS mode: a client must
/// upgrade with `NBD_OPT_STARTTLS` and complete a TLS handshake with a
/// client certificate that `tls` accepts before any other option is served
/// (others get `NBD_REP_ERR_TLS_REQD`). The TLS handshake counts against
/// [`ServeOptions::handshake_timeout`] like the rest of the handshake.
pub async fn serve_shared_tls<L: Listener, C: ExportCatalog>(
    listener: L,
    catalog: Arc<C>,
    shutdown: watch::Receiver<bool>,
    options: ServeOptions,
    limits: SharedLimits,
    tls: Arc<NbdTls>,
) -> Drain {
    accept_loop(listener, catalog, shutdown, options, limits, Some(tls)).await
}

/// Resolves once shutdown is requested. A dropped sender counts as a
/// request: nobody could ask for shutdown any more.
pub(super) async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// A listening socket whose connections are split into independent read
/// and write halves: tokio's Unix listener, and its TCP listener (which sets
/// `TCP_NODELAY` on every connection).
pub trait Listener: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// The next connection's halves and a description of the peer for logs.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Read, Self::Write, String)>> + Send;
}

impl Listener for UnixListener {
    type Read = unix::OwnedReadHalf;
    type Write = unix::OwnedWriteHalf;

    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let peer = match stream.peer_cred() {
            Ok(cred) => match cred.pid() {
                Some(pid) => format!("unix pid={pid} uid={}", cred.uid()),
                None => format!("unix uid={}", cred.uid()),
            },
            Err(_) => "unix".to_owned(),
        };
        let (read, write) = stream.into_split();
        Ok((read, write, peer))
    }
}

impl Listener for TcpListener {
    type Read = tcp::OwnedReadHalf;
    type Write = tcp::OwnedWriteHalf;

    async fn accept(&self) -> io::Result<(Self::Read, Self::Write, String)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(peer = %addr, error = %err, "NBD: cannot set TCP_NODELAY");
        }
        let (read, write) = stream.into_split();
        Ok((read, write, addr.to_string()))
    }
}

/// What every connection of one server shares.
struct Shared<C> {
    catalog: Arc<C>,
    running: RunningRequests,
    options: ServeOptions,
    limits: SharedLimits,
    /// FORCEDTLS with these settings; `None`: no TLS on this listener.
    tls: Option<Arc<NbdTls>>,
}

async fn accept_loop<L: Listener, C: ExportCatalog>(
    listener: L,
    catalog: Arc<C>,
    mut shutdown: watch::Receiver<bool>,
    options: ServeOptions,
    limits: SharedLimits,
    tls: Option<Arc<NbdTls>>,
) -> Drain {
    let mut connections = JoinSet::new();
    // Connections still in their handshake (not yet authenticated, on a TLS
    // listener) hold at most a quarter of the shared slots per listener: a
    // host that opens connections and sends nothing cannot take the slots
    // of the other listeners, or of clients that finish their handshake.
    let max_handshakes = (limits.max_connections / 4).max(1);
    let handshakes = Arc::new(Semaphore::new(max_handshakes));
    let running = RunningRequests::new();
    let shared = Arc::new(Shared { catalog, running: running.clone(), options, limits: limits.clone(), tls });
    let mut next_id: u64 = 0;
    let mut refusals = Refusals::default();
    loop {
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => reap(done),
            accepted = listener.accept() => match accepted {
                Ok((read, write, peer)) => {
                    next_id += 1;
                    let slots = Arc::clone(&handshakes)
                        .try_acquire_owned()
                        .map_err(|_| format!("{max_handshakes} connection(s) of this listener are in their handshake"))
                        .and_then(|handshake| {
                            Arc::clone(&limits.connections)
                                .try_acquire_owned()
                                .map(|slot| (slot, handshake))
                                .map_err(|_| format!("the server has its maximum of {} connection(s)", limits.max_connections))
                        });
                    match slots {
                        Ok((slot, handshake)) => {
                            connections.spawn(connection(
                                next_id,
                                peer,
                                read,
                                write,
                                Arc::clone(&shared),
                                shutdown.clone(),
                                (slot, handshake),
                            ));
                        }
                        // Closed at once: its file descriptor is not kept.
                        Err(why) => refusals.refused(next_id, &peer, &why),
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "NBD accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);

    if !connections.is_empty() {
        tracing::info!(
            connections = connections.len(),
            "NBD server stopping: letting connections finish their in-flight requests"
        );
    }
    let deadline = tokio::time::Instant::now() + options.shutdown_grace + SHUTDOWN_BACKSTOP;
    let drained = tokio::time::timeout_at(deadline, async {
        while let Some(done) = connections.join_next().await {
            reap(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            grace = ?options.shutdown_grace,
            "NBD connections still busy after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
    // A connection closed for a client that stopped reading may leave its
    // requests running; they are never cancelled, so wait for them too.
    if tokio::time::timeout_at(deadline, running.idle()).await.is_ok() {
        return Drain::Complete;
    }
    let requests = running.count();
    tracing::error!(
        requests,
        after = ?options.shutdown_grace + SHUTDOWN_BACKSTOP,
        "NBD server stopped with requests still running in the export"
    );
    Drain::Incomplete { requests }
}

/// Warnings for connections refused at the connection limit, at most one
/// per [`REFUSAL_LOG_INTERVAL`] (counting the ones not logged).
#[derive(Debug, Default)]
struct Refusals {
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, conn: u64, peer: &str, why: &str) {
        if self.last_log.is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL) {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(conn, peer, also_refused = self.unlogged, "NBD connection refused: {why}; closing it");
        self.last_log = Some(Instant::now());
        self.unlogged = 0;
    }
}

fn reap(done: Result<(), JoinError>) {
    if let Err(err) = done {
        if err.is_panic() {
            tracing::error!(error = %err, "NBD connection task panicked");
        }
    }
}

/// One connection: handshake (bounded in time, the TLS upgrade included),
/// transmission, one log line.
async fn connection<C, R, W>(
    id: u64,
    mut peer: String,
    read: R,
    mut write: W,
    shared: Arc<Shared<C>>,
    mut shutdown: watch::Receiver<bool>,
    (_slot, handshake): (OwnedSemaphorePermit, OwnedSemaphorePermit),
) where
    C: ExportCatalog,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let timeout = shared.options.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let catalog = &*shared.catalog;
    let state = if shared.tls.is_some() { TlsState::Required } else { TlsState::Unavailable };
    // Kept across both phases: bytes a client pipelines right after its
    // NBD_OPT_GO stay buffered for the transmission phase.
    let mut reader = BufReader::with_capacity(REQUEST_BUFFER, read);
    let first = bounded(deadline, timeout, &mut shutdown, async {
        let no_zeroes = handshake::greet(&mut reader, &mut write, state).await?;
        let outcome = handshake::haggle(&mut reader, &mut write, catalog, no_zeroes, state).await?;
        Ok((no_zeroes, outcome))
    })
    .await;
    let (export_name, reason) = match (first, &shared.tls) {
        (Err(reason), _) => (None, reason),
        (Ok((_, Outcome::Transmission(negotiated))), _) => {
            drop(handshake);
            transmit(id, &peer, reader, write, negotiated, &shared, &mut shutdown).await
        }
        // Only a listener with TLS acknowledges STARTTLS.
        (Ok((_, Outcome::StartTls)), None) => (None, CloseReason::Protocol("STARTTLS without TLS".into())),
        (Ok((no_zeroes, Outcome::StartTls)), Some(tls)) => {
            match bounded(deadline, timeout, &mut shutdown, super::tls::accept(tls, reader, write)).await {
                Err(reason) => (None, reason),
                Ok((session, client)) => {
                    peer = format!("{peer} tls-client={client}");
                    let (read, mut write) = tokio::io::split(session);
                    let mut reader = BufReader::with_capacity(REQUEST_BUFFER, read);
                    let secured = bounded(
                        deadline,
                        timeout,
                        &mut shutdown,
                        handshake::haggle(&mut reader, &mut write, catalog, no_zeroes, TlsState::Established),
                    )
                    .await;
                    match secured {
                        Err(reason) => (None, reason),
                        Ok(Outcome::Transmission(negotiated)) => {
                            drop(handshake);
                            transmit(id, &peer, reader, write, negotiated, &shared, &mut shutdown).await
                        }
                        Ok(Outcome::StartTls) => (None, CloseReason::Protocol("STARTTLS inside TLS".into())),
                    }
                }
            }
        }
    };
    reason.log(id, &peer, export_name.as_deref());
}

/// A handshake step, ended by shutdown or by the handshake's deadline.
async fn bounded<T>(
    deadline: tokio::time::Instant,
    timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
    step: impl Future<Output = Result<T, CloseReason>>,
) -> Result<T, CloseReason> {
    tokio::select! {
        biased;
        () = shutdown_requested(shutdown) => Err(CloseReason::Shutdown),
        result = tokio::time::timeout_at(deadline, step) => {
            result.unwrap_or_else(|_| Err(CloseReason::HandshakeTimeout(timeout)))
        }
    }
}

/// The transmission phase on the export the handshake chose; returns the
/// export's name and why the connection ended.
async fn transmit<C, R, W>(
    id: u64,
    peer: &str,
    mut reader: BufReader<R>,
    write: W,
    negotiated: Negotiated<C::Export>,
    shared: &Shared<C>,
    shutdown: &mut watch::Receiver<bool>,
) -> (Option<String>, CloseReason)
where
    C: ExportCatalog,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Negotiated { name, export, params } = negotiated;
    let options = shared.options;
    tracing::debug!(
        conn = id,
        %peer,
        export = %name,
        size = params.size,
        read_only = params.read_only,
        "NBD transmission started"
    );
    let (shared_bytes, max_shared_bytes) = shared.limits.bytes();
    let slice =
        super::Export::budget_group(&*export).map_or_else(|| format!("export {name}"), |g| format!("group {g}"));
    let (export_bytes, max_export_bytes) = shared.limits.export_bytes(&slice);
    let limits = Limits {
        max_requests: options.max_in_flight_requests,
        // A quarter of its group's share at most: one connection whose
        // client stops taking replies (or sending a payload) holds it until
        // a timeout, and must leave the group's other clients room.
        max_bytes: options.max_in_flight_bytes.min(max_export_bytes as usize / 4).max(1),
        export_bytes,
        max_export_bytes,
        shared_bytes,
        max_shared_bytes,
        reply_pace: Pace { idle: options.reply_timeout, min_rate: options.min_transfer_rate },
        payload_pace: Pace { idle: options.payload_timeout, min_rate: options.min_transfer_rate },
        shutdown_grace: options.shutdown_grace,
    };
    let failed = Arc::new(transmission::FailedRequests::new(id, peer, &name));
    let reason =
        transmission::serve(&mut reader, write, export, params, limits, &shared.running, failed, shutdown).await;
    (Some(name), reason)
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum CloseReason {
    /// `NBD_CMD_DISC`, after in-flight requests finished.
    #[error("client sent NBD_CMD_DISC")]
    Disconnect,
    /// `NBD_OPT_ABORT` during the handshake.
    #[error("client sent NBD_OPT_ABORT")]
    Abort,
    /// EOF between messages.
    #[error("client closed the connection")]
    ClientClosed,
    /// EOF inside a message; a partial write is never passed on.
    #[error("client closed the connection in the middle of a {0}")]
    Truncated(&'static str),
    #[error("server shutting down")]
    Shutdown,
    /// The client did not read its replies within the shutdown grace period.
    #[error("server shutting down; replies still unsent after the {0:?} grace period")]
    ShutdownGraceExpired(Duration),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// FORCEDTLS: the client tried to go on without TLS where no error
    /// reply is possible.
    #[error("TLS is required: {0}")]
    TlsRequired(&'static str),
    /// The TLS handshake failed, or the client certificate was refused.
    #[error("{0}")]
    Tls(String),
    /// `NBD_OPT_EXPORT_NAME` for an export that cannot be opened; that
    /// option has no error reply, so the log is the only place saying why.
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportRefused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("socket error: {0}")]
    Io(io::Error),
    #[error("sending replies failed: {0}")]
    ReplyWrite(io::Error),
    /// The client took no reply bytes for [`ServeOptions::reply_timeout`],
    /// or its replies more slowly than [`ServeOptions::min_transfer_rate`].
    #[error("{0}")]
    ReplyStalled(String),
    /// The client sent no bytes of a write payload for
    /// [`ServeOptions::payload_timeout`].
    #[error("client sent no write payload data for {0:?}")]
    PayloadStalled(Duration),
    /// The client sent part of a request header, then nothing more for
    /// [`ServeOptions::payload_timeout`].
    #[error("client sent part of a request header, then nothing for {0:?}")]
    HeaderStalled(Duration),
    /// The client sent a request header or a write payload more slowly
    /// than [`ServeOptions::min_transfer_rate`].
    #[error(
        "client took over {within:?} to send a {len}-byte {what} (its timeout plus its length at the minimum rate)"
    )]
    TooSlow {
        /// What it was sending.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The time it had.
        within: Duration,
    },
}

impl From<io::Error> for CloseReason {
    fn from(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            Self::ClientClosed
        } else {
            Self::Io(err)
        }
    }
}

impl CloseReason {
    /// Misbehaving or failing clients are logged as warnings, ordinary
    /// closes at debug level.
    fn is_warning(&self) -> bool {
        matches!(
            self,
            Self::Protocol(_)
                | Self::Truncated(_)
                | Self::HandshakeTimeout(_)
                | Self::TlsRequired(_)
                | Self::Tls(_)
                | Self::ExportRefused(_)
                | Self::ShutdownGraceExpired(_)
                | Self::ReplyStalled(_)
                | Self::PayloadStalled(_)
                | Self::HeaderStalled(_)
                | Self::TooSlow { .. }
        )
    }

    fn log(&self, conn: u64, peer: &str, export: Option<&str>) {
        let export = export.unwrap_or("-");
        if self.is_warning() {
            tracing::warn!(conn, peer, export, reason = %self, "NBD connection closed");
        } else {
            tracing::debug!(conn, peer, export, reason = %self, "NBD connection closed");
        }
    }
}
