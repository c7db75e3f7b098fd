//! Backpressure and the sparse fallback, end to end through two engines, each test over a Unix
//! socket and over TLS on loopback TCP.

mod common;

use common::Net;

use engine::proto::{Config, Features, OpenOptions};
use engine::synthetic::{Synthetic, SyntheticProvider, Verifier};
use engine::{
    Address, Chunk, Engine, EngineConfig, EngineHandle, Notify, VolumeWriter, WriteProgress,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

over_each_transport!(
    stalled_sink_holds_only_its_own_window,
    peer_without_sparse_gets_holes_as_zeroes_and_digest_verifies,
    missing_volume_is_rejected_without_harming_the_connection,
    list_travels_as_stream_content,
    a_sink_stuck_forever_times_out_alone,
    many_stalled_streams_hold_little_memory_at_the_sender,
    an_unsendable_name_fails_only_its_transfer,
    a_failure_behind_queued_chunks_aborts_the_stream_without_waiting_for_them,
);

/// A server engine serving synthetic volumes; shut down when dropped.
struct Server {
    handle: EngineHandle,
    addr: Address,
    net: Net,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(net: Net, tag: &str, volumes: &[(String, Synthetic)]) -> Server {
        let mut provider = SyntheticProvider::default();
        for (name, v) in volumes {
            provider.insert(name.clone(), v.clone());
        }
        let (handle, thread) = Engine::spawn(net.server(EngineConfig::default())).unwrap();
        let (_, addr) = handle
            .listen(&net.listen_addr(&format!("flow-{tag}")), Arc::new(provider))
            .unwrap();
        Server {
            handle,
            addr,
            net,
            thread: Some(thread),
        }
    }

    /// A client engine connected to this server.
    fn client(&self, config: EngineConfig) -> Client {
        let (client, thread) = Engine::spawn(self.net.client(config)).unwrap();
        let conn = client.connect(&self.addr).unwrap();
        Client {
            client,
            conn,
            thread: Some(thread),
        }
    }
}

struct Client {
    client: EngineHandle,
    conn: engine::ConnectionId,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Engines are shut down and their threads joined, so a panic on a loop thread fails the test.
fn stop(handle: &EngineHandle, thread: &mut Option<std::thread::JoinHandle<()>>) {
    handle.shutdown();
    if let Some(t) = thread.take() {
        if t.join().is_err() && !std::thread::panicking() {
            panic!("an event loop panicked");
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        stop(&self.client, &mut self.thread);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&self.handle, &mut self.thread);
    }
}

/// A sink that accepts chunks but completes none of them until its gate opens, like a disk
/// that stopped answering. It counts the payload it holds.
struct GatedWriter {
    inner: Verifier,
    open: Arc<AtomicBool>,
    held: Arc<AtomicU64>,
    peak_held: Arc<AtomicU64>,
    queue: Vec<Chunk>,
    notify: Arc<Mutex<Option<Notify>>>,
}

impl VolumeWriter for GatedWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        *self.notify.lock().unwrap() = Some(notify.clone());
        self.inner.start(size, notify);
    }

    fn write(&mut self, chunk: Chunk) {
        let held = self.held.fetch_add(chunk_bytes(&chunk), Ordering::SeqCst) + chunk_bytes(&chunk);
        self.peak_held.fetch_max(held, Ordering::SeqCst);
        self.queue.push(chunk);
    }

    fn poll_progress(&mut self) -> WriteProgress {
        if self.open.load(Ordering::SeqCst) {
            for chunk in self.queue.drain(..) {
                self.held.fetch_sub(chunk_bytes(&chunk), Ordering::SeqCst);
                self.inner.write(chunk);
            }
        }
        self.inner.poll_progress()
    }
}

fn chunk_bytes(chunk: &Chunk) -> u64 {
    match chunk {
        Chunk::Data { bytes, .. } => bytes.len() as u64,
        _ => 0,
    }
}

