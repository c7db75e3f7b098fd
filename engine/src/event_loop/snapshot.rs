//! What an embedding daemon watches: every connection and stream of an engine with its
//! counters and gauges, taken on the loop thread at one moment ([`crate::Engine::snapshot`]).
//!
//! Building a snapshot allocates (a vector per connection); counting never does: the counters
//! are fixed fields the protocol increments as frames pass, and the snapshot only copies them.

use super::ConnectionId;
use crate::proto::{ConnStats, ReasonCounts, Side, StreamView};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    pub connections: Vec<ConnectionSnapshot>,
    /// The counters of connections that have ended (their gauges went with them), so that
    /// [`EngineSnapshot::totals`] never goes backwards.
    pub ended: ConnStats,
    /// Connections that have ended, by why: GOING_AWAY for a graceful close, else the reason
    /// of the connection error.
    pub ended_connections: ReasonCounts,
}

impl EngineSnapshot {
    /// Counters over every connection the engine has had, open or ended.
    pub fn totals(&self) -> ConnStats {
        let mut totals = self.ended;
        for c in &self.connections {
            totals.add_counters(&c.stats);
        }
        totals
    }
}

#[derive(Debug, Clone)]
pub struct ConnectionSnapshot {
    pub id: ConnectionId,
    /// The peer's address as the engine knows it.
    pub peer: String,
    pub side: Side,
    /// The handshake is done (and the connection not yet closed).
    pub established: bool,
    pub age: Duration,
    pub stats: ConnStats,
    /// Bytes in the loop's transmit queue, on top of `stats.send_queued`.
    pub transmit_queued: u64,
    pub streams: Vec<StreamSnapshot>,
}

#[derive(Debug, Clone)]
pub struct StreamSnapshot {
    pub view: StreamView,
    /// The volume (empty for LIST).
    pub name: String,
    /// Started by this side's user (else served for the peer).
    pub local: bool,
    /// Since the transfer was submitted here, or the peer's OPEN arrived.
    pub age: Duration,
    /// From the start until the first content chunk was taken from the source or handed to
    /// the sink.
    pub first_byte: Option<Duration>,
}
