//! Who may replicate into whom: the decisions a node takes when a peer
//! opens a replication session for a group, as a pure function of what
//! each side has persisted ([`judge_open`]).
//!
//! Generations order the primaries of one pair: every promotion (failover,
//! switchover, `pair resync --swap`) starts a new one. A primary that meets
//! a newer generation is fenced: it accepts no writes until an admin acts
//! (`failback`, `pair resync --discard-local`). If it holds writes the newer
//! primary lacks, both sites are in SPLIT-BRAIN, and only a command on the
//! side to lose resolves it. A secondary never lets an older generation
//! write into it, never resumes an admin split without `pair resync`, and
//! never forgets writes of its own that it declared discarded (failback,
//! `--discard-local`, writes while split with `--rw`) before the primary
//! confirms they are covered by its copy (`rebased`).
//!
//! The daemon performs the verdicts (and words them); `tests/
//! simulated_lifecycle.rs` drives two nodes through random commands, link
//! changes and restarts with these decisions and checks that two primaries
//! never take writes in one generation and that no resync ever runs in the
//! wrong direction.

use crate::pair::Role;
use crate::pb;

/// What a node has persisted about its place in a pair (and the little
/// runtime state the decisions need).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Standing {
    /// Its role.
    pub role: Role,
    /// The pair it belongs to (0: none).
    pub pair_id: u64,
    /// Its generation.
    pub generation: u64,
    /// A former primary fenced by this newer generation (0: not fenced).
    pub superseded_by: u64,
    /// An admin split the pair here (`SUSPENDED(split)`).
    pub split: bool,
    /// SPLIT-BRAIN was declared here.
    pub split_brain: bool,
    /// A secondary that discarded writes of its own: the primary must copy
    /// the regions it names before it may resume.
    pub needs_rebase: bool,
    /// A secondary split with `--rw` (its volumes take writes).
    pub split_writable: bool,
    /// A primary handing its role over in a switchover.
    pub switching: bool,
    /// NBD clients have its volumes attached.
    pub in_use: bool,
    /// A primary whose `pair create` no peer has accepted yet: it never
    /// replicated as this pair, so meeting another primary is no split
    /// brain (two sites that both ran `pair create`).
    pub pending_create: bool,
}

/// What a peer's `OpenGroup` says about the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    /// The pair.
    pub pair_id: u64,
    /// The opener's generation.
    pub generation: u64,
    /// Create, resume or resync.
    pub intent: pb::OpenIntent,
    /// `pair resync` ran on the opener.
    pub admin_resync: bool,
    /// `pair resync --swap` made the opener primary.
    pub swap: bool,
    /// The opener's copy covers the regions this node said it discarded.
    pub rebased: bool,
}

impl Opening {
    /// The lifecycle part of an `OpenGroup`.
    pub fn of(open: &pb::OpenGroup) -> Self {
        Self {
            pair_id: open.pair_id,
            generation: open.generation,
            intent: pb::OpenIntent::try_from(open.intent).unwrap_or(pb::OpenIntent::Unspecified),
            admin_resync: open.admin_resync,
            swap: open.swap,
            rebased: open.rebased,
        }
    }
}

/// What to do with an `OpenGroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing in the lifecycle stands against it: the intent decides
    /// (consent for a new pair, resume or resync of this one).
    Proceed,
    /// This primary is handing its role to the opener (switchover): refuse
    /// for now; a newer generation confirms the hand-over.
    HandingOver,
    /// This split primary gives up the role to the opener (`--swap`), then
    /// judges again as a secondary that discarded its writes.
    GiveUpForSwap,
    /// This primary was superseded: fence it, then judge again.
    Fence,
    /// Refuse, with this kind.
    Refuse(pb::Refusal),
}

/// Judges a peer's `OpenGroup` (configuration already checked).
/// `wrote_beyond`: a fenced former primary holds writes the opener lacks
/// (see [`crate::divergence::wrote_beyond`]).
pub fn judge_open(me: &Standing, open: &Opening, wrote_beyond: bool) -> Verdict {
    let same_pair = open.pair_id != 0 && me.pair_id == open.pair_id;
    match me.role {
        Role::Primary if same_pair => {
            if me.switching {
                Verdict::HandingOver
            } else if open.swap && me.split && me.superseded_by == 0 && open.generation > me.generation {
                Verdict::GiveUpForSwap
            } else if open.generation > me.generation && me.superseded_by < open.generation {
                Verdict::Fence
            } else if me.superseded_by > 0 {
                if me.split_brain || wrote_beyond {
                    Verdict::Refuse(pb::Refusal::SplitBrain)
                } else {
                    Verdict::Refuse(pb::Refusal::Fenced)
                }
            } else if open.generation < me.generation {
                Verdict::Refuse(pb::Refusal::Superseded)
            } else {
                Verdict::Refuse(pb::Refusal::AlsoPrimary)
            }
        }
        Role::Primary => Verdict::Refuse(pb::Refusal::AlsoPrimary),
        Role::Secondary if same_pair => {
            if me.split && !open.admin_resync {
                Verdict::Refuse(pb::Refusal::Split)
            } else if (me.split || me.split_writable) && me.in_use {
                // NBD clients have the split replica attached (read-only, or
                // writable with --rw): the resync would change it under them.
                // (Clients left attached to a former primary by a switchover
                // only read, and were told to stop: replication goes on.)
                Verdict::Refuse(pb::Refusal::InUse)
            } else if me.needs_rebase
                && !(open.intent == pb::OpenIntent::Resync && open.rebased && open.generation >= me.generation)
            {
                Verdict::Refuse(pb::Refusal::NeedsRebase)
            } else if open.generation < me.generation {
                Verdict::Refuse(pb::Refusal::Superseded)
            } else {
                Verdict::Proceed
            }
        }
        _ => Verdict::Proceed,
    }
}

