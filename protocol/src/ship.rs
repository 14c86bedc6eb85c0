//! Primary side of a replication session, sans-IO.
//!
//! The daemon journals each write, tells the [`Shipper`]
//! ([`on_appended`](Shipper::on_appended)), sends the records that
//! [`next_to_send`](Shipper::next_to_send) names (reading them from the
//! journal), and feeds every [`pb::Ack`] from the secondary to
//! [`on_ack`](Shipper::on_ack). Journal space may be freed through
//! [`checkpoint`](Shipper::checkpoint) only (the secondary's persisted resume
//! point, `<=` its durable seq): a secondary that restarts resumes after its
//! checkpoint, and the records after it must still be in the journal.
//!
//! After a reconnect, a new `Shipper` starts from the `durable_seq` of the
//! secondary's `OpenGroupReply`: everything after it is sent again (the
//! secondary may have lost records that were received but not yet durable).

use crate::pb;

/// A protocol violation in an ack; the session should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShipError {
    /// An ack counter went backwards.
    #[error("peer ack went backwards: {field} {got} after {previous}")]
    AckBackwards {
        /// Which counter ("received_seq", "applied_seq", "durable_seq",
        /// "copy_durable" or "checkpoint_seq").
        field: &'static str,
        /// Value acked before.
        previous: u64,
        /// Value acked now.
        got: u64,
    },
    /// The peer acked a record that was never sent to it.
    #[error("peer acked {field} {got} but only records through {sent} were sent")]
    AckBeyondSent {
        /// Which counter.
        field: &'static str,
        /// Value acked.
        got: u64,
        /// Highest seq sent.
        sent: u64,
    },
    /// The peer reported a differing span outside the copy chunk it names.
    #[error("peer reported copy chunk {copy_index} different at {length} bytes at {offset}, outside that chunk")]
    MismatchOutsideChunk {
        /// The chunk named.
        copy_index: u64,
        /// The span's offset.
        offset: u64,
        /// The span's length.
        length: u64,
    },
    /// The ack's counters contradict each other.
    #[error("inconsistent peer ack: received {received}, applied {applied}, durable {durable}, checkpoint {checkpoint} (applied and durable must not exceed received, checkpoint not durable)")]
    AckInconsistent {
        /// received_seq
        received: u64,
        /// applied_seq
        applied: u64,
        /// durable_seq
        durable: u64,
        /// checkpoint_seq
        checkpoint: u64,
    },
}

/// What an ack changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckUpdate {
    /// `applied_seq` advanced (sync mode: writes through [`Shipper::applied`]
    /// can be acknowledged to clients).
    pub applied_advanced: bool,
    /// `durable_seq` advanced to this value (journal space through it can be
    /// freed; FUA writes and flushes through it are complete).
    pub newly_durable_through: Option<u64>,
    /// Copy chunks with `copy_index <=` this are durable on the peer.
    pub copy_durable: u64,
    /// `checkpoint_seq` advanced to this value: journal space through it can
    /// be freed.
    pub newly_checkpointed_through: Option<u64>,
}

/// Primary-side shipping state of one group session.
#[derive(Debug, Clone)]
pub struct Shipper {
    last_seq: u64,
    sent: u64,
    received: u64,
    applied: u64,
    durable: u64,
    checkpoint: u64,
    copy_durable: u64,
}

impl Shipper {
    /// `peer_durable`: `durable_seq` from the secondary's `OpenGroupReply`;
    /// `last_seq`: newest journaled seq. Shipping resumes at
    /// `peer_durable + 1`. A peer ahead of the journal is clamped (nothing to
    /// send); [`check_resume`](crate::primary::check_resume) reports it as
    /// divergence first.
    pub fn new(peer_durable: u64, last_seq: u64) -> Self {
        Shipper {
            last_seq: last_seq.max(peer_durable),
            sent: peer_durable,
            received: peer_durable,
            applied: peer_durable,
            durable: peer_durable,
            checkpoint: 0,
            copy_durable: 0,
        }
    }

