//! Volume sources and sinks over file descriptors: regular files, block devices and pipes,
//! read and written by a pool of worker threads so the engine's event loop never blocks.
//!
//! - [`FileReader`]: extent map (SEEK_DATA/SEEK_HOLE) plus zero detection, bounded read-ahead,
//!   digest computed on the worker.
//! - [`FileWriter`]: new files via a temporary and rename after the digest matched; existing
//!   files and devices in place with the zeroing cascade ([`punch`]); pipes sequentially.
//! - [`DirProvider`]: serves a directory (and named devices) to an engine listener.
//! - [`extents`]: the allocation map of a file or device.
//! - [`export`]: the NBD export server, a pool's volumes for any NBD client.
//! - [`helper`]: the same readers and writers run in a `volstream-iohelper` process per volume
//!   (crash isolation, O_DIRECT).

pub mod attach;
pub mod blockhash;
pub mod budget;
pub mod copy;
pub mod cor;
mod direct;
pub mod document;
pub mod error;
pub mod export;
pub mod extents;
mod fd;
pub mod helper;
pub mod identity;
pub mod journal;
pub mod nbd;
pub mod pool;
pub mod provider;
pub mod punch;
mod qcow2_map;
mod qcow2_sink;
pub mod qemu;
pub mod reader;
pub mod resume;
mod sink;
pub mod temp;
pub mod update;
mod verify;
pub mod writer;
pub mod zero;

pub use self::nbd::{NbdReader, NbdWriter};
pub use error::Error;
pub use extents::{extents, extents_of, Extent, ExtentKind};
pub use fd::{block_device_size, read_stream, AlignedBuf, Location};
pub use helper::{Backend, HelperOptions, HelperReader, HelperWriter};
pub use pool::Pool;
pub use provider::{reader_options, writer_options, DirProvider, VolumeInfo};
pub use reader::{read_ahead_bytes, FileReader, ReadCore, ReaderOptions};
pub use writer::{FileWriter, WriteCore, WriteTarget, WriterOptions};
