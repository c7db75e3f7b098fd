//! Replays the cargo-fuzz corpus (../fuzz/corpus/*/) through the code the fuzz targets run, and
//! keeps the hand-made seeds in that corpus current.
//!
//! To regenerate the seeds after a wire-format change:
//! `VOLSTREAM_WRITE_SEEDS=1 cargo test -p volstream-engine --test fuzz_corpus`.

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use bytes::{Bytes, BytesMut};
use engine::proto::{ConnError, Features, Frame, Hello, Op, OpenOptions, Reason, StreamId};
use engine::{Digest, Range};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

/// Every file of one corpus directory, sorted by name.
fn corpus_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

/// With `VOLSTREAM_WRITE_SEEDS` set, (re)writes the seed files, once, before any test reads the
/// corpus.
fn write_seeds_if_asked() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("VOLSTREAM_WRITE_SEEDS").is_none() {
            return;
        }
        for (target, name, bytes, _) in seeds() {
            let dir = corpus_root().join(target);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
        }
    });
}

#[test]
fn every_corpus_file_replays_through_both_targets() {
    write_seeds_if_asked();
    let mut dirs: Vec<PathBuf> = fs::read_dir(corpus_root())
        .expect("fuzz corpus directory")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"decode_frame".to_owned()) && names.contains(&"handshake".to_owned()),
        "corpus directories: {names:?}"
    );
    let mut total = 0;
    let mut frames = 0;
    let mut connected = 0;
    let mut records = 0;
    for dir in &dirs {
        let files = corpus_files(dir);
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for (path, bytes) in files {
            // A panic here names the file through the assertion messages of the harness; say
            // which file first so the failure is easy to reproduce.
            eprintln!("replaying {}", path.display());
            frames += harness::decode_frames(&bytes, harness::DECODE_MAX);
            connected += harness::drive_server(&bytes, harness::PIECES).connected as usize;
            harness::metrics_request(&bytes);
            records += harness::decode_block_map(&bytes).is_some() as usize;
            total += 1;
        }
    }
    assert!(total >= 24, "only {total} corpus files");
    // The corpus is not all noise: it holds decodable frames and successful handshakes.
    assert!(frames > 0);
    assert!(connected > 0);
    assert!(
        records > 0,
        "no block digest document in the corpus decodes"
    );
}

// ---- the seeds ----

/// What the connection harness must report for a handshake seed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Decode seeds: this many frames decode.
    Frames(usize),
    /// Block digest documents: this many records decode, or (`None`) the document is refused.
    Records(Option<usize>),
    /// The handshake fails.
    Refused,
    /// Handshake done, `completed` streams completed, then the connection ended with `error`.
    Ends { completed: usize, error: ErrorKind },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ErrorKind {
    PeerClosed,
    Decode,
    Protocol,
    FlowControl,
    Clean,
}

fn error_kind(error: &Option<ConnError>) -> Option<ErrorKind> {
    Some(match error.as_ref() {
        None => ErrorKind::Clean,
        Some(ConnError::PeerClosed) => ErrorKind::PeerClosed,
        Some(ConnError::Decode(_)) => ErrorKind::Decode,
        Some(ConnError::Protocol(_)) => ErrorKind::Protocol,
        Some(ConnError::FlowControl(_)) => ErrorKind::FlowControl,
        Some(_) => return None,
    })
}

fn enc(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for frame in frames {
        frame.encode(&mut out);
    }
    out.to_vec()
}

fn hello(h: &Hello) -> Vec<u8> {
    let mut out = BytesMut::new();
    h.encode(&mut out);
    out.to_vec()
}

fn client(frames: &[Frame]) -> Vec<u8> {
    let mut out = hello(&harness::client_hello());
    out.extend(enc(frames));
    out
}

fn open(id: u32, op: Op, size: u64, name: &str) -> Frame {
    Frame::Open {
        stream: StreamId(id),
        op,
        options: OpenOptions::default(),
        size,
        name: name.into(),
    }
}

fn data(id: u32, offset: u64, payload: &'static [u8]) -> Frame {
    Frame::Data {
        stream: StreamId(id),
        offset,
        payload: Bytes::from_static(payload),
    }
}

