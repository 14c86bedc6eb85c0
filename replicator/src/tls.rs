//! Mutual TLS for the QUIC transport (rustls + ring).
//!
//! Both sides present certificates from the configured CA. The listener
//! requires a client certificate that chains to the CA; after the handshake
//! each side checks that the other's certificate names the configured peer
//! ([`peer_name`]). There is no plaintext mode.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::TlsPaths;
use replicator_protocol::wire::ALPN;

/// TLS set-up and peer identity errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The private key file is readable (or writable) by others than its
    /// owner.
    #[error("{path}: private key file has mode {mode:04o}, open to its group or others; refusing to use it. Restrict it with `chmod 600 {path}` (and make it owned by the daemon's user)")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// This node's own certificate does not carry its node name.
    #[error("{path}: this certificate is not issued for node {name:?} (node.name); issue one with `replicator cert issue --name {name}`")]
    WrongOwnName {
        /// The certificate file.
        path: PathBuf,
        /// node.name.
        name: String,
    },
    /// The private key is not the key of the certificate.
    #[error("{key}: this private key (tls.key) does not belong to the certificate {cert} (tls.cert); use the .key file written together with that certificate by `replicator cert issue`, or fix tls.key / tls.cert")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// This node's certificate does not verify under the configured CA
    /// (issued by another CA, expired, not yet valid...): peers refuse it.
    #[error("{cert}: this certificate (tls.cert) {reason} the CA in {ca} (tls.ca); peers will refuse this node. Issue one from that CA with `replicator cert issue --ca-dir {} --name {name}`, or fix tls.ca / tls.cert", ca.parent().map_or_else(|| ".".to_string(), |d| d.display().to_string()))]
    NotFromCa {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// node.name.
        name: String,
        /// e.g. "is not issued by", "has expired (it is valid only until ...) under".
        reason: String,
        /// Only the time is wrong: it expired or is not valid yet (by this
        /// host's clock, which may not be synced yet at boot).
        clock: bool,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate is valid but names none of the expected peers.
    #[error("the peer's certificate names {presented:?}, which is not a configured peer (expected {expected:?})")]
    UnexpectedPeer {
        /// Names in the certificate.
        presented: Vec<String>,
        /// Configured peer names.
        expected: Vec<String>,
    },
    /// The peer's certificate names several configured peers.
    #[error("the peer's certificate names several configured peers ({named:?}): one node's certificate names that node alone")]
    AmbiguousPeer {
        /// The configured peers it names.
        named: Vec<String>,
    },
}

/// Loaded CA, certificate chain and key.
#[derive(Debug)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn pem_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.to_path_buf(), message: message.to_string() }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "contains no PEM certificate"));
    }
    Ok(certs)
}

