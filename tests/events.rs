//! `download --json`: the events of real transfers, parsed as JSON lines while they run. A
//! download into a FIFO the test holds cannot finish until the test reads it, so its progress
//! is seen mid-way without any timing; a missing volume and a server killed mid-transfer are
//! failures with their reasons.

mod common;

use common::{bin, kill, read_all, sparse_file, Server, TempDir, MIB};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

const SIZE: u64 = 16 * MIB;
/// Each volume: data at the start and in the middle, holes elsewhere.
const DATA: [(u64, u64); 2] = [(0, 2 * MIB), (8 * MIB, 4 * MIB)];

/// A download running with `--json`, its stdout read line by line as JSON.
struct Run {
    child: Child,
    lines: Receiver<Value>,
    seen: Vec<Value>,
}

impl Run {
    fn start(listen: &str, pairs: &[(&str, &Path)]) -> Run {
        let mut cmd = bin();
        cmd.args(["download", "--json", "--progress-interval", "0.02"]);
        cmd.args(["--connect", listen]);
        for (volume, file) in pairs {
            cmd.arg(volume).arg(file);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let line = line.unwrap();
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Run {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first event, seen already or read now, that satisfies `want`. Events of different
    /// transfers interleave in any order, so an earlier wait may have read past this one.
    fn until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(event) = self.seen.iter().find(|e| want(e)) {
            return event.clone();
        }
        loop {
            let event = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {what} in {:#?}", self.seen));
            self.seen.push(event.clone());
            if want(&event) {
                return event;
            }
        }
    }

    /// The rest of the events and the exit code.
    fn finish(mut self) -> (Vec<Value>, Option<i32>) {
        let status = self.child.wait().unwrap();
        let rest: Vec<Value> = self.lines.iter().collect();
        self.seen.extend(rest);
        (std::mem::take(&mut self.seen), status.code())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is(event: &Value, name: &str, index: u64) -> bool {
    event["event"] == name && event["index"] == index
}

/// A FIFO with its read end open and unread: a download into it stalls once the pipe is full.
fn held_fifo(path: &Path) -> File {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

/// Reads the FIFO to its end (the writer closing it).
fn drain(fifo: File) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on an fd we own, clearing O_NONBLOCK.
    unsafe { libc::fcntl(fifo.as_raw_fd(), libc::F_SETFL, 0) };
    let mut content = Vec::new();
    let mut fifo = fifo;
    fifo.read_to_end(&mut content).unwrap();
    content
}

/// What every run's events must be: per transfer one `started` first, `progress` with a byte
/// count that never goes back nor past the size, one `finished` or `failed` last.
fn check_order(events: &[Value], transfers: u64) -> BTreeMap<u64, Value> {
    let mut ends = BTreeMap::new();
    for index in 0..transfers {
        let mine: Vec<&Value> = events.iter().filter(|e| e["index"] == index).collect();
        assert!(mine.len() >= 2, "{mine:#?}");
        assert_eq!(mine[0]["event"], "started", "{mine:#?}");
        let last = mine[mine.len() - 1];
        assert!(
            last["event"] == "finished" || last["event"] == "failed",
            "{mine:#?}"
        );
        let mut bytes = 0;
        for p in &mine[1..mine.len() - 1] {
            assert_eq!(p["event"], "progress", "{mine:#?}");
            let now = p["bytes"].as_u64().unwrap();
            assert!(now > bytes, "progress only when bytes moved: {mine:#?}");
            assert!(now <= p["size"].as_u64().unwrap(), "{p}");
            bytes = now;
        }
        for e in &mine {
            assert_eq!(e["op"], "download");
            assert_eq!(e["volume"], mine[0]["volume"]);
            assert_eq!(e["file"], mine[0]["file"]);
        }
        ends.insert(index, last.clone());
    }
    assert_eq!(
        events.len(),
        events
            .iter()
            .filter(|e| e["index"].as_u64().unwrap() < transfers)
            .count()
    );
    ends
}

#[test]
fn json_events_follow_a_download_from_start_through_progress_to_its_end() {
    let dir = TempDir::new("events");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    sparse_file(&pool.join("v.raw"), SIZE, &DATA, 3);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let fifo_path = dir.join("fifo");
    let fifo = held_fifo(&fifo_path);
    let missing = dir.join("missing.copy");

    let mut run = Run::start(&listen, &[("v.raw", &fifo_path), ("missing.raw", &missing)]);
    let failed = run.until("the missing volume's failure", |e| is(e, "failed", 1));
    assert_eq!(failed["reason"], "NOT_FOUND", "{failed}");
    assert_eq!(failed["code"], 3);
    assert_eq!(failed["ok"], false);
    assert!(
        failed["error"].as_str().unwrap().contains("no such volume"),
        "{failed}"
    );
    // The FIFO is not read: the download is stuck part-way, and says how far it got.
    let mid = run.until("progress", |e| {
        is(e, "progress", 0) && e["bytes"].as_u64().unwrap() > 0
    });
    assert_eq!(mid["size"], SIZE);
    assert!(mid["bytes"].as_u64().unwrap() < SIZE, "{mid}");
    assert!(mid["seconds"].as_f64().unwrap() > 0.0);

    let content = drain(fifo);
    let (events, code) = run.finish();
    assert_eq!(code, Some(1), "one transfer failed: {events:#?}");
    assert_eq!(content, read_all(&pool.join("v.raw")));
    let ends = check_order(&events, 2);
    let done = &ends[&0];
    assert_eq!(done["event"], "finished", "{done}");
    assert_eq!(done["ok"], true);
    assert_eq!(done["size"], SIZE);
    let data: u64 = DATA.iter().map(|(_, len)| len).sum();
    assert_eq!(done["data_bytes"], data);
    assert_eq!(done["hole_bytes"], SIZE - data);
    assert!(done.get("reason").is_none(), "{done}");
    assert!(done["first_byte_seconds"].as_f64().unwrap() <= done["seconds"].as_f64().unwrap());
    assert!(!missing.exists());
}

#[test]
fn json_events_say_why_a_transfer_failed_when_the_server_dies() {
    let dir = TempDir::new("events-lost");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    sparse_file(&pool.join("v.raw"), SIZE, &DATA, 4);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let server = Server::start(&pool, &listen);
    let fifo_path = dir.join("fifo");
    let fifo = held_fifo(&fifo_path);

    let mut run = Run::start(&listen, &[("v.raw", &fifo_path)]);
    run.until("progress", |e| {
        is(e, "progress", 0) && e["bytes"].as_u64().unwrap() > 0
    });
    kill(server.child.id(), 9);
    let failed = run.until("the failure", |e| is(e, "failed", 0));
    assert_eq!(failed["reason"], "CONNECTION_LOST", "{failed}");
    assert_eq!(failed["code"], 14);
    assert!(failed["size"].as_u64().unwrap() == SIZE, "{failed}");
    // The sink, stuck writing into the FIFO, lets go once it is read.
    drain(fifo);
    let (events, code) = run.finish();
    assert_eq!(code, Some(1), "{events:#?}");
    check_order(&events, 1);
}
