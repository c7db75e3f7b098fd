//! [`FileWriter`]: a volume sink over a new file (written beside its final name and renamed
//! into place only after the digest matched), an existing file or block device (written in
//! place, holes zeroed), or a pipe (holes written as zeroes).
//!
//! `write` only queues; a pool worker handles one chunk (or one slice of a long hole) per run.
//! A chunk counts as completed, and its flow-control credit goes back to the sender, only when
//! its work is done, so a sink that must zero its holes slows the sender down.
//!
//! This module is that queue and the pool job around a [`Consume`]r; the file and device sink
//! itself (open, write, zero, commit) is `work`, which the iohelper drives as [`WriteCore`].

mod journaled;
mod resume;
mod update;
mod work;

pub use journaled::{JournalStatus, Journaled, RECORD_BYTES, RECORD_INTERVAL};
pub(crate) use resume::ResumeTarget;

pub(crate) use work::create_dir;
use work::Work;
pub use work::WriteCore;

use crate::budget;
use crate::error::Error;
use crate::fd::Location;
use crate::pool::{Job, JobHandle, Pool, Step, WeakJobHandle};
use engine::{Chunk, Notify, VolumeError, VolumeWriter, WriteProgress};
use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;

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
    /// Only these ranges arrive (a ranged READ): each is written at its offset, what lies
    /// between them is left as it is (a new file reads zero there). Not with `verify`.
    pub ranges: Option<Arc<engine::RangeSet>>,
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
    /// The source's identity from the peer's ACCEPT (before `open`).
    fn source_identity(&mut self, _identity: Option<engine::VolumeIdentity>) {}
    /// Closes the sink; nothing half-written stays under a final name.
    fn discard(&mut self);
}

/// Builds the consumer once the volume's size is known.
pub(crate) type MakeConsumer = Box<dyn FnOnce(u64) -> Box<dyn Consume> + Send>;

/// A volume sink written off the loop thread. See the module docs.
pub struct FileWriter {
    make: Option<MakeConsumer>,
    /// The source's identity, handed to the consumer when it is made.
    identity: Option<engine::VolumeIdentity>,
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
            identity: None,
            make: Some(Box::new(move |size| {
                Box::new(Work::new(target, opts, size, counter)) as Box<dyn Consume>
            })),
            options,
            out: Arc::default(),
            job: None,
            bytes_written,
        }
    }

    /// The sink of a WRITE that updates the existing volume `name` in `dir` (docs/PROTOCOL.md
    /// 8.4): only `options.ranges` arrive, written into a copy of the volume that replaces it
    /// if its volume checksum is `checksum`.
    pub fn update_at(
        dir: Arc<std::os::fd::OwnedFd>,
        name: CString,
        shown: String,
        checksum: [u8; 32],
        options: WriterOptions,
    ) -> Self {
        let bytes_written: Arc<AtomicU64> = Arc::default();
        let (opts, counter) = (options.clone(), Arc::clone(&bytes_written));
        FileWriter {
            identity: None,
            make: Some(Box::new(move |size| {
                Box::new(update::UpdateWork::new(
                    dir, name, shown, opts, size, checksum, counter,
                )) as Box<dyn Consume>
            })),
            options,
            out: Arc::default(),
            job: None,
            bytes_written,
        }
    }

    /// The sink of a resumable upload (docs/PROTOCOL.md 8.5): written into the partial the
    /// server keeps for its volume, peer and token, journaled as it becomes durable, renamed
    /// to the volume once its volume checksum is the announced one.
    pub(crate) fn resume_at(target: ResumeTarget, options: WriterOptions) -> Self {
        let bytes_written: Arc<AtomicU64> = Arc::default();
        let (opts, counter) = (options.clone(), Arc::clone(&bytes_written));
        FileWriter {
            identity: None,
            make: Some(Box::new(move |size| {
                Box::new(resume::ResumeWork::new(target, opts, size, counter)) as Box<dyn Consume>
            })),
            options,
            out: Arc::default(),
            job: None,
            bytes_written,
        }
    }

    /// The sink of a resumable download (see [`Journaled`]): written in place into
    /// `plan.partial`, each range recorded in its journal once durable. The status tells the
    /// caller what was recorded and whether the source had changed.
    pub fn journaled(plan: Journaled, options: WriterOptions) -> (Self, Arc<JournalStatus>) {
        let bytes_written: Arc<AtomicU64> = Arc::default();
        let status: Arc<JournalStatus> = Arc::default();
        let (opts, counter, shared) = (
            options.clone(),
            Arc::clone(&bytes_written),
            Arc::clone(&status),
        );
        let writer = FileWriter {
            identity: None,
            make: Some(Box::new(move |size| {
                Box::new(journaled::JournaledWork::new(
                    plan, opts, size, None, shared, counter,
                )) as Box<dyn Consume>
            })),
            options,
            out: Arc::default(),
            job: None,
            bytes_written,
        };
        (writer, status)
    }

    /// A writer whose chunks go to the consumer `make` builds, with the queueing, batching
    /// and cancellation of file writers.
    pub(crate) fn with_consumer(make: MakeConsumer, options: WriterOptions) -> Self {
        FileWriter {
            identity: None,
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
        let mut work = make(size);
        work.source_identity(self.identity.take());
        let job = pool.register(WriteJob {
            out: Arc::clone(&self.out),
            notify,
            work: Mutex::new(work),
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

    fn source_identity(&mut self, identity: Option<engine::VolumeIdentity>) {
        self.identity = identity;
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
