//! The sending direction: what a data sender may queue, and how its queue becomes frames.
//!
//! A stream's source gives chunks into its queue while [`SendSide::can_send`] says there is room;
//! the room is a local memory cap (per stream and per connection), separate from the peer's
//! credit. The scheduler ([`Prioritize`]) picks which stream sends next; [`encode_frame`] turns
//! the front of its queue into one frame: DATA split to what credit and the frame size allow,
//! HOLE as one fixed-size frame (or zero DATA when holes must be expanded), and the `End` chunk
//! as the sender's FINISH, which therefore leaves only after every frame queued before it.

use super::config::Config;
use super::connection::Connection;
use super::error::ConnError;
use super::event::{ConnStats, Event};
use super::flow::{SendCredit, HOLE_COST};
use super::frame::{self, Features, Frame, Hello, StreamId, MIN_MAX_FRAME};
use super::prioritize::{Policy, Prioritize, Sent};
use super::store::{Key, Store};
use super::stream::{Half, SendHalf, Stream};
use super::transmit::Transmit;
use crate::reason::Reason;
use crate::volume::Chunk;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::time::Instant;

/// Full frames of head start a stream banks by being idle (the scheduler's `LAG`). One frame
/// covers a link stall of ~32 ms for a 4 MB/s probe beside 499 bulk streams; the bulk loops'
/// link dips last 70-100 ms (docs/PERFORMANCE.md, the trace), and four frames ride them out at
/// the cost of an idle stream going up to four frames, not one, ahead of backlogged ones.
const LAG_FRAMES: u64 = 4;

/// Zeroes that expanded holes are sent from, so a peer without SPARSE costs no allocation.
static ZEROES: [u8; 128 * 1024] = [0; 128 * 1024];

/// Chunks one stream may queue, whatever their size.
const QUEUE_CHUNKS: usize = 64;

#[derive(Debug)]
pub(crate) struct SendSide {
    pub prioritize: Prioritize,
    /// Payload bytes queued by all sending streams.
    queued_total: usize,
    /// Scratch space frame headers are encoded into and split off from.
    headers: BytesMut,
    /// Largest DATA payload per frame: ours and what the peer accepts.
    max_payload: usize,
    rules: RoomRules,
}

impl SendSide {
    pub fn new(config: &Config) -> Self {
        let mut send = SendSide {
            prioritize: Prioritize::default(),
            queued_total: 0,
            headers: BytesMut::with_capacity(16 * 1024),
            max_payload: 1,
            rules: RoomRules {
                send_buffer: config.send_buffer as usize,
                conn_send_buffer: config.conn_send_buffer as usize,
                frame: config.send_frame as usize,
            },
        };
        send.set_max_payload(MIN_MAX_FRAME, config);
        send
    }

    /// The peer's Hello sets the connection credit and the frame size.
    pub fn connected(&mut self, peer: &Hello, config: &Config) {
        self.prioritize.set_credit(peer.conn_window);
        self.set_max_payload(peer.max_frame, config);
    }

    fn set_max_payload(&mut self, peer_max_frame: u32, config: &Config) {
        let peer_max = peer_max_frame as usize - frame::body::DATA_MIN;
        self.max_payload = peer_max.min(config.send_frame as usize).max(1);
        let interactive = (config.interactive_frame as usize).clamp(1, self.max_payload);
        self.prioritize.set_policy(Policy {
            frame: self.max_payload,
            interactive_frame: interactive,
            lag: LAG_FRAMES * (self.max_payload + frame::DATA_OVERHEAD) as u64,
            priority_weight: config.priority_weight.max(1) as u64,
            interactive_linger: config.interactive_linger,
        });
    }

    /// Payload bytes all streams have queued.
    pub fn queued(&self) -> usize {
        self.queued_total
    }

    /// Gives a sending stream the peer's terms: its credit, and whether holes go as zeroes.
    pub fn init(&self, stream: &mut Stream, features: Features, peer_window: u32) {
        let expand = !features.contains(Features::SPARSE) || stream.options.no_sparse();
        if let Half::Send(send) = &mut stream.half {
            send.credit = SendCredit::new(peer_window);
            send.expand_holes = expand;
        }
    }

    /// Whether the stream's source may give another chunk. When it may not, the stream
    /// remembers to send `Event::Writable` once it may.
    pub fn can_send(&self, stream: &mut Stream) -> bool {
        let Half::Send(send) = &mut stream.half else {
            return false;
        };
        let room = self.rules.allows(send, self.queued_total);
        if !room && !matches!(send.queue.back(), Some(Chunk::End { .. })) {
            send.stalled_source = true;
        }
        room
    }

