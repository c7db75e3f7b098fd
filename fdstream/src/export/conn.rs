//! One NBD client of the export server: its socket, the codec's two phases, and the work it has
//! on the worker pool. Runs on the loop thread and never blocks: reads and writes stop at
//! WouldBlock, disk work is queued to workers whose answers come back through [`Wake`].

use super::volume::{Failure, Outcome, Piece};
use super::{Catalog, Disk};
use crate::pool::{Job, JobHandle, Pool, Step};
use bytes::{Bytes, BytesMut};
use nbd::server_handshake::BASE_ALLOCATION_ID;
use nbd::wire::{CONTEXT_BASE_ALLOCATION, REQUEST_LEN};
use nbd::{Cookie, Error, HandshakeEvent, LookupError, Request, Server, ServerHandshake};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests one client may have on the workers at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Bytes of READ and WRITE payload one client may have on the workers at once (one request
/// is always allowed, whatever its size).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Input buffered at most: one request with the largest WRITE payload.
const INPUT_LIMIT: usize = REQUEST_LEN + super::volume::MAX_PAYLOAD as usize;
/// Workers one client's requests may occupy at once.
const JOBS_PER_CLIENT: usize = 4;

/// Names a connection across slab reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub slot: usize,
    pub generation: u64,
}

/// How workers tell the loop that a connection has answers (and how the loop is stopped).
pub struct Wake {
    pub ready: Mutex<Vec<Key>>,
    pub waker: mio::Waker,
    pub shutdown: AtomicBool,
    /// NBD clients connected now.
    pub clients: std::sync::atomic::AtomicUsize,
}

impl Wake {
    fn notify(&self, key: Key) {
        self.ready.lock().unwrap().push(key);
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake the NBD export loop: {e}");
        }
    }
}

enum Task {
    Open(String),
    List,
    Io(Arc<dyn Disk>, Request),
}

enum Done {
    Opened(Result<Arc<dyn Disk>, LookupError>),
    Listed(io::Result<Vec<String>>),
    Io {
        cookie: Cookie,
        cost: usize,
        result: Result<Outcome, Failure>,
    },
}

/// What the export's policy decided about a client when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It may read, and write if the export is writable.
    ReadWrite,
    /// It may read only (not among the identities allowed to write).
    ReadOnly,
    /// It may not use the export: every export it asks for is refused with this reason,
    /// before anything is opened, and it is listed nothing.
    Refused(String),
}

/// A connection's queue of disk work, shared with the workers.
struct Work {
    key: Key,
    admission: Admission,
    exports: Arc<dyn Catalog>,
    wake: Arc<Wake>,
    tasks: Mutex<VecDeque<(Task, usize)>>,
    done: Mutex<VecDeque<Done>>,
    /// The connection is gone: queued work is dropped.
    closed: AtomicBool,
}

impl Work {
    fn finish(&self, done: Done) {
        self.done.lock().unwrap().push_back(done);
        self.wake.notify(self.key);
    }
}

/// One of a connection's worker slots. Several share the connection's queue, so one client's
/// requests run in parallel, each on at most one worker.
struct Worker(Arc<Work>);

impl Job for Worker {
    fn run(&self) -> Step {
        let w = &self.0;
        if w.closed.load(Ordering::Relaxed) {
            w.tasks.lock().unwrap().clear();
            return Step::Idle;
        }
        let Some((task, cost)) = w.tasks.lock().unwrap().pop_front() else {
            return Step::Idle;
        };
        match task {
            Task::Open(name) => w.finish(Done::Opened(match &w.admission {
                Admission::Refused(why) => Err(LookupError {
                    reply: nbd::wire::REP_ERR_POLICY,
                    message: why.clone(),
                }),
                a => w.exports.open(&name, *a == Admission::ReadWrite),
            })),
            Task::List => w.finish(Done::Listed(match w.admission {
                Admission::Refused(_) => Ok(Vec::new()),
                _ => w.exports.names(),
            })),
            Task::Io(volume, request) => {
                let cookie = cookie_of(&request);
                let work = Arc::clone(w);
                volume.run(
                    &request,
                    Box::new(move |result| {
                        work.finish(Done::Io {
                            cookie,
                            cost,
                            result,
                        })
                    }),
                );
            }
        }
        if w.tasks.lock().unwrap().is_empty() {
            Step::Idle
        } else {
            Step::Again
        }
    }
}

