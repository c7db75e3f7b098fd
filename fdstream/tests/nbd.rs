//! NBD exports as sources and sinks, against servers nobody here wrote: nbdkit (memory,
//! sparse-random, the error and delay filters, the log filter to see every request) and
//! qemu-nbd (raw files, and a qcow2 with a backing file for --top-only). Skips with a reason
//! where a tool is missing.

mod common;

use common::*;
use fdstream::copy::copy;
use fdstream::nbd::{NbdReader, NbdWriter, SourceOptions};
use fdstream::{FileReader, FileWriter, ReaderOptions, WriterOptions};
use nbd::Uri;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

/// A server process, killed and reaped when dropped.
struct Peer {
    child: Child,
    sock: PathBuf,
}

impl Peer {
    fn start(mut cmd: Command, sock: PathBuf) -> Peer {
        let child = cmd.stdout(Stdio::null()).spawn().unwrap();
        let t = Instant::now();
        // The socket file appears at bind, before listen: wait for a connection.
        while UnixStream::connect(&sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Peer { child, sock }
    }

    fn nbdkit(sock: &Path, args: &[&str]) -> Peer {
        let mut c = Command::new("nbdkit");
        c.args(["-f", "-U"]).arg(sock).args(args);
        Peer::start(c, sock.to_path_buf())
    }

    fn qemu_nbd(sock: &Path, args: &[&str], image: &Path) -> Peer {
        // -t: a persistent server (the probe for the listening socket is a client too).
        let mut c = Command::new("qemu-nbd");
        c.arg("-t").arg("-k").arg(sock).args(args).arg(image);
        Peer::start(c, sock.to_path_buf())
    }

    fn uri(&self) -> Uri {
        format!("nbd+unix:///?socket={}", self.sock.display())
            .parse()
            .unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbd_reader(uri: Uri, top_only: bool) -> NbdReader {
    NbdReader::new(
        uri,
        SourceOptions {
            zero_granularity: 4096,
            top_only,
            ..SourceOptions::default()
        },
        ReaderOptions::default(),
    )
}

fn no_sync() -> WriterOptions {
    WriterOptions {
        no_sync: true,
        ..WriterOptions::default()
    }
}

#[test]
fn a_file_through_nbdkit_memory_and_back() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 40 * MIB + 12345;
    sparse_file(
        &src,
        size,
        &[(0, 100_000), (8 * MIB, 3 * MIB), (size - 5000, 5000)],
    );
    // The log filter records every request the server got.
    let log = dir.path().join("requests.log");
    let kit = Peer::nbdkit(
        &dir.path().join("s"),
        &[
            "--filter=log",
            "memory",
            "64M",
            &format!("logfile={}", log.display()),
        ],
    );
    // Dirty the export first, so holes must really be zeroed.
    let st = Command::new("nbdcopy")
        .args(["--", "[", "nbdkit", "pattern", "64M", "]"])
        .arg(kit.uri().to_string())
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("skipping: nbdcopy could not fill the export");
        return;
    }
    let stats = copy(
        Box::new(FileReader::open(&src, ReaderOptions::default())),
        Box::new(NbdWriter::new(kit.uri(), WriterOptions::default())),
    )
    .unwrap();
    assert_eq!(stats.size, size);
    assert!(stats.hole_bytes > 30 * MIB, "{stats:?}");
    let back = dir.path().join("back.raw");
    let stats = copy(
        Box::new(nbd_reader(kit.uri(), false)),
        Box::new(FileWriter::create(&back, no_sync())),
    )
    .unwrap();
    // The export is larger than the volume: what was past it came along too (it reads as
    // the pattern written first), so compare the volume's part.
    assert_eq!(stats.size, 64 * MIB);
    let a = read_all(&src);
    let b = read_all(&back);
    assert!(a[..] == b[..size as usize], "content differs");
    let log = std::fs::read_to_string(&log).unwrap();
    let zeroes = log.lines().filter(|l| l.contains(" Zero id=")).count();
    assert!(zeroes > 0, "holes were not zeroed with WRITE_ZEROES");
    // TRIM is never a way to zero.
    assert!(!log.lines().any(|l| l.contains("Trim ")), "TRIM was sent");
    // The first zeroing asked whether it is fast.
    let first = log.lines().find(|l| l.contains(" Zero id=")).unwrap();
    assert!(first.contains("fast=1"), "{first}");
    assert!(
        log.lines().any(|l| l.contains("Flush ")),
        "no FLUSH at the end"
    );
}

#[test]
fn allocated_destinations_zero_with_no_hole() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, 8 * MIB, &[(MIB, MIB)]);
    let log = dir.path().join("requests.log");
    let kit = Peer::nbdkit(
        &dir.path().join("s"),
        &[
            "--filter=log",
            "memory",
            "8M",
            &format!("logfile={}", log.display()),
        ],
    );
    copy(
        Box::new(FileReader::open(&src, ReaderOptions::default())),
        Box::new(NbdWriter::new(
            kit.uri(),
            WriterOptions {
                allocated: true,
                ..no_sync()
            },
        )),
    )
    .unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    let zeroes: Vec<&str> = log.lines().filter(|l| l.contains(" Zero id=")).collect();
    assert!(!zeroes.is_empty());
    // NO_HOLE: the server may not trim; FAST_ZERO is not asked (allocation is never fast).
    assert!(
        zeroes
            .iter()
            .all(|l| l.contains("trim=0") && l.contains("fast=0")),
        "{zeroes:?}"
    );
    // Without sync, no FLUSH.
    assert!(!log.lines().any(|l| l.contains("Flush ")));
}

