//! The group's one task: everything the group does on its own, as futures
//! polled by a single task, so that its work never waits on a hand-off to
//! another task:
//! - as primary, the replication session (`shipper.rs`);
//! - as secondary, the session a peer opened (`applier.rs`), handed over by
//!   the peer listener once the stream named this group;
//! - the metadata flusher (state, dirty bitmaps, activity log) and the
//!   periodic housekeeping (link timeout, journal release, activity log).
//!
//! Commands from the control socket and the NBD write path run in their own
//! connection's task and talk to this one through the group's state and its
//! notifications.

use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use replicator_protocol::pb;
use tokio::sync::{mpsc, watch};

use super::{applier, shipper, Group};
use crate::transport::{FramedRecv, FramedSend};

/// A group stream a peer opened: its first message, the stream, who.
#[derive(Debug)]
pub struct IncomingSession {
    /// The `OpenGroup` it started with.
    pub open: pb::OpenGroup,
    /// The stream.
    pub send: FramedSend,
    /// The stream.
    pub recv: FramedRecv,
    /// The peer's name (from its certificate).
    pub peer: String,
    /// Daemon shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs the group for the daemon's lifetime.
pub(super) async fn run(group: Arc<Group>, incoming: mpsc::UnboundedReceiver<IncomingSession>) {
    tokio::join!(
        shipper::ship_while_primary(&group),
        serve_incoming(&group, incoming),
        group.clone().metadata_flusher(),
        group.clone().housekeeping(),
    );
}

/// Serves the sessions peers open, side by side: normally one; a refused
/// one ends at once, and a reconnecting primary may open a new one before
/// the old one noticed its link is gone.
async fn serve_incoming(group: &Arc<Group>, mut incoming: mpsc::UnboundedReceiver<IncomingSession>) {
    let mut sessions = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = incoming.recv() => match next {
                Some(s) => sessions.push(applier::serve_secondary(group.clone(), s)),
                // The group is gone: finish the sessions it serves.
                None => break,
            },
            Some(()) = sessions.next(), if !sessions.is_empty() => {}
        }
    }
    while sessions.next().await.is_some() {}
}