fn stalled_sink_holds_only_its_own_window(net: Net) {
    let window = 256 * 1024;
    let volumes: Vec<(String, Synthetic)> = (0..100)
        .map(|i| (format!("v{i}"), Synthetic::new(77 + i, 4 * MIB, 0.1)))
        .collect();
    let server = Server::start(net, "stall", &volumes);
    let mut config = EngineConfig::default();
    config.connection.stream_window = window;
    config.connection.conn_window = 8 * 1024 * 1024;
    let max_window = config.connection.max_stream_window as u64;
    let pair = server.client(config);
    let (client, conn) = (&pair.client, pair.conn);

    let open = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicU64::new(0));
    let peak_held = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(Mutex::new(None));
    let gated = GatedWriter {
        inner: volumes[0].1.verifier(),
        open: Arc::clone(&open),
        held: Arc::clone(&held),
        peak_held: Arc::clone(&peak_held),
        queue: Vec::new(),
        notify: Arc::clone(&notify),
    };
    let stalled = client.download(conn, "v0", OpenOptions::default(), Box::new(gated));
    let others: Vec<_> = volumes[1..]
        .iter()
        .map(|(name, v)| {
            client.download(conn, name, OpenOptions::default(), Box::new(v.verifier()))
        })
        .collect();

    for (i, rx) in others.into_iter().enumerate() {
        let report = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("stream finishes");
        assert_eq!(report.result, Ok(()), "stream {}", i + 1);
    }
    // 99 streams are done while the stalled one is still held back by its window.
    assert!(
        stalled.try_recv().is_err(),
        "stalled stream must not finish"
    );
    let buffered = client.stats(conn).unwrap().unwrap().recv_buffered;
    assert!(buffered > 0, "the stalled stream holds some data");
    assert!(
        buffered <= window as u64,
        "engine holds {buffered} bytes for a stalled stream with a {window}-byte window"
    );
    assert!(peak_held.load(Ordering::SeqCst) <= window as u64);

    open.store(true, Ordering::SeqCst);
    notify.lock().unwrap().as_ref().unwrap().notify();
    let report = stalled
        .recv_timeout(Duration::from_secs(60))
        .expect("resumed stream finishes");
    assert_eq!(report.result, Ok(()));
    // Resumed, its window may grow with the pace its sink now keeps: what it held stays
    // within that window, and the window within its maximum.
    let stats = report.stats;
    assert!(stats.peak_buffered > 0);
    assert!(stats.peak_buffered <= stats.peak_window, "{stats:?}");
    assert!(stats.peak_window <= max_window, "{stats:?}");
}

fn peer_without_sparse_gets_holes_as_zeroes_and_digest_verifies(net: Net) {
    let volumes: Vec<(String, Synthetic)> = (0..8)
        .map(|i| {
            (
                format!("v{i}"),
                Synthetic::new(900 + i, 3 * MIB + 1234, 0.5),
            )
        })
        .collect();
    let server = Server::start(net, "nosparse", &volumes);
    let config = EngineConfig {
        connection: Config {
            features: Features::ALL.without(Features::SPARSE),
            ..Config::default()
        },
        ..EngineConfig::default()
    };
    let pair = server.client(config);
    let (client, conn) = (&pair.client, pair.conn);

    let mut pending = Vec::new();
    for (i, (name, v)) in volumes.iter().enumerate() {
        // Half download (the server expands holes), half upload (the client does).
        let rx = if i % 2 == 0 {
            client.download(conn, name, OpenOptions::default(), Box::new(v.verifier()))
        } else {
            client.upload(conn, name, OpenOptions::default(), Box::new(v.reader()))
        };
        pending.push((v.clone(), rx));
    }
    for (v, rx) in pending {
        let report = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(report.result, Ok(()));
        assert_eq!(report.stats.hole_bytes, 0, "no HOLE frames without SPARSE");
        assert_eq!(report.stats.data_bytes, v.size, "holes travel as zero DATA");
        assert!(v.size > v.data_bytes(), "the volume has holes");
    }
}

