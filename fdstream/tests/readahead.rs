//! Read-ahead is bounded for the whole process, not only per stream: hundreds of readers whose
//! loop takes nothing must not each hold their full read-ahead.

mod common;

use common::*;
use engine::{Notify, VolumeReader};
use fdstream::{read_ahead_bytes, FileReader, ReaderOptions};
use std::time::{Duration, Instant};

#[test]
fn many_idle_readers_share_one_read_ahead_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dense");
    sparse_file(&path, 16 * MIB, &[(0, 16 * MIB)]);
    let readers: Vec<FileReader> = (0..200)
        .map(|_| {
            let mut r = FileReader::open(&path, ReaderOptions::default());
            r.start(Notify::noop());
            r
        })
        .collect();
    // Let the workers read ahead as far as they are allowed; nobody takes anything.
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = read_ahead_bytes();
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let held = read_ahead_bytes();
    // 64 MiB for all, plus one read each while the total crossed the line; without the shared
    // budget every reader would hold its own 4 MiB: 800 MiB.
    assert!(held > 16 * MIB, "the readers did read ahead: {held}");
    assert!(
        held <= 160 * MIB,
        "{held} bytes read ahead by 200 idle readers"
    );
    drop(readers);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_ahead_bytes(),
        0,
        "dropped readers give their read-ahead back"
    );
}
