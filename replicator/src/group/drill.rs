//! Drill copies: a writable, group-consistent point-in-time copy of the
//! replica, for failover tests, while replication into the replica goes on.
//!
//! `drill start` (on the secondary) freezes the replica at one point: the
//! session stops handing out applies beyond the writes already being
//! applied (`Secondary::freeze`), and once those are applied the volumes hold
//! exactly the writes `<= N`, on every volume of the group. The volumes are
//! synced, a copy-on-write snapshot of each is created and attached to the
//! volumes (`preserved.rs`: files under `<group dir>/drill/`, named by
//! `image.json`), and applies resume. From then on
//! every write to a replica volume first preserves the chunks it touches in
//! the snapshot; NBD export `drill/<volume>` reads the snapshot's image and
//! writes only into the snapshot. Nothing is copied up front, so a drill is
//! ready in milliseconds whatever the volume size, and space grows only
//! with chunks written on either side.
//!
//! Decisions:
//! - The snapshot survives restarts and power cuts: its files are created
//!   durably before `image.json` names them, and the volume is written in a
//!   chunk only once that chunk is durably preserved (see
//!   `replicator_protocol::snapshot`). A restart loads the drill before the
//!   restore journal is replayed, so replayed writes are preserved too.
//! - A drill never blocks failover, switchover or a resync: the replica
//!   stays the replica (a failover promotes it, not the drill copy), and
//!   the drill copy keeps its image through whatever the volumes go
//!   through until `drill stop`.
//! - `drill stop` is refused while NBD clients are attached to the drill
//!   copy; it discards the copy, frees its space, and appends the drill to
//!   the group's history (`<group dir>/drill-history.jsonl`), with the
//!   report of a `drill run` (`<group dir>/drill-reports/ID.{json,md}`).
//! - One drill per group at a time; it needs a consistent replica (not
//!   during an initial copy or a resync).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use replicator_protocol::pair::Role;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::preserved::{ImageRecord, PreservedImage};
use super::takeover::format_time;
use super::write_path::unix_micros;
use super::{lock, Group, GroupError, SessionCommand};
use crate::io::{AlignedBuf, IoEngine};
use crate::nbd::{BlockSizes, Export, ExportError, NbdErrno};
use crate::snapshot::Snapshot;
use crate::state::write_atomically;
use crate::volume::Volume;

/// Default copy-on-write chunk of a drill copy (`drill_chunk` per group).
pub const DEFAULT_DRILL_CHUNK: u64 = 64 << 10;
/// How long `drill start` waits for the replica to reach its frozen point.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of a drill client's request handled under one set of the
/// copy's chunk locks, which replication's copy-on-write into the copy
/// waits for: a 32 MiB request goes in pieces, so that applying replicated
/// writes never waits for more than this much drill I/O.
const DRILL_PIECE: u64 = 4 << 20;

/// `(offset, len)` split at multiples of [`DRILL_PIECE`], relative to the
/// start of the request (so only the request's own ends are unaligned).
fn drill_pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = ((at / DRILL_PIECE + 1) * DRILL_PIECE).min(end);
        let piece = (at - offset, next - at);
        at = next;
        Some(piece)
    })
}

/// What a drill froze, and when (`drill/image.json`, reports, history).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillMeta {
    /// Unique id (the start time, UTC, with milliseconds: `20261201T221500-123Z`).
    pub id: String,
    /// The group.
    pub group: String,
    /// When `drill start` ran (µs since the epoch).
    pub started_at_us: u64,
    /// From `drill start` until the copy was exported, in milliseconds.
    pub ready_ms: f64,
    /// The recovery point: the copy holds exactly the writes `<= seq`.
    pub recovery_seq: u64,
    /// The primary's time of the newest write in the copy (µs since the
    /// epoch, the primary's clock; 0 when unknown).
    pub recovery_time_us: u64,
    /// Writes the replica had received (or the primary had reported) beyond
    /// the recovery point when it was frozen.
    pub lag_records: u64,
    /// Copy-on-write chunk in bytes.
    pub chunk: u64,
    /// Volume names and sizes, in group order.
    pub volumes: Vec<(String, u64)>,
}

impl ImageRecord for DrillMeta {
    fn chunk(&self) -> u64 {
        self.chunk
    }

    fn volumes(&self) -> &[(String, u64)] {
        &self.volumes
    }

