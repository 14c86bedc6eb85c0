//! Transmission phase: the connection task reads requests in a loop and
//! runs each one as its own task; replies go out, whole and in completion
//! order, through a single writer task fed by a channel.
//!
//! Memory is bounded per connection and per server: every request holds a
//! permit from the connection's request budget and, for reads and writes,
//! permits for its data bytes from the connection's byte budget and then from
//! the byte budget shared by all connections, from before its payload is read
//! until its reply has been handed to the socket. When a budget is exhausted
//! the loop stops reading the socket until replies drain. A client that stops
//! taking replies is disconnected after the reply timeout, which returns what
//! its replies held; so is one that trickles them ([`Pace`]).

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::proto::{self, RequestHeader, REQUEST_HEADER_LEN};
use super::request::{self, Command, Decision, ExportParams};
use super::server::{shutdown_requested, CloseReason};
use super::{Export, ExportError, NbdErrno};
use crate::io::AlignedBuf;

/// Buffer in front of the socket for replies (large read data bypasses it).
const REPLY_BUFFER: usize = 64 * 1024;

/// Limits on one connection's work in flight.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// Requests read but not yet replied to.
    pub max_requests: usize,
    /// Read and write data bytes held by those requests.
    pub max_bytes: usize,
    /// The export's share of `shared_bytes`, shared by its connections.
    pub export_bytes: Arc<Semaphore>,
    /// Capacity of `export_bytes`.
    pub max_export_bytes: u32,
    /// The data byte budget shared by all connections.
    pub shared_bytes: Arc<Semaphore>,
    /// Capacity of `shared_bytes`.
    pub max_shared_bytes: u32,
    /// How slowly the client may take a reply.
    pub reply_pace: Pace,
    /// How slowly the client may send a request header or a write payload.
    pub payload_pace: Pace,
    /// Once shutdown is requested, how long replies may take to drain.
    pub shutdown_grace: Duration,
}

/// Runs the transmission phase until the client disconnects, breaks the
/// protocol, or the server shuts down; then waits for every request already
/// started to finish and reply. Returns why the connection ends.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<E, R, W>(
    reader: &mut R,
    writer: W,
    export: Arc<E>,
    params: ExportParams,
    limits: Limits,
    running: &RunningRequests,
    failed: Arc<FailedRequests>,
    shutdown: &mut watch::Receiver<bool>,
) -> CloseReason
where
    E: Export,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (replies, reply_queue) = mpsc::unbounded_channel();
    let budget = Budget::new(&limits);
    let outstanding = budget.outstanding();
    let mut writer_task = tokio::spawn(write_replies(writer, reply_queue, outstanding, limits.reply_pace));

    // `None`: the reply writer stopped (its error says why).
    let ended: Option<CloseReason> = loop {
        let step = tokio::select! {
            biased;
            () = shutdown_requested(shutdown) => break Some(CloseReason::Shutdown),
            () = replies.closed() => break None,
            step = next_request(reader, &export, &params, &budget, limits.payload_pace, running, &failed, &replies) => step,
        };
        if let Err(reason) = step {
            break Some(reason);
        }
    };

    // Each running request holds a sender; the writer finishes once the last
    // of them has replied. A client that stops reading its replies could
    // hold it forever: after shutdown, it gets the grace period.
    drop(replies);
    let written = tokio::select! {
        joined = &mut writer_task => match joined {
            Ok(result) => result,
            Err(join) => Err(io::Error::other(format!("reply writer task failed: {join}"))),
        },
        () = async {
            shutdown_requested(shutdown).await;
            tokio::time::sleep(limits.shutdown_grace).await;
        } => {
            writer_task.abort();
            return CloseReason::ShutdownGraceExpired(limits.shutdown_grace);
        }
    };
    match (ended, written) {
        (Some(reason), _) => reason,
        (None, Err(err)) if err.kind() == io::ErrorKind::TimedOut => CloseReason::ReplyStalled(err.to_string()),
        (None, Err(err)) => CloseReason::ReplyWrite(err),
        (None, Ok(())) => CloseReason::ReplyWrite(io::Error::other("reply writer stopped")),
    }
}

