//! The node: every group of this daemon, the NBD export catalog over their
//! volumes, and the dispatch of incoming replication streams to groups.

use std::collections::HashMap;
use std::sync::Arc;

use replicator_protocol::pb::envelope::Body;
use tokio::sync::watch;

use crate::config::GroupConfig;
use crate::control::AdminCommands;
use crate::group::{
    drill_export_name, serve_verify, ClientGuard, DrillExport, Group, GroupStatus, Health, IncomingSession, Pacing,
    VolumeStatus, WriteError, WriteKind,
};
use crate::io::AlignedBuf;
use crate::metrics::ErrorKind;
use crate::nbd::{BlockSizes, Export, ExportCatalog, ExportError, NbdErrno, OpenError};
use crate::transport::{FramedRecv, FramedSend, PeerConnection, Transport};

/// All groups of this daemon.
#[derive(Debug)]
pub struct Node {
    /// This node's name (`[node] name`).
    pub name: String,
    /// Groups by name, in configuration order.
    pub groups: Vec<Arc<Group>>,
    /// Configured groups that could not be opened at start.
    pub failed: Vec<FailedGroup>,
    /// Volume (export) name -> (group index, volume index).
    exports: HashMap<String, (usize, u32)>,
    /// The QUIC transport.
    pub transport: Arc<Transport>,
    /// The pacing its groups' secondary sessions share.
    pub pacing: Arc<Pacing>,
    /// The admin commands running (a clean stop waits for them).
    pub admin: AdminCommands,
}

/// How long a peer's new stream may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl Node {
    /// Builds the node from opened groups (and those that failed to open).
    pub fn new(
        name: String,
        groups: Vec<Arc<Group>>,
        failed: Vec<FailedGroup>,
        transport: Arc<Transport>,
        pacing: Arc<Pacing>,
    ) -> Self {
        let mut exports = HashMap::new();
        for (gi, g) in groups.iter().enumerate() {
            for v in &g.volumes {
                exports.insert(v.name.clone(), (gi, v.index));
            }
        }
        Self { name, groups, failed, exports, transport, pacing, admin: AdminCommands::default() }
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&Arc<Group>> {
        self.groups.iter().find(|g| g.cfg.name == name)
    }

    /// Every configured group's `status`: those running, then those that
    /// did not open.
    pub fn statuses(&self) -> Vec<GroupStatus> {
        self.groups.iter().map(|g| g.status()).chain(self.failed.iter().map(FailedGroup::status)).collect()
    }

    /// The configured group named `name` that could not be opened.
    pub fn failed_group(&self, name: &str) -> Option<&FailedGroup> {
        self.failed.iter().find(|f| f.cfg.name == name)
    }

    /// Serves the streams of one authenticated peer connection: group
    /// streams (first message `OpenGroup`), verify streams (first message
    /// `VerifyRequest`, see `group/verify.rs`) and a secondary's question
    /// whether this node still holds its pair (`PairQuery`, see
    /// `group/pair_query.rs`).
    pub async fn serve_peer(self: Arc<Self>, pc: PeerConnection, shutdown: watch::Receiver<bool>) {
        loop {
            let (send, recv) = match pc.conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(peer = %pc.peer, "peer connection closed: {e}");
                    return;
                }
            };
            let node = self.clone();
            let peer = pc.peer.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
                // A stream that never says what it is would hold its task
                // and its partial frame for as long as the connection lives.
                let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, recv.expect("OpenGroup")).await {
                    Ok(first) => first,
                    Err(_) => {
                        tracing::warn!(%peer, "stream closed: no first message within {FIRST_MESSAGE_TIMEOUT:?}");
                        return;
                    }
                };
                let open = match first {
                    Ok(Body::OpenGroup(o)) => o,
                    Ok(Body::VerifyRequest(first)) => {
                        return serve_verify(&node.groups, first, send, recv, &peer).await
                    }
                    Ok(Body::PairQuery(query)) => {
                        // A group that did not open here may well be in the
                        // pair: no answer (the asker learns nothing).
                        if node.failed_group(&query.group).is_none() {
                            // No such group here: `configured` false.
                            let reply =
                                node.group(&query.group).map(|g| g.answer_pair_query(&query)).unwrap_or_default();
                            let _ = send.send(Body::PairQueryReply(reply)).await;
                        }
                        send.finish();
                        return;
                    }
                    Ok(other) => {
                        let kind = replicator_protocol::wire::body_kind(&other);
                        tracing::warn!(%peer, "stream did not start with OpenGroup: {kind}");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, "bad stream: {e}");
                        return;
                    }
                };
                let Some(group) = node.group(&open.group).cloned() else {
                    use replicator_protocol::pb::Refusal;
                    let (msg, refusal) = match node.failed_group(&open.group) {
                        // Said at start: the peer's retries are not logged.
                        Some(failed) => (failed.explain(), Refusal::Unspecified),
                        None => {
                            let msg = format!(
                                "no group named {:?} is configured on this node",
                                replicator_protocol::wire::peer_text(&open.group)
                            );
                            tracing::warn!(%peer, "refused replication session: {msg}");
                            (msg, Refusal::Config)
                        }
                    };
                    let _ = send
                        .send(Body::OpenGroupReply(replicator_protocol::pb::OpenGroupReply {
                            error: msg,
                            refusal: refusal as i32,
                            ..Default::default()
                        }))
                        .await;
                    send.finish();
                    return;
                };
                group.serve_secondary(IncomingSession { open, send, recv, peer, shutdown });
            });
        }
    }
}