#[test]
fn sparse_random_reads_as_nbdcopy_reads_it() {
    if !have("nbdkit") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kit = Peer::nbdkit(
        &dir.path().join("s"),
        &[
            "sparse-random",
            "256M",
            "seed=42",
            "percent=10",
            "runlength=1048576",
        ],
    );
    let ours = dir.path().join("ours.raw");
    let stats = copy(
        Box::new(nbd_reader(kit.uri(), false)),
        Box::new(FileWriter::create(&ours, no_sync())),
    )
    .unwrap();
    let theirs = dir.path().join("theirs.raw");
    let st = Command::new("nbdcopy")
        .arg(kit.uri().to_string())
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(st.success());
    assert_same(&ours, &theirs);
    // Sparse: what nbdkit calls holes is not read and not allocated.
    assert!(stats.hole_bytes > 150 * MIB, "{stats:?}");
    let (data, _) = data_bytes(&ours);
    assert!(data < 120 * MIB, "{data} bytes allocated");
}

#[test]
fn eio_from_the_server_fails_the_stream_with_its_reason() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Every read fails while the trigger file exists.
    let kit = Peer::nbdkit(
        &dir.path().join("s"),
        &[
            "--filter=error",
            "pattern",
            "8M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", dir.path().join("trigger").display()),
        ],
    );
    std::fs::write(dir.path().join("trigger"), b"").unwrap();
    let out = dir.path().join("out.raw");
    let err = copy(
        Box::new(nbd_reader(kit.uri(), false)),
        Box::new(FileWriter::create(&out, no_sync())),
    )
    .unwrap_err();
    assert_eq!(err.reason, engine::proto::Reason::Io, "{err}");
    assert!(err.message.contains("input/output error"), "{err}");
    assert!(err.message.contains("reading 0.."), "{err}");
    // Nothing half-written under the final name.
    assert!(!out.exists());
}

