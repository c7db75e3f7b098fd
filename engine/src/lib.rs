//! volstream's engine: the volume-stream protocol (sans-IO, [`proto`]) and the mio event loop
//! ([`event_loop`]) that multiplexes many sparse volume streams over one connection.
//!
//! The engine never touches a disk: volumes are [`VolumeReader`]s and [`VolumeWriter`]s whose
//! work happens elsewhere (the fdstream crate's workers, a helper process, memory).
//!
//! What an embedder uses is re-exported here: the engine and its handle, TLS configuration and
//! the peer identity a provider sees, the source and sink interfaces, the options and reasons
//! of a stream, the document codec of LIST and EXTENTS, and sinks over memory. [`proto`] is the
//! protocol itself, for tools that speak it without the loop. Features: `synthetic` adds generated volumes and their checkers (load generation);
//! `test-support` adds [`testing`], two connections pumped against each other in memory.

pub mod blockmap;
pub mod cut;
mod digest;
pub mod document;
pub mod event_loop;
mod identity;
pub mod in_memory;
pub mod memory;
pub mod metrics;
pub mod proto;
pub mod range;
mod reason;
#[cfg(feature = "synthetic")]
pub mod synthetic;
#[cfg(feature = "test-support")]
pub mod testing;
mod volume;

pub use digest::Digest;
pub use event_loop::{
    Address, AllowList, CertIdentity, ConnectionId, ConnectionInfo, ConnectionSnapshot,
    Credentials, Endpoint, Engine, EngineConfig, EngineHandle, EngineSnapshot, EngineStats,
    OpenRequest, Origin, PeerIdentity, Provider, StreamSnapshot, TlsConfig, TlsError, Transfer,
    TransferError, TransferReport, UnixPeerPolicy,
};
pub use identity::{VolumeIdentity, MAX_IDENTITY_LEN};
pub use in_memory::{DiscardWriter, MemoryReader, MemoryWriter};
pub use proto::{Op, OpenOptions, StreamStats};
pub use range::{Range, RangeError, RangeSet};
pub use reason::Reason;
pub use volume::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
