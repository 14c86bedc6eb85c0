//! A secondary asks its primary whether it still holds the pair.
//!
//! Only a primary dials: a secondary waits for sessions. A primary that ran
//! `pair delete` while its secondary was away (down, or cut off) never dials
//! again, and the secondary would wait in `SUSPENDED(link)` for ever, with
//! no error, and a `failover` there would meet a standalone site. So a
//! secondary with no session for [`ASK_AFTER`] dials the peer itself and asks
//! (`PairQuery`, answered with `PairQueryReply` by [`Group::answer_pair_query`]),
//! again every [`ASK_EVERY`] while no session comes. A peer that left the
//! pair makes this node say so, as a primary says it when its secondary
//! left: `SUSPENDED(error)`, refusal `not-paired`, and what to run (a peer
//! without the group: refusal `config`, the state unchanged). Nothing is
//! resolved by itself: the admin runs `pair delete` here. A session that
//! attaches clears what was said (`applier::accept_open`). That the peer
//! left this pair is persisted (`SecondaryState::primary_left_pair`): after
//! a restart the refusal stands until a session attaches or an admin acts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator_protocol::pair::{PairEvent, Role};
use replicator_protocol::pb::{self, envelope::Body};

use super::{lock, Group};
use crate::transport::Transport;

/// A secondary without a session for this long asks its peer.
const ASK_AFTER: Duration = Duration::from_secs(10);

/// ... and again this often while no session comes.
const ASK_EVERY: Duration = Duration::from_secs(30);

/// The whole exchange (dial, question, answer) is bounded by this.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// What `status` says when the peer is no longer in this pair: `what`, then
/// what to run.
pub(super) fn left_the_pair(name: &str, what: &str) -> String {
    format!(
        "{what}: nothing will replicate into this node again. This node still holds the replica as it was; run \
         `replicator pair delete {name}` here to make its volumes standalone, then `replicator pair create {name}` \
         on the site to be primary to pair again"
    )
}

impl Group {
    /// Called every housekeeping tick: whether this secondary should ask its
    /// peer now (and then it counts as asked).
    pub(super) fn pair_query_due(&self) -> Option<u64> {
        let mut g = lock(&self.inner);
        let waiting = g.role() == Role::Secondary
            && !g.secondary_attached
            && g.link_changed_at.elapsed().unwrap_or_default() >= ASK_AFTER;
        if !waiting || g.pair_query_at.is_some_and(|at| at.elapsed() < ASK_EVERY) {
            return None;
        }
        g.pair_query_at = Some(Instant::now());
        Some(g.persisted.pair_id)
    }

    /// The peer's answer about pair `pair_id`, within `timeout`; `None`
    /// from a peer that cannot be reached or does not answer (it may be
    /// down, frozen, cut off, or an older version).
    pub(super) async fn query_peer(&self, pair_id: u64, timeout: Duration) -> Option<pb::PairQueryReply> {
        let asked = tokio::time::timeout(timeout, async {
            let conn = self.transport.connect(&self.cfg.peer).await.map_err(|e| e.to_string())?;
            let (mut send, mut recv) = Transport::open_stream(&conn).await.map_err(|e| e.to_string())?;
            send.send(Body::PairQuery(pb::PairQuery { group: self.cfg.name.clone(), pair_id }))
                .await
                .map_err(|e| e.to_string())?;
            send.finish();
            match recv.expect("PairQueryReply").await {
                Ok(Body::PairQueryReply(r)) => Ok(r),
                Ok(other) => Err(format!("answered {}", replicator_protocol::wire::body_kind(&other))),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        match asked {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::debug!(group = %self.cfg.name, peer = %self.cfg.peer, "could not ask the peer about the pair: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Asks the peer whether it still holds pair `pair_id`; records the
    /// answer if it does not.
    pub(super) async fn ask_peer_about_the_pair(self: Arc<Self>, pair_id: u64) {
        let Some(reply) = self.query_peer(pair_id, ASK_TIMEOUT).await else { return };
        if reply.paired {
            return;
        }
        let name = &self.cfg.name;
        let peer = &self.cfg.peer;
        let says = replicator_protocol::wire::peer_text(&reply.state);
        let msg = if !reply.configured {
            format!(
                "the peer {peer} has no group {name} configured: this node is the secondary of a pair {peer} does \
                 not know; check the peer's configuration, or run `replicator pair delete {name}` here to make \
                 this node's volumes standalone"
            )
        } else if reply.left {
            let since = if reply.written_standalone { ", and its volumes were written since" } else { "" };
            let what = format!(
                "the primary {peer} left this pair (`pair delete` ran there while this node was away{since}; it is \
                 {says} now)"
            );
            left_the_pair(name, &what)
        } else {
            left_the_pair(name, &format!("the peer {peer} is not in this pair (it is {says})"))
        };
        let mut g = lock(&self.inner);
        // Only if nothing changed meanwhile (a session came, an admin acted).
        if g.role() != Role::Secondary || g.secondary_attached || g.persisted.pair_id != pair_id {
            return;
        }
        // A peer without the group may be having its configuration edited:
        // said, but not taken for the end of the pair.
        // (Nor does it undo an earlier answer that the peer left the pair.)
        let refusal = match (reply.configured, g.refusal) {
            (true, _) => "not-paired",
            (false, Some("not-paired")) => return,
            (false, _) => "config",
        };
        if g.refusal != Some(refusal) {
            tracing::error!(group = %name, peer = %peer, "{msg}");
        }
        if reply.configured {
            // That it left is kept across a restart: asked again then, a
            // peer unreachable by that time would let a `failover` through.
            // (A peer in another pair, e.g. one created since, is asked
            // again: its create comes to this node in any case.)
            if let Some(s) = g.persisted.role.as_secondary_mut().filter(|s| reply.left && !s.primary_left_pair) {
                s.primary_left_pair = true;
                self.save_later(&mut g);
            }
            self.transition(&mut g, PairEvent::Failure, "the primary is not in this pair: it left it");
        }
        g.refusal = Some(refusal);
        g.last_error = Some(msg);
    }

    /// The answer to a peer's [`pb::PairQuery`] for this group.
    pub fn answer_pair_query(&self, query: &pb::PairQuery) -> pb::PairQueryReply {
        let g = lock(&self.inner);
        let paired = g.role() != Role::None && g.persisted.pair_id == query.pair_id;
        let left = g.persisted.role.as_simplex().filter(|s| s.former_pair_id == query.pair_id && query.pair_id != 0);
        pb::PairQueryReply {
            paired,
            configured: true,
            left: left.is_some(),
            written_standalone: left.is_some_and(|s| s.written_standalone),
            state: Self::describe_self(&g),
            live_primary: paired
                && g.role() == Role::Primary
                && g.persisted.role.superseded_by() == 0
                && self.stopped.get().is_none(),
        }
    }
}
