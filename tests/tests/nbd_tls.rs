//! NBD over TCP with TLS (`node.nbd_tls`), and SIGHUP reloads.
//!
//! - qemu-io (qemu's NBD client, gnutls) reads and writes real bytes over
//!   NBD-TLS with a client certificate from the CA;
//! - a plaintext client (qemu-io and nbdinfo), a client certificate from
//!   another CA, and a name outside `nbd_tls_clients` are refused, each with
//!   a clear error; SIGHUP applies a new `nbd_tls_clients` even when the
//!   certificate cannot be reloaded;
//! - `config check` and `run` refuse a non-loopback `nbd_listen` with
//!   `nbd_tls = "off"`;
//! - SIGHUP after replacing the node's certificate and key: new NBD-TLS
//!   connections see the new certificate (read back over STARTTLS) and the
//!   peer's new QUIC connection logs its serial; a broken certificate is
//!   refused and the old one kept; `node.log` changes the log level; the
//!   certificate expiry metric follows the reload.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator_tests::{free_tcp_port, require, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const MIB: u64 = 1 << 20;
const VOL: &str = "tls-vol";

/// Site-a with NBD-TLS on a loopback port (site-b not started unless
/// asked), and a client certificate "app-1" from the cluster's CA laid out
/// for qemu and libnbd (`ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`).
fn cluster(extra: &str) -> (Cluster, u16, PathBuf) {
    cluster_with(extra, false)
}

/// [`cluster`], with `/metrics` served when `metrics`.
fn cluster_with(extra: &str, metrics: bool) -> (Cluster, u16, PathBuf) {
    let mut opts = ClusterOpts::group(GroupSpec::new("tls", Mode::Sync).volume(VOL, 16 * MIB));
    if metrics {
        opts = opts.with_metrics();
    }
    opts.start = false;
    let mut c = Cluster::new(opts);
    let port = free_tcp_port();
    c.add_node_keys(Site::A, &format!("nbd_listen = \"127.0.0.1:{port}\"\nnbd_tls = \"require\"\n{extra}"));
    let dir = client_dir(&c, &c.ca_dir(), "app-1", "client-app-1");
    c.start(Site::A);
    (c, port, dir)
}

/// Issues `name` from the CA in `ca_dir` and lays it out in `root/out` with
/// the cluster's CA as `ca-cert.pem`.
fn client_dir(c: &Cluster, ca_dir: &Path, name: &str, out: &str) -> PathBuf {
    let dir = c.root().join(out);
    replicator::certs::issue(ca_dir, name, &dir, replicator::certs::Validity::days(2)).expect("issue client");
    std::fs::rename(dir.join(format!("{name}.pem")), dir.join("client-cert.pem")).expect("rename cert");
    std::fs::rename(dir.join(format!("{name}.key")), dir.join("client-key.pem")).expect("rename key");
    std::fs::copy(c.ca_dir().join("ca.pem"), dir.join("ca-cert.pem")).expect("copy CA");
    dir
}