/// Reads one request and starts it (or answers/ends it at once).
#[allow(clippy::too_many_arguments)]
async fn next_request<E, R>(
    reader: &mut R,
    export: &Arc<E>,
    params: &ExportParams,
    budget: &Budget,
    pace: Pace,
    running: &RunningRequests,
    failed: &Arc<FailedRequests>,
    replies: &UnboundedSender<Reply>,
) -> Result<(), CloseReason>
where
    E: Export,
    R: AsyncRead + Unpin,
{
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    read_header(reader, &mut raw, pace).await?;
    let header = RequestHeader::decode(&raw);
    let cookie = header.cookie;

    let command = match request::decide(&header, params, export.read_only()) {
        Decision::Close(why) => return Err(CloseReason::Protocol(why)),
        Decision::Reject { errno, discard } => {
            export.rejected(errno);
            failed.note(&request::describe_rejection(&header, errno));
            if discard > 0 {
                discard_payload(reader, discard, pace).await?;
            }
            let permits = budget.acquire(0).await?;
            let _ = replies.send(Reply { cookie, error: errno.code(), data: None, _permits: permits });
            return Ok(());
        }
        Decision::Run(Command::Disconnect) => return Err(CloseReason::Disconnect),
        Decision::Run(command) => command,
    };

    let data_len = match command {
        Command::Read { len, .. } | Command::Write { len, .. } => len,
        _ => 0,
    };
    let permits = budget.acquire(data_len).await?;
    let job = match command {
        Command::Read { offset, len } => Job::Read { offset, len },
        Command::Write { offset, len, fua } => {
            // Straight from the socket into the buffer the export will use
            // for direct I/O. A client vanishing here leaves no trace; one
            // that stops sending is disconnected, returning the budget.
            let mut data = AlignedBuf::for_overwrite(len as usize);
            read_payload(reader, &mut data, pace).await?;
            Job::Write { offset, data, fua }
        }
        Command::WriteZeroes { offset, len, fua } => Job::WriteZeroes { offset, len, fua },
        Command::Trim { offset, len, fua } => Job::Trim { offset, len, fua },
        Command::Flush => Job::Flush,
        Command::Disconnect => return Err(CloseReason::Disconnect),
    };
    let guard = ReplyGuard { cookie, replies: replies.clone(), permits: Some(permits) };
    tokio::spawn(run(Arc::clone(export), job, guard, Arc::clone(failed), running.enter()));
    Ok(())
}

/// The requests one connection answered with an error. The first, second,
/// fourth, eighth... are logged as warnings with the count so far, and one
/// at least a minute after the last warning; the others at debug level: a
/// client that keeps sending what is refused leaves a trace in the log
/// without flooding it, also in a later incident on a long-lived
/// connection.
#[derive(Debug)]
pub(super) struct FailedRequests {
    conn: u64,
    peer: String,
    export: String,
    count: AtomicU64,
    /// When the connection started, and the last warning (ms since then).
    started: Instant,
    warned_ms: AtomicU64,
}

/// A failure this long after the last warning is a warning again.
const FAILED_WARNING_INTERVAL: Duration = Duration::from_secs(60);

impl FailedRequests {
    /// None yet, on connection `conn` from `peer` to `export`.
    pub(super) fn new(conn: u64, peer: &str, export: &str) -> Self {
        Self {
            conn,
            peer: peer.to_string(),
            export: export.to_string(),
            count: AtomicU64::new(0),
            started: Instant::now(),
            warned_ms: AtomicU64::new(0),
        }
    }

    /// One more request failed, for the reason `what` says.
    fn note(&self, what: &str) {
        let failed = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let (conn, peer, export) = (self.conn, self.peer.as_str(), self.export.as_str());
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last_ms = self.warned_ms.load(Ordering::Relaxed);
        let due = now_ms.saturating_sub(last_ms) >= FAILED_WARNING_INTERVAL.as_millis() as u64;
        if failed.is_power_of_two() || due {
            self.warned_ms.store(now_ms, Ordering::Relaxed);
            tracing::warn!(conn, peer, export, failed, "NBD request failed: {what}");
        } else {
            tracing::debug!(conn, peer, export, failed, "NBD request failed: {what}");
        }
    }
}

/// How slowly a client may move one transfer: a request header, a write
/// payload, a reply. No read or write may wait more than `idle` for
/// progress (a slow client is fine, a stopped one is not), and the whole
/// transfer must end within `idle` plus its length at `min_rate`: a client
/// that sends or takes a byte now and then would otherwise keep the budget
/// its transfer holds for as long as it likes, every wait being short.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    /// Longest wait for progress.
    pub idle: Duration,
    /// Slowest average rate, bytes per second, beyond `idle`.
    pub min_rate: u32,
}

