//! Our client against our server in memory: handshakes, reads with holes and out-of-order
//! chunks, writes, zeroing, block status, simple replies and the in-flight bound.

mod common;

use bytes::Bytes;
use common::*;
use nbd::wire::*;
use nbd::{ClientOptions, Command, Descriptor, Error, ExportInfo, LookupError};

const MIB: u64 = 1 << 20;

fn session(pieces: &[usize]) -> Session {
    let disk = MemDisk::new(4 * MIB, &[0, 1, 5, 100, 101, 102, 1023], 7);
    Session::new(disk, false, 8, pieces)
}

#[test]
fn handshake_agrees_on_the_export() {
    for pieces in [&[0][..], &[1], &[3, 1, 7]] {
        let s = session(pieces);
        let (c, srv) = (s.client.export(), s.server.export());
        assert_eq!(c, srv);
        assert_eq!(c.size, 4 * MIB);
        assert!(c.structured && c.can_write_zeroes() && c.can_fast_zero() && !c.read_only());
        assert_eq!(c.context(CONTEXT_BASE_ALLOCATION), Some(1));
        assert_eq!(c.name, "disk");
    }
}

#[test]
fn unknown_export_is_refused_with_the_servers_message() {
    let mut pipe = Pipe::new(&[0]);
    let err = handshake(
        ClientOptions {
            export: "nope".into(),
            contexts: vec![],
        },
        &|name| {
            Err::<ExportInfo, _>(LookupError {
                reply: REP_ERR_UNKNOWN,
                message: format!("no volume {name}"),
            })
        },
        &mut pipe,
    )
    .unwrap_err();
    match &err {
        Error::Refused {
            option, message, ..
        } => {
            assert_eq!(*option, OPT_GO);
            assert_eq!(message, "no volume nope");
        }
        e => panic!("{e:?}"),
    }
    assert!(err.to_string().contains("unknown export"), "{err}");
}

#[test]
fn reads_reassemble_holes_and_out_of_order_chunks() {
    for (shuffle, pieces) in [(0, &[0][..]), (3, &[1][..]), (5, &[7, 1, 4096])] {
        let mut s = session(pieces);
        s.shuffle = shuffle;
        let ranges = [
            (0, 64 * 1024),
            (4096 * 99, 5 * 4096),
            (4 * MIB - 8192, 8192),
            (17, 100),
        ];
        let cookies: Vec<_> = ranges
            .iter()
            .map(|&(o, l)| s.send(Command::Read { offset: o, len: l }))
            .collect();
        s.run().unwrap();
        for (c, &(o, l)) in cookies.iter().zip(&ranges) {
            let out = &s.outcomes[c];
            assert_eq!(out.result, Some(Ok(())));
            assert_eq!(
                out.content,
                &s.disk.data[o as usize..(o + l as u64) as usize]
            );
        }
        // The big read spans holes, which came as OFFSET_HOLE chunks.
        assert!(s.outcomes[&cookies[0]].holes > 0);
    }
}

