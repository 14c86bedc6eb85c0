//! FORCEDTLS: every path of the handshake state machine around
//! `NBD_OPT_STARTTLS`, driven by hand over a Unix socket with a rustls
//! client, and the certificate checks (other CA, none, allow-list, reload).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::super::proto::{
    IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_TLS_REQD, REP_INFO,
};
use super::super::{serve_shared_tls, Drain, NbdTls, ServeOptions, SharedLimits};
use super::{info_data, init_logs, step, MemCatalog, SIZE};
use crate::certs::{init_ca, issue, Validity};
use crate::config::TlsPaths;
use crate::tls::TlsIdentity;

/// A CA with a server certificate ("site-a") and client certificates.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(&dir.path().join("ca")).expect("init CA");
        init_ca(&dir.path().join("other-ca")).expect("init other CA");
        let pki = Self { dir };
        pki.issue("ca", "site-a", "server");
        pki
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// Issues `name` from `ca` ("ca" or "other-ca") into the directory `out`.
    fn issue(&self, ca: &str, name: &str, out: &str) {
        issue(&self.path(ca), name, &self.path(out), Validity::days(1)).expect("issue");
    }

    fn server_config(&self, out: &str) -> Arc<rustls::ServerConfig> {
        let paths = TlsPaths {
            ca: self.path("ca/ca.pem"),
            cert: self.path(&format!("{out}/site-a.pem")),
            key: self.path(&format!("{out}/site-a.key")),
        };
        TlsIdentity::load(&paths, "site-a").expect("load").nbd_server_config().expect("server config")
    }

    /// A client trusting "ca", presenting `out/name` (or nothing).
    fn client(&self, client: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client_config(client))
    }

    fn client_config(&self, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(self.path("ca/ca.pem")).expect("ca") {
            roots.add(ca.expect("ca pem")).expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((out, name)) => {
                let certs = CertificateDer::pem_file_iter(self.path(&format!("{out}/{name}.pem")))
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert pem");
                let key = PrivateKeyDer::from_pem_file(self.path(&format!("{out}/{name}.key"))).expect("key");
                builder.with_client_auth_cert(certs, key).expect("client auth")
            }
        };
        Arc::new(config)
    }
}

struct TlsServer {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    catalog: Arc<MemCatalog>,
    tls: Arc<NbdTls>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Drain>,
}

impl TlsServer {
    fn start(config: Arc<rustls::ServerConfig>, clients: Option<Vec<String>>, options: ServeOptions) -> Self {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let (shutdown, rx) = watch::channel(false);
        let catalog = MemCatalog::standard();
        let tls = NbdTls::new(config, clients);
        let limits = SharedLimits::new(&options);
        let task =
            tokio::spawn(serve_shared_tls(listener, Arc::clone(&catalog), rx, options, limits, Arc::clone(&tls)));
        Self { _dir: dir, sock, catalog, tls, shutdown, task }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        assert_eq!(step("server shutdown", self.task).await.expect("server task"), Drain::Complete);
    }

    /// Connected and greeted with fixed newstyle and no zeroes.
    async fn connect(&self) -> UnixStream {
        let mut s = step("connect", UnixStream::connect(&self.sock)).await.expect("connect");
        let mut greeting = [0u8; 18];
        step("greeting", s.read_exact(&mut greeting)).await.expect("greeting");
        assert_eq!(u64::from_be_bytes(greeting[..8].try_into().expect("8")), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(greeting[8..16].try_into().expect("8")), IHAVEOPT);
        step("client flags", s.write_all(&3u32.to_be_bytes())).await.expect("client flags");
        s
    }
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(IHAVEOPT.to_be_bytes());
    out.extend(option.to_be_bytes());
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(data);
    out
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    step("send", async {
        s.write_all(bytes).await?;
        s.flush().await
    })
    .await
    .expect("send");
}

/// (option, reply type, data)
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut head = [0u8; 20];
    step("option reply", s.read_exact(&mut head)).await.expect("option reply");
    assert_eq!(u64::from_be_bytes(head[..8].try_into().expect("8")), OPTION_REPLY_MAGIC);
    let option = u32::from_be_bytes(head[8..12].try_into().expect("4"));
    let kind = u32::from_be_bytes(head[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4")) as usize;
    let mut data = vec![0; len];
    step("option reply data", s.read_exact(&mut data)).await.expect("option reply data");
    (option, kind, data)
}

/// Reads until EOF (or an error): the server closed the connection.
async fn assert_closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut sink = Vec::new();
    let _ = step("server closes", s.read_to_end(&mut sink)).await;
}

async fn starttls(s: &mut UnixStream) {
    send(s, &option(OPT_STARTTLS, &[])).await;
    assert_eq!(reply(s).await, (OPT_STARTTLS, REP_ACK, Vec::new()));
}

