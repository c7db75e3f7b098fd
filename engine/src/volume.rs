//! What the engine moves: chunks of a volume, and the non-blocking source and sink interfaces
//! that fdstream (files, devices), the synthetic generator and embedders implement.
//!
//! The loop thread calls these methods and they must never block: work happens elsewhere (a
//! worker thread, a helper process) and is announced through [`Notify`].

use crate::reason::Reason;
use crate::VolumeIdentity;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::task::Poll;

/// One piece of a volume, in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Data {
        offset: u64,
        bytes: Bytes,
    },
    /// `len` bytes that read as zero.
    Hole {
        offset: u64,
        len: u64,
    },
    /// The end: the logical length and, when the peer sends one, the CRC-32C of the content.
    End {
        length: u64,
        digest: Option<u32>,
    },
}

impl Chunk {
    pub fn logical_len(&self) -> u64 {
        match self {
            Chunk::Data { bytes, .. } => bytes.len() as u64,
            Chunk::Hole { len, .. } => *len,
            Chunk::End { .. } => 0,
        }
    }
}

/// A failure of a source or sink, with the protocol reason it is reported under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeError {
    pub reason: Reason,
    pub message: String,
}

impl VolumeError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        VolumeError {
            reason,
            message: message.into(),
        }
    }

    /// Wraps an I/O error with what was being done, choosing the reason from the errno.
    pub fn io(context: impl fmt::Display, err: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        let reason = match err.kind() {
            ErrorKind::NotFound => Reason::NotFound,
            ErrorKind::AlreadyExists => Reason::AlreadyExists,
            ErrorKind::PermissionDenied => Reason::PermissionDenied,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Reason::NoSpace,
            _ => Reason::Io,
        };
        VolumeError::new(reason, format!("{context}: {err}"))
    }
}

impl fmt::Display for VolumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Sources and sinks often say their category themselves ("device too small: ..."):
        // saying it twice reads as two errors.
        let category = self.reason.to_string();
        match self.message.strip_prefix(category.as_str()) {
            Some(rest) if rest.starts_with(": ") => f.write_str(&self.message),
            _ => write!(f, "{category}: {}", self.message),
        }
    }
}

impl std::error::Error for VolumeError {}

/// Tells the loop that a source or sink has something new (a chunk, progress, completion).
/// Cheap to clone and to call from any thread; redundant calls are coalesced.
#[derive(Clone)]
pub struct Notify(Arc<dyn Fn() + Send + Sync>);

impl Notify {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Notify(Arc::new(f))
    }

    /// A notifier that does nothing, for sources and sinks driven by polling (tests).
    pub fn noop() -> Self {
        Notify::new(|| {})
    }

    pub fn notify(&self) {
        (self.0)()
    }
}

impl fmt::Debug for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Notify")
    }
}

/// A volume being read. Call order: `start`, then `poll_size` until ready, then `poll_chunk`
/// until it yields `Chunk::End` or an error.
pub trait VolumeReader: Send {
    /// Begins opening and reading ahead; `notify` fires whenever a poll may give a new answer.
    fn start(&mut self, notify: Notify);
    /// The volume's logical length, once it is open.
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>>;
    /// The next chunk in offset order. `Chunk::End` carries the digest of everything yielded.
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>>;
    /// A failure already known, even though chunks before it are still queued. The engine asks
    /// when the stream cannot take chunks (no credit): a source that died need not wait for
    /// the peer's sink before its stream is aborted.
    fn poll_failure(&mut self) -> Option<VolumeError> {
        None
    }
    /// The stream ended early: stop reading and free buffers.
    fn cancel(&mut self) {}
    /// This source was given the ranges of a ranged READ (`OpenRequest::ranges`) and yields
    /// exactly their content, its digest over it. Otherwise the engine reads it whole and cuts
    /// its chunks to the ranges.
    fn serves_ranges(&self) -> bool {
        false
    }
    /// The volume's identity once `poll_size` is ready (docs/PROTOCOL.md 6.2.1): bytes that
    /// change whenever its content may have changed, e.g. a file's inode and change times or
    /// a generation the provider keeps. Sent in ACCEPT to peers with feature IDENTITY.
    fn identity(&self) -> Option<VolumeIdentity> {
        None
    }
}

