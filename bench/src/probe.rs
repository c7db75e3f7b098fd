//! A latency probe: 4 KiB messages on one stream while bulk streams saturate the same
//! connection in the same direction, timed from the moment the probe's source produces a
//! message to the moment the sink at the other end receives it.
//!
//! With a trace ([`probe_traced`]) the run also reports, per 10 ms bin of the probe's time, the
//! bulk bytes the server's sinks took (the link's rate then, not the run's average) and the
//! longest wait of a probe message born in the bin: a tail episode then shows whether the link
//! slowed below the probe's share as it began. The counts are taken in the sinks, off the
//! engine's command channel, so sampling them does not wake the loops.

use crate::{provider, random_bytes, start_bulk_uploads};
use bytes::Bytes;
use engine::proto::OpenOptions;
use engine::{
    Address, Chunk, Digest, Engine, EngineConfig, Notify, VolumeError, VolumeReader, VolumeWriter,
    WriteProgress,
};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

pub const MESSAGE: usize = 4096;
/// Width of a trace bin.
const BIN: Duration = Duration::from_millis(10);

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

/// (birth, wait) of every probe message, in nanoseconds since the epoch and microseconds.
type Waits = Arc<Mutex<Vec<(u64, u64)>>>;

/// Probe sink: records each chunk's age on arrival.
struct ProbeWriter {
    epoch: Instant,
    histogram: Arc<Mutex<Histogram<u64>>>,
    /// Filled when tracing.
    waits: Option<Waits>,
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
                    let wait = now.saturating_sub(born) / 1000;
                    let _ = self.histogram.lock().unwrap().record(wait);
                    if let Some(waits) = &self.waits {
                        waits.lock().unwrap().push((born, wait));
                    }
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

/// A bulk stream's sink that counts what it takes into a total shared by all of them.
struct CountingWriter {
    inner: engine::DiscardWriter,
    total: Arc<AtomicU64>,
}

impl VolumeWriter for CountingWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        self.inner.start(size, notify);
    }
    fn write(&mut self, chunk: Chunk) {
        if let Chunk::Data { bytes, .. } = &chunk {
            self.total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        self.inner.write(chunk);
    }
    fn poll_progress(&mut self) -> WriteProgress {
        self.inner.poll_progress()
    }
}

/// What one probe run measured.
pub struct ProbeResult {
    pub p99_us: u64,
    /// The run as a JSON object.
    pub json: serde_json::Value,
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
    let configs = (server_config, client_config);
    probe_traced(bulk, messages, interval, configs, listen, options, false)
}

/// [`probe_with`], and with `trace` the per-bin series of the module's doc in the JSON
/// (`trace`: `bin_ms`, `link_MBps`, `probe_max_wait_us`, 0 where no message was born).
pub fn probe_traced(
    bulk: u64,
    messages: u64,
    interval: Duration,
    (server_config, client_config): (EngineConfig, EngineConfig),
    listen: &Address,
    options: OpenOptions,
    trace: bool,
) -> ProbeResult {
    let epoch = Instant::now();
    let waits: Option<Waits> = trace.then(Default::default);
    let received = Arc::new(AtomicU64::new(0));
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
            waits: waits.clone(),
            completed: 0,
            digest: Digest::new(),
            outcome: None,
        }),
    );
    if trace {
        let mut sinks = server_provider.sinks.lock().unwrap();
        for i in 0..bulk {
            let sink = CountingWriter {
                inner: engine::DiscardWriter::default(),
                total: Arc::clone(&received),
            };
            sinks.insert(format!("bulk{i}"), Box::new(sink));
        }
    }
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
    let probe_start = epoch.elapsed().as_nanos() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = trace.then(|| {
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let start = Instant::now();
            let mut next = start;
            while !stop.load(Ordering::Relaxed) {
                samples.push(received.load(Ordering::Relaxed));
                next += BIN;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            samples
        })
    });
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
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.map(|s| s.join().expect("sampler"));
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
    drop(bulk_rx);
    let h = histogram.lock().unwrap();
    let mut run = serde_json::json!({
        "bulk_streams": bulk,
        "messages": h.len(),
        "probe_ok": report.result.is_ok(),
        "p50_us": h.value_at_quantile(0.5),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "link_GBps_during_probe": (bulk_gbps * 1000.0).round() / 1000.0,
    });
    if let (Some(samples), Some(waits)) = (samples, waits) {
        run["trace"] = trace_bins(&samples, &waits.lock().unwrap(), probe_start);
    }
    ProbeResult {
        p99_us: h.value_at_quantile(0.99),
        json: run,
    }
}

/// The link's rate per bin from the cumulative samples, and the longest wait of the messages
/// born in each bin (bins counted from `start`, the first message's time).
fn trace_bins(samples: &[u64], waits: &[(u64, u64)], start: u64) -> serde_json::Value {
    let secs = BIN.as_secs_f64();
    let link: Vec<f64> = samples
        .windows(2)
        .map(|w| ((w[1] - w[0]) as f64 / secs / 1e5).round() / 10.0)
        .collect();
    let mut worst = vec![0u64; link.len()];
    for &(born, wait) in waits {
        let bin = (born.saturating_sub(start) / BIN.as_nanos() as u64) as usize;
        if let Some(w) = worst.get_mut(bin) {
            *w = (*w).max(wait);
        }
    }
    serde_json::json!({
        "bin_ms": BIN.as_millis() as u64,
        "link_MBps": link,
        "probe_max_wait_us": worst,
    })
}
