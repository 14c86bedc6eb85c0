//! `replicator cert init` / `cert issue`: a small private CA with rcgen, so a
//! new user never touches openssl.
//!
//! Node certificates carry the node name as a DNS subject alternative name
//! (and as the common name); the transport accepts a peer only if its
//! certificate chains to the configured CA and names the configured peer.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::durable::{put_file, Existing};

/// Errors of the certificate commands.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Refused to overwrite an existing key or certificate.
    #[error("{0} already exists; refusing to overwrite it (move it away first if you really mean to replace it)")]
    Exists(PathBuf),
    /// rcgen failed (bad PEM, bad name...).
    #[error("{context}: {source}")]
    Rcgen {
        /// What was being done.
        context: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The node name cannot be used.
    #[error("{0:?} is not a valid node name: use 1-63 characters from a-z, A-Z, 0-9, '-' and '_', starting with a letter or digit, not ending in '-' and not all digits (a DNS name)")]
    BadName(String),
}

fn rcgen_err(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let context = context.into();
    move |source| CertError::Rcgen { context, source }
}

/// Writes a new file whole (a crash leaves no truncated key or
/// certificate), never replacing one that exists.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    put_file(path, mode, Existing::Keep, |f| f.write_all(contents.as_bytes())).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            CertError::Io { path: path.to_path_buf(), source }
        }
    })
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })
}

/// Creates `dir/ca.pem` and `dir/ca.key` (0600), valid for 20 years.
pub fn init_ca(dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
    create_dir(dir)?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate().map_err(rcgen_err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "replicator CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365 * 20);
    let cert = params.self_signed(&key).map_err(rcgen_err("signing the CA certificate"))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Validity window of an issued node certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew between sites) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }
}

/// Issues `out/NAME.pem` and `out/NAME.key` for node `name`, signed by the CA
/// in `ca_dir` (ca.pem + ca.key). Usable as TLS server and client.
pub fn issue(ca_dir: &Path, name: &str, out: &Path, validity: Validity) -> Result<(PathBuf, PathBuf), CertError> {
    if !crate::config::is_valid_host_name(name) {
        return Err(CertError::BadName(name.to_string()));
    }
    let ca_key_path = ca_dir.join("ca.key");
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key =
        KeyPair::from_pem(&read(&ca_key_path)?).map_err(rcgen_err(format!("reading {}", ca_key_path.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, ca_key)
        .map_err(rcgen_err(format!("reading {}", ca_cert_path.display())))?;

    create_dir(out)?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate().map_err(rcgen_err("generating the node key"))?;
    let mut params = CertificateParams::new(vec![name.to_string()])
        .map_err(rcgen_err(format!("using {name:?} as a certificate name")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_err("signing the node certificate"))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_and_refuse_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init_ca(&ca).expect("init");
        assert!(matches!(init_ca(&ca), Err(CertError::Exists(_))));
        let (cert, key) = issue(&ca, "site-a", dir.path(), Validity::days(365)).expect("issue");
        assert!(read(&cert).expect("cert").contains("BEGIN CERTIFICATE"));
        assert!(read(&key).expect("key").contains("PRIVATE KEY"));
        assert!(matches!(issue(&ca, "site-a", dir.path(), Validity::days(1)), Err(CertError::Exists(_))));
        for bad in ["bad/name", "123", "a-"] {
            assert!(matches!(issue(&ca, bad, dir.path(), Validity::days(1)), Err(CertError::BadName(_))), "{bad}");
        }
    }
}
