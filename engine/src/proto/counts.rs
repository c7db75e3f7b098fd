//! Stream ids and how many streams each side may have open.
//!
//! Clients number their streams odd and servers even, both increasing, so both sides open
//! streams without coordination, and an id tells who opened it and whether it existed already.
//! Each side announces in its Hello how many streams the peer may have open towards it.

use super::error::ConnError;
use super::event::OpenError;
use super::frame::StreamId;

/// Which end of the connection this is. Clients number their streams odd, servers even, so
/// both may open streams without colliding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

#[derive(Debug)]
pub(crate) struct Counts {
    side: Side,
    next_local: u32,
    highest_peer: u32,
    /// Streams we opened that are still open, and how many the peer allows (from its Hello).
    local_open: u32,
    local_max: u32,
    /// Streams the peer opened that are still open, and how many we allow (our `max_streams`).
    peer_open: u32,
    peer_max: u32,
}

impl Counts {
    pub fn new(side: Side, peer_max: u32) -> Self {
        Counts {
            side,
            next_local: if side == Side::Client { 1 } else { 2 },
            highest_peer: 0,
            local_open: 0,
            // Nothing may be opened before the peer's Hello says how much.
            local_max: 0,
            peer_open: 0,
            peer_max,
        }
    }

    /// The peer's Hello arrived with its stream limit.
    pub fn set_local_max(&mut self, max: u32) {
        self.local_max = max;
    }

    pub fn is_local(&self, id: StreamId) -> bool {
        let odd = id.0 % 2 == 1;
        odd == (self.side == Side::Client)
    }

    /// Whether `id` names a stream that existed once (so late frames for it are plausible).
    pub fn existed(&self, id: StreamId) -> bool {
        if self.is_local(id) {
            id.0 < self.next_local
        } else {
            id.0 <= self.highest_peer
        }
    }

    /// The newest stream the peer opened (what GOAWAY promises to finish).
    pub fn highest_peer(&self) -> StreamId {
        StreamId(self.highest_peer)
    }

    /// Numbers a new stream of ours, if the peer's limit allows one more.
    pub fn open_local(&mut self) -> Result<StreamId, OpenError> {
        if self.local_open >= self.local_max {
            return Err(OpenError::TooManyStreams);
        }
        let id = StreamId(self.next_local);
        self.next_local += 2;
        self.local_open += 1;
        Ok(id)
    }

    /// The peer sent OPEN for `id`: it must be a new id of the peer's.
    pub fn peer_opens(&mut self, id: StreamId) -> Result<(), ConnError> {
        if self.is_local(id) || id.0 <= self.highest_peer {
            return Err(ConnError::Protocol(format!(
                "OPEN for {id}, which is not a new stream id of the peer"
            )));
        }
        self.highest_peer = id.0;
        Ok(())
    }

    /// Counts a stream the peer opened against our limit.
    pub fn admit_peer(&mut self) -> Result<(), ConnError> {
        if self.peer_open >= self.peer_max {
            return Err(ConnError::Protocol(format!(
                "peer opened more than the {} streams it was allowed",
                self.peer_max
            )));
        }
        self.peer_open += 1;
        Ok(())
    }

    /// A counted stream ended.
    pub fn closed(&mut self, id: StreamId) {
        if self.is_local(id) {
            self.local_open -= 1;
        } else {
            self.peer_open -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_alternate_by_side_and_limits_hold() {
        let mut client = Counts::new(Side::Client, 1);
        assert_eq!(client.open_local(), Err(OpenError::TooManyStreams));
        client.set_local_max(2);
        assert_eq!(client.open_local(), Ok(StreamId(1)));
        assert_eq!(client.open_local(), Ok(StreamId(3)));
        assert_eq!(client.open_local(), Err(OpenError::TooManyStreams));
        client.closed(StreamId(1));
        assert_eq!(client.open_local(), Ok(StreamId(5)));
        assert!(client.existed(StreamId(3)) && !client.existed(StreamId(7)));

        assert!(client.peer_opens(StreamId(3)).is_err(), "an id of ours");
        client.peer_opens(StreamId(4)).unwrap();
        assert!(client.peer_opens(StreamId(2)).is_err(), "not increasing");
        client.admit_peer().unwrap();
        assert!(client.admit_peer().is_err(), "over our limit of 1");
        assert_eq!(client.highest_peer(), StreamId(4));
    }
}
