//! `serve --metrics`: scrapes of a real server during and after a 100-stream download, parsed
//! with a Prometheus text parser that is not ours, agree with the transfers' reports.

mod common;

use common::{bin, sparse_file, TempDir, MIB};
use engine::in_memory::DiscardWriter;
use engine::proto::OpenOptions;
use engine::{
    Address, Chunk, Engine, EngineConfig, Notify, TransferReport, VolumeWriter, WriteProgress,
};
use prometheus_parse::{Sample, Scrape, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STREAMS: usize = 100;
const SIZE: u64 = 2 * MIB;
/// Each volume: a hole, 512 KiB of data, a hole to the end.
const DATA: (u64, u64) = (512 << 10, 512 << 10);

/// Holds back a sink's progress until opened: chunks arrive but their credit does not go
/// back, so the server's streams stall with their content in flight.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    waiting: Mutex<Vec<Notify>>,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        for notify in self.waiting.lock().unwrap().drain(..) {
            notify.notify();
        }
    }
}

struct Gated {
    inner: DiscardWriter,
    gate: Arc<Gate>,
}

impl VolumeWriter for Gated {
    fn start(&mut self, size: u64, notify: Notify) {
        self.gate.waiting.lock().unwrap().push(notify.clone());
        self.inner.start(size, notify);
    }
    fn write(&mut self, chunk: Chunk) {
        self.inner.write(chunk);
    }
    fn poll_progress(&mut self) -> WriteProgress {
        if self.gate.open.load(Ordering::SeqCst) {
            self.inner.poll_progress()
        } else {
            WriteProgress::default()
        }
    }
}

/// `volstream serve --metrics` on ports of its choosing.
struct Server {
    child: Child,
    listen: SocketAddr,
    metrics: SocketAddr,
}

impl Server {
    fn start(pool: &std::path::Path) -> Server {
        let mut child = bin()
            .args(["serve", "--pool"])
            .arg(pool)
            .args([
                "--listen",
                "tcp:127.0.0.1:0",
                "--metrics",
                "tcp:127.0.0.1:0",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut addr_after = |marker: &str| -> SocketAddr {
            let line = lines.next().expect("serve says where it listens").unwrap();
            let at = line
                .split(marker)
                .nth(1)
                .unwrap_or_else(|| panic!("{line}"));
            at.trim_end_matches("/metrics").parse().unwrap()
        };
        let listen = addr_after(" on tcp:");
        let metrics = addr_after("metrics on http://");
        Server {
            child,
            listen,
            metrics,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        common::kill(self.child.id(), 15);
        let _ = self.child.wait();
    }
}

/// One scrape, parsed.
struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect()
    }

    /// The one sample of `name` with these labels (others may vary).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.matching(name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        value(found[0])
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.metric == name)
    }
}

fn value(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) => v,
        ref other => panic!(
            "{}: {other:?} is neither a counter nor a gauge",
            sample.metric
        ),
    }
}

fn scrape(at: SocketAddr) -> Metrics {
    let mut s = TcpStream::connect(at).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: text/plain\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len());
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // The parser skips what it cannot read: every sample line must have become a sample,
    // typed by its family's TYPE line and with every label it carries.
    let lines: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(scrape.samples.len(), lines.len());
    for (sample, line) in scrape.samples.iter().zip(&lines) {
        assert!(line.starts_with(&sample.metric), "{line}");
        assert!(
            matches!(sample.value, Value::Counter(_) | Value::Gauge(_)),
            "{line}"
        );
        assert_eq!(sample.labels.len(), line.matches("=\"").count(), "{line}");
    }
    Metrics {
        samples: scrape.samples,
    }
}