    fn describe(&self) -> String {
        format!("drill {}", self.id)
    }
}

impl DrillMeta {
    /// The NBD export names of the drill copies.
    pub fn exports(&self) -> Vec<String> {
        self.volumes.iter().map(|(v, _)| export_name(v)).collect()
    }
}

/// The NBD export name of a volume's drill copy.
pub fn export_name(volume: &str) -> String {
    format!("drill/{volume}")
}

/// What `drill run` reports about the command it ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillOutcome {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Its exit code (`None`: killed by a signal or by the timeout).
    pub exit_code: Option<i32>,
    /// The signal that killed it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// It was killed at the `--timeout`.
    pub timed_out: bool,
    /// `drill run` was interrupted (Ctrl-C, SIGTERM, SIGHUP) and stopped it.
    #[serde(default)]
    pub interrupted: bool,
    /// How long it ran, in seconds.
    pub run_seconds: f64,
    /// The last lines of its output (stdout and stderr).
    pub output_tail: String,
}

impl DrillOutcome {
    /// How the command ended, in words ("exit code 3").
    pub fn status(&self) -> String {
        match (self.exit_code, self.timed_out) {
            _ if self.interrupted => "stopped: `drill run` was interrupted".to_string(),
            (_, true) => "killed at the timeout".to_string(),
            (Some(c), _) => format!("exit code {c}"),
            (None, _) => format!("killed by signal {}", self.signal.unwrap_or(0)),
        }
    }
}

/// One finished drill: a line of the history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillRecord {
    /// What was frozen.
    #[serde(flatten)]
    pub meta: DrillMeta,
    /// Where (this node's name).
    pub node: String,
    /// When `drill stop` ran (µs since the epoch).
    pub stopped_at_us: u64,
    /// Space the copy used when it was discarded, in bytes.
    pub space_used_bytes: u64,
    /// `passed`, `failed`, `timed-out`, `interrupted` (`drill run`),
    /// `manual` (`drill start`/`stop`), or `discarded` whatever the
    /// command did, when the copy was discarded during the drill; and
    /// `unrecorded` in the report `drill run --report` writes alone when
    /// the daemon could not record the drill (then not in the history).
    pub result: String,
    /// Why the copy was discarded during the drill (a copy-on-write into it
    /// failed): from then on its exports failed, and reads just before may
    /// have returned part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<String>,
    /// The command's outcome (`drill run`).
    #[serde(default)]
    pub outcome: Option<DrillOutcome>,
    /// The JSON report (`drill run`).
    #[serde(default)]
    pub report: Option<PathBuf>,
}

impl DrillRecord {
    /// The report in Markdown.
    pub fn to_markdown(&self) -> String {
        let m = &self.meta;
        let mut s = format!("# Drill {} of group {}\n\n", m.id, m.group);
        s.push_str(&format!("- **Result:** {}\n", self.result));
        if let Some(why) = &self.discarded {
            s.push_str(&format!("- **Copy discarded during the drill:** {why}\n"));
        }
        s.push_str(&format!("- **Site:** {} (the secondary)\n", self.node));
        s.push_str(&format!("- **Started:** {}\n", format_time(m.started_at_us)));
        s.push_str(&format!("- **Stopped:** {}\n", format_time(self.stopped_at_us)));
        s.push_str(&format!("- **Time to ready:** {:.1} ms\n", m.ready_ms));
        let when = if m.recovery_time_us == 0 {
            "the primary's time of it unknown".to_string()
        } else {
            format!("written on the primary at {}", format_time(m.recovery_time_us))
        };
        s.push_str(&format!("- **Recovery point:** sequence {} ({when})\n", m.recovery_seq));
        s.push_str(&format!("- **Lag at freeze:** {} write(s) beyond the recovery point\n", m.lag_records));
        s.push_str(&format!(
            "- **Copy-on-write:** {} KiB chunks, {} bytes used\n",
            m.chunk >> 10,
            self.space_used_bytes
        ));
        s.push_str("- **Volumes:**\n");
        for (v, size) in &m.volumes {
            s.push_str(&format!("  - `{v}` ({size} bytes), NBD export `{}`\n", export_name(v)));
        }
        if let Some(o) = &self.outcome {
            // Quoted as a shell would take it back (`sh -c 'sleep 5; echo ok'`).
            let command = shlex::try_join(o.command.iter().map(String::as_str)).unwrap_or_else(|_| o.command.join(" "));
            s.push_str(&format!("\n## Command\n\n`{command}`\n\n"));
            s.push_str(&format!("- **Status:** {}\n- **Run time:** {:.1} s\n", o.status(), o.run_seconds));
            s.push_str("\n### Last lines of its output\n\n```\n");
            s.push_str(&o.output_tail);
            if !o.output_tail.ends_with('\n') {
                s.push('\n');
            }
            s.push_str("```\n");
        }
        s
    }
}

