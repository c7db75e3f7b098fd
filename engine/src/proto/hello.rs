//! The `Hello` record each side sends first (docs/PROTOCOL.md 2): magic, versions, features and
//! the limits the sender enforces as a receiver. What the two sides then agree on is
//! `handshake`'s business.

use super::error::DecodeError;
use bytes::{Buf, BufMut, BytesMut};

/// First eight bytes on every connection, both directions.
pub const MAGIC: [u8; 8] = *b"VOLSTRM\n";
/// Size of the `Hello` record.
pub const HELLO_LEN: usize = 32;
/// The protocol versions this build speaks.
pub const VERSION_MIN: u16 = 1;
pub const VERSION_MAX: u16 = 1;

/// Feature bits exchanged in the handshake; both sides use the intersection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(pub u32);

impl Features {
    /// Holes travel as HOLE frames; without it a sender expands them to zero DATA.
    pub const SPARSE: Features = Features(1);
    /// FINISH carries a CRC-32C of the logical content, checked by the receiver.
    pub const DIGEST: Features = Features(2);
    /// OPEN may put a stream in the priority class (`OpenOptions::with_priority`).
    pub const PRIORITY: Features = Features(4);
    /// OPEN may ask the sink to read the volume back before it commits
    /// (`OpenOptions::with_verify`).
    pub const VERIFY: Features = Features(8);
    /// OPEN may ask the sink to write a qcow2 image (`OpenOptions::with_qcow2`).
    pub const QCOW2: Features = Features(16);
    /// A READ may ask for some ranges of the volume (OPEN header flag RANGES, then RANGES
    /// frames); without it a reader gets the whole volume.
    pub const RANGES: Features = Features(32);
    /// OPEN may ask for a volume's block digests (`Op::Digests`, docs/PROTOCOL.md 8.3). A high
    /// bit, apart from the range-access bits allocated next to VERIFY.
    pub const BLOCK_DIGESTS: Features = Features(0x100);
    /// A READ's ACCEPT may carry the volume's identity (`VolumeIdentity`, ACCEPT flag
    /// IDENTITY): what a resuming client compares with the part it holds.
    pub const IDENTITY: Features = Features(0x200);
    /// A WRITE may update an existing volume: OPEN header flag UPDATE with the result's
    /// volume checksum, then only the ranges that differ (docs/PROTOCOL.md 8.4).
    pub const UPDATE: Features = Features(0x400);
    /// An updating WRITE, or a DIGESTS, may name a partial upload the server kept (OPEN
    /// header flag RESUME with a token and the source's identity, docs/PROTOCOL.md 8.5).
    /// Announced only by a server that keeps partials (`serve --resume-keep`).
    pub const RESUME: Features = Features(0x800);
    pub const ALL: Features = Features(63 | 0x100 | 0x200 | 0x400 | 0x800);

    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }
    pub fn without(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
}

/// What one side announces before any frame: versions, features, and the limits it enforces as
/// a receiver (the peer must respect them when sending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub features: Features,
    /// Largest frame body (bytes after the header) this side accepts.
    pub max_frame: u32,
    /// Credit this side grants each stream it receives data on, before any WINDOW.
    pub stream_window: u32,
    /// Credit this side grants the whole connection, before any WINDOW.
    pub conn_window: u32,
    /// How many streams the peer may have open towards this side at once.
    pub max_streams: u32,
}

impl Hello {
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(HELLO_LEN);
        out.put_slice(&MAGIC);
        out.put_u16(self.version_min);
        out.put_u16(self.version_max);
        out.put_u32(self.features.0);
        out.put_u32(self.max_frame);
        out.put_u32(self.stream_window);
        out.put_u32(self.conn_window);
        out.put_u32(self.max_streams);
    }

    /// Decodes a `Hello` from exactly `HELLO_LEN` bytes. Limits are checked by the handshake,
    /// which knows the local configuration.
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, DecodeError> {
        if bytes[..8] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let mut b = &bytes[8..];
        Ok(Hello {
            version_min: b.get_u16(),
            version_max: b.get_u16(),
            features: Features(b.get_u32()),
            max_frame: b.get_u32(),
            stream_window: b.get_u32(),
            conn_window: b.get_u32(),
            max_streams: b.get_u32(),
        })
    }
}
