//! A sans-IO implementation of the NBD protocol (the NetworkBlockDevice project's
//! doc/proto.md): the fixed newstyle handshake and the transmission phase with structured
//! replies and block status, for both sides. No sockets, no threads, no clocks: callers put
//! the peer's bytes into a `BytesMut`, call `handle_input`/`decode`, and send what
//! `poll_transmit` gives.
//!
//! - [`ClientHandshake`] then [`Client`]: a client that reads and writes exports with bounded
//!   requests in flight, checking every reply against its request.
//! - [`ServerHandshake`] then [`Server`]: a server that asks its host for exports and carries
//!   out only requests that were checked.
//! - [`Uri`]: `nbd://` and `nbd+unix://` URIs.
//!
//! Peers are not trusted: every length is checked before anything is allocated for it, and a
//! violation is an [`Error`], never a panic.

pub mod client;
pub mod client_handshake;
pub mod error;
pub mod export;
mod ranges;
pub mod server;
pub mod server_handshake;
pub mod uri;
pub mod wire;

pub use client::{Client, Command, Cookie, Descriptor, Reply};
pub use client_handshake::{ClientHandshake, ClientOptions};
pub use error::{CommandError, Error};
pub use export::{BlockSize, Context, Export};
pub use server::{Request, Server};
pub use server_handshake::{ExportInfo, HandshakeEvent, LookupError, ServerHandshake};
pub use uri::{Endpoint, Uri};