/// A running drill.
#[derive(Debug)]
pub struct ActiveDrill {
    /// What was frozen.
    pub meta: DrillMeta,
    image: PreservedImage,
    clients: AtomicUsize,
}

/// `status` of a running drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillStatus {
    /// What was frozen.
    #[serde(flatten)]
    pub meta: DrillMeta,
    /// Bytes the drill copies hold (chunks written on either side).
    pub space_used_bytes: u64,
    /// NBD clients attached to the drill copies.
    pub clients: usize,
    /// The NBD export names.
    pub exports: Vec<String>,
    /// Why the drill copies were discarded while the drill runs (a
    /// copy-on-write that failed, e.g. `state_dir` full: replication went
    /// on without them); their exports fail until `drill stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<String>,
}

/// What the session reports once the replica is frozen.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frozen {
    /// Every write `<= seq` is applied, none beyond.
    pub seq: u64,
    /// The primary's time of the newest applied write.
    pub data_as_of_us: u64,
    /// Writes received into the restore journal.
    pub received: u64,
}

fn drill_dir(group_dir: &Path) -> PathBuf {
    group_dir.join("drill")
}

fn history_path(group_dir: &Path) -> PathBuf {
    group_dir.join("drill-history.jsonl")
}

fn reports_dir(group_dir: &Path) -> PathBuf {
    group_dir.join("drill-reports")
}

fn failed(what: &str) -> impl Fn(std::io::Error) -> GroupError + '_ {
    move |e| GroupError::Failed(format!("{what}: {e}"))
}

/// Loads the drill of a group after a restart (before anything writes the
/// volumes) and attaches its snapshots to the volumes. Leftovers of a
/// `drill start` that did not finish are removed. Blocking.
pub(super) fn load(
    engine: &IoEngine,
    group_dir: &Path,
    volumes: &[Arc<Volume>],
) -> Result<Option<Arc<ActiveDrill>>, GroupError> {
    let dir = drill_dir(group_dir);
    let loaded = match PreservedImage::load::<DrillMeta>(engine, &dir, volumes, true) {
        Ok(loaded) => loaded,
        Err(e) => {
            // A drill copy must never keep the group (and the daemon) from
            // starting: it is set aside, with its files, and the group goes
            // on without it.
            let aside = dir.with_extension(format!("unusable-{}", unix_micros()));
            std::fs::rename(&dir, &aside)
                .and_then(|()| crate::durable::sync_dir(group_dir))
                .map_err(|r| GroupError::Failed(format!("{e}; and it cannot be set aside: {r}")))?;
            tracing::error!(
                "the drill copy in {} cannot be used ({e}): set aside as {}; the group starts without a drill",
                dir.display(),
                aside.display()
            );
            return Ok(None);
        }
    };
    let Some((meta, image)) = loaded else {
        return Ok(None);
    };
    tracing::info!(group = %meta.group, drill = %meta.id, recovery_seq = meta.recovery_seq, "drill copy kept across the restart");
    Ok(Some(Arc::new(ActiveDrill { meta, image, clients: AtomicUsize::new(0) })))
}

/// Clears `drill_starting` when a drill start without a session ends.
struct StartingGuard<'a>(&'a Group);

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.0.inner).drill_starting = false;
    }
}

