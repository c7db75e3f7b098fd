//! [`copy`]: one volume into another on this host, without a connection: the reader's chunks
//! go straight to the writer, a bounded number at a time (the writer's completions are the
//! credit). Used where both ends are local, such as an NBD export into a file.
//!
//! The calling thread only waits; the reading and writing happen where the reader and writer
//! do them (pool workers).

use engine::Reason;
use engine::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Chunks handed to the writer and not yet completed.
const WINDOW_CHUNKS: u64 = 64;
/// Data bytes handed to the writer and not yet completed.
const WINDOW_BYTES: u64 = 16 << 20;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub size: u64,
    pub data_bytes: u64,
    pub hole_bytes: u64,
    pub elapsed: Duration,
}

#[derive(Default)]
struct Signal {
    fired: Mutex<bool>,
    cond: Condvar,
}

impl Signal {
    fn wait(&self, timeout: Duration) {
        let mut fired = self.fired.lock().unwrap();
        if !*fired {
            fired = self.cond.wait_timeout(fired, timeout).unwrap().0;
        }
        *fired = false;
    }
}

/// Copies `reader` into `writer`; the writer verifies the reader's digest before it reports
/// success. On failure both are cancelled (nothing appears under a new file's name).
pub fn copy(
    reader: Box<dyn VolumeReader>,
    writer: Box<dyn VolumeWriter>,
) -> Result<CopyStats, VolumeError> {
    copy_until(reader, writer, &AtomicBool::new(false))
}

/// [`copy`], cancelled (as a failure, [`Reason::Cancelled`]) once `stop` is set: how a signal
/// stops a local copy with its temporary removed. Looked at every wait, so within a tick.
pub fn copy_until(
    mut reader: Box<dyn VolumeReader>,
    mut writer: Box<dyn VolumeWriter>,
    stop: &AtomicBool,
) -> Result<CopyStats, VolumeError> {
    let stopped = || VolumeError::new(Reason::Cancelled, "interrupted");
    let started = Instant::now();
    let signal = Arc::new(Signal::default());
    let s = Arc::clone(&signal);
    let notify = Notify::new(move || {
        *s.fired.lock().unwrap() = true;
        s.cond.notify_all();
    });
    // The wait is only a fallback: every change is notified.
    let tick = Duration::from_millis(200);
    reader.start(notify.clone());
    let size = loop {
        match reader.poll_size() {
            Poll::Ready(Ok(size)) => break size,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending if stop.load(Ordering::SeqCst) => {
                reader.cancel();
                return Err(stopped());
            }
            Poll::Pending => signal.wait(tick),
        }
    };
    writer.start(size, notify);
    loop {
        match writer.poll_ready() {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(e)) => {
                reader.cancel();
                return Err(e);
            }
            Poll::Pending if stop.load(Ordering::SeqCst) => {
                reader.cancel();
                writer.cancel();
                return Err(stopped());
            }
            Poll::Pending => signal.wait(tick),
        }
    }
    let mut stats = CopyStats {
        size,
        ..CopyStats::default()
    };
    // Sizes of the data chunks given and not completed, in order.
    let mut given: std::collections::VecDeque<u64> = Default::default();
    let (mut completed, mut given_count, mut ended) = (0u64, 0u64, false);
    let mut held_bytes = 0u64;
    let fail = |reader: &mut Box<dyn VolumeReader>, writer: &mut Box<dyn VolumeWriter>, e| {
        reader.cancel();
        writer.cancel();
        Err(e)
    };
    loop {
        let progress = writer.poll_progress();
        while completed < progress.completed {
            held_bytes -= given.pop_front().unwrap_or(0);
            completed += 1;
        }
        match progress.outcome {
            Some(Ok(())) => {
                stats.elapsed = started.elapsed();
                return Ok(stats);
            }
            Some(Err(e)) => return fail(&mut reader, &mut writer, e),
            None if stop.load(Ordering::SeqCst) => {
                return fail(&mut reader, &mut writer, stopped())
            }
            None => {}
        }
        let mut moved = false;
        while !ended && given_count - completed < WINDOW_CHUNKS && held_bytes < WINDOW_BYTES {
            match reader.poll_chunk() {
                Poll::Ready(Ok(chunk)) => {
                    let bytes = match &chunk {
                        Chunk::Data { bytes, .. } => {
                            stats.data_bytes += bytes.len() as u64;
                            bytes.len() as u64
                        }
                        Chunk::Hole { len, .. } => {
                            stats.hole_bytes += len;
                            0
                        }
                        Chunk::End { .. } => {
                            ended = true;
                            0
                        }
                    };
                    given.push_back(bytes);
                    held_bytes += bytes;
                    given_count += 1;
                    writer.write(chunk);
                    moved = true;
                }
                Poll::Ready(Err(e)) => return fail(&mut reader, &mut writer, e),
                Poll::Pending => break,
            }
        }
        if !moved {
            signal.wait(tick);
        }
    }
}
