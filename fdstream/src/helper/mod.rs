//! Volume I/O in a `volstream-iohelper` subprocess: [`HelperReader`] and [`HelperWriter`]
//! behave as [`FileReader`](crate::FileReader) and [`FileWriter`](crate::FileWriter) do (the
//! helper runs their synchronous cores, [`ReadCore`](crate::reader::ReadCore) and
//! [`WriteCore`](crate::writer::WriteCore)), but a crash, a hang or a stuck system call costs
//! one stream, not the process.
//!
//! Threads and who does what:
//! - a pool worker spawns each helper (fork/exec may block; the loop thread must not);
//! - one watcher thread for all helpers (a mio Poll) reads every helper socket into its
//!   stream's queue, flushes what the loop could not write, reaps helpers through pidfds and
//!   enforces the timeouts. One thread rather than one per helper: hundreds of streams must not
//!   cost hundreds of threads, and the socket reads are cheap next to the disk I/O they carry;
//! - the loop thread only takes decoded chunks from a queue and does non-blocking writes of
//!   messages to a socket (IPC, never disk I/O).
//!
//! Memory stays bounded: a reader helper sends DATA only within the credit the parent granted
//! (returned as the loop takes chunks), and the parent checks it; a writer helper is sent no
//! more than the engine's stream window.
//!
//! Every helper is waited for (no zombies) by pid, never with `waitpid(-1)`, so the host's
//! other children are left alone. All parent fds are close-on-exec; the helper gets exactly its
//! socket (fd 3) and its volume or directory (fd 4).

pub mod wire;

use crate::error::Error;
use crate::fd::{self, Location};
use crate::pool::{Job, Pool, Step};
use crate::reader::ReaderOptions;
use crate::writer::{WriteTarget, WriterOptions};
use bytes::{Bytes, BytesMut};
use engine::proto::Reason;
use engine::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll as MioPoll, Registry, Token};
use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};
use wire::Msg;

/// The helper binary's name, looked for next to the current executable.
pub const PROGRAM: &str = "volstream-iohelper";
/// Data a reader helper may have in flight toward the parent (as the in-process read-ahead).
pub const READ_WINDOW: u64 = 4 << 20;
/// The helper's socket and volume fds, as the helper sees them.
pub const SOCK_FD: RawFd = 3;
pub const VOLUME_FD: RawFd = 4;

const TICK: Duration = Duration::from_millis(100);
/// How long a cancelled helper may take to notice its closed socket before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How to run helpers.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    /// The helper binary; by default `$VOLSTREAM_IOHELPER`, else `volstream-iohelper` next to
    /// the current executable (or one directory up, for test and bench binaries in `deps/`).
    pub program: Option<PathBuf>,
    /// O_DIRECT in the helper (see `ReaderOptions::direct`, `WriterOptions::direct`).
    pub direct: bool,
    /// A helper that sends nothing for this long while it has work is killed and its stream
    /// aborted. Default 60 s, or `$VOLSTREAM_IOHELPER_TIMEOUT` seconds.
    pub timeout: Duration,
}

impl Default for HelperOptions {
    fn default() -> Self {
        let secs = std::env::var("VOLSTREAM_IOHELPER_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(60.0);
        HelperOptions {
            program: None,
            direct: false,
            timeout: Duration::from_secs_f64(secs),
        }
    }
}

impl HelperOptions {
    pub fn program(&self) -> PathBuf {
        if let Some(p) = &self.program {
            return p.clone();
        }
        if let Some(p) = std::env::var_os("VOLSTREAM_IOHELPER") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap_or_default();
        let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
        for _ in 0..2 {
            let candidate = dir.join(PROGRAM);
            if candidate.exists() {
                return candidate;
            }
            if !dir.pop() {
                break;
            }
        }
        PathBuf::from(PROGRAM)
    }
}

/// Where a volume's I/O runs.
#[derive(Debug, Clone, Default)]
pub enum Backend {
    /// The fdstream worker pool, in this process.
    #[default]
    InProcess,
    /// One `volstream-iohelper` process per volume.
    Helper(HelperOptions),
}

impl Backend {
    /// Reads the file, device or FIFO at `path`.
    pub fn reader(&self, path: impl Into<PathBuf>, options: ReaderOptions) -> AnyReader {
        match self {
            Backend::InProcess => AnyReader::File(crate::FileReader::open(path, options)),
            Backend::Helper(h) => AnyReader::Helper(HelperReader::new(
                Location::Path(path.into()),
                options,
                h.clone(),
            )),
        }
    }

