//! Copy-on-read first-read latency: an NBD READ of an absent 64 KiB range of a
//! `download --serve-nbd` destination (fdstream::cor), timed at the NBD client from request to
//! the last reply byte, while the background download saturates the connection (`loaded`) and,
//! in the same run, with nothing else on it (`idle`). Both fetch the range as a ranged PRIORITY
//! READ from the same in-process server (a dense file in `--dir`, served from the page cache),
//! store it and serve it from the partial.
//!
//! Loaded reads are taken only while the background stream runs and only at ranges it has not
//! reached (from the end of the volume down, which the sweep from the start reaches last); a
//! round whose download ends starts another, until `--reads` reads are in. Prints JSON with
//! p50/p99 of both, their difference, the background stream's rate and the load average.
//!
//! `cor [--size-mib 1024] [--reads 1000] [--len 65536] [--dir /var/tmp]`
//!
//! Target (issue 17): loaded p99 within 2 ms of idle p99 on loopback.

use bench::{load_average, percentile, random_bytes, socket_path};
use clap::Parser;
use engine::proto::OpenOptions;
use engine::{Address, ConnectionId, Engine, EngineConfig, EngineHandle};
use fdstream::cor::{BackgroundSink, Cache, CorExport};
use fdstream::export::{ExportConfig, ExportHandle, ExportServer};
use fdstream::nbd::Conn;
use fdstream::DirProvider;
use nbd::client::{Command, Reply};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "First-read latency of an absent range of a copy-on-read download")]
struct Cli {
    /// Size of the source volume (dense; written once into --dir).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Reads of each case.
    #[arg(long, default_value_t = 1000)]
    reads: usize,
    /// Bytes per read.
    #[arg(long, default_value_t = 65536)]
    len: u32,
    /// Where the source and the partials go (removed at the end).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

/// One copy-on-read destination with its export and a client connected to it.
struct Dest {
    cache: Arc<Cache>,
    export: ExportHandle,
    thread: std::thread::JoinHandle<()>,
    nbd: Conn,
    partial: PathBuf,
}

impl Dest {
    fn open(dir: &Path, tag: &str, size: u64, client: &EngineHandle, conn: ConnectionId) -> Dest {
        let partial = dir.join(format!("partial-{tag}"));
        let _ = std::fs::remove_file(&partial);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&partial)
            .unwrap();
        file.set_len(size).unwrap();
        let cache = Cache::new(file, size, "disk", client, conn).unwrap();
        let addr = socket_path(&format!("cor-nbd-{tag}"));
        let mut server = ExportServer::bind(
            &addr,
            CorExport::new("disk", cache.clone()),
            ExportConfig::default(),
        )
        .unwrap();
        let export = server.handle();
        let thread = std::thread::spawn(move || {
            server.run().unwrap();
        });
        let Address::Unix(sock) = addr else {
            unreachable!()
        };
        let uri: nbd::Uri = format!("nbd+unix:///disk?socket={}", sock.display())
            .parse()
            .unwrap();
        let nbd = Conn::open(&uri, &[], 1).unwrap();
        Dest {
            cache,
            export,
            thread,
            nbd,
            partial,
        }
    }

    /// One READ, timed from sending it to its last reply.
    fn read(&mut self, offset: u64, len: u32) -> f64 {
        let t = Instant::now();
        self.nbd.send(Command::Read { offset, len }).unwrap();
        let mut got = 0u64;
        loop {
            match self.nbd.recv().unwrap() {
                Reply::Data { bytes, .. } => got += bytes.len() as u64,
                Reply::Hole { len, .. } => got += len as u64,
                Reply::Done { result, .. } => {
                    result.unwrap();
                    break;
                }
                other => panic!("unexpected reply {other:?}"),
            }
        }
        assert_eq!(got, len as u64);
        t.elapsed().as_secs_f64() * 1e3
    }

    fn absent(&self, offset: u64, len: u32) -> bool {
        !self.cache.complete_in(offset, len as u64)
    }

    fn close(self) {
        self.nbd.disconnect();
        self.export.shutdown();
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.partial);
    }
}

