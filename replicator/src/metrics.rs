//! Optional Prometheus endpoint (`node.metrics_listen`): a minimal HTTP/1.1
//! responder for `GET /metrics` with the same figures as `status`.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::node::Node;

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

/// Serves `/metrics` until shutdown.
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: watch::Receiver<bool>) {
    accept_loop(listener, shutdown, move |stream| respond(stream, node.clone())).await;
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
async fn respond(mut stream: TcpStream, node: Arc<Node>) {
    let mut buf = [0u8; MAX_REQUEST];
    let n = match tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf)).await {
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
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(resp.as_bytes())).await;
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
