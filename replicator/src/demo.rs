//! `replicator demo`: two nodes on loopback, the whole tour, exit 0.
//!
//! Creates a temporary CA and certificates, two configurations with a sync
//! and an async group backed by sparse files, starts two daemons (this same
//! binary, `run`), pairs both groups, writes through NBD while measuring
//! latency, waits for the async group to drain, shows status, stops both
//! daemons cleanly and checks that both sites hold identical bytes.
//!
//! Then the disaster-recovery tour, through the real CLI (this binary, as
//! an admin would type it): both daemons restart, `switchover` hands the
//! sync group to site-b and back, site-a is killed (`kill -9`, a crash),
//! `failover` on site-b prints the recovery point, site-b takes writes,
//! site-a comes back fenced, `failback` there discards nothing, copies
//! site-b's changes and switches back; both daemons stop and the sites are
//! compared byte for byte again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::control::{self, Request};
use crate::group::GroupStatus;
use crate::nbd_client::NbdClient;

const VOLUME_SIZE: u64 = 64 << 20;
const WRITES: usize = 2000;
/// Longest any one CLI command of the tour may take.
const CLI_LIMIT: Duration = Duration::from_secs(180);
/// Longest any wait for a state may take.
const STATE_LIMIT: Duration = Duration::from_secs(60);
/// Blocks site-b writes to the bank volume while it is the primary after
/// the failover (1 MiB each, from this offset): failback must copy them.
const FAILOVER_WRITES: u64 = 4;
const FAILOVER_OFFSET: u64 = 32 << 20;

