//! Framing of wire messages and wire version negotiation.
//!
//! Every QUIC stream carries a sequence of frames; a frame is the protobuf
//! varint length of an encoded [`pb::Envelope`] followed by that many bytes
//! (prost's "length-delimited" encoding). [`encode_frame`] produces frames and
//! [`FrameDecoder`] reassembles them from arbitrarily split socket reads.
//!
//! A length prefix above [`MAX_FRAME_LEN`] is rejected as soon as the prefix
//! itself has been read, before any of the body is buffered, so a broken or
//! hostile peer cannot make the daemon allocate more than one maximal frame.
//! Nor does an accepted prefix reserve its frame: small frames gather in a
//! buffer that grows with the bytes that actually arrive (amortized
//! doubling), and a large frame gets a buffer of its own, of its full length,
//! only once a quarter of it has arrived. A peer announcing large frames on
//! many streams costs at most four times what it sends (times what the
//! caller's [`AlignedMemory`] rounds a buffer up to).
//!
//! Nor does a complete frame decode to much more than its bytes. Decoding
//! allocates per element of a list (tens of bytes for an element of two
//! bytes on the wire), so a frame's messages may hold at most
//! [`MAX_FRAME_FIELDS`] fields together; and a `Hello`, whose packed list of
//! versions decodes to four bytes per byte, at most [`MAX_HELLO_LEN`] bytes.
//! Both are checked on the frame's bytes before it is decoded.
//!
//! That own buffer is two: the frame's first `len % PAYLOAD_ALIGN` bytes,
//! and the rest in memory aligned to [`PAYLOAD_ALIGN`], which the caller
//! provides ([`AlignedMemory`]: the daemon recycles it, so a stream of large
//! frames does not fault in fresh pages for each). A large record's payload
//! is the end of its frame ([`encode_frame_parts`]) and a whole number of
//! blocks, so it is exactly that aligned part: the secondary writes it to
//! its journal and volume from the buffer it was received into, and the
//! frame's bytes are copied once, from QUIC's buffers into that one. (Any
//! other large frame decodes the same, its fields copied where they
//! straddle the two parts.)

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use std::fmt;

use crate::pb;

/// QUIC ALPN protocol identifier.
pub const ALPN: &[u8] = b"replicator/1";
/// The wire version this build speaks natively.
pub const WIRE_VERSION: u32 = 1;
/// Every wire version this build can speak, in increasing order.
pub const SUPPORTED_VERSIONS: &[u32] = &[WIRE_VERSION];
pub use crate::record::MAX_RECORD_PAYLOAD;
/// Largest encoded [`pb::Envelope`] accepted: one maximal record payload plus
/// room for the record's other fields.
pub const MAX_FRAME_LEN: usize = MAX_RECORD_PAYLOAD as usize + 64 * 1024;

/// Longest valid varint (a `u64` needs at most 10 bytes of 7 bits).
const MAX_VARINT_LEN: usize = 10;

/// Most fields one frame's messages may hold together: those of the
/// envelope and of each message it carries, where the lists are (each
/// element of a list is a field). The longest lists a daemon sends are far
/// below it: an OpenGroupReply's divergent regions
/// ([`crate::divergence::MAX_EXTENTS`]), an OpenGroup's volumes
/// ([`MAX_GROUP_VOLUMES`]), an Ack's copy mismatches (one per 64 KiB span
/// of the hash chunks in flight: 8,192 for a full window). Each element
/// decodes to a few dozen bytes (plus its strings', which arrived), so no
/// frame decodes to more than about 16 MiB beyond its own bytes.
pub const MAX_FRAME_FIELDS: usize = 1 << 17;
const _: () = assert!(crate::divergence::MAX_EXTENTS + 64 < MAX_FRAME_FIELDS);
const _: () = assert!(MAX_GROUP_VOLUMES + 64 < MAX_FRAME_FIELDS);

/// Most volumes a group may have (the configuration refuses more): its
/// OpenGroup lists them all.
pub const MAX_GROUP_VOLUMES: usize = 4096;

/// Longest `Hello` accepted: a few version numbers and two names.
pub const MAX_HELLO_LEN: usize = 4096;

const ENVELOPE_HELLO_TAG: u32 = 1;

/// Errors from decoding frames. After any of them the stream is unusable and
/// should be closed; the decoder keeps returning the same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix announces a frame above [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced frame length.
        len: u64,
        /// The limit ([`MAX_FRAME_LEN`]).
        max: usize,
    },
    /// The length prefix is not a valid varint (longer than 10 bytes or
    /// overflowing 64 bits).
    #[error("malformed frame length prefix (not a valid protobuf varint)")]
    BadLengthPrefix,
    /// The frame body is not a valid protobuf `Envelope`.
    #[error("cannot decode frame as a replication message: {0}")]
    Decode(String),
    /// The frame's messages hold more than [`MAX_FRAME_FIELDS`] fields.
    #[error("frame holds more than {max} fields (list elements)")]
    TooManyFields {
        /// The limit ([`MAX_FRAME_FIELDS`]).
        max: usize,
    },
    /// A `Hello` longer than [`MAX_HELLO_LEN`] (several in one envelope
    /// counted together).
    #[error("Hello of {len} bytes exceeds the {max}-byte limit")]
    HelloTooLarge {
        /// Its length.
        len: usize,
        /// The limit ([`MAX_HELLO_LEN`]).
        max: usize,
    },
    /// The envelope carries no message this build knows (empty, or a message
    /// type from a newer wire version).
    #[error("frame carries no known message (empty envelope, or a message type from a newer wire version)")]
    EmptyEnvelope,
}

