//! `download` and `upload`: every pair runs concurrently over one connection.

use crate::error::CliError;
use crate::out::{json, say, tell};
use crate::progress::{Bars, Counter, CountingReader, CountingWriter};
use crate::ConnectArg;
use clap::Args;
use engine::proto::OpenOptions;
use engine::{Engine, EngineConfig, TransferReport};
use fdstream::{AnyWriter, Backend, HelperOptions, ReaderOptions, WriterOptions};
use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Download,
    Upload,
}

#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    connect: ConnectArg,
    /// Send holes as HOLE frames when the peer supports it (the default).
    #[arg(long, overrides_with = "no_sparse")]
    sparse: bool,
    /// Send holes as zeroes.
    #[arg(long)]
    no_sparse: bool,
    /// The destination must end fully allocated (zeroes written, not punched).
    #[arg(long)]
    allocated: bool,
    /// The destination already reads as zeroes: holes need no work there.
    #[arg(long)]
    destination_is_zero: bool,
    /// Ignore the source's extent map and read every byte (zero detection still applies).
    #[arg(long)]
    no_extents: bool,
    /// Zero-detection granularity in bytes; 0 turns zero detection off.
    #[arg(
        short = 'S',
        long = "sparse-size",
        value_name = "BYTES",
        default_value_t = 4096
    )]
    sparse_size: u32,
    /// Replace an existing destination (a temporary is renamed over it after verification).
    #[arg(long)]
    overwrite: bool,
    /// Downloads: write into an existing regular file in place (block devices always are).
    #[arg(long)]
    in_place: bool,
    /// Skip fdatasync at the destination (faster; a crash may lose the data).
    #[arg(long)]
    no_sync: bool,
    /// Run each volume's reads and writes in a volstream-iohelper process.
    #[arg(long)]
    iohelper: bool,
    /// Read and write local volumes with O_DIRECT (bypassing the page cache).
    #[arg(long)]
    direct: bool,
    /// Draw progress bars (default when stdout is a terminal).
    #[arg(long)]
    progress: bool,
    /// Print one JSON object per transfer instead of text.
    #[arg(long)]
    json: bool,
    /// Pairs: VOLUME FILE for download, FILE VOLUME for upload.
    #[arg(value_name = "PAIRS", required = true)]
    pairs: Vec<String>,
}

impl TransferArgs {
    fn backend(&self) -> Backend {
        if self.iohelper {
            Backend::Helper(HelperOptions {
                direct: self.direct,
                ..HelperOptions::default()
            })
        } else {
            Backend::InProcess
        }
    }

    fn open_options(&self, direction: Direction) -> OpenOptions {
        let mut flags = 0;
        if self.no_sparse {
            flags |= OpenOptions::NO_SPARSE;
        }
        if self.allocated {
            flags |= OpenOptions::ALLOCATED;
        }
        if self.destination_is_zero {
            flags |= OpenOptions::DESTINATION_IS_ZERO;
        }
        if self.no_extents {
            flags |= OpenOptions::NO_EXTENTS;
        }
        if self.overwrite && direction == Direction::Upload {
            flags |= OpenOptions::OVERWRITE;
        }
        OpenOptions {
            flags,
            zero_granularity: self.sparse_size,
        }
    }
}

struct Pending {
    volume: String,
    file: PathBuf,
    count: Counter,
    rx: mpsc::Receiver<TransferReport>,
}

