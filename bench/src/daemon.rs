//! Starting, driving and stopping `replicator run` daemons for a measurement:
//! configuration files, certificates, the control socket, RSS.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use replicator::control::{self, Request, Response};
use replicator::group::GroupStatus;

use crate::proxy::{LinkSpec, UdpProxy};

/// What every part of the benchmark shares.
#[derive(Debug)]
pub struct Env {
    /// Runtime for the control-socket client and the local floor.
    pub rt: tokio::runtime::Runtime,
    /// The `replicator` binary.
    pub exe: PathBuf,
    /// Root of this run's temporary files.
    pub root: PathBuf,
    /// CA and node certificates (site-a, site-b).
    pub certs: PathBuf,
    /// CPU use of other processes on the machine.
    pub monitor: crate::monitor::Monitor,
}

impl Env {
    /// Creates the root directory and the certificates, and takes a copy of
    /// the `replicator` binary: every daemon of the run is the same build,
    /// even if the source tree is rebuilt meanwhile.
    pub fn new(exe: PathBuf, root: PathBuf) -> Result<Env, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(root.join("bin")).map_err(|e| format!("{}: {e}", root.display()))?;
        let copy = root.join("bin/replicator");
        std::fs::copy(&exe, &copy).map_err(|e| format!("copying {}: {e}", exe.display()))?;
        let exe = copy;
        let certs = root.join("certs");
        replicator::certs::init_ca(&certs).map_err(|e| e.to_string())?;
        for n in ["site-a", "site-b"] {
            replicator::certs::issue(&certs, n, &certs, replicator::certs::Validity::days(2))
                .map_err(|e| e.to_string())?;
        }
        Ok(Env { rt, exe, root, certs, monitor: crate::monitor::Monitor::start() })
    }

    /// Sends one control request.
    pub fn call(&self, socket: &Path, req: Request) -> Result<Response, String> {
        let resp = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), control::call(socket, &req)).await })
            .map_err(|_| format!("control request {req:?} timed out"))?
            .map_err(|e| e.to_string())?;
        if resp.exit != control::exit::OK {
            return Err(format!("{req:?}: {}", resp.message));
        }
        Ok(resp)
    }
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> Result<u16, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.port())
}

/// A TCP port that was free a moment ago.
pub fn free_tcp_port() -> Result<u16, String> {
    let s = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.port())
}

/// One `[[group]]` of a generated configuration.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// Group name.
    pub name: String,
    /// `sync` or `async`.
    pub mode: &'static str,
    /// Journal size in bytes.
    pub journal: u64,
    /// `block` or `suspend`.
    pub on_journal_full: &'static str,
    /// (volume name, file name inside the site directory, size).
    pub volumes: Vec<(String, String, u64)>,
    /// `activity_log_extents`, when not the daemon's default.
    pub activity_log_extents: Option<u64>,
}

impl GroupSpec {
    /// A group with one volume `<name>-vol` in file `<name>.img`.
    pub fn single(name: &str, mode: &'static str, journal: u64, size: u64) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            mode,
            journal,
            on_journal_full: "block",
            volumes: vec![(format!("{name}-vol"), format!("{name}.img"), size)],
            activity_log_extents: None,
        }
    }
}

/// A `replicator run` process and its files.
#[derive(Debug)]
pub struct Daemon {
    /// Node name.
    pub name: String,
    /// Its directory (config, volumes, state, run).
    pub dir: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its QUIC (UDP) address.
    pub listen: SocketAddr,
    exe: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Writes the configuration of node `me` in `dir/me`.
    pub fn configure(
        env: &Env,
        dir: &Path,
        me: &str,
        peer: &str,
        listen: SocketAddr,
        peer_addr: SocketAddr,
        groups: &[GroupSpec],
    ) -> Result<Daemon, String> {
        let site = crate::placement::site_dir(dir, me);
        std::fs::create_dir_all(&site).map_err(|e| format!("{}: {e}", site.display()))?;
        let certs = env.certs.display();
        let mut t = format!(
            "[node]\nname = \"{me}\"\nlisten = \"{listen}\"\nstate_dir = \"{s}/state\"\nrun_dir = \"{s}/run\"\n\n\
             [tls]\nca = \"{certs}/ca.pem\"\ncert = \"{certs}/{me}.pem\"\nkey = \"{certs}/{me}.key\"\n\n\
             [[peer]]\nname = \"{peer}\"\naddress = \"{peer_addr}\"\n",
            s = site.display()
        );
        for g in groups {
            let _ = write!(
                t,
                "\n[[group]]\nname = \"{}\"\npeer = \"{peer}\"\nmode = \"{}\"\njournal_size = \"{}\"\non_journal_full = \"{}\"\nlink_timeout = \"5s\"\naccept_pair_create = true\n",
                g.name, g.mode, g.journal, g.on_journal_full
            );
            if let Some(n) = g.activity_log_extents {
                let _ = writeln!(t, "activity_log_extents = {n}");
            }
            for (v, file, size) in &g.volumes {
                let _ = write!(
                    t,
                    "\n[[group.volume]]\nname = \"{v}\"\npath = \"{}\"\nsize = \"{size}\"\ncreate = true\n",
                    site.join(file).display()
                );
            }
        }
        let config = site.join("replicator.toml");
        std::fs::write(&config, t).map_err(|e| format!("{}: {e}", config.display()))?;
        Ok(Daemon {
            name: me.into(),
            log: site.join("daemon.log"),
            dir: site,
            config,
            listen,
            exe: env.exe.clone(),
            child: None,
        })
    }

