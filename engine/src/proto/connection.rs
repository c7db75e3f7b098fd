//! One connection's protocol state, without I/O: the phase (handshake, open, closed), frame
//! dispatch, the events for the driver, and how streams and the connection end. The rules of
//! each concern live beside it: `input` (reading frames), `handshake`, `store` and `counts`
//! (which streams exist), `stream` (their states), `send` and `recv` (each direction's rules),
//! `prioritize` (who sends next) and `timers` (every deadline).
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

use super::config::Config;
use super::counts::{Counts, Side};
use super::error::ConnError;
use super::event::{ConnStats, Event};
use super::frame::{Features, Frame, Hello, StreamId};
use super::handshake::{self, Agreed};
use super::recv::RecvSide;
use super::send::SendSide;
use super::store::{Found, Key, Store};
use super::stream::{Stream, StreamView};
use super::timers::{Timer, Timers};
use super::transmit::Transmit;
use crate::reason::Reason;
use bytes::BytesMut;
use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Handshake,
    Open,
    /// Failed or closed: GOAWAY may still be in the transmit buffer; nothing else happens.
    Closed,
}

/// The fields are shared with the sibling modules whose `impl Connection` blocks apply their
/// concern's rules (`input`, `opening`, `send`, `recv`, `handshake`, `timers`).
pub struct Connection {
    pub(super) side: Side,
    pub(super) config: Config,
    pub(super) phase: Phase,
    /// Version and features, once the handshake is done.
    pub(super) agreed: Option<Agreed>,
    pub(super) peer: Option<Hello>,
    pub(super) input: BytesMut,
    /// Encoded control frames; they go out ahead of every stream's frames.
    pub(super) control: BytesMut,
    pub(super) store: Store,
    pub(super) counts: Counts,
    pub(super) send: SendSide,
    pub(super) recv: RecvSide,
    pub(super) sent_goaway: bool,
    pub(super) peer_goaway: bool,
    pub(super) events: VecDeque<Event>,
    pub(super) timers: Timers,
    /// Processing stopped with input left in the buffer because the control backlog is full.
    pub(super) input_paused: bool,
    /// The unanswered PING's data and when it went out, and the data last used.
    pub(super) ping_sent: Option<(u64, Instant)>,
    pub(super) ping_counter: u64,
    /// When the previous PONG came and the bytes moved by then: the rate over each interval
    /// between PONGs times the smallest round trip estimates the path's bandwidth-delay
    /// product; the largest estimate is offered to the driver for the socket's buffers.
    pub(super) rate_mark: Option<(Instant, u64)>,
    pub(super) buffer_hint: u64,
    hinted: u64,
    pub(super) stats: ConnStats,
    /// Why the connection ended, once it has.
    error: Option<ConnError>,
}

impl Connection {
    pub fn new(side: Side, config: Config, now: Instant) -> Self {
        let mut control = BytesMut::with_capacity(4096);
        handshake::hello(&config).encode(&mut control);
        let mut timers = Timers::default();
        timers.set(Timer::Handshake, now + config.handshake_timeout);
        // The first look for stalled streams happens as soon as there are streams.
        timers.set(Timer::StreamCheck, now);
        Connection {
            side,
            phase: Phase::Handshake,
            agreed: None,
            peer: None,
            input: BytesMut::with_capacity(config.max_frame as usize + 64 * 1024),
            control,
            store: Store::default(),
            counts: Counts::new(side, config.max_streams),
            send: SendSide::new(&config),
            recv: RecvSide::new(&config),
            sent_goaway: false,
            peer_goaway: false,
            events: VecDeque::new(),
            timers,
            input_paused: false,
            ping_sent: None,
            ping_counter: 0,
            rate_mark: None,
            buffer_hint: 0,
            hinted: 0,
            stats: ConnStats::default(),
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
        self.agreed.map(|a| a.features).unwrap_or_default()
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
        stats.recv_buffered = self.recv.buffered();
        (
            stats.peak_recv_buffered,
            stats.recv_window,
            stats.peak_recv_window,
        ) = self.recv.peaks();
        stats.send_queued = (self.control.len() + self.send.queued()) as u64;
        stats.send_window_in_use = self.send.prioritize.credit_in_use();
        stats.credit_stalls = self.send.prioritize.stalls();
        stats
    }

    /// The smallest round trip measured so far: the path's own delay.
    pub fn min_rtt(&self) -> Option<std::time::Duration> {
        self.stats.min_rtt
    }

    /// A size for the socket's kernel buffers, each way, whenever the estimate of the path's
    /// bandwidth-delay product has grown by a quarter since the last one (never below what
    /// kernels give anyway): see `Socket::fit_buffers`.
    pub fn poll_buffer_hint(&mut self) -> Option<u64> {
        const FLOOR: u64 = 256 * 1024;
        if self.buffer_hint < FLOOR || self.buffer_hint <= self.hinted + self.hinted / 4 {
            return None;
        }
        self.hinted = self.buffer_hint;
        Some(self.hinted)
    }

    /// Every live stream, in both directions, as it stands now.
    pub fn streams(&self) -> impl Iterator<Item = StreamView> + '_ {
        let peer_window = self.peer.map_or(0, |p| p.stream_window);
        self.store.iter().map(move |s| s.view(peer_window))
    }

