//! The block digest document a DIGESTS stream carries as its content (docs/PROTOCOL.md 8.3):
//! a volume cut into fixed blocks, and a strong digest of every block that does not read as
//! zero. The serving side hashes (on a worker); this module only encodes and decodes, so the
//! engine stays free of disks and of any hash function.
//!
//! Layout, all integers big-endian:
//! - header (16 bytes): magic `VSBD`, block size (u32), volume length (u64);
//! - records (40 bytes each): block index (u64), digest (32 bytes), in strictly increasing
//!   index order, each index below the block count. A block without a record reads as zero.
//!
//! The decoder is incremental and holds at most one record's bytes, so a peer's document costs
//! the receiver nothing before it is checked, whatever the header claims.

use std::fmt;

/// The only block size this version sends and accepts: 64 KiB (why: docs/PROTOCOL.md 8.3).
pub const BLOCK_SIZE: u32 = 64 * 1024;
pub const MAGIC: [u8; 4] = *b"VSBD";
pub const HEADER_LEN: usize = 16;
pub const RECORD_LEN: usize = 40;
/// Largest volume a document may describe (as OPEN's sizes, below 2^63).
pub const MAX_VOLUME_LEN: u64 = i64::MAX as u64;

pub type BlockDigest = [u8; 32];

/// What a document is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMapHeader {
    pub block_size: u32,
    /// The volume's logical length in bytes.
    pub volume_len: u64,
}

impl BlockMapHeader {
    pub fn new(volume_len: u64) -> Self {
        BlockMapHeader {
            block_size: BLOCK_SIZE,
            volume_len,
        }
    }

    /// Blocks in the volume; the last one may be short.
    pub fn blocks(&self) -> u64 {
        self.volume_len.div_ceil(u64::from(self.block_size))
    }

    /// The length of block `index` (the last one may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        let start = index * u64::from(self.block_size);
        u64::from(self.block_size).min(self.volume_len.saturating_sub(start))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&self.volume_len.to_be_bytes());
    }
}

/// One block that does not read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecord {
    pub index: u64,
    pub digest: BlockDigest,
}

impl BlockRecord {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.digest);
    }
}

/// A whole document, header then records.
pub fn encode(header: &BlockMapHeader, records: &[BlockRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + RECORD_LEN * records.len());
    header.encode(&mut out);
    for r in records {
        r.encode(&mut out);
    }
    out
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockMapError {
    BadMagic,
    /// A block size this version does not use.
    BlockSize(u32),
    VolumeTooLong(u64),
    /// A record's index is not below the block count.
    PastEnd {
        index: u64,
        blocks: u64,
    },
    /// A record's index is not above the one before it.
    Unsorted {
        index: u64,
        previous: u64,
    },
    /// The document ended inside the header or a record.
    Truncated,
}

impl fmt::Display for BlockMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockMapError::BadMagic => f.write_str("not a block digest document (bad magic)"),
            BlockMapError::BlockSize(s) => write!(f, "block size {s} is not {BLOCK_SIZE}"),
            BlockMapError::VolumeTooLong(n) => write!(f, "volume length {n} is past 2^63"),
            BlockMapError::PastEnd { index, blocks } => {
                write!(f, "block {index} is past the volume's {blocks} blocks")
            }
            BlockMapError::Unsorted { index, previous } => {
                write!(f, "block {index} follows block {previous}")
            }
            BlockMapError::Truncated => f.write_str("document ends inside a header or record"),
        }
    }
}

impl std::error::Error for BlockMapError {}

/// Decodes a document fed in pieces of any size. After an error it refuses everything.
#[derive(Debug, Default)]
pub struct BlockMapDecoder {
    header: Option<BlockMapHeader>,
    /// Bytes of the header or record being assembled (never more than a record).
    partial: Vec<u8>,
    previous: Option<u64>,
    failed: Option<BlockMapError>,
}

