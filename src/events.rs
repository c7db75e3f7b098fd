//! `--json` on download and upload: each transfer's events as JSON lines, for scripts.
//!
//! Every transfer has one `started` (once the connection is up and the transfer is asked
//! for), `progress` lines while bytes move (at most one per interval, only when its count
//! changed), and one `finished` or `failed`. Lines are printed under one lock, which keeps a
//! transfer's events in that order although they come from two threads: the sampler's ticks
//! and the main thread's reports. The sampler reads the same counters as the bars, never the
//! event loop. Where the lines go is `out`'s rule: stdout, or stderr while stdout carries data.

use crate::out::{json, say};
use crate::progress::Counter;
use engine::{Reason, TransferReport};
use serde::Serialize;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What every event names: which transfer it is about.
#[derive(Serialize)]
struct Head<'a> {
    event: &'static str,
    index: usize,
    op: &'a str,
    volume: &'a str,
    file: &'a str,
}

#[derive(Serialize)]
struct Progress<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    /// Logical bytes (data and holes) handed to the sink or taken from the source.
    bytes: u64,
    /// The volume's length, once known.
    size: Option<u64>,
    /// Since the transfers were asked for.
    seconds: f64,
}

#[derive(Serialize)]
struct Ended<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    ok: bool,
    size: u64,
    data_bytes: u64,
    hole_bytes: u64,
    wire_bytes: u64,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_seconds: Option<f64>,
    /// docs/PROTOCOL.md's name of the reason (`NOT_FOUND`), `OTHER` for a code it lacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u32>,
    /// The one line the text output shows.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// `--update`: what the block digests found and cost (their wire bytes are not in
    /// `wire_bytes`, which counts the content).
    #[serde(skip_serializing_if = "Option::is_none")]
    update: Option<&'a crate::update::Figures>,
    /// A download through a partial: whether one was resumed, what it held, what was read
    /// (`wire_bytes` counts only that) and the block digests that checked the whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    resume: Option<&'a crate::resume::Figures>,
}

/// One transfer as the events see it.
pub struct Transfer {
    pub op: &'static str,
    pub volume: String,
    pub file: String,
    pub count: Counter,
    pub update: Option<crate::update::Figures>,
    pub resume: Option<crate::resume::Figures>,
}

struct Entry {
    transfer: Transfer,
    /// The byte count of the last progress line.
    reported: u64,
    ended: bool,
}

impl Entry {
    fn head(&self, event: &'static str, index: usize) -> Head<'_> {
        Head {
            event,
            index,
            op: self.transfer.op,
            volume: &self.transfer.volume,
            file: &self.transfer.file,
        }
    }
}

struct State {
    entries: Vec<Entry>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    tick: Condvar,
}

/// The events of a run's transfers; dropping it stops the sampler.
pub struct Events {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Events {
    /// Prints `started` for every transfer and samples their progress every `interval`.
    pub fn start(transfers: Vec<Transfer>, interval: Duration) -> Events {
        let started = Instant::now();
        let entries: Vec<Entry> = transfers
            .into_iter()
            .map(|transfer| Entry {
                transfer,
                reported: 0,
                ended: false,
            })
            .collect();
        for (index, entry) in entries.iter().enumerate() {
            say!("{}", json(&entry.head("started", index)));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                entries,
                stop: false,
            }),
            tick: Condvar::new(),
        });
        let sampler = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("volstream-events".into())
            .spawn(move || sample(&sampler, interval, started))
            .ok();
        Events { shared, thread }
    }

    /// Transfer `index` ended: prints its `finished` or `failed`.
    pub fn ended(&self, index: usize, report: &TransferReport) {
        let failure = report
            .result
            .as_ref()
            .err()
            .map(|e| (e.reason, e.to_string()));
        self.end(index, Some(report), failure);
    }

    /// Transfer `index` was dropped before the engine had it: `failed`, as CANCELLED.
    pub fn not_run(&self, index: usize, why: &str) {
        self.end(index, None, Some((Reason::Cancelled, why.to_owned())));
    }

    /// Prints how transfer `index` ended, with the numbers of its report if it has one.
    fn end(
        &self,
        index: usize,
        report: Option<&TransferReport>,
        failure: Option<(Reason, String)>,
    ) {
        let mut state = self.shared.state.lock().unwrap();
        let Some(entry) = state.entries.get_mut(index).filter(|e| !e.ended) else {
            return;
        };
        entry.ended = true;
        let (event, reason, code, error) = match failure {
            None => ("finished", None, None, None),
            Some((reason, message)) => (
                "failed",
                Some(reason.name().unwrap_or("OTHER")),
                Some(reason.code()),
                Some(message),
            ),
        };
        let stats = report.map(|r| r.stats).unwrap_or_default();
        let line = Ended {
            head: entry.head(event, index),
            ok: event == "finished",
            size: report.map_or(0, |r| r.size),
            data_bytes: stats.data_bytes,
            hole_bytes: stats.hole_bytes,
            wire_bytes: stats.wire_bytes,
            seconds: report.map_or(0.0, |r| r.elapsed.as_secs_f64()),
            first_byte_seconds: report.and_then(|r| r.first_byte).map(|d| d.as_secs_f64()),
            reason,
            code,
            error,
            update: entry.transfer.update.as_ref(),
            resume: entry.transfer.resume.as_ref(),
        };
        say!("{}", json(&line));
    }
}

fn sample(shared: &Shared, interval: Duration, started: Instant) {
    let mut state = shared.state.lock().unwrap();
    loop {
        let (next, _) = shared.tick.wait_timeout(state, interval).unwrap();
        state = next;
        if state.stop {
            return;
        }
        let seconds = started.elapsed().as_secs_f64();
        for (index, entry) in state.entries.iter_mut().enumerate() {
            let bytes = entry.transfer.count.done();
            if entry.ended || bytes == entry.reported {
                continue;
            }
            entry.reported = bytes;
            let line = Progress {
                head: entry.head("progress", index),
                bytes,
                size: entry.transfer.count.size(),
                seconds,
            };
            say!("{}", json(&line));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        self.shared.tick.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
