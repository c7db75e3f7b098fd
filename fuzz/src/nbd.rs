//! What the NBD fuzz targets run: our NBD client fed a server's bytes, and our NBD server fed a
//! client's bytes, each through the handshake into the transmission phase. nbd/tests includes
//! this file with `#[path]`, so replaying the corpus exercises exactly the fuzzed code.
//!
//! Everything here panics on a broken invariant; a panic is what the fuzzer reports as a crash.

use bytes::{Bytes, BytesMut};
use nbd::client::Descriptor;
use nbd::wire::*;
use nbd::{
    BlockSize, Client, ClientHandshake, ClientOptions, Command, Cookie, ExportInfo, HandshakeEvent,
    LookupError, Reply, Request, Server, ServerHandshake,
};
use std::collections::HashMap;

/// Sizes of the pieces the input is fed in, so messages arrive split at many points.
pub const PIECES: &[usize] = &[1, 7, 20, 3, 16, 4096, 2, 28];

/// The export both targets negotiate: small, so ranges are easy to hit.
pub const EXPORT_SIZE: u64 = 1 << 20;
/// The largest payload the server target advertises.
pub const MAX_PAYLOAD: u32 = 65536;

/// The requests the client target keeps in flight, in turn.
pub fn client_commands() -> Vec<Command> {
    vec![
        Command::Read {
            offset: 0,
            len: 65536,
        },
        Command::BlockStatus {
            offset: 0,
            len: 1 << 20,
            req_one: false,
        },
        Command::Read {
            offset: 4096,
            len: 512,
        },
        Command::Flush,
        Command::BlockStatus {
            offset: 8192,
            len: 4096,
            req_one: true,
        },
        Command::WriteZeroes {
            offset: 0,
            len: 4096,
            no_hole: true,
            fast: true,
        },
    ]
}

/// What one run of [`drive_client`] reached.
#[derive(Debug, Default)]
pub struct ClientOutcome {
    pub negotiated: bool,
    pub replies: usize,
    pub completed: usize,
    pub error: Option<String>,
}