fn cookie_of(r: &Request) -> Cookie {
    match *r {
        Request::Read { cookie, .. }
        | Request::Write { cookie, .. }
        | Request::WriteZeroes { cookie, .. }
        | Request::Trim { cookie, .. }
        | Request::Flush { cookie }
        | Request::BlockStatus { cookie, .. } => cookie,
        Request::Disconnect => 0,
    }
}

/// Payload bytes a request holds while it is on a worker.
fn cost_of(r: &Request) -> usize {
    match r {
        Request::Read { len, .. } => *len as usize,
        Request::Write { data, .. } => data.len(),
        _ => 0,
    }
}

pub enum Stream {
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
}

impl Stream {
    pub fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
}

enum Phase {
    Handshake(ServerHandshake),
    Transmission(Server),
}

/// What the loop does with a connection after driving it.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Keep,
    /// Close it; a message says why when the client did something wrong.
    Close(Option<String>),
}

pub struct Conn {
    pub stream: Stream,
    pub peer: String,
    phase: Phase,
    input: BytesMut,
    out: VecDeque<Bytes>,
    /// Bytes of `out.front()` already sent.
    sent: usize,
    work: Arc<Work>,
    jobs: Vec<JobHandle>,
    next_job: usize,
    volume: Option<Arc<dyn Disk>>,
    in_flight_bytes: usize,
    /// The client ended the session (NBD_OPT_ABORT, NBD_CMD_DISC): close once answered.
    ending: bool,
    /// The client will send nothing more (it half-closed, or closed after its last request):
    /// what it sent is still carried out and answered, as for NBD_CMD_DISC.
    eof: bool,
    started: Instant,
    last_progress: Instant,
    timeout: Duration,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: Stream,
        peer: String,
        admission: Admission,
        key: Key,
        exports: Arc<dyn Catalog>,
        wake: Arc<Wake>,
        pool: &Pool,
        timeout: Duration,
        now: Instant,
    ) -> Conn {
        let work = Arc::new(Work {
            key,
            admission,
            exports,
            wake,
            tasks: Mutex::new(VecDeque::new()),
            done: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
        });
        let jobs = (0..JOBS_PER_CLIENT.min(pool.workers()).max(1))
            .map(|_| pool.register(Worker(Arc::clone(&work))))
            .collect();
        let mut hs = ServerHandshake::new();
        let mut out = VecDeque::new();
        if let Some(greeting) = hs.poll_transmit() {
            out.push_back(greeting);
        }
        Conn {
            stream,
            peer,
            phase: Phase::Handshake(hs),
            input: BytesMut::new(),
            out,
            sent: 0,
            work,
            jobs,
            next_job: 0,
            volume: None,
            in_flight_bytes: 0,
            ending: false,
            eof: false,
            started: now,
            last_progress: now,
            timeout,
        }
    }

    /// When the client must have made progress by: the handshake has a time limit, and so has
    /// a request half sent or a reply the client does not read. An idle client with nothing
    /// pending may stay (NBD has no keepalive).
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Handshake(_) => Some(self.started + self.timeout),
            Phase::Transmission(_) if !self.input.is_empty() || !self.out.is_empty() => {
                Some(self.last_progress + self.timeout)
            }
            Phase::Transmission(_) => None,
        }
    }

    fn submit(&mut self, task: Task, cost: usize) {
        self.work.tasks.lock().unwrap().push_back((task, cost));
        self.jobs[self.next_job].schedule();
        self.next_job = (self.next_job + 1) % self.jobs.len();
    }

    /// Does everything the socket and the finished work allow, until nothing moves.
    pub fn drive(&mut self, scratch: &mut [u8], now: Instant) -> Next {
        loop {
            let mut moved = match self.read(scratch, now) {
                Ok(n) => n > 0,
                // A client that vanished (or a probe that only connected) is no offence.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Next::Close(None),
                Err(e) => return Next::Close(Some(format!("reading: {e}"))),
            };
            match self.process() {
                Ok(m) => moved |= m,
                Err(message) => {
                    // Say why to the client where the protocol lets us, then go.
                    let _ = self.write(now);
                    return Next::Close(Some(message));
                }
            }
            match self.write(now) {
                Ok(m) => moved |= m,
                // A client that closed (a probe that only connected) is gone, no offence.
                Err(e)
                    if self.eof
                        && matches!(
                            e.kind(),
                            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                        ) =>
                {
                    return Next::Close(None)
                }
                Err(e) => return Next::Close(Some(format!("writing: {e}"))),
            }
            if (self.ending || self.eof) && self.out.is_empty() && self.in_flight() == 0 {
                return Next::Close(None);
            }
            if !moved {
                return Next::Keep;
            }
        }
    }

    fn in_flight(&self) -> usize {
        match &self.phase {
            Phase::Transmission(s) => s.in_flight(),
            Phase::Handshake(hs) => hs.awaiting_answer() as usize,
        }
    }

    /// Reads what the socket has, up to the input limit; sets `eof` when the client closed.
    fn read(&mut self, scratch: &mut [u8], now: Instant) -> io::Result<usize> {
        let mut total = 0;
        while !self.ending && !self.eof && self.input.len() < INPUT_LIMIT {
            let room = (INPUT_LIMIT - self.input.len()).min(scratch.len());
            match self.stream.read(&mut scratch[..room]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.input.extend_from_slice(&scratch[..n]);
                    total += n;
                    self.last_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    fn write(&mut self, now: Instant) -> io::Result<bool> {
        let mut moved = false;
        while !self.out.is_empty() {
            let mut slices = Vec::with_capacity(64);
            for (i, b) in self.out.iter().take(64).enumerate() {
                slices.push(IoSlice::new(if i == 0 { &b[self.sent..] } else { b }));
            }
            match self.stream.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    moved = true;
                    self.last_progress = now;
                    while n > 0 {
                        let left = self.out[0].len() - self.sent;
                        if n >= left {
                            n -= left;
                            self.out.pop_front();
                            self.sent = 0;
                        } else {
                            self.sent += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Feeds input and finished work to the codec. An error is the message the connection
    /// closes with.
    fn process(&mut self) -> Result<bool, String> {
        let mut moved = false;
        let done: Vec<Done> = self.work.done.lock().unwrap().drain(..).collect();
        for d in done {
            moved = true;
            self.complete(d)?;
        }
        moved |= match self.phase {
            Phase::Handshake(_) => self.handshake()?,
            Phase::Transmission(_) => self.requests()?,
        };
        let out = &mut self.out;
        match &mut self.phase {
            Phase::Handshake(hs) => out.extend(std::iter::from_fn(|| hs.poll_transmit())),
            Phase::Transmission(s) => out.extend(std::iter::from_fn(|| s.poll_transmit())),
        }
        Ok(moved)
    }

    fn handshake(&mut self) -> Result<bool, String> {
        let Phase::Handshake(hs) = &mut self.phase else {
            return Ok(false);
        };
        if hs.awaiting_answer() || self.ending {
            return Ok(false);
        }
        let before = self.input.len();
        let task = match hs.handle_input(&mut self.input) {
            Ok(Some(HandshakeEvent::Lookup { name })) => Some(Task::Open(name)),
            Ok(Some(HandshakeEvent::List)) => Some(Task::List),
            Ok(Some(HandshakeEvent::Ready(_))) => {
                return Err("handshake ready without an answer".into())
            }
            Ok(None) => None,
            Err(Error::Disconnected) => {
                self.ending = true;
                None
            }
            Err(e) => return Err(format!("handshake: {e}")),
        };
        let moved = task.is_some() || self.input.len() != before;
        if let Some(t) = task {
            self.submit(t, 0);
        }
        Ok(moved)
    }

    fn requests(&mut self) -> Result<bool, String> {
        let Phase::Transmission(server) = &mut self.phase else {
            return Ok(false);
        };
        let mut moved = false;
        while !self.ending
            && (self.in_flight_bytes < MAX_IN_FLIGHT_BYTES || server.in_flight() == 0)
        {
            match server.decode(&mut self.input) {
                Ok(Some(Request::Disconnect)) => {
                    log::debug!("{}: disconnect", self.peer);
                    self.ending = true;
                    moved = true;
                }
                Ok(Some(request)) => {
                    let cost = cost_of(&request);
                    self.in_flight_bytes += cost;
                    let volume = Arc::clone(self.volume.as_ref().expect("open in transmission"));
                    self.work
                        .tasks
                        .lock()
                        .unwrap()
                        .push_back((Task::Io(volume, request), cost));
                    self.jobs[self.next_job].schedule();
                    self.next_job = (self.next_job + 1) % self.jobs.len();
                    moved = true;
                }
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(moved)
    }

    fn complete(&mut self, done: Done) -> Result<(), String> {
        match (&mut self.phase, done) {
            (Phase::Handshake(hs), Done::Listed(names)) => {
                let names = names.unwrap_or_else(|e| {
                    log::warn!("{}: cannot list the pool: {e}", self.peer);
                    Vec::new()
                });
                hs.answer_list(&names).map_err(|e| e.to_string())
            }
            (Phase::Handshake(hs), Done::Opened(result)) => {
                let (info, volume) = match result {
                    Ok(v) => (Ok(v.info()), Some(v)),
                    Err(e) => (Err(e), None),
                };
                match hs.answer(info) {
                    Ok(Some(HandshakeEvent::Ready(export))) => {
                        log::info!(
                            "{}: exporting {:?} ({} bytes, {}{})",
                            self.peer,
                            export.name,
                            export.size,
                            if export.read_only() {
                                "read-only"
                            } else {
                                "writable"
                            },
                            if export.context(CONTEXT_BASE_ALLOCATION).is_some() {
                                ", base:allocation"
                            } else {
                                ""
                            }
                        );
                        // The answer to GO is still in the handshake's output.
                        self.out.extend(std::iter::from_fn(|| hs.poll_transmit()));
                        self.volume = volume;
                        self.phase = Phase::Transmission(Server::new(export, MAX_IN_FLIGHT));
                        Ok(())
                    }
                    Ok(_) => Ok(()),
                    Err(Error::Refused { message, .. }) => Err(format!("refused: {message}")),
                    Err(e) => Err(e.to_string()),
                }
            }
            (
                Phase::Transmission(server),
                Done::Io {
                    cookie,
                    cost,
                    result,
                },
            ) => {
                self.in_flight_bytes -= cost;
                let r = match result {
                    Ok(Outcome::Read(pieces)) => pieces
                        .into_iter()
                        .try_for_each(|p| match p {
                            Piece::Data { offset, bytes } => {
                                server.reply_data(cookie, offset, bytes)
                            }
                            Piece::Hole { offset, len } => server.reply_hole(cookie, offset, len),
                        })
                        .and_then(|()| server.reply_done(cookie)),
                    Ok(Outcome::Status(extents)) => server
                        .reply_block_status(cookie, BASE_ALLOCATION_ID, &extents)
                        .and_then(|()| server.reply_done(cookie)),
                    Ok(Outcome::Done) => server.reply_done(cookie),
                    Err(f) => server.reply_error(cookie, f.errno, &f.message),
                };
                r.map_err(|e| e.to_string())
            }
            _ => Err("work finished in the wrong phase".into()),
        }
    }

    /// Stops the workers' queued work for this connection.
    pub fn close(&mut self) {
        self.work.closed.store(true, Ordering::Relaxed);
        self.work.tasks.lock().unwrap().clear();
        self.input.clear();
    }
}
