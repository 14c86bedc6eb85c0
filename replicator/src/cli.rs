//! The command line (clap). Every admin command talks to the daemon through
//! the control socket; `cert`, `config check` and `demo` work without one.
//!
//! Exit codes: 0 done, 1 failed, 2 usage or config error, 3 refused as unsafe.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{human_bytes, Config, DEFAULT_CONFIG_PATH};
use crate::control::{self, exit, Request, Response};
use crate::group::{format_time, GroupStatus, Health};

/// `println!` that ends the command quietly when its output was closed
/// (`status --watch | head -1`): std's panics, an exit 101 with a backtrace
/// after a `failover` had been carried out. (SIGPIPE stays ignored: a
/// control socket the daemon closes must give an error, not kill the CLI.)
macro_rules! println {
    ($($arg:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!`, as [`println!`] above.
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::write_out(format_args!($($arg)*)) };
}

/// Writes to stdout; a closed stdout ends the process with 141, the status
/// a shell shows for a command stopped by a closed pipe.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if out.write_fmt(args).and_then(|()| out.flush()).is_err() {
        std::process::exit(141);
    }
}

/// Block-level storage replication over QUIC with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "replicator", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "REPLICATOR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (systemd: Type=notify).
    Run,
    /// Show pair state, lag and journal use.
    Status {
        /// Only this group.
        group: Option<String>,
        /// Machine-readable output (schema in the README).
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Create or delete a pair.
    #[command(subcommand)]
    Pair(PairCommand),
    /// Planned switchover (run on either site): the primary refuses new
    /// writes, the secondary takes over with every write, and replication
    /// runs back without a copy. Refused (exit 3) unless the pair is in
    /// PAIR, and while NBD clients have the volumes attached on the primary.
    Switchover {
        /// Group name.
        group: String,
        /// Then wait until the reversed pair is in PAIR (replicating).
        #[arg(long)]
        wait: bool,
        /// Switch even with NBD clients attached on the primary: their
        /// writes fail from then on, and their reads see the new primary's
        /// writes arrive.
        #[arg(long)]
        force: bool,
    },
    /// Unplanned failover, on the secondary: promote its last consistent
    /// image and print the recovery point. Refused (exit 3) while the
    /// primary is connected, or while the replica is inconsistent.
    Failover {
        /// Group name.
        group: String,
        /// Fail over even though the primary is connected (it is fenced
        /// when it reconnects) or the replica is inconsistent.
        #[arg(long)]
        force: bool,
    },
    /// On a former primary fenced by a failover (or in split brain): become
    /// the secondary of the new primary, discarding this site's writes
    /// after the takeover point (reported), copy only what differs, then
    /// switch the roles back. Waits for the resync.
    Failback {
        /// Group name.
        group: String,
        /// Stop after the resync: this node stays the secondary.
        #[arg(long)]
        no_switch: bool,
        /// With --no-switch: wait until the resync is done (without
        /// --no-switch failback always waits).
        #[arg(long)]
        wait: bool,
        /// Give up waiting for the resync after this long (e.g. 30m).
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<Duration>,
    },
    /// Certificates for mutual TLS.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Two nodes on loopback: the whole tour, then exit 0.
    Demo {
        /// Keep running after the tour so you can attach your own NBD client.
        #[arg(long)]
        serve: bool,
        /// The check the demo's `drill run` runs: reads every drill copy
        /// named in the environment and compares its BLAKE3 hash with
        /// REPLICATOR_DEMO_EXPECT_<VOLUME> (exit 1 on a mismatch).
        #[arg(long, hide = true)]
        drill_check: bool,
    },
    /// Drill copies on the secondary: a writable, group-consistent copy of
    /// the replica for failover tests while replication goes on.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Compare both sites online, region by region (run on the primary;
    /// needs PAIR). Exit 0 when they match, 1 listing the regions that
    /// differ.
    Verify {
        /// Group name.
        group: String,
        /// Copy the differing regions from the primary again, and wait until
        /// the pair is back in PAIR.
        #[arg(long)]
        fix: bool,
    },
    /// Generate files for packaging: man pages, shell completions (used by
    /// the .deb build, `replicator/packaging/build-deb.sh`).
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
}

/// `generate ...` (hidden)
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// One man page per command (replicator.1, replicator-pair-create.1, ...) in DIR.
    Man {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
    /// Completion scripts for bash (replicator.bash), zsh (_replicator) and
    /// fish (replicator.fish) in DIR.
    Completions {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

/// `drill ...` (on the secondary)
#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Freeze the replica at one point (the same for every volume of the
    /// group) and export each volume's drill copy read-write as NBD export
    /// drill/VOLUME. Replication into the replica goes on.
    Start {
        /// Group name.
        group: String,
    },
    /// Discard the drill copies (refused while NBD clients are attached)
    /// and record the drill in the history.
    Stop {
        /// Group name.
        group: String,
    },
    /// Show the running drill: recovery point, space used, clients.
    Status {
        /// Group name.
        group: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Start a drill, run CMD with the drill copies' NBD URIs in its
    /// environment (REPLICATOR_DRILL_NBD_<VOLUME>, REPLICATOR_DRILL_NBD_URIS),
    /// stop the drill, and write a JSON and a Markdown report. Exits with
    /// CMD's exit code (124 when killed at --timeout).
    Run {
        /// Group name.
        group: String,
        /// Also write the reports into this directory.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Kill CMD after this long (e.g. 10m).
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<Duration>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List past drills: when, recovery point, result, report.
    History {
        /// Group name.
        group: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `pair ...`
#[derive(Debug, Subcommand)]
pub enum PairCommand {
    /// Pair GROUP with its peer, this node becoming primary.
    Create {
        /// Group name.
        group: String,
        /// Skip the initial copy (both sides are known to be identical).
        #[arg(long)]
        nocopy: bool,
        /// Wait until the pair reaches PAIR, showing progress.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 30s, 2h; default: no
        /// limit). A permanent refusal by the peer fails at once anyway.
        #[arg(long, requires = "wait", value_parser = parse_duration_arg)]
        timeout: Option<Duration>,
    },
    /// Dissolve the pair; both sides become standalone (SIMPLEX).
    Delete {
        /// Group name.
        group: String,
    },
    /// Suspend replication (either site). The secondary keeps a
    /// write-order-consistent image; only `pair resync` resumes.
    Split {
        /// Group name.
        group: String,
        /// Make the secondary's volumes writable (its changes are
        /// overwritten at resync, or kept with `resync --swap`).
        #[arg(long)]
        rw: bool,
    },
    /// Resume a split or failed pair, copying only the regions either side
    /// changed.
    Resync {
        /// Group name.
        group: String,
        /// Run on the split secondary: it becomes the primary and its data
        /// wins.
        #[arg(long, conflicts_with = "discard_local")]
        swap: bool,
        /// Run on the site to lose in a split brain (or on a fenced former
        /// primary): it becomes the secondary and its own writes are
        /// overwritten.
        #[arg(long)]
        discard_local: bool,
        /// Wait until the pair reaches PAIR, showing progress.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long.
        #[arg(long, requires = "wait", value_parser = parse_duration_arg)]
        timeout: Option<Duration>,
    },
}

/// Longest validity `cert issue` accepts (100 years).
const MAX_CERT_DAYS: i64 = 36_500;

/// `cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a CA: DIR/ca.pem and DIR/ca.key.
    Init {
        /// Directory for the CA files.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate: OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node name (must equal node.name in that node's config).
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(i64).range(1..=MAX_CERT_DAYS))]
        days: i64,
    },
}

