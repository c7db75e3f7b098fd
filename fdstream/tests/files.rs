//! Regular files end to end through two engines: sizes, holes, partial blocks, huge sparse
//! files, both directions.

mod common;

use common::*;
use fdstream::{DirProvider, FileReader, FileWriter, ReaderOptions, WriterOptions};
use std::path::Path;

/// Downloads `name` from a server over `src_dir` into `dst`, checks content and sparseness.
fn roundtrip(src_dir: &Path, name: &str, dst: &Path) -> engine::TransferReport {
    let pair = Pair::new(DirProvider::new(src_dir).unwrap());
    let report = pair.download(
        name,
        opts(),
        FileWriter::create(dst, WriterOptions::default()),
    );
    assert_eq!(report.result, Ok(()), "{name}");
    let src = src_dir.join(name);
    assert_same(&src, dst);
    let (data, n) = data_bytes(&src);
    assert_sparse_like(data, n, dst);
    assert!(temp_files(dst.parent().unwrap()).is_empty());
    report
}

#[test]
fn empty_file() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("empty"), 0, &[]);
    let out = dst.path().join("empty");
    let r = roundtrip(src.path(), "empty", &out);
    assert_eq!(r.size, 0);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
}

#[test]
fn all_hole() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("holes"), 100 * MIB, &[]);
    let out = dst.path().join("holes");
    let r = roundtrip(src.path(), "holes", &out);
    assert_eq!(r.stats.hole_bytes, 100 * MIB);
    assert_eq!(r.stats.data_bytes, 0);
    assert_eq!(allocated(&out), 0);
}

#[test]
fn all_data() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("dense"), 16 * MIB, &[(0, 16 * MIB)]);
    let out = dst.path().join("dense");
    let r = roundtrip(src.path(), "dense", &out);
    assert_eq!(r.stats.data_bytes, 16 * MIB);
    assert_eq!(read_all(&out), read_all(&src.path().join("dense")));
}

#[test]
fn data_hole_data_ending_in_a_partial_block() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 12345;
    sparse_file(
        &src.path().join("w4"),
        size,
        &[(0, 2 * MIB), (6 * MIB, size - 6 * MIB)],
    );
    let out = dst.path().join("w4");
    let r = roundtrip(src.path(), "w4", &out);
    assert_eq!(r.stats.hole_bytes, 4 * MIB);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(read_all(&out), read_all(&src.path().join("w4")));
}

#[test]
fn upload_data_hole_data_into_a_directory() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let size = 5 * MIB + 100;
    let path = src.path().join("up");
    sparse_file(&path, size, &[(0, MIB), (4 * MIB, MIB + 100)]);
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let r = pair.upload(
        "up",
        opts(),
        FileReader::open(&path, ReaderOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.hole_bytes, 3 * MIB);
    let out = dst.path().join("up");
    assert_eq!(read_all(&out), read_all(&path));
    let (data, n) = data_bytes(&path);
    assert_sparse_like(data, n, &out);
    // A second upload under the same name is refused unless OVERWRITE is asked for.
    let r = pair.upload(
        "up",
        opts(),
        FileReader::open(&path, ReaderOptions::default()),
    );
    assert_eq!(
        r.result.unwrap_err().reason,
        engine::proto::Reason::AlreadyExists
    );
    let r = pair.upload(
        "up",
        opts().with_overwrite(true),
        FileReader::open(&path, ReaderOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&path));
    assert!(temp_files(dst.path()).is_empty());
}

#[test]
fn one_tebibyte_apparent_with_64_mib_of_data() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let size = 1u64 << 40;
    let data: Vec<(u64, u64)> = (0..16u64)
        .map(|i| (i * (size / 16) + i * 12 * MIB, 4 * MIB))
        .collect();
    let path = src.path().join("huge");
    sparse_file(&path, size, &data);
    let out = dst.path().join("huge");
    let started = std::time::Instant::now();
    let r = roundtrip(src.path(), "huge", &out);
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    assert_eq!(r.stats.data_bytes, 64 * MIB);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
}

#[test]
fn provider_refuses_bad_names_and_lists_volumes() {
    let src = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("vol"), 3 * MIB, &[(0, MIB)]);
    sparse_file(&outside.path().join("secret"), 4096, &[(0, 4096)]);
    std::os::unix::fs::symlink(outside.path().join("secret"), src.path().join("link")).unwrap();
    let provider = DirProvider::new(src.path()).unwrap();
    let list = provider.list().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].name, "vol");
    assert_eq!(list[0].size, 3 * MIB);
    assert!(list[0].allocated >= MIB && list[0].allocated <= MIB + 8192);
    let pair = Pair::new(provider);
    // An empty name is not tried here: the engine's OPEN decoder rejects an empty name as a
    // malformed frame and closes the whole connection (reported to the engine's owner).
    for bad in ["../x", ".hidden", "a/b", "..", "."] {
        let w = FileWriter::create(outside.path().join("never"), WriterOptions::default());
        let r = pair.download(bad, opts(), w);
        assert_eq!(
            r.result.unwrap_err().reason,
            engine::proto::Reason::InvalidName,
            "{bad:?}"
        );
    }
    let r = pair.download(
        "link",
        opts(),
        FileWriter::create(outside.path().join("never"), WriterOptions::default()),
    );
    assert!(r.result.is_err(), "a symlink was followed");
    let r = pair.download(
        "missing",
        opts(),
        FileWriter::create(outside.path().join("never"), WriterOptions::default()),
    );
    assert_eq!(
        r.result.unwrap_err().reason,
        engine::proto::Reason::NotFound
    );
    assert!(!outside.path().join("never").exists());
    assert!(temp_files(outside.path()).is_empty());
}
