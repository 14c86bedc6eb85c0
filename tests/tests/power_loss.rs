//! Power cuts under load, on a file system that really loses what was not
//! made durable (issue 8, end-to-end part).
//!
//! Each site's state_dir and volume file live on `powercut-fs`, a FUSE
//! pass-through with a volatile write cache (see `src/bin/powercut-fs.rs`):
//! data written without fsync/fdatasync/O_DSYNC/RWF_DSYNC stays in memory,
//! and a power cut (`kill -9` of the daemon, then the cache dropped) loses it,
//! O_DIRECT writes included. The boot id is never touched: the daemon must
//! treat an unclean stop as a possible power loss by itself.
//!
//! Each cycle: two NBD clients write self-describing 4 KiB blocks
//! (`pattern::stamp`, 4–64 KiB per write, one request at a time each, in
//! disjoint halves of a 64 MiB volume, inside an 8 MiB window per cycle), with
//! a FLUSH about every 20 writes and FUA on about one write in 30. Each block
//! keeps its last version known durable (acknowledged with FUA, or before an
//! acknowledged FLUSH) and the versions sent since. Mid-load the primary, the
//! secondary or both lose power; the cut sites restart, the clients write
//! more while the pair recovers, and once the pair says PAIR with lag 0:
//! - I1: every block holds its durable version, or one of the versions sent
//!   after it — a flushed write that was not overwritten is never lost, and
//!   nothing else (torn, misplaced, older) appears (read back through NBD on
//!   the primary, and from the secondary's volume after a clean stop);
//! - I2: after a clean stop of both sites the volumes are byte-identical.
//!
//! The bytes each recovery resynchronised (`copy_total_bytes` of the session
//! that recovered) are printed per cycle (lines starting `POWER-LOSS`); run
//! with `--nocapture` to see them. `POWER_LOSS_CYCLES=N` runs N cycles per
//! configuration instead of 3.
//!
//! Needs root and /dev/fuse (fuse3's fusermount3 is installed by run-all.sh).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::{stamp, BlockState, Rng, BLOCK};
use replicator_tests::{require, require_root, write_backlog, Cluster, ClusterOpts, CutReport, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const VOLUME_SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = VOLUME_SIZE / BLOCK as u64;
/// Client tasks, each with its own half of the volume and its own connection.
const TASKS: u64 = 2;
/// Each cycle's writes of one task stay in a window this large (8 MiB).
const WINDOW_BLOCKS: u64 = 8 * MIB / BLOCK as u64;
/// A write is 1..=16 blocks (4 KiB to 64 KiB), one in eight
/// `MAX_WRITE_BLOCKS..=MAX_LARGE_WRITE_BLOCKS` (64 to 256 KiB: both journals
/// lay those out page-aligned, their payloads written with `O_DIRECT`).
const MAX_WRITE_BLOCKS: u64 = 16;
const MAX_LARGE_WRITE_BLOCKS: u64 = 64;
/// Cycles per configuration (`POWER_LOSS_CYCLES` overrides, for longer runs).
const CYCLES: u64 = 3;

fn cycles() -> u64 {
    std::env::var("POWER_LOSS_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(CYCLES)
}
/// The load before the cut, per task: bounded in count and in time.
const LOAD_MAX_OPS: u64 = 5_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(10);
/// Writes during recovery, per task.
const RECOVERY_MAX_OPS: u64 = 60;
const RECOVERY_MAX_TIME: Duration = Duration::from_millis(1500);
/// One NBD request may take this long (a sync primary waits for its link
/// timeout when the secondary is gone).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Recovery to PAIR with lag 0.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// A writer task, with the index of its group in `Run::loads`.
type Writer = (usize, tokio::task::JoinHandle<(Region, LoadStats)>);

/// Which sites lose power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Primary,
    Secondary,
    Both,
}

/// One task's half of the volume.
#[derive(Debug, Clone)]
struct Region {
    first: u64,
    blocks: Vec<BlockState>,
}

impl Region {
    fn state(&mut self, block: u64) -> &mut BlockState {
        &mut self.blocks[(block - self.first) as usize]
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct LoadStats {
    writes: u64,
    fua: u64,
    flushes: u64,
    /// The request that failed (the cut), if any.
    failed: u64,
}

impl std::ops::AddAssign for LoadStats {
    fn add_assign(&mut self, o: Self) {
        self.writes += o.writes;
        self.fua += o.fua;
        self.flushes += o.flushes;
        self.failed += o.failed;
    }
}

/// Connects, retrying while the daemon starts.
async fn connect(socket: &Path, export: &str) -> Option<NbdClient> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match NbdClient::connect_unix(socket, export).await {
            Ok(c) => return Some(c),
            Err(e) if Instant::now() > deadline => {
                eprintln!("NBD connect to {} failed: {e}", socket.display());
                return None;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One client task: writes inside `window` (block range) until `stop`, the
/// op count, the time limit or the first failed request.
#[allow(clippy::too_many_arguments)]
async fn writer(
    socket: PathBuf,
    export: String,
    mut region: Region,
    window: (u64, u64),
    seed: u64,
    versions: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    max_ops: u64,
    max_time: Duration,
    flush_one_in: u64,
) -> (Region, LoadStats) {
    let mut stats = LoadStats::default();
    let Some(client) = connect(&socket, &export).await else {
        stats.failed += 1;
        return (region, stats);
    };
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    // Blocks written (acknowledged) since the last acknowledged FLUSH.
    let mut touched: Vec<u64> = Vec::new();
    for _ in 0..max_ops {
        if stop.load(Ordering::Relaxed) || started.elapsed() > max_time {
            break;
        }
        if flush_one_in > 0 && rng.below(flush_one_in) == 0 {
            match tokio::time::timeout(REQUEST_TIMEOUT, client.flush()).await {
                Ok(Ok(())) => {
                    stats.flushes += 1;
                    for b in touched.drain(..) {
                        region.state(b).flushed();
                    }
                }
                _ => {
                    stats.failed += 1;
                    break;
                }
            }
            continue;
        }
        let n = match rng.below(8) {
            0 => MAX_WRITE_BLOCKS + rng.below(MAX_LARGE_WRITE_BLOCKS - MAX_WRITE_BLOCKS + 1),
            _ => 1 + rng.below(MAX_WRITE_BLOCKS),
        };
        let start = window.0 + rng.below(window.1 - window.0 - n + 1);
        // Rare enough that a cut usually finds data the daemon has not synced
        // (a FUA makes the daemon sync the whole volume and journal).
        let fua = rng.below(30) == 0;
        let v = versions.fetch_add(1, Ordering::Relaxed);
        let mut data = Vec::with_capacity((n as usize) * BLOCK);
        for b in start..start + n {
            data.extend_from_slice(&stamp(b, v));
            // Sent: from now on it may be on the disk.
            region.state(b).sent(v);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, client.write(start * BLOCK as u64, &data, fua)).await {
            Ok(Ok(())) => {
                stats.writes += 1;
                acked.fetch_add(1, Ordering::Relaxed);
                if fua {
                    stats.fua += 1;
                    for b in start..start + n {
                        region.state(b).durable_at(Some(v));
                    }
                } else {
                    touched.extend(start..start + n);
                }
            }
            _ => {
                stats.failed += 1;
                break;
            }
        }
    }
    let _ = client.disconnect().await;
    (region, stats)
}

/// Checks a whole volume image (read by `read(offset, len)`); returns the
/// version found per block, or the violations.
fn check_image(
    regions: &[Region],
    mut read: impl FnMut(u64, usize) -> Vec<u8>,
) -> Result<Vec<Option<u64>>, Vec<String>> {
    let mut found = Vec::with_capacity(BLOCKS as usize);
    let mut bad = Vec::new();
    const CHUNK: usize = MIB as usize;
    let mut off = 0u64;
    while off < VOLUME_SIZE {
        let data = read(off, CHUNK);
        assert_eq!(data.len(), CHUNK, "short read at {off}");
        for (i, blk) in data.chunks(BLOCK).enumerate() {
            let block = off / BLOCK as u64 + i as u64;
            let region = &regions[(block / (BLOCKS / TASKS)) as usize];
            match region.blocks[(block - region.first) as usize].check(block, blk) {
                Ok(v) => found.push(v),
                Err(e) => {
                    found.push(None);
                    bad.push(e);
                }
            }
        }
        off += CHUNK as u64;
    }
    if bad.is_empty() {
        Ok(found)
    } else {
        Err(bad)
    }
}

/// What a recovery looked like from the primary.
#[derive(Debug, Default)]
struct Recovery {
    /// Largest `copy_total_bytes` seen: the bytes the recovering session
    /// resynchronised.
    copy_total: u64,
    /// Largest `dirty_bytes` seen.
    dirty: u64,
    /// States the primary went through (deduplicated in order).
    states: Vec<String>,
    /// The primary's epoch (unclean restarts).
    epoch: u64,
}

impl Recovery {
    fn observe(&mut self, cluster: &Cluster, group: &str) {
        if !cluster.control_socket(Site::A).exists() {
            return;
        }
        if let Ok(resp) = cluster.control(Site::A, &replicator_tests::Request::Status { group: Some(group.into()) }) {
            if let Some(s) = resp.groups.into_iter().next() {
                // copy_total_bytes is set when a session starts and kept
                // until the next one: count it while a copy runs, and at
                // the end (see `wait_recovered`), not from the session
                // before the cut.
                if s.state == "COPY" {
                    self.copy_total = self.copy_total.max(s.copy_total_bytes);
                }
                self.dirty = self.dirty.max(s.dirty_bytes);
                self.epoch = s.epoch;
                let label = match &s.reason {
                    Some(r) => format!("{}({r})", s.state),
                    None => s.state.clone(),
                };
                if self.states.last() != Some(&label) {
                    self.states.push(label);
                }
            }
        }
    }
}

/// Waits until the primary is PAIR, connected, with lag 0 and nothing left
/// to copy, and the secondary PAIR; fails fast on SUSPENDED(error) or
/// SPLIT-BRAIN (held for 5 s).
fn wait_recovered(cluster: &Cluster, group: &str, rec: &mut Recovery, what: &str) {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut bad_since: Option<Instant> = None;
    loop {
        rec.observe(cluster, group);
        let a = cluster.status(Site::A, group);
        let b = cluster.status(Site::B, group);
        if a.state == "PAIR"
            && a.connected
            && a.lag_records == 0
            && a.applied_seq >= a.last_seq
            && a.dirty_bytes == 0
            && b.state == "PAIR"
        {
            rec.copy_total = rec.copy_total.max(a.copy_total_bytes);
            return;
        }
        let bad = a.state == "SPLIT-BRAIN"
            || b.state == "SPLIT-BRAIN"
            || (a.state == "SUSPENDED" && a.reason.as_deref() == Some("error"))
            || (b.state == "SUSPENDED" && b.reason.as_deref() == Some("error"));
        let give_up = match (bad, bad_since) {
            (true, None) => {
                bad_since = Some(Instant::now());
                false
            }
            (true, Some(t)) => t.elapsed() > Duration::from_secs(5),
            (false, _) => {
                bad_since = None;
                false
            }
        };
        if give_up || Instant::now() > deadline {
            panic!(
                "{what}: the pair did not recover to PAIR with lag 0 ({}); primary went through {:?}\n\
                 site-a: {}\nsite-b: {}\n{}",
                if give_up { "stuck in an error state" } else { "timeout" },
                rec.states,
                serde_json::to_string(&a).unwrap_or_default(),
                serde_json::to_string(&b).unwrap_or_default(),
                cluster.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Log lines of a site since its last start that say what recovery did.
fn recovery_log(cluster: &Cluster, site: Site) -> Vec<String> {
    let log = cluster.log(site);
    let since = log.rfind("e2e harness: starting").unwrap_or(0);
    log[since..]
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["power", "unclean", "resync", "diverg", "generation", "copy complete", "activity log", "epoch"]
                .iter()
                .any(|w| l.contains(w))
        })
        .map(|l| format!("{site}: {}", l.chars().take(260).collect::<String>()))
        .take(8)
        .collect()
}

/// One group's volume under load: its regions, one per task.
struct Load {
    group: String,
    vol: String,
    regions: Vec<Region>,
}

struct Run {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    /// The groups under load (the first one's states are reported).
    loads: Vec<Load>,
    versions: Arc<AtomicU64>,
    /// Writes acknowledged, all cycles (the cut waits for one of its own).
    acked: Arc<AtomicU64>,
    rng: Rng,
    label: String,
    /// Dirty pages the cuts dropped, all cycles.
    dropped: u64,
    /// Each writer flushes before one write in this many (0: never).
    flush_one_in: u64,
}

impl Run {
    /// A paired cluster on powercut-fs. With `during_copy`, returns as soon
    /// as `pair create` is accepted, while the initial copy runs.
    fn new(mode: Mode, label: &str, seed: u64, during_copy: bool) -> Option<Run> {
        Self::with_groups(mode, label, seed, during_copy, 1)
    }

    /// The same with `groups` groups, each with its own volume and tasks.
    fn with_groups(mode: Mode, label: &str, seed: u64, during_copy: bool, groups: usize) -> Option<Run> {
        if !require_root(label) {
            return None;
        }
        require("fusermount3");
        if !Path::new("/dev/fuse").exists() {
            panic!("{label}: /dev/fuse is missing (modprobe fuse)");
        }
        let names: Vec<String> = (0..groups)
            .map(|i| if groups == 1 { format!("pl{}", mode.as_str()) } else { format!("pl{}{i}", mode.as_str()) })
            .collect();
        let specs = names
            .iter()
            .map(|g| {
                GroupSpec::new(g, mode).volume(&format!("{g}-vol"), VOLUME_SIZE).link_timeout(Duration::from_secs(1))
            })
            .collect();
        let cluster = Cluster::new(ClusterOpts::new(specs).with_power_cut_fs());
        // run-all.sh runs this suite a second time on the thread-pool
        // backend: make sure the daemons really use it then.
        let backend = cluster.status(Site::A, &names[0]).io_backend;
        if std::env::var("REPLICATOR_IO_BACKEND").is_ok_and(|v| v == "threads") {
            assert_eq!(backend, "threads", "REPLICATOR_IO_BACKEND=threads did not reach the daemon");
        }
        eprintln!("POWER-LOSS {label}: I/O backend {backend}");
        for g in &names {
            cluster.pair_create(g);
        }
        if !during_copy {
            for g in &names {
                cluster.wait_pair(g, Duration::from_secs(120));
                cluster.wait_drained(g);
            }
        }
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
        let per = BLOCKS / TASKS;
        let loads = names
            .into_iter()
            .map(|group| Load {
                vol: format!("{group}-vol"),
                group,
                regions: (0..TASKS)
                    .map(|t| Region { first: t * per, blocks: vec![BlockState::default(); per as usize] })
                    .collect(),
            })
            .collect();
        Some(Run {
            cluster,
            rt,
            loads,
            versions: Arc::new(AtomicU64::new(1)),
            acked: Arc::new(AtomicU64::new(0)),
            rng: Rng::new(seed),
            label: label.to_string(),
            dropped: 0,
            flush_one_in: 20,
        })
    }

    /// Starts one writer per task of every group; returns their handles,
    /// each with its group's index in `loads`.
    fn start_writers(&mut self, stop: &Arc<AtomicBool>, max_ops: u64, max_time: Duration) -> Vec<Writer> {
        let mut handles = Vec::new();
        for i in 0..self.loads.len() {
            let regions = std::mem::take(&mut self.loads[i].regions);
            for region in regions {
                let per = region.blocks.len() as u64;
                let start = region.first + self.rng.below((per - WINDOW_BLOCKS) / 256 + 1) * 256;
                let window = (start, start + WINDOW_BLOCKS);
                let fut = writer(
                    self.cluster.nbd_socket(Site::A),
                    self.loads[i].vol.clone(),
                    region,
                    window,
                    self.rng.next_u64(),
                    self.versions.clone(),
                    self.acked.clone(),
                    stop.clone(),
                    max_ops,
                    max_time,
                    self.flush_one_in,
                );
                handles.push((i, self.rt.spawn(fut)));
            }
        }
        handles
    }

    fn join_writers(&mut self, handles: Vec<Writer>) -> LoadStats {
        let mut total = LoadStats::default();
        for (i, h) in handles {
            let (region, stats) = self.rt.block_on(h).expect("writer task");
            self.loads[i].regions.push(region);
            total += stats;
        }
        for load in &mut self.loads {
            load.regions.sort_by_key(|r| r.first);
        }
        total
    }

    /// I1 on the primary, read back through NBD; then a FLUSH makes what
    /// was read the new durable state of every block.
    fn check_primary_and_settle(&mut self, when: &str) {
        let socket = self.cluster.nbd_socket(Site::A);
        for load in &mut self.loads {
            let client = self.rt.block_on(connect(&socket, &load.vol)).expect("NBD connect to the primary");
            let result = check_image(&load.regions, |off, len| {
                self.rt.block_on(client.read(off, len as u32)).unwrap_or_else(|e| panic!("NBD read at {off}: {e}"))
            });
            let found = match result {
                Ok(found) => found,
                Err(bad) => panic!(
                    "{}: {when}: {} block(s) of the primary's volume {} (read through NBD) break I1, first:\n{}\n{}",
                    self.label,
                    bad.len(),
                    load.vol,
                    bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
                    self.cluster.diagnostics()
                ),
            };
            self.rt.block_on(client.flush()).expect("NBD flush");
            let _ = self.rt.block_on(client.disconnect());
            for (block, v) in found.into_iter().enumerate() {
                let block = block as u64;
                let region = &mut load.regions[(block / (BLOCKS / TASKS)) as usize];
                region.state(block).durable_at(v);
            }
        }
    }

    /// Clean stop of both sites; I2 (volumes identical) and I1 on the
    /// secondary's volume; then both start again and pair.
    fn stop_compare_restart(&mut self, when: &str) -> (String, String) {
        for load in &self.loads {
            self.cluster.wait_drained(&load.group);
        }
        self.cluster.stop(Site::A);
        self.cluster.stop(Site::B);
        let dirty = (self.cluster.fs_command(Site::A, "files"), self.cluster.fs_command(Site::B, "files"));
        // A clean stop made everything durable: the power cut that follows
        // loses nothing the comparison, I1 or the restart depends on (the
        // volumes are read through the file system, which would serve
        // pages a stop left unsynced).
        self.cluster.power_cut_stopped(Site::A);
        self.cluster.power_cut_stopped(Site::B);
        for load in &self.loads {
            self.cluster.assert_volumes_identical(&load.group);
            let path = self.cluster.volume_path(Site::B, &load.vol);
            let file = std::fs::File::open(&path).expect("secondary volume");
            let r = check_image(&load.regions, |off, len| {
                let mut buf = vec![0u8; len];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, off).expect("read the secondary's volume");
                buf
            });
            if let Err(bad) = r {
                panic!(
                    "{}: {when}: the secondary's volume {} breaks I1:\n{}",
                    self.label,
                    load.vol,
                    bad[..bad.len().min(10)].join("\n")
                );
            }
        }
        self.cluster.start(Site::A);
        self.cluster.start(Site::B);
        for load in &self.loads {
            self.cluster.wait_pair(&load.group, Duration::from_secs(60));
        }
        dirty
    }

    /// One cycle: load, cut, restart, writes during recovery, checks.
    fn cycle(&mut self, cycle: u64, target: Target, keep: Option<f64>) {
        let t0 = Instant::now();
        let when =
            format!("cycle {cycle} ({target:?} cut{})", keep.map(|k| format!(", keeping {k}")).unwrap_or_default());
        // Load, then the cut in the middle of it.
        let stop = Arc::new(AtomicBool::new(false));
        let acked = self.acked.load(Ordering::Relaxed);
        let handles = self.start_writers(&stop, LOAD_MAX_OPS, LOAD_MAX_TIME);
        std::thread::sleep(Duration::from_millis(400 + self.rng.below(800)));
        // A loaded machine (the initial copy competing) may not have
        // acknowledged a write yet: the cut must find some.
        let waited = Instant::now();
        while self.acked.load(Ordering::Relaxed) == acked && waited.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let first = self.loads[0].group.clone();
        let before = self.cluster.status(Site::A, &first);
        let state_at_cut =
            format!("{} (copy {} of {} bytes)", before.state, before.copy_done_bytes, before.copy_total_bytes);
        let cut = |run: &mut Run, site: Site| -> CutReport {
            match keep {
                None => run.cluster.power_cut(site),
                Some(f) => {
                    let seed = run.rng.next_u64() % 1_000_000;
                    run.cluster.power_cut_keeping(site, seed, f)
                }
            }
        };
        let reports: Vec<(Site, CutReport)> = match target {
            Target::Primary => vec![(Site::A, cut(self, Site::A))],
            Target::Secondary => vec![(Site::B, cut(self, Site::B))],
            Target::Both => {
                if keep.is_none() {
                    let [a, b] = self.cluster.power_cut_both();
                    vec![(Site::A, a), (Site::B, b)]
                } else {
                    self.cluster.kill9(Site::B);
                    vec![(Site::A, cut(self, Site::A)), (Site::B, cut(self, Site::B))]
                }
            }
        };
        if target == Target::Secondary {
            // The primary goes on alone for a while.
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
        let load = self.join_writers(handles);
        assert!(load.writes > 0, "{}: {when}: no write was acknowledged before the cut ({load:?})", self.label);
        self.dropped += reports.iter().map(|(_, r)| r.dropped).sum::<u64>();

        // Restart, and write while the pair recovers.
        let mut rec = Recovery::default();
        match target {
            Target::Primary => self.cluster.start(Site::A),
            Target::Secondary => self.cluster.start(Site::B),
            Target::Both => {
                self.cluster.start(Site::B);
                self.cluster.start(Site::A);
            }
        }
        rec.observe(&self.cluster, &first);
        let state_at_restart = rec.states.last().cloned().unwrap_or_default();
        let stop = Arc::new(AtomicBool::new(false));
        let handles = self.start_writers(&stop, RECOVERY_MAX_OPS, RECOVERY_MAX_TIME);
        while !handles.iter().all(|(_, h)| h.is_finished()) {
            rec.observe(&self.cluster, &first);
            std::thread::sleep(Duration::from_millis(50));
        }
        let during = self.join_writers(handles);
        if during.failed > 0 {
            panic!(
                "{}: {when}: a write or flush failed during recovery ({during:?}); primary states {:?}\n{}",
                self.label,
                rec.states,
                self.cluster.diagnostics()
            );
        }
        for load in &self.loads {
            wait_recovered(&self.cluster, &load.group, &mut rec, &format!("{}: {when}: {}", self.label, load.group));
        }
        let recovered_in = t0.elapsed();
        let mut notes = recovery_log(&self.cluster, Site::A);
        notes.extend(recovery_log(&self.cluster, Site::B));

        // I1 on the primary, then I2 and I1 on the secondary.
        self.check_primary_and_settle(&when);
        let dirty_after_stop = self.stop_compare_restart(&when);
        let cuts = reports
            .iter()
            .map(|(s, r)| format!("{s} dropped {} kept {}", r.dropped, r.kept))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "POWER-LOSS {} {when}: load {} writes ({} FUA) {} flushes, {} request(s) cut; cut: {cuts} page(s); \
             primary state at the cut {state_at_cut}, at restart {state_at_restart}; {} writes ({} FUA) {} flushes during recovery; \
             primary states {:?}, epoch {}; resynced (copy_total_bytes) {} bytes = {:.1} MiB, max dirty_bytes {}; \
             recovered in {:.1} s, cycle {:.1} s; dirty pages after clean stop: site-a {:?} site-b {:?}",
            self.label,
            load.writes,
            load.fua,
            load.flushes,
            load.failed,
            during.writes,
            during.fua,
            during.flushes,
            rec.states,
            rec.epoch,
            rec.copy_total,
            rec.copy_total as f64 / MIB as f64,
            rec.dirty,
            recovered_in.as_secs_f64(),
            t0.elapsed().as_secs_f64(),
            dirty_after_stop.0,
            dirty_after_stop.1,
        );
        for n in notes {
            eprintln!("    {n}");
        }
    }

    fn finish(mut self, started: Instant, cycles: u64) {
        assert!(self.dropped > 0, "{}: no power cut dropped a page: the faults were not injected", self.label);
        self.cluster.stop(Site::A);
        self.cluster.stop(Site::B);
        for load in &self.loads {
            self.cluster.assert_volumes_identical(&load.group);
        }
        eprintln!("POWER-LOSS {}: passed, {cycles} cycles in {:.1} s", self.label, started.elapsed().as_secs_f64());
    }
}

fn run(mode: Mode, target: Target, keep: Option<f64>, label: &str, seed: u64) {
    let started = Instant::now();
    let Some(mut run) = Run::new(mode, label, seed, false) else { return };
    let cycles = cycles();
    for cycle in 0..cycles {
        run.cycle(cycle, target, keep);
    }
    run.finish(started, cycles);
}

/// Sync mode with clients that never flush (a FUA now and then): the
/// secondary defers its restore-journal syncs (at this light load, up to
/// its longer group commit, `journal_sync_delay_light`), so the cuts of the
/// secondary and of both sites drop records it had received and
/// acknowledged but not synced; the primary still holds them.
#[test]
fn sync_power_cuts_while_the_secondary_defers_its_journal_syncs() {
    let started = Instant::now();
    let label = "sync_power_cuts_while_the_secondary_defers_its_journal_syncs";
    let Some(mut run) = Run::new(Mode::Sync, label, 14, false) else { return };
    run.flush_one_in = 0;
    let cycles = cycles();
    for cycle in 0..cycles {
        run.cycle(cycle, if cycle % 2 == 0 { Target::Secondary } else { Target::Both }, None);
    }
    run.finish(started, cycles);
}

#[test]
fn sync_primary_power_cut_under_load() {
    run(Mode::Sync, Target::Primary, None, "sync_primary_power_cut_under_load", 11);
}

#[test]
fn sync_secondary_power_cut_under_load() {
    run(Mode::Sync, Target::Secondary, None, "sync_secondary_power_cut_under_load", 12);
}

#[test]
fn sync_both_sites_power_cut_under_load() {
    run(Mode::Sync, Target::Both, None, "sync_both_sites_power_cut_under_load", 13);
}

#[test]
fn async_primary_power_cut_under_load() {
    run(Mode::Async, Target::Primary, None, "async_primary_power_cut_under_load", 21);
}

#[test]
fn async_secondary_power_cut_under_load() {
    run(Mode::Async, Target::Secondary, None, "async_secondary_power_cut_under_load", 22);
}

#[test]
fn async_both_sites_power_cut_under_load() {
    run(Mode::Async, Target::Both, None, "async_both_sites_power_cut_under_load", 23);
}

/// The disks keep a random half of their volatile pages (any subset is
/// possible on real hardware): both sites, sync mode, cycling the target.
#[test]
fn power_cuts_keeping_a_random_subset_of_pages() {
    let label = "power_cuts_keeping_a_random_subset_of_pages";
    let started = Instant::now();
    let Some(mut run) = Run::new(Mode::Sync, label, 31, false) else { return };
    let targets = [Target::Primary, Target::Secondary, Target::Both];
    let cycles = cycles().max(3);
    for cycle in 0..cycles {
        run.cycle(cycle, targets[(cycle % 3) as usize], Some(0.5));
    }
    run.finish(started, cycles);
}

/// Six busy async groups on one pair of nodes: more than `pacing.rs` lets
/// defer at their configured delays, so the secondary stretches the group
/// commit of every group's restore journal, and its acks. The secondary,
/// both sites, then the primary lose power under load (two tasks per
/// group); every group must recover and hold exactly what was written (I1,
/// I2), as a lone group does.
#[test]
fn power_cuts_with_many_busy_async_groups() {
    let label = "power_cuts_with_many_busy_async_groups";
    let started = Instant::now();
    let Some(mut run) = Run::with_groups(Mode::Async, label, 51, false, 6) else { return };
    let targets = [Target::Secondary, Target::Both, Target::Primary];
    let cycles = cycles();
    for cycle in 0..cycles {
        run.cycle(cycle, targets[(cycle % 3) as usize], None);
    }
    run.finish(started, cycles);
}

/// The primary loses power while the initial copy runs, under load; then one
/// more cycle once paired.
#[test]
fn primary_power_cut_during_the_initial_copy() {
    let label = "primary_power_cut_during_the_initial_copy";
    let started = Instant::now();
    let Some(mut run) = Run::new(Mode::Sync, label, 41, true) else { return };
    run.cycle(0, Target::Primary, None);
    run.cycle(1, Target::Primary, None);
    run.finish(started, 2);
}

/// A backlog shipped from the primary's journal (nothing of it in memory,
/// read ahead of the stream, large records read with `O_DIRECT`) while the
/// secondary loses power: with the secondary away, 1 MiB and 4 KiB writes
/// are journaled; the primary is killed (-9) and restarted, so every record
/// is read back; once the secondary has taken part of the backlog it loses
/// power (its unsynced restore journal and volume writes are dropped), comes
/// back, and the primary ships again from where the secondary's durable
/// point says. Both volumes must end up holding exactly what was written.
#[test]
fn secondary_power_cut_while_a_backlog_ships_from_the_journal() {
    let label = "secondary_power_cut_while_a_backlog_ships_from_the_journal";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    let (group, vol) = ("plbacklog", "plbacklog-vol");
    let spec = GroupSpec::new(group, Mode::Async)
        .volume(vol, VOLUME_SIZE)
        .journal_size(160 * MIB)
        .link_timeout(Duration::from_secs(1));
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(120));
    c.stop(Site::B);

    // 48 writes of 1 MiB over the volume's first 48 MiB, each followed by
    // sixteen 4 KiB writes into its last 16 MiB; the expected image is kept.
    let expect = write_backlog(&c.nbd_socket(Site::A), vol, VOLUME_SIZE, 17);
    let backlog = c.status(Site::A, group).lag_records;
    assert!(
        backlog >= 48 * 17,
        "{label}: the backlog is not in the journal: lag {backlog} records\n{}",
        c.diagnostics()
    );
    c.kill9(Site::A);
    c.start(Site::A);
    c.start(Site::B);
    // Cut once part of the backlog is applied (or all of it, on a fast day).
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = loop {
        let s = c.status(Site::A, group);
        if (s.connected && s.lag_records < backlog) || Instant::now() > deadline {
            break s.lag_records;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let cut = c.power_cut(Site::B);
    eprintln!("{label}: secondary cut with {left} of {backlog} records left to apply: {cut:?}");
    c.start(Site::B);
    c.wait_pair(group, Duration::from_secs(120));
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    let image = std::fs::read(c.volume_path(Site::A, vol)).expect("read the primary's volume");
    assert!(image == expect, "{label}: the primary's volume does not hold what was written\n{}", c.diagnostics());
    c.assert_volumes_identical(group);
}

/// Writes the unpaired primary took without a flush (still in the write
/// cache) are sent by `pair create`'s copy; a chunk leaves the primary's
/// dirty bitmap once the secondary has it. Then the primary loses power. A
/// copy that sent them before they were durable here would leave the
/// secondary holding writes the primary lost, in regions nothing marks as
/// differing: back in PAIR with the sites different. The copy makes its
/// source durable first, so the primary keeps them and the sites agree.
#[test]
fn primary_power_cut_after_its_unflushed_writes_were_copied() {
    let label = "primary_power_cut_after_its_unflushed_writes_were_copied";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    let (group, vol) = ("plcopied", "plcopied-vol");
    let spec = GroupSpec::new(group, Mode::Async).volume(vol, VOLUME_SIZE).link_timeout(Duration::from_secs(1));
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    // Unpaired: no journal, no flush.
    let expect = write_backlog(&c.nbd_socket(Site::A), vol, VOLUME_SIZE, 23);
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(120));
    c.wait_drained(group);
    // The copy's end is saved (its chunks clean in the bitmap) with PAIR.
    std::thread::sleep(Duration::from_secs(1));
    let cut = c.power_cut(Site::A);
    eprintln!("{label}: primary cut: {cut:?}");
    c.start(Site::A);
    c.wait_pair(group, Duration::from_secs(120));
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    let image = std::fs::read(c.volume_path(Site::A, vol)).expect("read the primary's volume");
    assert!(image == expect, "{label}: the primary lost writes its copy had sent\n{}", c.diagnostics());
    c.assert_volumes_identical(group);
}

/// The exports advertise `NBD_FLAG_CAN_MULTI_CONN`: a FLUSH on one
/// connection makes durable every write acknowledged on any connection
/// before it. Writes on one connection, the FLUSH on another, then a power
/// cut of the primary: after its restart (and on the secondary, once
/// drained) every one of those writes is there. Both modes.
#[test]
fn a_flush_on_one_connection_covers_writes_acknowledged_on_another() {
    if !require_root("a_flush_on_one_connection_covers_writes_acknowledged_on_another") {
        return;
    }
    require("fusermount3");
    for mode in [Mode::Async, Mode::Sync] {
        let group = format!("mc{}", mode.as_str());
        let vol = format!("{group}-vol");
        let spec = GroupSpec::new(&group, mode).volume(&vol, 16 * MIB).link_timeout(Duration::from_secs(1));
        let mut cluster = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
        cluster.pair_create(&group);
        cluster.wait_pair(&group, Duration::from_secs(60));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        const WRITES: u64 = 64;
        rt.block_on(async {
            let writer = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("connect");
            let flusher = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("connect");
            for b in 0..WRITES {
                writer.write(b * BLOCK as u64, &stamp(b, 7), false).await.expect("write");
            }
            flusher.flush().await.expect("flush on the other connection");
        });
        let cut = cluster.power_cut(Site::A);
        eprintln!("MULTI-CONN {mode:?}: the cut dropped {} page(s)", cut.dropped);
        cluster.start(Site::A);
        let image = rt.block_on(async {
            let c = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("connect");
            c.read(0, (WRITES * BLOCK as u64) as u32).await.expect("read")
        });
        for b in 0..WRITES {
            let at = (b as usize) * BLOCK;
            assert!(
                image[at..at + BLOCK] == stamp(b, 7)[..],
                "{mode:?}: block {b}, written on one connection and flushed on another, lost in the power cut"
            );
        }
        cluster.wait_pair(&group, Duration::from_secs(60));
        cluster.assert_converged(&group);
    }
}

/// Bytes for `len` bytes at `offset` of a volume, each 512-byte sector its
/// own value: a piece written at the wrong place or left out shows.
fn sector_pattern(offset: u64, len: usize, tag: u8) -> Vec<u8> {
    (0..len as u64).map(|i| (((offset + i) / 512) as u8).wrapping_mul(31) ^ tag).collect()
}

/// A group whose journal holds records of at most 8 MiB takes a 32 MiB
/// write from a client that never asked for block sizes (the protocol's
/// default maximum) as several records. A FUA one at an unaligned offset,
/// one without FUA followed by a FLUSH and one neither, then a power cut of
/// the primary: after its restart the first two are there, and the
/// secondary ends up with the same volume. Both modes.
#[test]
fn a_write_split_into_several_records_survives_a_power_cut() {
    if !require_root("a_write_split_into_several_records_survives_a_power_cut") {
        return;
    }
    require("fusermount3");
    const LEN: usize = 32 * MIB as usize;
    // Unaligned, ending unaligned too: its first and last pieces are
    // read-modify-written.
    let (fua_at, flushed_at) = (1000u64, 40 * MIB);
    for mode in [Mode::Async, Mode::Sync] {
        let group = format!("sp{}", mode.as_str());
        let vol = format!("{group}-vol");
        let spec = GroupSpec::new(&group, mode)
            .volume(&vol, 96 * MIB)
            .journal_size(16 * MIB)
            .link_timeout(Duration::from_secs(1))
            // Every piece journaled (waiting for room) rather than tracked
            // in the dirty bitmap once the journal fills.
            .extra("on_journal_full = \"block\"");
        let mut cluster = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
        cluster.pair_create(&group);
        cluster.wait_pair(&group, Duration::from_secs(60));
        let before = cluster.status(Site::A, &group).last_seq;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let c = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("connect");
            c.write(fua_at, &sector_pattern(fua_at, LEN, 0x5a), true).await.expect("a 32 MiB FUA write");
            c.write(flushed_at, &sector_pattern(flushed_at, LEN, 0xa5), false).await.expect("a 32 MiB write");
            c.flush().await.expect("flush");
            // Neither FUA nor flushed: for the cut to drop (or not).
            c.write(76 * MIB, &sector_pattern(76 * MIB, 16 * MIB as usize, 0x3c), false).await.expect("a 16 MiB write");
        });
        let records = cluster.status(Site::A, &group).last_seq - before;
        assert!(
            records >= 10,
            "{mode:?}: two 32 MiB writes over a 16 MiB journal must be several records each ({records})"
        );
        let cut = cluster.power_cut(Site::A);
        eprintln!("SPLIT WRITE {mode:?}: the cut dropped {} page(s)", cut.dropped);
        cluster.start(Site::A);
        rt.block_on(async {
            let c = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("connect");
            for (at, tag, what) in [(fua_at, 0x5a, "FUA"), (flushed_at, 0xa5, "flushed")] {
                let got = c.read(at, LEN as u32).await.expect("read");
                if let Some(i) = got.iter().zip(sector_pattern(at, LEN, tag)).position(|(a, b)| *a != b) {
                    panic!(
                        "{mode:?}: the {what} 32 MiB write lost in the power cut, from byte {} of the volume",
                        at + i as u64
                    );
                }
            }
        });
        cluster.wait_pair(&group, Duration::from_secs(120));
        cluster.assert_converged(&group);
    }
}

/// The primary (async) loses power with writes the secondary holds and it
/// does not: its restart rebases the secondary onto the primary's recovered
/// point, taking those writes away there. The secondary's "data as of" and
/// the recovery point of a failover right after then name no time, or the
/// end of the resync that follows (the primary's time after its restart),
/// rather than the time of the newest write taken away (they did).
#[test]
fn a_rebase_below_the_replica_forgets_the_time_of_the_writes_it_takes_away() {
    if !require_root("a_rebase_below_the_replica_forgets_the_time_of_the_writes_it_takes_away") {
        return;
    }
    require("fusermount3");
    let spec = GroupSpec::new("rb", Mode::Async).volume("rb-vol", 16 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    cluster.pair_create("rb");
    cluster.wait_pair("rb", Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let c = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "rb-vol").await.expect("connect");
        for b in 0..64 {
            c.write(b * BLOCK as u64, &stamp(b, 3), false).await.expect("write");
        }
    });
    cluster.wait_drained("rb");
    let held = cluster.status(Site::B, "rb");
    assert!(held.data_as_of_unix.is_some(), "{held:?}");
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let cut_at = unix_now();
    let cut = cluster.power_cut(Site::A);
    eprintln!("REBASE: the cut dropped {} page(s)", cut.dropped);
    cluster.start(Site::A);
    let b = cluster.wait_until(Site::B, "rb", "resynced", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.consistent && s.epoch > held.epoch
    });
    assert!(
        b.durable_seq < held.durable_seq,
        "the cut must take acknowledged, unflushed writes from the primary's journal (the secondary held {}, the \
         primary recovered {}): {b:?}",
        held.durable_seq,
        b.durable_seq
    );
    assert!(
        b.data_as_of_unix.is_none_or(|t| t >= cut_at),
        "the time of a write the rebase took away (the cut at {cut_at}): {b:?}"
    );
    cluster.kill9(Site::A);
    cluster.wait_until(Site::B, "rb", "disconnected", Duration::from_secs(60), |s| !s.connected);
    let out = cluster.cli(Site::B, &["failover", "rb"]);
    let text = replicator_tests::describe_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("Recovery point: sequence {} ", b.durable_seq)), "{text}");
    assert_eq!(text.contains("(their time unknown)"), b.data_as_of_unix.is_none(), "{text}");
}

