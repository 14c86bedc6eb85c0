//! The volumes a group's pair was made of: their names and paths, kept in
//! its state directory. Records, dirty bitmaps and the activity log name a
//! volume by its place in the list, and the pair's claim that both sites
//! hold the same bytes is about the files at those paths. So a paired
//! group refuses to open when its configuration names other volumes or
//! puts one at another path (a typo, a path moved: with `create = true` a
//! new empty file would be served as the replica, or as the primary's data,
//! while status said `PAIR`) or finds a volume file gone from its path (a
//! filesystem not mounted), and a group may not take a volume that the
//! state of a paired group no longer configured names (a renamed group
//! would serve the replica writable). A group not paired adopts what is
//! configured, as does a pair from a release that did not keep the list.
//!
//! [`check`] only reads (`config check` runs it); the daemon runs it before
//! opening any volume, and [`adopt`] records the configured layout once a
//! group has opened.

use std::path::{Path, PathBuf};

use crate::config::GroupConfig;
use replicator_protocol::pair::Role;

use crate::state::{StateError, StateFile};

/// File name of the group's volume names, one per line.
const VOLUME_LIST: &str = "volumes";
/// File name of the group's volume paths (JSON: `[[name, path], ...]`).
const VOLUME_PATHS: &str = "volume-paths";

/// What the state directory says of `group`'s volumes, and whether it is
/// paired there.
struct Recorded {
    role: Role,
    names: Option<Vec<String>>,
    paths: Option<Vec<(String, PathBuf)>>,
}

impl Recorded {
    fn load(store: &StateFile) -> Result<Self, StateError> {
        let role = store.load()?.map_or(Role::None, |s| s.role());
        // An unreadable copy is as good as none: the configured one is
        // adopted (and a paired group loses only this check).
        let blob = |name: &str| match store.load_blob(name) {
            Ok(bytes) => Ok(bytes),
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::InvalidData => Ok(None),
            Err(e) => Err(e),
        };
        let names = blob(VOLUME_LIST)?.map(|b| String::from_utf8_lossy(&b).split('\n').map(str::to_string).collect());
        let paths = blob(VOLUME_PATHS)?.and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self { role, names, paths })
    }
}

