//! Sources and sinks over memory: content already in memory, a sink that keeps what it
//! receives (documents such as a volume list), and one that keeps nothing and checks the digest
//! (benchmarks). They work synchronously on the loop thread, which memory allows.

use crate::digest::Digest;
use crate::reason::Reason;
use crate::volume::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

/// Largest DATA chunk a [`MemoryReader`] yields.
const MAX_CHUNK: usize = 128 * 1024;

/// A reader over content already in memory: chunks are slices of it, no copies.
pub struct MemoryReader {
    content: Bytes,
    holes: Vec<(u64, u64)>,
    offset: u64,
    digest: u32,
    done: bool,
}

impl MemoryReader {
    /// `holes` are (offset, len) ranges, sorted, inside `content` and reading as zero there.
    pub fn new(content: Bytes, holes: Vec<(u64, u64)>) -> Self {
        let mut whole = Digest::new();
        whole.update(&content);
        let digest = whole.value();
        MemoryReader {
            content,
            holes,
            offset: 0,
            digest,
            done: false,
        }
    }
}

impl VolumeReader for MemoryReader {
    fn start(&mut self, _notify: Notify) {}

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        Poll::Ready(Ok(self.content.len() as u64))
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let size = self.content.len() as u64;
        if self.offset == size {
            self.done = true;
            return Poll::Ready(Ok(Chunk::End {
                length: size,
                digest: Some(self.digest),
            }));
        }
        if let Some(&(off, len)) = self
            .holes
            .iter()
            .find(|(o, l)| *o <= self.offset && self.offset < o + l)
        {
            let end = off + len;
            let chunk = Chunk::Hole {
                offset: self.offset,
                len: end - self.offset,
            };
            self.offset = end;
            return Poll::Ready(Ok(chunk));
        }
        let next_hole = self
            .holes
            .iter()
            .map(|(o, _)| *o)
            .find(|o| *o > self.offset)
            .unwrap_or(size);
        let end = next_hole.min(self.offset + MAX_CHUNK as u64);
        let chunk = Chunk::Data {
            offset: self.offset,
            bytes: self.content.slice(self.offset as usize..end as usize),
        };
        self.offset = end;
        Poll::Ready(Ok(chunk))
    }
}

/// A sink that keeps everything in memory (holes as zeroes) and checks the digest.
#[derive(Default)]
pub struct MemoryWriter {
    content: Arc<std::sync::Mutex<Vec<u8>>>,
    hole_bytes: Arc<AtomicU64>,
    tally: Tally,
}

impl MemoryWriter {
    /// The content received so far, shared.
    pub fn content(&self) -> Arc<std::sync::Mutex<Vec<u8>>> {
        Arc::clone(&self.content)
    }
    /// Bytes that arrived as holes.
    pub fn hole_bytes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.hole_bytes)
    }
}

impl VolumeWriter for MemoryWriter {
    // No reserve by `size`: it comes from the peer, and the content grows only as bytes arrive.
    fn start(&mut self, _size: u64, _notify: Notify) {
        self.content.lock().unwrap().clear();
    }

    fn write(&mut self, chunk: Chunk) {
        let mut content = self.content.lock().unwrap();
        match &chunk {
            Chunk::Data { bytes, .. } => content.extend_from_slice(bytes),
            Chunk::Hole { len, .. } => {
                let end = content.len() + *len as usize;
                content.resize(end, 0);
                self.hole_bytes.fetch_add(*len, Ordering::Relaxed);
            }
            Chunk::End { .. } => {}
        }
        self.tally.take(&chunk);
    }

    fn poll_progress(&mut self) -> WriteProgress {
        self.tally.progress()
    }
}

/// A sink that keeps nothing and checks only the digest (benchmarks).
#[derive(Default)]
pub struct DiscardWriter {
    tally: Tally,
}

impl VolumeWriter for DiscardWriter {
    fn start(&mut self, _size: u64, _notify: Notify) {}

    fn write(&mut self, chunk: Chunk) {
        self.tally.take(&chunk);
    }

    fn poll_progress(&mut self) -> WriteProgress {
        self.tally.progress()
    }
}

/// What both sinks report: the digest of what came, the chunks taken, and at the end whether
/// the digest matched the sender's (absent when DIGEST was not negotiated).
#[derive(Default)]
struct Tally {
    digest: Digest,
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
}

impl Tally {
    fn take(&mut self, chunk: &Chunk) {
        match chunk {
            Chunk::Data { bytes, .. } => self.digest.update(bytes),
            Chunk::Hole { len, .. } => self.digest.update_zeroes(*len),
            Chunk::End { digest, .. } => {
                let ours = self.digest.value();
                self.outcome = Some(match digest {
                    Some(d) if *d != ours => Err(VolumeError::new(
                        Reason::DigestMismatch,
                        format!("content digest {ours:#010x}, sender says {d:#010x}"),
                    )),
                    _ => Ok(()),
                });
            }
        }
        self.completed += 1;
    }

    fn progress(&self) -> WriteProgress {
        WriteProgress {
            completed: self.completed,
            outcome: self.outcome.clone(),
        }
    }
}