/// One transfer's time ([`Pace::transfer`]).
#[derive(Debug, Clone, Copy)]
struct Transfer {
    pace: Pace,
    /// The time it may take in all.
    within: Duration,
    /// When it must have ended.
    deadline: Instant,
}

/// Why a transfer ended early ([`Transfer::step`]).
enum Late {
    /// No progress for [`Pace::idle`].
    Stalled,
    /// Not done by its deadline.
    TooSlow,
}

impl Pace {
    /// A transfer of `len` bytes starting now.
    fn transfer(self, len: usize) -> Transfer {
        let within = self.idle + Duration::from_secs_f64(len as f64 / f64::from(self.min_rate.max(1)));
        Transfer { pace: self, within, deadline: Instant::now() + within }
    }
}

impl Transfer {
    /// Waits for one step of the transfer: at most [`Pace::idle`], and not
    /// past its deadline.
    async fn step<T>(&self, io: impl std::future::Future<Output = T>) -> Result<T, Late> {
        let stalled = Instant::now() + self.pace.idle;
        match tokio::time::timeout_at(stalled.min(self.deadline), io).await {
            Ok(done) => Ok(done),
            Err(_) if stalled <= self.deadline => Err(Late::Stalled),
            Err(_) => Err(Late::TooSlow),
        }
    }
}

/// Fills `raw` with a request header. EOF before its first byte is a clean
/// close; EOF inside it is a truncated request. An idle client may wait as
/// long as it likes before a request, but once its first byte is in, the
/// rest must follow at `pace` (a client that stops mid-header would hold its
/// connection slot for good).
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    raw: &mut [u8; REQUEST_HEADER_LEN],
    pace: Pace,
) -> Result<(), CloseReason> {
    let mut filled = reader.read(raw).await?;
    match filled {
        0 => return Err(CloseReason::ClientClosed),
        n if n == raw.len() => return Ok(()),
        _ => {}
    }
    let transfer = pace.transfer(raw.len());
    while filled < raw.len() {
        let n = match transfer.step(reader.read(&mut raw[filled..])).await {
            Ok(read) => read?,
            Err(Late::Stalled) => return Err(CloseReason::HeaderStalled(pace.idle)),
            Err(Late::TooSlow) => {
                return Err(CloseReason::TooSlow { what: "request header", len: raw.len(), within: transfer.within })
            }
        };
        if n == 0 {
            return Err(CloseReason::Truncated("request header"));
        }
        filled += n;
    }
    Ok(())
}

/// Fills `buf` with write payload, at `pace`.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8], pace: Pace) -> Result<(), CloseReason> {
    read_payload_within(reader, buf, &pace.transfer(buf.len()), buf.len()).await
}

/// Fills `buf` with payload, part of a transfer of `len` bytes.
async fn read_payload_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    transfer: &Transfer,
    len: usize,
) -> Result<(), CloseReason> {
    let mut filled = 0;
    while filled < buf.len() {
        match transfer.step(reader.read(&mut buf[filled..])).await {
            Ok(Ok(0)) => return Err(CloseReason::Truncated("write payload")),
            Ok(Ok(n)) => filled += n,
            Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(err)) => return Err(CloseReason::Io(err)),
            Err(Late::Stalled) => return Err(CloseReason::PayloadStalled(transfer.pace.idle)),
            Err(Late::TooSlow) => {
                return Err(CloseReason::TooSlow { what: "write payload", len, within: transfer.within })
            }
        }
    }
    Ok(())
}

/// Reads and drops the payload of a rejected write, keeping the stream in
/// step: one transfer at `pace`, in pieces.
async fn discard_payload<R: AsyncRead + Unpin>(reader: &mut R, len: u32, pace: Pace) -> Result<(), CloseReason> {
    let mut left = len as usize;
    let transfer = pace.transfer(left);
    let mut scratch = vec![0u8; left.min(64 << 10)];
    while left > 0 {
        let n = left.min(scratch.len());
        read_payload_within(reader, &mut scratch[..n], &transfer, len as usize).await?;
        left -= n;
    }
    Ok(())
}

