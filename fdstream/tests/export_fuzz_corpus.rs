//! Replays the nbd_export fuzz corpus (../fuzz/corpus/nbd_export) through the code the target
//! runs — the whole export server over a real socket — and keeps the hand-made seeds current:
//! `VOLSTREAM_WRITE_SEEDS=1 cargo test --release -p volstream-fdstream --test export_fuzz_corpus`.
//! The seeds are hostile clients (bad magic, oversized lengths, unknown options, requests past
//! the end) next to a good session, each with what the server must have answered.

#[path = "../../fuzz/src/nbd_export.rs"]
mod harness;

use harness::build::*;
use harness::{drive_export, PIECES, VOLUME, VOLUME_SIZE};
use nbd::wire::*;
use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_export")
}

/// What a seed must get back: (greeted, a transmission-phase reply).
fn seeds() -> Vec<(&'static str, Vec<u8>, bool, bool)> {
    let n = negotiated;
    let write = {
        let mut w = request(CMD_WRITE, 0, 3, 8192, 512);
        w.extend_from_slice(&[0xa5; 512]);
        w
    };
    vec![
        (
            "session",
            [
                n(),
                request(CMD_READ, 0, 1, 0, 65536),
                request(CMD_BLOCK_STATUS, 0, 2, 0, VOLUME_SIZE as u32),
                write,
                request(CMD_WRITE_ZEROES, 0, 4, 0, 4096),
                request(CMD_FLUSH, 0, 5, 0, 0),
                request(CMD_DISC, 0, 6, 0, 0),
            ]
            .concat(),
            true,
            true,
        ),
        ("bad_client_flags", vec![0xff; 4], true, false),
        (
            "bad_option_magic",
            [flags(), b"NOTOPTS!".to_vec(), vec![0; 8]].concat(),
            true,
            false,
        ),
        (
            "oversized_option",
            [
                flags(),
                IHAVEOPT.to_be_bytes().to_vec(),
                OPT_GO.to_be_bytes().to_vec(),
                u32::MAX.to_be_bytes().to_vec(),
            ]
            .concat(),
            true,
            false,
        ),
        (
            "unknown_option_then_session",
            [
                flags(),
                option(0x7777, b"what"),
                option(
                    OPT_LIST_META_CONTEXT,
                    &meta_context(VOLUME, &["qemu:nothing"]),
                ),
                n()[4..].to_vec(),
                request(CMD_READ, 0, 1, 0, 512),
            ]
            .concat(),
            true,
            true,
        ),
        (
            "unknown_export",
            [flags(), go("nothing-here")].concat(),
            true,
            false,
        ),
        (
            "read_past_the_end",
            [
                n(),
                request(CMD_READ, 0, 1, VOLUME_SIZE - 512, 4096),
                request(CMD_READ, 0, 2, u64::MAX - 10, 512),
            ]
            .concat(),
            true,
            true,
        ),
        (
            "oversized_write",
            [n(), request(CMD_WRITE, 0, 1, 0, u32::MAX), vec![0; 64]].concat(),
            true,
            false,
        ),
        (
            "bad_request_magic",
            [n(), vec![0x25, 0x60, 0x95, 0x14], vec![0; 24]].concat(),
            true,
            false,
        ),
        (
            "unknown_command",
            [
                n(),
                request(0x4242, 0, 1, 0, 512),
                request(CMD_READ, 0, 2, 0, 512),
            ]
            .concat(),
            true,
            true,
        ),
    ]
}

/// The seeds first (written when asked), then every corpus file: one test, since the
/// replay must see the seeds as written.
#[test]
fn seeds_behave_and_every_corpus_file_replays() {
    let write = std::env::var_os("VOLSTREAM_WRITE_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(corpus()).unwrap();
    }
    for (name, bytes, greeted, replied) in seeds() {
        let path = corpus().join(format!("{name}.bin"));
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).ok().as_deref(),
            Some(&bytes[..]),
            "{} is stale: regenerate with VOLSTREAM_WRITE_SEEDS=1",
            path.display()
        );
        let got = drive_export(&bytes, PIECES);
        assert_eq!(
            (got.greeted, got.replied),
            (greeted, replied),
            "{name}: {got:?}"
        );
    }
    let mut files: Vec<_> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= seeds().len(), "{files:?}");
    for path in files {
        eprintln!("replaying {}", path.display());
        let got = drive_export(&std::fs::read(&path).unwrap(), PIECES);
        assert!(got.greeted, "{}: {got:?}", path.display());
    }
    let _ = std::fs::remove_dir_all(harness::scratch_dir());
}
