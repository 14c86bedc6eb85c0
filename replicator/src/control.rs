//! The control socket (`run_dir/control.sock`, mode 0660): the only admin
//! interface. One JSON request per connection, one JSON response; a long
//! command (`verify`) may send progress lines (`{"progress": "..."}`)
//! before its response.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::group::{DrillMeta, DrillOutcome, DrillRecord, GroupError, GroupStatus};
use crate::node::Node;

/// Exit codes of the CLI (DESIGN: 0 done, 1 failed, 2 usage/config, 3 refused).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed.
    pub const FAILED: u8 = 1;
    /// Usage or configuration error.
    pub const USAGE: u8 = 2;
    /// Refused as unsafe.
    pub const REFUSED: u8 = 3;
    /// `status`: some group is paired but not protected right now (COPY,
    /// SUSPENDED for link, journal-full or split, or no live session).
    pub const DEGRADED: u8 = 4;
    /// `status`: some group needs an admin (SUSPENDED(error), SPLIT-BRAIN).
    pub const CRITICAL: u8 = 5;
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Status of one group or all.
    Status {
        /// Group, or all.
        group: Option<String>,
    },
    /// `pair create`.
    PairCreate {
        /// Group.
        group: String,
        /// Skip the initial copy.
        nocopy: bool,
    },
    /// `pair delete`.
    PairDelete {
        /// Group.
        group: String,
    },
    /// `switchover` (on either site).
    Switchover {
        /// Group.
        group: String,
        /// Even with NBD clients attached on the primary.
        #[serde(default)]
        force: bool,
    },
    /// `failover` (on the secondary).
    Failover {
        /// Group.
        group: String,
        /// Even while the primary is connected, or the replica is
        /// inconsistent.
        force: bool,
    },
    /// `pair split` (on either site).
    PairSplit {
        /// Group.
        group: String,
        /// The secondary's volumes become writable.
        rw: bool,
    },
    /// `pair resync`.
    PairResync {
        /// Group.
        group: String,
        /// The secondary becomes the primary.
        swap: bool,
        /// This site's writes are discarded (split brain, fenced).
        discard_local: bool,
    },
    /// `failback` (on a fenced former primary): become the secondary.
    Failback {
        /// Group.
        group: String,
    },
    /// `verify` (on the primary).
    Verify {
        /// Group.
        group: String,
        /// Have the differing regions copied again.
        fix: bool,
    },
    /// `drill start` (on the secondary). The response's `data` is the
    /// [`DrillMeta`].
    DrillStart {
        /// Group.
        group: String,
    },
    /// `drill stop`, with the outcome of a `drill run`. The response's
    /// `data` is the [`DrillRecord`].
    DrillStop {
        /// Group.
        group: String,
        /// What `drill run` ran and how it ended.
        #[serde(default)]
        outcome: Option<DrillOutcome>,
        /// Only this drill (`drill run`'s): another one running is not
        /// stopped, and one already stopped and recorded (a daemon that
        /// restarted before it answered) is answered with its record.
        #[serde(default)]
        id: Option<String>,
    },
    /// `drill history`. The response's `data` is the list of
    /// [`DrillRecord`]s.
    DrillHistory {
        /// Group.
        group: String,
    },
}

/// A progress line sent before the response of a long command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressLine {
    /// What the command is doing.
    pub progress: String,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// CLI exit code.
    pub exit: u8,
    /// Human-readable outcome.
    pub message: String,
    /// Status of the groups asked about.
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    /// A command's structured result (drill commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// The daemon is stopping and took no command: the client gets
    /// [`ControlError::Stopping`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
}

impl Response {
    fn ok(message: impl Into<String>) -> Self {
        Self { exit: exit::OK, message: message.into(), groups: Vec::new(), data: None, stopping: false }
    }
    fn err(code: u8, message: impl Into<String>) -> Self {
        Self { exit: code, message: message.into(), groups: Vec::new(), data: None, stopping: false }
    }
    /// The daemon is stopping: it took no command (or one it could not
    /// begin for that reason).
    fn stopping() -> Self {
        Self { stopping: true, ..Self::err(exit::FAILED, "the daemon is stopping") }
    }
    fn with_data(mut self, data: &impl Serialize) -> Self {
        self.data = serde_json::to_value(data).ok();
        self
    }
}

