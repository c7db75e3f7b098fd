//! Real files through two engines over a unix socket (one process), against `cp
//! --sparse=always`, `qemu-img convert -O raw` and `nbdcopy` on the same files. Prints JSON.
//!
//! `files [--dir /var/tmp/volstream-bench] [--runs 3] [--backend inproc|helper|helper-direct|all]
//!  [--peers 0|1]`
//! `--backend` chooses where each volume's I/O runs: fdstream's worker pool (inproc, the
//! default), a volstream-iohelper process per volume on both sides (helper), or the same with
//! O_DIRECT (helper-direct; the source is then read from disk, not the warm cache). With
//! `all`, each runs and the JSON gives each one's throughput relative to inproc.
//! Workloads (as in shared/peers): W1 = 2 GiB dense; W2 = 64 GiB apparent, 256 x 4 MiB extents
//! every 256 MiB (1 GiB of data). Created under --dir once and reused. Every source's data is
//! read once before timing (warm cache), an untimed `sync` precedes each run, and no side
//! fsyncs (volstream runs with its no-fdatasync option), as in the peers' method.
//! Each case (a tool, or volstream with one backend) runs once untimed (warm-up, content
//! check), then `--runs N` times; the JSON gives every timed run, the median and the best.

use bench::{random_bytes, socket_path};
use clap::Parser;
use engine::proto::OpenOptions;
use engine::{Engine, EngineConfig};
use fdstream::{extents, Backend, DirProvider, ExtentKind, HelperOptions, WriterOptions};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Workload {
    name: &'static str,
    size: u64,
    extents: Vec<(u64, u64)>,
}

impl Workload {
    fn data(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "W1.img",
            size: 2 * GIB,
            extents: vec![(0, 2 * GIB)],
        },
        Workload {
            name: "W2.img",
            size: 64 * GIB,
            extents: (0..256).map(|k| (k * 256 * MIB, 4 * MIB)).collect(),
        },
    ]
}

/// Creates the workload file unless a complete one (marked by a stamp file) is there.
fn ensure(dir: &Path, w: &Workload) -> PathBuf {
    let path = dir.join(w.name);
    let stamp = dir.join(format!(".{}.done", w.name));
    if stamp.exists() && path.metadata().map(|m| m.len()).ok() == Some(w.size) {
        return path;
    }
    eprintln!("creating {}", path.display());
    let f = File::create(&path).expect("create workload");
    f.set_len(w.size).unwrap();
    for (i, &(off, len)) in w.extents.iter().enumerate() {
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(64 * MIB);
            let block = random_bytes(n as usize, ((i as u64) << 32) | (pos / MIB) | 1);
            f.write_all_at(&block, off + pos).unwrap();
            pos += n;
        }
    }
    f.sync_all().unwrap();
    File::create(stamp).unwrap();
    path
}

/// Reads every data range once so that every tool starts from a warm cache.
fn warm(path: &Path) {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    for e in extents(path).unwrap() {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let mut pos = e.offset;
        while pos < e.offset + e.len {
            let n = (e.offset + e.len - pos).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos).unwrap();
            pos += n as u64;
        }
    }
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One timed copy into a fresh `dst` (removed and synced first, untimed).
fn time_once(dst: &Path, copy: &mut dyn FnMut() -> Result<(), String>) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    sync();
    let t = Instant::now();
    copy()?;
    Ok(t.elapsed().as_secs_f64())
}

/// A JSON number rounded to `decimals`, or null where a failed case left none (serde_json
/// turns non-finite floats into null).
fn num(x: f64, decimals: i32) -> Value {
    let scale = 10f64.powi(decimals);
    Value::from((x * scale).round() / scale)
}

/// One tool (or volstream backend) on one workload, with every run's time.
struct Case<'a> {
    label: String,
    copy: Box<dyn FnMut() -> Result<(), String> + 'a>,
    seconds: Vec<f64>,
    error: Option<String>,
    content_ok: bool,
    dst_allocated: u64,
}

impl<'a> Case<'a> {
    fn new(label: &str, copy: impl FnMut() -> Result<(), String> + 'a) -> Self {
        Case {
            label: label.to_owned(),
            copy: Box::new(copy),
            seconds: Vec::new(),
            error: None,
            content_ok: false,
            dst_allocated: 0,
        }
    }

    fn median(&self) -> f64 {
        if self.seconds.is_empty() {
            f64::NAN
        } else {
            median(self.seconds.clone())
        }
    }

    fn best(&self) -> f64 {
        self.seconds.iter().copied().fold(f64::NAN, f64::min)
    }