    /// Path of a file in the site directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("run/control.sock")
    }

    /// The NBD socket.
    pub fn nbd(&self) -> PathBuf {
        self.dir.join("run/nbd.sock")
    }

    /// Starts the daemon and waits (≤ 30 s) until its control socket answers.
    pub fn start(&mut self, env: &Env) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = crate::placement::command(&self.name, &self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info,quinn=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if env.call(&self.control(), Request::Status { group: None }).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "daemon {} exited with {st} at start; log {}: {}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("daemon {} did not come up in 30 s; log {}", self.name, self.log.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// SIGTERM, then wait ≤ 30 s (SIGKILL after that).
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else { return Ok(()) };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(format!("daemon {} exited with {st}; log {}", self.name, self.log.display()))
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(format!(
                        "daemon {} ignored SIGTERM for 30 s and was killed; log {}",
                        self.name,
                        self.log.display()
                    ));
                }
            }
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Status of one group.
    pub fn status(&self, env: &Env, group: &str) -> Result<GroupStatus, String> {
        env.call(&self.control(), Request::Status { group: Some(group.into()) })?
            .groups
            .into_iter()
            .next()
            .ok_or_else(|| format!("no status for group {group}"))
    }

    /// Polls until `pred` holds for the group (≤ `timeout`).
    pub fn wait_for(
        &self,
        env: &Env,
        group: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&GroupStatus) -> bool,
    ) -> Result<GroupStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(env, group)?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "group {group} on {}: not {what} after {timeout:?} (state {} connected {} lag {} records, last error {:?}); log {}",
                    self.name,
                    s.state,
                    s.connected,
                    s.lag_records,
                    s.last_error,
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Datagrams the kernel dropped on the UDP socket bound to 127.0.0.1:`port`
/// because its receive buffer was full (`drops` in /proc/net/udp).
pub fn udp_drops(port: u16) -> Option<u64> {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .ok()?
        .lines()
        .skip(1)
        .find(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

/// Last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// True when a group is replicating with nothing outstanding.
pub fn in_sync(s: &GroupStatus) -> bool {
    s.state == "PAIR" && s.connected && s.lag_records == 0
}

/// Two daemons (site-a primary, site-b secondary), the primary reaching the
/// secondary through a UDP proxy unless the link is direct.
#[derive(Debug)]
pub struct SitePair {
    /// Primary.
    pub a: Daemon,
    /// Secondary.
    pub b: Daemon,
    /// The WAN emulator between them.
    pub proxy: Option<UdpProxy>,
}

impl SitePair {
    /// Writes both configurations in `dir` (volumes are not created here).
    pub fn configure(env: &Env, dir: &Path, groups: &[GroupSpec], link: LinkSpec) -> Result<SitePair, String> {
        let pa: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse().map_err(|e| format!("{e}"))?;
        let pb: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse().map_err(|e| format!("{e}"))?;
        let proxy = if link.is_direct() {
            None
        } else {
            Some(UdpProxy::start(pb, link).map_err(|e| format!("UDP proxy: {e}"))?)
        };
        let via = proxy.as_ref().map_or(pb, UdpProxy::addr);
        let a = Daemon::configure(env, dir, "site-a", "site-b", pa, via, groups)?;
        let b = Daemon::configure(env, dir, "site-b", "site-a", pb, pa, groups)?;
        Ok(SitePair { a, b, proxy })
    }

    /// Starts both daemons.
    pub fn start(&mut self, env: &Env) -> Result<(), String> {
        self.b.start(env)?;
        self.a.start(env)
    }

    /// `pair create` on the primary and waits for PAIR with no lag.
    pub fn pair(&self, env: &Env, group: &str, nocopy: bool, timeout: Duration) -> Result<(), String> {
        self.request_pair(env, group, nocopy)?;
        self.wait_pair(env, group, timeout)
    }

    /// `pair create` on the primary.
    pub fn request_pair(&self, env: &Env, group: &str, nocopy: bool) -> Result<(), String> {
        env.call(&self.a.control(), Request::PairCreate { group: group.into(), nocopy }).map(|_| ())
    }

    /// Waits for PAIR with no lag.
    pub fn wait_pair(&self, env: &Env, group: &str, timeout: Duration) -> Result<(), String> {
        self.a.wait_for(env, group, timeout, "in PAIR", in_sync).map(|_| ())
    }

    /// Receive-buffer drops on the daemons' and the proxy's UDP sockets, as a
    /// sentence, or None when there were none.
    pub fn udp_drops(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (who, port) in [("primary", self.a.listen.port()), ("secondary", self.b.listen.port())] {
            if let Some(d) = udp_drops(port).filter(|d| *d > 0) {
                parts.push(format!("{who}'s QUIC socket {d}"));
            }
        }
        if let Some(p) = &self.proxy {
            let d: u64 = p.ports().iter().filter_map(|&port| udp_drops(port)).sum();
            let q = p.counters.dropped.load(std::sync::atomic::Ordering::Relaxed);
            if d > 0 {
                parts.push(format!("the emulator's sockets {d}"));
            }
            if q > 0 {
                parts.push(format!("the emulated link (queue full or loss) {q}"));
            }
        }
        (!parts.is_empty()).then(|| format!("datagrams dropped: {}", parts.join(", ")))
    }

    /// Stops both (primary first).
    pub fn stop(&mut self) -> Result<(), String> {
        let ra = self.a.stop();
        let rb = self.b.stop();
        ra.and(rb)
    }
}
