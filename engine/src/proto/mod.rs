//! The volstream protocol as a sans-IO state machine: bytes and time in; frames, events and
//! deadlines out. See docs/PROTOCOL.md for the wire format.

pub mod connection;
pub mod error;
pub mod flow;
pub mod frame;
pub mod schedule;
pub mod stream;
pub mod transmit;

pub use connection::{Config, ConnStats, Connection, Event, OpenError, Side};
pub use error::ConnError;
pub use frame::{DecodeError, Features, Frame, Hello, Op, OpenOptions, Reason, StreamId};
pub use stream::StreamStats;
pub use transmit::Transmit;