/// The end of validity (notAfter) of the first certificate in the PEM file
/// `path`, in seconds since the Unix epoch (exported as a metric).
pub fn not_after_unix(path: &Path) -> Result<i64, TlsError> {
    let certs = load_certs(path)?;
    let first = certs.first().ok_or_else(|| pem_err(path, "contains no PEM certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| pem_err(path, e))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Refuses a private key file that its group or others may read: mode
/// `& 0o077` must be 0 (of the file a symbolic link points to).
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(path).map_err(|e| pem_err(path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Loads the files named in `[tls]` and checks that the certificate is
    /// issued for `node_name`.
    pub fn load(paths: &TlsPaths, node_name: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in load_certs(&paths.ca)? {
            roots.add(ca).map_err(|e| pem_err(&paths.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let chain = load_certs(&paths.cert)?;
        check_key_mode(&paths.key)?;
        let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| pem_err(&paths.key, e))?;
        if certificate_names(&chain[0], &[node_name.to_string()]).is_err() {
            return Err(TlsError::WrongOwnName { path: paths.cert.clone(), name: node_name.to_string() });
        }
        // rustls compares the key's public half with the certificate's.
        match rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(TlsError::KeyMismatch { key: paths.key.clone(), cert: paths.cert.clone() })
            }
            Err(e) => return Err(pem_err(&paths.key, format!("not a usable private key: {e}"))),
        }
        Ok(Self { roots: Arc::new(roots), chain, key })
    }

    /// Checks that this node's certificate verifies under the configured CA
    /// now, as a peer will check it: both as a server (when the peer dials
    /// us) and as a client (when we dial the peer). `config check` fails on
    /// it; `run` logs it (peers refuse the node, but it still serves its
    /// volumes locally).
    pub fn verify_own_chain(&self, paths: &TlsPaths, node_name: &str) -> Result<(), TlsError> {
        use rustls::client::danger::ServerCertVerifier;
        let now = rustls::pki_types::UnixTime::now();
        let (end_entity, intermediates) = match self.chain.split_first() {
            Some(split) => split,
            None => return Err(pem_err(&paths.cert, "contains no PEM certificate")),
        };
        let server_name = ServerName::try_from(node_name.to_string())
            .map_err(|_| TlsError::WrongOwnName { path: paths.cert.clone(), name: node_name.to_string() })?;
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let client = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let result = server
            .verify_server_cert(end_entity, intermediates, &server_name, &[], now)
            .map(|_| ())
            .and_then(|()| client.verify_client_cert(end_entity, intermediates, now).map(|_| ()));
        let Err(e) = result else {
            return Ok(());
        };
        use rustls::CertificateError as C;
        let clock = matches!(
            &e,
            rustls::Error::InvalidCertificate(
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. }
            )
        );
        let reason = match &e {
            rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "is not issued by".to_string(),
            rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                format!("has expired ({e}) and is no longer valid under")
            }
            rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                format!("is not valid yet ({e}) under")
            }
            _ => format!("does not verify ({e}) under"),
        };
        Err(TlsError::NotFromCa {
            cert: paths.cert.clone(),
            ca: paths.ca.clone(),
            name: node_name.to_string(),
            reason,
            clock,
        })
    }

    /// QUIC server configuration for a node with `groups` groups: client
    /// certificates required; a client may have at most
    /// `max_peer_streams(groups)` streams open to us at once.
    pub fn server_config(&self, groups: usize) -> Result<quinn::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(crypto).map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport_config(groups, true));
        Ok(config)
    }

    /// NBD-TLS server configuration: this node's certificate; a client
    /// certificate that chains to the CA is required. TLS 1.2 or 1.3 (the
    /// NBD protocol requires servers to support 1.2; qemu and libnbd speak
    /// both); no ALPN.
    pub fn nbd_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// This node's certificate for logs: serial number and expiry.
    pub fn describe(&self) -> String {
        describe_certificate(self.chain.first())
    }

    /// QUIC client configuration for a node with `groups` groups: server
    /// verified against the CA, our certificate presented; the server may
    /// open no stream to us.
    pub fn client_config(&self, groups: usize) -> Result<quinn::ClientConfig, TlsError> {
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport_config(groups, false));
        Ok(config)
    }
}

/// Largest UDP payload of a 9000-byte MTU under IPv6 (40) and UDP (8)
/// headers.
pub(crate) const JUMBO_UDP_PAYLOAD: u16 = 9000 - 48;

/// Data a peer may have sent on one connection that we have not read yet
/// (the QUIC connection receive window, for up to
/// `RECEIVE_WINDOW / MIN_STREAM_WINDOW - 1` groups; see
/// [`receive_windows`]).
pub const RECEIVE_WINDOW: u32 = 512 << 20;

/// The smallest receive window of one stream (see [`receive_windows`]):
/// 80 MB/s per group over a 100-ms round trip.
const MIN_STREAM_WINDOW: u32 = 8 << 20;

