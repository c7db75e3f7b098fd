//! [`FileWriter`]: a volume sink over a new file (written beside its final name and renamed
//! into place only after the digest matched), an existing file or block device (written in
//! place, holes zeroed), or a pipe (holes written as zeroes).
//!
//! `write` only queues; a pool worker handles one chunk (or one slice of a long hole) per run.
//! A chunk counts as completed, and its flow-control credit goes back to the sender, only when
//! its work is done, so a sink that must zero its holes slows the sender down.

use crate::budget;
use crate::direct::{self, DirectWrites};
use crate::error::Error;
use crate::fd::{self, Kind, Location};
use crate::pool::{Job, JobHandle, Pool, Step, WeakJobHandle};
use crate::punch::{self, Zeroer};
use crate::sink;
use crate::temp;
use crate::verify::Expected;
use engine::{Chunk, Digest, Notify, VolumeError, VolumeWriter, WriteProgress};
use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;

/// Largest slice of a hole zeroed per worker run, so other streams get a turn.
const ZERO_SLICE: u64 = 64 << 20;
/// Chunks and data bytes handled per run. Below half the engine's default stream window, so
/// credit for one batch goes back while the sender fills the next.
const BATCH_CHUNKS: usize = 16;
const BATCH_BYTES: u64 = 1 << 20;

/// How to write a volume.
#[derive(Clone, Default)]
pub struct WriterOptions {
    /// The result must be fully allocated (ALLOCATED): zero instead of punching.
    pub allocated: bool,
    /// The sink already reads as zero (DESTINATION_IS_ZERO): holes need no work.
    pub destination_is_zero: bool,
    /// A new file may replace an existing one (OVERWRITE).
    pub overwrite: bool,
    /// Skip fdatasync before reporting success (benchmarks only: a crash may lose the data).
    pub no_sync: bool,
    /// Write with O_DIRECT: data in unaligned memory through an aligned bounce buffer; the
    /// pieces O_DIRECT cannot take (an unaligned tail) through the page cache, synced and
    /// dropped from it at commit, so the copy leaves nothing cached. Where the file system
    /// refuses O_DIRECT, writing falls back to buffered I/O with a logged warning.
    pub direct: bool,
    /// After the last write, read the destination back (its data by the file's map, holes
    /// as holes) and compare it with what was received; a difference fails the volume with
    /// the first offset found to differ. Not for streams, which cannot be read back.
    pub verify: bool,
    /// Workers to use; the process-wide pool when `None`.
    pub pool: Option<Arc<Pool>>,
}

/// Where a writer puts the volume.
pub enum WriteTarget {
    /// A new file: written as a temporary in `dir`, renamed to `name` at the end.
    Create {
        dir: Option<Arc<OwnedFd>>,
        dir_path: Option<PathBuf>,
        name: CString,
        shown: String,
    },
    InPlace(Location),
}

#[derive(Default)]
struct Out {
    ready: Option<Result<(), VolumeError>>,
    queue: VecDeque<Chunk>,
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
    cancelled: bool,
}

/// A volume sink written off the loop thread. See the module docs.
/// The synchronous work behind a [`FileWriter`]: open the sink, then handle chunks in order.
/// Files and devices are one kind; NBD exports ([`crate::nbd`]) another.
pub(crate) trait Consume: Send {
    fn open(&mut self) -> Result<(), Error>;
    /// Handles chunks from the front of `batch` in order: how many were completed (their
    /// credit may go back to the sender), and whether the volume was committed. A chunk not
    /// completed comes back at the front of the next batch.
    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>);
    /// Calls the volume `shown` in messages (before `open`).
    fn rename(&mut self, _shown: String) {}
    /// Closes the sink; nothing half-written stays under a final name.
    fn discard(&mut self);
}

/// Builds the consumer once the volume's size is known.
pub(crate) type MakeConsumer = Box<dyn FnOnce(u64) -> Box<dyn Consume> + Send>;

pub struct FileWriter {
    make: Option<MakeConsumer>,
    options: WriterOptions,
    out: Arc<Mutex<Out>>,
    job: Option<JobHandle>,
    bytes_written: Arc<AtomicU64>,
}

fn split_path(path: PathBuf) -> (Option<PathBuf>, CString, String) {
    let shown = path.display().to_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| CString::new(n.as_bytes()).unwrap_or_default())
        .unwrap_or_default();
    (Some(dir), name, shown)
}

impl FileWriter {
    /// Creates a new regular file at `path` (replacing an existing one only with `overwrite`).
    /// Nothing appears under `path` unless the whole volume arrived and matched its digest.
    pub fn create(path: impl Into<PathBuf>, options: WriterOptions) -> Self {
        Self::new(WriteTarget::create(path), options)
    }