/// Scrapes until `ready` holds (at most a minute).
fn scrape_until(at: SocketAddr, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = scrape(at);
        if ready(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_scrape_during_a_100_stream_download_agrees_with_the_reports() {
    let dir = TempDir::new("metrics");
    let names: Vec<String> = (0..STREAMS).map(|i| format!("vol{i:03}.raw")).collect();
    for (i, name) in names.iter().enumerate() {
        sparse_file(&dir.join(name), SIZE, &[DATA], i as u64 + 1);
    }
    let server = Server::start(&dir.0);

    let client_config = EngineConfig::default();
    let conn_window = client_config.connection.conn_window as f64;
    let (client, client_thread) = Engine::spawn(client_config).unwrap();
    let conn = client
        .connect_blocking(&Address::Tcp(server.listen), Duration::from_secs(10))
        .unwrap();
    let gate = Arc::new(Gate::default());
    let pending: Vec<_> = names
        .iter()
        .map(|name| {
            let sink = Gated {
                inner: DiscardWriter::default(),
                gate: Arc::clone(&gate),
            };
            client.download(conn, name, OpenOptions::default(), Box::new(sink))
        })
        .collect();

    // During: 50 MiB of data wants out through a 32 MiB connection window the client does not
    // give back, so every stream is open and the server has spent all the credit it was given.
    let conn_ = |name: &str| format!("volstream_connection_{name}");
    let mid = scrape_until(server.metrics, "100 streams out of credit", |m| {
        m.has(&conn_("streams"))
            && m.get(&conn_("streams"), &[]) == STREAMS as f64
            && m.get(&conn_("send_window_in_use_bytes"), &[]) >= conn_window - 4096.0
            && m.get("volstream_credit_stalls_total", &[]) > 0.0
    });
    assert_eq!(mid.get("volstream_connections", &[]), 1.0);
    assert_eq!(mid.get(&conn_("established"), &[("side", "server")]), 1.0);
    let sizes = mid.matching("volstream_stream_size_bytes", &[]);
    assert_eq!(sizes.len(), STREAMS);
    let mut volumes: Vec<&str> = sizes
        .iter()
        .map(|s| s.labels.get("volume").unwrap())
        .collect();
    volumes.sort_unstable();
    assert_eq!(
        volumes,
        names.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for s in &sizes {
        assert_eq!(value(s), SIZE as f64);
        assert_eq!(s.labels.get("op"), Some("READ"));
        assert_eq!(s.labels.get("direction"), Some("send"));
        assert_eq!(s.labels.get("origin"), Some("peer"));
    }
    // Per stream and per connection agree with each other in one scrape.
    let stream_sum = |name: &str, kind: &str| -> f64 {
        mid.matching(name, &[("kind", kind)])
            .iter()
            .map(|s| value(s))
            .sum()
    };
    let sent_data = stream_sum("volstream_stream_content_bytes_total", "data");
    assert!(sent_data > 0.0 && sent_data <= conn_window);
    let out_data = [("direction", "out"), ("kind", "data")];
    assert_eq!(mid.get(&conn_("content_bytes_total"), &out_data), sent_data);
    let out = |kind| [("direction", "out"), ("type", kind)];
    assert_eq!(
        mid.get(&conn_("frames_total"), &out("DATA")),
        stream_sum("volstream_stream_frames_total", "data")
    );
    assert_eq!(
        mid.get(&conn_("frames_total"), &out("HOLE")),
        stream_sum("volstream_stream_frames_total", "hole")
    );
    for s in mid.matching("volstream_stream_content_bytes_total", &[("kind", "data")]) {
        assert!(value(s) <= DATA.1 as f64);
    }
    let in_use: f64 = mid
        .matching("volstream_stream_window_in_use_bytes", &[])
        .iter()
        .map(|s| value(s))
        .sum();
    assert_eq!(in_use, mid.get(&conn_("send_window_in_use_bytes"), &[]));
    assert_eq!(mid.get("volstream_streams_completed_total", &[]), 0.0);
    // A stream knows its time to first byte once it took content from its source: then it
    // has sent some, or holds it queued for want of credit.
    let stream_of = |s: &Sample| s.labels.get("stream").unwrap().to_owned();
    let firsts: Vec<String> = mid
        .matching("volstream_stream_first_byte_seconds", &[])
        .into_iter()
        .map(stream_of)
        .collect();
    assert!(!firsts.is_empty());
    for s in &sizes {
        let id = stream_of(s);
        let of = |name: &str| mid.get(name, &[("stream", &id)]);
        let took = of("volstream_stream_wire_bytes_total") > 0.0
            || of("volstream_stream_queued_chunks") > 0.0;
        assert_eq!(firsts.contains(&id), took, "stream {id}");
    }
    // Each scrape pings the connection: its round trip shows up although data is stuck.
    scrape_until(server.metrics, "the connection's RTT", |m| {
        m.has(&conn_("rtt_seconds"))
    });

    gate.open();
    let reports: Vec<TransferReport> = pending
        .into_iter()
        .map(|rx| rx.recv_timeout(Duration::from_secs(60)).unwrap())
        .collect();
    for r in &reports {
        assert_eq!(r.result, Ok(()), "{}", r.name);
        assert!(r.first_byte.is_some_and(|t| t <= r.elapsed));
    }
    // After the client's PING is answered the server has sent all it will on this connection.
    client.ping(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    let client_stats = loop {
        let stats = client.stats(conn).unwrap().unwrap();
        if stats.rtt.is_some() {
            break stats;
        }
        assert!(Instant::now() < deadline, "no PONG");
        std::thread::sleep(Duration::from_millis(5));
    };
    client.shutdown();
    client_thread.join().unwrap();

    // After: the connection is gone, and the totals it left are the reports' sums.
    let end = scrape_until(server.metrics, "the connection ended", |m| {
        m.get("volstream_connections", &[]) == 0.0
    });
    // The client stopped with nothing left to do: a graceful GOAWAY, not a cancellation.
    let ended = end.matching("volstream_connections_ended_total", &[]);
    assert_eq!(ended.iter().map(|s| value(s)).sum::<f64>(), 1.0);
    assert_eq!(
        end.get(
            "volstream_connections_ended_total",
            &[("reason", "GOING_AWAY")]
        ),
        1.0
    );
    assert!(!end.has("volstream_stream_size_bytes"));
    let sum = |f: fn(&TransferReport) -> u64| reports.iter().map(f).sum::<u64>() as f64;
    assert_eq!(
        end.get("volstream_streams_completed_total", &[]),
        STREAMS as f64
    );
    assert_eq!(
        end.get("volstream_content_bytes_total", &out_data),
        sum(|r| r.stats.data_bytes)
    );
    assert_eq!(
        sum(|r| r.stats.data_bytes),
        (STREAMS as u64 * DATA.1) as f64
    );
    assert_eq!(
        end.get(
            "volstream_content_bytes_total",
            &[("direction", "out"), ("kind", "hole")]
        ),
        sum(|r| r.stats.hole_bytes)
    );
    let total_frames = |direction, kind| {
        end.get(
            "volstream_frames_total",
            &[("direction", direction), ("type", kind)],
        )
    };
    assert_eq!(total_frames("out", "DATA"), sum(|r| r.stats.data_frames));
    assert_eq!(total_frames("out", "HOLE"), sum(|r| r.stats.hole_frames));
    assert_eq!(total_frames("out", "HOLE"), 2.0 * STREAMS as f64);
    for (direction, kind) in [
        ("in", "OPEN"),
        ("out", "ACCEPT"),
        ("out", "FINISH"),
        ("in", "FINISH"),
    ] {
        assert_eq!(
            total_frames(direction, kind),
            STREAMS as f64,
            "{direction} {kind}"
        );
    }
    // Everything the server sent reached the client, but the PINGs and PONGs (20 bytes each)
    // of round trips measured while the connection was closing: scrapes, window probes.
    let seen = |kind| client_stats.frames_in.get(kind).unwrap() as f64;
    let late_pings =
        total_frames("out", "PING") + total_frames("out", "PONG") - seen("PING") - seen("PONG");
    assert_eq!(
        end.get("volstream_bytes_total", &[("direction", "out")]),
        client_stats.bytes_in as f64 + 20.0 * late_pings
    );
    let aborted: f64 = end
        .matching("volstream_streams_aborted_total", &[])
        .iter()
        .map(|s| value(s))
        .sum();
    assert_eq!(aborted, 0.0);
}

/// The CLI's download, once its transfers are done, leaves with GOAWAY GOING_AWAY (a clean
/// close in docs/PROTOCOL.md's terms), not CANCELLED.
#[test]
fn a_finished_cli_download_ends_its_connection_gracefully() {
    let dir = TempDir::new("metrics-goaway");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    sparse_file(&pool.join("v.raw"), SIZE, &[DATA], 7);
    let server = Server::start(&pool);
    let out = bin()
        .args(["download", "--connect"])
        .arg(format!("tcp:{}", server.listen))
        .arg("v.raw")
        .arg(dir.join("copy.raw"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = scrape_until(server.metrics, "the connection ended", |m| {
        m.get("volstream_connections", &[]) == 0.0
    });
    let reason = |r| end.get("volstream_connections_ended_total", &[("reason", r)]);
    assert_eq!(reason("GOING_AWAY"), 1.0);
    assert_eq!(reason("CANCELLED"), 0.0);
    let goaways = [("direction", "in"), ("type", "GOAWAY")];
    assert_eq!(end.get("volstream_frames_total", &goaways), 1.0);
    assert_eq!(end.get("volstream_streams_completed_total", &[]), 1.0);
}

/// Requests other than `GET /metrics` get an HTTP error naming the problem, and the metrics
/// keep being served.
#[test]
fn other_requests_get_clear_http_errors() {
    let dir = TempDir::new("metrics-http");
    let server = Server::start(&dir.0);
    let ask = |request: &[u8]| -> String {
        let mut s = TcpStream::connect(server.metrics).unwrap();
        s.write_all(request).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response.lines().next().unwrap_or_default().to_owned()
    };
    assert_eq!(ask(b"GET / HTTP/1.1\r\n\r\n"), "HTTP/1.1 404 Not Found");
    assert_eq!(
        ask(b"POST /metrics HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    // Exactly the limit, so the server has read all of it when it answers.
    long.resize(engine::metrics::MAX_REQUEST, b'a');
    assert_eq!(ask(&long), "HTTP/1.1 431 Request Header Fields Too Large");
    assert_eq!(
        scrape(server.metrics).get("volstream_connections", &[]),
        0.0
    );
}
