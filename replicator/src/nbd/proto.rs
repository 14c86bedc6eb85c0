//! NBD wire format: magic numbers, flags, option/command codes, and the
//! encoding and decoding of every message this server exchanges.
//!
//! Pure functions over byte slices, no I/O: the handshake and transmission
//! modules read and write these messages. Values are from the protocol
//! document (NetworkBlockDevice/nbd `doc/proto.md`); all integers are
//! big-endian on the wire.

use bytes::{Buf, BufMut};

use super::{BlockSizes, NbdErrno};

// ---- magic numbers ----

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting and the magic starting every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic starting every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`, starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`, starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---- handshake flags (server, 16 bits) ----

/// `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- client flags (32 bits) ----

/// `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- transmission flags (16 bits) ----

/// `NBD_FLAG_HAS_FLAGS` (always set).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---- options ----

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// ---- option reply types ----

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// `NBD_REP_ERR_TLS_REQD`: the option needs TLS first (FORCEDTLS mode).
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

// ---- NBD_REP_INFO types ----

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands ----

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;

// ---- command flags ----

/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- sizes ----

/// Bytes in the server's initial greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes in an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes in a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Longest string (export name, error message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

impl NbdErrno {
    /// The error value sent in a reply.
    pub fn code(self) -> u32 {
        match self {
            Self::Perm => 1,
            Self::Io => 5,
            Self::NoMem => 12,
            Self::Inval => 22,
            Self::NoSpc => 28,
            Self::Overflow => 75,
            Self::NotSup => 95,
            Self::Shutdown => 108,
        }
    }

    /// Its name, for the log (`EPERM`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::Io => "EIO",
            Self::NoMem => "ENOMEM",
            Self::Inval => "EINVAL",
            Self::NoSpc => "ENOSPC",
            Self::Overflow => "EOVERFLOW",
            Self::NotSup => "ENOTSUP",
            Self::Shutdown => "ESHUTDOWN",
        }
    }
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub(super) fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    let mut buf = &mut out[..];
    buf.put_u64(NBDMAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    out
}

/// Transmission flags for an export.
pub(super) fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

/// A decoded option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub(super) fn decode(raw: &[u8; OPTION_HEADER_LEN]) -> Self {
        let mut buf = &raw[..];
        Self { magic: buf.get_u64(), option: buf.get_u32(), len: buf.get_u32() }
    }
}

/// One fixed-newstyle option reply (header and payload).
pub(super) fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + payload.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(wire_len(payload.len()));
    out.put_slice(payload);
    out
}

/// An error reply carrying a human-readable message.
pub(super) fn option_error(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply_type, truncate_str(message, MAX_STRING_LEN).as_bytes())
}

/// Payload of `NBD_REP_SERVER`: the export name.
pub(super) fn rep_server(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.put_u32(wire_len(name.len()));
    out.put_slice(name.as_bytes());
    out
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub(super) fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    let mut buf = &mut out[..];
    buf.put_u16(INFO_EXPORT);
    buf.put_u64(size);
    buf.put_u16(flags);
    out
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub(super) fn info_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.put_u16(INFO_NAME);
    out.put_slice(name.as_bytes());
    out
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub(super) fn info_block_size(sizes: BlockSizes) -> [u8; 14] {
    let mut out = [0u8; 14];
    let mut buf = &mut out[..];
    buf.put_u16(INFO_BLOCK_SIZE);
    buf.put_u32(sizes.minimum);
    buf.put_u32(sizes.preferred);
    buf.put_u32(sizes.maximum);
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub(super) fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_PADDING);
    }
    out
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// `NBD_INFO_*` items the client asked for.
    pub requests: Vec<u16>,
}

/// Decodes `NBD_OPT_INFO`/`NBD_OPT_GO` data. The error is the message for
/// an `NBD_REP_ERR_INVALID` reply.
pub(super) fn decode_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut buf = data;
    if buf.remaining() < 4 {
        return Err("option data too short for the export name length");
    }
    let name_len = buf.get_u32() as usize;
    if name_len > MAX_STRING_LEN {
        return Err("export name longer than 4096 bytes");
    }
    if buf.remaining() < name_len + 2 {
        return Err("export name length exceeds the option data");
    }
    let name = std::str::from_utf8(&buf[..name_len]).map_err(|_| "export name is not UTF-8")?;
    let name = name.to_owned();
    buf.advance(name_len);
    let count = usize::from(buf.get_u16());
    if buf.remaining() != count * 2 {
        return Err("information request count does not match the option length");
    }
    let requests = (0..count).map(|_| buf.get_u16()).collect();
    Ok(InfoRequest { name, requests })
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub(super) fn decode(raw: &[u8; REQUEST_HEADER_LEN]) -> Self {
        let mut buf = &raw[..];
        Self {
            magic: buf.get_u32(),
            flags: buf.get_u16(),
            kind: buf.get_u16(),
            cookie: buf.get_u64(),
            offset: buf.get_u64(),
            len: buf.get_u32(),
        }
    }
}

/// A simple reply header; a successful read's data follows it.
pub(super) fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    let mut buf = &mut out[..];
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
    out
}

/// A length for a 32-bit wire field. Every caller bounds its input far
/// below 4 GiB (names and messages by `MAX_STRING_LEN`).
fn wire_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub(super) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn request_header_decodes_big_endian() {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        let mut buf = &mut raw[..];
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(CMD_FLAG_FUA);
        buf.put_u16(CMD_WRITE);
        buf.put_u64(0x0102_0304_0506_0708);
        buf.put_u64(4096);
        buf.put_u32(512);
        let h = RequestHeader::decode(&raw);
        assert_eq!(
            h,
            RequestHeader {
                magic: REQUEST_MAGIC,
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 512,
            }
        );
    }

    fn info_data(name: &[u8], declared_len: u32, requests: &[u16], count: u16) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u32(declared_len);
        out.put_slice(name);
        out.put_u16(count);
        for r in requests {
            out.put_u16(*r);
        }
        out
    }

    #[test]
    fn info_request_decoding() {
        let ok = decode_info_request(&info_data(b"vol", 3, &[3, 1], 2));
        assert_eq!(ok, Ok(InfoRequest { name: "vol".into(), requests: vec![3, 1] }));
        let empty = decode_info_request(&info_data(b"", 0, &[], 0));
        assert_eq!(empty.map(|r| r.name), Ok(String::new()));
        assert!(decode_info_request(&[0, 0]).is_err());
        assert!(decode_info_request(&info_data(b"vol", 9, &[], 0)).is_err());
        assert!(decode_info_request(&info_data(b"vol", 3, &[3], 2)).is_err());
        assert!(decode_info_request(&info_data(b"vol", 3, &[3, 1], 1)).is_err());
        assert!(decode_info_request(&info_data(&[0xff, 0xfe], 2, &[], 0)).is_err());
        assert!(decode_info_request(&info_data(b"", u32::MAX, &[], 0)).is_err());
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(OPT_LIST, REP_SERVER, &rep_server("ab"));
        assert_eq!(r.len(), 20 + 6);
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &OPT_LIST.to_be_bytes());
        assert_eq!(&r[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&r[16..20], &6u32.to_be_bytes());
        assert_eq!(&r[20..], &[0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(truncate_str("hi", 10), "hi");
        let long = "x".repeat(5000);
        assert_eq!(option_error(1, REP_ERR_POLICY, &long).len(), 20 + MAX_STRING_LEN);
    }
}
