//! Latency of small messages on one probe stream while N bulk streams saturate the same
//! connection in the same direction (see `bench::probe`). Before each run, the floor of the
//! socket alone (`bench::floor`: bulk frames back to back, the probe at the next frame
//! boundary) is measured with the same probe, so each run reports its p99 against a floor taken
//! under the same machine load. Prints JSON.
//!
//! `latency [--bulk 0,100,499] [--interval-us 1000,5000] [--messages 2000] [--repeat 3]
//!  [--priority 0|1] [--floor 0|1] [--trace 0|1]`
//!
//! `--priority 1` opens the probe in the priority class (`OpenOptions::with_priority`): it is then
//! below its class's share even when the loaded link gives a bulk stream less than the probe's
//! 4 MB/s (at 499 bulk streams, whenever the link runs below 2 GB/s).
//!
//! `--trace 1` adds to each run the link's rate and the probe's longest wait per 10 ms (see
//! `bench::probe`), to see what opened a tail episode.
//!
//! A run passes the interactive-latency target when its p99 is at most 1 ms and at most 3x the
//! floor of the same run.

use bench::floor::{latency_floor, FloorConfig};
use bench::probe::{probe_traced, MESSAGE};
use bench::{load_average, socket_path};
use clap::Parser;
use engine::proto::OpenOptions;
use engine::EngineConfig;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Latency of a 4 KiB probe stream while bulk streams saturate the connection")]
struct Cli {
    /// Bulk stream counts, one case each.
    #[arg(long, value_delimiter = ',', default_values_t = [0, 100, 499])]
    bulk: Vec<u64>,
    /// Microseconds between probe messages, one case each.
    #[arg(long, value_delimiter = ',', default_values_t = [1000])]
    interval_us: Vec<u64>,
    /// Probe messages per run.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Runs of each case (tails on a 2-vCPU VM move with the host's scheduler).
    #[arg(long, default_value_t = 3)]
    repeat: u64,
    /// 1 opens the probe in the priority class.
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// 0 skips the socket floor measured before each run.
    #[arg(long, default_value_t = 1)]
    floor: u8,
    /// 1 adds the per-10 ms trace of the link's rate and the probe's waits to each run.
    #[arg(long, default_value_t = 0)]
    trace: u8,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let bulks = cli.bulk;
    let intervals = cli.interval_us;
    let messages = cli.messages;
    let priority = cli.priority != 0;
    let with_floor = cli.floor != 0;
    let repeat = cli.repeat;
    let options = OpenOptions::default().with_priority(priority);
    let mut runs = Vec::new();
    let mut cases = Vec::new();
    for &bulk in &bulks {
        for &interval_us in &intervals {
            let interval = Duration::from_micros(interval_us);
            let mut passed = 0;
            for _ in 0..repeat {
                let load = load_average()[0];
                let floor = with_floor.then(|| {
                    latency_floor(&FloorConfig {
                        messages,
                        interval,
                        ..FloorConfig::default()
                    })
                    .json()
                });
                let configs = (EngineConfig::default(), EngineConfig::default());
                let listen = socket_path("latency");
                let trace = cli.trace != 0;
                let result =
                    probe_traced(bulk, messages, interval, configs, &listen, options, trace);
                let mut r = result.json;
                r["interval_us"] = interval_us.into();
                r["load_1min"] = load.into();
                if let Some(floor) = floor {
                    let floor_p99 = floor["p99_us"].as_u64().unwrap_or(1).max(1);
                    let ratio = result.p99_us as f64 / floor_p99 as f64;
                    let pass = result.p99_us <= 1000 && ratio <= 3.0;
                    passed += pass as u64;
                    r["floor"] = floor;
                    r["p99_over_floor"] = ((ratio * 100.0).round() / 100.0).into();
                    r["pass"] = pass.into();
                }
                runs.push(r);
            }
            cases.push(serde_json::json!({
                "bulk_streams": bulk,
                "interval_us": interval_us,
                "runs": repeat,
                "passed": passed,
            }));
        }
    }
    let out = serde_json::json!({
        "bench": "latency",
        "transport": "unix",
        "message_bytes": MESSAGE,
        "priority": priority,
        "target": "p99 <= 1000 us and <= 3x the floor of the same run",
        "cases": cases,
        "runs": runs,
    });
    println!("{out}");
}