#[test]
fn writes_then_reads_back() {
    let mut s = session(&[5, 4096]);
    let data = Bytes::from((0..20000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    let w = s.send(Command::Write {
        offset: 3 * MIB + 5,
        data: data.clone(),
        fua: false,
    });
    s.run().unwrap();
    assert_eq!(s.outcomes[&w].result, Some(Ok(())));
    let r = s.send(Command::Read {
        offset: 3 * MIB + 5,
        len: 20000,
    });
    s.run().unwrap();
    assert_eq!(s.outcomes[&r].content, data.to_vec());
}

#[test]
fn fast_zero_refusal_is_a_command_error_not_a_connection_error() {
    let mut s = session(&[0]);
    let c = s.send(Command::WriteZeroes {
        offset: 0,
        len: 4096,
        no_hole: false,
        fast: true,
    });
    s.run().unwrap();
    let e = s.outcomes[&c].result.clone().unwrap().unwrap_err();
    assert_eq!(e.errno, ENOTSUP);
    assert_eq!(e.message, "not fast here");
    // The connection goes on.
    let z = s.send(Command::WriteZeroes {
        offset: 0,
        len: 4096,
        no_hole: true,
        fast: false,
    });
    s.run().unwrap();
    assert_eq!(s.outcomes[&z].result, Some(Ok(())));
    assert!(s.disk.data[..4096].iter().all(|&b| b == 0));
}

#[test]
fn block_status_per_range() {
    let mut s = session(&[0]);
    let c = s.send(Command::BlockStatus {
        offset: 0,
        len: 8 * 4096,
        req_one: false,
    });
    s.run().unwrap();
    let ext = &s.outcomes[&c].extents[&1];
    assert_eq!(
        ext,
        &vec![
            Descriptor {
                len: 8192,
                flags: 0
            },
            Descriptor {
                len: 3 * 4096,
                flags: STATE_HOLE | STATE_ZERO
            },
            Descriptor {
                len: 4096,
                flags: 0
            },
            Descriptor {
                len: 2 * 4096,
                flags: STATE_HOLE | STATE_ZERO
            },
        ]
    );
}

#[test]
fn in_flight_is_bounded_on_both_sides() {
    let disk = MemDisk::new(MIB, &[1], 3);
    let mut s = Session::new(disk, false, 3, &[0]);
    for i in 0..3 {
        s.send(Command::Read {
            offset: i * 4096,
            len: 4096,
        });
    }
    assert!(!s.client.can_send());
    let err = s
        .client
        .send(Command::Read {
            offset: 0,
            len: 4096,
        })
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    s.run().unwrap();
    assert_eq!(s.client.in_flight(), 0);
    assert!(s.max_seen_in_flight <= 3);
}

#[test]
fn requests_past_the_export_are_refused_before_sending() {
    let mut s = session(&[0]);
    for cmd in [
        Command::Read {
            offset: 4 * MIB - 1,
            len: 2,
        },
        Command::Read {
            offset: u64::MAX,
            len: 1,
        },
        Command::Read { offset: 0, len: 0 },
        Command::Read {
            offset: 0,
            len: 64 << 20,
        },
    ] {
        assert!(s.client.send(cmd.clone()).is_err(), "{cmd:?}");
    }
    assert!(!s.client.has_output());
}

#[test]
fn read_only_exports_refuse_writes_at_both_ends() {
    let disk = MemDisk::new(MIB, &[], 1);
    let mut s = Session::new(disk, true, 4, &[0]);
    assert!(s.client.export().read_only());
    let w = Command::Write {
        offset: 0,
        data: Bytes::from_static(b"x"),
        fua: false,
    };
    assert!(s.client.send(w).is_err());
}

#[test]
fn simple_replies_from_a_server_without_structured_replies() {
    let disk = MemDisk::new(MIB, &[0, 3], 9);
    let info = disk.info(false);
    let opts = ClientOptions {
        export: "".into(),
        contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
    };
    let mut client = nbd::ClientHandshake::new(opts).unwrap();
    let mut server = nbd::ServerHandshake::new().without_structured_replies();
    let (mut c_in, mut s_in) = (bytes::BytesMut::new(), bytes::BytesMut::new());
    let mut ce = None;
    let mut se = None;
    for _ in 0..100 {
        while let Some(b) = server.poll_transmit() {
            c_in.extend_from_slice(&b);
        }
        if ce.is_none() {
            ce = client.handle_input(&mut c_in).unwrap();
        }
        while let Some(b) = client.poll_transmit() {
            s_in.extend_from_slice(&b);
        }
        if se.is_none() {
            if let Some(nbd::HandshakeEvent::Lookup { .. }) =
                server.handle_input(&mut s_in).unwrap()
            {
                if let Some(nbd::HandshakeEvent::Ready(e)) =
                    server.answer(Ok(info.clone())).unwrap()
                {
                    se = Some(e);
                }
            }
        }
    }
    let (ce, se) = (ce.unwrap(), se.unwrap());
    assert!(!ce.structured && !se.structured);
    assert!(ce.contexts.is_empty() && se.contexts.is_empty());
    let mut client = nbd::Client::new(ce, 4);
    let mut server = nbd::Server::new(se, 4);
    assert!(client
        .send(Command::BlockStatus {
            offset: 0,
            len: 1,
            req_one: false
        })
        .is_err());
    let c = client
        .send(Command::Read {
            offset: 0,
            len: 4 * 4096,
        })
        .unwrap();
    while let Some(b) = client.poll_transmit() {
        s_in.extend_from_slice(&b);
    }
    let Some(nbd::Request::Read { cookie, .. }) = server.decode(&mut s_in).unwrap() else {
        panic!()
    };
    assert_eq!(cookie, c);
    // In order, holes sent as zeroes.
    server
        .reply_data(c, 0, Bytes::copy_from_slice(&disk.data[..4096]))
        .unwrap();
    server.reply_hole(c, 4096, 8192).unwrap();
    assert!(server.reply_hole(c, 4096, 1).is_err(), "out of order");
    server
        .reply_data(c, 12288, Bytes::copy_from_slice(&disk.data[12288..16384]))
        .unwrap();
    server.reply_done(c).unwrap();
    while let Some(b) = server.poll_transmit() {
        c_in.extend_from_slice(&b);
    }
    let mut got = Vec::new();
    let mut done = false;
    while let Some(r) = client.decode(&mut c_in).unwrap() {
        match r {
            nbd::Reply::Data { offset, bytes, .. } => {
                assert_eq!(offset, 0);
                got = bytes.to_vec();
            }
            nbd::Reply::Done { result, .. } => {
                result.unwrap();
                done = true;
            }
            r => panic!("{r:?}"),
        }
    }
    assert!(done);
    assert_eq!(got, &disk.data[..16384]);
}

#[test]
fn needed_never_asks_past_the_message_at_the_front() {
    // A simple reply (16 bytes), a NONE chunk (20) and a data chunk: at every prefix of each,
    // the client asks for no more than the whole message.
    let mut c = nbd::Client::new(session(&[0]).client.export().clone(), 4);
    let flush = c.send(Command::Flush).unwrap();
    let read = c
        .send(Command::Read {
            offset: 0,
            len: 100,
        })
        .unwrap();
    let mut simple = bytes::BytesMut::new();
    simple.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    simple.extend_from_slice(&0u32.to_be_bytes());
    simple.extend_from_slice(&flush.to_be_bytes());
    let mut data = bytes::BytesMut::new();
    data.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    data.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    data.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    data.extend_from_slice(&read.to_be_bytes());
    data.extend_from_slice(&108u32.to_be_bytes());
    data.extend_from_slice(&0u64.to_be_bytes());
    data.extend_from_slice(&[7; 100]);
    for msg in [&simple, &data] {
        for n in 0..msg.len() {
            let prefix = bytes::BytesMut::from(&msg[..n]);
            assert!(
                c.needed(&prefix) <= msg.len(),
                "prefix {n} of {}",
                msg.len()
            );
        }
    }
}