/// The seeds: (corpus directory, file name, bytes, expected outcome).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>, Expect)> {
    let s = StreamId;
    let mut digest = Digest::new();
    digest.update(b"hello, volume");
    digest.update_zeroes(4096);
    let upload = [
        open(1, Op::Write, 13 + 4096, "vol"),
        data(1, 0, b"hello, volume"),
        Frame::Hole {
            stream: s(1),
            offset: 13,
            len: 4096,
        },
        Frame::Finish {
            stream: s(1),
            length: 13 + 4096,
            digest: Some(digest.value()),
            ack: false,
        },
    ];
    let every_kind = vec![
        ("open", upload[0].clone()),
        (
            "accept",
            Frame::Accept {
                stream: s(2),
                size: 1 << 30,
                identity: None,
            },
        ),
        (
            "accept-identity",
            Frame::Accept {
                stream: s(2),
                size: 1 << 30,
                identity: engine::VolumeIdentity::new([0x5a; 40]),
            },
        ),
        (
            "reject",
            Frame::Reject {
                stream: s(3),
                reason: Reason::NotFound,
                message: "no such volume".into(),
            },
        ),
        ("data", upload[1].clone()),
        ("hole", upload[2].clone()),
        (
            "window",
            Frame::Window {
                stream: s(0),
                increment: 65_536,
            },
        ),
        ("finish", upload[3].clone()),
        (
            "finish_ack",
            Frame::Finish {
                stream: s(1),
                length: 4109,
                digest: None,
                ack: true,
            },
        ),
        (
            "abort",
            Frame::Abort {
                stream: s(5),
                reason: Reason::Other(77),
                message: "stopped ✋".into(),
            },
        ),
        ("ping", Frame::Ping { data: 42 }),
        ("pong", Frame::Pong { data: 42 }),
        (
            "goaway",
            Frame::GoAway {
                last_stream: s(7),
                reason: Reason::GoingAway,
                message: "bye".into(),
            },
        ),
        (
            "ranges",
            Frame::Ranges {
                stream: s(1),
                last: true,
                ranges: vec![Range::new(0, 4096), Range::new(8192, 100)],
            },
        ),
    ];
    let mut out = Vec::new();
    for (name, frame) in &every_kind {
        out.push((
            "decode_frame",
            *name,
            enc(std::slice::from_ref(frame)),
            Expect::Frames(1),
        ));
    }
    let all: Vec<Frame> = every_kind.iter().map(|(_, f)| f.clone()).collect();
    out.push((
        "decode_frame",
        "sequence",
        enc(&all),
        Expect::Frames(all.len()),
    ));
    let mut truncated = enc(&upload);
    truncated.truncate(truncated.len() - 5);
    out.push(("decode_frame", "truncated", truncated, Expect::Frames(3)));
    // A DATA header announcing a body far beyond the limit, and nothing after it.
    let mut oversized = enc(&[data(1, 0, b"x")]);
    oversized[..4].copy_from_slice(&(harness::DECODE_MAX + 1).to_be_bytes());
    oversized.truncate(12);
    out.push((
        "decode_frame",
        "oversized_header",
        oversized,
        Expect::Frames(0),
    ));
    // A PING whose reserved header bits are set.
    let mut reserved = enc(&[Frame::Ping { data: 1 }]);
    reserved[7] = 1;
    out.push(("decode_frame", "reserved_bits", reserved, Expect::Frames(0)));
    // An OPEN whose name is not UTF-8.
    let mut bad_name = enc(&[open(1, Op::Read, 0, "abc")]);
    let end = bad_name.len();
    bad_name[end - 2] = 0xFF;
    out.push(("decode_frame", "bad_name", bad_name, Expect::Frames(0)));
    out.push((
        "decode_frame",
        "garbage",
        b"\x00\x00\x00\x08\x63\xff\x00\x00\xde\xad\xbe\xef garbage".to_vec(),
        Expect::Frames(0),
    ));

    let ends = |completed, error| Expect::Ends { completed, error };
    out.push((
        "handshake",
        "hello_only",
        client(&[]),
        ends(0, ErrorKind::PeerClosed),
    ));
    out.push((
        "handshake",
        "upload",
        client(&upload),
        ends(1, ErrorKind::PeerClosed),
    ));
    let download = [
        open(1, Op::Read, 0, "disk"),
        Frame::Window {
            stream: s(1),
            increment: 8192,
        },
        Frame::Finish {
            stream: s(1),
            length: harness::SOURCE_LEN,
            digest: None,
            ack: true,
        },
        Frame::GoAway {
            last_stream: s(0),
            reason: Reason::GoingAway,
            message: String::new(),
        },
    ];
    out.push((
        "handshake",
        "download_then_goaway",
        client(&download),
        ends(1, ErrorKind::Clean),
    ));
    out.push((
        "handshake",
        "rejected_open",
        client(&[open(1, Op::Write, 10, "xvol"), Frame::Ping { data: 9 }]),
        ends(0, ErrorKind::PeerClosed),
    ));
    out.push((
        "handshake",
        "ping_pong",
        client(&[Frame::Ping { data: 1 }, Frame::Pong { data: 1 }]),
        ends(0, ErrorKind::PeerClosed),
    ));
    // Content past the announced size: the stream is aborted, the connection goes on. (This
    // input returned the chunk's connection credit twice before that was fixed.)
    out.push((
        "handshake",
        "chunk_past_end",
        client(&[open(1, Op::Write, 0, "vol"), data(1, 0, b"\0")]),
        ends(0, ErrorKind::PeerClosed),
    ));
    out.push((
        "handshake",
        "unknown_stream",
        client(&[data(9, 0, b"abc")]),
        ends(0, ErrorKind::Protocol),
    ));
    // Five HOLEs in one read cost 5 * 4096, more than the 16 KiB stream window.
    let mut holes = vec![open(1, Op::Write, 1 << 20, "vol")];
    holes.extend((0..5).map(|offset| Frame::Hole {
        stream: s(1),
        offset,
        len: 1,
    }));
    out.push((
        "handshake",
        "flow_violation",
        client(&holes),
        ends(0, ErrorKind::FlowControl),
    ));
    let too_many: Vec<Frame> = (0..9)
        .map(|k| open(2 * k + 1, Op::Write, 100, "vol"))
        .collect();
    out.push((
        "handshake",
        "too_many_streams",
        client(&too_many),
        ends(0, ErrorKind::Protocol),
    ));
    let mut garbage_after_hello = client(&[]);
    garbage_after_hello.extend_from_slice(b"\x00\x00\x00\x04\x2a\x00\x00\x00\x00\x00\x00\x01zzzz");
    out.push((
        "handshake",
        "garbage_after_hello",
        garbage_after_hello,
        ends(0, ErrorKind::Decode),
    ));
    let mut bad_magic = client(&[]);
    bad_magic[3] = b'X';
    out.push(("handshake", "bad_magic", bad_magic, Expect::Refused));
    let newer = Hello {
        version_min: 2,
        version_max: 3,
        ..harness::client_hello()
    };
    out.push((
        "handshake",
        "version_mismatch",
        hello(&newer),
        Expect::Refused,
    ));
    let tiny = Hello {
        stream_window: 100,
        ..harness::client_hello()
    };
    out.push(("handshake", "small_window", hello(&tiny), Expect::Refused));
    let plain = Hello {
        features: Features(0),
        ..harness::client_hello()
    };
    let mut no_sparse = hello(&plain);
    no_sparse.extend(enc(&upload));
    out.push((
        "handshake",
        "hole_without_sparse",
        no_sparse,
        ends(0, ErrorKind::Protocol),
    ));
    // The priority class needs the PRIORITY feature from both Hellos.
    let mut priority_unnegotiated = hello(&plain);
    priority_unnegotiated.extend(enc(&[Frame::Open {
        stream: StreamId(1),
        op: Op::Read,
        options: OpenOptions::default().with_priority(true),
        size: 0,
        name: "vol".into(),
    }]));
    out.push((
        "handshake",
        "priority_without_the_feature",
        priority_unnegotiated,
        ends(0, ErrorKind::Protocol),
    ));
    // Range reads (PROTOCOL.md 6.5): served; a bad list refuses the stream only; misuse ends
    // the connection.
    let ranged = |ranges: &[(u64, u64)]| {
        vec![
            Frame::Open {
                stream: s(1),
                op: Op::Read,
                options: OpenOptions::default().with_ranges(true),
                size: 0,
                name: "disk".into(),
            },
            Frame::Ranges {
                stream: s(1),
                last: true,
                ranges: ranges.iter().map(|&(o, l)| Range::new(o, l)).collect(),
            },
        ]
    };
    let mut ranged_download = ranged(&[(100, 4000), (8000, 300)]);
    // The harness reads in pieces, the ninth 4096 bytes long: PINGs carry the acknowledgement
    // past it, so the server has sent its FINISH by then, as in download_then_goaway.
    ranged_download.extend((0..205).map(|i| Frame::Ping { data: i }));
    ranged_download.extend([
        Frame::Finish {
            stream: s(1),
            length: harness::SOURCE_LEN,
            digest: None,
            ack: true,
        },
        Frame::GoAway {
            last_stream: s(0),
            reason: Reason::GoingAway,
            message: String::new(),
        },
    ]);
    out.push((
        "handshake",
        "ranged_download",
        client(&ranged_download),
        ends(1, ErrorKind::Clean),
    ));
    for (name, list) in [
        ("ranges_unsorted", &[(8000, 10), (0, 10)][..]),
        ("ranges_overlapping", &[(0, 100), (50, 10)][..]),
        ("ranges_past_end", &[(harness::SOURCE_LEN - 1, 2)][..]),
        ("ranges_empty_range", &[(5, 0)][..]),
    ] {
        out.push((
            "handshake",
            name,
            client(&ranged(list)),
            ends(0, ErrorKind::PeerClosed),
        ));
    }
    let mut unasked = vec![open(1, Op::Read, 0, "disk")];
    unasked.push(ranged(&[(0, 1)]).pop().unwrap());
    out.push((
        "handshake",
        "ranges_unasked",
        client(&unasked),
        ends(0, ErrorKind::Protocol),
    ));
    // Block digests need the BLOCK_DIGESTS feature from both Hellos.
    let mut digests_unnegotiated = hello(&plain);
    digests_unnegotiated.extend(enc(&[open(1, Op::Digests, 0, "vol")]));
    out.push((
        "handshake",
        "digests_without_the_feature",
        digests_unnegotiated,
        ends(0, ErrorKind::Protocol),
    ));
    out.push((
        "decode_frame",
        "open_digests",
        enc(&[open(3, Op::Digests, 0, "vol")]),
        Expect::Frames(1),
    ));
    out.extend(block_map_seeds());
    let mut truncated_hello = client(&[]);
    truncated_hello.truncate(20);
    out.push((
        "handshake",
        "truncated_hello",
        truncated_hello,
        Expect::Refused,
    ));
    out
}