/// qemu-io over NBD-TLS (`tls: None`: plaintext).
fn qemu_io(port: u16, tls: Option<&Path>, command: &str) -> (bool, String) {
    let qemu_io = require("qemu-io");
    let mut cmd = Command::new(qemu_io);
    let mut opts = format!("driver=nbd,host=127.0.0.1,port={port},export={VOL}");
    if let Some(dir) = tls {
        cmd.arg("--object").arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()));
        // The node certificate names the node, not 127.0.0.1.
        opts.push_str(",tls-creds=tls0,tls-hostname=site-a");
    }
    cmd.arg("--image-opts").arg(opts).arg("-c").arg(command);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn nbdinfo(uri: &str) -> (bool, String) {
    let out = run_with_timeout(Command::new(require("nbdinfo")).arg(uri), Duration::from_secs(60));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn wait_log(c: &Cluster, site: Site, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = c.log(site).lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{site}: no log line with {needle:?} within {timeout:?}\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qemu_reads_and_writes_over_nbd_tls_with_a_client_certificate_from_the_ca() {
    let (c, port, dir) = cluster("");
    let (ok, out) = qemu_io(port, Some(&dir), "write -P 0x5a 65536 131072");
    assert!(ok, "qemu-io write over TLS failed:\n{out}\n{}", c.diagnostics());
    let (ok, out) = qemu_io(port, Some(&dir), "read -P 0x5a 65536 131072");
    assert!(ok && !out.contains("Pattern verification failed"), "qemu-io read over TLS:\n{out}");
    // The bytes are on the volume.
    let mut file = std::fs::File::open(c.volume_path(Site::A, VOL)).expect("volume");
    let mut data = vec![0; 196_608];
    file.read_exact(&mut data).expect("read volume");
    assert!(data[..65536].iter().all(|&b| b == 0) && data[65536..].iter().all(|&b| b == 0x5a));
    // (nbdinfo is not used here: libnbd 1.14 checks the server certificate
    // against the URI's host, 127.0.0.1, while node certificates name the
    // node, and its URIs have no tls-hostname.)
}

#[test]
fn plaintext_clients_and_certificates_from_another_ca_are_refused() {
    let (c, port, _dir) = cluster("");
    let (ok, out) = qemu_io(port, None, "read 0 4096");
    assert!(!ok, "qemu-io without TLS was served:\n{out}");
    assert!(out.contains("TLS"), "qemu-io without TLS: no word about TLS:\n{out}");
    let (ok, out) = nbdinfo(&format!("nbd://127.0.0.1:{port}/{VOL}"));
    assert!(!ok && out.contains("TLS"), "nbdinfo without TLS:\n{out}");

    // A client certificate issued by another CA. qemu checks its own
    // certificate against its CA file before connecting, so that file holds
    // both CAs: qemu trusts the server, and only the server can refuse.
    let other = c.root().join("other-ca");
    replicator::certs::init_ca(&other).expect("other CA");
    let foreign = client_dir(&c, &other, "app-1", "client-foreign");
    let both = [c.ca_dir().join("ca.pem"), other.join("ca.pem")]
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("CA"))
        .collect::<String>();
    std::fs::write(foreign.join("ca-cert.pem"), both).expect("CA file");
    let (ok, out) = qemu_io(port, Some(&foreign), "read 0 4096");
    assert!(!ok, "qemu-io with a certificate from another CA was served:\n{out}");
    let line = wait_log(&c, Site::A, "TLS handshake failed", Duration::from_secs(10));
    assert!(line.contains("WARN") && line.contains("tls.ca"), "{line}");
    assert!(line.contains("BadSignature") || line.contains("UnknownIssuer"), "{line}");
    eprintln!("qemu-io with a foreign client certificate:\n{out}\nsite-a: {line}");
}

#[test]
fn nbd_tls_clients_accepts_only_the_listed_names() {
    let (c, port, app1) = cluster("nbd_tls_clients = [\"app-2\"]");
    let (ok, out) = qemu_io(port, Some(&app1), "read 0 4096");
    assert!(!ok, "app-1 (not listed) was served:\n{out}");
    let line = wait_log(&c, Site::A, "not one of node.nbd_tls_clients", Duration::from_secs(10));
    assert!(line.contains("app-1"), "{line}");
    let app2 = client_dir(&c, &c.ca_dir(), "app-2", "client-app-2");
    let (ok, out) = qemu_io(port, Some(&app2), "read 0 4096");
    assert!(ok, "app-2 (listed) was refused:\n{out}\n{}", c.diagnostics());

    // SIGHUP applies a new list even when the certificate cannot be
    // reloaded (the node's certificate file is broken meanwhile).
    let config = std::fs::read_to_string(c.config_path(Site::A)).expect("config");
    let listed = config.replace("nbd_tls_clients = [\"app-2\"]", "nbd_tls_clients = [\"app-1\"]");
    assert_ne!(listed, config);
    std::fs::write(c.config_path(Site::A), listed).expect("config");
    std::fs::write(c.certs_dir().join("site-a.pem"), b"not a certificate\n").expect("break the certificate");
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let line = wait_log(&c, Site::A, "SIGHUP: reloaded", Duration::from_secs(10));
    assert!(line.contains("nbd_tls_clients Some([\"app-1\"])") && line.contains("Kept the previous TLS"), "{line}");
    let (ok, out) = qemu_io(port, Some(&app1), "read 0 4096");
    assert!(ok, "app-1 (listed now) was refused:\n{out}\n{}", c.diagnostics());
    let (ok, out) = qemu_io(port, Some(&app2), "read 0 4096");
    assert!(!ok, "app-2 (no longer listed) was served:\n{out}");

    // Turning NBD-TLS off takes a restart: until then the list last
    // reloaded stays in force. (The reload put the list of the start back,
    // and app-2, revoked above, was served again.)
    let reloads = c.log(Site::A).matches("SIGHUP: reloaded").count();
    let off = std::fs::read_to_string(c.config_path(Site::A))
        .expect("config")
        .replace("nbd_tls = \"require\"", "nbd_tls = \"off\"")
        .replace("nbd_tls_clients = [\"app-1\"]", "");
    std::fs::write(c.config_path(Site::A), off).expect("config");
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.log(Site::A).matches("SIGHUP: reloaded").count() == reloads {
        assert!(Instant::now() < deadline, "no second reload\n{}", c.diagnostics());
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = c.log(Site::A).lines().rfind(|l| l.contains("SIGHUP: reloaded")).unwrap_or_default().to_string();
    assert!(line.contains("node.nbd_tls"), "the change of nbd_tls waits for a restart: {line}");
    let (ok, out) = qemu_io(port, Some(&app2), "read 0 4096");
    assert!(!ok, "app-2, revoked, was served again after a reload that turns NBD-TLS off:\n{out}");
    let (ok, out) = qemu_io(port, Some(&app1), "read 0 4096");
    assert!(ok, "app-1 (listed) was refused:\n{out}\n{}", c.diagnostics());
}

#[test]
fn config_check_and_run_refuse_a_non_loopback_nbd_listen_without_tls() {
    let mut opts = ClusterOpts::group(GroupSpec::new("tls", Mode::Sync).volume(VOL, 16 * MIB));
    opts.start = false;
    let c = Cluster::new(opts);
    let port = free_tcp_port();
    c.add_node_keys(Site::A, &format!("nbd_listen = \"0.0.0.0:{port}\"\nnbd_tls = \"off\""));
    for args in [&["config", "check"][..], &["run"][..]] {
        let out = c.cli(Site::A, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("node.nbd_tls") && err.contains("not a loopback address"), "{args:?}: {err}");
    }
    // Without nbd_tls, a non-loopback address gets TLS and passes.
    let text = std::fs::read_to_string(c.config_path(Site::A)).expect("config");
    std::fs::write(c.config_path(Site::A), text.replace("nbd_tls = \"off\"\n", "")).expect("config");
    let out = c.cli(Site::A, &["config", "check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The end-entity certificate the NBD-TLS endpoint serves, read over
/// STARTTLS with the client certificate in `dir`.
fn served_certificate(port: u16, dir: &Path) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.expect("greeting");
        let mut out = 3u32.to_be_bytes().to_vec();
        out.extend(0x4948_4156_454f_5054u64.to_be_bytes());
        out.extend(5u32.to_be_bytes()); // NBD_OPT_STARTTLS
        out.extend(0u32.to_be_bytes());
        s.write_all(&out).await.expect("STARTTLS");
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).await.expect("STARTTLS reply");
        assert_eq!(u32::from_be_bytes(reply[12..16].try_into().expect("4")), 1, "STARTTLS not acknowledged");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(dir.join("ca-cert.pem")).expect("CA")).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(dir.join("client-cert.pem")).expect("cert")],
                PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).expect("key"),
            )
            .expect("client auth");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("site-a").expect("name"), s)
            .await
            .expect("TLS handshake");
        tls.get_ref().1.peer_certificates().expect("server certificate")[0].to_vec()
    })
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).expect("PEM certificate").to_vec()
}

