//! The wire format of the frames that follow the handshake (the handshake's `Hello` record is
//! [`hello`](super::hello)'s, re-exported here).
//!
//! Every integer is big-endian. docs/PROTOCOL.md is the normative description; this module and
//! `hello` are its only implementation. Decoding never allocates more than the frame it was given, and a
//! frame header announcing a body larger than the local limit is refused before its body is read.

use super::error::DecodeError;
pub use super::hello::{Features, Hello, HELLO_LEN, MAGIC, VERSION_MAX, VERSION_MIN};
pub use super::options::{OpenOptions, ResumeKey};
use crate::range::{self, Range, RANGES_PER_FRAME, RANGE_WIRE_LEN};
use crate::reason::Reason;
use crate::{VolumeIdentity, MAX_IDENTITY_LEN};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// Size of every frame header.
pub const HEADER_LEN: usize = 12;
/// Longest volume name accepted in OPEN.
pub const MAX_NAME_LEN: usize = 255;
/// Longest human-readable message in REJECT, ABORT and GOAWAY.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Smallest `max_frame` a peer may announce: an OPEN with the longest name must fit.
pub const MIN_MAX_FRAME: u32 = 4096;

/// Body sizes (the bytes after the header) of each frame type's fixed part; `_MIN` ones are
/// followed by a variable part (a name, a message, a payload).
pub mod body {
    /// OPEN: op, flags, name length, zero granularity, size; the name follows.
    pub const OPEN_MIN: usize = 16;
    /// ACCEPT: size.
    pub const ACCEPT: usize = 8;
    /// REJECT and ABORT: reason code; the message follows.
    pub const REASON_MIN: usize = 4;
    /// DATA: offset; the payload follows.
    pub const DATA_MIN: usize = 8;
    /// HOLE: offset, length.
    pub const HOLE: usize = 16;
    /// WINDOW: increment.
    pub const WINDOW: usize = 4;
    /// FINISH: length, digest.
    pub const FINISH: usize = 12;
    /// PING and PONG: opaque data.
    pub const PING: usize = 8;
    /// GOAWAY: last stream, reason code; the message follows.
    pub const GOAWAY_MIN: usize = 8;
}

/// Bytes of a DATA frame besides its payload.
pub const DATA_OVERHEAD: usize = HEADER_LEN + body::DATA_MIN;
/// Bytes of a HOLE frame on the wire, whatever the hole's length.
pub const HOLE_LEN: usize = HEADER_LEN + body::HOLE;
/// Bytes of a FINISH frame on the wire.
pub const FINISH_LEN: usize = HEADER_LEN + body::FINISH;

/// A stream's number on the wire. 0 names the connection (WINDOW, PING, GOAWAY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl StreamId {
    pub const CONNECTION: StreamId = StreamId(0);
    pub fn is_connection(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {}", self.0)
    }
}

/// What the opener of a stream asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The peer reads the named volume and sends it to the opener (a download).
    Read = 1,
    /// The opener sends content that the peer writes into the named volume (an upload).
    Write = 2,
    /// The peer sends its list of volumes as the stream's content (the name is empty).
    List = 3,
    /// The peer sends the allocation map of the named volume as the stream's content.
    Extents = 4,
    /// The peer sends the block digest document of the named volume as the stream's content
    /// (`engine::blockmap`); only with the BLOCK_DIGESTS feature.
    Digests = 5,
}

impl Op {
    /// Whether the peer (not the opener) sends the stream's content.
    pub fn peer_sends(self) -> bool {
        self != Op::Write
    }
}

/// Frame type bytes.
pub(crate) mod kind {
    pub const OPEN: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const REJECT: u8 = 3;
    pub const DATA: u8 = 4;
    pub const HOLE: u8 = 5;
    pub const WINDOW: u8 = 6;
    pub const FINISH: u8 = 7;
    pub const ABORT: u8 = 8;
    pub const PING: u8 = 9;
    pub const PONG: u8 = 10;
    pub const GOAWAY: u8 = 11;
    pub const RANGES: u8 = 12;
}

/// Frames of each type, as a connection counts them when it sends or decodes them. Fixed-size
/// so counting costs an increment, never an allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounts([u64; FrameCounts::NAMES.len()]);

