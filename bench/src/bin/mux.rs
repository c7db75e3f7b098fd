//! Aggregate throughput and per-stream completion times of N concurrent downloads over one
//! Unix connection, memory sources and discarding (digest-checking) sinks. Prints JSON.
//!
//! `mux [--streams 1,100,500] [--size BYTES per stream] [--total BYTES per run]`
//! With --total (default 8 GiB), each stream moves total/N bytes unless --size is given.
//!
//! Each run also copies the same number of bytes over a bare Unix socketpair (256 KiB writes,
//! the engine's send buffer, no engine): one stream is compared with it, and the most streams
//! with one stream, in the same run.

use bench::floor::bare_copy;
use bench::{load_average, percentile, provider, random_bytes, socket_path, Args};
use engine::proto::OpenOptions;
use engine::synthetic::DiscardWriter;
use engine::{Engine, EngineConfig};
use std::time::{Duration, Instant};

fn main() {
    engine::memory::keep_freed_buffers();
    let args = Args::parse(&["streams", "size", "total"]);
    let counts = args.list("streams", &[1, 100, 500]);
    let total: u64 = args.get("total", 8 << 30);
    let fixed_size: u64 = args.get("size", 0);
    let block = random_bytes(1 << 20, 42);
    let load = load_average();
    let mut results = Vec::new();
    let mut bare = Vec::new();
    for &n in &counts {
        let size = if fixed_size > 0 {
            fixed_size
        } else {
            (total / n).max(4096) & !4095
        };
        // Interleaved with the engine's runs, so both see the same machine.
        bare.push(bare_copy(n * size, 256 * 1024));
        results.push(run(n, size, block.clone()));
    }
    let bare_gbps = bare.iter().copied().fold(0.0, f64::max);
    let first = results.first().map(|r| r.1).unwrap_or(0.0);
    let rows: Vec<String> = results.iter().map(|r| r.0.clone()).collect();
    let last = results.last().map(|r| r.1).unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let bare_runs: Vec<String> = bare.iter().map(|g| format!("{g:.3}")).collect();
    println!(
        "{{\"bench\":\"mux\",\"transport\":\"unix\",\"load_1min_at_start\":{},\"runs\":[{}],\"bare_socketpair_GBps\":[{}],\"ratio_first_to_bare\":{:.3},\"ratio_last_to_first\":{:.3},\"load_1min_at_end\":{}}}",
        load[0],
        rows.join(","),
        bare_runs.join(","),
        ratio(first, bare_gbps),
        ratio(last, first),
        load_average()[0],
    );
}

fn run(streams: u64, size: u64, block: bytes::Bytes) -> (String, f64) {
    let (server, server_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&socket_path("mux"), provider(block, size))
        .unwrap();
    let (client, client_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
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
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
    done.sort_by(f64::total_cmp);
    let bytes = streams * size;
    let gbps = bytes as f64 / elapsed / 1e9;
    (
        format!(
            "{{\"streams\":{streams},\"bytes_per_stream\":{size},\"seconds\":{elapsed:.3},\"aggregate_GBps\":{gbps:.3},\"completion_p50_s\":{:.3},\"completion_p99_s\":{:.3},\"errors\":{errors}}}",
            percentile(&done, 0.5),
            percentile(&done, 0.99)
        ),
        gbps,
    )
}