/// The receive windows of a connection to a node with `groups` groups:
/// (one stream's, the connection's). A secondary stops reading a group's
/// stream while that group cannot take more records (its applies behind its
/// link, its restore journal full, a drain), and the stream then holds up to
/// its window of the connection's. So every group's stream may fill its
/// window with credit left for one more: groups that stall hold only their
/// own shares and never the credit another group's records need (with a
/// stream window of half the connection's, two stalled groups stopped
/// every other one on the connection, sync groups included). One group
/// keeps half the connection window (a long fat link's copy needs it);
/// past [`RECEIVE_WINDOW`]'s share of groups the connection window grows
/// instead, by [`MIN_STREAM_WINDOW`] per group.
pub fn receive_windows(groups: usize) -> (u32, u64) {
    let shares = u32::try_from(groups.max(1)).unwrap_or(u32::MAX).saturating_add(1);
    let stream = (RECEIVE_WINDOW / shares).max(MIN_STREAM_WINDOW);
    (stream, u64::from(RECEIVE_WINDOW).max(u64::from(stream) * u64::from(shares)))
}

/// Packets carrying data a peer may take in before it acknowledges them
/// (QUIC's acknowledgement frequency extension; QUIC's default is 1, an
/// acknowledgement every second packet), and the longest it may wait to.
/// Records are acknowledged by the session itself (a sync write's receipt
/// at once, async receipts coalesced), so QUIC's own acknowledgements only
/// free its send buffers and feed loss detection and congestion control:
/// one per five packets does that, and saves each daemon more than half of
/// those datagrams to send, receive, encrypt and decrypt (at async QD1 the
/// secondary sent 0.51 datagrams per write, now 0.22). One per ten saved a
/// little more but held the sender to its congestion window longer on a
/// metro link (RTT 5 ms, 200 Mbit/s: async lag p99 21-36 ms against 18-25).
/// Packets out of order are acknowledged at once from a gap of two (the
/// reordering threshold's default, the loss threshold minus one; any gap
/// without the extension): a single lost packet is then found by the time
/// threshold (9/8 of the RTT), a little later than before at most. A peer
/// that does not implement the extension acknowledges as before.
const ACK_ELICITING_THRESHOLD: u32 = 4;
const MAX_ACK_DELAY: Duration = Duration::from_millis(5);

/// Streams a peer may have open to us at once on one connection, for a
/// node with `groups` groups: one replication session per group, one per
/// `verify` run, and the Hello stream, with room to spare. A stream beyond
/// it waits in the peer until one of these closes.
fn max_peer_streams(groups: usize) -> u32 {
    u32::try_from(groups.saturating_mul(2).saturating_add(8)).unwrap_or(u32::MAX)
}

/// A peer connection that receives nothing for this long is closed (its
/// peer sends keep-alives every 500 ms); see also
/// `transport::watch_liveness`.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Keep-alives detect a dead peer within a few seconds; records are large, so
/// stream and connection windows allow a few hundred MiB in flight on long
/// fat links. What one peer connection can make us hold is bounded: the
/// receive window of unread data, plus at most one partial frame per open
/// stream (`max_peer_streams` of them) in the frame decoders, which hold at most
/// eight times the bytes that actually arrived (`wire::FrameDecoder`: a
/// large frame gets its whole buffer once a quarter of it is in, and that
/// buffer, an `AlignedBuf`, is rounded up to a power of two), each of
/// which decodes to at most about 16 MiB beyond its bytes
/// (`wire::MAX_FRAME_FIELDS`).
/// Unidirectional streams are not used and not allowed.
///
/// `accepting`: the peer may open streams to us (connections it dials);
/// on connections this node dials, only this node opens streams, and a
/// stream the peer opened would never be read while its data held the
/// connection's credit.
fn transport_config(groups: usize, accepting: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    let (stream_window, window) = receive_windows(groups);
    t.stream_receive_window(quinn::VarInt::from_u32(stream_window));
    t.receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
    t.send_window(window);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(if accepting { max_peer_streams(groups) } else { 0 }));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Storage links often carry jumbo frames: path MTU discovery probes up
    // to a 9000-byte MTU (IPv6 headers) and settles on what the path takes
    // (1500-byte paths simply lose the larger probes); each endpoint
    // advertises that it takes such datagrams (`Transport::bind`). A 4 KiB
    // record then travels in one packet instead of three, which cuts the
    // packets, acknowledgements and CPU per write. The socket limits how
    // many such packets go in one segmented send (`InspectingSocket`).
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(JUMBO_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    acks.max_ack_delay(Some(MAX_ACK_DELAY));
    t.ack_frequency_config(Some(acks));
    Arc::new(t)
}

