//! One helper as the parent sees it: its socket, process and the state of its stream, shared
//! by the loop thread (through [`HelperReader`](super::HelperReader) and
//! [`HelperWriter`](super::HelperWriter)), the spawning worker and the watcher thread.

use super::wire::{self, Msg};
use super::Role;
use crate::budget;
use crate::error::Error;
use crate::fd;
use crate::pool::WeakJobHandle;
use bytes::{Bytes, BytesMut};
use engine::Reason;
use engine::{Chunk, Notify, VolumeError};
use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::Registry;
use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a cancelled helper may take to notice its closed socket before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

pub(super) struct Entry {
    pub id: usize,
    pub shown: String,
    pub notify: Notify,
    timeout: Duration,
    pub st: Mutex<State>,
    /// This volume's place in the open-volume budget: held from before the spawn until the
    /// helper is reaped (or until it is clear that no helper was spawned).
    pub slot: Mutex<budget::Slot>,
    /// The job that spawns the helper once the slot is there; woken to leave the line when the
    /// stream is cancelled while it waits.
    pub spawner: OnceLock<WeakJobHandle>,
}

pub(super) struct State {
    pub pid: Option<i32>,
    pub sock: Option<UnixStream>,
    pub pidfd: Option<OwnedFd>,
    inbuf: BytesMut,
    out: VecDeque<Bytes>,
    /// The last message (or new work) seen: the hang timeout counts from here.
    pub last_activity: Option<Instant>,
    pub cancelled: Option<Instant>,
    reaped: bool,
    pub side: Side,
}

/// What the stream has learnt from its helper, by direction.
pub(super) enum Side {
    Read(ReadSide),
    Write(WriteSide),
}

#[derive(Default)]
pub(super) struct ReadSide {
    pub size: Option<Result<u64, VolumeError>>,
    pub queue: VecDeque<Chunk>,
    pub error: Option<VolumeError>,
    pub ended: bool,
    pub granted: u64,
    pub received: u64,
    /// Taken by the loop, not yet granted back.
    pub consumed: u64,
}

#[derive(Default)]
pub(super) struct WriteSide {
    pub ready: Option<Result<(), VolumeError>>,
    pub sent: u64,
    pub completed: u64,
    pub outcome: Option<Result<(), VolumeError>>,
    /// Kept for cleaning up a dead writer's temporary file.
    pub dir: Option<Arc<OwnedFd>>,
    pub temp: Option<CString>,
}

impl Side {
    pub fn role(&self) -> Role {
        match self {
            Side::Read(_) => Role::Read,
            Side::Write(_) => Role::Write,
        }
    }

    /// Whether the helper owes us a message (given that it runs and was not told to stop).
    fn owes(&self) -> bool {
        match self {
            Side::Read(r) => {
                !r.ended && r.error.is_none() && (r.size.is_none() || r.granted > r.received)
            }
            Side::Write(w) => w.outcome.is_none() && (w.ready.is_none() || w.completed < w.sent),
        }
    }

    /// The stream ended, well or not.
    fn ended(&self) -> bool {
        match self {
            Side::Read(r) => r.ended || r.error.is_some(),
            Side::Write(w) => w.outcome.is_some(),
        }
    }

    /// The stream fails with `e`: whoever waits for the size, the readiness or the outcome
    /// learns it.
    fn fail(&mut self, e: VolumeError) {
        match self {
            Side::Read(r) => {
                r.size.get_or_insert_with(|| Err(e.clone()));
                r.error = Some(e);
            }
            Side::Write(w) => {
                w.ready.get_or_insert_with(|| Err(e.clone()));
                w.outcome = Some(Err(e));
            }
        }
    }
}

impl State {
    /// Whether the helper owes us a message: the hang timeout applies only then.
    fn busy(&self) -> bool {
        self.cancelled.is_none() && !self.reaped && self.pid.is_some() && self.side.owes()
    }

    /// The stream is over for the parent: nothing the helper does any more can matter.
    fn finished(&self) -> bool {
        self.cancelled.is_some() || self.side.ended()
    }

    /// Records a failure of the helper itself, unless the stream already ended.
    pub fn fail(&mut self, e: VolumeError) {
        if !self.finished() {
            self.side.fail(e);
        }
    }

    pub fn push(&mut self, msg: &Msg) {
        for b in msg.encode() {
            if !b.is_empty() {
                self.out.push_back(b);
            }
        }
    }

