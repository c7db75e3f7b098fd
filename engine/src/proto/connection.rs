//! One connection's protocol state, without I/O.
//!
//! Call order, for a driver that owns the socket:
//! - read from the socket into [`Connection::input_buffer`], then call [`Connection::handle_input`];
//!   call [`Connection::handle_eof`] when the peer closed its side;
//! - drain [`Connection::poll_event`] and act on each event (feed chunks to sinks, open volumes);
//! - give chunks from sources with [`Connection::send_chunk`] while [`Connection::can_send`];
//! - when the socket can take bytes, fill a [`Transmit`] with [`Connection::poll_transmit`] and
//!   writev it;
//! - arm a timer for [`Connection::poll_timeout`] and call [`Connection::handle_timeout`] then.
//!
//! Time is passed in; nothing here reads a clock, blocks or touches a file descriptor.

use super::error::ConnError;
use super::flow::{RecvWindow, SendCredit, HOLE_COST};
use super::frame::{
    self, DecodeError, Features, Frame, Hello, Op, OpenOptions, Reason, StreamId, HELLO_LEN,
    MIN_MAX_FRAME, VERSION_MAX, VERSION_MIN,
};
use super::schedule::{Entry, Scheduler};
use super::stream::{Half, SendHalf, State, Stream, StreamStats};
use super::transmit::Transmit;
use crate::volume::Chunk;
use bytes::{Bytes, BytesMut};
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Which end of the connection this is. Clients number their streams odd, servers even, so
/// both may open streams without colliding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Limits and timings of one connection. The receive limits are announced to the peer in the
/// handshake; the others stay local.
#[derive(Debug, Clone)]
pub struct Config {
    pub features: Features,
    /// Largest frame body accepted from the peer.
    pub max_frame: u32,
    /// Credit granted to each stream the peer sends on.
    pub stream_window: u32,
    /// Credit granted to the whole connection.
    pub conn_window: u32,
    /// Streams the peer may have open towards us at once.
    pub max_streams: u32,
    /// Largest DATA payload we send (also bounded by the peer's `max_frame`). Smaller frames
    /// shorten the wait of an interactive stream behind a bulk one.
    pub send_frame: u32,
    /// Payload bytes a stream may queue locally before its source is paused (our memory cap,
    /// separate from the peer's credit).
    pub send_buffer: u32,
    /// Payload bytes all streams of the connection may queue together. Past it only a stream
    /// with an empty queue may take a chunk, so every stream keeps moving while memory stays
    /// near this cap plus one source chunk per stream (not `send_buffer` per stream).
    pub conn_send_buffer: u32,
    /// Abort a stream that made no progress (no frame sent or received, no credit, nothing
    /// consumed by its sink) for this long: a sink or source that hangs forever costs its
    /// stream, with a reason, instead of holding resources until the connection dies.
    pub stream_timeout: Duration,
    /// Close a connection whose peer has not completed its Hello in this time, so silent or
    /// half-speaking peers cannot hold connection slots.
    pub handshake_timeout: Duration,
    /// Send PING after this long without a complete frame from the peer.
    pub keepalive_interval: Duration,
    /// Close the connection after this long without a complete frame from the peer. Partial
    /// frames do not count, or a peer dribbling bytes could hold the connection forever.
    pub idle_timeout: Duration,
    /// Close the connection when a frame stays incomplete this long (slowloris). Must leave
    /// room for the largest frame (`max_frame`) on the slowest link to be served: 30 s allows
    /// about 9 KB/s with the default `max_frame`.
    pub frame_timeout: Duration,
    /// Bytes of control frames (PONG, WINDOW, REJECT...) waiting for the socket beyond which
    /// no more input is read or processed. Answers to the peer's frames are generated from its
    /// input, so a peer that floods PINGs but never reads would otherwise grow this queue
    /// without bound; with the cap it gets backpressure instead, then the idle timeout.
    pub control_backlog: u32,
}

impl Default for Config {
    fn default() -> Self {
        // What one connection can make us hold is about max_frame + 64 KiB of input,
        // conn_window of received data, and TRANSMIT_TARGET + control_backlog + send_buffer per
        // sending stream of output: a few MiB by default, and max_streams bounds the streams.
        Config {
            features: Features::ALL,
            // A 256 KiB source chunk fits one frame with room for the DATA header.
            max_frame: 256 * 1024 + 64,
            stream_window: 2 * 1024 * 1024,
            conn_window: 32 * 1024 * 1024,
            max_streams: 1024,
            send_frame: 128 * 1024,
            send_buffer: 512 * 1024,
            conn_send_buffer: 16 * 1024 * 1024,
            stream_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            frame_timeout: Duration::from_secs(30),
            // Over 3000 PONGs or WINDOWs: never reached by a peer that reads.
            control_backlog: 64 * 1024,
        }
    }
}

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake finished; streams may be opened.
    Connected { version: u16, features: Features },
    /// The peer asks to open a stream: answer with `accept` or `reject`.
    OpenRequested {
        stream: StreamId,
        op: Op,
        name: String,
        options: OpenOptions,
        /// For `Op::Write`, the length of the content the peer will send.
        size: u64,
    },
    /// The peer accepted a stream we opened.
    Accepted { stream: StreamId, size: u64 },
    /// The peer refused a stream we opened.
    Rejected {
        stream: StreamId,
        reason: Reason,
        message: String,
    },
    /// A chunk for the sink of a receiving stream; `Chunk::End` once the sender finished.
    Chunk { stream: StreamId, chunk: Chunk },
    /// A sending stream has room for more chunks.
    Writable { stream: StreamId },
    /// The stream ended verified on both sides.
    Completed {
        stream: StreamId,
        stats: StreamStats,
    },
    /// The stream ended without success.
    Aborted {
        stream: StreamId,
        reason: Reason,
        message: String,
        by_peer: bool,
        stats: StreamStats,
    },
    /// The connection is over; every stream has been reported.
    /// `None` when it ended cleanly after GOAWAY.
    Closed { error: Option<ConnError> },
}

/// Why `open_stream` could not open a stream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The handshake has not finished yet.
    NotReady,
    /// The peer's stream limit is reached; retry when a stream ends.
    TooManyStreams,
    /// GOAWAY was sent or received, or the connection is closing.
    GoingAway,
    /// The name cannot be sent: empty (except for LIST, where it must be) or too long.
    InvalidName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Handshake,
    Open,
    /// Failed or closed: GOAWAY may still be in the transmit buffer; nothing else happens.
    Closed,
}

