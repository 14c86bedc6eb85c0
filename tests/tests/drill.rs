//! Drill copies (issue 10): a writable, group-consistent copy of the replica
//! on the secondary while replication goes on.
//!
//! The load: one NBD client writes self-describing 4 KiB blocks
//! (`pattern::stamp(block, k)` for its k-th write), one write at a time,
//! alternating between the group's two volumes. Write k is issued only after
//! write k-1 was acknowledged, so the group's sequence order is k's order,
//! and an image is write-order consistent exactly when there is a K such
//! that every block holds its last write with k <= K (zeroes if none), on
//! both volumes at once.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::{read_stamp, stamp, Rng, StampRead, BLOCK};
use replicator_tests::{describe_output, require, Cluster, ClusterOpts, GroupSpec, Immutable, Mode, Site};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;
const BLOCKS: u64 = VOLUME / BLOCK as u64;
const VOLUMES: [&str; 2] = ["v0", "v1"];
/// The load is bounded in count and in time. The count leaves room for a
/// fast disk: the tests wait for thousands of writes more after setup
/// steps the load runs through at full speed.
const LOAD_MAX_OPS: u64 = 200_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

/// Writes issued, in order: (k, volume index, block).
type WriteLog = Arc<Mutex<Vec<(u64, usize, u64)>>>;

struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    log: WriteLog,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &Cluster, site: Site, seed: u64) -> Load {
        Self::start_over(cluster, site, seed, BLOCKS)
    }

    /// A load over the first `blocks` blocks of each volume.
    fn start_over(cluster: &Cluster, site: Site, seed: u64, blocks: u64) -> Load {
        let (stop, acked, log) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), WriteLog::default());
        let paused = Arc::new(AtomicBool::new(false));
        let socket = cluster.nbd_socket(site);
        let (s, p, a, l) = (stop.clone(), paused.clone(), acked.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let mut clients = Vec::new();
                for v in VOLUMES {
                    clients.push(NbdClient::connect_unix(&socket, v).await.expect("connect the load"));
                }
                let (mut rng, started) = (Rng::new(seed), Instant::now());
                for k in 1..=LOAD_MAX_OPS {
                    while p.load(Ordering::SeqCst) && !s.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    if s.load(Ordering::SeqCst) || started.elapsed() > LOAD_MAX_TIME {
                        break;
                    }
                    let (vol, block) = ((k % 2) as usize, rng.below(blocks));
                    l.lock().expect("log").push((k, vol, block));
                    if clients[vol].write(block * BLOCK as u64, &stamp(block, k), false).await.is_err() {
                        break;
                    }
                    a.store(k, Ordering::SeqCst);
                }
            });
        });
        Load { stop, paused, acked, log, thread: Some(thread) }
    }

    /// Stops issuing writes and waits for the one in flight: returns the
    /// number of writes acknowledged, which is also the last one's k.
    fn pause(&self) -> u64 {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let issued = self.log.lock().expect("log").len() as u64;
            if self.acked() == issued {
                return issued;
            }
            assert!(Instant::now() < deadline, "the write in flight at {issued} never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    fn wait_for(&self, ops: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < ops {
            let ended = self.thread.as_ref().is_none_or(std::thread::JoinHandle::is_finished);
            assert!(
                !ended,
                "the load ended at {} writes before reaching {ops} (its bounds: {LOAD_MAX_OPS} writes, {LOAD_MAX_TIME:?}; or a write failed)",
                self.acked()
            );
            assert!(Instant::now() < deadline, "the load stalled at {} writes", self.acked());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> Vec<(u64, usize, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        self.log.lock().expect("log").clone()
    }
}

/// Reads a whole export through NBD.
fn read_export(socket: &Path, export: &str) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect_unix(socket, export).await.unwrap_or_else(|e| panic!("connect {export}: {e}"));
        let mut image = Vec::with_capacity(c.size() as usize);
        let mut at = 0;
        while at < c.size() {
            let n = (c.size() - at).min(MIB) as u32;
            image.extend(c.read(at, n).await.unwrap_or_else(|e| panic!("read {export} at {at}: {e}")));
            at += u64::from(n);
        }
        let _ = c.disconnect().await;
        image
    })
}

/// Writes through NBD (with FUA, then a FLUSH).
fn write_export(socket: &Path, export: &str, offset: u64, data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect_unix(socket, export).await.unwrap_or_else(|e| panic!("connect {export}: {e}"));
        c.write(offset, data, true).await.unwrap_or_else(|e| panic!("write {export}: {e}"));
        c.flush().await.unwrap_or_else(|e| panic!("flush {export}: {e}"));
        let _ = c.disconnect().await;
    })
}

/// The K such that both images hold exactly the writes k <= K (panics,
/// naming the first block that says otherwise, when there is none).
fn consistent_point(images: &[Vec<u8>], log: &[(u64, usize, u64)], skip: &[(usize, u64)]) -> u64 {
    let blocks = images.first().map_or(0, |i| (i.len() / BLOCK) as u64);
    let mut seen = vec![vec![0u64; blocks as usize]; images.len()];
    let mut k_max = 0;
    for (v, image) in images.iter().enumerate() {
        for b in 0..blocks {
            if skip.contains(&(v, b)) {
                continue;
            }
            let at = (b as usize) * BLOCK;
            match read_stamp(&image[at..at + BLOCK]) {
                StampRead::Zero => {}
                StampRead::Stamp { block, version } if block == b => {
                    seen[v][b as usize] = version;
                    k_max = k_max.max(version);
                }
                other => panic!("volume {} block {b}: not a block this load wrote: {other:?}", VOLUMES[v]),
            }
        }
    }
    let mut expect = vec![vec![0u64; blocks as usize]; images.len()];
    for &(k, v, b) in log.iter().take_while(|w| w.0 <= k_max) {
        expect[v][b as usize] = k;
    }
    for v in 0..images.len() {
        for b in 0..blocks {
            if skip.contains(&(v, b)) {
                continue;
            }
            assert_eq!(
                seen[v][b as usize], expect[v][b as usize],
                "volume {} block {b}: holds write {} but the image at K = {k_max} has write {} there: \
                 not a write-order-consistent image",
                VOLUMES[v], seen[v][b as usize], expect[v][b as usize]
            );
        }
    }
    k_max
}

