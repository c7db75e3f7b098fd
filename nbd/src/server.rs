//! [`Server`]: the transmission phase, server side. It decodes and checks requests, answers
//! the ones that are invalid by itself, and encodes the host's replies as structured reply
//! chunks (or simple replies for a client that did not negotiate them).
//!
//! Call order: feed client bytes to `decode` while `wants_input` (it returns requests to carry
//! out); answer each request with `reply_*` calls ending in `reply_done` or `reply_error`; send
//! what `poll_transmit` gives, in order.
//!
//! Bounds against a hostile client: at most `max_in_flight` requests are handed to the host at
//! once, `wants_input` turns false while that many are out or while more than
//! [`MAX_OUTPUT_BACKLOG`] bytes of replies wait to be sent (a client that does not read stops
//! being read), and a WRITE payload larger than the advertised maximum ends the connection
//! before it is buffered.

use crate::client::{Cookie, Descriptor};
use crate::error::Error;
use crate::export::Export;
use crate::wire::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};

/// Replies waiting to be sent beyond which the server reads no more requests.
pub const MAX_OUTPUT_BACKLOG: usize = 4 << 20;

/// Zeroes for holes of a READ answered with a simple reply (which cannot skip them).
static ZEROES: [u8; 1 << 16] = [0; 1 << 16];

