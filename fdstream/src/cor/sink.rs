//! The background download of a copy-on-read destination: a sink that stores each chunk where
//! nobody owns its bytes yet, on its own thread (the engine's `write` must not block), at an
//! optional pace.
//!
//! Pacing holds back completions, so the credit the server needs for more of the background
//! stream comes back at that rate: the background stream leaves the rest of the link to the
//! clients' urgent fetches, whose streams have their own credit.

use super::Cache;
use engine::{Chunk, Digest, Notify, Reason, VolumeError, VolumeWriter, WriteProgress};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Progress {
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
}

pub struct BackgroundSink {
    cache: Arc<Cache>,
    /// Data bytes per second at most; `None` for as fast as it comes.
    rate: Option<u64>,
    chunks: Option<mpsc::Sender<Chunk>>,
    progress: Arc<Mutex<Progress>>,
}

impl BackgroundSink {
    pub fn new(cache: Arc<Cache>, rate: Option<u64>) -> BackgroundSink {
        BackgroundSink {
            cache,
            rate,
            chunks: None,
            progress: Arc::default(),
        }
    }
}

impl VolumeWriter for BackgroundSink {
    fn start(&mut self, size: u64, notify: Notify) {
        let (tx, rx) = mpsc::channel::<Chunk>();
        self.chunks = Some(tx);
        let (cache, rate, progress) = (
            Arc::clone(&self.cache),
            self.rate,
            Arc::clone(&self.progress),
        );
        if size != cache.size() {
            progress.lock().unwrap().outcome = Some(Err(VolumeError::new(
                Reason::Protocol,
                format!(
                    "the volume is {size} bytes now, {} when it was looked up",
                    cache.size()
                ),
            )));
            return notify.notify();
        }
        let spawned = std::thread::Builder::new()
            .name("cor-background".into())
            .spawn(move || store(&cache, rate, rx, &progress, &notify));
        if let Err(e) = spawned {
            self.progress.lock().unwrap().outcome = Some(Err(VolumeError::new(
                Reason::Io,
                format!("cannot start the background writer: {e}"),
            )));
        }
    }

    fn write(&mut self, chunk: Chunk) {
        if let Some(tx) = &self.chunks {
            let _ = tx.send(chunk);
        }
    }

    fn poll_progress(&mut self) -> WriteProgress {
        let p = self.progress.lock().unwrap();
        WriteProgress {
            completed: p.completed,
            outcome: p.outcome.clone(),
        }
    }
}

fn store(
    cache: &Cache,
    rate: Option<u64>,
    chunks: mpsc::Receiver<Chunk>,
    progress: &Mutex<Progress>,
    notify: &Notify,
) {
    let started = Instant::now();
    let mut paced = 0u64;
    let mut digest = Digest::new();
    for chunk in chunks {
        let outcome = match &chunk {
            Chunk::End { digest: theirs, .. } => {
                let ours = digest.value();
                Some(match theirs {
                    Some(d) if *d != ours => Err(VolumeError::new(
                        Reason::DigestMismatch,
                        format!("content digest {ours:#010x}, sender says {d:#010x}"),
                    )),
                    _ => cache
                        .file()
                        .sync_data()
                        .map_err(|e| VolumeError::new(Reason::Io, format!("syncing: {e}"))),
                })
            }
            _ => {
                if let (Some(rate), Chunk::Data { bytes, .. }) = (rate, &chunk) {
                    paced += bytes.len() as u64;
                    let due = Duration::from_secs_f64(paced as f64 / rate.max(1) as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                match &chunk {
                    Chunk::Data { bytes, .. } => digest.update(bytes),
                    Chunk::Hole { len, .. } => digest.update_zeroes(*len),
                    Chunk::End { .. } => {}
                }
                match cache.arrive(&chunk) {
                    Ok(n) => {
                        cache.stats.background_bytes.fetch_add(n, Ordering::Relaxed);
                        None
                    }
                    Err(why) => Some(Err(VolumeError::new(Reason::Io, why))),
                }
            }
        };
        {
            let mut p = progress.lock().unwrap();
            p.completed += 1;
            if p.outcome.is_none() {
                p.outcome = outcome;
            }
        }
        notify.notify();
    }
}
