//! qcow2 volumes in a served pool, read as their guest view through qemu-nbd: a two-level
//! backing chain (data written with qemu-io at known places, a zeroed cluster, a discarded one)
//! downloads as `qemu-img convert -O raw` writes it, sparse; `extents` agrees with
//! `qemu-img map --output=json` on every range, depth included; a backing file outside the
//! pool is refused; no qemu-nbd outlives its stream; a chain with a raw bottom layer and
//! compressed clusters (read through qemu-nbd, the rest by qemu-img's map) reads as qemu reads it.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

fn qemu(pool: &Path, args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .current_dir(pool)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{args:?}");
}

/// (start, length, depth, present, zero, data), adjacent equal ranges joined.
type Range = (u64, u64, u64, bool, bool, bool);

fn joined(ranges: impl IntoIterator<Item = Range>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(l) if (l.2, l.3, l.4, l.5) == (r.2, r.3, r.4, r.5) && l.0 + l.1 == r.0 => {
                l.1 += r.1
            }
            _ => out.push(r),
        }
    }
    out
}

fn range_of(v: &serde_json::Value, start: &str, len: &str) -> Range {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    let b = |k: &str| v[k].as_bool().unwrap_or_else(|| panic!("{k} in {v}"));
    (
        n(start),
        n(len),
        n("depth"),
        b("present"),
        b("zero"),
        b("data"),
    )
}

/// A chain base <- mid <- top in `pool`, 64 MiB, with backing names relative to the pool.
fn chain(pool: &Path) {
    qemu(
        pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "base.qcow2",
            "64M",
        ],
    );
    qemu(
        pool,
        &[
            "qemu-io",
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -P 0x12 6M 1M",
            "-c",
            "write -P 0x13 32M 64k",
            "base.qcow2",
        ],
    );
    for (new, backing) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu(
            pool,
            &[
                "qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", new,
            ],
        );
    }
    qemu(
        pool,
        &[
            "qemu-io",
            "-c",
            "write -P 0x21 1M 512k",
            // A zeroed cluster over the base's data.
            "-c",
            "write -z 6M 64k",
            "mid.qcow2",
        ],
    );
    qemu(
        pool,
        &[
            "qemu-io",
            "-c",
            "write -P 0x31 1536k 64k",
            "-c",
            "write -P 0x32 60M 128k",
            // A discarded cluster: the top layer's own, then discarded.
            "-c",
            "write -P 0x33 40M 64k",
            "-c",
            "discard 40M 64k",
            // And one discarded over backing data.
            "-c",
            "discard 0 64k",
            "top.qcow2",
        ],
    );
}

#[test]
fn a_backing_chain_downloads_as_its_guest_view_and_maps_as_qemu_img_does() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-chain");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    chain(&pool);
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let server = Server::start(&pool, &listen);

    // list: the guest's size.
    let out = run(bin().args(["list", "--json", "--connect", &listen]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("\"name\":\"top.qcow2\",\"size\":{}", 64 * MIB)),
        "{text}"
    );

    let ours = dir.join("ours.raw");
    let out = run(bin()
        .args(["download", "--connect", &listen, "top.qcow2"])
        .arg(&ours));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let theirs = dir.join("theirs.raw");
    qemu(
        &pool,
        &[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "top.qcow2",
            theirs.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::metadata(&ours).unwrap().len(), 64 * MIB);
    assert!(read_all(&ours) == read_all(&theirs), "content differs");
    // Sparse: about 3.3 MiB of the 64 are data.
    assert!(
        allocated(&ours) <= 4 * MIB,
        "{} bytes allocated",
        allocated(&ours)
    );
    // As sparse as qemu-img's copy (both zero-detect at 4 KiB; a little slack for where
    // each file system rounds).
    assert!(
        allocated(&ours) <= allocated(&theirs) + 256 * 1024,
        "ours {} bytes allocated, qemu-img's {}",
        allocated(&ours),
        allocated(&theirs)
    );

    // extents: range for range what qemu-img map says.
    let out = run(bin().args(["extents", "--json", "--connect", &listen, "top.qcow2"]));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let ours: Vec<Range> = joined(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| range_of(&serde_json::from_str(l).unwrap(), "offset", "length")),
    );
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "top.qcow2"])
        .current_dir(&pool)
        .output()
        .unwrap();
    assert!(map.status.success());
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let theirs: Vec<Range> = joined(
        map.as_array()
            .unwrap()
            .iter()
            .map(|v| range_of(v, "start", "length")),
    );
    assert_eq!(ours, theirs);
    // The map shows every kind of range.
    for depth in 0..3 {
        assert!(ours.iter().any(|r| r.2 == depth && r.3), "depth {depth}");
    }
    assert!(ours.iter().any(|r| r.3 && r.4), "a zeroed range");
    assert!(ours.iter().any(|r| !r.3), "an unallocated range");

    // Every qemu-nbd the server started is gone with its stream.
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        server.child.id(),
        server.child.id()
    ))
    .unwrap_or_default();
    for pid in children.split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(
            comm.trim(),
            "qemu-nbd",
            "qemu-nbd {pid} outlived its stream"
        );
    }
}

