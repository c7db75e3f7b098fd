//! Why a stream or a connection ended, as one vocabulary for the protocol (ABORT, REJECT and
//! GOAWAY carry its code) and for sources and sinks (a [`VolumeError`](crate::VolumeError) names
//! one). It sits below both, so neither depends on the other for it.

use std::fmt;

/// Why a stream or connection ended. Unknown codes from newer peers are kept, not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Protocol,
    Internal,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    InvalidName,
    Io,
    NoSpace,
    DigestMismatch,
    Cancelled,
    TooManyStreams,
    FlowControl,
    Timeout,
    ConnectionLost,
    Unsupported,
    GoingAway,
    /// A block device sink is smaller than the volume (found at open, before any write).
    DeviceTooSmall,
    Other(u32),
}

impl Reason {
    pub fn code(self) -> u32 {
        match self {
            Reason::Protocol => 1,
            Reason::Internal => 2,
            Reason::NotFound => 3,
            Reason::AlreadyExists => 4,
            Reason::PermissionDenied => 5,
            Reason::InvalidName => 6,
            Reason::Io => 7,
            Reason::NoSpace => 8,
            Reason::DigestMismatch => 9,
            Reason::Cancelled => 10,
            Reason::TooManyStreams => 11,
            Reason::FlowControl => 12,
            Reason::Timeout => 13,
            Reason::ConnectionLost => 14,
            Reason::Unsupported => 15,
            Reason::GoingAway => 16,
            Reason::DeviceTooSmall => 17,
            Reason::Other(code) => code,
        }
    }

    pub fn from_code(code: u32) -> Reason {
        match code {
            1 => Reason::Protocol,
            2 => Reason::Internal,
            3 => Reason::NotFound,
            4 => Reason::AlreadyExists,
            5 => Reason::PermissionDenied,
            6 => Reason::InvalidName,
            7 => Reason::Io,
            8 => Reason::NoSpace,
            9 => Reason::DigestMismatch,
            10 => Reason::Cancelled,
            11 => Reason::TooManyStreams,
            12 => Reason::FlowControl,
            13 => Reason::Timeout,
            14 => Reason::ConnectionLost,
            15 => Reason::Unsupported,
            16 => Reason::GoingAway,
            17 => Reason::DeviceTooSmall,
            other => Reason::Other(other),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Reason::Protocol => "protocol error",
            Reason::Internal => "internal error",
            Reason::NotFound => "no such volume",
            Reason::AlreadyExists => "volume exists",
            Reason::PermissionDenied => "permission denied",
            Reason::InvalidName => "invalid volume name",
            Reason::Io => "I/O error",
            Reason::NoSpace => "no space left",
            Reason::DigestMismatch => "digest mismatch",
            Reason::Cancelled => "cancelled",
            Reason::TooManyStreams => "too many streams",
            Reason::FlowControl => "flow-control violation",
            Reason::Timeout => "timed out",
            Reason::ConnectionLost => "connection lost",
            Reason::Unsupported => "unsupported",
            Reason::GoingAway => "going away",
            Reason::DeviceTooSmall => "device too small",
            Reason::Other(code) => return write!(f, "error code {code}"),
        };
        f.write_str(text)
    }
}
