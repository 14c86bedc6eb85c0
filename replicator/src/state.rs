//! Persisted per-group pair metadata (`state_dir/groups/<group>/state.json`).
//!
//! Roles are not in the configuration: `pair create` on the future primary
//! sets the direction and this file is the truth from then on. Every update
//! is written to a temporary file, fsynced and renamed over the old one, and
//! the directory is fsynced, so a crash leaves either the old or the new
//! state, never a torn one. The group directory is 0700 and every file
//! written here 0600, whatever the umask (see [`crate::perms`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::perms::{ensure_dir, PRIVATE_FILE_MODE, STATE_DIR_MODE};

use replicator_protocol::pair::{PairState, Role};
use serde::{Deserialize, Serialize};

/// State file errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exists but is not valid.
    #[error("{path}: corrupt state file: {message} (move it away only if you know this group's role; replicator will not guess it)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// serde's message.
        message: String,
    },
}

/// What `state.json` holds for one group. Role and pair state are typed:
/// a file whose role or state does not parse is refused (the daemon will
/// not guess whether a volume is a writable primary or a replica).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupState {
    /// This node's role.
    #[serde(with = "as_text")]
    pub role: Role,
    /// Pair state, e.g. "PAIR", "COPY", "SUSPENDED(split)".
    #[serde(with = "as_text")]
    pub state: PairState,
    /// Incremented on each promotion (pair create, failover): decides on
    /// reconnect which of two primaries was superseded.
    pub generation: u64,
    /// Primary: incremented on each unclean restart (sequence numbers
    /// after the surviving journal are never trusted again); a secondary
    /// keeps the epoch it rebased in. With the pair id it keys the record
    /// headers of this node's journal, so a record of an earlier epoch is
    /// never read as one of this epoch.
    #[serde(default)]
    pub epoch: u64,
    /// Random id chosen at `pair create`, shared by both sides.
    pub pair_id: u64,
    /// Sequence and journal position of the oldest retained record (or of
    /// the next record, when the journal is empty). On a secondary, of its
    /// restore journal: the record after `durable_seq`.
    pub journal_tail_seq: u64,
    /// See `journal_tail_seq`.
    pub journal_tail_pos: u64,
    /// Primary: a copy (initial or resync) is needed or running; the dirty
    /// bitmaps say which regions.
    pub copy_pending: bool,
    /// Primary: writes are tracked in the bitmap instead of the journal.
    pub bitmap_mode: bool,
    /// Primary: the last record journaled before writes went to the bitmap
    /// only; records after it follow writes the secondary lacks until the
    /// resync completes (`COMMAND_RESYNC_GAP`, told at each session start).
    #[serde(default)]
    pub resync_gap: Option<u64>,
    /// Primary: the last record journaled before a write made in bitmap
    /// mode. A journal replay after an unclean stop never replays a record
    /// up to here (such a write may have overwritten it; the resync copies
    /// the region instead). See `replicator_protocol::bitmap::plan_replay`.
    #[serde(default)]
    pub replay_fence: u64,
    /// Secondary: every record up to here is on the volumes durably (the
    /// checkpoint; newer ones are replayed from the restore journal).
    pub durable_seq: u64,
    /// Secondary: the volumes hold a write-order-consistent image.
    pub consistent: bool,
    /// Set when the daemon stopped cleanly; cleared while it runs.
    pub clean_shutdown: bool,
    /// Primary: what the next session must tell the secondary.
    #[serde(default)]
    pub announce: Announce,
    /// Secondary: the primary's time of the newest durable write here
    /// (µs since the Unix epoch; 0 unknown).
    #[serde(default)]
    pub data_as_of_us: u64,
    /// SIMPLEX: the pair this node left with `pair delete` (0: none), so a
    /// primary that still ships for it learns it is alone.
    #[serde(default)]
    pub former_pair_id: u64,
    /// SIMPLEX after leaving a pair: clients wrote to the volumes since, so
    /// the former primary's data and this node's have diverged.
    #[serde(default)]
    pub written_standalone: bool,
    /// The kernel boot (`/proc/sys/kernel/random/boot_id`) the daemon last
    /// ran in: after an unclean stop, a different one means the machine
    /// lost power or rebooted, so the page cache (and a disk's volatile
    /// cache) may have dropped anything not yet made durable.
    #[serde(default)]
    pub boot_id: String,
    /// Secondary: a copy (initial or resync) has started and not finished.
    #[serde(default)]
    pub copy_incomplete: bool,
    /// Primary: the generation of a failover on the peer that superseded
    /// this node (0: none). A superseded primary is fenced: it accepts no
    /// writes, across restarts, until an admin acts.
    #[serde(default)]
    pub superseded_by: u64,
    /// Secondary: the primary's last progress report: its newest journaled
    /// seq, the bytes it held not yet durable here, and when, by its clock (µs since the
    /// epoch). A failover says what it leaves behind from these.
    #[serde(default)]
    pub primary_reported_seq: u64,
    /// See `primary_reported_seq`.
    #[serde(default)]
    pub primary_reported_bytes: u64,
    /// See `primary_reported_seq`.
    #[serde(default)]
    pub primary_reported_at_us: u64,
    /// Primary after a promotion (failover, switchover, swap): the last
    /// record of the old generation its image held.
    #[serde(default)]
    pub takeover: Option<TakeoverPoint>,
    /// Fenced primary: the takeover point of the peer that superseded it
    /// (None: unknown).
    #[serde(default)]
    pub superseded_at: Option<TakeoverPoint>,
    /// Secondary: its volumes hold writes the primary lacks (failback,
    /// `--discard-local`, writes while split with `--rw`); its dirty
    /// bitmaps name the regions. The primary copies them (and its own
    /// changes) before the pair resumes.
    #[serde(default)]
    pub needs_rebase: bool,
    /// Secondary, split with `--rw`: its volumes take writes.
    #[serde(default)]
    pub split_writable: bool,
    /// Primary with `announce = resync`: the record the secondary rebases
    /// on (0: the one before `journal_tail_seq`).
    #[serde(default)]
    pub rebase_seq: u64,
    /// Primary: the next session says `pair resync` ran (lifts a split on
    /// the secondary).
    #[serde(default)]
    pub admin_resync: bool,
    /// Primary after `pair resync --swap`: the next session asks the split
    /// former primary to give up the role.
    #[serde(default)]
    pub swap: bool,
    /// Primary with `announce = resync`: the bitmaps cover the regions the
    /// secondary discarded (its `REFUSAL_NEEDS_REBASE`), so it may forget
    /// them when it accepts.
    #[serde(default)]
    pub rebased: bool,
}