/// A configured group that could not be opened when the daemon started
/// (its volumes, state or journal): nothing of it is served, replicated or
/// changed until the cause is fixed and the daemon restarted. The other
/// groups run.
#[derive(Debug)]
pub struct FailedGroup {
    /// Its configuration.
    pub cfg: GroupConfig,
    /// Why it did not open.
    pub error: String,
}

impl FailedGroup {
    /// The failure and the way out, for logs, commands and the peer.
    pub fn explain(&self) -> String {
        format!(
            "group {} did not open when the daemon started ({}): nothing of it is served or replicated on this node \
             until the cause is fixed and the daemon restarted (`systemctl restart replicator`); the other groups run",
            self.cfg.name, self.error
        )
    }

    /// Its `status`: critical, with the failure as its last error.
    pub fn status(&self) -> GroupStatus {
        GroupStatus {
            group: self.cfg.name.clone(),
            health: Health::Critical.as_str().to_string(),
            role: "unknown".to_string(),
            state: FAILED_STATE.to_string(),
            mode: self.cfg.mode.as_str().to_string(),
            peer: self.cfg.peer.clone(),
            last_error: Some(self.explain()),
            volumes: self
                .cfg
                .volumes
                .iter()
                .map(|v| VolumeStatus { name: v.name.clone(), path: v.path.clone(), size: v.size.unwrap_or(0) })
                .collect(),
            ..GroupStatus::default()
        }
    }
}

/// The `status` state of a group that did not open.
pub const FAILED_STATE: &str = "FAILED";

/// NBD view of one volume.
#[derive(Debug)]
pub struct VolumeExport {
    group: Arc<Group>,
    volume: u32,
    size: u64,
    /// Counts this client as attached to the group while it lives.
    _attached: ClientGuard,
}

fn to_export_error(e: WriteError) -> ExportError {
    let errno = match &e {
        WriteError::ReadOnly(_)
        | WriteError::Superseded { .. }
        | WriteError::SwitchingOver(_)
        | WriteError::SwappedAway { .. } => NbdErrno::Perm,
        WriteError::OutOfRange { .. } => NbdErrno::NoSpc,
        WriteError::Invalid(_) => NbdErrno::Inval,
        WriteError::Io(_) | WriteError::Journal(_) | WriteError::Replication(_) => NbdErrno::Io,
    };
    ExportError::new(errno, e.to_string())
}

impl VolumeExport {
    /// The NBD error for `e`, counted in the group's error totals.
    fn failed(&self, e: WriteError) -> ExportError {
        let err = to_export_error(e);
        match err.errno {
            NbdErrno::Io => self.group.counters().error(ErrorKind::ClientIo),
            NbdErrno::Perm => self.group.counters().error(ErrorKind::ClientRefused),
            _ => {}
        }
        err
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        !self.group.writable()
    }

    fn rejected(&self, errno: NbdErrno) {
        if errno == NbdErrno::Perm {
            self.group.counters().error(ErrorKind::ClientRefused);
        }
    }

    fn budget_group(&self) -> Option<String> {
        Some(self.group.cfg.name.clone())
    }

    fn block_sizes(&self) -> BlockSizes {
        // Any alignment is accepted: partial blocks are read-modify-written
        // under the range sequencer (see volume.rs), so minimum 1 is honest.
        // The maximum is what the group's journal can always hold.
        BlockSizes { minimum: 1, preferred: 4096, maximum: self.group.max_request().min(crate::nbd::MAX_PAYLOAD) }
    }

    fn max_write(&self) -> u32 {
        // A longer write is split into records of the advertised maximum
        // (`Group::write`): a client that never asked for block sizes
        // (Linux's `nbd` driver) may send the protocol's default maximum.
        crate::nbd::MAX_PAYLOAD
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ExportError> {
        self.group.read(self.volume, offset, u64::from(len)).await.map_err(|e| self.failed(e))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), ExportError> {
        self.group.write(self.volume, offset, WriteKind::Data(data), fua).await.map_err(|e| self.failed(e))
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.group.write(self.volume, offset, WriteKind::Zeroes(u64::from(len)), fua).await.map_err(|e| self.failed(e))
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.group.write(self.volume, offset, WriteKind::Trim(u64::from(len)), fua).await.map_err(|e| self.failed(e))
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.group.flush().await.map_err(|e| self.failed(e))
    }
}

/// An NBD export of this node: a volume, or the drill copy of one
/// (`drill/<volume>`, while a drill runs).
#[derive(Debug)]
pub enum NodeExport {
    /// A replicated volume.
    Volume(VolumeExport),
    /// A volume's drill copy.
    Drill(DrillExport),
}

impl Export for NodeExport {
    fn size(&self) -> u64 {
        match self {
            NodeExport::Volume(e) => e.size(),
            NodeExport::Drill(e) => e.size(),
        }
    }

