//! Deterministic generated volumes: a layout of data and hole extents and pseudo-random content,
//! both derived from a seed, so a sink can check every byte and every hole without a copy of the
//! source. Used by tests, benchmarks and `volstream stress`.
//!
//! These readers and writers work synchronously on the calling thread. That is fine for memory
//! (no disk is touched), and it is why they are not used for real volumes. Behind the
//! `synthetic` feature: they are load generators and checkers, not production sinks (those are
//! in [`in_memory`](crate::in_memory)).

use crate::digest::Digest;
use crate::document::VolumeEntry;
use crate::in_memory::MemoryReader;
use crate::reason::Reason;
use crate::volume::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

/// Largest DATA chunk a synthetic reader yields.
pub const CHUNK: usize = 128 * 1024;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One extent of a generated volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub hole: bool,
}

/// A generated volume: size, seed and the share of it that is holes.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub seed: u64,
    pub size: u64,
    extents: Arc<Vec<Extent>>,
}

impl Synthetic {
    /// Extents are 4 KiB multiples between 16 KiB and 512 KiB (the last one may be partial);
    /// each is a hole with probability `hole_ratio`.
    pub fn new(seed: u64, size: u64, hole_ratio: f64) -> Self {
        let mut extents = Vec::new();
        let mut offset = 0;
        let mut n = 0u64;
        while offset < size {
            let r = splitmix64(seed ^ 0x5EED_0000_0000 ^ n);
            n += 1;
            let len = ((4 + r % 125) * 4096).min(size - offset);
            let hole = ((r >> 32) as f64 / u32::MAX as f64) < hole_ratio;
            match extents.last_mut() {
                Some(Extent {
                    len: l, hole: h, ..
                }) if *h == hole => *l += len,
                _ => extents.push(Extent { offset, len, hole }),
            }
            offset += len;
        }
        Synthetic {
            seed,
            size,
            extents: Arc::new(extents),
        }
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().filter(|e| !e.hole).map(|e| e.len).sum()
    }

    /// Fills `buf` with the content at `offset` (data extents only; holes read as zero).
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = offset;
        let mut out = &mut buf[..];
        while !out.is_empty() {
            let word = pos / 8;
            let bytes = splitmix64(self.seed.wrapping_mul(0x100_0000_01B3) ^ word).to_le_bytes();
            let skip = (pos % 8) as usize;
            let take = (8 - skip).min(out.len());
            out[..take].copy_from_slice(&bytes[skip..skip + take]);
            out = &mut out[take..];
            pos += take as u64;
        }
    }

    /// The whole logical content, holes as zeroes (for small volumes in tests).
    pub fn content(&self) -> Vec<u8> {
        let mut all = vec![0u8; self.size as usize];
        for e in self.extents.iter().filter(|e| !e.hole) {
            let range = e.offset as usize..(e.offset + e.len) as usize;
            self.fill(e.offset, &mut all[range]);
        }
        all
    }

    /// The CRC-32C of the logical content.
    pub fn digest(&self) -> u32 {
        let mut d = Digest::new();
        let mut buf = vec![0u8; CHUNK];
        for e in self.extents.iter() {
            if e.hole {
                d.update_zeroes(e.len);
                continue;
            }
            let mut at = e.offset;
            while at < e.offset + e.len {
                let n = (e.offset + e.len - at).min(CHUNK as u64) as usize;
                self.fill(at, &mut buf[..n]);
                d.update(&buf[..n]);
                at += n as u64;
            }
        }
        d.value()
    }

    pub fn reader(&self) -> SyntheticReader {
        SyntheticReader {
            volume: self.clone(),
            extent: 0,
            offset: 0,
            digest: Digest::new(),
            ended: false,
        }
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            volume: self.clone(),
            report: Arc::new(VerifyReport::default()),
            digest: Digest::new(),
            completed: 0,
            outcome: None,
            next_offset: 0,
        }
    }
}

/// Yields a synthetic volume chunk by chunk, generating data as it goes.
pub struct SyntheticReader {
    volume: Synthetic,
    extent: usize,
    offset: u64,
    digest: Digest,
    ended: bool,
}

impl VolumeReader for SyntheticReader {
    fn start(&mut self, _notify: Notify) {}

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        Poll::Ready(Ok(self.volume.size))
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let Some(e) = self.volume.extents.get(self.extent).copied() else {
            self.ended = true;
            return Poll::Ready(Ok(Chunk::End {
                length: self.volume.size,
                digest: Some(self.digest.value()),
            }));
        };
        if e.hole {
            self.extent += 1;
            self.offset = e.offset + e.len;
            self.digest.update_zeroes(e.len);
            return Poll::Ready(Ok(Chunk::Hole {
                offset: e.offset,
                len: e.len,
            }));
        }
        let n = (e.offset + e.len - self.offset).min(CHUNK as u64) as usize;
        let mut buf = BytesMut::zeroed(n);
        self.volume.fill(self.offset, &mut buf);
        self.digest.update(&buf);
        let chunk = Chunk::Data {
            offset: self.offset,
            bytes: buf.freeze(),
        };
        self.offset += n as u64;
        if self.offset == e.offset + e.len {
            self.extent += 1;
        }
        Poll::Ready(Ok(chunk))
    }
}

/// What a [`Verifier`] saw, readable from other threads while the transfer runs.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub data_bytes: AtomicU64,
    pub hole_bytes: AtomicU64,
    /// Bytes that differed from the expected content (0 for a correct transfer).
    pub mismatched_bytes: AtomicU64,
    /// HOLE chunks that covered data (always a corruption).
    pub holes_over_data: AtomicU64,
}