/// "serial 0A:1B:..., valid until 2026-01-01 00:00:00 +00:00" (or why it
/// cannot be read).
pub fn describe_certificate(cert: Option<&CertificateDer<'_>>) -> String {
    let Some(cert) = cert else {
        return "no certificate".into();
    };
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, parsed)) => {
            format!("serial {}, valid until {}", parsed.raw_serial_as_string(), parsed.validity().not_after)
        }
        Err(e) => format!("unreadable certificate ({e})"),
    }
}

/// The first of `expected` that `cert` names, as a DNS name of its subject
/// alternative names, exactly (ASCII case aside; a wildcard names no one):
/// DESIGN.md accepts a peer only if its certificate name is the configured
/// name. A certificate naming none of them gives every DNS name it carries.
pub(crate) fn certificate_names(cert: &CertificateDer<'_>, expected: &[String]) -> Result<String, Vec<String>> {
    certificate_names_all(cert, expected).map(|mut named| named.remove(0))
}

/// Every one of `expected` that `cert` names exactly (see
/// [`certificate_names`]); `Err` with the certificate's DNS names when none.
fn certificate_names_all(cert: &CertificateDer<'_>, expected: &[String]) -> Result<Vec<String>, Vec<String>> {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return Err(Vec::new());
    };
    let names: Vec<String> = ee.valid_dns_names().map(str::to_string).collect();
    let named: Vec<String> =
        expected.iter().filter(|e| names.iter().any(|n| n.eq_ignore_ascii_case(e))).cloned().collect();
    if named.is_empty() {
        Err(names)
    } else {
        Ok(named)
    }
}

/// The serial number and expiry of the certificate the peer presented on
/// `conn` (see [`describe_certificate`]), for logs.
pub fn peer_certificate_summary(conn: &quinn::Connection) -> String {
    let certs = conn.peer_identity().and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
    describe_certificate(certs.as_deref().and_then(|c| c.first()))
}