/// The same file: the same path, or two that resolve to one (a symbolic
/// link such as `/dev/vg/lv` and `/dev/mapper/vg-lv`).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// Why `group` may not open as configured, if so (without the group's
/// name: the caller says which group). `others` are the group directories
/// of `state_dir` that no configured group owns.
fn refusal(state_dir: &Path, group: &GroupConfig, others: &[String]) -> Result<Option<String>, StateError> {
    let name = &group.name;
    let recorded = Recorded::load(&StateFile::new(state_dir, name))?;
    let configured: Vec<&str> = group.volumes.iter().map(|v| v.name.as_str()).collect();
    if recorded.role != Role::None {
        if let Some(names) = recorded.names.as_ref().filter(|n| **n != configured) {
            return Ok(Some(format!(
                "paired with volumes [{}], but the configuration lists [{}]: the volumes of a paired group cannot \
                 change (records and dirty regions name a volume by its place in the list). Restore the list, run \
                 `replicator pair delete {name}` on both sites, then change the volumes (the next `pair create` \
                 copies them whole)",
                names.join(", "),
                configured.join(", ")
            )));
        }
        for (volume, path) in recorded.paths.iter().flatten() {
            let Some(now) = group.volumes.iter().find(|v| v.name == *volume) else { continue };
            if !same_path(path, &now.path) {
                return Ok(Some(format!(
                    "volume {volume} of this paired group was {}, but the configuration says {}: another file is \
                     not the replica the pair knows (a new or different file would be served as if it held the \
                     pair's data). Restore the path. If {} holds this volume's data (moved with the daemon \
                     stopped), remove {} and start again: the new path is recorded",
                    path.display(),
                    now.path.display(),
                    now.path.display(),
                    StateFile::new(state_dir, name).dir().join(VOLUME_PATHS).display()
                )));
            }
        }
        // A volume file gone from its path (a filesystem not mounted): with
        // `create = true` an empty file would be made there and served as
        // the pair's data.
        if let Some(v) = group.volumes.iter().find(|v| !v.path.exists()) {
            return Ok(Some(format!(
                "volume {} of this paired group is missing: {} does not exist (a filesystem not mounted, a device \
                 not there yet?). The pair's data is not there; nothing is created in its place. Make the path \
                 available and start again",
                v.name,
                v.path.display()
            )));
        }
    }
    for other in others {
        // A directory that is not a group's readable state (a copy left by
        // hand) names no volume: it must not switch the check off.
        let Ok(theirs) = Recorded::load(&StateFile::new(state_dir, other)) else {
            tracing::warn!(dir = %StateFile::new(state_dir, other).dir().display(),
                "not a readable group state: not checked for volumes of a group no longer configured");
            continue;
        };
        if theirs.role == Role::None {
            continue;
        }
        for (volume, path) in theirs.paths.iter().flatten() {
            if let Some(mine) = group.volumes.iter().find(|v| same_path(path, &v.path)) {
                return Ok(Some(format!(
                    "volume {} ({}) is volume {volume} of group {other}, which is paired here ({}) and no longer \
                     configured (renamed?): this group would serve that replica or primary as a volume of its own. \
                     Restore the group's name; to use the volume otherwise, first end that pair with `replicator \
                     pair delete {other}` with the group configured as it was",
                    mine.name,
                    mine.path.display(),
                    theirs.role.as_str()
                )));
            }
        }
    }
    Ok(None)
}

/// The group directories of `state_dir` (names), sorted.
fn group_dirs(state_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state_dir.join("groups"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The configured groups that may not open as configured, each with why
/// (reading `state_dir` only). A state this cannot read (`config check`
/// run by another user) is left to the group's open, which says why.
pub fn check(state_dir: &Path, groups: &[GroupConfig]) -> Vec<(String, String)> {
    let others: Vec<String> =
        group_dirs(state_dir).into_iter().filter(|d| !groups.iter().any(|g| g.name == *d)).collect();
    groups
        .iter()
        .filter_map(|g| match refusal(state_dir, g, &others) {
            Ok(Some(why)) => Some((g.name.clone(), why)),
            Ok(None) | Err(_) => None,
        })
        .collect()
}

/// Why `group` may not open as configured, as [`check`] says, but
/// without looking at other groups' directories.
pub(super) fn refusal_of(state_dir: &Path, group: &GroupConfig) -> Result<Option<String>, StateError> {
    refusal(state_dir, group, &[])
}

/// Records `group`'s configured volumes as its pair's (once [`check`] let
/// it open).
pub(super) fn adopt(store: &StateFile, group: &GroupConfig) -> Result<(), StateError> {
    let names: Vec<&str> = group.volumes.iter().map(|v| v.name.as_str()).collect();
    let paths: Vec<(&str, &Path)> = group.volumes.iter().map(|v| (v.name.as_str(), v.path.as_path())).collect();
    let recorded = Recorded::load(store)?;
    if recorded.names.as_deref().is_none_or(|n| n != names) {
        store.save_blob(VOLUME_LIST, names.join("\n").as_bytes())?;
    }
    let same = recorded
        .paths
        .as_ref()
        .is_some_and(|p| p.len() == paths.len() && p.iter().zip(&paths).all(|((n, p), (m, q))| n == m && p == q));
    if !same {
        let json = serde_json::to_vec(&paths)
            .map_err(|e| StateError::Io { path: store.dir().join(VOLUME_PATHS), source: std::io::Error::other(e) })?;
        store.save_blob(VOLUME_PATHS, &json)?;
    }
    Ok(())
}
