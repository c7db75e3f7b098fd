//! fdstream's test matrix (files, loop devices, per-stream options) with every volume's I/O in
//! a `volstream-iohelper` process, buffered and with O_DIRECT, on both sides of the
//! connection; and the results compared with in-process workers.

mod common;

use common::*;
use engine::proto::{OpenOptions, Reason};
use fdstream::{Backend, DirProvider, ReaderOptions, WriterOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Each case runs buffered and with O_DIRECT.
macro_rules! matrix {
    ($($name:ident),* $(,)?) => {
        mod buffered {
            $( #[test] fn $name() { super::$name(false) } )*
        }
        mod direct {
            $( #[test] fn $name() { super::$name(true) } )*
        }
    };
}

matrix!(
    empty_file,
    all_hole,
    all_data,
    data_hole_data_ending_in_a_partial_block,
    upload_data_hole_data_into_a_directory,
    one_tebibyte_apparent_with_64_mib_of_data,
    loop_device_source_finds_holes,
    loop_device_sink_with_old_data_reads_back_zero_in_holes,
    overwrite_allocated_file_in_place_punches_holes,
    allocated_gives_a_fully_allocated_copy,
    destination_is_zero_skips_hole_work,
    no_extents_reads_everything_and_still_detects_zeroes,
    zero_granularity_off_sends_written_zeroes_as_data,
);

fn server(dir: &Path, direct: bool) -> Pair {
    Pair::new(DirProvider::new(dir).unwrap().with_backend(helper(direct)))
}

/// Downloads `name` through helpers on both sides, checks content and sparseness.
fn roundtrip(direct: bool, src_dir: &Path, name: &str, dst: &Path) -> engine::TransferReport {
    let pair = server(src_dir, direct);
    let report = pair.download(
        name,
        opts(),
        helper(direct).create(dst, WriterOptions::default()),
    );
    assert_eq!(report.result, Ok(()), "{name}");
    let src = src_dir.join(name);
    assert_same(&src, dst);
    let (data, n) = data_bytes(&src);
    assert_sparse_like(data, n, dst);
    assert!(temp_files(dst.parent().unwrap()).is_empty());
    report
}

fn empty_file(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    sparse_file(&src.path().join("empty"), 0, &[]);
    let out = dst.path().join("empty");
    let r = roundtrip(direct, src.path(), "empty", &out);
    assert_eq!(r.size, 0);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
}

fn all_hole(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    sparse_file(&src.path().join("holes"), 100 * MIB, &[]);
    let out = dst.path().join("holes");
    let r = roundtrip(direct, src.path(), "holes", &out);
    assert_eq!(r.stats.hole_bytes, 100 * MIB);
    assert_eq!(r.stats.data_bytes, 0);
    assert_eq!(allocated(&out), 0);
}

fn all_data(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    sparse_file(&src.path().join("dense"), 16 * MIB, &[(0, 16 * MIB)]);
    let out = dst.path().join("dense");
    let r = roundtrip(direct, src.path(), "dense", &out);
    assert_eq!(r.stats.data_bytes, 16 * MIB);
    assert_eq!(read_all(&out), read_all(&src.path().join("dense")));
}

fn data_hole_data_ending_in_a_partial_block(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let size = 9 * MIB + 12345;
    sparse_file(
        &src.path().join("w4"),
        size,
        &[(0, 2 * MIB), (6 * MIB, size - 6 * MIB)],
    );
    let out = dst.path().join("w4");
    let r = roundtrip(direct, src.path(), "w4", &out);
    assert_eq!(r.stats.hole_bytes, 4 * MIB);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(read_all(&out), read_all(&src.path().join("w4")));
}

fn upload_data_hole_data_into_a_directory(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let size = 5 * MIB + 100;
    let path = src.path().join("up");
    sparse_file(&path, size, &[(0, MIB), (4 * MIB, MIB + 100)]);
    let pair = server(dst.path(), direct);
    let reader = || helper(direct).reader(&path, ReaderOptions::default());
    let r = pair.upload("up", opts(), reader());
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.hole_bytes, 3 * MIB);
    let out = dst.path().join("up");
    assert_eq!(read_all(&out), read_all(&path));
    let (data, n) = data_bytes(&path);
    assert_sparse_like(data, n, &out);
    let r = pair.upload("up", opts(), reader());
    assert_eq!(r.result.unwrap_err().reason, Reason::AlreadyExists);
    let r = pair.upload("up", opts().with_overwrite(true), reader());
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&path));
    assert!(temp_files(dst.path()).is_empty());
}

