//! Loop devices as sources and sinks (root only; skipped with a printed reason otherwise).

mod common;

use common::*;
use engine::proto::Reason;
use fdstream::{DirProvider, FileReader, FileWriter, ReaderOptions, WriterOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

const DATA: [(u64, u64); 3] = [(0, MIB), (8 * MIB, 3 * MIB), (40 * MIB, 2 * MIB + 4096)];

#[test]
fn loop_device_source_reads_each_byte_once_and_finds_holes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let backing = src.path().join("backing");
    let size = 64 * MIB;
    sparse_file(&backing, size, &DATA);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let reader = FileReader::open(&dev.path, ReaderOptions::default());
    let counter = reader.bytes_read();
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let r = pair.upload("disk", opts(), reader);
    assert_eq!(r.result, Ok(()));
    assert_eq!(
        counter.load(Ordering::Relaxed),
        size,
        "every byte read exactly once"
    );
    let data: u64 = DATA.iter().map(|d| d.1).sum();
    assert_eq!(r.stats.data_bytes, data, "holes found by zero detection");
    assert_eq!(r.stats.hole_bytes, size - data);
    let out = dst.path().join("disk");
    assert_same(&backing, &out);
    assert_sparse_like(data, DATA.len(), &out);

    // The same device served by name through the provider, downloaded.
    let pair = Pair::new(
        DirProvider::new(dst.path())
            .unwrap()
            .with_device("dev", &dev.path),
    );
    let out2 = dst.path().join("disk2");
    let r = pair.download(
        "dev",
        opts(),
        FileWriter::create(&out2, WriterOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_same(&backing, &out2);
    assert_sparse_like(data, DATA.len(), &out2);
}

#[test]
fn loop_device_sink_with_old_data_reads_back_zero_in_holes() {
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    sparse_file(&src.path().join("vol"), size, &DATA);
    let backing = work.path().join("backing");
    let f = File::create(&backing).unwrap();
    f.write_all_at(&vec![0xAA; size as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(allocated(&backing) >= size);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let pair = Pair::new(DirProvider::new(src.path()).unwrap());
    let r = pair.download(
        "vol",
        opts(),
        FileWriter::in_place(&dev.path, overwriting(WriterOptions::default())),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&dev.path), read_all(&src.path().join("vol")));
    drop(dev);
    assert_eq!(read_all(&backing), read_all(&src.path().join("vol")));
    // ext4 supports punching: the zeroing went through to the backing file's blocks.
    let data: u64 = DATA.iter().map(|d| d.1).sum();
    assert_sparse_like(data, DATA.len(), &backing);
}

#[test]
fn loop_device_too_small_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("vol"), 8 * MIB, &[(0, MIB)]);
    let backing = work.path().join("backing");
    sparse_file(&backing, 4 * MIB, &[]);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let pair = Pair::new(DirProvider::new(src.path()).unwrap());
    let r = pair.download(
        "vol",
        opts(),
        FileWriter::in_place(&dev.path, overwriting(WriterOptions::default())),
    );
    let e = r.result.unwrap_err();
    assert_eq!(e.reason, Reason::DeviceTooSmall, "{e}");
    // Served by name, the refusal comes before ACCEPT.
    let pair = Pair::new(
        DirProvider::new(work.path())
            .unwrap()
            .with_device("small", &dev.path),
    );
    let r = pair.upload(
        "small",
        opts().with_overwrite(true),
        FileReader::open(src.path().join("vol"), ReaderOptions::default()),
    );
    assert_eq!(r.result.unwrap_err().reason, Reason::DeviceTooSmall);
}
