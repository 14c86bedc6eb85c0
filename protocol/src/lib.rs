//! Sans-IO core of replicator.
//!
//! This crate holds everything about replication that can be decided without
//! touching a socket, a file or a clock, so that it can be driven both by the
//! daemon (`replicator/`) and by deterministic, seeded simulations
//! (`tests/simulated_pair.rs`), in the manner of `quinn-proto`:
//!
//! - [`wire`]: length-delimited framing of the prost [`pb::Envelope`] and wire
//!   version negotiation.
//! - [`record`]: the replicated write record and its validation (CRC32,
//!   lengths, overflow).
//! - [`journal_format`]: the on-disk journal layout (superblock, record
//!   headers) and the accounting of the journal ring.
//! - [`journal_space`]: what the primary does when its journal is full
//!   (wait, or bitmap mode), when bitmap mode ends, how far space is freed.
//! - [`bitmap`]: the persisted dirty-region bitmap used while suspended.
//! - [`activity_log`]: the regions that may differ between the sites after a
//!   power cut (resynchronised after one).
//! - [`sequencer`]: sequence assignment and range serialisation on the
//!   primary.
//! - [`seqtrack`]: highest contiguous completed sequence from out-of-order
//!   completions.
//! - [`pair`]: pair roles and the pair state machine.
//! - [`catch_up`]: a sync primary's way back to RPO 0 after writes were
//!   acknowledged without the secondary.
//! - [`ship`] and [`apply`]: the two ends of a replication session (primary
//!   shipper, secondary applier).
//! - [`primary`]: the primary's session as a state machine: stream order of
//!   records, copy chunks and flushes, the copy window, the resume check.
//! - [`secondary`]: the secondary's session as a state machine: restore
//!   journal, applies, volume syncs, checkpoints, acks.
//! - [`snapshot`]: the chunk map of a copy-on-write snapshot (drill copies,
//!   the image a resync protects) and its group commit.
//!
//! Nothing here blocks, allocates threads or performs I/O; every input that
//! can come from the wire or from disk is validated and rejected with an
//! error rather than a panic.

pub mod activity_log;
pub mod apply;
pub mod bitmap;
pub mod catch_up;
pub mod divergence;
pub mod journal_format;
pub mod journal_space;
pub mod lifecycle;
pub mod pair;
pub mod primary;
mod ranges;
pub mod record;
pub mod secondary;
pub mod seqtrack;
pub mod sequencer;
pub mod ship;
pub mod snapshot;
pub mod wire;

/// Generated protobuf wire types (`proto/replication.proto`).
#[allow(missing_docs, clippy::all, missing_debug_implementations, unused_qualifications)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/replicator.v1.rs"));
}