/// The configured peer that the connection's certificate names, exactly
/// and alone: one naming several configured nodes would make the node it
/// speaks for a matter of order. The chain was already verified against
/// the CA during the handshake.
pub fn peer_name(conn: &quinn::Connection, expected: &[String]) -> Result<String, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TlsError::NoPeerCertificate)?;
    let first = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    match certificate_names_all(first, expected) {
        Ok(mut named) if named.len() == 1 => Ok(named.remove(0)),
        Ok(named) => Err(TlsError::AmbiguousPeer { named }),
        Err(presented) => Err(TlsError::UnexpectedPeer { presented, expected: expected.to_vec() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_naming(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.self_signed(&key).expect("sign").der().clone()
    }

    #[test]
    fn a_certificate_names_a_configured_node_exactly_and_alone() {
        let expected = ["site-b".to_string(), "site-c".to_string()];
        assert_eq!(certificate_names(&cert_naming(&["site-b"]), &expected), Ok("site-b".to_string()));
        assert_eq!(certificate_names(&cert_naming(&["SITE-B", "other"]), &expected), Ok("site-b".to_string()));
        // Naming two configured nodes: which one it speaks for is no one's
        // guess (`peer_name` refuses it).
        assert_eq!(
            certificate_names_all(&cert_naming(&["site-b", "site-c"]), &expected),
            Ok(vec!["site-b".to_string(), "site-c".to_string()])
        );
        // A wildcard names no one.
        let wildcard = ["b.storage.example".to_string()];
        assert_eq!(
            certificate_names(&cert_naming(&["*.storage.example"]), &wildcard),
            Err(vec!["*.storage.example".to_string()])
        );
        assert!(certificate_names(&cert_naming(&["site-d"]), &expected).is_err());
    }

    /// A client may open `max_peer_streams` streams; the next one waits until
    /// one of them closes.
    #[tokio::test]
    async fn a_peer_cannot_open_more_streams_than_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = TlsIdentity::load(&identity(dir.path()), "site-a").expect("load");
        let cap = max_peer_streams(1);
        assert_eq!(cap, 10);
        let server =
            quinn::Endpoint::server(tls.server_config(1).expect("server config"), "127.0.0.1:0".parse().expect("addr"))
                .expect("server endpoint");
        let addr = server.local_addr().expect("server addr");
        let accepting = tokio::spawn(async move {
            let conn = server.accept().await.expect("incoming").await.expect("handshake");
            let mut held = Vec::new();
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                let mut byte = [0u8; 1];
                recv.read_exact(&mut byte).await.expect("first byte");
                held.push((send, recv));
            }
            held.len()
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        client.set_default_client_config(tls.client_config(1).expect("client config"));
        let conn = client.connect(addr, "site-a").expect("connect").await.expect("handshake");
        let step = Duration::from_secs(10);
        let mut streams = Vec::new();
        for _ in 0..cap {
            let (mut send, recv) = tokio::time::timeout(step, conn.open_bi()).await.expect("in time").expect("open");
            send.write_all(&[1]).await.expect("write");
            streams.push((send, recv));
        }
        let extra = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
        assert!(extra.is_err(), "stream {} beyond the cap of {cap} was opened", cap + 1);
        conn.close(0u32.into(), b"done");
        let accepted = tokio::time::timeout(step, accepting).await.expect("server done").expect("server task");
        assert_eq!(accepted, cap as usize);
    }

    /// Two streams whose reader stopped (the sessions of two stalled
    /// groups on the secondary) hold only their own windows: a third
    /// stream on the same connection still gets its data through. With a
    /// stream window of half the connection's, the two took all its credit.
    #[tokio::test]
    async fn stalled_streams_leave_credit_for_the_others() {
        const GROUPS: usize = 2;
        let (stream_window, window) = receive_windows(GROUPS);
        assert!(u64::from(stream_window) * (GROUPS as u64 + 1) <= window);
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = TlsIdentity::load(&identity(dir.path()), "site-a").expect("load");
        let server = quinn::Endpoint::server(
            tls.server_config(GROUPS).expect("server config"),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .expect("server endpoint");
        let addr = server.local_addr().expect("server addr");
        let accepting = tokio::spawn(async move {
            let conn = server.accept().await.expect("incoming").await.expect("handshake");
            // The first two are never read.
            let mut stalled = Vec::new();
            for _ in 0..GROUPS {
                stalled.push(conn.accept_bi().await.expect("stream"));
            }
            let (_send, mut recv) = conn.accept_bi().await.expect("third stream");
            let data = recv.read_to_end(4 << 20).await.expect("the third stream's data");
            (data.len(), stalled.len())
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        client.set_default_client_config(tls.client_config(GROUPS).expect("client config"));
        let conn = client.connect(addr, "site-a").expect("connect").await.expect("handshake");
        let chunk = vec![7u8; 1 << 20];
        let mut stalled = Vec::new();
        for _ in 0..GROUPS {
            let (mut send, recv) = conn.open_bi().await.expect("open");
            // Until the peer's credit for it runs out (bounded: the window).
            let mut sent = 0u64;
            while sent <= window {
                match tokio::time::timeout(Duration::from_millis(500), send.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len() as u64,
                    Ok(Err(e)) => panic!("write: {e}"),
                    Err(_) => break,
                }
            }
            assert!(sent <= u64::from(stream_window), "{sent} bytes in a stream whose window is {stream_window}");
            stalled.push((send, recv));
        }
        let (mut send, _recv) = conn.open_bi().await.expect("open the third");
        let third = async {
            send.write_all(&chunk[..1 << 20]).await.expect("write the third");
            send.finish().expect("finish");
            accepting.await.expect("server task")
        };
        let (got, held) = tokio::time::timeout(Duration::from_secs(20), third)
            .await
            .expect("the third stream got no credit: the stalled ones hold the connection's");
        assert_eq!((got, held), (1 << 20, GROUPS));
    }

    #[test]
    fn stream_windows_fit_the_connection_window() {
        assert_eq!(receive_windows(1), (RECEIVE_WINDOW / 2, u64::from(RECEIVE_WINDOW)), "one group: as before");
        for groups in [0, 1, 2, 7, 32, 63, 64, 100, 1000] {
            let (stream, window) = receive_windows(groups);
            let shares = groups.max(1) as u64 + 1;
            assert!(u64::from(stream) * shares <= window, "{groups} groups: {stream} x {shares} > {window}");
            assert!(
                stream >= MIN_STREAM_WINDOW && window >= u64::from(RECEIVE_WINDOW),
                "{groups} groups: {stream}, {window}"
            );
        }
    }

    fn identity(dir: &Path) -> TlsPaths {
        let ca = dir.join("ca");
        crate::certs::init_ca(&ca).expect("init");
        let (cert, key) = crate::certs::issue(&ca, "site-a", dir, crate::certs::Validity::days(1)).expect("issue");
        TlsPaths { ca: ca.join("ca.pem"), cert, key }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = identity(dir.path());
        let other = dir.path().join("other");
        let (_, other_key) =
            crate::certs::issue(&dir.path().join("ca"), "site-a", &other, crate::certs::Validity::days(1))
                .expect("issue");
        let mixed = TlsPaths { key: other_key.clone(), ..paths.clone() };
        let err = TlsIdentity::load(&mixed, "site-a").expect_err("key of another certificate");
        let text = err.to_string();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{text}");
        assert!(text.contains(&other_key.display().to_string()) && text.contains("tls.key"), "{text}");
        assert!(text.contains(&paths.cert.display().to_string()) && text.contains("tls.cert"), "{text}");
    }

    #[test]
    fn own_certificate_must_verify_under_the_configured_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = identity(dir.path());
        let id = TlsIdentity::load(&paths, "site-a").expect("load");
        id.verify_own_chain(&paths, "site-a").expect("issued by the configured CA");

        // Issued by another CA.
        let foreign = dir.path().join("foreign");
        crate::certs::init_ca(&foreign).expect("init");
        let out = dir.path().join("foreign-issued");
        let (cert, key) =
            crate::certs::issue(&foreign, "site-a", &out, crate::certs::Validity::days(1)).expect("issue");
        let other = TlsPaths { cert: cert.clone(), key, ..paths.clone() };
        let id = TlsIdentity::load(&other, "site-a").expect("loads: the chain is checked separately");
        let err = id.verify_own_chain(&other, "site-a").expect_err("another CA");
        let text = err.to_string();
        assert!(matches!(err, TlsError::NotFromCa { .. }), "{text}");
        assert!(text.contains("is not issued by") && text.contains(&cert.display().to_string()), "{text}");
        assert!(text.contains(&paths.ca.display().to_string()) && text.contains("tls.ca"), "{text}");

        // Expired.
        let now = time::OffsetDateTime::now_utc();
        let past = crate::certs::Validity {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        };
        let out = dir.path().join("expired");
        let (cert, key) = crate::certs::issue(&dir.path().join("ca"), "site-a", &out, past).expect("issue");
        let expired = TlsPaths { cert, key, ..paths.clone() };
        let id = TlsIdentity::load(&expired, "site-a").expect("load");
        let text = id.verify_own_chain(&expired, "site-a").expect_err("expired").to_string();
        assert!(text.contains("expired"), "{text}");
    }

    #[test]
    fn a_key_others_may_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = identity(dir.path());
        TlsIdentity::load(&paths, "site-a").expect("a 0600 key loads");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = TlsIdentity::load(&paths, "site-a").expect_err("a key open to others must be refused");
            let text = err.to_string();
            assert!(matches!(err, TlsError::KeyPermissions { .. }), "{text}");
            assert!(text.contains(&paths.key.display().to_string()), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(text.contains(&format!("chmod 600 {}", paths.key.display())), "{text}");
        }
        std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        TlsIdentity::load(&paths, "site-a").expect("a 0400 key loads");
    }
}
