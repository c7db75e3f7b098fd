//! A latency probe: 4 KiB messages on one stream while bulk streams saturate the same
//! connection in the same direction, timed from the moment the probe's source produces a
//! message to the moment the sink at the other end receives it.

use crate::{provider, random_bytes, start_bulk_uploads};
use bytes::Bytes;
use engine::proto::OpenOptions;
use engine::{
    Address, Chunk, Digest, Engine, EngineConfig, Notify, VolumeError, VolumeReader, VolumeWriter,
    WriteProgress,
};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

pub const MESSAGE: usize = 4096;

/// Probe source: chunks are handed in by the benchmark thread, stamped with their birth time.
struct ProbeReader {
    shared: Arc<Mutex<ProbeQueue>>,
    size: u64,
    digest: Digest,
    offset: u64,
}

#[derive(Default)]
struct ProbeQueue {
    chunks: VecDeque<Bytes>,
    notify: Option<Notify>,
}

impl VolumeReader for ProbeReader {
    fn start(&mut self, notify: Notify) {
        self.shared.lock().unwrap().notify = Some(notify);
    }
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
        let Some(bytes) = self.shared.lock().unwrap().chunks.pop_front() else {
            return Poll::Pending;
        };
        self.digest.update(&bytes);
        let chunk = Chunk::Data {
            offset: self.offset,
            bytes,
        };
        self.offset += MESSAGE as u64;
        Poll::Ready(Ok(chunk))
    }
}

/// Probe sink: records each chunk's age on arrival.
struct ProbeWriter {
    epoch: Instant,
    histogram: Arc<Mutex<Histogram<u64>>>,
    completed: u64,
    digest: Digest,
    outcome: Option<Result<(), VolumeError>>,
}

impl VolumeWriter for ProbeWriter {
    fn start(&mut self, _size: u64, _notify: Notify) {}
    fn write(&mut self, chunk: Chunk) {
        match chunk {
            Chunk::Data { bytes, .. } => {
                let now = self.epoch.elapsed().as_nanos() as u64;
                // Chunks may be split in flight; only the head of a message carries a stamp.
                if bytes.len() >= 8 {
                    let born = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                    let _ = self
                        .histogram
                        .lock()
                        .unwrap()
                        .record(now.saturating_sub(born) / 1000);
                }
                self.digest.update(&bytes);
            }
            Chunk::Hole { .. } => {}
            Chunk::End { digest, .. } => {
                self.outcome = Some(if digest.is_none_or(|d| d == self.digest.value()) {
                    Ok(())
                } else {
                    Err(VolumeError::new(
                        engine::proto::Reason::DigestMismatch,
                        "probe",
                    ))
                })
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

/// What one probe run measured.
pub struct ProbeResult {
    pub p99_us: u64,
    /// The run as a JSON object.
    pub json: String,
}

/// One probe run: `bulk` bulk uploads and `messages` probe messages every `interval`, between
/// a server engine with `server_config` listening on `listen` and a client with
/// `client_config`.
pub fn probe(
    bulk: u64,
    messages: u64,
    interval: Duration,
    server_config: EngineConfig,
    client_config: EngineConfig,
    listen: &Address,
) -> ProbeResult {
    let options = OpenOptions::default();
    probe_with(
        bulk,
        messages,
        interval,
        server_config,
        client_config,
        listen,
        options,
    )
}

/// [`probe`] with the probe stream's OPEN options (e.g. `OpenOptions::default().with_priority(true)`).
pub fn probe_with(
    bulk: u64,
    messages: u64,
    interval: Duration,
    server_config: EngineConfig,
    client_config: EngineConfig,
    listen: &Address,
    options: OpenOptions,
) -> ProbeResult {
    let epoch = Instant::now();
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let block = random_bytes(1 << 20, 7);
    // Bulk streams are long enough to outlast the probe; they are cut off when it ends.
    let server_provider = provider(block.clone(), 1 << 40);
    server_provider.sinks.lock().unwrap().insert(
        "probe".into(),
        Box::new(ProbeWriter {
            epoch,
            histogram: Arc::clone(&histogram),
            completed: 0,
            digest: Digest::new(),
            outcome: None,
        }),
    );
    let (server, server_thread) = Engine::spawn(server_config).unwrap();
    let (_, addr) = server.listen(listen, server_provider).unwrap();
    let (client, client_thread) = Engine::spawn(client_config).unwrap();
    let conn = client.connect(&addr).unwrap();

    let bulk_rx = start_bulk_uploads(&client, conn, bulk, &block);
    std::thread::sleep(Duration::from_millis(300));
    let bytes_before = client.stats(conn).unwrap().map_or(0, |s| s.bytes_out);
    let bulk_start = Instant::now();

    let queue = Arc::new(Mutex::new(ProbeQueue::default()));
    let probe = client.upload(
        conn,
        "probe",
        options,
        Box::new(ProbeReader {
            shared: Arc::clone(&queue),
            size: messages * MESSAGE as u64,
            digest: Digest::new(),
            offset: 0,
        }),
    );
    std::thread::sleep(Duration::from_millis(50));
    let mut next = Instant::now();
    for _ in 0..messages {
        let mut message = vec![0u8; MESSAGE];
        let born = epoch.elapsed().as_nanos() as u64;
        message[..8].copy_from_slice(&born.to_le_bytes());
        let notify = {
            let mut q = queue.lock().unwrap();
            q.chunks.push_back(Bytes::from(message));
            q.notify.clone()
        };
        if let Some(n) = notify {
            n.notify();
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let report = probe
        .recv_timeout(Duration::from_secs(120))
        .expect("probe ends");
    let bulk_bytes = client.stats(conn).unwrap().map_or(0, |s| s.bytes_out) - bytes_before;
    let bulk_gbps = bulk_bytes as f64 / bulk_start.elapsed().as_secs_f64() / 1e9;
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
    drop(bulk_rx);
    let h = histogram.lock().unwrap();
    let json = format!(
        "{{\"bulk_streams\":{bulk},\"messages\":{},\"probe_ok\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"link_GBps_during_probe\":{bulk_gbps:.3}}}",
        h.len(),
        report.result.is_ok(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    ProbeResult {
        p99_us: h.value_at_quantile(0.99),
        json,
    }
}
