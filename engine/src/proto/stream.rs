//! One stream inside a connection: where it is in its life, and the send or receive half it has
//! (a stream moves data one way only).
//!
//! The state is private to this file: every move is a method that checks the move is allowed
//! and returns [`Illegal`] when it is not, so the diagram below is the only way a stream can
//! change state.

use super::flow::{RecvWindow, SendCredit};
use super::frame::{Op, OpenOptions, StreamId};
use super::prioritize::Sched;
use crate::range::{RangeCursor, RangeSet};
use crate::volume::Chunk;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// Where a stream is in its life. Both ends walk the same diagram; a stream leaves the store
/// when it completes or aborts, so there is no closed state.
///
/// ```text
///  opener:    Opening ──ACCEPT──► Open          Opening ──REJECT──► gone (Rejected)
///  acceptor:  Requested ──accept()──► Open      Requested ──reject()──► gone
///
///  data sender:    Open ──End chunk sent as FINISH──► AwaitingAck ──FINISH ack──► gone (Completed)
///  data receiver:  Open ──FINISH arrives──► Verifying ──stream_verified()──► gone (Completed)
///
///  any state ──ABORT sent or received, or the connection ends──► gone (Aborted)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Opening,
    Requested,
    Open,
    AwaitingAck,
    Verifying,
}

/// A move the stream's state does not allow. The caller knows whether that is the peer's
/// violation or a late call of the driver, and says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Illegal;

/// Counters a stream reports when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Logical bytes carried as DATA (including holes expanded to zeroes).
    pub data_bytes: u64,
    /// Logical bytes carried as HOLE frames.
    pub hole_bytes: u64,
    /// Frame bytes (headers and payloads) this stream put on or took off the wire.
    pub wire_bytes: u64,
    /// Most credit-bearing bytes held at the receiver at once (receiving streams only).
    pub peak_buffered: u64,
    /// The receive window's size when the stream ended, and its largest (receiving streams
    /// only; windows size themselves to the path, see `flow::RecvWindow`).
    pub window: u64,
    pub peak_window: u64,
    /// DATA and HOLE frames this stream sent or received.
    pub data_frames: u64,
    pub hole_frames: u64,
    /// Times the stream had content queued but waited for the peer's credit (its own or the
    /// connection's); sending streams only.
    pub credit_stalls: u64,
}

/// How a live stream stands, for monitoring: its counters so far and its gauges now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamView {
    pub id: StreamId,
    pub op: Op,
    /// This side sends the stream's content (else it receives it).
    pub sending: bool,
    /// The content's logical length (0 until known).
    pub size: u64,
    pub stats: StreamStats,
    /// Sending: credit spent and not yet granted back by the peer. Receiving: credit-bearing
    /// bytes received and not yet consumed by the sink.
    pub window_in_use: u64,
    /// Sending: chunks from the source waiting to go out, and their payload bytes. Receiving:
    /// chunks handed to the sink and not finished yet, and the credit they hold.
    pub queued_chunks: u64,
    pub queued_bytes: u64,
}

impl Stream {
    /// The stream as [`StreamView`] shows it; `peer_window` is the peer's stream window.
    pub fn view(&self, peer_window: u32) -> StreamView {
        let (sending, window_in_use, queued_chunks, queued_bytes) = match &self.half {
            Half::Send(send) => (
                true,
                (peer_window as u64).saturating_sub(send.credit.available()),
                send.queue.len() as u64,
                send.queued_bytes as u64,
            ),
            Half::Recv(recv) => {
                let buffered = recv.window.buffered();
                (false, buffered, recv.unconsumed.len() as u64, buffered)
            }
        };
        StreamView {
            id: self.id,
            op: self.op,
            sending,
            size: self.size,
            stats: self.stats,
            window_in_use,
            queued_chunks,
            queued_bytes,
        }
    }
}