/// Remembers streams we aborted, so frames the peer sent before it saw our ABORT are dropped
/// instead of treated as violations. Bounded: old entries are forgotten first.
#[derive(Debug, Default)]
struct Tombstones {
    set: HashSet<StreamId>,
    order: VecDeque<StreamId>,
}

const TOMBSTONES_MAX: usize = 4096;

impl Tombstones {
    fn insert(&mut self, id: StreamId) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > TOMBSTONES_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
    fn contains(&self, id: StreamId) -> bool {
        self.set.contains(&id)
    }
}

/// Whether a sending stream may take another chunk from its source.
fn send_room(send: &SendHalf, queued_total: usize, config: &Config) -> bool {
    let ends = matches!(send.queue.back(), Some(Chunk::End { .. }));
    let stream_room = send.queued_bytes < config.send_buffer as usize && send.queue.len() < 64;
    let conn_room = send.queued_bytes == 0 || queued_total < config.conn_send_buffer as usize;
    !ends && stream_room && conn_room
}

/// Zeroes that expanded holes are sent from, so a peer without SPARSE costs no allocation.
static ZEROES: [u8; 128 * 1024] = [0; 128 * 1024];

/// Connection-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Credit-bearing bytes received and not yet consumed by sinks, over all streams.
    pub recv_buffered: u64,
    pub streams_completed: u64,
    pub streams_aborted: u64,
    /// Last PING round trip.
    pub rtt: Option<Duration>,
    /// Bytes waiting to be sent that this connection holds: control frames not yet handed to
    /// the driver, plus DATA queued by the streams' sources. The driver's own transmit queue
    /// comes on top.
    pub send_queued: u64,
}

pub struct Connection {
    side: Side,
    config: Config,
    phase: Phase,
    version: u16,
    features: Features,
    peer: Option<Hello>,
    input: BytesMut,
    /// Encoded control frames; they go out ahead of any DATA/HOLE (they bypass the scheduler).
    control: BytesMut,
    /// Scratch space DATA headers are encoded into and split off from.
    headers: BytesMut,
    streams: Slab<Stream>,
    ids: HashMap<StreamId, usize>,
    scheduler: Scheduler,
    /// Streams ready to send but waiting for connection credit.
    /// Streams ready to send but waiting for connection credit, and whether each was a new
    /// flow (it keeps its place ahead of the backlog when credit returns).
    conn_blocked: Vec<(Entry, bool)>,
    conn_credit: SendCredit,
    conn_window: RecvWindow,
    tombstones: Tombstones,
    next_local_id: u32,
    highest_peer_id: u32,
    /// Streams the peer opened that are still open (counted against our `max_streams`).
    peer_streams: u32,
    /// Streams we opened that are still open (counted against the peer's `max_streams`).
    local_streams: u32,
    sent_goaway: bool,
    peer_goaway: bool,
    events: VecDeque<Event>,
    handshake_deadline: Instant,
    /// When the last complete frame (or the Hello) arrived.
    last_heard: Instant,
    /// Since when the input buffer has held the start of a frame that is not complete yet;
    /// `None` while it is empty or processing is paused.
    partial_since: Option<Instant>,
    /// Processing stopped with input left in the buffer because the control backlog is full.
    input_paused: bool,
    ping_sent: Option<(u64, Instant)>,
    ping_counter: u64,
    stats: ConnStats,
    /// Payload bytes queued by all sending streams.
    queued_total: usize,
    /// When to look for streams that stopped making progress.
    stream_check_at: Instant,
    /// Why the connection ended, once it has.
    error: Option<ConnError>,
}

