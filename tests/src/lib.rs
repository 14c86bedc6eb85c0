//! End-to-end test harness for replicator: real daemons, real NBD clients,
//! real faults.
//!
//! A [`Cluster`] is two `replicator run` processes (site-a and site-b) on
//! loopback, with a private CA, certificates, configurations and sparse
//! volume files in a temporary directory — the same set-up as
//! `replicator demo`, generalised. Everything goes through the real binary:
//! the control socket (the JSON protocol the CLI speaks), the NBD Unix
//! socket, signals and the backing files.
//!
//! Conventions:
//! - site-a is the future primary (`pair create` runs there), site-b the
//!   secondary;
//! - every wait has a timeout and panics with the last status and the tails
//!   of both daemon logs;
//! - on a panic the temporary directory is kept and its path printed (set
//!   `REPLICATOR_TEST_KEEP=1` to keep it always);
//! - [`Drop`] kills leftover daemons;
//! - clusters in one test binary run one at a time (the CI box has two
//!   cores; link timeouts are real time);
//! - with [`ClusterOpts::with_power_cut_fs`] each site's state_dir and
//!   volume files live on `powercut-fs` (src/bin/powercut-fs.rs, a FUSE file
//!   system whose write cache is volatile), so that [`Cluster::power_cut`]
//!   loses exactly what the daemon had not made durable; the mounts are
//!   undone on drop.
//!
//! Build the daemon first: `cargo build --release -p replicator --bins`
//! (`tests/run-all.sh` does that and installs the external tools).

pub mod exposition;
pub mod pattern;
pub mod powercut;

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use replicator::control::{exit, Request, Response};
pub use replicator::group::GroupStatus;

/// How long a daemon may take to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean stop (SIGTERM) may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// One of the two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// site-a: the primary once `pair create` ran there.
    A,
    /// site-b: the secondary.
    B,
}

impl Site {
    /// Directory label ("site-a" / "site-b"); also the default node name.
    pub fn label(self) -> &'static str {
        match self {
            Site::A => "site-a",
            Site::B => "site-b",
        }
    }

    /// The other site.
    pub fn other(self) -> Site {
        match self {
            Site::A => Site::B,
            Site::B => Site::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Site::A => 0,
            Site::B => 1,
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Replication mode of a group (the daemon's own type).
pub use replicator::config::Mode;

/// A volume of a group.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// NBD export name (same on both sites).
    pub name: String,
    /// Size in bytes (a sparse file is created).
    pub size: u64,
}

/// A consistency group in both sites' configurations.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// Group name.
    pub name: String,
    /// sync or async.
    pub mode: Mode,
    /// Volumes, in order.
    pub volumes: Vec<VolumeSpec>,
    /// Journal size in bytes.
    pub journal_size: u64,
    /// link_timeout.
    pub link_timeout: Duration,
    /// Extra TOML lines for the `[[group]]` table (e.g. `on_link_loss`).
    pub extra: String,
    /// `accept_pair_create` on site-b (on by default, so `pair create` on
    /// site-a can make it secondary).
    pub consent: bool,
}

impl GroupSpec {
    /// A group without volumes yet (add them with [`GroupSpec::volume`]).
    pub fn new(name: &str, mode: Mode) -> Self {
        Self {
            name: name.to_string(),
            mode,
            volumes: Vec::new(),
            journal_size: 64 << 20,
            link_timeout: Duration::from_secs(5),
            extra: String::new(),
            consent: true,
        }
    }

    /// Adds a volume.
    pub fn volume(mut self, name: &str, size: u64) -> Self {
        self.volumes.push(VolumeSpec { name: name.to_string(), size });
        self
    }

    /// Sets the journal size.
    pub fn journal_size(mut self, bytes: u64) -> Self {
        self.journal_size = bytes;
        self
    }

    /// Sets link_timeout.
    pub fn link_timeout(mut self, d: Duration) -> Self {
        self.link_timeout = d;
        self
    }

    /// Site-b does not consent to become secondary (`accept_pair_create`
    /// left at its default, false).
    pub fn without_consent(mut self) -> Self {
        self.consent = false;
        self
    }

    /// Adds raw TOML lines to the group table.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
}

/// Which certificate site-b presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// Issued by the cluster's CA for site-b's node name, valid now.
    Valid,
    /// Issued by another CA (site-b still trusts the cluster's CA).
    ForeignCa,
    /// Issued by the cluster's CA but expired yesterday.
    Expired,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Groups, configured identically on both sites.
    pub groups: Vec<GroupSpec>,
    /// Node name site-b runs with (site-a always expects its peer to be
    /// called "site-b" at site-b's address).
    pub site_b_node_name: String,
    /// Certificate site-b presents.
    pub site_b_cert: CertKind,
    /// Start both daemons in [`Cluster::new`].
    pub start: bool,
    /// Put each site's state_dir and volume files on `powercut-fs` (a FUSE
    /// file system with a volatile write cache), so that
    /// [`Cluster::power_cut`] can drop everything not yet made durable. See
    /// [`ClusterOpts::with_power_cut_fs`].
    pub power_cut_fs: bool,
    /// Each site serves Prometheus metrics on a free loopback TCP port
    /// (`node.metrics_listen`, see [`Cluster::metrics_addr`]).
    pub metrics: bool,
}