    /// A new file at `path`, renamed into place once verified.
    pub fn create(&self, path: impl Into<PathBuf>, options: WriterOptions) -> AnyWriter {
        match self {
            Backend::InProcess => AnyWriter::File(crate::FileWriter::create(path, options)),
            Backend::Helper(h) => AnyWriter::Helper(HelperWriter::new(
                WriteTarget::create(path),
                options,
                h.clone(),
            )),
        }
    }

    /// An existing file, device or FIFO, written in place.
    pub fn in_place(&self, path: impl Into<PathBuf>, options: WriterOptions) -> AnyWriter {
        match self {
            Backend::InProcess => AnyWriter::File(crate::FileWriter::in_place(path, options)),
            Backend::Helper(h) => AnyWriter::Helper(HelperWriter::new(
                WriteTarget::in_place(path),
                options,
                h.clone(),
            )),
        }
    }
}

/// A reader of either backend.
pub enum AnyReader {
    File(crate::FileReader),
    Helper(HelperReader),
}

impl VolumeReader for AnyReader {
    fn start(&mut self, notify: Notify) {
        match self {
            AnyReader::File(r) => r.start(notify),
            AnyReader::Helper(r) => r.start(notify),
        }
    }
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        match self {
            AnyReader::File(r) => r.poll_size(),
            AnyReader::Helper(r) => r.poll_size(),
        }
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        match self {
            AnyReader::File(r) => r.poll_chunk(),
            AnyReader::Helper(r) => r.poll_chunk(),
        }
    }
    fn poll_failure(&mut self) -> Option<VolumeError> {
        match self {
            AnyReader::File(r) => r.poll_failure(),
            AnyReader::Helper(r) => r.poll_failure(),
        }
    }
    fn cancel(&mut self) {
        match self {
            AnyReader::File(r) => r.cancel(),
            AnyReader::Helper(r) => r.cancel(),
        }
    }
}

/// A writer of either backend.
pub enum AnyWriter {
    File(crate::FileWriter),
    Helper(HelperWriter),
}