/// A validated request with its payload, ready for the export.
#[derive(Debug)]
enum Job {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: AlignedBuf, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    Trim { offset: u64, len: u32, fua: bool },
    Flush,
}

impl Job {
    fn name(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Write { .. } => "write",
            Self::WriteZeroes { .. } => "write-zeroes",
            Self::Trim { .. } => "trim",
            Self::Flush => "flush",
        }
    }

    fn offset(&self) -> u64 {
        match self {
            Self::Read { offset, .. }
            | Self::Write { offset, .. }
            | Self::WriteZeroes { offset, .. }
            | Self::Trim { offset, .. } => *offset,
            Self::Flush => 0,
        }
    }
}

/// One request's task: runs the job on the export and queues the reply.
/// `_running` counts it among the server's running requests until the
/// export future has finished (also when it panics).
///
/// The export's futures are boxed where they start: they are large (the
/// whole write path), and a task's future is moved by value several times
/// on its way into the runtime, so this one stays small.
async fn run<E: Export>(
    export: Arc<E>,
    job: Job,
    guard: ReplyGuard,
    failed: Arc<FailedRequests>,
    _running: RunningGuard,
) {
    let (name, offset) = (job.name(), job.offset());
    let result = match job {
        Job::Read { offset, len } => match Box::pin(export.read(offset, len)).await {
            Ok(data) if data.len() == len as usize => Ok(Some(data)),
            Ok(data) => {
                Err(ExportError::new(NbdErrno::Io, format!("export returned {} bytes for a read of {len}", data.len())))
            }
            Err(err) => Err(err),
        },
        Job::Write { offset, data, fua } => Box::pin(export.write(offset, data, fua)).await.map(|()| None),
        Job::WriteZeroes { offset, len, fua } => Box::pin(export.write_zeroes(offset, len, fua)).await.map(|()| None),
        Job::Trim { offset, len, fua } => Box::pin(export.trim(offset, len, fua)).await.map(|()| None),
        Job::Flush => Box::pin(export.flush()).await.map(|()| None),
    };
    match result {
        Ok(data) => guard.reply(0, data),
        Err(err) => {
            failed.note(&format!("{name} at {offset}: {} ({})", err, err.errno.name()));
            guard.reply(err.errno.code(), None);
        }
    }
}

/// The request tasks running in one server, across all its connections.
///
/// A connection may close before its requests finish (its client stopped
/// reading replies past the shutdown grace period), but an export future,
/// once started, is never cancelled: only this count tells whether the
/// export is still being written to when the server stops.
#[derive(Debug, Clone)]
pub(super) struct RunningRequests(Arc<Running>);

/// A count and a wake-up for [`RunningRequests::idle`] (not a watch
/// channel: its every change would wake the waiters' list, twice per
/// request, where only a count reaching zero at shutdown matters).
#[derive(Debug, Default)]
struct Running {
    count: AtomicUsize,
    idle: Notify,
}

impl RunningRequests {
    pub(super) fn new() -> Self {
        Self(Arc::default())
    }

    /// Counts one more request until the guard is dropped.
    fn enter(&self) -> RunningGuard {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        RunningGuard(Arc::clone(&self.0))
    }

    /// Requests running now.
    pub(super) fn count(&self) -> usize {
        self.0.count.load(Ordering::SeqCst)
    }

    /// Resolves once no request is running.
    pub(super) async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            // Registered before the check: a last request ending in between
            // still wakes this waiter.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One running request (see [`RunningRequests`]).
#[derive(Debug)]
pub(super) struct RunningGuard(Arc<Running>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A reply waiting for the writer, holding its request's budget.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    error: u32,
    /// A successful read's data.
    data: Option<AlignedBuf>,
    _permits: Permits,
}

/// Guarantees a reply: if a request's task ends without replying (its
/// export future panicked), the client still gets `EIO` for that cookie.
#[derive(Debug)]
struct ReplyGuard {
    cookie: u64,
    replies: UnboundedSender<Reply>,
    /// `None` once the reply has been queued.
    permits: Option<Permits>,
}

impl ReplyGuard {
    fn reply(mut self, error: u32, data: Option<AlignedBuf>) {
        self.queue(error, data);
    }

