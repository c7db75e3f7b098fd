//! [`Client`]: the transmission phase, client side. It numbers and encodes requests, keeps the
//! requests in flight (bounded), and checks every reply against the request it answers before
//! handing its content on.
//!
//! Call order: `send` requests while `can_send`; send what `poll_transmit` gives, in order; put
//! what the server sends at the end of a buffer and call `decode` until it returns `None`.
//!
//! Nothing the server sends is allocated before it was checked: a chunk's payload is awaited
//! only if its length fits the request it claims to answer (a READ's data at most its length,
//! a block status at most [`MAX_DESCRIPTORS`] descriptors, an error at most a message), so the
//! input buffer never holds more than one request's worth plus a header.

use crate::error::{CommandError, Error};
use crate::export::Export;
use crate::ranges::Ranges;
use crate::wire::*;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};

mod reply;
pub use reply::{Descriptor, Reply};

/// A request's cookie (the protocol's "handle"), echoed by every reply to it.
pub type Cookie = u64;

/// A request of the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// The range must read back as zero. `no_hole` asks the server to allocate it;
    /// `fast` asks it to fail with ENOTSUP unless zeroing is faster than writing.
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fast: bool,
    },
    /// Discard: the content becomes undefined. Never a way to zero.
    Trim {
        offset: u64,
        len: u32,
    },
    Flush,
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

#[derive(Debug)]
struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
    req_one: bool,
    covered: Ranges,
    contexts_seen: Vec<u32>,
    error: Option<CommandError>,
}

pub struct Client {
    export: Export,
    max_in_flight: usize,
    pending: HashMap<Cookie, Pending>,
    next_cookie: Cookie,
    out: VecDeque<Bytes>,
    headers: BytesMut,
    ready: VecDeque<Reply>,
    disconnected: bool,
}

impl Client {
    /// A client for a negotiated export, with at most `max_in_flight` requests unanswered.
    pub fn new(export: Export, max_in_flight: usize) -> Client {
        Client {
            export,
            max_in_flight: max_in_flight.max(1),
            pending: HashMap::new(),
            next_cookie: 1,
            out: VecDeque::new(),
            headers: BytesMut::new(),
            ready: VecDeque::new(),
            disconnected: false,
        }
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn can_send(&self) -> bool {
        !self.disconnected && self.pending.len() < self.max_in_flight
    }

    /// Queues a request; its cookie names the replies. Refuses what the export does not allow.
    pub fn send(&mut self, cmd: Command) -> Result<Cookie, Error> {
        if self.disconnected {
            return Err(Error::invalid("the client has disconnected"));
        }
        if self.pending.len() >= self.max_in_flight {
            return Err(Error::invalid(format!(
                "{} requests in flight already (the bound)",
                self.pending.len()
            )));
        }
        let e = &self.export;
        let (code, flags, offset, len, payload) = match &cmd {
            &Command::Read { offset, len } => {
                self.check_range("READ", offset, len, true)?;
                (CMD_READ, 0, offset, len, None)
            }
            Command::Write { offset, data, fua } => {
                if e.read_only() {
                    return Err(Error::invalid("WRITE to a read-only export"));
                }
                let len = u32::try_from(data.len())
                    .map_err(|_| Error::invalid("WRITE payload past 4 GiB"))?;
                self.check_range("WRITE", *offset, len, true)?;
                let flags = if *fua && e.can_fua() { CMD_FLAG_FUA } else { 0 };
                (CMD_WRITE, flags, *offset, len, Some(data.clone()))
            }
            &Command::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
            } => {
                if e.read_only() || !e.can_write_zeroes() {
                    return Err(Error::invalid(
                        "WRITE_ZEROES on an export that does not offer it",
                    ));
                }
                if fast && !e.can_fast_zero() {
                    return Err(Error::invalid(
                        "FAST_ZERO on an export that does not offer it",
                    ));
                }
                self.check_range("WRITE_ZEROES", offset, len, false)?;
                let mut flags = 0;
                if no_hole {
                    flags |= CMD_FLAG_NO_HOLE;
                }
                if fast {
                    flags |= CMD_FLAG_FAST_ZERO;
                }
                (CMD_WRITE_ZEROES, flags, offset, len, None)
            }
            &Command::Trim { offset, len } => {
                if e.read_only() || !e.can_trim() {
                    return Err(Error::invalid("TRIM on an export that does not offer it"));
                }
                self.check_range("TRIM", offset, len, false)?;
                (CMD_TRIM, 0, offset, len, None)
            }
            Command::Flush => {
                if !e.can_flush() {
                    return Err(Error::invalid("FLUSH on an export that does not offer it"));
                }
                (CMD_FLUSH, 0, 0, 0, None)
            }
            &Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                if e.contexts.is_empty() {
                    return Err(Error::invalid(
                        "BLOCK_STATUS without a selected metadata context",
                    ));
                }
                self.check_range("BLOCK_STATUS", offset, len, false)?;
                let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
                (CMD_BLOCK_STATUS, flags, offset, len, None)
            }
        };
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        self.put_request(flags, code, cookie, offset, len);
        if let Some(data) = payload {
            self.flush_headers();
            self.out.push_back(data);
        }
        self.pending.insert(
            cookie,
            Pending {
                cmd: code,
                offset,
                len,
                req_one: flags & CMD_FLAG_REQ_ONE != 0,
                covered: Ranges::default(),
                contexts_seen: Vec::new(),
                error: None,
            },
        );
        Ok(cookie)
    }

    /// Queues NBD_CMD_DISC: the server finishes what is in flight and closes. Nothing can be
    /// sent after it.
    pub fn disconnect(&mut self) {
        if !self.disconnected {
            self.put_request(0, CMD_DISC, 0, 0, 0);
            self.disconnected = true;
        }
    }

    fn put_request(&mut self, flags: u16, cmd: u16, cookie: Cookie, offset: u64, len: u32) {
        let h = &mut self.headers;
        h.put_u32(REQUEST_MAGIC);
        h.put_u16(flags);
        h.put_u16(cmd);
        h.put_u64(cookie);
        h.put_u64(offset);
        h.put_u32(len);
    }

    fn flush_headers(&mut self) {
        if !self.headers.is_empty() {
            self.out.push_back(self.headers.split().freeze());
        }
    }

    fn check_range(&self, what: &str, offset: u64, len: u32, payload: bool) -> Result<(), Error> {
        let e = &self.export;
        if len == 0 {
            return Err(Error::invalid(format!("{what} of zero bytes")));
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > e.size)
        {
            return Err(Error::invalid(format!(
                "{what} of {len} bytes at {offset} past the end of the export ({} bytes)",
                e.size
            )));
        }
        let min = e.block_size.minimum as u64;
        let end = offset + len as u64;
        if !offset.is_multiple_of(min) || (!(len as u64).is_multiple_of(min) && end != e.size) {
            return Err(Error::invalid(format!(
                "{what} of {len} bytes at {offset} is not aligned to the export's \
                 minimum block size {min}"
            )));
        }
        if payload && len > e.block_size.maximum {
            return Err(Error::invalid(format!(
                "{what} of {len} bytes exceeds the export's maximum payload {}",
                e.block_size.maximum
            )));
        }
        Ok(())
    }

    /// The next piece of output, in order (request headers, and WRITE payloads as given).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.flush_headers();
        self.out.pop_front()
    }

    /// Whether output is waiting.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.headers.is_empty()
    }
}
