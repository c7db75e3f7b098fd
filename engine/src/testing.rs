//! Two [`Connection`]s pumped against each other in memory, with simulated time and no socket
//! (the idea of quinn-proto's test pair): scheduling, credit and lifecycle properties can be
//! checked step by step, deterministically, and measured in simulated time.
//!
//! Each step carries up to [`Link::bytes_per_step`] bytes each way (client to server first) and
//! then advances the clock by [`Link::step`]. Each side has a small driver that acts on its
//! connection's events: it serves the volumes it was given, feeds sources while they may send,
//! and lets sinks release credit and verify as their [`SinkPolicy`] says. Everything either side
//! produced and received is logged with the step it happened in.
//!
//! Content is synthetic: data is a constant byte, volumes carry no digest, and sinks count bytes
//! instead of keeping them.

use crate::proto::frame::HELLO_LEN;
use crate::proto::{
    Config, ConnError, Connection, Event, Frame, Op, OpenError, OpenOptions, Side, StreamId,
    StreamStats, Transmit,
};
use crate::range::RangeSet;
use crate::reason::Reason;
use crate::volume::Chunk;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest DATA chunk a synthetic source gives.
pub const MAX_CHUNK: usize = 256 * 1024;
static PAYLOAD: [u8; MAX_CHUNK] = [0x5a; MAX_CHUNK];

/// The pipe between the two sides.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Bytes carried each way per step.
    pub bytes_per_step: usize,
    /// Simulated time a step takes.
    pub step: Duration,
    /// Bytes a side keeps polled ahead of the link (its socket buffer); below it, it asks its
    /// connection for more frames, as the event loop's driver does.
    pub transmit_target: usize,
    /// The same while the side's connection says an interactive stream is active.
    pub interactive_target: usize,
}

impl Default for Link {
    /// About 1 GB/s with the event loop's transmit target.
    fn default() -> Self {
        Link {
            bytes_per_step: 1024 * 1024,
            step: Duration::from_millis(1),
            transmit_target: crate::event_loop::TRANSMIT_TARGET,
            interactive_target: crate::event_loop::INTERACTIVE_TRANSMIT_TARGET,
        }
    }
}

/// A synthetic volume: `size` bytes in chunks of `chunk`; with `hole_every` = n, every n-th
/// chunk is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    pub size: u64,
    pub chunk: usize,
    pub hole_every: Option<u64>,
}

impl Volume {
    pub fn data(size: u64) -> Volume {
        Volume {
            size,
            chunk: 128 * 1024,
            hole_every: None,
        }
    }

    /// The chunk at `offset` (its number decides whether it is a hole).
    fn chunk_at(&self, offset: u64) -> Chunk {
        if offset == self.size {
            return Chunk::End {
                length: self.size,
                digest: None,
            };
        }
        let len = (self.size - offset).min(self.chunk.min(MAX_CHUNK) as u64);
        let n = offset / self.chunk as u64;
        if self.hole_every.is_some_and(|k| k > 0 && n % k == k - 1) {
            Chunk::Hole { offset, len }
        } else {
            Chunk::Data {
                offset,
                bytes: Bytes::from_static(&PAYLOAD[..len as usize]),
            }
        }
    }
}

/// When a sink gives credit back and verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkPolicy {
    /// Each chunk is done as soon as it arrives; the end is verified at once.
    Immediate,
    /// Nothing is ever done: the sink hangs.
    Stalled,
    /// Only [`Peer::release`] and [`Peer::verify`] move it.
    Manual,
}

/// How a stream ended on one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Completed(StreamStats),
    Aborted { reason: Reason, by_peer: bool },
    Rejected(Reason),
}

/// A frame one side produced (logged when its connection gave it, not when it arrived). DATA
/// is logged without its payload, `payload` says how long it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub step: u64,
    pub frame: Frame,
    pub payload: usize,
}

/// Content that reached a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub step: u64,
    pub stream: StreamId,
    pub offset: u64,
    pub len: u64,
    pub hole: bool,
}

#[derive(Debug)]
struct Source {
    volume: Volume,
    /// A ranged READ served: only these, and `range` is the one being sent.
    ranges: Option<Arc<RangeSet>>,
    range: usize,
    next: u64,
    ended: bool,
    /// Accepted by the peer (uploads) or by us (downloads served): chunks may be given.
    open: bool,
}

