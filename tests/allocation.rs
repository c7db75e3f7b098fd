//! Allocation of copies on real XFS, btrfs and ext4, each made by the test on a loop device:
//! a 4 GiB file of 2,000 small data pieces is downloaded (in process, through the iohelper,
//! in place) and uploaded (in process and through the iohelper on the server), and every copy
//! must allocate what the source allocates, within one file system block per extent. XFS
//! preallocates beyond EOF when a write extends a file, so a sink that grows its file by
//! writing instead of sizing it first ends up about twice as large there.

mod common;

use common::*;

const SIZE: u64 = 4 << 30;
const PIECES: u64 = 2000;

/// Pieces of 4-64 KiB, one in each 1/PIECES of the file at a pseudo-random aligned place.
fn pieces() -> Vec<(u64, u64)> {
    let gap = SIZE / PIECES;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..PIECES)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 4096 * (1 + x % 16);
            let at = (x >> 8) % (gap - len) / 4096 * 4096;
            (i * gap + at, len)
        })
        .collect()
}

fn copies_allocate_like_the_source(fs: &str) {
    let work = TempDir::new(&format!("alloc-{fs}"));
    let Some(m) = Mounted::new(fs, &work.0, 3 << 30) else {
        return;
    };
    let (pool, local) = (m.join("pool"), m.join("local"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    let src = pool.join("src");
    sparse_file(&src, SIZE, &pieces(), 5);
    std::fs::File::open(&src).unwrap().sync_all().unwrap();
    let extents = data_extents(&src).len() as u64;
    let helper = iohelper_built();

    let listen = format!("unix:{}", work.join("s.sock").display());
    let helper_listen = format!("unix:{}", work.join("h.sock").display());
    let _server = Server::start(&pool, &listen);
    let _helper_server = helper.then(|| Server::start_with(&pool, &helper_listen, &["--iohelper"]));

    let mut copies = Vec::new();
    let mut transfer = |what: &str, args: &[&str], dest: std::path::PathBuf| {
        let out = run(bin().args(args));
        assert!(
            out.status.success(),
            "{fs} {what}: {:?}",
            stderr_lines(&out)
        );
        copies.push((what.to_owned(), dest));
    };
    let path = |p: &std::path::Path| p.display().to_string();
    let dl = local.join("dl");
    transfer(
        "download",
        &["download", "--connect", &listen, "src", &path(&dl)],
        dl.clone(),
    );
    let inplace = local.join("inplace");
    std::fs::File::create(&inplace).unwrap();
    transfer(
        "download --in-place",
        &[
            "download",
            "--in-place",
            "--overwrite",
            "--connect",
            &listen,
            "src",
            &path(&inplace),
        ],
        inplace,
    );
    transfer(
        "upload",
        &["upload", "--connect", &listen, &path(&dl), "up"],
        pool.join("up"),
    );
    if helper {
        let dlh = local.join("dl-helper");
        transfer(
            "download --iohelper",
            &[
                "download",
                "--iohelper",
                "--connect",
                &listen,
                "src",
                &path(&dlh),
            ],
            dlh,
        );
        transfer(
            "upload to serve --iohelper",
            &[
                "upload",
                "--connect",
                &helper_listen,
                &path(&dl),
                "up-helper",
            ],
            pool.join("up-helper"),
        );
    }

    let have = allocated(&src);
    let slack = m.block() * extents;
    let mut worst: f64 = 1.0;
    let mut bad = Vec::new();
    for (what, copy) in &copies {
        assert_same_sparse(&src, copy);
        let got = allocated(copy);
        let ratio = got as f64 / have as f64;
        println!("{fs}: {what}: {got} bytes allocated, source {have} (ratio {ratio:.3})");
        if (ratio - 1.0).abs() > (worst - 1.0).abs() {
            worst = ratio;
        }
        if got.abs_diff(have) > slack {
            bad.push(format!("{what}: {got} vs {have} (ratio {ratio:.3})"));
        }
    }
    println!(
        "ALLOCATION RATIO {fs}: {worst:.3} (worst copy of {} over {extents} extents; allowed +-{slack} bytes)",
        copies.len()
    );
    assert!(
        bad.is_empty(),
        "{fs}: copies allocate more than the source plus one block per extent: {bad:?}"
    );
}

#[test]
fn copies_on_xfs_allocate_like_the_source() {
    copies_allocate_like_the_source("xfs");
}

#[test]
fn copies_on_btrfs_allocate_like_the_source() {
    copies_allocate_like_the_source("btrfs");
}

#[test]
fn copies_on_ext4_allocate_like_the_source() {
    copies_allocate_like_the_source("ext4");
}
