//! `volstream checksum` on a 64 GiB image with 1 GiB of data (256 x 4 MiB extents every 256 MiB,
//! as files' W2), against reading that data once. Prints JSON.
//!
//! `checksum [--dir /var/tmp/volstream-bench] [--runs 5]`
//! The image is created under --dir once (stamped) and reused. Every figure is warm-cache (the
//! data is read once before timing; dropping the page cache would evict other users' too):
//! - `read_once`: one thread preads every data extent in 8 MiB pieces and touches nothing else
//!   (the floor: what any reader of the data pays);
//! - `checksum`: fdstream::blockhash::digests_of with blockhash::threads() threads, then the
//!   volume checksum (what the command and a server's DIGESTS stream run);
//! - `cli`: the `volstream checksum` binary, process start included.
//!
//! The target of issue 16 is `checksum` under 2x `read_once`; `ratio` is their medians' quotient.

use bench::{load_average, random_bytes};
use clap::Parser;
use fdstream::blockhash;
use fdstream::{extents, ExtentKind};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Parser)]
struct Args {
    /// Where the image lives (created once).
    #[arg(long, default_value = "/var/tmp/volstream-bench")]
    dir: PathBuf,
    /// Timed runs of each case.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("checksum-64g.img");
    let stamp = dir.join(".checksum-64g.img.done");
    if stamp.exists() && path.metadata().map(|m| m.len()).ok() == Some(64 * GIB) {
        return path;
    }
    eprintln!("creating {}", path.display());
    std::fs::create_dir_all(dir).unwrap();
    let f = File::create(&path).unwrap();
    f.set_len(64 * GIB).unwrap();
    for k in 0..256u64 {
        f.write_all_at(&random_bytes(4 * MIB as usize, k | 1), k * 256 * MIB)
            .unwrap();
    }
    f.sync_all().unwrap();
    File::create(stamp).unwrap();
    path
}

/// Reads every data extent once; returns the bytes read.
fn read_once(path: &Path) -> u64 {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut total = 0;
    for e in extents(path).unwrap() {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let mut pos = e.offset;
        while pos < e.offset + e.len {
            let n = (e.offset + e.len - pos).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos).unwrap();
            pos += n as u64;
            total += n as u64;
        }
    }
    total
}

fn timed(runs: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let path = image(&args.dir);
    let load_before = load_average();
    let data = read_once(&path);
    let exe = std::env::current_exe().unwrap();
    let cli = exe.with_file_name("volstream");
    let sum = blockhash::digests_of(&File::open(&path).unwrap(), blockhash::threads()).unwrap();
    let want = blockhash::hex(&sum.checksum());

    let read = timed(args.runs, || {
        read_once(&path);
    });
    let checksum = timed(args.runs, || {
        let d = blockhash::digests_of(&File::open(&path).unwrap(), blockhash::threads()).unwrap();
        assert_eq!(blockhash::hex(&d.checksum()), want);
    });
    let cli_runs = if cli.exists() {
        Some(timed(args.runs, || {
            let out = Command::new(&cli)
                .arg("checksum")
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success());
            assert!(String::from_utf8_lossy(&out.stdout).starts_with(&want));
        }))
    } else {
        eprintln!("no volstream binary beside this one: the cli case is skipped");
        None
    };
    let out = serde_json::json!({
        "bench": "checksum",
        "image": path.display().to_string(),
        "size": 64 * GIB,
        "data_bytes": data,
        "data_blocks": sum.records.len(),
        "threads": blockhash::threads(),
        "warm_cache": true,
        "load_before": load_before,
        "load_after": load_average(),
        "read_once_s": {"runs": read, "median": median(&read)},
        "checksum_s": {"runs": checksum, "median": median(&checksum)},
        "cli_s": cli_runs.as_ref().map(|r| serde_json::json!({"runs": r, "median": median(r)})),
        "ratio_checksum_to_read": median(&checksum) / median(&read),
        "target_ratio": 2.0,
        "checksum": want,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