/// What the opener does with a refusal that moves the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Keep retrying (transient, or waiting for an admin).
    Retry,
    /// The peer is newer: fence this primary.
    Fence,
    /// Both sites wrote as primary: SPLIT-BRAIN here too.
    SplitBrain,
    /// The peer was split by an admin: split here too (only `pair resync`
    /// resumes).
    Split,
    /// The peer discarded its writes: add its regions and this node's
    /// changes to the copy and open again with a rebasing RESYNC; if the
    /// peer is newer (it gave up the role), take over in a newer
    /// generation.
    Rebase {
        /// The peer's generation is newer, or this node is fenced.
        take_over: bool,
    },
}

/// The opener's reaction to a refusal from a peer in `peer_generation`.
pub fn on_refusal(me: &Standing, kind: pb::Refusal, peer_generation: u64) -> Answer {
    match kind {
        pb::Refusal::Superseded if peer_generation > me.generation => Answer::Fence,
        pb::Refusal::AlsoPrimary if me.pending_create => Answer::Retry,
        pb::Refusal::WrittenStandalone
        | pb::Refusal::AlsoPrimary
        | pb::Refusal::Superseded
        | pb::Refusal::SplitBrain => Answer::SplitBrain,
        pb::Refusal::Split => Answer::Split,
        pb::Refusal::NeedsRebase => {
            Answer::Rebase { take_over: me.superseded_by > 0 || peer_generation > me.generation }
        }
        _ => Answer::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(generation: u64) -> Opening {
        Opening {
            pair_id: 7,
            generation,
            intent: pb::OpenIntent::Resume,
            admin_resync: false,
            swap: false,
            rebased: false,
        }
    }

    fn node(role: Role, generation: u64) -> Standing {
        Standing { role, pair_id: 7, generation, ..Standing::default() }
    }

    #[test]
    fn another_primary_is_a_split_brain_only_for_a_primary_that_replicated() {
        let established = node(Role::Primary, 1);
        assert_eq!(on_refusal(&established, pb::Refusal::AlsoPrimary, 1), Answer::SplitBrain);
        let pending = Standing { pending_create: true, ..established };
        assert_eq!(on_refusal(&pending, pb::Refusal::AlsoPrimary, 1), Answer::Retry);
    }

    #[test]
    fn a_primary_meeting_a_newer_generation_is_fenced_then_judged() {
        let mut a = node(Role::Primary, 1);
        assert_eq!(judge_open(&a, &open(2), false), Verdict::Fence);
        a.superseded_by = 2;
        assert_eq!(judge_open(&a, &open(2), false), Verdict::Refuse(pb::Refusal::Fenced));
        assert_eq!(judge_open(&a, &open(2), true), Verdict::Refuse(pb::Refusal::SplitBrain));
        let b = node(Role::Primary, 2);
        assert_eq!(judge_open(&b, &open(1), false), Verdict::Refuse(pb::Refusal::Superseded));
        assert_eq!(judge_open(&b, &open(2), false), Verdict::Refuse(pb::Refusal::AlsoPrimary));
    }

    #[test]
    fn a_secondary_that_discarded_waits_for_a_rebasing_resync() {
        let mut s = node(Role::Secondary, 2);
        s.needs_rebase = true;
        assert_eq!(judge_open(&s, &open(2), false), Verdict::Refuse(pb::Refusal::NeedsRebase));
        let mut o = open(2);
        o.intent = pb::OpenIntent::Resync;
        assert_eq!(judge_open(&s, &o, false), Verdict::Refuse(pb::Refusal::NeedsRebase), "a power-cut resync");
        o.rebased = true;
        assert_eq!(judge_open(&s, &o, false), Verdict::Proceed);
        o.generation = 1;
        assert_eq!(judge_open(&s, &o, false), Verdict::Refuse(pb::Refusal::NeedsRebase));
    }

    #[test]
    fn an_admin_split_resumes_only_by_resync() {
        let mut s = node(Role::Secondary, 1);
        s.split = true;
        assert_eq!(judge_open(&s, &open(1), false), Verdict::Refuse(pb::Refusal::Split));
        let mut o = open(1);
        o.admin_resync = true;
        assert_eq!(judge_open(&s, &o, false), Verdict::Proceed);
        s.in_use = true;
        assert_eq!(judge_open(&s, &o, false), Verdict::Refuse(pb::Refusal::InUse), "attached read-only");
        let mut former_primary = node(Role::Secondary, 1);
        former_primary.in_use = true;
        assert_eq!(judge_open(&former_primary, &open(1), false), Verdict::Proceed, "readers left by a switchover");
        s.split_writable = true;
        assert_eq!(judge_open(&s, &o, false), Verdict::Refuse(pb::Refusal::InUse));
        let mut p = node(Role::Primary, 1);
        p.split = true;
        let mut o = open(2);
        o.swap = true;
        assert_eq!(judge_open(&p, &o, false), Verdict::GiveUpForSwap);
    }

    #[test]
    fn refusals_move_the_opener() {
        let a = node(Role::Primary, 1);
        assert_eq!(on_refusal(&a, pb::Refusal::Superseded, 2), Answer::Fence);
        assert_eq!(on_refusal(&a, pb::Refusal::Superseded, 1), Answer::SplitBrain);
        assert_eq!(on_refusal(&a, pb::Refusal::NeedsRebase, 2), Answer::Rebase { take_over: true });
        assert_eq!(on_refusal(&a, pb::Refusal::NeedsRebase, 1), Answer::Rebase { take_over: false });
        assert_eq!(on_refusal(&a, pb::Refusal::InUse, 1), Answer::Retry);
    }
}
