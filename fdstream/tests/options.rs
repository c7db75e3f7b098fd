//! The per-stream options (--allocated, --destination-is-zero, --no-extents, -S 0) and writing
//! in place over existing files.

mod common;

use common::*;
use engine::proto::OpenOptions;
use fdstream::{DirProvider, FileReader, FileWriter, ReaderOptions, WriterOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

#[test]
fn overwrite_allocated_file_in_place_punches_holes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = options_source(src.path());
    let out = dst.path().join("old");
    filled(&out, 32 * MIB);
    let pair = Pair::new(DirProvider::new(src.path()).unwrap());
    let r = pair.download(
        "vol",
        opts(),
        FileWriter::in_place(&out, overwriting(WriterOptions::default())),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&vol));
    let (data, n) = data_bytes(&vol);
    assert_sparse_like(data, n, &out);
}

#[test]
fn allocated_gives_a_fully_allocated_copy() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = options_source(src.path());
    let pair = Pair::new(DirProvider::new(src.path()).unwrap());
    let o = opts().with_allocated(true);
    // A new file...
    let out = dst.path().join("new");
    let r = pair.download(
        "vol",
        o,
        FileWriter::create(&out, fdstream::writer_options(&o)),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&vol));
    assert!(allocated(&out) >= OPTIONS_SIZE, "{}", allocated(&out));
    // ...and an old one written in place: holes zeroed, not punched.
    let old = dst.path().join("old");
    filled(&old, 16 * MIB);
    let r = pair.download(
        "vol",
        o,
        FileWriter::in_place(&old, overwriting(fdstream::writer_options(&o))),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&old), read_all(&vol));
    assert!(allocated(&old) >= OPTIONS_SIZE, "{}", allocated(&old));
}

#[test]
fn destination_is_zero_skips_hole_work() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = options_source(src.path());
    let pair = Pair::new(DirProvider::new(src.path()).unwrap());
    let o = opts().with_destination_is_zero(true);
    let out = dst.path().join("zeroed");
    File::create(&out).unwrap().set_len(OPTIONS_SIZE).unwrap();
    let r = pair.download(
        "vol",
        o,
        FileWriter::in_place(&out, overwriting(fdstream::writer_options(&o))),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&vol));
    let (data, n) = data_bytes(&vol);
    assert_sparse_like(data, n, &out);
    // The flag is a promise: over old data, holes are left alone (nothing punched).
    let lied = dst.path().join("lied");
    filled(&lied, OPTIONS_SIZE);
    let r = pair.download(
        "vol",
        o,
        FileWriter::in_place(&lied, overwriting(fdstream::writer_options(&o))),
    );
    assert_eq!(r.result, Ok(()));
    let got = read_all(&lied);
    assert_eq!(got[0], 0xAA, "hole at 0 was not touched");
    assert!(allocated(&lied) >= OPTIONS_SIZE);
}

#[test]
fn no_extents_reads_everything_and_still_detects_zeroes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = options_source(src.path());
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let reader = FileReader::open(
        &vol,
        ReaderOptions {
            no_extents: true,
            ..ReaderOptions::default()
        },
    );
    let counter = reader.bytes_read();
    let r = pair.upload("vol", opts().with_no_extents(true), reader);
    assert_eq!(r.result, Ok(()));
    assert_eq!(
        counter.load(Ordering::Relaxed),
        OPTIONS_SIZE,
        "read every byte"
    );
    let (data, n) = data_bytes(&vol);
    assert_eq!(r.stats.data_bytes, data);
    let out = dst.path().join("vol");
    assert_eq!(read_all(&out), read_all(&vol));
    assert_sparse_like(data, n, &out);

    // With the extent map, only the data is read.
    let reader = FileReader::open(&vol, ReaderOptions::default());
    let counter = reader.bytes_read();
    let r = pair.upload("vol2", opts(), reader);
    assert_eq!(r.result, Ok(()));
    assert_eq!(counter.load(Ordering::Relaxed), data);
}

#[test]
fn zero_granularity_off_sends_written_zeroes_as_data() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = src.path().join("zeroes");
    // 2 MiB of pattern, 2 MiB of written (allocated) zeroes, a 4 MiB hole, 1 MiB of pattern.
    sparse_file(&vol, 9 * MIB, &[(0, 2 * MIB), (8 * MIB, MIB)]);
    File::options()
        .write(true)
        .open(&vol)
        .unwrap()
        .write_all_at(&vec![0u8; 2 * MIB as usize], 2 * MIB)
        .unwrap();
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let r = pair.upload(
        "s4k",
        opts(),
        FileReader::open(&vol, ReaderOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.data_bytes, 3 * MIB);
    assert_sparse_like(3 * MIB, 2, &dst.path().join("s4k"));

    let off = ReaderOptions {
        zero_granularity: 0,
        ..ReaderOptions::default()
    };
    let o = OpenOptions::default().with_zero_granularity(0);
    let r = pair.upload("s0", o, FileReader::open(&vol, off));
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.data_bytes, 5 * MIB, "written zeroes travel as data");
    assert_eq!(r.stats.hole_bytes, 4 * MIB, "the real hole is still a hole");
    assert_sparse_like(5 * MIB, 2, &dst.path().join("s0"));
    for name in ["s4k", "s0"] {
        assert_eq!(read_all(&dst.path().join(name)), read_all(&vol));
    }
}
