//! The image a resync protects. A resync of a consistent replica (after a
//! link outage in bitmap mode, or after the primary lost power) overwrites
//! regions in no write order: until it ends, the volumes are an image no
//! application ever wrote. Before the first copy chunk lands, the replica's
//! last consistent image is preserved by copy-on-write (`preserved.rs`,
//! files under `<group dir>/resync-guard/`), so that a failover in the
//! middle of the resync rolls the volumes back to it instead of promoting
//! a mix. The guard goes once the resync ends and the consistent image is
//! persisted.
//!
//! Decisions:
//! - Only a consistent replica is guarded: an initial copy, or the resync
//!   of a failback or `--discard-local` (whose image is the former
//!   primary's, not a prefix of the new primary's writes), has nothing to
//!   preserve; a failover then needs `--force`, as before.
//! - The guard uses the group's `drill_chunk` as its copy-on-write chunk,
//!   and survives restarts and power cuts (same rules as a drill copy).
//! - A failover rolls back through the volumes (a drill copy keeps its own
//!   image), marks every rolled-back region dirty so that a later failback
//!   copies it to the old primary, and reports the guard's recovery point.
//!   The roll-back is recorded in the guard first: a crash in the middle
//!   leaves the group refusing replication sessions until `failover` runs
//!   again and finishes it.
//! - `pair delete` discards the guard: the volumes stay as the resync left
//!   them (`status` said inconsistent).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use replicator_protocol::secondary::PreserveFailure;
use serde::{Deserialize, Serialize};

use super::preserved::{ImageRecord, PreservedImage};
use super::write_path::unix_micros;
use super::{lock, Group, GroupError, Inner};
use crate::io::IoEngine;
use crate::state::GroupState;
use crate::volume::Volume;

/// What the guard preserved (`resync-guard/image.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuardRecord {
    /// The preserved image holds exactly the writes `<= seq` of `epoch`.
    pub seq: u64,
    /// The epoch of those writes.
    pub epoch: u64,
    /// The generation of the pair then.
    pub generation: u64,
    /// The primary's time of write `seq` (µs since the epoch; 0 unknown).
    pub written_at_us: u64,
    /// When the resync started (µs since the epoch).
    pub created_at_us: u64,
    /// Copy-on-write chunk in bytes.
    pub chunk: u64,
    /// Volume names and sizes, in group order.
    pub volumes: Vec<(String, u64)>,
    /// A failover started rolling the volumes back to it.
    #[serde(default)]
    pub rolling_back: bool,
}

impl ImageRecord for GuardRecord {
    fn chunk(&self) -> u64 {
        self.chunk
    }

    fn volumes(&self) -> &[(String, u64)] {
        &self.volumes
    }

    fn describe(&self) -> String {
        format!("the image preserved for a resync (sequence {})", self.seq)
    }
}

/// A guard in place.
#[derive(Debug)]
pub(super) struct ResyncGuard {
    record: GuardRecord,
    image: PreservedImage,
    rolling_back: AtomicBool,
}

/// The image a failover on this secondary would promote (`status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailoverImage {
    /// `replica` (the volumes: consistent), `resync-guard` (the image
    /// preserved when the running resync started: a failover rolls the
    /// resync back to it) or `none` (an initial copy or a failback resync
    /// runs: no consistent image; only `failover --force`, which promotes
    /// the mix).
    pub source: String,
    /// The image holds every write through this sequence (`none`: 0).
    pub seq: u64,
    /// The primary's time of that write (µs since the epoch; 0 unknown).
    pub written_at_us: u64,
    /// `resync-guard`: bytes the preserved image holds (chunks the resync
    /// has overwritten so far).
    #[serde(default)]
    pub preserved_bytes: u64,
}

fn guard_dir(group_dir: &Path) -> PathBuf {
    group_dir.join("resync-guard")
}

