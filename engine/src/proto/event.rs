//! What a connection tells its driver: events to act on, why a stream could not be opened, and
//! counters.

use super::error::ConnError;
use super::frame::{Features, FrameCounts, Op, OpenOptions, StreamId};
use super::stream::StreamStats;
use crate::range::RangeSet;
use crate::reason::{Reason, ReasonCounts};
use crate::volume::Chunk;
use crate::VolumeIdentity;
use std::sync::Arc;
use std::time::Duration;

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
        /// For a READ of only some ranges: the validated list (checked against the volume's
        /// size when the stream is accepted; `accept` refuses a list past its end).
        ranges: Option<Arc<RangeSet>>,
    },
    /// The peer accepted a stream we opened.
    Accepted {
        stream: StreamId,
        size: u64,
        /// The volume's identity, when the peer sent one (feature IDENTITY, READs only).
        identity: Option<VolumeIdentity>,
    },
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
    /// The options ask for something the peer did not announce (VERIFY, ranges), or ranges
    /// were given for another op than READ, or an empty list.
    Unsupported,
}

/// Connection-wide counters and gauges. Counters only grow; gauges (marked so) say how things
/// stand when the stats were taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Gauge: credit-bearing bytes received and not yet consumed by sinks, over all streams
    /// (the part of our connection window in use), now and at most.
    pub recv_buffered: u64,
    pub peak_recv_buffered: u64,
    /// Gauges: the connection's receive window, now and at its largest.
    pub recv_window: u64,
    pub peak_recv_window: u64,
    /// Gauge: connection credit spent and not yet granted back by the peer (the part of its
    /// connection window in use).
    pub send_window_in_use: u64,
    pub streams_completed: u64,
    /// Streams that ended without success: rejected (either way) or aborted (either way, or
    /// with the connection).
    pub streams_aborted: u64,
    /// `streams_aborted` by the reason each ended with.
    pub aborts: ReasonCounts,
    /// Logical content bytes received and sent, as DATA and as HOLE frames.
    pub data_bytes_in: u64,
    pub data_bytes_out: u64,
    pub hole_bytes_in: u64,
    pub hole_bytes_out: u64,
    /// Times a stream had content queued but waited for the peer's credit (its own or the
    /// connection's).
    pub credit_stalls: u64,
    /// Gauges: the last PING round trip, and the smallest (what windows size themselves with).
    pub rtt: Option<Duration>,
    pub min_rtt: Option<Duration>,
    /// Bytes moved (both ways) per smallest round trip, over the last interval between PONGs:
    /// the path's bandwidth-delay product as far as this connection used it.
    pub path_bdp: u64,
    /// Gauge: bytes waiting to be sent that this connection holds: control frames not yet handed to
    /// the driver, plus DATA queued by the streams' sources. The driver's own transmit queue
    /// comes on top.
    pub send_queued: u64,
    /// Frames decoded from the peer and frames handed to the driver, by type.
    pub frames_in: FrameCounts,
    pub frames_out: FrameCounts,
}

impl ConnStats {
    /// Adds the counters of `other` (not its gauges): totals over connections that ended.
    pub fn add_counters(&mut self, other: &ConnStats) {
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.streams_completed += other.streams_completed;
        self.streams_aborted += other.streams_aborted;
        self.aborts.add(&other.aborts);
        self.data_bytes_in += other.data_bytes_in;
        self.data_bytes_out += other.data_bytes_out;
        self.hole_bytes_in += other.hole_bytes_in;
        self.hole_bytes_out += other.hole_bytes_out;
        self.credit_stalls += other.credit_stalls;
        self.frames_in.add(&other.frames_in);
        self.frames_out.add(&other.frames_out);
    }
}
