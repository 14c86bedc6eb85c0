//! Pair roles and the per-group pair state machine.
//!
//! # States
//!
//! `SIMPLEX` (not paired) · `COPY` (initial copy or resync running) · `PAIR`
//! (replicating) · `SUSPENDED(reason)` with reason `split` (admin), `link`
//! (peer unreachable), `journal-full` or `error` · `SPLIT-BRAIN` (both sides
//! wrote as primary).
//!
//! # Transitions ([`PairState::apply`])
//!
//! | from                              | event                          | to                       |
//! |-----------------------------------|--------------------------------|--------------------------|
//! | SIMPLEX                           | `Create { copy: true }`        | COPY                     |
//! | SIMPLEX                           | `Create { copy: false }`       | PAIR                     |
//! | COPY                              | `CopyDone`                     | PAIR                     |
//! | COPY, PAIR                        | `LinkDown`                     | SUSPENDED(link)          |
//! | PAIR                              | `JournalFull`                  | SUSPENDED(journal-full)  |
//! | COPY                              | `JournalFull`                  | COPY (the copy covers it)|
//! | PAIR, COPY                        | `RegionsToCopy`                | COPY                     |
//! | SUSPENDED(link \| journal-full)   | `LinkUp { needs_resync: true }`| COPY                     |
//! | SUSPENDED(link \| journal-full)   | `LinkUp { needs_resync: false }`| PAIR                    |
//! | SUSPENDED(split)                  | `LinkUp { .. }`                | SUSPENDED(split) (an admin split never resumes by itself) |
//! | PAIR, COPY, SUSPENDED(any)        | `AdminSplit`                   | SUSPENDED(split)         |
//! | SUSPENDED(any)                    | `AdminResync`                  | SUSPENDED(link) (the session that follows goes to COPY or PAIR) |
//! | any except SPLIT-BRAIN            | `Failure`                      | SUSPENDED(error)         |
//! | SPLIT-BRAIN                       | `Failure`                      | SPLIT-BRAIN (never resolved implicitly) |
//! | any                               | `Delete`                       | SIMPLEX (how an admin resolves split brain) |
//! | any                               | `SplitBrainDetected`           | SPLIT-BRAIN              |
//!
//! Every other combination is a [`TransitionError`] naming the state and the
//! event, e.g. "cannot CopyDone from SIMPLEX".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// This node's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Not paired.
    #[default]
    None,
    /// The side clients write to; ships records.
    Primary,
    /// The side that applies records.
    Secondary,
}

impl Role {
    /// "none", "primary" or "secondary".
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PairParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Role::None),
            "primary" => Ok(Role::Primary),
            "secondary" => Ok(Role::Secondary),
            _ => Err(PairParseError::Role(s.to_owned())),
        }
    }
}

/// Why a pair is suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspendReason {
    /// An admin split the pair.
    Split,
    /// The peer is unreachable.
    Link,
    /// The async journal filled up.
    JournalFull,
    /// A local or remote error.
    Error,
}

impl SuspendReason {
    /// "split", "link", "journal-full" or "error".
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendReason::Split => "split",
            SuspendReason::Link => "link",
            SuspendReason::JournalFull => "journal-full",
            SuspendReason::Error => "error",
        }
    }
}

impl fmt::Display for SuspendReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SuspendReason {
    type Err = PairParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "split" => Ok(SuspendReason::Split),
            "link" => Ok(SuspendReason::Link),
            "journal-full" => Ok(SuspendReason::JournalFull),
            "error" => Ok(SuspendReason::Error),
            _ => Err(PairParseError::Reason(s.to_owned())),
        }
    }
}

/// State of a pair (per group); see the module docs for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairState {
    /// Not paired.
    Simplex,
    /// Initial copy or resync running.
    Copy,
    /// Replicating.
    Pair,
    /// Not replicating, tracking dirty regions.
    Suspended(SuspendReason),
    /// Both sides wrote as primary.
    SplitBrain,
}

/// An event that moves a pair between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairEvent {
    /// `pair create` (`copy: false` for `--nocopy`).
    Create {
        /// Whether an initial copy runs.
        copy: bool,
    },
    /// Initial copy or resync finished.
    CopyDone,
    /// The peer became unreachable.
    LinkDown,
    /// The peer is reachable again.
    LinkUp {
        /// Whether records were lost (dirty bitmap in use) so a resync runs.
        needs_resync: bool,
    },
    /// The async journal is full.
    JournalFull,
    /// Regions where the secondary differs were found while replicating
    /// (`verify --fix`): they are copied, the replica is inconsistent
    /// until then.
    RegionsToCopy,
    /// `pair split`.
    AdminSplit,
    /// `pair resync`.
    AdminResync,
    /// An I/O or protocol failure.
    Failure,
    /// `pair delete`.
    Delete,
    /// Both sides were found to have written as primary.
    SplitBrainDetected,
}