impl Group {
    /// The running drill, if any.
    pub fn drill(&self) -> Option<Arc<ActiveDrill>> {
        self.drill.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// `status` of the running drill.
    pub fn drill_status(&self) -> Option<DrillStatus> {
        self.drill().map(|d| {
            let discarded = d.image.given_up();
            DrillStatus {
                meta: d.meta.clone(),
                // A discarded copy's files are emptied.
                space_used_bytes: if discarded.is_some() { 0 } else { d.image.held_bytes() },
                clients: d.clients.load(Ordering::SeqCst),
                exports: d.meta.exports(),
                discarded,
            }
        })
    }

    /// `drill start`: freezes the replica at one point and exports the
    /// drill copies (see the module documentation).
    pub async fn drill_start(&self) -> Result<DrillMeta, GroupError> {
        self.refuse_if_stopped()?;
        let t0 = Instant::now();
        let started_at_us = unix_micros();
        let _one = self.drill_op.lock().await;
        let name = self.cfg.name.clone();
        if let Some(d) = self.drill() {
            return Err(GroupError::Refused(format!(
                "group {name}: drill {} is running (recovery point sequence {}); `replicator drill stop {name}` first",
                d.meta.id, d.meta.recovery_seq
            )));
        }
        let session = {
            let mut g = lock(&self.inner);
            if g.role() != Role::Secondary {
                return Err(GroupError::Refused(format!(
                    "group {name}: a drill copy is taken of the replica, on the secondary; this node is {} ({})",
                    g.role(),
                    g.state
                )));
            }
            if g.taking_over {
                return Err(GroupError::Refused(format!(
                    "group {name}: a failover is running here; a drill copy is taken of a replica"
                )));
            }
            if g.persisted.role.as_secondary().is_some_and(|s| s.split_writable || s.needs_rebase) {
                return Err(GroupError::Refused(format!(
                    "group {name}: the replica's volumes differ from the primary's in regions waiting for a copy \
                     (written here while split with --rw, a failback, or a restore journal lost): a drill copy of \
                     it would be no recovery point of the primary. \
                     `replicator pair resync {name}` on {} first",
                    self.cfg.peer
                )));
            }
            if g.persisted.role.as_secondary().is_none_or(|s| !s.consistent || s.copy_incomplete) {
                return Err(GroupError::Refused(format!(
                    "group {name}: the replica is inconsistent ({}: an initial copy or a resync is running); a drill copy \
                     of it would be an image no application wrote. Wait for PAIR (`replicator status {name}`)",
                    g.state
                )));
            }
            if g.secondary_attached {
                Some(g.session_cmd.clone().ok_or_else(|| {
                    GroupError::Failed(format!("group {name}: the replication session is starting; retry"))
                })?)
            } else {
                g.drill_starting = true;
                None
            }
        };
        let (frozen, thaw, _starting) = match session {
            Some(tx) => {
                let (frozen_tx, frozen_rx) = oneshot::channel();
                let (thaw_tx, thaw_rx) = oneshot::channel();
                tx.send(SessionCommand::Freeze { frozen: frozen_tx, thaw: thaw_rx })
                    .map_err(|_| GroupError::Failed(format!("group {name}: the replication session ended; retry")))?;
                let frozen = match tokio::time::timeout(FREEZE_TIMEOUT, frozen_rx).await {
                    Ok(Ok(Ok(f))) => f,
                    Ok(Ok(Err(why))) => {
                        return Err(GroupError::Refused(format!(
                            "group {name}: {why}; a drill copy of it would be an image no application wrote. Wait \
                             for PAIR (`replicator status {name}`)"
                        )))
                    }
                    Ok(Err(_)) => {
                        return Err(GroupError::Failed(format!(
                            "group {name}: the replication session ended while freezing the replica; retry"
                        )))
                    }
                    Err(_) => {
                        return Err(GroupError::Failed(format!(
                            "group {name}: the replica did not reach a frozen point within {FREEZE_TIMEOUT:?} \
                             (applies are slow or stuck: see the log); nothing changed"
                        )))
                    }
                };
                (frozen, Some(thaw_tx), None)
            }
            None => {
                let starting = StartingGuard(self);
                let g = lock(&self.inner);
                let Some(p) = g.persisted.role.as_secondary() else {
                    return Err(GroupError::Failed(format!("group {name}: this node is no longer the secondary")));
                };
                let f = Frozen { seq: p.durable_seq, data_as_of_us: p.data_as_of_us, received: p.durable_seq };
                (f, None, Some(starting))
            }
        };
        // The frozen image is durable before a snapshot refers to it: a
        // power cut must not take writes <= N from chunks the drill reads
        // from the volume.
        super::applier::sync_volumes(&self.volumes).await.map_err(GroupError::Failed)?;
        let reported = lock(&self.inner).persisted.role.as_secondary().map_or(0, |s| s.primary_reported_seq);
        let mut meta = DrillMeta {
            id: drill_id(started_at_us),
            group: name.clone(),
            started_at_us,
            ready_ms: 0.0,
            recovery_seq: frozen.seq,
            recovery_time_us: frozen.data_as_of_us,
            lag_records: frozen.received.max(reported).saturating_sub(frozen.seq),
            chunk: self.cfg.drill_chunk,
            volumes: self.volumes.iter().map(|v| (v.name.clone(), v.size())).collect(),
        };
        let (engine, group_dir, volumes) = (self.engine.clone(), self.store.dir().to_path_buf(), self.volumes.clone());
        let image = {
            let meta = meta.clone();
            tokio::task::spawn_blocking(move || {
                PreservedImage::create(&engine, &drill_dir(&group_dir), &volumes, &meta, true)
            })
            .await
            .map_err(|e| GroupError::Failed(format!("drill start: {e}")))??
        };
        if thaw.as_ref().is_some_and(oneshot::Sender::is_closed) {
            // The session ended before the copy was attached, without a
            // drain (which waits for the copy): nothing is kept rather than
            // rely on what its end left applied.
            image.detach(&self.volumes).await;
            tokio::task::spawn_blocking(move || image.remove())
                .await
                .map_err(|e| GroupError::Failed(format!("drill start: {e}")))??;
            return Err(GroupError::Failed(format!(
                "group {name}: the replication session ended while the drill copy was taken, and the replica moved \
                 past the recovery point; nothing was kept, retry"
            )));
        }
        meta.ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let drill = Arc::new(ActiveDrill { meta: meta.clone(), image, clients: AtomicUsize::new(0) });
        *self.drill.lock().unwrap_or_else(PoisonError::into_inner) = Some(drill.clone());
        if let Some(thaw) = thaw {
            let _ = thaw.send(());
        }
        tracing::info!(
            group = %name,
            drill = %meta.id,
            recovery_seq = meta.recovery_seq,
            ready_ms = format!("{:.1}", meta.ready_ms),
            "drill started: the drill copies are exported as {}",
            meta.exports().join(", ")
        );
        // The record was written before the ready time was known: again with
        // it, so that a restart during the drill keeps it for the report
        // (after the thaw: replication does not wait for it; `drill stop`
        // waits for `drill_op`).
        let rewritten = tokio::task::spawn_blocking({
            let drill = drill.clone();
            move || drill.image.rewrite_record(&drill.meta)
        })
        .await;
        if let Err(e) = rewritten.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            tracing::warn!(group = %name, drill = %meta.id, "the drill's time to ready is not recorded on disk: {e}");
        }
        Ok(meta)
    }

