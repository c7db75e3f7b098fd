//! The synchronous source behind [`FileReader`](super::FileReader) and the iohelper's reader:
//! open the volume (exclusively for a block device unless shared), walk its extents, read one
//! buffer per step, split it by zero detection into DATA slices and merged holes, and digest
//! every byte once.

use super::{read_unit, Produce, Produced, ReaderOptions, READ_BUF};
use crate::error::Error;
use crate::extents::{segment_at, Segment};
use crate::fd::{self, Kind, Location};
use crate::zero::Coalesce;
use engine::{Chunk, Digest, RangeSet};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(super) struct Work {
    location: Option<Location>,
    file: Option<File>,
    kind: Kind,
    size: u64,
    pos: u64,
    /// What the extent map said about `pos` onwards: (end, is data).
    segment: Option<(u64, bool)>,
    use_extents: bool,
    granularity: u64,
    stream_size: Option<u64>,
    force_share: bool,
    digest: Digest,
    /// A hole not yet queued, so that it can grow by the next zero run.
    out: Coalesce,
    bytes_read: Arc<AtomicU64>,
    direct: bool,
    /// O_DIRECT is set on `file` (asked for, and accepted by the file system).
    direct_on: bool,
    align: u64,
    /// A ranged read: only these, in order (`ReaderOptions::ranges`).
    ranges: Option<Arc<RangeSet>>,
    /// Index of the range `pos` is in or before.
    range: usize,
    identity: Option<engine::VolumeIdentity>,
}

/// The synchronous core of [`FileReader`], without worker or queue: each `step` opens the
/// volume or reads one buffer. The iohelper process drives it to run a reader out of process
/// with exactly the in-process semantics.
pub struct ReadCore {
    work: Work,
}

impl ReadCore {
    pub fn open(path: impl Into<PathBuf>, options: &ReaderOptions) -> Self {
        Self::new(Location::Path(path.into()), options)
    }

    pub fn from_file(file: File, options: &ReaderOptions) -> Self {
        Self::new(Location::Open(file), options)
    }

    /// The regular file `name` inside `dir`, resolved as the provider does.
    pub fn at(
        dir: Arc<OwnedFd>,
        name: std::ffi::CString,
        shown: String,
        options: &ReaderOptions,
    ) -> Self {
        Self::new(Location::At { dir, name, shown }, options)
    }

    fn new(location: Location, options: &ReaderOptions) -> Self {
        ReadCore {
            work: Work::new(location, options, Arc::default()),
        }
    }

    /// Calls the volume `shown` in messages instead of by its path.
    pub fn named(mut self, shown: impl Into<String>) -> Self {
        self.work.location = self.work.location.take().map(|l| l.named(shown));
        self
    }

    /// Opens the volume (first call) or reads the next buffer.
    pub fn step(&mut self) -> Result<Produced, Error> {
        self.work.step()
    }

    pub fn bytes_read(&self) -> u64 {
        self.work.bytes_read.load(Ordering::Relaxed)
    }

    /// Whether the volume is open.
    pub fn is_open(&self) -> bool {
        self.work.file.is_some()
    }
}

fn no_size(shown: &str) -> Error {
    Error::Unsupported(format!(
        "{shown} is a pipe or character device, whose length is not known before it is read: \
         it must be given"
    ))
}

impl Produce for Work {
    fn step(&mut self) -> Result<Produced, Error> {
        Work::step(self)
    }

    fn is_open(&self) -> bool {
        self.file.is_some()
    }

    fn rename(&mut self, shown: String) {
        self.location = self.location.take().map(|l| l.named(shown));
    }

    fn serves_ranges(&self) -> bool {
        self.ranges.is_some()
    }

    fn close(&mut self) {
        self.file = None;
        self.location = None;
    }
}

