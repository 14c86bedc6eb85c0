//! Optional Prometheus endpoint (`node.metrics_listen`): a minimal HTTP/1.1
//! responder, with the limits below, for `GET /metrics` (the OpenMetrics
//! text format, encoded by `prometheus-client`) and `GET /healthz`.
//!
//! Every per-group figure is read at scrape time from the same source as
//! `status` ([`crate::group::Group::status`]), so the two always agree; the
//! running totals (`*_total`) are [`GroupCounters`] that the group code
//! counts into. Role, pair state and suspend reason are exported as one
//! series per possible value (1 for the current one, 0 for the others), all
//! always present: a switchover changes values, never the set of series.
//! The README ("Metrics") lists every metric.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use replicator_protocol::record::{Record, RecordOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::Mode;
use crate::group::{GroupStatus, Health};
use crate::node::{FailedGroup, Node};

/// Scrapes served at once; further connections wait in the listen backlog,
/// and every held one ends within [`REQUEST_TIMEOUT`] plus
/// [`WRITE_TIMEOUT`].
const MAX_CONNECTIONS: usize = 8;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Bytes of the request read (the request line is all that matters).
const MAX_REQUEST: usize = 1024;
/// A client must send its request line within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client must take the response within this time.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Pair states, in the order exported (`replicator_state{state=...}`).
pub const STATES: [&str; 5] = ["SIMPLEX", "COPY", "PAIR", "SUSPENDED", "SPLIT-BRAIN"];
/// Roles, in the order exported (`replicator_role{role=...}`).
pub const ROLES: [&str; 3] = ["none", "primary", "secondary"];
/// Suspend reasons (`replicator_suspend_reason{reason=...}`).
pub const SUSPEND_REASONS: [&str; 4] = ["split", "link", "journal-full", "error"];

/// What went wrong, for `replicator_errors_total{kind=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A replication session could not start or ended with an error
    /// (either side; each failed reconnection attempt counts).
    Session,
    /// The secondary failed to write a record to its volumes.
    Apply,
    /// An NBD client's read, write or flush failed with an I/O error.
    ClientIo,
    /// An NBD client's write was refused (read-only, fenced, switching
    /// over).
    ClientRefused,
}

impl ErrorKind {
    /// Every kind, in the order exported.
    pub const ALL: [ErrorKind; 4] =
        [ErrorKind::Session, ErrorKind::Apply, ErrorKind::ClientIo, ErrorKind::ClientRefused];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Session => "session",
            ErrorKind::Apply => "apply",
            ErrorKind::ClientIo => "client_io",
            ErrorKind::ClientRefused => "client_refused",
        }
    }
}

/// Running totals of one group since the daemon started, counted by the
/// group code and exported as `replicator_*_total`.
#[derive(Debug, Default)]
pub struct GroupCounters {
    /// Journal records this node put on the replication stream (primary).
    pub shipped_records: Counter,
    /// Bytes of volume those records cover.
    pub shipped_bytes: Counter,
    /// Journal records this node wrote to its volumes (secondary).
    pub applied_records: Counter,
    /// Bytes of volume those records cover.
    pub applied_bytes: Counter,
    /// Copy chunks (initial copy, resync) this node sent as data (primary).
    pub resynced_records: Counter,
    /// Bytes of those chunks.
    pub resynced_bytes: Counter,
    /// Client writes that waited for room in the activity log (its budget,
    /// `activity_log_extents`, was reached; primary).
    pub activity_log_waits: Counter,
    errors: [Counter; ErrorKind::ALL.len()],
}

impl GroupCounters {
    /// Counts a journal record put on the stream.
    pub fn shipped(&self, r: &Record) {
        self.shipped_records.inc();
        self.shipped_bytes.inc_by(u64::from(r.length));
    }

    /// Counts a record written to the volumes of a secondary: journal
    /// records as applied; copy data is counted where it was sent.
    pub fn applied(&self, r: &Record) {
        if matches!(r.op, RecordOp::Write | RecordOp::WriteZeroes | RecordOp::Trim) {
            self.applied_records.inc();
            self.applied_bytes.inc_by(u64::from(r.length));
        }
    }

