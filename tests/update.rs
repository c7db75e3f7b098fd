//! `--update` (issue 16): an 8 GiB sparse image with about 400 MiB of data, 1 % of its data
//! blocks changed at scattered places, one block punched and one overwritten with zeroes.
//! Only the changed blocks may travel (at most 1.5 % of the data, plus the block digests);
//! the result must equal the source byte for byte (`cmp`) and be as sparse as it.

mod common;

use common::*;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOCK: u64 = 64 * 1024;
const SIZE: u64 = 8 << 30;
/// 100 extents of 4 MiB spread over the 8 GiB.
const EXTENTS: u64 = 100;
const EXTENT: u64 = 4 * MIB;

fn data_layout() -> Vec<(u64, u64)> {
    (0..EXTENTS)
        .map(|i| ((i * (SIZE / EXTENTS) / BLOCK + i % 7) * BLOCK, EXTENT))
        .collect()
}

/// The blocks a newer version changes: 1 % of the data blocks, each in a different place.
fn changed_blocks() -> Vec<u64> {
    let per_extent = EXTENT / BLOCK;
    let count = EXTENTS * per_extent / 100;
    (0..count)
        .map(|i| {
            let (off, _) = data_layout()[(i * 37 % EXTENTS) as usize];
            off / BLOCK + (i * 13) % per_extent
        })
        .collect()
}

/// Writes `old` (the older version) and `new` (the source): the changed blocks get other
/// bytes, one block is punched and one overwritten with zeroes.
fn make_versions(old: &Path, new: &Path) -> (u64, u64) {
    sparse_file(old, SIZE, &data_layout(), 7);
    let status = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(old)
        .arg(new)
        .status()
        .unwrap();
    assert!(status.success());
    let f = File::options().write(true).open(new).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for block in changed_blocks() {
        let bytes: Vec<u8> = (0..BLOCK)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        f.write_all_at(&bytes, block * BLOCK).unwrap();
    }
    let (punched, zeroed) = (
        data_layout()[3].0 + 5 * BLOCK,
        data_layout()[60].0 + 9 * BLOCK,
    );
    // SAFETY: fallocate on an fd we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            punched as i64,
            BLOCK as i64,
        )
    };
    assert_eq!(r, 0, "punching a hole");
    f.write_all_at(&vec![0u8; BLOCK as usize], zeroed).unwrap();
    f.sync_all().unwrap();
    (punched, zeroed)
}

fn is_hole(path: &Path, offset: u64) -> bool {
    let f = File::open(path).unwrap();
    // SAFETY: lseek on an fd we own.
    let data = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
    data < 0 || data as u64 >= offset + BLOCK
}

fn cmp(a: &Path, b: &Path) {
    let status = std::process::Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

fn finished(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .expect("a finished event")
}

#[test]
fn download_update_moves_only_the_changed_blocks() {
    let dir = TempDir::new("update-down");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let (local, source) = (dir.join("disk.raw"), pool.join("disk.raw"));
    let (punched, zeroed) = make_versions(&local, &source);
    let sock = dir.join("sock");
    let listen = format!("unix:{}", sock.display());
    let _server = Server::start(&pool, &listen);
    let inode_before = std::fs::metadata(&local).unwrap();

    let out = run(bin()
        .args([
            "download",
            "--json",
            "--update",
            "--connect",
            &listen,
            "disk.raw",
        ])
        .arg(&local));
    let event = finished(&out);
    let data: u64 = data_layout().iter().map(|e| e.1).sum();
    let wire = event["wire_bytes"].as_u64().unwrap();
    let update = &event["update"];
    let digests = update["digests_wire_bytes"].as_u64().unwrap();
    println!(
        "download --update: data {data}, content on the wire {wire} ({:.3} %), block digests \
         {digests}, changed blocks {}, zeroed {}, local copy {} bytes (reflink {})",
        100.0 * wire as f64 / data as f64,
        update["changed_blocks"],
        update["zeroed_blocks"],
        update["copied_bytes"],
        update["reflinked"],
    );
    assert_eq!(
        update["changed_blocks"].as_u64().unwrap(),
        changed_blocks().len() as u64
    );
    assert_eq!(update["zeroed_blocks"].as_u64().unwrap(), 2);
    assert!(
        wire * 1000 <= data * 15,
        "{wire} bytes is more than 1.5 % of {data}"
    );
    // The digest document: 40 bytes a data block and its frames.
    assert!(digests <= data / BLOCK * 40 + 64 * 1024, "{digests}");

    // What `cmp` says, reading only the data extents of both: cmp of the 8 GiB reads the holes
    // too, 40 s on a loaded CI machine. The small test below runs cmp itself.
    assert_same_sparse(&source, &local);
    assert!(is_hole(&local, punched) && is_hole(&local, zeroed));
    assert!(
        allocated(&local) <= allocated(&source),
        "as sparse as the source: {} > {}",
        allocated(&local),
        allocated(&source)
    );
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        std::fs::metadata(&local).unwrap().ino(),
        inode_before.ino(),
        "the verified copy replaced the file"
    );
    assert!(temporaries(&dir.0).is_empty(), "{:?}", temporaries(&dir.0));

    // Again: nothing differs, nothing travels.
    let event = finished(&run(bin()
        .args([
            "download",
            "--json",
            "--update",
            "--connect",
            &listen,
            "disk.raw",
        ])
        .arg(&local)));
    assert_eq!(event["wire_bytes"].as_u64().unwrap(), 0);
    assert_eq!(event["update"]["changed_blocks"].as_u64().unwrap(), 0);
}

