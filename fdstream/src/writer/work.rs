//! The synchronous sink behind [`FileWriter`](super::FileWriter) and the iohelper's writer:
//! open (a temporary beside the final name, or the target in place), write runs of DATA with
//! one pwritev, zero or punch holes where the destination may hold old data, and commit (sync,
//! check the digest, rename into place) or discard.

use super::{Consume, WriteTarget, WriterOptions};
use crate::direct::{self, DirectWrites};
use crate::error::Error;
use crate::fd::{self, Kind};
use crate::punch::{self, Zeroer};
use crate::sink;
use crate::temp;
use crate::verify::Expected;
use engine::{Chunk, Digest};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest slice of a hole zeroed per worker run, so other streams get a turn.
const ZERO_SLICE: u64 = 64 << 20;

/// The synchronous core of [`FileWriter`], without worker or queue. The iohelper process
/// drives it to run a writer out of process with exactly the in-process semantics.
pub struct WriteCore {
    work: Work,
}

impl WriteCore {
    pub fn new(target: WriteTarget, size: u64, options: WriterOptions) -> Self {
        WriteCore {
            work: Work::new(target, options, size, Arc::default()),
        }
    }

    /// Creates (temporary) or opens the sink; call once before `handle_batch`.
    pub fn open(&mut self) -> Result<(), Error> {
        self.work.open()
    }

    /// Handles chunks from the front of `batch` in order: how many were completed, and
    /// whether the volume was committed. On error the caller should `discard`.
    pub fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        self.work.handle_batch(batch)
    }

    /// Closes the sink and removes a temporary file.
    pub fn discard(&mut self) {
        self.work.discard()
    }

    /// Creates a new file's temporary under `name` (see [`crate::temp::name`]) instead of a
    /// name of this process: a helper's parent chooses it, so that it can remove the file
    /// whenever the helper dies.
    pub fn with_temp_name(mut self, name: CString) -> Self {
        self.work.temp = Some(name);
        self
    }

    /// The temporary file's name inside the target directory, while there is one.
    pub fn temp_name(&self) -> Option<&CString> {
        self.work.temp.as_ref()
    }

    /// Whether data blocks written with O_DIRECT should be in aligned memory.
    pub fn direct_align(&self) -> Option<u64> {
        self.work.direct_on.then_some(self.work.align)
    }
}

/// The directory a new file goes into (see [`WriteTarget::Create`]): the one held open, or
/// `dir_path` opened now.
pub(crate) fn create_dir(
    dir: Option<Arc<OwnedFd>>,
    dir_path: Option<PathBuf>,
) -> Result<Arc<OwnedFd>, Error> {
    match (dir, dir_path) {
        (Some(d), _) => Ok(d),
        (None, Some(p)) => {
            Ok(Arc::new(fd::open_dir(&p).map_err(|e| {
                Error::io(format!("opening {}", p.display()), e)
            })?))
        }
        (None, None) => Err(Error::Cancelled),
    }
}

pub(super) struct Work {
    target: Option<WriteTarget>,
    options: WriterOptions,
    /// The announced volume length.
    size: u64,
    file: Option<File>,
    kind: Kind,
    /// For new files: the directory, the temporary name and the final name.
    dir: Option<Arc<OwnedFd>>,
    temp: Option<CString>,
    final_name: CString,
    shown: String,
    /// Length of an existing file written in place: beyond it, holes need no zeroing.
    old_size: u64,
    zeroer: Zeroer,
    /// A new ALLOCATED file was fallocated whole at open.
    preallocated: bool,
    /// Where the next chunk must start (or, for a ranged write, the end of the last one).
    next: u64,
    /// A ranged write: where chunks may start, range by range.
    cursor: Option<engine::range::RangeCursor>,
    /// How far into the current hole the zeroing got.
    hole_done: Option<u64>,
    digest: Digest,
    bytes_written: Arc<AtomicU64>,
    /// O_DIRECT is set on `file` (asked for, and accepted by the file system).
    direct_on: bool,
    align: u64,
    direct: DirectWrites,
    /// What was received, region by region, when the destination is to be read back.
    expected: Option<Expected>,
}

impl Consume for Work {
    fn open(&mut self) -> Result<(), Error> {
        Work::open(self)
    }
    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        Work::handle_batch(self, batch)
    }
    fn discard(&mut self) {
        Work::discard(self)
    }
    fn rename(&mut self, shown: String) {
        self.target = self.target.take().map(|t| t.named(shown));
    }
}

