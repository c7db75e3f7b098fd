//! Credit windows over a real distance: two engines talk TCP through the delay proxy at 20 ms
//! round trip, and the receiving side's windows size themselves to the path. What is asserted
//! is behaviour (sizes the stats report against the path's bandwidth-delay product, bytes held
//! against the configured maxima, streams finishing and verifying), not how long anything took.

use bench::delay::{DelayConfig, DelayProxy};
use bench::{provider, random_bytes};
use engine::proto::OpenOptions;
use engine::{
    Address, Chunk, Digest, Engine, EngineConfig, EngineHandle, Notify, VolumeError, VolumeWriter,
    WriteProgress,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The tests take turns: each measures what one connection holds, in a process they share.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}
/// One way; the round trip is 20 ms.
const DELAY: Duration = Duration::from_millis(10);

/// A server with memory volumes of `size` bytes, a client, and a proxy between them.
struct Wan {
    server: EngineHandle,
    client: EngineHandle,
    conn: engine::ConnectionId,
    proxy: DelayProxy,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Wan {
    fn new(config: EngineConfig, rate: u64, size: u64) -> Wan {
        let (server, st) = Engine::spawn(config.clone()).unwrap();
        let block = random_bytes(256 << 10, 19);
        let (_, addr) = server
            .listen(
                &Address::Tcp("127.0.0.1:0".parse().unwrap()),
                provider(block, size),
            )
            .unwrap();
        let Address::Tcp(target) = addr else {
            unreachable!()
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let proxy = DelayProxy::start(any, target, DelayConfig::new(DELAY, Some(rate))).unwrap();
        let (client, ct) = Engine::spawn(config).unwrap();
        let conn = client
            .connect_blocking(&Address::Tcp(proxy.local_addr()), Duration::from_secs(10))
            .unwrap();
        Wan {
            server,
            client,
            conn,
            proxy,
            threads: vec![st, ct],
        }
    }

    fn download(
        &self,
        name: &str,
        sink: Box<dyn VolumeWriter>,
    ) -> std::sync::mpsc::Receiver<engine::TransferReport> {
        self.client
            .download(self.conn, name, OpenOptions::default(), sink)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.client.shutdown();
        self.server.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = &self.proxy;
    }
}

/// How fast a [`PacedSink`] finishes chunks: bytes per second, 0 for not at all.
#[derive(Clone)]
struct Pace(Arc<AtomicU64>);

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace(Arc::new(AtomicU64::new(rate)))
    }
    fn set(&self, rate: u64) {
        self.0.store(rate, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct SinkState {
    /// Chunks handed over and not finished, held as a disk queue would hold them.
    pending: VecDeque<(u64, Option<bytes::Bytes>)>,
    pending_bytes: u64,
    peak_pending: u64,
    completed: u64,
    received: u64,
    notify: Option<Notify>,
    outcome: Option<Result<(), VolumeError>>,
    closed: bool,
}

/// A sink that checks the digest and finishes chunks at its [`Pace`] on its own thread, as a
/// disk of that speed would; it can slow down, stall and resume while the stream runs.
struct PacedSink {
    state: Arc<(Mutex<SinkState>, Condvar)>,
    digest: Digest,
    /// Bytes after which the pace changes to `then`.
    switch: Option<(u64, u64)>,
    pace: Pace,
}

impl PacedSink {
    fn new(pace: Pace) -> (PacedSink, Arc<(Mutex<SinkState>, Condvar)>) {
        let state = Arc::new((Mutex::new(SinkState::default()), Condvar::new()));
        let worker = state.clone();
        let p = pace.clone();
        thread::spawn(move || finish_at_pace(&worker, &p));
        (
            PacedSink {
                state: state.clone(),
                digest: Digest::new(),
                switch: None,
                pace,
            },
            state,
        )
    }
}

fn finish_at_pace(state: &(Mutex<SinkState>, Condvar), pace: &Pace) {
    let (lock, cv) = state;
    let mut s = lock.lock().unwrap();
    loop {
        if s.closed {
            return;
        }
        let rate = pace.0.load(Ordering::Relaxed);
        let Some(&(len, _)) = s.pending.front().filter(|_| rate > 0) else {
            s = cv.wait_timeout(s, Duration::from_millis(5)).unwrap().0;
            continue;
        };
        drop(s);
        if rate < u64::MAX {
            thread::sleep(Duration::from_secs_f64(len as f64 / rate as f64));
        }
        s = lock.lock().unwrap();
        s.pending.pop_front();
        s.pending_bytes -= len;
        s.completed += 1;
        if let Some(n) = &s.notify {
            n.notify();
        }
    }
}

impl VolumeWriter for PacedSink {
    fn start(&mut self, _size: u64, notify: Notify) {
        self.state.0.lock().unwrap().notify = Some(notify);
    }

    fn write(&mut self, chunk: Chunk) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        let (len, held) = match chunk {
            Chunk::Data { bytes, .. } => {
                self.digest.update(&bytes);
                (bytes.len() as u64, Some(bytes))
            }
            Chunk::Hole { len, .. } => {
                self.digest.update_zeroes(len);
                (0, None)
            }
            Chunk::End { digest, .. } => {
                // Finished once every chunk before it is.
                s.outcome = Some(match digest {
                    Some(d) if d != self.digest.value() => Err(VolumeError::new(
                        engine::proto::Reason::DigestMismatch,
                        "digest differs",
                    )),
                    _ => Ok(()),
                });
                (0, None)
            }
        };
        s.received += len;
        if let Some((after, then)) = self.switch {
            if s.received >= after {
                self.pace.set(then);
                self.switch = None;
            }
        }
        s.pending.push_back((len, held));
        s.pending_bytes += len;
        s.peak_pending = s.peak_pending.max(s.pending_bytes);
        cv.notify_all();
    }

    fn poll_progress(&mut self) -> WriteProgress {
        let s = self.state.0.lock().unwrap();
        // The End chunk is the last pending one: the outcome shows once it is finished.
        let done = s.pending.is_empty();
        WriteProgress {
            completed: s.completed,
            outcome: if done { s.outcome.clone() } else { None },
        }
    }

    fn cancel(&mut self) {
        self.state.0.lock().unwrap().closed = true;
    }
}

impl Drop for PacedSink {
    fn drop(&mut self) {
        self.state.0.lock().unwrap().closed = true;
        self.state.1.notify_all();
    }
}

fn config(initial: u32, max_stream: u32, max_conn: u32) -> EngineConfig {
    let mut c = EngineConfig::default();
    c.connection.stream_window = initial;
    c.connection.max_stream_window = max_stream;
    c.connection.max_conn_window = max_conn;
    c
}

fn wait(rx: std::sync::mpsc::Receiver<engine::TransferReport>) -> engine::TransferReport {
    rx.recv_timeout(Duration::from_secs(300))
        .expect("the transfer ends")
}

#[test]
fn a_stream_window_grows_to_the_path_and_shrinks_when_its_sink_slows() {
    let _turn = turn();
    let rate = 100_000_000;
    let bdp = rate * 2 * DELAY.as_millis() as u64 / 1000; // 2 MB
    let size = 48 * MIB;
    let max = 8 << 20;
    let wan = Wan::new(config(256 << 10, max, 128 << 20), rate, size);
    let (mut sink, _) = PacedSink::new(Pace::new(u64::MAX));
    // Fast until the last 14 MiB, then a sink of 2 MB/s (2% of the link). A window resizes
    // when it returns credit, at half its size, and comes down as the sink consumes what was
    // granted before: 14 MiB covers one return of the largest window and its whole descent.
    // At that pace four round trips' worth is below the initial window even if a loaded
    // machine doubles the round trip, so the window ends at its initial size, a quarter or
    // less of any peak that reached the path's BDP.
    sink.switch = Some((size - 14 * MIB, 2_000_000));
    let report = wait(wan.download("big", Box::new(sink)));
    report.result.expect("the download verifies");
    let s = report.stats;
    eprintln!(
        "window: initial 256 KiB, peak {} KiB, at the end {} KiB; BDP {} KiB; peak held {} KiB",
        s.peak_window >> 10,
        s.window >> 10,
        bdp >> 10,
        s.peak_buffered >> 10
    );
    assert!(s.peak_window >= bdp, "the window grew to the path's BDP");
    assert!(
        s.peak_window <= max as u64,
        "and no further than its maximum"
    );
    assert!(
        s.window * 4 <= s.peak_window,
        "the slow sink brought it back down"
    );
    assert!(s.peak_buffered <= s.peak_window);
}

#[test]
fn a_stalled_sink_holds_only_its_own_window_and_the_others_finish() {
    let _turn = turn();
    let rate = 100_000_000;
    let max_stream = 8 << 20;
    let wan = Wan::new(config(1 << 20, max_stream, 64 << 20), rate, 16 * MIB);
    // Fast at first, so that its window grows, then stalled half way.
    let stalled = Pace::new(u64::MAX);
    let (mut sink, stalled_state) = PacedSink::new(stalled.clone());
    sink.switch = Some((8 * MIB, 0));
    let stalled_rx = wan.download("stalled", Box::new(sink));
    let others: Vec<_> = (0..4)
        .map(|i| {
            let (sink, _) = PacedSink::new(Pace::new(u64::MAX));
            wan.download(&format!("other{i}"), Box::new(sink))
        })
        .collect();
    for rx in others {
        wait(rx).result.expect("every other stream finishes");
    }
    let held = stalled_state.0.lock().unwrap().peak_pending;
    let conn = wan.client.stats(wan.conn).unwrap().unwrap();
    eprintln!(
        "stalled stream holds {} KiB (max window {} KiB); connection holds {} KiB",
        held >> 10,
        max_stream >> 10,
        conn.recv_buffered >> 10
    );
    assert!(held > 0, "the stalled stream did receive");
    assert!(held <= max_stream as u64, "held {held}");
    assert!(conn.peak_recv_buffered <= 64 << 20);
    // Resumed, it finishes too and verifies; by the engine's account it never held more than
    // its maximum window either.
    stalled.set(u64::MAX);
    let report = wait(stalled_rx);
    report
        .result
        .expect("the stalled stream finishes once resumed");
    assert!(
        report.stats.peak_window <= max_stream as u64,
        "{:?}",
        report.stats
    );
    assert!(
        report.stats.peak_buffered <= report.stats.peak_window,
        "{:?}",
        report.stats
    );
}

fn rss_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn five_hundred_streams_at_20_ms_stay_within_the_connection_cap() {
    let _turn = turn();
    // Sinks slower than the link together (the ~64 that the connection window feeds at a time
    // take 1 MB/s each, against 200 MB/s), so received data piles up at the receiver against
    // its connection window.
    let rate = 200_000_000;
    let cap: u32 = 32 << 20;
    let mut config = config(2 << 20, 16 << 20, cap);
    config.connection.conn_window = 8 << 20;
    // Peak RSS counts from here (earlier tests in this process had their own peaks).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = rss_bytes("VmRSS:");
    let wan = Wan::new(config, rate, 512 << 10);
    let start = Instant::now();
    let mut sinks = Vec::new();
    let pending: Vec<_> = (0..500)
        .map(|i| {
            let (sink, state) = PacedSink::new(Pace::new(1_000_000));
            sinks.push(state);
            wan.download(&format!("v{i}"), Box::new(sink))
        })
        .collect();
    let mut peak_stream = 0;
    for rx in pending {
        let r = wait(rx);
        r.result.expect("every stream verifies");
        peak_stream = peak_stream.max(r.stats.peak_window);
    }
    let conn = wan.client.stats(wan.conn).unwrap().unwrap();
    let peak_rss = rss_bytes("VmHWM:");
    eprintln!(
        "500 x 512 KiB at 20 ms in {:?}: the connection held at most {} KiB (cap {} KiB), its window peaked at {} KiB, the largest stream window {} KiB; RSS {} MiB before, peak {} MiB (both engines, the proxy and the sinks' threads in one process)",
        start.elapsed(),
        conn.peak_recv_buffered >> 10,
        cap >> 10,
        conn.peak_recv_window >> 10,
        peak_stream >> 10,
        before >> 20,
        peak_rss >> 20
    );
    assert!(
        conn.peak_recv_buffered > (cap as u64) / 8,
        "the sinks were slow enough to hold data"
    );
    assert!(conn.peak_recv_buffered <= cap as u64);
    assert!(conn.peak_recv_window <= cap as u64);
    assert!(peak_stream <= 16 << 20);
    // The process holds the receiver's data (at most the cap, in input buffers that a held
    // chunk keeps whole: up to about twice that), the sender's queues (at most its
    // conn_send_buffer) and fixed costs: threads, the proxy's lines. Bounded by configuration,
    // whatever 500 streams at a distance do; 500 times a grown stream window would be GiBs.
    let send_buffer = EngineConfig::default().connection.conn_send_buffer as u64;
    let fixed = 16 << 20;
    assert!(
        peak_rss.saturating_sub(before) <= 2 * cap as u64 + send_buffer + fixed,
        "peak RSS {peak_rss} from {before}"
    );
}