    /// Writes into an existing regular file, block device or FIFO, in place.
    pub fn in_place(path: impl Into<PathBuf>, options: WriterOptions) -> Self {
        Self::new(WriteTarget::in_place(path), options)
    }

    /// Writes into an already open file, device or pipe, in place.
    pub fn from_file(file: File, options: WriterOptions) -> Self {
        Self::new(WriteTarget::from_file(file), options)
    }

    /// Writes the volume to `target` (any of the above, or a new file inside a directory held
    /// open).
    pub fn new(target: WriteTarget, options: WriterOptions) -> Self {
        let bytes_written: Arc<AtomicU64> = Arc::default();
        let (opts, counter) = (options.clone(), Arc::clone(&bytes_written));
        FileWriter {
            make: Some(Box::new(move |size| {
                Box::new(Work::new(target, opts, size, counter)) as Box<dyn Consume>
            })),
            options,
            out: Arc::default(),
            job: None,
            bytes_written,
        }
    }

    /// A writer whose chunks go to the consumer `make` builds, with the queueing, batching
    /// and cancellation of file writers.
    pub(crate) fn with_consumer(make: MakeConsumer, options: WriterOptions) -> Self {
        FileWriter {
            make: Some(make),
            options,
            out: Arc::default(),
            job: None,
            bytes_written: Arc::default(),
        }
    }

    /// Calls the volume `shown` in messages instead of by its path.
    pub fn named(mut self, shown: impl Into<String>) -> Self {
        let shown = shown.into();
        if let Some(make) = self.make.take() {
            self.make = Some(Box::new(move |size| {
                let mut consumer = make(size);
                consumer.rename(shown);
                consumer
            }));
        }
        self
    }

    /// Data bytes written to the fd so far (zeroes written for holes not included).
    pub fn bytes_written(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes_written)
    }

    fn schedule(&self) {
        if let Some(job) = &self.job {
            job.schedule();
        }
    }
}

impl VolumeWriter for FileWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        let Some(make) = self.make.take() else {
            return;
        };
        let pool = self.options.pool.clone().unwrap_or_else(Pool::shared);
        let me = Arc::new(OnceLock::new());
        let job = pool.register(WriteJob {
            out: Arc::clone(&self.out),
            notify,
            work: Mutex::new(make(size)),
            slot: Mutex::default(),
            me: Arc::clone(&me),
        });
        let _ = me.set(job.downgrade());
        job.schedule();
        self.job = Some(job);
    }

    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        match &self.out.lock().unwrap().ready {
            Some(r) => Poll::Ready(r.clone()),
            None => Poll::Pending,
        }
    }

    fn write(&mut self, chunk: Chunk) {
        self.out.lock().unwrap().queue.push_back(chunk);
        self.schedule();
    }

    fn poll_progress(&mut self) -> WriteProgress {
        let out = self.out.lock().unwrap();
        WriteProgress {
            completed: out.completed,
            outcome: out.outcome.clone(),
        }
    }

    fn cancel(&mut self) {
        let mut out = self.out.lock().unwrap();
        if matches!(out.outcome, Some(Ok(()))) {
            return;
        }
        out.cancelled = true;
        out.queue.clear();
        drop(out);
        // The job removes the temporary file on its next run.
        self.schedule();
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.cancel();
    }
}

struct WriteJob {
    out: Arc<Mutex<Out>>,
    notify: Notify,
    work: Mutex<Box<dyn Consume>>,
    /// The volume's place in the process's open-volume budget, held while its sink is open.
    slot: Mutex<budget::Slot>,
    /// This job, for the budget to wake when it hands over a slot.
    me: Arc<OnceLock<WeakJobHandle>>,
}

/// The chunks at the front of `queue` to handle in one run: a few, so there are fewer
/// wake-ups and runs of DATA become one pwritev, but bounded so other streams get a turn.
pub fn take_batch(queue: &VecDeque<Chunk>) -> Vec<Chunk> {
    let mut bytes = 0;
    let batch: Vec<Chunk> = queue
        .iter()
        .take_while(|c| {
            bytes += c.logical_len().min(BATCH_BYTES);
            bytes <= BATCH_BYTES
        })
        .take(BATCH_CHUNKS)
        .cloned()
        .collect();
    if batch.is_empty() {
        queue.front().cloned().into_iter().collect()
    } else {
        batch
    }
}

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