fn one_tebibyte_apparent_with_64_mib_of_data(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let size = 1u64 << 40;
    let data: Vec<(u64, u64)> = (0..16u64)
        .map(|i| (i * (size / 16) + i * 12 * MIB, 4 * MIB))
        .collect();
    sparse_file(&src.path().join("huge"), size, &data);
    let out = dst.path().join("huge");
    let started = std::time::Instant::now();
    let r = roundtrip(direct, src.path(), "huge", &out);
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    assert_eq!(r.stats.data_bytes, 64 * MIB);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
}

const DEV_DATA: [(u64, u64); 3] = [(0, MIB), (8 * MIB, 3 * MIB), (40 * MIB, 2 * MIB + 4096)];

fn loop_device_source_finds_holes(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let backing = src.path().join("backing");
    let size = 64 * MIB;
    sparse_file(&backing, size, &DEV_DATA);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let pair = server(dst.path(), direct);
    let reader = helper(direct).reader(&dev.path, ReaderOptions::default());
    let r = pair.upload("disk", opts(), reader);
    assert_eq!(r.result, Ok(()));
    let data: u64 = DEV_DATA.iter().map(|d| d.1).sum();
    assert_eq!(r.stats.data_bytes, data, "holes found by zero detection");
    assert_eq!(r.stats.hole_bytes, size - data);
    let out = dst.path().join("disk");
    assert_same(&backing, &out);
    assert_sparse_like(data, DEV_DATA.len(), &out);

    // The same device served by name through the provider, downloaded.
    let pair = Pair::new(
        DirProvider::new(dst.path())
            .unwrap()
            .with_device("dev", &dev.path)
            .with_backend(helper(direct)),
    );
    let out2 = dst.path().join("disk2");
    let r = pair.download(
        "dev",
        opts(),
        helper(direct).create(&out2, WriterOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_same(&backing, &out2);
    assert_sparse_like(data, DEV_DATA.len(), &out2);
}

fn loop_device_sink_with_old_data_reads_back_zero_in_holes(direct: bool) {
    let (src, work) = (scratch(direct), scratch(direct));
    let size = 48 * MIB;
    sparse_file(&src.path().join("vol"), size, &DEV_DATA);
    let backing = work.path().join("backing");
    let f = File::create(&backing).unwrap();
    f.write_all_at(&vec![0xAA; size as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let pair = server(src.path(), direct);
    let r = pair.download(
        "vol",
        opts(),
        helper(direct).in_place(&dev.path, overwriting(WriterOptions::default())),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&dev.path), read_all(&src.path().join("vol")));
    drop(dev);
    assert_eq!(read_all(&backing), read_all(&src.path().join("vol")));
    let data: u64 = DEV_DATA.iter().map(|d| d.1).sum();
    assert_sparse_like(data, DEV_DATA.len(), &backing);
}

fn overwrite_allocated_file_in_place_punches_holes(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let vol = options_source(src.path());
    let out = dst.path().join("old");
    filled(&out, 32 * MIB);
    let pair = server(src.path(), direct);
    let r = pair.download(
        "vol",
        opts(),
        helper(direct).in_place(&out, overwriting(WriterOptions::default())),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&vol));
    let (data, n) = data_bytes(&vol);
    assert_sparse_like(data, n, &out);
}

fn allocated_gives_a_fully_allocated_copy(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let vol = options_source(src.path());
    let pair = server(src.path(), direct);
    let o = opts().with_allocated(true);
    let out = dst.path().join("new");
    let r = pair.download(
        "vol",
        o,
        helper(direct).create(&out, fdstream::writer_options(&o)),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&vol));
    assert!(allocated(&out) >= OPTIONS_SIZE, "{}", allocated(&out));
    let old = dst.path().join("old");
    filled(&old, 16 * MIB);
    let r = pair.download(
        "vol",
        o,
        helper(direct).in_place(&old, overwriting(fdstream::writer_options(&o))),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&old), read_all(&vol));
    assert!(allocated(&old) >= OPTIONS_SIZE, "{}", allocated(&old));
}

