//! The latency floor of one Unix socket: bulk frames written back to back, a 4 KiB probe
//! written at the next frame boundary after it is born, no engine. What `latency` reports is
//! compared with this, measured in the same run. Prints JSON.
//!
//! `floor [--frame 65536] [--messages 2000] [--interval-us 1000] [--repeat 3]`

use bench::floor::{latency_floor, FloorConfig};
use bench::load_average;
use clap::Parser;
use std::time::Duration;

#[derive(Parser)]
#[command(
    about = "Latency floor of one Unix socket (bulk frames, probe at the next frame boundary)"
)]
struct Cli {
    /// Bytes per bulk frame.
    #[arg(long, default_value_t = 64 * 1024)]
    frame: usize,
    /// Probe messages per run.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Microseconds between probe messages.
    #[arg(long, default_value_t = 1000)]
    interval_us: u64,
    /// Runs.
    #[arg(long, default_value_t = 3)]
    repeat: u64,
}

fn main() {
    let cli = Cli::parse();
    let config = FloorConfig {
        frame: cli.frame,
        messages: cli.messages,
        interval: Duration::from_micros(cli.interval_us),
        ..FloorConfig::default()
    };
    let repeat = cli.repeat;
    let runs: Vec<serde_json::Value> = (0..repeat)
        .map(|_| {
            let load = load_average()[0];
            let mut run = latency_floor(&config).json();
            run["load_1min"] = load.into();
            run
        })
        .collect();
    let out = serde_json::json!({
        "bench": "floor",
        "transport": "unix",
        "frame_bytes": config.frame,
        "message_bytes": config.message,
        "interval_us": config.interval.as_micros() as u64,
        "sndbuf_requested": bench::floor::ENGINE_SNDBUF,
        "runs": runs,
    });
    println!("{out}");
}