impl Work {
    pub(super) fn new(
        target: WriteTarget,
        options: WriterOptions,
        size: u64,
        bytes_written: Arc<AtomicU64>,
    ) -> Work {
        let cursor = options
            .ranges
            .clone()
            .map(|r| engine::range::RangeCursor::new(Some(r)));
        Work {
            target: Some(target),
            options,
            size,
            file: None,
            kind: Kind::Regular,
            dir: None,
            temp: None,
            final_name: CString::default(),
            shown: String::new(),
            old_size: 0,
            zeroer: Zeroer::new(Kind::Regular, false),
            preallocated: false,
            next: 0,
            cursor,
            hole_done: None,
            digest: Digest::new(),
            bytes_written,
            direct_on: false,
            align: fd::DIRECT_ALIGN,
            direct: DirectWrites::default(),
            expected: None,
        }
    }

    fn open(&mut self) -> Result<(), Error> {
        match self.target.take().ok_or(Error::Cancelled)? {
            WriteTarget::Create {
                dir,
                dir_path,
                name,
                shown,
            } => {
                self.shown = shown;
                let dir = create_dir(dir, dir_path)?;
                let temp = self
                    .temp
                    .take()
                    .unwrap_or_else(|| temp::name(name.as_bytes()));
                let file = sink::create_temp(
                    &dir,
                    &name,
                    &temp,
                    &self.shown,
                    self.options.overwrite,
                    self.size,
                )?;
                self.temp = Some(temp);
                self.dir = Some(dir);
                self.final_name = name;
                self.kind = Kind::Regular;
                self.zeroer = Zeroer::new(Kind::Regular, self.options.allocated);
                if self.options.allocated && self.size > 0 {
                    // One fallocate for the whole volume; holes then need nothing.
                    let r = self.zeroer.allocate_only(&file, 0, self.size);
                    self.preallocated = r.map_err(|e| {
                        Error::io(
                            format!("allocating {} bytes for {}", self.size, self.shown),
                            e,
                        )
                    })?;
                }
                self.file = Some(file);
            }
            WriteTarget::InPlace(location) => {
                self.shown = location.describe();
                let sink::InPlace { file, kind, have } =
                    sink::open_in_place(location, self.options.overwrite, self.size)?;
                self.kind = kind;
                if kind == Kind::Regular {
                    self.old_size = have.unwrap_or(0);
                    if self.old_size < self.size {
                        sink::size_before_writing(&file, self.size, &self.shown)?;
                    }
                }
                self.zeroer = Zeroer::new(self.kind, self.options.allocated);
                self.file = Some(file);
            }
        }
        if self.cursor.is_some() && (self.options.verify || self.kind == Kind::Stream) {
            return Err(Error::Unsupported(format!(
                "{}: ranges are written in place, which a pipe cannot take and --verify \
                 cannot read back yet",
                self.shown
            )));
        }
        if self.options.verify && self.kind != Kind::Stream {
            self.expected = Some(Expected::default());
        }
        if let (true, Some(file)) = (self.options.direct && self.kind != Kind::Stream, &self.file) {
            self.align = fd::direct_align(file, self.kind);
            match fd::set_direct(file, true) {
                Ok(()) => self.direct_on = true,
                Err(e) => log::warn!(
                    "{}: O_DIRECT refused ({e}); writing through the page cache",
                    self.shown
                ),
            }
        }
        log::debug!(
            "writing {} ({:?}, {} bytes)",
            self.shown,
            self.kind,
            self.size
        );
        Ok(())
    }

