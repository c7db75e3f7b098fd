//! [`FileReader`]: a volume source over a regular file, block device or pipe, read by a pool
//! worker a bounded distance ahead of the event loop.
//!
//! One run of the worker job reads at most one buffer (1 MiB). The buffer is split by zero
//! detection into DATA chunks, which are slices of that same buffer (no copy), and holes, which
//! are merged with neighbouring holes (SEEK_HOLE ones too) before they are queued. Every byte
//! is read once and digested once, on the worker.
//!
//! This module is the read-ahead queue and the pool job around a [`Produce`]r; the file and
//! device source itself (open, extents, zero detection, reads) is `work`, which the iohelper
//! drives as [`ReadCore`].

pub(crate) mod cut;
mod work;

pub use work::ReadCore;
use work::Work;

use crate::budget;
use crate::error::Error;
use crate::fd::Location;
use crate::pool::{Job, JobHandle, Pool, Step, WeakJobHandle};
use engine::{Chunk, Notify, RangeSet, VolumeError, VolumeIdentity, VolumeReader};
use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;

/// Bytes read per worker run; offsets of reads are multiples of it (so O_DIRECT fits later).
pub(crate) const READ_BUF: u64 = 1 << 20;
/// Read-ahead bound: the worker pauses when this much data is queued for the loop...
const AHEAD_BYTES: u64 = 4 << 20;
/// ...or this many chunks (holes are small in memory but not free).
const AHEAD_CHUNKS: usize = 64;
/// Read-ahead of all readers of the process together. Past it a reader that still has
/// something queued waits, and reads shrink to `SMALL_READ`: hundreds of streams then cost
/// about this much plus one small read each, instead of `AHEAD_BYTES` each.
const GLOBAL_AHEAD: u64 = 64 << 20;
const SMALL_READ: u64 = 128 << 10;

/// Data bytes queued by every reader of the process.
static AHEAD_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Data bytes read ahead and not yet taken by the loop, over every reader of the process.
pub fn read_ahead_bytes() -> u64 {
    AHEAD_TOTAL.load(Ordering::Relaxed)
}

/// Bytes to read in one run: smaller while the process holds a lot of read-ahead.
pub(crate) fn read_unit() -> u64 {
    if AHEAD_TOTAL.load(Ordering::Relaxed) > GLOBAL_AHEAD / 2 {
        SMALL_READ
    } else {
        READ_BUF
    }
}

/// How to read a volume.
#[derive(Clone)]
pub struct ReaderOptions {
    /// Zero-detection block size in bytes (`-S`); 0 turns zero detection off.
    pub zero_granularity: u32,
    /// Ignore the file's extent map and read everything (NO_EXTENTS).
    pub no_extents: bool,
    /// The length of a pipe or FIFO, which cannot be asked.
    pub stream_size: Option<u64>,
    /// Read with O_DIRECT (aligned buffers, page cache untouched). Where the file system
    /// refuses it, reading falls back to buffered I/O with a logged warning.
    pub direct: bool,
    /// Read a block device that is mounted or claimed by another program (FORCE_SHARE, as
    /// qemu-img's `-U`); without it such a source is refused, since it may change while it is
    /// copied.
    pub force_share: bool,
    /// For a qcow2 overlay: only its own clusters are data (TOP_ONLY).
    pub top_only: bool,
    /// Read only these ranges (a ranged READ, `OpenRequest::ranges`): the reader seeks to
    /// each, yields exactly their content and digests only it (`serves_ranges`).
    pub ranges: Option<Arc<RangeSet>>,
    /// Workers to use; the process-wide pool when `None`.
    pub pool: Option<Arc<Pool>>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            zero_granularity: 4096,
            no_extents: false,
            stream_size: None,
            direct: false,
            force_share: false,
            top_only: false,
            ranges: None,
            pool: None,
        }
    }
}

#[derive(Default)]
struct Out {
    size: Option<Result<u64, VolumeError>>,
    identity: Option<VolumeIdentity>,
    queue: VecDeque<Chunk>,
    queued_bytes: u64,
    error: Option<VolumeError>,
    /// `Chunk::End` was queued: the worker has nothing more to do.
    ended: bool,
    cancelled: bool,
}

