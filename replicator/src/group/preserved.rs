//! A group-consistent image of the volumes kept by copy-on-write: one
//! [`Snapshot`] per volume in a directory, named by a JSON record
//! (`image.json`). Drill copies (`drill.rs`) and the image a resync
//! protects (`resync_guard.rs`) are such images.
//!
//! Durability: the snapshot files are created durably and the directory is
//! synced before `image.json` names them (written atomically); the record
//! is removed durably before the files. A directory without `image.json`
//! is a creation or removal that did not finish and is deleted on load.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::GroupError;
use crate::io::IoEngine;
use crate::snapshot::Snapshot;
use crate::state::write_atomically;
use crate::volume::Volume;

/// What names a preserved image on disk.
pub(super) trait ImageRecord: Serialize + DeserializeOwned {
    /// Copy-on-write chunk in bytes.
    fn chunk(&self) -> u64;
    /// The volumes (name, size) it was taken of, in group order.
    fn volumes(&self) -> &[(String, u64)];
    /// What it is, for messages ("drill 20261201T221500-123Z").
    fn describe(&self) -> String;
}

/// The snapshots of one preserved image, attached to the group's volumes.
#[derive(Debug)]
pub(super) struct PreservedImage {
    dir: PathBuf,
    snapshots: Vec<Arc<Snapshot>>,
}

fn failed(what: &str) -> impl Fn(std::io::Error) -> GroupError + '_ {
    move |e| GroupError::Failed(format!("{what}: {e}"))
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("image.json")
}

fn sync_dir(dir: &Path) -> Result<(), GroupError> {
    crate::durable::sync_dir(dir).map_err(failed("syncing a snapshot directory"))
}

