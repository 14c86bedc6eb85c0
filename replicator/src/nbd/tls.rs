//! NBD over TLS: the upgrade after `NBD_OPT_STARTTLS` (tokio-rustls), with
//! a client certificate required, and the server configuration that
//! `SIGHUP` can replace while connections run.
//!
//! The connection's two halves (whatever the listener yields) are joined
//! into one stream for the TLS session ([`Joined`]), which is then split
//! again for the transmission phase; the handshake and transmission code
//! stay generic over the stream type.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::server::CloseReason;

/// What a TLS listener uses for its next handshakes: the rustls server
/// configuration (this node's certificate and key; client certificates
/// verified against the CA) and the names a client certificate may carry.
/// [`NbdTls::replace_config`] and [`NbdTls::replace_clients`] swap them for
/// new connections; established ones keep their session.
#[derive(Debug)]
pub struct NbdTls {
    current: RwLock<Arc<Settings>>,
}

#[derive(Debug)]
struct Settings {
    config: Arc<rustls::ServerConfig>,
    clients: Option<Vec<String>>,
}

impl NbdTls {
    /// TLS with `config`, which must require a client certificate (see
    /// [`crate::tls::TlsIdentity::nbd_server_config`]). `clients`: the
    /// names a client certificate must carry one of (`None`: any
    /// certificate the configuration's verifier accepts).
    pub fn new(config: Arc<rustls::ServerConfig>, clients: Option<Vec<String>>) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(Arc::new(Settings { config, clients })) })
    }

    /// Replaces the rustls configuration for connections that upgrade from
    /// now on.
    pub fn replace_config(&self, config: Arc<rustls::ServerConfig>) {
        let mut current = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(Settings { config, clients: current.clients.clone() });
    }

    /// Replaces the names a client certificate must carry one of, for
    /// connections that upgrade from now on.
    pub fn replace_clients(&self, clients: Option<Vec<String>>) {
        let mut current = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(Settings { config: Arc::clone(&current.config), clients });
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// One stream out of a read half and a write half.
#[derive(Debug)]
pub(super) struct Joined<R, W> {
    read: R,
    write: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<R, W> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<R, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.write.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

/// The TLS session of an upgraded connection.
pub(super) type Upgraded<R, W> = TlsStream<Joined<R, W>>;

/// Runs the server side of the TLS handshake right after the
/// `NBD_REP_ACK` to `NBD_OPT_STARTTLS`. Returns the session and the name
/// the client certificate carries (for logs).
///
/// Bytes the client sent after `NBD_OPT_STARTTLS` without waiting for the
/// reply are refused: they arrived in plaintext and must never be taken as
/// part of the protected session (the STARTTLS command injection of other
/// protocols).
pub(super) async fn accept<R, W>(
    tls: &NbdTls,
    reader: BufReader<R>,
    writer: W,
) -> Result<(Upgraded<R, W>, String), CloseReason>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let early = reader.buffer().len();
    if early > 0 {
        return Err(CloseReason::Protocol(format!(
            "client sent {early} bytes after NBD_OPT_STARTTLS before the server's reply; plaintext after \
             STARTTLS is refused"
        )));
    }
    let settings = tls.settings();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&settings.config));
    let stream = acceptor.accept(Joined { read: reader.into_inner(), write: writer }).await.map_err(|e| {
        CloseReason::Tls(format!(
            "TLS handshake failed: {e} (NBD clients need a certificate issued by the daemon's CA, tls.ca)"
        ))
    })?;
    let (_, session) = stream.get_ref();
    let Some(cert) = session.peer_certificates().and_then(|certs| certs.first()) else {
        return Err(CloseReason::Tls("the client presented no certificate".into()));
    };
    let name = match &settings.clients {
        None => match crate::tls::certificate_names(cert, &[]) {
            Ok(name) => name,
            Err(names) => names.join(",").chars().take(256).collect(),
        },
        Some(allowed) => crate::tls::certificate_names(cert, allowed).map_err(|names| {
            CloseReason::Tls(format!(
                "the client certificate (names {names:?}) is from the CA but not one of node.nbd_tls_clients \
                 {allowed:?}"
            ))
        })?,
    };
    Ok((stream, name))
}