/// The activity log keeps a region while a replay of the journal after a
/// power cut could put an older write back over its newest one: until the
/// journal holds that newest write durably (or no longer replays the older
/// one). The log used to let a region go once its newest write was durable
/// on both sites' volumes, though the journal held it only in the page
/// cache: a freeing of journal space syncs the volumes alone. A power cut
/// then took that write from the journal, the restart replayed an older,
/// flushed write over it, and no resync copied the region: the sites
/// differed there, under PAIR with lag 0.
///
/// The sequence: an activity log of one region (X); a write to X the
/// secondary makes durable; the secondary stopped; a write `a` to a block of
/// X, flushed (into the journal alone), then `b` over it, not flushed; the
/// journal's freeing syncs the volumes (the secondary's checkpoint, before
/// `a`, bounds what it frees); the secondary resumed and drained; a write to
/// another region, which takes X's place in the log; a power cut of the
/// primary.
#[test]
fn a_region_a_replay_could_undo_stays_in_the_activity_log() {
    let label = "a_region_a_replay_could_undo_stays_in_the_activity_log";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    let (group, vol) = ("alreplay", "alreplay-vol");
    let spec = GroupSpec::new(group, Mode::Async)
        .volume(vol, VOLUME_SIZE)
        .link_timeout(Duration::from_secs(30))
        .extra("activity_log_extents = 1");
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    c.wait_drained(group);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Twice (the freeing of journal space may come at a moment that leaves
    // nothing to undo: then a round shows nothing either way).
    for (round, (x, q)) in [(8 * MIB, 0), (24 * MIB, 16 * MIB)].into_iter().enumerate() {
        let client = rt.block_on(NbdClient::connect_unix(&c.nbd_socket(Site::A), vol)).expect("connect");
        let block = |off: u64| off / BLOCK as u64;
        rt.block_on(client.write(x + 8 * BLOCK as u64, &stamp(block(x) + 8, 1), false)).expect("first write to X");
        c.wait_drained(group);
        // The journal's freeing catches up with it.
        std::thread::sleep(Duration::from_secs(3));
        rt.block_on(client.write(x + 4 * BLOCK as u64, &stamp(block(x) + 4, 1), false)).expect("a write made durable");
        c.wait_drained(group);
        c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
        rt.block_on(async {
            client.write(x, &stamp(block(x), 1), false).await.expect("write a");
            client.flush().await.expect("flush a");
            client.write(x, &stamp(block(x), 2), false).await.expect("write b");
        });
        // The freeing of journal space syncs the volumes (RELEASE_INTERVAL).
        std::thread::sleep(Duration::from_millis(2500));
        c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
        c.wait_drained(group);
        rt.block_on(client.write(q, &stamp(block(q), 3), false)).expect("a write to another region");
        drop(client);
        let cut = c.power_cut(Site::A);
        eprintln!("{label}: round {round}: primary cut: {cut:?}");
        c.start(Site::A);
        c.wait_pair(group, Duration::from_secs(120));
        c.assert_converged(group);
        c.start(Site::A);
        c.start(Site::B);
        c.wait_pair(group, Duration::from_secs(60));
    }
}

/// A secondary killed with records in its restore journal's page cache
/// (their group commit's fsync never finished) replays them at its restart.
/// The replay's volume writes may reach the disk in any order: the run they
/// come from must be durable first, or a power cut during the replay leaves
/// volumes holding a later record and not an earlier one, while the journal
/// no longer names either and the replica calls itself consistent.
#[test]
fn a_restore_journal_read_after_a_kill_is_durable_before_it_is_replayed() {
    let label = "a_restore_journal_read_after_a_kill_is_durable_before_it_is_replayed";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    // The set-up needs both records appended before the secondary's first
    // journal sync (held); a busy machine may split them: then again.
    for attempt in 1..=3 {
        if restore_journal_replayed_after_a_kill(label) {
            return;
        }
        eprintln!("{label}: attempt {attempt}: the second record was not in the restore journal; again");
    }
    panic!("{label}: three attempts never had both records in the restore journal at the kill");
}

/// One run of the test above; false if its set-up was not reached.
fn restore_journal_replayed_after_a_kill(label: &str) -> bool {
    let (group, first, second) = ("rjr", "rjr-a", "rjr-b");
    let spec = GroupSpec::new(group, Mode::Async)
        .volume(first, 16 * MIB)
        .volume(second, 16 * MIB)
        .link_timeout(Duration::from_secs(30));
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let before = c.wait_drained(group).last_seq;

    // Two records, one per volume, reach the secondary's restore journal
    // together (it is frozen while the primary takes them); its fsync
    // hangs, so neither is durable there nor applied.
    c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    assert!(c.fs_command(Site::B, &format!("hold-fsync groups/{group}/journal")).starts_with("ok armed"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for vol in [first, second] {
        let client = rt.block_on(NbdClient::connect_unix(&c.nbd_socket(Site::A), vol)).expect("connect");
        rt.block_on(client.write(0, &stamp(0, 7), false)).expect("write");
    }
    let last = c.status(Site::A, group).last_seq;
    assert_eq!(last, before + 2, "one record per write");
    c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    wait_fs(&c, Site::B, "the restore journal's fsync held", |stats, _| stats.ends_with(" held 1"));
    c.kill9(Site::B);
    // The primary stays away: it would send the records again.
    c.stop(Site::A);

    // The restart replays them; the first volume's sync hangs, and the
    // power goes with the second volume's pages on the disk and none of
    // the first's.
    assert!(c.fs_command(Site::B, &format!("hold-fsync {first}.img")).starts_with("ok armed"));
    c.spawn(Site::B);
    let replayed =
        fs_reaches(&c, Site::B, |stats, files| stats.ends_with(" held 1") && files.contains(&format!("{second}.img")));
    if !replayed {
        let _ = c.fs_command(Site::B, "release");
        return false;
    }
    let cut = c.power_cut_keeping_files(Site::B, &format!("{second}.img"));
    eprintln!("{label}: secondary cut: {cut:?}");
    c.start(Site::B);
    let b = c.status(Site::B, group);
    assert!(b.consistent, "{b:?}");
    assert_eq!(b.durable_seq, last, "the restore journal's two records were replayed again: {b:?}");
    c.stop(Site::B);
    for vol in [first, second] {
        let data = std::fs::read(c.volume_path(Site::B, vol)).expect("read volume");
        assert!(
            data[..BLOCK] == stamp(0, 7)[..],
            "{vol}: the replica calls itself consistent at write {} without the write to {vol}",
            b.durable_seq
        );
    }

    c.start(Site::A);
    c.start(Site::B);
    c.wait_pair(group, Duration::from_secs(60));
    c.assert_converged(group);
    true
}

/// Whether powercut-fs's `stats` and `files` replies satisfy `done` within
/// 30 s.
fn fs_reaches(c: &Cluster, site: Site, done: impl Fn(&str, &str) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if done(&c.fs_command(site, "stats"), &c.fs_command(site, "files")) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until powercut-fs's `stats` and `files` replies satisfy `done`.
fn wait_fs(c: &Cluster, site: Site, what: &str, done: impl Fn(&str, &str) -> bool) {
    if !fs_reaches(c, site, done) {
        let (stats, files) = (c.fs_command(site, "stats"), c.fs_command(site, "files"));
        panic!("{site}: not reached: {what}: {stats} / {files}\n{}", c.diagnostics());
    }
}

/// A primary killed between an activity-log save's write and its sync
/// restarts on the log it reads from the page cache; writes to the regions
/// it names wait for no save. That log is made durable before any is
/// admitted: a power cut afterwards must still find the region, and copy it.
#[test]
fn an_activity_log_read_after_a_kill_is_durable_before_writes_rely_on_it() {
    let label = "an_activity_log_read_after_a_kill_is_durable_before_writes_rely_on_it";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    let (group, vol) = ("alkill", "alkill-vol");
    let spec = GroupSpec::new(group, Mode::Async).volume(vol, VOLUME_SIZE).link_timeout(Duration::from_secs(60));
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    c.wait_drained(group);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let write = |c: &Cluster, off: u64, version: u64, limit: Duration| {
        rt.block_on(async {
            let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("connect");
            tokio::time::timeout(limit, client.write(off, &stamp(off / BLOCK as u64, version), false)).await
        })
    };
    // The secondary stops taking records: the journal keeps what follows,
    // and the regions written stay in the activity log.
    c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    write(&c, 40 * MIB, 1, Duration::from_secs(10)).expect("in time").expect("a write the journal keeps");

    // A write to a cold region waits for the log's save, whose sync hangs;
    // the daemon is killed there (the save stays in the page cache).
    let x = 8 * MIB;
    assert!(c.fs_command(Site::A, &format!("hold-fsync groups/{group}/activity-log")).starts_with("ok armed"));
    let written = write(&c, x, 1, Duration::from_secs(2));
    assert!(written.is_err(), "answered before the activity log's save was durable: {written:?}");
    wait_fs(&c, Site::A, "the activity log's fsync held", |stats, _| stats.ends_with(" held 1"));
    c.kill9(Site::A);

    // The restart reads that log from the page cache, and its first sync of
    // the log hangs in turn. A write to the region now would wait for no
    // save: it must not be taken before the log it relies on is durable.
    // The power goes with the volume's pages on the disk and none of the
    // other files': the journal would no longer hold such a write, and only
    // the activity log could say the region differs from the secondary.
    assert!(c.fs_command(Site::A, &format!("hold-fsync groups/{group}/activity-log")).starts_with("ok armed"));
    c.spawn(Site::A);
    wait_fs(&c, Site::A, "the restart's sync of the activity log held", |stats, _| stats.ends_with(" held 1"));
    let taken = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(client) = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await {
                let left = deadline.saturating_duration_since(Instant::now());
                break tokio::time::timeout(left, client.write(x, &stamp(x / BLOCK as u64, 2), false)).await.is_ok();
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(!taken, "a write to the region was answered while the activity log it relies on was not durable");
    // A volume write follows its acknowledgement.
    std::thread::sleep(Duration::from_millis(500));
    let cut = c.power_cut_keeping_files(Site::A, &format!("{vol}.img"));
    eprintln!("{label}: primary cut: {cut:?}");
    c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    c.start(Site::A);
    c.wait_pair(group, Duration::from_secs(120));
    c.assert_converged(group);
}

/// Sync mode: after an outage the primary catches up with the writes it
/// acknowledged alone, over a slow link (bench's UDP proxy), acknowledging
/// new writes locally meanwhile. It is killed in the middle of that, after
/// a FLUSH, then loses power: everything acknowledged before the FLUSH is
/// on its volume after the restarts, and the restarted primary (its state
/// still PAIR after the kill) claims RPO 0 only once the secondary has
/// confirmed the backlog.
#[test]
fn sync_primary_power_cut_while_catching_up_after_an_outage() {
    use replicator_bench::proxy::{LinkSpec, UdpProxy};
    use std::net::SocketAddr;
    let label = "sync_primary_power_cut_while_catching_up_after_an_outage";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    let (group, vol) = ("plcatch", "plcatch-vol");
    let spec = GroupSpec::new(group, Mode::Sync)
        .volume(vol, VOLUME_SIZE)
        .journal_size(160 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_link_loss = \"suspend\"");
    let mut opts = ClusterOpts::group(spec).with_power_cut_fs();
    opts.start = false;
    let mut c = Cluster::new(opts);
    // 4 MB/s: the backlog (about 51 MiB) takes over 10 s to send.
    let link = LinkSpec { bandwidth: Some(4_000_000), ..LinkSpec::rtt(Duration::from_millis(1)) };
    let proxy = UdpProxy::start(SocketAddr::from(([127, 0, 0, 1], c.peer_port(Site::B))), link).expect("slow link");
    c.route_peer_via(Site::A, proxy.addr().port());
    c.start(Site::A);
    c.start(Site::B);
    c.pair_create_opts(group, true);
    c.wait_pair(group, Duration::from_secs(60));

    c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    let mut expect = write_backlog(&c.nbd_socket(Site::A), vol, VOLUME_SIZE, 31);
    let backlog_end = c.status(Site::A, group).last_seq;
    c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    c.wait_until(Site::A, group, "the session back", Duration::from_secs(60), |s| s.state == "PAIR" && s.connected);

    // New writes while the backlog is on its way, then a FLUSH.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("connect");
        for b in 0..64u64 {
            let data = stamp(b, 99);
            client.write(b * BLOCK as u64, &data, false).await.expect("write while catching up");
            expect[(b as usize) * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
        }
        client.flush().await.expect("flush while catching up");
    });
    let before = c.status(Site::A, group);
    let applied = c.status(Site::B, group).applied_seq;
    assert!(
        applied < backlog_end && before.rpo_zero == Some(false),
        "{label}: the backlog should still be on its way (secondary at {applied} of {backlog_end}): {before:?}"
    );
    // Killed first (the same boot: no resync, the state still PAIR), then
    // its power cut.
    for power in [false, true] {
        let applied = c.status(Site::B, group).applied_seq;
        if power {
            let cut = c.power_cut(Site::A);
            eprintln!("{label}: primary cut with the secondary at {applied} of {backlog_end}: {cut:?}");
        } else {
            c.kill9(Site::A);
            eprintln!("{label}: primary killed with the secondary at {applied} of {backlog_end}");
        }
        c.start(Site::A);
        let after = c.status(Site::A, group);
        let applied = c.status(Site::B, group).applied_seq;
        if applied + 100 < backlog_end {
            assert_eq!(
                after.rpo_zero,
                Some(false),
                "{label}: the restarted primary claims RPO 0 with the secondary at {applied} of {backlog_end}: {after:?}"
            );
        }
    }
    c.wait_until(Site::A, group, "RPO 0 back", Duration::from_secs(120), |s| s.rpo_zero == Some(true));
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    let image = std::fs::read(c.volume_path(Site::A, vol)).expect("read the primary's volume");
    assert!(image == expect, "{label}: the primary lost acknowledged and flushed writes\n{}", c.diagnostics());
    c.assert_volumes_identical(group);
}

/// Sync writes waiting for a frozen secondary complete when `pair delete`
/// makes the primary's volumes standalone. A FUA write acknowledged then is
/// durable there: it may have been durable in the journal alone, which the
/// pair delete forgets. The primary loses power right after (nothing
/// synced in between), and the write is on its volume after the restart
/// (standalone: no journal replays it any more).
#[test]
fn writes_completed_by_a_pair_delete_survive_a_power_cut() {
    let label = "writes_completed_by_a_pair_delete_survive_a_power_cut";
    if !require_root(label) {
        return;
    }
    require("fusermount3");
    let (group, vol) = ("pldel", "pldel-vol");
    let spec = GroupSpec::new(group, Mode::Sync).volume(vol, VOLUME_SIZE).link_timeout(Duration::from_secs(60));
    let mut c = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let client = rt.block_on(NbdClient::connect_unix(&c.nbd_socket(Site::A), vol)).expect("connect");
    c.signal(Site::B, nix::sys::signal::Signal::SIGSTOP);
    // Blocks 0..16 plain, 16..32 FUA, both waiting (no FLUSH: its sync
    // of the volumes could cover the FUA write's).
    let plain: Vec<u8> = (0..16).flat_map(|b| stamp(b, 7)).collect();
    let fua: Vec<u8> = (16..32).flat_map(|b| stamp(b, 7)).collect();
    let writes = rt.spawn({
        let (plain, fua) = (plain.clone(), fua.clone());
        async move {
            let (write, fua) =
                tokio::join!(client.write(0, &plain, false), client.write(16 * BLOCK as u64, &fua, true));
            write.and(fua)
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!writes.is_finished(), "{label}: the sync writes must wait for the frozen secondary");
    let out = c.cli(Site::A, &["pair", "delete", group]);
    let done = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), writes).await });
    assert!(out.status.success(), "{label}: pair delete: {}", String::from_utf8_lossy(&out.stderr));
    let done = done.expect("the writes still wait after pair delete").expect("the write task");
    assert!(done.is_ok(), "{label}: a write completed by pair delete failed: {done:?}");
    let cut = c.power_cut(Site::A);
    eprintln!("{label}: {cut:?}");
    c.signal(Site::B, nix::sys::signal::Signal::SIGCONT);
    c.start(Site::A);
    c.wait_until(Site::A, group, "SIMPLEX after the power cut", Duration::from_secs(30), |s| s.state == "SIMPLEX");
    c.stop(Site::A);
    c.stop(Site::B);
    let image = std::fs::read(c.volume_path(Site::A, vol)).expect("read the primary's volume");
    assert!(
        image[16 * BLOCK..32 * BLOCK] == fua[..],
        "{label}: a FUA write acknowledged when pair delete completed it is lost after a power cut ({cut:?})\n{}",
        c.diagnostics()
    );
}