/// Documents a DIGESTS stream may carry, good and bad.
fn block_map_seeds() -> Vec<(&'static str, &'static str, Vec<u8>, Expect)> {
    use engine::blockmap::{encode, BlockMapHeader, BlockRecord, BLOCK_SIZE};
    let rec = |index, byte| BlockRecord {
        index,
        digest: [byte; 32],
    };
    let header = BlockMapHeader::new(5 * u64::from(BLOCK_SIZE) + 1);
    let good = encode(&header, &[rec(0, 1), rec(3, 2), rec(5, 3)]);
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 1);
    let mut bad_size = good.clone();
    bad_size[4..8].copy_from_slice(&4096u32.to_be_bytes());
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let refused = Expect::Records(None);
    vec![
        ("good", good, Expect::Records(Some(3))),
        (
            "empty_volume",
            encode(&BlockMapHeader::new(0), &[]),
            Expect::Records(Some(0)),
        ),
        ("truncated", truncated, refused),
        ("block_size", bad_size, refused),
        ("bad_magic", bad_magic, refused),
        ("past_end", encode(&header, &[rec(6, 0)]), refused),
        (
            "unsorted",
            encode(&header, &[rec(3, 0), rec(2, 0)]),
            refused,
        ),
        (
            "repeated",
            encode(&header, &[rec(3, 0), rec(3, 1)]),
            refused,
        ),
        ("header_only_part", b"VSBD\0\x01".to_vec(), refused),
    ]
    .into_iter()
    .map(|(name, bytes, expect)| ("decode_block_map", name, bytes, expect))
    .collect()
}