#[derive(Debug)]
struct Sink {
    policy: SinkPolicy,
    /// Chunks arrived and not yet done.
    pending: u64,
    bytes: u64,
    ended: bool,
}

/// One side: its connection, its driver's state and what it saw.
pub struct Peer {
    pub conn: Connection,
    out: Transmit,
    /// Frames produced, in order, with the step (decoded from a copy of the output).
    pub sent: Vec<Sent>,
    tap: BytesMut,
    /// Our Hello was taken off the front of `tap`.
    tapped_hello: bool,
    /// Every event, with the step it came in.
    pub events: Vec<(u64, Event)>,
    pub arrivals: Vec<Arrival>,
    /// How each stream ended, in order: a stream that ends twice shows up twice.
    pub ends: BTreeMap<StreamId, Vec<End>>,
    /// Volumes this side serves to the peer's downloads.
    pub volumes: HashMap<String, Volume>,
    /// Identities this side reports for its volumes in ACCEPT (feature IDENTITY).
    pub identities: HashMap<String, crate::VolumeIdentity>,
    /// How sinks of uploads the peer opens behave.
    pub upload_sinks: SinkPolicy,
    /// Sources give chunks whenever they may; off, only [`Peer::pump`] gives them.
    pub auto_pump: bool,
    sources: HashMap<StreamId, Source>,
    sinks: HashMap<StreamId, Sink>,
    step: u64,
    /// The simulated time of the current step.
    now: Instant,
}

impl Peer {
    fn new(side: Side, config: Config, now: Instant) -> Peer {
        Peer {
            conn: Connection::new(side, config, now),
            now,
            out: Transmit::default(),
            sent: Vec::new(),
            tap: BytesMut::new(),
            tapped_hello: false,
            events: Vec::new(),
            arrivals: Vec::new(),
            ends: BTreeMap::new(),
            volumes: HashMap::new(),
            identities: HashMap::new(),
            upload_sinks: SinkPolicy::Immediate,
            auto_pump: true,
            sources: HashMap::new(),
            sinks: HashMap::new(),
            step: 0,
        }
    }

    /// Opens a download of the peer's volume `name` into a sink that behaves as `policy`.
    pub fn download(&mut self, name: &str, policy: SinkPolicy) -> Result<StreamId, OpenError> {
        self.download_with(name, OpenOptions::default(), policy)
    }

    /// A download with OPEN options (e.g. `OpenOptions::default().with_priority(true)`).
    pub fn download_with(
        &mut self,
        name: &str,
        options: OpenOptions,
        policy: SinkPolicy,
    ) -> Result<StreamId, OpenError> {
        let id = self.conn.open_stream(Op::Read, name, options, 0)?;
        self.sinks.insert(id, Sink::new(policy));
        Ok(id)
    }

    /// Opens a download of only `ranges` of the peer's volume `name`.
    pub fn download_ranges(
        &mut self,
        name: &str,
        ranges: RangeSet,
        policy: SinkPolicy,
    ) -> Result<StreamId, OpenError> {
        let id = self.conn.open_ranged(
            Op::Read,
            name,
            OpenOptions::default(),
            0,
            Some(Arc::new(ranges)),
        )?;
        self.sinks.insert(id, Sink::new(policy));
        Ok(id)
    }

    /// Opens an upload of `volume` as `name`.
    pub fn upload(&mut self, name: &str, volume: Volume) -> Result<StreamId, OpenError> {
        self.upload_with(name, OpenOptions::default(), volume)
    }

    /// An upload with OPEN options (e.g. `OpenOptions::default().with_priority(true)`).
    pub fn upload_with(
        &mut self,
        name: &str,
        options: OpenOptions,
        volume: Volume,
    ) -> Result<StreamId, OpenError> {
        let id = self
            .conn
            .open_stream(Op::Write, name, options, volume.size)?;
        self.sources.insert(id, Source::new(volume, false));
        Ok(id)
    }

