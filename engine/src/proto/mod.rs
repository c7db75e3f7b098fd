//! The volstream protocol as a sans-IO state machine: bytes and time in; frames, events and
//! deadlines out. See docs/PROTOCOL.md for the wire format.
//!
//! [`Connection`] is the entry point. The codec ([`frame`]) and the credit windows ([`flow`])
//! are public for tools and tests that speak the wire format directly; the rest is the
//! connection's own machinery:
//!
//! | module | what it decides |
//! |---|---|
//! | `connection` | the phase, frame dispatch, events, how streams and the connection end |
//! | `hello`, `handshake` | the Hello record each side sends; what the two agree on |
//! | `input` | the bounded input buffer, frame decoding, the pause while the control backlog is full, the frame clock |
//! | `opening` | how a stream begins: OPEN, then ACCEPT or REJECT |
//! | `store` | which streams exist: ids to streams, tombstones of aborted ones |
//! | `counts` | stream ids, and how many streams each side may open |
//! | `stream` | one stream's state diagram and halves |
//! | `send`, `recv` | each direction's rules: queueing and framing; receiving and credit return |
//! | `prioritize` | which stream sends next (start-time fair queuing, two classes), frame size, the connection's credit |
//! | `timers` | every deadline: handshake, idle, keepalive, frame, stream stall |
//! | `transmit` | the bytes waiting for the socket, as segments for writev |
//! | `options` | a stream's OPEN options and their flag bits |

mod config;
mod connection;
mod counts;
mod error;
mod event;
pub mod flow;
pub mod frame;
mod handshake;
mod hello;
mod input;
mod opening;
mod options;
mod prioritize;
mod recv;
mod send;
mod store;
mod stream;
mod timers;
mod transmit;

pub use crate::reason::{Reason, ReasonCounts};
pub use config::Config;
pub use connection::Connection;
pub use counts::Side;
pub use error::{ConnError, DecodeError};
pub use event::{ConnStats, Event, OpenError};
pub use frame::{Features, Frame, FrameCounts, Hello, Op, OpenOptions, ResumeKey, StreamId};
pub use stream::{StreamStats, StreamView};
pub use transmit::Transmit;
