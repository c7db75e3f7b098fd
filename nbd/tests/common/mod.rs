//! An in-memory NBD pair for the tests: our client and our server joined by byte buffers that
//! deliver in pieces of chosen sizes, and a memory disk the server side answers from.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use nbd::wire::*;
use nbd::{
    BlockSize, Client, ClientHandshake, ClientOptions, Command, Cookie, Descriptor, Error, Export,
    ExportInfo, HandshakeEvent, LookupError, Reply, Request, Server, ServerHandshake,
};
use std::collections::HashMap;

pub const BLOCK: u64 = 4096;

/// Moves `from`'s output into `to`, `piece` bytes at a time (whole if 0), through `pieces`.
pub struct Pipe {
    pub pieces: Vec<usize>,
    at: usize,
}

impl Pipe {
    pub fn new(pieces: &[usize]) -> Pipe {
        Pipe {
            pieces: if pieces.is_empty() {
                vec![0]
            } else {
                pieces.to_vec()
            },
            at: 0,
        }
    }

    /// The next piece size (0 = everything).
    pub fn next(&mut self) -> usize {
        let p = self.pieces[self.at % self.pieces.len()];
        self.at += 1;
        p
    }
}

/// A pending transfer of bytes, delivered piecewise.
#[derive(Default)]
pub struct Wire {
    pending: BytesMut,
}

impl Wire {
    pub fn push(&mut self, b: &[u8]) {
        self.pending.extend_from_slice(b);
    }
    /// Moves one piece into `to`; false if nothing was pending.
    pub fn deliver(&mut self, to: &mut BytesMut, pipe: &mut Pipe) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let n = match pipe.next() {
            0 => self.pending.len(),
            n => n.min(self.pending.len()),
        };
        to.extend_from_slice(&self.pending.split_to(n));
        true
    }
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// An export in memory: content plus which 4 KiB blocks the server calls holes.
#[derive(Clone, Debug)]
pub struct MemDisk {
    pub data: Vec<u8>,
    /// Per block: reported as a hole (its content must be zero).
    pub hole: Vec<bool>,
}

impl MemDisk {
    /// `size` bytes; blocks whose index is in `data_blocks` get pseudo-random content.
    pub fn new(size: u64, data_blocks: &[u64], seed: u64) -> MemDisk {
        let blocks = size.div_ceil(BLOCK) as usize;
        let mut data = vec![0u8; size as usize];
        let mut hole = vec![true; blocks];
        let mut s = seed | 1;
        for &b in data_blocks {
            let b = b as usize % blocks.max(1);
            hole[b] = false;
            let start = b * BLOCK as usize;
            let end = (start + BLOCK as usize).min(data.len());
            for byte in &mut data[start..end] {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *byte = s as u8;
            }
        }
        MemDisk { data, hole }
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Consecutive (len, flags) from `offset` for `len` bytes, merged, `base:allocation`.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Descriptor> {
        let mut out: Vec<Descriptor> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let b = (pos / BLOCK) as usize;
            let next = ((b as u64 + 1) * BLOCK).min(end);
            let flags = if self.hole[b] {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let n = (next - pos) as u32;
            match out.last_mut() {
                Some(d) if d.flags == flags => d.len += n,
                _ => out.push(Descriptor { len: n, flags }),
            }
            pos = next;
        }
        out
    }

    pub fn info(&self, read_only: bool) -> ExportInfo {
        let mut flags =
            FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO | FLAG_SEND_TRIM;
        if read_only {
            flags |= FLAG_READ_ONLY;
        }
        ExportInfo {
            size: self.size(),
            flags,
            block_size: BlockSize::default(),
        }
    }
}

/// Runs both handshakes to the transmission phase. `lookup` answers the server's lookups.
pub fn handshake(
    options: ClientOptions,
    lookup: &dyn Fn(&str) -> Result<ExportInfo, LookupError>,
    pipe: &mut Pipe,
) -> Result<(Export, Export, BytesMut, BytesMut), Error> {
    let mut client = ClientHandshake::new(options)?;
    let mut server = ServerHandshake::new();
    let (mut to_client, mut to_server) = (Wire::default(), Wire::default());
    let (mut c_in, mut s_in) = (BytesMut::new(), BytesMut::new());
    let (mut c_done, mut s_done) = (None, None);
    for _ in 0..100_000 {
        while let Some(b) = server.poll_transmit() {
            to_client.push(&b);
        }
        while let Some(b) = client.poll_transmit() {
            to_server.push(&b);
        }
        let moved = to_client.deliver(&mut c_in, pipe) | to_server.deliver(&mut s_in, pipe);
        if c_done.is_none() {
            c_done = client.handle_input(&mut c_in)?;
        }
        if s_done.is_none() {
            match server.handle_input(&mut s_in)? {
                Some(HandshakeEvent::Lookup { name }) => {
                    if let Some(HandshakeEvent::Ready(e)) = server.answer(lookup(&name))? {
                        s_done = Some(e);
                    }
                }
                Some(HandshakeEvent::List) => server.answer_list(&["".into()])?,
                Some(HandshakeEvent::Ready(e)) => s_done = Some(e),
                None => {}
            }
        }
        while let Some(b) = server.poll_transmit() {
            to_client.push(&b);
        }
        if let (Some(c), Some(s)) = (&c_done, &s_done) {
            if to_client.is_empty() && to_server.is_empty() {
                return Ok((c.clone(), s.clone(), c_in, s_in));
            }
        }
        if !moved && c_done.is_some() && s_done.is_some() {
            break;
        }
    }
    panic!("handshake did not finish");
}

/// What the client saw of one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// READ content reassembled (holes as zeroes).
    pub content: Vec<u8>,
    pub holes: u64,
    /// Block status per context.
    pub extents: HashMap<u32, Vec<Descriptor>>,
    pub result: Option<Result<(), nbd::CommandError>>,
}