/// After a restart, before anything writes the volumes: the guard of a
/// resync that had not finished; a guard whose resync finished (or whose
/// group is no longer a secondary) is removed. Blocking.
pub(super) fn load(
    engine: &IoEngine,
    group_dir: &Path,
    volumes: &[Arc<Volume>],
    persisted: &GroupState,
) -> Result<Option<Arc<ResyncGuard>>, GroupError> {
    let Some((record, image)) = PreservedImage::load::<GuardRecord>(engine, &guard_dir(group_dir), volumes, false)?
    else {
        return Ok(None);
    };
    // Only a resync that has not finished needs it (or a rollback to it
    // that had begun). A replica that is merely not consistent (a session
    // that ended before its applies were durable: the restore journal's
    // replay makes it consistent) must not keep the guard of a resync that
    // finished: a failover would roll back to it, over writes made since.
    let resyncing = persisted.role.as_secondary().is_some_and(|s| s.copy_incomplete || record.rolling_back);
    if !resyncing {
        // Left by a stop between persisting the end of the resync (or a
        // failover) and removing the guard: nothing needs it any more.
        image.detach_now(volumes);
        if let Err(e) = image.remove() {
            tracing::warn!("removing a finished resync guard: {e} (it takes disk space only; remove it by hand)");
        }
        return Ok(None);
    }
    tracing::info!(
        seq = record.seq,
        rolling_back = record.rolling_back,
        "resync guard kept across the restart: a failover before the resync ends rolls back to sequence {}",
        record.seq
    );
    let rolling_back = AtomicBool::new(record.rolling_back);
    Ok(Some(Arc::new(ResyncGuard { record, image, rolling_back })))
}

impl Group {
    fn guard(&self) -> Option<Arc<ResyncGuard>> {
        self.resync_guard.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A failover began rolling back to the guard and did not finish: no
    /// replication session may resume the resync meanwhile.
    pub(super) fn guard_rolling_back(&self) -> bool {
        self.guard().is_some_and(|g| g.rolling_back.load(Ordering::SeqCst))
    }

    /// Whether the image of a secondary about to be resynchronised is
    /// worth preserving: consistent and not already guarded.
    pub(super) fn wants_guard(&self, g: &Inner) -> bool {
        g.persisted.role.as_secondary().is_some_and(|s| s.consistent && !s.copy_incomplete && !s.needs_rebase)
            && self.guard().is_none()
    }

    /// Preserves the volumes' image (the writes `<= seq`, nothing being
    /// applied) before a resync overwrites it: syncs the volumes, creates
    /// the guard durably and attaches it. A guard already in place (no
    /// consistent image since) is kept.
    pub(super) async fn preserve_image(&self, seq: u64, written_at_us: u64) -> Result<(), PreserveFailure> {
        let _one = self.guard_op.lock().await;
        if self.guard().is_some() {
            return Ok(());
        }
        let removal = self.guard_removal.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(removal) = removal {
            // The previous guard's files go first: they live where the new
            // guard's will.
            removal.await.map_err(|e| PreserveFailure::Image(format!("removing the previous resync guard: {e}")))?;
        }
        super::applier::sync_volumes(&self.volumes).await.map_err(PreserveFailure::Volumes)?;
        let record = {
            let g = lock(&self.inner);
            GuardRecord {
                seq,
                epoch: g.persisted.epoch,
                generation: g.persisted.generation,
                written_at_us,
                created_at_us: unix_micros(),
                chunk: self.cfg.drill_chunk,
                volumes: self.volumes.iter().map(|v| (v.name.clone(), v.size())).collect(),
                rolling_back: false,
            }
        };
        let (engine, dir, volumes) = (self.engine.clone(), guard_dir(self.store.dir()), self.volumes.clone());
        let r = record.clone();
        let image = tokio::task::spawn_blocking(move || PreservedImage::create(&engine, &dir, &volumes, &r, false))
            .await
            .map_err(|e| PreserveFailure::Image(e.to_string()))?
            .map_err(|e| PreserveFailure::Image(e.to_string()))?;
        tracing::info!(group = %self.cfg.name, seq,
            "resync starts: the consistent image (sequence {seq}) is preserved until it ends; a failover meanwhile rolls back to it");
        let guard = ResyncGuard { record, image, rolling_back: AtomicBool::new(false) };
        *self.resync_guard.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(guard));
        Ok(())
    }

