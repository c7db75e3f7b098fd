//! The `volstream` binary with NBD exports on either side of a transfer: nbdkit (memory,
//! sparse-random, the error filter) and qemu-nbd as sources and sinks, locally and through
//! `serve --nbd-volume`; an nbdkit killed mid-transfer fails only its own stream.

mod common;

use common::*;
use std::process::Command;

fn nbdcopy(from: &str, to: &str) -> bool {
    Command::new("nbdcopy")
        .args([from, to])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn download_an_export_to_a_sparse_file_without_a_server() {
    if !have("nbdkit") || !have("nbdcopy") {
        return;
    }
    let dir = TempDir::new("nbd-download");
    let kit = NbdPeer::nbdkit(
        &dir.join("s"),
        &[
            "sparse-random",
            "512M",
            "seed=7",
            "percent=5",
            "runlength=2097152",
        ],
    );
    let ours = dir.join("ours.raw");
    let out = run(bin().args(["download", "--json"]).arg(kit.uri()).arg(&ours));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"ok\":true"), "{json}");
    let theirs = dir.join("theirs.raw");
    assert!(nbdcopy(&kit.uri(), theirs.to_str().unwrap()));
    assert_eq!(read_all(&ours), read_all(&theirs));
    // Sparse: the holes nbdkit reports are not allocated.
    assert!(
        allocated(&ours) < 100 * MIB,
        "{} allocated",
        allocated(&ours)
    );
}