fn missing_volume_is_rejected_without_harming_the_connection(net: Net) {
    let volumes = vec![("here".to_owned(), Synthetic::new(5, MIB, 0.2))];
    let server = Server::start(net, "reject", &volumes);
    let pair = server.client(EngineConfig::default());
    let (client, conn) = (&pair.client, pair.conn);
    let missing = client.download(
        conn,
        "nothere",
        OpenOptions::default(),
        Box::new(volumes[0].1.verifier()),
    );
    let report = missing.recv_timeout(Duration::from_secs(10)).unwrap();
    let err = report.result.unwrap_err();
    assert_eq!(err.reason, engine::proto::Reason::NotFound);
    let ok = client.download(
        conn,
        "here",
        OpenOptions::default(),
        Box::new(volumes[0].1.verifier()),
    );
    assert_eq!(
        ok.recv_timeout(Duration::from_secs(10)).unwrap().result,
        Ok(())
    );
}

fn list_travels_as_stream_content(net: Net) {
    let volumes = vec![
        ("b".to_owned(), Synthetic::new(5, MIB, 0.2)),
        ("a".to_owned(), Synthetic::new(6, 3 * MIB, 0.5)),
    ];
    let server = Server::start(net, "list", &volumes);
    let pair = server.client(EngineConfig::default());
    let (client, conn) = (&pair.client, pair.conn);
    let sink = engine::MemoryWriter::default();
    let content = sink.content();
    let rx = client.fetch(conn, engine::proto::Op::List, "", Box::new(sink));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().result,
        Ok(())
    );
    let text = String::from_utf8(content.lock().unwrap().clone()).unwrap();
    let expected = format!(
        "a\t{}\t{}\nb\t{}\t{}\n",
        3 * MIB,
        volumes[1].1.data_bytes(),
        MIB,
        volumes[0].1.data_bytes()
    );
    assert_eq!(text, expected);
    // Extents are not offered by this provider: the stream is refused, the connection lives.
    let rx = client.fetch(
        conn,
        engine::proto::Op::Extents,
        "a",
        Box::new(engine::MemoryWriter::default()),
    );
    let err = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .result
        .unwrap_err();
    assert_eq!(err.reason, engine::proto::Reason::Unsupported);
}

/// A sink that never consumes anything.
struct StuckWriter;

impl VolumeWriter for StuckWriter {
    fn start(&mut self, _size: u64, _notify: Notify) {}
    fn write(&mut self, _chunk: Chunk) {}
    fn poll_progress(&mut self) -> WriteProgress {
        WriteProgress::default()
    }
}

fn a_sink_stuck_forever_times_out_alone(net: Net) {
    let volumes: Vec<(String, Synthetic)> = (0..20)
        .map(|i| (format!("v{i}"), Synthetic::new(300 + i, 4 * MIB, 0.3)))
        .collect();
    let server = Server::start(net, "stuck", &volumes);
    let mut config = EngineConfig::default();
    config.connection.stream_timeout = Duration::from_millis(600);
    let pair = server.client(config);
    let (client, conn) = (&pair.client, pair.conn);
    let stuck = client.download(conn, "v0", OpenOptions::default(), Box::new(StuckWriter));
    let others: Vec<_> = volumes[1..]
        .iter()
        .map(|(n, v)| client.download(conn, n, OpenOptions::default(), Box::new(v.verifier())))
        .collect();
    for rx in others {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)).unwrap().result,
            Ok(())
        );
    }
    let err = stuck
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .result
        .expect_err("a stuck sink cannot complete");
    assert_eq!(err.reason, engine::proto::Reason::Timeout, "{err}");
    // The connection survives the stream's timeout.
    let again = client.download(
        conn,
        "v1",
        OpenOptions::default(),
        Box::new(volumes[1].1.verifier()),
    );
    assert_eq!(
        again.recv_timeout(Duration::from_secs(30)).unwrap().result,
        Ok(())
    );
}