impl FrameCounts {
    /// The frame types in type-byte order (OPEN is 1), named as in docs/PROTOCOL.md.
    pub const NAMES: [&'static str; 12] = [
        "OPEN", "ACCEPT", "REJECT", "DATA", "HOLE", "WINDOW", "FINISH", "ABORT", "PING", "PONG",
        "GOAWAY", "RANGES",
    ];

    /// Frames of the type named `name` (as in [`FrameCounts::NAMES`]); `None` for no such type.
    pub fn get(&self, name: &str) -> Option<u64> {
        let index = Self::NAMES.iter().position(|n| *n == name)?;
        Some(self.0[index])
    }

    /// Every type with its count, in type-byte order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::NAMES.iter().copied().zip(self.0.iter().copied())
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn add(&mut self, other: &FrameCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0.iter()) {
            *mine += theirs;
        }
    }

    pub(crate) fn record(&mut self, kind: u8) {
        if let Some(count) = (kind as usize)
            .checked_sub(1)
            .and_then(|i| self.0.get_mut(i))
        {
            *count += 1;
        }
    }

    /// Counts the frames in bytes this side encoded (whole frames, possibly behind our Hello).
    /// Walking the headers costs less than counting at each of the places that encode.
    pub(crate) fn record_encoded(&mut self, mut bytes: &[u8]) {
        // A frame header cannot start with the magic: its type byte would be `T`, no type.
        if bytes.starts_with(&MAGIC) {
            bytes = &bytes[HELLO_LEN.min(bytes.len())..];
        }
        while bytes.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            self.record(bytes[4]);
            bytes = &bytes[(HEADER_LEN + len).min(bytes.len())..];
        }
    }
}

/// FINISH flag: this FINISH is the receiver's confirmation, not the sender's end of data.
const FLAG_ACK: u8 = 1;
/// FINISH flag: the digest field is meaningful.
const FLAG_DIGEST: u8 = 2;
/// OPEN flag: the sink verifies (`OpenOptions::verify`); here since the options byte is full.
const FLAG_VERIFY: u8 = 1;
/// OPEN flag: the sink writes the volume as a qcow2 image (`OpenOptions::qcow2`).
const FLAG_QCOW2: u8 = 2;
/// OPEN flag: RANGES frames follow (`OpenOptions::ranges`).
const FLAG_RANGES: u8 = 4;
/// OPEN flag: a WRITE that updates the volume; the name is followed by the result's
/// 32-byte volume checksum (`OpenOptions::update`).
const FLAG_UPDATE: u8 = 8;
/// Bytes after the name of an OPEN with UPDATE.
pub const UPDATE_CHECKSUM_LEN: usize = 32;
/// OPEN flag: the stream names a partial upload; a token and the source's identity digest
/// follow the name and any checksum (`OpenOptions::resume`).
const FLAG_RESUME: u8 = 0x10;
/// Bytes of an OPEN's RESUME trailer.
pub const RESUME_KEY_LEN: usize = 64;

/// Bytes an OPEN carries after its name with these header flags.
fn open_trailer(flags: u8) -> usize {
    (if flags & FLAG_UPDATE != 0 {
        UPDATE_CHECKSUM_LEN
    } else {
        0
    }) + if flags & FLAG_RESUME != 0 {
        RESUME_KEY_LEN
    } else {
        0
    }
}
/// RANGES flag: the last frame of the stream's list.
const FLAG_LAST: u8 = 1;
/// ACCEPT flag: the volume's identity follows the size (feature IDENTITY).
const FLAG_IDENTITY: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Open {
        stream: StreamId,
        op: Op,
        options: OpenOptions,
        /// For `Op::Write`, the logical length of the content to come; 0 for `Op::Read`.
        size: u64,
        name: String,
    },
    Accept {
        stream: StreamId,
        /// The volume's logical length: what the data sender will send.
        size: u64,
        /// For a READ between peers with feature IDENTITY: the volume's identity, if the
        /// server knows one.
        identity: Option<VolumeIdentity>,
    },
    Reject {
        stream: StreamId,
        reason: Reason,
        message: String,
    },
    Data {
        stream: StreamId,
        offset: u64,
        payload: Bytes,
    },
    Hole {
        stream: StreamId,
        offset: u64,
        len: u64,
    },
    Window {
        stream: StreamId,
        increment: u32,
    },
    Finish {
        stream: StreamId,
        length: u64,
        digest: Option<u32>,
        ack: bool,
    },
    Abort {
        stream: StreamId,
        reason: Reason,
        message: String,
    },
    Ping {
        data: u64,
    },
    Pong {
        data: u64,
    },
    GoAway {
        last_stream: StreamId,
        reason: Reason,
        message: String,
    },
    /// Part of the range list of a READ whose OPEN had the RANGES flag; `last` closes it. At
    /// most [`RANGES_PER_FRAME`] ranges (encoding drops the rest: split longer lists).
    Ranges {
        stream: StreamId,
        last: bool,
        ranges: Vec<Range>,
    },
}