    /// Gives up to `chunks` chunks of a source to its stream, while the stream takes them.
    pub fn pump(&mut self, id: StreamId, chunks: usize) {
        for _ in 0..chunks {
            let Some(source) = self.sources.get_mut(&id) else {
                return;
            };
            if !source.open || source.ended || !self.conn.can_send(id) {
                return;
            }
            let chunk = source.next_chunk();
            source.next += chunk.logical_len();
            source.ended = matches!(chunk, Chunk::End { .. });
            self.conn.send_chunk(id, chunk);
        }
        self.drain_events();
    }

    /// Marks up to `chunks` of a sink's arrived chunks done (their credit goes back).
    pub fn release(&mut self, id: StreamId, chunks: u64) {
        let Some(sink) = self.sinks.get_mut(&id) else {
            return;
        };
        let n = chunks.min(sink.pending);
        sink.pending -= n;
        self.conn.release(id, n, self.now);
        self.drain_events();
    }

    /// Verifies a sink whose content all arrived and is done.
    pub fn verify(&mut self, id: StreamId) {
        if self
            .sinks
            .get(&id)
            .is_some_and(|s| s.ended && s.pending == 0)
        {
            self.conn.stream_verified(id);
            self.drain_events();
        }
    }

    /// Aborts a stream from this side.
    pub fn abort(&mut self, id: StreamId, reason: Reason) {
        self.conn.abort(id, reason, "aborted by the test");
        self.drain_events();
    }

    pub fn go_away(&mut self) {
        self.conn.go_away();
        self.drain_events();
    }

    /// Sets how a sink behaves from now on; a sink turned `Immediate` catches up at once.
    pub fn set_sink_policy(&mut self, id: StreamId, policy: SinkPolicy) {
        if let Some(sink) = self.sinks.get_mut(&id) {
            sink.policy = policy;
            if policy == SinkPolicy::Immediate {
                let pending = sink.pending;
                self.release(id, pending);
                self.verify(id);
            }
        }
    }

    /// Whether the peer accepted a stream this side opened.
    pub fn was_accepted(&self, id: StreamId) -> bool {
        self.events
            .iter()
            .any(|(_, e)| matches!(e, Event::Accepted { stream, .. } if *stream == id))
    }

    /// Whether a source gave its last chunk (its FINISH is queued or sent).
    pub fn has_finished_sending(&self, id: StreamId) -> bool {
        self.sources.get(&id).is_some_and(|s| s.ended)
    }

    /// Content bytes (data and holes) a sink received.
    pub fn received(&self, id: StreamId) -> u64 {
        self.sinks.get(&id).map_or(0, |s| s.bytes)
    }

    /// Streams this side knows of as sources or sinks.
    pub fn streams(&self) -> Vec<StreamId> {
        let mut ids: Vec<_> = self
            .sources
            .keys()
            .chain(self.sinks.keys())
            .copied()
            .collect();
        ids.sort();
        ids
    }

    /// The single way `id` ended here, if it ended exactly once.
    pub fn end(&self, id: StreamId) -> Option<&End> {
        match self.ends.get(&id).map(Vec::as_slice) {
            Some([end]) => Some(end),
            _ => None,
        }
    }

    /// Whether the connection failed, and why.
    pub fn closed_with(&self) -> Option<Option<ConnError>> {
        self.events.iter().find_map(|(_, e)| match e {
            Event::Closed { error } => Some(error.clone()),
            _ => None,
        })
    }

    fn poll(&mut self, now: Instant, target: usize) {
        if self.out.len() >= target {
            return;
        }
        let mut fresh = Transmit::default();
        self.conn
            .poll_transmit(now, &mut fresh, target - self.out.len());
        self.record(&fresh);
        self.out.append(&mut fresh);
        self.drain_events();
    }

    /// Decodes what the connection just produced into the log of sent frames.
    fn record(&mut self, fresh: &Transmit) {
        for segment in fresh.segments() {
            self.tap.extend_from_slice(segment);
        }
        if !self.tapped_hello && self.tap.len() >= HELLO_LEN {
            self.tap.advance(HELLO_LEN);
            self.tapped_hello = true;
        }
        while let Ok(Some(mut frame)) = Frame::decode(&mut self.tap, u32::MAX) {
            let payload = match &mut frame {
                Frame::Data { payload, .. } => std::mem::take(payload).len(),
                _ => 0,
            };
            let step = self.step;
            self.sent.push(Sent {
                step,
                frame,
                payload,
            });
        }
    }

