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
use std::path::{Path, PathBuf};

use crate::perms::{ensure_dir, PRIVATE_FILE_MODE, STATE_DIR_MODE};
use crate::slotted_file::{self, SlottedFile};

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

/// What `state.json` holds for one group: what every role has, and this
/// node's role with what only that role has ([`RoleState`]). A role change
/// replaces `role` as a whole, so nothing of the old role stays behind.
///
/// On disk it is the flat format every release so far has written (see
/// `StateFileV1`): a file from an older release loads unchanged in meaning,
/// and an older release loads a file written here. Role and pair state are
/// typed: a file whose role or state does not parse is refused (the daemon
/// will not guess whether a volume is a writable primary or a replica).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "StateFileV1", into = "StateFileV1")]
pub struct GroupState {
    /// This node's role, with its role's state.
    pub role: RoleState,
    /// Pair state, e.g. "PAIR", "COPY", "SUSPENDED(split)".
    pub state: PairState,
    /// Incremented on each promotion (pair create, failover): decides on
    /// reconnect which of two primaries was superseded.
    pub generation: u64,
    /// Primary: incremented on each unclean restart (sequence numbers
    /// after the surviving journal are never trusted again); a secondary
    /// keeps the epoch it rebased in. With the pair id it keys the record
    /// headers of this node's journal, so a record of an earlier epoch is
    /// never read as one of this epoch.
    pub epoch: u64,
    /// Random id chosen at `pair create`, shared by both sides (0: none).
    pub pair_id: u64,
    /// Set when the daemon stopped cleanly; cleared while it runs.
    pub clean_shutdown: bool,
    /// The kernel boot (`/proc/sys/kernel/random/boot_id`) the daemon last
    /// ran in: after an unclean stop, a different one means the machine
    /// lost power or rebooted, so the page cache (and a disk's volatile
    /// cache) may have dropped anything not yet made durable.
    pub boot_id: String,
    /// A sync of this group's volumes or journal failed while the daemon
    /// ran (it then stopped the group): what that sync was to make durable
    /// may be lost although the machine did not reboot, so the next start
    /// treats the stop as a power cut.
    pub sync_failed: bool,
}

/// This node's role in the group and what only that role keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleState {
    /// Not paired (`"role": "none"`).
    Simplex(SimplexState),
    /// The side clients write to; ships records.
    Primary(PrimaryState),
    /// The side that applies records.
    Secondary(SecondaryState),
}

/// What a group that is not paired keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimplexState {
    /// The pair this node left with `pair delete` (0: none), so a primary
    /// that still ships for it learns it is alone.
    pub former_pair_id: u64,
    /// After leaving a pair: clients wrote to the volumes since, so the
    /// former primary's data and this node's have diverged.
    pub written_standalone: bool,
}