/// Control socket errors on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Cannot reach the daemon.
    #[error("cannot reach the replicator daemon at {path}: {source} ({})", connect_hint(source))]
    Connect {
        /// Socket path.
        path: String,
        /// Error.
        source: std::io::Error,
    },
    /// The daemon closed the connection without answering: it stopped or
    /// died while the command ran.
    #[error(
        "the replicator daemon at {path} closed the connection without answering: it stopped or died during the \
         command, which may have taken effect in part; see its log (`journalctl -u replicator`), and once it runs \
         again `replicator status` shows where the group is"
    )]
    Closed {
        /// Socket path.
        path: String,
    },
    /// The daemon is stopping and took no command.
    #[error("the daemon is stopping ({path}): run the command again once it is back")]
    Stopping {
        /// Socket path.
        path: String,
    },
    /// Broken exchange.
    #[error("control socket: {0}")]
    Protocol(String),
}

/// What an admin does about a control socket that does not connect.
fn connect_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "the socket is for root and the group `replicator`: run this as root, or add your user to that group"
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            "the daemon is not running with this configuration's run_dir: see `systemctl status replicator`"
        }
        _ => "is `replicator run` running with this configuration?",
    }
}

/// Sends one request and waits for the response.
pub async fn call(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    call_with_progress(socket, req, |_| {}).await
}

/// Sends one request and waits for the response, handing each progress line
/// that comes first to `on_progress`.
pub async fn call_with_progress(
    socket: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&str),
) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect { path: socket.display().to_string(), source })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    let closed = || ControlError::Closed { path: socket.display().to_string() };
    // A daemon killed mid-command resets the connection or just ends it.
    let broken = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => closed(),
        _ => ControlError::Protocol(e.to_string()),
    };
    w.write_all(&line).await.map_err(broken)?;
    let mut reader = BufReader::new(r);
    loop {
        let mut resp = String::new();
        match reader.read_line(&mut resp).await {
            Ok(0) => return Err(closed()),
            Ok(_) => {}
            Err(e) => return Err(broken(e)),
        }
        if let Ok(p) = serde_json::from_str::<ProgressLine>(&resp) {
            on_progress(&p.progress);
            continue;
        }
        // A line cut short: the daemon died while it wrote it.
        if !resp.ends_with('\n') {
            return Err(closed());
        }
        let resp: Response =
            serde_json::from_str(&resp).map_err(|e| ControlError::Protocol(format!("bad response: {e}")))?;
        if resp.stopping {
            return Err(ControlError::Stopping { path: socket.display().to_string() });
        }
        return Ok(resp);
    }
}

/// Longest request line accepted (requests are a few hundred bytes).
pub(crate) const MAX_REQUEST_LINE: usize = 64 * 1024;
/// A client must send its whole request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must take each progress line and the response within this
/// time; one that does not gets nothing more (its command still runs to
/// its end), so a client that stops reading holds its slot no longer than
/// the command does.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at once; further connections wait in the listen
/// backlog, and every held one ends within [`REQUEST_TIMEOUT`] or when its
/// command does (then within [`REPLY_TIMEOUT`]).
const MAX_CONNECTIONS: usize = 32;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The admin commands running, so that a clean stop finishes them before
/// it marks the groups clean: a command cut off half way (a failover
/// rolling a resync back over the volumes, a switchover's demotion)
/// leaves volumes or state a clean stop must not vouch for, and its caller
/// without an answer. Status queries and `verify` are not counted.
#[derive(Debug)]
pub struct AdminCommands {
    /// (stopping: no command starts any more, commands running)
    state: watch::Sender<(bool, usize)>,
}

impl Default for AdminCommands {
    fn default() -> Self {
        Self { state: watch::channel((false, 0)).0 }
    }
}

/// One running admin command (see [`AdminCommands::begin`]): counted until
/// dropped.
#[derive(Debug)]
pub struct AdminCommand<'a>(&'a AdminCommands);

impl AdminCommands {
    /// Counts a command in; `None` once the daemon is stopping.
    pub fn begin(&self) -> Option<AdminCommand<'_>> {
        let started = self.state.send_if_modified(|(stopping, running)| {
            if *stopping {
                return false;
            }
            *running += 1;
            true
        });
        started.then_some(AdminCommand(self))
    }

    /// Whether the daemon is stopping ([`AdminCommands::close`] ran).
    pub fn stopping(&self) -> bool {
        self.state.borrow().0
    }

    /// Lets no command start any more (the daemon is stopping).
    pub fn close(&self) {
        self.state.send_modify(|(stopping, _)| *stopping = true);
    }

    /// Waits until no command runs (after [`AdminCommands::close`]: until
    /// the running ones have ended and answered).
    pub async fn idle(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|&(_, running)| running == 0).await;
    }
}

impl Drop for AdminCommand<'_> {
    fn drop(&mut self) {
        self.0.state.send_modify(|(_, running)| *running = running.saturating_sub(1));
    }
}

