//! `--direct` in process (no `--iohelper`): the copy is written around the page cache, so once
//! the download has finished none of the destination's pages are resident (mincore), even with
//! an unaligned tail and chunks that arrive in unaligned memory. Without `--direct` they are,
//! which shows that the check can see cached pages on this file system.

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Pages of `path` in the page cache, and its pages in all, by mmap and mincore.
fn resident_pages(path: &Path) -> (usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of a file we hold open, unmapped below; mincore
    // writes one byte per page into a vector of that many bytes.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        (vec.iter().filter(|&&b| b & 1 == 1).count(), pages)
    }
}

#[test]
fn direct_downloads_leave_nothing_of_the_copy_in_the_page_cache() {
    let dir = TempDir::new("direct");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    // Data runs, holes, and a tail that is not a multiple of any block size.
    let size = 24 * MIB + 1234;
    let data = [
        (0, 5 * MIB + 512),
        (9 * MIB, 3 * MIB),
        (20 * MIB, 4 * MIB + 1234),
    ];
    sparse_file(&pool.join("vol"), size, &data, 11);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    let mut cases: Vec<(&str, &[&str])> = vec![("buffered", &[]), ("direct", &["--direct"])];
    if iohelper_built() {
        cases.push(("iohelper", &["--direct", "--iohelper"]));
    } else {
        println!("no volstream-iohelper binary: the --iohelper case is not run");
    }
    let mut resident = Vec::new();
    for (name, extra) in cases {
        let dest = dir.join(name);
        let out = run(bin()
            .args(["download", "--connect", &listen])
            .args(extra)
            .arg("vol")
            .arg(&dest));
        assert!(out.status.success(), "{name}: {:?}", stderr_lines(&out));
        // Before anything reads it back.
        let (cached, pages) = resident_pages(&dest);
        println!("{name}: {cached} of {pages} pages of the copy in the page cache");
        resident.push(cached);
        assert_same_sparse(&pool.join("vol"), &dest);
    }
    assert!(
        resident[0] > 0,
        "a buffered copy should be cached: the check sees nothing"
    );
    assert!(
        resident[1..].iter().all(|&n| n == 0),
        "--direct left pages of the copy in the page cache: {resident:?}"
    );
}