    /// The resync ended and the consistent image is persisted (or the pair
    /// is gone): the guard goes. A failure only leaves files that the next
    /// start removes.
    pub(super) fn release_image(&self, why: &str) {
        let Some(guard) = self.resync_guard.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        guard.image.detach_now(&self.volumes);
        let name = self.cfg.name.clone();
        tracing::info!(group = %name, seq = guard.record.seq, "{why}: the image preserved for the resync is discarded");
        let remove = move || {
            if let Err(e) = guard.image.remove() {
                tracing::warn!(group = %name, "removing the resync guard: {e} (the next start removes it)");
            }
        };
        match tokio::runtime::Handle::try_current() {
            // The next guard is created in the same directory: it waits for
            // this removal (`preserve_image`).
            Ok(rt) => {
                *self.guard_removal.lock().unwrap_or_else(PoisonError::into_inner) = Some(rt.spawn_blocking(remove))
            }
            Err(_) => remove(),
        }
    }

    /// Waits until the files of the image released last are removed (a
    /// command that released it answers only then).
    pub(super) async fn image_removed(&self) {
        let removal = self.guard_removal.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(removal) = removal {
            if let Err(e) = removal.await {
                tracing::warn!(group = %self.cfg.name, "removing the resync guard: {e} (the next start removes it)");
            }
        }
    }

    /// `status`: the image a failover here would promote.
    pub(super) fn failover_image(&self, g: &Inner) -> Option<FailoverImage> {
        let secondary = g.persisted.role.as_secondary()?;
        if secondary.consistent && !secondary.copy_incomplete {
            return Some(FailoverImage {
                source: "replica".into(),
                // A failover first applies every write durable in the
                // restore journal.
                seq: secondary.durable_seq.max(g.secondary_durable),
                written_at_us: secondary.data_as_of_us,
                preserved_bytes: 0,
            });
        }
        Some(match self.guard() {
            Some(guard) => FailoverImage {
                source: "resync-guard".into(),
                seq: guard.record.seq,
                written_at_us: guard.record.written_at_us,
                preserved_bytes: guard.image.held_bytes(),
            },
            None => FailoverImage { source: "none".into(), seq: 0, written_at_us: 0, preserved_bytes: 0 },
        })
    }

    /// Failover during a resync: rolls the volumes back to the guard's
    /// image (recording that first) and returns what it holds and the
    /// regions rewritten per volume; `None` without a guard. The caller
    /// promotes and persists, then calls [`Group::release_image`].
    pub(super) async fn roll_back_resync(&self) -> Result<Option<(GuardRecord, Vec<Vec<(u64, u64)>>)>, GroupError> {
        let Some(guard) = self.guard() else { return Ok(None) };
        if !guard.rolling_back.swap(true, Ordering::SeqCst) {
            let record = GuardRecord { rolling_back: true, ..guard.record.clone() };
            let g2 = guard.clone();
            let recorded = tokio::task::spawn_blocking(move || g2.image.rewrite_record(&record))
                .await
                .map_err(|e| GroupError::Failed(format!("failover: {e}")))
                .and_then(|recorded| recorded);
            if let Err(e) = recorded {
                // Not on disk: the next failover writes it again before it
                // touches a volume (a restart in the middle of a rollback
                // must find it, and refuse sessions until it is finished).
                guard.rolling_back.store(false, Ordering::SeqCst);
                return Err(e);
            }
        }
        guard.image.detach(&self.volumes).await;
        let regions = guard.image.roll_back(&self.volumes).await?;
        let bytes: u64 = regions.iter().flatten().map(|(_, len)| len).sum();
        tracing::warn!(group = %self.cfg.name, seq = guard.record.seq, bytes,
            "failover during a resync: the volumes are rolled back to the consistent image preserved when it started");
        Ok(Some((guard.record.clone(), regions)))
    }
}