    /// Counts a copy chunk put on the stream: only one that carries data
    /// (a chunk sent as digests counts when its differing spans follow as
    /// data).
    pub fn copy_sent(&self, r: &Record) {
        if r.op == RecordOp::Copy {
            self.resynced_records.inc();
            self.resynced_bytes.inc_by(u64::from(r.length));
        }
    }

    /// Counts an error.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].get()
    }
}

/// The registry served on `/metrics`: `replicator_build_info` and the
/// [`NodeCollector`].
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
    node: Arc<Node>,
}

impl Exporter {
    /// Builds the registry for `node`. The certificate expiry exported is
    /// that of the certificates the transport uses (the ones loaded at
    /// start, or the ones a SIGHUP reloaded).
    pub fn new(node: Arc<Node>) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "replicator_build",
            "Version of the running daemon (value 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        registry.register_collector(Box::new(NodeCollector { node: node.clone(), started }));
        Self { registry, node }
    }

    /// Every metric in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("metrics: encoding failed: {e}");
        }
        out
    }

    /// The `/healthz` body: "ok" and each group's health. The daemon
    /// answers, so it is alive: the status code is 200 whatever the groups'
    /// health (a liveness probe must not restart a daemon in split brain).
    pub fn healthz(&self) -> String {
        let mut out = String::from("ok\n");
        for s in self.node.statuses() {
            out.push_str(&format!("{} {} {} {}\n", s.group, s.health, s.role, s.state));
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` until shutdown.
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: watch::Receiver<bool>) {
    let exporter = Arc::new(Exporter::new(node));
    accept_loop(listener, shutdown, move |stream| respond(stream, exporter.clone())).await;
}

/// Labels `group="..."`.
type GroupLabel<'a> = [(&'static str, &'a str); 1];
/// Labels `group="...",X="..."`.
type GroupLabel2<'a> = [(&'static str, &'a str); 2];

/// A per-group gauge's value, from the group's status.
type GaugeOf = fn(&GroupStatus) -> f64;
/// A per-group counter.
type CounterOf = fn(&GroupCounters) -> &Counter;

/// Reads the groups at each scrape.
#[derive(Debug)]
struct NodeCollector {
    node: Arc<Node>,
    /// Daemon start, seconds since the epoch.
    started: f64,
}

/// Encodes one gauge family.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one counter family (`name` without `_total`).
fn counters<'c, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, &'c Counter)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, counter) in samples {
        counter.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One sample per group and value of `key`: 1 for the group's current
/// value, 0 for every other.
fn one_of<'s>(
    statuses: &'s [GroupStatus],
    key: &'static str,
    values: &'static [&'static str],
    current: fn(&GroupStatus) -> Option<&str>,
) -> Vec<(GroupLabel2<'s>, i64)> {
    statuses
        .iter()
        .flat_map(|s| {
            values.iter().map(move |v| ([("group", s.group.as_str()), (key, *v)], flag(current(s) == Some(*v))))
        })
        .collect()
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// `replicator_health`: 0 ok, 1 degraded, 2 critical.
fn health_value(s: &GroupStatus) -> i64 {
    match Health::parse(&s.health) {
        Health::Ok => 0,
        Health::Degraded => 1,
        Health::Critical => 2,
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let groups = &self.node.groups;
        let statuses: Vec<GroupStatus> = groups.iter().map(|g| g.status()).collect();
        // Groups that did not open at start: only their health (critical).
        let failed: Vec<GroupStatus> = self.node.failed.iter().map(FailedGroup::status).collect();
        let by_group = |f: GaugeOf| -> Vec<(GroupLabel<'_>, f64)> {
            statuses.iter().map(|s| ([("group", s.group.as_str())], f(s))).collect()
        };

        ConstGauge::new(self.started).encode(e.encode_descriptor(
            "replicator_start_time_seconds",
            "When the daemon started, in seconds since the Unix epoch",
            None,
            MetricType::Gauge,
        )?)?;
        gauges(
            e,
            "replicator_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate the daemon loaded (certificate=node: its own, ca: the CA), seconds since the Unix epoch",
            self.node.transport.certificate_expiry().into_iter().map(|(which, t)| ([("certificate", which)], t)),
        )?;
        ConstGauge::new(i64::from(self.node.pacing.stretch())).encode(e.encode_descriptor(
            "replicator_secondary_delay_stretch",
            "Factor this node's secondary sessions now stretch their deferred restore-journal syncs and acks by (1 unless more than 4 groups are busy)",
            None,
            MetricType::Gauge,
        )?)?;
        let rtts: Vec<(String, f64)> = {
            let mut peers: Vec<&str> = groups.iter().map(|g| g.cfg.peer.as_str()).collect();
            peers.sort_unstable();
            peers.dedup();
            peers.into_iter().filter_map(|p| Some((p.to_string(), self.node.transport.rtt(p)?.as_secs_f64()))).collect()
        };
        gauges(
            e,
            "replicator_link_rtt_seconds",
            "Round-trip time QUIC estimates on the connection to the peer (present while one is open)",
            rtts.iter().map(|(p, rtt)| ([("peer", p.as_str())], *rtt)),
        )?;

        // Static per group: mode and peer never change while the daemon runs.
        gauges(
            e,
            "replicator_group_info",
            "Configuration of the group (value 1)",
            groups.iter().map(|g| {
                ([("group", g.cfg.name.as_str()), ("mode", g.cfg.mode.as_str()), ("peer", g.cfg.peer.as_str())], 1i64)
            }),
        )?;
        gauges(
            e,
            "replicator_role",
            "1 for the group's current role (none, primary, secondary), 0 for the others; every role always present",
            one_of(&statuses, "role", &ROLES, |s| Some(&s.role)),
        )?;
        gauges(
            e,
            "replicator_state",
            "1 for the group's current pair state (SIMPLEX, COPY, PAIR, SUSPENDED, SPLIT-BRAIN), 0 for the others; every state always present",
            one_of(&statuses, "state", &STATES, |s| Some(&s.state)),
        )?;
        gauges(
            e,
            "replicator_suspend_reason",
            "1 for the reason a SUSPENDED group is suspended (split, link, journal-full, error), 0 for the others",
            one_of(&statuses, "reason", &SUSPEND_REASONS, |s| s.reason.as_deref()),
        )?;
        gauges(
            e,
            "replicator_health",
            "Health as in `status`: 0 ok, 1 degraded (copying, suspended, no session), 2 critical (SUSPENDED(error), SPLIT-BRAIN, a group that did not open at start)",
            statuses.iter().chain(&failed).map(|s| ([("group", s.group.as_str())], health_value(s))),
        )?;
        gauges(
            e,
            "replicator_connected",
            "1 if a replication session with the peer is up",
            statuses.iter().map(|s| ([("group", s.group.as_str())], flag(s.connected))),
        )?;
        gauges(
            e,
            "replicator_rpo_zero",
            "Sync-mode groups: 1 while this node is the primary and RPO 0 is in force (every acknowledged write is on a consistent secondary), else 0",
            statuses
                .iter()
                .zip(groups)
                .filter(|(_, g)| g.cfg.mode == Mode::Sync)
                .map(|(s, _)| ([("group", s.group.as_str())], flag(s.rpo_zero == Some(true)))),
        )?;
        gauges(
            e,
            "replicator_fenced",
            "1 on a former primary superseded by a failover (it takes no writes until failback or resync)",
            statuses.iter().map(|s| ([("group", s.group.as_str())], flag(s.superseded_by > 0))),
        )?;
        let plain: [(&str, &str, GaugeOf); 21] = [
            (
                "replicator_generation",
                "Promotion generation (pair create: 1; each failover or switchover adds one)",
                |s| s.generation as f64,
            ),
            ("replicator_last_seq", "Newest sequence number (primary: journaled; secondary: applied)", |s| {
                s.last_seq as f64
            }),
            ("replicator_applied_seq", "The secondary has applied every record through this sequence", |s| {
                s.applied_seq as f64
            }),
            ("replicator_durable_seq", "The secondary holds every record through this sequence durably", |s| {
                s.durable_seq as f64
            }),
            ("replicator_lag_records", "Records not yet applied on the secondary (primary)", |s| s.lag_records as f64),
            ("replicator_lag_bytes", "Journal bytes not yet applied on the secondary (primary)", |s| {
                s.lag_bytes as f64
            }),
            ("replicator_lag_seconds", "Age of the oldest write the secondary lacks: a record not applied, or a write tracked in the dirty bitmaps until the resync (primary)", |s| {
                s.lag_seconds
            }),
            ("replicator_journal_used_bytes", "Journal bytes in use", |s| s.journal_used_bytes as f64),
            ("replicator_journal_capacity_bytes", "Journal ring size (as `status`)", |s| {
                s.journal_capacity_bytes as f64
            }),
            ("replicator_dirty_bytes", "Bytes marked dirty in the bitmaps (what a resync copies)", |s| {
                s.dirty_bytes as f64
            }),
            (
                "replicator_activity_log_bytes",
                "Primary: bytes in the activity log's regions (what a power cut would resync)",
                |s| s.activity_log_bytes as f64,
            ),
            ("replicator_copy_total_bytes", "Bytes the running initial copy or resync has to send in all", |s| {
                s.copy_total_bytes as f64
            }),
            ("replicator_copy_done_bytes", "Bytes the running copy has sent and had acknowledged durable", |s| {
                s.copy_done_bytes as f64
            }),
            (
                "replicator_copy_progress_ratio",
                "Progress of the running copy or resync, 0 to 1 (1 when none runs)",
                |s| {
                    if s.copy_total_bytes == 0 {
                        1.0
                    } else {
                        (s.copy_done_bytes as f64 / s.copy_total_bytes as f64).min(1.0)
                    }
                },
            ),
            (
                "replicator_data_as_of_timestamp_seconds",
                "Secondary: the primary's time of the newest write held durably here (0 elsewhere)",
                |s| s.data_as_of_unix.unwrap_or(0.0),
            ),
            ("replicator_writable", "1 if clients may write the volumes here", |s| f64::from(u8::from(s.writable))),
            (
                "replicator_resync_guard_bytes",
                "Bytes the consistent image preserved for the running resync holds (0 without one)",
                |s| {
                    s.failover_image
                        .as_ref()
                        .filter(|f| f.source == "resync-guard")
                        .map_or(0.0, |f| f.preserved_bytes as f64)
                },
            ),
            ("replicator_drill_active", "1 while a drill copy of the replica exists here (`drill start`)", |s| {
                f64::from(u8::from(s.drill.is_some()))
            }),
            (
                "replicator_drill_discarded",
                "1 while the running drill's copy is discarded (a copy-on-write into it failed; its exports fail until `drill stop`)",
                |s| f64::from(u8::from(s.drill.as_ref().is_some_and(|d| d.discarded.is_some()))),
            ),
            ("replicator_drill_space_used_bytes", "Bytes the drill copies hold (chunks written on either side)", |s| {
                s.drill.as_ref().map_or(0.0, |d| d.space_used_bytes as f64)
            }),
            ("replicator_drill_recovery_seq", "The sequence the running drill copy holds every write through", |s| {
                s.drill.as_ref().map_or(0.0, |d| d.meta.recovery_seq as f64)
            }),
        ];
        for (name, help, value) in plain {
            gauges(e, name, help, by_group(value))?;
        }

        let counted: [(&str, &str, CounterOf); 7] = [
            ("replicator_shipped_records", "Journal records put on the replication stream (primary)", |c| {
                &c.shipped_records
            }),
            ("replicator_shipped_bytes", "Bytes of volume covered by the records shipped", |c| &c.shipped_bytes),
            ("replicator_applied_records", "Journal records written to the volumes (secondary)", |c| {
                &c.applied_records
            }),
            ("replicator_applied_bytes", "Bytes of volume covered by the records applied", |c| &c.applied_bytes),
            ("replicator_resynced_records", "Copy chunks sent as data by an initial copy or resync (primary)", |c| {
                &c.resynced_records
            }),
            ("replicator_resynced_bytes", "Bytes sent as data by an initial copy or resync (primary)", |c| {
                &c.resynced_bytes
            }),
            (
                "replicator_activity_log_waits",
                "Client writes that waited for room in the activity log (activity_log_extents reached; primary)",
                |c| &c.activity_log_waits,
            ),
        ];
        for (name, help, counter) in counted {
            counters(e, name, help, groups.iter().map(|g| ([("group", g.cfg.name.as_str())], counter(g.counters()))))?;
        }
        counters(
            e,
            "replicator_errors",
            "Errors: session (a replication session failed to start or broke), apply (secondary volume write), client_io, client_refused (NBD requests)",
            groups.iter().flat_map(|g| {
                ErrorKind::ALL
                    .iter()
                    .map(move |k| ([("group", g.cfg.name.as_str()), ("kind", k.as_str())], &g.counters().errors[*k as usize]))
            }),
        )?;

        let mut latency = e.encode_descriptor(
            "replicator_write_latency_seconds",
            "Client write latency (sync mode: includes the secondary)",
            None,
            MetricType::Histogram,
        )?;
        for g in groups {
            let (sum, count, buckets) = g.latency().snapshot();
            let labels: GroupLabel<'_> = [("group", g.cfg.name.as_str())];
            let mut m: MetricEncoder = latency.encode_family(&labels)?;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// Something connections are accepted from (a trait so tests can make
/// `accept` fail).
trait Accept {
    type Stream: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Runs `handle` on each connection, at most [`MAX_CONNECTIONS`] at once,
/// pausing [`ACCEPT_BACKOFF`] after a failed `accept`.
async fn accept_loop<L, H, F>(listener: L, mut shutdown: watch::Receiver<bool>, handle: H)
where
    L: Accept,
    H: Fn(L::Stream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let work = handle(stream);
                    tokio::spawn(async move {
                        work.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Reads at most [`MAX_REQUEST`] bytes of request and answers it.
async fn respond(mut stream: TcpStream, exporter: Arc<Exporter>) {
    let mut buf = [0u8; MAX_REQUEST];
    let mut n = 0;
    // The request line may come in pieces: read until its end, the buffer
    // is full or the client stops sending, all within REQUEST_TIMEOUT.
    let read_line = async {
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(got) => n += got,
            }
        }
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read_line).await.is_err() {
        return;
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.strip_prefix("GET ").and_then(|r| r.split([' ', '?', '\r', '\n']).next());
    let (status, content_type, body) = match path {
        Some("/metrics" | "/") => ("200 OK", CONTENT_TYPE, exporter.render()),
        Some("/healthz") => ("200 OK", "text/plain; charset=utf-8", exporter.healthz()),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "try GET /metrics or GET /healthz\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(resp.as_bytes())).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A listener whose every `accept` fails, as when out of file
    /// descriptors.
    struct Failing(Arc<AtomicUsize>);

    impl Accept for Failing {
        type Stream = ();

        async fn accept(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from_raw_os_error(24)) // EMFILE
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_accepts_do_not_spin() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(accept_loop(Failing(calls.clone()), shutdown, |()| async {}));
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        let calls = calls.load(Ordering::SeqCst);
        assert!((1..=10).contains(&calls), "{calls} accept calls in 500 ms");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (s, r) = (started.clone(), release.clone());
        let task = tokio::spawn(accept_loop(listener, shutdown, move |_stream| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                r.notified().await;
            }
        }));
        let mut clients = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(started.load(Ordering::SeqCst), MAX_CONNECTIONS);
        release.notify_one();
        tokio::time::timeout(Duration::from_secs(5), async {
            while started.load(Ordering::SeqCst) < MAX_CONNECTIONS + 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(started.load(Ordering::SeqCst), MAX_CONNECTIONS + 1);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    }
}
