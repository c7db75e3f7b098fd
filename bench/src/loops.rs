//! Engines on threads of the benchmark's own, so each side's CPU time can be read: with memory
//! sources and sinks all of a side's work happens on its loop thread.

use bytes::Bytes;
use engine::proto::OpenOptions;
use engine::DiscardWriter;
use engine::{Address, Engine, EngineConfig, EngineHandle};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An engine running on its own thread until [`Timed::stop`], which reports the thread's CPU
/// time.
pub struct Timed {
    pub handle: EngineHandle,
    thread: JoinHandle<f64>,
}

/// CPU seconds the calling thread has used.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl Timed {
    pub fn spawn(config: EngineConfig) -> Timed {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-loop".into())
            .spawn(move || {
                let mut engine = Engine::new(config).unwrap();
                tx.send(engine.handle()).unwrap();
                let start = thread_cpu_seconds();
                while !engine.is_shut_down() {
                    engine.turn(None).unwrap();
                }
                thread_cpu_seconds() - start
            })
            .unwrap();
        Timed {
            handle: rx.recv().unwrap(),
            thread,
        }
    }

    /// Shuts the engine down; returns the CPU seconds its loop used.
    pub fn stop(self) -> f64 {
        self.handle.shutdown();
        self.thread.join().unwrap()
    }
}

/// One throughput run: `streams` downloads of `size` bytes each over one connection.
pub struct Throughput {
    pub streams: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
    /// CPU seconds per GiB moved of the sending (server) and receiving (client) loop.
    pub sender_cpu_per_gib: f64,
    pub receiver_cpu_per_gib: f64,
    pub errors: u64,
    /// The negotiated TLS version and suite, or `None` for plain.
    pub tls: Option<String>,
}

impl Throughput {
    pub fn json(&self) -> serde_json::Value {
        let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
        serde_json::json!({
            "streams": self.streams,
            "bytes": self.bytes,
            "seconds": round3(self.seconds),
            "GBps": round3(self.gbps),
            "sender_cpu_s_per_GiB": round3(self.sender_cpu_per_gib),
            "receiver_cpu_s_per_GiB": round3(self.receiver_cpu_per_gib),
            "errors": self.errors,
        })
    }
}

pub fn throughput(
    streams: u64,
    size: u64,
    block: Bytes,
    server_config: EngineConfig,
    client_config: EngineConfig,
    listen: &Address,
) -> Throughput {
    let server = Timed::spawn(server_config);
    let (_, addr) = server
        .handle
        .listen(listen, crate::provider(block, size))
        .unwrap();
    let client = Timed::spawn(client_config);
    let conn = client.handle.connect(&addr).unwrap();
    let start = Instant::now();
    let receivers: Vec<_> = (0..streams)
        .map(|i| {
            client.handle.download(
                conn,
                &format!("v{i}"),
                OpenOptions::default(),
                Box::new(DiscardWriter::default()),
            )
        })
        .collect();
    let mut errors = 0;
    for rx in receivers {
        let report = rx
            .recv_timeout(Duration::from_secs(600))
            .expect("transfer ends");
        if report.result.is_err() {
            errors += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let tls = client.handle.info(conn).unwrap().and_then(|i| i.tls);
    let receiver_cpu = client.stop();
    let sender_cpu = server.stop();
    let bytes = streams * size;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Throughput {
        streams,
        bytes,
        seconds,
        gbps: bytes as f64 / seconds / 1e9,
        sender_cpu_per_gib: sender_cpu / gib,
        receiver_cpu_per_gib: receiver_cpu / gib,
        errors,
        tls,
    }
}