fn serial_of(path: &Path) -> String {
    let der = CertificateDer::from_pem_file(path).expect("PEM certificate");
    let described = replicator::tls::describe_certificate(Some(&der));
    described.split(',').next().expect("serial").trim_start_matches("serial ").to_string()
}

/// `replicator_certificate_expiry_timestamp_seconds{certificate="node"}`
/// on site-a.
fn node_certificate_expiry(c: &Cluster) -> f64 {
    let (code, _, body) = c.scrape(Site::A, "/metrics").expect("scrape");
    assert_eq!(code, 200, "{body}");
    let e = replicator_tests::exposition::parse(&body).expect("exposition");
    e.value("replicator_certificate_expiry_timestamp_seconds", &[("certificate", "node")]).expect("expiry")
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_the_log_level() {
    let (mut c, port, dir) = cluster_with("", true);
    let expiry_before = node_certificate_expiry(&c);
    let certs = c.certs_dir();
    let old = pem_der(&certs.join("site-a.pem"));
    assert_eq!(served_certificate(port, &dir), old);
    c.start(Site::B);
    c.pair_create("tls");
    c.wait_pair("tls", Duration::from_secs(60));

    // Renew site-a's certificate and key in place, as an admin would.
    let renewed = c.root().join("renewed");
    replicator::certs::issue(&c.ca_dir(), "site-a", &renewed, replicator::certs::Validity::days(3)).expect("renew");
    std::fs::rename(renewed.join("site-a.key"), certs.join("site-a.key")).expect("replace key");
    std::fs::rename(renewed.join("site-a.pem"), certs.join("site-a.pem")).expect("replace cert");
    let new = pem_der(&certs.join("site-a.pem"));
    assert_ne!(new, old);
    // Not before SIGHUP.
    assert_eq!(served_certificate(port, &dir), old);
    c.add_node_keys(Site::A, "log = \"debug\"");
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let line = wait_log(&c, Site::A, "SIGHUP: reloaded", Duration::from_secs(10));
    let serial = serial_of(&certs.join("site-a.pem"));
    assert!(line.contains(&serial) && line.contains("QUIC and NBD-TLS"), "{line}");
    assert!(line.contains("log filter (node.log \"debug"), "{line}");
    assert_eq!(served_certificate(port, &dir), new, "a new NBD-TLS connection still sees the old certificate");
    // The metric follows: the renewed certificate is valid a day longer.
    let expiry_after = node_certificate_expiry(&c);
    assert!(
        (expiry_after - expiry_before - 86400.0).abs() < 600.0,
        "certificate expiry metric {expiry_before} -> {expiry_after} after the reload"
    );
    // The debug level applies: NBD connections log their start at debug.
    let (ok, out) = qemu_io(port, Some(&dir), "read 0 4096");
    assert!(ok, "{out}");
    wait_log(&c, Site::A, "NBD transmission started", Duration::from_secs(10));
    assert!(c.is_running(Site::A), "SIGHUP stopped the daemon");

    // A new QUIC connection presents the new certificate: restart site-b,
    // whose connection logs the certificate site-a presents.
    c.stop(Site::B);
    let before = c.log(Site::B).matches(&serial).count();
    c.start(Site::B);
    c.wait_pair("tls", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.log(Site::B).matches(&serial).count() == before {
        assert!(Instant::now() < deadline, "site-b never logged site-a's new serial {serial}\n{}", c.diagnostics());
        std::thread::sleep(Duration::from_millis(100));
    }

    // A broken certificate file: kept the previous one, said why.
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(certs.join("site-a.pem")).expect("open");
    f.write_all(b"not a certificate\n").expect("write");
    drop(f);
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let line = wait_log(&c, Site::A, "Kept the previous TLS certificate", Duration::from_secs(10));
    assert!(line.contains("site-a.pem"), "{line}");
    assert_eq!(served_certificate(port, &dir), new, "a failed reload changed the served certificate");
    assert_eq!(node_certificate_expiry(&c), expiry_after, "a failed reload changed the expiry metric");
    assert!(c.is_running(Site::A));
}