/// What a primary keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryState {
    /// Sequence and journal position of the oldest retained record (or of
    /// the next record, when the journal is empty).
    pub journal_tail_seq: u64,
    /// See `journal_tail_seq`.
    pub journal_tail_pos: u64,
    /// A copy (initial or resync) is needed or running; the dirty bitmaps
    /// say which regions.
    pub copy_pending: bool,
    /// Writes are tracked in the bitmap instead of the journal.
    pub bitmap_mode: bool,
    /// The last record journaled before writes went to the bitmap only;
    /// records after it follow writes the secondary lacks until the resync
    /// completes (`COMMAND_RESYNC_GAP`, told at each session start).
    pub resync_gap: Option<u64>,
    /// When the journal filled and writes went to the bitmaps only (µs
    /// since the Unix epoch; 0 without a resync gap): the secondary lacks
    /// writes made since then until the resync completes, and the lag is
    /// at least that old.
    pub resync_gap_at_us: u64,
    /// The last record journaled before a write made in bitmap mode
    /// (persisted before that write reaches a volume).
    pub bitmap_fence: u64,
    /// The bitmap fence, once a resync may clear the chunks such a write
    /// dirtied (persisted before the resync hands out its first chunk). A
    /// journal replay after an unclean stop never replays a record up to
    /// here: a cleared chunk no longer shows that a newer write may have
    /// overwritten it (the resync copies the region instead). Until then the
    /// dirty chunks alone rule records out. See
    /// `replicator_protocol::bitmap::plan_replay`.
    pub replay_fence: u64,
    /// What the next session must tell the secondary.
    pub announce: Announce,
    /// The volumes hold a write-order-consistent image (false only after
    /// `failover --force` promoted a replica whose copy had not finished).
    pub consistent: bool,
    /// The generation of a failover on the peer that superseded this node
    /// (0: none). A superseded primary is fenced: it accepts no writes,
    /// across restarts, until an admin acts.
    pub superseded_by: u64,
    /// Fenced: the takeover point of the peer that superseded it (None:
    /// unknown).
    pub superseded_at: Option<TakeoverPoint>,
    /// After a promotion (failover, switchover, swap): the last record of
    /// the old generation its image held.
    pub takeover: Option<TakeoverPoint>,
    /// With `announce = resync`: the record the secondary rebases on (0:
    /// the one before `journal_tail_seq`).
    pub rebase_seq: u64,
    /// The next session says `pair resync` ran (lifts a split on the
    /// secondary).
    pub admin_resync: bool,
    /// After `pair resync --swap`: the next session asks the split former
    /// primary to give up the role.
    pub swap: bool,
    /// With `announce = resync`: the bitmaps cover the regions the
    /// secondary discarded (its `REFUSAL_NEEDS_REBASE`), so it may forget
    /// them when it accepts.
    pub rebased: bool,
    /// A switchover may have asked the secondary to take over after this
    /// record (of this epoch; saved before the request is sent): until the
    /// peer answers, either as the new primary (this node becomes its
    /// secondary, in this epoch again: a restart meanwhile started a new
    /// one) or as this node's secondary still (it did not take over), no
    /// writes are taken here, across restarts: a crash before the demotion
    /// was saved must not bring back a primary beside the new one.
    pub handing_over: Option<TakeoverPoint>,
    /// Sync mode: every write this primary acknowledged is on the
    /// secondary (it waited for each; set once RPO 0 is in force, cleared,
    /// durably, before a write is acknowledged without the secondary).
    /// Records it holds beyond a failover's takeover point were then never
    /// acknowledged: it is fenced, not in split brain. False when unknown
    /// (async mode, older files).
    pub acked_all_on_peer: bool,
    /// A split primary told by its peer that `pair resync --swap` made the
    /// peer the primary, while NBD clients held the volumes here: the
    /// peer's generation (0: none). No writes are taken (the swap
    /// overwrites them), across restarts, until the role is given up once
    /// the clients detach and the peer dials again.
    pub swapped_away_to: u64,
}

impl Default for PrimaryState {
    /// An empty journal at sequence 0, consistent, nothing to copy or
    /// announce, not fenced.
    fn default() -> Self {
        Self {
            journal_tail_seq: 0,
            journal_tail_pos: 0,
            copy_pending: false,
            bitmap_mode: false,
            resync_gap: None,
            resync_gap_at_us: 0,
            bitmap_fence: 0,
            replay_fence: 0,
            announce: Announce::Resume,
            consistent: true,
            superseded_by: 0,
            superseded_at: None,
            takeover: None,
            rebase_seq: 0,
            admin_resync: false,
            swap: false,
            rebased: false,
            handing_over: None,
            acked_all_on_peer: false,
            swapped_away_to: 0,
        }
    }
}

