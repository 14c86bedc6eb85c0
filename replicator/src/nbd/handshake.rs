//! Handshake phase: the fixed-newstyle greeting and option haggling, up to
//! the export the client will use in the transmission phase.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{
    self, OptionHeader, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, INFO_NAME, MAX_STRING_LEN,
    OPTION_HEADER_LEN, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER,
};
use super::request::ExportParams;
use super::server::CloseReason;
use super::{ExportCatalog, OpenError, MAX_OPTION_LEN};

/// The export chosen by a successful handshake.
#[derive(Debug)]
pub(super) struct Negotiated<E> {
    /// The export's canonical name (the default export's real name).
    pub name: String,
    pub export: Arc<E>,
    /// What the client was told; requests are validated against it.
    pub params: ExportParams,
}

/// Where a connection stands with TLS; fixed per listener at accept
/// (NOTLS or FORCEDTLS in the protocol's terms), `Established` after the
/// upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsState {
    /// The listener offers no TLS (the Unix socket, `nbd_tls = "off"`):
    /// `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`.
    Unavailable,
    /// FORCEDTLS before the upgrade: only `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` are served; other options get
    /// `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` (which cannot
    /// carry an error) closes the connection.
    Required,
    /// TLS is up: options are served; `NBD_OPT_STARTTLS` again gets
    /// `NBD_REP_ERR_INVALID`.
    Established,
}

/// How option haggling ended, when the connection goes on.
#[derive(Debug)]
pub(super) enum Outcome<E> {
    /// The transmission phase starts on this export.
    Transmission(Negotiated<E>),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next,
    /// then haggling resumes inside TLS ([`haggle`] with
    /// [`TlsState::Established`]).
    StartTls,
}

