//! replicator: block-level storage replication.
//!
//! Reading order, top-down along the write path:
//! - [`cli`] and [`daemon`]: the binary's entry points;
//! - [`nbd`]: how applications reach a volume (our own NBD server);
//! - [`node`]: exports and peer streams dispatched to groups;
//! - [`group`]: a consistency group — the write path, the replication
//!   session (primary `shipper`, secondary `applier`);
//! - [`journal`] (and [`write_behind`], its pages written back behind the
//!   appends), [`volume`], [`io`]: what reaches the disks (io_uring);
//! - [`transport`] and [`tls`]: QUIC with mutual TLS between the sites;
//! - [`state`]: what is persisted about each pair, [`slotted_file`]: the
//!   bitmaps and activity log saved in place; [`state_lock`]: one
//!   daemon per `state_dir`; [`perms`]: the modes of its files;
//!   [`durable`]: how names and whole files are made durable;
//! - [`control`]: the admin socket the CLI talks to; [`metrics`];
//! - [`config`] and [`preflight`] (`config check`), [`certs`], [`demo`];
//!   [`packaging`]: man pages, completions, the systemd drop-in.
//!
//! The pure protocol logic (wire codec, record format, pair states,
//! sequencing) lives in the `replicator-protocol` crate.

pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod drill_cli;
pub mod durable;
pub mod group;
pub mod io;
pub mod journal;
pub mod latency;
pub mod metrics;
pub mod nbd;
pub mod nbd_client;
pub mod node;
pub mod packaging;
pub mod perms;
pub mod preflight;
pub mod slotted_file;
pub mod snapshot;
pub mod state;
pub mod state_lock;
pub mod tls;
pub mod transport;
pub mod volume;
pub mod write_behind;