/// What a secondary keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondaryState {
    /// Sequence and position in the restore journal of the record after
    /// `durable_seq`.
    pub journal_tail_seq: u64,
    /// See `journal_tail_seq`.
    pub journal_tail_pos: u64,
    /// Every record up to here is on the volumes durably (the checkpoint;
    /// newer ones are replayed from the restore journal).
    pub durable_seq: u64,
    /// The volumes hold a write-order-consistent image.
    pub consistent: bool,
    /// A copy (initial or resync) has started and not finished.
    pub copy_incomplete: bool,
    /// The primary's time of the newest durable write here (µs since the
    /// Unix epoch; 0 unknown).
    pub data_as_of_us: u64,
    /// The primary's last progress report: its newest journaled seq, the
    /// bytes it held not yet durable here, and when, by its clock (µs since
    /// the epoch). A failover says what it leaves behind from these.
    pub primary_reported_seq: u64,
    /// See `primary_reported_seq`.
    pub primary_reported_bytes: u64,
    /// See `primary_reported_seq`.
    pub primary_reported_at_us: u64,
    /// Its volumes hold writes the primary lacks (failback,
    /// `--discard-local`, writes while split with `--rw`); its dirty
    /// bitmaps name the regions. The primary copies them (and its own
    /// changes) before the pair resumes.
    pub needs_rebase: bool,
    /// Split with `--rw`: its volumes take writes.
    pub split_writable: bool,
    /// A former primary fenced by a failover that gave its writes up
    /// (`failback`, `--discard-local`): `failback` here switches the roles
    /// back. Any other secondary refuses it (a healthy pair's roles would
    /// be handed over by a command run on the wrong site).
    pub failing_back: bool,
    /// The primary said it left this pair (`pair delete` there while this
    /// node was away; `group/pair_query.rs`): a `failover` is refused
    /// without `--force`, after a restart too, until a session attaches,
    /// and `pair delete` here has nothing left to ask of the primary.
    pub primary_left_pair: bool,
    /// A former primary demoted by a switchover: it wrote the records
    /// through this sequence itself, as the primary of generation
    /// `own_writes_generation` (0: none; a recovery point at or below it
    /// names this node, newer ones the peer).
    pub own_writes_through: u64,
    /// See `own_writes_through`.
    pub own_writes_generation: u64,
}

impl Default for SecondaryState {
    /// Checkpoint 0, consistent, no copy running, nothing reported.
    fn default() -> Self {
        Self {
            journal_tail_seq: 0,
            journal_tail_pos: 0,
            durable_seq: 0,
            consistent: true,
            copy_incomplete: false,
            data_as_of_us: 0,
            primary_reported_seq: 0,
            primary_reported_bytes: 0,
            primary_reported_at_us: 0,
            needs_rebase: false,
            split_writable: false,
            failing_back: false,
            primary_left_pair: false,
            own_writes_through: 0,
            own_writes_generation: 0,
        }
    }
}

impl RoleState {
    /// The role, without its state.
    pub fn role(&self) -> Role {
        match self {
            RoleState::Simplex(_) => Role::None,
            RoleState::Primary(_) => Role::Primary,
            RoleState::Secondary(_) => Role::Secondary,
        }
    }

    /// The primary's state, if this node is the primary.
    pub fn as_primary(&self) -> Option<&PrimaryState> {
        match self {
            RoleState::Primary(p) => Some(p),
            _ => None,
        }
    }

    /// See [`RoleState::as_primary`].
    pub fn as_primary_mut(&mut self) -> Option<&mut PrimaryState> {
        match self {
            RoleState::Primary(p) => Some(p),
            _ => None,
        }
    }

    /// The secondary's state, if this node is the secondary.
    pub fn as_secondary(&self) -> Option<&SecondaryState> {
        match self {
            RoleState::Secondary(s) => Some(s),
            _ => None,
        }
    }

    /// See [`RoleState::as_secondary`].
    pub fn as_secondary_mut(&mut self) -> Option<&mut SecondaryState> {
        match self {
            RoleState::Secondary(s) => Some(s),
            _ => None,
        }
    }

    /// The SIMPLEX state, if this node is not paired.
    pub fn as_simplex(&self) -> Option<&SimplexState> {
        match self {
            RoleState::Simplex(s) => Some(s),
            _ => None,
        }
    }

    /// See [`RoleState::as_simplex`].
    pub fn as_simplex_mut(&mut self) -> Option<&mut SimplexState> {
        match self {
            RoleState::Simplex(s) => Some(s),
            _ => None,
        }
    }

    /// The generation of the failover that fenced this primary (0: not
    /// fenced, or not a primary).
    pub fn superseded_by(&self) -> u64 {
        self.as_primary().map_or(0, |p| p.superseded_by)
    }