impl Work {
    pub(super) fn new(
        location: Location,
        options: &ReaderOptions,
        bytes_read: Arc<AtomicU64>,
    ) -> Work {
        Work {
            location: Some(location),
            file: None,
            kind: Kind::Regular,
            size: 0,
            pos: 0,
            segment: None,
            use_extents: !options.no_extents,
            granularity: options.zero_granularity.min(READ_BUF as u32) as u64,
            stream_size: options.stream_size,
            force_share: options.force_share,
            digest: Digest::new(),
            out: Coalesce::default(),
            bytes_read,
            direct: options.direct,
            direct_on: false,
            align: fd::DIRECT_ALIGN,
            ranges: options.ranges.clone(),
            range: 0,
            identity: None,
        }
    }

    fn open(&mut self) -> Result<u64, Error> {
        let location = self.location.take().ok_or(Error::Cancelled)?;
        let shown = location.describe();
        let file = match location {
            Location::Path(p) | Location::Named(p, _) => {
                // Refuse a sizeless pipe before open(2), which would wait for a writer.
                use std::os::unix::fs::FileTypeExt;
                let ft = std::fs::metadata(&p)
                    .map_err(|e| Error::io(format!("inspecting {shown}"), e))?
                    .file_type();
                if (ft.is_fifo() || ft.is_char_device() || ft.is_socket())
                    && self.stream_size.is_none()
                {
                    return Err(no_size(&shown));
                }
                open_source(&p, &shown, ft.is_block_device() && !self.force_share)
            }
            Location::Open(f) => Ok(f),
            Location::At { dir, name, .. } => {
                // O_NONBLOCK so that a FIFO planted in the directory cannot hang the worker.
                let f = fd::open_beneath(&dir, &name, libc::O_RDONLY | libc::O_NONBLOCK)
                    .map_err(|e| Error::io(format!("opening {shown}"), e))?;
                match Kind::of(&f) {
                    Ok(Kind::Regular) => Ok(f),
                    _ => Err(Error::Unsupported(format!("{shown} is not a regular file"))),
                }
            }
        }?;
        self.kind = Kind::of(&file).map_err(|e| Error::io(format!("inspecting {shown}"), e))?;
        self.identity = file.metadata().ok().as_ref().and_then(crate::identity::of);
        let size =
            fd::size_of(&file, self.kind).map_err(|e| Error::io(format!("sizing {shown}"), e))?;
        self.size = match (size, self.stream_size) {
            (Some(s), _) => s,
            (None, Some(s)) => s,
            (None, None) => return Err(no_size(&shown)),
        };
        if self.ranges.is_some() && self.kind == Kind::Stream {
            return Err(Error::Unsupported(format!(
                "{shown} is a pipe, which cannot be read at ranges"
            )));
        }
        self.use_extents &= self.kind == Kind::Regular;
        if self.direct && self.kind != Kind::Stream {
            self.align = fd::direct_align(&file, self.kind);
            match fd::set_direct(&file, true) {
                Ok(()) => self.direct_on = true,
                Err(e) => {
                    log::warn!("{shown}: O_DIRECT refused ({e}); reading through the page cache")
                }
            }
        }
        self.file = Some(file);
        log::debug!("reading {shown}: {:?}, {} bytes", self.kind, self.size);
        Ok(self.size)
    }

    fn hole(&mut self, offset: u64, len: u64, chunks: &mut Vec<Chunk>) {
        self.digest.update_zeroes(len);
        self.out.hole(offset, len, chunks);
    }

