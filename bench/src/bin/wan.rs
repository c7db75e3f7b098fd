//! Throughput at a distance: files downloaded through the delay proxy (bench/src/delay.rs) by
//! volstream (all streams on one TCP connection), by a raw TCP copy (one connection per file)
//! and by `nbdcopy -C 4` from `nbdkit file dir=` (one process per file), in one run, at each
//! round trip and stream count. Prints JSON.
//!
//! `wan [--rtt-ms 0,1,10,50] [--streams 1,16] [--rate 125000000] [--size 536870912]
//!  [--runs 1] [--dir /var/tmp/volstream-wan] [--stream-window N] [--conn-window N]
//!  [--max-stream-window N] [--max-conn-window N]`
//! (the window options set the engine's initial windows and the maxima they may grow to; a
//! maximum equal to the initial window turns growth off)
//!
//! `--rate` caps each direction of each proxied connection in bytes per second (0: uncapped);
//! `--size` is the total per case, split evenly across the streams. The raw copy is the
//! reference: with the proxy's legs on loopback it is limited only by the rate cap and the CPU.
//! Every copy is checked byte for byte against its source after the timed run. Warm cache, no
//! fsync on any side. Each case also records the round trip a ping-pong sees through the
//! proxy (the check that the proxy gives the configured RTT).

use bench::delay::{DelayConfig, DelayProxy};
use bench::random_bytes;
use clap::Parser;
use engine::proto::OpenOptions;
use engine::{Address, Engine, EngineConfig, EngineHandle};
use fdstream::{Backend, DirProvider, WriterOptions};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The files of one stream count: `s{streams}-{i}.img`, `size / streams` bytes each.
fn names(streams: u64) -> Vec<String> {
    (0..streams)
        .map(|i| format!("s{streams}-{i}.img"))
        .collect()
}