async fn upgrade(
    mut s: UnixStream,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<UnixStream>> {
    starttls(&mut s).await;
    let name = ServerName::try_from("site-a").expect("name");
    step("TLS handshake", connector.connect(name, s)).await
}

/// GO on "vol", then a write and a read of real bytes through TLS.
async fn go_write_read<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, server: &TlsServer) {
    send(s, &option(OPT_GO, &info_data("vol", &[]))).await;
    loop {
        let (opt, kind, _) = reply(s).await;
        assert_eq!(opt, OPT_GO);
        if kind != REP_INFO {
            assert_eq!(kind, REP_ACK);
            break;
        }
    }
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let request = |kind: u16, cookie: u64, len: u32| {
        let mut out = Vec::new();
        out.extend(super::super::proto::REQUEST_MAGIC.to_be_bytes());
        out.extend(0u16.to_be_bytes());
        out.extend(kind.to_be_bytes());
        out.extend(cookie.to_be_bytes());
        out.extend(8192u64.to_be_bytes());
        out.extend(len.to_be_bytes());
        out
    };
    let mut write = request(super::super::proto::CMD_WRITE, 1, 4096);
    write.extend(&payload);
    send(s, &write).await;
    let mut head = [0u8; 16];
    step("write reply", s.read_exact(&mut head)).await.expect("write reply");
    assert_eq!(&head[4..8], &[0, 0, 0, 0], "write error");
    server.catalog.get("vol").assert_bytes(8192, &payload);
    send(s, &request(super::super::proto::CMD_READ, 2, 4096)).await;
    step("read reply", s.read_exact(&mut head)).await.expect("read reply");
    assert_eq!(&head[4..8], &[0, 0, 0, 0], "read error");
    let mut data = vec![0; 4096];
    step("read data", s.read_exact(&mut data)).await.expect("read data");
    assert_eq!(data, payload);
}

#[tokio::test]
async fn options_before_starttls_get_tls_reqd_then_everything_works_inside_tls() {
    let pki = Pki::new();
    pki.issue("ca", "app-1", "clients");
    let server = TlsServer::start(pki.server_config("server"), None, ServeOptions::default());
    let mut s = server.connect().await;
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info_data("vol", &[])),
        (OPT_GO, info_data("vol", &[])),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (99, Vec::new()),
    ] {
        send(&mut s, &option(opt, &data)).await;
        let (o, kind, message) = reply(&mut s).await;
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD), "option {opt}");
        assert!(String::from_utf8_lossy(&message).contains("NBD_OPT_STARTTLS"));
    }
    send(&mut s, &option(OPT_STARTTLS, b"x")).await;
    assert_eq!(reply(&mut s).await.1, REP_ERR_INVALID, "STARTTLS with data");
    let mut tls = upgrade(s, &pki.client(Some(("clients", "app-1")))).await.expect("TLS handshake");
    // Inside TLS: STARTTLS again is invalid; options are served.
    send(&mut tls, &option(OPT_STARTTLS, &[])).await;
    assert_eq!(reply(&mut tls).await.1, REP_ERR_INVALID, "STARTTLS twice");
    send(&mut tls, &option(OPT_LIST, &[])).await;
    assert_eq!(reply(&mut tls).await.0, OPT_LIST);
    // The served certificate is the server's.
    let served = tls.get_ref().1.peer_certificates().expect("server certificate")[0].clone();
    let expected = CertificateDer::from_pem_file(pki.path("server/site-a.pem")).expect("pem");
    assert_eq!(served, expected);
    drop(tls);
    let tls = upgrade(server.connect().await, &pki.client(Some(("clients", "app-1")))).await;
    go_write_read(&mut tls.expect("TLS handshake"), &server).await;
    server.stop().await;
}

