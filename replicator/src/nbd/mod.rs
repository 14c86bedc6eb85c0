//! NBD server: how applications reach a volume.
//!
//! Each volume is an NBD export, served on the daemon's Unix socket (and
//! optionally on TCP). Written from the protocol document
//! (NetworkBlockDevice/nbd `doc/proto.md`); no NBD crate is used.
//!
//! Reading order:
//! - `proto`: magic numbers, flags, and the encoding of every message;
//! - `server`: accept loops, one task per connection, shutdown, close logging;
//! - `handshake`: fixed-newstyle option haggling up to the chosen export;
//! - `tls`: the upgrade after `NBD_OPT_STARTTLS` (FORCEDTLS mode: TLS 1.2
//!   or 1.3, a client certificate from the CA required, optionally one of
//!   a list of names), with a configuration `SIGHUP` can replace;
//! - `request`: decoding and validating one transmission request (pure);
//! - `transmission`: the request loop, concurrent dispatch, the reply writer.
//!
//! What clients get, and the decisions behind it:
//! - Fixed newstyle only. Options: `EXPORT_NAME`, `GO`, `INFO` (replies
//!   `INFO_EXPORT`, `INFO_BLOCK_SIZE` always, `INFO_NAME` when asked),
//!   `LIST`, `ABORT`, `STARTTLS` on a TLS listener ([`serve_shared_tls`]:
//!   FORCEDTLS, see `tls`); elsewhere `STARTTLS` gets `ERR_POLICY`.
//!   `STRUCTURED_REPLY` and every other option get
//!   `ERR_UNSUP`: simple replies only. An empty name is the default export
//!   only when exactly one export exists. Option data above
//!   [`MAX_OPTION_LEN`] closes the connection, and so does a handshake not
//!   finished within [`ServeOptions::handshake_timeout`].
//! - Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_TRIM`,
//!   `SEND_WRITE_ZEROES`, `CAN_MULTI_CONN` (the daemon's flush covers writes
//!   acknowledged on every connection), and `READ_ONLY` when the export is.
//! - Block sizes are those of [`Export::block_sizes`], made legal (powers of
//!   two, minimum at most 64 KiB) and with the maximum payload capped at
//!   [`MAX_PAYLOAD`]. They are enforced for every client, including those
//!   that never asked for them: an unaligned request gets `EINVAL` and never
//!   reaches the export. The exceptions: a request that ends exactly at the
//!   end of an export whose size is not a multiple of the minimum, and the
//!   length of a `READ` (below).
//! - Errors: beyond the end of the export, `EINVAL` for `READ` and `TRIM`,
//!   `ENOSPC` for `WRITE` and `WRITE_ZEROES` (the spec's "Error values");
//!   length 0, unknown commands, unknown or inapplicable command flags:
//!   `EINVAL`; `WRITE_ZEROES` with `FAST_ZERO`: `EINVAL`, nothing written
//!   (not advertised, so a client should not send it; the protocol asks for
//!   `EINVAL` then); writes to a read-only export: `EPERM`. A `READ` is
//!   served up to [`MAX_PAYLOAD`] whatever maximum was advertised (it takes
//!   no journal space) and longer gets `EINVAL`. A `WRITE` goes to the
//!   export up to [`Export::max_write`] (a replicated volume takes the
//!   protocol's default maximum of 32 MiB, which a client that never asked
//!   for block sizes may send, whatever it advertised: it splits a longer
//!   write into records its journal holds); above that and up to
//!   [`MAX_PAYLOAD`] it gets `EINVAL` after its payload is read and
//!   discarded; a longer `WRITE` closes the connection, since its payload
//!   cannot be trusted. Every rejected `WRITE` within that limit has its
//!   payload read and discarded, so the connection stays usable.
//! - `TRIM` and `WRITE_ZEROES` may be longer than the maximum payload; the
//!   export receives them whole.
//! - Requests run concurrently, each as its own task; replies go out in
//!   completion order through one writer task, never interleaved. Per
//!   connection at most [`ServeOptions::max_in_flight_requests`] requests and
//!   [`ServeOptions::max_in_flight_bytes`] of read/write data are in flight
//!   (and a quarter of the budget group's share of the total, so that one
//!   client that stops taking replies leaves the group's others room),
//!   and at most [`ServeOptions::max_total_in_flight_bytes`] across all
//!   connections; beyond that the server stops reading from the socket. A
//!   client that takes no reply bytes for [`ServeOptions::reply_timeout`] is
//!   disconnected, which returns the budget its replies held; so is one that
//!   sends no bytes of a write payload it started for
//!   [`ServeOptions::payload_timeout`] (the payload's buffer holds budget
//!   every other client may be waiting for). Each payload and reply must
//!   also end within its timeout plus its length at
//!   [`ServeOptions::min_transfer_rate`], so a client that trickles a byte
//!   within each timeout cannot hold its budget indefinitely.
//! - At most [`ServeOptions::max_connections`] connections are open at once
//!   (shared by the daemon's Unix and TCP listeners, [`SharedLimits`]), and
//!   at most a quarter of them per listener still in their handshake (so
//!   that unauthenticated connections to a TLS listener cannot take the
//!   slots of the local socket); one more is accepted and closed at once,
//!   with a warning at most every few seconds. A failed `accept` (out of file descriptors) pauses the accept
//!   loop briefly instead of spinning.
//! - The server never drops an export future before it completes: a client
//!   that disconnects, a protocol violation or a shutdown only stops new
//!   requests from being read. A request whose future panics is answered
//!   with `EIO`.
//! - `NBD_CMD_DISC` and shutdown: stop reading, let in-flight requests finish
//!   and reply, then close. The server reports whether every request it
//!   started has finished in the export when it returns ([`Drain`]): the
//!   daemon records a clean shutdown only then.