impl PairEvent {
    /// Name of the event for messages ("CopyDone", "LinkUp", ...).
    pub fn name(&self) -> &'static str {
        match self {
            PairEvent::Create { .. } => "Create",
            PairEvent::CopyDone => "CopyDone",
            PairEvent::LinkDown => "LinkDown",
            PairEvent::LinkUp { .. } => "LinkUp",
            PairEvent::JournalFull => "JournalFull",
            PairEvent::RegionsToCopy => "RegionsToCopy",
            PairEvent::AdminSplit => "AdminSplit",
            PairEvent::AdminResync => "AdminResync",
            PairEvent::Failure => "Failure",
            PairEvent::Delete => "Delete",
            PairEvent::SplitBrainDetected => "SplitBrainDetected",
        }
    }
}

impl fmt::Display for PairEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An event that is not allowed in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} from {state}")]
pub struct TransitionError {
    /// The state the pair is in.
    pub state: PairState,
    /// The refused event.
    pub event: PairEvent,
}

/// Errors parsing roles and states (for example from the persisted state
/// file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairParseError {
    /// Not a role name.
    #[error("unknown role {0:?} (expected none, primary or secondary)")]
    Role(String),
    /// Not a suspend reason.
    #[error("unknown suspend reason {0:?} (expected split, link, journal-full or error)")]
    Reason(String),
    /// Not a pair state.
    #[error("unknown pair state {0:?} (expected SIMPLEX, COPY, PAIR, SUSPENDED(<reason>) or SPLIT-BRAIN)")]
    State(String),
}

impl PairState {
    /// Whether a primary whose replication link has been down for
    /// `down_for` suspends now: the link stayed down for `link_timeout`
    /// while the pair was replicating (PAIR or COPY). Until then a sync
    /// write waits for the link to come back (a blip costs latency, not
    /// RPO 0).
    pub fn link_timed_out(self, down_for: Duration, link_timeout: Duration) -> bool {
        down_for >= link_timeout && matches!(self, PairState::Pair | PairState::Copy)
    }

    /// "SIMPLEX", "COPY", "PAIR", "SUSPENDED" or "SPLIT-BRAIN".
    pub fn name(&self) -> &'static str {
        match self {
            PairState::Simplex => "SIMPLEX",
            PairState::Copy => "COPY",
            PairState::Pair => "PAIR",
            PairState::Suspended(_) => "SUSPENDED",
            PairState::SplitBrain => "SPLIT-BRAIN",
        }
    }

    /// The suspend reason, if suspended.
    pub fn reason(&self) -> Option<SuspendReason> {
        match self {
            PairState::Suspended(r) => Some(*r),
            _ => None,
        }
    }

    /// The state after `event`, or an error if the event is not allowed.
    pub fn apply(self, event: PairEvent) -> Result<PairState, TransitionError> {
        use PairEvent as E;
        use PairState as S;
        use SuspendReason as R;
        let next = match (self, event) {
            (_, E::SplitBrainDetected) => S::SplitBrain,
            (_, E::Delete) => S::Simplex,
            (S::SplitBrain, E::Failure) => S::SplitBrain,
            (_, E::Failure) => S::Suspended(R::Error),
            (S::Simplex, E::Create { copy: true }) => S::Copy,
            (S::Simplex, E::Create { copy: false }) => S::Pair,
            (S::Copy, E::CopyDone) => S::Pair,
            (S::Copy | S::Pair, E::LinkDown) => S::Suspended(R::Link),
            (S::Pair, E::JournalFull) => S::Suspended(R::JournalFull),
            (S::Copy, E::JournalFull) => S::Copy,
            (S::Pair | S::Copy, E::RegionsToCopy) => S::Copy,
            (S::Suspended(R::Link | R::JournalFull), E::LinkUp { needs_resync }) => {
                if needs_resync {
                    S::Copy
                } else {
                    S::Pair
                }
            }
            (S::Suspended(R::Split), E::LinkUp { .. }) => S::Suspended(R::Split),
            (S::Pair | S::Copy | S::Suspended(_), E::AdminSplit) => S::Suspended(R::Split),
            (S::Suspended(_), E::AdminResync) => S::Suspended(R::Link),
            (state, event) => return Err(TransitionError { state, event }),
        };
        Ok(next)
    }
}

