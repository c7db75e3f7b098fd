//! Helpers shared by the benchmark binaries: percentiles, memory volumes, probes, loops.

pub mod delay;
pub mod floor;
pub mod loops;
pub mod probe;

use bytes::Bytes;
use engine::proto::Reason;
use engine::{
    Chunk, Digest, Notify, OpenRequest, Provider, VolumeError, VolumeReader, VolumeWriter,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::task::Poll;

/// The 1, 5 and 15 minute load averages: wall-clock figures mean little without them.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|x| x.parse().unwrap_or(-1.0));
    [(); 3].map(|_| it.next().unwrap_or(-1.0))
}

/// CPU time and context switches of this process so far (all threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user_s: f64,
    pub sys_s: f64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

impl Usage {
    pub fn now() -> Usage {
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Usage {
            user_s: secs(ru.ru_utime),
            sys_s: secs(ru.ru_stime),
            voluntary_switches: ru.ru_nvcsw as u64,
            involuntary_switches: ru.ru_nivcsw as u64,
        }
    }

    /// What was used since `earlier`, per GiB of `bytes`, as JSON fields.
    pub fn per_gib_since(&self, earlier: &Usage, bytes: u64) -> serde_json::Value {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        serde_json::json!({
            "user_s_per_GiB": r3((self.user_s - earlier.user_s) / gib),
            "sys_s_per_GiB": r3((self.sys_s - earlier.sys_s) / gib),
            "switches_per_GiB": ((self.voluntary_switches + self.involuntary_switches
                - earlier.voluntary_switches - earlier.involuntary_switches) as f64 / gib).round(),
        })
    }
}

/// The value below which `p` (0..=1) of `sorted` falls.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Deterministic incompressible bytes.
pub fn random_bytes(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend_from_slice(&state.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// A source that sends `size` bytes by repeating one shared buffer: no generation cost and no
/// copies, so a benchmark measures the engine, not the source.
///
/// The digest of a full block is computed once and appended for every repeat (the content is
/// fixed, as `engine::MemoryReader` digests its content once); only a shorter last chunk is
/// digested from its bytes. A real source digests what it reads on the worker pool, never on
/// the loop, so a pass over every chunk here would charge the loop for work the engine does not
/// do.
pub struct RepeatReader {
    block: Bytes,
    block_digest: Digest,
    size: u64,
    offset: u64,
    digest: Digest,
}

/// The digest of `block`, for `RepeatReader::with_digest`.
pub fn block_digest(block: &[u8]) -> Digest {
    let mut d = Digest::new();
    d.update(block);
    d
}

impl RepeatReader {
    pub fn new(block: Bytes, size: u64) -> Self {
        let digest = block_digest(&block);
        Self::with_digest(block, digest, size)
    }

    /// `block_digest` must be `block_digest(&block)`: many readers of one block share it.
    pub fn with_digest(block: Bytes, block_digest: Digest, size: u64) -> Self {
        RepeatReader {
            block,
            block_digest,
            size,
            offset: 0,
            digest: Digest::new(),
        }
    }
}

impl VolumeReader for RepeatReader {
    fn start(&mut self, _notify: Notify) {}

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        Poll::Ready(Ok(self.size))
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        if self.offset == self.size {
            return Poll::Ready(Ok(Chunk::End {
                length: self.size,
                digest: Some(self.digest.value()),
            }));
        }
        let n = (self.size - self.offset).min(self.block.len() as u64) as usize;
        let bytes = self.block.slice(..n);
        if n == self.block.len() {
            self.digest.append(&self.block_digest);
        } else {
            self.digest.update(&bytes);
        }
        let chunk = Chunk::Data {
            offset: self.offset,
            bytes,
        };
        self.offset += n as u64;
        Poll::Ready(Ok(chunk))
    }
}

/// Serves every name as a repeat of one block, `size` bytes long, and discards every write
/// after checking its digest.
pub struct MemoryProvider {
    pub block: Bytes,
    /// `block_digest(&block)`, computed once for every reader.
    pub block_digest: Digest,
    pub size: u64,
    /// Named sinks that override the discarding default (e.g. a latency probe).
    pub sinks: std::sync::Mutex<HashMap<String, Box<dyn VolumeWriter>>>,
}

impl Provider for MemoryProvider {
    fn open_read(&self, _request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        Ok(Box::new(RepeatReader::with_digest(
            self.block.clone(),
            self.block_digest,
            self.size,
        )))
    }

    fn open_write(&self, request: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        if let Some(sink) = self.sinks.lock().unwrap().remove(&request.name) {
            return Ok(sink);
        }
        if request.name.is_empty() {
            return Err(VolumeError::new(Reason::InvalidName, "empty name"));
        }
        Ok(Box::new(engine::DiscardWriter::default()))
    }
}

/// A fresh Unix socket path in the temp directory.
pub fn socket_path(tag: &str) -> engine::Address {
    let path = std::env::temp_dir().join(format!("volstream-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    engine::Address::Unix(path)
}

pub fn provider(block: Bytes, size: u64) -> Arc<MemoryProvider> {
    Arc::new(MemoryProvider {
        block_digest: block_digest(&block),
        block,
        size,
        sinks: Default::default(),
    })
}

/// Starts `count` uploads that repeat `block` for 1 TiB each: bulk load that outlasts any
/// measurement and is cut off when the engines shut down.
pub fn start_bulk_uploads(
    client: &engine::EngineHandle,
    conn: engine::ConnectionId,
    count: u64,
    block: &Bytes,
) -> Vec<std::sync::mpsc::Receiver<engine::TransferReport>> {
    let digest = block_digest(block);
    (0..count)
        .map(|i| {
            client.upload(
                conn,
                &format!("bulk{i}"),
                engine::proto::OpenOptions::default(),
                Box::new(RepeatReader::with_digest(block.clone(), digest, 1 << 40)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The appended block digest must equal digesting every byte sent, or every benchmark's
    /// sink would fail its transfers.
    #[test]
    fn a_repeat_reader_sends_the_digest_of_its_bytes() {
        let block = random_bytes(4096 + 7, 3);
        for size in [0, 100, 4096 + 7, 3 * (4096 + 7), 5 * (4096 + 7) + 1234] {
            let mut reader = RepeatReader::new(block.clone(), size);
            let mut seen = Digest::new();
            let sent = loop {
                match reader.poll_chunk() {
                    Poll::Ready(Ok(Chunk::Data { bytes, .. })) => seen.update(&bytes),
                    Poll::Ready(Ok(Chunk::End { length, digest })) => break (length, digest),
                    other => panic!("unexpected {other:?}"),
                }
            };
            assert_eq!(sent, (size, Some(seen.value())), "size {size}");
            assert_eq!(seen.len(), size);
        }
    }
}