/// Appends the varint length prefix and the encoded `msg` to `dst`.
///
/// The caller is responsible for keeping messages below [`MAX_FRAME_LEN`]
/// (records are limited to [`MAX_RECORD_PAYLOAD`]); the peer rejects bigger
/// frames.
pub fn encode_frame(msg: &pb::Envelope, dst: &mut BytesMut) {
    let len = msg.encoded_len();
    dst.reserve(len + MAX_VARINT_LEN);
    // A BytesMut grows on demand, so prost's "buffer too small" error cannot
    // happen here.
    let res = msg.encode_length_delimited(dst);
    debug_assert!(res.is_ok(), "encoding into a BytesMut cannot fail");
}

/// Record payloads from this size on are not copied into the frame buffer:
/// see [`encode_frame_parts`]. Copying a 4 KiB payload costs little, but the
/// frame buffer it is copied into stays alive until the peer acknowledges
/// the packets, so the sender keeps allocating fresh ones.
pub const ZERO_COPY_PAYLOAD: usize = 2 * 1024;

/// Tag of `Envelope.record` and of `Record.payload` in replication.proto.
const ENVELOPE_RECORD_TAG: u32 = 5;
const RECORD_PAYLOAD_TAG: u32 = 9;

/// Like [`encode_frame`], but a record's payload (from
/// [`ZERO_COPY_PAYLOAD`] bytes) is not copied: the frame is `dst`'s new
/// bytes followed by the returned payload, which the caller sends right
/// after them. The payload field is encoded last instead of in tag order,
/// which protobuf decoders accept: the frame decodes to the same message.
pub fn encode_frame_parts(body: pb::envelope::Body, dst: &mut BytesMut) -> Option<Bytes> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    match body {
        pb::envelope::Body::Record(mut rec) if rec.payload.len() >= ZERO_COPY_PAYLOAD => {
            let payload = std::mem::take(&mut rec.payload);
            let payload_len = payload.len() as u64;
            let head_len = rec.encoded_len();
            let rec_len =
                head_len as u64 + (key_len(RECORD_PAYLOAD_TAG) + encoded_len_varint(payload_len)) as u64 + payload_len;
            let env_len = (key_len(ENVELOPE_RECORD_TAG) + encoded_len_varint(rec_len)) as u64 + rec_len;
            dst.reserve(head_len + 4 * MAX_VARINT_LEN + 2);
            encode_varint(env_len, dst);
            encode_key(ENVELOPE_RECORD_TAG, WireType::LengthDelimited, dst);
            encode_varint(rec_len, dst);
            rec.encode_raw(dst);
            encode_key(RECORD_PAYLOAD_TAG, WireType::LengthDelimited, dst);
            encode_varint(payload_len, dst);
            Some(payload)
        }
        body => {
            encode_frame(&envelope(body), dst);
            None
        }
    }
}

/// Encodes `msg` as a single frame into a fresh buffer.
pub fn frame_bytes(msg: &pb::Envelope) -> Bytes {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf);
    buf.freeze()
}

/// Wraps a message body in an [`pb::Envelope`].
pub fn envelope(body: pb::envelope::Body) -> pb::Envelope {
    pb::Envelope { body: Some(body) }
}

/// The kind of a message, for log lines and errors: never its contents,
/// which from a peer may be megabytes.
pub fn body_kind(body: &pb::envelope::Body) -> &'static str {
    use pb::envelope::Body;
    match body {
        Body::Hello(_) => "Hello",
        Body::HelloReply(_) => "HelloReply",
        Body::OpenGroup(_) => "OpenGroup",
        Body::OpenGroupReply(_) => "OpenGroupReply",
        Body::Record(_) => "Record",
        Body::Ack(_) => "Ack",
        Body::Flush(_) => "FlushRequest",
        Body::Command(_) => "GroupCommand",
        Body::CommandReply(_) => "CommandReply",
        Body::Error(_) => "Error",
        Body::VerifyRequest(_) => "VerifyRequest",
        Body::VerifyReply(_) => "VerifyReply",
        Body::PairQuery(_) => "PairQuery",
        Body::PairQueryReply(_) => "PairQueryReply",
    }
}

/// Longest peer-supplied text (an error, a refusal, a node name) kept for a
/// log line, an error or `status`.
pub const PEER_TEXT_LIMIT: usize = 1024;

/// `text` from a peer, cut to [`PEER_TEXT_LIMIT`] characters ("..." marks
/// a cut).
pub fn peer_text(text: &str) -> String {
    match text.char_indices().nth(PEER_TEXT_LIMIT) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// Alignment in memory of a large record's payload as decoded (see the
/// module documentation): the block size of direct I/O.
pub const PAYLOAD_ALIGN: usize = 4096;

/// Frames from this size on are assembled in a buffer of their own.
const OWN_BUFFER_FRAME: usize = 16 * 1024;

/// A large frame gets its own buffer once `1 / OWN_BUFFER_AFTER` of it has
/// arrived (bounding what an announced but unsent frame costs).
const OWN_BUFFER_AFTER: usize = 4;

/// Memory aligned to [`PAYLOAD_ALIGN`] for the end of large frames (module
/// doc); its contents until written are unspecified.
pub trait AlignedMemory: AsRef<[u8]> + AsMut<[u8]> + Send + 'static {
    /// A buffer of exactly `len` bytes starting on a [`PAYLOAD_ALIGN`]
    /// boundary.
    fn for_overwrite(len: usize) -> Self;
}