/// Where a promoted primary's image left the old generation (see
/// `replicator_protocol::divergence`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakeoverPoint {
    /// The last record it held.
    pub seq: u64,
    /// The epoch that record belonged to.
    pub epoch: u64,
}

impl From<TakeoverPoint> for replicator_protocol::divergence::TakeoverPoint {
    fn from(p: TakeoverPoint) -> Self {
        Self { seq: p.seq, epoch: p.epoch }
    }
}

/// What the primary's next session announces to the secondary.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Announce {
    /// A plain resume of an existing pair.
    #[default]
    #[serde(rename = "")]
    Resume,
    /// `pair create`: a full initial copy follows.
    CreateCopy,
    /// `pair create --nocopy`.
    CreateNocopy,
    /// After a power cut: a new generation; the secondary rebases on the
    /// recovered journal and the activity log's regions are copied.
    Resync,
}

impl GroupState {
    /// A group that is not paired.
    pub fn simplex() -> Self {
        Self {
            role: Role::None,
            state: PairState::Simplex,
            generation: 0,
            epoch: 0,
            pair_id: 0,
            journal_tail_seq: 0,
            journal_tail_pos: 0,
            copy_pending: false,
            bitmap_mode: false,
            resync_gap: None,
            replay_fence: 0,
            durable_seq: 0,
            consistent: true,
            clean_shutdown: true,
            announce: Announce::Resume,
            data_as_of_us: 0,
            former_pair_id: 0,
            written_standalone: false,
            boot_id: String::new(),
            copy_incomplete: false,
            superseded_by: 0,
            primary_reported_seq: 0,
            primary_reported_bytes: 0,
            primary_reported_at_us: 0,
            takeover: None,
            superseded_at: None,
            needs_rebase: false,
            split_writable: false,
            rebase_seq: 0,
            admin_resync: false,
            swap: false,
            rebased: false,
        }
    }
}