struct Site {
    name: &'static str,
    config_path: PathBuf,
    config: Config,
    child: Option<Child>,
    log: PathBuf,
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

/// Runs the demo (`serve`: stay up for the user's own NBD client).
pub fn run(serve: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("replicator demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(tour(serve)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nreplicator demo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_config(
    dir: &Path,
    me: &str,
    peer: &str,
    port: u16,
    peer_port: u16,
    nbd_port: Option<u16>,
) -> std::io::Result<PathBuf> {
    let site = dir.join(me);
    let nbd_listen = nbd_port.map(|p| format!("nbd_listen = \"127.0.0.1:{p}\"\n")).unwrap_or_default();
    let text = format!(
        r#"# replicator demo: node {me}
[node]
name = "{me}"
listen = "127.0.0.1:{port}"
state_dir = "{site}/state"
run_dir = "{site}/run"
{nbd_listen}
[tls]
ca = "{certs}/ca.pem"
cert = "{certs}/{me}.pem"
key = "{certs}/{me}.key"

[[peer]]
name = "{peer}"
address = "127.0.0.1:{peer_port}"

[[group]]
name = "bank"
peer = "{peer}"
mode = "sync"
journal_size = "64MiB"
link_timeout = "5s"
accept_pair_create = true

[[group.volume]]
name = "bank-ledger"
path = "{site}/bank-ledger.img"
size = "{size}"
create = true

[[group]]
name = "archive"
peer = "{peer}"
mode = "async"
journal_size = "64MiB"
accept_pair_create = true

[[group.volume]]
name = "archive-data"
path = "{site}/archive-data.img"
size = "{size}"
create = true

[[group.volume]]
name = "archive-index"
path = "{site}/archive-index.img"
size = "{size}"
create = true
"#,
        site = site.display(),
        certs = dir.join("certs").display(),
        size = VOLUME_SIZE,
    );
    std::fs::create_dir_all(&site)?;
    let path = site.join("replicator.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn start(site: &mut Site) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&site.log)
        .map_err(|e| format!("{}: {e}", site.log.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["--config"])
        .arg(&site.config_path)
        .arg("run")
        .env("RUST_LOG", "info,quinn=warn")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    site.child = Some(child);
    Ok(())
}

async fn wait_socket(site: &mut Site) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if control::call(&site.config.control_socket(), &Request::Status { group: None }).await.is_ok() {
            return Ok(());
        }
        if let Some(c) = site.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!("daemon {} exited with {status}; log: {}", site.name, site.log.display()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("daemon {} did not come up; log: {}", site.name, site.log.display()))
}

fn stop(site: &mut Site) -> Result<(), String> {
    if let Some(mut c) = site.child.take() {
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = c.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("daemon {} exited with {status}; log: {}", site.name, site.log.display()));
        }
    }
    Ok(())
}

/// Kills the daemon with SIGKILL: a crash, as far as the peer can tell.
fn crash(site: &mut Site) -> Result<(), String> {
    if let Some(mut c) = site.child.take() {
        c.kill().map_err(|e| format!("cannot kill daemon {}: {e}", site.name))?;
        c.wait().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs `replicator ARGS` against `site`'s daemon, as an admin would type
/// it, prints the command and its output, and returns the output; fails
/// unless it exits 0 within [`CLI_LIMIT`].
async fn cli(site: &Site, args: &[&str]) -> Result<String, String> {
    cli_env(site, args, &[]).await
}

/// [`cli`] with extra environment variables.
async fn cli_env(site: &Site, args: &[&str], env: &[(String, String)]) -> Result<String, String> {
    println!("    {}$ replicator {}", site.name, args.join(" "));
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--config").arg(&site.config_path).args(args).stdin(Stdio::null());
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let what = format!("replicator {} on {}", args.join(" "), site.name);
    let out = tokio::task::spawn_blocking(move || run_bounded(cmd, CLI_LIMIT))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{what}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for line in text.lines() {
        println!("    {line}");
    }
    if !out.status.success() {
        return Err(format!("{what} exited with {}", out.status));
    }
    Ok(text)
}

/// Runs `cmd` to completion, capturing its output, killing it after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<std::process::Output, String> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not finish within {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Reads a child's pipe to the end on a thread of its own.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

async fn ask(site: &Site, req: Request) -> Result<control::Response, String> {
    let resp = control::call(&site.config.control_socket(), &req).await.map_err(|e| e.to_string())?;
    if resp.exit != control::exit::OK {
        return Err(resp.message);
    }
    Ok(resp)
}

async fn wait_state(site: &Site, group: &str, state: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let resp = ask(site, Request::Status { group: Some(group.into()) }).await?;
        if let Some(s) = resp.groups.first() {
            if s.state == state && s.lag_records == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "group {group} is {} (lag {} records) after {timeout:?}, expected {state}",
                    s.state, s.lag_records
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `site`'s status of `group` satisfies `done` (described by
/// `what` in the error), for at most [`STATE_LIMIT`].
async fn wait_for(
    site: &Site,
    group: &str,
    what: &str,
    done: impl Fn(&GroupStatus) -> bool,
) -> Result<GroupStatus, String> {
    let deadline = Instant::now() + STATE_LIMIT;
    loop {
        let resp = ask(site, Request::Status { group: Some(group.into()) }).await?;
        if let Some(s) = resp.groups.into_iter().next() {
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: group {group} is not {what} after {} s: role {}, state {}{}, connected {}, lag {} records",
                    site.name,
                    STATE_LIMIT.as_secs(),
                    s.role,
                    s.state,
                    s.reason.map(|r| format!("({r})")).unwrap_or_default(),
                    s.connected,
                    s.lag_records
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `site` is the primary of `group`, in PAIR with a live session and
/// nothing left to ship.
/// `replicator demo --drill-check`, the command of the demo's `drill run`:
/// hashes each drill copy (through NBD, as any drill check would read it)
/// and compares with the hash the demo read from the primary.
pub fn drill_check() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drill check: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(check_drill_copies()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drill check FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn check_drill_copies() -> Result<(), String> {
    let volumes = std::env::var("REPLICATOR_DRILL_VOLUMES").map_err(|_| "REPLICATOR_DRILL_VOLUMES is not set")?;
    let socket = std::env::var("REPLICATOR_NBD_SOCKET").map_err(|_| "REPLICATOR_NBD_SOCKET is not set")?;
    for v in volumes.split_whitespace() {
        let export = crate::group::drill_export_name(v);
        let hash = hash_export(Path::new(&socket), &export).await?;
        let expect_var = crate::drill_cli::volume_env(v).replace("REPLICATOR_DRILL_NBD_", "REPLICATOR_DEMO_EXPECT_");
        let expected = std::env::var(&expect_var).map_err(|_| format!("{expect_var} is not set"))?;
        if hash != expected {
            return Err(format!("{export}: BLAKE3 {hash}, the primary had {expected}"));
        }
        println!("{export}: BLAKE3 {} matches the primary's volume", &hash[..16]);
    }
    Ok(())
}

/// BLAKE3 of a whole NBD export, hex.
async fn hash_export(socket: &Path, export: &str) -> Result<String, String> {
    let c = NbdClient::connect_unix(socket, export).await.map_err(|e| format!("{export}: {e}"))?;
    let mut hasher = blake3::Hasher::new();
    let mut at = 0;
    while at < c.size() {
        let n = (c.size() - at).min(1 << 20) as u32;
        hasher.update(&c.read(at, n).await.map_err(|e| format!("{export} at {at}: {e}"))?);
        at += u64::from(n);
    }
    let _ = c.disconnect().await;
    Ok(hasher.finalize().to_hex().to_string())
}

async fn wait_primary_drained(site: &Site, group: &str) -> Result<(), String> {
    wait_for(site, group, "the primary in PAIR, drained", |s| {
        s.role == "primary" && s.state == "PAIR" && s.connected && s.lag_records == 0
    })
    .await
    .map(|_| ())
}

/// xorshift64*: deterministic pseudo-random data and offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Writes `WRITES` 4 KiB blocks at random offsets one at a time (QD1) and
/// returns the sorted latencies.
async fn measure(client: &NbdClient, seed: u64) -> Result<Vec<Duration>, String> {
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 4096];
    let blocks = client.size() / 4096;
    let mut lat = Vec::with_capacity(WRITES);
    for _ in 0..WRITES {
        rng.fill(&mut buf);
        let off = (rng.next() % blocks) * 4096;
        let t = Instant::now();
        client.write(off, &buf, false).await.map_err(|e| e.to_string())?;
        lat.push(t.elapsed());
    }
    client.flush().await.map_err(|e| e.to_string())?;
    lat.sort();
    Ok(lat)
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool, String> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = std::fs::File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).map_err(|e| e.to_string())?;
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na]).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(false);
            }
            nb += n;
        }
        if na == 0 {
            return Ok(fb.read(&mut bb[..1]).map_err(|e| e.to_string())? == 0);
        }
        if ba[..na] != bb[..na] {
            return Ok(false);
        }
    }
}

/// Compares every volume file of both sites (daemons stopped); prints one
/// line per volume and fails if any differ.
fn compare_sites(tmp: &Path) -> Result<(), String> {
    let mut all_same = true;
    for v in ["bank-ledger", "archive-data", "archive-index"] {
        let pa = tmp.join("site-a").join(format!("{v}.img"));
        let pb = tmp.join("site-b").join(format!("{v}.img"));
        let same = same_bytes(&pa, &pb)?;
        all_same &= same;
        println!("    {v:<14} {}", if same { "identical on both sites" } else { "DIFFERENT" });
    }
    if !all_same {
        return Err(format!("the sites differ; logs and images kept in {}", tmp.display()));
    }
    Ok(())
}

async fn tour(serve: bool) -> Result<(), String> {
    let tmp = std::env::temp_dir().join(format!("replicator-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    println!("replicator demo: two sites on loopback, working directory {}", tmp.display());

    step("certificates: a private CA and one certificate per site (replicator cert init / cert issue)");
    let certs = tmp.join("certs");
    crate::certs::init_ca(&certs).map_err(|e| e.to_string())?;
    for name in ["site-a", "site-b"] {
        crate::certs::issue(&certs, name, &certs, crate::certs::Validity::days(2)).map_err(|e| e.to_string())?;
    }
    println!("    {}/{{ca,site-a,site-b}}.pem", certs.display());

    step("configuration: group 'bank' (sync, 1 volume) and 'archive' (async, 2 volumes), 64 MiB sparse files");
    let (pa, pb) = (free_port().map_err(|e| e.to_string())?, free_port().map_err(|e| e.to_string())?);
    let nbd_tcp = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).ok();
    let ca = write_config(&tmp, "site-a", "site-b", pa, pb, nbd_tcp).map_err(|e| e.to_string())?;
    let cb = write_config(&tmp, "site-b", "site-a", pb, pa, None).map_err(|e| e.to_string())?;
    let mut a = Site {
        name: "site-a",
        config: Config::load(&ca).map_err(|e| e.to_string())?,
        config_path: ca,
        child: None,
        log: tmp.join("site-a.log"),
    };
    let mut b = Site {
        name: "site-b",
        config: Config::load(&cb).map_err(|e| e.to_string())?,
        config_path: cb,
        child: None,
        log: tmp.join("site-b.log"),
    };
    println!("    {}\n    {}", a.config_path.display(), b.config_path.display());

    step("starting both daemons (replicator run)");
    start(&mut a)?;
    start(&mut b)?;
    wait_socket(&mut a).await?;
    wait_socket(&mut b).await?;
    println!("    site-a QUIC 127.0.0.1:{pa}, site-b QUIC 127.0.0.1:{pb}; logs in {}", tmp.display());

    step("pair create bank and archive on site-a (full initial copy), waiting for PAIR");
    for g in ["bank", "archive"] {
        let r = ask(&a, Request::PairCreate { group: g.into(), nocopy: false }).await?;
        println!("    {}", r.message);
    }
    for g in ["bank", "archive"] {
        wait_state(&a, g, "PAIR", Duration::from_secs(120)).await?;
        println!("    {g}: PAIR");
    }

    step(&format!("writing {WRITES} random 4 KiB blocks through NBD to each group, one at a time (QD1)"));
    let sock = a.config.nbd_socket();
    let bank = NbdClient::connect_unix(&sock, "bank-ledger").await.map_err(|e| e.to_string())?;
    let sync_lat = measure(&bank, 1).await?;
    let archive = NbdClient::connect_unix(&sock, "archive-data").await.map_err(|e| e.to_string())?;
    let async_lat = measure(&archive, 2).await?;
    let index = NbdClient::connect_unix(&sock, "archive-index").await.map_err(|e| e.to_string())?;
    let mut rng = Rng(3);
    let mut big = vec![0u8; 1 << 20];
    for i in 0..16u64 {
        rng.fill(&mut big);
        index.write(i << 20, &big, false).await.map_err(|e| e.to_string())?;
    }
    index
        .write(12345, b"an unaligned write, read-modify-written on whole blocks", true)
        .await
        .map_err(|e| e.to_string())?;
    index.flush().await.map_err(|e| e.to_string())?;
    println!("    write latency (4 KiB, QD1)      p50        p99");
    for (name, lat) in [("bank (sync, RPO 0)", &sync_lat), ("archive (async, journal)", &async_lat)] {
        println!(
            "    {name:<30} {:>7.0} µs {:>7.0} µs",
            percentile(lat, 0.50).as_secs_f64() * 1e6,
            percentile(lat, 0.99).as_secs_f64() * 1e6
        );
    }

    step("waiting for the async group to drain");
    wait_state(&a, "archive", "PAIR", Duration::from_secs(60)).await?;
    wait_state(&a, "bank", "PAIR", Duration::from_secs(60)).await?;

    step("replicator status (site-a, then site-b)");
    let sa = ask(&a, Request::Status { group: None }).await?;
    print!("{}", crate::cli::render_status(&sa.groups));
    let sb = ask(&b, Request::Status { group: None }).await?;
    print!("{}", crate::cli::render_status(&sb.groups));

    step("a failover drill on site-b while replication goes on: drill run archive -- (a checksum of every volume)");
    wait_primary_drained(&a, "archive").await?;
    let mut expect = Vec::new();
    for v in ["archive-data", "archive-index"] {
        let var = crate::drill_cli::volume_env(v).replace("REPLICATOR_DRILL_NBD_", "REPLICATOR_DEMO_EXPECT_");
        expect.push((var, hash_export(&sock, v).await?));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let exe = exe.display().to_string();
    cli_env(&b, &["drill", "run", "archive", "--", &exe, "demo", "--drill-check"], &expect).await?;
    cli(&b, &["drill", "history", "archive"]).await?;

    if serve {
        step("serving: attach your own NBD client to site-a while this runs (Ctrl-C to finish the tour)");
        println!("    qemu-io -f raw 'nbd+unix:///bank-ledger?socket={}' -c 'write -P 0x5a 0 1M'", sock.display());
        println!("    nbdinfo 'nbd+unix:///archive-data?socket={}'", sock.display());
        if let Some(p) = nbd_tcp {
            println!("    nbd-client 127.0.0.1 {p} /dev/nbd0 -N bank-ledger   (where the kernel has NBD)");
        }
        println!("    replicator --config {} status --watch", a.config_path.display());
        let _ = tokio::signal::ctrl_c().await;
        wait_state(&a, "archive", "PAIR", Duration::from_secs(60)).await?;
    }
    drop((bank, archive, index));

    step("stopping both daemons cleanly (SIGTERM), then comparing the sites byte for byte");
    stop(&mut a)?;
    stop(&mut b)?;
    compare_sites(&tmp)?;

    disaster_recovery(&mut a, &mut b).await?;

    step("stopping both daemons cleanly (SIGTERM), then comparing the sites byte for byte again");
    stop(&mut a)?;
    stop(&mut b)?;
    compare_sites(&tmp)?;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("\ndemo complete: both sites hold identical bytes, after a switchover, a failover and a failback.");
    Ok(())
}

/// The second half of the tour: restart, switchover both ways, crash of
/// the primary, failover, failback. Ends with site-a the primary of both
/// groups again, in PAIR and drained.
async fn disaster_recovery(a: &mut Site, b: &mut Site) -> Result<(), String> {
    step("restarting both daemons: the pairs resume where they stopped, nothing is copied");
    start(a)?;
    start(b)?;
    wait_socket(a).await?;
    wait_socket(b).await?;
    for g in ["bank", "archive"] {
        wait_primary_drained(a, g).await?;
        println!("    {g}: PAIR");
    }

    step("planned switchover of 'bank' (stop the applications first): site-b becomes the primary, zero loss");
    cli(a, &["switchover", "bank"]).await?;
    wait_primary_drained(b, "bank").await?;
    step("switchover back, run on the secondary this time (either site may ask)");
    cli(a, &["switchover", "bank"]).await?;
    wait_primary_drained(a, "bank").await?;

    step("site-a crashes (kill -9) with 'bank' in PAIR; site-b notices within seconds");
    crash(a)?;
    wait_for(b, "bank", "disconnected from the dead primary", |s| !s.connected).await?;
    let sb = ask(b, Request::Status { group: Some("bank".into()) }).await?;
    print!("{}", crate::cli::render_status(&sb.groups));

    step("unplanned failover on site-b: it promotes its image and prints the recovery point (sync: no loss)");
    let out = cli(b, &["failover", "bank"]).await?;
    if !out.contains("Recovery point: sequence") {
        return Err("failover printed no recovery point".into());
    }
    println!(
        "    ... site-b takes writes as the new primary: {FAILOVER_WRITES} x 1 MiB at offset {} MiB",
        FAILOVER_OFFSET >> 20
    );
    let written = {
        let client = NbdClient::connect_unix(&b.config.nbd_socket(), "bank-ledger").await.map_err(|e| e.to_string())?;
        let mut rng = Rng(4);
        let mut data = vec![0u8; (FAILOVER_WRITES << 20) as usize];
        rng.fill(&mut data);
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            client.write(FAILOVER_OFFSET + ((i as u64) << 20), chunk, false).await.map_err(|e| e.to_string())?;
        }
        client.flush().await.map_err(|e| e.to_string())?;
        data
    };

    step("site-a comes back: the generation check fences it (no writes), and it says so");
    start(a)?;
    wait_socket(a).await?;
    wait_for(a, "bank", "fenced", |s| s.superseded_by > 0).await?;
    // Once site-b has connected to it too, site-a knows where site-b took
    // over, so failback discards exactly what came after.
    wait_for(b, "bank", "told that site-a is fenced", |s| s.refusal.as_deref() == Some("peer-fenced")).await?;
    let sa = ask(a, Request::Status { group: Some("bank".into()) }).await?;
    print!("{}", crate::cli::render_status(&sa.groups));

    step("failback on site-a: it becomes site-b's secondary (reporting what it discards), copies what changed, switches back");
    let out = cli(a, &["failback", "bank", "--timeout", "120s"]).await?;
    if !out.contains("Discarded here") || !out.contains("switchover done") {
        return Err("failback did not report what it discarded and the switch back".into());
    }
    for g in ["bank", "archive"] {
        wait_primary_drained(a, g).await?;
    }
    let client = NbdClient::connect_unix(&a.config.nbd_socket(), "bank-ledger").await.map_err(|e| e.to_string())?;
    let back = client.read(FAILOVER_OFFSET, written.len() as u32).await.map_err(|e| e.to_string())?;
    drop(client);
    if back != written {
        return Err("site-a, primary again, does not hold what site-b wrote after the failover".into());
    }
    println!("    site-a is the primary again and holds every write site-b took while it was the primary");
    let sa = ask(a, Request::Status { group: Some("bank".into()) }).await?;
    print!("{}", crate::cli::render_status(&sa.groups));
    Ok(())
}
