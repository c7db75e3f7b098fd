//! `volstream checksum`: the same content gives the same checksum however it is stored (a
//! sparse file, the same bytes written out in full, a loop device, a volume behind `serve`),
//! and the checksum is the construction docs/PROTOCOL.md 8.3 specifies, recomputed here from
//! the bytes.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOCK: usize = 64 * 1024;

/// PROTOCOL.md 8.3, from the whole content: BLAKE3 over the context, the block size and the
/// length, then every block's BLAKE3.
fn expected(content: &[u8]) -> (String, usize) {
    let mut h = blake3::Hasher::new();
    h.update(b"volstream block checksum v1\0");
    h.update(&(BLOCK as u64).to_le_bytes());
    h.update(&(content.len() as u64).to_le_bytes());
    let mut data_blocks = 0;
    for block in content.chunks(BLOCK) {
        data_blocks += block.iter().any(|&b| b != 0) as usize;
        h.update(blake3::hash(block).as_bytes());
    }
    (h.finalize().to_hex().to_string(), data_blocks)
}

fn checksum(args: &[&str]) -> serde_json::Value {
    let out = run(bin().arg("checksum").arg("--json").args(args));
    assert!(out.status.success(), "{args:?}: {:?}", stderr_lines(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sum_of(path: &Path) -> serde_json::Value {
    checksum(&[path.to_str().unwrap()])
}

#[test]
fn holes_written_zeroes_devices_and_served_volumes_hash_alike() {
    let dir = TempDir::new("checksum");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    // Not a whole number of blocks; data at unaligned places, one extent across a block border.
    let size = 48 * MIB + 4097;
    let sparse = pool.join("vol");
    sparse_file(
        &sparse,
        size,
        &[
            (100, 5000),
            (3 * MIB - 10, 20),
            (20 * MIB, 2 * MIB),
            (size - 7, 7),
        ],
        16,
    );
    // Written zeroes: allocated, but content like a hole.
    let f = std::fs::File::options().write(true).open(&sparse).unwrap();
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 30 * MIB)
        .unwrap();
    let content = read_all(&sparse);
    let dense = dir.join("dense");
    std::fs::write(&dense, &content).unwrap();
    assert!(allocated(&dense) > allocated(&sparse) + 40 * MIB);

    let (want, data_blocks) = expected(&content);
    for v in [sum_of(&sparse), sum_of(&dense)] {
        assert_eq!(v["checksum"], want.as_str());
        assert_eq!(v["algorithm"], "volstream-blake3-64k");
        assert_eq!(v["size"], size);
        assert_eq!(v["blocks"], size.div_ceil(BLOCK as u64));
        assert_eq!(v["data_blocks"], data_blocks);
    }

    let listen = format!("unix:{}", dir.join("s.sock").display());
    let mut extra = vec![];
    let device = LoopDev::attach(&dense);
    let named = device.as_ref().map(|d| format!("dev={}", d.arg()));
    if let Some(named) = &named {
        extra = vec!["--device", named.as_str()];
    } else {
        eprintln!("no loop device: the device case is skipped");
    }
    let _server = Server::start_with(&pool, &listen, &extra);
    assert_eq!(
        checksum(&["--connect", &listen, "vol"])["checksum"],
        want.as_str()
    );
    if let Some(d) = &device {
        // A loop device's size is rounded down to 512 bytes: its content is the file's, cut.
        let cut = content.len() / 512 * 512;
        let (want_dev, _) = expected(&content[..cut]);
        assert_eq!(sum_of(&d.path)["checksum"], want_dev.as_str());
        assert_eq!(
            checksum(&["--connect", &listen, "dev"])["checksum"],
            want_dev.as_str()
        );
    }

    // One byte differs: the checksum does, locally and through the server.
    f.write_all_at(b"\x01", 40 * MIB + 3).unwrap();
    let changed = sum_of(&sparse);
    assert_ne!(changed["checksum"], want.as_str());
    assert_eq!(changed["checksum"], expected(&read_all(&sparse)).0.as_str());
    assert_eq!(
        checksum(&["--connect", &listen, "vol"])["checksum"],
        changed["checksum"]
    );

    // The plain form, like sha256sum.
    let out = run(bin().arg("checksum").arg(&dense));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{want}  {}\n", dense.display())
    );
}

#[test]
fn a_missing_volume_or_file_is_one_line_with_its_name() {
    let dir = TempDir::new("checksum-missing");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let out = run(bin().args(["checksum", "--connect", &listen, "nothing"]));
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("no such volume") && lines[0].contains("nothing"),
        "{lines:?}"
    );
    let missing = dir.join("absent");
    let out = run(bin().arg("checksum").arg(&missing));
    assert_eq!(out.status.code(), Some(1));
    assert!(line_with(&out, "absent").contains("No such file"));
}

#[test]
fn a_sparse_terabyte_hashes_without_reading_its_holes() {
    let dir = TempDir::new("checksum-tera");
    let path = dir.join("tera");
    sparse_file(&path, 1 << 40, &[(1 << 39, MIB)], 3);
    let v = sum_of(&path);
    assert_eq!(v["blocks"], (1u64 << 40) / BLOCK as u64);
    assert_eq!(v["data_blocks"], MIB / BLOCK as u64);
    // Recomputed from the one data extent: everything else is zero blocks.
    let mut data = vec![0u8; MIB as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut data, 1 << 39)
        .unwrap();
    let zero = blake3::hash(&[0u8; BLOCK]);
    let mut h = blake3::Hasher::new();
    h.update(b"volstream block checksum v1\0");
    h.update(&(BLOCK as u64).to_le_bytes());
    h.update(&(1u64 << 40).to_le_bytes());
    let first = (1u64 << 39) / BLOCK as u64;
    for i in 0..(1u64 << 40) / BLOCK as u64 {
        if (first..first + 16).contains(&i) {
            let k = ((i - first) as usize) * BLOCK;
            h.update(blake3::hash(&data[k..k + BLOCK]).as_bytes());
        } else {
            h.update(zero.as_bytes());
        }
    }
    assert_eq!(v["checksum"], h.finalize().to_hex().as_str());
}