/// Lengths change both ways, a missing FILE is downloaded whole, and what comes out is
/// always the source.
#[test]
fn download_update_follows_the_length_and_creates_a_missing_file() {
    let dir = TempDir::new("update-len");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let sock = dir.join("sock");
    let listen = format!("unix:{}", sock.display());
    let _server = Server::start(&pool, &listen);
    let source = pool.join("v");
    let local = dir.join("v");
    let update = |expect_changed: u64| {
        let event = finished(&run(bin()
            .args(["download", "--json", "--update", "--connect", &listen, "v"])
            .arg(&local)));
        cmp(&source, &local);
        assert_eq!(
            event["update"]["changed_blocks"].as_u64().unwrap(),
            expect_changed,
            "{event}"
        );
    };
    // Missing: every data block travels (3 MiB of data in 48 blocks).
    sparse_file(
        &source,
        20 * MIB + 100,
        &[(MIB, 2 * MIB), (20 * MIB, 100)],
        1,
    );
    update(33);
    // Longer source, its new tail in a new block; the old last block was short: sent again.
    sparse_file(
        &source,
        30 * MIB,
        &[(MIB, 2 * MIB), (20 * MIB, 100), (29 * MIB, 10)],
        1,
    );
    update(2);
    // Shorter: cut, the now-last block unchanged in content but not in length.
    sparse_file(&source, 2 * MIB + 5, &[(MIB, MIB + 5)], 1);
    update(1);
    assert_eq!(std::fs::metadata(&local).unwrap().len(), 2 * MIB + 5);
}

#[test]
fn upload_update_sends_only_the_changed_blocks() {
    let dir = TempDir::new("update-up");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let (remote, local) = (pool.join("disk.raw"), dir.join("new.raw"));
    let (punched, zeroed) = make_versions(&remote, &local);
    let sock = dir.join("sock");
    let listen = format!("unix:{}", sock.display());
    let _server = Server::start(&pool, &listen);

    let upload = || {
        finished(&run(bin()
            .args(["upload", "--json", "--update", "--connect", &listen])
            .arg(&local)
            .arg("disk.raw")))
    };
    let event = upload();
    let data: u64 = data_layout().iter().map(|e| e.1).sum();
    let wire = event["wire_bytes"].as_u64().unwrap();
    let update = &event["update"];
    let digests = update["digests_wire_bytes"].as_u64().unwrap();
    println!(
        "upload --update: data {data}, content on the wire {wire} ({:.3} %), block digests \
         {digests}, changed blocks {}, zeroed {}",
        100.0 * wire as f64 / data as f64,
        update["changed_blocks"],
        update["zeroed_blocks"],
    );
    assert_eq!(
        update["changed_blocks"].as_u64().unwrap(),
        changed_blocks().len() as u64
    );
    assert_eq!(update["zeroed_blocks"].as_u64().unwrap(), 2);
    assert!(
        wire * 1000 <= data * 15,
        "{wire} bytes is more than 1.5 % of {data}"
    );
    assert!(digests <= data / BLOCK * 40 + 64 * 1024, "{digests}");
    assert_same_sparse(&local, &remote);
    assert!(is_hole(&remote, punched) && is_hole(&remote, zeroed));
    assert!(allocated(&remote) <= allocated(&local));
    assert!(temporaries(&pool).is_empty(), "{:?}", temporaries(&pool));

    let event = upload();
    assert_eq!(event["wire_bytes"].as_u64().unwrap(), 0);
}

/// A volume the server lacks is uploaded whole; lengths change both ways.
#[test]
fn upload_update_of_a_missing_volume_is_a_whole_upload_and_lengths_follow() {
    let dir = TempDir::new("update-up-len");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let sock = dir.join("sock");
    let listen = format!("unix:{}", sock.display());
    let _server = Server::start(&pool, &listen);
    let (local, remote) = (dir.join("v"), pool.join("v"));
    let upload = || {
        finished(&run(bin()
            .args(["upload", "--json", "--update", "--connect", &listen])
            .arg(&local)
            .arg("v")))
    };
    sparse_file(
        &local,
        20 * MIB + 100,
        &[(MIB, 2 * MIB), (20 * MIB, 100)],
        1,
    );
    let event = upload();
    assert!(event.get("update").is_none(), "{event}");
    cmp(&local, &remote);
    sparse_file(
        &local,
        30 * MIB,
        &[(MIB, 2 * MIB), (20 * MIB, 100), (29 * MIB, 10)],
        1,
    );
    assert_eq!(upload()["update"]["changed_blocks"], 2);
    cmp(&local, &remote);
    sparse_file(&local, 2 * MIB + 5, &[(MIB, MIB + 5)], 1);
    assert_eq!(upload()["update"]["changed_blocks"], 1);
    cmp(&local, &remote);
    // Longer by zeroes: the short last block grows (it is sent again), and then, from a
    // whole last block, no block differs but the length still changes.
    for (len, changed) in [(40 * MIB, 1), (50 * MIB, 0)] {
        std::fs::File::options()
            .write(true)
            .open(&local)
            .unwrap()
            .set_len(len)
            .unwrap();
        assert_eq!(upload()["update"]["changed_blocks"], changed);
        cmp(&local, &remote);
    }
    assert!(temporaries(&pool).is_empty());
}