#[tokio::test]
async fn abort_and_export_name_before_starttls_and_old_style_clients() {
    let pki = Pki::new();
    let server = TlsServer::start(pki.server_config("server"), None, ServeOptions::default());
    // ABORT is served (with its ACK) before TLS.
    let mut s = server.connect().await;
    send(&mut s, &option(OPT_ABORT, &[])).await;
    assert_eq!(reply(&mut s).await, (OPT_ABORT, REP_ACK, Vec::new()));
    assert_closed(&mut s).await;
    // EXPORT_NAME cannot carry an error: the connection is closed, nothing
    // about the export is sent.
    let mut s = server.connect().await;
    send(&mut s, &option(OPT_EXPORT_NAME, b"vol")).await;
    let mut rest = Vec::new();
    let _ = step("close", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "sent {} bytes after EXPORT_NAME without TLS", rest.len());
    // A client without fixed newstyle cannot STARTTLS: closed after the flags.
    let mut s = step("connect", UnixStream::connect(&server.sock)).await.expect("connect");
    let mut greeting = [0u8; 18];
    step("greeting", s.read_exact(&mut greeting)).await.expect("greeting");
    send(&mut s, &0u32.to_be_bytes()).await;
    let mut rest = Vec::new();
    let _ = step("close", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_refused() {
    let pki = Pki::new();
    pki.issue("ca", "app-1", "clients");
    let server = TlsServer::start(pki.server_config("server"), None, ServeOptions::default());
    // A valid ClientHello, sent together with STARTTLS instead of after its
    // reply: the server must not take bytes that arrived before its ACK
    // into the TLS session.
    let mut client = rustls::ClientConnection::new(
        pki.client_config(Some(("clients", "app-1"))),
        ServerName::try_from("site-a").expect("name"),
    )
    .expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    let mut s = server.connect().await;
    let mut both = option(OPT_STARTTLS, &[]);
    both.extend(&hello);
    send(&mut s, &both).await;
    // The ACK (20 bytes), then the connection closes: no ServerHello.
    let mut rest = Vec::new();
    let _ = step("close", s.read_to_end(&mut rest)).await;
    assert_eq!(rest.len(), 20, "the server went on with a ClientHello sent before its ACK: {rest:?}");
    // The same ClientHello after the ACK gets a ServerHello.
    let mut s = server.connect().await;
    starttls(&mut s).await;
    send(&mut s, &hello).await;
    let mut record = [0u8; 5];
    step("ServerHello", s.read_exact(&mut record)).await.expect("ServerHello");
    assert_eq!(record[0], 0x16, "a TLS handshake record");
    server.stop().await;
}

#[tokio::test]
async fn client_certificates_from_another_ca_or_none_are_refused() {
    let pki = Pki::new();
    pki.issue("other-ca", "app-1", "foreign");
    let server = TlsServer::start(pki.server_config("server"), None, ServeOptions::default());
    for client in [Some(("foreign", "app-1")), None] {
        // TLS 1.3: the client may finish its side before the server's
        // verdict; the refusal then shows on the first read.
        if let Ok(mut tls) = upgrade(server.connect().await, &pki.client(client)).await {
            send(&mut tls, &option(OPT_LIST, &[])).await;
            let mut buf = [0u8; 1];
            let read = step("refused", tls.read(&mut buf)).await;
            assert!(matches!(read, Ok(0) | Err(_)), "{client:?}: served after a refused certificate");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_allow_list_refuses_other_names_from_the_ca() {
    let pki = Pki::new();
    pki.issue("ca", "app-1", "clients");
    pki.issue("ca", "app-2", "clients");
    let server =
        TlsServer::start(pki.server_config("server"), Some(vec!["app-2".to_string()]), ServeOptions::default());
    let mut tls = upgrade(server.connect().await, &pki.client(Some(("clients", "app-1")))).await.expect("handshake");
    send(&mut tls, &option(OPT_LIST, &[])).await;
    let mut buf = [0u8; 1];
    assert!(matches!(step("refused", tls.read(&mut buf)).await, Ok(0) | Err(_)), "app-1 served");
    let tls = upgrade(server.connect().await, &pki.client(Some(("clients", "app-2")))).await;
    go_write_read(&mut tls.expect("app-2 handshake"), &server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_replaced_configuration_serves_the_new_certificate_to_new_connections() {
    let pki = Pki::new();
    pki.issue("ca", "site-a", "renewed");
    pki.issue("ca", "app-1", "clients");
    let server = TlsServer::start(pki.server_config("server"), None, ServeOptions::default());
    let connector = pki.client(Some(("clients", "app-1")));
    let held = upgrade(server.connect().await, &connector).await.expect("before");
    server.tls.replace_config(pki.server_config("renewed"));
    let tls = upgrade(server.connect().await, &connector).await.expect("after");
    let served = |t: &tokio_rustls::client::TlsStream<UnixStream>| {
        t.get_ref().1.peer_certificates().expect("certificate")[0].clone()
    };
    let pem = |p: &Path| CertificateDer::from_pem_file(p).expect("pem");
    assert_eq!(served(&held), pem(&pki.path("server/site-a.pem")));
    assert_eq!(served(&tls), pem(&pki.path("renewed/site-a.pem")));
    assert_ne!(served(&held), served(&tls));
    // The connection opened before the swap still works.
    let mut held = held;
    go_write_read(&mut held, &server).await;
    drop((held, tls));
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_the_handshake_timeout() {
    let pki = Pki::new();
    let options = ServeOptions { handshake_timeout: Duration::from_millis(500), ..ServeOptions::default() };
    let server = TlsServer::start(pki.server_config("server"), None, options);
    let mut s = server.connect().await;
    starttls(&mut s).await;
    // Half a ClientHello, then nothing.
    send(&mut s, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
    let started = Instant::now();
    assert_closed(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // Garbage instead of a ClientHello: closed at once.
    let mut s = server.connect().await;
    starttls(&mut s).await;
    send(&mut s, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_closed(&mut s).await;
    let _ = SIZE;
    server.stop().await;
}
