//! The messages between volstream and a `volstream-iohelper` process, byte for byte. Both
//! sides use this one codec.
//!
//! Every message is a 24-byte header and a payload:
//!
//! ```text
//! 0      1      2..4       4..8             8..16      16..24
//! kind   flags  reserved   payload length   a (u64)    b (u64)      all little-endian
//! ```
//!
//! | kind | name     | direction       | a        | b       | payload           |
//! |------|----------|-----------------|----------|---------|-------------------|
//! | 1    | SIZE     | reader → parent | length   |         |                   |
//! | 2    | DATA     | both            | offset   |         | bytes (≤ 4 MiB)   |
//! | 3    | HOLE     | both            | offset   | length  |                   |
//! | 4    | EOF      | both            | length   | digest  | (flags bit 0: digest present) |
//! | 5    | ERROR    | helper → parent | reason   |         | UTF-8 (≤ 4 KiB)   |
//! | 6    | CREDIT   | parent → reader | bytes    |         |                   |
//! | 7    | READY    | writer → parent |          |         |                   |
//! | 8    | PROGRESS | writer → parent | chunks completed in all |  |            |
//! | 9    | DONE     | writer → parent |          |         |                   |
//! | 10   | TEMP     | writer → parent |          |         | temporary file name (≤ 255) |
//!
//! A helper is told to stop by the parent closing its end of the socket.
//!
//! The decoder validates the kind, the reserved bytes and the payload length for that kind
//! from the header alone, before anything is allocated for the payload, so a broken or hostile
//! helper costs its stream an error and nothing more.

use crate::error::Error;
use bytes::{Buf, Bytes, BytesMut};
use engine::proto::Reason;
use engine::Chunk;

pub const HEADER_LEN: usize = 24;
/// Largest DATA payload; readers send at most one 1 MiB buffer per message.
pub const MAX_DATA: usize = 4 << 20;
pub const MAX_TEXT: usize = 4096;
pub const MAX_NAME: usize = 255;

const SIZE: u8 = 1;
const DATA: u8 = 2;
const HOLE: u8 = 3;
const EOF: u8 = 4;
const ERROR: u8 = 5;
const CREDIT: u8 = 6;
const READY: u8 = 7;
const PROGRESS: u8 = 8;
const DONE: u8 = 9;
const TEMP: u8 = 10;

const HAS_DIGEST: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Size(u64),
    Data { offset: u64, bytes: Bytes },
    Hole { offset: u64, len: u64 },
    Eof { length: u64, digest: Option<u32> },
    Error { reason: Reason, message: String },
    Credit(u64),
    Ready,
    Progress(u64),
    Done,
    Temp(Vec<u8>),
}

/// A validated header: the payload that follows is `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    kind: u8,
    flags: u8,
    pub len: usize,
    a: u64,
    b: u64,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Helper(format!("malformed iohelper message: {what}"))
}

impl Header {
    pub fn parse(h: &[u8]) -> Result<Header, Error> {
        if h.len() < HEADER_LEN {
            return Err(bad("short header"));
        }
        let (kind, flags) = (h[0], h[1]);
        if h[2] != 0 || h[3] != 0 {
            return Err(bad("reserved bytes set"));
        }
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let a = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let b = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let max = match kind {
            DATA => MAX_DATA,
            ERROR => MAX_TEXT,
            TEMP => MAX_NAME,
            SIZE | HOLE | EOF | CREDIT | READY | PROGRESS | DONE => 0,
            k => return Err(bad(format_args!("unknown kind {k}"))),
        };
        if len > max {
            return Err(bad(format_args!(
                "kind {kind} with a {len}-byte payload (at most {max})"
            )));
        }
        if flags & !HAS_DIGEST != 0 || (flags != 0 && kind != EOF) {
            return Err(bad(format_args!("flags {flags:#x} on kind {kind}")));
        }
        Ok(Header {
            kind,
            flags,
            len,
            a,
            b,
        })
    }

    /// Builds the message from its payload (exactly `self.len` bytes).
    pub fn finish(self, payload: Bytes) -> Result<Msg, Error> {
        debug_assert_eq!(payload.len(), self.len);
        let (a, b) = (self.a, self.b);
        Ok(match self.kind {
            SIZE => Msg::Size(a),
            DATA => {
                if payload.is_empty() || a.checked_add(payload.len() as u64).is_none() {
                    return Err(bad("empty or overflowing DATA"));
                }
                Msg::Data {
                    offset: a,
                    bytes: payload,
                }
            }
            HOLE => {
                if b == 0 || a.checked_add(b).is_none() {
                    return Err(bad("empty or overflowing HOLE"));
                }
                Msg::Hole { offset: a, len: b }
            }
            EOF => {
                if self.flags & HAS_DIGEST == 0 && b != 0 {
                    return Err(bad("EOF digest without its flag"));
                }
                let digest = (self.flags & HAS_DIGEST != 0)
                    .then(|| u32::try_from(b).map_err(|_| bad("EOF digest above 32 bits")))
                    .transpose()?;
                Msg::Eof { length: a, digest }
            }
            ERROR => Msg::Error {
                reason: Reason::from_code(u32::try_from(a).map_err(|_| bad("reason code"))?),
                message: String::from_utf8_lossy(&payload).into_owned(),
            },
            CREDIT => Msg::Credit(a),
            READY => Msg::Ready,
            PROGRESS => Msg::Progress(a),
            DONE => Msg::Done,
            TEMP => {
                if payload.is_empty() || payload.contains(&0) || payload.contains(&b'/') {
                    return Err(bad("TEMP name"));
                }
                Msg::Temp(payload.to_vec())
            }
            _ => unreachable!("kind checked in parse"),
        })
    }
}