/// Serde through `Display` / `FromStr` (roles and pair states are stored as
/// the text `status` shows).
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// Reads and writes one group's state file.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// The group's directory under `state_dir`.
    pub fn new(state_dir: &Path, group: &str) -> Self {
        Self { dir: state_dir.join("groups").join(group) }
    }

    /// The directory holding the state file, journal and bitmaps.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StateError {
        move |source| StateError::Io { path, source }
    }

    /// Creates the group directory (and `groups/`) 0700, or tightens it.
    pub fn ensure_dir(&self) -> Result<(), StateError> {
        ensure_dir(&self.dir, STATE_DIR_MODE, "group directory").map_err(self.io(self.dir.clone()))
    }

    /// Loads the state, or `None` if the group was never paired here.
    pub fn load(&self) -> Result<Option<GroupState>, StateError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StateError::Corrupt { path, message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    /// Atomically replaces the state file.
    pub fn save(&self, state: &GroupState) -> Result<(), StateError> {
        self.ensure_dir()?;
        write_atomically(&self.path(), &serde_json::to_vec_pretty(state).unwrap_or_default())
            .map_err(self.io(self.path()))
    }

    /// Atomically replaces another file in the group directory (bitmaps).
    pub fn save_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        self.ensure_dir()?;
        let path = self.dir.join(name);
        write_atomically(&path, bytes).map_err(self.io(path))
    }

    /// Reads another file in the group directory, `None` if absent.
    pub fn load_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join(name);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }
}

/// Writes `bytes` to `path` via a temporary file, fsync and rename, then
/// fsyncs the directory. The file is created 0600 whatever the umask, and
/// never through a symbolic link planted at the temporary path: a stale
/// temporary file (or link) is removed, then the new one is created
/// exclusively with `O_NOFOLLOW`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // The umask may only narrow the mode; make it exact.
        f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn files_and_dirs_are_private_whatever_the_umask() {
        let root = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(root.path(), "db");
        crate::perms::with_umask(0o000, || {
            f.save(&GroupState::simplex()).expect("save");
            f.save_blob("bitmap.v0", b"bits").expect("save_blob");
        });
        assert_eq!(mode_of(f.dir()), 0o700, "group directory");
        assert_eq!(mode_of(&root.path().join("groups")), 0o700, "groups/");
        assert_eq!(mode_of(&f.dir().join("state.json")), 0o600, "state.json");
        assert_eq!(mode_of(&f.dir().join("bitmap.v0")), 0o600, "bitmap");

        // A file from an older build with a wide mode is replaced by a 0600
        // one; a wide group directory is tightened.
        fs::set_permissions(f.dir().join("state.json"), fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::set_permissions(f.dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
        f.save(&GroupState::simplex()).expect("save");
        assert_eq!(mode_of(&f.dir().join("state.json")), 0o600);
        assert_eq!(mode_of(f.dir()), 0o700);
    }

    #[test]
    fn a_symlink_at_the_temporary_path_is_not_followed() {
        let root = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(root.path(), "db");
        f.ensure_dir().expect("dir");
        let victim = root.path().join("victim");
        fs::write(&victim, b"untouched").expect("write");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).expect("chmod");
        std::os::unix::fs::symlink(&victim, f.dir().join("state.tmp")).expect("symlink");
        f.save(&GroupState::simplex()).expect("save");
        assert_eq!(fs::read(&victim).expect("read"), b"untouched");
        assert_eq!(mode_of(&victim), 0o644);
        assert!(f.load().expect("load").is_some());
        assert!(!f.dir().join("state.tmp").exists(), "the link is gone");
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(dir.path(), "db");
        assert_eq!(f.load().expect("load"), None);
        let mut s = GroupState::simplex();
        s.role = Role::Primary;
        s.state = PairState::Suspended(replicator_protocol::pair::SuspendReason::Link);
        s.generation = 3;
        f.save(&s).expect("save");
        assert_eq!(f.load().expect("load"), Some(s.clone()));
        fs::write(f.dir().join("state.json"), b"{not json").expect("write");
        assert!(matches!(f.load(), Err(StateError::Corrupt { .. })));
        // A role or state that does not parse is refused, never guessed.
        let text = serde_json::to_string(&s).expect("json");
        for (from, to) in [("\"primary\"", "\"primray\""), ("\"SUSPENDED(link)\"", "\"SUSPENDED(lnk)\"")] {
            fs::write(f.dir().join("state.json"), text.replace(from, to)).expect("write");
            let err = f.load().expect_err("a mangled role or state must not load");
            assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        }
        // A missing role is refused too (no silent default to SIMPLEX).
        fs::write(f.dir().join("state.json"), text.replace("\"role\"", "\"rol\"")).expect("write");
        assert!(matches!(f.load(), Err(StateError::Corrupt { .. })));
    }
}
