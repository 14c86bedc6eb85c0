//! `replicator drill ...` on the command line: start, stop and status talk
//! to the daemon; `drill run` wraps a command in a drill (start, run it with
//! the drill copies' NBD URIs in its environment, stop, report) and exits
//! with the command's exit code.
//!
//! Environment of the command: `REPLICATOR_DRILL_GROUP`, `REPLICATOR_DRILL_ID`,
//! `REPLICATOR_DRILL_SEQ` (the recovery point), `REPLICATOR_DRILL_VOLUMES`
//! (volume names, space-separated), `REPLICATOR_DRILL_NBD_URIS` (their NBD
//! URIs, same order), `REPLICATOR_DRILL_NBD_<VOLUME>` (one per volume, the
//! name upper-cased with other characters than letters and digits as `_`),
//! and `REPLICATOR_NBD_SOCKET`.
//!
//! Exit codes of `drill run`: the command's; 124 when it was killed at the
//! `--timeout`; 128 + N when a signal N killed it; the CLI's own codes (1, 2,
//! 3) when the drill could not start.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::cli::DaemonSockets;
use crate::config::human_bytes;
use crate::control::{exit, ControlError, Request, Response};
use crate::durable::{put_file, Existing};
use crate::group::{format_time, DrillMeta, DrillOutcome, DrillRecord, DrillStatus};

/// Lines of the command's output kept for the report.
const TAIL_LINES: usize = 40;
/// Longest line kept for the report (longer ones are cut).
const TAIL_LINE_MAX: usize = 400;
/// How long `drill run` retries `drill stop` while the command's NBD
/// clients are still detaching.
const STOP_RETRY: Duration = Duration::from_secs(20);
/// How long `drill run` waits, once its command has ended, for a daemon
/// that went away (a restart) to come back and record the drill.
const DAEMON_BACK_WITHIN: Duration = Duration::from_secs(120);
/// `drill run`'s exit code when the command was killed at the timeout
/// (as timeout(1)).
const EXIT_TIMED_OUT: u8 = 124;
/// `drill run`'s exit code when it was interrupted (as a shell's for SIGINT).
const EXIT_INTERRUPTED: u8 = 130;
/// After an interruption, or once the command has exited, how long its
/// process group has between SIGTERM and SIGKILL.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

fn data<T: serde::de::DeserializeOwned>(resp: &Response) -> Result<T, ExitCode> {
    resp.data.clone().and_then(|d| serde_json::from_value(d).ok()).ok_or_else(|| {
        eprintln!("replicator: the daemon's answer has no drill data (is it an older version?)");
        ExitCode::from(exit::FAILED)
    })
}

fn fail(resp: &Response) -> ExitCode {
    eprintln!("replicator: {}", resp.message);
    ExitCode::from(resp.exit)
}

/// `drill start`.
pub async fn start(daemon: &DaemonSockets, group: String) -> Result<ExitCode, ExitCode> {
    let resp = crate::cli::ask(daemon, Request::DrillStart { group }).await?;
    if resp.exit != exit::OK {
        return Err(fail(&resp));
    }
    println!("{}", resp.message);
    Ok(ExitCode::SUCCESS)
}

/// `drill stop`.
pub async fn stop(daemon: &DaemonSockets, group: String) -> Result<ExitCode, ExitCode> {
    let resp = crate::cli::ask(daemon, Request::DrillStop { group, outcome: None, id: None }).await?;
    if resp.exit != exit::OK {
        return Err(fail(&resp));
    }
    println!("{}", resp.message);
    Ok(ExitCode::SUCCESS)
}