    /// Writes queued messages until done or the socket is full (the watcher resumes then).
    pub fn flush(&mut self) -> io::Result<()> {
        // Before the spawn finishes, messages wait here (the engine may write to a download's
        // sink before it is ready); after the reaping, `out` is cleared there.
        let Some(sock) = &mut self.sock else {
            return Ok(());
        };
        while !self.out.is_empty() {
            let slices: Vec<IoSlice> = self.out.iter().take(64).map(|b| IoSlice::new(b)).collect();
            match sock.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    while n > 0 {
                        let front = self.out.front_mut().expect("written past the queue");
                        if n >= front.len() {
                            n -= front.len();
                            self.out.pop_front();
                        } else {
                            bytes::Buf::advance(front, n);
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads everything the socket has and decodes it. `Ok(true)` when the helper closed it.
    fn read_socket(&mut self) -> Result<bool, Error> {
        loop {
            self.decode_all()?;
            let Some(sock) = &self.sock else {
                return Ok(true);
            };
            self.inbuf.reserve(wire::wanted(&self.inbuf).max(64 << 10));
            let room = self.inbuf.capacity() - self.inbuf.len();
            match engine::event_loop::socket::read_into(sock.as_fd(), &mut self.inbuf, room) {
                Ok(0) => {
                    self.decode_all()?;
                    return Ok(true);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNRESET and friends: the helper is gone; its exit status tells why.
                Err(_) => return Ok(true),
            }
        }
    }

    fn decode_all(&mut self) -> Result<(), Error> {
        loop {
            // Credit is checked from the header, before the payload is waited for.
            if let (Side::Read(r), true) = (&self.side, self.inbuf.len() >= wire::HEADER_LEN) {
                let h = wire::Header::parse(&self.inbuf[..wire::HEADER_LEN])?;
                if r.received + h.len as u64 > r.granted {
                    return Err(Error::Helper(format!(
                        "iohelper sent {} bytes beyond its credit of {}",
                        r.received + h.len as u64 - r.granted,
                        r.granted
                    )));
                }
            }
            let Some(msg) = wire::decode(&mut self.inbuf)? else {
                return Ok(());
            };
            self.last_activity = Some(Instant::now());
            self.handle(msg)?;
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<(), Error> {
        let unexpected = |m: &Msg| Error::Helper(format!("unexpected iohelper message {m:?}"));
        let cancelled = self.cancelled.is_some();
        match (&mut self.side, msg) {
            (side, Msg::Error { reason, message }) => side.fail(VolumeError::new(reason, message)),
            (Side::Read(r), Msg::Size(n)) if r.size.is_none() => r.size = Some(Ok(n)),
            (Side::Read(r), m @ (Msg::Data { .. } | Msg::Hole { .. } | Msg::Eof { .. })) => {
                if !matches!(r.size, Some(Ok(_))) || r.ended {
                    return Err(unexpected(&m));
                }
                if let Msg::Data { bytes, .. } = &m {
                    r.received += bytes.len() as u64;
                }
                r.ended = matches!(m, Msg::Eof { .. });
                if !cancelled {
                    r.queue.push_back(m.into_chunk().expect("a chunk message"));
                }
            }
            (Side::Write(w), Msg::Ready) if w.ready.is_none() => w.ready = Some(Ok(())),
            (Side::Write(w), Msg::Temp(name)) => w.temp = CString::new(name).ok(),
            (Side::Write(w), Msg::Progress(n)) => {
                if n < w.completed || n > w.sent {
                    return Err(Error::Helper(format!(
                        "iohelper reported {n} chunks done of {} sent ({} before)",
                        w.sent, w.completed
                    )));
                }
                w.completed = n;
            }
            (Side::Write(w), Msg::Done) if w.completed == w.sent => {
                w.temp = None;
                w.outcome = Some(Ok(()));
            }
            (_, m) => return Err(unexpected(&m)),
        }
        Ok(())
    }

    /// Stops talking to the helper: it sees end-of-file and exits (a writer first removes its
    /// temporary file).
    pub fn hang_up(&mut self) {
        if let Some(sock) = &self.sock {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        self.out.clear();
    }
}

impl Entry {
    pub fn new(side: Side, shown: String, notify: Notify, timeout: Duration) -> Arc<Entry> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Arc::new(Entry {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            shown,
            notify,
            timeout,
            slot: Mutex::default(),
            spawner: OnceLock::new(),
            st: Mutex::new(State {
                pid: None,
                sock: None,
                pidfd: None,
                inbuf: BytesMut::new(),
                out: VecDeque::new(),
                last_activity: None,
                cancelled: None,
                reaped: false,
                side,
            }),
        })
    }

    /// The stream fails before its helper could run (spawning, preparing its fds).
    pub fn fail(&self, e: VolumeError) {
        self.st.lock().unwrap().fail(e);
        self.notify.notify();
    }

    /// The helper's pid, once it runs.
    pub fn pid(&self) -> Option<u32> {
        self.st.lock().unwrap().pid.map(|p| p as u32)
    }

    fn name(&self, pid: Option<i32>) -> String {
        match pid {
            Some(pid) => format!("iohelper {pid}"),
            None => "iohelper".to_owned(),
        }
    }

    /// A protocol violation: the helper is killed and its stream fails.
    fn broken(&self, st: &mut State, e: Error) {
        log::warn!("{} ({}): {e}", self.name(st.pid), self.shown);
        if let Some(pid) = st.pid {
            kill(pid);
        }
        let msg = format!("{} ({}): {e}", self.name(st.pid), self.shown);
        st.fail(VolumeError::new(Reason::Io, msg));
        st.hang_up();
    }

    /// Socket readiness (watcher thread).
    pub fn on_socket(&self) {
        let mut st = self.st.lock().unwrap();
        if let Err(e) = st.read_socket() {
            self.broken(&mut st, e);
        }
        if let Err(e) = st.flush() {
            log::debug!("{}: writing to the helper: {e}", self.name(st.pid));
            st.out.clear();
        }
        drop(st);
        self.notify.notify();
    }

    /// Reaps the helper if it exited (watcher thread). True when it did.
    pub fn try_reap(&self, registry: &Registry) -> bool {
        let Some(pid) = self.st.lock().unwrap().pid else {
            return false;
        };
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == 0 {
            return false;
        }
        let how = if r < 0 {
            format!("could not be waited for: {}", io::Error::last_os_error())
        } else if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            format!("killed by signal {sig}{name}")
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        // Whatever it sent before dying still counts.
        self.on_socket();
        let mut st = self.st.lock().unwrap();
        st.reaped = true;
        if !st.finished() {
            let verb = match st.side.role() {
                Role::Read => "reading",
                Role::Write => "writing",
            };
            let e = VolumeError::new(
                Reason::Io,
                format!("iohelper {pid} {how} while {verb} {}", self.shown),
            );
            log::warn!("{}", e.message);
            st.fail(e);
        } else {
            log::debug!("iohelper {pid} ({}) {how}", self.shown);
        }
        if let Side::Write(w) = &mut st.side {
            // A writer that died mid-volume leaves its temporary file; nothing else will
            // remove it.
            if !matches!(w.outcome, Some(Ok(()))) {
                if let (Some(dir), Some(temp)) = (&w.dir, w.temp.take()) {
                    match fd::unlinkat(dir, &temp) {
                        Ok(()) => log::debug!("removed {temp:?} left by iohelper {pid}"),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => log::warn!("cannot remove {temp:?} left by iohelper {pid}: {e}"),
                    }
                }
            }
            w.dir = None;
        }
        if let Some(mut sock) = st.sock.take() {
            let _ = registry.deregister(&mut sock);
        }
        if let Some(pidfd) = st.pidfd.take() {
            let _ = registry.deregister(&mut SourceFd(&pidfd.as_raw_fd()));
        }
        st.out.clear();
        drop(st);
        // Its socket, pidfd and directory are closed: the slot is someone else's now.
        self.slot.lock().unwrap().release();
        self.notify.notify();
        true
    }

    /// Timeouts (watcher thread, every tick).
    pub fn check_time(&self, now: Instant) {
        let mut st = self.st.lock().unwrap();
        let Some(pid) = st.pid else { return };
        if st.reaped {
            return;
        }
        if let Some(at) = st.cancelled {
            if now.duration_since(at) > CANCEL_GRACE {
                log::warn!(
                    "iohelper {pid} ({}) ignored cancellation; killing it",
                    self.shown
                );
                kill(pid);
                st.cancelled = Some(now);
            }
            return;
        }
        let idle = st
            .last_activity
            .map(|t| now.duration_since(t))
            .unwrap_or_default();
        if st.busy() && idle > self.timeout {
            kill(pid);
            let e = VolumeError::new(
                Reason::Timeout,
                format!(
                    "iohelper {pid} sent nothing for {:.1}s while working on {}; killed",
                    idle.as_secs_f64(),
                    self.shown
                ),
            );
            log::warn!("{}", e.message);
            st.fail(e);
            st.hang_up();
            drop(st);
            self.notify.notify();
        }
    }

    pub fn cancel(&self) {
        let mut st = self.st.lock().unwrap();
        if st.cancelled.is_some() {
            return;
        }
        match &mut st.side {
            Side::Write(w) if matches!(w.outcome, Some(Ok(()))) => return,
            Side::Write(_) => {}
            Side::Read(r) => r.queue.clear(),
        }
        st.cancelled = Some(Instant::now());
        st.hang_up();
        let unspawned = st.pid.is_none();
        drop(st);
        if unspawned {
            // Perhaps waiting in line for a slot: its job leaves the line (or lets the slot go).
            if let Some(job) = self.spawner.get() {
                job.schedule();
            }
        }
    }
}

fn kill(pid: i32) {
    // SAFETY: signalling our own, not yet reaped, child (its pid cannot be reused before then).
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