/// A request the host must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Read {
        cookie: Cookie,
        offset: u64,
        len: u32,
    },
    Write {
        cookie: Cookie,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    WriteZeroes {
        cookie: Cookie,
        offset: u64,
        len: u32,
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    Trim {
        cookie: Cookie,
        offset: u64,
        len: u32,
    },
    Flush {
        cookie: Cookie,
    },
    BlockStatus {
        cookie: Cookie,
        offset: u64,
        len: u32,
        req_one: bool,
    },
    /// NBD_CMD_DISC: answer what is in flight, then close. Nothing more is decoded.
    Disconnect,
}

#[derive(Debug)]
struct InFlight {
    cmd: u16,
    offset: u64,
    len: u32,
    req_one: bool,
    /// Simple READ replies: the header went out, and the content up to here.
    started: bool,
    next: u64,
}

pub struct Server {
    export: Export,
    max_in_flight: usize,
    in_flight: HashMap<Cookie, InFlight>,
    out: VecDeque<Bytes>,
    out_bytes: usize,
    headers: BytesMut,
    disconnected: bool,
}

impl Server {
    pub fn new(export: Export, max_in_flight: usize) -> Server {
        Server {
            export,
            max_in_flight: max_in_flight.max(1),
            in_flight: HashMap::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            headers: BytesMut::new(),
            disconnected: false,
        }
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether to read and decode more requests now.
    pub fn wants_input(&self) -> bool {
        !self.disconnected
            && self.in_flight.len() < self.max_in_flight
            && self.out_bytes + self.headers.len() <= MAX_OUTPUT_BACKLOG
    }

    /// The client sent NBD_CMD_DISC.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected
    }

    /// Decodes the next request to carry out. Invalid requests are answered here and skipped.
    /// An error means the client broke the protocol: close the connection.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Request>, Error> {
        while self.wants_input() {
            if input.len() < REQUEST_LEN {
                return Ok(None);
            }
            let magic = be32(&input[0..4]);
            if magic != REQUEST_MAGIC {
                return Err(Error::protocol(if magic == EXTENDED_REQUEST_MAGIC {
                    "an extended-header request, which was never negotiated".to_string()
                } else {
                    format!("request magic {magic:#010x}")
                }));
            }
            let flags = u16::from_be_bytes([input[4], input[5]]);
            let cmd = u16::from_be_bytes([input[6], input[7]]);
            let cookie = be64(&input[8..16]);
            let offset = be64(&input[16..24]);
            let len = be32(&input[24..28]);
            let mut data = None;
            if cmd == CMD_WRITE {
                if len > self.export.block_size.maximum {
                    return Err(Error::protocol(format!(
                        "WRITE of {len} bytes (the maximum payload is {})",
                        self.export.block_size.maximum
                    )));
                }
                if input.len() < REQUEST_LEN + len as usize {
                    return Ok(None);
                }
                input.advance(REQUEST_LEN);
                data = Some(input.split_to(len as usize).freeze());
            } else {
                input.advance(REQUEST_LEN);
            }
            if cmd == CMD_DISC {
                self.disconnected = true;
                return Ok(Some(Request::Disconnect));
            }
            if self.in_flight.contains_key(&cookie) {
                return Err(Error::protocol(format!(
                    "cookie {cookie:#x} reused while its request is in flight"
                )));
            }
            match self.check(flags, cmd, offset, len) {
                Err((errno, message)) => {
                    log::debug!(
                        "refusing {} of {len} bytes at {offset}: {message}",
                        command_name(cmd)
                    );
                    self.put_error(cookie, errno, &message);
                    continue;
                }
                Ok(()) if len == 0 && cmd != CMD_FLUSH => {
                    // Nothing to do: success without bothering the host.
                    self.put_done(cookie);
                    continue;
                }
                Ok(()) => {}
            }
            self.in_flight.insert(
                cookie,
                InFlight {
                    cmd,
                    offset,
                    len,
                    req_one: flags & CMD_FLAG_REQ_ONE != 0,
                    started: false,
                    next: offset,
                },
            );
            let fua = flags & CMD_FLAG_FUA != 0;
            return Ok(Some(match cmd {
                CMD_READ => Request::Read {
                    cookie,
                    offset,
                    len,
                },
                CMD_WRITE => Request::Write {
                    cookie,
                    offset,
                    data: data.unwrap_or_default(),
                    fua,
                },
                CMD_WRITE_ZEROES => Request::WriteZeroes {
                    cookie,
                    offset,
                    len,
                    no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                    fast: flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                },
                CMD_TRIM => Request::Trim {
                    cookie,
                    offset,
                    len,
                },
                CMD_FLUSH => Request::Flush { cookie },
                CMD_BLOCK_STATUS => Request::BlockStatus {
                    cookie,
                    offset,
                    len,
                    req_one: flags & CMD_FLAG_REQ_ONE != 0,
                },
                _ => unreachable!("check() refuses other commands"),
            }));
        }
        Ok(None)
    }

    /// Whether a request may be handed to the host; the error to answer otherwise.
    fn check(&self, flags: u16, cmd: u16, offset: u64, len: u32) -> Result<(), (u32, String)> {
        let e = &self.export;
        let allowed = match cmd {
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => {
                CMD_FLAG_FUA
                    | CMD_FLAG_NO_HOLE
                    | if e.can_fast_zero() {
                        CMD_FLAG_FAST_ZERO
                    } else {
                        0
                    }
            }
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Err((EINVAL, format!("unknown command {cmd}"))),
        };
        let name = command_name(cmd);
        if flags & !allowed != 0 {
            return Err((EINVAL, format!("flags {flags:#x} not valid for {name}")));
        }
        let writes = matches!(cmd, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
        if writes && e.read_only() {
            return Err((EPERM, "the export is read-only".into()));
        }
        let offered = match cmd {
            CMD_WRITE_ZEROES => e.can_write_zeroes(),
            CMD_TRIM => e.can_trim(),
            CMD_FLUSH => e.can_flush(),
            CMD_BLOCK_STATUS => !e.contexts.is_empty(),
            _ => true,
        };
        if !offered {
            return Err((EINVAL, format!("{name} was not negotiated")));
        }
        if cmd == CMD_FLUSH {
            return Ok(());
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > e.size)
        {
            let errno = if writes { ENOSPC } else { EINVAL };
            return Err((
                errno,
                format!("{len} bytes at {offset} pass the end of the export"),
            ));
        }
        let min = e.block_size.minimum as u64;
        let end = offset + len as u64;
        if !offset.is_multiple_of(min) || (!end.is_multiple_of(min) && end != e.size) {
            return Err((EINVAL, format!("not aligned to {min} bytes")));
        }
        if cmd == CMD_READ && len > e.block_size.maximum {
            return Err((
                EOVERFLOW,
                format!(
                    "READ of {len} bytes (the maximum payload is {})",
                    e.block_size.maximum
                ),
            ));
        }
        Ok(())
    }

    fn push(&mut self, b: Bytes) {
        self.flush_headers();
        self.out_bytes += b.len();
        self.out.push_back(b);
    }

    fn flush_headers(&mut self) {
        if !self.headers.is_empty() {
            let h = self.headers.split().freeze();
            self.out_bytes += h.len();
            self.out.push_back(h);
        }
    }

    fn chunk_header(&mut self, flags: u16, rtype: u16, cookie: Cookie, len: usize) {
        let h = &mut self.headers;
        h.put_u32(STRUCTURED_REPLY_MAGIC);
        h.put_u16(flags);
        h.put_u16(rtype);
        h.put_u64(cookie);
        h.put_u32(len as u32);
    }

    fn simple_header(&mut self, errno: u32, cookie: Cookie) {
        let h = &mut self.headers;
        h.put_u32(SIMPLE_REPLY_MAGIC);
        h.put_u32(errno);
        h.put_u64(cookie);
    }

    fn put_error(&mut self, cookie: Cookie, errno: u32, message: &str) {
        if self.export.structured {
            let m = &message.as_bytes()[..message.len().min(MAX_STRING)];
            self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + m.len());
            self.headers.put_u32(errno);
            self.headers.put_u16(m.len() as u16);
            self.headers.put_slice(m);
        } else {
            self.simple_header(errno, cookie);
        }
    }

    fn put_done(&mut self, cookie: Cookie) {
        if self.export.structured {
            self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
        } else {
            self.simple_header(0, cookie);
        }
    }

    fn read_piece(&mut self, cookie: Cookie, offset: u64, len: u64) -> Result<(), Error> {
        let structured = self.export.structured;
        let Some(f) = self.in_flight.get_mut(&cookie) else {
            return Err(Error::invalid(format!("no request {cookie:#x} in flight")));
        };
        let end = f.offset + f.len as u64;
        if f.cmd != CMD_READ || len == 0 || offset < f.offset || offset + len > end {
            return Err(Error::invalid(format!(
                "content {offset}+{len} is not part of request {cookie:#x}"
            )));
        }
        if !structured {
            if offset != f.next {
                return Err(Error::invalid(
                    "a simple READ reply needs its content in order",
                ));
            }
            f.next += len;
            if !f.started {
                f.started = true;
                self.simple_header(0, cookie);
            }
        }
        Ok(())
    }

    /// Content of a READ. For a client without structured replies, pieces must come in order.
    pub fn reply_data(&mut self, cookie: Cookie, offset: u64, data: Bytes) -> Result<(), Error> {
        self.read_piece(cookie, offset, data.len() as u64)?;
        if self.export.structured {
            self.chunk_header(0, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len());
            self.headers.put_u64(offset);
        }
        self.push(data);
        Ok(())
    }

    /// A part of a READ that reads as zeroes.
    pub fn reply_hole(&mut self, cookie: Cookie, offset: u64, len: u32) -> Result<(), Error> {
        self.read_piece(cookie, offset, len as u64)?;
        if self.export.structured {
            self.chunk_header(0, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            self.headers.put_u64(offset);
            self.headers.put_u32(len);
        } else {
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(ZEROES.len());
                self.push(Bytes::from_static(&ZEROES[..n]));
                left -= n;
            }
        }
        Ok(())
    }

    /// The status of consecutive extents from the request's offset in context `context`.
    pub fn reply_block_status(
        &mut self,
        cookie: Cookie,
        context: u32,
        extents: &[Descriptor],
    ) -> Result<(), Error> {
        let (len, req_one) = match self.in_flight.get(&cookie) {
            Some(f) if f.cmd == CMD_BLOCK_STATUS => (f.len as u64, f.req_one),
            _ => {
                return Err(Error::invalid(format!(
                    "no block status request {cookie:#x} in flight"
                )))
            }
        };
        if extents.is_empty()
            || extents.len() > MAX_DESCRIPTORS
            || extents.iter().any(|d| d.len == 0)
        {
            return Err(Error::invalid(
                "a block status reply needs 1 to 2^20 extents, none empty",
            ));
        }
        // The rules a client checks: every extent but the last starts inside the request, and
        // with REQ_ONE there is one, no longer than the request.
        let before_last: u64 = extents[..extents.len() - 1]
            .iter()
            .map(|d| d.len as u64)
            .sum();
        if extents.len() > 1 && before_last >= len {
            return Err(Error::invalid("block status extents run past the request"));
        }
        if req_one && (extents.len() != 1 || extents[0].len as u64 > len) {
            return Err(Error::invalid(
                "a REQ_ONE block status takes one extent within the request",
            ));
        }
        self.chunk_header(0, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * extents.len());
        self.headers.put_u32(context);
        for d in extents {
            self.headers.put_u32(d.len);
            self.headers.put_u32(d.flags);
        }
        Ok(())
    }

    /// Completes a request successfully.
    pub fn reply_done(&mut self, cookie: Cookie) -> Result<(), Error> {
        let Some(f) = self.in_flight.remove(&cookie) else {
            return Err(Error::invalid(format!("no request {cookie:#x} in flight")));
        };
        if !self.export.structured && f.cmd == CMD_READ {
            if f.next != f.offset + f.len as u64 {
                return Err(Error::invalid(
                    "a simple READ reply must carry the whole range",
                ));
            }
            // The header went out with the content.
            return Ok(());
        }
        self.put_done(cookie);
        Ok(())
    }

    /// Completes a request with an error. Where the protocol cannot report it (a simple READ
    /// reply whose content has started), the error says so and the connection must be closed.
    pub fn reply_error(&mut self, cookie: Cookie, errno: u32, message: &str) -> Result<(), Error> {
        let Some(f) = self.in_flight.remove(&cookie) else {
            return Err(Error::invalid(format!("no request {cookie:#x} in flight")));
        };
        if !self.export.structured && f.started {
            return Err(Error::invalid(format!(
                "READ failed after its simple reply started ({message}): the connection must close"
            )));
        }
        self.put_error(cookie, errno.max(1), message);
        Ok(())
    }

    /// The next piece of output, in order.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.flush_headers();
        let b = self.out.pop_front()?;
        self.out_bytes -= b.len();
        Some(b)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.headers.is_empty()
    }
}