#[test]
fn a_backing_file_outside_the_pool_is_refused() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-outside");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    filled(&dir.join("secret.raw"), MIB, 0x5e);
    qemu(
        &pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../secret.raw",
            "-F",
            "raw",
            "evil.qcow2",
        ],
    );
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let _server = Server::start(&pool, &listen);
    let out_file = dir.join("out.raw");
    let out = run(bin()
        .args(["download", "--connect", &listen, "evil.qcow2"])
        .arg(&out_file));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "outside the pool");
    assert!(line.contains("evil.qcow2"), "{line}");
    // The server's paths stay on the server.
    assert!(
        !line.contains(pool.to_str().unwrap()),
        "a server path: {line}"
    );
    assert!(!out_file.exists());
    let out = run(bin().args(["extents", "--connect", &listen, "evil.qcow2"]));
    assert_ne!(out.status.code(), Some(0));
    line_with(&out, "outside the pool");
}

#[test]
fn a_qcow2_volume_is_refused_through_an_iohelper_not_sent_as_container_bytes() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-helper");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    qemu(
        &pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "disk.qcow2",
            "64M",
        ],
    );
    filled(&pool.join("plain.raw"), MIB, 0x3c);
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let _server = Server::start_with(&pool, &listen, &["--iohelper"]);
    let out_file = dir.join("out.raw");
    let out = run(bin()
        .args(["download", "--connect", &listen, "disk.qcow2"])
        .arg(&out_file));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "qcow2 image");
    assert!(line.contains("disk.qcow2"), "{line}");
    assert!(!out_file.exists());
    // A raw volume of the same pool still goes through the helper.
    let raw_out = dir.join("plain.out");
    let out = run(bin()
        .args(["download", "--connect", &listen, "plain.raw"])
        .arg(&raw_out));
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    assert_eq!(
        std::fs::read(&raw_out).unwrap(),
        std::fs::read(pool.join("plain.raw")).unwrap()
    );
}

#[test]
fn top_only_through_serve_gives_just_the_overlays_own_clusters() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-top-only");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    chain(&pool);
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let _server = Server::start(&pool, &listen);

    let ours = dir.join("top-only.raw");
    let out = run(bin()
        .args(["download", "--top-only", "--connect", &listen, "top.qcow2"])
        .arg(&ours));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let whole = dir.join("whole.raw");
    qemu(
        &pool,
        &[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "top.qcow2",
            whole.to_str().unwrap(),
        ],
    );
    let (ours_b, whole_b) = (read_all(&ours), read_all(&whole));
    assert_eq!(ours_b.len() as u64, 64 * MIB);
    // Where qemu-img map says the top layer holds data, the guest's bytes; everywhere else
    // (backing layers, the top's zeroed and discarded clusters, unallocated) zeroes.
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "top.qcow2"])
        .current_dir(&pool)
        .output()
        .unwrap();
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let mut own = 0;
    for r in map.as_array().unwrap() {
        let (start, len, depth, data) = range_of(r, "start", "length").into_parts();
        let range = start as usize..(start + len) as usize;
        if depth == 0 && data {
            own += len;
            assert!(
                ours_b[range.clone()] == whole_b[range],
                "top data at {start}"
            );
        } else {
            assert!(
                ours_b[range].iter().all(|&b| b == 0),
                "{len} bytes at {start} (depth {depth}) are not zero"
            );
        }
    }
    assert_eq!(own, 192 * 1024, "the top layer's own data");
    // Backing data is there in the whole view, so the test can tell the two apart.
    assert!(whole_b[..2 * MIB as usize].contains(&0x11));
    assert!(allocated(&ours) <= own + 256 * 1024, "{}", allocated(&ours));
}

