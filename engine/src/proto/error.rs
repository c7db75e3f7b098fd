//! Errors scoped to a connection: bytes that do not decode, and everything else that ends one.
//! Stream-scoped failures are not errors of the connection: they end one stream with ABORT and a
//! [`Reason`], and everything else goes on.

use crate::reason::Reason;
use std::fmt;

/// Why bytes from a peer could not be decoded. Every variant ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic,
    FrameTooLarge { len: u32, max: u32 },
    UnknownKind(u8),
    BadLength { kind: u8, len: u32 },
    NonZeroReserved,
    UnknownFlags { kind: u8, flags: u8 },
    BadOp(u8),
    BadName,
    BadMessage,
    StreamIdZero { kind: u8 },
    StreamIdNonZero { kind: u8 },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic => write!(f, "not a volstream peer (bad magic)"),
            DecodeError::FrameTooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds the limit of {max}")
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown frame type {k}"),
            DecodeError::BadLength { kind, len } => {
                write!(f, "frame type {kind} cannot have a {len}-byte body")
            }
            DecodeError::NonZeroReserved => write!(f, "reserved header bits are not zero"),
            DecodeError::UnknownFlags { kind, flags } => {
                write!(f, "frame type {kind} has unknown flags {flags:#x}")
            }
            DecodeError::BadOp(op) => write!(f, "unknown OPEN operation {op}"),
            DecodeError::BadName => write!(f, "volume name is empty, too long or not UTF-8"),
            DecodeError::BadMessage => write!(f, "message is too long or not UTF-8"),
            DecodeError::StreamIdZero { kind } => {
                write!(f, "frame type {kind} needs a stream id, got 0")
            }
            DecodeError::StreamIdNonZero { kind } => {
                write!(
                    f,
                    "frame type {kind} is connection-level but names a stream"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a connection ended. Every variant aborts all of the connection's open streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnError {
    /// The peer's bytes could not be decoded.
    Decode(DecodeError),
    /// Versions or limits could not be agreed.
    Handshake(String),
    /// The peer broke a rule of the protocol (frame for a stream that never existed, a frame
    /// not allowed in the stream's state, too many streams).
    Protocol(String),
    /// The peer sent more than the credit it was granted, or overflowed a window.
    FlowControl(String),
    /// Nothing arrived from the peer in time (handshake or idle timeout).
    Timeout(String),
    /// The peer sent GOAWAY with an error.
    PeerGoAway { reason: Reason, message: String },
    /// The socket failed.
    Io(String),
    /// The peer closed the connection.
    PeerClosed,
    /// This side closed it (shutdown, GOAWAY with nothing left to finish).
    LocallyClosed,
    /// The transport's TLS failed or was refused (certificate, name, a peer without TLS).
    Tls(String),
    /// This side's policy does not admit the peer (the GOAWAY says why).
    Refused(String),
}

impl ConnError {
    /// The reason reported to streams that this error aborts, and to the peer in GOAWAY.
    pub fn reason(&self) -> Reason {
        match self {
            ConnError::Decode(_) | ConnError::Handshake(_) | ConnError::Protocol(_) => {
                Reason::Protocol
            }
            ConnError::FlowControl(_) => Reason::FlowControl,
            ConnError::Timeout(_) => Reason::Timeout,
            ConnError::PeerGoAway { reason, .. } => *reason,
            ConnError::Io(_) | ConnError::PeerClosed => Reason::ConnectionLost,
            ConnError::LocallyClosed => Reason::Cancelled,
            ConnError::Tls(_) | ConnError::Refused(_) => Reason::PermissionDenied,
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Decode(e) => write!(f, "malformed frame from peer: {e}"),
            ConnError::Handshake(m) => write!(f, "handshake failed: {m}"),
            ConnError::Protocol(m) => write!(f, "protocol violation by peer: {m}"),
            ConnError::FlowControl(m) => write!(f, "flow-control violation by peer: {m}"),
            ConnError::Timeout(m) => write!(f, "timed out: {m}"),
            ConnError::PeerGoAway { reason, message } => {
                write!(f, "peer closed the connection ({reason}): {message}")
            }
            ConnError::Io(m) => write!(f, "connection I/O error: {m}"),
            ConnError::PeerClosed => write!(f, "connection closed by peer"),
            ConnError::LocallyClosed => write!(f, "connection closed locally"),
            ConnError::Tls(m) => f.write_str(m),
            ConnError::Refused(m) => write!(f, "refused: {m}"),
        }
    }
}

impl std::error::Error for ConnError {}

impl From<DecodeError> for ConnError {
    fn from(e: DecodeError) -> Self {
        ConnError::Decode(e)
    }
}
