//! A sync-mode primary's way back to RPO 0 after it acknowledged writes
//! without the secondary (a suspended link, a restart without its peer).
//!
//! Those writes are in its journal, and a session that comes back ships them
//! ahead of anything newer, in order. Were new writes to wait for the
//! secondary at once, each would wait behind that whole backlog: minutes of
//! stalled applications after a long outage, and a write waiting longer than
//! `link_timeout` would suspend the pair again although the secondary is
//! receiving. So the primary first catches up, with writes acknowledged
//! locally as while suspended, in rounds: each round ends when the secondary
//! has received what was written when it began. Once a round is short (the
//! backlog is nearly gone), or no shorter than the one before it (writes
//! come in as fast as the link carries them: waiting longer would not help),
//! writes wait for the secondary again. RPO 0 is claimed only once the
//! secondary has also received every write acknowledged before that point.
//!
//! Sequence numbers are the primary's journal sequence; `received` is what
//! the secondary has acknowledged receiving; times are milliseconds of any
//! monotonic clock.

/// A round of catching up no longer than this lets writes wait again: what
/// is left to send then takes about as long.
pub const SHORT_ROUND_MS: u64 = 50;

/// Where a sync-mode primary stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCatchUp {
    /// Writes are acknowledged without the secondary (no session, suspended,
    /// not a sync primary): any of them up to the newest may be missing on
    /// the secondary.
    Alone,
    /// Replicating again; writes are still acknowledged locally while the
    /// secondary receives the backlog. This round ends when it has received
    /// `target`.
    CatchingUp {
        /// The newest write when this round began.
        target: u64,
        /// When this round began.
        round_start_ms: u64,
        /// How long the round before took, if there was one.
        last_round_ms: Option<u64>,
        /// What the secondary had received, and when that last grew.
        received: u64,
        progress_ms: u64,
    },
    /// Writes wait for the secondary again; writes through `through` were
    /// acknowledged alone and are not all received yet.
    Closing {
        /// The newest write when writes began to wait again.
        through: u64,
    },
    /// Every acknowledged write is on the secondary before it is
    /// acknowledged (RPO 0, as far as the session is concerned).
    Zero,
}

impl SyncCatchUp {
    /// Whether the pair replicates in sync mode (`replicating`: writes are
    /// to wait for the secondary, possibly for the link under
    /// `on_link_loss = "block"`) and whether a session is up (`connected`),
    /// at every change of either. `last` is the newest write sequenced,
    /// `received` what the secondary has received. Only a session that is
    /// up catches up; without one, writes wait.
    pub fn on_replicating(&mut self, replicating: bool, connected: bool, last: u64, received: u64, now_ms: u64) {
        *self = match (replicating, connected, *self) {
            (false, _, _) => SyncCatchUp::Alone,
            (true, _, SyncCatchUp::Alone) if received >= last => SyncCatchUp::Zero,
            (true, true, SyncCatchUp::Alone) => SyncCatchUp::CatchingUp {
                target: last,
                round_start_ms: now_ms,
                last_round_ms: None,
                received,
                progress_ms: now_ms,
            },
            (true, false, SyncCatchUp::Alone | SyncCatchUp::CatchingUp { .. }) => {
                SyncCatchUp::Closing { through: last }
            }
            (true, _, state) => state,
        };
    }

    /// A new session is up. Writes that waited for the session that is
    /// gone (or, after a restart, for any session) need not wait behind
    /// a backlog of writes acknowledged alone in this one: the next
    /// [`Self::on_replicating`] starts a catch-up, as for a link that comes
    /// back. `catch_up` false (under `on_link_loss = "block"`, or while
    /// every acknowledged write is on the secondary: RPO 0 is not given up
    /// for a session that restarted) keeps writes waiting.
    pub fn on_session_up(&mut self, catch_up: bool) {
        if catch_up && matches!(self, SyncCatchUp::Closing { .. }) {
            *self = SyncCatchUp::Alone;
        }
    }