    /// Whether the volumes hold a write-order-consistent image (a SIMPLEX
    /// group's volumes are what its clients wrote).
    pub fn consistent(&self) -> bool {
        match self {
            RoleState::Simplex(_) => true,
            RoleState::Primary(p) => p.consistent,
            RoleState::Secondary(s) => s.consistent,
        }
    }

    /// A secondary whose volumes hold writes the primary lacks.
    pub fn needs_rebase(&self) -> bool {
        self.as_secondary().is_some_and(|s| s.needs_rebase)
    }

    /// A secondary split with `--rw`.
    pub fn split_writable(&self) -> bool {
        self.as_secondary().is_some_and(|s| s.split_writable)
    }
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
            role: RoleState::Simplex(SimplexState::default()),
            state: PairState::Simplex,
            generation: 0,
            epoch: 0,
            pair_id: 0,
            clean_shutdown: true,
            boot_id: String::new(),
            sync_failed: false,
        }
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.role.role()
    }
}

/// `state.json` as every release so far has written it: flat, the role as
/// text next to the fields of every role (those of other roles at their
/// defaults). Kept as it is so that a file moves both ways across an
/// upgrade: a new field gets `#[serde(default)]` (older files lack it), and
/// older releases ignore fields they do not know. Fields another role owns
/// are dropped on load: no code of this role reads them (the previous
/// release reset most of them at each role change, and never read the
/// rest, e.g. a promoted primary's `durable_seq`).
///
/// (Not a `#[serde(flatten)]` internally tagged enum: that would leave the
/// other roles' fields out of the file, and the previous release requires
/// some of them, e.g. `durable_seq` and `copy_pending`, so it could not
/// start on a file written here after a downgrade.)
#[derive(Debug, Serialize, Deserialize)]
struct StateFileV1 {
    #[serde(with = "as_text")]
    role: Role,
    #[serde(with = "as_text")]
    state: PairState,
    generation: u64,
    #[serde(default)]
    epoch: u64,
    pair_id: u64,
    journal_tail_seq: u64,
    journal_tail_pos: u64,
    copy_pending: bool,
    bitmap_mode: bool,
    #[serde(default)]
    resync_gap: Option<u64>,
    #[serde(default)]
    bitmap_fence: u64,
    #[serde(default)]
    replay_fence: u64,
    durable_seq: u64,
    consistent: bool,
    clean_shutdown: bool,
    #[serde(default)]
    announce: Announce,
    #[serde(default)]
    data_as_of_us: u64,
    #[serde(default)]
    former_pair_id: u64,
    #[serde(default)]
    written_standalone: bool,
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    sync_failed: bool,
    #[serde(default)]
    copy_incomplete: bool,
    #[serde(default)]
    superseded_by: u64,
    #[serde(default)]
    primary_reported_seq: u64,
    #[serde(default)]
    primary_reported_bytes: u64,
    #[serde(default)]
    primary_reported_at_us: u64,
    #[serde(default)]
    takeover: Option<TakeoverPoint>,
    #[serde(default)]
    superseded_at: Option<TakeoverPoint>,
    #[serde(default)]
    needs_rebase: bool,
    #[serde(default)]
    split_writable: bool,
    #[serde(default)]
    failing_back: bool,
    #[serde(default)]
    primary_left_pair: bool,
    #[serde(default)]
    own_writes_through: u64,
    #[serde(default)]
    own_writes_generation: u64,
    #[serde(default)]
    rebase_seq: u64,
    #[serde(default)]
    admin_resync: bool,
    #[serde(default)]
    swap: bool,
    #[serde(default)]
    rebased: bool,
    /// Only while a switchover is unconfirmed (older files never had it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handing_over: Option<TakeoverPoint>,
    #[serde(default)]
    acked_all_on_peer: bool,
    #[serde(default)]
    resync_gap_at_us: u64,
    #[serde(default)]
    swapped_away_to: u64,
}

