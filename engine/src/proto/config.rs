//! What one connection may use and how long it waits: limits announced to the peer in the
//! handshake, and local caps and timeouts.

use super::frame::Features;
use std::time::Duration;

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
    /// The most a stream's receive window grows to as it sizes itself to the path (it starts
    /// at `stream_window`; see `flow::RecvWindow`): what one stalled sink can hold at most.
    pub max_stream_window: u32,
    /// The most the connection's receive window grows to (from `conn_window`): the cap on
    /// received data held for all sinks together. Stream windows together grow past
    /// `stream_window` by at most half of it, so streams that grew and then stalled cannot
    /// take the whole connection window from the others.
    pub max_conn_window: u32,
    /// While streams are open, PING this often: windows size themselves with the smallest
    /// round trip seen.
    pub rtt_interval: Duration,
    /// Streams the peer may have open towards us at once.
    pub max_streams: u32,
    /// Largest DATA payload we send (also bounded by the peer's `max_frame`) while no
    /// interactive stream is active.
    pub send_frame: u32,
    /// Largest DATA payload we send while an interactive stream is active (see `prioritize`):
    /// a frame already on its way is what an interactive frame waits behind.
    pub interactive_frame: u32,
    /// How long frames stay at `interactive_frame` after an interactive stream was last served.
    pub interactive_linger: Duration,
    /// The priority class's share of the link against the bulk class's 1, while both have
    /// data: 4 gives priority streams 80 % and never less than 20 % to bulk ones.
    pub priority_weight: u32,
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
        // max_conn_window of received data, and TRANSMIT_TARGET + control_backlog + send_buffer per
        // sending stream of output: a few MiB by default, and max_streams bounds the streams.
        Config {
            features: Features::ALL,
            // A 256 KiB source chunk fits one frame with room for the DATA header.
            max_frame: 256 * 1024 + 64,
            stream_window: 2 * 1024 * 1024,
            conn_window: 32 * 1024 * 1024,
            // 16 MiB per stream fills about 330 MB/s at 50 ms; 64 MiB, 1.3 GB/s on the whole.
            max_stream_window: 16 * 1024 * 1024,
            max_conn_window: 64 * 1024 * 1024,
            rtt_interval: Duration::from_secs(1),
            max_streams: 1024,
            send_frame: 128 * 1024,
            interactive_frame: 32 * 1024,
            interactive_linger: Duration::from_millis(100),
            priority_weight: 4,
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