    /// Moves up to `max` bytes of output into `to`'s input, as far as its input room allows.
    fn carry(&mut self, to: &mut Peer, max: usize, now: Instant) -> usize {
        let mut moved = 0;
        while moved < max {
            let room = to.conn.input_room().min(max - moved);
            let Some(front) = self.out.segments().next() else {
                break;
            };
            let take = front.len().min(room);
            if take == 0 {
                break;
            }
            to.conn.input_buffer().extend_from_slice(&front[..take]);
            to.conn.record_bytes_in(take);
            self.out.advance(take);
            moved += take;
            to.conn.handle_input(now);
            to.drain_events();
        }
        if to.conn.is_input_paused() && to.conn.input_room() > 0 {
            to.conn.handle_input(now);
            to.drain_events();
        }
        moved
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            // Logged before acting: what acting causes comes after it.
            self.events.push((self.step, event.clone()));
            self.act(&event);
        }
    }

    fn act(&mut self, event: &Event) {
        match event {
            Event::OpenRequested {
                stream,
                op,
                name,
                ranges,
                ..
            } => match op {
                Op::Read => match self.volumes.get(name) {
                    Some(&volume) => {
                        let identity = self.identities.get(name).cloned();
                        self.conn.accept(*stream, volume.size, identity);
                        let mut source = Source::new(volume, true);
                        source.ranges = ranges.clone();
                        self.sources.insert(*stream, source);
                        self.auto(*stream);
                    }
                    None => self
                        .conn
                        .reject(*stream, Reason::NotFound, "no such volume"),
                },
                Op::Write => {
                    self.conn.accept(*stream, 0, None);
                    self.sinks.insert(*stream, Sink::new(self.upload_sinks));
                }
                Op::List | Op::Extents | Op::Digests => {
                    self.conn.reject(*stream, Reason::Unsupported, "not here")
                }
            },
            Event::Accepted { stream, .. } => {
                if let Some(source) = self.sources.get_mut(stream) {
                    source.open = true;
                    self.auto(*stream);
                }
            }
            Event::Writable { stream } => self.auto(*stream),
            Event::Chunk { stream, chunk } => self.on_chunk(*stream, chunk),
            Event::Rejected { stream, reason, .. } => self.ended(*stream, End::Rejected(*reason)),
            Event::Completed { stream, stats } => self.ended(*stream, End::Completed(*stats)),
            Event::Aborted {
                stream,
                reason,
                by_peer,
                ..
            } => self.ended(
                *stream,
                End::Aborted {
                    reason: *reason,
                    by_peer: *by_peer,
                },
            ),
            Event::Connected { .. } | Event::Closed { .. } => {}
        }
    }

    fn auto(&mut self, id: StreamId) {
        if self.auto_pump {
            self.pump(id, usize::MAX);
        }
    }

    fn on_chunk(&mut self, id: StreamId, chunk: &Chunk) {
        let Some(sink) = self.sinks.get_mut(&id) else {
            return;
        };
        match chunk {
            Chunk::End { .. } => sink.ended = true,
            Chunk::Data { offset, bytes } => {
                sink.bytes += bytes.len() as u64;
                self.arrivals.push(Arrival {
                    step: self.step,
                    stream: id,
                    offset: *offset,
                    len: bytes.len() as u64,
                    hole: false,
                });
            }
            Chunk::Hole { offset, len } => {
                sink.bytes += len;
                self.arrivals.push(Arrival {
                    step: self.step,
                    stream: id,
                    offset: *offset,
                    len: *len,
                    hole: true,
                });
            }
        }
        sink.pending += 1;
        if sink.policy == SinkPolicy::Immediate {
            let ended = sink.ended;
            self.release(id, 1);
            if ended {
                self.verify(id);
            }
        }
    }

    fn ended(&mut self, id: StreamId, end: End) {
        self.ends.entry(id).or_default().push(end);
    }
}