/// Creates (once; a stamp marks a complete set) the source files for `streams`.
fn ensure_sources(dir: &Path, streams: u64, size: u64) {
    let each = size / streams;
    let stamp = dir.join(format!(".s{streams}.done"));
    let complete = std::fs::read_to_string(&stamp).ok() == Some(each.to_string())
        && names(streams)
            .iter()
            .all(|n| dir.join(n).metadata().is_ok_and(|m| m.len() == each));
    if complete {
        return;
    }
    let _ = std::fs::remove_file(&stamp);
    for (i, name) in names(streams).iter().enumerate() {
        eprintln!("wan: creating {name}");
        let f = File::create(dir.join(name)).expect("create source");
        f.set_len(each).unwrap();
        let mut pos = 0;
        while pos < each {
            let n = (each - pos).min(16 * MIB);
            let block = random_bytes(n as usize, (streams << 40) ^ ((i as u64) << 20) ^ pos | 1);
            f.write_all_at(&block, pos).unwrap();
            pos += n;
        }
    }
    std::fs::write(stamp, each.to_string()).unwrap();
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// Reads a file once so that every tool starts from a warm cache.
fn warm(path: &Path) {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    while f.read(&mut buf).unwrap() > 0 {}
}

fn same(a: &Path, b: &Path) -> bool {
    let (Ok(mut x), Ok(mut y)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let mut p = vec![0u8; 4 * MIB as usize];
    let mut q = vec![0u8; 4 * MIB as usize];
    loop {
        let n = x.read(&mut p).unwrap();
        if n == 0 {
            return y.read(&mut q).unwrap() == 0;
        }
        if y.read_exact(&mut q[..n]).is_err() || p[..n] != q[..n] {
            return false;
        }
    }
}

/// Serves each connection the file named on its first line, then closes it: a plain TCP copy.
fn raw_server(dir: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let dir = dir.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut name = String::new();
                if reader.read_line(&mut name).is_err() {
                    return;
                }
                let mut out = conn;
                let Ok(mut f) = File::open(dir.join(name.trim_end())) else {
                    return;
                };
                let mut buf = vec![0u8; MIB as usize];
                loop {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn raw_copy(via: SocketAddr, name: &str, dst: &Path) -> Result<(), String> {
    let mut s = TcpStream::connect(via).map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("{name}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut f = File::create(dst).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => f.write_all(&buf[..n]).map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Runs `copy` for every name at once, one thread each; the elapsed time of the whole set.
fn parallel(
    names: &[String],
    out: &Path,
    copy: &(dyn Fn(&str, &Path) -> Result<(), String> + Sync),
) -> Result<f64, String> {
    let start = Instant::now();
    let results: Vec<Result<(), String>> = thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                let dst = out.join(n);
                s.spawn(move || copy(n, &dst))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<(), String>>()?;
    Ok(secs)
}

/// nbdkit serving the source directory on a TCP port, killed on drop.
struct Nbdkit {
    child: Child,
    addr: SocketAddr,
}

impl Nbdkit {
    fn start(dir: &Path) -> Result<Nbdkit, String> {
        let port = TcpListener::bind(loopback())
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("file")
            .arg(format!("dir={}", dir.display()))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("nbdkit: {e}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut nbdkit = Nbdkit { child, addr };
        for _ in 0..200 {
            if TcpStream::connect(addr).is_ok() {
                return Ok(nbdkit);
            }
            if let Ok(Some(status)) = nbdkit.child.try_wait() {
                return Err(format!("nbdkit exited: {status}"));
            }
            thread::sleep(Duration::from_millis(25));
        }
        Err("nbdkit did not start listening".into())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbdcopy(via: SocketAddr, name: &str, dst: &Path, size: u64) -> Result<(), String> {
    // nbdcopy writes into an existing destination.
    File::create(dst)
        .and_then(|f| f.set_len(size))
        .map_err(|e| e.to_string())?;
    let out = Command::new("nbdcopy")
        .args(["-C", "4"])
        .arg(format!("nbd://{via}/{name}"))
        .arg(dst)
        .output()
        .map_err(|e| format!("nbdcopy: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nbdcopy failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Round trips of single bytes echoed through a proxy with `config`: (min, median) in ms.
fn ping_pong(config: DelayConfig) -> (f64, f64) {
    let echo = TcpListener::bind(loopback()).unwrap();
    let proxy = DelayProxy::start(loopback(), echo.local_addr().unwrap(), config).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
    c.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    for i in 0..21u8 {
        let t = Instant::now();
        c.write_all(&[i]).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(c);
    server.join().unwrap();
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rtts[0], rtts[rtts.len() / 2])
}

struct Volstream {
    server: EngineHandle,
    client: EngineHandle,
    addr: SocketAddr,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Volstream {
    fn start(config: &EngineConfig, dir: &Path) -> Volstream {
        let (server, server_thread) = Engine::spawn(config.clone()).unwrap();
        let provider = DirProvider::new(dir).unwrap().without_sync();
        let (_, addr) = server
            .listen(&Address::Tcp(loopback()), Arc::new(provider))
            .unwrap();
        let Address::Tcp(addr) = addr else {
            unreachable!("listened on TCP")
        };
        let (client, client_thread) = Engine::spawn(config.clone()).unwrap();
        Volstream {
            server,
            client,
            addr,
            threads: vec![server_thread, client_thread],
        }
    }

    /// Downloads every name at once over one new connection through `via`; returns the
    /// seconds taken and what the connection reported.
    fn copy(&self, via: SocketAddr, names: &[String], out: &Path) -> Result<(f64, Value), String> {
        let conn = self
            .client
            .connect_blocking(&Address::Tcp(via), Duration::from_secs(10))
            .map_err(|e| format!("connect: {e}"))?;
        let start = Instant::now();
        let options = OpenOptions::default().with_zero_granularity(4096);
        let pending: Vec<_> = names
            .iter()
            .map(|n| {
                let writer = Backend::InProcess.create(
                    out.join(n),
                    WriterOptions {
                        no_sync: true,
                        ..WriterOptions::default()
                    },
                );
                self.client.download(conn, n, options, writer)
            })
            .collect();
        let (mut peak_buffered, mut peak_window) = (0, 0);
        for rx in pending {
            let report = rx
                .recv_timeout(Duration::from_secs(1200))
                .map_err(|_| "volstream timed out".to_owned())?;
            report.result.map_err(|e| e.to_string())?;
            peak_buffered = peak_buffered.max(report.stats.peak_buffered);
            peak_window = peak_window.max(report.stats.peak_window);
        }
        let secs = start.elapsed().as_secs_f64();
        let stats = self.client.stats(conn).ok().flatten();
        self.client.go_away(conn);
        Ok((
            secs,
            json!({
                "peak_stream_buffered": peak_buffered,
                "peak_stream_window": peak_window,
                "peak_conn_window": stats.map(|s| s.peak_recv_window),
                "peak_conn_buffered": stats.map(|s| s.peak_recv_buffered),
                "min_rtt_ms": stats.and_then(|s| s.min_rtt).map(|d| d.as_secs_f64() * 1e3),
                "path_bdp": stats.map(|s| s.path_bdp),
            }),
        ))
    }
}

impl Drop for Volstream {
    fn drop(&mut self) {
        self.client.shutdown();
        self.server.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Parser)]
#[command(about = "Throughput through a delay proxy: volstream, raw TCP and nbdcopy, same run")]
struct Cli {
    /// Round trips in milliseconds, one case each.
    #[arg(long, value_delimiter = ',', default_values_t = [0, 1, 10, 50])]
    rtt_ms: Vec<u64>,
    /// File counts (volstream streams, raw connections, nbdcopy processes), one case each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16])]
    streams: Vec<u64>,
    /// Cap per direction of each proxied connection in bytes per second (0: uncapped).
    #[arg(long, default_value_t = 125_000_000)]
    rate: u64,
    /// Bytes per file.
    #[arg(long, default_value_t = 512 * MIB)]
    size: u64,
    /// Runs of each case.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Where the source files are created (once) and copied.
    #[arg(long, default_value = "/var/tmp/volstream-wan")]
    dir: PathBuf,
    /// The engine's initial stream window in bytes.
    #[arg(long)]
    stream_window: Option<u32>,
    /// The engine's initial connection window in bytes.
    #[arg(long)]
    conn_window: Option<u32>,
    /// The most a stream window may grow to (equal to the initial window: no growth).
    #[arg(long)]
    max_stream_window: Option<u32>,
    /// The most the connection window may grow to.
    #[arg(long)]
    max_conn_window: Option<u32>,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let rtts = cli.rtt_ms;
    let stream_counts = cli.streams;
    let rate = (cli.rate > 0).then_some(cli.rate);
    let size = cli.size;
    let runs = cli.runs;
    let dir = cli.dir;
    let mut config = EngineConfig::default();
    let c = &mut config.connection;
    c.stream_window = cli.stream_window.unwrap_or(c.stream_window);
    c.conn_window = cli.conn_window.unwrap_or(c.conn_window);
    c.max_stream_window = cli.max_stream_window.unwrap_or(c.max_stream_window);
    c.max_conn_window = cli.max_conn_window.unwrap_or(c.max_conn_window);

    let src = dir.join("src");
    let out = dir.join("out");
    std::fs::create_dir_all(&src).expect("create --dir");
    std::fs::create_dir_all(&out).unwrap();
    for &n in &stream_counts {
        ensure_sources(&src, n, size);
        for name in names(n) {
            warm(&src.join(name));
        }
    }
    sync();

    let volstream = Volstream::start(&config, &src);
    let raw = raw_server(src.clone());
    let nbdkit = if installed("nbdcopy") && installed("nbdkit") {
        Nbdkit::start(&src)
    } else {
        Err("nbdkit or nbdcopy is not installed".into())
    };
    if let Err(e) = &nbdkit {
        eprintln!("wan: nbdcopy rows skipped: {e}");
    }

    let mut cases = Vec::new();
    for &rtt in &rtts {
        let delay = DelayConfig::new(Duration::from_micros(rtt * 500), rate);
        let (rtt_min, rtt_median) = ping_pong(delay);
        let proxy = |target| DelayProxy::start(loopback(), target, delay).unwrap();
        let vs_proxy = proxy(volstream.addr);
        let raw_proxy = proxy(raw);
        let nbd_proxy = nbdkit.as_ref().ok().map(|n| proxy(n.addr));
        for &streams in &stream_counts {
            let names = names(streams);
            let each = size / streams;
            eprintln!("wan: rtt {rtt} ms, {streams} streams");
            let mut tools = Vec::new();
            let mut measure =
                |tool: &str, run: &mut dyn FnMut() -> Result<(f64, Value), String>| {
                    let mut seconds = Vec::new();
                    let mut extra = Value::Null;
                    let mut error = None;
                    for _ in 0..runs {
                        for n in &names {
                            let _ = std::fs::remove_file(out.join(n));
                        }
                        // Untimed: the previous copy's dirty pages would otherwise throttle
                        // this one's writes while the kernel writes them back.
                        sync();
                        match run() {
                            Ok((s, e)) => {
                                seconds.push(s);
                                extra = e;
                            }
                            Err(e) => {
                                eprintln!("wan: {tool} at {rtt} ms x {streams}: {e}");
                                error = Some(e);
                                break;
                            }
                        }
                    }
                    let content_ok =
                        error.is_none() && names.iter().all(|n| same(&src.join(n), &out.join(n)));
                    let row = if seconds.is_empty() {
                        json!({"tool": tool, "error": error})
                    } else {
                        let m = median(&seconds);
                        json!({
                            "tool": tool,
                            "seconds": seconds,
                            "median_seconds": m,
                            "MBps": (size as f64 / m / 1e6 * 10.0).round() / 10.0,
                            "content_ok": content_ok,
                            "error": error,
                            "engine": extra,
                        })
                    };
                    tools.push(row);
                };
            measure("raw-tcp", &mut || {
                let a = raw_proxy.local_addr();
                parallel(&names, &out, &|n, d| raw_copy(a, n, d)).map(|s| (s, Value::Null))
            });
            measure("volstream", &mut || {
                volstream.copy(vs_proxy.local_addr(), &names, &out)
            });
            match &nbd_proxy {
                Some(p) => measure("nbdcopy -C 4", &mut || {
                    let a = p.local_addr();
                    parallel(&names, &out, &|n, d| nbdcopy(a, n, d, each)).map(|s| (s, Value::Null))
                }),
                None => {
                    tools.push(json!({"tool": "nbdcopy -C 4", "skipped": nbdkit.as_ref().err()}))
                }
            }
            let mbps = |t: &str| {
                tools
                    .iter()
                    .find(|r| r["tool"] == t)
                    .and_then(|r| r["MBps"].as_f64())
            };
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some((a / b * 100.0).round() / 100.0),
                _ => None,
            };
            let (v, r, n) = (mbps("volstream"), mbps("raw-tcp"), mbps("nbdcopy -C 4"));
            cases.push(json!({
                "rtt_ms": rtt,
                "streams": streams,
                "bytes_per_stream": each,
                "measured_rtt_ms": {"min": rtt_min, "median": rtt_median},
                "bdp_bytes": rate.map(|r| (r as f64 * rtt as f64 / 1e3) as u64),
                "tools": tools,
                "volstream_vs_raw": ratio(v, r),
                "volstream_vs_nbdcopy": ratio(v, n),
                "raw_vs_rate_cap": ratio(r, rate.map(|x| x as f64 / 1e6)),
            }));
        }
    }
    for n in stream_counts.iter().flat_map(|&n| names(n)) {
        let _ = std::fs::remove_file(out.join(n));
    }
    let report = json!({
        "bench": "wan",
        "transport": "tcp through bench::delay (one proxy per tool, same settings)",
        "rate_cap_Bps": rate,
        "proxy_queue_bytes": bench::delay::DEFAULT_QUEUE,
        "bytes_per_case": size,
        "runs_per_case": runs,
        "cache": "warm",
        "fsync": false,
        "stream_window": config.connection.stream_window,
        "conn_window": config.connection.conn_window,
        "max_stream_window": config.connection.max_stream_window,
        "max_conn_window": config.connection.max_conn_window,
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cases": cases,
    });
    println!("{report}");
}