    /// A new journal record `seq` exists (seqs increase by one; older or
    /// repeated seqs are ignored).
    pub fn on_appended(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// The next seq to transmit, in order; it is marked sent.
    pub fn next_to_send(&mut self) -> Option<u64> {
        if self.sent < self.last_seq {
            self.sent += 1;
            Some(self.sent)
        } else {
            None
        }
    }

    /// Processes an ack from the secondary. Acks must not go backwards, must
    /// satisfy `applied <= received`, `checkpoint <= durable <= received`
    /// (the secondary's restore journal makes a record durable before its
    /// volumes have it), and must not cover records that were not sent.
    pub fn on_ack(&mut self, ack: &pb::Ack) -> Result<AckUpdate, ShipError> {
        let checks = [
            ("received_seq", self.received, ack.received_seq),
            ("applied_seq", self.applied, ack.applied_seq),
            ("durable_seq", self.durable, ack.durable_seq),
            ("copy_durable", self.copy_durable, ack.copy_durable),
            ("checkpoint_seq", self.checkpoint, ack.checkpoint_seq),
        ];
        for (field, previous, got) in checks {
            if got < previous {
                return Err(ShipError::AckBackwards { field, previous, got });
            }
        }
        if ack.received_seq > self.sent {
            return Err(ShipError::AckBeyondSent { field: "received_seq", got: ack.received_seq, sent: self.sent });
        }
        if ack.applied_seq > ack.received_seq
            || ack.durable_seq > ack.received_seq
            || ack.checkpoint_seq > ack.durable_seq
        {
            return Err(ShipError::AckInconsistent {
                received: ack.received_seq,
                applied: ack.applied_seq,
                durable: ack.durable_seq,
                checkpoint: ack.checkpoint_seq,
            });
        }
        let update = AckUpdate {
            applied_advanced: ack.applied_seq > self.applied,
            newly_durable_through: (ack.durable_seq > self.durable).then_some(ack.durable_seq),
            copy_durable: ack.copy_durable,
            newly_checkpointed_through: (ack.checkpoint_seq > self.checkpoint).then_some(ack.checkpoint_seq),
        };
        self.checkpoint = ack.checkpoint_seq;
        self.received = ack.received_seq;
        self.applied = ack.applied_seq;
        self.durable = ack.durable_seq;
        self.copy_durable = ack.copy_durable;
        Ok(update)
    }

    /// Highest seq handed out by [`next_to_send`](Self::next_to_send).
    pub fn sent_through(&self) -> u64 {
        self.sent
    }

    /// Highest seq the peer has received (all below too).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Highest seq the peer has applied (all below too).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Highest seq durable on the peer (all below too).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The peer's persisted resume point: journal records through it may be
    /// freed. Starts at 0 in a new session until the first ack.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Highest copy chunk index durable on the peer.
    pub fn copy_durable(&self) -> u64 {
        self.copy_durable
    }

    /// Newest journaled seq.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Records journaled but not yet durable on the peer.
    pub fn lag_records(&self) -> u64 {
        self.last_seq.saturating_sub(self.durable)
    }

    /// Records sent but not yet acked as received.
    pub fn unacked_records(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ack(r: u64, a: u64, d: u64, c: u64) -> pb::Ack {
        pb::Ack {
            received_seq: r,
            applied_seq: a,
            durable_seq: d,
            copy_durable: c,
            checkpoint_seq: 0,
            copy_mismatch: Vec::new(),
        }
    }

    #[test]
    fn ships_in_order_and_tracks_acks() {
        let mut s = Shipper::new(10, 12);
        assert_eq!(s.lag_records(), 2);
        assert_eq!(s.next_to_send(), Some(11));
        assert_eq!(s.next_to_send(), Some(12));
        assert_eq!(s.next_to_send(), None);
        s.on_appended(13);
        assert_eq!(s.next_to_send(), Some(13));
        assert_eq!(s.sent_through(), 13);
        assert_eq!(
            s.on_ack(&ack(12, 11, 10, 0)).unwrap(),
            AckUpdate {
                applied_advanced: true,
                newly_durable_through: None,
                copy_durable: 0,
                newly_checkpointed_through: None
            }
        );
        assert_eq!(
            s.on_ack(&ack(13, 11, 11, 3)).unwrap(),
            AckUpdate {
                applied_advanced: false,
                newly_durable_through: Some(11),
                copy_durable: 3,
                newly_checkpointed_through: None
            }
        );
        assert_eq!((s.received(), s.applied(), s.durable(), s.last_seq()), (13, 11, 11, 13));
        assert_eq!(s.lag_records(), 2);
        // Repeating an ack is fine.
        assert_eq!(s.on_ack(&ack(13, 11, 11, 3)).unwrap(), AckUpdate { copy_durable: 3, ..Default::default() });
        let mut a = ack(13, 11, 11, 3);
        a.checkpoint_seq = 11;
        assert_eq!(s.on_ack(&a).unwrap().newly_checkpointed_through, Some(11));
        assert_eq!(s.checkpoint(), 11);
        a.checkpoint_seq = 10;
        assert!(matches!(s.on_ack(&a), Err(ShipError::AckBackwards { field: "checkpoint_seq", .. })));
        a.checkpoint_seq = 12;
        assert!(matches!(s.on_ack(&a), Err(ShipError::AckInconsistent { .. })));
    }

    #[test]
    fn rejects_bad_acks() {
        let mut s = Shipper::new(0, 5);
        while s.next_to_send().is_some() {}
        s.on_ack(&ack(4, 3, 2, 1)).unwrap();
        assert!(matches!(s.on_ack(&ack(3, 3, 2, 1)), Err(ShipError::AckBackwards { field: "received_seq", .. })));
        assert!(matches!(s.on_ack(&ack(4, 2, 2, 1)), Err(ShipError::AckBackwards { field: "applied_seq", .. })));
        assert!(matches!(s.on_ack(&ack(4, 3, 1, 1)), Err(ShipError::AckBackwards { field: "durable_seq", .. })));
        assert!(matches!(s.on_ack(&ack(4, 3, 2, 0)), Err(ShipError::AckBackwards { field: "copy_durable", .. })));
        assert!(matches!(s.on_ack(&ack(6, 3, 2, 1)), Err(ShipError::AckBeyondSent { .. })));
        assert!(matches!(s.on_ack(&ack(4, 5, 2, 1)), Err(ShipError::AckInconsistent { .. })));
        assert!(matches!(s.on_ack(&ack(5, 3, 6, 1)), Err(ShipError::AckInconsistent { .. })));
        // The restore journal: durable before applied is fine.
        assert!(s.clone().on_ack(&ack(5, 3, 4, 1)).is_ok());
        // Rejected acks change nothing.
        assert_eq!((s.received(), s.applied(), s.durable()), (4, 3, 2));
        let s = Shipper::new(7, 5);
        assert_eq!((s.last_seq(), s.lag_records(), s.sent_through()), (7, 0, 7));
    }
}