/// The greeting and the client's flags. Returns whether the client asked
/// for `NBD_FLAG_C_NO_ZEROES`.
pub(super) async fn greet<R, W>(reader: &mut R, writer: &mut W, tls: TlsState) -> Result<bool, CloseReason>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&proto::greeting()).await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(CloseReason::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    // STARTTLS exists only in fixed newstyle.
    if tls == TlsState::Required && client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(CloseReason::TlsRequired("the client does not speak fixed newstyle, so it cannot start TLS"));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// Option haggling, after [`greet`]. `Ok` means the transmission phase
/// or the TLS upgrade comes next; `Err` says why the connection ends
/// instead (including `NBD_OPT_ABORT`).
pub(super) async fn haggle<C, R, W>(
    reader: &mut R,
    writer: &mut W,
    catalog: &C,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Outcome<C::Export>, CloseReason>
where
    C: ExportCatalog,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        writer.flush().await?;
        let mut raw = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut raw).await?;
        let header = OptionHeader::decode(&raw);
        if header.magic != IHAVEOPT {
            return Err(CloseReason::Protocol(format!("bad option magic {:#018x}", header.magic)));
        }
        if header.len > MAX_OPTION_LEN {
            return Err(CloseReason::Protocol(format!(
                "option {} carries {} bytes of data (limit {MAX_OPTION_LEN})",
                header.option, header.len
            )));
        }
        let mut data = vec![0u8; header.len as usize];
        reader.read_exact(&mut data).await?;

        let option = header.option;
        match (option, tls) {
            (OPT_ABORT, _) => {
                // The client may already have gone; the reply is a courtesy.
                let _ = writer.write_all(&proto::option_reply(option, REP_ACK, &[])).await;
                let _ = writer.flush().await;
                return Err(CloseReason::Abort);
            }
            (OPT_STARTTLS, TlsState::Required) if data.is_empty() => {
                writer.write_all(&proto::option_reply(option, REP_ACK, &[])).await?;
                writer.flush().await?;
                return Ok(Outcome::StartTls);
            }
            (OPT_STARTTLS, TlsState::Required) => {
                let message = "NBD_OPT_STARTTLS takes no data";
                writer.write_all(&proto::option_error(option, REP_ERR_INVALID, message)).await?;
            }
            (OPT_STARTTLS, TlsState::Established) => {
                let message = "TLS is already established on this connection";
                writer.write_all(&proto::option_error(option, REP_ERR_INVALID, message)).await?;
            }
            (OPT_STARTTLS, TlsState::Unavailable) => {
                let message = "TLS is not offered here: this is the local Unix socket, or nbd_listen with \
                               nbd_tls = \"off\" (loopback only)";
                writer.write_all(&proto::option_error(option, REP_ERR_POLICY, message)).await?;
            }
            (OPT_EXPORT_NAME, TlsState::Required) => {
                return Err(CloseReason::TlsRequired(
                    "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS (that option cannot carry an error reply)",
                ));
            }
            (_, TlsState::Required) => {
                let message = "TLS is required on this server: send NBD_OPT_STARTTLS and present a client \
                               certificate issued by the server's CA (qemu: tls-creds; libnbd: nbds:// with \
                               tls-certificates)";
                writer.write_all(&proto::option_error(option, REP_ERR_TLS_REQD, message)).await?;
            }
            (OPT_EXPORT_NAME, _) => {
                return export_name(writer, catalog, &data, no_zeroes).await.map(Outcome::Transmission)
            }
            (OPT_LIST, _) => list(writer, catalog, &data).await?,
            (OPT_INFO | OPT_GO, _) => {
                if let Some(negotiated) = info_or_go(writer, catalog, option, &data).await? {
                    return Ok(Outcome::Transmission(negotiated));
                }
            }
            (OPT_STRUCTURED_REPLY, _) => {
                let message = "structured replies are not supported; this server sends simple replies";
                writer.write_all(&proto::option_error(option, REP_ERR_UNSUP, message)).await?;
            }
            _ => {
                let message = format!("option {option} is not supported");
                writer.write_all(&proto::option_error(option, REP_ERR_UNSUP, &message)).await?;
            }
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: enters transmission, or (as this option cannot
/// carry an error) closes the connection.
async fn export_name<C, W>(
    writer: &mut W,
    catalog: &C,
    data: &[u8],
    no_zeroes: bool,
) -> Result<Negotiated<C::Export>, CloseReason>
where
    C: ExportCatalog,
    W: AsyncWrite + Unpin,
{
    let Ok(requested) = std::str::from_utf8(data) else {
        return Err(CloseReason::Protocol("export name is not UTF-8".into()));
    };
    if requested.len() > MAX_STRING_LEN {
        return Err(CloseReason::Protocol("export name longer than 4096 bytes".into()));
    }
    match open(catalog, requested) {
        Ok((name, export)) => {
            let params = ExportParams::of(&*export);
            writer.write_all(&proto::export_name_reply(params.size, params.flags, no_zeroes)).await?;
            writer.flush().await?;
            Ok(Negotiated { name, export, params })
        }
        Err(refusal) => Err(CloseReason::ExportRefused(refusal.message)),
    }
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
async fn list<C, W>(writer: &mut W, catalog: &C, data: &[u8]) -> Result<(), CloseReason>
where
    C: ExportCatalog,
    W: AsyncWrite + Unpin,
{
    let out = if data.is_empty() {
        let mut out = Vec::new();
        for name in catalog.list() {
            out.extend(proto::option_reply(OPT_LIST, REP_SERVER, &proto::rep_server(&name)));
        }
        out.extend(proto::option_reply(OPT_LIST, REP_ACK, &[]));
        out
    } else {
        proto::option_error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
    };
    writer.write_all(&out).await?;
    Ok(())
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: describe the export; for `GO` on
/// success, return it (the transmission phase starts).
async fn info_or_go<C, W>(
    writer: &mut W,
    catalog: &C,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiated<C::Export>>, CloseReason>
where
    C: ExportCatalog,
    W: AsyncWrite + Unpin,
{
    let request = match proto::decode_info_request(data) {
        Ok(request) => request,
        Err(message) => {
            writer.write_all(&proto::option_error(option, REP_ERR_INVALID, message)).await?;
            return Ok(None);
        }
    };
    let (name, export) = match open(catalog, &request.name) {
        Ok(opened) => opened,
        Err(Refusal { reply_type, message }) => {
            writer.write_all(&proto::option_error(option, reply_type, &message)).await?;
            return Ok(None);
        }
    };
    let params = ExportParams::of(&*export);
    let mut out = proto::option_reply(option, REP_INFO, &proto::info_export(params.size, params.flags));
    if request.requests.contains(&INFO_NAME) {
        out.extend(proto::option_reply(option, REP_INFO, &proto::info_name(&name)));
    }
    // Always sent: the constraints are enforced whether or not asked for.
    out.extend(proto::option_reply(option, REP_INFO, &proto::info_block_size(params.sizes)));
    out.extend(proto::option_reply(option, REP_ACK, &[]));
    writer.write_all(&out).await?;
    writer.flush().await?;
    Ok((option == OPT_GO).then_some(Negotiated { name, export, params }))
}

/// Why an export cannot be used: the option reply type and the message
/// for the client.
#[derive(Debug)]
struct Refusal {
    reply_type: u32,
    message: String,
}

/// Opens `requested` (empty: the default export, which exists only when the
/// catalog holds exactly one). Returns the canonical name and the export.
fn open<C: ExportCatalog>(catalog: &C, requested: &str) -> Result<(String, Arc<C::Export>), Refusal> {
    let name = if requested.is_empty() {
        match <[String; 1]>::try_from(catalog.list()) {
            Ok([only]) => only,
            Err(names) => {
                return Err(Refusal {
                    reply_type: REP_ERR_UNKNOWN,
                    message: format!("no default export: the server has {} exports; ask for one by name", names.len()),
                })
            }
        }
    } else {
        requested.to_owned()
    };
    match catalog.open(&name) {
        Ok(export) => Ok((name, export)),
        Err(err @ OpenError::Unknown(_)) => Err(Refusal { reply_type: REP_ERR_UNKNOWN, message: err.to_string() }),
        Err(OpenError::Refused(message)) => Err(Refusal { reply_type: REP_ERR_POLICY, message }),
    }
}
