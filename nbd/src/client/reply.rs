//! Replies of the transmission phase, client side: each reply piece is checked against the
//! request in flight that it claims to answer before its content is handed on (see the parent
//! module for what is allocated when).

use super::{Client, Cookie, Pending};
use crate::error::{CommandError, Error};
use crate::ranges::AddError;
use crate::wire::*;
use crate::wire::{be32, be64, text};
use bytes::{Buf, Bytes, BytesMut};

/// One extent of a block status reply: `len` bytes with the context's `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u32,
    pub flags: u32,
}

/// What the server said, one piece at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Content of a READ (pieces may come in any order; they never overlap).
    Data {
        cookie: Cookie,
        offset: u64,
        bytes: Bytes,
    },
    /// A part of a READ that reads as zeroes.
    Hole {
        cookie: Cookie,
        offset: u64,
        len: u32,
    },
    /// The status of consecutive extents from `offset` in one metadata context, clipped to
    /// the requested range (so they never sum past it).
    BlockStatus {
        cookie: Cookie,
        context: u32,
        offset: u64,
        extents: Vec<Descriptor>,
    },
    /// The request is complete. A READ that succeeded was covered exactly once; a block status
    /// that succeeded had one reply per selected context.
    Done {
        cookie: Cookie,
        result: Result<(), CommandError>,
    },
}

enum Step {
    More,
    Consumed,
    Got(Reply),
}

/// The largest error chunk accepted: the fixed fields, a message and an offset.
const MAX_ERROR_CHUNK: u32 = 14 + MAX_STRING as u32 + 64;

impl Client {
    /// At least this many bytes must be in `input` for `decode` to make progress (a hint for a
    /// reader that wants to read a whole chunk at once).
    /// Never more than the message at the front holds, so a reader that waits for this many
    /// bytes never waits for bytes the server has no reason to send.
    pub fn needed(&self, input: &BytesMut) -> usize {
        if input.len() < 4 {
            // The shortest message there is.
            return SIMPLE_REPLY_LEN;
        }
        match be32(&input[..4]) {
            SIMPLE_REPLY_MAGIC if input.len() >= SIMPLE_REPLY_LEN => {
                let cookie = be64(&input[8..16]);
                match self.pending.get(&cookie) {
                    Some(p) if p.cmd == CMD_READ && be32(&input[4..8]) == 0 => {
                        SIMPLE_REPLY_LEN + p.len as usize
                    }
                    _ => SIMPLE_REPLY_LEN,
                }
            }
            STRUCTURED_REPLY_MAGIC if input.len() >= STRUCTURED_HEADER_LEN => {
                STRUCTURED_HEADER_LEN + be32(&input[16..20]) as usize
            }
            SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            _ => SIMPLE_REPLY_LEN,
        }
    }