impl From<StateFileV1> for GroupState {
    fn from(f: StateFileV1) -> Self {
        let role = match f.role {
            Role::None => RoleState::Simplex(SimplexState {
                former_pair_id: f.former_pair_id,
                written_standalone: f.written_standalone,
            }),
            Role::Primary => RoleState::Primary(PrimaryState {
                journal_tail_seq: f.journal_tail_seq,
                journal_tail_pos: f.journal_tail_pos,
                copy_pending: f.copy_pending,
                bitmap_mode: f.bitmap_mode,
                resync_gap: f.resync_gap,
                bitmap_fence: f.bitmap_fence,
                replay_fence: f.replay_fence,
                announce: f.announce,
                consistent: f.consistent,
                superseded_by: f.superseded_by,
                superseded_at: f.superseded_at,
                takeover: f.takeover,
                rebase_seq: f.rebase_seq,
                admin_resync: f.admin_resync,
                swap: f.swap,
                rebased: f.rebased,
                handing_over: f.handing_over,
                acked_all_on_peer: f.acked_all_on_peer,
                resync_gap_at_us: f.resync_gap_at_us,
                swapped_away_to: f.swapped_away_to,
            }),
            Role::Secondary => RoleState::Secondary(SecondaryState {
                journal_tail_seq: f.journal_tail_seq,
                journal_tail_pos: f.journal_tail_pos,
                durable_seq: f.durable_seq,
                consistent: f.consistent,
                copy_incomplete: f.copy_incomplete,
                data_as_of_us: f.data_as_of_us,
                primary_reported_seq: f.primary_reported_seq,
                primary_reported_bytes: f.primary_reported_bytes,
                primary_reported_at_us: f.primary_reported_at_us,
                needs_rebase: f.needs_rebase,
                split_writable: f.split_writable,
                failing_back: f.failing_back,
                primary_left_pair: f.primary_left_pair,
                own_writes_through: f.own_writes_through,
                own_writes_generation: f.own_writes_generation,
            }),
        };
        Self {
            role,
            state: f.state,
            generation: f.generation,
            epoch: f.epoch,
            pair_id: f.pair_id,
            clean_shutdown: f.clean_shutdown,
            boot_id: f.boot_id,
            sync_failed: f.sync_failed,
        }
    }
}

impl From<GroupState> for StateFileV1 {
    fn from(s: GroupState) -> Self {
        let role = s.role.role();
        let (simplex, primary, secondary) = match s.role {
            RoleState::Simplex(x) => (x, PrimaryState::default(), SecondaryState::default()),
            RoleState::Primary(p) => (SimplexState::default(), p, SecondaryState::default()),
            RoleState::Secondary(x) => (SimplexState::default(), PrimaryState::default(), x),
        };
        // The journal tail and `consistent` are the role's own; SIMPLEX
        // writes what it always did (0, consistent).
        let (journal_tail_seq, journal_tail_pos, consistent) = match role {
            Role::Primary => (primary.journal_tail_seq, primary.journal_tail_pos, primary.consistent),
            Role::Secondary => (secondary.journal_tail_seq, secondary.journal_tail_pos, secondary.consistent),
            Role::None => (0, 0, true),
        };
        Self {
            role,
            state: s.state,
            generation: s.generation,
            epoch: s.epoch,
            pair_id: s.pair_id,
            journal_tail_seq,
            journal_tail_pos,
            copy_pending: primary.copy_pending,
            bitmap_mode: primary.bitmap_mode,
            resync_gap: primary.resync_gap,
            bitmap_fence: primary.bitmap_fence,
            replay_fence: primary.replay_fence,
            durable_seq: secondary.durable_seq,
            consistent,
            clean_shutdown: s.clean_shutdown,
            announce: primary.announce,
            data_as_of_us: secondary.data_as_of_us,
            former_pair_id: simplex.former_pair_id,
            written_standalone: simplex.written_standalone,
            boot_id: s.boot_id,
            sync_failed: s.sync_failed,
            copy_incomplete: secondary.copy_incomplete,
            superseded_by: primary.superseded_by,
            primary_reported_seq: secondary.primary_reported_seq,
            primary_reported_bytes: secondary.primary_reported_bytes,
            primary_reported_at_us: secondary.primary_reported_at_us,
            takeover: primary.takeover,
            superseded_at: primary.superseded_at,
            needs_rebase: secondary.needs_rebase,
            split_writable: secondary.split_writable,
            failing_back: secondary.failing_back,
            primary_left_pair: secondary.primary_left_pair,
            own_writes_through: secondary.own_writes_through,
            own_writes_generation: secondary.own_writes_generation,
            rebase_seq: primary.rebase_seq,
            admin_resync: primary.admin_resync,
            swap: primary.swap,
            rebased: primary.rebased,
            handing_over: primary.handing_over,
            acked_all_on_peer: primary.acked_all_on_peer,
            resync_gap_at_us: primary.resync_gap_at_us,
            swapped_away_to: primary.swapped_away_to,
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

    /// Opens another file in the group directory (a dirty bitmap, the
    /// activity log) for in-place saves ([`SlottedFile`]).
    pub fn open_blob(&self, name: &str) -> Result<Blob, StateError> {
        self.ensure_dir()?;
        let path = self.dir.join(name);
        SlottedFile::open(&path).map(Blob).map_err(self.io(path))
    }

    /// Saves another file in the group directory once (see [`Self::open_blob`]).
    pub fn save_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        self.open_blob(name)?.save(bytes)
    }

    /// Reads another file in the group directory, `None` if absent (an
    /// error of kind `InvalidData` when neither of its copies is intact).
    pub fn load_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join(name);
        slotted_file::read(&path).map_err(self.io(path))
    }
}

