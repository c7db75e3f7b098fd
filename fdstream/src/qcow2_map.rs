//! [`Mapped`]: a qcow2 chain read by its map instead of through qemu-nbd's data path.
//!
//! Reading an image through qemu-nbd costs two more copies of every byte (qemu-nbd reads the
//! cluster, writes it to its socket; we read it back) and a third process on the CPU. For an
//! image whose clusters lie in its files as they are (no encryption, no external data file,
//! not compressed), `qemu-img map` says where each guest range lives: which layer and at
//! which offset of that file. We read those bytes with one `pread`, as the file reader does.
//! qemu still decides what the guest sees; we only follow its map.
//!
//! qemu-nbd keeps running beside us for the whole read: it holds the image's read lock, so no
//! writer (a VM, `qemu-img commit`) can open the chain while its map is followed, and it serves
//! the ranges the map cannot point into (compressed clusters, or a range qemu-img calls
//! neither data nor zero), read with a plain NBD READ.
//!
//! The map is read from `qemu-img map --output=json` as it is printed, one entry per line, so
//! a fragmented image of any size costs one line of memory, not its whole map.

use crate::error::Error;
use crate::fd::{self, Kind};
use crate::nbd::conn::Conn;
use crate::reader::{read_unit, Produce, Produced};
use crate::zero::Coalesce;
use bytes::Bytes;
use engine::{Chunk, Digest};
use nbd::{Command, Reply, Uri};
use serde::Deserialize;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command as Process, Stdio};

/// Longest map line accepted: an entry is about 150 bytes.
const MAX_LINE: usize = 4096;

/// One `qemu-img map --output=json` entry, as qemu-img 5 and later print it.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Entry {
    start: u64,
    length: u64,
    /// 0: the top image, 1: its backing file, ...
    depth: usize,
    zero: bool,
    data: bool,
    #[serde(default)]
    compressed: bool,
    /// Where the range's bytes lie in the layer's file, when they lie there as they are.
    offset: Option<u64>,
}

/// What to do with the guest range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Hole,
    /// Read from layer `depth` at `offset` (of `start`).
    File {
        depth: usize,
        offset: u64,
    },
    /// Read through qemu-nbd.
    Nbd,
}

pub(crate) struct Mapped {
    shown: String,
    size: u64,
    /// The chain's files, the image first (index = map depth).
    layers: Vec<File>,
    top_only: bool,
    zero_granularity: u64,
    map: Option<MapLines>,
    /// The entry being emitted, with its range.
    current: Option<(u64, u64, Part)>,
    pos: u64,
    digest: Digest,
    out: Coalesce,
    /// qemu-nbd's export, connected on the first range it must serve.
    nbd: Uri,
    conn: Option<Conn>,
    image: std::path::PathBuf,
    started: bool,
    finished: bool,
}

impl Mapped {
    /// Reads `image` (`layers` its open files, the image first, every one plain) of guest
    /// `size` by its map; `nbd` is qemu-nbd's export of the same image.
    pub(crate) fn new(
        image: &Path,
        size: u64,
        layers: Vec<File>,
        nbd: Uri,
        top_only: bool,
        zero_granularity: u32,
        shown: String,
    ) -> Mapped {
        Mapped {
            shown,
            size,
            layers,
            top_only,
            zero_granularity: zero_granularity as u64,
            map: None,
            current: None,
            pos: 0,
            digest: Digest::new(),
            out: Coalesce::default(),
            nbd,
            conn: None,
            image: image.to_path_buf(),
            started: false,
            finished: false,
        }
    }

    /// What the map says to do with an entry.
    fn part(&self, e: &Entry) -> Part {
        if e.zero || (self.top_only && e.depth != 0) {
            return Part::Hole;
        }
        match (e.data, e.compressed, e.offset) {
            (true, false, Some(offset)) => Part::File {
                depth: e.depth,
                offset,
            },
            // Compressed, or neither data nor known zero: qemu reads it.
            _ => Part::Nbd,
        }
    }

