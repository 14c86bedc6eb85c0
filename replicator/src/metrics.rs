//! Optional Prometheus endpoint (`node.metrics_listen`): a minimal HTTP/1.1
//! responder for `GET /metrics` with the same figures as `status`.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::node::Node;

/// Serves `/metrics` until shutdown.
pub async fn serve(listener: TcpListener, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let node = node.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let (status, body) = if req.starts_with("GET /metrics") || req.starts_with("GET / ") {
                        ("200 OK", render(&node))
                    } else {
                        ("404 Not Found", "try /metrics\n".to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Renders every metric in the Prometheus text format.
pub fn render(node: &Node) -> String {
    let mut out = String::new();
    let gauges: [(&str, &str); 10] = [
        ("replicator_connected", "1 if a replication session with the peer is up"),
        ("replicator_lag_records", "records not yet applied on the secondary"),
        ("replicator_lag_bytes", "journal bytes not yet applied on the secondary"),
        ("replicator_lag_seconds", "age of the oldest record not yet applied on the secondary"),
        ("replicator_journal_used_bytes", "journal bytes in use"),
        ("replicator_journal_capacity_bytes", "journal ring size"),
        ("replicator_dirty_bytes", "bytes tracked in the dirty bitmap"),
        ("replicator_last_seq", "newest sequence number"),
        ("replicator_state", "pair state (label), value 1"),
        ("replicator_rpo_zero", "sync-mode primary: 1 while RPO 0 is in force, 0 when writes are acknowledged without a consistent secondary"),
    ];
    for (name, help) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for g in &node.groups {
            let s = g.status();
            let labels = format!("group=\"{}\",role=\"{}\"", s.group, s.role);
            let value = match name {
                "replicator_connected" => f64::from(u8::from(s.connected)),
                "replicator_lag_records" => s.lag_records as f64,
                "replicator_lag_bytes" => s.lag_bytes as f64,
                "replicator_lag_seconds" => s.lag_seconds,
                "replicator_journal_used_bytes" => s.journal_used_bytes as f64,
                "replicator_journal_capacity_bytes" => s.journal_capacity_bytes as f64,
                "replicator_dirty_bytes" => s.dirty_bytes as f64,
                "replicator_last_seq" => s.last_seq as f64,
                "replicator_rpo_zero" => match s.rpo_zero {
                    Some(on) => f64::from(u8::from(on)),
                    None => continue,
                },
                _ => {
                    let _ = writeln!(out, "{name}{{{labels},state=\"{}\"}} 1", s.state);
                    continue;
                }
            };
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
    let name = "replicator_write_latency_seconds";
    let _ = writeln!(out, "# HELP {name} client write latency (sync: includes the secondary)\n# TYPE {name} histogram");
    for g in &node.groups {
        g.latency().render(&mut out, name, &format!("group=\"{}\"", g.cfg.name));
    }
    out
}