/// [`AlignedMemory`] from the heap, a fresh allocation each time.
pub struct HeapAligned {
    vec: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedMemory for HeapAligned {
    fn for_overwrite(len: usize) -> Self {
        let vec = vec![0; len + PAYLOAD_ALIGN];
        let at = (PAYLOAD_ALIGN - vec.as_ptr() as usize % PAYLOAD_ALIGN) % PAYLOAD_ALIGN;
        HeapAligned { vec, at, len }
    }
}

impl fmt::Debug for HeapAligned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapAligned").field("len", &self.len).finish()
    }
}

impl AsRef<[u8]> for HeapAligned {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.at..self.at + self.len]
    }
}

impl AsMut<[u8]> for HeapAligned {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.at..self.at + self.len]
    }
}

/// A large frame being received into its own buffers: its first
/// `len % PAYLOAD_ALIGN` bytes in `head`, the rest in the aligned `tail`,
/// `tail_filled` bytes of it so far.
struct LargeFrame<M> {
    head: BytesMut,
    head_len: usize,
    tail: M,
    tail_filled: usize,
}

impl<M: AlignedMemory> LargeFrame<M> {
    fn new(len: usize) -> Self {
        let head_len = len % PAYLOAD_ALIGN;
        Self {
            head: BytesMut::with_capacity(head_len),
            head_len,
            tail: M::for_overwrite(len - head_len),
            tail_filled: 0,
        }
    }

    fn received(&self) -> usize {
        self.head.len() + self.tail_filled
    }

    fn missing(&self) -> usize {
        self.head_len + self.tail.as_ref().len() - self.received()
    }

    /// Appends what `data` holds of the frame; returns the rest.
    fn fill<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let (head, data) = data.split_at((self.head_len - self.head.len()).min(data.len()));
        // Within the capacity reserved in `new`: never reallocates.
        self.head.extend_from_slice(head);
        let tail = self.tail.as_mut();
        let (mine, rest) = data.split_at((tail.len() - self.tail_filled).min(data.len()));
        tail[self.tail_filled..self.tail_filled + mine.len()].copy_from_slice(mine);
        self.tail_filled += mine.len();
        rest
    }

    /// The frame's bytes received so far, without taking them.
    fn bytes(&self) -> bytes::buf::Chain<&[u8], &[u8]> {
        self.head.as_ref().chain(&self.tail.as_ref()[..self.tail_filled])
    }

    /// The whole frame, as the two parts in order.
    fn into_frame(self) -> bytes::buf::Chain<Bytes, Bytes> {
        self.head.freeze().chain(Bytes::from_owner(self.tail))
    }
}

impl<M> fmt::Debug for LargeFrame<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LargeFrame").field("head", &self.head.len()).field("tail_filled", &self.tail_filled).finish()
    }
}

/// Incremental frame decoder. `M` is the memory large frames end in
/// ([`AlignedMemory`]).
///
/// Read socket bytes into [`buffer_mut`](Self::buffer_mut) (for example with
/// tokio's `read_buf`) or push them with
/// [`extend_from_slice`](Self::extend_from_slice), then call
/// [`decode`](Self::decode) until it returns `Ok(None)`.
#[derive(Debug)]
pub struct FrameDecoder<M = HeapAligned> {
    buffer: BytesMut,
    /// Body length of the frame whose prefix has already been consumed.
    pending_len: Option<usize>,
    /// That frame, when large and a quarter of it has arrived (then
    /// `buffer` holds nothing of it).
    large: Option<LargeFrame<M>>,
    /// Sticky error: once the stream is broken it stays broken.
    failed: Option<WireError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// Creates an empty decoder whose large frames end in fresh heap memory.
    pub fn new() -> Self {
        Self::with_memory()
    }
}

impl<M: AlignedMemory> FrameDecoder<M> {
    /// Creates an empty decoder whose large frames end in `M`.
    pub fn with_memory() -> Self {
        FrameDecoder { buffer: BytesMut::new(), pending_len: None, large: None, failed: None }
    }

