//! NBD benchmarks against the peers, in one run, as JSON:
//!
//! - `export`: a raw file read with `nbdcopy URI null:` from `volstream serve --nbd` and from
//!   `qemu-nbd` exporting the same file (target: at least as fast as qemu-nbd).
//! - `qcow2_chain`: a thin qcow2 chain (base and overlay, half the data in each) downloaded to
//!   a sparse raw file by `volstream download` through `serve`, by `qemu-img convert -O raw`
//!   and by `nbdcopy` from `qemu-nbd` (target: at most 1.0x qemu-img's time).
//!
//! The cases take turns, `--runs` rounds; in each round every case runs twice in a row, untimed
//! then timed, so that each timed run starts from the memory its own case left (see
//! `measure_rounds`). The JSON has each case's median and best seconds, the ratios
//! volstream/peer from the same run and, for the export, each server's CPU seconds per GiB
//! (which the machine's load moves less than wall time).
//! volstream runs with --no-sync where the peers do not fsync their output.

use bench::load_average;
use clap::Parser;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn die(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

#[derive(Parser)]
#[command(about = "NBD export and qcow2 chain download vs qemu-nbd, qemu-img and nbdcopy")]
struct Cli {
    /// Scratch directory (the volumes are made once and kept).
    #[arg(long, default_value = "/var/tmp/volstream-bench-nbd")]
    dir: PathBuf,
    /// Rounds; in each, every case runs untimed and then timed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bytes of the raw file the exports serve.
    #[arg(long, default_value_t = 1 << 30)]
    export_size: u64,
    /// Guest size of the qcow2 chain.
    #[arg(long, default_value_t = 64 << 30)]
    chain_size: u64,
    /// Bytes of data in the chain, half in each layer.
    #[arg(long, default_value_t = 1 << 30)]
    chain_data: u64,
    /// Only this workload: export or qcow2_chain.
    #[arg(long, default_value = "")]
    only: String,
}

fn volstream() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("volstream")
}

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A server process, killed on drop; ready once its socket takes a connection.
struct Daemon(Child);