/// The half of a stream that sends DATA/HOLE/FINISH.
#[derive(Debug)]
pub(crate) struct SendHalf {
    pub queue: VecDeque<Chunk>,
    /// Payload bytes queued (holes count nothing: they hold no memory).
    pub queued_bytes: usize,
    pub credit: SendCredit,
    /// Where the next chunk must start (inside the ranges asked for, if any), to check the
    /// source yields chunks in order.
    pub cursor: RangeCursor,
    /// Holes go out as zero DATA: the peer lacks SPARSE, or the stream asked for NO_SPARSE.
    pub expand_holes: bool,
    /// The source was told to stop because the queue was full; tell it when there is room.
    pub stalled_source: bool,
}

/// The half of a stream that receives DATA/HOLE/FINISH.
#[derive(Debug)]
pub(crate) struct RecvHalf {
    pub window: RecvWindow,
    /// Where the next chunk must start (inside the ranges asked for, if any).
    pub cursor: RangeCursor,
    /// Credit cost of each chunk handed to the sink and not yet completed, in order.
    pub unconsumed: VecDeque<u64>,
}

#[derive(Debug)]
pub(crate) enum Half {
    Send(SendHalf),
    Recv(RecvHalf),
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub id: StreamId,
    pub op: Op,
    pub options: OpenOptions,
    state: State,
    /// The volume's logical length; for a download opener, known only after ACCEPT.
    pub size: u64,
    pub half: Half,
    /// The scheduler's bookkeeping (see `prioritize`).
    pub sched: Sched,
    pub stats: StreamStats,
    /// Bumped whenever the stream moves (a frame either way, credit, sink progress).
    pub progress: u64,
    /// The progress value last seen by the stall check, and since when it has not moved.
    pub watch: Option<(u64, Instant)>,
    /// A READ of only these ranges (validated; inside `size` once accepted).
    pub ranges: Option<Arc<RangeSet>>,
    /// A peer's ranged READ whose list is still arriving: its name, and the list so far. The
    /// driver hears of the stream only when the list is complete.
    pub pending_ranges: Option<(String, RangeSet)>,
}

impl Stream {
    /// A stream this side asks the peer for (OPEN sent): it sends when the op is a write.
    pub fn opened(id: StreamId, op: Op, options: OpenOptions, size: u64, window: u32) -> Self {
        let (half, size) = if op.peer_sends() {
            // The size comes with the peer's ACCEPT.
            (Half::recv(window), 0)
        } else {
            (Half::send(), size)
        };
        Stream::new(id, op, options, State::Opening, size, half)
    }

    /// A stream the peer asked for (OPEN received): it sends unless the op is a write.
    pub fn requested(id: StreamId, op: Op, options: OpenOptions, size: u64, window: u32) -> Self {
        let (half, size) = if op.peer_sends() {
            // Only an upload announces its size in OPEN; a sender learns it from its source.
            (Half::send(), 0)
        } else {
            (Half::recv(window), size)
        };
        Stream::new(id, op, options, State::Requested, size, half)
    }

    fn new(
        id: StreamId,
        op: Op,
        options: OpenOptions,
        state: State,
        size: u64,
        half: Half,
    ) -> Self {
        Stream {
            id,
            op,
            options,
            state,
            size,
            half,
            sched: Sched::default(),
            stats: StreamStats::default(),
            progress: 0,
            watch: None,
            ranges: None,
            pending_ranges: None,
        }
    }

    /// Content may move: the stream was accepted and its sender has not finished.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Opening ──ACCEPT──► Open.
    pub fn recv_accept(&mut self) -> Result<(), Illegal> {
        self.step(State::Opening, State::Open)
    }

    /// Opening ──REJECT──► gone: whether the peer may still refuse the stream.
    pub fn recv_reject(&self) -> Result<(), Illegal> {
        self.check(State::Opening)
    }

    /// Requested ──accept()──► Open.
    pub fn accept(&mut self) -> Result<(), Illegal> {
        self.step(State::Requested, State::Open)
    }

    /// Requested ──reject()──► gone: whether this side may still refuse the stream.
    pub fn reject(&self) -> Result<(), Illegal> {
        self.check(State::Requested)
    }