    /// Catching up, the secondary has received nothing for `timeout_ms`:
    /// writes wait for it again (and a secondary that goes on receiving
    /// nothing is then a lost link). True when that changed anything.
    pub fn on_stall(&mut self, last: u64, now_ms: u64, timeout_ms: u64) -> bool {
        match *self {
            SyncCatchUp::CatchingUp { progress_ms, .. } if now_ms.saturating_sub(progress_ms) >= timeout_ms => {
                *self = SyncCatchUp::Closing { through: last };
                true
            }
            _ => false,
        }
    }

    /// The secondary acknowledged receiving through `received`; `last` is
    /// the newest write sequenced. True when that changed whether writes
    /// wait or whether RPO 0 holds.
    pub fn on_received(&mut self, received: u64, last: u64, now_ms: u64) -> bool {
        let next = match *self {
            SyncCatchUp::CatchingUp { target, round_start_ms, last_round_ms, .. } if received >= target => {
                let round = now_ms.saturating_sub(round_start_ms);
                if received >= last {
                    SyncCatchUp::Zero
                } else if round <= SHORT_ROUND_MS || last_round_ms.is_some_and(|before| round >= before) {
                    SyncCatchUp::Closing { through: last }
                } else {
                    SyncCatchUp::CatchingUp {
                        target: last,
                        round_start_ms: now_ms,
                        last_round_ms: Some(round),
                        received,
                        progress_ms: now_ms,
                    }
                }
            }
            SyncCatchUp::CatchingUp { target, round_start_ms, last_round_ms, received: before, progress_ms } => {
                let progress_ms = if received > before { now_ms } else { progress_ms };
                SyncCatchUp::CatchingUp {
                    target,
                    round_start_ms,
                    last_round_ms,
                    received: received.max(before),
                    progress_ms,
                }
            }
            SyncCatchUp::Closing { through } if received >= through => SyncCatchUp::Zero,
            state => state,
        };
        let changed = self.writes_wait() != next.writes_wait() || self.rpo_zero() != next.rpo_zero();
        *self = next;
        changed
    }

    /// Whether anything waits for the secondary's acknowledgements.
    pub fn pending(&self) -> bool {
        matches!(self, SyncCatchUp::CatchingUp { .. } | SyncCatchUp::Closing { .. })
    }

    /// Whether writes wait for the secondary before they are acknowledged.
    pub fn writes_wait(&self) -> bool {
        matches!(self, SyncCatchUp::Closing { .. } | SyncCatchUp::Zero)
    }

    /// Whether every acknowledged write is on the secondary.
    pub fn rpo_zero(&self) -> bool {
        *self == SyncCatchUp::Zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_with_nothing_to_catch_up_is_at_rpo_zero_at_once() {
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 10, 10, 0);
        assert_eq!(c, SyncCatchUp::Zero);
        assert!(c.writes_wait() && c.rpo_zero() && !c.pending());
        c.on_replicating(false, true, 11, 10, 5);
        assert_eq!(c, SyncCatchUp::Alone);
        assert!(!c.writes_wait() && !c.rpo_zero());
    }

