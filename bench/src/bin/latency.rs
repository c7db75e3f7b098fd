//! Latency of small messages on one probe stream while N bulk streams saturate the same
//! connection in the same direction (see `bench::probe`). Prints JSON.
//!
//! `latency [--bulk 0,100,499] [--messages 2000] [--interval-us 1000] [--repeat 3]`

use bench::probe::{probe, MESSAGE};
use bench::{socket_path, Args};
use engine::EngineConfig;
use std::time::Duration;

fn main() {
    engine::memory::keep_freed_buffers();
    let args = Args::parse(&["bulk", "messages", "interval-us", "repeat"]);
    let bulks = args.list("bulk", &[0, 100, 499]);
    let messages: u64 = args.get("messages", 2000);
    let interval = Duration::from_micros(args.get("interval-us", 1000));
    // Tails on a 2-vCPU VM move with the scheduler's mood: each case runs several times.
    let repeat: u64 = args.get("repeat", 3);
    let runs: Vec<String> = bulks
        .iter()
        .flat_map(|&n| (0..repeat).map(move |_| n))
        .map(|n| {
            let (server, client) = (EngineConfig::default(), EngineConfig::default());
            probe(
                n,
                messages,
                interval,
                server,
                client,
                &socket_path("latency"),
            )
            .json
        })
        .collect();
    println!(
        "{{\"bench\":\"latency\",\"transport\":\"unix\",\"message_bytes\":{MESSAGE},\"runs\":[{}]}}",
        runs.join(",")
    );
}