    /// Decodes the next reply piece from the front of `input`, or `None` until more arrives.
    /// An error means the server broke the protocol: drop the connection.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Reply>, Error> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Ok(Some(r));
            }
            if input.len() < 4 {
                return Ok(None);
            }
            let step = match be32(&input[..4]) {
                SIMPLE_REPLY_MAGIC => self.simple(input)?,
                STRUCTURED_REPLY_MAGIC => self.structured(input)?,
                EXTENDED_REPLY_MAGIC => {
                    return Err(Error::protocol(
                        "an extended-header reply, which was never negotiated",
                    ))
                }
                m => return Err(Error::protocol(format!("reply magic {m:#010x}"))),
            };
            match step {
                Step::More => return Ok(None),
                Step::Got(r) => return Ok(Some(r)),
                // An error chunk that is not the last: nothing to hand on yet.
                Step::Consumed => {}
            }
        }
    }

    fn pending(&self, cookie: Cookie) -> Result<&Pending, Error> {
        self.pending.get(&cookie).ok_or_else(|| {
            Error::protocol(format!(
                "reply for cookie {cookie:#x}, which is not in flight"
            ))
        })
    }

    fn simple(&mut self, input: &mut BytesMut) -> Result<Step, Error> {
        if input.len() < SIMPLE_REPLY_LEN {
            return Ok(Step::More);
        }
        let errno = be32(&input[4..8]);
        let cookie = be64(&input[8..16]);
        let p = self.pending(cookie)?;
        let is_read = p.cmd == CMD_READ;
        if is_read && self.export.structured {
            return Err(Error::protocol(
                "a simple reply to READ after structured replies were negotiated",
            ));
        }
        if is_read && errno == 0 {
            let len = p.len as usize;
            if input.len() < SIMPLE_REPLY_LEN + len {
                return Ok(Step::More);
            }
            let offset = p.offset;
            input.advance(SIMPLE_REPLY_LEN);
            let bytes = input.split_to(len).freeze();
            self.pending.remove(&cookie);
            self.ready.push_back(Reply::Done {
                cookie,
                result: Ok(()),
            });
            return Ok(Step::Got(Reply::Data {
                cookie,
                offset,
                bytes,
            }));
        }
        input.advance(SIMPLE_REPLY_LEN);
        self.pending.remove(&cookie);
        let result = match errno {
            0 => Ok(()),
            e => Err(CommandError::new(e, "")),
        };
        Ok(Step::Got(Reply::Done { cookie, result }))
    }

    fn structured(&mut self, input: &mut BytesMut) -> Result<Step, Error> {
        if input.len() < STRUCTURED_HEADER_LEN {
            return Ok(Step::More);
        }
        if !self.export.structured {
            return Err(Error::protocol(
                "a structured reply, which was never negotiated",
            ));
        }
        let flags = u16::from_be_bytes([input[4], input[5]]);
        let rtype = u16::from_be_bytes([input[6], input[7]]);
        let cookie = be64(&input[8..16]);
        let len = be32(&input[16..20]);
        let p = self.pending(cookie)?;
        let cmd = command_name(p.cmd);
        // Every length is judged before its payload is awaited.
        let fits = match rtype {
            REPLY_TYPE_NONE => {
                if flags & REPLY_FLAG_DONE == 0 {
                    return Err(Error::protocol("NBD_REPLY_TYPE_NONE without the DONE flag"));
                }
                len == 0
            }
            REPLY_TYPE_OFFSET_DATA if p.cmd == CMD_READ => len >= 9 && len - 8 <= p.len,
            REPLY_TYPE_OFFSET_HOLE if p.cmd == CMD_READ => len == 12,
            REPLY_TYPE_BLOCK_STATUS if p.cmd == CMD_BLOCK_STATUS => {
                len >= 12 && (len - 4).is_multiple_of(8) && (len - 4) / 8 <= MAX_DESCRIPTORS as u32
            }
            t if t & REPLY_TYPE_ERROR_BIT != 0 => (6..=MAX_ERROR_CHUNK).contains(&len),
            t => return Err(Error::protocol(format!("reply chunk type {t} to {cmd}"))),
        };
        if !fits {
            return Err(Error::protocol(format!(
                "reply chunk type {rtype} of {len} bytes to a {cmd} of {} bytes",
                p.len
            )));
        }
        if input.len() < STRUCTURED_HEADER_LEN + len as usize {
            return Ok(Step::More);
        }
        input.advance(STRUCTURED_HEADER_LEN);
        let mut payload = input.split_to(len as usize);
        let reply = self.chunk(cookie, rtype, &mut payload)?;
        if flags & REPLY_FLAG_DONE != 0 {
            let done = self.finish(cookie)?;
            return Ok(Step::Got(match reply {
                Some(r) => {
                    self.ready.push_back(done);
                    r
                }
                None => done,
            }));
        }
        Ok(match reply {
            Some(r) => Step::Got(r),
            None => Step::Consumed,
        })
    }

    /// Checks one chunk's payload against its request; what to hand on.
    fn chunk(
        &mut self,
        cookie: Cookie,
        rtype: u16,
        payload: &mut BytesMut,
    ) -> Result<Option<Reply>, Error> {
        let contexts: Vec<u32> = self.export.contexts.iter().map(|c| c.id).collect();
        let p = self
            .pending
            .get_mut(&cookie)
            .expect("checked by the caller");
        let (start, end) = (p.offset, p.offset + p.len as u64);
        match rtype {
            REPLY_TYPE_NONE => Ok(None),
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let offset = payload.get_u64();
                let n = if rtype == REPLY_TYPE_OFFSET_HOLE {
                    payload.get_u32() as u64
                } else {
                    payload.len() as u64
                };
                if n == 0 {
                    return Err(Error::protocol("an OFFSET_HOLE chunk of zero bytes"));
                }
                if offset < start || offset.checked_add(n).is_none_or(|e| e > end) {
                    return Err(Error::protocol(format!(
                        "READ chunk {offset}+{n} outside the request {start}+{}",
                        p.len
                    )));
                }
                match p.covered.add(offset, offset + n) {
                    Ok(()) => {}
                    Err(AddError::Overlap) => {
                        return Err(Error::protocol(format!(
                            "READ chunk {offset}+{n} overlaps an earlier one"
                        )))
                    }
                    Err(AddError::TooFragmented) => {
                        return Err(Error::protocol(
                            "READ reply split into too many separate chunks",
                        ))
                    }
                }
                Ok(Some(if rtype == REPLY_TYPE_OFFSET_HOLE {
                    Reply::Hole {
                        cookie,
                        offset,
                        len: n as u32,
                    }
                } else {
                    Reply::Data {
                        cookie,
                        offset,
                        bytes: std::mem::take(payload).freeze(),
                    }
                }))
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context = payload.get_u32();
                if !contexts.contains(&context) {
                    return Err(Error::protocol(format!(
                        "block status for metadata context {context}, which was not selected"
                    )));
                }
                if p.contexts_seen.contains(&context) {
                    return Err(Error::protocol(format!(
                        "two block status chunks for metadata context {context}"
                    )));
                }
                p.contexts_seen.push(context);
                let count = payload.len() / 8;
                if p.req_one && count != 1 {
                    return Err(Error::protocol(format!(
                        "{count} extents for a block status that asked for one"
                    )));
                }
                let mut extents = Vec::with_capacity(count);
                let mut sum = 0u64;
                for i in 0..count {
                    let len = payload.get_u32();
                    let flags = payload.get_u32();
                    if len == 0 {
                        return Err(Error::protocol("a block status extent of zero bytes"));
                    }
                    if sum >= p.len as u64 {
                        return Err(Error::protocol(format!(
                            "block status extent {i} starts past the {} bytes asked for",
                            p.len
                        )));
                    }
                    if p.req_one && len > p.len {
                        return Err(Error::protocol(
                            "a REQ_ONE block status extent longer than the request",
                        ));
                    }
                    // The last extent may reach past the request; only the range asked for
                    // is reported.
                    let clipped = (len as u64).min(p.len as u64 - sum) as u32;
                    sum += clipped as u64;
                    extents.push(Descriptor {
                        len: clipped,
                        flags,
                    });
                }
                Ok(Some(Reply::BlockStatus {
                    cookie,
                    context,
                    offset: start,
                    extents,
                }))
            }
            t => {
                // An error chunk (bit 15), known or not.
                let errno = payload.get_u32();
                let msg_len = payload.get_u16() as usize;
                let fixed = if t == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
                if msg_len + fixed > payload.len() || msg_len > MAX_STRING {
                    return Err(Error::protocol(format!(
                        "error chunk message of {msg_len} bytes in a {}-byte chunk",
                        payload.len() + 6
                    )));
                }
                if errno == 0 {
                    return Err(Error::protocol("an error chunk with error value 0"));
                }
                let message = text(&payload[..msg_len]);
                payload.advance(msg_len);
                let mut message = message;
                if t == REPLY_TYPE_ERROR_OFFSET {
                    let at = payload.get_u64();
                    if at < start || at >= end {
                        return Err(Error::protocol(format!(
                            "error offset {at} outside the request {start}+{}",
                            p.len
                        )));
                    }
                    message = if message.is_empty() {
                        format!("at offset {at}")
                    } else {
                        format!("{message}, at offset {at}")
                    };
                }
                if p.error.is_none() {
                    p.error = Some(CommandError::new(errno, message));
                }
                Ok(None)
            }
        }
    }

    fn finish(&mut self, cookie: Cookie) -> Result<Reply, Error> {
        let p = self.pending.remove(&cookie).expect("checked by the caller");
        if let Some(e) = p.error {
            return Ok(Reply::Done {
                cookie,
                result: Err(e),
            });
        }
        if p.cmd == CMD_READ && p.covered.total() != p.len as u64 {
            return Err(Error::protocol(format!(
                "READ of {} bytes at {} reported done with {} bytes sent",
                p.len,
                p.offset,
                p.covered.total()
            )));
        }
        if p.cmd == CMD_BLOCK_STATUS && p.contexts_seen.len() != self.export.contexts.len() {
            return Err(Error::protocol(format!(
                "block status reported done with {} of {} metadata contexts",
                p.contexts_seen.len(),
                self.export.contexts.len()
            )));
        }
        Ok(Reply::Done {
            cookie,
            result: Ok(()),
        })
    }
}
