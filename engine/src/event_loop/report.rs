//! How a transfer ended: [`TransferReport`], and when it failed [`TransferError`] with the
//! [`Origin`] that decides how its message reads.

use crate::proto::{Op, Reason, StreamStats};
use std::fmt;
use std::time::Duration;

/// Why a transfer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferError {
    /// The category, for programs (and the peer).
    pub reason: Reason,
    pub message: String,
    pub origin: Origin,
}

/// Who ended a transfer, which decides how its error reads: a local source or sink and the
/// connection describe themselves fully ("opening /x: No such file or directory"), while a
/// peer's message and the protocol's own aborts are details of their reason. The reason names
/// volumes ("no such volume"), so it is no category for a local file's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This side's own source or sink failed.
    Local,
    /// This side's protocol state ended the stream (a timeout, a peer breaking the rules).
    Protocol,
    /// The connection ended under the stream.
    Connection,
    RefusedByPeer,
    AbortedByPeer,
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (reason, message) = (self.reason, &self.message);
        if message.is_empty() {
            return write!(f, "{reason}");
        }
        match self.origin {
            Origin::Local | Origin::Connection => f.write_str(message),
            Origin::Protocol => write!(f, "{reason}: {message}"),
            Origin::RefusedByPeer | Origin::AbortedByPeer => {
                let how = match self.origin {
                    Origin::RefusedByPeer => "refused",
                    _ => "aborted",
                };
                // A peer's message may begin with its reason, as a local error's does: say it
                // once.
                let category = reason.to_string();
                let detail = message
                    .strip_prefix(category.as_str())
                    .and_then(|m| m.strip_prefix(": "))
                    .unwrap_or(message);
                write!(f, "{reason} ({how} by peer): {detail}")
            }
        }
    }
}

impl std::error::Error for TransferError {}

/// How a transfer the local user started ended.
#[derive(Debug, Clone)]
pub struct TransferReport {
    pub name: String,
    /// `Op::Read` for a download, `Op::Write` for an upload.
    pub op: Op,
    /// The volume's logical length.
    pub size: u64,
    pub stats: StreamStats,
    pub elapsed: Duration,
    /// From the start until the first content chunk was handed to the sink (a download) or
    /// taken from the source (an upload); `None` if none moved.
    pub first_byte: Option<Duration>,
    pub result: Result<(), TransferError>,
}