    /// `drill stop`: discards the drill copies and records the drill in the
    /// history (with the outcome of a `drill run`). With `id`, only that
    /// drill; one already recorded is answered with its record.
    pub async fn drill_stop(
        &self,
        node: &str,
        outcome: Option<DrillOutcome>,
        id: Option<&str>,
    ) -> Result<DrillRecord, GroupError> {
        let _one = self.drill_op.lock().await;
        let name = &self.cfg.name;
        let running = self.drill.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|d| d.meta.id.clone());
        match (running, id) {
            (None, Some(id)) => {
                return self.drill_history()?.into_iter().rev().find(|r| r.meta.id == id).ok_or_else(|| {
                    GroupError::Failed(format!("group {name}: drill {id} is not running and not in the history"))
                })
            }
            (Some(running), Some(id)) if running != id => {
                return Err(GroupError::Failed(format!(
                    "group {name}: drill {id} is no longer running (drill {running} is, started since; it is left \
                     as it is)"
                )))
            }
            _ => {}
        }
        // Checked and taken under the lock an attaching client counts
        // itself under: none attaches to copies about to be discarded
        // (`drill_op` keeps the drill the one checked above).
        let drill = {
            let mut active = self.drill.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(drill) = active.clone() else {
                return Err(GroupError::Failed(format!("group {name}: no drill is running")));
            };
            let clients = drill.clients.load(Ordering::SeqCst);
            if clients > 0 {
                return Err(GroupError::Refused(format!(
                    "group {name}: {clients} NBD client(s) are attached to the drill copies ({}); detach them, then \
                     run `replicator drill stop {name}` again",
                    drill.meta.exports().join(", ")
                )));
            }
            *active = None;
            drill
        };
        let space_used_bytes = drill.image.held_bytes();
        // Whether the copy was discarded while the drill ran (a failure of
        // a copy-on-write once it is forgotten, below, does not count).
        let discarded = drill.image.given_up();
        // Once detached, replication overwrites the volumes without
        // preserving: the record goes first, so that a restart from then on
        // does not bring back a drill copy whose chunks read those writes.
        let image = drill.clone();
        let forgotten = tokio::task::spawn_blocking(move || image.image.forget())
            .await
            .map_err(|e| GroupError::Failed(format!("drill stop: {e}")))
            .and_then(|forgotten| forgotten);
        if let Err(e) = forgotten {
            // Still attached and maybe still on disk: the drill goes on (it
            // stays in `status`; `drill stop` can be run again).
            *self.drill.lock().unwrap_or_else(PoisonError::into_inner) = Some(drill);
            return Err(GroupError::Failed(format!("group {name}: the drill goes on: {e}")));
        }
        drill.image.detach(&self.volumes).await;
        let result = match &outcome {
            _ if discarded.is_some() => "discarded",
            None => "manual",
            Some(o) if o.interrupted => "interrupted",
            Some(o) if o.timed_out => "timed-out",
            Some(o) if o.exit_code == Some(0) => "passed",
            Some(_) => "failed",
        };
        let group_dir = self.store.dir().to_path_buf();
        let mut record = DrillRecord {
            meta: drill.meta.clone(),
            node: node.to_string(),
            stopped_at_us: unix_micros(),
            space_used_bytes,
            result: result.to_string(),
            discarded,
            report: outcome.is_some().then(|| reports_dir(&group_dir).join(format!("{}.json", drill.meta.id))),
            outcome,
        };
        let rec = record.clone();
        tokio::task::spawn_blocking(move || discard_and_record(&group_dir, &drill.image, &rec))
            .await
            .map_err(|e| GroupError::Failed(format!("drill stop: {e}")))??;
        if record.report.as_ref().is_some_and(|p| !p.exists()) {
            record.report = None;
        }
        tracing::info!(group = %name, drill = %record.meta.id, result = %record.result, "drill stopped: the drill copies are discarded");
        Ok(record)
    }

    /// `drill history`: every finished drill of the group, oldest first.
    pub fn drill_history(&self) -> Result<Vec<DrillRecord>, GroupError> {
        let path = history_path(self.store.dir());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(GroupError::Failed(format!("{}: {e}", path.display()))),
        };
        // A line torn by a crash while it was appended is skipped.
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// Opens NBD export `drill/<volume>`.
    pub fn open_drill_export(&self, volume: &str) -> Option<DrillExport> {
        // Counted under the lock `drill stop` checks and clears under.
        let active = self.drill.lock().unwrap_or_else(PoisonError::into_inner);
        let drill = active.clone()?;
        let index = self.volumes.iter().position(|v| v.name == volume)?;
        let (snapshot, volume) = (drill.image.snapshot(index)?.clone(), self.volumes.get(index)?.clone());
        drill.clients.fetch_add(1, Ordering::SeqCst);
        drop(active);
        Some(DrillExport { drill, snapshot, volume })
    }
}