#[test]
fn a_server_that_dies_mid_transfer_fails_the_stream() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Slow reads, so the copy is surely still going when the server dies.
    let mut kit = Peer::nbdkit(
        &dir.path().join("s"),
        &["--filter=delay", "pattern", "64M", "rdelay=50ms"],
    );
    let uri = kit.uri();
    let out = dir.path().join("out.raw");
    let o = out.clone();
    let t = std::thread::spawn(move || {
        copy(
            Box::new(nbd_reader(uri, false)),
            Box::new(FileWriter::create(&o, no_sync())),
        )
    });
    std::thread::sleep(Duration::from_millis(400));
    kit.child.kill().unwrap();
    kit.child.wait().unwrap();
    let err = t.join().unwrap().unwrap_err();
    assert!(
        err.message.contains("closed the connection") || err.message.contains("reset"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn qemu_nbd_raw_export_both_ways() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    filled(&disk, 16 * MIB);
    let src = dir.path().join("src.raw");
    sparse_file(&src, 16 * MIB, &[(4096, 8192), (10 * MIB, 2 * MIB)]);
    let q = Peer::qemu_nbd(&dir.path().join("s"), &["-f", "raw"], &disk);
    copy(
        Box::new(FileReader::open(&src, ReaderOptions::default())),
        Box::new(NbdWriter::new(q.uri(), WriterOptions::default())),
    )
    .unwrap();
    assert_same(&src, &disk);
    // qemu-nbd punched the zeroed ranges (WRITE_ZEROES without NO_HOLE may).
    let back = dir.path().join("back.raw");
    let stats = copy(
        Box::new(nbd_reader(q.uri(), false)),
        Box::new(FileWriter::create(&back, no_sync())),
    )
    .unwrap();
    assert_same(&src, &back);
    assert_eq!(stats.data_bytes, 8192 + 2 * MIB, "{stats:?}");
}

#[test]
fn a_read_only_export_refuses_to_be_a_sink() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    filled(&disk, MIB);
    let q = Peer::qemu_nbd(&dir.path().join("s"), &["-f", "raw", "-r"], &disk);
    let src = dir.path().join("src.raw");
    sparse_file(&src, MIB, &[(0, 4096)]);
    let err = copy(
        Box::new(FileReader::open(&src, ReaderOptions::default())),
        Box::new(NbdWriter::new(q.uri(), WriterOptions::default())),
    )
    .unwrap_err();
    assert!(err.message.contains("read-only"), "{err}");
    // And one too small for the volume.
    let big = dir.path().join("big.raw");
    sparse_file(&big, 2 * MIB, &[(0, 4096)]);
    let q2 = Peer::qemu_nbd(&dir.path().join("s2"), &["-f", "raw"], &disk);
    let err = copy(
        Box::new(FileReader::open(&big, ReaderOptions::default())),
        Box::new(NbdWriter::new(q2.uri(), WriterOptions::default())),
    )
    .unwrap_err();
    assert_eq!(err.reason, engine::Reason::DeviceTooSmall, "{err}");
    assert!(err.message.contains("volume is 2097152"), "{err}");
}

fn qemu(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{args:?}");
}

#[test]
fn top_only_reads_just_the_overlays_clusters() {
    if !have("qemu-nbd") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", b, "8M"]);
    qemu(&["qemu-io", "-c", "write -P 0x11 0 1M", b]);
    qemu(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t,
    ]);
    qemu(&[
        "qemu-io",
        "-c",
        "write -P 0x22 512k 64k",
        "-c",
        "write -P 0x33 4M 128k",
        t,
    ]);
    let q = Peer::qemu_nbd(&dir.path().join("s"), &["-r", "-A", "-f", "qcow2"], &top);
    let out = dir.path().join("top.raw");
    let stats = copy(
        Box::new(nbd_reader(q.uri(), true)),
        Box::new(FileWriter::create(&out, no_sync())),
    )
    .unwrap();
    assert_eq!(stats.data_bytes, 64 * 1024 + 128 * 1024, "{stats:?}");
    let v = read_all(&out);
    assert!(
        v[..512 * 1024].iter().all(|&x| x == 0),
        "backing data leaked in"
    );
    assert!(v[512 * 1024..576 * 1024].iter().all(|&x| x == 0x22));
    assert!(v[4 * MIB as usize..4 * MIB as usize + 128 * 1024]
        .iter()
        .all(|&x| x == 0x33));
    // Without --top-only, the whole guest view.
    let all = dir.path().join("all.raw");
    copy(
        Box::new(nbd_reader(q.uri(), false)),
        Box::new(FileWriter::create(&all, no_sync())),
    )
    .unwrap();
    let v = read_all(&all);
    assert!(v[..512 * 1024].iter().all(|&x| x == 0x11));
    // And a server without allocation depth cannot give the top only.
    let q2 = Peer::qemu_nbd(&dir.path().join("s2"), &["-r", "-f", "qcow2"], &top);
    let err = copy(
        Box::new(nbd_reader(q2.uri(), true)),
        Box::new(FileWriter::create(dir.path().join("x.raw"), no_sync())),
    )
    .unwrap_err();
    assert!(err.message.contains("allocation-depth"), "{err}");
}