#[test]
fn upload_a_file_into_an_export_and_read_it_back() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-upload");
    let src = dir.join("src.raw");
    sparse_file(&src, 24 * MIB + 512, &[(0, 5000), (9 * MIB, 3 * MIB)], 3);
    let kit = NbdPeer::nbdkit(&dir.join("s"), &["memory", "32M"]);
    let out = run(bin().arg("upload").arg(&src).arg(kit.uri()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let back = dir.join("back.raw");
    let out = run(bin().arg("download").arg(kit.uri()).arg(&back));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let (a, b) = (read_all(&src), read_all(&back));
    assert_eq!(b.len() as u64, 32 * MIB);
    assert!(a[..] == b[..a.len()], "content differs");
    assert!(b[a.len()..].iter().all(|&x| x == 0));
}

#[test]
fn eio_from_an_export_is_one_line_and_exit_1() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-eio");
    let kit = NbdPeer::nbdkit(
        &dir.join("s"),
        &[
            "--filter=error",
            "pattern",
            "8M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let out_file = dir.join("out.raw");
    let out = run(bin().arg("download").arg(kit.uri()).arg(&out_file));
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    let line = lines
        .iter()
        .find(|l| l.contains("input/output error"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(line.contains(&kit.uri()), "{line}");
    assert!(!out_file.exists());
}

#[test]
fn bad_uris_are_usage_errors() {
    let out = run(bin().args(["download", "nbd+unix:///x", "out.raw"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_lines(&out).iter().any(|l| l.contains("socket=")),
        "{:?}",
        stderr_lines(&out)
    );
    let out = run(bin().args([
        "serve",
        "--pool",
        "/tmp",
        "--listen",
        "unix:/tmp/x",
        "--nbd-volume",
        "a=/dev/null",
    ]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_nbd_volumes_and_a_dying_export_fails_only_its_stream() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-serve");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(
        &pool.join("file.raw"),
        48 * MIB,
        &[(0, 4 * MIB), (40 * MIB, MIB)],
        5,
    );
    let fast = NbdPeer::nbdkit(&dir.join("fast"), &["pattern", "40M"]);
    // Slow reads, so that its download is surely still going when it is killed.
    let mut slow = NbdPeer::nbdkit(
        &dir.join("slow"),
        &["--filter=delay", "pattern", "256M", "rdelay=40ms"],
    );
    let sink = NbdPeer::nbdkit(&dir.join("sink"), &["memory", "64M"]);
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let _server = Server::start_with(
        &pool,
        &listen,
        &[
            "--nbd-volume",
            &format!("fast={}", fast.uri()),
            "--nbd-volume",
            &format!("slow={}", slow.uri()),
            "--nbd-volume",
            &format!("sink={}", sink.uri()),
        ],
    );
    let out = run(bin().args(["list", "--connect", &listen, "--json"]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"name\":\"fast\",\"size\":41943040"),
        "{text}"
    );

    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    let mut download = bin();
    download
        .args(["download", "--connect", &listen])
        .arg("file.raw")
        .arg(local.join("file.raw"))
        .arg("fast")
        .arg(local.join("fast.raw"))
        .arg("slow")
        .arg(local.join("slow.raw"));
    let child = download
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    slow.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let lines = stderr_lines(&out);
    let failed: Vec<_> = lines.iter().filter(|l| l.contains("download ")).collect();
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert!(failed[0].contains("download slow"), "{lines:?}");
    assert_eq!(
        read_all(&local.join("file.raw")),
        read_all(&pool.join("file.raw"))
    );
    let theirs = dir.join("fast-nbdcopy.raw");
    if nbdcopy(&fast.uri(), theirs.to_str().unwrap()) {
        assert_eq!(read_all(&local.join("fast.raw")), read_all(&theirs));
    }
    assert!(!local.join("slow.raw").exists());

    // An upload into an export through the server, and back with nbdcopy.
    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(pool.join("file.raw"))
        .arg("sink"));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let back = dir.join("back.raw");
    let out = run(bin().arg("download").arg(sink.uri()).arg(&back));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let (a, b) = (read_all(&pool.join("file.raw")), read_all(&back));
    assert!(a[..] == b[..a.len()]);
    // And a download of a server volume into an export.
    let out = run(bin()
        .args(["download", "--connect", &listen, "fast"])
        .arg(sink.uri()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let out = run(bin()
        .arg("download")
        .arg(sink.uri())
        .arg(dir.join("sink2.raw")));
    assert!(out.status.success());
    let (f, s) = (
        read_all(&local.join("fast.raw")),
        read_all(&dir.join("sink2.raw")),
    );
    assert!(f[..] == s[..f.len()]);
}

#[test]
fn qemu_nbd_raw_export_as_source_and_sink() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("nbd-qemu-raw");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0x77u8; 16 * MIB as usize]).unwrap();
    let src = dir.join("src.raw");
    sparse_file(&src, 16 * MIB, &[(MIB, MIB), (15 * MIB, 4096)], 9);
    // --discard=unmap: WRITE_ZEROES (without NO_HOLE) may punch the file.
    let q = NbdPeer::qemu_nbd(&dir.join("s"), &["-f", "raw", "--discard=unmap"], &disk);
    let out = run(bin().arg("upload").arg(&src).arg(q.uri()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&disk), read_all(&src));
    assert!(
        allocated(&disk) <= 2 * MIB,
        "{} allocated",
        allocated(&disk)
    );
    let back = dir.join("back.raw");
    let out = run(bin().arg("download").arg(q.uri()).arg(&back));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&back), read_all(&src));
    assert!(allocated(&back) <= MIB + 4096 + 8 * 4096);
    // extents of the export: what qemu-nbd says.
    let out = run(bin().arg("extents").arg("--json").arg(q.uri()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("\"offset\":{},\"length\":{}", MIB, MIB)),
        "{text}"
    );
}

/// `--verify` into an export reads it back over NBD. An nbdkit that acknowledges writes and
/// keeps none (eval: reads come from a 0xAA file, writes are swallowed) passes the digest, so
/// the copy succeeds without --verify; with it, the read-back finds the first byte.
#[test]
fn verify_into_an_export_reads_it_back_and_finds_a_server_that_drops_writes() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-verify");
    let src = dir.join("src.raw");
    sparse_file(&src, 4 * MIB, &[(MIB + 100, 5000), (3 * MIB, MIB)], 9);

    let honest = NbdPeer::nbdkit(&dir.join("m"), &["memory", "4M"]);
    let out = run(bin()
        .args(["upload", "--verify"])
        .arg(&src)
        .arg(honest.uri()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let back = dir.join("back.raw");
    let out = run(bin().arg("download").arg(honest.uri()).arg(&back));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert!(read_all(&src) == read_all(&back), "content differs");

    let stale = dir.join("stale.img");
    std::fs::write(&stale, vec![0xAAu8; 4 * MIB as usize]).unwrap();
    let pread = format!(
        "dd if={} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        stale.display()
    );
    let liar = NbdPeer::nbdkit(
        &dir.join("l"),
        &[
            "eval",
            "get_size=echo 4194304",
            &format!("pread={pread}"),
            "pwrite=cat >/dev/null",
            "can_write=exit 0",
        ],
    );
    let out = run(bin().arg("upload").arg(&src).arg(liar.uri()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let out = run(bin().args(["upload", "--verify"]).arg(&src).arg(liar.uri()));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let lines = stderr_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("read back differs") && l.contains("at byte 0")),
        "{lines:?}"
    );
}
