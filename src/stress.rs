//! `stress`: hundreds of parallel streams of generated volumes, each verified byte for byte and
//! hole for hole, optionally churning for a duration, with a summary of rates, latencies and
//! resource use.

use crate::error::CliError;
use crate::out::{json, say, tell};
use clap::Args;
use engine::proto::OpenOptions;
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{Address, ConnectionId, Engine, EngineConfig, EngineHandle, TransferReport};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct StressArgs {
    /// A running server; generated volumes are uploaded to it, then downloaded and verified.
    #[arg(long, value_name = "ADDR", conflicts_with = "embedded")]
    connect: Option<String>,
    /// Run the server in this process (the default without --connect).
    #[arg(long)]
    embedded: bool,
    /// Streams in flight at once.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Logical size of each volume in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    size: u64,
    /// Share of each volume that is holes (0.0 to 1.0).
    #[arg(long, default_value_t = 0.5)]
    hole_ratio: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With --churn: keep opening new streams as others finish for this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Streams keep opening and closing for the duration.
    #[arg(long)]
    churn: bool,
    /// Embedded server on real files in DIR (volumes are uploaded there first).
    #[arg(long, value_name = "DIR")]
    disk: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Resource use of this process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct Resources {
    rss: u64,
    peak_rss: u64,
    fds: usize,
    threads: usize,
}

fn resources() -> Resources {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Resources {
        rss: field("VmRSS:") * 1024,
        peak_rss: field("VmHWM:") * 1024,
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
        threads: field("Threads:") as usize,
    }
}

struct Outcome {
    reports: Vec<TransferReport>,
    errors: Vec<String>,
}

pub fn run(args: StressArgs) -> Result<(), CliError> {
    if !(0.0..=1.0).contains(&args.hole_ratio) {
        return Err(CliError::Usage(
            "--hole-ratio must be between 0 and 1".into(),
        ));
    }
    if args.streams == 0 {
        return Err(CliError::Usage("--streams must be at least 1".into()));
    }
    if args.churn != args.duration.is_some() {
        return Err(CliError::Usage("--churn and --duration go together".into()));
    }
    let volumes: Vec<Synthetic> = (0..args.streams as u64)
        .map(|i| {
            Synthetic::new(
                args.seed.wrapping_mul(1_000_003) + i,
                args.size,
                args.hole_ratio,
            )
        })
        .collect();
    let names: Vec<String> = (0..volumes.len())
        .map(|i| format!("stress-{}-{i}", args.seed))
        .collect();
    let baseline = resources();

    let (client, client_thread) = Engine::spawn(EngineConfig::default())
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    // The embedded server lives on its own loop thread, as a remote one would.
    let mut server = None;
    let tmp = std::env::temp_dir().join(format!("volstream-stress-{}", std::process::id()));
    let (addr, upload_first) = match (&args.connect, &args.disk) {
        (Some(addr), _) => (addr.parse::<Address>().map_err(CliError::Usage)?, true),
        (None, disk) => {
            std::fs::create_dir_all(&tmp).map_err(|e| CliError::Other(format!("{e}")))?;
            let (handle, thread) = Engine::spawn(EngineConfig::default())
                .map_err(|e| CliError::Other(format!("cannot start the server loop: {e}")))?;
            let socket = Address::Unix(tmp.join("stress.sock"));
            let provider: Arc<dyn engine::Provider> =
                match disk {
                    Some(dir) => Arc::new(fdstream::DirProvider::new(dir).map_err(|e| {
                        CliError::Other(format!("cannot use {}: {e}", dir.display()))
                    })?),
                    None => {
                        let mut p = SyntheticProvider::default();
                        for (name, v) in names.iter().zip(&volumes) {
                            p.insert(name.clone(), v.clone());
                        }
                        Arc::new(p)
                    }
                };
            let (_, bound) = handle
                .listen(&socket, provider)
                .map_err(|e| CliError::Connect(format!("cannot listen: {e}")))?;
            server = Some((handle, thread));
            (bound, disk.is_some())
        }
    };
    let conn = client
        .connect_blocking(&addr, Duration::from_secs(10))
        .map_err(|e| CliError::Connect(format!("cannot connect to {addr}: {e}")))?;

    let started = Instant::now();
    let mut errors = Vec::new();
    if upload_first {
        let rxs: Vec<_> = names
            .iter()
            .zip(&volumes)
            .map(|(name, v)| {
                let options = OpenOptions::default().with_overwrite(true);
                client.upload(conn, name, options, Box::new(v.reader()))
            })
            .collect();
        for (name, rx) in names.iter().zip(rxs) {
            match rx.recv() {
                Ok(r) if r.result.is_ok() => {}
                Ok(r) => errors.push(format!("upload {name}: {}", r.result.unwrap_err())),
                Err(_) => errors.push(format!("upload {name}: event loop ended")),
            }
        }
    }
    let upload_secs = started.elapsed().as_secs_f64();

    let download_start = Instant::now();
    let deadline = args
        .duration
        .map(|d| download_start + Duration::from_secs(d));
    let mut samples = Vec::new();
    let outcome = download_all(&client, conn, &names, &volumes, deadline, &mut samples);
    let download_secs = download_start.elapsed().as_secs_f64();
    errors.extend(outcome.errors);

    client.shutdown();
    let _ = client_thread.join();
    // The handle keeps the loop's waker (an eventfd) open; the fd count must not see it.
    drop(client);
    if let Some((handle, thread)) = server {
        handle.shutdown();
        let _ = thread.join();
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let end = resources();
    print_summary(
        &args,
        &outcome.reports,
        &errors,
        upload_secs,
        download_secs,
        baseline,
        end,
        &samples,
    );
    if !errors.is_empty() {
        for e in errors.iter().take(20) {
            tell!("volstream: {e}");
        }
        return Err(CliError::Transfers {
            failed: errors.len(),
            total: outcome.reports.len().max(errors.len()),
        });
    }
    Ok(())
}

/// Downloads every volume into a verifier, keeping `names.len()` streams in flight; with a
/// deadline, finished streams are replaced by new ones until it passes.
fn download_all(
    client: &EngineHandle,
    conn: ConnectionId,
    names: &[String],
    volumes: &[Synthetic],
    deadline: Option<Instant>,
    samples: &mut Vec<(f64, Resources)>,
) -> Outcome {
    let (tx, rx) = mpsc::channel::<(usize, TransferReport, bool)>();
    let start_one = |i: usize| {
        let verifier = volumes[i].verifier();
        let report = verifier.report();
        let tx = tx.clone();
        client.submit(
            conn,
            engine::event_loop::Transfer {
                op: engine::proto::Op::Read,
                name: names[i].clone(),
                options: OpenOptions::default(),
                ranges: None,
                endpoint: engine::event_loop::Endpoint::Writer(Box::new(verifier)),
                on_done: Box::new(move |r| {
                    use std::sync::atomic::Ordering::Relaxed;
                    let clean = report.mismatched_bytes.load(Relaxed) == 0
                        && report.holes_over_data.load(Relaxed) == 0;
                    let _ = tx.send((i, r, clean));
                }),
            },
        );
    };
    for i in 0..names.len() {
        start_one(i);
    }
    let begin = Instant::now();
    let mut in_flight = names.len();
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    let mut next_sample = begin;
    while in_flight > 0 {
        let now = Instant::now();
        if now >= next_sample {
            samples.push((now.duration_since(begin).as_secs_f64(), resources()));
            next_sample = now + Duration::from_secs(1);
        }
        let Ok((i, report, clean)) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        in_flight -= 1;
        match (&report.result, clean) {
            (Ok(()), true) => {}
            (Ok(()), false) => errors.push(format!("download {}: content differs", names[i])),
            (Err(e), _) => errors.push(format!("download {}: {e}", names[i])),
        }
        reports.push(report);
        if deadline.is_some_and(|d| Instant::now() < d) {
            start_one(i);
            in_flight += 1;
        }
    }
    samples.push((begin.elapsed().as_secs_f64(), resources()));
    Outcome { reports, errors }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// `stress --json`: one object, read by bench/run-all.
#[derive(serde::Serialize)]
struct Summary {
    streams: usize,
    completed: usize,
    size: u64,
    hole_ratio: f64,
    churn: bool,
    data_bytes: u64,
    hole_bytes: u64,
    upload_seconds: f64,
    download_seconds: f64,
    #[serde(rename = "data_GBps")]
    data_gbps: f64,
    #[serde(rename = "logical_GBps")]
    logical_gbps: f64,
    latency_p50_s: f64,
    latency_p99_s: f64,
    latency_p999_s: f64,
    errors: usize,
    peak_rss_bytes: u64,
    baseline_fds: usize,
    end_fds: usize,
    baseline_threads: usize,
    end_threads: usize,
    rss_after_warmup: u64,
    rss_at_end_of_load: u64,
    fds_after_warmup: usize,
    fds_at_end_of_load: usize,
    threads_after_warmup: usize,
    threads_at_end_of_load: usize,
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    args: &StressArgs,
    reports: &[TransferReport],
    errors: &[String],
    upload_secs: f64,
    download_secs: f64,
    baseline: Resources,
    end: Resources,
    samples: &[(f64, Resources)],
) {
    let data: u64 = reports.iter().map(|r| r.stats.data_bytes).sum();
    let holes: u64 = reports.iter().map(|r| r.stats.hole_bytes).sum();
    let mut latencies: Vec<f64> = reports.iter().map(|r| r.elapsed.as_secs_f64()).collect();
    latencies.sort_by(f64::total_cmp);
    let peak = samples
        .iter()
        .map(|(_, r)| r.peak_rss)
        .max()
        .unwrap_or(0)
        .max(end.peak_rss);
    // Growth after warm-up: the last sample against the one a quarter of the way in.
    let warm = samples
        .get(samples.len() / 4)
        .map(|s| s.1)
        .unwrap_or_default();
    let last = samples.last().map(|s| s.1).unwrap_or_default();
    let gbps = |bytes: u64| bytes as f64 / download_secs.max(1e-9) / 1e9;
    // Rounded as the text summary is: the digits past these are noise on a shared machine.
    let round = |x: f64, places: i32| {
        let scale = 10f64.powi(places);
        (x * scale).round() / scale
    };
    if args.json {
        let summary = Summary {
            streams: args.streams,
            completed: reports.len(),
            size: args.size,
            hole_ratio: args.hole_ratio,
            churn: args.churn,
            data_bytes: data,
            hole_bytes: holes,
            upload_seconds: round(upload_secs, 3),
            download_seconds: round(download_secs, 3),
            data_gbps: round(gbps(data), 3),
            logical_gbps: round(gbps(data + holes), 3),
            latency_p50_s: round(percentile(&latencies, 0.5), 4),
            latency_p99_s: round(percentile(&latencies, 0.99), 4),
            latency_p999_s: round(percentile(&latencies, 0.999), 4),
            errors: errors.len(),
            peak_rss_bytes: peak,
            baseline_fds: baseline.fds,
            end_fds: end.fds,
            baseline_threads: baseline.threads,
            end_threads: end.threads,
            rss_after_warmup: warm.rss,
            rss_at_end_of_load: last.rss,
            fds_after_warmup: warm.fds,
            fds_at_end_of_load: last.fds,
            threads_after_warmup: warm.threads,
            threads_at_end_of_load: last.threads,
        };
        say!("{}", json(&summary));
        return;
    }
    say!(
        "{} streams completed ({} at once, {} bytes each, {:.0}% holes), {} errors",
        reports.len(),
        args.streams,
        args.size,
        args.hole_ratio * 100.0,
        errors.len()
    );
    say!(
        "data {} bytes, holes {} bytes in {:.2}s: {:.2} GB/s of data, {:.2} GB/s logical",
        data,
        holes,
        download_secs,
        gbps(data),
        gbps(data + holes)
    );
    say!(
        "per-stream completion: p50 {:.3}s  p99 {:.3}s  p99.9 {:.3}s",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999)
    );
    say!(
        "peak RSS {} MiB; open fds {} -> {}; threads {} -> {}",
        peak >> 20,
        baseline.fds,
        end.fds,
        baseline.threads,
        end.threads
    );
}