/// `config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration without starting anything.
    ///
    /// Fails (exit 2) on anything that would keep `run` from starting or
    /// from replicating: a directory, a volume, a certificate that does
    /// not load or is not valid now, a peer name that does not resolve.
    Check {
        /// Fail only on what keeps `run` from starting or no waiting fixes;
        /// a certificate expired or not valid yet by this host's clock and
        /// a peer name that does not resolve are warnings
        /// (the unit's ExecStartPre: after a disaster the peer's site, with
        /// its DNS, may be gone and the clock not synced yet, and the node
        /// that is to take over must still start).
        #[arg(long)]
        startup: bool,
    },
    /// Print the systemd drop-in granting this configuration's devices, files and peers.
    ///
    /// The drop-in grants replicator.service exactly the configured block
    /// devices (DeviceAllow=, with the group owning them), volume files
    /// (ReadWritePaths=) and peers (IPAddressAllow=); the shipped unit grants
    /// none. Regenerate it after changing volumes or peers: `config check`
    /// (the unit's ExecStartPre) fails on a volume the sandbox does not grant.
    SystemdDropin {
        /// Write it to this file (atomically, creating the directory) instead
        /// of standard output, e.g.
        /// /etc/systemd/system/replicator.service.d/50-config.conf.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Also allow this address or prefix (repeatable), e.g. the
        /// Prometheus server scraping a non-loopback metrics_listen.
        #[arg(long, value_name = "ADDRESS[/PREFIX]")]
        allow: Vec<String>,
    },
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("replicator: {e}");
        ExitCode::from(exit::USAGE)
    })
}

/// Where a client command reaches the daemon: the sockets in the
/// configuration's `run_dir`.
#[derive(Debug, Clone)]
pub struct DaemonSockets {
    run_dir: PathBuf,
    /// The node's name, when the configuration validates.
    node: Option<String>,
}