impl BlockMapDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The header, once it has arrived.
    pub fn header(&self) -> Option<BlockMapHeader> {
        self.header
    }

    /// Consumes `bytes`, calling `record` for each complete record, in order.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut record: impl FnMut(BlockRecord),
    ) -> Result<(), BlockMapError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        while !bytes.is_empty() {
            let need = if self.header.is_none() {
                HEADER_LEN
            } else {
                RECORD_LEN
            };
            let take = (need - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < need {
                break;
            }
            let piece = std::mem::take(&mut self.partial);
            let step = match self.header {
                None => self.on_header(&piece),
                Some(header) => self.on_record(&header, &piece).map(&mut record),
            };
            if let Err(e) = step {
                self.failed = Some(e.clone());
                return Err(e);
            }
            self.partial = piece;
            self.partial.clear();
        }
        Ok(())
    }

    /// The end of the document: the header must have arrived and no record be cut short.
    pub fn finish(&self) -> Result<BlockMapHeader, BlockMapError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.header {
            Some(h) if self.partial.is_empty() => Ok(h),
            _ => Err(BlockMapError::Truncated),
        }
    }

    fn on_header(&mut self, b: &[u8]) -> Result<(), BlockMapError> {
        if b[..4] != MAGIC {
            return Err(BlockMapError::BadMagic);
        }
        let block_size = u32::from_be_bytes(b[4..8].try_into().unwrap());
        if block_size != BLOCK_SIZE {
            return Err(BlockMapError::BlockSize(block_size));
        }
        let volume_len = u64::from_be_bytes(b[8..16].try_into().unwrap());
        if volume_len > MAX_VOLUME_LEN {
            return Err(BlockMapError::VolumeTooLong(volume_len));
        }
        self.header = Some(BlockMapHeader {
            block_size,
            volume_len,
        });
        Ok(())
    }

    fn on_record(
        &mut self,
        header: &BlockMapHeader,
        b: &[u8],
    ) -> Result<BlockRecord, BlockMapError> {
        let index = u64::from_be_bytes(b[..8].try_into().unwrap());
        let blocks = header.blocks();
        if index >= blocks {
            return Err(BlockMapError::PastEnd { index, blocks });
        }
        if let Some(previous) = self.previous.filter(|p| index <= *p) {
            return Err(BlockMapError::Unsorted { index, previous });
        }
        self.previous = Some(index);
        Ok(BlockRecord {
            index,
            digest: b[8..].try_into().unwrap(),
        })
    }
}

/// Decodes a whole document held in memory.
pub fn decode(bytes: &[u8]) -> Result<(BlockMapHeader, Vec<BlockRecord>), BlockMapError> {
    let mut decoder = BlockMapDecoder::new();
    let mut records = Vec::new();
    decoder.feed(bytes, |r| records.push(r))?;
    Ok((decoder.finish()?, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: u64, byte: u8) -> BlockRecord {
        BlockRecord {
            index,
            digest: [byte; 32],
        }
    }

    #[test]
    fn documents_round_trip_in_pieces_of_any_size() {
        let header = BlockMapHeader::new(3 * u64::from(BLOCK_SIZE) + 5);
        assert_eq!(header.blocks(), 4);
        assert_eq!(header.block_len(3), 5);
        let records = [rec(0, 1), rec(2, 2), rec(3, 3)];
        let bytes = encode(&header, &records);
        assert_eq!(bytes.len(), HEADER_LEN + 3 * RECORD_LEN);
        assert_eq!(&bytes[..4], b"VSBD");
        for piece in [1, 7, 40, 1000] {
            let mut d = BlockMapDecoder::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                d.feed(chunk, |r| got.push(r)).unwrap();
            }
            assert_eq!(d.finish().unwrap(), header);
            assert_eq!(got, records);
        }
    }

    #[test]
    fn bad_documents_are_refused_with_what_is_wrong() {
        let header = BlockMapHeader::new(2 * u64::from(BLOCK_SIZE));
        let cases = [
            (
                encode(&header, &[rec(2, 0)]),
                "block 2 is past the volume's 2 blocks",
            ),
            (
                encode(&header, &[rec(1, 0), rec(1, 1)]),
                "block 1 follows block 1",
            ),
            (
                encode(&header, &[rec(1, 0), rec(0, 1)]),
                "block 0 follows block 1",
            ),
            (b"VSBX\0\x01\0\0\0\0\0\0\0\0\0\0".to_vec(), "bad magic"),
            (
                b"VSBD\0\0\x10\0\0\0\0\0\0\0\0\0".to_vec(),
                "block size 4096",
            ),
            (b"VSBD\0\x01\0\0\xff\0\0\0\0\0\0\0".to_vec(), "past 2^63"),
        ];
        for (bytes, problem) in cases {
            let e = decode(&bytes).unwrap_err().to_string();
            assert!(e.contains(problem), "{e:?} should say {problem:?}");
        }
        let mut cut = encode(&header, &[rec(0, 0)]);
        cut.pop();
        assert_eq!(decode(&cut).unwrap_err(), BlockMapError::Truncated);
        assert_eq!(decode(&cut[..10]).unwrap_err(), BlockMapError::Truncated);
    }
}