    fn queue(&mut self, error: u32, data: Option<AlignedBuf>) {
        if let Some(permits) = self.permits.take() {
            // A closed channel means the connection is gone; nobody to tell.
            let _ = self.replies.send(Reply { cookie: self.cookie, error, data, _permits: permits });
        }
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if self.permits.is_some() {
            tracing::error!(
                cookie = self.cookie,
                "NBD request ended without a result (export future panicked?); replying EIO"
            );
            self.queue(NbdErrno::Io.code(), None);
        }
    }
}

/// Writes replies until every sender is gone, then shuts down the write
/// side. Replies ready together are written together and flushed once: while
/// other requests of the connection are still running, the writer first lets
/// every task that is ready run (one `yield_now`, which also polls the
/// reactor), so that requests completed by the same batch of I/O completions
/// add their replies to the same `send`. Each `send` wakes the client; one
/// per reply, on a busy machine, is a context switch per request (see
/// bench/RESULTS.md). A request alone on its connection is flushed at once.
/// A socket that takes no bytes for the pace's idle time, or a reply more
/// slowly than the pace, is an error of kind `TimedOut`; dropping the
/// queue then returns the budget of every reply in it.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut queue: UnboundedReceiver<Reply>,
    outstanding: Outstanding,
    pace: Pace,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(REPLY_BUFFER, writer);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        let mut yielded = false;
        loop {
            while let Some(reply) = next.take() {
                let header = proto::simple_reply_header(reply.error, reply.cookie);
                let transfer = pace.transfer(header.len() + reply.data.as_ref().map_or(0, |d| d.len()));
                write_all_paced(&mut out, &header, &transfer).await?;
                if let Some(data) = &reply.data {
                    write_all_paced(&mut out, data, &transfer).await?;
                }
                // Dropping the reply returns its budget.
                drop(reply);
                next = queue.try_recv().ok();
            }
            if yielded || outstanding.count() == 0 {
                break;
            }
            tokio::task::yield_now().await;
            yielded = true;
            next = queue.try_recv().ok();
        }
        let transfer = pace.transfer(out.buffer().len());
        transfer.step(out.flush()).await.map_err(|late| reply_late(late, &transfer))??;
    }
    let transfer = pace.transfer(out.buffer().len());
    transfer.step(out.shutdown()).await.map_err(|late| reply_late(late, &transfer))?
}