impl DaemonSockets {
    /// The node's name (`[node] name`), when the configuration validates.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The control socket.
    pub fn control(&self) -> PathBuf {
        crate::config::control_socket_in(&self.run_dir)
    }

    /// The NBD Unix socket.
    pub fn nbd(&self) -> PathBuf {
        crate::config::nbd_socket_in(&self.run_dir)
    }
}

/// The daemon a client command talks to. A configuration that does not
/// validate (an edit in progress, a group added whose peer is not yet) does
/// not keep an admin from the running daemon, which runs with the
/// configuration it loaded at its start: the command says what is wrong
/// and goes on, as long as `node.run_dir` can be read.
fn daemon_of(path: &Path) -> Result<DaemonSockets, ExitCode> {
    match Config::load(path) {
        Ok(config) => Ok(DaemonSockets { run_dir: config.node.run_dir, node: Some(config.node.name) }),
        Err(e) => match Config::run_dir_of(path) {
            Some(run_dir) => {
                eprintln!("replicator: warning: {e}");
                eprintln!(
                    "replicator: asking the running daemon anyway ({}): it runs with the configuration it loaded at \
                     its start; fix the file before the next restart",
                    run_dir.display()
                );
                Ok(DaemonSockets { run_dir, node: None })
            }
            None => {
                eprintln!("replicator: {e}");
                Err(ExitCode::from(exit::USAGE))
            }
        },
    }
}

/// Stops the daemon's runtime, waiting at most
/// [`crate::daemon::RUNTIME_SHUTDOWN_TIMEOUT`] (and a margin) for it. A
/// worker thread that submitted I/O to a volume that hangs (a dead disk, a
/// stuck FUSE or network filesystem) cannot finish exiting until the kernel
/// gives up on that I/O, and the runtime would wait for it forever: the
/// process exits without it.
fn stop_runtime(rt: tokio::runtime::Runtime) {
    let (stopped_tx, stopped) = std::sync::mpsc::channel();
    let stopping = std::thread::Builder::new().name("replicator-stop".into()).spawn(move || {
        rt.shutdown_timeout(crate::daemon::RUNTIME_SHUTDOWN_TIMEOUT);
        let _ = stopped_tx.send(());
    });
    if stopping.is_ok()
        && stopped.recv_timeout(crate::daemon::RUNTIME_SHUTDOWN_TIMEOUT + Duration::from_secs(1)).is_err()
    {
        tracing::warn!("a runtime thread is still stuck in I/O on a volume: exiting without waiting for it");
    }
}

/// The daemon's runtime, with `node.worker_threads` threads.
fn daemon_runtime(workers: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().map_err(|e| {
        eprintln!("replicator: cannot start the async runtime: {e}");
        ExitCode::from(exit::FAILED)
    })
}

/// A `cert` command's error, with its exit code: a bad node name is a
/// usage error (2); a key or certificate already there is refused as unsafe
/// (3: replacing a key loses it; the message says to move it away first).
fn cert_failed(e: &crate::certs::CertError) -> ExitCode {
    eprintln!("replicator: {e}");
    ExitCode::from(match e {
        crate::certs::CertError::BadName(_) => exit::USAGE,
        crate::certs::CertError::Exists(_) => exit::REFUSED,
        _ => exit::FAILED,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("replicator: cannot start the async runtime: {e}");
        ExitCode::from(exit::FAILED)
    })
}

/// Replaces the running log filter; set by [`init_logging`].
type FilterReload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static LOG_RELOAD: std::sync::OnceLock<FilterReload> = std::sync::OnceLock::new();

/// The log filter `run` uses: `node.log` (already expanded by
/// [`crate::config::log_filter_directives`]) when set, else `RUST_LOG`, else
/// [`crate::config::DEFAULT_LOG_FILTER`]. Returns it with where it came from.
fn log_filter(node_log: Option<&str>) -> (tracing_subscriber::EnvFilter, String) {
    use tracing_subscriber::EnvFilter;
    if let Some(directives) = node_log {
        // Validated with the configuration.
        if let Ok(filter) = EnvFilter::builder().parse(directives) {
            return (filter, format!("node.log {directives:?}"));
        }
    }
    // As written (unlike node.log, a bare level applies to every crate).
    if let Ok(env) = std::env::var("RUST_LOG") {
        if let Ok(filter) = EnvFilter::builder().parse(&env) {
            return (filter, format!("RUST_LOG {env:?}"));
        }
    }
    let default = crate::config::DEFAULT_LOG_FILTER;
    (EnvFilter::new(default), format!("default {default:?}"))
}