trait Parts {
    fn into_parts(self) -> (u64, u64, u64, bool);
}

impl Parts for Range {
    /// (start, length, depth, data)
    fn into_parts(self) -> (u64, u64, u64, bool) {
        (self.0, self.1, self.2, self.5)
    }
}

/// The server reads a qcow2 chain by `qemu-img map`, straight from the layers' files, and
/// through qemu-nbd what the map cannot point into. A chain with every kind of range: a raw
/// bottom layer, a compressed cluster (no offset to read from), an overlay with data over
/// both, a zeroed cluster over data, and an image that is not a multiple of the read
/// size. Whole and `--top-only` downloads match qemu-img's own view of the same chain.
#[test]
fn a_chain_with_raw_and_compressed_layers_reads_as_qemu_reads_it() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-mapped");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let size = "24577k"; // 24 MiB + 1 KiB: a partial last cluster
    qemu(
        &pool,
        &["qemu-img", "create", "-q", "-f", "raw", "base.raw", size],
    );
    qemu(
        &pool,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x51 0 3M",
            "-c",
            "write -P 0x52 24M 1k",
            "base.raw",
        ],
    );
    qemu(
        &pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            size,
        ],
    );
    qemu(
        &pool,
        &[
            "qemu-io",
            // Compressed clusters: qemu-img map gives them no offset.
            "-c",
            "write -c -P 0x61 8M 64k",
            "-c",
            "write -c -P 0x62 8256k 64k",
            "-c",
            "write -P 0x63 1M 256k",
            "-c",
            "write -z 2M 64k",
            "mid.qcow2",
        ],
    );
    qemu(
        &pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu(
        &pool,
        &[
            "qemu-io",
            "-c",
            "write -P 0x71 1088k 64k",
            "-c",
            "write -c -P 0x72 16M 64k",
            "-c",
            "write -P 0x73 20M 1M",
            "top.qcow2",
        ],
    );
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "top.qcow2"])
        .current_dir(&pool)
        .output()
        .unwrap();
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let map = map.as_array().unwrap();
    // The chain has what the test is about: mapped data in each layer, and compressed data.
    for depth in 0..3 {
        assert!(
            map.iter()
                .any(|e| e["depth"] == depth && e["data"] == true && e.get("offset").is_some()),
            "no mapped data at depth {depth}: {map:?}"
        );
    }
    assert!(map.iter().any(|e| e["compressed"] == true), "{map:?}");

    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let _server = Server::start(&pool, &listen);
    let theirs = dir.join("theirs.raw");
    qemu(
        &pool,
        &[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "top.qcow2",
            theirs.to_str().unwrap(),
        ],
    );
    let ours = dir.join("ours.raw");
    let out = run(bin()
        .args(["download", "--connect", &listen, "top.qcow2"])
        .arg(&ours));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert!(read_all(&ours) == read_all(&theirs), "content differs");
    assert!(allocated(&ours) <= allocated(&theirs) + 256 * 1024);

    // --top-only: the top layer's own clusters, compressed one included; zeroes elsewhere.
    let top = dir.join("top.raw");
    let out = run(bin()
        .args(["download", "--top-only", "--connect", &listen, "top.qcow2"])
        .arg(&top));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let (top_b, whole_b) = (read_all(&top), read_all(&theirs));
    for e in map {
        let (start, len) = (
            e["start"].as_u64().unwrap() as usize,
            e["length"].as_u64().unwrap() as usize,
        );
        let range = start..start + len;
        if e["depth"] == 0 && e["data"] == true && e["zero"] == false {
            assert!(
                top_b[range.clone()] == whole_b[range],
                "top data at {start}"
            );
        } else {
            assert!(
                top_b[range].iter().all(|&b| b == 0),
                "{len} bytes at {start}: {e}"
            );
        }
    }
}