impl ClusterOpts {
    /// Both sites valid and started, with these groups.
    pub fn new(groups: Vec<GroupSpec>) -> Self {
        Self {
            groups,
            site_b_node_name: "site-b".into(),
            site_b_cert: CertKind::Valid,
            start: true,
            power_cut_fs: false,
            metrics: false,
        }
    }

    /// Both sites serve `/metrics` and `/healthz` ([`Cluster::scrape`]).
    pub fn with_metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Each site's state_dir and volume files live on its own `powercut-fs`
    /// mount (`site-X/durable`, backed by `site-X/backing`); the run_dir
    /// (sockets) and logs stay off it. Needs root and /dev/fuse.
    pub fn with_power_cut_fs(mut self) -> Self {
        self.power_cut_fs = true;
        self
    }

    /// One group.
    pub fn group(g: GroupSpec) -> Self {
        Self::new(vec![g])
    }
}

/// A running `powercut-fs`: `DIR/backing` mounted on `DIR/durable`, control
/// socket `DIR/powercut-fs.sock`. Unmounted (and the process reaped) on
/// drop, also on a panic.
#[derive(Debug)]
pub struct PowerCutMount {
    child: Option<Child>,
    mountpoint: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

/// What a simulated power cut dropped (and kept) of a site's dirty pages,
/// and how many namespace changes not yet durable it undid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Dirty 4 KiB pages lost.
    pub dropped: u64,
    /// Dirty pages the "disk" kept (written before the cut).
    pub kept: u64,
    /// Names undone (created, removed or renamed without an fsync of the
    /// directory; see src/bin/powercut-fs.rs).
    pub undone: u64,
}

/// Path of the `powercut-fs` binary: next to `replicator` (cargo builds it
/// with the tests crate's integration tests). `POWERCUT_FS_BIN` overrides.
/// Writes a replication backlog through NBD on `socket`'s `export` (a
/// volume of `volume` bytes, at least 64 MiB): 48 writes of 1 MiB over the
/// first 48 MiB, each followed by sixteen 4 KiB stamped writes into the last
/// 16 MiB (page-aligned records read back with O_DIRECT, and small ones
/// through the page cache). Returns the image the volume must then hold.
pub fn write_backlog(socket: &Path, export: &str, volume: u64, seed: u64) -> Vec<u8> {
    use pattern::{stamp, Rng, BLOCK};
    const MIB: u64 = 1 << 20;
    assert!(volume >= 64 * MIB, "a backlog needs a volume of 64 MiB or more");
    let mut expect = vec![0u8; volume as usize];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = replicator::nbd_client::NbdClient::connect_unix(socket, export).await.expect("connect");
        let mut rng = Rng::new(seed);
        for i in 0..48u64 {
            let mut big = vec![0u8; MIB as usize];
            rng.fill(&mut big);
            let at = i * MIB;
            client.write(at, &big, false).await.expect("1 MiB write");
            expect[at as usize..(at + MIB) as usize].copy_from_slice(&big);
            for _ in 0..16 {
                let block = 48 * MIB / BLOCK as u64 + rng.below(16 * MIB / BLOCK as u64);
                let data = stamp(block, i + 1);
                let at = block * BLOCK as u64;
                client.write(at, &data, false).await.expect("4 KiB write");
                expect[at as usize..at as usize + BLOCK].copy_from_slice(&data);
            }
        }
        let _ = client.disconnect().await;
    });
    expect
}

pub fn powercut_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("POWERCUT_FS_BIN") {
        return PathBuf::from(p);
    }
    let bin = replicator_bin().with_file_name("powercut-fs");
    if !bin.is_file() {
        panic!(
            "the powercut-fs binary is missing at {}: run `cargo build --release -p replicator-tests --bins`",
            bin.display()
        );
    }
    bin
}

/// Is `path` a mount point (per /proc/self/mountinfo)?
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*want))
}