    /// The next entry, checked to continue the map where the last one ended.
    fn next_entry(&mut self) -> Result<Option<(u64, u64, Part)>, Error> {
        let map = self.map.as_mut().ok_or(Error::Cancelled)?;
        let Some(e) = map.next(&self.shown)? else {
            return Ok(None);
        };
        let bad = |why: String| Error::Qemu(format!("{}: qemu-img map: {why}", self.shown));
        let end = e
            .start
            .checked_add(e.length)
            .filter(|&end| end <= self.size);
        let Some(end) = end.filter(|_| e.start == self.pos && e.length > 0) else {
            return Err(bad(format!(
                "entry {}+{} where {} was expected (size {})",
                e.start, e.length, self.pos, self.size
            )));
        };
        if e.depth >= self.layers.len() {
            return Err(bad(format!(
                "depth {} in a chain of {}",
                e.depth,
                self.layers.len()
            )));
        }
        Ok(Some((e.start, end, self.part(&e))))
    }

    fn hole(&mut self, offset: u64, len: u64, chunks: &mut Vec<Chunk>) {
        self.digest.update_zeroes(len);
        self.out.hole(offset, len, chunks);
    }

    /// Data read at `offset`: digested, zero-detected, queued.
    fn data(&mut self, offset: u64, bytes: Bytes, chunks: &mut Vec<Chunk>) {
        self.digest.update(&bytes);
        self.out.data(offset, bytes, self.zero_granularity, chunks);
    }

    /// Reads `[start, start + len)` through qemu-nbd, waiting for the whole reply.
    fn read_nbd(&mut self, start: u64, len: u64, chunks: &mut Vec<Chunk>) -> Result<(), Error> {
        if self.conn.is_none() {
            let conn = Conn::open_as(&self.nbd, self.shown.clone(), &[], 1)?;
            log::debug!("{}: reading unmapped ranges through qemu-nbd", self.shown);
            self.conn = Some(conn);
        }
        let conn = self.conn.as_mut().ok_or(Error::Cancelled)?;
        conn.send(Command::Read {
            offset: start,
            len: len as u32,
        })?;
        let mut pieces = Vec::new();
        let result = loop {
            match conn.recv()? {
                Reply::Data { offset, bytes, .. } => pieces.push((offset, Ok(bytes))),
                Reply::Hole { offset, len, .. } => pieces.push((offset, Err(len as u64))),
                Reply::Done { result, .. } => break result,
                Reply::BlockStatus { .. } => {}
            }
        };
        if let Err(e) = result {
            return Err(Error::NbdCommand {
                context: format!("{}: reading {start}..{}", self.shown, start + len),
                source: e,
            });
        }
        // Structured replies may come in any order; the client checked they tile the range.
        pieces.sort_by_key(|(o, _)| *o);
        for (offset, piece) in pieces {
            match piece {
                Ok(bytes) => self.data(offset, bytes, chunks),
                Err(len) => self.hole(offset, len, chunks),
            }
        }
        Ok(())
    }
}

impl Produce for Mapped {
    fn is_open(&self) -> bool {
        self.started && !self.finished
    }

