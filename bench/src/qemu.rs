//! The peers we compare with: a plain `qemu-nbd` export, and QEMU's
//! synchronous mirror (`qemu-storage-daemon` exporting the source over NBD,
//! `blockdev-mirror` with `copy-mode: write-blocking` to a `qemu-nbd` target
//! reached over TCP through the same WAN emulation as the replicator pair).
//! Both use `cache=none` (O_DIRECT) and `aio=io_uring`, like the daemon.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::{LinkSpec, TcpProxy};

/// Finds an executable in PATH.
pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| p.is_file())
}

/// Why a peer is skipped, or None when its binary is there.
pub fn missing(bin: &str) -> Option<String> {
    match which(bin) {
        Some(_) => None,
        None => Some(format!(
            "{bin} not found: install it to compare (Debian/Ubuntu: `apt-get install qemu-utils`; on older releases \
             qemu-storage-daemon is in `qemu-system-common`)"
        )),
    }
}

/// A child process killed on drop.
#[derive(Debug)]
struct Proc {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str, log: &Path) -> Result<Proc, String> {
        let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child =
            cmd.stdin(Stdio::null()).stdout(f).stderr(f2).spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
        Ok(Proc { child, what: what.into(), log: log.into() })
    }

    /// Waits until `ready()` holds (≤ 20 s), failing early if the process exits.
    fn wait(&mut self, mut ready: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if ready() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("{} exited with {st}: {}", self.what, crate::daemon::tail(&self.log)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} did not come up in 20 s: {}", self.what, crate::daemon::tail(&self.log)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `qemu-nbd` export of a raw file (cache=none, aio=io_uring).
#[derive(Debug)]
pub struct QemuNbd {
    proc: Proc,
    /// TCP address, when exported on one.
    pub tcp: Option<SocketAddr>,
}

fn qemu_nbd_cmd(site: &str, file: &Path, export: &str) -> Command {
    let mut c = crate::placement::command(site, "qemu-nbd");
    c.args(["-f", "raw", "--cache=none", "--aio=io_uring", "--persistent", "--shared=4", "-x", export]);
    c.arg(file);
    c
}

impl QemuNbd {
    /// The process id of qemu-nbd.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Exports `file` as `export` on Unix socket `socket`.
    pub fn unix(file: &Path, socket: &Path, export: &str, log: &Path) -> Result<QemuNbd, String> {
        let mut cmd = qemu_nbd_cmd("site-a", file, export);
        cmd.arg("-k").arg(socket);
        let mut p = Proc::spawn(&mut cmd, "qemu-nbd", log)?;
        p.wait(|| UnixStream::connect(socket).is_ok())?;
        Ok(QemuNbd { proc: p, tcp: None })
    }

    /// Exports `file` as `export` on 127.0.0.1:`port`, as site B (the
    /// target of QEMU's mirror).
    pub fn tcp(file: &Path, port: u16, export: &str, log: &Path) -> Result<QemuNbd, String> {
        let mut cmd = qemu_nbd_cmd("site-b", file, export);
        cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
        let mut p = Proc::spawn(&mut cmd, "qemu-nbd", log)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        p.wait(|| std::net::TcpStream::connect(addr).is_ok())?;
        Ok(QemuNbd { proc: p, tcp: Some(addr) })
    }
}

/// `nbdkit null`: an NBD server that stores nothing. What a client gets from
/// it is the ceiling of NBD over a Unix socket on this machine (the socket
/// copies, the context switches, the client itself).
#[derive(Debug)]
pub struct NbdkitNull {
    _proc: Proc,
}

impl NbdkitNull {
    /// Serves a null device of `size` bytes on `socket`.
    pub fn unix(socket: &Path, size: u64, log: &Path) -> Result<NbdkitNull, String> {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--foreground", "--unix"]).arg(socket).arg("null").arg(format!("size={size}"));
        let mut p = Proc::spawn(&mut cmd, "nbdkit", log)?;
        p.wait(|| UnixStream::connect(socket).is_ok())?;
        Ok(NbdkitNull { _proc: p })
    }
}

/// A minimal QMP client.
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("QMP {}: {e}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let mut q = Qmp { r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?), w: s };
        q.line()?; // greeting
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        let mut l = String::new();
        self.r.read_line(&mut l).map_err(|e| format!("QMP: {e}"))?;
        if l.is_empty() {
            return Err("QMP: connection closed".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e}: {l}"))
    }

    /// Runs a command; events seen meanwhile are returned too.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
        let msg = serde_json::json!({ "execute": cmd, "arguments": args });
        writeln!(self.w, "{msg}").map_err(|e| format!("QMP: {e}"))?;
        let mut events = Vec::new();
        loop {
            let v = self.line()?;
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
            if v.get("return").is_some() {
                return Ok(events);
            }
            events.push(v);
        }
    }

    /// Waits for an event named `name` (≤ `timeout`), given events already seen.
    pub fn wait_event(&mut self, name: &str, seen: &[serde_json::Value], timeout: Duration) -> Result<(), String> {
        if seen.iter().any(|e| e.get("event").and_then(|n| n.as_str()) == Some(name)) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let v = self.line()?;
            if v.get("event").and_then(|n| n.as_str()) == Some(name) {
                return Ok(());
            }
        }
        Err(format!("QMP: no {name} event within {timeout:?}"))
    }
}