/// One line exchange with a powercut-fs control socket.
fn fs_command(control: &Path, cmd: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(control).map_err(|e| format!("{}: {e}", control.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    stream.write_all(format!("{cmd}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim().to_string();
    if line.starts_with("ok") {
        Ok(line)
    } else {
        Err(format!("powercut-fs {cmd:?}: {line}"))
    }
}

/// The number after `word` in a reply line ("ok dropped 3 pages kept 1").
pub fn reply_number(line: &str, word: &str) -> u64 {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == word {
            return it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    0
}

impl PowerCutMount {
    /// Mounts `dir/backing` (created if missing) on `dir/durable`, logging to
    /// `log`, and waits until the mount and the control socket answer.
    pub fn start(dir: &Path, log: PathBuf) -> PowerCutMount {
        Self::start_with(&powercut_fs_bin(), dir, log)
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// One control command ("stats", "files", "cut", "cut keep SEED
    /// FRACTION"); the reply line, or the error.
    pub fn command(&self, cmd: &str) -> Result<String, String> {
        fs_command(&self.control, cmd)
    }

    fn start_with(bin: &Path, site_dir: &Path, log: PathBuf) -> PowerCutMount {
        let backing = site_dir.join("backing");
        let mountpoint = site_dir.join("durable");
        let control = site_dir.join("powercut-fs.sock");
        std::fs::create_dir_all(&backing).expect("backing dir");
        std::fs::create_dir_all(&mountpoint).expect("mountpoint");
        let out = std::fs::File::create(&log).expect("powercut-fs log");
        let err = out.try_clone().expect("clone log fd");
        let child = Command::new(bin)
            .arg(&backing)
            .arg(&mountpoint)
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut m = PowerCutMount { child: Some(child), mountpoint, control, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if is_mounted(&m.mountpoint) && fs_command(&m.control, "stats").is_ok() {
                return m;
            }
            if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "powercut-fs exited at start-up with {status}:\n{}",
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "powercut-fs did not mount {} within 20 s:\n{}",
                    m.mountpoint.display(),
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts (SIGTERM: the file system unmounts itself) and reaps the
    /// process; falls back to SIGKILL and a lazy unmount.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PowerCutMount {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
struct SiteProc {
    site: Site,
    node_name: String,
    dir: PathBuf,
    /// Where state_dir and the volume files live: `dir`, or `dir/durable`
    /// (the powercut-fs mount).
    data_dir: PathBuf,
    fs: Option<PowerCutMount>,
    config_path: PathBuf,
    run_dir: PathBuf,
    port: u16,
    /// `node.metrics_listen` port on 127.0.0.1 (used with
    /// [`ClusterOpts::metrics`]).
    metrics_port: u16,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// Two real daemons on loopback. See the crate documentation.
#[derive(Debug)]
pub struct Cluster {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    sites: [SiteProc; 2],
    opts: ClusterOpts,
    bin: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

static SERIAL: Mutex<()> = Mutex::new(());

/// The `replicator` binary: `target/<profile>/replicator`, next to the
/// directory of the running test executable (`target/<profile>/deps/`).
/// `REPLICATOR_BIN` overrides.
pub fn replicator_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REPLICATOR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir =
        exe.parent().and_then(|deps| deps.parent()).expect("the test executable lives in target/<profile>/deps/");
    let bin = profile_dir.join("replicator");
    if !bin.is_file() {
        panic!(
            "the replicator binary is missing at {}: run `cargo build --release -p replicator --bins` first \
             (or tests/run-all.sh, which builds it and installs the tools the tests need)",
            bin.display()
        );
    }
    bin
}

/// Is this process root? (losetup, mount and FUSE tests need it.)
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For root-only tests (losetup, mount, FUSE: every power-loss test): true
/// when the test may go on. Without root the test fails, so that a run
/// without root cannot pass by skipping them, unless
/// `REPLICATOR_ALLOW_SKIP=1` asks to skip (a developer's quick run).
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let uid = nix::unistd::geteuid();
    if std::env::var("REPLICATOR_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("NOTE: {test} needs root (losetup, mount, FUSE): skipped as uid {uid} (REPLICATOR_ALLOW_SKIP=1)");
        return false;
    }
    panic!("{test} needs root (losetup, mount, FUSE) and runs as uid {uid}: run the tests as root (tests/run-all.sh), or set REPLICATOR_ALLOW_SKIP=1 to skip it");
}

/// Finds an external tool on PATH (plus /usr/sbin and /sbin); fails the test
/// with instructions when it is missing — CI installs everything, so a
/// missing tool is an error, never a silent skip.
pub fn require(cmd: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    for d in dirs {
        let p = d.join(cmd);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{cmd}` is not installed: run tests/run-all.sh (it installs qemu-utils, fio, libnbd-bin, \
         fuse3, e2fsprogs and builds the daemon), or install it by hand"
    );
}

/// Runs a command with a time limit, capturing its output. Panics if it
/// cannot be started or overruns (after killing it).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_abort(cmd, timeout, || None)
}

/// [`run_with_timeout`], also polling `abort` while the command runs: when it
/// returns a reason, the command is killed and the test panics with it (so a
/// broken replication session fails a test at once instead of at a timeout).
pub fn run_with_abort(cmd: &mut Command, timeout: Duration, abort: impl Fn() -> Option<String>) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_t.join().unwrap_or_default();
                let stderr = err_t.join().unwrap_or_default();
                panic!(
                    "{desc} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Ok(None) => {
                if let Some(why) = abort() {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("aborted {desc}: {why}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() }
}

/// Like [`run_with_timeout`], and panics unless the command exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let out = run_with_timeout(cmd, timeout);
    if !out.status.success() {
        panic!("{desc} failed: {}\n{}", out.status, describe_output(&out));
    }
    out
}

/// Sets or clears the immutable flag of a directory (`chattr +i`): nothing
/// can be created, renamed or removed in it, so a save of a state file
/// there fails until the flag is cleared. Cleared again when dropped.
#[derive(Debug)]
pub struct Immutable(PathBuf);

impl Immutable {
    /// Makes `dir` immutable (root, on ext4 or tmpfs).
    pub fn set(dir: PathBuf) -> Immutable {
        let out = Command::new(require("chattr")).arg("+i").arg(&dir).output().expect("run chattr");
        assert!(out.status.success(), "chattr +i {} (root, ext4 or tmpfs): {}", dir.display(), describe_output(&out));
        Immutable(dir)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new(require("chattr")).arg("-i").arg(&self.0).output();
    }
}

/// stdout and stderr of a finished command, for messages.
pub fn describe_output(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Finds a free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral TCP port");
    s.local_addr().expect("local_addr").port()
}

/// Finds a free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    s.local_addr().expect("local_addr").port()
}

/// First difference between two files, compared byte by byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDiff {
    /// Same length and bytes.
    Identical,
    /// Lengths differ.
    Length(u64, u64),
    /// First differing byte offset, and how many 4 KiB blocks differ in all.
    Bytes {
        /// First differing offset.
        first: u64,
        /// Number of differing 4 KiB blocks.
        blocks: u64,
    },
}

/// Compares two files byte by byte.
pub fn compare_files(a: &Path, b: &Path) -> FileDiff {
    let mut fa = std::fs::File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mut fb = std::fs::File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let la = fa.metadata().expect("metadata").len();
    let lb = fb.metadata().expect("metadata").len();
    if la != lb {
        return FileDiff::Length(la, lb);
    }
    const CHUNK: usize = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    let mut first = None;
    let mut blocks = 0u64;
    while off < la {
        let n = CHUNK.min((la - off) as usize);
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            for (i, (ca, cb)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                if ca != cb {
                    blocks += 1;
                    if first.is_none() {
                        let at = ca.iter().zip(cb).position(|(x, y)| x != y).unwrap_or(0);
                        first = Some(off + (i * 4096 + at) as u64);
                    }
                }
            }
        }
        off += n as u64;
    }
    match first {
        Some(first) => FileDiff::Bytes { first, blocks },
        None => FileDiff::Identical,
    }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// Creates certificates, configurations and (with `opts.start`) starts
    /// both daemons and waits for their control sockets.
    pub fn new(opts: ClusterOpts) -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bin = replicator_bin();
        let tmp = tempfile::Builder::new().prefix("replicator-e2e-").tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let certs = root.join("certs");
        let ca = root.join("ca");
        replicator::certs::init_ca(&ca).expect("cert init");
        replicator::certs::issue(&ca, "site-a", &certs, replicator::certs::Validity::days(2)).expect("issue site-a");
        let b_name = opts.site_b_node_name.clone();
        match opts.site_b_cert {
            CertKind::Valid => {
                replicator::certs::issue(&ca, &b_name, &certs, replicator::certs::Validity::days(2))
                    .expect("issue site-b");
            }
            CertKind::ForeignCa => {
                let other = root.join("foreign-ca");
                replicator::certs::init_ca(&other).expect("cert init (foreign CA)");
                replicator::certs::issue(&other, &b_name, &certs, replicator::certs::Validity::days(2))
                    .expect("issue site-b from the foreign CA");
            }
            CertKind::Expired => {
                let now = time::OffsetDateTime::now_utc();
                let validity = replicator::certs::Validity {
                    not_before: now - time::Duration::days(30),
                    not_after: now - time::Duration::days(1),
                };
                replicator::certs::issue(&ca, &b_name, &certs, validity).expect("issue an expired site-b certificate");
            }
        }
        let (pa, pb) = (free_udp_port(), free_udp_port());
        let mk = |site: Site, node: &str, port: u16| {
            let dir = root.join(site.label());
            std::fs::create_dir_all(&dir).expect("site dir");
            SiteProc {
                site,
                node_name: node.to_string(),
                config_path: dir.join("replicator.toml"),
                run_dir: dir.join("run"),
                log: root.join(format!("{}.log", site.label())),
                data_dir: dir.clone(),
                fs: None,
                dir,
                port,
                metrics_port: free_tcp_port(),
                child: None,
                starts: 0,
            }
        };
        let sites = [mk(Site::A, "site-a", pa), mk(Site::B, &b_name, pb)];
        let mut cluster = Cluster { tmp: Some(tmp), root, sites, opts, bin, _serial: serial };
        if cluster.opts.power_cut_fs {
            let fs_bin = powercut_fs_bin();
            for s in &mut cluster.sites {
                let log = cluster.root.join(format!("{}-powercut-fs.log", s.site.label()));
                let m = PowerCutMount::start_with(&fs_bin, &s.dir, log);
                s.data_dir = m.mountpoint.clone();
                s.fs = Some(m);
            }
        }
        cluster.write_config(Site::A, "site-b", pb);
        cluster.write_config(Site::B, "site-a", pa);
        eprintln!("replicator e2e: cluster in {} (logs site-a.log, site-b.log)", cluster.root.display());
        if cluster.opts.start {
            cluster.start(Site::A);
            cluster.start(Site::B);
        }
        cluster
    }

    /// The UDP port `site` listens on for its peer.
    pub fn peer_port(&self, site: Site) -> u16 {
        self.sites[site.index()].port
    }

    /// Points `site` at its peer through `port` on 127.0.0.1 (an emulated
    /// link in between) instead of the peer's own port. Takes effect at the
    /// site's next start: call it before.
    pub fn route_peer_via(&self, site: Site, port: u16) {
        let peer = match site {
            Site::A => "site-b",
            Site::B => "site-a",
        };
        self.write_config(site, peer, port);
    }

    fn write_config(&self, site: Site, peer: &str, peer_port: u16) {
        use std::fmt::Write as _;
        let s = &self.sites[site.index()];
        let certs = self.root.join("certs");
        let mut text = format!(
            r#"# replicator e2e test: {label}
[node]
name = "{node}"
listen = "127.0.0.1:{port}"
state_dir = "{data}/state"
run_dir = "{run}"
{metrics}
[tls]
ca = "{ca}"
cert = "{certs}/{node}.pem"
key = "{certs}/{node}.key"

[[peer]]
name = "{peer}"
address = "127.0.0.1:{peer_port}"
"#,
            label = site.label(),
            node = s.node_name,
            port = s.port,
            data = s.data_dir.display(),
            run = s.run_dir.display(),
            metrics = if self.opts.metrics {
                format!("metrics_listen = \"127.0.0.1:{}\"\n", s.metrics_port)
            } else {
                String::new()
            },
            ca = self.root.join("ca").join("ca.pem").display(),
            certs = certs.display(),
        );
        for g in &self.opts.groups {
            let _ = write!(
                text,
                "\n[[group]]\nname = \"{}\"\npeer = \"{peer}\"\nmode = \"{}\"\njournal_size = \"{}\"\nlink_timeout = \"{}ms\"\naccept_pair_create = {}\n{}",
                g.name,
                g.mode.as_str(),
                g.journal_size,
                g.link_timeout.as_millis(),
                g.consent || site == Site::A,
                g.extra
            );
            for v in &g.volumes {
                let _ = write!(
                    text,
                    "\n[[group.volume]]\nname = \"{}\"\npath = \"{}\"\nsize = \"{}\"\ncreate = true\n",
                    v.name,
                    s.data_dir.join(format!("{}.img", v.name)).display(),
                    v.size
                );
            }
        }
        std::fs::write(&s.config_path, text).expect("write config");
    }

    /// Where `site` serves metrics (with [`ClusterOpts::with_metrics`]).
    pub fn metrics_addr(&self, site: Site) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.sites[site.index()].metrics_port))
    }

    /// `GET path` on `site`'s metrics endpoint: (status code, Content-Type,
    /// body).
    pub fn scrape(&self, site: Site, path: &str) -> Result<(u16, String, String), String> {
        let addr = self.metrics_addr(site);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut resp = String::new();
        stream.read_to_string(&mut resp).map_err(|e| format!("read from {addr}: {e}"))?;
        let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {resp:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let content_type = head.lines().find_map(|l| l.strip_prefix("Content-Type: ")).unwrap_or_default().to_string();
        Ok((code, content_type, body.to_string()))
    }

    /// The temporary directory holding everything.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The CA directory (`ca.pem`, `ca.key`), for issuing more certificates.
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// The directory holding the nodes' certificates and keys
    /// (`<node>.pem`, `<node>.key`), which the configurations name.
    pub fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }

    /// Adds `keys` (TOML lines) to a site's `[node]` section. Applies at
    /// the next start (or, for what it reloads, at SIGHUP).
    pub fn add_node_keys(&self, site: Site, keys: &str) {
        let path = self.config_path(site);
        let text = std::fs::read_to_string(path).expect("read config");
        let text = text.replacen("\n[tls]\n", &format!("\n{}\n\n[tls]\n", keys.trim_end()), 1);
        std::fs::write(path, text).expect("write config");
    }

    /// The options the cluster was built with.
    pub fn opts(&self) -> &ClusterOpts {
        &self.opts
    }

    /// The `replicator` binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// A site's configuration file.
    pub fn config_path(&self, site: Site) -> &Path {
        &self.sites[site.index()].config_path
    }

    /// A site's node name.
    pub fn node_name(&self, site: Site) -> &str {
        &self.sites[site.index()].node_name
    }

    /// A site's QUIC (UDP) address.
    pub fn quic_addr(&self, site: Site) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.sites[site.index()].port))
    }

    /// A site's control socket.
    pub fn control_socket(&self, site: Site) -> PathBuf {
        self.sites[site.index()].run_dir.join("control.sock")
    }

    /// A site's NBD Unix socket.
    pub fn nbd_socket(&self, site: Site) -> PathBuf {
        self.sites[site.index()].run_dir.join("nbd.sock")
    }

    /// `nbd+unix:///EXPORT?socket=PATH` for an export of a site.
    pub fn nbd_uri(&self, site: Site, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_socket(site).display())
    }

    /// Backing file of a volume on a site (with powercut-fs: its path on
    /// the mount, so reads see what the machine sees, cached pages included).
    pub fn volume_path(&self, site: Site, volume: &str) -> PathBuf {
        self.sites[site.index()].data_dir.join(format!("{volume}.img"))
    }

    /// A site's state_dir.
    pub fn state_dir(&self, site: Site) -> PathBuf {
        self.sites[site.index()].data_dir.join("state")
    }

    fn power_cut_mount(&self, site: Site) -> &PowerCutMount {
        self.sites[site.index()]
            .fs
            .as_ref()
            .unwrap_or_else(|| panic!("{site}: no powercut-fs (build the cluster with ClusterOpts::with_power_cut_fs)"))
    }

    /// One command on a site's powercut-fs control socket ("stats", "cut",
    /// "cut keep SEED FRACTION"); returns the reply line.
    pub fn fs_command(&self, site: Site, cmd: &str) -> String {
        fs_command(&self.power_cut_mount(site).control, cmd)
            .unwrap_or_else(|e| panic!("{site}: {e}\n{}", self.diagnostics()))
    }

    /// Dirty (not yet durable) 4 KiB pages on a site's powercut-fs.
    pub fn dirty_pages(&self, site: Site) -> u64 {
        reply_number(&self.fs_command(site, "stats"), "dirty")
    }

    /// Drops (or, with `keep = Some((seed, fraction))`, keeps a
    /// pseudo-random part of) a site's non-durable pages. Issued twice, 200
    /// ms apart: requests of a just-killed daemon still in flight in the
    /// kernel (io_uring) must not land after the cut.
    fn cut_fs(&self, site: Site, cmd: &str) -> CutReport {
        let mut report = CutReport::default();
        for i in 0..2 {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            let line = self.fs_command(site, cmd);
            report.dropped += reply_number(&line, "dropped");
            report.kept += reply_number(&line, "kept");
            report.undone += reply_number(&line, "undone");
        }
        self.reboot(site);
        let mut log = std::fs::OpenOptions::new().append(true).open(self.log_path(site)).expect("open log");
        let _ = writeln!(
            log,
            "===== e2e harness: {site} POWER CUT: {} dirty page(s) dropped, {} kept, {} name(s) undone (see {}-powercut-fs.log) =====",
            report.dropped,
            report.kept,
            report.undone,
            site.label()
        );
        report
    }

    /// A power cut reboots the machine: the kernel boot id the daemon
    /// recorded in each group's state file no longer matches the running
    /// kernel's. This machine cannot reboot, so the recorded one changes
    /// instead (durably, through the mount).
    fn reboot(&self, site: Site) {
        let Ok(groups) = std::fs::read_dir(self.state_dir(site).join("groups")) else { return };
        for dir in groups.flatten() {
            let path = dir.path().join("state.json");
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let Ok(mut state) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            state["boot_id"] = serde_json::Value::String(format!("before-a-power-cut-of-{site}"));
            let text = serde_json::to_vec_pretty(&state).expect("state json");
            let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).expect("open state.json");
            f.write_all(&text).expect("write state.json");
            f.sync_all().expect("sync state.json");
        }
    }

    /// A power cut of a site: `kill -9` of its daemon, then everything its
    /// file system had not made durable is lost. Restart it with
    /// [`Cluster::start`].
    pub fn power_cut(&mut self, site: Site) -> CutReport {
        self.kill9(site);
        self.cut_fs(site, "cut")
    }

    /// [`Cluster::power_cut`], but the disk keeps a pseudo-random `fraction`
    /// of the non-durable pages (chosen by `seed`), as a disk with a
    /// volatile cache may keep any subset.
    pub fn power_cut_keeping(&mut self, site: Site, seed: u64, fraction: f64) -> CutReport {
        self.kill9(site);
        self.cut_fs(site, &format!("cut keep {seed} {fraction}"))
    }

    /// [`Cluster::power_cut`], but the disk had written back every page of
    /// the files whose path contains `name` (and none of the others').
    pub fn power_cut_keeping_files(&mut self, site: Site, name: &str) -> CutReport {
        self.kill9(site);
        self.cut_fs(site, &format!("cut keep-only {name}"))
    }

    /// A site whose daemon is stopped loses power: a clean stop must have
    /// made everything durable, so this must lose nothing that matters.
    pub fn power_cut_stopped(&mut self, site: Site) -> CutReport {
        assert!(self.sites[site.index()].child.is_none(), "{site}: power_cut_stopped with the daemon running");
        self.cut_fs(site, "cut")
    }

    /// Both sites lose power at once (both daemons killed first, then both
    /// caches dropped).
    pub fn power_cut_both(&mut self) -> [CutReport; 2] {
        self.kill9(Site::A);
        self.kill9(Site::B);
        [self.cut_fs(Site::A, "cut"), self.cut_fs(Site::B, "cut")]
    }

    /// A site's log file (all runs of its daemon, appended).
    pub fn log_path(&self, site: Site) -> &Path {
        &self.sites[site.index()].log
    }

    /// A site's log so far.
    pub fn log(&self, site: Site) -> String {
        std::fs::read_to_string(self.log_path(site)).unwrap_or_default()
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self, site: Site) -> Option<i32> {
        self.sites[site.index()].child.as_ref().map(|c| c.id() as i32)
    }

    /// Is the daemon of `site` running (started and not yet reaped)?
    pub fn is_running(&mut self, site: Site) -> bool {
        match self.sites[site.index()].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Both logs' tails and where everything is kept, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("cluster directory: {}\n", self.root.display());
        for s in &self.sites {
            if let Some(m) = &s.fs {
                let stats = fs_command(&m.control, "stats").unwrap_or_else(|e| e);
                let _ = fmt::Write::write_fmt(&mut out, format_args!("{} powercut-fs: {stats}\n", s.site));
            }
            let _ = fmt::Write::write_fmt(
                &mut out,
                format_args!(
                    "--- last lines of {} ({}) ---\n{}\n",
                    s.site,
                    s.log.display(),
                    tail(&std::fs::read_to_string(&s.log).unwrap_or_default(), 25)
                ),
            );
        }
        out
    }

    /// Starts a site's daemon and waits until its control socket answers.
    pub fn start(&mut self, site: Site) {
        self.spawn(site);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.control(site, &Request::Status { group: None }).is_ok() {
                return;
            }
            let s = &mut self.sites[site.index()];
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    s.child = None;
                    panic!("{site} daemon exited at start-up with {status}\n{}", self.diagnostics());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{site} daemon did not open its control socket within {START_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a site's daemon without waiting for it (a start the test holds
    /// up on purpose, say in an fsync of its recovery).
    pub fn spawn(&mut self, site: Site) {
        let bin = self.bin.clone();
        let s = &mut self.sites[site.index()];
        assert!(s.child.is_none(), "{site} is already running");
        s.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&s.log).expect("open log");
        let _ = writeln!(log, "===== e2e harness: starting {site} (run #{}) =====", s.starts);
        let log2 = log.try_clone().expect("clone log fd");
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&s.config_path)
            .arg("run")
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("REPLICATOR_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        s.child = Some(child);
    }

    /// Sends SIGTERM, waits for the daemon to exit and asserts exit 0.
    pub fn stop(&mut self, site: Site) {
        let status = self.stop_status(site);
        if !status.success() {
            panic!("{site} daemon did not stop cleanly on SIGTERM: {status}\n{}", self.diagnostics());
        }
    }

    /// Sends SIGTERM and returns the exit status (does not judge it).
    pub fn stop_status(&mut self, site: Site) -> ExitStatus {
        let mut child = self.sites[site.index()].child.take().unwrap_or_else(|| panic!("{site} is not running"));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{site} daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed)\n{}",
                        self.diagnostics()
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for {site}: {e}"),
            }
        }
    }

    /// Sends `sig` to a site's running daemon (SIGSTOP / SIGCONT freeze and
    /// thaw it: a partition as its peer sees it).
    pub fn signal(&self, site: Site, sig: nix::sys::signal::Signal) {
        let pid = self.pid(site).unwrap_or_else(|| panic!("{site} is not running"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal");
        if sig == nix::sys::signal::Signal::SIGSTOP {
            // kill() returns before every thread has stopped: a thread busy
            // on another core may still take a datagram. Wait until all
            // are stopped (state T).
            let deadline = Instant::now() + Duration::from_secs(5);
            while !all_threads_stopped(pid) {
                assert!(Instant::now() < deadline, "{site}: not every thread stopped within 5 s of SIGSTOP");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// `kill -9` (tolerates a daemon already killed from elsewhere).
    pub fn kill9(&mut self, site: Site) {
        if let Some(mut child) = self.sites[site.index()].child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            let mut log = std::fs::OpenOptions::new().append(true).open(self.log_path(site)).expect("open log");
            let _ = writeln!(log, "===== e2e harness: {site} killed with SIGKILL =====");
        }
    }

    /// One control-socket exchange (the same JSON protocol the CLI uses).
    pub fn control(&self, site: Site, req: &Request) -> Result<Response, String> {
        let path = self.control_socket(site);
        let mut stream = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).map_err(|e| e.to_string())?;
        let mut resp = String::new();
        BufReader::new(stream).read_line(&mut resp).map_err(|e| e.to_string())?;
        serde_json::from_str(&resp).map_err(|e| format!("bad control response {resp:?}: {e}"))
    }

    /// A group's status on a site.
    pub fn status(&self, site: Site, group: &str) -> GroupStatus {
        let resp = self
            .control(site, &Request::Status { group: Some(group.to_string()) })
            .unwrap_or_else(|e| panic!("status {group} on {site}: {e}\n{}", self.diagnostics()));
        assert_eq!(resp.exit, exit::OK, "status {group} on {site}: {}", resp.message);
        resp.groups.into_iter().next().unwrap_or_else(|| panic!("status {group} on {site}: no group in the answer"))
    }

    /// `pair create GROUP` on site-a (full initial copy). Returns the message.
    pub fn pair_create(&self, group: &str) -> String {
        self.pair_create_opts(group, false)
    }

    /// `pair create GROUP [--nocopy]` on site-a.
    pub fn pair_create_opts(&self, group: &str, nocopy: bool) -> String {
        let resp = self
            .control(Site::A, &Request::PairCreate { group: group.to_string(), nocopy })
            .unwrap_or_else(|e| panic!("pair create {group}: {e}\n{}", self.diagnostics()));
        assert_eq!(resp.exit, exit::OK, "pair create {group} refused: {}\n{}", resp.message, self.diagnostics());
        resp.message
    }

    /// Runs the CLI against a site's configuration.
    pub fn cli(&self, site: Site, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(&self.bin)
                .arg("--config")
                .arg(self.config_path(site))
                .args(args)
                .env_remove("REPLICATOR_CONFIG"),
            Duration::from_secs(120),
        )
    }

    /// Log lines of both sites saying that a replication session broke
    /// (the secondary ended it with an error, or the primary saw the link
    /// go down). A test without injected faults expects none.
    pub fn session_breaks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for site in [Site::A, Site::B] {
            for line in self.log(site).lines() {
                if line.contains("replication session ended") || line.contains("replication link down") {
                    out.push(format!("{site}: {line}"));
                }
            }
        }
        out
    }

    /// Panics if a replication session broke (see [`Cluster::session_breaks`]).
    pub fn assert_no_session_breaks(&self, when: &str) {
        let breaks = self.session_breaks();
        if !breaks.is_empty() {
            panic!(
                "{when}: the replication session broke without any injected fault ({} line(s)), first:\n{}\n{}",
                breaks.len(),
                breaks.iter().take(5).cloned().collect::<Vec<_>>().join("\n"),
                self.diagnostics()
            );
        }
    }

    /// Runs an external command (with a time limit) while watching the
    /// replication session: a session break kills it and fails the test.
    pub fn run_while_healthy(&self, cmd: &mut Command, timeout: Duration) -> Output {
        let desc = format!("{cmd:?}");
        let out = run_with_abort(cmd, timeout, || {
            let b = self.session_breaks();
            (!b.is_empty()).then(|| {
                format!(
                    "the replication session broke while it ran, first:\n{}\n{}",
                    b.iter().take(5).cloned().collect::<Vec<_>>().join("\n"),
                    self.diagnostics()
                )
            })
        });
        if !out.status.success() {
            panic!("{desc} failed: {}\n{}", out.status, describe_output(&out));
        }
        out
    }

    /// Polls until `pred` holds for the group's status on `site`; panics with
    /// the last status after `timeout`.
    pub fn wait_until(
        &self,
        site: Site,
        group: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&GroupStatus) -> bool,
    ) -> GroupStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(site, group);
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{site}: group {group} not {what} after {timeout:?}; last status:\n{}\n{}",
                    serde_json::to_string_pretty(&s).unwrap_or_default(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the group is in `state` on `site`.
    pub fn wait_state(&self, site: Site, group: &str, state: &str, timeout: Duration) -> GroupStatus {
        self.wait_until(site, group, state, timeout, |s| s.state == state)
    }

    /// Waits until both sites show PAIR and the primary is connected.
    pub fn wait_pair(&self, group: &str, timeout: Duration) {
        self.wait_until(Site::A, group, "PAIR and connected", timeout, |s| s.state == "PAIR" && s.connected);
        self.wait_state(Site::B, group, "PAIR", timeout);
    }

    /// Waits until the primary (site-a) is PAIR, connected, and the
    /// secondary has applied every record it journaled.
    pub fn wait_drained(&self, group: &str) -> GroupStatus {
        self.wait_drained_within(group, Duration::from_secs(60))
    }

    /// [`Cluster::wait_drained`] with an explicit timeout.
    pub fn wait_drained_within(&self, group: &str, timeout: Duration) -> GroupStatus {
        self.wait_until(Site::A, group, "drained (PAIR, connected, lag 0)", timeout, |s| {
            s.state == "PAIR" && s.connected && s.lag_records == 0 && s.applied_seq >= s.last_seq
        })
    }

    /// The usual end of a test: waits until the secondary applied every
    /// record ([`Cluster::wait_drained`]), stops both daemons (cleanly)
    /// and compares the group's volumes byte by byte.
    pub fn assert_converged(&mut self, group: &str) {
        self.wait_drained(group);
        self.stop(Site::A);
        self.stop(Site::B);
        self.assert_volumes_identical(group);
    }

    /// Compares every volume of `group` on both sites byte by byte (both
    /// daemons must be stopped). Panics at the first differing offset.
    pub fn assert_volumes_identical(&mut self, group: &str) {
        for site in [Site::A, Site::B] {
            assert!(
                !self.is_running(site),
                "assert_volumes_identical: stop {site} first (backing files are read directly)"
            );
        }
        let spec = self
            .opts
            .groups
            .iter()
            .find(|g| g.name == group)
            .unwrap_or_else(|| panic!("no group {group} in this cluster"))
            .clone();
        for v in &spec.volumes {
            let (a, b) = (self.volume_path(Site::A, &v.name), self.volume_path(Site::B, &v.name));
            match compare_files(&a, &b) {
                FileDiff::Identical => {}
                FileDiff::Length(la, lb) => panic!(
                    "group {group} volume {}: sizes differ: site-a {la} bytes, site-b {lb} bytes\n{}",
                    v.name,
                    self.diagnostics()
                ),
                FileDiff::Bytes { first, blocks } => panic!(
                    "group {group} volume {}: the sites DIFFER, first at byte offset {first} (0x{first:x}, 4 KiB block {}), \
                     {blocks} differing 4 KiB block(s)\n  {}\n  {}\n{}",
                    v.name,
                    first / 4096,
                    a.display(),
                    b.display(),
                    self.diagnostics()
                ),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.sites {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Daemons first (they hold files on the mounts), then the mounts.
        for s in &mut self.sites {
            if let Some(m) = s.fs.as_mut() {
                m.stop();
            }
        }
        let keep = std::thread::panicking() || std::env::var_os("REPLICATOR_TEST_KEEP").is_some();
        if let Some(tmp) = self.tmp.take() {
            if keep {
                let path = tmp.keep();
                eprintln!(
                    "replicator e2e: kept {} (logs: {}, {})",
                    path.display(),
                    self.sites[0].log.display(),
                    self.sites[1].log.display()
                );
            }
        }
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// /proc/PID/task/TID/stat).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_files_finds_the_first_difference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = pattern::random_bytes(1, 3 << 20);
        std::fs::write(&a, &data).expect("write");
        std::fs::write(&b, &data).expect("write");
        assert_eq!(compare_files(&a, &b), FileDiff::Identical);
        data[(1 << 20) + 4097] ^= 1;
        data[(2 << 20) + 5] ^= 0x80;
        std::fs::write(&b, &data).expect("write");
        assert_eq!(compare_files(&a, &b), FileDiff::Bytes { first: (1 << 20) + 4097, blocks: 2 });
        std::fs::write(&b, &data[..4096]).expect("write");
        assert_eq!(compare_files(&a, &b), FileDiff::Length(3 << 20, 4096));
    }
}