    /// The receive buffer; append socket bytes to it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    /// Appends received bytes: straight into a large frame's own buffer
    /// while one is being received, else into the common buffer, which
    /// grows with what arrives, never ahead of it.
    pub fn extend_from_slice(&mut self, mut data: &[u8]) {
        if let Some(frame) = self.large.as_mut().filter(|_| self.buffer.is_empty()) {
            data = frame.fill(data);
        }
        self.buffer.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as frames (excluding an already
    /// consumed length prefix).
    pub fn buffered_len(&self) -> usize {
        self.buffer.len() + self.large.as_ref().map_or(0, LargeFrame::received)
    }

    /// Decodes the next complete frame. `Ok(None)` means more bytes are
    /// needed.
    pub fn decode(&mut self) -> Result<Option<pb::Envelope>, WireError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.decode_inner() {
            Ok(v) => Ok(v),
            Err(err) => {
                self.failed = Some(err.clone());
                Err(err)
            }
        }
    }

    fn decode_inner(&mut self) -> Result<Option<pb::Envelope>, WireError> {
        let len = match self.pending_len {
            Some(len) => len,
            None => {
                let Some((len, prefix_len)) = parse_varint(&self.buffer)? else {
                    return Ok(None);
                };
                if len > MAX_FRAME_LEN as u64 {
                    return Err(WireError::FrameTooLarge { len, max: MAX_FRAME_LEN });
                }
                self.buffer.advance(prefix_len);
                // Bounded by MAX_FRAME_LEN just above.
                let len = usize::try_from(len).map_err(|_| WireError::FrameTooLarge { len, max: MAX_FRAME_LEN })?;
                // Nothing is reserved for the body here: a peer may announce
                // a maximal frame and send nothing more (see
                // `extend_from_slice` for how the buffer grows instead).
                self.pending_len = Some(len);
                len
            }
        };
        let decoded = if len < OWN_BUFFER_FRAME {
            if self.buffer.len() < len {
                return Ok(None);
            }
            check_fields(&self.buffer[..len])?;
            pb::Envelope::decode(self.buffer.split_to(len).freeze())
        } else {
            let mut frame = match self.large.take() {
                Some(frame) => frame,
                None if self.buffer.len() * OWN_BUFFER_AFTER < len => return Ok(None),
                None => LargeFrame::new(len),
            };
            let rest = frame.fill(&self.buffer).len();
            self.buffer.advance(self.buffer.len() - rest);
            if frame.missing() > 0 {
                self.large = Some(frame);
                return Ok(None);
            }
            check_fields(frame.bytes())?;
            pb::Envelope::decode(frame.into_frame())
        };
        self.pending_len = None;
        let env = decoded.map_err(|e| WireError::Decode(e.to_string()))?;
        if env.body.is_none() {
            return Err(WireError::EmptyEnvelope);
        }
        Ok(Some(env))
    }
}

/// Parses a varint at the start of `buf`: `Ok(None)` if incomplete, else the
/// value and the number of bytes it occupies.
/// Checks a frame's shape before it is decoded (module documentation):
/// at most [`MAX_FRAME_FIELDS`] fields in the envelope and the messages it
/// carries, a `Hello` of at most [`MAX_HELLO_LEN`] bytes. A frame whose
/// fields run past its end is refused here, as the decoder would.
fn check_fields(mut frame: impl Buf) -> Result<(), WireError> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let malformed = |e: prost::DecodeError| WireError::Decode(e.to_string());
    let (mut fields, mut hello_len) = (0usize, 0usize);
    while frame.has_remaining() {
        let (tag, wire_type) = decode_key(&mut frame).map_err(malformed)?;
        fields += 1;
        if wire_type != WireType::LengthDelimited {
            skip_field(wire_type, &mut frame)?;
        } else {
            let len = length(decode_varint(&mut frame).map_err(malformed)?, frame.remaining())?;
            if tag == ENVELOPE_HELLO_TAG {
                // Several Hellos in one envelope merge into one (their
                // version lists appended): counted together.
                hello_len += len;
                if hello_len > MAX_HELLO_LEN {
                    return Err(WireError::HelloTooLarge { len: hello_len, max: MAX_HELLO_LEN });
                }
            }
            // A message the envelope carries: count its fields (list
            // elements among them), not those inside them.
            let mut body = (&mut frame).take(len);
            while body.has_remaining() {
                let (_, wire_type) = decode_key(&mut body).map_err(malformed)?;
                fields += 1;
                if fields > MAX_FRAME_FIELDS {
                    return Err(WireError::TooManyFields { max: MAX_FRAME_FIELDS });
                }
                skip_field(wire_type, &mut body)?;
            }
        }
        if fields > MAX_FRAME_FIELDS {
            return Err(WireError::TooManyFields { max: MAX_FRAME_FIELDS });
        }
    }
    Ok(())
}

/// Steps over a field's value (its key already read).
fn skip_field(wire_type: prost::encoding::WireType, buf: &mut impl Buf) -> Result<(), WireError> {
    use prost::encoding::{decode_varint, WireType};
    let malformed = |e: prost::DecodeError| WireError::Decode(e.to_string());
    let len = match wire_type {
        WireType::Varint => return decode_varint(buf).map(drop).map_err(malformed),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => decode_varint(buf).map_err(malformed)?,
        WireType::StartGroup | WireType::EndGroup => {
            return Err(WireError::Decode("protobuf groups are not part of the replication protocol".into()))
        }
    };
    let len = length(len, buf.remaining())?;
    buf.advance(len);
    Ok(())
}

/// A field's length, if the frame holds that many more bytes.
fn length(len: u64, remaining: usize) -> Result<usize, WireError> {
    match usize::try_from(len) {
        Ok(len) if len <= remaining => Ok(len),
        _ => Err(WireError::Decode(format!("a field of {len} bytes runs past the end of its frame"))),
    }
}

fn parse_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, WireError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && b > 1 {
            return Err(WireError::BadLengthPrefix);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        return Err(WireError::BadLengthPrefix);
    }
    Ok(None)
}

