//! [`Sink`]: an NBD export written as a volume, in place (an export is a device: there is no
//! temporary to rename). DATA becomes WRITE requests, several in flight; a HOLE becomes
//! WRITE_ZEROES where the server offers it (NO_HOLE when the result must be allocated; the
//! first one asks FAST_ZERO, and once the server says zeroing is not fast, later ones do not
//! ask), else writes of zeroes. TRIM is never used: its content afterwards is undefined.
//!
//! A chunk is complete, and its credit goes back to the sender, only when every request for it
//! was acknowledged. The end is acknowledged after FLUSH (unless `no_sync`), the digest, and
//! with `verify` after the export was read back over the same connection and compared with
//! what was received (a server that acknowledges writes it did not do passes the digest).

use super::conn::Conn;
use crate::error::Error;
use crate::verify::Expected;
use crate::writer::{Consume, WriterOptions};
use bytes::Bytes;
use engine::{Chunk, Digest};
use nbd::wire::ENOTSUP;
use nbd::{Command, Cookie, Reply, Uri};
use std::collections::{HashMap, HashSet, VecDeque};

/// Requests in flight per export.
const IN_FLIGHT: usize = 16;
/// Largest WRITE_ZEROES request (the protocol's length is 32 bits).
const ZERO_REQUEST: u64 = 1 << 30;
/// Zeroes for servers without WRITE_ZEROES.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// One request in flight: which chunk it belongs to, and what to send again if a FAST_ZERO
/// is refused.
struct Sent {
    chunk_end: u64,
    zero: Option<(u64, u32)>,
}

/// A chunk some of whose requests are out.
struct Open {
    end: u64,
    outstanding: u32,
    /// Every request for it was sent.
    sent: bool,
}

pub struct Sink {
    uri: Uri,
    /// What messages call the export (default: its URI).
    shown: Option<String>,
    options: WriterOptions,
    size: u64,
    conn: Option<Conn>,
    /// Where the next new chunk must start.
    next: u64,
    /// Bytes of the volume for which requests were sent.
    sent_until: u64,
    /// Bytes of the volume whose every request was acknowledged.
    completed_until: u64,
    open: VecDeque<Open>,
    in_flight: HashMap<Cookie, Sent>,
    digest: Digest,
    /// What the export must read back as (`verify`).
    expected: Option<Expected>,
    /// None until the first FAST_ZERO answer.
    fast_zero: Option<bool>,
    failed: Option<Error>,
}

impl Sink {
    pub fn new(uri: Uri, options: WriterOptions, size: u64) -> Sink {
        Sink {
            uri,
            shown: None,
            expected: options.verify.then(Expected::default),
            options,
            size,
            conn: None,
            next: 0,
            sent_until: 0,
            completed_until: 0,
            open: VecDeque::new(),
            in_flight: HashMap::new(),
            digest: Digest::new(),
            fast_zero: None,
            failed: None,
        }
    }

    /// Calls the export `shown` in messages (one we started, whose socket means nothing to
    /// a peer).
    pub fn named(mut self, shown: String) -> Sink {
        self.shown = Some(shown);
        self
    }

    fn shown(&self) -> String {
        self.shown.clone().unwrap_or_else(|| self.uri.to_string())
    }

    fn conn(&mut self) -> Result<&mut Conn, Error> {
        self.conn.as_mut().ok_or(Error::Cancelled)
    }

