//! Deciding what to do with one transmission request: run it, reject it
//! with an error reply, or drop the connection.
//!
//! Pure: the decision depends only on the request header and on what was
//! negotiated for the export, so every rule is unit-tested here.

use super::proto::{
    self, RequestHeader, CMD_DISC, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, REQUEST_MAGIC,
};
use super::{BlockSizes, Export, NbdErrno, MAX_PAYLOAD};

/// What a connection negotiated for its export: the size and block sizes
/// sent to the client, against which every request is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExportParams {
    pub size: u64,
    pub read_only: bool,
    pub sizes: BlockSizes,
    /// The longest write the export takes ([`super::Export::max_write`]).
    pub max_write: u32,
    pub flags: u16,
}

impl ExportParams {
    /// The parameters advertised for `export` right now.
    pub(super) fn of<E: Export>(export: &E) -> Self {
        let read_only = export.read_only();
        let sizes = legal_block_sizes(export.block_sizes());
        Self {
            size: export.size(),
            read_only,
            sizes,
            max_write: export.max_write().clamp(sizes.maximum, MAX_PAYLOAD),
            flags: proto::transmission_flags(read_only),
        }
    }
}

/// `sizes` adjusted to what the protocol allows: `minimum` a power of two in
/// 1..=64 KiB, `preferred` a power of two at least `max(minimum, 512)`,
/// `maximum` at least `preferred`, everything at most [`MAX_PAYLOAD`].
/// Values that are already legal are kept.
pub(super) fn legal_block_sizes(sizes: BlockSizes) -> BlockSizes {
    fn power_of_two_in(value: u32, low: u32, high: u32) -> u32 {
        value.clamp(low, high).checked_next_power_of_two().unwrap_or(high).min(high)
    }
    let minimum = power_of_two_in(sizes.minimum, 1, 64 * 1024);
    let preferred = power_of_two_in(sizes.preferred, minimum.max(512), MAX_PAYLOAD);
    let maximum = sizes.maximum.clamp(preferred, MAX_PAYLOAD);
    BlockSizes { minimum, preferred, maximum }
}

/// A validated request, ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Disconnect,
}

/// The outcome of validating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    Run(Command),
    /// Reply with `errno`; first read and discard `discard` payload bytes.
    Reject {
        errno: NbdErrno,
        discard: u32,
    },
    /// The stream cannot be trusted any more: close the connection.
    Close(String),
}

/// Validates `request` against the negotiated `params`. `read_only_now` is
/// the export's current state (it may have been demoted since the handshake).
pub(super) fn decide(request: &RequestHeader, params: &ExportParams, read_only_now: bool) -> Decision {
    if request.magic != REQUEST_MAGIC {
        return Decision::Close(format!("bad request magic {:#010x}", request.magic));
    }
    let (kind, len) = (request.kind, request.len);
    // Only WRITE carries a payload (no extended headers are negotiated).
    let discard = if kind == CMD_WRITE {
        if len > MAX_PAYLOAD {
            return Decision::Close(format!(
                "write of {len} bytes exceeds the protocol's largest payload ({MAX_PAYLOAD} bytes)"
            ));
        }
        if len > params.max_write {
            // Up to 32 MiB is a payload the protocol lets a client that
            // never asked for block sizes send: refused cleanly.
            return Decision::Reject { errno: NbdErrno::Inval, discard: len };
        }
        len
    } else {
        0
    };
    match validate(request, params, params.read_only || read_only_now) {
        Ok(command) => Decision::Run(command),
        Err(errno) => Decision::Reject { errno, discard },
    }
}

/// A request [`decide`] rejected with `errno`, in words for the log.
pub(super) fn describe_rejection(request: &RequestHeader, errno: NbdErrno) -> String {
    let RequestHeader { flags, kind, offset, len, .. } = *request;
    let command = match kind {
        CMD_READ => "read".to_string(),
        CMD_WRITE => "write".to_string(),
        CMD_FLUSH => "flush".to_string(),
        CMD_TRIM => "trim".to_string(),
        CMD_WRITE_ZEROES => "write-zeroes".to_string(),
        other => format!("command {other}"),
    };
    let why = match errno {
        NbdErrno::Perm => "the export is read-only here (see `replicator status`)",
        NbdErrno::NoSpc => "beyond the end of the export",
        _ => "not valid for this export (the command, its flags, an empty, unaligned or too long range, or one beyond the end)",
    };
    format!("{command} of {len} bytes at {offset} (flags {flags:#x}): {why} ({})", errno.name())
}