fn destination_is_zero_skips_hole_work(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let vol = options_source(src.path());
    let pair = server(src.path(), direct);
    let o = opts().with_destination_is_zero(true);
    let out = dst.path().join("zeroed");
    File::create(&out).unwrap().set_len(OPTIONS_SIZE).unwrap();
    let r = pair.download(
        "vol",
        o,
        helper(direct).in_place(&out, overwriting(fdstream::writer_options(&o))),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&vol));
    let (data, n) = data_bytes(&vol);
    assert_sparse_like(data, n, &out);
    let lied = dst.path().join("lied");
    filled(&lied, OPTIONS_SIZE);
    let r = pair.download(
        "vol",
        o,
        helper(direct).in_place(&lied, overwriting(fdstream::writer_options(&o))),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&lied)[0], 0xAA, "hole at 0 was not touched");
    assert!(allocated(&lied) >= OPTIONS_SIZE);
}

fn no_extents_reads_everything_and_still_detects_zeroes(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let vol = options_source(src.path());
    let pair = server(dst.path(), direct);
    let reader = helper(direct).reader(
        &vol,
        ReaderOptions {
            no_extents: true,
            ..ReaderOptions::default()
        },
    );
    let r = pair.upload("vol", opts().with_no_extents(true), reader);
    assert_eq!(r.result, Ok(()));
    let (data, n) = data_bytes(&vol);
    assert_eq!(r.stats.data_bytes, data);
    let out = dst.path().join("vol");
    assert_eq!(read_all(&out), read_all(&vol));
    assert_sparse_like(data, n, &out);
}

fn zero_granularity_off_sends_written_zeroes_as_data(direct: bool) {
    let (src, dst) = (scratch(direct), scratch(direct));
    let vol = src.path().join("zeroes");
    sparse_file(&vol, 9 * MIB, &[(0, 2 * MIB), (8 * MIB, MIB)]);
    File::options()
        .write(true)
        .open(&vol)
        .unwrap()
        .write_all_at(&vec![0u8; 2 * MIB as usize], 2 * MIB)
        .unwrap();
    let pair = server(dst.path(), direct);
    let r = pair.upload(
        "s4k",
        opts(),
        helper(direct).reader(&vol, ReaderOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.data_bytes, 3 * MIB);
    assert_sparse_like(3 * MIB, 2, &dst.path().join("s4k"));
    let off = ReaderOptions {
        zero_granularity: 0,
        ..ReaderOptions::default()
    };
    let o = OpenOptions::default().with_zero_granularity(0);
    let r = pair.upload("s0", o, helper(direct).reader(&vol, off));
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.data_bytes, 5 * MIB, "written zeroes travel as data");
    assert_eq!(r.stats.hole_bytes, 4 * MIB, "the real hole is still a hole");
    assert_sparse_like(5 * MIB, 2, &dst.path().join("s0"));
    for name in ["s4k", "s0"] {
        assert_eq!(read_all(&dst.path().join(name)), read_all(&vol));
    }
}

/// The same downloads through in-process workers and through helpers (buffered and direct)
/// give byte-identical files with the same allocation.
#[test]
fn helpers_give_the_same_results_as_in_process_workers() {
    let src = scratch(true);
    let dst = scratch(true);
    type Spec = (&'static str, u64, Vec<(u64, u64)>);
    let files: [Spec; 4] = [
        ("a", 0, vec![]),
        (
            "b",
            9 * MIB + 12345,
            vec![(0, 2 * MIB), (6 * MIB, 3 * MIB + 12345)],
        ),
        ("c", 3 * MIB + 1, vec![(0, 3 * MIB + 1)]),
        ("d", 1 << 32, vec![(4096, 8192), (1 << 31, MIB + 7)]),
    ];
    for (name, size, data) in &files {
        sparse_file(&src.path().join(name), *size, data);
    }
    let backends = [
        ("inproc", Backend::InProcess),
        ("helper", helper(false)),
        ("direct", helper(true)),
    ];
    for (label, backend) in &backends {
        let pair = Pair::new(
            DirProvider::new(src.path())
                .unwrap()
                .with_backend(backend.clone()),
        );
        for (name, _, _) in &files {
            let out = dst.path().join(format!("{name}.{label}"));
            let r = pair.download(name, opts(), backend.create(&out, WriterOptions::default()));
            assert_eq!(r.result, Ok(()), "{name} via {label}");
        }
    }
    for (name, _, _) in &files {
        let reference = dst.path().join(format!("{name}.inproc"));
        assert_same(&src.path().join(name), &reference);
        for label in ["helper", "direct"] {
            let other = dst.path().join(format!("{name}.{label}"));
            assert_same(&reference, &other);
            assert_eq!(
                fdstream::extents(&reference).unwrap(),
                fdstream::extents(&other).unwrap(),
                "{name}: allocation via {label}"
            );
            assert_eq!(
                allocated(&reference),
                allocated(&other),
                "{name} via {label}"
            );
        }
    }
}