impl PreservedImage {
    /// Creates empty snapshots of `volumes` in `dir` and then the record
    /// naming them, and attaches them: from here every write to a volume
    /// preserves what it overwrites. The volumes must hold the image
    /// durably already. Blocking.
    pub(super) fn create<R: ImageRecord>(
        engine: &IoEngine,
        dir: &Path,
        volumes: &[Arc<Volume>],
        record: &R,
        expendable: bool,
    ) -> Result<PreservedImage, GroupError> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(failed("removing a stale snapshot directory"))?;
        }
        crate::perms::ensure_dir(dir, 0o700, "snapshot directory").map_err(failed("creating a snapshot directory"))?;
        let mut snapshots = Vec::new();
        for v in volumes {
            let s = Snapshot::create(engine, dir, &v.name, v.size(), record.chunk())
                .map_err(|e| GroupError::Failed(format!("{}: {e}", record.describe())))?;
            snapshots.push(Arc::new(s));
        }
        sync_dir(dir)?;
        let json = serde_json::to_vec_pretty(record).map_err(|e| GroupError::Failed(e.to_string()))?;
        write_atomically(&record_path(dir), &json).map_err(failed("writing a snapshot record"))?;
        let image = PreservedImage { dir: dir.to_path_buf(), snapshots };
        image.attach(volumes, expendable);
        Ok(image)
    }

    /// After a restart, before anything writes the volumes: the image in
    /// `dir`, attached to `volumes`, if its record exists (leftovers
    /// without one are removed). Blocking.
    pub(super) fn load<R: ImageRecord>(
        engine: &IoEngine,
        dir: &Path,
        volumes: &[Arc<Volume>],
        expendable: bool,
    ) -> Result<Option<(R, PreservedImage)>, GroupError> {
        let path = record_path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.exists() {
                    std::fs::remove_dir_all(dir).map_err(failed("removing an unfinished snapshot"))?;
                }
                return Ok(None);
            }
            Err(e) => return Err(GroupError::Failed(format!("{}: {e}", path.display()))),
        };
        let record: R =
            serde_json::from_slice(&bytes).map_err(|e| GroupError::Failed(format!("{}: {e}", path.display())))?;
        // A crash between the record's rename and its directory's fsync
        // left its name not durable, and nothing fsyncs this directory
        // later: a power cut long after would take the image away.
        sync_dir(dir)?;
        let ours: Vec<(String, u64)> = volumes.iter().map(|v| (v.name.clone(), v.size())).collect();
        if record.volumes() != ours.as_slice() {
            return Err(GroupError::Failed(format!(
                "{} was taken of volumes {:?}, the configuration now has {ours:?}; restore the configuration, or \
                 remove {} to discard it",
                record.describe(),
                record.volumes(),
                dir.display()
            )));
        }
        let mut snapshots = Vec::new();
        for v in volumes {
            let s = Snapshot::open(engine, dir, &v.name, v.size(), record.chunk())
                .map_err(|e| GroupError::Failed(format!("{}: {e}", record.describe())))?;
            snapshots.push(Arc::new(s));
        }
        let image = PreservedImage { dir: dir.to_path_buf(), snapshots };
        image.attach(volumes, expendable);
        Ok(Some((record, image)))
    }

    /// `expendable`: the volumes' writes give the image up when preserving
    /// into it fails (a drill copy: replication must not stop for it), see
    /// [`crate::snapshot::Snapshot::give_up`]; otherwise such a write fails
    /// (the image a resync guard keeps is the replica's only consistent
    /// one).
    fn attach(&self, volumes: &[Arc<Volume>], expendable: bool) {
        if expendable {
            let give_up = crate::snapshot::GiveUp::new(record_path(&self.dir));
            for s in &self.snapshots {
                s.make_expendable(give_up.clone());
            }
        }
        for (v, s) in volumes.iter().zip(&self.snapshots) {
            v.attach_snapshot(s.clone());
        }
    }

    /// Why the image was given up (see `attach`), if it was.
    pub(super) fn given_up(&self) -> Option<String> {
        self.snapshots.iter().find_map(|s| s.given_up())
    }

    /// The snapshot of volume `index`.
    pub(super) fn snapshot(&self, index: usize) -> Option<&Arc<Snapshot>> {
        self.snapshots.get(index)
    }

    /// Bytes the snapshots hold.
    pub(super) fn held_bytes(&self) -> u64 {
        self.snapshots.iter().map(|s| s.held_bytes()).sum()
    }

    /// Rewrites the record (atomically, durably); nothing for an expendable
    /// image given up (its record is gone for good). Blocking.
    pub(super) fn rewrite_record<R: ImageRecord>(&self, record: &R) -> Result<(), GroupError> {
        let json = serde_json::to_vec_pretty(record).map_err(|e| GroupError::Failed(e.to_string()))?;
        let write = || write_atomically(&record_path(&self.dir), &json).map_err(failed("writing a snapshot record"));
        match self.snapshots.first().and_then(|s| s.expendable()) {
            Some(give_up) => give_up.unless_given_up(write).unwrap_or(Ok(())),
            None => write(),
        }
    }

    /// Stops preserving into the snapshots (writes already preserving into
    /// them finish on their own).
    pub(super) fn detach_now(&self, volumes: &[Arc<Volume>]) {
        for (v, s) in volumes.iter().zip(&self.snapshots) {
            v.detach_snapshot(s);
        }
    }

    /// Stops preserving into the snapshots and waits (up to a minute) for
    /// writes that were preserving into them to finish.
    pub(super) async fn detach(&self, volumes: &[Arc<Volume>]) {
        self.detach_now(volumes);
        let deadline = Instant::now() + Duration::from_secs(60);
        // `self` holds one reference; a write preserving holds another.
        while self.snapshots.iter().any(|s| Arc::strong_count(s) > 1) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes the preserved image back into the volumes (through them, so
    /// any other image attached to them preserves what this overwrites)
    /// and syncs them. Call after [`PreservedImage::detach`]. Returns the
    /// regions rewritten per volume, as (offset, length).
    pub(super) async fn roll_back(&self, volumes: &[Arc<Volume>]) -> Result<Vec<Vec<(u64, u64)>>, GroupError> {
        let mut regions = Vec::new();
        for (v, s) in volumes.iter().zip(&self.snapshots) {
            let r =
                s.roll_back(v).await.map_err(|e| GroupError::Failed(format!("rolling volume {} back: {e}", v.name)))?;
            regions.push(r);
        }
        Ok(regions)
    }

    /// Removes the record (durably): a restart no longer finds the image.
    /// Blocking.
    pub(super) fn forget(&self) -> Result<(), GroupError> {
        let path = record_path(&self.dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(GroupError::Failed(format!("removing {}: {e}", path.display())))
            }
            _ => {}
        }
        sync_dir(&self.dir)
    }

    /// Removes the record (durably, unless [`PreservedImage::forget`] did),
    /// then the snapshot files and the directory. Call after
    /// [`PreservedImage::detach`]. Blocking.
    pub(super) fn remove(&self) -> Result<(), GroupError> {
        self.forget()?;
        std::fs::remove_dir_all(&self.dir).map_err(failed("removing a snapshot directory"))
    }
}
