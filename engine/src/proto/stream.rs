//! One stream's state inside a connection: its lifecycle, and the send or receive half it has
//! (a stream moves data one way only).

use super::flow::{RecvWindow, SendCredit, HOLE_COST};
use super::frame::{Op, OpenOptions, StreamId};
use crate::volume::Chunk;
use std::collections::VecDeque;

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
pub enum State {
    Opening,
    Requested,
    Open,
    AwaitingAck,
    Verifying,
}

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
}

/// The half of a stream that sends DATA/HOLE/FINISH.
#[derive(Debug)]
pub struct SendHalf {
    pub queue: VecDeque<Chunk>,
    /// Payload bytes queued (holes count nothing: they hold no memory).
    pub queued_bytes: usize,
    pub credit: SendCredit,
    /// Offset of the next byte to send, to check the source yields chunks in order.
    pub next_offset: u64,
    /// Holes go out as zero DATA: the peer lacks SPARSE, or the stream asked for NO_SPARSE.
    pub expand_holes: bool,
    /// The source was told to stop because the queue was full; tell it when there is room.
    pub stalled_source: bool,
}

/// The half of a stream that receives DATA/HOLE/FINISH.
#[derive(Debug)]
pub struct RecvHalf {
    pub window: RecvWindow,
    pub next_offset: u64,
    /// Credit cost of each chunk handed to the sink and not yet completed, in order.
    pub unconsumed: VecDeque<u64>,
}

#[derive(Debug)]
pub enum Half {
    Send(SendHalf),
    Recv(RecvHalf),
}

#[derive(Debug)]
pub struct Stream {
    pub id: StreamId,
    pub op: Op,
    pub options: OpenOptions,
    pub state: State,
    /// The volume's logical length; for a download opener, known only after ACCEPT.
    pub size: u64,
    pub half: Half,
    /// In the scheduler's lists (or parked waiting for connection credit).
    pub scheduled: bool,
    /// Deficit round robin: bytes this stream may still send in the current round.
    pub deficit: i64,
    pub stats: StreamStats,
    /// Bumped whenever the stream moves (a frame either way, credit, sink progress).
    pub progress: u64,
    /// The progress value last seen by the stall check, and since when it has not moved.
    pub watch: Option<(u64, std::time::Instant)>,
}

impl Stream {
    pub fn sender(id: StreamId, op: Op, options: OpenOptions, state: State, size: u64) -> Self {
        Stream {
            id,
            op,
            options,
            state,
            size,
            half: Half::Send(SendHalf {
                queue: VecDeque::new(),
                queued_bytes: 0,
                credit: SendCredit::new(0),
                next_offset: 0,
                expand_holes: false,
                stalled_source: false,
            }),
            scheduled: false,
            deficit: 0,
            stats: StreamStats::default(),
            progress: 0,
            watch: None,
        }
    }

    pub fn receiver(
        id: StreamId,
        op: Op,
        options: OpenOptions,
        state: State,
        size: u64,
        window: u32,
    ) -> Self {
        Stream {
            id,
            op,
            options,
            state,
            size,
            half: Half::Recv(RecvHalf {
                window: RecvWindow::new(window),
                next_offset: 0,
                unconsumed: VecDeque::new(),
            }),
            scheduled: false,
            deficit: 0,
            stats: StreamStats::default(),
            progress: 0,
            watch: None,
        }
    }

    pub fn send_half(&mut self) -> Option<&mut SendHalf> {
        match &mut self.half {
            Half::Send(s) => Some(s),
            Half::Recv(_) => None,
        }
    }

    pub fn recv_half(&mut self) -> Option<&mut RecvHalf> {
        match &mut self.half {
            Half::Recv(r) => Some(r),
            Half::Send(_) => None,
        }
    }

    /// Stream credit the front chunk needs before anything of it can go out; `None` if the
    /// stream has nothing it may send now.
    pub fn credit_needed(&self) -> Option<u64> {
        if self.state != State::Open {
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