fn drill_id(us: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}-{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Writes the report and appends the history line, then discards the
/// drill copies (blocking). The evidence first: removing large copies
/// takes time, and a crash then must not lose the drill's record (the
/// copies are forgotten already; a restart removes what is left). The
/// copies go whatever happened to the record, and where it failed (a full
/// `state_dir`, which is why drills are stopped) it is written again once
/// their space is back.
fn discard_and_record(group_dir: &Path, image: &PreservedImage, record: &DrillRecord) -> Result<(), GroupError> {
    let recorded = write_record(group_dir, record);
    let removed = image.remove();
    if let Err(e) = &removed {
        tracing::warn!("the drill copies could not be removed ({e}); the next start of the daemon removes them");
    }
    match recorded {
        Err(_) if removed.is_ok() => write_record(group_dir, record),
        recorded => recorded,
    }
}

/// The report (for `drill run`) and the history line of a finished drill.
fn write_record(group_dir: &Path, record: &DrillRecord) -> Result<(), GroupError> {
    if let Some(report) = &record.report {
        let reports = reports_dir(group_dir);
        crate::perms::ensure_dir(&reports, 0o700, "drill reports").map_err(failed("creating drill-reports"))?;
        let json = serde_json::to_vec_pretty(record).map_err(|e| GroupError::Failed(e.to_string()))?;
        write_atomically(report, &json).map_err(failed("writing the drill report"))?;
        write_atomically(&report.with_extension("md"), record.to_markdown().as_bytes())
            .map_err(failed("writing the drill report"))?;
    }
    let mut line = serde_json::to_vec(record).map_err(|e| GroupError::Failed(e.to_string()))?;
    line.push(b'\n');
    let path = history_path(group_dir);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(crate::perms::PRIVATE_FILE_MODE)
        .open(&path)
        .map_err(failed("opening the drill history"))?;
    // (Older releases created it 0644.)
    crate::perms::tighten_file(&path, crate::perms::PRIVATE_FILE_MODE, "drill history")
        .map_err(failed("opening the drill history"))?;
    let old_len = f.metadata().map_err(failed("opening the drill history"))?.len();
    if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
        // No torn line for the next record to be glued onto.
        let _ = f.set_len(old_len);
        return Err(failed("appending to the drill history")(e));
    }
    if old_len == 0 {
        // Its name, too, survives a power cut. Said, not an error: the line
        // is in, and a retry would append it twice.
        if let Err(e) = crate::durable::sync_dir(group_dir) {
            tracing::warn!("{e}: a power cut may lose the new drill history");
        }
    }
    Ok(())
}

