//! Aggregate throughput and per-stream completion times of N concurrent downloads over one
//! Unix connection, memory sources and discarding (digest-checking) sinks. Prints JSON.
//!
//! `mux [--streams 1,100,500] [--size BYTES per stream] [--total BYTES per run]`
//! With --total (default 8 GiB), each stream moves total/N bytes unless --size is given.
//!
//! Each run also copies the same number of bytes over a bare Unix socketpair (256 KiB writes,
//! the engine's send buffer, no engine; `--bare 0` skips it): one stream is compared with it, and the most streams
//! with one stream, in the same run.

use bench::floor::bare_copy;
use bench::{load_average, percentile, provider, random_bytes, socket_path, Usage};
use clap::Parser;
use engine::proto::OpenOptions;
use engine::DiscardWriter;
use engine::{Engine, EngineConfig};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Aggregate throughput of N concurrent downloads over one Unix connection")]
struct Cli {
    /// Stream counts, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 500])]
    streams: Vec<u64>,
    /// Bytes per stream (0: total / streams).
    #[arg(long, default_value_t = 0)]
    size: u64,
    /// Bytes per run, shared by its streams.
    #[arg(long, default_value_t = 8 << 30)]
    total: u64,
    /// 0 skips the bare socketpair copies (for profiling the engine alone).
    #[arg(long, default_value_t = 1)]
    bare: u8,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let with_bare = cli.bare != 0;
    let counts = cli.streams;
    let total = cli.total;
    let fixed_size = cli.size;
    let block = random_bytes(1 << 20, 42);
    let load = load_average();
    let mut runs = Vec::new();
    let mut rates = Vec::new();
    let mut bare = Vec::new();
    for &n in &counts {
        let size = if fixed_size > 0 {
            fixed_size
        } else {
            (total / n).max(4096) & !4095
        };
        // Interleaved with the engine's runs, so both see the same machine.
        if with_bare {
            let before = Usage::now();
            let gbps = bare_copy(n * size, 256 * 1024);
            let mut b = Usage::now().per_gib_since(&before, n * size);
            b["GBps"] = round3(gbps).into();
            bare.push(b);
        }
        let (run, gbps) = run(n, size, block.clone());
        runs.push(run);
        rates.push(gbps);
    }
    let bare_best = bare
        .iter()
        .filter_map(|b| b["GBps"].as_f64())
        .fold(0.0, f64::max);
    let ratio = |a: f64, b: f64| if b > 0.0 { round3(a / b) } else { 0.0 };
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    let out = serde_json::json!({
        "bench": "mux",
        "transport": "unix",
        "load_1min_at_start": load[0],
        "runs": runs,
        "bare_socketpair": bare,
        // Against the best bare copy of the run: the stricter comparison.
        "ratio_first_to_bare": ratio(first, bare_best),
        "ratio_last_to_first": ratio(last, first),
        "load_1min_at_end": load_average()[0],
    });
    println!("{out}");
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn run(streams: u64, size: u64, block: bytes::Bytes) -> (serde_json::Value, f64) {
    let (server, server_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&socket_path("mux"), provider(block, size))
        .unwrap();
    let (client, client_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let usage = Usage::now();
    let start = Instant::now();
    let receivers: Vec<_> = (0..streams)
        .map(|i| {
            client.download(
                conn,
                &format!("v{i}"),
                OpenOptions::default(),
                Box::new(DiscardWriter::default()),
            )
        })
        .collect();
    let mut done = Vec::new();
    let mut errors = 0;
    for rx in receivers {
        let report = rx
            .recv_timeout(Duration::from_secs(600))
            .expect("transfer ends");
        if report.result.is_err() {
            errors += 1;
        }
        done.push(start.elapsed().as_secs_f64());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = streams * size;
    let mut row = Usage::now().per_gib_since(&usage, bytes);
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
    done.sort_by(f64::total_cmp);
    let gbps = bytes as f64 / elapsed / 1e9;
    for (k, v) in [
        ("streams", serde_json::json!(streams)),
        ("bytes_per_stream", size.into()),
        ("seconds", round3(elapsed).into()),
        ("aggregate_GBps", round3(gbps).into()),
        ("completion_p50_s", round3(percentile(&done, 0.5)).into()),
        ("completion_p99_s", round3(percentile(&done, 0.99)).into()),
        ("errors", errors.into()),
    ] {
        row[k] = v;
    }
    (row, gbps)
}