    /// Open ──FINISH sent──► AwaitingAck (data sender).
    pub fn send_finish(&mut self) -> Result<(), Illegal> {
        self.step(State::Open, State::AwaitingAck)
    }

    /// Open ──FINISH arrives──► Verifying (data receiver).
    pub fn recv_finish(&mut self) -> Result<(), Illegal> {
        self.step(State::Open, State::Verifying)
    }

    /// AwaitingAck ──FINISH ack──► gone (Completed).
    pub fn recv_ack(&self) -> Result<(), Illegal> {
        self.check(State::AwaitingAck)
    }

    /// Verifying ──stream_verified()──► gone (Completed).
    pub fn verified(&self) -> Result<(), Illegal> {
        self.check(State::Verifying)
    }

    fn check(&self, from: State) -> Result<(), Illegal> {
        if self.state == from {
            Ok(())
        } else {
            Err(Illegal)
        }
    }

    fn step(&mut self, from: State, to: State) -> Result<(), Illegal> {
        self.check(from)?;
        self.state = to;
        Ok(())
    }

    /// A sending stream with chunks in its queue.
    pub fn has_queued(&self) -> bool {
        matches!(&self.half, Half::Send(send) if !send.queue.is_empty())
    }

    /// Restricts the stream's content to `ranges` (`None`: the whole volume), on whichever
    /// half it has.
    pub fn set_ranges(&mut self, ranges: Option<Arc<RangeSet>>) {
        let cursor = RangeCursor::new(ranges.clone());
        match &mut self.half {
            Half::Send(send) => send.cursor = cursor,
            Half::Recv(recv) => recv.cursor = cursor,
        }
        self.ranges = ranges;
    }

    pub fn send_half(&mut self) -> Option<&mut SendHalf> {
        match &mut self.half {
            Half::Send(s) => Some(s),
            Half::Recv(_) => None,
        }
    }
}

impl Half {
    fn send() -> Half {
        Half::Send(SendHalf {
            queue: VecDeque::new(),
            queued_bytes: 0,
            // Credit and hole expansion are set once the handshake's terms apply to the stream.
            credit: SendCredit::new(0),
            cursor: RangeCursor::default(),
            expand_holes: false,
            stalled_source: false,
        })
    }

    fn recv(window: u32) -> Half {
        Half::Recv(RecvHalf {
            window: RecvWindow::new(window),
            cursor: RangeCursor::default(),
            unconsumed: VecDeque::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload() -> Stream {
        Stream::opened(StreamId(1), Op::Write, OpenOptions::default(), 10, 0)
    }

    #[test]
    fn a_sender_walks_open_awaiting_ack_and_nothing_else() {
        let mut s = upload();
        assert_eq!(s.send_finish(), Err(Illegal), "not accepted yet");
        assert_eq!(s.recv_reject(), Ok(()));
        s.recv_accept().unwrap();
        assert_eq!(s.recv_accept(), Err(Illegal), "second ACCEPT");
        assert_eq!(s.recv_reject(), Err(Illegal), "REJECT after ACCEPT");
        assert_eq!(s.recv_ack(), Err(Illegal), "ack before FINISH");
        s.send_finish().unwrap();
        assert!(!s.is_open());
        assert_eq!(s.recv_ack(), Ok(()));
    }

    #[test]
    fn a_receiver_verifies_only_after_finish() {
        let mut s = Stream::requested(StreamId(2), Op::Write, OpenOptions::default(), 10, 100);
        assert_eq!(s.size, 10);
        assert!(matches!(s.half, Half::Recv(_)));
        assert_eq!(s.recv_finish(), Err(Illegal), "FINISH before accept()");
        s.accept().unwrap();
        assert_eq!(s.reject(), Err(Illegal));
        assert_eq!(s.verified(), Err(Illegal));
        s.recv_finish().unwrap();
        assert_eq!(s.recv_finish(), Err(Illegal));
        assert_eq!(s.verified(), Ok(()));
    }
}