/// Initialises logging: plain lines without colour or timestamps under
/// systemd (journald adds them); the filter is `node.log`, else `RUST_LOG`,
/// else the default ([`crate::config::DEFAULT_LOG_FILTER`]: quinn_udp logs
/// failed `sendmsg` calls as raw Debug dumps at WARN; QUIC treats them as
/// packet loss and the link state says what matters, so only its errors
/// show by default). [`reload_log_filter`] replaces the filter later.
pub fn init_logging(node_log: Option<&str>) {
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    let (filter, _) = log_filter(node_log);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!under_systemd && std::io::stderr().is_terminal());
    if under_systemd {
        let builder = builder.without_time().with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = LOG_RELOAD.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
        builder.init();
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = LOG_RELOAD.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
        builder.init();
    }
}

/// Applies the log filter a start with this `node.log` would use (see
/// [`init_logging`]); returns what it is, e.g. `node.log "debug,..."`.
pub fn reload_log_filter(node_log: Option<&str>) -> Result<String, String> {
    let reload = LOG_RELOAD.get().ok_or("logging was not initialised with a reloadable filter")?;
    let (filter, described) = log_filter(node_log);
    reload(filter)?;
    Ok(described)
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    match run(cli) {
        Ok(code) | Err(code) => code,
    }
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.command {
        Command::Run => {
            let config = load_config(&cli.config)?;
            init_logging(config.node.log.as_deref());
            let rt = daemon_runtime(config.node.worker_threads)?;
            let result = rt.block_on(crate::daemon::run(config));
            stop_runtime(rt);
            match result {
                // The state_dir lock goes only now that nothing of this
                // daemon can write any more.
                Ok(stopped) if stopped.unclean.is_empty() => Ok(ExitCode::SUCCESS),
                Ok(stopped) => {
                    eprintln!(
                        "replicator: stopped without marking the groups clean ({}); their journals are replayed at the \
                         next start",
                        stopped.unclean.join("; ")
                    );
                    Err(ExitCode::from(exit::FAILED))
                }
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("replicator: {e}");
                    Err(ExitCode::from(exit::FAILED))
                }
            }
        }
        Command::Status { group, json, watch } => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                loop {
                    let resp = ask_status(&daemon, Request::Status { group: group.clone() }).await?;
                    if resp.exit != exit::OK {
                        eprintln!("replicator: {}", resp.message);
                        return Err(ExitCode::from(resp.exit));
                    }
                    if json {
                        println!("{}", serde_json::to_string_pretty(&resp.groups).unwrap_or_default());
                    } else {
                        if watch && std::io::stdout().is_terminal() {
                            print!("\x1b[2J\x1b[H");
                        }
                        print!("{}", render_status(&resp.groups));
                    }
                    if !watch {
                        return Ok(ExitCode::from(health_exit(&resp.groups)));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        }
        Command::Pair(PairCommand::Create { group, nocopy, wait, timeout }) => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                let resp = ask(&daemon, Request::PairCreate { group: group.clone(), nocopy }).await?;
                let code = report(&resp)?;
                if wait {
                    wait_for_pair(&daemon, &group, timeout, WaitAfter::Create).await
                } else {
                    Ok(code)
                }
            })
        }
        Command::Pair(PairCommand::Delete { group }) => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async { report(&ask(&daemon, Request::PairDelete { group }).await?) })
        }
        Command::Pair(PairCommand::Split { group, rw }) => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async { report(&ask(&daemon, Request::PairSplit { group, rw }).await?) })
        }
        Command::Pair(PairCommand::Resync { group, swap, discard_local, wait, timeout }) => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                let code =
                    report(&ask(&daemon, Request::PairResync { group: group.clone(), swap, discard_local }).await?)?;
                if wait {
                    wait_for_pair(&daemon, &group, timeout, WaitAfter::Resync).await
                } else {
                    Ok(code)
                }
            })
        }
        Command::Failback { group, no_switch, wait, timeout } => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                let code = report(&ask(&daemon, Request::Failback { group: group.clone() }).await?)?;
                if no_switch && !wait {
                    return Ok(code);
                }
                wait_for_pair(&daemon, &group, timeout, WaitAfter::RoleChange).await?;
                if no_switch {
                    return Ok(ExitCode::SUCCESS);
                }
                let switched = ask(&daemon, Request::Switchover { group: group.clone(), force: false }).await?;
                if switched.exit == exit::REFUSED {
                    // Exit 3 says "nothing changed"; this node was demoted
                    // and resynced already.
                    eprintln!("replicator: {}", switched.message);
                    eprintln!(
                        "replicator: failback of {group}: this node is the secondary now, in PAIR; only switching the \
                         roles back was refused: run `replicator switchover {group}` here once that is fixed"
                    );
                    return Err(ExitCode::from(exit::FAILED));
                }
                report(&switched)
            })
        }
        Command::Switchover { group, wait, force } => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                let code = report(&ask(&daemon, Request::Switchover { group: group.clone(), force }).await?)?;
                if wait {
                    wait_for_pair(&daemon, &group, None, WaitAfter::RoleChange).await
                } else {
                    Ok(code)
                }
            })
        }
        Command::Failover { group, force } => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async { report(&ask(&daemon, Request::Failover { group, force }).await?) })
        }
        Command::Cert(CertCommand::Init { dir }) => match crate::certs::init_ca(&dir) {
            Ok((cert, key)) => {
                println!("created CA certificate {} and key {}", cert.display(), key.display());
                println!("keep {} secret; copy ca.pem to every node", key.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(cert_failed(&e)),
        },
        Command::Cert(CertCommand::Issue { ca_dir, name, out, days }) => {
            match crate::certs::issue(&ca_dir, &name, &out, crate::certs::Validity::days(days)) {
                Ok((cert, key)) => {
                    println!("issued {} and {} for node {name:?} (valid {days} days)", cert.display(), key.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(cert_failed(&e)),
            }
        }
        Command::Config(ConfigCommand::Check { startup }) => {
            let config = load_config(&cli.config)?;
            let found = crate::preflight::check(&config);
            for p in &found.fatal {
                eprintln!("replicator: {p}");
            }
            for p in found.link.iter().chain(&found.group) {
                eprintln!("replicator: {}{p}", if startup { "warning: " } else { "" });
            }
            if !found.fatal.is_empty() {
                eprintln!(
                    "replicator: {}: {} problem(s); `replicator run` would fail",
                    config.path.display(),
                    found.fatal.len() + found.link.len() + found.group.len()
                );
                return Err(ExitCode::from(exit::USAGE));
            }
            if !found.group.is_empty() && !startup {
                eprintln!(
                    "replicator: {}: {} problem(s); `replicator run` would keep the group(s) named down (FAILED) \
                     and run the others",
                    config.path.display(),
                    found.group.len() + found.link.len()
                );
                return Err(ExitCode::from(exit::USAGE));
            }
            if !found.link.is_empty() && !startup {
                eprintln!(
                    "replicator: {}: {} problem(s); `replicator run` would start and serve the volumes locally, but \
                     could not replicate",
                    config.path.display(),
                    found.link.len()
                );
                return Err(ExitCode::from(exit::USAGE));
            }
            println!(
                "{}: OK (node {}, {} peer(s), {} group(s), {} volume(s))",
                config.path.display(),
                config.node.name,
                config.peers.len(),
                config.groups.len(),
                config.groups.iter().map(|g| g.volumes.len()).sum::<usize>()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::SystemdDropin { output, allow }) => {
            let config = load_config(&cli.config)?;
            let text = crate::packaging::systemd_dropin(&config, &allow).map_err(|e| {
                eprintln!("replicator: {}: {e}", config.path.display());
                ExitCode::from(exit::USAGE)
            })?;
            match output {
                None => print!("{text}"),
                Some(path) => {
                    crate::packaging::write_atomically(&path, &text).map_err(|e| {
                        eprintln!("replicator: {}: {e}", path.display());
                        ExitCode::from(exit::FAILED)
                    })?;
                    eprintln!("replicator: wrote {}; now run `systemctl daemon-reload`", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(what) => {
            let (dir, result) = match what {
                GenerateCommand::Man { dir } => {
                    let r = crate::packaging::generate_man(&dir);
                    (dir, r)
                }
                GenerateCommand::Completions { dir } => {
                    let r = crate::packaging::generate_completions(&dir);
                    (dir, r)
                }
            };
            match result {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("replicator: {}: {e}", dir.display());
                    Err(ExitCode::from(exit::FAILED))
                }
            }
        }
        Command::Demo { drill_check: true, .. } => Ok(crate::demo::drill_check()),
        Command::Demo { serve, .. } => Ok(crate::demo::run(serve)),
        Command::Drill(cmd) => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                match cmd {
                    DrillCommand::Start { group } => crate::drill_cli::start(&daemon, group).await,
                    DrillCommand::Stop { group } => crate::drill_cli::stop(&daemon, group).await,
                    DrillCommand::Status { group, json } => crate::drill_cli::status(&daemon, group, json).await,
                    DrillCommand::Run { group, report, timeout, command } => {
                        crate::drill_cli::run(&daemon, group, report, timeout, command).await
                    }
                    DrillCommand::History { group, json } => crate::drill_cli::history(&daemon, group, json).await,
                }
            })
        }
        Command::Verify { group, fix } => {
            let daemon = daemon_of(&cli.config)?;
            let rt = runtime()?;
            let (socket, req) = (daemon.control(), Request::Verify { group, fix });
            rt.block_on(async {
                match control::call_with_progress(&socket, &req, |line| println!("{line}")).await {
                    Ok(resp) => report(&resp),
                    Err(e) => {
                        eprintln!("replicator: {e}");
                        Err(ExitCode::from(exit::FAILED))
                    }
                }
            })
        }
    }
}

/// How long `status` waits for the daemon's answer (served from memory, in
/// milliseconds): a daemon that does not answer is reported, not waited on
/// forever by a monitoring script or an admin.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// [`ask`], for a query answered at once: an error after [`STATUS_TIMEOUT`].
async fn ask_status(daemon: &DaemonSockets, req: Request) -> Result<Response, ExitCode> {
    match tokio::time::timeout(STATUS_TIMEOUT, ask(daemon, req)).await {
        Ok(answer) => answer,
        Err(_) => {
            eprintln!(
                "replicator: the daemon did not answer within {}s on {} (stuck? see its log, `journalctl -u \
                 replicator`)",
                STATUS_TIMEOUT.as_secs(),
                daemon.control().display()
            );
            Err(ExitCode::from(exit::FAILED))
        }
    }
}

/// After this long without an answer, a command says it is still waiting
/// (a lifecycle command may wait for its peer; it is not cut short).
const STILL_WAITING_AFTER: Duration = Duration::from_secs(10);

pub(crate) async fn ask(daemon: &DaemonSockets, req: Request) -> Result<Response, ExitCode> {
    call_saying_still_waiting(&daemon.control(), &req).await.map_err(|e| {
        eprintln!("replicator: {e}");
        ExitCode::from(exit::FAILED)
    })
}

/// One control call that says it is still waiting after
/// [`STILL_WAITING_AFTER`] without an answer.
pub(crate) async fn call_saying_still_waiting(socket: &Path, req: &Request) -> Result<Response, control::ControlError> {
    let call = control::call(socket, req);
    tokio::pin!(call);
    match tokio::time::timeout(STILL_WAITING_AFTER, &mut call).await {
        Ok(answer) => answer,
        Err(_) => {
            eprintln!(
                "replicator: still waiting for the daemon's answer ({}s; it may be waiting for its peer); see its log: \
                 `journalctl -u replicator -f`",
                STILL_WAITING_AFTER.as_secs()
            );
            call.await
        }
    }
}

fn report(resp: &Response) -> Result<ExitCode, ExitCode> {
    if resp.exit == exit::OK {
        println!("{}", resp.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("replicator: {}", resp.message);
        Err(ExitCode::from(resp.exit))
    }
}

/// `status`'s exit code: 0 when every group shown is healthy, 4 when the
/// worst is degraded, 5 when one is critical (see [`Health`]).
fn health_exit(groups: &[GroupStatus]) -> u8 {
    match groups.iter().map(|g| Health::parse(&g.health)).max() {
        Some(Health::Critical) => exit::CRITICAL,
        Some(Health::Degraded) => exit::DEGRADED,
        _ => exit::OK,
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// The least a `--wait` status poll is given, even when `--timeout` is due
/// sooner: the daemon answers `status` from memory in milliseconds.
const POLL_AT_LEAST: Duration = Duration::from_secs(2);

/// What [`wait_for_pair`] waits after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitAfter {
    /// `pair create`: a refused create stays pending on this node (the
    /// refusal says how to withdraw it).
    Create,
    /// `pair resync`: the peer's `in-use` refusal (NBD clients on its split
    /// replica) is waited out, as a resync starts by itself once they
    /// detach (not for `pair create`, where they are an application on
    /// standalone volumes about to be overwritten).
    Resync,
    /// A failback or switchover.
    RoleChange,
}

/// `--wait`: polls status until PAIR, printing progress (a bar on a TTY,
/// plain lines otherwise). Fails at once when the peer refused for good
/// or the pair failed, and after `timeout` if given.
async fn wait_for_pair(
    daemon: &DaemonSockets,
    group: &str,
    timeout: Option<Duration>,
    after: WaitAfter,
) -> Result<ExitCode, ExitCode> {
    let in_use_waits = after == WaitAfter::Resync;
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
    loop {
        // Each poll is bounded too: a daemon that stops answering must not
        // hold the command much past `--timeout`, nor for ever without one.
        let bound = timeout
            .map_or(STATUS_TIMEOUT, |t| t.saturating_sub(started.elapsed()).clamp(POLL_AT_LEAST, STATUS_TIMEOUT));
        let poll = ask(daemon, Request::Status { group: Some(group.to_string()) });
        let Ok(resp) = tokio::time::timeout(bound, poll).await else {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            eprintln!(
                "replicator: group {group}: not PAIR after {:.0} s: the daemon did not answer `status` within {:.0} s \
                 on {} (stuck? see its log, `journalctl -u replicator`)",
                started.elapsed().as_secs_f64(),
                bound.as_secs_f64(),
                daemon.control().display()
            );
            return Err(ExitCode::from(exit::FAILED));
        };
        let resp = resp?;
        let Some(s) = resp.groups.first() else {
            eprintln!("replicator: {}", resp.message);
            return Err(ExitCode::from(exit::FAILED));
        };
        if s.state == "PAIR" && s.connected {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            println!("group {group}: PAIR ({} mode, secondary consistent)", s.mode);
            return Ok(ExitCode::SUCCESS);
        }
        let timed_out = timeout.is_some_and(|t| started.elapsed() >= t);
        let refused = s.refusal.as_deref().filter(|r| !(in_use_waits && *r == "in-use"));
        if s.state == "SIMPLEX"
            || s.state == "SPLIT-BRAIN"
            || (s.state == "SUSPENDED" && s.reason.as_deref() == Some("error"))
            || refused.is_some()
            || timed_out
        {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if timed_out && refused.is_none() {
                eprintln!(
                    "replicator: group {group}: not PAIR after {:.0} s (now {}{}, {} of {} bytes compared or copied){}",
                    started.elapsed().as_secs_f64(),
                    s.state,
                    s.reason.as_ref().map(|r| format!("({r})")).unwrap_or_default(),
                    s.copy_done_bytes,
                    s.copy_total_bytes,
                    s.last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
                );
                return Err(ExitCode::from(exit::FAILED));
            }
            eprintln!(
                "replicator: group {group} is {}{}: {}",
                s.state,
                s.reason.as_ref().map(|r| format!("({r})")).unwrap_or_default(),
                s.last_error.clone().unwrap_or_else(|| "see the daemon log".into())
            );
            if after == WaitAfter::Create && refused.is_some() && s.role == "primary" {
                eprintln!(
                    "replicator: the pair stays pending here (the peer is asked again): fix the cause, or \
                     `replicator pair delete {group}` here withdraws it"
                );
            }
            return Err(ExitCode::from(exit::FAILED));
        }
        let what = if s.connected {
            "copying".to_string()
        } else {
            match &s.last_error {
                Some(e) => format!("waiting for the peer ({e})"),
                None => "waiting for the peer".to_string(),
            }
        };
        match &bar {
            Some(b) => {
                b.set_length(s.copy_total_bytes.max(1));
                b.set_position(s.copy_done_bytes);
                b.set_message(format!("{group}: {} {what}", s.state));
            }
            None => {
                if last_line.elapsed() >= Duration::from_secs(2) {
                    let rate = s.copy_done_bytes as f64 / started.elapsed().as_secs_f64().max(0.001);
                    let eta = match s.copy_total_bytes.saturating_sub(s.copy_done_bytes) {
                        0 => String::new(),
                        _ if rate < 1.0 => ", ETA unknown".to_string(),
                        left => format!(", ETA {:.0} s", left as f64 / rate),
                    };
                    println!(
                        "group {group}: {} {what}: {} of {} compared or copied ({} sent as data){eta}",
                        s.state,
                        human_bytes(s.copy_done_bytes),
                        human_bytes(s.copy_total_bytes),
                        human_bytes(s.copy_sent_bytes)
                    );
                    last_line = std::time::Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// "2026-12-01 10:00:00 UTC (3m 20s ago)" for seconds since the Unix epoch.
fn describe_time(unix: f64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix as i64) else { return format!("{unix:.0} (Unix time)") };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(unix);
    let ago = (now - unix).max(0.0) as u64;
    let ago = match ago {
        0..=119 => format!("{ago}s ago"),
        120..=7199 => format!("{}m {}s ago", ago / 60, ago % 60),
        _ => format!("{}h {}m ago", ago / 3600, ago % 3600 / 60),
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC ({ago})",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The human status view.
pub fn render_status(groups: &[GroupStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for s in groups {
        let state = match &s.reason {
            Some(r) => format!("{}({r})", s.state),
            None => s.state.clone(),
        };
        let link = match (s.connected, s.disconnected_since_unix) {
            (true, _) => "connected".to_string(),
            (false, Some(t)) => format!("NOT CONNECTED since {}", describe_time(t as f64)),
            (false, None) => "not connected".to_string(),
        };
        let _ = writeln!(
            out,
            "group {}  role {}  state {}  mode {}  peer {} ({link})  health {}",
            s.group, s.role, state, s.mode, s.peer, s.health
        );
        if s.state == crate::node::FAILED_STATE {
            // Nothing of it runs: no figures to show.
            for v in &s.volumes {
                let _ = writeln!(out, "  volume {}  {}", v.name, v.path.display());
            }
            if let Some(e) = &s.last_error {
                let _ = writeln!(out, "  last error: {e}");
            }
            continue;
        }
        if s.role != "none" {
            let _ = writeln!(
                out,
                "  generation {} epoch {}  volumes {}{}{}",
                s.generation,
                s.epoch,
                if s.writable { "writable" } else { "not writable here" },
                if s.superseded_by > 0 {
                    format!("  FENCED: superseded by generation {} on {}", s.superseded_by, s.peer)
                } else {
                    String::new()
                },
                if s.needs_rebase {
                    "  differs from the primary in regions it names: the next resync copies them"
                } else {
                    ""
                }
            );
        }
        if let Some(t) = s.data_as_of_unix {
            let _ =
                writeln!(out, "  data as of {} (the primary's time of the newest write held here)", describe_time(t));
        }
        if let Some(r) = &s.refusal {
            let _ = writeln!(out, "  refused by the peer: {r}");
        }
        if s.rpo_zero == Some(false) {
            let since = s.rpo_zero_lost_since_unix.map(|t| format!(" since {}", describe_time(t as f64)));
            let how = if s.writes_wait_for_secondary {
                "writes wait for the secondary, but it does not hold everything yet (a copy, a resync or a catch-up runs)"
            } else {
                "writes are acknowledged without a consistent secondary"
            };
            let _ = writeln!(out, "  RPO 0 NOT IN FORCE{}: {how}", since.unwrap_or_default());
        }
        if let Some(t) = s.peer_contact_unix {
            let _ = writeln!(
                out,
                "  peer last heard {}{}",
                describe_time(t as f64),
                s.peer_state.as_ref().map(|p| format!(", last known state: {p}")).unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "  seq {} applied {} durable {}  lag {} records / {} / {:.3}s",
            s.last_seq,
            s.applied_seq,
            s.durable_seq,
            s.lag_records,
            human_bytes(s.lag_bytes),
            s.lag_seconds
        );
        let _ = writeln!(
            out,
            "  journal {} of {}  dirty {}  consistent {}  io {}{}",
            human_bytes(s.journal_used_bytes),
            human_bytes(s.journal_capacity_bytes),
            human_bytes(s.dirty_bytes),
            if s.consistent { "yes" } else { "no" },
            s.io_backend,
            if s.direct_io { " (O_DIRECT)" } else { " (buffered)" }
        );
        let ms = |secs: f64| format!("{:.2} ms", secs * 1e3);
        let _ = writeln!(
            out,
            "  link rtt {}  shipped {}  writes {}{}",
            s.link_rtt_seconds.map_or_else(|| "-".to_string(), ms),
            human_bytes(s.shipped_bytes),
            s.writes,
            match (s.write_latency_mean_seconds, s.write_latency_p99_at_most_seconds) {
                (Some(mean), Some(p99)) => format!(" (latency mean {}, p99 <= {})", ms(mean), ms(p99)),
                (Some(mean), None) => format!(" (latency mean {}, p99 > 5 s)", ms(mean)),
                _ => String::new(),
            }
        );
        if s.state == "COPY" && s.copy_total_bytes > 0 {
            let _ = writeln!(out, "  copy {} of {}", human_bytes(s.copy_done_bytes), human_bytes(s.copy_total_bytes));
        }
        if let Some(f) = &s.failover_image {
            let when = if f.written_at_us == 0 {
                String::new()
            } else {
                format!(", written on the primary at {}", format_time(f.written_at_us))
            };
            let _ = match f.source.as_str() {
                "replica" => writeln!(out, "  failover image: the replica, sequence {}{when}", f.seq),
                "resync-guard" => writeln!(
                    out,
                    "  failover image: the image preserved when the running resync started, sequence {}{when} (a \
                     failover rolls the resync back to it)",
                    f.seq
                ),
                // A secondary whose applies stopped mid-way (a local
                // failure): its restore journal still holds them.
                _ if s.reason.as_deref() == Some("error") => writeln!(
                    out,
                    "  failover image: none consistent until a restart of the daemon re-applies the restore journal \
                     (applies stopped mid-way; only `failover --force` promotes the volumes as they are)"
                ),
                _ => writeln!(
                    out,
                    "  failover image: none consistent (a copy into it is due or running; only `failover --force` promotes \
                     the volumes as they are)"
                ),
            };
        }
        for v in &s.volumes {
            let _ = writeln!(out, "  volume {}  {}  {}", v.name, v.path.display(), human_bytes(v.size));
        }
        if let Some(d) = &s.drill {
            out.push_str(&crate::drill_cli::render_status(d));
        }
        if let Some(e) = &s.last_error {
            let _ = writeln!(out, "  last error: {e}");
        }
    }
    out
}