/// Our client and server in transmission, the server answering from a `MemDisk`.
pub struct Session {
    pub client: Client,
    pub server: Server,
    pub disk: MemDisk,
    c_in: BytesMut,
    s_in: BytesMut,
    to_client: Wire,
    to_server: Wire,
    pub pipe: Pipe,
    /// Pieces of READ replies go out in this rotation of their natural order.
    pub shuffle: usize,
    pub outcomes: HashMap<Cookie, Outcome>,
    requests: HashMap<Cookie, Command>,
    /// Most requests the server host ever held at once.
    pub max_seen_in_flight: usize,
    pub fail_reads: bool,
}

impl Session {
    pub fn new(disk: MemDisk, read_only: bool, max_in_flight: usize, pieces: &[usize]) -> Session {
        let mut pipe = Pipe::new(pieces);
        let info = disk.info(read_only);
        let (ce, se, c_in, s_in) = handshake(
            ClientOptions {
                export: "disk".into(),
                contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
            },
            &|_| Ok(info.clone()),
            &mut pipe,
        )
        .expect("handshake");
        Session {
            client: Client::new(ce, max_in_flight),
            server: Server::new(se, max_in_flight),
            disk,
            c_in,
            s_in,
            to_client: Wire::default(),
            to_server: Wire::default(),
            pipe,
            shuffle: 0,
            outcomes: HashMap::new(),
            requests: HashMap::new(),
            max_seen_in_flight: 0,
            fail_reads: false,
        }
    }

    pub fn send(&mut self, cmd: Command) -> Cookie {
        let c = self.client.send(cmd.clone()).expect("send");
        self.requests.insert(c, cmd);
        self.outcomes.insert(c, Outcome::default());
        c
    }