impl VolumeWriter for AnyWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        match self {
            AnyWriter::File(w) => w.start(size, notify),
            AnyWriter::Helper(w) => w.start(size, notify),
        }
    }
    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        match self {
            AnyWriter::File(w) => w.poll_ready(),
            AnyWriter::Helper(w) => w.poll_ready(),
        }
    }
    fn write(&mut self, chunk: Chunk) {
        match self {
            AnyWriter::File(w) => w.write(chunk),
            AnyWriter::Helper(w) => w.write(chunk),
        }
    }
    fn poll_progress(&mut self) -> WriteProgress {
        match self {
            AnyWriter::File(w) => w.poll_progress(),
            AnyWriter::Helper(w) => w.poll_progress(),
        }
    }
    fn cancel(&mut self) {
        match self {
            AnyWriter::File(w) => w.cancel(),
            AnyWriter::Helper(w) => w.cancel(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
}

/// A running helper, as [`helpers`] lists it.
#[derive(Debug, Clone)]
pub struct HelperInfo {
    pub pid: u32,
    pub role: Role,
    /// The volume it works on.
    pub volume: String,
}

/// The helpers of this process that have been spawned and not yet reaped.
pub fn helpers() -> Vec<HelperInfo> {
    let Some(w) = WATCHER.get() else {
        return Vec::new();
    };
    let entries: Vec<Arc<Entry>> = w.entries.lock().unwrap().values().cloned().collect();
    entries
        .iter()
        .filter_map(|e| {
            let pid = e.st.lock().unwrap().pid?;
            Some(HelperInfo {
                pid: pid as u32,
                role: e.role,
                volume: e.shown.clone(),
            })
        })
        .collect()
}

/// Waits (at most `timeout`) until every helper of this process has exited and been reaped,
/// e.g. so that cancelled writers' temporaries are gone before the process exits. True if so.
pub fn wait_all(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !helpers().is_empty() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Shared per-helper state.

struct Entry {
    id: usize,
    role: Role,
    shown: String,
    notify: Notify,
    timeout: Duration,
    st: Mutex<State>,
}

#[derive(Default)]
struct State {
    pid: Option<i32>,
    sock: Option<UnixStream>,
    pidfd: Option<OwnedFd>,
    inbuf: BytesMut,
    out: VecDeque<Bytes>,
    /// The last message (or new work) seen: the hang timeout counts from here.
    last_activity: Option<Instant>,
    cancelled: Option<Instant>,
    reaped: bool,
    /// Kept for cleaning up a dead writer's temporary file.
    dir: Option<Arc<OwnedFd>>,
    temp: Option<CString>,

    // Reader.
    size: Option<Result<u64, VolumeError>>,
    queue: VecDeque<Chunk>,
    error: Option<VolumeError>,
    ended: bool,
    granted: u64,
    received: u64,
    /// Taken by the loop, not yet granted back.
    consumed: u64,

    // Writer.
    ready: Option<Result<(), VolumeError>>,
    sent: u64,
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
}

impl State {
    /// Whether the helper owes us a message: the hang timeout applies only then.
    fn busy(&self, role: Role) -> bool {
        if self.cancelled.is_some() || self.reaped || self.pid.is_none() {
            return false;
        }
        match role {
            Role::Read => {
                !self.ended
                    && self.error.is_none()
                    && (self.size.is_none() || self.granted > self.received)
            }
            Role::Write => {
                self.outcome.is_none() && (self.ready.is_none() || self.completed < self.sent)
            }
        }
    }

    /// The stream is over for the parent: nothing the helper does any more can matter.
    fn finished(&self, role: Role) -> bool {
        self.cancelled.is_some()
            || match role {
                Role::Read => self.ended || self.error.is_some(),
                Role::Write => self.outcome.is_some(),
            }
    }

    /// Records a failure of the helper itself, unless the stream already ended.
    fn fail(&mut self, role: Role, e: VolumeError) {
        if self.finished(role) {
            return;
        }
        match role {
            Role::Read => {
                if self.size.is_none() {
                    self.size = Some(Err(e.clone()));
                }
                self.error = Some(e);
            }
            Role::Write => {
                if self.ready.is_none() {
                    self.ready = Some(Err(e.clone()));
                }
                self.outcome = Some(Err(e));
            }
        }
    }

    fn push(&mut self, msg: &Msg) {
        for b in msg.encode() {
            if !b.is_empty() {
                self.out.push_back(b);
            }
        }
    }

    /// Writes queued messages until done or the socket is full (the watcher resumes then).
    fn flush(&mut self) -> io::Result<()> {
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
    fn read_socket(&mut self, role: Role) -> Result<bool, Error> {
        let Some(sock) = &self.sock else {
            return Ok(true);
        };
        let raw = sock.as_raw_fd();
        loop {
            self.decode_all(role)?;
            let want = wire::wanted(&self.inbuf).max(64 << 10);
            self.inbuf.reserve(want);
            let spare = self.inbuf.spare_capacity_mut();
            // SAFETY: the kernel writes at most `spare.len()` bytes into the spare capacity;
            // only what it reports written is marked initialised.
            let n =
                unsafe { libc::read(raw, spare.as_mut_ptr() as *mut libc::c_void, spare.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    // ECONNRESET and friends: the helper is gone; its exit status tells why.
                    _ => return Ok(true),
                }
            }
            if n == 0 {
                self.decode_all(role)?;
                return Ok(true);
            }
            // SAFETY: n bytes past the current length were just written by the kernel.
            unsafe { self.inbuf.set_len(self.inbuf.len() + n as usize) };
        }
    }

    fn decode_all(&mut self, role: Role) -> Result<(), Error> {
        loop {
            // Credit is checked from the header, before the payload is waited for.
            if self.inbuf.len() >= wire::HEADER_LEN {
                let h = wire::Header::parse(&self.inbuf[..wire::HEADER_LEN])?;
                if role == Role::Read && self.received + h.len as u64 > self.granted {
                    return Err(Error::Helper(format!(
                        "iohelper sent {} bytes beyond its credit of {}",
                        self.received + h.len as u64 - self.granted,
                        self.granted
                    )));
                }
            }
            let Some(msg) = wire::decode(&mut self.inbuf)? else {
                return Ok(());
            };
            self.last_activity = Some(Instant::now());
            self.handle(role, msg)?;
        }
    }

    fn handle(&mut self, role: Role, msg: Msg) -> Result<(), Error> {
        let unexpected = |m: &Msg| Error::Helper(format!("unexpected iohelper message {m:?}"));
        match (role, msg) {
            (_, Msg::Error { reason, message }) => {
                let e = VolumeError::new(reason, message);
                match role {
                    Role::Read => {
                        if self.size.is_none() {
                            self.size = Some(Err(e.clone()));
                        }
                        self.error = Some(e);
                    }
                    Role::Write => {
                        if self.ready.is_none() {
                            self.ready = Some(Err(e.clone()));
                        }
                        self.outcome = Some(Err(e));
                    }
                }
            }
            (Role::Read, Msg::Size(n)) if self.size.is_none() => self.size = Some(Ok(n)),
            (Role::Read, m @ (Msg::Data { .. } | Msg::Hole { .. } | Msg::Eof { .. })) => {
                if !matches!(self.size, Some(Ok(_))) || self.ended {
                    return Err(unexpected(&m));
                }
                if let Msg::Data { bytes, .. } = &m {
                    self.received += bytes.len() as u64;
                }
                self.ended = matches!(m, Msg::Eof { .. });
                if self.cancelled.is_none() {
                    self.queue
                        .push_back(m.into_chunk().expect("a chunk message"));
                }
            }
            (Role::Write, Msg::Ready) if self.ready.is_none() => self.ready = Some(Ok(())),
            (Role::Write, Msg::Temp(name)) => {
                self.temp = CString::new(name).ok();
            }
            (Role::Write, Msg::Progress(n)) => {
                if n < self.completed || n > self.sent {
                    return Err(Error::Helper(format!(
                        "iohelper reported {n} chunks done of {} sent ({} before)",
                        self.sent, self.completed
                    )));
                }
                self.completed = n;
            }
            (Role::Write, Msg::Done) if self.completed == self.sent => {
                self.temp = None;
                self.outcome = Some(Ok(()));
            }
            (_, m) => return Err(unexpected(&m)),
        }
        Ok(())
    }

    /// Stops talking to the helper: it sees end-of-file and exits (a writer first removes its
    /// temporary file).
    fn hang_up(&mut self) {
        if let Some(sock) = &self.sock {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        self.out.clear();
    }
}

impl Entry {
    fn new(role: Role, shown: String, notify: Notify, timeout: Duration) -> Arc<Entry> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Arc::new(Entry {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            role,
            shown,
            notify,
            timeout,
            st: Mutex::new(State::default()),
        })
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
        st.fail(self.role, VolumeError::new(Reason::Io, msg));
        st.hang_up();
    }

    /// Socket readiness (watcher thread).
    fn on_socket(&self) {
        let mut st = self.st.lock().unwrap();
        match st.read_socket(self.role) {
            Ok(_) => {}
            Err(e) => self.broken(&mut st, e),
        }
        if let Err(e) = st.flush() {
            log::debug!("{}: writing to the helper: {e}", self.name(st.pid));
            st.out.clear();
        }
        drop(st);
        self.notify.notify();
    }

    /// Reaps the helper if it exited (watcher thread). True when it did.
    fn try_reap(&self, watcher: &Watcher) -> bool {
        let pid = match self.st.lock().unwrap().pid {
            Some(pid) => pid,
            None => return false,
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
        if !st.finished(self.role) {
            let verb = match self.role {
                Role::Read => "reading",
                Role::Write => "writing",
            };
            let e = VolumeError::new(
                Reason::Io,
                format!("iohelper {pid} {how} while {verb} {}", self.shown),
            );
            log::warn!("{}", e.message);
            st.fail(self.role, e);
        } else {
            log::debug!("iohelper {pid} ({}) {how}", self.shown);
        }
        // A writer that died mid-volume leaves its temporary file; nothing else will remove it.
        if self.role == Role::Write && !matches!(st.outcome, Some(Ok(()))) {
            let temp = st.temp.take();
            if let (Some(dir), Some(temp)) = (&st.dir, temp) {
                match fd::unlinkat(dir, &temp) {
                    Ok(()) => log::debug!("removed {temp:?} left by iohelper {pid}"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => log::warn!("cannot remove {temp:?} left by iohelper {pid}: {e}"),
                }
            }
        }
        if let Some(mut sock) = st.sock.take() {
            let _ = watcher.registry.deregister(&mut sock);
        }
        if let Some(pidfd) = st.pidfd.take() {
            let _ = watcher
                .registry
                .deregister(&mut SourceFd(&pidfd.as_raw_fd()));
        }
        st.dir = None;
        st.out.clear();
        drop(st);
        self.notify.notify();
        true
    }

    /// Timeouts (watcher thread, every tick).
    fn check_time(&self, now: Instant) {
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
        if st.busy(self.role) && idle > self.timeout {
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
            st.fail(self.role, e);
            st.hang_up();
            drop(st);
            self.notify.notify();
        }
    }

    fn cancel(&self) {
        let mut st = self.st.lock().unwrap();
        if st.cancelled.is_some() || matches!(st.outcome, Some(Ok(()))) {
            return;
        }
        st.cancelled = Some(Instant::now());
        st.queue.clear();
        st.hang_up();
    }
}

fn kill(pid: i32) {
    // SAFETY: signalling our own, not yet reaped, child (its pid cannot be reused before then).
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

// ---------------------------------------------------------------------------------------------
// The watcher thread.

struct Watcher {
    registry: Registry,
    entries: Mutex<HashMap<usize, Arc<Entry>>>,
}

static WATCHER: OnceLock<Arc<Watcher>> = OnceLock::new();

fn watcher() -> io::Result<Arc<Watcher>> {
    if let Some(w) = WATCHER.get() {
        return Ok(Arc::clone(w));
    }
    static START: Mutex<()> = Mutex::new(());
    let _guard = START.lock().unwrap();
    if let Some(w) = WATCHER.get() {
        return Ok(Arc::clone(w));
    }
    let poll = MioPoll::new()?;
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

fn watch(mut poll: MioPoll, w: &Watcher) {
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
            let id = ev.token().0 / 2;
            let Some(entry) = w.entries.lock().unwrap().get(&id).cloned() else {
                continue;
            };
            if ev.token().0 % 2 == 0 {
                entry.on_socket();
            } else if entry.try_reap(w) {
                w.entries.lock().unwrap().remove(&id);
            }
        }
        let now = Instant::now();
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            let all: Vec<Arc<Entry>> = w.entries.lock().unwrap().values().cloned().collect();
            for e in all {
                e.check_time(now);
                // Without pidfds (kernels before 5.3) exits are noticed here.
                let no_pidfd = e.st.lock().unwrap().pidfd.is_none();
                if no_pidfd && e.try_reap(w) {
                    w.entries.lock().unwrap().remove(&e.id);
                }
            }
        }
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh fd owned by nobody else. pidfds are close-on-exec.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

// ---------------------------------------------------------------------------------------------
// Spawning, on a pool worker.

struct Once(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Job for Once {
    fn run(&self) -> Step {
        if let Some(f) = self.0.lock().unwrap().take() {
            f();
        }
        Step::Idle
    }
}

fn on_pool(pool: Option<Arc<Pool>>, f: impl FnOnce() + Send + 'static) {
    let pool = pool.unwrap_or_else(Pool::shared);
    pool.register(Once(Mutex::new(Some(Box::new(f)))))
        .schedule();
}

/// What the helper is given.
struct Launch {
    args: Vec<OsString>,
    /// Becomes the helper's fd 4.
    fd: Option<OwnedFd>,
    /// Kept by the parent to remove a dead writer's temporary file.
    dir: Option<Arc<OwnedFd>>,
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// Where the helper was looked for, and how to get it.
fn missing_program(program: &std::path::Path) -> String {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| "this program".into());
    let looked = if program.components().count() > 1 {
        format!("{} does not exist", program.display())
    } else {
        format!("{PROGRAM} is neither beside {beside} nor on PATH")
    };
    format!(
        "{looked}: build it with `cargo build --release` in the volstream \
         workspace (it is a default member) or set VOLSTREAM_IOHELPER to its path"
    )
}

fn spawn(entry: &Arc<Entry>, program: PathBuf, launch: Launch, first: Option<Msg>) {
    let result = (|| -> io::Result<()> {
        let w = watcher()?;
        let (parent, child) = std::os::unix::net::UnixStream::pair()?;
        parent.set_nonblocking(true)?;
        for s in [&parent, &child] {
            grow_send_buffer(s);
        }
        let sock_raw = child.as_raw_fd();
        let vol_raw = launch.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let mut cmd = std::process::Command::new(&program);
        cmd.args(&launch.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close, close_range) between fork
        // and exec.
        // The fds are first copied above 10 so that moving one to 3 cannot clobber the other.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(sock_raw, libc::F_DUPFD, 10);
                if a < 0 {
                    return Err(io::Error::last_os_error());
                }
                let b = if vol_raw >= 0 {
                    libc::fcntl(vol_raw, libc::F_DUPFD, 10)
                } else {
                    -1
                };
                if vol_raw >= 0 && b < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::dup2(a, SOCK_FD) < 0 || (b >= 0 && libc::dup2(b, VOLUME_FD) < 0) {
                    return Err(io::Error::last_os_error());
                }
                libc::close(a);
                if b >= 0 {
                    libc::close(b);
                }
                // Ours are all close-on-exec, but a host may have left others inheritable
                // (a jobserver pipe, a log file): mark everything above 4 close-on-exec too.
                // Not closed outright: std's exec-error pipe must live until the exec.
                libc::syscall(
                    libc::SYS_close_range,
                    VOLUME_FD + 1,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let child_proc = cmd.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                return io::Error::new(e.kind(), missing_program(&program));
            }
            io::Error::new(e.kind(), format!("starting {}: {e}", program.display()))
        })?;
        let pid = child_proc.id() as i32;
        // The helper has its copies; ours must not linger.
        drop(child);
        drop(launch.fd);
        drop(child_proc);
        let pidfd = pidfd_open(pid);
        let mut sock = UnixStream::from_std(parent);
        let mut st = entry.st.lock().unwrap();
        st.pid = Some(pid);
        st.dir = launch.dir;
        st.last_activity = Some(Instant::now());
        let token = entry.id * 2;
        w.entries
            .lock()
            .unwrap()
            .insert(entry.id, Arc::clone(entry));
        w.registry.register(
            &mut sock,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        if let Some(pidfd) = &pidfd {
            w.registry.register(
                &mut SourceFd(&pidfd.as_raw_fd()),
                Token(token + 1),
                Interest::READABLE,
            )?;
        }
        st.pidfd = pidfd;
        st.sock = Some(sock);
        if let Some(m) = first {
            st.push(&m);
            if let Msg::Credit(n) = m {
                st.granted += n;
            }
        }
        if st.cancelled.is_some() {
            st.hang_up();
        } else {
            let _ = st.flush();
        }
        log::debug!("iohelper {pid} started for {}", entry.shown);
        Ok(())
    })();
    if let Err(e) = result {
        let mut st = entry.st.lock().unwrap();
        st.fail(
            entry.role,
            VolumeError::new(Reason::Internal, format!("cannot run the iohelper: {e}")),
        );
        drop(st);
        entry.notify.notify();
    }
}

/// A socket's default send buffer (about 200 KiB) holds less than one read buffer, so every
/// megabyte would cost several wake-ups of each side; ask for a few (the kernel caps it at
/// net.core.wmem_max).
fn grow_send_buffer(sock: &std::os::unix::net::UnixStream) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt on a valid socket with a pointer to an int of the given length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn flag(args: &mut Vec<OsString>, name: &str, on: bool) {
    if on {
        args.push(name.into());
    }
}

fn value(args: &mut Vec<OsString>, name: &str, v: impl Into<OsString>) {
    args.push(name.into());
    args.push(v.into());
}

// ---------------------------------------------------------------------------------------------
// The reader.

/// A volume source read by a helper process. Semantics as [`crate::FileReader`].
pub struct HelperReader {
    location: Option<Location>,
    options: ReaderOptions,
    helper: HelperOptions,
    entry: Option<Arc<Entry>>,
}

impl HelperReader {
    pub fn open(path: impl Into<PathBuf>, options: ReaderOptions, helper: HelperOptions) -> Self {
        Self::new(Location::Path(path.into()), options, helper)
    }

    pub fn from_file(file: File, options: ReaderOptions, helper: HelperOptions) -> Self {
        Self::new(Location::Open(file), options, helper)
    }

    pub(crate) fn at(
        dir: Arc<OwnedFd>,
        name: CString,
        shown: String,
        options: ReaderOptions,
        helper: HelperOptions,
    ) -> Self {
        Self::new(Location::At { dir, name, shown }, options, helper)
    }

    fn new(location: Location, options: ReaderOptions, helper: HelperOptions) -> Self {
        HelperReader {
            location: Some(location),
            options,
            helper,
            entry: None,
        }
    }

    /// Calls the volume `shown` in messages instead of by its path.
    pub fn named(mut self, shown: impl Into<String>) -> Self {
        self.location = self.location.take().map(|l| l.named(shown));
        self
    }

    /// The helper's pid, once it runs.
    pub fn pid(&self) -> Option<u32> {
        self.entry
            .as_ref()
            .and_then(|e| e.st.lock().unwrap().pid.map(|p| p as u32))
    }
}

impl VolumeReader for HelperReader {
    fn start(&mut self, notify: Notify) {
        let Some(location) = self.location.take() else {
            return;
        };
        let entry = Entry::new(Role::Read, location.describe(), notify, self.helper.timeout);
        self.entry = Some(Arc::clone(&entry));
        let (options, helper) = (self.options.clone(), self.helper.clone());
        on_pool(self.options.pool.clone(), move || {
            let mut args: Vec<OsString> = vec!["read".into()];
            value(&mut args, "--shown", entry.shown.clone());
            let mut fd = None;
            match location {
                Location::Path(p) | Location::Named(p, _) => value(&mut args, "--path", p),
                Location::Open(f) => {
                    args.push("--fd".into());
                    fd = Some(OwnedFd::from(f));
                }
                Location::At { dir, name, .. } => match dup(&dir) {
                    Ok(d) => {
                        value(&mut args, "--dir-fd", OsString::from_vec(name.into_bytes()));
                        fd = Some(d);
                    }
                    Err(e) => {
                        let mut st = entry.st.lock().unwrap();
                        st.fail(Role::Read, Error::io("duplicating the pool fd", e).into());
                        drop(st);
                        entry.notify.notify();
                        return;
                    }
                },
            }
            value(
                &mut args,
                "--granularity",
                options.zero_granularity.to_string(),
            );
            flag(&mut args, "--no-extents", options.no_extents);
            flag(&mut args, "--force-share", options.force_share);
            if let Some(n) = options.stream_size {
                value(&mut args, "--stream-size", n.to_string());
            }
            flag(&mut args, "--direct", helper.direct || options.direct);
            let launch = Launch {
                args,
                fd,
                dir: None,
            };
            spawn(
                &entry,
                helper.program(),
                launch,
                Some(Msg::Credit(READ_WINDOW)),
            );
        });
    }

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        let st = entry.st.lock().unwrap();
        match (&st.size, &st.error) {
            (Some(size), _) => Poll::Ready(size.clone()),
            (None, Some(e)) => Poll::Ready(Err(e.clone())),
            (None, None) => Poll::Pending,
        }
    }

    fn poll_failure(&mut self) -> Option<VolumeError> {
        self.entry.as_ref()?.st.lock().unwrap().error.clone()
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        let mut st = entry.st.lock().unwrap();
        let Some(chunk) = st.queue.pop_front() else {
            return match &st.error {
                Some(e) => Poll::Ready(Err(e.clone())),
                None => Poll::Pending,
            };
        };
        if let Chunk::Data { bytes, .. } = &chunk {
            st.consumed += bytes.len() as u64;
            // Credit goes back in batches of half a window, as the engine's WINDOW frames do.
            if st.consumed >= READ_WINDOW / 2 && !st.ended && st.error.is_none() {
                let n = std::mem::take(&mut st.consumed);
                if st.granted == st.received {
                    // The helper was waiting for credit: its silence so far was ours.
                    st.last_activity = Some(Instant::now());
                }
                st.granted += n;
                st.push(&Msg::Credit(n));
                if let Err(e) = st.flush() {
                    log::debug!("granting credit to {}: {e}", entry.shown);
                }
            }
        }
        Poll::Ready(Ok(chunk))
    }

    fn cancel(&mut self) {
        if let Some(entry) = &self.entry {
            entry.cancel();
        }
    }
}

impl Drop for HelperReader {
    fn drop(&mut self) {
        self.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// The writer.

/// A volume sink written by a helper process. Semantics as [`crate::FileWriter`].
pub struct HelperWriter {
    target: Option<WriteTarget>,
    options: WriterOptions,
    helper: HelperOptions,
    entry: Option<Arc<Entry>>,
}

impl HelperWriter {
    pub fn create(path: impl Into<PathBuf>, options: WriterOptions, helper: HelperOptions) -> Self {
        Self::new(WriteTarget::create(path), options, helper)
    }

    pub fn in_place(
        path: impl Into<PathBuf>,
        options: WriterOptions,
        helper: HelperOptions,
    ) -> Self {
        Self::new(WriteTarget::in_place(path), options, helper)
    }

    pub fn from_file(file: File, options: WriterOptions, helper: HelperOptions) -> Self {
        Self::new(WriteTarget::from_file(file), options, helper)
    }

    pub(crate) fn create_at(
        dir: Arc<OwnedFd>,
        name: CString,
        shown: String,
        options: WriterOptions,
        helper: HelperOptions,
    ) -> Self {
        Self::new(WriteTarget::create_at(dir, name, shown), options, helper)
    }

    fn new(target: WriteTarget, options: WriterOptions, helper: HelperOptions) -> Self {
        HelperWriter {
            target: Some(target),
            options,
            helper,
            entry: None,
        }
    }

    /// Calls the volume `shown` in messages instead of by its path.
    pub fn named(mut self, shown: impl Into<String>) -> Self {
        self.target = self.target.take().map(|t| t.named(shown));
        self
    }

    /// The helper's pid, once it runs.
    pub fn pid(&self) -> Option<u32> {
        self.entry
            .as_ref()
            .and_then(|e| e.st.lock().unwrap().pid.map(|p| p as u32))
    }
}

impl VolumeWriter for HelperWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        let Some(target) = self.target.take() else {
            return;
        };
        let entry = Entry::new(Role::Write, target.describe(), notify, self.helper.timeout);
        self.entry = Some(Arc::clone(&entry));
        let (options, helper) = (self.options.clone(), self.helper.clone());
        on_pool(self.options.pool.clone(), move || {
            let mut args: Vec<OsString> = vec!["write".into()];
            value(&mut args, "--shown", entry.shown.clone());
            value(&mut args, "--size", size.to_string());
            let prepared = (|| -> Result<(Option<OwnedFd>, Option<Arc<OwnedFd>>), Error> {
                Ok(match target {
                    WriteTarget::Create {
                        dir,
                        dir_path,
                        name,
                        ..
                    } => {
                        // The parent opens the directory so that it can remove the temporary
                        // file of a helper that died.
                        let dir =
                            match (dir, dir_path) {
                                (Some(d), _) => d,
                                (None, Some(p)) => Arc::new(fd::open_dir(&p).map_err(|e| {
                                    Error::io(format!("opening {}", p.display()), e)
                                })?),
                                (None, None) => return Err(Error::Cancelled),
                            };
                        // Named here, so the name is known whenever the helper dies.
                        let temp = crate::temp::name(name.as_bytes());
                        value(
                            &mut args,
                            "--temp",
                            OsString::from_vec(temp.as_bytes().to_vec()),
                        );
                        entry.st.lock().unwrap().temp = Some(temp);
                        value(&mut args, "--create", OsString::from_vec(name.into_bytes()));
                        let d = dup(&dir).map_err(|e| Error::io("duplicating a dir fd", e))?;
                        (Some(d), Some(dir))
                    }
                    WriteTarget::InPlace(Location::Path(p) | Location::Named(p, _)) => {
                        value(&mut args, "--path", p);
                        (None, None)
                    }
                    WriteTarget::InPlace(Location::Open(f)) => {
                        args.push("--fd".into());
                        (Some(OwnedFd::from(f)), None)
                    }
                    WriteTarget::InPlace(Location::At { dir, name, .. }) => {
                        value(&mut args, "--in-dir", OsString::from_vec(name.into_bytes()));
                        let d = dup(&dir).map_err(|e| Error::io("duplicating a dir fd", e))?;
                        (Some(d), None)
                    }
                })
            })();
            let (fd, dir) = match prepared {
                Ok(x) => x,
                Err(e) => {
                    entry.st.lock().unwrap().fail(Role::Write, e.into());
                    entry.notify.notify();
                    return;
                }
            };
            flag(&mut args, "--allocated", options.allocated);
            flag(
                &mut args,
                "--destination-is-zero",
                options.destination_is_zero,
            );
            flag(&mut args, "--overwrite", options.overwrite);
            flag(&mut args, "--no-sync", options.no_sync);
            flag(&mut args, "--verify", options.verify);
            flag(&mut args, "--direct", helper.direct || options.direct);
            spawn(&entry, helper.program(), Launch { args, fd, dir }, None);
        });
    }

    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        match &entry.st.lock().unwrap().ready {
            Some(r) => Poll::Ready(r.clone()),
            None => Poll::Pending,
        }
    }

    fn write(&mut self, chunk: Chunk) {
        let Some(entry) = &self.entry else { return };
        let mut st = entry.st.lock().unwrap();
        if st.outcome.is_some() || st.cancelled.is_some() {
            return;
        }
        if st.completed == st.sent {
            // The helper had nothing to do until now: its silence so far was ours.
            st.last_activity = Some(Instant::now());
        }
        st.sent += 1;
        st.push(&Msg::from_chunk(chunk));
        if let Err(e) = st.flush() {
            log::debug!("writing to the helper for {}: {e}", entry.shown);
        }
    }

    fn poll_progress(&mut self) -> WriteProgress {
        let Some(entry) = &self.entry else {
            return WriteProgress::default();
        };
        let st = entry.st.lock().unwrap();
        WriteProgress {
            completed: st.completed,
            outcome: st.outcome.clone(),
        }
    }

    fn cancel(&mut self) {
        if let Some(entry) = &self.entry {
            entry.cancel();
        }
    }
}

impl Drop for HelperWriter {
    fn drop(&mut self) {
        self.cancel();
    }
}