/// A sink that checks every chunk against the expected synthetic content and keeps nothing.
pub struct Verifier {
    volume: Synthetic,
    report: Arc<VerifyReport>,
    digest: Digest,
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
    next_offset: u64,
}

impl Verifier {
    pub fn report(&self) -> Arc<VerifyReport> {
        Arc::clone(&self.report)
    }

    fn hole_covers_data(&self, offset: u64, len: u64) -> bool {
        self.volume
            .extents
            .iter()
            .any(|e| !e.hole && e.offset < offset + len && offset < e.offset + e.len)
    }
}

impl VolumeWriter for Verifier {
    fn start(&mut self, size: u64, _notify: Notify) {
        if size != self.volume.size {
            self.outcome = Some(Err(VolumeError::new(
                Reason::Internal,
                format!("expected {} bytes, peer offers {size}", self.volume.size),
            )));
        }
    }

    fn write(&mut self, chunk: Chunk) {
        match chunk {
            Chunk::Data { offset, bytes } => {
                // Compared a page at a time against a fixed buffer: hundreds of verifiers in a
                // stress run must not each hold a chunk-sized copy.
                let mut bad = 0;
                let mut expected = [0u8; 4096];
                for (i, piece) in bytes.chunks(expected.len()).enumerate() {
                    let at = offset + (i * expected.len()) as u64;
                    let want = &mut expected[..piece.len()];
                    self.volume.fill(at, want);
                    // Bytes inside hole extents must be zero, not the generator's data.
                    for e in self.volume.extents.iter().filter(|e| e.hole) {
                        let lo = e.offset.max(at);
                        let hi = (e.offset + e.len).min(at + piece.len() as u64);
                        if lo < hi {
                            want[(lo - at) as usize..(hi - at) as usize].fill(0);
                        }
                    }
                    bad += piece
                        .iter()
                        .zip(want.iter())
                        .filter(|(a, b)| a != b)
                        .count();
                }
                let bad = bad as u64 + (offset != self.next_offset) as u64;
                self.report
                    .mismatched_bytes
                    .fetch_add(bad, Ordering::Relaxed);
                self.report
                    .data_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.digest.update(&bytes);
                self.next_offset = offset + bytes.len() as u64;
            }
            Chunk::Hole { offset, len } => {
                if self.hole_covers_data(offset, len) || offset != self.next_offset {
                    self.report.holes_over_data.fetch_add(1, Ordering::Relaxed);
                }
                self.report.hole_bytes.fetch_add(len, Ordering::Relaxed);
                self.digest.update_zeroes(len);
                self.next_offset = offset + len;
            }
            Chunk::End { length, digest } => {
                let ok_len = length == self.volume.size && self.next_offset == length;
                let ok_digest = digest.is_none_or(|d| d == self.digest.value());
                let clean = self.report.mismatched_bytes.load(Ordering::Relaxed) == 0
                    && self.report.holes_over_data.load(Ordering::Relaxed) == 0;
                self.outcome = Some(if !ok_digest {
                    Err(VolumeError::new(
                        Reason::DigestMismatch,
                        format!(
                            "content digest {:#010x}, sender says {:#010x}",
                            self.digest.value(),
                            digest.unwrap_or(0)
                        ),
                    ))
                } else if !ok_len || !clean {
                    Err(VolumeError::new(Reason::Internal, "content differs"))
                } else {
                    Ok(())
                });
            }
        }
        self.completed += 1;
    }

    fn poll_progress(&mut self) -> WriteProgress {
        WriteProgress {
            completed: self.completed,
            outcome: self.outcome.clone(),
        }
    }
}

/// Serves named synthetic volumes: reads generate them, writes are verified against them.
#[derive(Default, Clone)]
pub struct SyntheticProvider {
    volumes: std::collections::HashMap<String, Synthetic>,
}

impl SyntheticProvider {
    pub fn insert(&mut self, name: impl Into<String>, volume: Synthetic) {
        self.volumes.insert(name.into(), volume);
    }

    fn get(&self, name: &str) -> Result<&Synthetic, VolumeError> {
        self.volumes
            .get(name)
            .ok_or_else(|| VolumeError::new(Reason::NotFound, format!("no volume {name:?}")))
    }
}

impl crate::Provider for SyntheticProvider {
    fn open_read(
        &self,
        request: &crate::OpenRequest,
    ) -> Result<Box<dyn VolumeReader>, VolumeError> {
        Ok(Box::new(self.get(&request.name)?.reader()))
    }

    fn open_write(
        &self,
        request: &crate::OpenRequest,
    ) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        Ok(Box::new(self.get(&request.name)?.verifier()))
    }

    fn open_list(
        &self,
        _request: &crate::OpenRequest,
    ) -> Result<Box<dyn VolumeReader>, VolumeError> {
        let mut names: Vec<_> = self.volumes.iter().collect();
        names.sort_by_key(|(name, _)| name.as_str());
        let entries: Vec<VolumeEntry> = names
            .iter()
            .map(|(name, v)| VolumeEntry {
                name: (*name).clone(),
                size: v.size,
                allocated: v.data_bytes(),
            })
            .collect();
        let text = crate::document::format_list(&entries);
        Ok(Box::new(MemoryReader::new(Bytes::from(text), Vec::new())))
    }
}