    /// Queues a chunk from the stream's source and schedules the stream. `Err` says how the
    /// source broke the order rules; the stream must then be aborted.
    pub fn send_chunk(
        &mut self,
        key: Key,
        stream: &mut Stream,
        chunk: Chunk,
        digests: bool,
    ) -> Result<(), String> {
        let size = stream.size;
        let Some(send) = stream.send_half() else {
            return Ok(());
        };
        let len = chunk.logical_len();
        match &chunk {
            Chunk::Data { offset, .. } | Chunk::Hole { offset, .. } => {
                let due = send.cursor.next();
                if !send.cursor.take(*offset, len, size) {
                    return Err(format!(
                        "source gave {offset}+{len} where offset {due} of {size} was due"
                    ));
                }
            }
            Chunk::End { length, .. } if *length != size || !send.cursor.is_done(size) => {
                return Err(format!(
                    "source ended after {} (size {size})",
                    send.cursor.describe(size)
                ));
            }
            Chunk::End { .. } => {}
        }
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
        self.can_send(stream);
        self.prioritize.schedule(key, stream);
        Ok(())
    }

    /// The peer granted the stream more credit.
    pub fn on_window(
        &mut self,
        key: Key,
        stream: &mut Stream,
        increment: u32,
    ) -> Result<(), ConnError> {
        let id = stream.id;
        let Some(send) = stream.send_half() else {
            return Err(ConnError::Protocol(format!(
                "WINDOW for {id}, which is not sending"
            )));
        };
        send.credit
            .grant(increment)
            .map_err(|_| ConnError::FlowControl(format!("WINDOW for {id} overflows")))?;
        stream.progress += 1;
        self.prioritize.schedule(key, stream);
        Ok(())
    }

    /// A stream left the store: what it had queued no longer counts.
    pub fn forget(&mut self, stream: &Stream) {
        if let Half::Send(send) = &stream.half {
            self.queued_total -= send.queued_bytes;
        }
    }

    /// Moves frames of the streams the scheduler picks into `out` until it holds `limit`
    /// bytes or nothing more may go. Returns the bytes added.
    pub fn poll_transmit(
        &mut self,
        store: &mut Store,
        now: Instant,
        out: &mut Transmit,
        limit: usize,
        events: &mut VecDeque<Event>,
        stats: &mut ConnStats,
    ) -> u64 {
        let rules = self.rules;
        let (headers, queued_total) = (&mut self.headers, &mut self.queued_total);
        let mut bytes_out = 0;
        self.prioritize
            .poll(store, now, out, limit, |stream, max_payload, out| {
                let sent = encode_frame(headers, queued_total, stream, max_payload, out, stats);
                bytes_out += sent.wire as u64;
                // Still open: it did not just send its FINISH.
                let open = stream.is_open();
                if let Half::Send(send) = &mut stream.half {
                    if send.stalled_source && open && rules.allows(send, *queued_total) {
                        send.stalled_source = false;
                        events.push_back(Event::Writable { stream: stream.id });
                    }
                }
                sent
            });
        bytes_out
    }
}

impl Connection {
    pub(super) fn on_window(&mut self, id: StreamId, increment: u32) -> Result<(), ConnError> {
        if id.is_connection() {
            return self
                .send
                .prioritize
                .grant(increment, &self.store)
                .map_err(|_| {
                    ConnError::FlowControl("connection WINDOW overflows the credit limit".into())
                });
        }
        match self.lookup(id, "WINDOW")? {
            Some(key) => self.send.on_window(key, &mut self.store[key], increment),
            None => Ok(()),
        }
    }

    /// Whether a sending stream has room for another chunk from its source. When it has not,
    /// an `Event::Writable` follows once it has.
    pub fn can_send(&mut self, id: StreamId) -> bool {
        match self.store.find(id) {
            Some(key) => self.send.can_send(&mut self.store[key]),
            None => false,
        }
    }

    /// Queues a chunk from a stream's source. Chunks must come in offset order and end with
    /// `Chunk::End`; a source that breaks this aborts its stream.
    pub fn send_chunk(&mut self, id: StreamId, chunk: Chunk) {
        let Some(key) = self.store.find(id) else {
            return;
        };
        let digests = self.features().contains(Features::DIGEST);
        if let Err(message) = self
            .send
            .send_chunk(key, &mut self.store[key], chunk, digests)
        {
            self.abort(id, Reason::Internal, &message);
        }
    }
}