fn drill_images(c: &Cluster) -> Vec<Vec<u8>> {
    VOLUMES.iter().map(|v| read_export(&c.nbd_socket(Site::B), &format!("drill/{v}"))).collect()
}

fn cli_ok(c: &Cluster, site: Site, args: &[&str]) -> String {
    let out = c.cli(site, args);
    let text = describe_output(&out);
    assert!(out.status.success(), "replicator {args:?} on {site} failed:\n{text}\n{}", c.diagnostics());
    text
}

/// `drill run g` on site B with `args` (its options, then `--` and the
/// command) in the background, its stdout piped and its stderr into
/// `stderr` (or dropped); returns once the drill is up, with the drill's
/// time to ready.
fn spawn_drill_run(c: &Cluster, args: &[&str], stderr: Option<&Path>) -> (std::process::Child, f64) {
    let mut run = std::process::Command::new(c.bin())
        .arg("--config")
        .arg(c.config_path(Site::B))
        .args(["drill", "run", "g"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(match stderr {
            Some(path) => std::fs::File::create(path).expect("stderr file").into(),
            None => std::process::Stdio::null(),
        })
        .spawn()
        .expect("drill run");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready_ms = loop {
        if let Some(d) = c.status(Site::B, "g").drill {
            break Some(d.meta.ready_ms);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match ready_ms {
        Some(ms) => (run, ms),
        None => {
            let _ = run.kill();
            let _ = run.wait();
            panic!("the drill did not start\n{}", c.diagnostics());
        }
    }
}

/// Waits (20 s at most) until the file `path` contains `needle`.
fn wait_for_text(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {}: {}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn two_volume_cluster(mode: Mode, opts: impl FnOnce(ClusterOpts) -> ClusterOpts) -> Cluster {
    let spec = GroupSpec::new("g", mode).volume("v0", VOLUME).volume("v1", VOLUME).extra("drill_chunk = \"64KiB\"");
    let c = Cluster::new(opts(ClusterOpts::group(spec)));
    c.pair_create("g");
    c.wait_pair("g", Duration::from_secs(60));
    c
}

#[test]
fn a_drill_copy_is_one_consistent_point_of_both_volumes_and_replication_goes_on() {
    let mut c = two_volume_cluster(Mode::Sync, |o| o);
    let load = Load::start(&c, Site::A, 7);
    load.wait_for(500);

    // Refused on the primary, started on the secondary under load.
    let out = c.cli(Site::A, &["drill", "start", "g"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
    let msg = cli_ok(&c, Site::B, &["drill", "start", "g"]);
    assert!(msg.contains("drill/v0") && msg.contains("drill/v1"), "{msg}");
    let at_start = load.acked();
    let drill = c.status(Site::B, "g").drill.expect("status shows the drill");
    println!(
        "DRILL: ready in {:.1} ms at sequence {}, load at write {at_start}",
        drill.meta.ready_ms, drill.meta.recovery_seq
    );
    let out = c.cli(Site::B, &["drill", "start", "g"]);
    assert_eq!(out.status.code(), Some(3), "a second drill: {}", describe_output(&out));

    // The copy is one point of both volumes, while the load goes on.
    let images = drill_images(&c);
    let log = load.log.lock().expect("log").clone();
    let k = consistent_point(&images, &log, &[]);
    assert!(k > 0 && k <= at_start + 1, "K = {k}, load at {at_start} when the drill started");
    load.wait_for(at_start + 500);
    assert!(c.status(Site::A, "g").state == "PAIR", "replication goes on during the drill");

    // Writes to the copy stay in the copy; one of 8 MiB, unaligned even to
    // blocks, is taken whole (Linux's `nbd` driver sends up to 32 MiB
    // without asking for block sizes; the copy takes it in pieces).
    let marker = vec![0xd1u8; 8192];
    write_export(&c.nbd_socket(Site::B), "drill/v0", 0, &marker);
    let (big_at, big) = (4 * MIB - 1000, vec![0xd2u8; 8 * MIB as usize + 3]);
    write_export(&c.nbd_socket(Site::B), "drill/v1", big_at, &big);
    let again = drill_images(&c);
    assert_eq!(&again[0][..8192], &marker[..]);
    assert_eq!(&again[0][8192..], &images[0][8192..], "the copy moved while the replica was written");
    let big_range = big_at as usize..big_at as usize + big.len();
    assert!(again[1][big_range.clone()] == big[..], "the 8 MiB write to the copy");
    assert!(
        again[1][..big_range.start] == images[1][..big_range.start],
        "the copy moved while the replica was written"
    );
    assert!(again[1][big_range.end..] == images[1][big_range.end..], "the copy moved while the replica was written");
    // The whole copy in one read, and 12 MiB at an unaligned offset.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (whole, unaligned) = rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::B), "drill/v1").await.expect("attach");
        let whole = client.read(0, VOLUME as u32).await.expect("a 16 MiB read of the copy");
        let unaligned = client.read(1000, 12 * MIB as u32).await.expect("a 12 MiB read of the copy");
        let _ = client.disconnect().await;
        (whole, unaligned)
    });
    assert!(whole == again[1], "one 16 MiB read of the copy");
    assert!(unaligned[..] == again[1][1000..1000 + 12 * MIB as usize], "an unaligned 12 MiB read of the copy");
    let space = c.status(Site::B, "g").drill.expect("drill").space_used_bytes;
    assert!(space > 0 && space < 2 * VOLUME, "space used {space}");

    // A restart of the secondary keeps the drill and its image.
    c.kill9(Site::B);
    c.start(Site::B);
    c.wait_pair("g", Duration::from_secs(60));
    load.wait_for(load.acked() + 300);
    assert_eq!(drill_images(&c), again, "the drill copy changed across a restart of the secondary");

    // A client attached: stop is refused; then a switchover with the drill.
    let log = load.finish();
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = rt.block_on(NbdClient::connect_unix(&c.nbd_socket(Site::B), "drill/v1")).expect("attach");
        let out = c.cli(Site::B, &["drill", "stop", "g"]);
        assert_eq!(out.status.code(), Some(3), "stop with a client attached: {}", describe_output(&out));
        assert!(describe_output(&out).contains("attached"), "{}", describe_output(&out));
        drop(client);
    }
    c.wait_drained("g");
    cli_ok(&c, Site::A, &["switchover", "g", "--wait"]);
    assert_eq!(c.status(Site::B, "g").role, "primary");
    assert_eq!(drill_images(&c), again, "the drill copy changed across the switchover");
    // Everything the load wrote is on both sites; the copy's writes on neither.
    let primary: Vec<Vec<u8>> = VOLUMES.iter().map(|v| read_export(&c.nbd_socket(Site::B), v)).collect();
    assert_eq!(consistent_point(&primary, &log, &[]), log.last().map(|w| w.0).unwrap_or(0));

    let deadline = Instant::now() + Duration::from_secs(10);
    let stopped = loop {
        let out = c.cli(Site::B, &["drill", "stop", "g"]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(stopped.status.success(), "{}", describe_output(&stopped));
    assert!(c.status(Site::B, "g").drill.is_none());
    let history: serde_json::Value =
        serde_json::from_slice(&c.cli(Site::B, &["drill", "history", "g", "--json"]).stdout).expect("history json");
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    assert_eq!(history[0]["result"], "manual");
    assert!(!c.state_dir(Site::B).join("groups/g/drill").exists(), "the copy's files are removed");

    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical("g");
}

/// A clean stop of the secondary keeps what a drill client wrote without
/// a flush. (The chunks a client writes first are held in memory until a
/// flush or the next apply's commit: after a restart the copy read them
/// from the replica again, undoing writes the client was told succeeded.)
#[test]
fn a_clean_stop_keeps_a_drill_clients_unflushed_writes() {
    let mut c = two_volume_cluster(Mode::Async, |o| o);
    cli_ok(&c, Site::B, &["drill", "start", "g"]);
    let data = vec![0xd7u8; 3 * 64 * 1024];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::B), "drill/v0").await.expect("attach");
        client.write(MIB, &data, false).await.expect("write the copy");
        let _ = client.disconnect().await;
    });
    c.stop(Site::B);
    c.start(Site::B);
    c.wait_pair("g", Duration::from_secs(60));
    let image = read_export(&c.nbd_socket(Site::B), "drill/v0");
    assert!(
        image[MIB as usize..MIB as usize + data.len()] == data[..],
        "the drill client's write was undone by a clean stop\n{}",
        c.diagnostics()
    );
}

#[test]
fn drill_run_reports_its_command_and_keeps_a_history() {
    let qemu_io = require("qemu-io");
    let c = two_volume_cluster(Mode::Async, |o| o);
    write_export(&c.nbd_socket(Site::A), "v0", 0, &vec![0x5au8; 65536]);
    c.wait_drained("g");
    let reports = c.root().join("reports");
    let reports_arg = reports.display().to_string();

    // A passing check: reads the replica's data and writes into the copy.
    let script = format!(
        "echo \"group $REPLICATOR_DRILL_GROUP at $REPLICATOR_DRILL_SEQ: $REPLICATOR_DRILL_VOLUMES\"; \
         {q} -f raw -c 'read -P 0x5a 0 64k' -c 'write -P 0x11 0 4k' \"$REPLICATOR_DRILL_NBD_V0\" && \
         {q} -f raw -c 'read -P 0 0 64k' \"$REPLICATOR_DRILL_NBD_V1\"",
        q = qemu_io.display()
    );
    let out = c.cli(Site::B, &["drill", "run", "g", "--report", &reports_arg, "--", "sh", "-c", &script]);
    let text = describe_output(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", c.diagnostics());
    assert!(text.contains("group g at ") && text.contains("Result:** passed"), "{text}");
    assert!(c.status(Site::B, "g").drill.is_none(), "drill run stops the drill");

    // A failing check: its exit code, and its output in the report.
    let out = c.cli(
        Site::B,
        &["drill", "run", "g", "--report", &reports_arg, "--", "sh", "-c", "echo fsck found errors >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
    // A report path that cannot be a directory is refused before any drill
    // (the history below has no line for it); it failed after the check ran.
    let not_a_dir = c.root().join("reports.txt");
    std::fs::write(&not_a_dir, b"notes").expect("write a file");
    let out = c.cli(
        Site::B,
        &["drill", "run", "g", "--report", &not_a_dir.display().to_string(), "--", "sh", "-c", "echo CHECK-RAN"],
    );
    let text = describe_output(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("not a directory") && text.contains("no drill was started") && !text.contains("CHECK-RAN"),
        "{text}"
    );
    // A hanging one is killed at the timeout.
    let started = Instant::now();
    let out = c.cli(Site::B, &["drill", "run", "g", "--timeout", "1s", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", describe_output(&out));
    assert!(started.elapsed() < Duration::from_secs(25));
    // One that leaves a job running in the background, holding its output
    // open: the drill ends with the command, the job is stopped. (It hung
    // for good, past any timeout, the drill never stopped.) Its script is
    // long and its output binary: the record still fits in the request
    // that stops the drill (refused as too long, the drill stayed up).
    let started = Instant::now();
    let script = format!(
        "sleep 1000 & echo started; for i in $(seq 40); do head -c 400 /dev/zero; echo; done # {}",
        "x".repeat(70_000)
    );
    let out = c.cli(Site::B, &["drill", "run", "g", "--timeout", "60s", "--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "{}", describe_output(&out));
    assert!(started.elapsed() < Duration::from_secs(30), "it waited for the background job");
    assert!(c.status(Site::B, "g").drill.is_none(), "the drill is stopped");
    // Ctrl-C on `drill run`: the command is stopped, then the drill, which
    // is recorded as interrupted (it was left running, unrecorded).
    let (mut run, _) = spawn_drill_run(&c, &["--", "sleep", "30"], None);
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let interrupted_at = Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().expect("wait") {
            break status;
        }
        assert!(interrupted_at.elapsed() < Duration::from_secs(20), "drill run did not end after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "drill run after SIGINT: {status}");
    assert!(c.status(Site::B, "g").drill.is_none(), "the interrupted drill run left the drill running");

    // The copy's write never reached the replica.
    write_export(&c.nbd_socket(Site::A), "v1", 65536, &[1u8; 4096]);
    c.wait_drained("g");

    let history: serde_json::Value =
        serde_json::from_slice(&c.cli(Site::B, &["drill", "history", "g", "--json"]).stdout).expect("history json");
    let results: Vec<&str> = history.as_array().expect("list").iter().filter_map(|r| r["result"].as_str()).collect();
    assert_eq!(results, ["passed", "failed", "timed-out", "passed", "interrupted"], "{history}");
    assert_eq!(history[1]["outcome"]["exit_code"], 3);
    assert!(history[1]["outcome"]["output_tail"].as_str().unwrap_or("").contains("fsck found errors"), "{history}");
    for r in history.as_array().expect("list") {
        let report = Path::new(r["report"].as_str().expect("report path"));
        assert!(report.exists() && report.with_extension("md").exists(), "{}", report.display());
        assert!(r["recovery_seq"].as_u64().is_some_and(|s| s > 0), "{r}");
    }
    let mut ours: Vec<String> = std::fs::read_dir(&reports)
        .expect("--report dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ours.sort();
    assert_eq!(ours.len(), 4, "two runs with --report, JSON and Markdown each: {ours:?}");
    let table = cli_ok(&c, Site::B, &["drill", "history", "g"]);
    assert!(table.contains("passed") && table.contains("failed") && table.contains("timed-out"), "{table}");

    let mut c = c;
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical("g");
}

#[test]
fn a_drill_run_whose_daemon_restarts_is_recorded_when_it_is_back() {
    let mut c = two_volume_cluster(Mode::Async, |o| o);
    write_export(&c.nbd_socket(Site::A), "v0", 0, &vec![0x5au8; 65536]);
    c.wait_drained("g");
    let (reports, go, stderr) = (c.root().join("reports"), c.root().join("go"), c.root().join("drill-run.err"));
    // The command ends while the secondary's daemon is stopped.
    let script = format!("while [ ! -e {} ]; do sleep 0.1; done; echo checked", go.display());
    let reports_arg = reports.display().to_string();
    let (run, ready_ms) =
        spawn_drill_run(&c, &["--timeout", "120s", "--report", &reports_arg, "--", "sh", "-c", &script], Some(&stderr));
    assert!(ready_ms > 0.0, "time to ready {ready_ms}");
    c.stop(Site::B);
    std::fs::write(&go, b"").expect("go");
    // drill run waits for the daemon.
    wait_for_text(&stderr, "waiting up to");
    c.start(Site::B);
    let out = run.wait_with_output().expect("drill run");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), std::fs::read_to_string(&stderr).unwrap_or_default());
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", c.diagnostics());
    assert!(text.contains("Result:** passed") && text.contains("checked"), "{text}");
    assert!(c.status(Site::B, "g").drill.is_none(), "drill run stops the drill");
    let history: serde_json::Value =
        serde_json::from_slice(&c.cli(Site::B, &["drill", "history", "g", "--json"]).stdout).expect("history json");
    assert_eq!(history[0]["result"], "passed", "{history}");
    assert_eq!(history[0]["outcome"]["exit_code"], 0, "{history}");
    // The drill outlived the restart with its time to ready.
    let recorded = history[0]["ready_ms"].as_f64().unwrap_or(0.0);
    assert!((recorded - ready_ms).abs() < 0.01, "time to ready {ready_ms} ms, recorded {recorded}: {history}");
    let ours = std::fs::read_dir(&reports).expect("--report dir").count();
    assert_eq!(ours, 2, "the report, JSON and Markdown");
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical("g");
}

/// `drill run` waiting for a daemon that does not come back, stopped with
/// Ctrl-C: exit 1, and `--report` holds the command's outcome (result
/// `unrecorded`); the drill copy is left for `drill stop`.
#[test]
fn a_drill_run_whose_daemon_stays_away_writes_its_outcome_into_the_report() {
    let mut c = two_volume_cluster(Mode::Async, |o| o);
    let (reports, stderr) = (c.root().join("reports"), c.root().join("drill-run.err"));
    let reports_arg = reports.display().to_string();
    let (run, _) =
        spawn_drill_run(&c, &["--report", &reports_arg, "--", "sh", "-c", "sleep 2; echo checked"], Some(&stderr));
    c.stop(Site::B);
    wait_for_text(&stderr, "waiting up to");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let out = run.wait_with_output().expect("drill run");
    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("stopped waiting") && text.contains("status: exit code 0"), "{text}");
    let json = std::fs::read_dir(&reports)
        .expect("--report dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a JSON report");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("json");
    assert_eq!(report["result"], "unrecorded", "{report}");
    assert_eq!(report["outcome"]["exit_code"], 0, "{report}");
    assert!(report["outcome"]["output_tail"].as_str().unwrap_or("").contains("checked"), "{report}");
    // The drill copy outlived it all: `drill stop` ends it.
    c.start(Site::B);
    assert!(c.status(Site::B, "g").drill.is_some(), "the drill copy is gone");
    cli_ok(&c, Site::B, &["drill", "stop", "g"]);
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical("g");
}

#[test]
fn a_drill_copy_survives_a_power_cut_of_the_secondary_under_load() {
    let mut c = two_volume_cluster(Mode::Sync, ClusterOpts::with_power_cut_fs);
    let load = Load::start(&c, Site::A, 11);
    load.wait_for(300);
    cli_ok(&c, Site::B, &["drill", "start", "g"]);
    let marker = vec![0xc3u8; 4096];
    write_export(&c.nbd_socket(Site::B), "drill/v1", 8 * 4096, &marker);
    let before = drill_images(&c);
    let log = load.log.lock().expect("log").clone();
    consistent_point(&before, &log, &[(1, 8)]);
    // The replica is written all over while the drill runs (chunks are
    // preserved), then the secondary loses power mid-load.
    load.wait_for(load.acked() + 1500);
    let cut = c.power_cut(Site::B);
    println!("POWER-CUT during a drill: {} dirty page(s) dropped", cut.dropped);
    c.start(Site::B);
    c.wait_pair("g", Duration::from_secs(90));
    assert_eq!(drill_images(&c), before, "the drill copy changed across a power cut");
    let acked = load.pause();
    let log = load.finish();
    c.wait_drained("g");
    cli_ok(&c, Site::B, &["drill", "stop", "g"]);
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical("g");
    // The replica holds every acknowledged write (sync mode), the power
    // cut of the secondary notwithstanding.
    let replica: Vec<Vec<u8>> =
        VOLUMES.iter().map(|v| std::fs::read(c.volume_path(Site::B, v)).expect("read the replica")).collect();
    let k = consistent_point(&replica, &log, &[]);
    assert!(k >= acked, "the replica holds the writes through {k} only; {acked} were acknowledged");
}

/// `drill run --report DIR` creates DIR and its missing parents durably:
/// the report it said it wrote survives a power cut of the host (the
/// files were fsynced, but a new directory's entry needs its parent's).
#[test]
fn a_drill_report_survives_a_power_cut() {
    let mut c = two_volume_cluster(Mode::Async, ClusterOpts::with_power_cut_fs);
    write_export(&c.nbd_socket(Site::A), "v0", 0, &vec![0x5au8; 65536]);
    c.wait_drained("g");
    let reports = c.state_dir(Site::B).with_file_name("audit").join("2026");
    let out = c.cli(Site::B, &["drill", "run", "g", "--report", &reports.display().to_string(), "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", describe_output(&out), c.diagnostics());
    let cut = c.power_cut(Site::B);
    println!("POWER-CUT after a drill run: {} dirty page(s) dropped", cut.dropped);
    let mut kept: Vec<String> = std::fs::read_dir(&reports)
        .unwrap_or_else(|e| panic!("the report directory {} is gone: {e}", reports.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept.len(), 2, "the JSON and Markdown reports: {kept:?}");
    let json = std::fs::read(reports.join(&kept[0])).expect("read the JSON report");
    let record: serde_json::Value = serde_json::from_slice(&json).expect("the JSON report parses");
    assert_eq!(record["result"], "passed", "{record}");
    c.start(Site::B);
    c.wait_pair("g", Duration::from_secs(90));
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical("g");
}

/// A pair of two 64 MiB volumes whose secondary was away while more than
/// its journal's worth was written (the primary fell back to its dirty
/// bitmaps), with a drill running on the secondary, returned and caught in
/// the middle of the resync that follows: the guard holds some chunks. The
/// load on the primary goes on throughout (once the journal has room, new
/// writes are journaled and shipped while the bitmap's regions are still
/// to be copied: they follow a gap the replica must not apply across while
/// claiming consistency).
struct MidResync {
    c: Cluster,
    load: Load,
    drill_before: Vec<Vec<u8>>,
    k_drill: u64,
    guard: replicator::group::FailoverImage,
    /// Writes the primary tracked in its dirty bitmaps (not journaled, so
    /// given no sequence) before the journal filled while site-b was away:
    /// the write with sequence N is the load's write N + `unjournaled`.
    unjournaled: u64,
}

fn caught_in_a_resync(opts: impl FnOnce(ClusterOpts) -> ClusterOpts) -> MidResync {
    const BIG: u64 = 64 * MIB;
    let spec = GroupSpec::new("g", Mode::Async)
        .volume("v0", BIG)
        .volume("v1", BIG)
        .journal_size(16 * MIB)
        .extra("drill_chunk = \"64KiB\"");
    let c = Cluster::new(opts(ClusterOpts::group(spec)));
    c.pair_create("g");
    c.wait_pair("g", Duration::from_secs(120));
    let load = Load::start_over(&c, Site::A, 23, BIG / BLOCK as u64);
    load.wait_for(300);
    cli_ok(&c, Site::B, &["drill", "start", "g"]);
    let drill_before = drill_images(&c);
    let log = load.log.lock().expect("log").clone();
    let k_drill = consistent_point(&drill_before, &log, &[]);
    // Before site-b goes, the pair may have fallen behind the load (and
    // the journal overflowed into the bitmaps) more than once: with the
    // load paused and the pair in sync, every write is either journaled or
    // was copied, and the journal's sequences run behind the load's count
    // by the writes that were not journaled. No such write comes before
    // the journal fills after site-b is gone.
    let acked = load.pause();
    c.wait_until(Site::A, "g", "the pair in sync with the load paused", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.dirty_bytes == 0
    });
    let unjournaled = acked - c.status(Site::A, "g").last_seq;
    let mut c = c;
    c.stop(Site::B);
    load.resume();
    c.wait_until(Site::A, "g", "the journal overflowing into the bitmaps", Duration::from_secs(60), |s| {
        s.dirty_bytes > 0
    });
    // Enough regions dirty that the resync takes a while.
    load.wait_for(load.acked() + 12_000);
    let dirty = c.status(Site::A, "g").dirty_bytes;
    assert!(dirty > 32 * MIB, "only {dirty} bytes dirty in the bitmaps");
    c.start(Site::B);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls = 0u64;
    let (status, guard) = loop {
        let s = c.status(Site::B, "g");
        if let Some(f) = s.failover_image.clone().filter(|f| f.source == "resync-guard" && f.preserved_bytes > 0) {
            break (s, f);
        }
        polls += 1;
        let over = polls % 50 == 0 && {
            let a = c.status(Site::A, "g");
            a.state == "PAIR" && a.dirty_bytes == 0
        };
        assert!(
            Instant::now() < deadline && !over,
            "the resync was not seen in progress (state {}, failover image {:?})\n{}",
            s.state,
            s.failover_image,
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(!status.consistent, "status claims a consistent replica during the resync");
    println!(
        "RESYNC-GUARD: sequence {} preserved, {} bytes held when the resync was caught",
        guard.seq, guard.preserved_bytes
    );
    MidResync { c, load, drill_before, k_drill, guard, unjournaled }
}

/// After the primary is gone: `failover` (no --force) on site-b rolls the
/// resync back to exactly the guard's point, the promoted image is one
/// write-order-consistent point of both volumes, and the drill copy kept
/// its own image and stops cleanly on the new primary.
fn fail_over_to_the_guard(m: MidResync) {
    let MidResync { mut c, load, drill_before, k_drill, guard, unjournaled } = m;
    let log = &load.finish();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status(Site::B, "g").connected {
        assert!(Instant::now() < deadline, "site-b did not notice the primary is gone");
        std::thread::sleep(Duration::from_millis(50));
    }
    let human = describe_output(&c.cli(Site::B, &["status", "g"]));
    assert!(human.contains("failover image: the image preserved when the running resync started"), "{human}");
    let report = cli_ok(&c, Site::B, &["failover", "g"]);
    println!("{report}");
    assert!(report.contains("rolled back"), "{report}");
    assert!(report.contains(&format!("sequence {}", guard.seq)), "{report}");
    let s = c.status(Site::B, "g");
    assert!(s.role == "primary" && s.consistent && s.failover_image.is_none(), "{s:?}");
    // What was rolled back (the chunks the resync had overwritten durably;
    // after a power cut, possibly fewer than the guard held in memory).
    let rewritten: u64 = report
        .split("rolled back (")
        .nth(1)
        .and_then(|r| r.split(" bytes").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rolled-back byte count in: {report}"));
    assert!(s.dirty_bytes >= rewritten, "rolled-back regions must be copied at failback: {s:?}");
    assert!(!c.state_dir(Site::B).join("groups/g/resync-guard").exists(), "the guard's files are removed");

    let images: Vec<Vec<u8>> = VOLUMES.iter().map(|v| read_export(&c.nbd_socket(Site::B), v)).collect();
    let k = consistent_point(&images, log, &[]);
    println!(
        "RESYNC-GUARD: failover image at write {k} (sequence {}; drill at {k_drill}, load wrote {})",
        k - unjournaled,
        log.len()
    );
    // Every write up to the bitmap period was journaled in order; the
    // guard holds exactly those.
    assert_eq!(k, guard.seq + unjournaled, "the failover image is not the image at the recovery point");
    assert!(k >= k_drill, "the failover image ({k}) is older than the drill's ({k_drill})");

    assert_eq!(drill_images(&c), drill_before, "the drill copy changed");
    cli_ok(&c, Site::B, &["drill", "stop", "g"]);
    assert!(c.status(Site::B, "g").drill.is_none());
    c.stop(Site::B);
}

/// Issue 10, item 5 and "a drill never blocks failover": the primary dies
/// in the middle of a resync of a consistent replica that also has a drill
/// running; the failover lands on the image preserved when the resync
/// started.
#[test]
fn failover_during_a_resync_and_a_drill_lands_on_consistent_images() {
    let mut m = caught_in_a_resync(ClusterOpts::with_metrics);
    m.c.signal(Site::A, nix::sys::signal::Signal::SIGSTOP);
    // The metric an on-call admin watches says a guard holds data.
    let (_, _, body) = m.c.scrape(Site::B, "/metrics").expect("scrape site-b");
    let held: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("replicator_resync_guard_bytes{group=\"g\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no replicator_resync_guard_bytes for g:\n{body}"));
    assert!(held >= m.guard.preserved_bytes as f64, "metric {held}, status {}", m.guard.preserved_bytes);
    m.c.kill9(Site::A);
    fail_over_to_the_guard(m);
}

/// The guard follows the durability rules: the secondary loses power in
/// the middle of the resync (unsynced data dropped), the primary is lost
/// too, and after the secondary's restart the failover still lands on the
/// preserved image.
#[test]
fn a_resync_guard_survives_a_power_cut_of_the_secondary() {
    let mut m = caught_in_a_resync(ClusterOpts::with_power_cut_fs);
    let cut = m.c.power_cut(Site::B);
    println!("POWER-CUT mid-resync: {} dirty page(s) dropped", cut.dropped);
    m.c.signal(Site::A, nix::sys::signal::Signal::SIGSTOP);
    m.c.kill9(Site::A);
    m.c.start(Site::B);
    let s = m.c.status(Site::B, "g");
    let f = s.failover_image.clone().expect("a secondary shows its failover image");
    assert!(!s.consistent && f.source == "resync-guard" && f.seq == m.guard.seq, "after the power cut: {s:?}");
    fail_over_to_the_guard(m);
}

/// A replica split with --rw holds writes made on it: a drill copy of it
/// would be no recovery point of the primary, and is refused.
#[test]
fn a_drill_of_a_replica_written_while_split_is_refused() {
    let c = two_volume_cluster(Mode::Async, |o| o);
    cli_ok(&c, Site::B, &["pair", "split", "g", "--rw"]);
    write_export(&c.nbd_socket(Site::B), "v0", 0, &[7u8; 4096]);
    let out = c.cli(Site::B, &["drill", "start", "g"]);
    let text = describe_output(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("split with --rw"), "{text}");
    assert!(c.status(Site::B, "g").drill.is_none());
}

/// A tmpfs of `size` mounted at `path`, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(path: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {}", describe_output(&out));
        SmallFs(path.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// The secondary's state_dir fills while a drill runs (its copy-on-write
/// takes what the replica's overwritten blocks held): the drill copy is
/// discarded, said in `drill status`, and replication goes on; the drill
/// stops as usual, and a restart works. Before, the failed copy-on-write
/// failed the apply: the group stopped, and the restart's replay failed on
/// it again, keeping the whole daemon down.
#[test]
fn a_drill_copy_that_fills_the_state_dir_is_discarded_and_replication_goes_on() {
    if !replicator_tests::require_root("a_drill_copy_that_fills_the_state_dir_is_discarded_and_replication_goes_on") {
        return;
    }
    let spec = GroupSpec::new("f", Mode::Async).volume("fv", 32 * MIB).journal_size(16 * MIB);
    let mut opts = ClusterOpts::group(spec);
    opts.start = false;
    let mut c = Cluster::new(opts);
    // Room for the restore journal, the state and a few MiB of drill copy.
    let fs = SmallFs::mount(&c.state_dir(Site::B), "22m");
    c.start(Site::A);
    c.start(Site::B);
    c.pair_create("f");
    c.wait_pair("f", Duration::from_secs(60));
    cli_ok(&c, Site::B, &["drill", "start", "f"]);
    // 12 MiB: more than the drill copy has room for, less than the
    // primary's journal holds (a full journal would start a resync, whose
    // own preserved image is another matter).
    let mut rng = Rng::new(31);
    for i in 0..12u64 {
        let mut data = vec![0u8; MIB as usize];
        rng.fill(&mut data);
        write_export(&c.nbd_socket(Site::A), "fv", i * MIB, &data);
    }
    c.wait_drained_within("f", Duration::from_secs(60));
    let drill = c.status(Site::B, "f").drill.expect("the drill is still there");
    assert!(
        drill.discarded.as_deref().is_some_and(|why| why.contains("copy-on-write failed")),
        "{drill:?}\n{}",
        c.diagnostics()
    );
    let shown = cli_ok(&c, Site::B, &["drill", "status", "f"]);
    assert!(shown.contains("DRILL COPY DISCARDED"), "{shown}");
    assert!(c.status(Site::B, "f").last_error.is_none(), "the group must not have stopped");
    cli_ok(&c, Site::B, &["drill", "stop", "f"]);
    // The drill's record says so (it said `manual`, or `passed` for a
    // `drill run` whose command exited 0 on a discarded copy).
    let history: serde_json::Value =
        serde_json::from_slice(&c.cli(Site::B, &["drill", "history", "f", "--json"]).stdout).expect("history json");
    assert_eq!(history[0]["result"], "discarded", "{history}");
    assert!(history[0]["discarded"].as_str().is_some_and(|why| why.contains("copy-on-write failed")), "{history}");
    c.stop(Site::B);
    c.start(Site::B);
    c.assert_converged("f");
    drop(fs);
}

/// A resync that cannot preserve the secondary's consistent image (its
/// files cannot be made: here the guard's directory refuses new files, as a
/// full `state_dir` would) leaves the replica consistent and behind, and
/// the secondary running: it used to stop the group until a restart, and
/// with it `failover`. Once the files can be made, the resync runs.
#[test]
fn a_resync_whose_image_cannot_be_preserved_leaves_the_replica_consistent_and_running() {
    if !replicator_tests::require_root(
        "a_resync_whose_image_cannot_be_preserved_leaves_the_replica_consistent_and_running",
    ) {
        return;
    }
    let mut c = resync_due("pi", |o| o);
    let guard = c.state_dir(Site::B).join("groups").join("pi").join("resync-guard");
    std::fs::create_dir_all(&guard).expect("mkdir");
    let immutable = Immutable::set(guard);
    c.signal(Site::A, nix::sys::signal::Signal::SIGCONT);
    let b = c.wait_until(Site::B, "pi", "refusing the resync", Duration::from_secs(30), |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("cannot preserve"))
    });
    assert!(b.consistent, "{b:?}");
    std::thread::sleep(Duration::from_secs(2));
    let b = c.status(Site::B, "pi");
    assert!(
        b.health != "critical" && !b.last_error.as_deref().unwrap_or("").contains("stopped taking writes"),
        "the secondary stopped: {b:?}"
    );
    drop(immutable);
    c.wait_until(Site::A, "pi", "the resync done", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.dirty_bytes == 0 && s.connected
    });
    c.assert_converged("pi");
}

/// An async pair `<name>` of one 64 MiB volume `<name>v` (16 MiB journal)
/// whose secondary was away while 24 MiB were written (the primary tracks
/// what its journal did not hold in its bitmaps), then started again with
/// the primary frozen (SIGSTOP): the caller prepares site-b (a start
/// removes what an earlier guard left), then thaws site-a, whose resync
/// begins.
fn resync_due(name: &str, opts: impl FnOnce(ClusterOpts) -> ClusterOpts) -> Cluster {
    let vol = format!("{name}v");
    let spec = GroupSpec::new(name, Mode::Async).volume(&vol, 64 * MIB).journal_size(16 * MIB);
    let mut c = Cluster::new(opts(ClusterOpts::group(spec)));
    c.pair_create(name);
    c.wait_pair(name, Duration::from_secs(60));
    write_export(&c.nbd_socket(Site::A), &vol, 0, &vec![1u8; MIB as usize]);
    c.wait_drained(name);
    c.stop(Site::B);
    for i in 0..24u64 {
        write_export(&c.nbd_socket(Site::A), &vol, i * MIB, &vec![2 + i as u8; MIB as usize]);
    }
    c.wait_until(Site::A, name, "tracking writes in the bitmaps", Duration::from_secs(30), |s| s.dirty_bytes > 0);
    c.signal(Site::A, nix::sys::signal::Signal::SIGSTOP);
    c.start(Site::B);
    c
}

/// The image a resync preserves cannot grow mid-resync (a write into its
/// data file fails, as on a full `state_dir`): the chunk is not
/// overwritten, the secondary's group stops with an error that names the
/// image's directory (it named the volume), and after a restart the
/// resync completes.
#[test]
fn a_resync_guard_that_cannot_grow_stops_the_secondary_and_says_where() {
    let mut c = resync_due("pg", ClusterOpts::with_power_cut_fs);
    let armed = c.fs_command(Site::B, "fail-write resync-guard/pgv.data");
    assert!(armed.starts_with("ok armed"), "{armed}");
    c.signal(Site::A, nix::sys::signal::Signal::SIGCONT);
    let b = c.wait_until(Site::B, "pg", "stopped by the failed copy-on-write", Duration::from_secs(60), |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("resync-guard"))
    });
    let error = b.last_error.unwrap_or_default();
    assert!(error.contains("not overwritten") && error.contains("groups/pg/resync-guard"), "{error}");
    // (A stop reports the failure: exit status 1.)
    c.kill9(Site::B);
    c.start(Site::B);
    c.wait_until(Site::A, "pg", "the resync done", Duration::from_secs(90), |s| {
        s.state == "PAIR" && s.dirty_bytes == 0 && s.connected
    });
    c.assert_converged("pg");
}

/// A failover during a resync whose promotion cannot be saved at once (the
/// group's state directory refuses new files: `chattr +i`) rolls back and
/// is in effect all the same; once its save lands, the resync's preserved
/// image goes, as after a failover saved at once. (It stayed until a
/// restart, and meanwhile refused every session to this node for a
/// rollback in progress.)
#[test]
fn a_failover_during_a_resync_saved_late_lets_the_preserved_image_go() {
    if !replicator_tests::require_root("a_failover_during_a_resync_saved_late_lets_the_preserved_image_go") {
        return;
    }
    let mut m = caught_in_a_resync(|o| o);
    m.c.signal(Site::A, nix::sys::signal::Signal::SIGSTOP);
    m.c.kill9(Site::A);
    let MidResync { c, load, .. } = m;
    load.finish();
    c.wait_until(Site::B, "g", "disconnected from the dead primary", Duration::from_secs(60), |s| !s.connected);
    let dir = c.state_dir(Site::B).join("groups").join("g");
    assert!(dir.join("resync-guard").exists(), "no preserved image in {}", dir.display());
    let frozen = Immutable::set(dir.clone());
    let out = c.cli(Site::B, &["failover", "g"]);
    drop(frozen);
    let text = describe_output(&out);
    assert!(!out.status.success() && text.contains("cannot persist") && text.contains("rolled back"), "{text}");
    c.wait_until(Site::B, "g", "the promotion", Duration::from_secs(60), |s| s.role == "primary");
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir.join("resync-guard").exists() {
        assert!(
            Instant::now() < deadline,
            "the preserved image was kept after the promotion was saved\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = c.log(Site::B);
    assert!(log.contains("failover done: the image preserved for the resync is discarded"), "{log}");
}
