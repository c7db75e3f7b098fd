//! A TCP delay line: `delay-proxy --listen 127.0.0.1:7701 --target 127.0.0.1:7700 --delay-ms 25
//! [--rate 125M]` forwards every connection to the target, holding each byte for the one-way
//! delay in each direction (round trip: twice the delay) and, with `--rate`, moving at most that
//! many bytes per second each way. Runs until killed. See bench/src/delay.rs.

use bench::delay::{DelayConfig, DelayProxy, DEFAULT_QUEUE};
use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "TCP proxy that delays every byte (a userspace netem for one path)")]
struct Cli {
    /// Address to accept connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address each connection is forwarded to.
    #[arg(long)]
    target: SocketAddr,
    /// One-way delay in milliseconds, added in each direction.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Rate cap per direction in bytes per second (suffixes K, M, G: powers of 1000).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Bytes a capped line holds beyond rate x delay (the queue in front of the link).
    #[arg(long, default_value_t = DEFAULT_QUEUE)]
    queue: u64,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, scale) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1_000),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1_000_000),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 125M)"))?;
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("rate {s:?} must be between 1 and 2^64 bytes/s")),
        Some(r) => Ok(r),
    }
}

fn main() {
    env_logger::init();
    let cli = Cli::parse();
    if !(cli.delay_ms.is_finite() && cli.delay_ms >= 0.0 && cli.delay_ms < 3.6e6) {
        eprintln!("error: --delay-ms must be between 0 and one hour");
        std::process::exit(2);
    }
    let config = DelayConfig {
        delay: Duration::from_secs_f64(cli.delay_ms / 1000.0),
        rate: cli.rate,
        queue: cli.queue,
    };
    let proxy = match DelayProxy::start(cli.listen, cli.target, config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: listening on {}: {e}", cli.listen);
            std::process::exit(1);
        }
    };
    eprintln!(
        "delay-proxy: {} -> {}, one-way delay {} ms, rate {}, at most {} bytes held per direction",
        proxy.local_addr(),
        cli.target,
        cli.delay_ms,
        cli.rate
            .map_or("uncapped".to_owned(), |r| format!("{r} B/s")),
        config.line_limit()
    );
    loop {
        std::thread::park();
    }
}