impl Daemon {
    fn start(cmd: &mut Command, sock: &Path) -> Daemon {
        let _ = std::fs::remove_file(sock);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(&format!("{cmd:?}: {e}")));
        let t = Instant::now();
        while UnixStream::connect(sock).is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                die(&format!("{cmd:?} never listened on {}", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: volstream removes its socket; qemu-nbd exits.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn run(argv: &[String]) -> Result<(), String> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed: {}",
            argv,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

struct Case {
    label: String,
    argv: Vec<String>,
    /// Made empty (and sized) before each run, for nbdcopy which writes into a file.
    fresh_output: Option<(PathBuf, u64)>,
    seconds: Vec<f64>,
    error: Option<String>,
    /// The server process whose CPU time each run costs (user + system, all threads).
    server: Option<u32>,
    server_cpu: Vec<f64>,
}

impl Case {
    fn new(label: &str, argv: Vec<String>) -> Case {
        Case {
            label: label.into(),
            argv,
            fresh_output: None,
            seconds: Vec::new(),
            error: None,
            server: None,
            server_cpu: Vec::new(),
        }
    }

    /// One run; `timed` keeps its time (and the server's CPU time).
    fn run_once(&mut self, timed: bool, output: Option<&Path>) {
        if self.error.is_some() {
            return;
        }
        if let Some(out) = output {
            let _ = std::fs::remove_file(out);
        }
        if let Some((path, size)) = &self.fresh_output {
            File::create(path).and_then(|f| f.set_len(*size)).unwrap();
        }
        let cpu = self.server.map(cpu_seconds);
        let t = Instant::now();
        if let Err(e) = run(&self.argv) {
            eprintln!("{}: {e}", self.label);
            self.error = Some(e);
            return;
        }
        if timed {
            self.seconds.push(t.elapsed().as_secs_f64());
            if let (Some(pid), Some(before)) = (self.server, cpu) {
                self.server_cpu.push(cpu_seconds(pid) - before);
            }
        }
    }

    fn median_of(values: &[f64]) -> f64 {
        let mut s = values.to_vec();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn median(&self) -> f64 {
        Self::median_of(&self.seconds)
    }

    fn best(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn json(&self, bytes: u64, ours: Option<&Case>) -> serde_json::Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        if let Some(e) = &self.error {
            return serde_json::json!({"tool": self.label, "error": e});
        }
        let mut v = serde_json::json!({
            "tool": self.label,
            "median_s": r(self.median()),
            "best_s": r(self.best()),
            "runs": self.seconds,
            "MiB_per_s": (bytes as f64 / MIB as f64 / self.median()).round(),
        });
        if !self.server_cpu.is_empty() {
            let gib = bytes as f64 / (1u64 << 30) as f64;
            v["server_cpu_s_per_GiB_median"] =
                serde_json::json!(r(Self::median_of(&self.server_cpu) / gib));
        }
        if let Some(o) = ours.filter(|o| o.error.is_none()) {
            v["time_ratio_volstream_over_peer"] = serde_json::json!(r(o.median() / self.median()));
            v["best_time_ratio_volstream_over_peer"] = serde_json::json!(r(o.best() / self.best()));
        }
        v
    }
}

/// User + system CPU seconds of process `pid` so far, all threads (/proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// `runs` rounds, each running every case in turn, so the cases of one round see the same
/// machine (on a shared VM the rate moves by a third from one second to the next; all of one
/// case's runs, then all of the next's, measured that drift). Each timed run comes right after
/// an untimed run of the same case: on this VM memory a program frees goes back to the host
/// (free-page reporting, docs/PERFORMANCE.md), and a run that fills page cache pays for faulting
/// it in again unless the run before it freed the same amount a moment ago. nbdcopy drops its
/// output from the page cache as it writes (sync_file_range + fadvise DONTNEED), so whatever ran
/// after it paid that: with one timed run per case per round, qemu-img convert took 1.0-1.9 s
/// in the bench against 0.58-0.65 s by hand, and 1.6-1.9x the CPU time after an nbdcopy run
/// than after one of its own (bench/RESULTS.md, the perf2 section of 2026-12-02).
fn measure_rounds(cases: &mut [Case], runs: usize, output: Option<&Path>) {
    for i in 0..runs {
        // The order turns every round, so no case always follows the same other one.
        let order: Vec<usize> = if i % 2 == 0 {
            (0..cases.len()).collect()
        } else {
            (0..cases.len()).rev().collect()
        };
        for k in order {
            cases[k].run_once(false, output);
            cases[k].run_once(true, output);
        }
    }
    if let Some(out) = output {
        let _ = std::fs::remove_file(out);
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn qemu_nbd(sock: &Path, format: &str, image: &Path) -> Daemon {
    Daemon::start(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-e", "16", "-f", format, "-k"])
            .arg(sock)
            .arg(image),
        sock,
    )
}

/// Writes `len` bytes of a non-zero, non-repeating-per-MiB pattern file.
fn dense_file(path: &Path, len: u64) {
    if path.metadata().is_ok_and(|m| m.len() == len) {
        return;
    }
    let mut f = File::create(path).unwrap();
    let mut block = vec![0u8; MIB as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..len / MIB {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&(x ^ i).to_le_bytes()[..chunk.len()]);
        }
        std::io::Write::write_all(&mut f, &block).unwrap();
    }
}

fn export_bench(dir: &Path, size: u64, runs: usize) -> serde_json::Value {
    let pool = dir.join("export-pool");
    std::fs::create_dir_all(&pool).unwrap();
    let file = pool.join("disk.raw");
    dense_file(&file, size);
    let ours_sock = dir.join("vs-nbd.sock");
    let qemu_sock = dir.join("qemu-nbd.sock");
    let ours = Daemon::start(
        Command::new(volstream())
            .args(["serve", "--pool"])
            .arg(&pool)
            .arg("--nbd")
            .arg(format!("unix:{}", ours_sock.display())),
        &ours_sock,
    );
    let theirs = qemu_nbd(&qemu_sock, "raw", &file);
    let uri = |sock: &Path, name: &str| format!("nbd+unix:///{name}?socket={}", sock.display());
    let mut cases = [
        Case::new(
            "volstream serve --nbd",
            vec![
                "nbdcopy".into(),
                uri(&ours_sock, "disk.raw"),
                "null:".into(),
            ],
        ),
        Case::new(
            "qemu-nbd",
            vec!["nbdcopy".into(), uri(&qemu_sock, ""), "null:".into()],
        ),
    ];
    cases[0].server = Some(ours.0.id());
    cases[1].server = Some(theirs.0.id());
    measure_rounds(&mut cases, runs, None);
    serde_json::json!({
        "workload": "export",
        "reader": "nbdcopy URI null:",
        "bytes": size,
        "volstream": cases[0].json(size, None),
        "peers": [cases[1].json(size, Some(&cases[0]))],
    })
}

fn chain_bench(dir: &Path, size: u64, data: u64, runs: usize) -> serde_json::Value {
    let pool = dir.join("chain-pool");
    std::fs::create_dir_all(&pool).unwrap();
    let (base, top) = (pool.join("base.qcow2"), pool.join("top.qcow2"));
    // Half the data in each layer, in 64 MiB pieces spread over the disk.
    let piece = 64 * MIB;
    let pieces = (data / 2 / piece).max(1);
    let stride = size / pieces;
    let made = top.exists() && base.exists();
    if !made {
        let q = |args: &[String]| run(args).unwrap_or_else(|e| die(&e));
        q(&[
            "qemu-img".into(),
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            s(&base),
            size.to_string(),
        ]);
        let mut io = vec!["qemu-io".to_string()];
        for i in 0..pieces {
            io.extend([
                "-c".into(),
                format!("write -P 0x{:02x} {} {piece}", 0x10 + i % 200, i * stride),
            ]);
        }
        io.push(s(&base));
        q(&io);
        q(&[
            "qemu-img".into(),
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            "base.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
            s(&top),
        ]);
        let mut io = vec!["qemu-io".to_string()];
        for i in 0..pieces {
            io.extend([
                "-c".into(),
                format!(
                    "write -P 0x{:02x} {} {piece}",
                    0x80 + i % 100,
                    i * stride + stride / 2
                ),
            ]);
        }
        io.push(s(&top));
        q(&io);
    }
    let out = dir.join("chain-out.raw");
    let listen = dir.join("vs.sock");
    let _server = Daemon::start(
        Command::new(volstream())
            .args(["serve", "--no-sync", "--pool"])
            .arg(&pool)
            .arg("--listen")
            .arg(format!("unix:{}", listen.display())),
        &listen,
    );
    let qemu_sock = dir.join("qemu-nbd-chain.sock");
    let _qemu = qemu_nbd(&qemu_sock, "qcow2", &top);
    let mut cases = [
        Case::new(
            "volstream download (serve, qemu-nbd inside)",
            vec![
                s(&volstream()),
                "download".into(),
                "--no-sync".into(),
                "--connect".into(),
                format!("unix:{}", listen.display()),
                "top.qcow2".into(),
                s(&out),
            ],
        ),
        Case::new(
            "qemu-img convert -O raw",
            vec![
                "qemu-img".into(),
                "convert".into(),
                "-O".into(),
                "raw".into(),
                s(&top),
                s(&out),
            ],
        ),
        Case::new(
            "nbdcopy from qemu-nbd",
            vec![
                "nbdcopy".into(),
                format!("nbd+unix:///?socket={}", qemu_sock.display()),
                s(&out),
            ],
        ),
    ];
    cases[2].fresh_output = Some((out.clone(), size));
    measure_rounds(&mut cases, runs, Some(&out));
    serde_json::json!({
        "workload": "qcow2_chain",
        "apparent_bytes": size,
        "data_bytes": pieces * piece * 2,
        "volstream": cases[0].json(data, None),
        "peers": [cases[1].json(data, Some(&cases[0])), cases[2].json(data, Some(&cases[0]))],
    })
}

fn main() {
    let cli = Cli::parse();
    let (dir, runs, only) = (cli.dir.clone(), cli.runs, cli.only.clone());
    std::fs::create_dir_all(&dir).unwrap();
    for tool in ["qemu-img", "qemu-io", "qemu-nbd", "nbdcopy"] {
        if !installed(tool) {
            println!(
                "{}",
                serde_json::json!({"skipped": format!("{tool} is not installed")})
            );
            return;
        }
    }
    if !volstream().exists() {
        die("build volstream first: cargo build --release");
    }
    let load_before = load_average();
    let mut rows = Vec::new();
    if only.is_empty() || only == "export" {
        rows.push(export_bench(&dir, cli.export_size, runs));
    }
    if only.is_empty() || only == "qcow2_chain" {
        rows.push(chain_bench(&dir, cli.chain_size, cli.chain_data, runs));
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "nbd",
            "load_before": load_before,
            "load_after": load_average(),
            "results": rows,
        })
    );
}