/// Checks one seed's outcome in both harnesses.
fn check_seed(target: &str, name: &str, bytes: &[u8], expect: Expect) {
    if let Expect::Records(n) = expect {
        assert_eq!(harness::decode_block_map(bytes), n, "{target}/{name}");
        return;
    }
    let frames = harness::decode_frames(bytes, harness::DECODE_MAX);
    let outcome = harness::drive_server(bytes, harness::PIECES);
    match expect {
        Expect::Frames(n) => assert_eq!(frames, n, "{target}/{name}"),
        Expect::Records(_) => unreachable!("checked above"),
        Expect::Refused => assert!(!outcome.connected, "{target}/{name}: {outcome:?}"),
        Expect::Ends { completed, error } => {
            assert!(outcome.connected, "{target}/{name}: {outcome:?}");
            assert_eq!(outcome.completed, completed, "{target}/{name}: {outcome:?}");
            let closed = outcome.error.as_ref().expect("closed");
            assert_eq!(
                error_kind(closed),
                Some(error),
                "{target}/{name}: {outcome:?}"
            );
        }
    }
}

#[test]
fn seeds_behave_and_are_in_the_corpus() {
    write_seeds_if_asked();
    let seeds = seeds();
    assert!(seeds.iter().filter(|s| s.0 == "decode_frame").count() >= 12);
    assert!(seeds.iter().filter(|s| s.0 == "handshake").count() >= 12);
    for (target, name, bytes, expect) in seeds {
        check_seed(target, name, &bytes, expect);
        let path = corpus_root().join(target).join(format!("{name}.bin"));
        let stored = fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate with VOLSTREAM_WRITE_SEEDS=1)",
                path.display()
            )
        });
        assert!(
            stored == bytes,
            "{} differs from its seed (regenerate with VOLSTREAM_WRITE_SEEDS=1)",
            path.display()
        );
    }
}