    /// Sends (part of) the requests of one chunk; false when the in-flight bound stopped it.
    fn send_chunk(&mut self, chunk: &Chunk) -> Result<bool, Error> {
        let (start, end) = match chunk {
            Chunk::Data { offset, bytes } => (*offset, offset + bytes.len() as u64),
            Chunk::Hole { offset, len } => (*offset, offset + len),
            Chunk::End { .. } => return Ok(true),
        };
        if self.sent_until <= start {
            // A new chunk: it must follow the last one.
            if start != self.next || end > self.size {
                return Err(Error::Length {
                    expected: self.next,
                    got: start,
                });
            }
            self.next = end;
            self.sent_until = start;
            self.open.push_back(Open {
                end,
                outstanding: 0,
                sent: false,
            });
            match chunk {
                Chunk::Data { bytes, .. } => {
                    self.digest.update(bytes);
                    if let Some(x) = &mut self.expected {
                        x.data(bytes);
                    }
                }
                Chunk::Hole { len, .. } => {
                    self.digest.update_zeroes(*len);
                    if let Some(x) = &mut self.expected {
                        x.hole(*len);
                    }
                }
                Chunk::End { .. } => {}
            }
        }
        let export = self.conn()?.export().clone();
        let max = export.block_size.maximum as u64;
        let zero_needed = !self.options.destination_is_zero;
        while self.sent_until < end {
            if !self.conn()?.can_send() {
                return Ok(false);
            }
            let at = self.sent_until;
            let (cmd, n, zero) = match chunk {
                Chunk::Data { offset, bytes } => {
                    let n = (end - at).min(max);
                    let from = (at - offset) as usize;
                    let data = bytes.slice(from..from + n as usize);
                    (
                        Some(Command::Write {
                            offset: at,
                            data,
                            fua: false,
                        }),
                        n,
                        None,
                    )
                }
                _ if !zero_needed => (None, end - at, None),
                _ if export.can_write_zeroes() => {
                    let n = (end - at).min(ZERO_REQUEST) as u32;
                    let fast = export.can_fast_zero()
                        && self.fast_zero != Some(false)
                        && !self.options.allocated;
                    (
                        Some(Command::WriteZeroes {
                            offset: at,
                            len: n,
                            no_hole: self.options.allocated,
                            fast,
                        }),
                        n as u64,
                        fast.then_some((at, n)),
                    )
                }
                _ => {
                    let n = (end - at).min(ZEROES.len() as u64).min(max);
                    (
                        Some(Command::Write {
                            offset: at,
                            data: Bytes::from_static(&ZEROES[..n as usize]),
                            fua: false,
                        }),
                        n,
                        None,
                    )
                }
            };
            if let Some(cmd) = cmd {
                let cookie = self.conn()?.send(cmd)?;
                self.in_flight.insert(
                    cookie,
                    Sent {
                        chunk_end: end,
                        zero,
                    },
                );
                self.open.back_mut().expect("opened above").outstanding += 1;
            }
            self.sent_until = at + n;
        }
        self.open.back_mut().expect("opened above").sent = true;
        Ok(true)
    }

    /// Waits for one acknowledgement and files it.
    fn receive(&mut self) -> Result<(), Error> {
        let reply = self.conn()?.recv()?;
        let Reply::Done { cookie, result } = reply else {
            // Writes are answered with Done only; the codec refuses anything else.
            return Ok(());
        };
        let Some(sent) = self.in_flight.remove(&cookie) else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                if sent.zero.is_some() && self.fast_zero.is_none() {
                    self.fast_zero = Some(true);
                }
            }
            Err(e) if e.errno == ENOTSUP && sent.zero.is_some() => {
                // The server zeroes, but not fast: ask again without FAST_ZERO, and stop
                // asking.
                self.fast_zero = Some(false);
                let (offset, len) = sent.zero.expect("checked");
                log::debug!(
                    "{}: zeroing is not fast; writing zeroes plainly",
                    self.shown()
                );
                let no_hole = self.options.allocated;
                let cookie = self.conn()?.send(Command::WriteZeroes {
                    offset,
                    len,
                    no_hole,
                    fast: false,
                })?;
                self.in_flight.insert(
                    cookie,
                    Sent {
                        chunk_end: sent.chunk_end,
                        zero: None,
                    },
                );
                return Ok(());
            }
            Err(e) => {
                return Err(Error::NbdCommand {
                    context: format!("{}: writing before offset {}", self.shown(), sent.chunk_end),
                    source: e,
                })
            }
        }
        if let Some(o) = self.open.iter_mut().find(|o| o.end == sent.chunk_end) {
            o.outstanding -= 1;
        }
        Ok(())
    }

    /// Chunks at the front whose every request was acknowledged.
    fn pop_completed(&mut self) -> usize {
        let mut n = 0;
        while self
            .open
            .front()
            .is_some_and(|o| o.sent && o.outstanding == 0)
        {
            let o = self.open.pop_front().expect("checked");
            self.completed_until = o.end;
            n += 1;
        }
        n
    }

    fn finish(&mut self, length: u64, digest: Option<u32>) -> Result<(), Error> {
        if length != self.size || self.next != length {
            return Err(Error::Length {
                expected: self.size,
                got: self.next,
            });
        }
        if let Some(theirs) = digest {
            let ours = self.digest.value();
            if ours != theirs {
                return Err(Error::DigestMismatch { ours, theirs });
            }
        }
        let sync = !self.options.no_sync;
        let conn = self.conn()?;
        if sync && conn.export().can_flush() {
            let cookie = conn.send(Command::Flush)?;
            loop {
                if let Reply::Done { cookie: c, result } = conn.recv()? {
                    if c == cookie {
                        result.map_err(|e| Error::NbdCommand {
                            context: format!("{}: flushing", conn.shown()),
                            source: e,
                        })?;
                        break;
                    }
                }
            }
        }
        if let Some(expected) = self.expected.take() {
            let conn = self.conn.as_mut().ok_or(Error::Cancelled)?;
            let shown = conn.shown().to_string();
            expected.check_with(self.size, &shown, |offset, buf| {
                read_back(conn, offset, buf)
            })?;
        }
        if let Some(c) = self.conn.take() {
            c.disconnect();
        }
        log::debug!("{}: {} bytes written and verified", self.shown(), self.size);
        Ok(())
    }

    /// A failure, with what was written: everything before the first chunk not acknowledged.
    fn partial(&self, e: Error) -> Error {
        Error::Partial {
            from: self.completed_until,
            to: self.size.max(self.completed_until),
            cause: Box::new(e),
        }
    }
}