/// `drill status`.
pub async fn status(daemon: &DaemonSockets, group: String, json: bool) -> Result<ExitCode, ExitCode> {
    let resp = crate::cli::ask(daemon, Request::Status { group: Some(group.clone()) }).await?;
    if resp.exit != exit::OK {
        return Err(fail(&resp));
    }
    let drill: Option<DrillStatus> = resp.groups.first().and_then(|g| g.drill.clone());
    if json {
        println!("{}", serde_json::to_string_pretty(&drill).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    match drill {
        None => println!("group {group}: no drill is running"),
        Some(d) => print!("{}", render_status(&d)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The drill part of `status`.
pub fn render_status(d: &DrillStatus) -> String {
    let m = &d.meta;
    let when =
        if m.recovery_time_us == 0 { String::new() } else { format!(", written {}", format_time(m.recovery_time_us)) };
    let discarded = match &d.discarded {
        Some(why) => {
            format!("  DRILL COPY DISCARDED: {why}; replication went on; `replicator drill stop` ends the drill\n")
        }
        None => String::new(),
    };
    format!(
        "  drill:       {} since {} (ready in {:.0} ms)\n  drill point: sequence {}{when}; {} write(s) behind at freeze\n  \
         drill copy:  {} used ({} KiB chunks), {} client(s); exports {}\n{discarded}",
        m.id,
        format_time(m.started_at_us),
        m.ready_ms,
        m.recovery_seq,
        m.lag_records,
        human_bytes(d.space_used_bytes),
        m.chunk >> 10,
        d.clients,
        d.exports.join(", ")
    )
}

/// `drill history`.
pub async fn history(daemon: &DaemonSockets, group: String, json: bool) -> Result<ExitCode, ExitCode> {
    let resp = crate::cli::ask(daemon, Request::DrillHistory { group: group.clone() }).await?;
    if resp.exit != exit::OK {
        return Err(fail(&resp));
    }
    let records: Vec<DrillRecord> = data(&resp)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        println!("group {group}: no drill has been run here");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<27} {:<12} {:>14} {:>9} {:<10} REPORT", "STARTED", "SITE", "RECOVERY SEQ", "READY", "RESULT");
    for r in &records {
        println!(
            "{:<27} {:<12} {:>14} {:>7.1}ms {:<10} {}",
            format_time(r.meta.started_at_us),
            r.node,
            r.meta.recovery_seq,
            r.meta.ready_ms,
            r.result,
            r.report.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The environment variable naming a volume's drill copy URI.
pub fn volume_env(volume: &str) -> String {
    let name: String =
        volume.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("REPLICATOR_DRILL_NBD_{name}")
}

/// The NBD URI of an export on the daemon's Unix socket.
fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// `drill run`.
pub async fn run(
    daemon: &DaemonSockets,
    group: String,
    report_dir: Option<PathBuf>,
    timeout: Option<Duration>,
    command: Vec<String>,
) -> Result<ExitCode, ExitCode> {
    let Some((program, args)) = command.split_first() else {
        eprintln!("replicator: drill run needs a command: replicator drill run GROUP -- CMD [ARGS...]");
        return Err(ExitCode::from(exit::USAGE));
    };
    // The report's directory first: a path that cannot be one fails before
    // the drill, not after the check has run.
    if let Some(dir) = &report_dir {
        let usable = crate::perms::create_dir_durably(dir, None).and_then(|_| std::fs::metadata(dir));
        let (why, code) = match usable {
            Ok(m) if m.is_dir() => (None, exit::OK),
            Ok(_) => (Some("it exists and is not a directory".to_string()), exit::USAGE),
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => (Some(e.to_string()), exit::USAGE),
            Err(e) => (Some(e.to_string()), exit::FAILED),
        };
        if let Some(why) = why {
            eprintln!("replicator: --report {}: {why}; no drill was started", dir.display());
            return Err(ExitCode::from(code));
        }
    }
    // Ctrl-C (or SIGTERM, SIGHUP: a closed terminal) from here on stops the
    // command and then the drill, which is recorded as interrupted: the
    // drill copies are not left attached and unrecorded behind a dead
    // `drill run`. A second one ends the CLI at once.
    let interrupted = catch_interruptions(&group);
    let resp = crate::cli::ask(daemon, Request::DrillStart { group: group.clone() }).await?;
    if resp.exit != exit::OK {
        return Err(fail(&resp));
    }
    let meta: DrillMeta = data(&resp)?;
    println!("{}", resp.message);
    let socket = daemon.nbd();
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env("REPLICATOR_DRILL_GROUP", &group)
        .env("REPLICATOR_DRILL_ID", &meta.id)
        .env("REPLICATOR_DRILL_SEQ", meta.recovery_seq.to_string())
        .env("REPLICATOR_DRILL_VOLUMES", meta.volumes.iter().map(|v| v.0.as_str()).collect::<Vec<_>>().join(" "))
        .env(
            "REPLICATOR_DRILL_NBD_URIS",
            meta.exports().iter().map(|e| nbd_uri(&socket, e)).collect::<Vec<_>>().join(" "),
        )
        .env("REPLICATOR_NBD_SOCKET", &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (v, _) in &meta.volumes {
        cmd.env(volume_env(v), nbd_uri(&socket, &crate::group::drill_export_name(v)));
    }
    let outcome = if interrupted.load(Ordering::SeqCst) {
        // Interrupted while the drill started: the command never runs.
        Ok(DrillOutcome {
            command: command.clone(),
            exit_code: None,
            signal: None,
            timed_out: false,
            interrupted: true,
            run_seconds: 0.0,
            output_tail: "interrupted before the command started\n".into(),
        })
    } else {
        tokio::task::spawn_blocking({
            let (command, interrupted) = (command.clone(), interrupted.clone());
            move || run_command(cmd, command, timeout, &interrupted)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the command runner failed: {e}")))
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("replicator: cannot run {program:?}: {e}");
            DrillOutcome {
                command: command.clone(),
                exit_code: Some(127),
                signal: None,
                timed_out: false,
                interrupted: false,
                run_seconds: 0.0,
                output_tail: format!("cannot run {program:?}: {e}\n"),
            }
        }
    };
    let code = match (outcome.timed_out, outcome.exit_code, outcome.signal) {
        _ if outcome.interrupted => EXIT_INTERRUPTED,
        (true, _, _) => EXIT_TIMED_OUT,
        (false, Some(c), _) => u8::try_from(c).unwrap_or(exit::FAILED),
        (false, None, Some(s)) => u8::try_from(128 + s).unwrap_or(exit::FAILED),
        (false, None, None) => exit::FAILED,
    };
    let outcome = fit_in_a_request(outcome);
    // What the command did is printed, and written with `--report`,
    // whatever becomes of the record in the daemon's history.
    let unrecorded = |why: &str| {
        eprintln!(
            "replicator: {why}\nreplicator: drill {} is not recorded with the command's outcome (status: {}, after \
             {:.1} s, against recovery point {}); `replicator drill status {group}` shows whether its copy is still \
             up (if the drill it shows is {}, `replicator drill stop {group}` ends it)",
            meta.id,
            outcome.status(),
            outcome.run_seconds,
            meta.recovery_seq,
            meta.id
        );
        if let Some(dir) = &report_dir {
            let record = DrillRecord {
                meta: meta.clone(),
                node: daemon.node().unwrap_or("?").to_string(),
                // When `drill run` gave up on the daemon.
                stopped_at_us: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                space_used_bytes: 0,
                result: "unrecorded".into(),
                discarded: None,
                outcome: Some(outcome.clone()),
                report: None,
            };
            match write_reports(dir, &record) {
                Ok(path) => {
                    eprintln!("replicator: the command's outcome is in {} (result `unrecorded`)", path.display())
                }
                Err(e) => eprintln!("replicator: cannot write the report into {}: {e}", dir.display()),
            }
        }
    };
    let resp = match record_the_drill(daemon, &group, &meta.id, &outcome, &interrupted).await {
        Ok(resp) if resp.exit == exit::OK => resp,
        Ok(resp) => {
            unrecorded(&resp.message);
            return Err(ExitCode::from(resp.exit));
        }
        Err(e) => {
            unrecorded(&e);
            return Err(ExitCode::from(exit::FAILED));
        }
    };
    let record: DrillRecord = data(&resp)?;
    println!("{}", resp.message);
    println!();
    print!("{}", record.to_markdown());
    if let Some(dir) = report_dir {
        match write_reports(&dir, &record) {
            Ok(path) => println!("\nreport: {}", path.display()),
            Err(e) => {
                eprintln!("replicator: cannot write the report into {}: {e}", dir.display());
                return Err(ExitCode::from(exit::FAILED));
            }
        }
    } else if let Some(p) = &record.report {
        println!("\nreport: {} (and .md)", p.display());
    }
    if let Some(why) = &record.discarded {
        // What the command read may not be the recovery point's image.
        eprintln!("replicator: the drill copy was discarded during the drill ({why}): the drill did not pass");
        if code == exit::OK {
            return Err(ExitCode::from(exit::FAILED));
        }
    }
    Ok(ExitCode::from(code))
}

/// `drill stop` of drill `id` with the command's outcome, retried while
/// the command's NBD clients are still detaching ([`STOP_RETRY`]) and while
/// the daemon is away ([`DAEMON_BACK_WITHIN`]: a restart during the
/// command; the drill copy outlives it) unless an interruption comes
/// meanwhile. A `drill stop` that the daemon finished but did not answer
/// is answered with the drill's record when retried.
async fn record_the_drill(
    daemon: &DaemonSockets,
    group: &str,
    id: &str,
    outcome: &DrillOutcome,
    interrupted: &AtomicBool,
) -> Result<Response, String> {
    let req = Request::DrillStop { group: group.to_string(), outcome: Some(outcome.clone()), id: Some(id.to_string()) };
    let socket = daemon.control();
    let interrupted_before = interrupted.load(Ordering::SeqCst);
    let (mut refused_since, mut away_since) = (None::<Instant>, None::<Instant>);
    loop {
        match crate::cli::call_saying_still_waiting(&socket, &req).await {
            Ok(resp)
                if resp.exit == exit::REFUSED
                    && refused_since.get_or_insert_with(Instant::now).elapsed() < STOP_RETRY => {}
            Ok(resp) => return Ok(resp),
            Err(e @ (ControlError::Connect { .. } | ControlError::Closed { .. } | ControlError::Stopping { .. })) => {
                let since = *away_since.get_or_insert_with(|| {
                    eprintln!(
                        "replicator: {e}\nreplicator: waiting up to {} s for the daemon to come back and record the \
                         drill (Ctrl-C to stop waiting)",
                        DAEMON_BACK_WITHIN.as_secs()
                    );
                    Instant::now()
                });
                if !interrupted_before && interrupted.load(Ordering::SeqCst) {
                    return Err("stopped waiting for the daemon (interrupted)".into());
                }
                if since.elapsed() >= DAEMON_BACK_WITHIN {
                    return Err(e.to_string());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Cuts `text` to at most `max` bytes (at a character boundary) and marks
/// the cut with an ellipsis.
fn shorten(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
}

/// The outcome, cut to travel in one control request with room to spare:
/// the command's long words first (a script passed inline), then the
/// output's oldest lines. Refused as too long, the drill would stay up and
/// go unrecorded.
fn fit_in_a_request(mut outcome: DrillOutcome) -> DrillOutcome {
    const ROOM: usize = crate::control::MAX_REQUEST_LINE / 2;
    const WORD_MAX: usize = 200;
    let size = |o: &DrillOutcome| serde_json::to_vec(o).map_or(usize::MAX, |v| v.len());
    if size(&outcome) > ROOM {
        for word in &mut outcome.command {
            shorten(word, WORD_MAX);
        }
    }
    while size(&outcome) > ROOM && !outcome.output_tail.is_empty() {
        let cut = outcome.output_tail.find('\n').map_or(outcome.output_tail.len(), |i| i + 1);
        outcome.output_tail.drain(..cut);
    }
    while size(&outcome) > ROOM && outcome.command.len() > 1 {
        outcome.command.pop();
    }
    outcome
}

/// Catches SIGINT, SIGTERM and SIGHUP for the rest of the process: the
/// first sets the returned flag, a second exits at once (130).
fn catch_interruptions(group: &str) -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
        match signal(kind) {
            Ok(mut s) => {
                let (interrupted, group) = (interrupted.clone(), group.to_string());
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if interrupted.swap(true, Ordering::SeqCst) {
                            // (A closed terminal makes writes fail: ignored.)
                            let _ = writeln!(
                                std::io::stderr(),
                                "replicator: interrupted again: exiting; if the drill is still running, \
                                 `replicator drill stop {group}` ends it"
                            );
                            std::process::exit(i32::from(EXIT_INTERRUPTED));
                        }
                    }
                });
            }
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "replicator: cannot catch signals, an interruption would leave the drill running: {e}"
                );
            }
        }
    }
    interrupted
}

fn write_reports(dir: &Path, record: &DrillRecord) -> std::io::Result<PathBuf> {
    crate::perms::create_dir_durably(dir, None)?;
    let base = format!("drill-{}-{}", record.meta.group, record.meta.id);
    let json = dir.join(format!("{base}.json"));
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    put_file(&json, 0o600, Existing::Replace, |f| f.write_all(&bytes))?;
    put_file(&dir.join(format!("{base}.md")), 0o600, Existing::Replace, |f| {
        f.write_all(record.to_markdown().as_bytes())
    })?;
    Ok(json)
}

/// Runs the command, passing its output through and keeping its tail;
/// kills its process group at the timeout (blocking).
fn run_command(
    mut cmd: std::process::Command,
    command: Vec<String>,
    timeout: Option<Duration>,
    interrupted: &AtomicBool,
) -> Result<DrillOutcome, String> {
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || forward(BufReader::new(out), false, &tx)));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || forward(BufReader::new(err), true, &tx)));
    }
    drop(tx);
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut keep = |line: String| {
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        // Control characters (binary output) as one character each, not
        // as the six of a JSON escape.
        let mut line: String =
            line.chars().map(|c| if c.is_control() && c != '\t' { char::REPLACEMENT_CHARACTER } else { c }).collect();
        shorten(&mut line, TAIL_LINE_MAX);
        tail.push_back(line);
    };
    // Echoes a line of the command's output where it came from, and keeps
    // it. (A closed terminal makes the echo fail: the line is still kept.)
    let mut emit = |(is_err, line): (bool, String)| {
        let _ = if is_err { writeln!(std::io::stderr(), "{line}") } else { writeln!(std::io::stdout(), "{line}") };
        keep(line);
    };
    let mut timed_out = false;
    let mut stopping: Option<Instant> = None;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // The command is not reaped until its group has been stopped below:
    // while it is a zombie, its number (the group's) cannot be given to
    // another process, so no signal to the group can reach a stranger.
    loop {
        while let Ok(msg) = rx.try_recv() {
            emit(msg);
        }
        if exited(pgid) {
            break;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) && !timed_out {
            timed_out = true;
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        match stopping {
            None if interrupted.load(Ordering::SeqCst) => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
                stopping = Some(Instant::now());
                let _ = writeln!(std::io::stderr(), "replicator: interrupted: stopping the command, then the drill");
            }
            Some(since) if since.elapsed() >= INTERRUPT_GRACE => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The drill ends with the command: what it left running in its
    // process group (a background job, which may hold the drill's exports
    // or the output pipes open) is stopped too, SIGTERM and then SIGKILL,
    // and the output is read until the pipes close or the group is gone.
    // (Waiting for the pipes alone hung for good on a job left behind,
    // past the timeout and Ctrl-C, with the drill never stopped.)
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
    let mut deadline = Instant::now() + INTERRUPT_GRACE;
    let mut killed = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(msg) => emit(msg),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                killed = true;
                deadline = Instant::now() + INTERRUPT_GRACE;
            }
            // Something outside the group holds the pipes: the readers are
            // left to end with them.
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    drop(readers);
    // (Unknown only if the command could not be waited for: SIGCHLD
    // ignored by whoever started `drill run`, the kernel reaping it.)
    let status = child.wait();
    if let Err(e) = &status {
        keep(format!("replicator: the command's exit status is unknown: {e}"));
    }
    let status = status.ok();
    let output_tail: String = tail.into_iter().collect::<Vec<_>>().join("\n");
    Ok(DrillOutcome {
        command,
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        interrupted: stopping.is_some(),
        run_seconds: started.elapsed().as_secs_f64(),
        output_tail,
    })
}

/// Whether the process `pid` (a child) has exited, without reaping it. An
/// error counts as exited: nix cannot describe an end by a real-time signal
/// (EINVAL), and a child the kernel reaped itself cannot be waited for
/// (ECHILD); either way its process group is stopped next.
fn exited(pid: nix::unistd::Pid) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    !matches!(
        waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT),
        Ok(WaitStatus::StillAlive)
    )
}

/// Sends the command's output on, line by line, until it closes its end:
/// bytes that are not UTF-8 are replaced, and an overlong line is cut into
/// pieces, so that neither ends the reading (the command would then die of
/// SIGPIPE at its next write, and the drill be recorded as failed).
fn forward(mut reader: impl BufRead, is_err: bool, tx: &mpsc::Sender<(bool, String)>) {
    const PIECE: usize = 64 * 1024;
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(PIECE as u64).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if tx.send((is_err, String::from_utf8_lossy(&line).into_owned())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An inline script and a full tail still travel in one request: the
    /// newest output lines are kept, the long word cut.
    #[test]
    fn an_outcome_is_cut_to_fit_in_a_request() {
        let tail: String = (0..40).map(|i| format!("{i:03} {}\n", "y".repeat(390))).collect();
        let outcome = DrillOutcome {
            command: vec!["sh".into(), "-c".into(), "x".repeat(100_000)],
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            interrupted: false,
            run_seconds: 1.0,
            output_tail: tail,
        };
        let fitted = fit_in_a_request(outcome);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= crate::control::MAX_REQUEST_LINE / 2);
        assert_eq!(fitted.command[..2], ["sh", "-c"]);
        assert!(fitted.command[2].len() < 300 && fitted.command[2].ends_with('…'));
        assert!(fitted.output_tail.starts_with("000 "), "the tail fits whole once the word is cut");

        let big = DrillOutcome { output_tail: "z".repeat(40_000) + "\nlast\n", ..fitted };
        let fitted = fit_in_a_request(big);
        assert_eq!(fitted.output_tail, "last\n");
    }

    /// Output that is not UTF-8, or one very long line, does not end the
    /// reading of the command's output.
    #[test]
    fn forwarding_survives_bytes_that_are_not_utf8_and_long_lines() {
        let mut out = b"first\n\xff\xfe binary\n".to_vec();
        out.extend(std::iter::repeat_n(b'x', 200_000));
        out.extend(b"\nlast\n");
        let (tx, rx) = mpsc::channel();
        forward(std::io::Cursor::new(out), true, &tx);
        drop(tx);
        let lines: Vec<String> = rx.into_iter().map(|(is_err, l)| if is_err { l } else { String::new() }).collect();
        assert_eq!(lines.first().map(String::as_str), Some("first"));
        assert_eq!(lines[1], "\u{fffd}\u{fffd} binary");
        assert_eq!(lines.iter().map(String::len).sum::<usize>(), 5 + 13 + 200_000 + 4);
        assert_eq!(lines.last().map(String::as_str), Some("last"));
    }
}