/// QEMU's synchronous mirror: NBD clients write to `socket` (export `vol`),
/// every write goes to the source file and, before it completes, to the
/// target `qemu-nbd` over TCP (through the delay proxy).
#[derive(Debug)]
pub struct QemuMirror {
    /// Unix socket of the source's NBD export.
    pub socket: PathBuf,
    /// Seconds the initial mirror (sync=full) took to reach READY.
    pub ready_secs: f64,
    // Field order is drop order: the storage daemon first, then the proxy,
    // then the target.
    qsd: Proc,
    _qmp: Qmp,
    _proxy: Option<TcpProxy>,
    target: QemuNbd,
}

impl QemuMirror {
    /// The process ids of the source (qemu-storage-daemon, exporting the
    /// volume and running the mirror) and of the target's qemu-nbd.
    pub fn pids(&self) -> (u32, u32) {
        (self.qsd.child.id(), self.target.pid())
    }

    /// Starts the target, the proxy, the storage daemon, and the mirror job;
    /// returns once the job is READY (actively synced).
    pub fn start(dir: &Path, src: &Path, tgt: &Path, link: LinkSpec) -> Result<QemuMirror, String> {
        let port = crate::daemon::free_tcp_port()?;
        let target = QemuNbd::tcp(tgt, port, "tgt", &dir.join("qemu-nbd-target.log"))?;
        let target_addr = target.tcp.ok_or("no target address")?;
        let proxy = if link.is_direct() {
            None
        } else {
            Some(TcpProxy::start(target_addr, link).map_err(|e| format!("TCP proxy: {e}"))?)
        };
        let via = proxy.as_ref().map_or(target_addr, TcpProxy::addr);
        let qmp_path = dir.join("qmp.sock");
        let socket = dir.join("nbd.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!("socket,id=qmp,path={},server=on,wait=off", qmp_path.display()))
            .args(["--monitor", "chardev=qmp"])
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=src-file,filename={},cache.direct=on,aio=io_uring", src.display()))
            .args(["--blockdev", "driver=raw,node-name=src,file=src-file"])
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=tgt,server.type=inet,server.host={},server.port={},export=tgt",
                via.ip(),
                via.port()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args(["--export", "type=nbd,id=exp,node-name=src,name=vol,writable=on"]);
        let mut qsd = Proc::spawn(&mut cmd, "qemu-storage-daemon", &dir.join("qemu-storage-daemon.log"))?;
        qsd.wait(|| UnixStream::connect(&qmp_path).is_ok() && UnixStream::connect(&socket).is_ok())?;
        let mut qmp = Qmp::connect(&qmp_path)?;
        let t = Instant::now();
        let seen = qmp.execute(
            "blockdev-mirror",
            serde_json::json!({"job-id": "mirror", "device": "src", "target": "tgt", "sync": "full", "copy-mode": "write-blocking"}),
        )?;
        qmp.wait_event("BLOCK_JOB_READY", &seen, Duration::from_secs(120))?;
        let ready_secs = t.elapsed().as_secs_f64();
        Ok(QemuMirror { socket, ready_secs, qsd, _qmp: qmp, _proxy: proxy, target })
    }
}