/// Fills `buf` with the export's bytes at `offset`: READs of at most the export's payload,
/// as many in flight as the connection allows; holes the server reports read as zeroes.
fn read_back(conn: &mut Conn, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
    let max = conn.export().block_size.maximum as usize;
    let end = offset + buf.len() as u64;
    let mut asked = HashSet::new();
    let mut at = 0;
    loop {
        while at < buf.len() && conn.can_send() {
            let n = (buf.len() - at).min(max);
            asked.insert(conn.send(Command::Read {
                offset: offset + at as u64,
                len: n as u32,
            })?);
            at += n;
        }
        if asked.is_empty() {
            return Ok(());
        }
        // The codec checks each piece against its READ; this checks the READ is one of ours.
        match conn.recv()? {
            Reply::Data {
                cookie,
                offset: o,
                bytes,
            } if asked.contains(&cookie) && o >= offset && o + bytes.len() as u64 <= end => {
                let from = (o - offset) as usize;
                buf[from..from + bytes.len()].copy_from_slice(&bytes);
            }
            Reply::Hole {
                cookie,
                offset: o,
                len,
            } if asked.contains(&cookie) && o >= offset && o + len as u64 <= end => {
                let from = (o - offset) as usize;
                buf[from..from + len as usize].fill(0);
            }
            Reply::Done { cookie, result } if asked.remove(&cookie) => {
                result.map_err(|e| Error::NbdCommand {
                    context: format!("{}: reading back at {offset}", conn.shown()),
                    source: e,
                })?;
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "{}: a reply to no READ while reading back at {offset}",
                    conn.shown()
                )))
            }
        }
    }
}

impl Consume for Sink {
    fn open(&mut self) -> Result<(), Error> {
        let conn = Conn::open_as(&self.uri, self.shown(), &[], IN_FLIGHT)?;
        let e = conn.export();
        if e.read_only() {
            return Err(Error::Unsupported(format!(
                "{} is a read-only export",
                conn.shown()
            )));
        }
        if e.size < self.size {
            return Err(Error::TooSmall {
                target: conn.shown().to_string(),
                have: e.size,
                need: self.size,
            });
        }
        log::debug!(
            "writing {} ({} bytes of {}; zeroes: {})",
            conn.shown(),
            self.size,
            e.size,
            if e.can_fast_zero() {
                "fast"
            } else if e.can_write_zeroes() {
                "WRITE_ZEROES"
            } else {
                "written"
            }
        );
        self.conn = Some(conn);
        Ok(())
    }

    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        if let Some(e) = self.failed.take() {
            return (0, Err(e));
        }
        let r = (|| {
            for chunk in batch {
                if let Chunk::End { length, digest } = chunk {
                    // Every chunk before it must be completed (it is then at the batch's
                    // front) before the end is handled.
                    if self.open.is_empty() && std::ptr::eq(chunk, &batch[0]) {
                        self.finish(*length, *digest)?;
                        return Ok((1, true));
                    }
                    break;
                }
                if !self.send_chunk(chunk)? {
                    break;
                }
            }
            self.conn()?.flush()?;
            loop {
                let done = self.pop_completed();
                if done > 0 {
                    return Ok((done, false));
                }
                if self.in_flight.is_empty() {
                    // Nothing out and nothing completed: only possible for an empty batch.
                    return Ok((0, false));
                }
                self.receive()?;
            }
        })();
        match r {
            Ok((n, committed)) => (n, Ok(committed)),
            Err(e) => (0, Err(self.partial(e))),
        }
    }

    fn discard(&mut self) {
        if let Some(c) = self.conn.take() {
            c.disconnect();
        }
    }
}