fn many_stalled_streams_hold_little_memory_at_the_sender(net: Net) {
    let count = 300;
    let volumes: Vec<(String, Synthetic)> = (0..count)
        .map(|i| (format!("v{i}"), Synthetic::new(500 + i, 8 * MIB, 0.0)))
        .collect();
    let server = Server::start(net, "memcap", &volumes);
    let pair = server.client(EngineConfig::default());
    let (client, conn) = (&pair.client, pair.conn);
    let receivers: Vec<_> = volumes
        .iter()
        .map(|(n, _)| client.download(conn, n, OpenOptions::default(), Box::new(StuckWriter)))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let stats = server.handle.engine_stats().unwrap();
    // The connection cap (16 MiB by default) plus one source chunk per stream, plus the
    // transmit queue and control backlog; without the cap this was send_buffer (512 KiB) per
    // stream, 150 MiB here.
    let bound = 16 * MIB + count * engine::synthetic::CHUNK as u64 + 512 * 1024 + 64 * 1024;
    assert!(
        stats.max_send_queued <= bound,
        "server holds {} bytes for one connection, bound {bound}",
        stats.max_send_queued
    );
    assert!(stats.max_send_queued > 0);
    drop(receivers);
}

fn an_unsendable_name_fails_only_its_transfer(net: Net) {
    let volumes = vec![("ok".to_owned(), Synthetic::new(8, MIB, 0.2))];
    let server = Server::start(net, "names", &volumes);
    let pair = server.client(EngineConfig::default());
    let (client, conn) = (&pair.client, pair.conn);
    for bad in [String::new(), "x".repeat(300)] {
        let rx = client.download(
            conn,
            &bad,
            OpenOptions::default(),
            Box::new(volumes[0].1.verifier()),
        );
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .result
            .unwrap_err();
        assert_eq!(err.reason, engine::proto::Reason::InvalidName);
    }
    let rx = client.download(
        conn,
        "ok",
        OpenOptions::default(),
        Box::new(volumes[0].1.verifier()),
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().result,
        Ok(())
    );
}

/// A source whose later failure is known while earlier chunks still wait to be sent.
struct FailingLater {
    inner: engine::synthetic::SyntheticReader,
    produced: u64,
}

impl engine::VolumeReader for FailingLater {
    fn start(&mut self, notify: Notify) {
        self.inner.start(notify)
    }
    fn poll_size(&mut self) -> std::task::Poll<Result<u64, engine::VolumeError>> {
        self.inner.poll_size()
    }
    fn poll_chunk(&mut self) -> std::task::Poll<Result<Chunk, engine::VolumeError>> {
        self.produced += 1;
        self.inner.poll_chunk()
    }
    fn poll_failure(&mut self) -> Option<engine::VolumeError> {
        (self.produced > 8).then(|| {
            engine::VolumeError::new(engine::proto::Reason::Io, "disk gone after the read-ahead")
        })
    }
}

fn a_failure_behind_queued_chunks_aborts_the_stream_without_waiting_for_them(net: Net) {
    let volume = Synthetic::new(77, 64 * MIB, 0.0);
    let volumes = vec![("v".to_owned(), volume.clone())];
    let server = Server::start(net, "failure", &volumes);
    let pair = server.client(EngineConfig::default());
    let reader = FailingLater {
        inner: volume.reader(),
        produced: 0,
    };
    let rx = pair
        .client
        .upload(pair.conn, "v", OpenOptions::default(), Box::new(reader));
    let report = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let err = report
        .result
        .expect_err("the known failure aborts the upload");
    assert_eq!(err.reason, engine::proto::Reason::Io, "{err}");
    assert!(
        report.stats.data_bytes < volume.size,
        "aborted before the end"
    );
}
