//! The one thread that watches every helper: socket readiness, exits (pidfds), timeouts.

use super::entry::Entry;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(100);

pub(super) struct Watcher {
    registry: Registry,
    entries: Mutex<HashMap<usize, Arc<Entry>>>,
}

/// What a readiness event of the watcher is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The helper's socket.
    Socket(usize),
    /// The helper's pidfd: it exited.
    Exit(usize),
}

impl Source {
    fn token(self) -> Token {
        Token(match self {
            Source::Socket(id) => id * 2,
            Source::Exit(id) => id * 2 + 1,
        })
    }

    fn of(token: Token) -> Source {
        match token.0 % 2 {
            0 => Source::Socket(token.0 / 2),
            _ => Source::Exit(token.0 / 2),
        }
    }
}

static WATCHER: OnceLock<Arc<Watcher>> = OnceLock::new();

/// The watcher, started on first use.
pub(super) fn watcher() -> io::Result<Arc<Watcher>> {
    if let Some(w) = WATCHER.get() {
        return Ok(Arc::clone(w));
    }
    static START: Mutex<()> = Mutex::new(());
    let _guard = START.lock().unwrap();
    if let Some(w) = WATCHER.get() {
        return Ok(Arc::clone(w));
    }
    let poll = Poll::new()?;
    let w = Arc::new(Watcher {
        registry: poll.registry().try_clone()?,
        entries: Mutex::new(HashMap::new()),
    });
    let w2 = Arc::clone(&w);
    std::thread::Builder::new()
        .name("iohelper-watch".into())
        .spawn(move || watch(poll, &w2))?;
    let _ = WATCHER.set(Arc::clone(&w));
    Ok(w)
}

/// The helpers being watched (none before the first spawn).
pub(super) fn entries() -> Vec<Arc<Entry>> {
    match WATCHER.get() {
        Some(w) => w.all(),
        None => Vec::new(),
    }
}

impl Watcher {
    fn all(&self) -> Vec<Arc<Entry>> {
        self.entries.lock().unwrap().values().cloned().collect()
    }

    /// Watches `entry`'s socket and, where the kernel has them, its pidfd.
    pub fn add(
        &self,
        entry: &Arc<Entry>,
        sock: &mut mio::net::UnixStream,
        pidfd: Option<&OwnedFd>,
    ) -> io::Result<()> {
        self.entries
            .lock()
            .unwrap()
            .insert(entry.id, Arc::clone(entry));
        self.registry.register(
            sock,
            Source::Socket(entry.id).token(),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        if let Some(pidfd) = pidfd {
            self.registry.register(
                &mut SourceFd(&pidfd.as_raw_fd()),
                Source::Exit(entry.id).token(),
                Interest::READABLE,
            )?;
        }
        Ok(())
    }

    fn reap(&self, entry: &Entry) {
        if entry.try_reap(&self.registry) {
            self.entries.lock().unwrap().remove(&entry.id);
        }
    }
}

fn watch(mut poll: Poll, w: &Watcher) {
    let mut events = Events::with_capacity(256);
    let mut last_tick = Instant::now();
    loop {
        if let Err(e) = poll.poll(&mut events, Some(TICK)) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("iohelper watcher: {e}");
                std::thread::sleep(TICK);
            }
            continue;
        }
        for ev in events.iter() {
            let source = Source::of(ev.token());
            let (Source::Socket(id) | Source::Exit(id)) = source;
            let Some(entry) = w.entries.lock().unwrap().get(&id).cloned() else {
                continue;
            };
            match source {
                Source::Socket(_) => entry.on_socket(),
                Source::Exit(_) => w.reap(&entry),
            }
        }
        let now = Instant::now();
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            for e in w.all() {
                e.check_time(now);
                // Without pidfds (kernels before 5.3) exits are noticed here.
                let no_pidfd = e.st.lock().unwrap().pidfd.is_none();
                if no_pidfd {
                    w.reap(&e);
                }
            }
        }
    }
}

/// A pidfd for our child `pid`; `None` where the kernel has none.
pub(super) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd owned by nobody else. pidfds are close-on-exec.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for s in [
            Source::Socket(0),
            Source::Exit(0),
            Source::Socket(9),
            Source::Exit(9),
        ] {
            assert_eq!(Source::of(s.token()), s);
        }
    }
}
