//! Progress of running transfers: counting wrappers around sources and sinks, and bars drawn
//! by a thread that samples the counters (never the event loop).

use engine::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// Logical bytes (data and holes) a transfer has moved, and its size once known.
#[derive(Default)]
pub struct Progress {
    done: AtomicU64,
    size: AtomicU64,
}

pub type Counter = Arc<Progress>;

fn logical(chunk: &Chunk) -> u64 {
    chunk.logical_len()
}

/// Counts what a source yields.
pub struct CountingReader<R> {
    pub inner: R,
    pub count: Counter,
}

impl<R: VolumeReader> VolumeReader for CountingReader<R> {
    fn start(&mut self, notify: Notify) {
        self.inner.start(notify)
    }
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        let polled = self.inner.poll_size();
        if let Poll::Ready(Ok(size)) = &polled {
            self.count.size.store(*size, Ordering::Relaxed);
        }
        polled
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let polled = self.inner.poll_chunk();
        if let Poll::Ready(Ok(chunk)) = &polled {
            self.count.done.fetch_add(logical(chunk), Ordering::Relaxed);
        }
        polled
    }
    fn poll_failure(&mut self) -> Option<VolumeError> {
        self.inner.poll_failure()
    }
    fn cancel(&mut self) {
        self.inner.cancel()
    }
}

/// Counts what a sink is given.
pub struct CountingWriter<W> {
    pub inner: W,
    pub count: Counter,
}

impl<W: VolumeWriter> VolumeWriter for CountingWriter<W> {
    fn start(&mut self, size: u64, notify: Notify) {
        self.count.size.store(size, Ordering::Relaxed);
        self.inner.start(size, notify)
    }
    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        self.inner.poll_ready()
    }
    fn write(&mut self, chunk: Chunk) {
        self.count
            .done
            .fetch_add(logical(&chunk), Ordering::Relaxed);
        self.inner.write(chunk)
    }
    fn poll_progress(&mut self) -> WriteProgress {
        self.inner.poll_progress()
    }
    fn cancel(&mut self) {
        self.inner.cancel()
    }
}

/// Bars per transfer and one in total, redrawn every 100 ms until dropped.
pub struct Bars {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bars {
    /// `transfers`: (label, counter, expected size if known up front).
    pub fn start(transfers: Vec<(String, Counter, Option<u64>)>) -> Bars {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let multi = MultiProgress::new();
            let style = ProgressStyle::with_template(
                "{prefix:>24} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let bars: Vec<ProgressBar> = transfers
                .iter()
                .map(|(label, _, size)| {
                    let bar = multi.add(ProgressBar::new(size.unwrap_or(0)));
                    bar.set_style(style.clone());
                    bar.set_prefix(label.clone());
                    bar
                })
                .collect();
            let total = multi.add(ProgressBar::new(0));
            total.set_style(style.clone());
            total.set_prefix("total");
            loop {
                let mut sum = 0;
                let mut sum_len = 0;
                for ((_, count, known), bar) in transfers.iter().zip(&bars) {
                    let len = known.unwrap_or_else(|| count.size.load(Ordering::Relaxed));
                    let done = count.done.load(Ordering::Relaxed);
                    bar.set_length(len.max(done));
                    bar.set_position(done);
                    sum += done;
                    sum_len += len.max(done);
                }
                total.set_length(sum_len);
                total.set_position(sum);
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            for bar in bars {
                bar.finish();
            }
            total.finish();
        });
        Bars {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
