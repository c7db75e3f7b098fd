//! Incremental sync's first half, end to end up to the transfer: the source's block digests
//! come over a real connection (a DIGESTS stream from a DirProvider), the destination's older
//! copy is hashed here, and their difference is exactly the blocks that changed. The test then
//! applies that difference from the source file itself (standing in for the ranged reads
//! `download --update` will use once range access exists) and checks the result is the source,
//! no less sparse.

mod common;

use common::*;
use engine::proto::Op;
use fdstream::blockhash::{self, BlockDigests};
use fdstream::DirProvider;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const BS: u64 = 64 * KIB;
const GIB: u64 = 1 << 30;

fn punch(f: &File, offset: u64, len: u64) {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an open fd has no memory effects.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn eight_gib_with_one_percent_changed_differs_in_exactly_those_blocks() {
    let work = tempfile::tempdir().unwrap();
    let pool = work.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let (old, new) = (work.path().join("old.img"), pool.join("vol.img"));
    let size = 8 * GIB;
    let blocks = size / BS;
    // The older version: 1 GiB of data, 64 extents of 16 MiB every 128 MiB.
    let extents: Vec<(u64, u64)> = (0..64).map(|k| (k * 128 * MIB, 16 * MIB)).collect();
    sparse_file(&old, size, &extents);
    let copied = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&old)
        .arg(&new)
        .status()
        .unwrap();
    assert!(copied.success());

    // 1 % of the blocks change, scattered over data and holes alike.
    // One data block becomes a hole, another written zeroes: both read as zero then.
    let (punched, zeroed) = (3 * 128 * MIB / BS + 5, 9 * 128 * MIB / BS + 7);
    let mut changed = BTreeSet::new();
    let mut k = 1u64;
    while changed.len() < (blocks / 100) as usize {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (k >> 20) % blocks;
        if b != punched && b != zeroed {
            changed.insert(b);
        }
    }
    let f = File::options().write(true).open(&new).unwrap();
    for &b in &changed {
        f.write_all_at(&pattern(b ^ 0xABCD, BS as usize), b * BS)
            .unwrap();
    }
    punch(&f, punched * BS, BS);
    f.write_all_at(&vec![0u8; BS as usize], zeroed * BS)
        .unwrap();
    f.sync_all().unwrap();

    // The exchange: the server hashes its volume; the document travels as stream content.
    let pair = Pair::new(DirProvider::new(&pool).unwrap());
    let sink = engine::MemoryWriter::default();
    let content = sink.content();
    let report = pair
        .client
        .fetch(pair.conn, Op::Digests, "vol.img", Box::new(sink))
        .recv_timeout(Duration::from_secs(300))
        .expect("digests within 300 s");
    report.result.expect("digests");
    let doc = std::mem::take(&mut *content.lock().unwrap());
    let (header, records) = engine::blockmap::decode(&doc).unwrap();
    let source = BlockDigests { header, records };
    let dest = blockhash::digests_of(&File::open(&old).unwrap(), 2).unwrap();
    let data_blocks = source.records.len() as u64;
    assert_eq!(doc.len() as u64, 16 + 40 * data_blocks);
    // Framing adds little to the document (DATA headers).
    assert!(report.stats.wire_bytes <= doc.len() as u64 * 101 / 100);
    eprintln!(
        "digest exchange: {} bytes for {data_blocks} data blocks; wire {}",
        doc.len(),
        report.stats.wire_bytes
    );

    let diff = blockhash::diff(&source, &dest);
    let copy: BTreeSet<u64> = diff
        .copy
        .iter()
        .flat_map(|&(o, l)| o / BS..(o + l) / BS)
        .collect();
    assert_eq!(copy, changed, "exactly the changed blocks travel");
    assert_eq!(diff.zero, vec![(punched * BS, BS), (zeroed * BS, BS)]);
    let travels = diff.copy_bytes();
    // What travels besides the digest exchange: at most 1.5 % of the volume (1 % changed).
    assert!(travels <= size * 15 / 1000, "{travels} bytes travel");

    // Applying the difference gives the source, and punches what the source no longer has.
    let src = File::open(&new).unwrap();
    let dst = File::options().write(true).open(&old).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    for &(offset, len) in &diff.copy {
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], pos).unwrap();
            dst.write_all_at(&buf[..n], pos).unwrap();
            pos += n as u64;
        }
    }
    for &(offset, len) in &diff.zero {
        punch(&dst, offset, len);
    }
    dst.sync_all().unwrap();
    let after = blockhash::digests_of(&File::open(&old).unwrap(), 2).unwrap();
    assert_eq!(after, source, "block for block the source's digests");
    assert_eq!(after.checksum(), source.checksum());
    assert_same(&old, &new);
    // As sparse as the source: the source's written-zero block is allocated, ours is not.
    assert!(allocated(&old) <= allocated(&new));
    assert!(allocated(&old) + 2 * BS >= allocated(&new));
}