/// Feeds `data` to a client as everything the server sent.
pub fn drive_client(data: &[u8], pieces: &[usize]) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let mut hs = ClientHandshake::new(ClientOptions {
        export: "fuzz".into(),
        contexts: vec![
            CONTEXT_BASE_ALLOCATION.into(),
            CONTEXT_ALLOCATION_DEPTH.into(),
        ],
    })
    .unwrap();
    let mut client: Option<Client> = None;
    let mut sent: HashMap<Cookie, Command> = HashMap::new();
    let mut next = 0usize;
    let commands = client_commands();
    let mut input = BytesMut::new();
    let (mut at, mut piece) = (0usize, 0usize);
    while at < data.len() {
        let n = pieces[piece % pieces.len()].clamp(1, data.len() - at);
        piece += 1;
        input.extend_from_slice(&data[at..at + n]);
        at += n;
        if client.is_none() {
            match hs.handle_input(&mut input) {
                Ok(Some(export)) => {
                    assert!(export.size <= i64::MAX as u64);
                    for ctx in &export.contexts {
                        assert!(
                            ctx.name == CONTEXT_BASE_ALLOCATION
                                || ctx.name == CONTEXT_ALLOCATION_DEPTH
                        );
                    }
                    out.negotiated = true;
                    let mut c = Client::new(export, 4);
                    fill(&mut c, &commands, &mut next, &mut sent);
                    client = Some(c);
                }
                Ok(None) => {}
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            }
            while hs.poll_transmit().is_some() {}
        }
        let Some(c) = client.as_mut() else {
            continue;
        };
        loop {
            match c.decode(&mut input) {
                Ok(Some(reply)) => {
                    out.replies += 1;
                    if check_reply(c, &sent, &reply) {
                        out.completed += 1;
                        if let Reply::Done { cookie, .. } = reply {
                            sent.remove(&cookie);
                        }
                        // As a real client does: the freed slot is used before more
                        // replies are read.
                        fill(c, &commands, &mut next, &mut sent);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            }
        }
        assert_eq!(c.in_flight(), sent.len());
        // A partial message is held only up to what its checked header allows.
        assert!(
            input.len() <= 20 + 4 + 8 * MAX_DESCRIPTORS + 4096,
            "{} bytes buffered",
            input.len()
        );
        fill(c, &commands, &mut next, &mut sent);
        while c.poll_transmit().is_some() {}
    }
    out
}

fn fill(
    c: &mut Client,
    commands: &[Command],
    next: &mut usize,
    sent: &mut HashMap<Cookie, Command>,
) {
    let mut tries = 0;
    while c.can_send() && tries < commands.len() {
        let cmd = commands[*next % commands.len()].clone();
        *next += 1;
        tries += 1;
        // Commands the export does not allow are refused before anything is sent.
        if let Ok(cookie) = c.send(cmd.clone()) {
            assert!(sent.insert(cookie, cmd).is_none(), "cookie reused");
        }
    }
}

/// Checks a reply against the request it claims to answer; true for a Done.
fn check_reply(c: &Client, sent: &HashMap<Cookie, Command>, reply: &Reply) -> bool {
    let (cookie, done) = match reply {
        Reply::Data { cookie, .. }
        | Reply::Hole { cookie, .. }
        | Reply::BlockStatus { cookie, .. } => (*cookie, false),
        Reply::Done { cookie, .. } => (*cookie, true),
    };
    let cmd = sent.get(&cookie).expect("a reply for a request never sent");
    match (reply, cmd) {
        (Reply::Data { offset, bytes, .. }, Command::Read { offset: o, len }) => {
            assert!(*offset >= *o && offset + bytes.len() as u64 <= o + *len as u64);
            assert!(!bytes.is_empty());
        }
        (Reply::Hole { offset, len: n, .. }, Command::Read { offset: o, len }) => {
            assert!(*offset >= *o && offset + *n as u64 <= o + *len as u64 && *n > 0);
        }
        (
            Reply::BlockStatus {
                offset,
                extents,
                context,
                ..
            },
            Command::BlockStatus {
                offset: o,
                len,
                req_one,
            },
        ) => {
            assert_eq!(offset, o);
            assert!(c.export().contexts.iter().any(|x| x.id == *context));
            assert!(!extents.is_empty() && (!req_one || extents.len() == 1));
            let sum: u64 = extents.iter().map(|d: &Descriptor| d.len as u64).sum();
            assert!(sum <= *len as u64 && extents.iter().all(|d| d.len > 0));
        }
        (Reply::Done { .. }, _) => {}
        (r, cmd) => panic!("{r:?} for {cmd:?}"),
    }
    done
}

/// What one run of [`drive_server`] reached.
#[derive(Debug, Default)]
pub struct ServerOutcome {
    pub ready: bool,
    pub requests: usize,
    pub error: Option<String>,
}

pub fn export_info() -> ExportInfo {
    ExportInfo {
        size: EXPORT_SIZE,
        flags: FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO,
        block_size: BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        },
    }
}