impl Connection {
    pub fn new(side: Side, config: Config, now: Instant) -> Self {
        let mut control = BytesMut::with_capacity(4096);
        Hello {
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            features: config.features,
            max_frame: config.max_frame,
            stream_window: config.stream_window,
            conn_window: config.conn_window,
            max_streams: config.max_streams,
        }
        .encode(&mut control);
        Connection {
            side,
            phase: Phase::Handshake,
            version: 0,
            features: Features::default(),
            peer: None,
            input: BytesMut::with_capacity(config.max_frame as usize + 64 * 1024),
            control,
            headers: BytesMut::with_capacity(16 * 1024),
            streams: Slab::new(),
            ids: HashMap::new(),
            scheduler: Scheduler::default(),
            conn_blocked: Vec::new(),
            conn_credit: SendCredit::new(0),
            conn_window: RecvWindow::new(config.conn_window),
            tombstones: Tombstones::default(),
            next_local_id: if side == Side::Client { 1 } else { 2 },
            highest_peer_id: 0,
            peer_streams: 0,
            local_streams: 0,
            sent_goaway: false,
            peer_goaway: false,
            events: VecDeque::new(),
            handshake_deadline: now + config.handshake_timeout,
            last_heard: now,
            partial_since: None,
            input_paused: false,
            ping_sent: None,
            ping_counter: 0,
            stats: ConnStats::default(),
            queued_total: 0,
            stream_check_at: now,
            error: None,
            config,
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The features both sides support; empty until the handshake is done.
    pub fn features(&self) -> Features {
        self.features
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Open
    }

    /// True once the connection failed or was closed: flush the transmit buffer and drop it.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Why the connection ended (`None` while open, or after a clean GOAWAY close).
    pub fn error(&self) -> Option<&ConnError> {
        self.error.as_ref()
    }

    pub fn stats(&self) -> ConnStats {
        let mut stats = self.stats;
        stats.recv_buffered = self.conn_window.buffered();
        let queued: usize = self
            .streams
            .iter()
            .filter_map(|(_, s)| match &s.half {
                Half::Send(send) => Some(send.queued_bytes),
                Half::Recv(_) => None,
            })
            .sum();
        stats.send_queued = (self.control.len() + queued) as u64;
        stats
    }

    /// Open streams, in both directions.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Where the driver reads socket bytes to. Reading at most `input_room` bytes into it keeps
    /// the buffer bounded by one maximal frame plus one read.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// How many more bytes the driver should read now. Zero while the connection is closed,
    /// and while the control backlog is full: the driver must then try again after it sent
    /// something, and call `handle_input` even if nothing new was read (see
    /// [`Connection::is_input_paused`]).
    pub fn input_room(&self) -> usize {
        if self.phase == Phase::Closed || self.backlog_full() {
            return 0;
        }
        let cap = self.config.max_frame as usize + frame::HEADER_LEN + 64 * 1024;
        cap.saturating_sub(self.input.len())
    }

    /// Processes everything in the input buffer, or as much as the control backlog allows.
    pub fn handle_input(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            self.input.clear();
            return;
        }
        if let Err(error) = self.process_input(now) {
            self.fail(error);
        }
    }

    /// Complete frames may be waiting in the input buffer, unprocessed because the control
    /// backlog was full: once `input_room` is non-zero again, call `handle_input`.
    pub fn is_input_paused(&self) -> bool {
        self.input_paused
    }

    fn backlog_full(&self) -> bool {
        self.control.len() >= self.config.control_backlog as usize
    }

    /// The peer closed its side of the connection.
    pub fn handle_eof(&mut self) {
        if self.phase != Phase::Closed {
            self.fail(ConnError::PeerClosed);
        }
    }

    /// The socket failed.
    pub fn handle_io_error(&mut self, message: String) {
        if self.phase != Phase::Closed {
            self.fail(ConnError::Io(message));
        }
    }

    /// Counts bytes read from the socket (statistics only).
    pub fn record_bytes_in(&mut self, n: usize) {
        self.stats.bytes_in += n as u64;
    }

    fn process_input(&mut self, now: Instant) -> Result<(), ConnError> {
        if self.phase == Phase::Handshake {
            if self.input.len() < HELLO_LEN {
                // A non-volstream peer is refused as soon as its first bytes disagree.
                let seen = self.input.len().min(frame::MAGIC.len());
                if self.input[..seen] != frame::MAGIC[..seen] {
                    return Err(DecodeError::BadMagic.into());
                }
                return Ok(());
            }
            let hello_bytes: [u8; HELLO_LEN] = self.input[..HELLO_LEN].try_into().unwrap();
            let _ = self.input.split_to(HELLO_LEN);
            let hello = Hello::decode(&hello_bytes)?;
            self.last_heard = now;
            self.complete_handshake(hello, now)?;
        }
        // A pause is ours, not the peer's: the frame clock restarts when processing resumes.
        let mut progressed = std::mem::take(&mut self.input_paused);
        while self.phase == Phase::Open {
            if self.backlog_full() {
                self.input_paused = true;
                break;
            }
            match Frame::decode(&mut self.input, self.config.max_frame)? {
                Some(frame) => {
                    self.last_heard = now;
                    progressed = true;
                    self.handle_frame(frame, now)?;
                }
                None => break,
            }
        }
        if self.input.is_empty() || self.input_paused {
            self.partial_since = None;
        } else if progressed || self.partial_since.is_none() {
            self.partial_since = Some(now);
        }
        Ok(())
    }

    fn complete_handshake(&mut self, peer: Hello, _now: Instant) -> Result<(), ConnError> {
        let version = VERSION_MAX.min(peer.version_max);
        if peer.version_min > peer.version_max || version < VERSION_MIN.max(peer.version_min) {
            return Err(ConnError::Handshake(format!(
                "peer speaks protocol versions {}..={}, we speak {}..={}",
                peer.version_min, peer.version_max, VERSION_MIN, VERSION_MAX
            )));
        }
        if peer.max_frame < MIN_MAX_FRAME {
            return Err(ConnError::Handshake(format!(
                "peer's max frame {} is below the minimum {}",
                peer.max_frame, MIN_MAX_FRAME
            )));
        }
        if (peer.stream_window as u64) < 2 * HOLE_COST || peer.conn_window < peer.stream_window {
            return Err(ConnError::Handshake(format!(
                "peer's windows (stream {}, connection {}) are too small",
                peer.stream_window, peer.conn_window
            )));
        }
        self.version = version;
        self.features = self.config.features.intersect(peer.features);
        self.conn_credit = SendCredit::new(peer.conn_window);
        self.peer = Some(peer);
        self.phase = Phase::Open;
        log::debug!(
            "{:?} handshake done: version {version}, features {:#x}",
            self.side,
            self.features.0
        );
        self.events.push_back(Event::Connected {
            version,
            features: self.features,
        });
        Ok(())
    }

    fn is_local_id(&self, id: StreamId) -> bool {
        let odd = id.0 % 2 == 1;
        odd == (self.side == Side::Client)
    }

    /// Whether `id` names a stream that existed once (so late frames for it are plausible).
    fn existed(&self, id: StreamId) -> bool {
        if self.is_local_id(id) {
            id.0 < self.next_local_id
        } else {
            id.0 <= self.highest_peer_id
        }
    }

    /// Finds the stream a frame is for. `Ok(None)`: the stream is gone because we aborted it,
    /// so the frame is dropped. A stream that never existed, or ended normally, is a violation.
    fn lookup(&self, id: StreamId, what: &str) -> Result<Option<usize>, ConnError> {
        if let Some(&slot) = self.ids.get(&id) {
            return Ok(Some(slot));
        }
        if self.tombstones.contains(id) {
            return Ok(None);
        }
        let why = if self.existed(id) {
            "closed"
        } else {
            "unknown"
        };
        Err(ConnError::Protocol(format!("{what} for {why} {id}")))
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), ConnError> {
        match frame {
            Frame::Open {
                stream,
                op,
                options,
                size,
                name,
            } => self.on_open(stream, op, options, size, name),
            Frame::Accept { stream, size } => self.on_accept(stream, size),
            Frame::Reject {
                stream,
                reason,
                message,
            } => {
                let Some(slot) = self.lookup(stream, "REJECT")? else {
                    return Ok(());
                };
                if self.streams[slot].state != State::Opening {
                    return Err(ConnError::Protocol(format!(
                        "REJECT for {stream}, which was already accepted"
                    )));
                }
                self.remove(slot);
                self.stats.streams_aborted += 1;
                self.events.push_back(Event::Rejected {
                    stream,
                    reason,
                    message,
                });
                Ok(())
            }
            Frame::Data {
                stream,
                offset,
                payload,
            } => {
                let len = payload.len() as u64;
                let chunk = Chunk::Data {
                    offset,
                    bytes: payload,
                };
                self.on_content(stream, offset, len, len, chunk)
            }
            Frame::Hole {
                stream,
                offset,
                len,
            } => {
                if !self.features.contains(Features::SPARSE) {
                    return Err(ConnError::Protocol(
                        "HOLE frame although SPARSE was not negotiated".into(),
                    ));
                }
                let chunk = Chunk::Hole { offset, len };
                self.on_content(stream, offset, len, HOLE_COST, chunk)
            }
            Frame::Window { stream, increment } => self.on_window(stream, increment),
            Frame::Finish {
                stream,
                length,
                digest,
                ack,
            } => self.on_finish(stream, length, digest, ack),
            Frame::Abort {
                stream,
                reason,
                message,
            } => {
                if let Some(slot) = self.lookup(stream, "ABORT")? {
                    self.end_aborted(slot, reason, message, true);
                }
                Ok(())
            }
            Frame::Ping { data } => {
                Frame::Pong { data }.encode(&mut self.control);
                Ok(())
            }
            Frame::Pong { data } => {
                if let Some((sent_data, at)) = self.ping_sent {
                    if sent_data == data {
                        self.stats.rtt = Some(now.saturating_duration_since(at));
                        self.ping_sent = None;
                    }
                }
                Ok(())
            }
            Frame::GoAway {
                last_stream,
                reason,
                message,
            } => self.on_goaway(last_stream, reason, message),
        }
    }

    fn on_open(
        &mut self,
        id: StreamId,
        op: Op,
        options: OpenOptions,
        size: u64,
        name: String,
    ) -> Result<(), ConnError> {
        if self.is_local_id(id) || id.0 <= self.highest_peer_id {
            return Err(ConnError::Protocol(format!(
                "OPEN for {id}, which is not a new stream id of the peer"
            )));
        }
        self.highest_peer_id = id.0;
        if self.sent_goaway {
            Frame::Reject {
                stream: id,
                reason: Reason::GoingAway,
                message: "connection is going away".into(),
            }
            .encode(&mut self.control);
            return Ok(());
        }
        if self.peer_streams >= self.config.max_streams {
            return Err(ConnError::Protocol(format!(
                "peer opened more than the {} streams it was allowed",
                self.config.max_streams
            )));
        }
        let stream = match op {
            Op::Read | Op::List | Op::Extents => {
                Stream::sender(id, op, options, State::Requested, 0)
            }
            Op::Write => Stream::receiver(
                id,
                op,
                options,
                State::Requested,
                size,
                self.config.stream_window,
            ),
        };
        self.insert(stream);
        self.peer_streams += 1;
        self.events.push_back(Event::OpenRequested {
            stream: id,
            op,
            name,
            options,
            size,
        });
        Ok(())
    }

    fn on_accept(&mut self, id: StreamId, size: u64) -> Result<(), ConnError> {
        let Some(slot) = self.lookup(id, "ACCEPT")? else {
            return Ok(());
        };
        let stream = &mut self.streams[slot];
        if stream.state != State::Opening {
            return Err(ConnError::Protocol(format!("second ACCEPT for {id}")));
        }
        if stream.op == Op::Write && size != stream.size {
            let message = format!(
                "peer accepted {} bytes for a {}-byte upload",
                size, stream.size
            );
            self.abort(id, Reason::Protocol, &message);
            return Ok(());
        }
        stream.size = size;
        stream.state = State::Open;
        stream.progress += 1;
        self.events.push_back(Event::Accepted { stream: id, size });
        self.schedule(slot);
        Ok(())
    }

    fn on_content(
        &mut self,
        id: StreamId,
        offset: u64,
        len: u64,
        cost: u64,
        chunk: Chunk,
    ) -> Result<(), ConnError> {
        self.conn_window.receive(cost).map_err(|e| {
            ConnError::FlowControl(format!(
                "{id} sent {} credit with {} left on the connection",
                e.cost, e.outstanding
            ))
        })?;
        let Some(slot) = self.lookup(id, "DATA/HOLE")? else {
            self.release_connection(cost);
            return Ok(());
        };
        let stream = &mut self.streams[slot];
        let (Some(recv), State::Open) = (
            match &mut stream.half {
                Half::Recv(r) => Some(r),
                Half::Send(_) => None,
            },
            stream.state,
        ) else {
            return Err(ConnError::Protocol(format!(
                "DATA/HOLE for {id}, which is not receiving"
            )));
        };
        recv.window.receive(cost).map_err(|e| {
            ConnError::FlowControl(format!(
                "{id} sent {} credit with {} left on the stream",
                e.cost, e.outstanding
            ))
        })?;
        recv.unconsumed.push_back(cost);
        let buffered = recv.window.buffered();
        stream.progress += 1;
        let stats = &mut stream.stats;
        stats.peak_buffered = stats.peak_buffered.max(buffered);
        stats.wire_bytes += frame::HEADER_LEN as u64
            + 8
            + match &chunk {
                Chunk::Data { .. } => len,
                _ => 8,
            };
        match &chunk {
            Chunk::Data { .. } => stats.data_bytes += len,
            _ => stats.hole_bytes += len,
        }
        // A misbehaving sender harms only its own stream: the sink never sees the chunk.
        let expected = recv.next_offset;
        if offset != expected || len == 0 || offset.checked_add(len).is_none_or(|e| e > stream.size)
        {
            let message = format!(
                "chunk at {offset}+{len} out of order or past the end (expected offset {expected}, size {})",
                stream.size
            );
            // `cost` is already in `unconsumed`, which `abort` returns to the connection window.
            self.abort(id, Reason::Protocol, &message);
            return Ok(());
        }
        recv.next_offset = offset + len;
        self.events.push_back(Event::Chunk { stream: id, chunk });
        Ok(())
    }

    fn on_window(&mut self, id: StreamId, increment: u32) -> Result<(), ConnError> {
        if id.is_connection() {
            self.conn_credit.grant(increment).map_err(|_| {
                ConnError::FlowControl("connection WINDOW overflows the credit limit".into())
            })?;
            // Each goes back to the list it was taken from: a stream that had just woken up
            // (an interactive one) must not queue behind every bulk stream for the wait.
            for (entry, was_new) in std::mem::take(&mut self.conn_blocked) {
                if self
                    .streams
                    .get(entry.slot)
                    .is_none_or(|s| s.id != entry.id)
                {
                    continue;
                }
                if was_new {
                    self.scheduler.activate(entry);
                } else {
                    self.scheduler.requeue(entry);
                }
            }
            return Ok(());
        }
        let Some(slot) = self.lookup(id, "WINDOW")? else {
            return Ok(());
        };
        let Some(send) = self.streams[slot].send_half() else {
            return Err(ConnError::Protocol(format!(
                "WINDOW for {id}, which is not sending"
            )));
        };
        send.credit
            .grant(increment)
            .map_err(|_| ConnError::FlowControl(format!("WINDOW for {id} overflows")))?;
        self.streams[slot].progress += 1;
        self.schedule(slot);
        Ok(())
    }

    fn on_finish(
        &mut self,
        id: StreamId,
        length: u64,
        digest: Option<u32>,
        ack: bool,
    ) -> Result<(), ConnError> {
        let Some(slot) = self.lookup(id, "FINISH")? else {
            return Ok(());
        };
        let stream = &mut self.streams[slot];
        if ack {
            if stream.state != State::AwaitingAck {
                return Err(ConnError::Protocol(format!(
                    "FINISH acknowledgement for {id} before its FINISH"
                )));
            }
            self.end_completed(slot);
            return Ok(());
        }
        let (Some(recv), State::Open) = (
            match &mut stream.half {
                Half::Recv(r) => Some(r),
                Half::Send(_) => None,
            },
            stream.state,
        ) else {
            return Err(ConnError::Protocol(format!(
                "FINISH for {id}, which is not receiving"
            )));
        };
        if length != stream.size || recv.next_offset != length {
            let message = format!(
                "FINISH at {length} but {} of {} bytes arrived",
                recv.next_offset, stream.size
            );
            self.abort(id, Reason::Protocol, &message);
            return Ok(());
        }
        stream.state = State::Verifying;
        let digest = digest.filter(|_| self.features.contains(Features::DIGEST));
        self.events.push_back(Event::Chunk {
            stream: id,
            chunk: Chunk::End { length, digest },
        });
        Ok(())
    }

    fn on_goaway(
        &mut self,
        last_stream: StreamId,
        reason: Reason,
        message: String,
    ) -> Result<(), ConnError> {
        if reason != Reason::GoingAway {
            return Err(ConnError::PeerGoAway { reason, message });
        }
        self.peer_goaway = true;
        // Streams we opened that the peer will never process.
        let unprocessed: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| self.is_local_id(s.id) && s.id.0 > last_stream.0)
            .map(|(_, s)| s.id)
            .collect();
        for id in unprocessed {
            if let Some(&slot) = self.ids.get(&id) {
                self.end_aborted(slot, Reason::GoingAway, message.clone(), true);
            }
        }
        self.close_if_drained();
        Ok(())
    }

