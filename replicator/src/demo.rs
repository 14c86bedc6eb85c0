//! `replicator demo`: two nodes on loopback, the whole tour, exit 0.
//!
//! Creates a temporary CA and certificates, two configurations with a sync
//! and an async group backed by sparse files, starts two daemons (this same
//! binary, `run`), pairs both groups, writes through NBD while measuring
//! latency, waits for the async group to drain, shows status, stops both
//! daemons cleanly and checks that both sites hold identical bytes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::control::{self, Request};
use crate::nbd_client::NbdClient;

const VOLUME_SIZE: u64 = 64 << 20;
const WRITES: usize = 2000;

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

[[group.volume]]
name = "archive-index"
path = "{site}/archive-index.img"
size = "{size}"
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
    let log = std::fs::File::create(&site.log).map_err(|e| format!("{}: {e}", site.log.display()))?;
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
    let _ = std::fs::remove_dir_all(&tmp);
    println!("\ndemo complete: both sites hold identical bytes.");
    Ok(())
}