impl fmt::Display for PairState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairState::Suspended(r) => write!(f, "SUSPENDED({r})"),
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for PairState {
    type Err = PairParseError;
    /// Parses the [`Display`](fmt::Display) form back (case-insensitive,
    /// surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_uppercase();
        let bad = || PairParseError::State(s.to_owned());
        Ok(match t.as_str() {
            "SIMPLEX" => PairState::Simplex,
            "COPY" => PairState::Copy,
            "PAIR" => PairState::Pair,
            "SPLIT-BRAIN" => PairState::SplitBrain,
            _ => {
                let inner = t.strip_prefix("SUSPENDED(").and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
                PairState::Suspended(inner.parse().map_err(|_| bad())?)
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn all_states() -> Vec<PairState> {
        vec![
            PairState::Simplex,
            PairState::Copy,
            PairState::Pair,
            PairState::Suspended(SuspendReason::Split),
            PairState::Suspended(SuspendReason::Link),
            PairState::Suspended(SuspendReason::JournalFull),
            PairState::Suspended(SuspendReason::Error),
            PairState::SplitBrain,
        ]
    }

    fn all_events() -> Vec<PairEvent> {
        vec![
            PairEvent::Create { copy: true },
            PairEvent::Create { copy: false },
            PairEvent::CopyDone,
            PairEvent::LinkDown,
            PairEvent::LinkUp { needs_resync: true },
            PairEvent::LinkUp { needs_resync: false },
            PairEvent::JournalFull,
            PairEvent::RegionsToCopy,
            PairEvent::AdminSplit,
            PairEvent::AdminResync,
            PairEvent::Failure,
            PairEvent::Delete,
            PairEvent::SplitBrainDetected,
        ]
    }

    #[test]
    fn display_parse_round_trip() {
        for s in all_states() {
            assert_eq!(s.to_string().parse::<PairState>().unwrap(), s);
        }
        assert_eq!(PairState::Suspended(SuspendReason::Link).to_string(), "SUSPENDED(link)");
        assert_eq!(PairState::Suspended(SuspendReason::JournalFull).to_string(), "SUSPENDED(journal-full)");
        assert_eq!(" pair ".parse::<PairState>().unwrap(), PairState::Pair);
        for bad in ["", "SUSPENDED", "SUSPENDED()", "SUSPENDED(nope)", "PAIRED", "SUSPENDED(link"] {
            assert!(bad.parse::<PairState>().is_err(), "{bad:?} parsed");
        }
        for r in [Role::None, Role::Primary, Role::Secondary] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("master".parse::<Role>().is_err());
    }

    /// The full table, spelled out independently of `apply`.
    #[test]
    fn transition_table() {
        use PairEvent as E;
        use PairState as S;
        use SuspendReason as R;
        let expect = |s: S, e: E| -> Option<S> {
            Some(match (s, e) {
                (_, E::SplitBrainDetected) => S::SplitBrain,
                (_, E::Delete) => S::Simplex,
                (S::SplitBrain, E::Failure) => S::SplitBrain,
                (_, E::Failure) => S::Suspended(R::Error),
                (S::Simplex, E::Create { copy }) => {
                    if copy {
                        S::Copy
                    } else {
                        S::Pair
                    }
                }
                (S::Copy, E::CopyDone) => S::Pair,
                (S::Copy, E::LinkDown) | (S::Pair, E::LinkDown) => S::Suspended(R::Link),
                (S::Pair, E::JournalFull) => S::Suspended(R::JournalFull),
                (S::Copy, E::JournalFull) => S::Copy,
                (S::Pair, E::RegionsToCopy) | (S::Copy, E::RegionsToCopy) => S::Copy,
                (S::Suspended(R::Link), E::LinkUp { needs_resync })
                | (S::Suspended(R::JournalFull), E::LinkUp { needs_resync }) => {
                    if needs_resync {
                        S::Copy
                    } else {
                        S::Pair
                    }
                }
                (S::Suspended(R::Split), E::LinkUp { .. }) => S::Suspended(R::Split),
                (S::Pair, E::AdminSplit) | (S::Copy, E::AdminSplit) | (S::Suspended(_), E::AdminSplit) => {
                    S::Suspended(R::Split)
                }
                (S::Suspended(_), E::AdminResync) => S::Suspended(R::Link),
                _ => return None,
            })
        };
        let mut allowed = 0;
        for s in all_states() {
            for e in all_events() {
                match (s.apply(e), expect(s, e)) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "{s} --{e}-->");
                        allowed += 1;
                    }
                    (Err(err), None) => {
                        assert_eq!(err.state, s);
                        assert_eq!(err.event, e);
                        assert_eq!(err.to_string(), format!("cannot {} from {}", e.name(), s));
                    }
                    (got, want) => panic!("{s} --{e}--> got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(allowed, 49);
        assert_eq!(
            PairState::Simplex.apply(PairEvent::CopyDone).unwrap_err().to_string(),
            "cannot CopyDone from SIMPLEX"
        );
        assert_eq!(PairState::Suspended(SuspendReason::Error).reason(), Some(SuspendReason::Error));
        assert_eq!(PairState::Pair.reason(), None);
    }

    #[test]
    fn the_link_times_out_only_while_replicating() {
        let t = Duration::from_secs(5);
        assert!(PairState::Pair.link_timed_out(t, t));
        assert!(PairState::Copy.link_timed_out(2 * t, t));
        assert!(!PairState::Pair.link_timed_out(t / 2, t));
        assert!(!PairState::Suspended(SuspendReason::Link).link_timed_out(2 * t, t));
        assert!(!PairState::Simplex.link_timed_out(2 * t, t));
    }
}