/// `write_all`, at the pace of `transfer`.
async fn write_all_paced<W: AsyncWrite + Unpin>(out: &mut W, mut buf: &[u8], transfer: &Transfer) -> io::Result<()> {
    while !buf.is_empty() {
        let n = transfer.step(out.write(buf)).await.map_err(|late| reply_late(late, transfer))??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

fn reply_late(late: Late, transfer: &Transfer) -> io::Error {
    let what = match late {
        Late::Stalled => format!("client took no reply data for {:?}", transfer.pace.idle),
        Late::TooSlow => format!(
            "client took its replies more slowly than {} bytes/s (not within {:?})",
            transfer.pace.min_rate, transfer.within
        ),
    };
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// The connection's request and byte budgets, and the shared byte budget.
#[derive(Debug)]
struct Budget {
    requests: Arc<Semaphore>,
    /// Capacity of `requests`.
    max_requests: usize,
    bytes: Arc<Semaphore>,
    /// Capacity of `bytes`; a single larger request takes all of it.
    max_bytes: u32,
    export_bytes: Arc<Semaphore>,
    /// Capacity of `export_bytes`.
    max_export_bytes: u32,
    shared_bytes: Arc<Semaphore>,
    /// Capacity of `shared_bytes`.
    max_shared_bytes: u32,
}

/// One request's share of the budgets.
#[derive(Debug)]
struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    _export_bytes: Option<OwnedSemaphorePermit>,
    _shared_bytes: Option<OwnedSemaphorePermit>,
}

/// The requests of one connection that hold their request slot: read (or
/// being read) and not yet replied to, their replies queued for the writer
/// included.
#[derive(Debug)]
struct Outstanding {
    slots: Arc<Semaphore>,
    max: usize,
}

impl Outstanding {
    fn count(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }
}

impl Budget {
    fn new(limits: &Limits) -> Self {
        let max_requests = limits.max_requests.clamp(1, Semaphore::MAX_PERMITS);
        let max_bytes = u32::try_from(limits.max_bytes).unwrap_or(u32::MAX).max(1);
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
            export_bytes: Arc::clone(&limits.export_bytes),
            max_export_bytes: limits.max_export_bytes.max(1),
            shared_bytes: Arc::clone(&limits.shared_bytes),
            max_shared_bytes: limits.max_shared_bytes.max(1),
        }
    }

    /// A view of the request slots in use, for the reply writer.
    fn outstanding(&self) -> Outstanding {
        Outstanding { slots: Arc::clone(&self.requests), max: self.max_requests }
    }

    /// Waits for one request slot and `bytes` bytes of data, from the
    /// connection's budget first, then the export's, then the shared one,
    /// so that neither one connection nor one export holds more of the
    /// shared budget than its own allows.
    async fn acquire(&self, bytes: u32) -> Result<Permits, CloseReason> {
        let closed = |_| CloseReason::Io(io::Error::other("request budget closed"));
        let request = Arc::clone(&self.requests).acquire_owned().await.map_err(closed)?;
        let own = match bytes.min(self.max_bytes) {
            0 => None,
            n => Some(Arc::clone(&self.bytes).acquire_many_owned(n).await.map_err(closed)?),
        };
        let export = match bytes.min(self.max_export_bytes) {
            0 => None,
            n => Some(Arc::clone(&self.export_bytes).acquire_many_owned(n).await.map_err(closed)?),
        };
        let shared = match bytes.min(self.max_shared_bytes) {
            0 => None,
            n => Some(Arc::clone(&self.shared_bytes).acquire_many_owned(n).await.map_err(closed)?),
        };
        Ok(Permits { _request: request, _bytes: own, _export_bytes: export, _shared_bytes: shared })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use super::*;

    /// A socket that records the length of every write it takes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<usize>>>);

    impl Recorder {
        fn writes(&self) -> Vec<usize> {
            self.0.lock().expect("recorder lock").clone()
        }

        /// Waits (up to 5 s) until the socket has taken `n` writes.
        async fn wait_for(&self, n: usize) -> Vec<usize> {
            for _ in 0..5000 {
                if self.writes().len() >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.writes()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().expect("recorder lock").push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn reply(cookie: u64, permits: Permits) -> Reply {
        Reply { cookie, error: 0, data: None, _permits: permits }
    }

    const SIMPLE_REPLY: usize = 16;

    #[tokio::test]
    async fn replies_ready_together_go_out_in_one_write_and_none_waits_for_a_slow_request() {
        let limits = Limits {
            max_requests: 8,
            max_bytes: 1 << 20,
            export_bytes: Arc::new(Semaphore::new(1 << 20)),
            max_export_bytes: 1 << 20,
            shared_bytes: Arc::new(Semaphore::new(1 << 20)),
            max_shared_bytes: 1 << 20,
            reply_pace: Pace { idle: Duration::from_secs(5), min_rate: 1 << 20 },
            payload_pace: Pace { idle: Duration::from_secs(5), min_rate: 1 << 20 },
            shutdown_grace: Duration::from_secs(1),
        };
        let budget = Budget::new(&limits);
        let (replies, queue) = mpsc::unbounded_channel();
        let socket = Recorder::default();
        let writer = tokio::spawn(write_replies(socket.clone(), queue, budget.outstanding(), limits.reply_pace));

        // Two requests finish in the same round of the scheduler (as those
        // completed by one batch of I/O completions): the writer, woken by
        // the first reply, lets the second task run and sends both at once.
        let first = budget.acquire(0).await.expect("slot");
        let second = budget.acquire(0).await.expect("slot");
        replies.send(reply(1, first)).expect("writer running");
        let other = replies.clone();
        tokio::spawn(async move { other.send(reply(2, second)).expect("writer running") });
        assert_eq!(socket.wait_for(1).await, [2 * SIMPLE_REPLY]);

        // A request still running holds its slot; a reply ready now goes out
        // without waiting for it.
        let slow = budget.acquire(0).await.expect("slot");
        let third = budget.acquire(0).await.expect("slot");
        replies.send(reply(3, third)).expect("writer running");
        assert_eq!(socket.wait_for(2).await, [2 * SIMPLE_REPLY, SIMPLE_REPLY]);

        replies.send(reply(4, slow)).expect("writer running");
        drop(replies);
        writer.await.expect("writer task").expect("writer result");
        assert_eq!(socket.writes(), [2 * SIMPLE_REPLY, SIMPLE_REPLY, SIMPLE_REPLY]);
    }
}
