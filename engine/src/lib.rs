//! volstream's engine: the volume-stream protocol (sans-IO, [`proto`]) and the mio event loop
//! ([`event_loop`]) that multiplexes many sparse volume streams over one connection.
//!
//! The engine never touches a disk: volumes are [`VolumeReader`]s and [`VolumeWriter`]s whose
//! work happens elsewhere (the fdstream crate's workers, a helper process, memory).

pub mod digest;
pub mod memory;
pub mod metrics;
pub mod proto;
pub mod reason;
pub mod synthetic;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod volume;

pub use digest::Digest;
pub use reason::Reason;
pub use volume::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
pub mod event_loop;

pub use event_loop::{
    Address, AllowList, ConnectionId, ConnectionInfo, ConnectionSnapshot, Credentials, Engine,
    EngineConfig, EngineHandle, EngineSnapshot, EngineStats, OpenRequest, Origin, PeerIdentity,
    Provider, StreamSnapshot, TlsConfig, TlsError, TransferError, TransferReport, UnixPeerPolicy,
};