/// Accept loop of the control socket.
pub async fn serve(listener: UnixListener, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let node = node.clone();
                    tokio::spawn(async move {
                        handle(stream, node).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Reads one request line of at most [`MAX_REQUEST_LINE`] bytes within
/// [`REQUEST_TIMEOUT`].
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut buf = Vec::new();
    let mut limited = BufReader::new(stream).take(MAX_REQUEST_LINE as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', &mut buf)).await {
        Err(_) => return Err(format!("no complete request within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(_)) => {}
    }
    if buf.len() > MAX_REQUEST_LINE {
        return Err(format!("request longer than {MAX_REQUEST_LINE} bytes"));
    }
    serde_json::from_slice(&buf).map_err(|e| e.to_string())
}

async fn handle(mut stream: UnixStream, node: Arc<Node>) {
    let mut out = Replies { stream: &mut stream, gone: false };
    // A command that changes something is counted until its answer is
    // written (see [`AdminCommands`]).
    let mut running = None;
    let resp = match read_request(out.stream).await {
        Ok(req) if changes_something(&req) => match node.admin.begin() {
            Some(command) => {
                running = Some(command);
                run(&node, req, &mut out).await
            }
            None => Response::stopping(),
        },
        Ok(req) => run(&node, req, &mut out).await,
        Err(e) => Response::err(exit::USAGE, format!("bad request: {e}")),
    };
    out.line(&resp).await;
    drop(running);
}

/// Whether a request changes a group's state or volumes. Status queries
/// and `verify` without `--fix` do not (its comparison only reads); with
/// `--fix`, it marks regions and starts a copy, which a stop must not cut
/// short or follow up after the groups were marked clean.
fn changes_something(req: &Request) -> bool {
    !matches!(req, Request::Status { .. } | Request::DrillHistory { .. } | Request::Verify { fix: false, .. })
}

/// Executes `req`; its progress lines go out while it runs.
async fn run(node: &Node, req: Request, out: &mut Replies<'_>) -> Response {
    let (progress, mut lines) = mpsc::unbounded_channel();
    let work = execute(node, req, progress);
    tokio::pin!(work);
    loop {
        tokio::select! {
            resp = &mut work => break resp,
            Some(progress) = lines.recv() => out.line(&ProgressLine { progress }).await,
        }
    }
}

/// Where a request's progress lines and response go.
struct Replies<'a> {
    stream: &'a mut UnixStream,
    /// A line could not be written (the client left, or took nothing for
    /// [`REPLY_TIMEOUT`]): the later ones are dropped.
    gone: bool,
}

impl Replies<'_> {
    async fn line(&mut self, msg: &impl Serialize) {
        if self.gone {
            return;
        }
        let mut out = serde_json::to_vec(msg).unwrap_or_default();
        out.push(b'\n');
        let written = tokio::time::timeout(REPLY_TIMEOUT, self.stream.write_all(&out)).await;
        self.gone = !matches!(written, Ok(Ok(())));
    }
}

/// A command on a group that is not running here: one that did not open
/// at start, or one not configured.
fn unknown_group(node: &Node, name: &str) -> Response {
    if let Some(failed) = node.failed_group(name) {
        return Response::err(exit::FAILED, failed.explain());
    }
    let known: Vec<&str> = node
        .groups
        .iter()
        .map(|g| g.cfg.name.as_str())
        .chain(node.failed.iter().map(|f| f.cfg.name.as_str()))
        .collect();
    Response::err(exit::USAGE, format!("no group named {name:?} in the configuration (groups: {})", known.join(", ")))
}

async fn execute(node: &Node, req: Request, progress: mpsc::UnboundedSender<String>) -> Response {
    match req {
        Request::Status { group } => {
            let groups: Vec<GroupStatus> = match &group {
                Some(name) => match (node.group(name), node.failed_group(name)) {
                    (Some(g), _) => vec![g.status()],
                    (None, Some(failed)) => vec![failed.status()],
                    (None, None) => return unknown_group(node, name),
                },
                None => node.statuses(),
            };
            Response { groups, ..Response::ok("") }
        }
        Request::PairCreate { group, nocopy } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            match g.pair_create(nocopy).await {
                Ok(msg) => {
                    g.start_shipping();
                    Response::ok(msg)
                }
                Err(e @ GroupError::Refused(_)) => Response::err(exit::REFUSED, e.to_string()),
                Err(e) => Response::err(exit::FAILED, format!("pair create: {e}")),
            }
        }
        Request::PairDelete { group } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            answer("pair delete", g.pair_delete().await)
        }
        Request::Switchover { group, force } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            answer("switchover", g.switchover(force).await)
        }
        Request::Failover { group, force } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            answer("failover", g.failover(force).await)
        }
        Request::PairSplit { group, rw } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            answer("pair split", g.pair_split(rw).await)
        }
        Request::PairResync { group, swap, discard_local } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            answer("pair resync", g.pair_resync(swap, discard_local).await)
        }
        Request::Failback { group } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            answer("failback", g.failback().await)
        }
        Request::Verify { group, fix } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            // Its failures name the group and the command already.
            match g.verify(fix, &progress).await {
                Ok(msg) => Response::ok(msg),
                // Refused because the stop already ended its session: the
                // daemon is stopping, whatever the pair's state says.
                Err(GroupError::Refused(_)) if node.admin.stopping() => Response::stopping(),
                Err(e @ GroupError::Refused(_)) => Response::err(exit::REFUSED, e.to_string()),
                // A clean stop does not wait for a comparison that only
                // reads: what ended its session is this daemon, not the peer.
                Err(GroupError::Lost(_)) if node.admin.stopping() => {
                    let why = if fix { "" } else { " (a verify without --fix does not hold up a clean stop)" };
                    Response::err(
                        exit::FAILED,
                        format!(
                            "verify {group} was cut short: this daemon is stopping{why}; run it again once the daemon \
                             is back"
                        ),
                    )
                }
                Err(e) => Response::err(exit::FAILED, e.to_string()),
            }
        }
        Request::DrillStart { group } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            drill_answer(g.drill_start().await, |m: &DrillMeta| {
                format!(
                    "drill {} started for group {group} in {:.0} ms: recovery point sequence {}; the drill copies are NBD \
                     exports {} (writes to them never reach the replica); `replicator drill stop {group}` discards them",
                    m.id,
                    m.ready_ms,
                    m.recovery_seq,
                    m.exports().join(", ")
                )
            })
        }
        Request::DrillStop { group, outcome, id } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            drill_answer(g.drill_stop(&node.name, outcome, id.as_deref()).await, |r: &DrillRecord| {
                format!(
                    "drill {} of group {group} stopped ({}): the drill copies are discarded ({} bytes freed)",
                    r.meta.id, r.result, r.space_used_bytes
                )
            })
        }
        Request::DrillHistory { group } => {
            let Some(g) = node.group(&group) else { return unknown_group(node, &group) };
            drill_answer(g.drill_history(), |h: &Vec<DrillRecord>| format!("{} drill(s)", h.len()))
        }
    }
}