impl Msg {
    /// The header, to be followed by [`Msg::payload`].
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let (kind, flags, a, b) = match self {
            Msg::Size(n) => (SIZE, 0, *n, 0),
            Msg::Data { offset, .. } => (DATA, 0, *offset, 0),
            Msg::Hole { offset, len } => (HOLE, 0, *offset, *len),
            Msg::Eof { length, digest } => match digest {
                Some(d) => (EOF, HAS_DIGEST, *length, *d as u64),
                None => (EOF, 0, *length, 0),
            },
            Msg::Error { reason, .. } => (ERROR, 0, reason.code() as u64, 0),
            Msg::Credit(n) => (CREDIT, 0, *n, 0),
            Msg::Ready => (READY, 0, 0, 0),
            Msg::Progress(n) => (PROGRESS, 0, *n, 0),
            Msg::Done => (DONE, 0, 0, 0),
            Msg::Temp(_) => (TEMP, 0, 0, 0),
        };
        let mut h = [0u8; HEADER_LEN];
        h[0] = kind;
        h[1] = flags;
        h[4..8].copy_from_slice(&(self.payload().len() as u32).to_le_bytes());
        h[8..16].copy_from_slice(&a.to_le_bytes());
        h[16..24].copy_from_slice(&b.to_le_bytes());
        h
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Msg::Data { bytes, .. } => bytes,
            Msg::Error { message, .. } => {
                let mut n = message.len().min(MAX_TEXT);
                while !message.is_char_boundary(n) {
                    n -= 1;
                }
                &message.as_bytes()[..n]
            }
            Msg::Temp(name) => &name[..name.len().min(MAX_NAME)],
            _ => &[],
        }
    }

    /// Header and payload as two buffers (the payload of DATA is not copied).
    pub fn encode(&self) -> [Bytes; 2] {
        let header = Bytes::copy_from_slice(&self.header());
        let payload = match self {
            Msg::Data { bytes, .. } => bytes.clone(),
            other => Bytes::copy_from_slice(other.payload()),
        };
        [header, payload]
    }

    pub fn from_chunk(chunk: Chunk) -> Msg {
        match chunk {
            Chunk::Data { offset, bytes } => Msg::Data { offset, bytes },
            Chunk::Hole { offset, len } => Msg::Hole { offset, len },
            Chunk::End { length, digest } => Msg::Eof { length, digest },
        }
    }

    /// The volume chunk this message carries, if it is one.
    pub fn into_chunk(self) -> Result<Chunk, Msg> {
        match self {
            Msg::Data { offset, bytes } => Ok(Chunk::Data { offset, bytes }),
            Msg::Hole { offset, len } => Ok(Chunk::Hole { offset, len }),
            Msg::Eof { length, digest } => Ok(Chunk::End { length, digest }),
            other => Err(other),
        }
    }
}

/// Takes one whole message off the front of `buf`; `Ok(None)` until one is complete. DATA
/// payloads are split off `buf` without copying.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Msg>, Error> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = Header::parse(&buf[..HEADER_LEN])?;
    if buf.len() < HEADER_LEN + header.len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(header.len).freeze();
    header.finish(payload).map(Some)
}

/// How much more `buf` must hold before `decode` can give the next message (at least one).
pub fn wanted(buf: &[u8]) -> usize {
    if buf.len() < HEADER_LEN {
        return HEADER_LEN - buf.len();
    }
    match Header::parse(&buf[..HEADER_LEN]) {
        Ok(h) => (HEADER_LEN + h.len).saturating_sub(buf.len()).max(1),
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Msg) {
        let [h, p] = m.encode();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&h);
        buf.extend_from_slice(&p);
        // Byte by byte: nothing until the last byte, then exactly the message.
        let all = buf.split().freeze();
        let mut partial = BytesMut::new();
        for (i, b) in all.iter().enumerate() {
            partial.extend_from_slice(&[*b]);
            let got = decode(&mut partial).unwrap();
            if i + 1 < all.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got, Some(m.clone()));
            }
        }
        assert!(partial.is_empty());
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            Msg::Size(1 << 40),
            Msg::Data {
                offset: 4096,
                bytes: Bytes::from_static(b"hello"),
            },
            Msg::Hole {
                offset: 0,
                len: u64::MAX,
            },
            Msg::Eof {
                length: 9,
                digest: Some(0xdead_beef),
            },
            Msg::Eof {
                length: 0,
                digest: None,
            },
            Msg::Error {
                reason: Reason::NoSpace,
                message: "disk full".into(),
            },
            Msg::Credit(4 << 20),
            Msg::Ready,
            Msg::Progress(17),
            Msg::Done,
            Msg::Temp(b".x.volstream-tmp-1-2".to_vec()),
        ] {
            roundtrip(m);
        }
    }

    #[test]
    fn lengths_are_checked_before_allocation() {
        let mut h = Msg::Data {
            offset: 0,
            bytes: Bytes::from_static(b"x"),
        }
        .header();
        h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = BytesMut::from(&h[..]);
        assert!(decode(&mut buf).is_err());
        assert_eq!(wanted(&h), 1);
        let mut h = Msg::Credit(1).header();
        h[4] = 1;
        assert!(Header::parse(&h).is_err(), "payload on a payload-less kind");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..20_000 {
            let mut v = Vec::new();
            for _ in 0..((x % 64) as usize) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push((x & 0xff) as u8);
            }
            // Make plausible headers common: a known kind with zeroed reserved bytes.
            if v.len() >= HEADER_LEN {
                v[0] %= 12;
                v[2] = 0;
                v[3] = 0;
                v[5] = 0;
                v[6] = 0;
                v[7] = 0;
            }
            let mut buf = BytesMut::from(&v[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }
    }
}
