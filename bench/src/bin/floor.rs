//! The latency floor of one Unix socket: bulk frames written back to back, a 4 KiB probe
//! written at the next frame boundary after it is born, no engine. What `latency` reports is
//! compared with this, measured in the same run. Prints JSON.
//!
//! `floor [--frame 65536] [--messages 2000] [--interval-us 1000] [--repeat 3]`

use bench::floor::{latency_floor, FloorConfig};
use bench::{load_average, Args};
use std::time::Duration;

fn main() {
    let args = Args::parse(&["frame", "messages", "interval-us", "repeat"]);
    let config = FloorConfig {
        frame: args.get("frame", 64 * 1024),
        messages: args.get("messages", 2000),
        interval: Duration::from_micros(args.get("interval-us", 1000)),
        ..FloorConfig::default()
    };
    let repeat: u64 = args.get("repeat", 3);
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
