//! Hostile peers on both sides: every violation is a clear error (or, where the protocol
//! allows, an error reply), never a panic, and nothing is buffered for a length before that
//! length was checked.

use bytes::{BufMut, BytesMut};
use nbd::wire::*;
use nbd::{
    BlockSize, Client, ClientHandshake, ClientOptions, Command, Context, Error, Export,
    HandshakeEvent, Reply, Request, Server, ServerHandshake,
};

const SIZE: u64 = 1 << 20;

fn export(structured: bool, contexts: &[(u32, &str)]) -> Export {
    Export {
        name: "x".into(),
        size: SIZE,
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES,
        structured,
        contexts: contexts
            .iter()
            .map(|&(id, name)| Context {
                id,
                name: name.into(),
            })
            .collect(),
        block_size: BlockSize::default(),
    }
}

fn client() -> Client {
    Client::new(export(true, &[(7, CONTEXT_BASE_ALLOCATION)]), 8)
}

fn chunk(flags: u16, rtype: u16, cookie: u64, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(rtype);
    b.put_u64(cookie);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b
}

fn data(offset: u64, n: usize) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(std::iter::repeat_n(0x42, n));
    p
}

fn hole(offset: u64, n: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(n.to_be_bytes());
    p
}

fn status(ctx: u32, ext: &[(u32, u32)]) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for &(l, f) in ext {
        p.extend(l.to_be_bytes());
        p.extend(f.to_be_bytes());
    }
    p
}

/// Decodes everything; the first error, or the replies.
fn feed(c: &mut Client, mut input: BytesMut) -> Result<Vec<Reply>, Error> {
    let mut out = Vec::new();
    while let Some(r) = c.decode(&mut input)? {
        out.push(r);
    }
    Ok(out)
}

