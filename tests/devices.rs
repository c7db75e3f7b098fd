//! Block devices with the real binary (root: loop devices, a mounted ext4): a device in use is
//! refused before a byte is written to it, as a download's destination and through
//! `serve --device`; one in use as a source is read only with -U/--force-share; an existing
//! device, like an existing file, is written only with --overwrite; its size is checked at open.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn head(dev: &str, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(dev)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

fn server_with_device(dir: &TempDir, pool: &Path, dev: &str) -> (Server, String) {
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let device = format!("d={dev}");
    (
        Server::start_with(pool, &listen, &["--device", &device]),
        listen,
    )
}

#[test]
fn a_mounted_device_is_neither_written_nor_read_without_force_share() {
    let dir = TempDir::new("in-use");
    // No lazy initialisation: nothing but this test writes to the device while it is mounted.
    let Some(m) = Mounted::new_with(
        "ext4",
        &dir.0,
        64 * MIB,
        "-E lazy_itable_init=0,lazy_journal_init=0",
    ) else {
        return;
    };
    std::fs::write(m.join("marker"), b"still here").unwrap();
    let _ = std::process::Command::new("sync").status();
    let before = head(&m.dev, MIB as usize);

    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(
        &pool.join("vol"),
        32 * MIB,
        &[(0, 2 * MIB), (20 * MIB, MIB)],
        4,
    );
    let (_server, listen) = server_with_device(&dir, &pool, &m.dev);

    // Downloading onto it, and uploading onto it through the server, both refused at open.
    let out = run(bin()
        .args(["download", "--overwrite", "--connect", &listen, "vol"])
        .arg(&m.dev));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "in use");
    assert!(line.contains("nothing was written"), "{line}");
    let out = run(bin()
        .args(["upload", "--overwrite", "--connect", &listen])
        .arg(pool.join("vol"))
        .arg("d"));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "in use");
    assert!(
        head(&m.dev, MIB as usize) == before,
        "the mounted file system's first MiB was written"
    );

    // As a source: refused, then read with -U.
    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(&m.dev)
        .arg("copy"));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    assert!(line_with(&out, "in use").contains("--force-share"));
    assert!(!pool.join("copy").exists());
    let out = run(bin()
        .args(["download", "--connect", &listen, "d"])
        .arg(dir.join("local")));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "in use");
    for args in [&["upload", "-U"][..], &["upload", "--force-share"][..]] {
        let _ = std::fs::remove_file(pool.join("copy"));
        let out = run(bin()
            .args(args)
            .args(["--connect", &listen])
            .arg(&m.dev)
            .arg("copy"));
        assert!(out.status.success(), "{args:?}: {:?}", stderr_lines(&out));
        assert_eq!(read_all(&pool.join("copy")), read_all(Path::new(&m.dev)));
    }
    let out = run(bin()
        .args(["download", "-U", "--connect", &listen, "d"])
        .arg(dir.join("local")));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&dir.join("local")), read_all(Path::new(&m.dev)));

    assert_eq!(std::fs::read(m.join("marker")).unwrap(), b"still here");
    let _ = std::process::Command::new("umount").arg(&m.dir).status();
    let fsck = run(std::process::Command::new("fsck.ext4").args(["-fn", &m.dev]));
    assert!(
        fsck.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn devices_follow_the_overwrite_rule_of_files_and_are_sized_at_open() {
    let dir = TempDir::new("dev-rules");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let size = 8 * MIB;
    sparse_file(&pool.join("vol"), size, &[(0, MIB), (5 * MIB, MIB)], 6);
    let (small, large) = (dir.join("small"), dir.join("large"));
    filled(&small, 4 * MIB, 0xAA);
    filled(&large, 16 * MIB, 0xAA);
    let (Some(small_dev), Some(large_dev)) = (LoopDev::attach(&small), LoopDev::attach(&large))
    else {
        return;
    };
    let (_server, listen) = server_with_device(&dir, &pool, large_dev.arg());
    let aa = |from: u64, to: u64| vec![0xAAu8; (to - from) as usize];

    // Without --overwrite an existing device is refused, as an existing file is, both ways.
    let out = run(bin().args(["download", "--connect", &listen, "vol", large_dev.arg()]));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "exists");
    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(pool.join("vol"))
        .arg("d"));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "exists");
    assert_eq!(read_all(&large_dev.path), aa(0, 16 * MIB));
    std::fs::write(dir.join("file"), b"old").unwrap();
    let out = run(bin()
        .args(["download", "--in-place", "--connect", &listen, "vol"])
        .arg(dir.join("file")));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "exists");
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"old");

    // Too small: refused at open with both sizes, nothing written.
    let out = run(bin()
        .args(["download", "--overwrite", "--connect", &listen, "vol"])
        .arg(small_dev.arg()));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "device is 4194304 bytes, volume is 8388608");
    assert!(line.contains("device too small"), "{line}");
    assert_eq!(read_all(&small_dev.path), aa(0, 4 * MIB));

    // The same through a server: the reason crosses the wire as DEVICE_TOO_SMALL, not as
    // "no space left", and the message names the server's volume, not its device path.
    let small_listen = format!("unix:{}", dir.join("small.sock").display());
    let device = format!("s={}", small_dev.arg());
    let small_server = Server::start_with(&pool, &small_listen, &["--device", &device]);
    let out = run(bin()
        .args(["upload", "--overwrite", "--connect", &small_listen])
        .arg(pool.join("vol"))
        .arg("s"));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "device is 4194304 bytes, volume is 8388608");
    assert!(line.contains("device too small"), "{line}");
    assert!(
        !line.contains("no space") && !line.contains(small_dev.arg()),
        "{line}"
    );
    drop(small_server);
    assert_eq!(read_all(&small_dev.path), aa(0, 4 * MIB));

    // Larger: written, and the rest is said to be left as it was (and is).
    let out = run(bin()
        .args(["download", "--overwrite", "--connect", &listen, "vol"])
        .arg(large_dev.arg()));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("bytes 8388608..16777216 were left as they were"),
        "{said}"
    );
    let got = read_all(&large_dev.path);
    assert!(got[..size as usize] == read_all(&pool.join("vol"))[..]);
    assert!(got[size as usize..] == aa(size, 16 * MIB)[..]);

    // With --overwrite an upload through the server writes the device.
    sparse_file(&dir.join("up"), 12 * MIB, &[(MIB, 3 * MIB)], 8);
    let out = run(bin()
        .args(["upload", "--overwrite", "--connect", &listen])
        .arg(dir.join("up"))
        .arg("d"));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert!(read_all(&large_dev.path)[..12 * MIB as usize] == read_all(&dir.join("up"))[..]);
}
