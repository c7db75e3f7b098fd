//! One connection as the loop sees it: the socket, the protocol state, and the sources and
//! sinks of its streams. Everything here runs on the loop thread and never blocks: sources and
//! sinks only queue work and answer polls.

use super::snapshot::{ConnectionSnapshot, StreamSnapshot};
use super::tls::looks_like_tls;
use super::transport::{TlsFailure, Transport};
use super::{
    ConnectionId, OpenRequest, Origin, PeerIdentity, Provider, Shared, TransferError,
    TransferReport,
};
use crate::proto::{
    ConnError, Connection, Event, Op, OpenError, OpenOptions, Reason, StreamId, StreamStats,
    Transmit,
};
use crate::volume::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Called once when a transfer this side started ends.
pub type OnDone = Box<dyn FnOnce(TransferReport) + Send>;

/// A download or upload asked for by the local user.
pub struct Transfer {
    /// `Op::Write` needs a reader endpoint, every other op a writer.
    pub op: Op,
    pub name: String,
    pub options: OpenOptions,
    pub endpoint: Endpoint,
    pub on_done: OnDone,
}

/// The local end of a stream: where its content comes from or goes to.
pub enum Endpoint {
    /// Content read locally and sent (an upload, or a download being served).
    Reader(Box<dyn VolumeReader>),
    /// Content received and written locally (a download, or an upload being served).
    Writer(Box<dyn VolumeWriter>),
}

/// What a local endpoint waits for before its stream can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// The reader must report its size (server: before ACCEPT; client: before OPEN).
    Size,
    /// The writer must finish opening (server: before ACCEPT).
    Ready,
    /// Waiting for the handshake, a free stream slot, or the peer's ACCEPT (client).
    Accept,
    Open,
}

/// Identifies whom a notification is for: a local endpoint of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WakeKey {
    pub conn: ConnectionId,
    pub local: u64,
}

struct Local {
    endpoint: Endpoint,
    op: Op,
    options: OpenOptions,
    gate: Gate,
    stream: Option<StreamId>,
    armed: Arc<AtomicBool>,
    /// Writer chunks whose completion was already passed on as credit.
    released: u64,
    /// This endpoint failed and its stream is being aborted: it is reported once, as the
    /// transfer's error, and is given nothing more.
    failure: Option<VolumeError>,
    name: String,
    size: u64,
    started: Instant,
    /// When the first content chunk was taken from the source or handed to the sink.
    first_byte: Option<Duration>,
    /// Set for transfers the local user started; served streams have none.
    on_done: Option<OnDone>,
}

/// Records when a stream's first content moved, counted from the stream's start.
fn note_first_byte(
    first_byte: &mut Option<Duration>,
    started: Instant,
    chunk: &Chunk,
    now: Instant,
) {
    if first_byte.is_none() && !matches!(chunk, Chunk::End { .. }) {
        *first_byte = Some(now.saturating_duration_since(started));
    }
}

/// Bytes kept queued for the socket; below this, more frames are scheduled. Small, so a frame
/// for an interactive stream never waits behind a deep local queue. With the streams'
/// `send_buffer`s and the connection's `control_backlog` it bounds what a peer that stops
/// reading makes us hold.
pub const TRANSMIT_TARGET: usize = 256 * 1024;
/// The same while an interactive stream is active: two of its frame size, so the socket never
/// runs dry between writes while an interactive frame waits behind little.
pub const INTERACTIVE_TRANSMIT_TARGET: usize = 64 * 1024;
/// Bytes read, and bytes written, per connection per turn before the loop looks at wake-ups
/// and other connections again. Without it a peer that reads as fast as we write would keep
/// the loop in one writev loop and starve every source's notification.
const READ_BUDGET: usize = 1024 * 1024;
const WRITE_BUDGET: usize = 1024 * 1024;
/// Most segments handed to one writev.
const IOV_MAX: usize = 64;