fn protocol_error(r: Result<Vec<Reply>, Error>, needle: &str) {
    match r {
        Err(Error::Protocol(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        Err(e) => panic!("expected a protocol error about {needle:?}, got {e:?}"),
        Ok(replies) => panic!(
            "expected a protocol error about {needle:?}, got {} replies",
            replies.len()
        ),
    }
}

#[test]
fn bad_reply_magic() {
    let mut c = client();
    c.send(Command::Read {
        offset: 0,
        len: 512,
    })
    .unwrap();
    let mut b = BytesMut::new();
    b.put_u32(0xdead_beef);
    b.put_bytes(0, 20);
    protocol_error(feed(&mut c, b), "magic");
    let mut b = BytesMut::new();
    b.put_u32(EXTENDED_REPLY_MAGIC);
    protocol_error(feed(&mut c, b), "extended");
}

#[test]
fn replies_for_unknown_cookies() {
    let mut c = client();
    let k = c
        .send(Command::Read {
            offset: 0,
            len: 512,
        })
        .unwrap();
    protocol_error(
        feed(&mut c, chunk(1, REPLY_TYPE_NONE, k + 100, &[])),
        "not in flight",
    );
    let mut b = BytesMut::new();
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(0);
    b.put_u64(999);
    protocol_error(feed(&mut client(), b), "not in flight");
    // A reply after the request's DONE is one for an unknown cookie too.
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    let mut b = chunk(1, REPLY_TYPE_NONE, k, &[]);
    b.extend_from_slice(&chunk(1, REPLY_TYPE_NONE, k, &[]));
    protocol_error(feed(&mut c, b), "not in flight");
}

#[test]
fn chunks_outside_the_requested_range() {
    for (off, n) in [
        (4095u64, 2usize),
        (8192, 1),
        (4096 + 4096, 4096),
        (u64::MAX - 3, 8),
    ] {
        let mut c = client();
        let k = c
            .send(Command::Read {
                offset: 4096,
                len: 4096,
            })
            .unwrap();
        let r = feed(&mut c, chunk(0, REPLY_TYPE_OFFSET_DATA, k, &data(off, n)));
        if n > 4096 {
            protocol_error(r, "bytes to a READ");
        } else {
            protocol_error(r, "outside the request");
        }
    }
    let mut c = client();
    let k = c
        .send(Command::Read {
            offset: 4096,
            len: 4096,
        })
        .unwrap();
    protocol_error(
        feed(
            &mut c,
            chunk(0, REPLY_TYPE_OFFSET_HOLE, k, &hole(u64::MAX, 2)),
        ),
        "outside the request",
    );
    let mut c = client();
    let k = c
        .send(Command::Read {
            offset: 4096,
            len: 4096,
        })
        .unwrap();
    protocol_error(
        feed(&mut c, chunk(0, REPLY_TYPE_OFFSET_HOLE, k, &hole(4096, 0))),
        "zero bytes",
    );
}

#[test]
fn overlapping_and_incomplete_reads() {
    let mut c = client();
    let k = c
        .send(Command::Read {
            offset: 0,
            len: 4096,
        })
        .unwrap();
    let mut b = chunk(0, REPLY_TYPE_OFFSET_DATA, k, &data(0, 2048));
    b.extend_from_slice(&chunk(0, REPLY_TYPE_OFFSET_HOLE, k, &hole(1024, 2048)));
    protocol_error(feed(&mut c, b), "overlaps");

    let mut c = client();
    let k = c
        .send(Command::Read {
            offset: 0,
            len: 4096,
        })
        .unwrap();
    let mut b = chunk(0, REPLY_TYPE_OFFSET_DATA, k, &data(0, 2048));
    b.extend_from_slice(&chunk(1, REPLY_TYPE_NONE, k, &[]));
    protocol_error(feed(&mut c, b), "done with 2048 bytes");

    // Structured replies were negotiated: a simple reply may not carry READ data.
    let mut c = client();
    let k = c
        .send(Command::Read {
            offset: 0,
            len: 4096,
        })
        .unwrap();
    let mut b = BytesMut::new();
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(0);
    b.put_u64(k);
    protocol_error(feed(&mut c, b), "simple reply to READ");
}

#[test]
fn oversized_lengths_are_refused_from_the_header_alone() {
    // Only the 20-byte header arrives: the error comes before any payload is awaited.
    let cases: [(Command, u16, u32, &str); 5] = [
        (
            Command::Read {
                offset: 0,
                len: 4096,
            },
            REPLY_TYPE_OFFSET_DATA,
            4096 + 9,
            "bytes to a READ",
        ),
        (
            Command::Read {
                offset: 0,
                len: 4096,
            },
            REPLY_TYPE_OFFSET_DATA,
            u32::MAX,
            "bytes to a READ",
        ),
        (
            Command::BlockStatus {
                offset: 0,
                len: 4096,
                req_one: false,
            },
            REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * (MAX_DESCRIPTORS as u32 + 1),
            "BLOCK_STATUS",
        ),
        (
            Command::Flush,
            REPLY_TYPE_ERROR,
            1 << 30,
            "bytes to a FLUSH",
        ),
        (
            Command::Read {
                offset: 0,
                len: 4096,
            },
            REPLY_TYPE_OFFSET_HOLE,
            16,
            "bytes to a READ",
        ),
    ];
    for (cmd, rtype, len, needle) in cases {
        let mut c = client();
        let k = c.send(cmd).unwrap();
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(0);
        b.put_u16(rtype);
        b.put_u64(k);
        b.put_u32(len);
        protocol_error(feed(&mut c, b), needle);
    }
    // A data chunk to a BLOCK_STATUS, or block status to a READ: wrong type for the request.
    let mut c = client();
    let k = c
        .send(Command::BlockStatus {
            offset: 0,
            len: 512,
            req_one: false,
        })
        .unwrap();
    protocol_error(
        feed(&mut c, chunk(0, REPLY_TYPE_OFFSET_DATA, k, &data(0, 1))),
        "type 1",
    );
}

#[test]
fn bad_block_status() {
    let bs = |c: &mut Client, req_one| {
        c.send(Command::BlockStatus {
            offset: 0,
            len: 8192,
            req_one,
        })
        .unwrap()
    };
    let mut c = client();
    let k = bs(&mut c, false);
    protocol_error(
        feed(
            &mut c,
            chunk(
                0,
                REPLY_TYPE_BLOCK_STATUS,
                k,
                &status(7, &[(4096, 0), (0, 3)]),
            ),
        ),
        "zero bytes",
    );
    // Extents that keep going after the requested range was covered.
    let mut c = client();
    let k = bs(&mut c, false);
    protocol_error(
        feed(
            &mut c,
            chunk(
                0,
                REPLY_TYPE_BLOCK_STATUS,
                k,
                &status(7, &[(8192, 0), (4096, 3)]),
            ),
        ),
        "starts past",
    );
    let mut c = client();
    let k = bs(&mut c, false);
    protocol_error(
        feed(
            &mut c,
            chunk(
                0,
                REPLY_TYPE_BLOCK_STATUS,
                k,
                &status(7, &[(u32::MAX, 0), (u32::MAX, 0)]),
            ),
        ),
        "starts past",
    );
    // A last extent that reaches past the request is clipped to it.
    let mut c = client();
    let k = bs(&mut c, false);
    let r = feed(
        &mut c,
        chunk(
            1,
            REPLY_TYPE_BLOCK_STATUS,
            k,
            &status(7, &[(4096, 0), (u32::MAX, 3)]),
        ),
    )
    .unwrap();
    match &r[0] {
        Reply::BlockStatus { extents, .. } => {
            assert_eq!(extents.iter().map(|d| d.len as u64).sum::<u64>(), 8192)
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(r[1], Reply::Done { result: Ok(()), .. }));
    let mut c = client();
    let k = bs(&mut c, false);
    protocol_error(
        feed(
            &mut c,
            chunk(0, REPLY_TYPE_BLOCK_STATUS, k, &status(8, &[(4096, 0)])),
        ),
        "not selected",
    );
    let mut c = client();
    let k = bs(&mut c, false);
    let mut b = chunk(0, REPLY_TYPE_BLOCK_STATUS, k, &status(7, &[(4096, 0)]));
    b.extend_from_slice(&chunk(
        0,
        REPLY_TYPE_BLOCK_STATUS,
        k,
        &status(7, &[(4096, 0)]),
    ));
    protocol_error(feed(&mut c, b), "two block status");
    let mut c = client();
    let k = bs(&mut c, false);
    protocol_error(
        feed(&mut c, chunk(1, REPLY_TYPE_NONE, k, &[])),
        "0 of 1 metadata contexts",
    );
    let mut c = client();
    let k = bs(&mut c, true);
    protocol_error(
        feed(
            &mut c,
            chunk(
                0,
                REPLY_TYPE_BLOCK_STATUS,
                k,
                &status(7, &[(4096, 0), (4096, 0)]),
            ),
        ),
        "asked for one",
    );
    let mut c = client();
    let k = bs(&mut c, true);
    protocol_error(
        feed(
            &mut c,
            chunk(0, REPLY_TYPE_BLOCK_STATUS, k, &status(7, &[(8193, 0)])),
        ),
        "REQ_ONE",
    );
    // A payload that is not 4 + 8n.
    let mut c = client();
    let k = bs(&mut c, false);
    protocol_error(
        feed(&mut c, chunk(0, REPLY_TYPE_BLOCK_STATUS, k, &[0; 13])),
        "BLOCK_STATUS",
    );
}

#[test]
fn bad_error_chunks_and_unknown_types() {
    let err = |errno: u32, msg_len: u16, msg: &[u8]| {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend(msg_len.to_be_bytes());
        p.extend(msg);
        p
    };
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    protocol_error(
        feed(
            &mut c,
            chunk(1, REPLY_TYPE_ERROR, k, &err(5, 100, b"short")),
        ),
        "message of 100",
    );
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    protocol_error(
        feed(&mut c, chunk(1, REPLY_TYPE_ERROR, k, &err(0, 0, b""))),
        "error value 0",
    );
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    protocol_error(
        feed(&mut c, chunk(0, REPLY_TYPE_NONE, k, &[])),
        "without the DONE",
    );
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    protocol_error(feed(&mut c, chunk(1, 77, k, &[])), "type 77");
    // An error offset must lie in the request (a FLUSH has none).
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    let mut p = err(5, 0, b"");
    p.extend(0u64.to_be_bytes());
    protocol_error(
        feed(&mut c, chunk(1, REPLY_TYPE_ERROR_OFFSET, k, &p)),
        "outside the request",
    );
    // An unknown error type fails the request, not the connection; the message is shown
    // without control characters.
    let mut c = client();
    let k = c.send(Command::Flush).unwrap();
    let r = feed(
        &mut c,
        chunk(1, REPLY_TYPE_ERROR_BIT | 9, k, &err(5, 5, b"a\x1b[2Jb")),
    )
    .unwrap();
    match &r[..] {
        [Reply::Done { result: Err(e), .. }] => {
            assert_eq!(e.errno, EIO);
            assert_eq!(e.message, "a [2J");
        }
        r => panic!("{r:?}"),
    }
    assert!(c.can_send());
}

#[test]
fn structured_reply_without_negotiation() {
    let mut c = Client::new(export(false, &[]), 4);
    let k = c.send(Command::Flush).unwrap();
    protocol_error(
        feed(&mut c, chunk(1, REPLY_TYPE_NONE, k, &[])),
        "never negotiated",
    );
}

// ---- the client handshake against a hostile server ----

fn greeting(flags: u16) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u64(NBDMAGIC);
    b.put_u64(IHAVEOPT);
    b.put_u16(flags);
    b
}

fn opt_reply(opt: u32, rtype: u32, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(rtype);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b
}

fn hs_feed(input: BytesMut) -> Result<Option<Export>, Error> {
    let mut hs = ClientHandshake::new(ClientOptions {
        export: "e".into(),
        contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
    })
    .unwrap();
    let mut input = input;
    hs.handle_input(&mut input)
}

fn hs_error(input: BytesMut, needle: &str) {
    match hs_feed(input) {
        Err(e) => assert!(e.to_string().contains(needle), "{e} lacks {needle:?}"),
        Ok(x) => panic!("expected an error about {needle:?}, got {x:?}"),
    }
}

#[test]
fn hostile_handshake_servers() {
    let mut b = BytesMut::new();
    b.put_u64(0x1234);
    b.put_bytes(0, 10);
    hs_error(b, "NBDMAGIC");
    let mut b = BytesMut::new();
    b.put_u64(NBDMAGIC);
    b.put_u64(OLDSTYLE_MAGIC);
    b.put_u16(0);
    hs_error(b, "oldstyle");
    hs_error(greeting(0), "fixed newstyle");
    let mut b = greeting(1);
    let mut r = opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    r[0] ^= 1;
    b.extend_from_slice(&r);
    hs_error(b, "option reply magic");
    let mut b = greeting(1);
    b.extend_from_slice(&opt_reply(OPT_GO, REP_ACK, &[]));
    hs_error(b, "while NBD_OPT_STRUCTURED_REPLY was asked");
    // A reply length of 1 GiB is refused from its header.
    let mut b = greeting(1);
    let mut r = opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    r[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
    b.extend_from_slice(&r);
    hs_error(b, "option reply of 1073741824 bytes");
    // Contexts the client did not ask for, or twice.
    let meta = |id: u32, name: &str| {
        let mut p = id.to_be_bytes().to_vec();
        p.extend(name.as_bytes());
        opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &p)
    };
    let mut b = greeting(1);
    b.extend_from_slice(&opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    b.extend_from_slice(&meta(1, "qemu:dirty-bitmap:x"));
    hs_error(b, "not asked for");
    let mut b = greeting(1);
    b.extend_from_slice(&opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    b.extend_from_slice(&meta(1, CONTEXT_BASE_ALLOCATION));
    b.extend_from_slice(&meta(2, CONTEXT_BASE_ALLOCATION));
    hs_error(b, "selected twice");
    let go_prefix = || {
        let mut b = greeting(1);
        b.extend_from_slice(&opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        b.extend_from_slice(&opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        b
    };
    let mut b = go_prefix();
    b.extend_from_slice(&opt_reply(OPT_GO, REP_INFO, &[0, 0, 1, 2, 3]));
    hs_error(b, "INFO_EXPORT of 5 bytes");
    let mut b = go_prefix();
    let mut p = vec![0, 3];
    for v in [3u32, 4096, 1 << 20] {
        p.extend(v.to_be_bytes());
    }
    b.extend_from_slice(&opt_reply(OPT_GO, REP_INFO, &p));
    hs_error(b, "minimum block size 3");
    let mut b = go_prefix();
    b.extend_from_slice(&opt_reply(OPT_GO, REP_ACK, &[]));
    hs_error(b, "without INFO_EXPORT");
    let mut b = go_prefix();
    for _ in 0..100 {
        b.extend_from_slice(&opt_reply(OPT_GO, REP_INFO, &[0, 9]));
    }
    hs_error(b, "more than 64 replies");
    let mut b = go_prefix();
    b.extend_from_slice(&opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export"));
    hs_error(b, "unknown export (no such export)");
    // Complete and valid, for contrast.
    let mut b = go_prefix();
    let mut p = vec![0, 0];
    p.extend(SIZE.to_be_bytes());
    p.extend((FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
    b.extend_from_slice(&opt_reply(OPT_GO, REP_INFO, &p));
    b.extend_from_slice(&opt_reply(OPT_GO, REP_ACK, &[]));
    let e = hs_feed(b).unwrap().unwrap();
    assert!(e.read_only() && e.size == SIZE && e.contexts.is_empty());
}

// ---- the server against a hostile client ----

fn server(read_only: bool) -> Server {
    let mut e = export(true, &[]);
    if read_only {
        e.flags |= FLAG_READ_ONLY;
    }
    e.block_size.maximum = 65536;
    Server::new(e, 4)
}

fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(REQUEST_MAGIC);
    b.put_u16(flags);
    b.put_u16(cmd);
    b.put_u64(cookie);
    b.put_u64(offset);
    b.put_u32(len);
    b
}

/// The server's replies, decoded by a client that had sent `cookies` as flushes (so any
/// reply shape a FLUSH may get is accepted).
fn error_replies(s: &mut Server) -> Vec<(u64, u32)> {
    let mut out = BytesMut::new();
    while let Some(b) = s.poll_transmit() {
        out.extend_from_slice(&b);
    }
    let mut v = Vec::new();
    while out.len() >= 20 {
        assert_eq!(&out[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let cookie = u64::from_be_bytes(out[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        let errno = if len >= 4 {
            u32::from_be_bytes(out[20..24].try_into().unwrap())
        } else {
            0
        };
        v.push((cookie, errno));
        let _ = out.split_to(20 + len);
    }
    v
}

#[test]
fn hostile_clients_in_transmission() {
    let mut s = server(false);
    let mut b = request(0, CMD_READ, 1, 0, 512);
    b[0] = 0;
    assert!(matches!(s.decode(&mut b), Err(Error::Protocol(m)) if m.contains("magic")));

    // A WRITE longer than the maximum payload: refused from its header, before any payload.
    let mut s = server(false);
    let mut b = request(0, CMD_WRITE, 1, 0, u32::MAX);
    assert!(matches!(s.decode(&mut b), Err(Error::Protocol(m)) if m.contains("maximum payload")));

    // Invalid requests get error replies and the connection goes on.
    let mut s = server(true);
    let mut b = BytesMut::new();
    b.extend_from_slice(&request(0, 99, 1, 0, 0));
    b.extend_from_slice(&request(0, CMD_READ, 2, SIZE - 1, 2));
    b.extend_from_slice(&request(0, CMD_READ, 3, u64::MAX, 2));
    b.extend_from_slice(&request(0, CMD_WRITE_ZEROES, 4, 0, 512));
    b.extend_from_slice(&request(0, CMD_BLOCK_STATUS, 5, 0, 512));
    b.extend_from_slice(&request(CMD_FLAG_DF, CMD_READ, 6, 0, 512));
    b.extend_from_slice(&request(0, CMD_READ, 7, 0, 131072));
    b.extend_from_slice(&request(0, CMD_CACHE, 8, 0, 512));
    b.extend_from_slice(&request(0, CMD_WRITE, 9, 0, 3));
    b.put_slice(b"abc");
    b.extend_from_slice(&request(0, CMD_READ, 10, 0, 512));
    let got = s.decode(&mut b).unwrap();
    assert!(
        matches!(got, Some(Request::Read { cookie: 10, .. })),
        "{got:?}"
    );
    assert_eq!(
        error_replies(&mut s),
        vec![
            (1, EINVAL),
            (2, EINVAL),
            (3, EINVAL),
            (4, EPERM),
            (5, EINVAL),
            (6, EINVAL),
            (7, EOVERFLOW),
            (8, EINVAL),
            (9, EPERM)
        ]
    );

    // A cookie used twice while in flight.
    let mut s = server(false);
    let mut b = request(0, CMD_READ, 5, 0, 512);
    b.extend_from_slice(&request(0, CMD_READ, 5, 512, 512));
    assert!(s.decode(&mut b).unwrap().is_some());
    assert!(matches!(s.decode(&mut b), Err(Error::Protocol(m)) if m.contains("reused")));
}

#[test]
fn a_client_that_does_not_read_stops_being_read() {
    let mut s = server(false);
    let mut b = BytesMut::new();
    for i in 0..1_000_000u64 {
        b.extend_from_slice(&request(0, 99, i, 0, 0));
    }
    let before = b.len();
    assert_eq!(s.decode(&mut b).unwrap(), None);
    // Only as many were decoded as fit the reply backlog.
    let decoded = (before - b.len()) / REQUEST_LEN;
    assert!(decoded < 1_000_000 && !s.wants_input(), "{decoded}");
    assert!(decoded * 20 <= nbd::server::MAX_OUTPUT_BACKLOG + 100);
    // And requests to carry out stop at the in-flight bound.
    let mut s = server(false);
    let mut b = BytesMut::new();
    for i in 0..100u64 {
        b.extend_from_slice(&request(0, CMD_READ, i, 0, 512));
    }
    let mut n = 0;
    while s.decode(&mut b).unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 4);
}

fn client_bytes(parts: &[&[u8]]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(FLAG_C_FIXED_NEWSTYLE);
    for p in parts {
        b.put_slice(p);
    }
    b
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(opt);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.to_vec()
}

fn run_server_hs(mut input: BytesMut) -> (Result<Option<HandshakeEvent>, Error>, Vec<u32>) {
    let mut hs = ServerHandshake::new();
    let r = loop {
        match hs.handle_input(&mut input) {
            Ok(Some(HandshakeEvent::List)) => hs.answer_list(&[]).unwrap(),
            other => break other,
        }
    };
    let mut out = BytesMut::new();
    while let Some(b) = hs.poll_transmit() {
        out.extend_from_slice(&b);
    }
    let _ = out.split_to(GREETING_LEN);
    let mut types = Vec::new();
    while out.len() >= 20 {
        types.push(u32::from_be_bytes(out[12..16].try_into().unwrap()));
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        let _ = out.split_to(20 + len);
    }
    (r, types)
}

#[test]
fn hostile_handshake_clients() {
    let mut b = BytesMut::new();
    b.put_u32(0x8000_0000);
    assert!(matches!(run_server_hs(b).0, Err(Error::Protocol(m)) if m.contains("client flags")));
    let mut o = option(OPT_GO, &[]);
    o[0] = 0;
    assert!(
        matches!(run_server_hs(client_bytes(&[&o])).0, Err(Error::Protocol(m)) if m.contains("IHAVEOPT"))
    );
    // An option longer than the limit is refused from its header.
    let mut o = option(OPT_GO, &[]);
    o[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(
        matches!(run_server_hs(client_bytes(&[&o])).0, Err(Error::Protocol(m)) if m.contains("at most"))
    );
    // Endless options.
    let many: Vec<Vec<u8>> = (0..100).map(|_| option(OPT_LIST, &[])).collect();
    let parts: Vec<&[u8]> = many.iter().map(|v| &v[..]).collect();
    assert!(
        matches!(run_server_hs(client_bytes(&parts)).0, Err(Error::Protocol(m)) if m.contains("more than 64"))
    );
    // Malformed options get error replies, and the handshake goes on.
    let go_bad = option(OPT_GO, &[0, 0, 0, 9, b'x']);
    let meta_early = option(OPT_SET_META_CONTEXT, &[0; 8]);
    let sr = option(OPT_STRUCTURED_REPLY, &[]);
    let mut huge_count = vec![0, 0, 0, 0];
    huge_count.extend(u32::MAX.to_be_bytes());
    let meta_huge = option(OPT_LIST_META_CONTEXT, &huge_count);
    let tls = option(OPT_STARTTLS, &[]);
    let unknown = option(1234, b"zz");
    let list_data = option(OPT_LIST, b"x");
    let (r, types) = run_server_hs(client_bytes(&[
        &go_bad,
        &meta_early,
        &sr,
        &meta_huge,
        &tls,
        &unknown,
        &list_data,
    ]));
    assert_eq!(r.unwrap(), None);
    assert_eq!(
        types,
        vec![
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ACK,
            REP_ERR_INVALID,
            REP_ERR_UNSUP,
            REP_ERR_UNSUP,
            REP_ERR_INVALID
        ]
    );
    // ABORT is acknowledged and ends the session.
    let (r, types) = run_server_hs(client_bytes(&[&option(OPT_ABORT, &[])]));
    assert_eq!(r, Err(Error::Disconnected));
    assert_eq!(types, vec![REP_ACK]);
}