    // ---- commands from the driver ----

    /// Opens a stream towards the peer. For `Op::Write`, `size` is the content's length.
    pub fn open_stream(
        &mut self,
        op: Op,
        name: &str,
        options: OpenOptions,
        size: u64,
    ) -> Result<StreamId, OpenError> {
        match self.phase {
            Phase::Handshake => return Err(OpenError::NotReady),
            Phase::Closed => return Err(OpenError::GoingAway),
            Phase::Open => {}
        }
        if self.sent_goaway || self.peer_goaway {
            return Err(OpenError::GoingAway);
        }
        if name.is_empty() != (op == Op::List) || name.len() > frame::MAX_NAME_LEN {
            return Err(OpenError::InvalidName);
        }
        let peer_max = self.peer.map_or(0, |p| p.max_streams);
        if self.local_streams >= peer_max {
            return Err(OpenError::TooManyStreams);
        }
        let id = StreamId(self.next_local_id);
        self.next_local_id += 2;
        let stream = match op {
            Op::Read | Op::List | Op::Extents => Stream::receiver(
                id,
                op,
                options,
                State::Opening,
                0,
                self.config.stream_window,
            ),
            Op::Write => {
                let mut s = Stream::sender(id, op, options, State::Opening, size);
                self.init_send_half(&mut s);
                s
            }
        };
        self.insert(stream);
        self.local_streams += 1;
        Frame::Open {
            stream: id,
            op,
            options,
            size,
            name: name.to_owned(),
        }
        .encode(&mut self.control);
        Ok(id)
    }