    fn read_only(&self) -> bool {
        match self {
            NodeExport::Volume(e) => e.read_only(),
            NodeExport::Drill(e) => e.read_only(),
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        match self {
            NodeExport::Volume(e) => e.block_sizes(),
            NodeExport::Drill(e) => e.block_sizes(),
        }
    }

    fn max_write(&self) -> u32 {
        match self {
            NodeExport::Volume(e) => e.max_write(),
            NodeExport::Drill(e) => e.max_write(),
        }
    }

    fn budget_group(&self) -> Option<String> {
        match self {
            NodeExport::Volume(e) => e.budget_group(),
            NodeExport::Drill(e) => e.budget_group(),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ExportError> {
        match self {
            NodeExport::Volume(e) => e.read(offset, len).await,
            NodeExport::Drill(e) => e.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), ExportError> {
        match self {
            NodeExport::Volume(e) => e.write(offset, data, fua).await,
            NodeExport::Drill(e) => e.write(offset, data, fua).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        match self {
            NodeExport::Volume(e) => e.write_zeroes(offset, len, fua).await,
            NodeExport::Drill(e) => e.write_zeroes(offset, len, fua).await,
        }
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        match self {
            NodeExport::Volume(e) => e.trim(offset, len, fua).await,
            NodeExport::Drill(e) => e.trim(offset, len, fua).await,
        }
    }

    async fn flush(&self) -> Result<(), ExportError> {
        match self {
            NodeExport::Volume(e) => e.flush().await,
            NodeExport::Drill(e) => e.flush().await,
        }
    }
}

impl Node {
    /// Why export `name` (of volume `volume`) is not served: its group did
    /// not open, or there is no such volume.
    fn not_served(&self, name: &str, volume: &str) -> OpenError {
        match self.failed.iter().find(|f| f.cfg.volumes.iter().any(|v| v.name == volume)) {
            Some(failed) => OpenError::Refused(failed.explain()),
            None => OpenError::Unknown(name.to_string()),
        }
    }
}

impl ExportCatalog for Node {
    type Export = NodeExport;

    fn list(&self) -> Vec<String> {
        let mut names: Vec<(usize, u32, String)> = self.exports.iter().map(|(n, (g, v))| (*g, *v, n.clone())).collect();
        names.sort();
        let mut list: Vec<String> = names.into_iter().map(|(_, _, n)| n).collect();
        for g in &self.groups {
            if g.drill().is_some() {
                list.extend(g.volumes.iter().map(|v| drill_export_name(&v.name)));
            }
        }
        list
    }

    fn open(&self, name: &str) -> Result<Arc<NodeExport>, OpenError> {
        if let Some(volume) = name.strip_prefix("drill/") {
            let (gi, _) = *self.exports.get(volume).ok_or_else(|| self.not_served(name, volume))?;
            let group = &self.groups[gi];
            return match group.open_drill_export(volume) {
                Some(e) => Ok(Arc::new(NodeExport::Drill(e))),
                None => Err(OpenError::Refused(format!(
                    "no drill is running for group {} (volume {volume}); `replicator drill start {}` on the secondary \
                     exports its drill copy as {name}",
                    group.cfg.name, group.cfg.name
                ))),
            };
        }
        let (gi, vi) = *self.exports.get(name).ok_or_else(|| self.not_served(name, name))?;
        let group = self.groups[gi].clone();
        let changing_role = || {
            OpenError::Refused(format!(
                "group {} is changing roles here (a switchover, or the primary role going to the peer): volume {name} \
                 cannot be attached now; see `replicator status {}`",
                group.cfg.name, group.cfg.name
            ))
        };
        if group.changing_role() {
            return Err(changing_role());
        }
        if !group.attachable() {
            return Err(OpenError::Refused(format!(
                "volume {name} is the secondary replica of group {} ({}): it cannot be attached while replication runs into it \
                 (`replicator pair split {}` here freezes it for read-only access, `--rw` makes it writable)",
                group.cfg.name,
                group.state(),
                group.cfg.name
            )));
        }
        let size = group.volumes[vi as usize].size();
        let attached = group.attach_client();
        // Checked again with the client counted: a `pair create` or a
        // resync from the peer that made this group (again) a replicating
        // secondary meanwhile is not missed; one that comes later sees the
        // client and is refused.
        if !group.attachable() {
            return Err(OpenError::Refused(format!(
                "volume {name} became the secondary replica of group {}: it cannot be attached while replication runs into it",
                group.cfg.name
            )));
        }
        if group.changing_role() {
            return Err(changing_role());
        }
        Ok(Arc::new(NodeExport::Volume(VolumeExport { group, volume: vi, size, _attached: attached })))
    }
}