/// How much a sender may queue locally: `send_buffer` per stream, `conn_send_buffer` for all
/// of them, except that a stream with less than a frame queued may always take one more chunk,
/// so every stream keeps moving while memory stays near the connection's cap plus a frame and
/// a chunk per stream.
///
/// A frame, not an empty queue: with bulk streams over the cap, a stream of small messages
/// that could hold only one message sent one per scheduling round (a round per transmit-queue
/// refill) however much of its quantum was left, so at 0.2 GB/s of 256 KiB refills a 4 KiB
/// message every millisecond fell behind and waited in its source for up to seconds.
#[derive(Debug, Clone, Copy)]
struct RoomRules {
    send_buffer: usize,
    conn_send_buffer: usize,
    /// Largest DATA payload we send: a round's worth for a stream of small messages.
    frame: usize,
}

impl RoomRules {
    fn allows(self, send: &SendHalf, queued_total: usize) -> bool {
        let ends = matches!(send.queue.back(), Some(Chunk::End { .. }));
        let stream_room = send.queued_bytes < self.send_buffer && send.queue.len() < QUEUE_CHUNKS;
        let conn_room = send.queued_bytes < self.frame || queued_total < self.conn_send_buffer;
        !ends && stream_room && conn_room
    }
}

impl Stream {
    /// Stream credit the front chunk needs before anything of it can go out; `None` if the
    /// stream has nothing it may send now.
    pub(crate) fn credit_needed(&self) -> Option<u64> {
        if !self.is_open() {
            return None;
        }
        let Half::Send(send) = &self.half else {
            return None;
        };
        let need = match send.queue.front()? {
            Chunk::End { .. } => 0,
            Chunk::Hole { .. } if !send.expand_holes => HOLE_COST,
            _ => 1,
        };
        (send.credit.available() >= need.max(1) || need == 0).then_some(need)
    }
}

/// Sends one frame from the front of a stream's queue, at most `limit` payload bytes (the
/// caller checked the stream may send). Returns the frame's size on the wire and its cost.
fn encode_frame(
    headers: &mut BytesMut,
    queued_total: &mut usize,
    stream: &mut Stream,
    limit: usize,
    out: &mut Transmit,
    conn: &mut ConnStats,
) -> Sent {
    let id = stream.id;
    let Half::Send(send) = &mut stream.half else {
        return Sent { wire: 0, credit: 0 };
    };
    let limit = (limit as u64).min(send.credit.available()) as usize;
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
            data_header(headers, out, id, *offset, n);
            out.push(payload);
            *offset += n as u64;
            send.queued_bytes -= n;
            *queued_total -= n;
            (n as u64, frame::DATA_OVERHEAD + n, n as u64, false)
        }
        Chunk::Hole { offset, len } if send.expand_holes => {
            let n = (limit.min(ZEROES.len()) as u64).min(*len) as usize;
            data_header(headers, out, id, *offset, n);
            out.push(Bytes::from_static(&ZEROES[..n]));
            *offset += n as u64;
            *len -= n as u64;
            (n as u64, frame::DATA_OVERHEAD + n, n as u64, false)
        }
        Chunk::Hole { offset, len } => {
            let hole = Frame::Hole {
                stream: id,
                offset: *offset,
                len: *len,
            };
            hole.encode(headers);
            out.push(headers.split().freeze());
            let logical = std::mem::take(len);
            (HOLE_COST, frame::HOLE_LEN, logical, true)
        }
        Chunk::End { length, digest } => {
            let finish = Frame::Finish {
                stream: id,
                length: *length,
                digest: *digest,
                ack: false,
            };
            finish.encode(headers);
            out.push(headers.split().freeze());
            finished = true;
            (0, frame::FINISH_LEN, 0, false)
        }
    };
    if front.logical_len() == 0 {
        send.queue.pop_front();
    }
    send.credit.spend(cost);
    let kind = match (finished, is_hole) {
        (true, _) => frame::kind::FINISH,
        (false, true) => frame::kind::HOLE,
        (false, false) => frame::kind::DATA,
    };
    conn.frames_out.record(kind);
    stream.stats.wire_bytes += wire as u64;
    stream.progress += 1;
    if is_hole {
        stream.stats.hole_bytes += logical;
        stream.stats.hole_frames += 1;
        conn.hole_bytes_out += logical;
    } else if !finished {
        stream.stats.data_bytes += logical;
        stream.stats.data_frames += 1;
        conn.data_bytes_out += logical;
    }
    if finished {
        stream
            .send_finish()
            .expect("only an open stream is scheduled");
    }
    Sent { wire, credit: cost }
}

fn data_header(headers: &mut BytesMut, out: &mut Transmit, id: StreamId, offset: u64, n: usize) {
    frame::encode_data_header(headers, id, offset, n);
    out.push(headers.split().freeze());
}