/// Payloads shorter than this are copied out of the receive buffer instead of sharing it, so a
/// stalled stream holding a few small payloads cannot pin many large receive buffers.
const SHARE_PAYLOAD_MIN: usize = 16 * 1024;

impl Frame {
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Open { stream, .. }
            | Frame::Accept { stream, .. }
            | Frame::Reject { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Hole { stream, .. }
            | Frame::Window { stream, .. }
            | Frame::Finish { stream, .. }
            | Frame::Abort { stream, .. }
            | Frame::Ranges { stream, .. } => *stream,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::GoAway { .. } => StreamId::CONNECTION,
        }
    }

    /// The frame's type byte on the wire.
    pub(crate) fn kind(&self) -> u8 {
        match self {
            Frame::Open { .. } => kind::OPEN,
            Frame::Accept { .. } => kind::ACCEPT,
            Frame::Reject { .. } => kind::REJECT,
            Frame::Data { .. } => kind::DATA,
            Frame::Hole { .. } => kind::HOLE,
            Frame::Window { .. } => kind::WINDOW,
            Frame::Finish { .. } => kind::FINISH,
            Frame::Abort { .. } => kind::ABORT,
            Frame::Ping { .. } => kind::PING,
            Frame::Pong { .. } => kind::PONG,
            Frame::GoAway { .. } => kind::GOAWAY,
            Frame::Ranges { .. } => kind::RANGES,
        }
    }

    /// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means more bytes are
    /// needed; nothing is consumed then. A header announcing more than `max_body` is refused at
    /// once, before its body arrives.
    pub fn decode(buf: &mut BytesMut, max_body: u32) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = &buf[..HEADER_LEN];
        let len = h.get_u32();
        let kind = h.get_u8();
        let flags = h.get_u8();
        let reserved = h.get_u16();
        let stream = StreamId(h.get_u32());
        if len > max_body {
            return Err(DecodeError::FrameTooLarge { len, max: max_body });
        }
        if reserved != 0 {
            return Err(DecodeError::NonZeroReserved);
        }
        check_shape(kind, flags, len, stream)?;
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let body = buf.split_to(len as usize);
        parse_body(kind, flags, stream, body).map(Some)
    }

    /// Encodes a frame that has no bulk payload (everything but DATA) into `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Open {
                stream,
                op,
                options,
                size,
                name,
            } => {
                let flags = if options.verify() { FLAG_VERIFY } else { 0 }
                    | if options.qcow2() { FLAG_QCOW2 } else { 0 }
                    | if options.ranges() { FLAG_RANGES } else { 0 }
                    | if options.update().is_some() {
                        FLAG_UPDATE
                    } else {
                        0
                    }
                    | if options.resume().is_some() {
                        FLAG_RESUME
                    } else {
                        0
                    };
                let len = body::OPEN_MIN + name.len() + open_trailer(flags);
                put_header(out, kind::OPEN, flags, *stream, len);
                out.put_u8(*op as u8);
                out.put_u8(options.wire_flags());
                out.put_u16(name.len() as u16);
                out.put_u32(options.zero_granularity());
                out.put_u64(*size);
                out.put_slice(name.as_bytes());
                if let Some(checksum) = options.update() {
                    out.put_slice(&checksum);
                }
                if let Some(key) = options.resume() {
                    out.put_slice(&key.token);
                    out.put_slice(&key.source);
                }
            }
            Frame::Accept {
                stream,
                size,
                identity,
            } => {
                let id = identity.as_ref().map_or(&[][..], |i| i.as_bytes());
                let flags = if identity.is_some() { FLAG_IDENTITY } else { 0 };
                put_header(out, kind::ACCEPT, flags, *stream, body::ACCEPT + id.len());
                out.put_u64(*size);
                out.put_slice(id);
            }
            Frame::Reject {
                stream,
                reason,
                message,
            } => put_reason(out, kind::REJECT, *stream, *reason, message),
            Frame::Data {
                stream,
                offset,
                payload,
            } => {
                encode_data_header(out, *stream, *offset, payload.len());
                out.put_slice(payload);
            }
            Frame::Hole {
                stream,
                offset,
                len,
            } => {
                put_header(out, kind::HOLE, 0, *stream, body::HOLE);
                out.put_u64(*offset);
                out.put_u64(*len);
            }
            Frame::Window { stream, increment } => {
                put_header(out, kind::WINDOW, 0, *stream, body::WINDOW);
                out.put_u32(*increment);
            }
            Frame::Finish {
                stream,
                length,
                digest,
                ack,
            } => {
                let mut flags = 0;
                if *ack {
                    flags |= FLAG_ACK;
                }
                if digest.is_some() {
                    flags |= FLAG_DIGEST;
                }
                put_header(out, kind::FINISH, flags, *stream, body::FINISH);
                out.put_u64(*length);
                out.put_u32(digest.unwrap_or(0));
            }
            Frame::Abort {
                stream,
                reason,
                message,
            } => put_reason(out, kind::ABORT, *stream, *reason, message),
            Frame::Ping { data } => {
                put_header(out, kind::PING, 0, StreamId::CONNECTION, body::PING);
                out.put_u64(*data);
            }
            Frame::Pong { data } => {
                put_header(out, kind::PONG, 0, StreamId::CONNECTION, body::PING);
                out.put_u64(*data);
            }
            Frame::GoAway {
                last_stream,
                reason,
                message,
            } => {
                let message = clip_message(message);
                put_header(
                    out,
                    kind::GOAWAY,
                    0,
                    StreamId::CONNECTION,
                    body::GOAWAY_MIN + message.len(),
                );
                out.put_u32(last_stream.0);
                out.put_u32(reason.code());
                out.put_slice(message.as_bytes());
            }
            Frame::Ranges {
                stream,
                last,
                ranges,
            } => {
                let flags = if *last { FLAG_LAST } else { 0 };
                let n = ranges.len().min(RANGES_PER_FRAME);
                put_header(out, kind::RANGES, flags, *stream, n * RANGE_WIRE_LEN);
                range::put_ranges(out, ranges);
            }
        }
    }
}