    fn serve(&mut self, req: Request) {
        match req {
            Request::Read {
                cookie,
                offset,
                len,
            } => {
                if self.fail_reads {
                    self.server.reply_error(cookie, EIO, "broken").unwrap();
                    return;
                }
                // Pieces by block: holes as OFFSET_HOLE, data as OFFSET_DATA.
                let mut pieces = Vec::new();
                let mut pos = offset;
                let end = offset + len as u64;
                while pos < end {
                    let next = ((pos / BLOCK + 1) * BLOCK).min(end);
                    pieces.push((pos, next, self.disk.hole[(pos / BLOCK) as usize]));
                    pos = next;
                }
                if self.server.export().structured && !pieces.is_empty() {
                    let k = self.shuffle % pieces.len();
                    pieces.rotate_left(k);
                }
                for (s, e, hole) in pieces {
                    if hole {
                        self.server.reply_hole(cookie, s, (e - s) as u32).unwrap();
                    } else {
                        let b = Bytes::copy_from_slice(&self.disk.data[s as usize..e as usize]);
                        self.server.reply_data(cookie, s, b).unwrap();
                    }
                }
                self.server.reply_done(cookie).unwrap();
            }
            Request::Write {
                cookie,
                offset,
                data,
                ..
            } => {
                let o = offset as usize;
                self.disk.data[o..o + data.len()].copy_from_slice(&data);
                let (first, last) = (offset / BLOCK, (offset + data.len() as u64 - 1) / BLOCK);
                for b in first..=last {
                    self.disk.hole[b as usize] = false;
                }
                self.server.reply_done(cookie).unwrap();
            }
            Request::WriteZeroes {
                cookie,
                offset,
                len,
                fast,
                ..
            } => {
                if fast {
                    self.server
                        .reply_error(cookie, ENOTSUP, "not fast here")
                        .unwrap();
                    return;
                }
                let o = offset as usize;
                self.disk.data[o..o + len as usize].fill(0);
                self.server.reply_done(cookie).unwrap();
            }
            Request::BlockStatus {
                cookie,
                offset,
                len,
                req_one,
            } => {
                let mut ext = self.disk.extents(offset, len as u64);
                if req_one {
                    ext.truncate(1);
                }
                self.server
                    .reply_block_status(cookie, nbd::server_handshake::BASE_ALLOCATION_ID, &ext)
                    .unwrap();
                self.server.reply_done(cookie).unwrap();
            }
            Request::Trim { cookie, .. } | Request::Flush { cookie } => {
                self.server.reply_done(cookie).unwrap()
            }
            Request::Disconnect => {}
        }
    }

    /// Moves bytes both ways and handles everything until nothing moves. Server host requests
    /// are answered at once unless `hold` (then they are answered by `release`).
    pub fn run(&mut self) -> Result<(), Error> {
        for _ in 0..10_000_000 {
            let mut progress = false;
            while let Some(b) = self.client.poll_transmit() {
                self.to_server.push(&b);
            }
            progress |= self.to_server.deliver(&mut self.s_in, &mut self.pipe);
            let mut held = Vec::new();
            while let Some(req) = self.server.decode(&mut self.s_in)? {
                held.push(req);
                self.max_seen_in_flight = self.max_seen_in_flight.max(self.server.in_flight());
                progress = true;
            }
            for req in held {
                self.serve(req);
            }
            while let Some(b) = self.server.poll_transmit() {
                self.to_client.push(&b);
            }
            progress |= self.to_client.deliver(&mut self.c_in, &mut self.pipe);
            while let Some(r) = self.client.decode(&mut self.c_in)? {
                progress = true;
                self.take(r);
            }
            if !progress {
                return Ok(());
            }
        }
        panic!("session did not settle");
    }

    fn take(&mut self, r: Reply) {
        match r {
            Reply::Data {
                cookie,
                offset,
                bytes,
            } => {
                let Some(Command::Read { offset: o, len }) = self.requests.get(&cookie) else {
                    panic!("data for a non-read");
                };
                let out = self.outcomes.get_mut(&cookie).unwrap();
                if out.content.is_empty() {
                    out.content = vec![0xAA; *len as usize];
                }
                let at = (offset - o) as usize;
                out.content[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            Reply::Hole {
                cookie,
                offset,
                len,
            } => {
                let Some(Command::Read { offset: o, len: rl }) = self.requests.get(&cookie) else {
                    panic!("hole for a non-read");
                };
                let out = self.outcomes.get_mut(&cookie).unwrap();
                if out.content.is_empty() {
                    out.content = vec![0xAA; *rl as usize];
                }
                let at = (offset - o) as usize;
                out.content[at..at + len as usize].fill(0);
                out.holes += len as u64;
            }
            Reply::BlockStatus {
                cookie,
                context,
                extents,
                ..
            } => {
                self.outcomes
                    .get_mut(&cookie)
                    .unwrap()
                    .extents
                    .insert(context, extents);
            }
            Reply::Done { cookie, result } => {
                self.outcomes.get_mut(&cookie).unwrap().result = Some(result);
            }
        }
    }
}