    /// A pipe given a size must end there: more would be data the volume silently lacks.
    fn check_drained(&mut self) -> Result<(), Error> {
        let file = self.file.as_ref().ok_or(Error::Cancelled)?;
        let mut byte = [0u8; 1];
        loop {
            match io::Read::read(&mut &*file, &mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(Error::Unsupported(format!(
                        "the pipe holds more than the {} bytes given as its size",
                        self.size
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading past {}", self.size), e)),
            }
        }
    }

    /// Where reading must stop next: the end of the range `pos` is moved into (past the
    /// ranges read, `pos` is the size: the end), or the size when the whole is read. A
    /// range is clamped to the size, which the engine checks only once the volume is open.
    fn next_range(&mut self) -> u64 {
        let Some(ranges) = &self.ranges else {
            return self.size;
        };
        let ranges = ranges.ranges();
        while ranges.get(self.range).is_some_and(|r| r.end() <= self.pos) {
            self.range += 1;
        }
        match ranges.get(self.range) {
            Some(r) if r.offset < self.size => {
                // The extent map cached for an earlier offset still holds if it reaches here.
                self.pos = self.pos.max(r.offset);
                r.end().min(self.size)
            }
            _ => {
                self.pos = self.size;
                self.size
            }
        }
    }

    /// Reads one buffer (after any holes before it), or ends the volume.
    fn step(&mut self) -> Result<Produced, Error> {
        let mut p = Produced::default();
        if self.file.is_none() {
            p.size = Some(self.open()?);
            p.identity = self.identity.clone();
            return Ok(p);
        }
        loop {
            let limit = self.next_range();
            if self.pos >= limit {
                if self.kind == Kind::Stream {
                    self.check_drained()?;
                }
                self.out.flush(&mut p.chunks);
                p.chunks.push(Chunk::End {
                    length: self.size,
                    digest: Some(self.digest.value()),
                });
                p.end = true;
                self.file = None;
                return Ok(p);
            }
            let (end, data) = match self.segment {
                Some((end, data)) if end > self.pos => (end.min(limit), data),
                _ => {
                    let seg = if self.use_extents {
                        let file = self.file.as_ref().ok_or(Error::Cancelled)?;
                        match segment_at(file, self.pos, self.size)
                            .map_err(|e| Error::io(format!("SEEK_DATA at {}", self.pos), e))?
                        {
                            Some(Segment::Data(end)) => (end, true),
                            Some(Segment::Hole(end)) => (end, false),
                            None => {
                                log::debug!("no extent map here; reading everything");
                                self.use_extents = false;
                                (self.size, true)
                            }
                        }
                    } else {
                        (self.size, true)
                    };
                    self.segment = Some(seg);
                    (seg.0.min(limit), seg.1)
                }
            };
            if !data {
                let pos = self.pos;
                self.hole(pos, end - pos, &mut p.chunks);
                self.pos = end;
                continue;
            }
            let unit = read_unit();
            let n = (end - self.pos).min(unit - self.pos % unit);
            let file = self.file.as_ref().ok_or(Error::Cancelled)?;
            let (pos, kind) = (self.pos, self.kind);
            let buf =
                if self.direct_on && pos.is_multiple_of(self.align) && n.is_multiple_of(self.align)
                {
                    fd::read_aligned(file, pos, n as usize, self.align)
                } else {
                    // Unaligned (the partial last block): read it through the page cache.
                    fd::buffered(file, self.direct_on, || {
                        fd::read_new(file, kind, pos, n as usize).map(|b| b.freeze())
                    })
                }
                .map_err(|e| Error::io(format!("reading at {}", self.pos), e))?;
            self.bytes_read.fetch_add(n, Ordering::Relaxed);
            self.digest.update(&buf);
            self.out
                .data(self.pos, buf, self.granularity, &mut p.chunks);
            self.pos += n;
            return Ok(p);
        }
    }
}

/// Opens a source by path; a block device `exclusive`ly (O_EXCL), so the kernel refuses one
/// that is mounted or claimed: it may change while it is copied, and the copy would not be
/// consistent.
fn open_source(path: &std::path::Path, shown: &str, exclusive: bool) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if exclusive {
        o.custom_flags(libc::O_EXCL);
    }
    o.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) if exclusive => Error::InUse {
            target: shown.to_owned(),
            reading: true,
        },
        _ => Error::io(format!("opening {shown}"), e),
    })
}