    #[test]
    fn a_backlog_is_caught_up_before_writes_wait_and_rpo_zero_after_the_last_lone_write() {
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 1000, 0, 0);
        assert!(!c.writes_wait() && !c.rpo_zero() && c.pending());
        // Progress short of the round's target changes nothing.
        assert!(!c.on_received(999, 1100, 2_000));
        assert!(!c.writes_wait());
        // A long first round: another round, to what was written meanwhile.
        assert!(!c.on_received(1000, 1100, 3_000));
        assert!(matches!(
            c,
            SyncCatchUp::CatchingUp { target: 1100, round_start_ms: 3_000, last_round_ms: Some(3_000), .. }
        ));
        // A short round: writes wait again, RPO 0 once the rest is there.
        assert!(c.on_received(1100, 1103, 3_020));
        assert_eq!(c, SyncCatchUp::Closing { through: 1103 });
        assert!(c.writes_wait() && !c.rpo_zero());
        assert!(!c.on_received(1102, 1110, 3_021));
        assert!(c.on_received(1103, 1110, 3_022));
        assert!(c.rpo_zero());
    }

    #[test]
    fn a_primary_restarted_with_a_backlog_catches_up_once_a_session_is_up() {
        // Restarted without its peer: writes wait (nothing ships them).
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, false, 1000, 10, 0);
        assert_eq!(c, SyncCatchUp::Closing { through: 1000 });
        assert!(c.writes_wait());
        // The session comes up: writes no longer wait behind the backlog.
        c.on_session_up(true);
        c.on_replicating(true, true, 1000, 10, 5);
        assert!(matches!(c, SyncCatchUp::CatchingUp { target: 1000, .. }), "{c:?}");
        assert!(!c.writes_wait() && !c.rpo_zero());
        // Under on_link_loss = "block" they keep waiting.
        let mut c = SyncCatchUp::Closing { through: 1000 };
        c.on_session_up(false);
        c.on_replicating(true, true, 1000, 10, 5);
        assert_eq!(c, SyncCatchUp::Closing { through: 1000 });
        // A session with nothing owed is at RPO 0 at once.
        let mut c = SyncCatchUp::Closing { through: 1000 };
        c.on_session_up(true);
        c.on_replicating(true, true, 1000, 1000, 5);
        assert_eq!(c, SyncCatchUp::Zero);
    }

    #[test]
    fn a_round_no_shorter_than_the_one_before_ends_the_catch_up() {
        // Writes come in as fast as the link carries them: catching up
        // would never end, so writes wait (as sync mode throttles them).
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 100, 0, 0);
        assert!(!c.on_received(100, 200, 1_000));
        assert!(c.on_received(200, 300, 2_100));
        assert!(c.writes_wait() && !c.rpo_zero());
    }

    #[test]
    fn catching_up_exactly_is_rpo_zero() {
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 100, 0, 0);
        assert!(c.on_received(100, 100, 10_000));
        assert_eq!(c, SyncCatchUp::Zero);
    }

    #[test]
    fn losing_replication_while_catching_up_starts_over() {
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 100, 0, 0);
        c.on_replicating(true, true, 150, 10, 5);
        assert!(matches!(c, SyncCatchUp::CatchingUp { target: 100, round_start_ms: 0, last_round_ms: None, .. }));
        c.on_replicating(false, true, 150, 10, 6);
        assert_eq!(c, SyncCatchUp::Alone);
        c.on_replicating(true, true, 160, 40, 7);
        assert!(matches!(c, SyncCatchUp::CatchingUp { target: 160, round_start_ms: 7, last_round_ms: None, .. }));
        // Acks from Alone or Zero change nothing.
        let mut z = SyncCatchUp::Zero;
        assert!(!z.on_received(5, 10, 0));
        assert_eq!(z, SyncCatchUp::Zero);
    }

    #[test]
    fn without_a_session_writes_wait_and_a_stalled_catch_up_makes_them_wait() {
        // A backlog and no session (a restart, `on_link_loss = "block"`
        // with the link down): writes wait, RPO 0 once it is received.
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, false, 100, 0, 0);
        assert_eq!(c, SyncCatchUp::Closing { through: 100 });
        // Catching up when the session goes: the same.
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 100, 0, 0);
        c.on_replicating(true, false, 120, 10, 5);
        assert_eq!(c, SyncCatchUp::Closing { through: 120 });
        // A session that stops receiving: after the timeout writes wait.
        let mut c = SyncCatchUp::Alone;
        c.on_replicating(true, true, 100, 0, 0);
        assert!(!c.on_received(40, 110, 900));
        assert!(!c.on_stall(110, 1_800, 1_000));
        assert!(!c.on_received(40, 110, 1_850));
        assert!(c.on_stall(115, 1_900, 1_000));
        assert_eq!(c, SyncCatchUp::Closing { through: 115 });
        assert!(!c.on_stall(115, 9_000, 1_000));
    }
}
