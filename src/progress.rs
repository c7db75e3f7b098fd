//! Progress of running transfers: counting wrappers around sources and sinks, and bars drawn
//! by a thread that samples the counters (never the event loop).

use engine::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

/// Logical bytes (data and holes) a transfer has moved, and its size once known.
#[derive(Default)]
pub struct Progress {
    done: AtomicU64,
    size: AtomicU64,
    /// `size` is the volume's (0 is a size too).
    sized: AtomicBool,
}

impl Progress {
    fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
        self.sized.store(true, Ordering::Release);
    }

    /// Logical bytes moved so far.
    /// Counts bytes that were there before the transfer (a resumed download's partial).
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> Option<u64> {
        self.sized
            .load(Ordering::Acquire)
            .then(|| self.size.load(Ordering::Relaxed))
    }
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
            self.count.set_size(*size);
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
    fn serves_ranges(&self) -> bool {
        self.inner.serves_ranges()
    }
    fn identity(&self) -> Option<engine::VolumeIdentity> {
        self.inner.identity()
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
        self.count.set_size(size);
        self.inner.start(size, notify)
    }
    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        self.inner.poll_ready()
    }
    fn source_identity(&mut self, identity: Option<engine::VolumeIdentity>) {
        self.inner.source_identity(identity)
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

/// How a transfer ended, as its bar shows it.
#[derive(Clone, Copy)]
enum End {
    Done(Duration),
    Failed,
}

/// Bars per transfer and one in total on stderr, redrawn every 100 ms until dropped.
pub struct Bars {
    stop: Arc<AtomicBool>,
    ends: Arc<Mutex<Vec<Option<End>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One bar's line, laid out for the terminal's width so that it never wraps: a wrapped line
/// is one indicatif cannot move back over, and the redraws pile up.
struct Layout {
    label: usize,
    rate: bool,
    bar: bool,
}

impl Layout {
    fn for_width(width: usize) -> Layout {
        // bytes "1023.99 MiB/1023.99 MiB" take 23 columns, a rate "1023.99 MiB/s" 13.
        Layout {
            label: (width / 4).clamp(6, 24),
            rate: width >= 72,
            bar: width >= 48,
        }
    }

    fn style(&self, state: &str) -> ProgressStyle {
        let label = self.label;
        let bar = if self.bar { " [{wide_bar}]" } else { "" };
        let tail = match state {
            "waiting" => return plain(&format!("{{prefix:>{label}}} waiting")),
            // Failed before its size was known: there is no bar to show.
            "refused" => return plain(&format!("{{prefix:>{label}}} failed")),
            "running" if self.rate => " {binary_bytes_per_sec:>13}",
            "running" => "",
            // The message: "done 1.2s" or "failed", in place of a rate that would decay.
            _ => " {msg}",
        };
        let bytes = if state == "done" {
            "{total_bytes:>11}"
        } else {
            "{bytes:>11}/{total_bytes:<11}"
        };
        plain(&format!("{{prefix:>{label}}}{bar} {bytes}{tail}"))
    }

    /// A label that fits: long names lose their middle, where they differ least.
    fn label(&self, text: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        if chars.len() <= self.label {
            return text.to_owned();
        }
        let keep = self.label.saturating_sub(1);
        let head = keep / 2;
        let tail = keep - head;
        let mut out: String = chars[..head].iter().collect();
        out.push('~');
        out.extend(&chars[chars.len() - tail..]);
        out
    }
}

fn plain(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

fn width() -> usize {
    console::Term::stderr()
        .size_checked()
        .map_or(80, |(_, cols)| cols as usize)
}

impl Bars {
    /// `transfers`: (label, counter, expected size if known up front).
    pub fn start(transfers: Vec<(String, Counter, Option<u64>)>) -> Bars {
        let stop = Arc::new(AtomicBool::new(false));
        let ends = Arc::new(Mutex::new(vec![None; transfers.len()]));
        let (flag, ended) = (Arc::clone(&stop), Arc::clone(&ends));
        let thread = std::thread::spawn(move || draw(transfers, &flag, &ended));
        Bars {
            stop,
            ends,
            thread: Some(thread),
        }
    }

    /// Transfer `index` ended; `elapsed` is its own time.
    pub fn finished(&self, index: usize, ok: bool, elapsed: Duration) {
        self.ends.lock().unwrap()[index] = Some(if ok { End::Done(elapsed) } else { End::Failed });
    }
}

fn draw(
    transfers: Vec<(String, Counter, Option<u64>)>,
    stop: &AtomicBool,
    ends: &Mutex<Vec<Option<End>>>,
) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let mut layout = Layout::for_width(width());
    let mut columns = width();
    let bars: Vec<ProgressBar> = transfers
        .iter()
        .map(|(label, _, _)| {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(layout.style("waiting"));
            bar.set_prefix(layout.label(label));
            bar
        })
        .collect();
    let total = multi.add(ProgressBar::new(0));
    total.set_style(layout.style("waiting"));
    total.set_prefix("total");
    let mut shown: Vec<Option<&str>> = vec![None; bars.len() + 1];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let now = width();
        if now != columns {
            columns = now;
            layout = Layout::for_width(now);
            shown.iter_mut().for_each(|s| *s = None);
            for ((label, _, _), bar) in transfers.iter().zip(&bars) {
                bar.set_prefix(layout.label(label));
            }
        }
        let ends = ends.lock().unwrap().clone();
        let (mut sum, mut sum_len, mut sized, mut failed) = (0, 0, 0, 0);
        for (i, ((_, count, known), bar)) in transfers.iter().zip(&bars).enumerate() {
            let done = count.done.load(Ordering::Relaxed);
            let len = known.or_else(|| count.size());
            let state = match (ends[i], len) {
                (Some(End::Failed), None) => "refused",
                (Some(End::Failed), Some(_)) => "failed",
                (Some(End::Done(_)), _) => "done",
                (None, Some(_)) => "running",
                (None, None) => "waiting",
            };
            if let Some(len) = len {
                sized += 1;
                bar.set_length(len.max(done));
                sum_len += len.max(done);
            }
            bar.set_position(done);
            sum += done;
            if shown[i] != Some(state) {
                shown[i] = Some(state);
                bar.set_style(layout.style(state));
                match ends[i] {
                    Some(End::Done(t)) => {
                        bar.finish_with_message(format!("done {:.1}s", t.as_secs_f64()))
                    }
                    // Where it stopped, never drawn full.
                    Some(End::Failed) => {
                        failed += 1;
                        bar.abandon_with_message("failed")
                    }
                    None => {}
                }
            } else if matches!(ends[i], Some(End::Failed)) {
                failed += 1;
            }
        }
        let total_state = if sized == 0 {
            "waiting"
        } else if stopping && failed > 0 {
            "failed"
        } else if stopping {
            "done"
        } else {
            "running"
        };
        total.set_length(sum_len.max(sum));
        total.set_position(sum);
        if shown[bars.len()] != Some(total_state) {
            shown[bars.len()] = Some(total_state);
            total.set_style(layout.style(total_state));
        }
        if stopping {
            match total_state {
                "failed" => total.abandon_with_message(format!("{failed} failed")),
                "done" => {
                    total.finish_with_message(format!("done {:.1}s", total.elapsed().as_secs_f64()))
                }
                _ => total.abandon(),
            }
            // A bar whose transfer never ended (the loop died) stays where it was.
            for bar in bars.iter().filter(|b| !b.is_finished()) {
                bar.abandon();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
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