    /// Handles chunks from the front of `batch` in order: how many were completed, and whether
    /// the volume was committed (End handled).
    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        let mut done = 0;
        while done < batch.len() {
            // DATA chunks that follow each other on disk (a ranged write jumps between ranges).
            let mut end = None;
            let run = batch[done..]
                .iter()
                .take_while(|c| match c {
                    Chunk::Data { offset, bytes } if end.is_none_or(|e| e == *offset) => {
                        end = Some(offset + bytes.len() as u64);
                        true
                    }
                    _ => false,
                })
                .count();
            // Under O_DIRECT one pwritev needs every iovec aligned in memory and length.
            let aligned = !self.direct_on
                || batch[done..done + run].iter().all(|c| match c {
                    Chunk::Data { offset, bytes } => fd::is_aligned(*offset, bytes, self.align),
                    _ => false,
                });
            if run > 1 && self.kind != Kind::Stream && aligned {
                if let Err(e) = self.write_data_run(&batch[done..done + run]) {
                    return (done, Err(self.partial(e)));
                }
                done += run;
                continue;
            }
            match self.handle(&batch[done]) {
                Ok(true) => done += 1,
                Ok(false) => return (done, Ok(false)),
                Err(e) => return (done, Err(e)),
            }
            if matches!(batch[done - 1], Chunk::End { .. }) {
                return (done, Ok(true));
            }
        }
        (done, Ok(false))
    }

    /// Writes consecutive DATA chunks with one pwritev (retrying what a short write left).
    fn write_data_run(&mut self, chunks: &[Chunk]) -> Result<(), Error> {
        let mut slices = Vec::with_capacity(chunks.len());
        // The run is contiguous (handle_batch made it so): one check of where it starts and
        // ends, or of each piece against the ranges.
        let start = match chunks.first() {
            Some(Chunk::Data { offset, .. }) => *offset,
            _ => self.next,
        };
        let mut end = start;
        for c in chunks {
            if let Chunk::Data { offset, bytes } = c {
                if let Some(cursor) = &mut self.cursor {
                    if !cursor.take(*offset, bytes.len() as u64, self.size) {
                        return Err(Error::Length {
                            expected: cursor.next(),
                            got: *offset,
                        });
                    }
                }
                end += bytes.len() as u64;
                slices.push(std::io::IoSlice::new(bytes));
            }
        }
        if (self.cursor.is_none() && start != self.next) || end > self.size {
            return Err(Error::Length {
                expected: self.next,
                got: start,
            });
        }
        self.next = start;
        let file = self.file.as_ref().ok_or(Error::Cancelled)?;
        let written = loop {
            match nix::sys::uio::pwritev(file, &slices, start as libc::off_t) {
                Ok(n) => break n as u64,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(Error::io(
                        format!("writing {} at {start}", self.shown),
                        e.into(),
                    ))
                }
            }
        };
        // A short write: finish chunk by chunk from where it stopped.
        let mut at = start;
        for c in chunks {
            if let Chunk::Data { bytes, .. } = c {
                let len = bytes.len() as u64;
                if at + len > start + written {
                    let skip = (start + written).saturating_sub(at) as usize;
                    let (kind, rest) = (self.kind, &bytes[skip..]);
                    // The rest may start unaligned.
                    let r = if self.direct_on {
                        let align = self.align;
                        self.direct.write(file, kind, at + skip as u64, rest, align)
                    } else {
                        fd::write_full(file, kind, at + skip as u64, rest)
                    };
                    r.map_err(|e| Error::io(format!("writing {} at {at}", self.shown), e))?;
                }
                self.digest.update(bytes);
                if let Some(e) = &mut self.expected {
                    e.data(bytes);
                }
                at += len;
            }
        }
        self.bytes_written.fetch_add(end - start, Ordering::Relaxed);
        self.next = end;
        Ok(())
    }

    fn partial(&self, e: Error) -> Error {
        if matches!(e, Error::VerifyFailed { .. }) {
            // Everything was written; it was the reading back that differed.
            return e;
        }
        if self.temp.is_none() && self.kind != Kind::Stream {
            let from = self.next + self.hole_done.unwrap_or(0);
            return Error::Partial {
                from,
                to: self.size.max(from),
                cause: Box::new(e),
            };
        }
        e
    }

    /// Does (part of) the work of one chunk; true when the chunk is done.
    fn handle(&mut self, chunk: &Chunk) -> Result<bool, Error> {
        self.handle_inner(chunk).map_err(|e| self.partial(e))
    }

    fn handle_inner(&mut self, chunk: &Chunk) -> Result<bool, Error> {
        match chunk {
            Chunk::Data { offset, bytes } => {
                self.check_offset(*offset, bytes.len() as u64)?;
                let file = self.file.as_ref().ok_or(Error::Cancelled)?;
                let r = if self.direct_on {
                    self.direct
                        .write(file, self.kind, *offset, bytes, self.align)
                } else {
                    fd::write_full(file, self.kind, *offset, bytes)
                };
                r.map_err(|e| Error::io(format!("writing {} at {offset}", self.shown), e))?;
                self.bytes_written
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.digest.update(bytes);
                if let Some(e) = &mut self.expected {
                    e.data(bytes);
                }
                self.next += bytes.len() as u64;
                Ok(true)
            }
            &Chunk::Hole { offset, len } => {
                let done = match self.hole_done {
                    Some(done) => done,
                    None => {
                        self.check_offset(offset, len)?;
                        self.digest.update_zeroes(len);
                        if let Some(e) = &mut self.expected {
                            e.hole(len);
                        }
                        0
                    }
                };
                let end = offset + len;
                let work_end = self.hole_work_end(end);
                let from = offset + done;
                if from < work_end {
                    let n = (work_end - from).min(ZERO_SLICE);
                    let new_file = self.temp.is_some();
                    let file = self.file.as_ref().ok_or(Error::Cancelled)?;
                    let (kind, zeroer) = (self.kind, &mut self.zeroer);
                    // Zeroes may be written from a static, unaligned buffer.
                    self.direct.cached |= self.direct_on;
                    let r = fd::buffered(file, self.direct_on, || {
                        if kind == Kind::Stream {
                            punch::write_zeroes(file, kind, from, n).map(|_| punch::Method::Write)
                        } else if new_file {
                            zeroer.allocate(file, from, n)
                        } else {
                            zeroer.zero(file, from, n)
                        }
                    });
                    r.map_err(|e| {
                        Error::io(
                            format!("zeroing {}..{} of {}", from, from + n, self.shown),
                            e,
                        )
                    })?;
                    if from + n < work_end {
                        self.hole_done = Some(done + n);
                        return Ok(false);
                    }
                }
                self.hole_done = None;
                self.next = end;
                Ok(true)
            }
            &Chunk::End { length, digest } => {
                let whole = match &self.cursor {
                    Some(cursor) => cursor.is_done(self.size),
                    None => self.next == length,
                };
                if length != self.size || !whole {
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
                self.commit()?;
                Ok(true)
            }
        }
    }

    /// Where the work for a hole ending at `end` stops: some sinks need none.
    fn hole_work_end(&self, end: u64) -> u64 {
        let start = self.next;
        if self.kind == Kind::Stream {
            return end;
        }
        if self.temp.is_some() {
            // A new file reads zero wherever nothing was written; ALLOCATED needs blocks.
            return if self.zeroer.allocated() && !self.preallocated {
                end
            } else {
                start
            };
        }
        if self.options.destination_is_zero {
            return start;
        }
        if self.kind == Kind::Regular && !self.zeroer.allocated() {
            // Past the old end the file reads zero once it is extended.
            return end.min(self.old_size.max(start));
        }
        end
    }

    /// Checks that a chunk starts where it is due and fits the volume; a ranged write jumps
    /// to the start of the next range (the bytes in between are not the stream's).
    fn check_offset(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        let (ok, expected) = match &mut self.cursor {
            Some(cursor) => (cursor.take(offset, len, self.size), cursor.next()),
            None => (
                offset == self.next && offset.checked_add(len).is_some_and(|e| e <= self.size),
                self.next,
            ),
        };
        if !ok {
            return Err(Error::Length {
                expected,
                got: offset,
            });
        }
        self.next = offset;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Error> {
        let file = self.file.take().ok_or(Error::Cancelled)?;
        let shown = self.shown.clone();
        if self.kind == Kind::Regular && self.old_size > self.size {
            // An existing file written in place that was longer than the volume: cut only
            // now, so a failed transfer leaves its tail as it was.
            file.set_len(self.size)
                .map_err(|e| Error::io(format!("setting the size of {shown}"), e))?;
        }
        // Under --direct what went through the page cache is synced even with no_sync, so
        // that it can be dropped from the cache: the copy leaves none of it there.
        let sync = !self.options.no_sync || (self.direct_on && self.direct.cached);
        if sync && self.kind != Kind::Stream {
            file.sync_data()
                .map_err(|e| Error::io(format!("syncing {shown}"), e))?;
        }
        if self.direct_on || self.expected.is_some() {
            // Reading back then reads what reached the device, where it was synced.
            direct::drop_cached(&file)
                .map_err(|e| Error::io(format!("dropping {shown} from the page cache"), e))?;
        }
        if let Some(expected) = self.expected.take() {
            if self.direct_on {
                // Reads into ordinary memory.
                fd::set_direct(&file, false)
                    .map_err(|e| Error::io(format!("reading {shown} back"), e))?;
            }
            // Before the rename: nothing unverified gets the final name.
            expected.check(&file, self.kind, self.size, &shown)?;
            if self.direct_on {
                direct::drop_cached(&file)
                    .map_err(|e| Error::io(format!("dropping {shown} from the page cache"), e))?;
            }
        }
        drop(file);
        if let (Some(dir), Some(temp)) = (&self.dir, &self.temp) {
            fd::renameat(dir, temp, &self.final_name, self.options.overwrite).map_err(|e| {
                if e.raw_os_error() == Some(libc::EEXIST) {
                    Error::AlreadyExists(shown.clone())
                } else {
                    Error::io(format!("renaming into {shown}"), e)
                }
            })?;
            self.temp = None;
        }
        log::debug!("{shown}: {} bytes written and verified", self.size);
        Ok(())
    }

    /// Drops the fd and removes a temporary file: nothing half-written stays behind.
    fn discard(&mut self) {
        self.file = None;
        self.target = None;
        if let (Some(dir), Some(temp)) = (&self.dir, self.temp.take()) {
            // Already gone (the helper's parent or a cleanup removed it) is the goal.
            match fd::unlinkat(dir, &temp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    log::warn!("cannot remove temporary file {temp:?}: {e}");
                }
                _ => {}
            }
        }
    }
}
