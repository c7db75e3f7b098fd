//! What a readiness event is for. mio gives one `usize` back per registration; this is the
//! only place that puts a listener or a connection into it and takes it out again.
//!
//! A connection's token carries its [`ConnectionId`] whole, generation included, so an event
//! still queued for a connection that has gone never reaches the one that reused its slot.

use super::ConnectionId;
use mio::Token;

/// The owner of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The waker other threads use.
    Waker,
    /// A listening socket, by its slot.
    Listener(usize),
    Connection(ConnectionId),
}

// Layout: the low two bits say which kind; a listener's slot, or a connection's slot (32 bits)
// and generation (30 bits) above them.
const KIND_BITS: u32 = 2;
const KIND_MASK: usize = (1 << KIND_BITS) - 1;
const WAKER: usize = 0;
const LISTENER: usize = 1;
const CONNECTION: usize = 2;
const SLOT_BITS: u32 = 32;

impl Source {
    pub fn token(self) -> Token {
        Token(match self {
            Source::Waker => WAKER,
            Source::Listener(slot) => (slot << KIND_BITS) | LISTENER,
            Source::Connection(id) => {
                ((id.generation as usize) << (KIND_BITS + SLOT_BITS))
                    | ((id.slot as usize) << KIND_BITS)
                    | CONNECTION
            }
        })
    }

    /// `None` for a token no registration of ours has.
    pub fn of(token: Token) -> Option<Source> {
        let bits = token.0;
        match bits & KIND_MASK {
            WAKER if bits == WAKER => Some(Source::Waker),
            LISTENER => Some(Source::Listener(bits >> KIND_BITS)),
            CONNECTION => Some(Source::Connection(ConnectionId {
                slot: (bits >> KIND_BITS) as u32,
                generation: (bits >> (KIND_BITS + SLOT_BITS)) as u32,
            })),
            _ => None,
        }
    }
}

/// Generations of connection ids wrap within what a token holds.
pub(crate) const GENERATION_MASK: u32 = (1 << (usize::BITS - KIND_BITS - SLOT_BITS)) - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_comes_back_from_its_token() {
        let sources = [
            Source::Waker,
            Source::Listener(0),
            Source::Listener(77),
            Source::Connection(ConnectionId {
                slot: 0,
                generation: 1,
            }),
            Source::Connection(ConnectionId {
                slot: u32::MAX,
                generation: GENERATION_MASK,
            }),
        ];
        for s in sources {
            assert_eq!(Source::of(s.token()), Some(s), "{s:?}");
        }
        assert_eq!(Source::of(Token(3)), None);
    }
}