fn summary(ms: &mut [f64]) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "reads": ms.len(),
        "p50_ms": percentile(ms, 0.5),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(0.0),
    })
}

fn main() {
    env_logger::init();
    let cli = Cli::parse();
    let size = cli.size_mib << 20;
    let len = cli.len;
    let dir = cli
        .dir
        .join(format!("volstream-bench-cor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("disk");
    {
        let f = std::fs::File::create(&source).unwrap();
        let block = random_bytes(8 << 20, 7);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(block.len() as u64) as usize;
            f.write_all_at(&block[..n], off).unwrap();
            off += n as u64;
        }
    }
    let load_before = load_average();
    let (server, server_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let provider = DirProvider::new(&dir).unwrap().without_sync();
    let (_, addr) = server
        .listen(&socket_path("cor"), Arc::new(provider))
        .unwrap();
    let (client, client_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client
        .connect_blocking(&addr, Duration::from_secs(10))
        .unwrap();

    let slots = size / len as u64;
    // Idle: every read is of a range nothing else asks for, on an otherwise quiet connection.
    let mut idle = Vec::with_capacity(cli.reads);
    {
        let mut d = Dest::open(&dir, "idle", size, &client, conn);
        let mut slot = slots;
        while idle.len() < cli.reads && slot > 0 {
            slot -= 1;
            // Every other slot, so no read's neighbour was fetched with it.
            if slot.is_multiple_of(2) {
                idle.push(d.read(slot * len as u64, len));
            }
        }
        d.close();
    }

    // Loaded: rounds of a full-speed background download, reads from the end down.
    let mut loaded = Vec::with_capacity(cli.reads);
    let mut background = Vec::new();
    let mut round = 0;
    while loaded.len() < cli.reads {
        round += 1;
        let mut d = Dest::open(&dir, &format!("loaded-{round}"), size, &client, conn);
        let sink = BackgroundSink::new(d.cache.clone(), None);
        let (done_tx, done) = mpsc::channel();
        let started = Instant::now();
        let rx = client.download(conn, "disk", OpenOptions::default(), Box::new(sink));
        std::thread::spawn(move || {
            let _ = done_tx.send(rx.recv());
        });
        while d.cache.stats.background_bytes.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut slot = slots;
        let mut taken = 0;
        while loaded.len() < cli.reads && slot > 0 {
            slot -= 1;
            let offset = slot * len as u64;
            if !slot.is_multiple_of(2) || !d.absent(offset, len) {
                continue;
            }
            // The stream must still be running after the read too, or it did not compete.
            let ms = d.read(offset, len);
            if done.try_recv().is_ok() {
                break;
            }
            loaded.push(ms);
            taken += 1;
            // The sweep is near: the rest of this round's reads would not be absent.
            let reached = d.cache.stats.background_bytes.load(Ordering::Relaxed);
            if reached + (64 << 20) > offset {
                break;
            }
        }
        let report = done.recv().unwrap().unwrap();
        report.result.unwrap();
        let secs = started.elapsed().as_secs_f64();
        background.push(serde_json::json!({
            "round": round,
            "reads": taken,
            "background_bytes": d.cache.stats.background_bytes.load(Ordering::Relaxed),
            "background_mb_s": d.cache.stats.background_bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        }));
        d.close();
    }
    let idle_s = summary(&mut idle);
    let loaded_s = summary(&mut loaded);
    let diff = loaded_s["p99_ms"].as_f64().unwrap() - idle_s["p99_ms"].as_f64().unwrap();
    let out = serde_json::json!({
        "bench": "cor",
        "size_mib": cli.size_mib,
        "len": len,
        "idle": idle_s,
        "loaded": loaded_s,
        "p99_diff_ms": diff,
        "p50_ratio": loaded_s["p50_ms"].as_f64().unwrap() / idle_s["p50_ms"].as_f64().unwrap(),
        "target_p99_within_2ms": diff <= 2.0,
        "rounds": background,
        "load_before": load_before,
        "load_after": load_average(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    client.shutdown();
    server.shutdown();
    let _ = client_thread.join();
    let _ = server_thread.join();
    let _ = std::fs::remove_dir_all(&dir);
}
