//! Plain TCP against TLS 1.3 on loopback, in the same run: one connection with 1 and 100
//! streams (throughput, CPU seconds per GiB at each end), and the 4 KiB probe's p99 under 99
//! bulk streams. Prints JSON with the ratios, the negotiated suite and the CPU's AES features.
//!
//! `tls [--total BYTES per run] [--repeat N] [--messages N] [--interval-us N]`

use bench::loops::{throughput, Throughput};
use bench::probe::probe;
use bench::random_bytes;
use clap::Parser;
use engine::{Address, AllowList, Credentials, EngineConfig, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::time::Duration;

/// A CA, and a certificate for localhost it signed that serves both ends.
fn tls_config() -> TlsConfig {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let credentials =
        Credentials::from_pem(&ca.pem(), Some((&cert.pem(), &key.serialize_pem()))).unwrap();
    TlsConfig::new(&credentials, AllowList::default()).unwrap()
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Tcp,
    Tls,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    fn config(self, tls: &TlsConfig) -> EngineConfig {
        EngineConfig {
            tls: (self == Transport::Tls).then(|| tls.clone()),
            ..EngineConfig::default()
        }
    }

    fn listen(self) -> Address {
        match self {
            Transport::Tcp => "tcp:0".parse().unwrap(),
            Transport::Tls => "tls:0".parse().unwrap(),
        }
    }
}

/// The CPU's AES-related flags, from /proc/cpuinfo.
fn cpu_flags() -> Vec<&'static str> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    [
        "aes",
        "pclmulqdq",
        "avx",
        "avx2",
        "vaes",
        "vpclmulqdq",
        "avx512f",
    ]
    .into_iter()
    .filter(|f| flags.contains(f))
    .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Parser)]
#[command(about = "TLS 1.3 against plain TCP on loopback: throughput, CPU, probe latency")]
struct Cli {
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 4 << 30)]
    total: u64,
    /// Runs of each case.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Probe messages per latency run.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Microseconds between probe messages.
    #[arg(long, default_value_t = 1000)]
    interval_us: u64,
    /// Bulk streams running under the probe.
    #[arg(long, default_value_t = 99)]
    bulk: u64,
}

fn main() {
    engine::memory::keep_freed_buffers();
    let cli = Cli::parse();
    let bulk = cli.bulk;
    let total = cli.total;
    let repeat = cli.repeat;
    let messages = cli.messages;
    let interval = Duration::from_micros(cli.interval_us);
    let tls = tls_config();
    let block = random_bytes(1 << 20, 42);
    let mut runs = Vec::new();
    let mut suite = None;
    let mut by_case: Vec<(Transport, u64, Vec<Throughput>)> = Vec::new();
    for streams in [1u64, 100] {
        for t in [Transport::Tcp, Transport::Tls] {
            by_case.push((t, streams, Vec::new()));
        }
    }
    // Interleaved, so drift in the VM's speed hits both transports alike.
    for _ in 0..repeat {
        for (t, streams, results) in by_case.iter_mut() {
            let size = (total / *streams) & !4095;
            let r = throughput(
                *streams,
                size,
                block.clone(),
                t.config(&tls),
                t.config(&tls),
                &t.listen(),
            );
            if r.tls.is_some() {
                suite = r.tls.clone();
            }
            let mut run = r.json();
            run["transport"] = t.name().into();
            runs.push(run);
            results.push(r);
        }
    }
    let mut probes = Vec::new();
    let mut p99 = [Vec::new(), Vec::new()];
    for _ in 0..repeat {
        for (i, t) in [Transport::Tcp, Transport::Tls].into_iter().enumerate() {
            let r = probe(
                bulk,
                messages,
                interval,
                t.config(&tls),
                t.config(&tls),
                &t.listen(),
            );
            let mut run = r.json;
            run["transport"] = t.name().into();
            probes.push(run);
            p99[i].push(r.p99_us as f64);
        }
    }
    let gbps = |t: Transport, s: u64| {
        let (_, _, r) = by_case.iter().find(|c| c.0 == t && c.1 == s).unwrap();
        median(r.iter().map(|x| x.gbps).collect())
    };
    let ratio = |s| gbps(Transport::Tls, s) / gbps(Transport::Tcp, s);
    let (p99_tcp, p99_tls) = (median(p99[0].clone()), median(p99[1].clone()));
    let flags = cpu_flags();
    // ring 0.17 picks its AES-GCM by cpuid: VAES+VPCLMULQDQ with AVX2 when all are there,
    // else AES-NI+PCLMULQDQ (aead/aes_gcm.rs); perf confirms it (bench/RESULTS.md).
    let gcm = if ["aes", "avx", "avx2", "vaes", "vpclmulqdq"]
        .iter()
        .all(|f| flags.contains(f))
    {
        "aes-ni + vaes/vpclmulqdq (avx2)"
    } else if flags.contains(&"aes") && flags.contains(&"pclmulqdq") {
        "aes-ni + pclmulqdq"
    } else {
        "software"
    };
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let doc = serde_json::json!({
        "bench": "tls",
        "provider": "ring",
        "negotiated": suite.unwrap_or_default(),
        "cpu_flags": flags,
        "aes_gcm": gcm,
        "throughput_ratio_tls_to_tcp": {
            "streams_1": round3(ratio(1)),
            "streams_100": round3(ratio(100)),
        },
        "probe_p99_us": {
            "tcp": p99_tcp,
            "tls": p99_tls,
            "ratio": round3(p99_tls / p99_tcp.max(1.0)),
        },
        "runs": runs,
        "probes": probes,
    });
    println!("{doc}");
}