pub(crate) struct Driver {
    pub id: ConnectionId,
    pub transport: Transport,
    pub conn: Connection,
    out: Transmit,
    locals: HashMap<u64, Local>,
    by_stream: HashMap<StreamId, u64>,
    next_local: u64,
    /// Local transfers whose OPEN waits for the handshake or a free stream slot.
    waiting: VecDeque<u64>,
    provider: Option<Arc<dyn Provider>>,
    shared: Arc<Shared>,
    pub peer: String,
    /// Who the peer is, as the transport proved it (completed at the TLS handshake).
    pub identity: PeerIdentity,
    /// Set when the listener's policy refuses this peer: the connection ends with this reason
    /// (in GOAWAY) as soon as the handshake lets the peer hear it, before any OPEN is served.
    refusal: Option<String>,
    /// Whether the first input bytes were checked for a TLS record on a plain connection.
    sniffed: bool,
    writable: bool,
    /// More input may be waiting: the read budget ran out before WouldBlock.
    pub read_pending: bool,
    /// More output could be written: the write budget ran out before WouldBlock.
    pub write_pending: bool,
    /// Reading stopped because the connection had no input room (control backlog full).
    /// Readiness is edge-triggered, so the loop must come back by itself once there is room.
    input_stalled: bool,
    /// The connection is over and its socket may be dropped.
    pub finished: bool,
    created: Instant,
    /// The smallest round trip the socket's receive buffer was last bounded for, and whether
    /// it was (see `Socket::bound_receive_queue`).
    bounded_at: Option<Duration>,
    receive_bounded: bool,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ConnectionId,
        transport: Transport,
        conn: Connection,
        provider: Option<Arc<dyn Provider>>,
        shared: Arc<Shared>,
        peer: String,
        identity: PeerIdentity,
        refusal: Option<String>,
    ) -> Self {
        Driver {
            id,
            sniffed: transport.is_tls(),
            transport,
            conn,
            out: Transmit::default(),
            locals: HashMap::new(),
            by_stream: HashMap::new(),
            next_local: 0,
            waiting: VecDeque::new(),
            provider,
            shared,
            peer,
            identity,
            refusal,
            writable: false,
            read_pending: false,
            write_pending: false,
            input_stalled: false,
            finished: false,
            created: Instant::now(),
            bounded_at: None,
            receive_bounded: false,
        }
    }

    /// The connection and its streams as they stand now.
    pub fn snapshot(&self, now: Instant) -> ConnectionSnapshot {
        let streams = self
            .conn
            .streams()
            .map(|view| {
                let local = self
                    .by_stream
                    .get(&view.id)
                    .and_then(|k| self.locals.get(k));
                StreamSnapshot {
                    view,
                    name: local.map(|l| l.name.clone()).unwrap_or_default(),
                    local: local.is_some_and(|l| l.on_done.is_some()),
                    age: local.map_or(Duration::ZERO, |l| now.saturating_duration_since(l.started)),
                    first_byte: local.and_then(|l| l.first_byte),
                }
            })
            .collect();
        ConnectionSnapshot {
            id: self.id,
            peer: self.peer.clone(),
            side: self.conn.side(),
            established: self.conn.is_established(),
            age: now.saturating_duration_since(self.created),
            stats: self.conn.stats(),
            transmit_queued: self.out.len() as u64,
            streams,
        }
    }

    fn new_local(&mut self, endpoint: Endpoint, op: Op, name: String, now: Instant) -> u64 {
        let key = self.next_local;
        self.next_local += 1;
        self.locals.insert(
            key,
            Local {
                endpoint,
                op,
                options: OpenOptions::default(),
                gate: Gate::Accept,
                stream: None,
                armed: Arc::new(AtomicBool::new(false)),
                released: 0,
                failure: None,
                name,
                size: 0,
                started: now,
                first_byte: None,
                on_done: None,
            },
        );
        key
    }

    fn notify_for(&self, local: u64) -> Notify {
        let shared = Arc::clone(&self.shared);
        let armed = Arc::clone(&self.locals[&local].armed);
        let key = WakeKey {
            conn: self.id,
            local,
        };
        Notify::new(move || {
            if !armed.swap(true, Ordering::AcqRel) {
                shared.wake(key);
            }
        })
    }

    /// Starts a transfer the local user asked for.
    pub fn submit(&mut self, transfer: Transfer, now: Instant) {
        let op = transfer.op;
        let key = self.new_local(transfer.endpoint, op, transfer.name, now);
        let local = self.locals.get_mut(&key).unwrap();
        local.options = transfer.options;
        local.on_done = Some(transfer.on_done);
        let mismatch = matches!(
            (&local.endpoint, op),
            (Endpoint::Reader(_), Op::Read | Op::List | Op::Extents)
                | (Endpoint::Writer(_), Op::Write)
        );
        if mismatch {
            let error = failure(
                Reason::Internal,
                format!("{op:?} needs the other kind of endpoint"),
                Origin::Protocol,
            );
            return self.end_local(key, StreamStats::default(), Err(error), now);
        }
        if self.conn.is_closed() {
            let error = match self.conn.error() {
                Some(e) => failure(e.reason(), e.to_string(), Origin::Connection),
                None => failure(
                    Reason::GoingAway,
                    "connection is closed",
                    Origin::Connection,
                ),
            };
            return self.end_local(key, StreamStats::default(), Err(error), now);
        }
        if op == Op::Write {
            // OPEN carries the upload's size, so the source opens (off the loop) first.
            self.locals.get_mut(&key).unwrap().gate = Gate::Size;
            let notify = self.notify_for(key);
            if let Endpoint::Reader(reader) = &mut self.locals.get_mut(&key).unwrap().endpoint {
                reader.start(notify);
            }
            self.service(key, now);
        } else {
            self.waiting.push_back(key);
            self.open_waiting(now);
        }
    }

    /// Sends OPEN for waiting transfers while the peer's stream limit allows.
    fn open_waiting(&mut self, now: Instant) {
        while let Some(&key) = self.waiting.front() {
            let local = &self.locals[&key];
            match self
                .conn
                .open_stream(local.op, &local.name, local.options, local.size)
            {
                Ok(stream) => {
                    self.waiting.pop_front();
                    self.locals.get_mut(&key).unwrap().stream = Some(stream);
                    self.by_stream.insert(stream, key);
                }
                Err(OpenError::NotReady | OpenError::TooManyStreams) => return,
                Err(OpenError::GoingAway) => {
                    self.waiting.pop_front();
                    // A connection that ended (a peer's GOAWAY can arrive with its Hello) says
                    // why; only a graceful one is just going away.
                    let error = match self.conn.error() {
                        Some(e) => failure(e.reason(), e.to_string(), Origin::Connection),
                        None => failure(
                            Reason::GoingAway,
                            "connection is going away",
                            Origin::Connection,
                        ),
                    };
                    self.end_local(key, StreamStats::default(), Err(error), now);
                }
                Err(OpenError::InvalidName) => {
                    self.waiting.pop_front();
                    let error = failure(
                        Reason::InvalidName,
                        format!("cannot ask for {:?}", local.name),
                        Origin::Protocol,
                    );
                    self.end_local(key, StreamStats::default(), Err(error), now);
                }
                Err(OpenError::Unsupported) => {
                    self.waiting.pop_front();
                    let error = failure(
                        Reason::Unsupported,
                        "the peer cannot verify what it writes (it does not announce VERIFY)",
                        Origin::Protocol,
                    );
                    self.end_local(key, StreamStats::default(), Err(error), now);
                }
            }
        }
    }

    /// Polls a local endpoint after a notification or a protocol event.
    pub fn service(&mut self, key: u64, now: Instant) {
        let Some(local) = self.locals.get_mut(&key) else {
            return;
        };
        local.armed.store(false, Ordering::Release);
        match (local.gate, &mut local.endpoint) {
            (Gate::Size, Endpoint::Reader(reader)) => match reader.poll_size() {
                Poll::Pending => {}
                Poll::Ready(Ok(size)) => {
                    local.size = size;
                    match local.stream {
                        Some(stream) => {
                            local.gate = Gate::Open;
                            self.conn.accept(stream, size);
                            self.pull(key, now);
                        }
                        None => {
                            local.gate = Gate::Accept;
                            self.waiting.push_back(key);
                            self.open_waiting(now);
                        }
                    }
                }
                Poll::Ready(Err(e)) => self.refuse(key, e, now),
            },
            (Gate::Ready, Endpoint::Writer(writer)) => match writer.poll_ready() {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    local.gate = Gate::Open;
                    let (stream, size) = (local.stream.unwrap(), local.size);
                    self.conn.accept(stream, size);
                    self.progress(key, now);
                }
                Poll::Ready(Err(e)) => self.refuse(key, e, now),
            },
            (Gate::Open, Endpoint::Reader(_)) => self.pull(key, now),
            (Gate::Open, Endpoint::Writer(_)) => self.progress(key, now),
            _ => {}
        }
    }

    /// A local endpoint failed before its stream was open.
    fn refuse(&mut self, key: u64, error: VolumeError, now: Instant) {
        let stream = self.locals[&key].stream;
        match stream {
            Some(stream) if self.locals[&key].on_done.is_none() => {
                log::info!("{}: refusing {stream}: {error}", self.peer);
                self.conn.reject(stream, error.reason, &error.message);
                self.by_stream.remove(&stream);
                self.locals.remove(&key);
            }
            Some(stream) => {
                self.conn.abort(stream, error.reason, &error.message);
                if let Some(local) = self.locals.get_mut(&key) {
                    local.failure = Some(error);
                }
                self.drain_events(now);
            }
            None => {
                let error = failure(error.reason, error.message, Origin::Local);
                self.end_local(key, StreamStats::default(), Err(error), now);
            }
        }
    }

    /// Moves chunks from a reader into its stream while there is room.
    fn pull(&mut self, key: u64, now: Instant) {
        let Some(local) = self.locals.get_mut(&key).filter(|l| l.failure.is_none()) else {
            return;
        };
        let (Some(stream), Endpoint::Reader(reader)) = (local.stream, &mut local.endpoint) else {
            return;
        };
        loop {
            if !self.conn.can_send(stream) {
                // The stream is full; a failure the source already knows need not wait until
                // the peer has taken everything queued before it.
                if let Some(e) = reader.poll_failure() {
                    log::warn!("{}: {stream} source failed: {}", self.peer, e.message);
                    self.conn.abort(stream, e.reason, &e.message);
                    local.failure = Some(e);
                }
                return;
            }
            match reader.poll_chunk() {
                Poll::Pending => return,
                Poll::Ready(Ok(chunk)) => {
                    note_first_byte(&mut local.first_byte, local.started, &chunk, now);
                    self.conn.send_chunk(stream, chunk);
                }
                Poll::Ready(Err(e)) => {
                    log::warn!("{}: {stream} source failed: {}", self.peer, e.message);
                    self.conn.abort(stream, e.reason, &e.message);
                    local.failure = Some(e);
                    return;
                }
            }
        }
    }

    /// Passes a writer's progress on: credit for finished chunks, and the verdict at the end.
    fn progress(&mut self, key: u64, now: Instant) {
        // A failed sink's verdict stays failed; asking again would report it again for every
        // chunk that was already queued behind the failure.
        let Some(local) = self.locals.get_mut(&key).filter(|l| l.failure.is_none()) else {
            return;
        };
        let (Some(stream), Endpoint::Writer(writer)) = (local.stream, &mut local.endpoint) else {
            return;
        };
        let progress = writer.poll_progress();
        let fresh = progress.completed.saturating_sub(local.released);
        local.released = progress.completed;
        if fresh > 0 {
            self.conn.release(stream, fresh, now);
        }
        match progress.outcome {
            Some(Ok(())) => self.conn.stream_verified(stream),
            Some(Err(e)) => {
                log::warn!("{}: {stream} sink failed: {}", self.peer, e.message);
                self.conn.abort(stream, e.reason, &e.message);
                local.failure = Some(e);
            }
            None => {}
        }
    }

    /// Acts on everything the protocol state has to say.
    pub fn drain_events(&mut self, now: Instant) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Connected { version, features } => {
                    if let Some(identity) = self.transport.peer_identity() {
                        self.identity = identity;
                    }
                    log::debug!(
                        "{}: connected, protocol {version}, features {:#x}, {}, peer {}",
                        self.peer,
                        features.0,
                        self.transport.tls_summary().as_deref().unwrap_or("no TLS"),
                        self.identity
                    );
                    if let Some(refusal) = self.refusal.take() {
                        log::warn!("{}: refused: {refusal}", self.peer);
                        self.conn.close(ConnError::Refused(refusal));
                        continue;
                    }
                    self.open_waiting(now);
                }
                Event::OpenRequested {
                    stream,
                    op,
                    name,
                    options,
                    size,
                } => self.on_open_requested(stream, op, name, options, size, now),
                Event::Accepted { stream, size } => {
                    let Some(&key) = self.by_stream.get(&stream) else {
                        continue;
                    };
                    let notify = self.notify_for(key);
                    let local = self.locals.get_mut(&key).unwrap();
                    local.gate = Gate::Open;
                    match &mut local.endpoint {
                        Endpoint::Writer(writer) => {
                            local.size = size;
                            writer.start(size, notify);
                        }
                        Endpoint::Reader(_) => self.pull(key, now),
                    }
                }
                Event::Chunk { stream, chunk } => {
                    let Some(&key) = self.by_stream.get(&stream) else {
                        continue;
                    };
                    let local = self.locals.get_mut(&key).unwrap();
                    note_first_byte(&mut local.first_byte, local.started, &chunk, now);
                    if let (Endpoint::Writer(writer), None) = (&mut local.endpoint, &local.failure)
                    {
                        writer.write(chunk);
                    }
                    self.progress(key, now);
                }
                Event::Writable { stream } => {
                    if let Some(&key) = self.by_stream.get(&stream) {
                        self.pull(key, now);
                    }
                }
                Event::Completed { stream, stats } => {
                    if let Some(key) = self.by_stream.remove(&stream) {
                        self.end_local(key, stats, Ok(()), now);
                    }
                    self.open_waiting(now);
                }
                Event::Rejected {
                    stream,
                    reason,
                    message,
                } => {
                    if let Some(key) = self.by_stream.remove(&stream) {
                        let error = failure(reason, message, Origin::RefusedByPeer);
                        self.end_local(key, StreamStats::default(), Err(error), now);
                    }
                    self.open_waiting(now);
                }
                Event::Aborted {
                    stream,
                    reason,
                    message,
                    by_peer,
                    stats,
                } => {
                    let who = if by_peer { "peer" } else { "local" };
                    log::info!(
                        "{}: {stream} aborted ({who}): {reason}: {message}",
                        self.peer
                    );
                    if let Some(key) = self.by_stream.remove(&stream) {
                        let own = self.locals.get_mut(&key).and_then(|l| l.failure.take());
                        let error = match own {
                            // Aborted because our own endpoint failed: its words.
                            Some(e) if !by_peer => failure(e.reason, e.message, Origin::Local),
                            _ if by_peer => failure(reason, message, Origin::AbortedByPeer),
                            _ => failure(reason, message, Origin::Protocol),
                        };
                        self.end_local(key, stats, Err(error), now);
                    }
                    self.open_waiting(now);
                }
                Event::Closed { error } => self.on_closed(error, now),
            }
        }
    }

    fn on_open_requested(
        &mut self,
        stream: StreamId,
        op: Op,
        name: String,
        options: OpenOptions,
        size: u64,
        now: Instant,
    ) {
        if self.conn.is_closed() {
            // Refused or failed in the same batch of input: nothing is served.
            return;
        }
        let Some(provider) = self.provider.clone() else {
            self.conn
                .reject(stream, Reason::Unsupported, "this side serves no volumes");
            return;
        };
        let request = OpenRequest {
            name: name.clone(),
            options,
            size,
            peer: self.peer.clone(),
            identity: self.identity.clone(),
        };
        let opened = match op {
            Op::Read => provider.open_read(&request).map(Endpoint::Reader),
            Op::Write => provider.open_write(&request).map(Endpoint::Writer),
            Op::List => provider.open_list(&request).map(Endpoint::Reader),
            Op::Extents => provider.open_extents(&request).map(Endpoint::Reader),
        };
        let endpoint = match opened {
            Ok(endpoint) => endpoint,
            Err(e) => {
                log::info!("{}: refusing {op:?} of {name:?}: {e}", self.peer);
                return self.conn.reject(stream, e.reason, &e.message);
            }
        };
        let key = self.new_local(endpoint, op, name, now);
        self.by_stream.insert(stream, key);
        let notify = self.notify_for(key);
        let local = self.locals.get_mut(&key).unwrap();
        local.stream = Some(stream);
        local.options = options;
        local.size = size;
        match &mut local.endpoint {
            Endpoint::Reader(reader) => {
                local.gate = Gate::Size;
                reader.start(notify);
            }
            Endpoint::Writer(writer) => {
                local.gate = Gate::Ready;
                writer.start(size, notify);
            }
        }
        self.service(key, now);
    }

    fn on_closed(&mut self, error: Option<ConnError>, now: Instant) {
        match &error {
            Some(e) => log::info!("{}: connection ended: {e}", self.peer),
            None => log::debug!("{}: connection closed", self.peer),
        }
        // The connection's own error reads whole ("timed out: idle for 60s").
        let error = match &error {
            Some(e) => failure(e.reason(), e.to_string(), Origin::Connection),
            None => failure(Reason::GoingAway, "connection closed", Origin::Connection),
        };
        let keys: Vec<u64> = self.locals.keys().copied().collect();
        for key in keys {
            self.end_local(key, StreamStats::default(), Err(error.clone()), now);
        }
        self.waiting.clear();
        self.by_stream.clear();
    }

    fn end_local(
        &mut self,
        key: u64,
        stats: StreamStats,
        result: Result<(), TransferError>,
        now: Instant,
    ) {
        let Some(mut local) = self.locals.remove(&key) else {
            return;
        };
        if let Some(stream) = local.stream {
            self.by_stream.remove(&stream);
        }
        if result.is_err() {
            match &mut local.endpoint {
                Endpoint::Reader(r) => r.cancel(),
                Endpoint::Writer(w) => w.cancel(),
            }
        }
        if let Some(on_done) = local.on_done.take() {
            on_done(TransferReport {
                name: local.name,
                op: local.op,
                size: local.size,
                stats,
                elapsed: now.saturating_duration_since(local.started),
                first_byte: local.first_byte,
                result,
            });
        }
    }

    // ---- socket ----

    /// Reads what the socket has (up to a budget) and processes it.
    pub fn on_readable(&mut self, now: Instant) {
        self.read_pending = false;
        if self.conn.is_input_paused() && self.conn.input_room() > 0 {
            // Frames read earlier and left unprocessed come before anything new.
            self.conn.handle_input(now);
            self.drain_events(now);
        }
        let mut budget = READ_BUDGET;
        loop {
            let room = self.conn.input_room();
            if room == 0 {
                self.input_stalled = !self.conn.is_closed();
                return;
            }
            match self.transport.read_into(self.conn.input_buffer(), room) {
                Ok(0) => {
                    self.conn.handle_eof();
                    break;
                }
                Ok(n) => {
                    if !self.sniffed && self.conn.input_buffer().len() >= 3 {
                        self.sniffed = true;
                        if looks_like_tls(self.conn.input_buffer()) {
                            let message = "the peer speaks TLS but this connection is plain (use a tls: address on both sides)";
                            self.conn.close(ConnError::Tls(message.into()));
                            break;
                        }
                    }
                    self.conn.record_bytes_in(n);
                    self.conn.handle_input(now);
                    self.send_control(now);
                    self.drain_events(now);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.read_pending = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail_io(e);
                    break;
                }
            }
        }
        self.drain_events(now);
        // PONGs arrive with input; each may shorten the smallest round trip, which bounds
        // the receive buffer, or raise the estimate of the path, which may grow it.
        if let Some(rtt) = self.conn.min_rtt() {
            if self.bounded_at.is_none_or(|at| rtt < at) {
                self.bounded_at = Some(rtt);
                self.receive_bounded |= self.transport.socket.bound_receive_queue(rtt);
            }
        }
        if let Some(bytes) = self.conn.poll_buffer_hint() {
            self.transport
                .socket
                .fit_buffers(bytes, self.receive_bounded);
        }
    }

    /// Ends the connection for a transport failure: TLS (with the reason, to both users) or
    /// the socket's.
    fn fail_io(&mut self, e: io::Error) {
        match TlsFailure::of(&e) {
            Some(message) => {
                // A server's operator needs the line; a client's user gets it in the error.
                if self.provider.is_some() {
                    log::warn!("{}: {message}", self.peer);
                } else {
                    log::info!("{}: {message}", self.peer);
                }
                self.conn.close(ConnError::Tls(message.to_owned()));
            }
            None => self.conn.handle_io_error(e.to_string()),
        }
    }

    pub fn on_writable(&mut self) {
        self.writable = true;
    }

    /// Writes as much as the socket takes, scheduling frames as room appears.
    pub fn flush(&mut self, now: Instant) {
        self.write_pending = false;
        let mut budget = WRITE_BUDGET;
        loop {
            let target = if self.conn.is_interactive(now) {
                INTERACTIVE_TRANSMIT_TARGET
            } else {
                TRANSMIT_TARGET
            };
            if self.out.len() < target {
                self.conn.poll_transmit(now, &mut self.out, target);
                // Scheduling may free room in stream queues (Writable) or abort streams.
                self.drain_events(now);
            }
            if !self.write_once(now, &mut budget) {
                break;
            }
            // A source's wake-up (an interactive stream's next message) is served at the next
            // turn: ending the burst here bounds its wait to one write, not the whole budget
            // and the work of every source the burst made writable.
            if self.shared.has_pending() {
                self.write_pending = true;
                break;
            }
        }
        if self.input_stalled && self.conn.input_room() > 0 {
            self.input_stalled = false;
            self.read_pending = true;
        }
        let stuck = !self.writable || !self.transport.accepts_plaintext();
        if self.conn.is_closed() && (self.out.is_empty() || stuck) {
            // What could be written of a final GOAWAY (or TLS alert) was written; the peer
            // learns the rest from the close.
            self.drain_events(now);
            if !self.finished {
                self.transport.close();
            }
            self.finished = true;
        }
    }

    /// Sends the control frames that input just produced (a PONG above all) before the events
    /// that input also produced are handled: opening volumes for a batch of OPENs can keep the
    /// loop for milliseconds, and a PONG held behind that makes the peer's round trip, which
    /// sizes its windows, look longer than the path. One write; what the socket does not take
    /// goes with the next flush. Only while the transmit queue has room, as in `flush`: a peer
    /// that sends PINGs and reads nothing fills the connection's control backlog, which pauses
    /// its input, rather than our queue. Not while that backlog holds input paused, either:
    /// `flush` drains it and resumes reading (edge-triggered readiness will not).
    fn send_control(&mut self, now: Instant) {
        if self.writable
            && !self.conn.is_input_paused()
            && self.out.len() < TRANSMIT_TARGET
            && self.conn.poll_control(&mut self.out)
        {
            let mut budget = WRITE_BUDGET;
            self.write_once(now, &mut budget);
        }
    }

    /// One write of the transmit queue (TLS records first). False once nothing more can be
    /// written now: the socket is full, the queue is empty, the budget is spent or the
    /// connection failed.
    fn write_once(&mut self, now: Instant, budget: &mut usize) -> bool {
        if !self.writable {
            return false;
        }
        // TLS records of the handshake or alerts go out even with no frames to send.
        match self.transport.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.writable = false;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                self.fail_io(e);
                self.drain_events(now);
                self.out = Transmit::default();
                return false;
            }
        }
        if self.out.is_empty() || !self.transport.accepts_plaintext() {
            return false;
        }
        if *budget == 0 {
            self.write_pending = true;
            return false;
        }
        let mut slices = [IoSlice::new(&[]); IOV_MAX];
        let n = self.out.io_slices(&mut slices);
        match self.transport.write_vectored(&slices[..n]) {
            Ok(written) => {
                self.out.advance(written);
                *budget = budget.saturating_sub(written);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.writable = false;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                self.fail_io(e);
                self.drain_events(now);
                self.out = Transmit::default();
                false
            }
        }
    }

    /// Bytes this connection holds for the peer: its transmit queue, control backlog and the
    /// streams' send queues.
    pub fn send_queued(&self) -> u64 {
        (self.out.len() + self.transport.queued()) as u64 + self.conn.stats().send_queued
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
            self.drain_events(now);
        }
    }

    /// The socket reported an error condition.
    pub fn on_error(&mut self, now: Instant) {
        let message = match self.transport.socket.take_error() {
            Ok(Some(e)) => e.to_string(),
            Ok(None) => return,
            Err(e) => e.to_string(),
        };
        self.conn.handle_io_error(message);
        self.drain_events(now);
    }

    /// Ends the connection for the engine's shutdown. With nothing in flight or waiting it is
    /// the graceful shutdown of docs/PROTOCOL.md (GOAWAY GOING_AWAY: the peer sees a clean
    /// close, not an error); otherwise the transfers are cut off (GOAWAY CANCELLED).
    pub fn shut_down(&mut self, now: Instant) {
        let idle = self.locals.is_empty() && self.conn.streams().next().is_none();
        if idle && self.conn.is_established() {
            self.conn.go_away();
            self.drain_events(now);
        }
        if !self.conn.is_closed() {
            self.close(ConnError::LocallyClosed, now);
        }
    }

    /// Ends the connection now.
    pub fn close(&mut self, error: ConnError, now: Instant) {
        self.conn.close(error);
        self.drain_events(now);
    }
}

fn failure(reason: Reason, message: impl Into<String>, origin: Origin) -> TransferError {
    TransferError {
        reason,
        message: message.into(),
        origin,
    }
}
