//! Replays the NBD fuzz corpora (../fuzz/corpus/nbd_client, nbd_server) through the code the
//! fuzz targets run, and keeps the recorded seeds current.
//!
//! To regenerate the seeds after a codec change:
//! `VOLSTREAM_WRITE_SEEDS=1 cargo test -p volstream-nbd --test fuzz_corpus`.

#[path = "../../fuzz/src/nbd.rs"]
mod harness;

use bytes::BytesMut;
use harness::{client_commands, drive_client, drive_server, export_info, serve, PIECES};
use nbd::wire::*;
use nbd::{
    Client, ClientHandshake, ClientOptions, Cookie, HandshakeEvent, Reply, Server, ServerHandshake,
};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// Our client and server, talking as the fuzz targets' halves do; returns what each side sent
/// (client bytes, server bytes). `structured` false makes the server refuse structured
/// replies.
fn record(export: &str, structured: bool, rounds: usize) -> (Vec<u8>, Vec<u8>) {
    let mut hs = ClientHandshake::new(ClientOptions {
        export: export.into(),
        contexts: vec![
            CONTEXT_BASE_ALLOCATION.into(),
            CONTEXT_ALLOCATION_DEPTH.into(),
        ],
    })
    .unwrap();
    let mut shs = ServerHandshake::new();
    if !structured {
        shs = shs.without_structured_replies();
    }
    let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
    let (mut c_in, mut s_in) = (BytesMut::new(), BytesMut::new());
    let (mut client, mut server): (Option<Client>, Option<Server>) = (None, None);
    let commands = client_commands();
    let (mut next, mut requests) = (0, 0);
    let mut open: HashSet<Cookie> = HashSet::new();
    for _ in 0..rounds {
        // Server side.
        match server.as_mut() {
            None => loop {
                match shs.handle_input(&mut s_in).unwrap() {
                    Some(HandshakeEvent::Lookup { .. }) => {
                        if let Some(HandshakeEvent::Ready(e)) =
                            shs.answer(Ok(export_info())).unwrap()
                        {
                            server = Some(Server::new(e, 4));
                            break;
                        }
                    }
                    Some(HandshakeEvent::List) => shs.answer_list(&[]).unwrap(),
                    Some(HandshakeEvent::Ready(_)) => unreachable!(),
                    None => break,
                }
            },
            Some(s) => {
                while let Some(req) = s.decode(&mut s_in).unwrap() {
                    requests += 1;
                    serve(s, req, requests);
                }
            }
        }
        while let Some(b) = shs.poll_transmit() {
            s2c.extend_from_slice(&b);
            c_in.extend_from_slice(&b);
        }
        if let Some(s) = server.as_mut() {
            while let Some(b) = s.poll_transmit() {
                s2c.extend_from_slice(&b);
                c_in.extend_from_slice(&b);
            }
        }
        // Client side.
        match client.as_mut() {
            None => {
                if let Some(e) = hs.handle_input(&mut c_in).unwrap() {
                    client = Some(Client::new(e, 4));
                }
            }
            Some(c) => {
                while let Some(r) = c.decode(&mut c_in).unwrap() {
                    if let Reply::Done { cookie, .. } = r {
                        open.remove(&cookie);
                    }
                }
            }
        }
        while let Some(b) = hs.poll_transmit() {
            c2s.extend_from_slice(&b);
            s_in.extend_from_slice(&b);
        }
        if let Some(c) = client.as_mut() {
            let mut tries = 0;
            while c.can_send() && tries < commands.len() {
                let cmd = commands[next % commands.len()].clone();
                next += 1;
                tries += 1;
                if let Ok(k) = c.send(cmd) {
                    open.insert(k);
                }
            }
            while let Some(b) = c.poll_transmit() {
                c2s.extend_from_slice(&b);
                s_in.extend_from_slice(&b);
            }
        }
    }
    (c2s, s2c)
}

fn write_seeds_if_asked() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("VOLSTREAM_WRITE_SEEDS").is_none() {
            return;
        }
        for (name, export, structured, rounds) in [
            ("session", "disk", true, 12),
            ("simple_replies", "disk", false, 8),
            ("unknown_export", "xnope", true, 6),
        ] {
            let (c2s, s2c) = record(export, structured, rounds);
            fs::write(corpus("nbd_server").join(format!("{name}.bin")), c2s).unwrap();
            fs::write(corpus("nbd_client").join(format!("{name}.bin")), s2c).unwrap();
        }
    });
}

#[test]
fn client_corpus_replays() {
    write_seeds_if_asked();
    let all = files(&corpus("nbd_client"));
    assert!(!all.is_empty());
    for (path, data) in all {
        let out = drive_client(&data, PIECES);
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "session.bin" {
            assert!(out.negotiated && out.completed >= 8, "{name}: {out:?}");
        }
        if name == "simple_replies.bin" {
            assert!(out.negotiated && out.completed >= 2, "{name}: {out:?}");
        }
    }
}

#[test]
fn server_corpus_replays() {
    write_seeds_if_asked();
    let all = files(&corpus("nbd_server"));
    assert!(!all.is_empty());
    for (path, data) in all {
        let out = drive_server(&data, PIECES);
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "session.bin" {
            assert!(out.ready && out.requests >= 8, "{name}: {out:?}");
        }
        if name == "unknown_export.bin" {
            assert!(!out.ready, "{name}: {out:?}");
        }
    }
}

#[test]
fn the_recorded_session_holds_every_kind_of_request() {
    let (c2s, _) = record("disk", true, 12);
    // Every command the client target uses went out.
    for cmd in [CMD_READ, CMD_BLOCK_STATUS, CMD_FLUSH, CMD_WRITE_ZEROES] {
        let code = cmd.to_be_bytes();
        let found = c2s
            .windows(8)
            .any(|w| w[..4] == REQUEST_MAGIC.to_be_bytes() && w[6..8] == code);
        assert!(found, "no {}", command_name(cmd));
    }
}
