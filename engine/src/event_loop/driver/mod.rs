//! One connection as the loop sees it: the socket, the protocol state, and the sources and
//! sinks of its streams. Everything here runs on the loop thread and never blocks: sources and
//! sinks only queue work and answer polls.
//!
//! This module holds the connection's local endpoints and acts on the protocol's events;
//! `endpoints` moves content between them and their streams, `socket_io` moves bytes between
//! the socket and the protocol state.

mod clip;
mod endpoints;
mod socket_io;

pub use socket_io::{INTERACTIVE_TRANSMIT_TARGET, TRANSMIT_TARGET};

use super::snapshot::{ConnectionSnapshot, StreamSnapshot};
use super::transport::Transport;
use super::{
    ConnectionId, OpenRequest, Origin, PeerIdentity, Provider, Shared, TransferError,
    TransferReport,
};
use crate::proto::{
    ConnError, Connection, Event, Op, OpenError, OpenOptions, Reason, StreamId, StreamStats,
    Transmit,
};
use crate::range::RangeSet;
use crate::volume::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Called once when a transfer this side started ends.
pub type OnDone = Box<dyn FnOnce(TransferReport) + Send>;

/// A download or upload asked for by the local user.
pub struct Transfer {
    /// `Op::Write` needs a reader endpoint, every other op a writer.
    pub op: Op,
    pub name: String,
    pub options: OpenOptions,
    /// For `Op::Read`: only these ranges of the volume, written at their offsets (the peer
    /// must announce RANGES, else the transfer fails with `Reason::Unsupported`). `None`: all.
    pub ranges: Option<Arc<RangeSet>>,
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
    ranges: Option<Arc<RangeSet>>,
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
                ranges: None,
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
        let endpoint = match (transfer.endpoint, &transfer.ranges) {
            // An update sends only its ranges, from a source that may not seek to them.
            (Endpoint::Reader(reader), Some(ranges)) if !reader.serves_ranges() => {
                Endpoint::Reader(Box::new(clip::Clip::new(reader, Arc::clone(ranges))))
            }
            (endpoint, _) => endpoint,
        };
        let key = self.new_local(endpoint, op, transfer.name, now);
        let local = self.locals.get_mut(&key).unwrap();
        local.options = transfer.options;
        local.ranges = transfer.ranges;
        local.on_done = Some(transfer.on_done);
        let mismatch = matches!(
            (&local.endpoint, op),
            (
                Endpoint::Reader(_),
                Op::Read | Op::List | Op::Extents | Op::Digests
            ) | (Endpoint::Writer(_), Op::Write)
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
            match self.conn.open_ranged(
                local.op,
                &local.name,
                local.options,
                local.size,
                local.ranges.clone(),
            ) {
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
                    let why = if local.options.resume().is_some() {
                        "the peer keeps no partial uploads (it does not announce RESUME; \
                         see serve --resume-keep)"
                    } else if local.options.update().is_some() {
                        "the peer cannot update a volume (it does not announce UPDATE)"
                    } else if local.ranges.is_some() {
                        "the peer cannot serve ranges of a volume (it does not announce RANGES)"
                    } else {
                        "the peer cannot verify what it writes (it does not announce VERIFY)"
                    };
                    let error = failure(Reason::Unsupported, why, Origin::Protocol);
                    self.end_local(key, StreamStats::default(), Err(error), now);
                }
            }
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
                    ranges,
                } => {
                    let request = OpenRequest {
                        name,
                        options,
                        size,
                        ranges,
                        peer: self.peer.clone(),
                        identity: self.identity.clone(),
                    };
                    self.on_open_requested(stream, op, request, now)
                }
                Event::Accepted {
                    stream,
                    size,
                    identity,
                } => {
                    let Some(&key) = self.by_stream.get(&stream) else {
                        continue;
                    };
                    let notify = self.notify_for(key);
                    let local = self.locals.get_mut(&key).unwrap();
                    local.gate = Gate::Open;
                    match &mut local.endpoint {
                        Endpoint::Writer(writer) => {
                            local.size = size;
                            writer.source_identity(identity);
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

    fn on_open_requested(&mut self, stream: StreamId, op: Op, request: OpenRequest, now: Instant) {
        if self.conn.is_closed() {
            // Refused or failed in the same batch of input: nothing is served.
            return;
        }
        let Some(provider) = self.provider.clone() else {
            self.conn
                .reject(stream, Reason::Unsupported, "this side serves no volumes");
            return;
        };
        let opened = match op {
            Op::Read => provider.open_read(&request).map(Endpoint::Reader),
            Op::Write => provider.open_write(&request).map(Endpoint::Writer),
            Op::List => provider.open_list(&request).map(Endpoint::Reader),
            Op::Extents => provider.open_extents(&request).map(Endpoint::Reader),
            Op::Digests => provider.open_digests(&request).map(Endpoint::Reader),
        };
        let endpoint = match opened {
            Ok(Endpoint::Reader(reader)) if request.ranges.is_some() && !reader.serves_ranges() => {
                let ranges = request.ranges.clone().expect("checked above");
                Endpoint::Reader(Box::new(clip::Clip::new(reader, ranges)))
            }
            Ok(endpoint) => endpoint,
            Err(e) => {
                log::info!("{}: refusing {op:?} of {:?}: {e}", self.peer, request.name);
                return self.conn.reject(stream, e.reason, &e.message);
            }
        };
        let (options, size) = (request.options, request.size);
        let key = self.new_local(endpoint, op, request.name, now);
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

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
            self.drain_events(now);
        }
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
