//! Aggregate throughput and per-stream completion times of N concurrent downloads over one
//! Unix connection, memory sources and discarding (digest-checking) sinks. Prints JSON.
//!
//! `mux [--streams 1,100,500] [--size BYTES per stream] [--total BYTES per run] [--repeat N]
//! [--block BYTES]` With --total (default 8 GiB), each stream moves total/N bytes unless --size
//! is given.
//!
//! Each engine run is paired with a copy of the same number of bytes over a bare Unix
//! socketpair (256 KiB writes, the engine's send buffer, no engine; `--bare 0` skips it), run
//! right before or after it (the order alternates between repeats), so a ratio compares two
//! runs that saw the same machine. On a shared 2-vCPU VM the copy rate moves by 30 % from one
//! second to the next; a ratio against the best copy of the whole run, or one run of each, is
//! mostly that noise. The summary gives, per stream count, the median and range over the
//! repeats of the engine's rate, of its ratio to its paired copy, and of the most streams'
//! rate over one stream's in the same repeat.
//!
//! Both copy from the same memory: the engine's sources and the bare writer repeat one block of
//! `--block` bytes (256 KiB, the bare copy's write size). Until 2026-12-01 the sources repeated
//! 1 MiB, which does not stay in this Zen 3's 512 KiB L2 while the bare copy's 256 KiB did, and
//! the kernel's copy out of it cost the engine's sender 1.5x per byte (perf: 11.5 % of samples
//! against the bare sender's 7.6 %, same bytes).

use bench::floor::bare_copy;
use bench::{load_average, percentile, provider, random_bytes, socket_path, Usage};
use clap::Parser;
use engine::proto::OpenOptions;
use engine::DiscardWriter;
use engine::{Engine, EngineConfig};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Aggregate throughput of N concurrent downloads over one Unix connection")]
struct Cli {
    /// Stream counts, one run each per repeat.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 500])]
    streams: Vec<u64>,
    /// Bytes per stream (0: total / streams).
    #[arg(long, default_value_t = 0)]
    size: u64,
    /// Bytes per run, shared by its streams.
    #[arg(long, default_value_t = 8 << 30)]
    total: u64,
    /// How many times to run every stream count (each with its paired bare copy).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// 0 skips the bare socketpair copies (for profiling the engine alone).
    #[arg(long, default_value_t = 1)]
    bare: u8,
    /// Bytes of the block that the engine's sources and the bare copy both repeat.
    #[arg(long, default_value_t = 256 * 1024)]
    block: usize,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let with_bare = cli.bare != 0;
    let block = random_bytes(cli.block.max(1), 42);
    let load = load_average();
    let mut runs = Vec::new();
    let mut bare = Vec::new();
    // rates[repeat][count] and ratios[count][repeat], GB/s and engine / paired copy.
    let mut rates = Vec::new();
    let mut ratios = vec![Vec::new(); cli.streams.len()];
    for repeat in 0..cli.repeat {
        let mut row = Vec::new();
        for (i, &n) in cli.streams.iter().enumerate() {
            let size = if cli.size > 0 {
                cli.size
            } else {
                (cli.total / n).max(4096) & !4095
            };
            let bare_first = repeat % 2 == 0;
            let mut copy = None;
            if with_bare && bare_first {
                copy = Some(bare_run(n * size, &block));
            }
            let (mut run, gbps) = run(n, size, block.clone());
            if with_bare && !bare_first {
                copy = Some(bare_run(n * size, &block));
            }
            run["repeat"] = repeat.into();
            if let Some((mut b, bare_gbps)) = copy {
                let ratio = ratio(gbps, bare_gbps);
                run["ratio_to_paired_bare"] = ratio.into();
                ratios[i].push(ratio);
                b["repeat"] = repeat.into();
                b["streams_paired"] = n.into();
                b["bare_first"] = bare_first.into();
                bare.push(b);
            }
            runs.push(run);
            row.push(gbps);
        }
        rates.push(row);
    }
    let last = cli.streams.len() - 1;
    let summary: Vec<Value> = cli
        .streams
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            json!({
                "streams": n,
                "aggregate_GBps": spread(rates.iter().map(|r| r[i]).collect()),
                "ratio_to_paired_bare": spread(ratios[i].clone()),
            })
        })
        .collect();
    let last_to_first = spread(rates.iter().map(|r| ratio(r[last], r[0])).collect());
    let out = json!({
        "bench": "mux",
        "transport": "unix",
        "repeat": cli.repeat,
        "block_bytes": block.len(),
        "load_1min_at_start": load[0],
        "runs": runs,
        "bare_socketpair": bare,
        "summary": summary,
        // Medians over the repeats, each ratio taken within one pair or one repeat.
        "ratio_first_to_bare": spread(ratios[0].clone())["median"],
        "ratio_last_to_first": last_to_first["median"],
        "ratio_last_to_first_spread": last_to_first,
        "load_1min_at_end": load_average()[0],
    });
    println!("{out}");
}

fn bare_run(bytes: u64, block: &[u8]) -> (Value, f64) {
    let load = load_average()[0];
    let before = Usage::now();
    let gbps = bare_copy(bytes, block, 256 * 1024);
    let mut b = Usage::now().per_gib_since(&before, bytes);
    b["GBps"] = round3(gbps).into();
    b["load_1min"] = load.into();
    (b, gbps)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        round3(a / b)
    } else {
        0.0
    }
}

/// Median, minimum and maximum (null when there are no values).
fn spread(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return json!({ "median": null, "min": null, "max": null });
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    json!({ "median": round3(median), "min": round3(values[0]), "max": round3(values[n - 1]), "n": n })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn run(streams: u64, size: u64, block: bytes::Bytes) -> (Value, f64) {
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
    row["load_1min"] = load_average()[0].into();
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
    done.sort_by(f64::total_cmp);
    let gbps = bytes as f64 / elapsed / 1e9;
    for (k, v) in [
        ("streams", json!(streams)),
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
