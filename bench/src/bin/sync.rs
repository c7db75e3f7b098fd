//! `--update` against rsync's delta transfer on issue 16's case: an 8 GiB sparse image with
//! 400 MiB of data (100 x 4 MiB extents), a newer version with 1 % of its data blocks changed
//! at scattered places. Prints JSON.
//!
//! `sync [--dir /var/tmp/volstream-bench] [--runs 3]`
//! Cases, taking turns round by round (order reversed every round), each starting from a fresh
//! sparse copy of the old version (made outside the timing) and checked afterwards (block
//! checksum equal to the new version's):
//! - `download_update`: `volstream download --update` from a local `serve` over a Unix socket;
//! - `upload_update`: `volstream upload --update` of the new version over the server's old one;
//! - `rsync`: `rsync --inplace --no-whole-file --stats` of the new version over the old (both
//!   local: rsync forks a sender and a receiver joined by a pipe and runs its delta algorithm
//!   between them; `--stats` gives the bytes that crossed it).
//!
//! Wire bytes: volstream's `--json` content plus block-digest bytes; rsync's total bytes sent
//! plus received. Warm cache (every file is read once before timing). Target: `--update`
//! faster than rsync, with fewer wire bytes; `ratio_*` are rsync's figure over volstream's.

use bench::load_average;
use clap::Parser;
use fdstream::blockhash;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 64 * 1024;
const SIZE: u64 = 8 * GIB;
const EXTENTS: u64 = 100;
const EXTENT: u64 = 4 * MIB;

#[derive(Parser)]
struct Args {
    /// Where the images live (created once, reused).
    #[arg(long, default_value = "/var/tmp/volstream-bench")]
    dir: PathBuf,
    /// Timed runs of each case.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn layout() -> Vec<(u64, u64)> {
    (0..EXTENTS)
        .map(|i| ((i * (SIZE / EXTENTS) / BLOCK + i % 7) * BLOCK, EXTENT))
        .collect()
}

/// 1 % of the data blocks, each in a different place.
fn changed_blocks() -> Vec<u64> {
    let per_extent = EXTENT / BLOCK;
    (0..EXTENTS * per_extent / 100)
        .map(|i| {
            let (off, _) = layout()[(i * 37 % EXTENTS) as usize];
            off / BLOCK + (i * 13) % per_extent
        })
        .collect()
}

/// The old and the new version under `dir` (made once; a stamp says they are complete).
fn versions(dir: &Path) -> (PathBuf, PathBuf) {
    let (old, new) = (dir.join("sync-old.img"), dir.join("sync-new.img"));
    let stamp = dir.join(".sync.done");
    if stamp.exists() && old.exists() && new.exists() {
        return (old, new);
    }
    eprintln!("creating {} and {}", old.display(), new.display());
    std::fs::create_dir_all(dir).unwrap();
    for (path, changed) in [(&old, false), (&new, true)] {
        let f = File::create(path).unwrap();
        f.set_len(SIZE).unwrap();
        for (k, &(off, len)) in layout().iter().enumerate() {
            f.write_all_at(&bench::random_bytes(len as usize, k as u64 + 1), off)
                .unwrap();
        }
        if changed {
            for (k, block) in changed_blocks().into_iter().enumerate() {
                let bytes = bench::random_bytes(BLOCK as usize, 1000 + k as u64);
                f.write_all_at(&bytes, block * BLOCK).unwrap();
            }
        }
        f.sync_all().unwrap();
    }
    File::create(stamp).unwrap();
    (old, new)
}

fn checksum(path: &Path) -> String {
    let d = blockhash::digests_of(&File::open(path).unwrap(), blockhash::threads()).unwrap();
    blockhash::hex(&d.checksum())
}

/// A fresh sparse copy of `from` at `to`.
fn restore(from: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp {} {}", from.display(), to.display());
}

struct Serve(Child);

