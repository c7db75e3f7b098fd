//! `demo`: the whole path on an embedded default. A temporary pool of sparse volumes (one of
//! them 1 TiB and thin), a server and a client in this process, every volume downloaded at
//! once over one Unix connection, verified, and summarised.

use crate::error::CliError;
use crate::out::{say, tell};
use clap::Args;
use engine::proto::OpenOptions;
use engine::{Address, Digest, Engine, EngineConfig, TransferReport};
use fdstream::{DirProvider, ExtentKind, FileWriter, WriterOptions};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Args)]
pub struct DemoArgs {
    /// Where to create the temporary pool (default: the system temp directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Leave the pool and the downloaded copies in place.
    #[arg(long)]
    keep: bool,
}

/// A demo volume: name, apparent size, and (offset, length) of its data extents.
struct Spec {
    name: &'static str,
    size: u64,
    data: Vec<(u64, u64)>,
}

fn specs() -> Vec<Spec> {
    let spread = |size: u64, count: u64, len: u64| -> Vec<(u64, u64)> {
        (0..count).map(|i| (i * (size / count), len)).collect()
    };
    vec![
        Spec {
            name: "thin-1T.raw",
            size: 1 << 40,
            data: spread(1 << 40, 16, 4 * MIB),
        },
        Spec {
            name: "vm-a.raw",
            size: 4 * GIB,
            data: spread(4 * GIB, 64, MIB),
        },
        Spec {
            name: "vm-b.raw",
            size: 8 * GIB + 12345,
            data: {
                let mut d = spread(8 * GIB, 32, 2 * MIB);
                d.push((8 * GIB - MIB, MIB + 12345));
                d
            },
        },
        Spec {
            name: "dense-64M.raw",
            size: 64 * MIB,
            data: vec![(0, 64 * MIB)],
        },
        Spec {
            name: "empty-16G.raw",
            size: 16 * GIB,
            data: vec![],
        },
    ]
}

/// Removes the demo's directory on every exit path unless asked to keep it.
struct Cleanup {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.keep {
            tell!("volstream: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn other(context: &str) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| CliError::Other(format!("{context}: {e}"))
}

pub fn run(args: DemoArgs) -> Result<(), CliError> {
    let base = args.dir.unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("volstream-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(other("cannot create the demo directory"))?;
    let cleanup = Cleanup {
        dir: dir.clone(),
        keep: args.keep,
    };
    let pool = dir.join("pool");
    let copies = dir.join("copies");
    std::fs::create_dir_all(&pool).map_err(other("cannot create the pool"))?;
    std::fs::create_dir_all(&copies).map_err(other("cannot create the copies directory"))?;

    let specs = specs();
    say!(
        "Creating {} sparse volumes in {} ...",
        specs.len(),
        pool.display()
    );
    for (i, spec) in specs.iter().enumerate() {
        make_volume(&pool.join(spec.name), spec, i as u64)?;
    }

    let socket = dir.join("volstream.sock");
    let provider = DirProvider::new(&pool).map_err(other("cannot open the pool"))?;
    let (server, server_thread) =
        Engine::spawn(EngineConfig::default()).map_err(other("cannot start the server loop"))?;
    let (_, addr) = server
        .listen(&Address::Unix(socket), Arc::new(provider))
        .map_err(|e| CliError::Connect(format!("cannot listen: {e}")))?;
    let (client, client_thread) =
        Engine::spawn(EngineConfig::default()).map_err(other("cannot start the client loop"))?;
    let conn = client
        .connect_blocking(&addr, Duration::from_secs(5))
        .map_err(|e| CliError::Connect(format!("cannot connect to {addr}: {e}")))?;

    say!("Downloading all of them at once over one connection ({addr}) ...\n");
    let started = Instant::now();
    let receivers: Vec<_> = specs
        .iter()
        .map(|spec| {
            let writer = FileWriter::create(copies.join(spec.name), WriterOptions::default());
            client.download(conn, spec.name, OpenOptions::default(), Box::new(writer))
        })
        .collect();
    let reports: Vec<TransferReport> = receivers
        .into_iter()
        .map(|rx| {
            rx.recv()
                .map_err(|_| CliError::Other("event loop ended early".into()))
        })
        .collect::<Result<_, _>>()?;
    let elapsed = started.elapsed();
    client.shutdown();
    server.shutdown();
    let _ = client_thread.join();
    let _ = server_thread.join();

    say!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}  CHECK",
        "VOLUME",
        "APPARENT",
        "DATA",
        "ON WIRE",
        "ALLOCATED",
        "TIME",
        "RATE"
    );
    let mut failures = 0;
    let (mut total_apparent, mut total_data, mut total_wire) = (0, 0, 0);
    for (spec, report) in specs.iter().zip(&reports) {
        let copy = copies.join(spec.name);
        let check = match &report.result {
            Err(e) => Err(e.to_string()),
            Ok(()) => compare(&pool.join(spec.name), &copy),
        };
        let allocated = std::fs::metadata(&copy)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let secs = report.elapsed.as_secs_f64();
        say!(
            "{:<16} {:>10} {:>10} {:>10} {:>10} {:>7.2}s {:>10}/s  {}",
            spec.name,
            human(spec.size),
            human(report.stats.data_bytes),
            human(report.stats.wire_bytes),
            human(allocated),
            secs,
            human((spec.size as f64 / secs.max(1e-9)) as u64),
            match &check {
                Ok(()) => "identical".to_owned(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        failures += check.is_err() as usize;
        total_apparent += spec.size;
        total_data += report.stats.data_bytes;
        total_wire += report.stats.wire_bytes;
    }
    say!(
        "\n{} volumes, {} apparent, {} of data, {} on the wire, in {:.2}s over one connection.",
        specs.len(),
        human(total_apparent),
        human(total_data),
        human(total_wire),
        elapsed.as_secs_f64()
    );
    drop(cleanup);
    if failures > 0 {
        return Err(CliError::Transfers {
            failed: failures,
            total: specs.len(),
        });
    }
    Ok(())
}

/// Writes a volume's data extents with deterministic content into a sparse file.
fn make_volume(path: &Path, spec: &Spec, seed: u64) -> Result<(), CliError> {
    let file = File::create(path).map_err(other("cannot create a demo volume"))?;
    file.set_len(spec.size)
        .map_err(other("cannot size a demo volume"))?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for &(offset, len) in &spec.data {
        let mut buf = vec![0u8; len as usize];
        for word in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        file.write_all_at(&buf, offset)
            .map_err(other("cannot write a demo volume"))?;
    }
    Ok(())
}

/// The digest of a file's logical content, reading only its data extents.
fn content_digest(path: &Path) -> std::io::Result<(u64, u32)> {
    let file = File::open(path)?;
    let mut digest = Digest::new();
    let mut buf = vec![0u8; MIB as usize];
    for extent in fdstream::extents(path)? {
        if extent.kind != ExtentKind::Data {
            digest.update_zeroes(extent.len);
            continue;
        }
        let mut at = extent.offset;
        while at < extent.offset + extent.len {
            let n = (extent.offset + extent.len - at).min(MIB) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            digest.update(&buf[..n]);
            at += n as u64;
        }
    }
    Ok((digest.len(), digest.value()))
}

/// Compares source and copy independently of the transfer's own digest check.
fn compare(source: &Path, copy: &Path) -> Result<(), String> {
    let a = content_digest(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let b = content_digest(copy).map_err(|e| format!("{}: {e}", copy.display()))?;
    if a != b {
        return Err(format!("content differs ({a:?} vs {b:?})"));
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