    /// Open streams, in both directions.
    pub fn stream_count(&self) -> usize {
        self.store.len()
    }

    /// The peer closed its side of the connection.
    pub fn handle_eof(&mut self) {
        self.close(ConnError::PeerClosed);
    }

    /// The socket failed.
    pub fn handle_io_error(&mut self, message: String) {
        self.close(ConnError::Io(message));
    }

    /// Finds the stream a frame is for. `Ok(None)`: the stream is gone because we aborted it,
    /// so the frame is dropped. A stream that never existed, or ended normally, is a violation.
    pub(super) fn lookup(&self, id: StreamId, what: &str) -> Result<Option<Key>, ConnError> {
        match self.store.resolve(id) {
            Found::Live(key) => Ok(Some(key)),
            Found::Aborted => Ok(None),
            Found::Missing => {
                let why = if self.counts.existed(id) {
                    "closed"
                } else {
                    "unknown"
                };
                Err(ConnError::Protocol(format!("{what} for {why} {id}")))
            }
        }
    }

    pub(super) fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), ConnError> {
        match frame {
            Frame::Open {
                stream,
                op,
                options,
                size,
                name,
            } => self.on_open(stream, op, options, size, name),
            Frame::Accept {
                stream,
                size,
                identity,
            } => self.on_accept(stream, size, identity),
            Frame::Reject {
                stream,
                reason,
                message,
            } => self.on_reject(stream, reason, message),
            Frame::Data {
                stream,
                offset,
                payload,
            } => self.on_data(stream, offset, payload),
            Frame::Hole {
                stream,
                offset,
                len,
            } => self.on_hole(stream, offset, len),
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
                if let Some(key) = self.lookup(stream, "ABORT")? {
                    self.end_aborted(key, reason, message, true);
                }
                Ok(())
            }
            Frame::Ping { data } => {
                Frame::Pong { data }.encode(&mut self.control);
                Ok(())
            }
            Frame::Pong { data } => {
                self.on_pong(data, now);
                Ok(())
            }
            Frame::GoAway {
                last_stream,
                reason,
                message,
            } => self.on_goaway(last_stream, reason, message),
            Frame::Ranges {
                stream,
                last,
                ranges,
            } => self.on_ranges(stream, last, ranges),
        }
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
        let unprocessed: Vec<Key> = self
            .store
            .keys()
            .into_iter()
            .filter(|key| self.counts.is_local(key.id()) && key.id().0 > last_stream.0)
            .collect();
        for key in unprocessed {
            self.end_aborted(key, Reason::GoingAway, message.clone(), true);
        }
        self.close_if_drained();
        Ok(())
    }

    // ---- commands from the driver ----

    /// Ends a stream with ABORT, telling the peer why.
    pub fn abort(&mut self, id: StreamId, reason: Reason, message: &str) {
        let Some(key) = self.store.find(id) else {
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
        self.store.bury(id);
        self.end_aborted(key, reason, message.to_owned(), false);
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
            last_stream: self.counts.highest_peer(),
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

    /// Moves control frames, then frames of the streams the scheduler picks, into `out` until
    /// it holds at least `limit` bytes or nothing more may be sent.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Transmit, limit: usize) {
        self.keepalive(now);
        self.flush_control(out);
        if self.phase != Phase::Open {
            return;
        }
        let sent = self.send.poll_transmit(
            &mut self.store,
            now,
            out,
            limit,
            &mut self.events,
            &mut self.stats,
        );
        self.stats.bytes_out += sent;
        // FINISH acknowledgements and ABORTs raised while sending go out in this same batch.
        self.flush_control(out);
    }

    /// Only the control frames `poll_transmit` would give first (PONGs, WINDOWs, FINISH
    /// acknowledgements, ...), for a driver that sends them at once, ahead of work it is about
    /// to do; true if there were any.
    pub fn poll_control(&mut self, out: &mut Transmit) -> bool {
        let any = !self.control.is_empty();
        self.flush_control(out);
        any
    }

    fn flush_control(&mut self, out: &mut Transmit) {
        if !self.control.is_empty() {
            let control = self.control.split().freeze();
            self.stats.bytes_out += control.len() as u64;
            self.stats.frames_out.record_encoded(&control);
            out.push(control);
        }
    }

    /// Whether an interactive stream was served recently (see `prioritize`): frames are small
    /// now, and a driver should keep little queued ahead of the socket, since whatever it
    /// holds is what the next interactive frame waits behind.
    pub fn is_interactive(&self, now: Instant) -> bool {
        self.send.prioritize.is_interactive(now)
    }

    /// Whether `poll_transmit` has something to give right now.
    pub fn wants_transmit(&self) -> bool {
        !self.control.is_empty()
            || (self.phase == Phase::Open && self.send.prioritize.wants_transmit())
    }

    // ---- time ----

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- stream lifecycle ----

    pub(super) fn insert(&mut self, stream: Stream) -> Key {
        self.store.insert(stream)
    }

    /// Takes a stream out of the store and out of every count it was part of.
    pub(super) fn remove(&mut self, key: Key) -> Stream {
        let stream = self.store.remove(key);
        self.counts.closed(stream.id);
        self.send.forget(&stream);
        self.recv.forget(&stream, &mut self.control);
        stream
    }

    pub(super) fn end_completed(&mut self, key: Key) {
        let stream = self.remove(key);
        self.stats.streams_completed += 1;
        self.events.push_back(Event::Completed {
            stream: stream.id,
            stats: stream.stats,
        });
        self.close_if_drained();
    }

    /// Counts a stream that ended without success.
    pub(super) fn count_failed(&mut self, reason: Reason) {
        self.stats.streams_aborted += 1;
        self.stats.aborts.record(reason);
    }

    fn end_aborted(&mut self, key: Key, reason: Reason, message: String, by_peer: bool) {
        let stream = self.remove(key);
        self.count_failed(reason);
        if by_peer {
            self.store.bury(stream.id);
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
    pub(super) fn close_if_drained(&mut self) {
        if self.phase == Phase::Open
            && (self.sent_goaway || self.peer_goaway)
            && self.store.is_empty()
        {
            self.enter_closed();
            self.events.push_back(Event::Closed { error: None });
        }
    }

    fn enter_closed(&mut self) {
        self.phase = Phase::Closed;
        self.timers.stop_all();
    }

    /// Ends the connection: tells the peer why (when it can parse frames), aborts every stream.
    pub(super) fn fail(&mut self, error: ConnError) {
        log::debug!("{:?} connection ends: {error}", self.side);
        let tell_peer = self.phase == Phase::Open
            && !matches!(
                error,
                ConnError::PeerClosed | ConnError::Io(_) | ConnError::PeerGoAway { .. }
            );
        if tell_peer {
            Frame::GoAway {
                last_stream: self.counts.highest_peer(),
                reason: error.reason(),
                message: error.to_string(),
            }
            .encode(&mut self.control);
        }
        self.enter_closed();
        let reason = error.reason();
        let message = error.to_string();
        for key in self.store.keys() {
            let stream = self.remove(key);
            self.count_failed(reason);
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
    use crate::proto::frame::{self, HELLO_LEN, VERSION_MAX, VERSION_MIN};
    use std::time::Duration;

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

    /// A server connection whose handshake just completed; its Hello and first PING (the
    /// round-trip probe) have gone out, the PING is unanswered.
    fn handshaken(config: Config, now: Instant) -> Connection {
        let mut conn = Connection::new(Side::Server, config, now);
        let hello = client_hello();
        conn.input_buffer().extend_from_slice(&hello);
        conn.handle_input(now);
        assert!(conn.is_established());
        // Our own Hello goes out first, then the PING; the tests look at what follows.
        let mut out = Transmit::default();
        conn.poll_transmit(now, &mut out, usize::MAX);
        assert_eq!(out.len(), HELLO_LEN + frame::HEADER_LEN + 8);
        conn
    }

    /// A connection past its handshake and its first round trip, with nothing left to send.
    fn established(config: Config, now: Instant) -> Connection {
        let mut conn = handshaken(config, now);
        let mut pong = BytesMut::new();
        Frame::Pong { data: 1 }.encode(&mut pong);
        conn.input_buffer().extend_from_slice(&pong);
        conn.handle_input(now);
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

    /// The frames a connection sends now.
    fn sent(conn: &mut Connection, now: Instant) -> Vec<Frame> {
        let mut out = Transmit::default();
        conn.poll_transmit(now, &mut out, usize::MAX);
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = out.io_slices(&mut slices);
        let mut bytes = BytesMut::new();
        for s in &slices[..n] {
            bytes.extend_from_slice(s);
        }
        let mut frames = Vec::new();
        while let Some(f) = Frame::decode(&mut bytes, u32::MAX).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn the_round_trip_is_probed_while_streams_are_open() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The first probe went with the handshake, while nothing else was in flight.
        let mut conn = handshaken(Config::default(), t0);
        let mut pong = BytesMut::new();
        Frame::Pong { data: 1 }.encode(&mut pong);
        conn.input_buffer().extend_from_slice(&pong);
        conn.handle_input(t0 + ms(20));
        assert_eq!(conn.stats().min_rtt, Some(ms(20)));
        // Then, without streams, nothing is probed (the keepalive is much later).
        assert!(conn.poll_timeout().unwrap() > t0 + ms(5000));
        conn.handle_timeout(t0 + ms(1500));
        assert!(sent(&mut conn, t0 + ms(1500)).is_empty());
        // A stream opens: the next probe is due at once.
        let mut open = BytesMut::new();
        Frame::Open {
            stream: StreamId(1),
            op: crate::proto::frame::Op::Write,
            options: Default::default(),
            size: 1 << 20,
            name: "v".into(),
        }
        .encode(&mut open);
        let t1 = t0 + ms(2000);
        conn.input_buffer().extend_from_slice(&open);
        conn.handle_input(t1);
        assert!(conn.poll_timeout().unwrap() <= t1);
        conn.handle_timeout(t1);
        assert_eq!(sent(&mut conn, t1), vec![Frame::Ping { data: 2 }]);
        // Its answer is the latest round trip, and the smallest so far.
        let mut pong = BytesMut::new();
        Frame::Pong { data: 2 }.encode(&mut pong);
        conn.input_buffer().extend_from_slice(&pong);
        conn.handle_input(t1 + ms(15));
        assert_eq!(conn.stats().min_rtt, Some(ms(15)));
        // The next probe comes an interval later, not before.
        let interval = conn.config().rtt_interval;
        conn.handle_timeout(t1 + interval - ms(1));
        assert!(sent(&mut conn, t1 + interval).is_empty());
        conn.handle_timeout(t1 + interval);
        assert_eq!(
            sent(&mut conn, t1 + interval),
            vec![Frame::Ping { data: 3 }]
        );
        // A slower answer is the latest round trip, not the smallest.
        conn.input_buffer().extend_from_slice(&{
            let mut b = BytesMut::new();
            Frame::Pong { data: 3 }.encode(&mut b);
            b
        });
        conn.handle_input(t1 + interval + ms(50));
        assert_eq!(conn.stats().rtt, Some(ms(50)));
        assert_eq!(conn.stats().min_rtt, Some(ms(15)));
    }
}