/// A drill command's outcome, with its structured result.
fn drill_answer<T: Serialize>(result: Result<T, GroupError>, message: impl FnOnce(&T) -> String) -> Response {
    match result {
        Ok(v) => Response::ok(message(&v)).with_data(&v),
        Err(e @ GroupError::Refused(_)) => Response::err(exit::REFUSED, e.to_string()),
        Err(e) => Response::err(exit::FAILED, e.to_string()),
    }
}

/// A lifecycle command's outcome: refused as unsafe (exit 3) or failed.
fn answer(what: &str, result: Result<String, GroupError>) -> Response {
    match result {
        Ok(msg) => Response::ok(msg),
        Err(e @ GroupError::Refused(_)) => Response::err(exit::REFUSED, e.to_string()),
        Err(e) => Response::err(exit::FAILED, format!("{what}: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_waits_for_the_running_admin_commands_and_starts_no_more() {
        let admin = AdminCommands::default();
        let command = admin.begin().unwrap();
        admin.close();
        let stop = admin.idle();
        tokio::pin!(stop);
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut stop).await.is_err(), "stopped past a command");
        assert!(admin.begin().is_none(), "a command started while stopping");
        drop(command);
        tokio::time::timeout(Duration::from_secs(10), stop).await.expect("the stop waits on after the last command");
    }

    #[tokio::test]
    async fn progress_lines_reach_the_caller_before_the_response() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let req = read_request(&mut stream).await.unwrap();
            assert!(matches!(req, Request::Verify { fix: true, .. }));
            let mut out = Replies { stream: &mut stream, gone: false };
            out.line(&ProgressLine { progress: "1 of 2".into() }).await;
            out.line(&Response::ok("done")).await;
        });
        let mut lines = Vec::new();
        let req = Request::Verify { group: "g".into(), fix: true };
        let resp = call_with_progress(&path, &req, |l| lines.push(l.to_string())).await.unwrap();
        assert_eq!((resp.exit, resp.message.as_str()), (exit::OK, "done"));
        assert_eq!(lines, ["1 of 2"]);
    }

    #[tokio::test]
    async fn a_daemon_that_goes_away_mid_command_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await.unwrap();
            let mut out = Replies { stream: &mut stream, gone: false };
            out.line(&ProgressLine { progress: "1 of 2".into() }).await;
            // Then the daemon dies: the connection ends without a response.
        });
        let req = Request::Verify { group: "g".into(), fix: false };
        let err = call_with_progress(&path, &req, |_| {}).await.unwrap_err();
        assert!(matches!(err, ControlError::Closed { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("closed the connection without answering") && text.contains("journalctl"), "{text}");
    }
}