/// NBD view of a drill copy: reads the frozen image, writes only into the
/// copy.
#[derive(Debug)]
pub struct DrillExport {
    drill: Arc<ActiveDrill>,
    snapshot: Arc<Snapshot>,
    volume: Arc<Volume>,
}

impl Drop for DrillExport {
    fn drop(&mut self) {
        self.drill.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

fn io_error(e: crate::io::IoError) -> ExportError {
    ExportError::new(NbdErrno::Io, format!("drill copy: {e}"))
}

impl Export for DrillExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn block_sizes(&self) -> BlockSizes {
        // Partial blocks are read-modified-written under the chunk locks.
        // Writes stay on this site (no journal record to fit): the
        // protocol's default maximum, which Linux's `nbd` driver sends
        // without asking.
        BlockSizes { minimum: 1, preferred: 4096, maximum: crate::nbd::MAX_PAYLOAD }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ExportError> {
        let len = u64::from(len);
        if len <= DRILL_PIECE {
            return self.snapshot.read(self.volume.file(), offset, len).await.map_err(io_error);
        }
        let mut out = AlignedBuf::for_overwrite(len as usize);
        for (at, n) in drill_pieces(offset, len) {
            let piece = self.snapshot.read(self.volume.file(), offset + at, n).await.map_err(io_error)?;
            out[at as usize..(at + n) as usize].copy_from_slice(&piece);
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), ExportError> {
        for (at, n) in drill_pieces(offset, data.len() as u64) {
            let piece = &data[at as usize..(at + n) as usize];
            self.snapshot.write(self.volume.file(), offset + at, piece).await.map_err(io_error)?;
        }
        if fua {
            self.snapshot.flush().await.map_err(io_error)?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.snapshot.write_zeroes(self.volume.file(), offset, u64::from(len)).await.map_err(io_error)?;
        if fua {
            self.snapshot.flush().await.map_err(io_error)?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), ExportError> {
        // A hint: the copy keeps its bytes (nothing is freed early).
        let _ = (offset, len);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.snapshot.flush().await.map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::{drill_pieces, DRILL_PIECE};

    #[test]
    fn drill_requests_go_in_pieces_split_at_piece_boundaries() {
        let pieces = |offset, len| drill_pieces(offset, len).collect::<Vec<_>>();
        assert_eq!(pieces(0, 4096), [(0, 4096)]);
        assert_eq!(pieces(0, DRILL_PIECE), [(0, DRILL_PIECE)]);
        assert_eq!(pieces(0, 8 * DRILL_PIECE).len(), 8);
        let (offset, len) = (DRILL_PIECE - 512, DRILL_PIECE + 1024);
        assert_eq!(pieces(offset, len), [(0, 512), (512, DRILL_PIECE), (DRILL_PIECE + 512, 512)]);
        assert_eq!(pieces(5, 0), []);
    }
}