impl Source {
    /// The next chunk of the volume, or of the ranges asked for (cut at the range's end, so
    /// that no chunk spans two).
    fn next_chunk(&mut self) -> Chunk {
        let Some(set) = &self.ranges else {
            return self.volume.chunk_at(self.next);
        };
        let Some(r) = set.ranges().get(self.range).copied() else {
            return Chunk::End {
                length: self.volume.size,
                digest: None,
            };
        };
        self.next = self.next.max(r.offset);
        let chunk = match self.volume.chunk_at(self.next) {
            Chunk::Data { offset, bytes } => {
                let n = bytes.len().min((r.end() - offset) as usize);
                Chunk::Data {
                    offset,
                    bytes: bytes.slice(..n),
                }
            }
            Chunk::Hole { offset, len } => Chunk::Hole {
                offset,
                len: len.min(r.end() - offset),
            },
            end => end,
        };
        if self.next + chunk.logical_len() >= r.end() {
            self.range += 1;
        }
        chunk
    }

    fn new(volume: Volume, open: bool) -> Source {
        Source {
            volume,
            ranges: None,
            range: 0,
            next: 0,
            ended: false,
            open,
        }
    }
}

impl Sink {
    fn new(policy: SinkPolicy) -> Sink {
        Sink {
            policy,
            pending: 0,
            bytes: 0,
            ended: false,
        }
    }
}

/// Carries one step's worth of bytes from one side to the other, asking the sender for frames
/// whenever its queue runs below the target, as the event loop's driver does while it writes.
fn transfer(from: &mut Peer, to: &mut Peer, link: Link, now: Instant) {
    let target = |from: &Peer| {
        if from.conn.is_interactive(now) {
            link.interactive_target
        } else {
            link.transmit_target
        }
    };
    if to.conn.is_closed() {
        // Its socket is gone: what is written goes nowhere.
        from.poll(now, target(from));
        from.out = Transmit::default();
        return;
    }
    let mut moved = 0;
    while moved < link.bytes_per_step {
        from.poll(now, target(from));
        let n = from.carry(to, link.bytes_per_step - moved, now);
        if n == 0 {
            break;
        }
        moved += n;
    }
    if from.conn.is_closed() && from.out.is_empty() {
        // A closed side drops its socket once its last bytes are out.
        to.conn.handle_eof();
        to.drain_events();
    }
}

/// A client and a server connection joined by a simulated link.
pub struct Pair {
    pub client: Peer,
    pub server: Peer,
    pub link: Link,
    /// The simulated clock.
    pub now: Instant,
    /// Steps taken.
    pub steps: u64,
}

impl Pair {
    pub fn new(client: Config, server: Config) -> Pair {
        let now = Instant::now();
        Pair {
            client: Peer::new(Side::Client, client, now),
            server: Peer::new(Side::Server, server, now),
            link: Link::default(),
            now,
            steps: 0,
        }
    }

    /// A pair with default configurations, handshake done.
    pub fn connected() -> Pair {
        let mut pair = Pair::new(Config::default(), Config::default());
        pair.connect();
        pair
    }

    /// Steps until both sides finished the handshake.
    pub fn connect(&mut self) {
        let done = self.run_until(100, |p| {
            p.client.conn.is_established() && p.server.conn.is_established()
        });
        assert!(done, "handshake did not complete");
    }

    /// One step: output polled and carried each way (client to server first), then the clock
    /// moves and timers run.
    pub fn step(&mut self) {
        self.steps += 1;
        let (now, link) = (self.now, self.link);
        for peer in [&mut self.client, &mut self.server] {
            peer.step = self.steps;
            peer.now = now;
        }
        transfer(&mut self.client, &mut self.server, link, now);
        transfer(&mut self.server, &mut self.client, link, now);
        self.now += link.step;
        for peer in [&mut self.client, &mut self.server] {
            if peer.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                peer.conn.handle_timeout(self.now);
                peer.drain_events();
            }
        }
    }

    /// Steps until `done` holds (checked before each step) or `max` steps were taken; returns
    /// whether it held.
    pub fn run_until(&mut self, max: u64, mut done: impl FnMut(&Pair) -> bool) -> bool {
        for _ in 0..max {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    /// Nothing is in flight and neither side has anything to send.
    pub fn is_idle(&self) -> bool {
        [&self.client, &self.server]
            .iter()
            .all(|p| p.out.is_empty() && !p.conn.wants_transmit())
    }

    /// Steps until idle; returns whether it got there within `max` steps.
    pub fn settle(&mut self, max: u64) -> bool {
        self.run_until(max, Pair::is_idle)
    }
}