/// How far a sink has got.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteProgress {
    /// Chunks fully handled (written, punched or skipped) since `start`, counted in the order
    /// they were given. The engine returns their flow-control credit to the peer.
    pub completed: u64,
    /// Set once `Chunk::End` was handled: Ok after the content was verified against the digest
    /// and committed (synced, renamed into place).
    pub outcome: Option<Result<(), VolumeError>>,
}

/// A volume being written. Call order: `start`, then `write` for each chunk as it arrives (the
/// engine never gives more than the stream window), polling `poll_progress` when notified.
pub trait VolumeWriter: Send {
    /// Begins opening the sink for a volume of `size` bytes.
    fn start(&mut self, size: u64, notify: Notify);
    /// Whether the sink opened; an upload is accepted only after this is ready.
    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        Poll::Ready(Ok(()))
    }
    /// For a download: the source's identity from the peer's ACCEPT (`None` when the peer has
    /// none or lacks feature IDENTITY), given once, before `start`. A resumable sink records it
    /// or, holding a partial of other content, fails.
    fn source_identity(&mut self, _identity: Option<VolumeIdentity>) {}
    /// Queues one chunk. Never blocks; failures surface through `poll_progress`.
    fn write(&mut self, chunk: Chunk);
    fn poll_progress(&mut self) -> WriteProgress;
    /// The stream ended without a verified FINISH: nothing may appear under the final name.
    fn cancel(&mut self) {}
}

// A boxed source or sink is one too, so code that picks one at run time (fdstream's `Backend`)
// hands out trait objects that go wherever a concrete one would.
impl<T: VolumeReader + ?Sized> VolumeReader for Box<T> {
    fn start(&mut self, notify: Notify) {
        (**self).start(notify)
    }
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        (**self).poll_size()
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        (**self).poll_chunk()
    }
    fn poll_failure(&mut self) -> Option<VolumeError> {
        (**self).poll_failure()
    }
    fn serves_ranges(&self) -> bool {
        (**self).serves_ranges()
    }
    fn identity(&self) -> Option<VolumeIdentity> {
        (**self).identity()
    }
    fn cancel(&mut self) {
        (**self).cancel()
    }
}

impl<T: VolumeWriter + ?Sized> VolumeWriter for Box<T> {
    fn start(&mut self, size: u64, notify: Notify) {
        (**self).start(size, notify)
    }
    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        (**self).poll_ready()
    }
    fn source_identity(&mut self, identity: Option<VolumeIdentity>) {
        (**self).source_identity(identity)
    }
    fn write(&mut self, chunk: Chunk) {
        (**self).write(chunk)
    }
    fn poll_progress(&mut self) -> WriteProgress {
        (**self).poll_progress()
    }
    fn cancel(&mut self) {
        (**self).cancel()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_names_its_reason_is_not_prefixed_twice() {
        let named = VolumeError::new(
            Reason::DeviceTooSmall,
            "device too small: /dev/x: device is 1 bytes",
        );
        assert_eq!(
            named.to_string(),
            "device too small: /dev/x: device is 1 bytes"
        );
        let plain = VolumeError::new(Reason::DeviceTooSmall, "/dev/x: device is 1 bytes");
        assert_eq!(
            plain.to_string(),
            "device too small: /dev/x: device is 1 bytes"
        );
        // A message that merely begins with the same letters still gets its category.
        let other = VolumeError::new(Reason::Io, "I/O errors counted: 3");
        assert_eq!(other.to_string(), "I/O error: I/O errors counted: 3");
    }
}