impl Out {
    fn full(&self) -> bool {
        self.queued_bytes >= AHEAD_BYTES
            || self.queue.len() >= AHEAD_CHUNKS
            || (self.queued_bytes > 0 && AHEAD_TOTAL.load(Ordering::Relaxed) >= GLOBAL_AHEAD)
    }

    fn queued(&mut self, bytes: u64) {
        self.queued_bytes += bytes;
        AHEAD_TOTAL.fetch_add(bytes, Ordering::Relaxed);
    }

    fn taken(&mut self, bytes: u64) {
        self.queued_bytes -= bytes;
        AHEAD_TOTAL.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The synchronous work behind a [`FileReader`]: each `step` opens the volume or produces the
/// next chunks. Files and devices are one kind; NBD exports ([`crate::nbd`]) another.
pub(crate) trait Produce: Send {
    fn step(&mut self) -> Result<Produced, Error>;
    /// Whether the volume's fd or connection is open (it holds a slot of the open-volume
    /// budget then).
    fn is_open(&self) -> bool;
    /// Calls the volume `shown` in messages (before the first step).
    fn rename(&mut self, _shown: String) {}
    /// Yields only the ranges of its options (see `VolumeReader::serves_ranges`).
    fn serves_ranges(&self) -> bool {
        false
    }
    /// Drops the volume's fd or connection (the stream ended or was cancelled).
    fn close(&mut self);
}

/// A volume source read off the loop thread. See the module docs.
pub struct FileReader {
    producer: Option<Box<dyn Produce>>,
    options: ReaderOptions,
    out: Arc<Mutex<Out>>,
    job: Option<JobHandle>,
    bytes_read: Arc<AtomicU64>,
}

impl FileReader {
    /// Reads the file, device or FIFO at `path` (opened by a worker at `start`).
    pub fn open(path: impl Into<PathBuf>, options: ReaderOptions) -> Self {
        Self::new(Location::Path(path.into()), options)
    }

    /// Reads an already open file.
    pub fn from_file(file: File, options: ReaderOptions) -> Self {
        Self::new(Location::Open(file), options)
    }

    /// Reads the volume at `location` (any of the above, or a plain name inside a directory
    /// held open: no symlinks, nothing outside it).
    pub fn new(location: Location, options: ReaderOptions) -> Self {
        let bytes_read = Arc::default();
        let work = Work::new(location, &options, Arc::clone(&bytes_read));
        FileReader {
            producer: Some(Box::new(work)),
            options,
            out: Arc::default(),
            job: None,
            bytes_read,
        }
    }

    /// A reader whose chunks come from `producer`, with the queueing, read-ahead bounds and
    /// cancellation of file readers.
    pub(crate) fn with_producer(producer: Box<dyn Produce>, options: ReaderOptions) -> Self {
        FileReader {
            producer: Some(producer),
            options,
            out: Arc::default(),
            job: None,
            bytes_read: Arc::default(),
        }
    }

    /// Calls the volume `shown` in messages instead of by its path.
    pub fn named(mut self, shown: impl Into<String>) -> Self {
        if let Some(p) = &mut self.producer {
            p.rename(shown.into());
        }
        self
    }

    /// Bytes read from the volume's fd so far (each byte should be read once).
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes_read)
    }
}

