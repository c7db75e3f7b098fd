//! `upload --format qcow2`: a raw file becomes a qcow2 image in the served pool, written through
//! qemu-nbd — a new image, and an existing one written in place. `qemu-img compare` and
//! `qemu-img check` are clean, and the holes stay holes (unallocated or zero clusters).

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn qemu(pool: &Path, args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(pool)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(pool: &Path, args: &[&str]) -> String {
    let out = qemu(pool, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Bytes `qemu-img map` calls data in `image`.
fn mapped_data(pool: &Path, image: &str) -> u64 {
    let map: serde_json::Value =
        serde_json::from_str(&ok(pool, &["qemu-img", "map", "--output=json", image])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["data"].as_bool().unwrap())
        .map(|r| r["length"].as_u64().unwrap())
        .sum()
}

fn format_of(pool: &Path, image: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&ok(pool, &["qemu-img", "info", "--output=json", image])).unwrap();
    info["format"].as_str().unwrap().to_string()
}

#[test]
fn a_raw_uploads_into_a_new_qcow2_and_into_an_existing_one() {
    if !have("qemu-img") || !have("qemu-io") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-upload");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let src = dir.join("src.raw");
    // 3 MiB + 68 KiB of data in 64 MiB, at cluster-aligned and unaligned places.
    let data = [(0, MIB), (20 * MIB + 512, 2 * MIB), (60 * MIB, 68 * 1024)];
    sparse_file(&src, 64 * MIB, &data, 5);
    let data_bytes: u64 = data.iter().map(|d| d.1).sum();
    let src_arg = src.to_str().unwrap();
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let server = Server::start(&pool, &listen);
    let upload = |extra: &[&str], volume: &str| {
        run(bin()
            .args(["upload", "--format", "qcow2", "--connect", &listen])
            .args(extra)
            .args([src_arg, volume]))
    };

    // A new image.
    let out = upload(&["--verify"], "new.qcow2");
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(format_of(&pool, "new.qcow2"), "qcow2");
    ok(
        &pool,
        &[
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            src_arg,
            "new.qcow2",
        ],
    );
    ok(&pool, &["qemu-img", "check", "new.qcow2"]);
    // Sparse: only the data's clusters (64 KiB each) are allocated.
    let mapped = mapped_data(&pool, "new.qcow2");
    assert!(
        mapped >= data_bytes && mapped <= data_bytes + 4 * 64 * 1024,
        "{mapped} bytes of data in the image for {data_bytes}"
    );
    assert!(
        allocated(&pool.join("new.qcow2")) <= data_bytes + MIB,
        "{} bytes allocated",
        allocated(&pool.join("new.qcow2"))
    );
    assert!(temporaries(&pool).is_empty(), "{:?}", temporaries(&pool));

    // An existing image, with data where the raw has holes: refused without --overwrite,
    // written in place with it, its old data zeroed as clusters rather than written.
    ok(
        &pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "old.qcow2",
            "80M",
        ],
    );
    ok(
        &pool,
        &[
            "qemu-io",
            "-c",
            "write -P 0x55 0 16M",
            "-c",
            "write -P 0x66 40M 4M",
            "old.qcow2",
        ],
    );
    let before = std::fs::metadata(pool.join("old.qcow2")).unwrap();
    let out = upload(&[], "old.qcow2");
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    assert!(
        stderr_lines(&out).iter().any(|l| l.contains("old.qcow2")),
        "{:?}",
        stderr_lines(&out)
    );
    let out = upload(&["--overwrite", "--verify"], "old.qcow2");
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(pool.join("old.qcow2")).unwrap().ino(),
        before.ino(),
        "written in place"
    );
    ok(&pool, &["qemu-img", "check", "old.qcow2"]);
    // The image keeps its 80 MiB; its first 64 are the raw, the rest as they were (zero).
    let guest = dir.join("guest.raw");
    ok(
        &pool,
        &[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "old.qcow2",
            guest.to_str().unwrap(),
        ],
    );
    let (a, b) = (read_all(&src), read_all(&guest));
    assert_eq!(b.len() as u64, 80 * MIB);
    assert!(a[..] == b[..a.len()], "content differs");
    assert!(b[a.len()..].iter().all(|&x| x == 0));
    let mapped = mapped_data(&pool, "old.qcow2");
    assert!(
        mapped <= data_bytes + 4 * 64 * 1024,
        "{mapped} bytes of data left in the image (holes written as data?)"
    );

    // A raw volume replaced by a qcow2 with --overwrite; compare with the upload.
    std::fs::write(pool.join("was-raw"), vec![7u8; 4096]).unwrap();
    let out = upload(&["--overwrite"], "was-raw");
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(format_of(&pool, "was-raw"), "qcow2");
    ok(
        &pool,
        &[
            "qemu-img", "compare", "-f", "raw", "-F", "qcow2", src_arg, "was-raw",
        ],
    );

    // A download gives the guest view back.
    let back = dir.join("back.raw");
    let out = run(bin()
        .args(["download", "--connect", &listen, "new.qcow2"])
        .arg(&back));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert!(read_all(&src) == read_all(&back), "download differs");
    drop(server);
}

#[test]
fn an_image_too_small_or_through_the_helper_is_refused_in_one_line() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("qcow2-upload-refused");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let src = dir.join("src.raw");
    sparse_file(&src, 8 * MIB, &[(0, MIB)], 2);
    ok(
        &pool,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "small.qcow2",
            "4M",
        ],
    );
    let listen = format!("unix:{}", dir.join("vs.sock").display());
    let server = Server::start(&pool, &listen);
    let out = run(bin()
        .args([
            "upload",
            "--format",
            "qcow2",
            "--overwrite",
            "--connect",
            &listen,
        ])
        .arg(&src)
        .arg("small.qcow2"));
    assert_eq!(out.status.code(), Some(1));
    let line = line_with(&out, "small.qcow2");
    assert!(line.contains("too small"), "{line}");
    assert_eq!(format_of(&pool, "small.qcow2"), "qcow2");
    drop(server);

    if iohelper_built() {
        let listen = format!("unix:{}", dir.join("vh.sock").display());
        let _server = Server::start_with(&pool, &listen, &["--iohelper"]);
        let out = run(bin()
            .args(["upload", "--format", "qcow2", "--connect", &listen])
            .arg(&src)
            .arg("new.qcow2"));
        assert_eq!(out.status.code(), Some(1));
        let line = line_with(&out, "new.qcow2");
        assert!(line.contains("--iohelper"), "{line}");
        assert!(!pool.join("new.qcow2").exists());
    }
    assert!(temporaries(&pool).is_empty(), "{:?}", temporaries(&pool));
}