/// Writes the header and offset of a DATA frame whose `payload_len` payload bytes follow
/// separately (the payload goes to the socket by writev, never copied into `out`).
pub fn encode_data_header(out: &mut BytesMut, stream: StreamId, offset: u64, payload_len: usize) {
    put_header(out, kind::DATA, 0, stream, body::DATA_MIN + payload_len);
    out.put_u64(offset);
}

fn put_header(out: &mut BytesMut, kind: u8, flags: u8, stream: StreamId, body_len: usize) {
    out.reserve(HEADER_LEN + body_len.min(64));
    out.put_u32(body_len as u32);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u16(0);
    out.put_u32(stream.0);
}

fn clip_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_LEN {
        return message;
    }
    let mut end = MAX_MESSAGE_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

fn put_reason(out: &mut BytesMut, kind: u8, stream: StreamId, reason: Reason, message: &str) {
    let message = clip_message(message);
    put_header(out, kind, 0, stream, body::REASON_MIN + message.len());
    out.put_u32(reason.code());
    out.put_slice(message.as_bytes());
}

/// Checks what the header alone can tell, so an impossible frame is refused before its body.
fn check_shape(kind: u8, flags: u8, len: u32, stream: StreamId) -> Result<(), DecodeError> {
    // An unknown type has no flag or stream-id rules to break: name the real problem.
    if !(kind::OPEN..=kind::RANGES).contains(&kind) {
        return Err(DecodeError::UnknownKind(kind));
    }
    let len = len as usize;
    let bad_len = || DecodeError::BadLength {
        kind,
        len: len as u32,
    };
    let fixed = |want: usize| if len == want { Ok(()) } else { Err(bad_len()) };
    let at_least = |min: usize, extra_max: usize| {
        if len >= min && len - min <= extra_max {
            Ok(())
        } else {
            Err(bad_len())
        }
    };
    let allowed_flags = match kind {
        kind::FINISH => FLAG_ACK | FLAG_DIGEST,
        kind::OPEN => FLAG_VERIFY | FLAG_QCOW2 | FLAG_RANGES | FLAG_UPDATE | FLAG_RESUME,
        kind::RANGES => FLAG_LAST,
        kind::ACCEPT => FLAG_IDENTITY,
        _ => 0,
    };
    if flags & !allowed_flags != 0 {
        return Err(DecodeError::UnknownFlags { kind, flags });
    }
    let connection_level = matches!(kind, kind::PING | kind::PONG | kind::GOAWAY);
    if connection_level && !stream.is_connection() {
        return Err(DecodeError::StreamIdNonZero { kind });
    }
    let needs_stream = !connection_level && kind != kind::WINDOW;
    if needs_stream && stream.is_connection() {
        return Err(DecodeError::StreamIdZero { kind });
    }
    match kind {
        kind::OPEN => at_least(body::OPEN_MIN + open_trailer(flags), MAX_NAME_LEN),
        kind::ACCEPT if flags & FLAG_IDENTITY != 0 => {
            at_least(body::ACCEPT + 1, MAX_IDENTITY_LEN - 1)
        }
        kind::ACCEPT => fixed(body::ACCEPT),
        kind::REJECT | kind::ABORT => at_least(body::REASON_MIN, MAX_MESSAGE_LEN),
        // The header's length is a u32: any payload it can announce is allowed.
        kind::DATA => at_least(body::DATA_MIN, usize::MAX),
        kind::HOLE => fixed(body::HOLE),
        kind::WINDOW => fixed(body::WINDOW),
        kind::FINISH => fixed(body::FINISH),
        kind::PING | kind::PONG => fixed(body::PING),
        kind::GOAWAY => at_least(body::GOAWAY_MIN, MAX_MESSAGE_LEN),
        kind::RANGES if len.is_multiple_of(RANGE_WIRE_LEN) => {
            at_least(RANGE_WIRE_LEN, (RANGES_PER_FRAME - 1) * RANGE_WIRE_LEN)
        }
        kind::RANGES => Err(bad_len()),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn parse_body(
    kind: u8,
    flags: u8,
    stream: StreamId,
    mut body: BytesMut,
) -> Result<Frame, DecodeError> {
    Ok(match kind {
        kind::OPEN => {
            let op = match body.get_u8() {
                1 => Op::Read,
                2 => Op::Write,
                3 => Op::List,
                4 => Op::Extents,
                5 => Op::Digests,
                other => return Err(DecodeError::BadOp(other)),
            };
            let verify = flags & FLAG_VERIFY != 0;
            let qcow2 = flags & FLAG_QCOW2 != 0;
            let ranges = flags & FLAG_RANGES != 0;
            let update = flags & FLAG_UPDATE != 0;
            let resume = flags & FLAG_RESUME != 0;
            let flags = body.get_u8();
            let name_len = body.get_u16() as usize;
            let options = OpenOptions::from_wire(flags, body.get_u32())
                .ok_or(DecodeError::UnknownFlags { kind, flags })?
                .with_verify(verify)
                .with_qcow2(qcow2)
                .with_ranges(ranges);
            let size = body.get_u64();
            // The frame's length was checked to hold the trailers; the last one first.
            let key = resume.then(|| {
                let key = body.split_off(body.len() - RESUME_KEY_LEN);
                let (mut token, mut source) = ([0u8; 32], [0u8; 32]);
                token.copy_from_slice(&key[..32]);
                source.copy_from_slice(&key[32..]);
                ResumeKey { token, source }
            });
            let checksum = update.then(|| body.split_off(body.len() - UPDATE_CHECKSUM_LEN));
            let options = options.with_update(checksum.map(|c| {
                let mut sum = [0u8; UPDATE_CHECKSUM_LEN];
                sum.copy_from_slice(&c);
                sum
            }));
            let options = options.with_resume(key);
            if name_len != body.len() || (name_len == 0) != (op == Op::List) {
                return Err(DecodeError::BadName);
            }
            let name = String::from_utf8(body.to_vec()).map_err(|_| DecodeError::BadName)?;
            Frame::Open {
                stream,
                op,
                options,
                size,
                name,
            }
        }
        kind::ACCEPT => Frame::Accept {
            stream,
            size: body.get_u64(),
            // The shape check bounded the length to 1..=MAX_IDENTITY_LEN.
            identity: (flags & FLAG_IDENTITY != 0)
                .then(|| VolumeIdentity::new(body.to_vec()))
                .flatten(),
        },
        kind::REJECT | kind::ABORT => {
            let reason = Reason::from_code(body.get_u32());
            let message = parse_message(&body)?;
            if kind == kind::REJECT {
                Frame::Reject {
                    stream,
                    reason,
                    message,
                }
            } else {
                Frame::Abort {
                    stream,
                    reason,
                    message,
                }
            }
        }
        kind::DATA => {
            let offset = body.get_u64();
            let payload = if body.len() < SHARE_PAYLOAD_MIN {
                Bytes::copy_from_slice(&body)
            } else {
                body.freeze()
            };
            Frame::Data {
                stream,
                offset,
                payload,
            }
        }
        kind::HOLE => Frame::Hole {
            stream,
            offset: body.get_u64(),
            len: body.get_u64(),
        },
        kind::WINDOW => Frame::Window {
            stream,
            increment: body.get_u32(),
        },
        kind::FINISH => {
            let length = body.get_u64();
            let digest = body.get_u32();
            Frame::Finish {
                stream,
                length,
                digest: (flags & FLAG_DIGEST != 0).then_some(digest),
                ack: flags & FLAG_ACK != 0,
            }
        }
        kind::PING => Frame::Ping {
            data: body.get_u64(),
        },
        kind::PONG => Frame::Pong {
            data: body.get_u64(),
        },
        kind::GOAWAY => {
            let last_stream = StreamId(body.get_u32());
            let reason = Reason::from_code(body.get_u32());
            Frame::GoAway {
                last_stream,
                reason,
                message: parse_message(&body)?,
            }
        }
        kind::RANGES => Frame::Ranges {
            stream,
            last: flags & FLAG_LAST != 0,
            ranges: range::parse_ranges(&body),
        },
        other => return Err(DecodeError::UnknownKind(other)),
    })
}

fn parse_message(bytes: &[u8]) -> Result<String, DecodeError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| DecodeError::BadMessage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_header_is_refused_before_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(1 << 30);
        buf.put_u8(kind::DATA);
        buf.put_u8(0);
        buf.put_u16(0);
        buf.put_u32(1);
        assert_eq!(
            Frame::decode(&mut buf, 65_536),
            Err(DecodeError::FrameTooLarge {
                len: 1 << 30,
                max: 65_536
            })
        );
    }

    #[test]
    fn encoded_frames_are_counted_by_type_behind_a_hello() {
        let mut out = BytesMut::new();
        Hello {
            version_min: 1,
            version_max: 1,
            features: Features::ALL,
            max_frame: 1 << 20,
            stream_window: 1 << 20,
            conn_window: 1 << 24,
            max_streams: 16,
        }
        .encode(&mut out);
        Frame::Ping { data: 7 }.encode(&mut out);
        for increment in [1, 2] {
            Frame::Window {
                stream: StreamId(1),
                increment,
            }
            .encode(&mut out);
        }
        encode_data_header(&mut out, StreamId(1), 0, 3);
        out.put_slice(b"abc");
        let mut counts = FrameCounts::default();
        counts.record_encoded(&out);
        assert_eq!(counts.get("PING"), Some(1));
        assert_eq!(counts.get("WINDOW"), Some(2));
        assert_eq!(counts.get("DATA"), Some(1));
        assert_eq!(counts.total(), 4);
        assert_eq!(counts.get("NOPE"), None);
    }

    #[test]
    fn partial_frame_consumes_nothing() {
        let mut full = BytesMut::new();
        Frame::Hole {
            stream: StreamId(3),
            offset: 9,
            len: 10,
        }
        .encode(&mut full);
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(Frame::decode(&mut part, 1 << 20), Ok(None));
        assert_eq!(part.len(), full.len() - 1);
    }
}