impl VolumeReader for FileReader {
    fn start(&mut self, notify: Notify) {
        let Some(producer) = self.producer.take() else {
            return;
        };
        let pool = self.options.pool.clone().unwrap_or_else(Pool::shared);
        let me = Arc::new(OnceLock::new());
        let job = pool.register(ReadJob {
            out: Arc::clone(&self.out),
            notify,
            work: Mutex::new(producer),
            slot: Mutex::default(),
            me: Arc::clone(&me),
        });
        let _ = me.set(job.downgrade());
        job.schedule();
        self.job = Some(job);
    }

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        let out = self.out.lock().unwrap();
        match (&out.size, &out.error) {
            (Some(size), _) => Poll::Ready(size.clone()),
            (None, Some(e)) => Poll::Ready(Err(e.clone())),
            (None, None) => Poll::Pending,
        }
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let mut out = self.out.lock().unwrap();
        let Some(chunk) = out.queue.pop_front() else {
            return match &out.error {
                Some(e) => Poll::Ready(Err(e.clone())),
                None => Poll::Pending,
            };
        };
        if let Chunk::Data { bytes, .. } = &chunk {
            out.taken(bytes.len() as u64);
        }
        let resume = !out.ended && !out.full() && out.error.is_none();
        drop(out);
        if resume {
            if let Some(job) = &self.job {
                job.schedule();
            }
        }
        Poll::Ready(Ok(chunk))
    }

    fn poll_failure(&mut self) -> Option<VolumeError> {
        self.out.lock().unwrap().error.clone()
    }

    fn serves_ranges(&self) -> bool {
        self.producer.as_ref().is_some_and(|p| p.serves_ranges())
    }

    fn identity(&self) -> Option<VolumeIdentity> {
        self.out.lock().unwrap().identity.clone()
    }

    fn cancel(&mut self) {
        let mut out = self.out.lock().unwrap();
        out.cancelled = true;
        out.queue.clear();
        let held = out.queued_bytes;
        out.taken(held);
        drop(out);
        // The job closes the fd on its next run.
        if let Some(job) = &self.job {
            job.schedule();
        }
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        self.cancel();
    }
}

struct ReadJob {
    out: Arc<Mutex<Out>>,
    notify: Notify,
    work: Mutex<Box<dyn Produce>>,
    /// The volume's place in the process's open-volume budget, held while its file is open.
    slot: Mutex<budget::Slot>,
    /// This job, for the budget to wake when it hands over a slot.
    me: Arc<OnceLock<WeakJobHandle>>,
}

impl ReadJob {
    /// Closes the volume and gives its slot back.
    fn close(&self) {
        self.work.lock().unwrap().close();
        self.slot.lock().unwrap().release();
    }
}

/// What one step produced.
#[derive(Debug, Default)]
pub struct Produced {
    /// Set by the first step, which opens the volume.
    pub size: Option<u64>,
    /// Set by the first step where the volume has one ([`crate::identity`]).
    pub identity: Option<VolumeIdentity>,
    pub chunks: Vec<Chunk>,
    /// `Chunk::End` is the last of `chunks`: nothing more will come.
    pub end: bool,
}

impl Job for ReadJob {
    fn run(&self) -> Step {
        {
            let out = self.out.lock().unwrap();
            if out.cancelled || out.error.is_some() || out.ended {
                drop(out);
                self.close();
                return Step::Idle;
            }
            if out.full() {
                return Step::Idle;
            }
        }
        let mut w = self.work.lock().unwrap();
        if !w.is_open() {
            // Not open yet: a slot first, or wait in line for one (the budget wakes this job).
            let me = self.me.get().expect("set when registered");
            if !self.slot.lock().unwrap().try_hold(me) {
                return Step::Idle;
            }
        }
        let result = w.step();
        drop(w);
        let mut out = self.out.lock().unwrap();
        if out.cancelled {
            return Step::Again;
        }
        let done = !matches!(&result, Ok(p) if !p.end);
        let step = match result {
            Ok(p) => {
                if let Some(size) = p.size {
                    out.size = Some(Ok(size));
                    out.identity = p.identity;
                }
                for chunk in p.chunks {
                    if let Chunk::Data { bytes, .. } = &chunk {
                        out.queued(bytes.len() as u64);
                    }
                    out.queue.push_back(chunk);
                }
                out.ended = p.end;
                if p.end || out.full() {
                    Step::Idle
                } else {
                    Step::Again
                }
            }
            Err(e) => {
                log::debug!("reading failed: {e}");
                let e = VolumeError::from(e);
                if out.size.is_none() {
                    out.size = Some(Err(e.clone()));
                }
                out.error = Some(e);
                Step::Idle
            }
        };
        drop(out);
        if done {
            // Read to the end, or failed: the fd is of no more use, the slot is someone's.
            self.close();
        }
        self.notify.notify();
        step
    }
}