/// No wire version is spoken by both sides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no common wire version: we speak {ours:?}, the peer speaks {theirs:?}")]
pub struct VersionMismatch {
    /// Versions we speak.
    pub ours: Vec<u32>,
    /// Versions the peer speaks.
    pub theirs: Vec<u32>,
}

/// Picks the highest version both sides speak.
pub fn negotiate_version(ours: &[u32], theirs: &[u32]) -> Result<u32, VersionMismatch> {
    ours.iter()
        .copied()
        .filter(|v| theirs.contains(v))
        .max()
        .ok_or_else(|| VersionMismatch { ours: ours.to_vec(), theirs: theirs.to_vec() })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pb::envelope::Body;
    use proptest::prelude::*;

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn arb_body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (proptest::collection::vec(any::<u32>(), 0..4), ".{0,12}", ".{0,12}")
                .prop_map(|(versions, node, software)| Body::Hello(pb::Hello { versions, node, software })),
            (any::<u32>(), ".{0,12}", ".{0,12}")
                .prop_map(|(version, node, error)| { Body::HelloReply(pb::HelloReply { version, node, error }) }),
            (
                ".{0,12}",
                any::<u64>(),
                0i32..3,
                proptest::collection::vec((".{0,8}", any::<u64>()), 0..4),
                0i32..6,
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(
                    |(group, generation, mode, vols, intent, pair_id, rebase_seq, copy_bytes, last_seq)| {
                        Body::OpenGroup(pb::OpenGroup {
                            group,
                            generation,
                            mode,
                            volumes: vols.into_iter().map(|(name, size)| pb::VolumeInfo { name, size }).collect(),
                            intent,
                            pair_id,
                            rebase_seq,
                            copy_bytes,
                            last_seq,
                            epoch: generation / 2,
                            admin_resync: pair_id % 2 == 0,
                            swap: pair_id % 3 == 0,
                            promoted: generation % 2 == 0,
                            takeover_seq: rebase_seq / 2,
                            takeover_epoch: generation / 3,
                            rebased: copy_bytes % 2 == 0,
                            sender_state: "primary PAIR".into(),
                        })
                    }
                ),
            (
                ".{0,12}",
                any::<u64>(),
                any::<u64>(),
                0i32..12,
                proptest::collection::vec(any::<(u32, u64, u64)>(), 0..4)
            )
                .prop_map(|(error, durable_seq, generation, refusal, extents)| {
                    let divergent = extents
                        .into_iter()
                        .map(|(volume, offset, length)| pb::Extent { volume, offset, length })
                        .collect();
                    let state = "secondary COPY".to_string();
                    Body::OpenGroupReply(pb::OpenGroupReply {
                        error,
                        durable_seq,
                        generation,
                        refusal,
                        divergent,
                        state,
                    })
                }),
            (
                ".{0,12}",
                any::<u64>(),
                any::<u32>(),
                0i32..5,
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                arb_bytes(300),
                any::<bool>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(
                    |(
                        group,
                        seq,
                        volume,
                        op,
                        offset,
                        length,
                        generation,
                        crc32,
                        payload,
                        fua,
                        copy_index,
                        written_at_us,
                    )| {
                        Body::Record(pb::Record {
                            group,
                            seq,
                            volume,
                            op,
                            offset,
                            length,
                            generation,
                            crc32,
                            payload,
                            fua,
                            copy_index,
                            written_at_us,
                            hash_span: length / 16,
                        })
                    }
                ),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d, e)| {
                Body::Ack(pb::Ack {
                    received_seq: a,
                    applied_seq: b,
                    durable_seq: c,
                    copy_durable: d,
                    checkpoint_seq: e,
                    copy_mismatch: vec![pb::CopyMismatch { copy_index: d / 2, offset: a, length: b }],
                })
            }),
            any::<u64>().prop_map(|seq| Body::Flush(pb::FlushRequest { seq })),
            (0i32..7, any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(command, seq, bytes, rw)| {
                Body::Command(pb::GroupCommand {
                    command,
                    seq,
                    bytes,
                    rw,
                    at_us: seq / 3,
                    force: rw,
                    state: "primary PAIR".into(),
                    copy_total: bytes,
                    copy_done: seq,
                    copy_sent: bytes / 2,
                })
            }),
            (0i32..3, ".{0,12}", any::<bool>(), any::<u64>()).prop_map(|(command, error, refused, seq)| {
                Body::CommandReply(pb::CommandReply { command, error, refused, seq })
            }),
            ".{0,20}".prop_map(|message| Body::Error(pb::Error { message })),
        ]
    }

    /// Feeds `data` to a fresh decoder in chunks of the given sizes and
    /// returns every decoded envelope.
    fn decode_chunked(data: &[u8], chunks: &[usize]) -> Result<Vec<pb::Envelope>, WireError> {
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = if chunks.is_empty() { rest.len() } else { chunks[i % chunks.len()].clamp(1, rest.len()) };
            i += 1;
            dec.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(env) = dec.decode()? {
                out.push(env);
            }
        }
        assert_eq!(dec.buffered_len(), 0);
        Ok(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn frames_with_the_payload_apart_decode_to_the_same_message(
            bodies in proptest::collection::vec(arb_body(), 1..4),
            payloads in proptest::collection::vec((0usize..70_000, any::<u8>(), any::<u64>()), 1..4),
            chunks in proptest::collection::vec(1usize..70_000, 0..8),
        ) {
            // Large and small records among other messages.
            let mut all: Vec<Body> = bodies;
            for (len, fill, seq) in payloads {
                let payload = Bytes::from(vec![fill; len]);
                let crc32 = crate::record::crc32(&payload);
                all.push(Body::Record(pb::Record {
                    group: "g".into(), seq, volume: 1, op: 4, offset: seq / 3, length: len as u32,
                    generation: 2, crc32, payload, fua: seq % 2 == 0, copy_index: seq / 5,
                    written_at_us: seq / 7, hash_span: 0,
                }));
            }
            let big = |b: &Body| matches!(b, Body::Record(r) if r.payload.len() >= ZERO_COPY_PAYLOAD);
            let expected_apart = all.iter().filter(|b| big(b)).count();
            let mut wire = BytesMut::new();
            let mut apart = 0;
            for body in all.clone() {
                let mut head = BytesMut::new();
                if let Some(payload) = encode_frame_parts(body, &mut head) {
                    apart += 1;
                    wire.extend_from_slice(&head);
                    wire.extend_from_slice(&payload);
                } else {
                    wire.extend_from_slice(&head);
                }
            }
            let got = decode_chunked(&wire, &chunks).expect("valid frames decode");
            let want: Vec<pb::Envelope> = all.into_iter().map(envelope).collect();
            prop_assert_eq!(apart, expected_apart, "every large payload goes apart, no other");
            prop_assert_eq!(got, want);
        }

        #[test]
        fn round_trip_any_split(
            bodies in proptest::collection::vec(arb_body(), 1..6),
            chunks in proptest::collection::vec(1usize..64, 0..8),
        ) {
            let envs: Vec<pb::Envelope> = bodies.into_iter().map(envelope).collect();
            let mut buf = BytesMut::new();
            for e in &envs {
                encode_frame(e, &mut buf);
            }
            let got = decode_chunked(&buf, &chunks).expect("valid frames decode");
            prop_assert_eq!(got, envs);
        }

        #[test]
        fn byte_flips_never_panic(
            body in arb_body(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            chunks in proptest::collection::vec(1usize..16, 0..4),
        ) {
            let mut buf = BytesMut::new();
            encode_frame(&envelope(body), &mut buf);
            let mut data = buf.to_vec();
            for (idx, x) in flips {
                let i = idx.index(data.len());
                data[i] ^= x;
            }
            let mut dec = FrameDecoder::new();
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = if chunks.is_empty() { rest.len() } else { chunks[i % chunks.len()].clamp(1, rest.len()) };
                i += 1;
                dec.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match dec.decode() {
                        Ok(Some(env)) => {
                            if let Some(Body::Record(r)) = env.body {
                                let _ = crate::record::Record::from_pb(r);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            // Sticky: the next call fails too.
                            prop_assert!(dec.decode().is_err());
                            return Ok(());
                        }
                    }
                }
            }
        }

        #[test]
        fn truncated_frames_wait_for_more(body in arb_body(), cut in any::<prop::sample::Index>()) {
            let mut buf = BytesMut::new();
            encode_frame(&envelope(body), &mut buf);
            let cut = cut.index(buf.len());
            let mut dec = FrameDecoder::new();
            dec.extend_from_slice(&buf[..cut]);
            prop_assert_eq!(dec.decode(), Ok(None));
        }

        #[test]
        fn oversized_prefix_rejected_immediately(len in (MAX_FRAME_LEN as u64 + 1)..=u64::MAX) {
            let mut dec = FrameDecoder::new();
            dec.extend_from_slice(&varint(len));
            prop_assert_eq!(dec.decode(), Err(WireError::FrameTooLarge { len, max: MAX_FRAME_LEN }));
        }

        #[test]
        fn negotiation_picks_highest_common(
            ours in proptest::collection::vec(0u32..8, 0..5),
            theirs in proptest::collection::vec(0u32..8, 0..5),
        ) {
            let common: Vec<u32> = ours.iter().copied().filter(|v| theirs.contains(v)).collect();
            match negotiate_version(&ours, &theirs) {
                Ok(v) => prop_assert_eq!(Some(v), common.iter().copied().max()),
                Err(e) => {
                    prop_assert!(common.is_empty());
                    prop_assert_eq!(e.ours, ours);
                    prop_assert_eq!(e.theirs, theirs);
                }
            }
        }
    }

    /// The longest lists a daemon sends decode; a frame of more elements
    /// than [`MAX_FRAME_FIELDS`] (two bytes each on the wire, tens of bytes
    /// decoded) is refused before it is decoded, in one message or spread
    /// over several of the same kind in one envelope (which protobuf merges).
    #[test]
    fn a_frame_of_too_many_list_elements_is_refused_before_it_is_decoded() {
        let decode_one = |frame: &[u8]| {
            let mut dec = FrameDecoder::new();
            dec.extend_from_slice(frame);
            dec.decode()
        };
        let extent = |i: u64| pb::Extent { volume: (i % 7) as u32, offset: u64::MAX - i, length: u64::MAX / 3 };
        let reply = Body::OpenGroupReply(pb::OpenGroupReply {
            error: "needs a rebase".into(),
            refusal: pb::Refusal::NeedsRebase as i32,
            divergent: (0..crate::divergence::MAX_EXTENTS as u64).map(extent).collect(),
            state: "secondary SUSPENDED".into(),
            ..Default::default()
        });
        let frame = frame_bytes(&envelope(reply.clone()));
        assert_eq!(decode_one(&frame), Ok(Some(envelope(reply))), "the longest divergent list");
        let open = Body::OpenGroup(pb::OpenGroup {
            group: "g".into(),
            volumes: (0..MAX_GROUP_VOLUMES)
                .map(|i| pb::VolumeInfo { name: format!("volume-{i:04}-{}", "v".repeat(50)), size: u64::MAX })
                .collect(),
            ..Default::default()
        });
        let frame = frame_bytes(&envelope(open.clone()));
        assert_eq!(decode_one(&frame), Ok(Some(envelope(open))), "the most volumes");

        // MAX_FRAME_FIELDS + 1 empty extents: 2 bytes each on the wire.
        let hostile = Body::OpenGroupReply(pb::OpenGroupReply {
            divergent: vec![pb::Extent::default(); MAX_FRAME_FIELDS + 1],
            ..Default::default()
        });
        let frame = frame_bytes(&envelope(hostile));
        assert!(frame.len() < 300 * 1024, "{}", frame.len());
        assert_eq!(decode_one(&frame), Err(WireError::TooManyFields { max: MAX_FRAME_FIELDS }));
        // Just at the limit, with the envelope's own field: decodes.
        let at_limit = Body::OpenGroupReply(pb::OpenGroupReply {
            divergent: vec![pb::Extent::default(); MAX_FRAME_FIELDS - 1],
            ..Default::default()
        });
        assert!(decode_one(&frame_bytes(&envelope(at_limit))).is_ok_and(|e| e.is_some()));

        // Three Acks of half the limit each in one envelope: merged by the
        // decoder, so counted together.
        let mut body = BytesMut::new();
        for _ in 0..3 {
            let ack = pb::Envelope {
                body: Some(Body::Ack(pb::Ack {
                    copy_mismatch: vec![pb::CopyMismatch::default(); MAX_FRAME_FIELDS / 2],
                    ..Default::default()
                })),
            };
            ack.encode(&mut body).expect("encode");
        }
        let mut frame = BytesMut::new();
        prost::encoding::encode_varint(body.len() as u64, &mut frame);
        frame.extend_from_slice(&body);
        assert_eq!(decode_one(&frame), Err(WireError::TooManyFields { max: MAX_FRAME_FIELDS }));
    }

    /// A Hello's packed versions decode to four bytes per byte: a Hello
    /// longer than [`MAX_HELLO_LEN`] is refused, also behind a record in
    /// the same envelope.
    #[test]
    fn a_long_hello_is_refused() {
        let hello = |n: usize| {
            Body::Hello(pb::Hello { versions: vec![1; n], node: "site-b".into(), software: "replicator 0.1.0".into() })
        };
        let decode_one = |frame: &[u8]| {
            let mut dec = FrameDecoder::new();
            dec.extend_from_slice(frame);
            dec.decode()
        };
        let ok = hello(64);
        assert_eq!(decode_one(&frame_bytes(&envelope(ok.clone()))), Ok(Some(envelope(ok))));
        let long = envelope(hello(1 << 20));
        let Err(WireError::HelloTooLarge { len, max: MAX_HELLO_LEN }) = decode_one(&frame_bytes(&long)) else {
            panic!("a 1 MiB Hello decoded");
        };
        assert!(len > 1 << 20);

        let mut body = BytesMut::new();
        envelope(Body::Record(pb::Record { seq: 1, ..Default::default() })).encode(&mut body).expect("encode");
        long.encode(&mut body).expect("encode");
        let mut frame = BytesMut::new();
        prost::encoding::encode_varint(body.len() as u64, &mut frame);
        frame.extend_from_slice(&body);
        assert!(matches!(decode_one(&frame), Err(WireError::HelloTooLarge { .. })));

        // Hellos of 2 KiB each, three in one envelope: merged, so counted
        // together.
        let mut body = BytesMut::new();
        for _ in 0..3 {
            envelope(hello(2000)).encode(&mut body).expect("encode");
        }
        let mut frame = BytesMut::new();
        prost::encoding::encode_varint(body.len() as u64, &mut frame);
        frame.extend_from_slice(&body);
        assert!(matches!(decode_one(&frame), Err(WireError::HelloTooLarge { .. })));
    }

    #[test]
    fn max_frame_is_accepted_prefix() {
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&varint(MAX_FRAME_LEN as u64));
        assert_eq!(dec.decode(), Ok(None));
        assert_eq!(dec.buffered_len(), 0);
    }

    #[test]
    fn an_announced_frame_is_not_allocated_before_it_arrives() {
        let big = Body::Error(pb::Error { message: "x".repeat(MAX_FRAME_LEN - 16) });
        let mut frame = BytesMut::new();
        encode_frame(&envelope(big.clone()), &mut frame);
        let (len, prefix) = parse_varint(&frame).unwrap().unwrap();
        assert!(len > (MAX_FRAME_LEN - 64) as u64);

        let held = |dec: &FrameDecoder| {
            dec.buffer.capacity() + dec.large.as_ref().map_or(0, |f| f.head.capacity() + f.tail.as_ref().len())
        };
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&frame[..prefix]);
        assert_eq!(dec.decode(), Ok(None));
        assert!(held(&dec) < 64 * 1024, "reserved {} bytes for an unsent frame", held(&dec));
        dec.extend_from_slice(&frame[prefix..prefix + 1000]);
        assert_eq!(dec.decode(), Ok(None));
        assert!(held(&dec) < 64 * 1024, "reserved {} bytes for 1000 received", held(&dec));

        // The rest arrives in 64 KiB pieces: what the decoder holds stays
        // within four times what has arrived, and the frame decodes whole.
        let mut at = prefix + 1000;
        while at < frame.len() {
            let end = (at + 64 * 1024).min(frame.len());
            dec.extend_from_slice(&frame[at..end]);
            assert!(held(&dec) <= 4 * (end - prefix) + 128 * 1024, "{} held for {} received", held(&dec), end - prefix);
            let decoded = dec.decode().unwrap();
            assert_eq!(decoded.is_some(), end == frame.len());
            if let Some(env) = decoded {
                assert_eq!(env, envelope(big.clone()));
            }
            at = end;
        }
        assert_eq!(dec.decode(), Ok(None));
    }

    #[test]
    fn a_large_payload_is_decoded_aligned_whatever_the_split() {
        for (payload_len, chunk) in [
            (16 * 1024, 1200),
            (64 * 1024, 8952),
            (1 << 20, 1452),
            (1 << 20, 65536),
            (1 << 20, 1 << 21),
            (70_000, 1452),
        ] {
            let payload = Bytes::from((0..payload_len).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let record = pb::Record {
                group: "g".into(),
                seq: 9,
                volume: 1,
                op: 1,
                offset: 1 << 20,
                length: payload_len as u32,
                crc32: crate::record::crc32(&payload),
                payload: payload.clone(),
                ..Default::default()
            };
            // A small frame ahead, so the large one starts mid-buffer.
            let mut wire = BytesMut::new();
            encode_frame(&envelope(Body::Error(pb::Error { message: "ahead".into() })), &mut wire);
            let tail = encode_frame_parts(Body::Record(record.clone()), &mut wire).expect("payload apart");
            wire.extend_from_slice(&tail);
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.extend_from_slice(piece);
                while let Some(env) = dec.decode().unwrap() {
                    got.push(env);
                }
            }
            assert_eq!(got.len(), 2);
            let Some(Body::Record(r)) = &got[1].body else { panic!("not a record") };
            assert!(r.payload == payload, "payload of {payload_len} in chunks of {chunk}");
            // Aligned when a whole number of blocks (a client's write
            // always is); decoded whole either way.
            if payload_len % PAYLOAD_ALIGN == 0 {
                let at = r.payload.as_ptr() as usize % PAYLOAD_ALIGN;
                assert_eq!(at, 0, "payload of {payload_len} in chunks of {chunk}");
            }
            assert_eq!(dec.buffered_len(), 0);
        }
    }

    #[test]
    fn overlong_varint_is_bad_prefix() {
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&[0x80; 10]);
        assert_eq!(dec.decode(), Err(WireError::BadLengthPrefix));
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert_eq!(dec.decode(), Err(WireError::BadLengthPrefix));
        // Nine continuation bytes are still a possible prefix.
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&[0x80; 9]);
        assert_eq!(dec.decode(), Ok(None));
    }

    #[test]
    fn empty_envelope_rejected() {
        let mut buf = BytesMut::new();
        encode_frame(&pb::Envelope { body: None }, &mut buf);
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&buf);
        assert_eq!(dec.decode(), Err(WireError::EmptyEnvelope));
        // Unknown field from a future version: also no known body.
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&[3, 0xf8, 0x01, 0x05]); // field 31, varint 5
        assert_eq!(dec.decode(), Err(WireError::EmptyEnvelope));
    }

    #[test]
    fn garbage_body_is_decode_error() {
        let mut dec = FrameDecoder::new();
        dec.extend_from_slice(&[2, 0x2a, 0x05]); // record field, length 5, missing bytes
        assert!(matches!(dec.decode(), Err(WireError::Decode(_))));
    }

    #[test]
    fn error_texts_are_readable() {
        let e = WireError::FrameTooLarge { len: 99_999_999, max: MAX_FRAME_LEN };
        assert_eq!(e.to_string(), "frame of 99999999 bytes exceeds the 33628160-byte limit");
        let v = negotiate_version(&[1], &[2, 3]).expect_err("no common version");
        assert_eq!(v.to_string(), "no common wire version: we speak [1], the peer speaks [2, 3]");
        assert_eq!(negotiate_version(SUPPORTED_VERSIONS, &[1, 7]), Ok(1));
    }
    #[test]
    fn peer_text_is_cut_to_its_limit() {
        assert_eq!(peer_text("short"), "short");
        let long = "é".repeat(PEER_TEXT_LIMIT + 10);
        let cut = peer_text(&long);
        assert_eq!(cut.chars().count(), PEER_TEXT_LIMIT + 3);
        assert!(cut.ends_with("..."));
        let exact = "x".repeat(PEER_TEXT_LIMIT);
        assert_eq!(peer_text(&exact), exact);
    }
}