impl WriteTarget {
    /// A new file at `path`, renamed into place at the end.
    pub fn create(path: impl Into<PathBuf>) -> Self {
        let (dir_path, name, shown) = split_path(path.into());
        WriteTarget::Create {
            dir: None,
            dir_path,
            name,
            shown,
        }
    }

    /// A new file `name` inside the open directory `dir`.
    pub fn create_at(dir: Arc<OwnedFd>, name: CString, shown: String) -> Self {
        WriteTarget::Create {
            dir: Some(dir),
            dir_path: None,
            name,
            shown,
        }
    }

    pub fn in_place(path: impl Into<PathBuf>) -> Self {
        WriteTarget::InPlace(Location::Path(path.into()))
    }

    pub fn from_file(file: File) -> Self {
        WriteTarget::InPlace(Location::Open(file))
    }

    /// The same target, called `shown` in messages.
    pub fn named(self, shown: impl Into<String>) -> Self {
        match self {
            WriteTarget::Create {
                dir,
                dir_path,
                name,
                ..
            } => WriteTarget::Create {
                dir,
                dir_path,
                name,
                shown: shown.into(),
            },
            WriteTarget::InPlace(l) => WriteTarget::InPlace(l.named(shown)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            WriteTarget::Create { shown, .. } => shown.clone(),
            WriteTarget::InPlace(l) => l.describe(),
        }
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

struct Work {
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
    /// Where the next chunk must start.
    next: u64,
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

impl Job for WriteJob {
    fn run(&self) -> Step {
        let (front, opened) = {
            let out = self.out.lock().unwrap();
            if out.cancelled {
                drop(out);
                self.work.lock().unwrap().discard();
                self.slot.lock().unwrap().release();
                return Step::Idle;
            }
            if out.outcome.is_some() {
                return Step::Idle;
            }
            (take_batch(&out.queue), out.ready.is_some())
        };
        let mut w = self.work.lock().unwrap();
        if !opened {
            // A slot first, or wait in line for one (the budget wakes this job).
            let me = self.me.get().expect("set when registered");
            if !self.slot.lock().unwrap().try_hold(me) {
                return Step::Idle;
            }
            let r = w.open();
            drop(w);
            if r.is_err() {
                self.slot.lock().unwrap().release();
            }
            let mut out = self.out.lock().unwrap();
            let r = r.map_err(VolumeError::from);
            if let Err(e) = &r {
                log::debug!("opening sink failed: {e}");
                out.outcome = Some(Err(e.clone()));
            }
            out.ready = Some(r);
            drop(out);
            self.notify.notify();
            return Step::Again;
        }
        if front.is_empty() {
            return Step::Idle;
        }
        let (done, result) = w.handle_batch(&front);
        if result.is_err() {
            w.discard();
        }
        drop(w);
        if !matches!(result, Ok(false)) {
            // Committed (the fd is closed) or discarded: the slot is someone else's now.
            self.slot.lock().unwrap().release();
        }
        let mut out = self.out.lock().unwrap();
        for _ in 0..done {
            out.queue.pop_front();
        }
        out.completed += done as u64;
        let step = match result {
            Ok(true) => {
                out.outcome = Some(Ok(()));
                Step::Idle
            }
            Ok(false) if out.queue.is_empty() => Step::Idle,
            Ok(false) => Step::Again,
            Err(e) => {
                log::debug!("writing failed: {e}");
                out.outcome = Some(Err(e.into()));
                Step::Idle
            }
        };
        drop(out);
        self.notify.notify();
        step
    }
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
    fn new(
        target: WriteTarget,
        options: WriterOptions,
        size: u64,
        bytes_written: Arc<AtomicU64>,
    ) -> Work {
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
            let run = batch[done..]
                .iter()
                .take_while(|c| matches!(c, Chunk::Data { .. }))
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
        let start = self.next;
        let mut end = start;
        for c in chunks {
            if let Chunk::Data { offset, bytes } = c {
                if *offset != end || offset + bytes.len() as u64 > self.size {
                    return Err(Error::Length {
                        expected: end,
                        got: *offset,
                    });
                }
                end += bytes.len() as u64;
                slices.push(std::io::IoSlice::new(bytes));
            }
        }
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
        let file = self.file.as_ref().ok_or(Error::Cancelled)?;
        match chunk {
            Chunk::Data { offset, bytes } => {
                self.check_offset(*offset, bytes.len() as u64)?;
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

    fn check_offset(&self, offset: u64, len: u64) -> Result<(), Error> {
        if offset != self.next || offset + len > self.size {
            return Err(Error::Length {
                expected: self.next,
                got: offset,
            });
        }
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