/// Feeds `data` to a server as everything the client sent; the host answers every request
/// (some with errors) and the output is checked to be well-formed replies.
pub fn drive_server(data: &[u8], pieces: &[usize]) -> ServerOutcome {
    let mut out = ServerOutcome::default();
    let mut hs = ServerHandshake::new();
    let mut server: Option<Server> = None;
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let (mut at, mut piece) = (0usize, 0usize);
    while at < data.len() {
        let n = pieces[piece % pieces.len()].clamp(1, data.len() - at);
        piece += 1;
        input.extend_from_slice(&data[at..at + n]);
        at += n;
        if server.is_none() {
            loop {
                let event = match hs.handle_input(&mut input) {
                    Ok(e) => e,
                    Err(e) => {
                        out.error = Some(e.to_string());
                        return out;
                    }
                };
                match event {
                    Some(HandshakeEvent::Lookup { name }) => {
                        let answer = if name.starts_with('x') {
                            Err(LookupError {
                                reply: REP_ERR_UNKNOWN,
                                message: "no".into(),
                            })
                        } else {
                            Ok(export_info())
                        };
                        match hs.answer(answer) {
                            Ok(Some(HandshakeEvent::Ready(e))) => {
                                assert_eq!(e.size, EXPORT_SIZE);
                                out.ready = true;
                                server = Some(Server::new(e, 4));
                                break;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                out.error = Some(e.to_string());
                                return out;
                            }
                        }
                    }
                    Some(HandshakeEvent::List) => {
                        hs.answer_list(&["a".into(), "b".into()]).unwrap()
                    }
                    Some(HandshakeEvent::Ready(_)) => unreachable!("Ready comes from answer"),
                    None => break,
                }
            }
            while let Some(b) = hs.poll_transmit() {
                assert!(b.len() <= 1 << 20);
            }
        }
        let Some(s) = server.as_mut() else {
            continue;
        };
        loop {
            match s.decode(&mut input) {
                Ok(Some(req)) => {
                    out.requests += 1;
                    assert!(s.in_flight() <= 4);
                    serve(s, req, out.requests);
                }
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            }
        }
        assert!(
            input.len() <= REQUEST_LEN + MAX_PAYLOAD as usize + 4096,
            "{} bytes buffered",
            input.len()
        );
        while let Some(b) = s.poll_transmit() {
            output.extend_from_slice(&b);
        }
        check_replies(&mut output, s.export().structured);
    }
    out
}

pub fn serve(s: &mut Server, req: Request, n: usize) {
    let fail = n.is_multiple_of(3);
    match req {
        Request::Read {
            cookie,
            offset,
            len,
        } => {
            assert!(offset + len as u64 <= EXPORT_SIZE && len <= MAX_PAYLOAD);
            if fail {
                s.reply_error(cookie, EIO, "fuzz").unwrap();
                return;
            }
            let half = len / 2;
            if half > 0 {
                s.reply_data(cookie, offset, Bytes::from(vec![0x5a; half as usize]))
                    .unwrap();
            }
            s.reply_hole(cookie, offset + half as u64, len - half)
                .unwrap();
            s.reply_done(cookie).unwrap();
        }
        Request::BlockStatus {
            cookie,
            offset,
            len,
            req_one,
        } => {
            assert!(offset + len as u64 <= EXPORT_SIZE);
            let ctx = s.export().contexts[0].id;
            let first = len.div_ceil(2);
            let mut ext = vec![Descriptor {
                len: first,
                flags: 0,
            }];
            if len - first > 0 && !req_one {
                ext.push(Descriptor {
                    len: len - first,
                    flags: STATE_HOLE | STATE_ZERO,
                });
            }
            s.reply_block_status(cookie, ctx, &ext).unwrap();
            s.reply_done(cookie).unwrap();
        }
        Request::Write {
            cookie,
            offset,
            data,
            ..
        } => {
            assert!(offset + data.len() as u64 <= EXPORT_SIZE);
            assert!(data.len() <= MAX_PAYLOAD as usize);
            s.reply_done(cookie).unwrap()
        }
        Request::WriteZeroes { cookie, .. }
        | Request::Trim { cookie, .. }
        | Request::Flush { cookie } => {
            if fail {
                s.reply_error(cookie, ENOSPC, "").unwrap()
            } else {
                s.reply_done(cookie).unwrap()
            }
        }
        Request::Disconnect => assert!(s.is_disconnected()),
    }
}

/// Consumes the complete replies at the front of `output`, checking their framing.
fn check_replies(output: &mut BytesMut, structured: bool) {
    loop {
        if output.len() < 4 {
            return;
        }
        let magic = be32(&output[..4]);
        if structured {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
            if output.len() < 20 {
                return;
            }
            let len = be32(&output[16..20]) as usize;
            assert!(len <= MAX_PAYLOAD as usize + 8 + 4096);
            if output.len() < 20 + len {
                return;
            }
            let _ = output.split_to(20 + len);
        } else {
            // Simple replies carry READ data without a length: stop at the first one with
            // data, as only the request tells its length.
            assert_eq!(magic, SIMPLE_REPLY_MAGIC, "reply magic");
            output.clear();
            return;
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
