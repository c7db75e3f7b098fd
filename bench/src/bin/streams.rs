//! Per-stream costs: RSS of idle open streams, and the time to first byte of a new stream
//! while bulk streams saturate the connection. Prints JSON.
//!
//! `streams [--idle 1000] [--bulk 499] [--probes 200]`

use bench::{
    provider, random_bytes, socket_path, start_bulk_uploads, MemoryProvider, RepeatReader,
};
use clap::Parser;
use engine::proto::{OpenOptions, Reason};
use engine::DiscardWriter;
use engine::{
    Chunk, Engine, EngineConfig, Notify, OpenRequest, Provider, VolumeError, VolumeReader,
    VolumeWriter, WriteProgress,
};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

/// A source that opens and then never produces: an idle stream.
struct IdleReader {
    opened: Arc<AtomicUsize>,
}

impl VolumeReader for IdleReader {
    fn start(&mut self, _notify: Notify) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        Poll::Ready(Ok(1 << 30))
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        Poll::Pending
    }
}

struct IdleProvider {
    opened: Arc<AtomicUsize>,
}

impl Provider for IdleProvider {
    fn open_read(&self, _r: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        Ok(Box::new(IdleReader {
            opened: Arc::clone(&self.opened),
        }))
    }
    fn open_write(&self, _r: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        Err(VolumeError::new(Reason::Unsupported, "read only"))
    }
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// RSS growth per open idle stream, both ends (client and server) in this process.
fn idle_streams(count: usize) -> serde_json::Value {
    let opened = Arc::new(AtomicUsize::new(0));
    let (server, st) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(
            &socket_path("idle"),
            Arc::new(IdleProvider {
                opened: Arc::clone(&opened),
            }),
        )
        .unwrap();
    let (client, ct) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    // Warm up the connection and allocator with one stream, then measure the rest.
    let mut receivers = vec![client.download(
        conn,
        "v",
        OpenOptions::default(),
        Box::new(DiscardWriter::default()),
    )];
    while opened.load(Ordering::SeqCst) < 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = rss();
    for i in 0..count {
        receivers.push(client.download(
            conn,
            &format!("v{i}"),
            OpenOptions::default(),
            Box::new(DiscardWriter::default()),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while opened.load(Ordering::SeqCst) < count + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = rss();
    let open_now = client
        .stats(conn)
        .ok()
        .flatten()
        .map_or(0, |_| opened.load(Ordering::SeqCst));
    client.shutdown();
    server.shutdown();
    ct.join().unwrap();
    st.join().unwrap();
    drop(receivers);
    let per_stream = after.saturating_sub(before) as f64 / count as f64;
    serde_json::json!({
        "idle_streams": count,
        "opened": open_now,
        "rss_before": before,
        "rss_after": after,
        "rss_per_stream_bytes": per_stream.round() as u64,
    })
}

/// A sink that notes when its first byte arrives.
struct FirstByte {
    epoch: Instant,
    started: u64,
    histogram: Arc<Mutex<Histogram<u64>>>,
    seen: bool,
    inner: DiscardWriter,
}

impl VolumeWriter for FirstByte {
    fn start(&mut self, size: u64, notify: Notify) {
        self.inner.start(size, notify)
    }
    fn write(&mut self, chunk: Chunk) {
        if !self.seen && matches!(chunk, Chunk::Data { .. }) {
            self.seen = true;
            let now = self.epoch.elapsed().as_micros() as u64;
            let _ = self
                .histogram
                .lock()
                .unwrap()
                .record(now.saturating_sub(self.started).max(1));
        }
        self.inner.write(chunk)
    }
    fn poll_progress(&mut self) -> WriteProgress {
        self.inner.poll_progress()
    }
}

/// Time from asking for a new upload to its first byte at the server, under bulk load.
fn time_to_first_byte(bulk: u64, probes: u64) -> serde_json::Value {
    let epoch = Instant::now();
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let block = random_bytes(1 << 20, 3);
    let server_provider: Arc<MemoryProvider> = provider(block.clone(), 1 << 40);
    let (server, st) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(
            &socket_path("ttfb"),
            Arc::clone(&server_provider) as Arc<dyn Provider>,
        )
        .unwrap();
    let (client, ct) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let _bulk = start_bulk_uploads(&client, conn, bulk, &block);
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..probes {
        let name = format!("probe{i}");
        let started = epoch.elapsed().as_micros() as u64;
        server_provider.sinks.lock().unwrap().insert(
            name.clone(),
            Box::new(FirstByte {
                epoch,
                started,
                histogram: Arc::clone(&histogram),
                seen: false,
                inner: DiscardWriter::default(),
            }),
        );
        let rx = client.upload(
            conn,
            &name,
            OpenOptions::default(),
            Box::new(RepeatReader::new(block.slice(..65536), 65536)),
        );
        let report = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("probe ends");
        assert!(report.result.is_ok(), "{:?}", report.result);
    }
    client.shutdown();
    server.shutdown();
    ct.join().unwrap();
    st.join().unwrap();
    let h = histogram.lock().unwrap();
    serde_json::json!({
        "bulk_streams": bulk,
        "probes": h.len(),
        "ttfb_p50_us": h.value_at_quantile(0.5),
        "ttfb_p99_us": h.value_at_quantile(0.99),
        "ttfb_p999_us": h.value_at_quantile(0.999),
        "ttfb_max_us": h.max(),
    })
}

#[derive(Parser)]
#[command(about = "Per-stream costs: RSS of idle streams, time to first byte under bulk load")]
struct Cli {
    /// Idle streams to open for the RSS measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Bulk uploads running while new streams are timed.
    #[arg(long, default_value_t = 499)]
    bulk: u64,
    /// New streams timed to their first byte.
    #[arg(long, default_value_t = 200)]
    probes: u64,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let out = serde_json::json!({
        "bench": "streams",
        "transport": "unix",
        "idle": idle_streams(cli.idle),
        "first_byte": time_to_first_byte(cli.bulk, cli.probes),
    });
    println!("{out}");
}
