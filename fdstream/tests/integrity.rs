//! A proxy between client and server flips one byte inside a DATA frame: the receiver's digest
//! check must fail and nothing may be committed under the volume's name.

mod common;

use common::*;
use engine::proto::frame::{HEADER_LEN, HELLO_LEN};
use engine::proto::{OpenOptions, Reason};
use engine::{Address, Engine, EngineConfig};
use fdstream::{DirProvider, FileReader, FileWriter, ReaderOptions, WriterOptions};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const DATA: u8 = 4;

/// Copies `from` to `to`, flipping one payload byte of the `nth` DATA frame bigger than 64 KiB.
fn pump(mut from: UnixStream, mut to: UnixStream, corrupt: bool) {
    let mut pending = Vec::new();
    let mut parsed = 0; // bytes of `pending` already forwarded
    let mut hello_done = false;
    let mut flipped = !corrupt;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            let rest = &mut pending[parsed..];
            if !hello_done {
                if rest.len() < HELLO_LEN {
                    break;
                }
                hello_done = true;
                parsed += HELLO_LEN;
                continue;
            }
            if rest.len() < HEADER_LEN {
                break;
            }
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            if rest.len() < HEADER_LEN + len {
                break;
            }
            if !flipped && rest[4] == DATA && len > 64 * 1024 {
                // Past the header and the 8-byte offset, in the middle of the payload.
                rest[HEADER_LEN + 8 + len / 2] ^= 0x40;
                flipped = true;
            }
            parsed += HEADER_LEN + len;
        }
        if to.write_all(&pending[..parsed]).is_err() {
            break;
        }
        pending.drain(..parsed);
        parsed = 0;
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A proxy in front of `server` that corrupts the direction(s) asked for.
fn proxy(dir: &Path, server: &Address, to_server: bool, to_client: bool) -> Address {
    let path = dir.join("proxy.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let Address::Unix(server) = server.clone() else {
        unreachable!()
    };
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let upstream = UnixStream::connect(&server).unwrap();
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || pump(client, upstream, to_server));
            std::thread::spawn(move || pump(u2, c2, to_client));
        }
    });
    Address::Unix(path)
}

struct Setup {
    _dir: tempfile::TempDir,
    pool: std::path::PathBuf,
    local: std::path::PathBuf,
    server: engine::EngineHandle,
    server_addr: Address,
}

fn setup() -> Setup {
    init_log();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = dir.path().join("pool");
    let local = dir.path().join("local");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    sparse_file(&pool.join("vol"), 8 * MIB, &[(0, 2 * MIB), (5 * MIB, MIB)]);
    sparse_file(&local.join("src"), 8 * MIB, &[(MIB, 3 * MIB)]);
    let (server, _t) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, server_addr) = server
        .listen(
            &Address::Unix(dir.path().join("server.sock")),
            Arc::new(DirProvider::new(&pool).unwrap()),
        )
        .unwrap();
    Setup {
        pool,
        local,
        server,
        server_addr,
        _dir: dir,
    }
}

#[test]
fn flipped_byte_in_an_upload_is_caught_and_not_committed() {
    let s = setup();
    let addr = proxy(s.local.parent().unwrap(), &s.server_addr, true, false);
    let (client, _t) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let reader = FileReader::open(s.local.join("src"), ReaderOptions::default());
    let report = client
        .upload(conn, "uploaded", OpenOptions::default(), Box::new(reader))
        .recv_timeout(Duration::from_secs(30))
        .unwrap();
    let err = report.result.expect_err("corruption must be detected");
    assert_eq!(err.reason, Reason::DigestMismatch, "{err}");
    assert!(!s.pool.join("uploaded").exists(), "nothing committed");
    assert!(
        temp_files(&s.pool).is_empty(),
        "no temporary left: {:?}",
        temp_files(&s.pool)
    );
    client.shutdown();
    s.server.shutdown();
}

#[test]
fn flipped_byte_in_a_download_is_caught_and_not_committed() {
    let s = setup();
    let addr = proxy(s.local.parent().unwrap(), &s.server_addr, false, true);
    let (client, _t) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let dst = s.local.join("downloaded");
    let writer = FileWriter::create(&dst, WriterOptions::default());
    let report = client
        .download(conn, "vol", OpenOptions::default(), Box::new(writer))
        .recv_timeout(Duration::from_secs(30))
        .unwrap();
    let err = report.result.expect_err("corruption must be detected");
    assert_eq!(err.reason, Reason::DigestMismatch, "{err}");
    assert!(!dst.exists(), "nothing committed");
    assert!(
        temp_files(&s.local).is_empty(),
        "{:?}",
        temp_files(&s.local)
    );

    // The same download without corruption works: the check is not failing everything.
    let direct = client.connect(&s.server_addr).unwrap();
    let writer = FileWriter::create(&dst, WriterOptions::default());
    let report = client
        .download(direct, "vol", OpenOptions::default(), Box::new(writer))
        .recv_timeout(Duration::from_secs(30))
        .unwrap();
    assert_eq!(report.result, Ok(()));
    assert_same(&s.pool.join("vol"), &dst);
    client.shutdown();
    s.server.shutdown();
}