    fn init_send_half(&self, stream: &mut Stream) {
        let expand =
            !self.features.contains(Features::SPARSE) || stream.options.has(OpenOptions::NO_SPARSE);
        let window = self.peer.map_or(0, |p| p.stream_window);
        if let Half::Send(send) = &mut stream.half {
            send.credit = SendCredit::new(window);
            send.expand_holes = expand;
        }
    }

    /// Accepts a stream the peer asked for. For a read, `size` is the volume's length.
    pub fn accept(&mut self, id: StreamId, size: u64) {
        let Some(&slot) = self.ids.get(&id) else {
            return;
        };
        if self.streams[slot].state != State::Requested {
            return;
        }
        let mut stream = self.streams.remove(slot);
        stream.state = State::Open;
        if stream.op.peer_sends() {
            stream.size = size;
            self.init_send_half(&mut stream);
        }
        let size = stream.size;
        let new_slot = self.streams.insert(stream);
        debug_assert_eq!(new_slot, slot);
        Frame::Accept { stream: id, size }.encode(&mut self.control);
        self.schedule(slot);
    }

    /// Refuses a stream the peer asked for.
    pub fn reject(&mut self, id: StreamId, reason: Reason, message: &str) {
        let Some(&slot) = self.ids.get(&id) else {
            return;
        };
        if self.streams[slot].state != State::Requested {
            return self.abort(id, reason, message);
        }
        Frame::Reject {
            stream: id,
            reason,
            message: message.to_owned(),
        }
        .encode(&mut self.control);
        self.remove(slot);
        self.stats.streams_aborted += 1;
        self.close_if_drained();
    }

    /// Whether a sending stream has room for another chunk from its source. When it has not,
    /// an `Event::Writable` follows once it has.
    pub fn can_send(&mut self, id: StreamId) -> bool {
        let Some(&slot) = self.ids.get(&id) else {
            return false;
        };
        let queued_total = self.queued_total;
        match &mut self.streams[slot].half {
            Half::Send(send) => {
                let room = send_room(send, queued_total, &self.config);
                if !room && !matches!(send.queue.back(), Some(Chunk::End { .. })) {
                    send.stalled_source = true;
                }
                room
            }
            Half::Recv(_) => false,
        }
    }

    /// Queues a chunk from a stream's source. Chunks must come in offset order and end with
    /// `Chunk::End`; a source that breaks this aborts its stream.
    pub fn send_chunk(&mut self, id: StreamId, chunk: Chunk) {
        let Some(&slot) = self.ids.get(&id) else {
            return;
        };
        let size = self.streams[slot].size;
        let digests = self.features.contains(Features::DIGEST);
        let Some(send) = self.streams[slot].send_half() else {
            return;
        };
        let problem = match &chunk {
            Chunk::Data { offset, .. } | Chunk::Hole { offset, .. }
                if *offset != send.next_offset
                    || offset + chunk.logical_len() > size
                    || chunk.logical_len() == 0 =>
            {
                Some(format!(
                    "source gave {}+{} where offset {} of {size} was due",
                    offset,
                    chunk.logical_len(),
                    send.next_offset
                ))
            }
            Chunk::End { length, .. } if *length != size || send.next_offset != size => Some(
                format!("source ended at {} of {size} bytes", send.next_offset),
            ),
            _ => None,
        };
        if let Some(message) = problem {
            return self.abort(id, Reason::Internal, &message);
        }
        send.next_offset += chunk.logical_len();
        if let Chunk::Data { bytes, .. } = &chunk {
            send.queued_bytes += bytes.len();
            self.queued_total += bytes.len();
        }
        let chunk = match chunk {
            Chunk::End { length, digest } => Chunk::End {
                length,
                digest: digest.filter(|_| digests),
            },
            other => other,
        };
        send.queue.push_back(chunk);
        self.can_send(id);
        self.schedule(slot);
    }

