//! [`Source`]: an NBD export read as a volume. Block status (per range) says where the data is;
//! only that is read, with a few READs in flight; ranges that read as zero become holes without
//! being read, and the data read is zero-detected as file data is.
//!
//! With `top_only`, only the top layer of a backing chain counts as data
//! (`qemu:allocation-depth` 1); what the layers below hold becomes holes.

use super::conn::Conn;
use super::map::{combine, Gather, Status, STATUS_RANGE};
use crate::error::Error;
use crate::reader::{read_unit, Produce, Produced};
use crate::zero::Coalesce;
use bytes::Bytes;
use engine::{Chunk, Digest};
use nbd::wire::{CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION};
use nbd::{Command, Cookie, Reply, Uri};
use std::collections::VecDeque;

/// READ requests in flight per export.
const READS_IN_FLIGHT: usize = 4;

/// How to read an export.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Read everything (zero detection still applies), ignoring block status.
    pub no_extents: bool,
    /// Only the top layer's own data (`qemu:allocation-depth` 1).
    pub top_only: bool,
    /// Zero-detection granularity (`-S`); 0 turns it off.
    pub zero_granularity: u32,
}

/// A planned piece of the output, in offset order.
enum Plan {
    Hole { start: u64, end: u64 },
    Read(Read),
}

struct Read {
    cookie: Cookie,
    start: u64,
    end: u64,
    pieces: Vec<(u64, Piece)>,
    done: Option<Result<(), nbd::CommandError>>,
}

enum Piece {
    Data(Bytes),
    Zero(u64),
}

struct Asked {
    cookie: Cookie,
    offset: u64,
    gather: Gather,
}

pub struct Source {
    uri: Uri,
    /// What messages call the export (default: its URI).
    shown: Option<String>,
    options: SourceOptions,
    conn: Option<Conn>,
    size: u64,
    base_id: Option<u32>,
    depth_id: Option<u32>,
    /// Known status from `planned` on, up to `known_end`.
    known: VecDeque<Status>,
    known_end: u64,
    status: Option<Asked>,
    plan: VecDeque<Plan>,
    planned: u64,
    /// Everything before this was emitted.
    pos: u64,
    digest: Digest,
    out: Coalesce,
    finished: bool,
}

impl Source {
    pub fn new(uri: Uri, options: SourceOptions) -> Source {
        Source {
            uri,
            shown: None,
            options,
            conn: None,
            size: 0,
            base_id: None,
            depth_id: None,
            known: VecDeque::new(),
            known_end: 0,
            status: None,
            plan: VecDeque::new(),
            planned: 0,
            pos: 0,
            digest: Digest::new(),
            out: Coalesce::default(),
            finished: false,
        }
    }

    /// Calls the export `shown` in messages.
    pub fn named(mut self, shown: String) -> Source {
        self.shown = Some(shown);
        self
    }

    fn open(&mut self) -> Result<u64, Error> {
        let mut contexts = Vec::new();
        if !self.options.no_extents {
            contexts.push(CONTEXT_BASE_ALLOCATION);
            if self.options.top_only {
                contexts.push(CONTEXT_ALLOCATION_DEPTH);
            }
        }
        let shown = self.shown.clone().unwrap_or_else(|| self.uri.to_string());
        let conn = Conn::open_as(&self.uri, shown, &contexts, READS_IN_FLIGHT + 1)?;
        let e = conn.export();
        self.size = e.size;
        self.base_id = e.context(CONTEXT_BASE_ALLOCATION);
        self.depth_id = e.context(CONTEXT_ALLOCATION_DEPTH);
        if self.options.top_only && self.depth_id.is_none() {
            return Err(Error::Unsupported(format!(
                "{}: the server has no qemu:allocation-depth, which --top-only needs",
                conn.shown()
            )));
        }
        if self.base_id.is_none() {
            // Nothing to ask: every byte is read, and zero detection finds the holes.
            self.known.push_back(Status {
                offset: 0,
                len: self.size,
                flags: 0,
                depth: None,
            });
            self.known_end = self.size;
        }
        self.conn = Some(conn);
        Ok(self.size)
    }

    /// Whether a range must be read: not a hole, and with `top_only`, in the top layer.
    fn wanted(&self, s: &Status) -> bool {
        if s.zero() {
            return false;
        }
        !self.options.top_only || s.depth == Some(1)
    }

    /// Sends block status and READ requests as far as the bounds allow.
    fn plan(&mut self) -> Result<(), Error> {
        let conn = self.conn.as_mut().ok_or(Error::Cancelled)?;
        if self.base_id.is_some()
            && self.status.is_none()
            && self.known_end < self.size
            && conn.can_send()
        {
            let len = (self.size - self.known_end).min(STATUS_RANGE) as u32;
            let cookie = conn.send(Command::BlockStatus {
                offset: self.known_end,
                len,
                req_one: false,
            })?;
            self.status = Some(Asked {
                cookie,
                offset: self.known_end,
                gather: Gather::default(),
            });
        }
        let reads = |p: &VecDeque<Plan>| p.iter().filter(|p| matches!(p, Plan::Read(_))).count();
        while self.planned < self.known_end && reads(&self.plan) < READS_IN_FLIGHT {
            let Some(s) = self.known.front().copied() else {
                break;
            };
            let end = s.offset + s.len;
            if end <= self.planned {
                self.known.pop_front();
                continue;
            }
            if !self.wanted(&s) {
                self.plan.push_back(Plan::Hole {
                    start: self.planned,
                    end,
                });
                self.planned = end;
                self.known.pop_front();
                continue;
            }
            let conn = self.conn.as_mut().ok_or(Error::Cancelled)?;
            if !conn.can_send() {
                break;
            }
            let bs = conn.export().block_size;
            let mut n = (end - self.planned).min(read_unit()).min(bs.maximum as u64);
            // Aligned to the export's minimum block unless it reaches the end.
            let min = bs.minimum as u64;
            if self.planned + n < self.size && n > min {
                n -= (self.planned + n) % min;
            }
            let cookie = conn.send(Command::Read {
                offset: self.planned,
                len: n as u32,
            })?;
            self.plan.push_back(Plan::Read(Read {
                cookie,
                start: self.planned,
                end: self.planned + n,
                pieces: Vec::new(),
                done: None,
            }));
            self.planned += n;
        }
        self.conn.as_mut().ok_or(Error::Cancelled)?.flush()
    }