pub fn run(args: TransferArgs, direction: Direction) -> Result<(), CliError> {
    if !args.pairs.len().is_multiple_of(2) {
        return Err(CliError::Usage(format!(
            "expected pairs of arguments, got {} (an odd number)",
            args.pairs.len()
        )));
    }
    let addr = args.connect.address()?;
    let (engine, thread) = Engine::spawn(EngineConfig::default())
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    let conn = engine
        .connect_blocking(&addr, Duration::from_secs(10))
        .map_err(|e| CliError::Connect(format!("cannot connect to {addr}: {e}")))?;

    let options = args.open_options(direction);
    let mut pending = Vec::new();
    for pair in args.pairs.chunks(2) {
        let (volume, file) = match direction {
            Direction::Download => (pair[0].clone(), PathBuf::from(&pair[1])),
            Direction::Upload => (pair[1].clone(), PathBuf::from(&pair[0])),
        };
        let count = Counter::default();
        let rx = match direction {
            Direction::Download => {
                let writer = download_sink(&args, &file)?;
                let writer = CountingWriter {
                    inner: writer,
                    count: count.clone(),
                };
                engine.download(conn, &volume, options, Box::new(writer))
            }
            Direction::Upload => {
                let reader = args.backend().reader(
                    &file,
                    ReaderOptions {
                        zero_granularity: args.sparse_size,
                        no_extents: args.no_extents,
                        direct: args.direct,
                        ..ReaderOptions::default()
                    },
                );
                let reader = CountingReader {
                    inner: reader,
                    count: count.clone(),
                };
                engine.upload(conn, &volume, options, Box::new(reader))
            }
        };
        pending.push(Pending {
            volume,
            file,
            count,
            rx,
        });
    }

    let bars = (args.progress || (std::io::stdout().is_terminal() && !args.json)).then(|| {
        Bars::start(
            pending
                .iter()
                .map(|p| {
                    let size = (direction == Direction::Upload)
                        .then(|| std::fs::metadata(&p.file).ok().map(|m| m.len()))
                        .flatten();
                    (p.volume.clone(), p.count.clone(), size)
                })
                .collect(),
        )
    });
    let started = Instant::now();
    let mut reports = Vec::new();
    for p in &pending {
        let report =
            p.rx.recv()
                .map_err(|_| CliError::Other("event loop ended early".into()))?;
        reports.push(report);
    }
    drop(bars);
    let elapsed = started.elapsed();
    engine.shutdown();
    let _ = thread.join();
    // Failed transfers remove their temporaries on the workers; let them before exiting.
    fdstream::Pool::shared().wait_idle(Duration::from_secs(10));

    let mut failed = 0;
    for (p, r) in pending.iter().zip(&reports) {
        let verb = if direction == Direction::Download {
            "download"
        } else {
            "upload"
        };
        if args.json {
            say!("{}", report_json(verb, p, r));
        } else if r.result.is_ok() {
            say!(
                "{verb} {} <-> {}: {} bytes ({} data, {} hole) in {:.2}s",
                p.volume,
                p.file.display(),
                r.size,
                r.stats.data_bytes,
                r.stats.hole_bytes,
                r.elapsed.as_secs_f64()
            );
        }
        if let Err(e) = &r.result {
            failed += 1;
            tell!(
                "volstream: {verb} {} <-> {}: {e}",
                p.volume,
                p.file.display()
            );
        }
    }
    log::info!(
        "{} transfers in {:.2}s",
        reports.len(),
        elapsed.as_secs_f64()
    );
    if failed > 0 {
        return Err(CliError::Transfers {
            failed,
            total: reports.len(),
        });
    }
    Ok(())
}

fn download_sink(args: &TransferArgs, file: &PathBuf) -> Result<AnyWriter, CliError> {
    let options = WriterOptions {
        allocated: args.allocated,
        destination_is_zero: args.destination_is_zero,
        overwrite: args.overwrite,
        no_sync: args.no_sync,
        direct: args.direct,
        ..WriterOptions::default()
    };
    let backend = args.backend();
    let meta = std::fs::metadata(file).ok();
    let is_special = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device() || m.file_type().is_fifo());
    if is_special || (args.in_place && meta.is_some()) {
        return Ok(backend.in_place(file, options));
    }
    if args.in_place {
        return Err(CliError::Usage(format!(
            "--in-place needs an existing destination, {} does not exist",
            file.display()
        )));
    }
    Ok(backend.create(file, options))
}

/// One transfer of `--json`.
#[derive(serde::Serialize)]
struct ReportLine<'a> {
    op: &'a str,
    volume: &'a str,
    file: String,
    ok: bool,
    size: u64,
    data_bytes: u64,
    hole_bytes: u64,
    wire_bytes: u64,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn report_json(op: &str, p: &Pending, r: &TransferReport) -> String {
    json(&ReportLine {
        op,
        volume: &p.volume,
        file: p.file.display().to_string(),
        ok: r.result.is_ok(),
        size: r.size,
        data_bytes: r.stats.data_bytes,
        hole_bytes: r.stats.hole_bytes,
        wire_bytes: r.stats.wire_bytes,
        seconds: r.elapsed.as_secs_f64(),
        error: r.result.as_ref().err().map(|e| e.to_string()),
    })
}