mod handshake;
pub mod proto;
mod request;
mod server;
mod tls;
mod transmission;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use crate::io::AlignedBuf;

pub use server::{
    serve_shared, serve_shared_tls, serve_tcp, serve_unix, serve_unix_with, Drain, Listener, ServeOptions,
    SharedLimits, SHUTDOWN_BACKSTOP,
};
pub use tls::NbdTls;

/// Largest option data accepted during the handshake; a client sending more
/// is disconnected.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Cap on the advertised maximum payload (32 MiB, the size the spec says a
/// server should never treat as a denial of service).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Advertised via NBD_INFO_BLOCK_SIZE.
///
/// `minimum`: smallest length and alignment a client may use (a power of two,
/// at most 64 KiB). `preferred`: the size at which I/O is efficient (a power
/// of two, at least `minimum` and 512). `maximum`: the largest read or write
/// payload (at least `preferred`; capped at [`MAX_PAYLOAD`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

/// NBD error codes a backend can return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdErrno {
    /// `NBD_EPERM`: operation not permitted (e.g. the export is read-only).
    Perm,
    /// `NBD_EIO`: input/output error.
    Io,
    /// `NBD_ENOMEM`: cannot allocate memory.
    NoMem,
    /// `NBD_EINVAL`: invalid argument.
    Inval,
    /// `NBD_ENOSPC`: no space left on device.
    NoSpc,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow,
    /// `NBD_ENOTSUP`: operation not supported.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown,
}

/// An error from an export operation; `errno` goes to the client, `message`
/// to the log.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    /// The error code sent to the client.
    pub errno: NbdErrno,
    /// What went wrong, for the log.
    pub message: String,
}

impl ExportError {
    /// An error with the given code and message.
    pub fn new(errno: NbdErrno, message: impl Into<String>) -> Self {
        Self { errno, message: message.into() }
    }
}

/// One open export (a volume). Methods are called concurrently from several
/// connections/requests.
///
/// The server validates every request before calling a method: the range
/// lies within `size()` as negotiated, is non-empty, and is aligned to
/// `block_sizes().minimum` (the last block of an unaligned export excepted);
/// `read` lengths are at most [`MAX_PAYLOAD`], `write` lengths at most
/// `max_write()` (`trim`/`write_zeroes` may be longer); write-type methods are not called
/// while `read_only()` is true. Every returned future is polled to
/// completion. Requests in flight together may reach these methods in any
/// order (NBD gives them no order); keeping overlapping writes in a
/// consistent order is the export's job.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True if writes must be refused (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;
    /// Block size constraints, advertised to clients and enforced.
    fn block_sizes(&self) -> BlockSizes;
    /// The longest `write` this export takes, at least the advertised
    /// maximum (and at most [`MAX_PAYLOAD`]): an export that can split a
    /// longer write says so, and a client that never asked for block sizes
    /// may send up to the protocol's default maximum of 32 MiB. Longer
    /// writes get `EINVAL`. Default: the advertised maximum.
    fn max_write(&self) -> u32 {
        self.block_sizes().maximum
    }
    /// The exports whose requests wait on the same thing (the volumes of
    /// one replication group, stuck together when its peer is) share one
    /// slice of the server's byte budget, named by this; `None`: the
    /// export has a slice of its own.
    fn budget_group(&self) -> Option<String> {
        None
    }
    /// The server answered a request with `errno` without passing it on
    /// (a write to a read-only export, an invalid request): for the
    /// export's counters. Default: nothing.
    fn rejected(&self, errno: NbdErrno) {
        let _ = errno;
    }
    /// Reads `len` bytes at `offset`; the buffer must be exactly `len` long.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<AlignedBuf, ExportError>> + Send;
    /// Writes `data` at `offset`; durable before returning if `fua`.
    fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Makes `len` bytes at `offset` read as zeroes (allocated: the server
    /// maps `NBD_CMD_FLAG_NO_HOLE` and its absence to this one call).
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Discards `len` bytes at `offset` (a hint; contents are then undefined).
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Makes every write completed before this call durable, whichever
    /// connection it came from.
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;
}

/// Why an export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No export has this name (`NBD_REP_ERR_UNKNOWN`).
    #[error("no export named {0:?}")]
    Unknown(String),
    /// The export exists but may not be opened now; the text is sent to the
    /// client (`NBD_REP_ERR_POLICY`).
    #[error("{0}")]
    Refused(String),
}

/// The set of exports (can change at runtime).
pub trait ExportCatalog: Send + Sync + 'static {
    /// The export type this catalog opens.
    type Export: Export;
    /// Names of the exports, in the order `NBD_OPT_LIST` reports them.
    fn list(&self) -> Vec<String>;
    /// Opens an export by name.
    fn open(&self, name: &str) -> Result<Arc<Self::Export>, OpenError>;
}