    /// Waits for one reply piece and files it.
    fn receive(&mut self) -> Result<(), Error> {
        let conn = self.conn.as_mut().ok_or(Error::Cancelled)?;
        let shown = conn.shown().to_string();
        let reply = conn.recv()?;
        let cookie = match &reply {
            Reply::Data { cookie, .. }
            | Reply::Hole { cookie, .. }
            | Reply::BlockStatus { cookie, .. }
            | Reply::Done { cookie, .. } => *cookie,
        };
        if let Some(st) = self.status.as_mut().filter(|s| s.cookie == cookie) {
            let Reply::Done { result, .. } = reply else {
                st.gather.take(self.base_id, self.depth_id, reply);
                return Ok(());
            };
            let st = self.status.take().expect("matched above");
            if let Err(e) = result {
                // Not fatal: without a map everything left is read, and zero detection
                // still finds the holes.
                log::warn!("{shown}: block status failed ({e}); reading the rest");
                self.base_id = None;
                self.known.push_back(Status {
                    offset: self.known_end,
                    len: self.size - self.known_end,
                    flags: 0,
                    depth: None,
                });
                self.known_end = self.size;
                return Ok(());
            }
            let base = st.gather.base.unwrap_or_default();
            let statuses = combine(st.offset, &base, st.gather.depth.as_deref());
            for s in statuses {
                let s = Status {
                    len: s.len.min(self.size - s.offset),
                    ..s
                };
                if s.len > 0 {
                    self.known_end = s.offset + s.len;
                    self.known.push_back(s);
                }
            }
            return Ok(());
        }
        let read = self.plan.iter_mut().find_map(|p| match p {
            Plan::Read(r) if r.cookie == cookie => Some(r),
            _ => None,
        });
        let Some(read) = read else {
            return Err(Error::Nbd {
                context: shown,
                source: nbd::Error::Protocol(format!("a reply for cookie {cookie} we lost")),
            });
        };
        match reply {
            Reply::Data { offset, bytes, .. } => read.pieces.push((offset, Piece::Data(bytes))),
            Reply::Hole { offset, len, .. } => read.pieces.push((offset, Piece::Zero(len as u64))),
            Reply::Done { result, .. } => read.done = Some(result),
            Reply::BlockStatus { .. } => {}
        }
        Ok(())
    }

    fn hole(&mut self, offset: u64, len: u64, chunks: &mut Vec<Chunk>) {
        self.digest.update_zeroes(len);
        self.out.hole(offset, len, chunks);
    }

    /// Emits a completed READ in order: data zero-detected, holes merged.
    fn emit(&mut self, mut read: Read, chunks: &mut Vec<Chunk>) {
        read.pieces.sort_by_key(|(o, _)| *o);
        let granularity = self.options.zero_granularity as u64;
        for (offset, piece) in read.pieces {
            match piece {
                Piece::Zero(len) => self.hole(offset, len, chunks),
                Piece::Data(bytes) => {
                    self.digest.update(&bytes);
                    self.out.data(offset, bytes, granularity, chunks);
                }
            }
        }
        self.pos = read.end;
    }
}

impl Produce for Source {
    fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    fn step(&mut self) -> Result<Produced, Error> {
        let mut p = Produced::default();
        if self.finished {
            return Err(Error::Cancelled);
        }
        if self.conn.is_none() {
            p.size = Some(self.open()?);
            return Ok(p);
        }
        loop {
            if self.pos >= self.size {
                self.out.flush(&mut p.chunks);
                p.chunks.push(Chunk::End {
                    length: self.size,
                    digest: Some(self.digest.value()),
                });
                p.end = true;
                self.finished = true;
                if let Some(c) = self.conn.take() {
                    c.disconnect();
                }
                return Ok(p);
            }
            self.plan()?;
            match self.plan.front_mut() {
                Some(Plan::Hole { start, end }) => {
                    let (start, end) = (*start, *end);
                    self.plan.pop_front();
                    self.hole(start, end - start, &mut p.chunks);
                    self.pos = end;
                    // Bounded work per step: a long run of holes ends the step after each
                    // block status range.
                    if !p.chunks.is_empty() {
                        return Ok(p);
                    }
                }
                Some(Plan::Read(r)) if r.done.is_some() => {
                    let Some(Plan::Read(r)) = self.plan.pop_front() else {
                        unreachable!()
                    };
                    if let Some(Err(e)) = &r.done {
                        return Err(Error::NbdCommand {
                            context: format!("{}: reading {}..{}", self.uri, r.start, r.end),
                            source: e.clone(),
                        });
                    }
                    self.emit(r, &mut p.chunks);
                    return Ok(p);
                }
                _ => {
                    self.receive()?;
                    // A step that only learnt block status ends too, so one export's map
                    // does not hold a worker for long.
                    if self.plan.is_empty() && self.status.is_none() {
                        return Ok(p);
                    }
                }
            }
        }
    }

    fn close(&mut self) {
        self.finished = true;
        if let Some(c) = self.conn.take() {
            c.disconnect();
        }
    }
}