    /// The JSON fields every case shares, under `key` = `label`.
    fn fields(&self, w: &Workload, key: &str) -> Map<String, Value> {
        let (secs, best) = (self.median(), self.best());
        let runs: Vec<Value> = self.seconds.iter().map(|&s| num(s, 3)).collect();
        let row = json!({
            "seconds": num(secs, 3),
            "best_seconds": num(best, 3),
            "runs": runs,
            "apparent_gb_s": num(w.size as f64 / secs / 1e9, 2),
            "data_gb_s": num(w.data() as f64 / secs / 1e9, 3),
            "dst_allocated": self.dst_allocated,
            "content_ok": self.content_ok,
        });
        let Value::Object(mut map) = row else {
            unreachable!("json! of an object literal")
        };
        map.insert(key.to_owned(), Value::from(self.label.as_str()));
        map
    }
}

fn command(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Same length and content (compared over the source's data extents; elsewhere both must be
/// holes or zero, which the digest of the volstream transfer already covers for volstream).
fn same(src: &Path, dst: &Path) -> bool {
    let (a, b) = (File::open(src).unwrap(), File::open(dst).unwrap());
    if a.metadata().unwrap().len() != b.metadata().unwrap().len() {
        return false;
    }
    let mut x = vec![0u8; 4 * MIB as usize];
    let mut y = vec![0u8; 4 * MIB as usize];
    for e in extents(src).unwrap() {
        let mut pos = e.offset;
        while pos < e.offset + e.len {
            let n = (e.offset + e.len - pos).min(x.len() as u64) as usize;
            if e.kind == ExtentKind::Data {
                a.read_exact_at(&mut x[..n], pos).unwrap();
            } else {
                x[..n.min(4096)].fill(0);
            }
            // Reading a 64 GiB hole of the copy would take long: sample its allocation instead.
            if e.kind == ExtentKind::Data || pos == e.offset {
                let m = n.min(if e.kind == ExtentKind::Data { n } else { 4096 });
                b.read_exact_at(&mut y[..m], pos).unwrap();
                if x[..m] != y[..m] {
                    return false;
                }
            }
            pos += n as u64;
        }
    }
    true
}

#[derive(Parser)]
#[command(about = "Real files through two engines against cp, qemu-img convert and nbdcopy")]
struct Cli {
    /// Where the workloads' files are created (once) and copied.
    #[arg(long, default_value = "/var/tmp/volstream-bench")]
    dir: PathBuf,
    /// Timed runs per case, after one untimed warm-up.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only workloads whose name starts with this.
    #[arg(long, default_value = "")]
    only: String,
    /// The engine's initial stream window in bytes.
    #[arg(long)]
    window: Option<u32>,
    /// Where each volume's I/O runs: inproc, helper, helper-direct or all.
    #[arg(long, default_value = "inproc")]
    backend: String,
    /// 0 skips the peers (cp, qemu-img, nbdcopy).
    #[arg(long, default_value_t = 1)]
    peers: u32,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let only = cli.only;
    let mut config = EngineConfig::default();
    if let Some(window) = cli.window {
        config.connection.stream_window = window;
    }
    let dir = cli.dir;
    let runs = cli.runs;
    let with_peers = cli.peers;
    let backend_arg = cli.backend;
    let helper = |direct| {
        Backend::Helper(HelperOptions {
            direct,
            ..HelperOptions::default()
        })
    };
    let all = [
        ("inproc", Backend::InProcess),
        ("helper", helper(false)),
        ("helper-direct", helper(true)),
    ];
    let backends: Vec<(&str, Backend)> = all
        .into_iter()
        .filter(|(label, _)| backend_arg == "all" || backend_arg == *label)
        .collect();
    if backends.is_empty() {
        eprintln!("--backend must be inproc, helper, helper-direct or all");
        std::process::exit(2);
    }
    std::fs::create_dir_all(&dir).expect("create --dir");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();

    // One server and one client connection per backend.
    let mut ends = Vec::new();
    let mut threads = Vec::new();
    for (label, backend) in &backends {
        let (server, server_thread) = Engine::spawn(config.clone()).unwrap();
        let provider = DirProvider::new(&dir)
            .unwrap()
            .without_sync()
            .with_backend(backend.clone());
        let (_, addr) = server
            .listen(&socket_path(&format!("files-{label}")), Arc::new(provider))
            .unwrap();
        let (client, client_thread) = Engine::spawn(config.clone()).unwrap();
        let conn = client.connect(&addr).unwrap();
        ends.push((server, client, conn));
        threads.extend([server_thread, client_thread]);
    }
    let options = OpenOptions::default().with_zero_granularity(4096);

    let mut rows = Vec::new();
    for w in workloads() {
        if !only.is_empty() && !w.name.starts_with(only.as_str()) {
            continue;
        }
        let src = ensure(&dir, &w);
        warm(&src);
        let dst = out_dir.join(w.name);
        let (src_s, dst_s) = (src.to_str().unwrap(), dst.to_str().unwrap());

        let mut cases = Vec::new();
        for ((label, backend), (_, client, conn)) in backends.iter().zip(&ends) {
            let dst = &dst;
            cases.push(Case::new(label, move || {
                let writer = backend.create(
                    dst,
                    WriterOptions {
                        no_sync: true,
                        ..WriterOptions::default()
                    },
                );
                let report = client
                    .download(*conn, w.name, options, writer)
                    .recv_timeout(Duration::from_secs(600))
                    .map_err(|_| "volstream timed out".to_owned())?;
                report.result.map_err(|e| e.to_string())
            }));
        }
        let ours = backends.len();
        let mut skipped = Vec::new();
        let tools: [(&str, Vec<&str>); 3] = [
            (
                "cp --sparse=always",
                vec!["cp", "--sparse=always", src_s, dst_s],
            ),
            (
                "qemu-img convert -O raw",
                vec![
                    "qemu-img", "convert", "-f", "raw", "-O", "raw", src_s, dst_s,
                ],
            ),
            ("nbdcopy", vec!["nbdcopy", src_s, dst_s]),
        ];
        for (label, argv) in tools {
            if with_peers == 0 {
                break;
            }
            if !installed(argv[0]) {
                skipped.push(json!({
                    "tool": label,
                    "skipped": format!("{} is not installed", argv[0]),
                }));
                continue;
            }
            let (dst, size) = (&dst, w.size);
            cases.push(Case::new(label, move || {
                if argv[0] == "nbdcopy" {
                    // nbdcopy writes into an existing destination.
                    File::create(dst)
                        .and_then(|f| f.set_len(size))
                        .map_err(|e| e.to_string())?;
                }
                command(argv[0], &argv[1..])
            }));
        }

        // Each case runs once untimed, then `runs` times back to back. On this kind of VM
        // (free-page reporting returns freed memory to the host) the first run after another
        // program's pays for faulting memory in again, 2-6x slower for every tool; the
        // warm-up run takes that, so the timed runs compare the tools and not the order.
        for case in cases.iter_mut() {
            for run in 0..=runs {
                match time_once(&dst, &mut case.copy) {
                    Ok(_) if run == 0 => {
                        case.content_ok = same(&src, &dst);
                        case.dst_allocated = dst.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                    }
                    Ok(s) => case.seconds.push(s),
                    Err(e) => {
                        eprintln!("{} failed on {}: {e}", case.label, w.name);
                        case.error = Some(e);
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&dst);

        let inproc = &cases[0];
        let volstream_rows: Vec<Value> = cases[..ours]
            .iter()
            .map(|c| {
                let mut row = c.fields(&w, "backend");
                let vs_inproc = if backends[0].0 == "inproc" {
                    inproc.median() / c.median()
                } else {
                    f64::NAN
                };
                row.insert("throughput_vs_inproc".into(), num(vs_inproc, 2));
                Value::Object(row)
            })
            .collect();
        let mut peers: Vec<Value> = cases[ours..]
            .iter()
            .map(|c| match &c.error {
                Some(e) => json!({"tool": c.label, "error": e}),
                None => {
                    let mut row = c.fields(&w, "tool");
                    row.insert(
                        "time_ratio_volstream_over_peer".into(),
                        num(inproc.median() / c.median(), 2),
                    );
                    row.insert(
                        "best_time_ratio_volstream_over_peer".into(),
                        num(inproc.best() / c.best(), 2),
                    );
                    Value::Object(row)
                }
            })
            .collect();
        peers.extend(skipped);
        rows.push(json!({
            "workload": w.name,
            "apparent_bytes": w.size,
            "data_bytes": w.data(),
            "volstream": volstream_rows[0],
            "backends": volstream_rows,
            "peers": peers,
        }));
    }
    for (server, client, _) in &ends {
        client.shutdown();
        server.shutdown();
    }
    for t in threads {
        let _ = t.join();
    }
    let mut cpuinfo = String::new();
    let _ = File::open("/proc/cpuinfo").and_then(|mut f| f.read_to_string(&mut cpuinfo));
    let cpus = cpuinfo.matches("processor").count();
    let doc = json!({
        "bench": "files",
        "transport": "unix",
        "stream_window": config.connection.stream_window,
        "runs_per_case": runs,
        "warmup_runs": 1,
        "cache": "warm",
        "fsync": false,
        "cpus": cpus,
        "workers": fdstream::Pool::shared().workers(),
        "results": rows,
    });
    println!("{doc}");
}