    fn step(&mut self) -> Result<Produced, Error> {
        let mut p = Produced::default();
        if self.finished {
            return Err(Error::Cancelled);
        }
        if !self.started {
            self.map = Some(MapLines::start(&self.image, &self.shown)?);
            self.started = true;
            p.size = Some(self.size);
            return Ok(p);
        }
        loop {
            if self.pos >= self.size {
                self.map
                    .take()
                    .ok_or(Error::Cancelled)?
                    .finish(&self.shown)?;
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
            let (start, end, part) = match self.current {
                Some(c) if c.1 > self.pos => c,
                _ => match self.next_entry()? {
                    Some(c) => {
                        self.current = Some(c);
                        c
                    }
                    None => {
                        return Err(Error::Qemu(format!(
                            "{}: qemu-img map ended at {} of {}",
                            self.shown, self.pos, self.size
                        )))
                    }
                },
            };
            let pos = self.pos;
            match part {
                Part::Hole => {
                    self.hole(pos, end - pos, &mut p.chunks);
                    self.pos = end;
                    // Bounded work per step, as long runs of holes can be.
                    if p.chunks.len() > 64 {
                        return Ok(p);
                    }
                    continue;
                }
                Part::File { depth, offset } => {
                    let unit = read_unit();
                    let n = (end - pos).min(unit - pos % unit);
                    let at = offset + (pos - start);
                    let buf = fd::read_new(&self.layers[depth], Kind::Regular, at, n as usize)
                        .map_err(|e| {
                            Error::io(format!("{}: reading layer {depth} at {at}", self.shown), e)
                        })?
                        .freeze();
                    self.data(pos, buf, &mut p.chunks);
                    self.pos += n;
                }
                Part::Nbd => {
                    let unit = read_unit();
                    let n = (end - pos).min(unit - pos % unit);
                    self.read_nbd(pos, n, &mut p.chunks)?;
                    self.pos += n;
                }
            }
            return Ok(p);
        }
    }

    fn close(&mut self) {
        self.finished = true;
        self.map = None;
        if let Some(c) = self.conn.take() {
            c.disconnect();
        }
    }
}

/// `qemu-img map --output=json` running, its entries read as it prints them.
struct MapLines {
    child: Child,
    out: BufReader<ChildStdout>,
    line: Vec<u8>,
}

impl MapLines {
    fn start(image: &Path, shown: &str) -> Result<MapLines, Error> {
        let mut child = Process::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2", "--"])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Qemu(format!("{shown}: cannot run qemu-img map: {e}")))?;
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Ok(MapLines {
            child,
            out,
            line: Vec::new(),
        })
    }

    /// The next entry; `None` at the end of the list.
    fn next(&mut self, shown: &str) -> Result<Option<Entry>, Error> {
        loop {
            self.line.clear();
            let n = (&mut self.out)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .map_err(|e| Error::io(format!("{shown}: reading qemu-img map"), e))?;
            if n == 0 {
                return Ok(None);
            }
            if self.line.len() > MAX_LINE {
                return Err(Error::Qemu(format!(
                    "{shown}: qemu-img map printed a line over {MAX_LINE} bytes"
                )));
            }
            // `[{...},` first, `{...},` between, `{...}]` last.
            let text = self.line.trim_ascii();
            let text = text.strip_prefix(b"[").unwrap_or(text);
            let text = text.strip_suffix(b"]").unwrap_or(text);
            let text = text.strip_suffix(b",").unwrap_or(text).trim_ascii();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_slice(text).map(Some).map_err(|e| {
                Error::Qemu(format!(
                    "{shown}: qemu-img map printed {:?}: {e}",
                    String::from_utf8_lossy(text)
                ))
            });
        }
    }

    /// Waits for qemu-img to exit: a map it did not finish with success is not trusted.
    fn finish(mut self, shown: &str) -> Result<(), Error> {
        if self.next(shown)?.is_some() {
            return Err(Error::Qemu(format!(
                "{shown}: qemu-img map goes on past the image's size"
            )));
        }
        let mut said = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = (&mut err).take(4096).read_to_string(&mut said);
        }
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("{shown}: waiting for qemu-img map"), e))?;
        if !status.success() {
            let said = said.lines().last().unwrap_or("").trim().to_string();
            return Err(Error::Qemu(format!(
                "{shown}: qemu-img map ended with {status}: {said}"
            )));
        }
        Ok(())
    }
}

impl Drop for MapLines {
    fn drop(&mut self) {
        // Ended early (an error, a cancelled stream): qemu-img may still be printing.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