/// The command `request` asks for, or the error to reply with.
fn validate(request: &RequestHeader, params: &ExportParams, read_only: bool) -> Result<Command, NbdErrno> {
    let RequestHeader { flags, kind, offset, len, .. } = *request;
    let fua = flags & CMD_FLAG_FUA != 0;
    match kind {
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => {
            allowed_flags(flags, CMD_FLAG_FUA)?;
            Ok(Command::Flush)
        }
        CMD_READ => {
            allowed_flags(flags, CMD_FLAG_FUA)?;
            check_range(offset, len, params, NbdErrno::Inval)?;
            // Served up to the protocol's 32 MiB, whatever maximum was
            // advertised: a read takes no journal space, and a client that
            // never asked for block sizes may send that much.
            if len > MAX_PAYLOAD {
                return Err(NbdErrno::Inval);
            }
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE => {
            allowed_flags(flags, CMD_FLAG_FUA)?;
            writable(read_only)?;
            check_range(offset, len, params, NbdErrno::NoSpc)?;
            Ok(Command::Write { offset, len, fua })
        }
        CMD_TRIM => {
            allowed_flags(flags, CMD_FLAG_FUA)?;
            writable(read_only)?;
            check_range(offset, len, params, NbdErrno::Inval)?;
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_WRITE_ZEROES => {
            allowed_flags(flags, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
            if flags & CMD_FLAG_FAST_ZERO != 0 {
                // Not advertised (NBD_FLAG_SEND_FAST_ZERO): the protocol
                // asks for EINVAL then, not ENOTSUP; nothing is written.
                return Err(NbdErrno::Inval);
            }
            writable(read_only)?;
            check_range(offset, len, params, NbdErrno::NoSpc)?;
            Ok(Command::WriteZeroes { offset, len, fua })
        }
        _ => Err(NbdErrno::Inval),
    }
}

fn allowed_flags(flags: u16, allowed: u16) -> Result<(), NbdErrno> {
    if flags & !allowed == 0 {
        Ok(())
    } else {
        Err(NbdErrno::Inval)
    }
}

fn writable(read_only: bool) -> Result<(), NbdErrno> {
    if read_only {
        Err(NbdErrno::Perm)
    } else {
        Ok(())
    }
}

/// Non-empty, within the export (`beyond_end` otherwise), and aligned to the
/// minimum block size (a range ending exactly at the end of the export may
/// have an unaligned length).
fn check_range(offset: u64, len: u32, params: &ExportParams, beyond_end: NbdErrno) -> Result<(), NbdErrno> {
    if len == 0 {
        return Err(NbdErrno::Inval);
    }
    let end = match offset.checked_add(u64::from(len)) {
        Some(end) if end <= params.size => end,
        _ => return Err(beyond_end),
    };
    let minimum = u64::from(params.sizes.minimum);
    if offset % minimum != 0 || (u64::from(len) % minimum != 0 && end != params.size) {
        return Err(NbdErrno::Inval);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn params(read_only: bool) -> ExportParams {
        ExportParams {
            size: SIZE,
            read_only,
            sizes: BlockSizes { minimum: 512, preferred: 4096, maximum: 65536 },
            max_write: 65536,
            flags: proto::transmission_flags(read_only),
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { magic: REQUEST_MAGIC, flags, kind, cookie: 7, offset, len }
    }

    fn decide_rw(r: RequestHeader) -> Decision {
        decide(&r, &params(false), false)
    }

    fn reject(errno: NbdErrno, discard: u32) -> Decision {
        Decision::Reject { errno, discard }
    }

    #[test]
    fn valid_requests_run() {
        assert_eq!(decide_rw(req(CMD_READ, 0, 0, 4096)), Decision::Run(Command::Read { offset: 0, len: 4096 }));
        assert_eq!(
            decide_rw(req(CMD_WRITE, CMD_FLAG_FUA, SIZE - 512, 512)),
            Decision::Run(Command::Write { offset: SIZE - 512, len: 512, fua: true })
        );
        assert_eq!(
            decide_rw(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20)),
            Decision::Run(Command::WriteZeroes { offset: 0, len: 1 << 20, fua: false })
        );
        assert_eq!(
            decide_rw(req(CMD_TRIM, 0, 512, 1024)),
            Decision::Run(Command::Trim { offset: 512, len: 1024, fua: false })
        );
        assert_eq!(decide_rw(req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)), Decision::Run(Command::Flush));
        assert_eq!(decide_rw(req(CMD_DISC, 0, 0, 0)), Decision::Run(Command::Disconnect));
    }

    #[test]
    fn beyond_the_end() {
        assert_eq!(decide_rw(req(CMD_READ, 0, SIZE - 512, 1024)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_WRITE, 0, SIZE, 512)), reject(NbdErrno::NoSpc, 512));
        assert_eq!(decide_rw(req(CMD_WRITE_ZEROES, 0, SIZE - 512, 1024)), reject(NbdErrno::NoSpc, 0));
        assert_eq!(decide_rw(req(CMD_TRIM, 0, SIZE - 512, 1024)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_READ, 0, u64::MAX - 511, 1024)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_WRITE, 0, u64::MAX - 511, 1024)), reject(NbdErrno::NoSpc, 1024));
    }

    #[test]
    fn empty_unaligned_and_oversized() {
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(decide_rw(req(kind, 0, 0, 0)), reject(NbdErrno::Inval, 0));
        }
        assert_eq!(decide_rw(req(CMD_READ, 0, 100, 512)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_WRITE, 0, 0, 100)), reject(NbdErrno::Inval, 100));
        // A read above the negotiated maximum is served up to 32 MiB.
        assert!(matches!(decide_rw(req(CMD_READ, 0, 0, 65536 + 512)), Decision::Run(Command::Read { .. })));
        let large = ExportParams { size: 1 << 30, ..params(false) };
        assert!(matches!(decide(&req(CMD_READ, 0, 0, MAX_PAYLOAD), &large, false), Decision::Run(_)));
        assert_eq!(decide(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 512), &large, false), reject(NbdErrno::Inval, 0));
        // Above the negotiated maximum but within the protocol's 32 MiB: its
        // payload is read and dropped, the write refused.
        assert_eq!(decide_rw(req(CMD_WRITE, 0, 0, 65536 + 512)), reject(NbdErrno::Inval, 65536 + 512));
        assert_eq!(decide_rw(req(CMD_WRITE, 0, 0, MAX_PAYLOAD)), reject(NbdErrno::Inval, MAX_PAYLOAD));
        assert!(matches!(decide_rw(req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)), Decision::Close(_)));
        // An export that splits long writes takes them up to what it says.
        let splits = ExportParams { size: 1 << 30, max_write: MAX_PAYLOAD, ..params(false) };
        assert!(matches!(
            decide(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD), &splits, false),
            Decision::Run(Command::Write { len: MAX_PAYLOAD, .. })
        ));
        assert!(matches!(decide(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &splits, false), Decision::Close(_)));
        // Read-only and out-of-range do not save a write beyond 32 MiB.
        assert!(matches!(decide(&req(CMD_WRITE, 0, SIZE, 1 << 30), &params(true), true), Decision::Close(_)));
    }

    #[test]
    fn unaligned_tail_of_unaligned_export() {
        let mut p = params(false);
        p.size = SIZE + 100;
        assert_eq!(
            decide(&req(CMD_READ, 0, SIZE, 100), &p, false),
            Decision::Run(Command::Read { offset: SIZE, len: 100 })
        );
        assert_eq!(decide(&req(CMD_READ, 0, SIZE, 50), &p, false), reject(NbdErrno::Inval, 0));
    }

    #[test]
    fn flags() {
        assert_eq!(decide_rw(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_WRITE, 1 << 2, 0, 512)), reject(NbdErrno::Inval, 512));
        assert_eq!(decide_rw(req(CMD_FLUSH, 1 << 15, 0, 0)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512)), reject(NbdErrno::Inval, 0));
        assert_eq!(decide_rw(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO | 1 << 9, 0, 512)), reject(NbdErrno::Inval, 0));
    }

    #[test]
    fn unknown_commands_and_bad_magic() {
        for kind in [5, 7, 8, 99, u16::MAX] {
            assert_eq!(decide_rw(req(kind, 0, 0, 512)), reject(NbdErrno::Inval, 0));
        }
        let mut bad = req(CMD_READ, 0, 0, 512);
        bad.magic = 0x1256_0953;
        assert!(matches!(decide_rw(bad), Decision::Close(_)));
    }

    #[test]
    fn read_only() {
        let ro = params(true);
        assert_eq!(decide(&req(CMD_WRITE, 0, 0, 512), &ro, true), reject(NbdErrno::Perm, 512));
        assert_eq!(decide(&req(CMD_TRIM, 0, 0, 512), &ro, true), reject(NbdErrno::Perm, 0));
        assert_eq!(decide(&req(CMD_WRITE_ZEROES, 0, 0, 512), &ro, true), reject(NbdErrno::Perm, 0));
        assert_eq!(decide(&req(CMD_READ, 0, 0, 512), &ro, true), Decision::Run(Command::Read { offset: 0, len: 512 }));
        // Demoted after the handshake.
        assert_eq!(decide(&req(CMD_WRITE, 0, 0, 512), &params(false), true), reject(NbdErrno::Perm, 512));
    }

    #[test]
    fn block_sizes_are_made_legal() {
        let legal = BlockSizes { minimum: 512, preferred: 4096, maximum: 1 << 20 };
        assert_eq!(legal_block_sizes(legal), legal);
        assert_eq!(
            legal_block_sizes(BlockSizes { minimum: 0, preferred: 0, maximum: 0 }),
            BlockSizes { minimum: 1, preferred: 512, maximum: 512 }
        );
        assert_eq!(
            legal_block_sizes(BlockSizes { minimum: 3000, preferred: 5000, maximum: u32::MAX }),
            BlockSizes { minimum: 4096, preferred: 8192, maximum: MAX_PAYLOAD }
        );
        assert_eq!(
            legal_block_sizes(BlockSizes { minimum: u32::MAX, preferred: u32::MAX, maximum: 1 }),
            BlockSizes { minimum: 65536, preferred: MAX_PAYLOAD, maximum: MAX_PAYLOAD }
        );
    }
}