/// A file of the group directory open for in-place saves.
#[derive(Debug)]
pub struct Blob(SlottedFile);

impl Blob {
    /// Makes `bytes` the file's content, durably.
    pub fn save(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.0.save(bytes).map_err(|source| StateError::Io { path: self.0.path().to_path_buf(), source })
    }
}

/// Writes `bytes` to `path` durably and atomically, as a private file
/// (0600 whatever the umask): see [`crate::durable::put_file`].
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::durable::put_file(path, PRIVATE_FILE_MODE, crate::durable::Existing::Replace, |f| f.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

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
        let tmp = f.dir().join(format!(".state.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        f.save(&GroupState::simplex()).expect("save");
        assert_eq!(fs::read(&victim).expect("read"), b"untouched");
        assert_eq!(mode_of(&victim), 0o644);
        assert!(f.load().expect("load").is_some());
        assert!(!tmp.exists(), "the link is gone");
    }

    /// The fields of `state.json` that `role` owns (besides the common
    /// ones): kept as they are on a load; those of other roles are dropped.
    fn owned_by(role: Role, field: &str) -> bool {
        const COMMON: &[&str] =
            &["role", "state", "generation", "epoch", "pair_id", "clean_shutdown", "boot_id", "sync_failed"];
        const SIMPLEX: &[&str] = &["former_pair_id", "written_standalone"];
        const PRIMARY: &[&str] = &[
            "journal_tail_seq",
            "journal_tail_pos",
            "copy_pending",
            "bitmap_mode",
            "resync_gap",
            "bitmap_fence",
            "replay_fence",
            "announce",
            "consistent",
            "superseded_by",
            "superseded_at",
            "takeover",
            "rebase_seq",
            "admin_resync",
            "swap",
            "rebased",
            "handing_over",
            "acked_all_on_peer",
            "resync_gap_at_us",
            "swapped_away_to",
        ];
        const SECONDARY: &[&str] = &[
            "journal_tail_seq",
            "journal_tail_pos",
            "durable_seq",
            "consistent",
            "copy_incomplete",
            "data_as_of_us",
            "primary_reported_seq",
            "primary_reported_bytes",
            "primary_reported_at_us",
            "needs_rebase",
            "split_writable",
            "failing_back",
            "primary_left_pair",
            "own_writes_through",
            "own_writes_generation",
        ];
        let own = match role {
            Role::None => SIMPLEX,
            Role::Primary => PRIMARY,
            Role::Secondary => SECONDARY,
        };
        COMMON.contains(&field) || own.contains(&field)
    }

    /// The field names of a pretty-printed `state.json`, in file order.
    fn field_order(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("  \"").and_then(|l| l.split_once('"')).map(|(k, _)| k.to_string()))
            .collect()
    }

    /// `state.json` files as the release before `RoleState` wrote them (one
    /// flat struct; taken from e2e runs, see testdata/state-v1) load with
    /// their role and that role's fields unchanged, and are written back
    /// in the same format: the same fields in the same order, the role's
    /// values unchanged, other roles' fields at their defaults (what
    /// `GroupState::simplex()` writes). So an older release loads them too.
    #[test]
    fn state_files_of_the_previous_release_load_unchanged_and_stay_readable_by_it() {
        let fixtures = [
            ("primary-after-swap", include_str!("../testdata/state-v1/primary-after-swap.json")),
            ("primary-after-failover", include_str!("../testdata/state-v1/primary-after-failover.json")),
            ("primary-fenced-split-brain", include_str!("../testdata/state-v1/primary-fenced-split-brain.json")),
            ("secondary-after-swap", include_str!("../testdata/state-v1/secondary-after-swap.json")),
            ("secondary-after-failback", include_str!("../testdata/state-v1/secondary-after-failback.json")),
            ("simplex-left-and-written", include_str!("../testdata/state-v1/simplex-left-and-written.json")),
        ];
        let blank: serde_json::Value = serde_json::to_value(GroupState::simplex()).expect("json");
        for (name, text) in fixtures {
            let dir = tempfile::tempdir().expect("tempdir");
            let f = StateFile::new(dir.path(), "g");
            f.ensure_dir().expect("dir");
            fs::write(f.dir().join("state.json"), text).expect("write");
            let s = f.load().expect(name).expect(name);
            let old: serde_json::Value = serde_json::from_str(text).expect("json");
            assert_eq!(old["role"], s.role().as_str(), "{name}");
            assert_eq!(old["state"], s.state.to_string(), "{name}");
            assert_eq!(old["generation"], s.generation, "{name}");
            assert_eq!(old["pair_id"], s.pair_id, "{name}");
            assert_eq!(old["boot_id"], s.boot_id.as_str(), "{name}");

            f.save(&s).expect("save");
            let written = fs::read_to_string(f.dir().join("state.json")).expect("read");
            // Fields added since those files were written (with a serde
            // default, which the older release ignores) come on top.
            const ADDED_SINCE: &[&str] = &[
                "bitmap_fence",
                "replay_fence",
                "sync_failed",
                "failing_back",
                "primary_left_pair",
                "acked_all_on_peer",
                "resync_gap_at_us",
                "own_writes_through",
                "own_writes_generation",
                "swapped_away_to",
            ];
            let kept: Vec<String> =
                field_order(&written).into_iter().filter(|k| !ADDED_SINCE.contains(&k.as_str())).collect();
            assert_eq!(kept, field_order(text), "{name}: the same fields, in the same order");
            let new: serde_json::Value = serde_json::from_str(&written).expect("json");
            for key in field_order(text) {
                if owned_by(s.role(), &key) {
                    assert_eq!(new[&key], old[&key], "{name}: {key} is the role's own and kept");
                } else {
                    assert_eq!(new[&key], blank[&key], "{name}: {key} belongs to another role");
                }
            }
            assert_eq!(f.load().expect("load again").as_ref(), Some(&s), "{name}");

            // What each file says, through the typed state.
            match name {
                "primary-after-swap" | "primary-after-failover" => {
                    let p = s.role.as_primary().expect(name);
                    assert_eq!(p.takeover, Some(TakeoverPoint { seq: p.journal_tail_seq - 1, epoch: 0 }), "{name}");
                    assert_eq!(s.role.superseded_by(), 0, "{name}");
                    // Left over from its time as the secondary (never read
                    // on a primary): not carried.
                    assert_ne!(old["data_as_of_us"], 0, "{name}");
                    assert_eq!(new["data_as_of_us"], 0, "{name}");
                }
                "primary-fenced-split-brain" => {
                    let p = s.role.as_primary().expect(name);
                    assert_eq!((p.superseded_by, p.superseded_at), (2, Some(TakeoverPoint { seq: 618, epoch: 0 })));
                    assert_eq!(s.state, PairState::SplitBrain);
                    assert!(!s.clean_shutdown);
                }
                "secondary-after-swap" | "secondary-after-failback" => {
                    let sec = s.role.as_secondary().expect(name);
                    assert_eq!(sec.journal_tail_seq, sec.durable_seq + 1, "{name}");
                    assert_eq!(old["durable_seq"], sec.durable_seq, "{name}");
                    assert!(sec.consistent && !sec.copy_incomplete && !sec.needs_rebase, "{name}");
                }
                "simplex-left-and-written" => {
                    let x = s.role.as_simplex().expect(name);
                    assert_eq!(old["former_pair_id"], x.former_pair_id);
                    assert!(x.former_pair_id != 0 && x.written_standalone);
                }
                _ => unreachable!("{name}"),
            }
        }
    }

    /// Every role's state, with none of its fields at the default, comes
    /// back from disk as it was; a role change is one assignment and leaves
    /// nothing of the old role in the file.
    #[test]
    fn every_role_round_trips_and_a_role_change_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(dir.path(), "db");
        let point = Some(TakeoverPoint { seq: 9, epoch: 2 });
        let primary = PrimaryState {
            journal_tail_seq: 10,
            journal_tail_pos: 8192,
            copy_pending: true,
            bitmap_mode: true,
            resync_gap: Some(7),
            bitmap_fence: 6,
            replay_fence: 6,
            announce: Announce::Resync,
            consistent: false,
            superseded_by: 5,
            superseded_at: point,
            takeover: point,
            rebase_seq: 6,
            admin_resync: true,
            swap: true,
            rebased: true,
            handing_over: point,
            acked_all_on_peer: true,
            resync_gap_at_us: 1_700_000_000_000_000,
            swapped_away_to: 8,
        };
        let secondary = SecondaryState {
            journal_tail_seq: 11,
            journal_tail_pos: 12288,
            durable_seq: 10,
            consistent: false,
            copy_incomplete: true,
            data_as_of_us: 1,
            primary_reported_seq: 12,
            primary_reported_bytes: 4096,
            primary_reported_at_us: 2,
            needs_rebase: true,
            split_writable: true,
            failing_back: true,
            primary_left_pair: true,
            own_writes_through: 9,
            own_writes_generation: 3,
        };
        let simplex = SimplexState { former_pair_id: 77, written_standalone: true };
        let mut s = GroupState { generation: 4, epoch: 2, pair_id: 77, boot_id: "b".into(), ..GroupState::simplex() };
        for role in [RoleState::Primary(primary), RoleState::Secondary(secondary), RoleState::Simplex(simplex)] {
            s.role = role;
            f.save(&s).expect("save");
            assert_eq!(f.load().expect("load").as_ref(), Some(&s));
            let json: serde_json::Value =
                serde_json::from_slice(&fs::read(f.dir().join("state.json")).expect("read")).expect("json");
            let blank = serde_json::to_value(GroupState::simplex()).expect("json");
            for (key, value) in json.as_object().expect("object") {
                if !owned_by(s.role(), key) {
                    assert_eq!(value, &blank[key], "{}: {key} of another role", s.role());
                }
            }
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(dir.path(), "db");
        assert_eq!(f.load().expect("load"), None);
        let mut s = GroupState::simplex();
        s.role = RoleState::Primary(PrimaryState { superseded_by: 4, ..PrimaryState::default() });
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
            if from == "\"primary\"" {
                // The same words as every release before (the role's own
                // parser says what it expected).
                assert!(
                    err.to_string().contains("unknown role \"primray\" (expected none, primary or secondary)"),
                    "{err}"
                );
            }
        }
        // A missing role is refused too (no silent default to SIMPLEX).
        fs::write(f.dir().join("state.json"), text.replace("\"role\"", "\"rol\"")).expect("write");
        assert!(matches!(f.load(), Err(StateError::Corrupt { .. })));
    }
}