impl Serve {
    fn start(cli: &Path, pool: &Path, sock: &Path) -> Serve {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(cli)
            .args(["serve", "--pool"])
            .arg(pool)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "serve did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// One run's wall time and bytes on the wire.
struct Run {
    seconds: f64,
    wire: u64,
}

fn volstream(cli: &Path, args: &[&str], file: &Path, volume: &str, upload: bool) -> Run {
    let mut cmd = Command::new(cli);
    cmd.args(args);
    if upload {
        cmd.arg(file).arg(volume);
    } else {
        cmd.arg(volume).arg(file);
    }
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let seconds = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .expect("a finished event");
    let wire = event["wire_bytes"].as_u64().unwrap()
        + event["update"]["digests_wire_bytes"].as_u64().unwrap_or(0);
    Run { seconds, wire }
}

fn rsync(new: &Path, dest: &Path) -> Run {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(new)
        .arg(dest)
        .output()
        .unwrap();
    let seconds = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .map(|v| v.replace(',', "").parse().unwrap())
            .unwrap_or_else(|| panic!("rsync --stats has no {name:?}: {text}"))
    };
    Run {
        seconds,
        wire: field("Total bytes sent: ") + field("Total bytes received: "),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn summary(runs: &[Run]) -> serde_json::Value {
    let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
    serde_json::json!({
        "wall_s": secs,
        "median_s": median(&secs),
        "wire_bytes": runs.iter().map(|r| r.wire).max(),
    })
}

fn main() {
    let args = Args::parse();
    let rsync_version = Command::new("rsync").arg("--version").output();
    let Ok(version) = rsync_version else {
        eprintln!("rsync is not installed (apt-get install -y rsync): nothing to compare with");
        std::process::exit(2);
    };
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let cli = std::env::current_exe().unwrap().with_file_name("volstream");
    assert!(
        cli.exists(),
        "no volstream binary beside this one (cargo build --release)"
    );
    let work = args.dir.join("sync");
    std::fs::create_dir_all(work.join("pool")).unwrap();
    let (old, new) = versions(&args.dir);
    let want = checksum(&new);
    let pool = work.join("pool");
    let (served, local, rsynced) = (
        pool.join("disk.img"),
        work.join("local.img"),
        work.join("rsync.img"),
    );
    let sock = work.join("sock");
    let connect = format!("unix:{}", sock.display());
    let server = Serve::start(&cli, &pool, &sock);
    let data: u64 = layout().iter().map(|e| e.1).sum();
    let load_before = load_average();

    let (mut down, mut up, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.runs {
        let mut cases = ["download", "upload", "rsync"];
        if round % 2 == 1 {
            cases.reverse();
        }
        for case in cases {
            match case {
                "download" => {
                    restore(&new, &served);
                    restore(&old, &local);
                    let a = ["download", "--json", "--update", "--connect", &connect];
                    down.push(volstream(&cli, &a, &local, "disk.img", false));
                    assert_eq!(checksum(&local), want, "download --update");
                }
                "upload" => {
                    restore(&old, &served);
                    let a = ["upload", "--json", "--update", "--connect", &connect];
                    up.push(volstream(&cli, &a, &new, "disk.img", true));
                    assert_eq!(checksum(&served), want, "upload --update");
                }
                _ => {
                    restore(&old, &rsynced);
                    rs.push(rsync(&new, &rsynced));
                    assert_eq!(checksum(&rsynced), want, "rsync");
                }
            }
        }
    }
    drop(server);
    for p in [&served, &local, &rsynced] {
        let _ = std::fs::remove_file(p);
    }
    let m = |r: &[Run]| median(&r.iter().map(|r| r.seconds).collect::<Vec<_>>());
    let w = |r: &[Run]| r.iter().map(|r| r.wire).max().unwrap_or(0) as f64;
    let out = serde_json::json!({
        "bench": "sync",
        "size": SIZE,
        "data_bytes": data,
        "changed_blocks": changed_blocks().len(),
        "changed_bytes": changed_blocks().len() as u64 * BLOCK,
        "warm_cache": true,
        "rsync": version,
        "load_before": load_before,
        "load_after": load_average(),
        "download_update": summary(&down),
        "upload_update": summary(&up),
        "rsync_inplace": summary(&rs),
        "ratio_time_rsync_to_download": m(&rs) / m(&down),
        "ratio_time_rsync_to_upload": m(&rs) / m(&up),
        "ratio_wire_rsync_to_download": w(&rs) / w(&down),
        "ratio_wire_rsync_to_upload": w(&rs) / w(&up),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