    /// The sink of a receiving stream finished `chunks` more chunks; their credit goes back.
    pub fn release(&mut self, id: StreamId, chunks: u64) {
        let Some(&slot) = self.ids.get(&id) else {
            return;
        };
        self.streams[slot].progress += 1;
        let Some(recv) = self.streams[slot].recv_half() else {
            return;
        };
        let mut cost = 0;
        for _ in 0..chunks {
            match recv.unconsumed.pop_front() {
                Some(c) => cost += c,
                None => break,
            }
        }
        if cost == 0 {
            return;
        }
        if let Some(increment) = recv.window.release(cost) {
            Frame::Window {
                stream: id,
                increment,
            }
            .encode(&mut self.control);
        }
        self.release_connection(cost);
    }

    fn release_connection(&mut self, cost: u64) {
        if let Some(increment) = self.conn_window.release(cost) {
            Frame::Window {
                stream: StreamId::CONNECTION,
                increment,
            }
            .encode(&mut self.control);
        }
    }

    /// The sink verified and committed a stream that reached `Chunk::End`.
    pub fn stream_verified(&mut self, id: StreamId) {
        let Some(&slot) = self.ids.get(&id) else {
            return;
        };
        let stream = &self.streams[slot];
        if stream.state != State::Verifying {
            return;
        }
        Frame::Finish {
            stream: id,
            length: stream.size,
            digest: None,
            ack: true,
        }
        .encode(&mut self.control);
        self.end_completed(slot);
    }

    /// Ends a stream with ABORT, telling the peer why.
    pub fn abort(&mut self, id: StreamId, reason: Reason, message: &str) {
        let Some(&slot) = self.ids.get(&id) else {
            return;
        };
        if self.phase == Phase::Open {
            Frame::Abort {
                stream: id,
                reason,
                message: message.to_owned(),
            }
            .encode(&mut self.control);
        }
        self.tombstones.insert(id);
        self.end_aborted(slot, reason, message.to_owned(), false);
    }

    /// Stops accepting new streams; the connection closes once the open ones are done.
    pub fn go_away(&mut self) {
        if self.phase != Phase::Open || self.sent_goaway {
            if self.phase == Phase::Handshake {
                self.fail(ConnError::LocallyClosed);
            }
            return;
        }
        self.sent_goaway = true;
        Frame::GoAway {
            last_stream: StreamId(self.highest_peer_id),
            reason: Reason::GoingAway,
            message: "no new streams".into(),
        }
        .encode(&mut self.control);
        self.close_if_drained();
    }

    /// Ends the connection now, aborting every stream.
    pub fn close(&mut self, error: ConnError) {
        if self.phase != Phase::Closed {
            self.fail(error);
        }
    }

    // ---- output ----

    /// Moves control frames, then data frames chosen by the scheduler, into `out` until it holds
    /// at least `limit` bytes or nothing more may be sent.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Transmit, limit: usize) {
        self.poll_keepalive(now);
        if !self.control.is_empty() {
            let control = self.control.split().freeze();
            self.stats.bytes_out += control.len() as u64;
            out.push(control);
        }
        if self.phase != Phase::Open {
            return;
        }
        let max_payload = self.max_payload();
        // Deficit round robin in bytes with a quantum of one full frame: a bulk stream sends one
        // frame per round, a stream of small messages as many as add up to one frame.
        let quantum = (max_payload + frame::DATA_OVERHEAD) as i64;
        while out.len() < limit {
            let Some((entry, was_new)) = self.scheduler.pop() else {
                break;
            };
            let Some(stream) = self.streams.get_mut(entry.slot) else {
                continue;
            };
            if stream.id != entry.id {
                continue;
            }
            stream.scheduled = false;
            stream.deficit += quantum;
            let mut blocked = false;
            loop {
                let stream = &self.streams[entry.slot];
                let Some(need) = stream.credit_needed() else {
                    break;
                };
                if need > self.conn_credit.available() {
                    blocked = true;
                    break;
                }
                if stream.deficit <= 0 {
                    break;
                }
                let wire = self.send_one_frame(entry.slot, max_payload, out);
                match self.streams.get_mut(entry.slot) {
                    Some(s) if s.id == entry.id => s.deficit -= wire as i64,
                    _ => break,
                }
            }
            let Some(stream) = self
                .streams
                .get_mut(entry.slot)
                .filter(|s| s.id == entry.id)
            else {
                continue;
            };
            if blocked {
                stream.scheduled = true;
                self.conn_blocked.push((entry, was_new));
            } else if stream.credit_needed().is_some() {
                stream.scheduled = true;
                self.scheduler.requeue(entry);
            } else {
                // An idle stream keeps no credit from the past (classic DRR).
                stream.deficit = 0;
            }
        }
        // FINISH acknowledgements and ABORTs raised while sending go out in this same batch.
        if !self.control.is_empty() {
            let control = self.control.split().freeze();
            self.stats.bytes_out += control.len() as u64;
            out.push(control);
        }
    }

    fn max_payload(&self) -> usize {
        let peer_max = self.peer.map_or(MIN_MAX_FRAME, |p| p.max_frame) as usize - 8;
        peer_max.min(self.config.send_frame as usize).max(1)
    }

    /// Sends one frame from the front of a stream's queue; the caller checked it may.
    /// Returns the frame's size on the wire.
    fn send_one_frame(&mut self, slot: usize, max_payload: usize, out: &mut Transmit) -> usize {
        let stream = &mut self.streams[slot];
        let id = stream.id;
        let Half::Send(send) = &mut stream.half else {
            return 0;
        };
        let credit = send.credit.available().min(self.conn_credit.available());
        let limit = (max_payload as u64).min(credit) as usize;
        let front = send
            .queue
            .front_mut()
            .expect("scheduled stream has a chunk");
        let mut finished = false;
        let (cost, wire, logical, is_hole) = match front {
            Chunk::Data { offset, bytes } => {
                let n = limit.min(bytes.len());
                let payload = if n == bytes.len() {
                    std::mem::take(bytes)
                } else {
                    bytes.split_to(n)
                };
                frame::encode_data_header(&mut self.headers, id, *offset, n);
                out.push(self.headers.split().freeze());
                out.push(payload);
                *offset += n as u64;
                send.queued_bytes -= n;
                self.queued_total -= n;
                (n as u64, frame::DATA_OVERHEAD + n, n as u64, false)
            }
            Chunk::Hole { offset, len } if send.expand_holes => {
                let n = (limit.min(ZEROES.len()) as u64).min(*len) as usize;
                frame::encode_data_header(&mut self.headers, id, *offset, n);
                out.push(self.headers.split().freeze());
                out.push(Bytes::from_static(&ZEROES[..n]));
                *offset += n as u64;
                *len -= n as u64;
                (n as u64, frame::DATA_OVERHEAD + n, n as u64, false)
            }
            Chunk::Hole { offset, len } => {
                Frame::Hole {
                    stream: id,
                    offset: *offset,
                    len: *len,
                }
                .encode(&mut self.headers);
                out.push(self.headers.split().freeze());
                let logical = *len;
                *len = 0;
                (HOLE_COST, frame::HEADER_LEN + 16, logical, true)
            }
            Chunk::End { length, digest } => {
                Frame::Finish {
                    stream: id,
                    length: *length,
                    digest: *digest,
                    ack: false,
                }
                .encode(&mut self.headers);
                out.push(self.headers.split().freeze());
                finished = true;
                (0, frame::HEADER_LEN + 12, 0, false)
            }
        };
        if front.logical_len() == 0 {
            send.queue.pop_front();
        }
        send.credit.spend(cost);
        self.conn_credit.spend(cost);
        self.stats.bytes_out += wire as u64;
        stream.stats.wire_bytes += wire as u64;
        stream.progress += 1;
        if is_hole {
            stream.stats.hole_bytes += logical;
        } else {
            stream.stats.data_bytes += logical;
        }
        if finished {
            stream.state = State::AwaitingAck;
        }
        if send.stalled_source && !finished && send_room(send, self.queued_total, &self.config) {
            send.stalled_source = false;
            self.events.push_back(Event::Writable { stream: id });
        }
        wire
    }

    fn poll_keepalive(&mut self, now: Instant) {
        if self.phase != Phase::Open || self.ping_sent.is_some() {
            return;
        }
        if now.saturating_duration_since(self.last_heard) >= self.config.keepalive_interval {
            self.ping_counter += 1;
            Frame::Ping {
                data: self.ping_counter,
            }
            .encode(&mut self.control);
            self.ping_sent = Some((self.ping_counter, now));
        }
    }

    /// Sends a PING now (the answer's round trip lands in `stats().rtt`).
    pub fn ping(&mut self, now: Instant) {
        if self.phase == Phase::Open && self.ping_sent.is_none() {
            self.ping_counter += 1;
            Frame::Ping {
                data: self.ping_counter,
            }
            .encode(&mut self.control);
            self.ping_sent = Some((self.ping_counter, now));
        }
    }

    /// Whether `poll_transmit` has something to give right now.
    pub fn wants_transmit(&self) -> bool {
        !self.control.is_empty()
            || (self.phase == Phase::Open
                && !self.scheduler.is_empty()
                && self.conn_credit.available() > 0)
    }

    // ---- time ----

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Handshake => Some(self.handshake_deadline),
            Phase::Open => {
                let idle = self.last_heard + self.config.idle_timeout;
                let ping = self.last_heard + self.config.keepalive_interval;
                let mut next = if self.ping_sent.is_some() {
                    idle
                } else {
                    idle.min(ping)
                };
                if let Some(since) = self.partial_since {
                    next = next.min(since + self.config.frame_timeout);
                }
                if !self.streams.is_empty() {
                    next = next.min(self.stream_check_at);
                }
                Some(next)
            }
            Phase::Closed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Handshake if now >= self.handshake_deadline => {
                self.fail(ConnError::Timeout(format!(
                    "no handshake within {:?}",
                    self.config.handshake_timeout
                )));
            }
            Phase::Open
                if self.partial_since.is_some_and(|since| {
                    now.saturating_duration_since(since) >= self.config.frame_timeout
                }) =>
            {
                self.fail(ConnError::Timeout(format!(
                    "incomplete frame ({} of its bytes buffered) for {:?}",
                    self.input.len(),
                    self.config.frame_timeout
                )));
            }
            Phase::Open
                if now.saturating_duration_since(self.last_heard) >= self.config.idle_timeout =>
            {
                self.fail(ConnError::Timeout(format!(
                    "nothing heard from the peer for {:?}",
                    self.config.idle_timeout
                )));
            }
            Phase::Open => {
                self.poll_keepalive(now);
                if now >= self.stream_check_at {
                    self.check_stalled_streams(now);
                }
            }
            _ => {}
        }
    }

    /// Aborts streams whose progress counter has not moved for `stream_timeout`. Checked at a
    /// coarse interval so the cost is one pass over the streams per interval, not per turn.
    fn check_stalled_streams(&mut self, now: Instant) {
        let timeout = self.config.stream_timeout;
        self.stream_check_at = now + (timeout / 4).min(Duration::from_secs(1));
        let mut stalled = Vec::new();
        for (_, stream) in self.streams.iter_mut() {
            match stream.watch {
                Some((seen, _)) if seen != stream.progress => {
                    stream.watch = Some((stream.progress, now))
                }
                Some((_, since)) if now.saturating_duration_since(since) >= timeout => {
                    stalled.push(stream.id)
                }
                Some(_) => {}
                None => stream.watch = Some((stream.progress, now)),
            }
        }
        for id in stalled {
            log::warn!("{:?} {id} made no progress for {timeout:?}", self.side);
            self.abort(id, Reason::Timeout, &format!("no progress for {timeout:?}"));
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- internals ----

    fn insert(&mut self, stream: Stream) -> usize {
        let id = stream.id;
        let slot = self.streams.insert(stream);
        self.ids.insert(id, slot);
        slot
    }

    fn remove(&mut self, slot: usize) -> Stream {
        let stream = self.streams.remove(slot);
        self.ids.remove(&stream.id);
        if self.is_local_id(stream.id) {
            self.local_streams -= 1;
        } else {
            self.peer_streams -= 1;
        }
        if let Half::Send(send) = &stream.half {
            self.queued_total -= send.queued_bytes;
        }
        if let Half::Recv(recv) = &stream.half {
            // Credit the sink never consumed still belongs to the connection window.
            let held: u64 = recv.unconsumed.iter().sum();
            if held > 0 {
                self.release_connection(held);
            }
        }
        stream
    }

    fn schedule(&mut self, slot: usize) {
        let stream = &mut self.streams[slot];
        if !stream.scheduled && stream.credit_needed().is_some() {
            stream.scheduled = true;
            self.scheduler.activate(Entry {
                slot,
                id: stream.id,
            });
        }
    }

    fn end_completed(&mut self, slot: usize) {
        let stream = self.remove(slot);
        self.stats.streams_completed += 1;
        self.events.push_back(Event::Completed {
            stream: stream.id,
            stats: stream.stats,
        });
        self.close_if_drained();
    }

    fn end_aborted(&mut self, slot: usize, reason: Reason, message: String, by_peer: bool) {
        let stream = self.remove(slot);
        self.stats.streams_aborted += 1;
        if by_peer {
            self.tombstones.insert(stream.id);
        }
        self.events.push_back(Event::Aborted {
            stream: stream.id,
            reason,
            message,
            by_peer,
            stats: stream.stats,
        });
        self.close_if_drained();
    }

    /// After GOAWAY either way, the connection ends once its last stream does.
    fn close_if_drained(&mut self) {
        if self.phase == Phase::Open
            && (self.sent_goaway || self.peer_goaway)
            && self.streams.is_empty()
        {
            self.phase = Phase::Closed;
            self.events.push_back(Event::Closed { error: None });
        }
    }

    /// Ends the connection: tells the peer why (when it can parse frames), aborts every stream.
    fn fail(&mut self, error: ConnError) {
        log::debug!("{:?} connection ends: {error}", self.side);
        let tell_peer = self.phase == Phase::Open
            && !matches!(
                error,
                ConnError::PeerClosed | ConnError::Io(_) | ConnError::PeerGoAway { .. }
            );
        if tell_peer {
            Frame::GoAway {
                last_stream: StreamId(self.highest_peer_id),
                reason: error.reason(),
                message: error.to_string(),
            }
            .encode(&mut self.control);
        }
        self.phase = Phase::Closed;
        let reason = error.reason();
        let message = error.to_string();
        let slots: Vec<usize> = self.streams.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let stream = self.remove(slot);
            self.stats.streams_aborted += 1;
            self.events.push_back(Event::Aborted {
                stream: stream.id,
                reason,
                message: message.clone(),
                by_peer: false,
                stats: stream.stats,
            });
        }
        self.input.clear();
        self.error = Some(error.clone());
        self.events.push_back(Event::Closed { error: Some(error) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello() -> BytesMut {
        let mut b = BytesMut::new();
        Hello {
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            features: Features::ALL,
            max_frame: 1 << 20,
            stream_window: 1 << 20,
            conn_window: 1 << 24,
            max_streams: 16,
        }
        .encode(&mut b);
        b
    }

    fn established(config: Config, now: Instant) -> Connection {
        let mut conn = Connection::new(Side::Server, config, now);
        let hello = client_hello();
        conn.input_buffer().extend_from_slice(&hello);
        conn.handle_input(now);
        assert!(conn.is_established());
        // Our own Hello goes out first; the tests look at what follows it.
        let mut out = Transmit::default();
        conn.poll_transmit(now, &mut out, usize::MAX);
        assert_eq!(out.len(), HELLO_LEN);
        conn
    }

    #[test]
    fn partial_frame_times_out_although_bytes_keep_coming() {
        let t0 = Instant::now();
        let config = Config {
            frame_timeout: Duration::from_millis(500),
            ..Config::default()
        };
        let mut conn = established(config, t0);
        let mut ping = BytesMut::new();
        Frame::Ping { data: 1 }.encode(&mut ping);
        for (i, byte) in ping[..10].iter().enumerate() {
            let now = t0 + Duration::from_millis(100 * i as u64);
            conn.input_buffer().extend_from_slice(&[*byte]);
            conn.handle_input(now);
            conn.handle_timeout(now);
            if conn.is_closed() {
                break;
            }
            assert!(conn.poll_timeout().unwrap() <= t0 + Duration::from_millis(500));
        }
        assert!(conn.is_closed());
        assert!(matches!(conn.error(), Some(ConnError::Timeout(m)) if m.contains("incomplete")));
    }

    #[test]
    fn complete_frames_restart_the_frame_clock() {
        let t0 = Instant::now();
        let config = Config {
            frame_timeout: Duration::from_millis(500),
            ..Config::default()
        };
        let mut conn = established(config, t0);
        let mut two = BytesMut::new();
        Frame::Ping { data: 1 }.encode(&mut two);
        Frame::Ping { data: 2 }.encode(&mut two);
        // The first PING completes at 400 ms: the second's partial bytes count from then.
        conn.input_buffer().extend_from_slice(&two[..5]);
        conn.handle_input(t0);
        conn.input_buffer().extend_from_slice(&two[5..25]);
        let t1 = t0 + Duration::from_millis(400);
        conn.handle_input(t1);
        assert_eq!(
            conn.poll_timeout(),
            Some(t1 + Duration::from_millis(500)),
            "frame deadline of the second PING"
        );
        conn.handle_timeout(t0 + Duration::from_millis(600));
        assert!(!conn.is_closed());
    }

    #[test]
    fn full_control_backlog_pauses_input_until_it_drains() {
        let now = Instant::now();
        let config = Config {
            control_backlog: 1000,
            ..Config::default()
        };
        let mut conn = established(config, now);
        let mut pings = BytesMut::new();
        for data in 0..200 {
            Frame::Ping { data }.encode(&mut pings);
        }
        conn.input_buffer().extend_from_slice(&pings);
        conn.handle_input(now);
        assert!(conn.is_input_paused());
        assert_eq!(conn.input_room(), 0);
        assert!(conn.stats().send_queued < 1000 + 64, "{:?}", conn.stats());
        let pong_len = frame::HEADER_LEN + 8;
        let mut sent = 0;
        let mut out = Transmit::default();
        loop {
            let paused = conn.is_input_paused();
            conn.poll_transmit(now, &mut out, usize::MAX);
            sent += out.len();
            out.advance(out.len());
            if !paused {
                break;
            }
            assert!(conn.input_room() > 0);
            conn.handle_input(now);
        }
        assert_eq!(sent, 200 * pong_len, "every PING answered once");
        assert!(!conn.is_closed());
    }
}
