//! NBD exports as volumes: [`NbdReader`] reads one, [`NbdWriter`] writes one, [`map`] gives its
//! allocation map. Each runs the `nbd` crate's client over a blocking socket on a pool worker,
//! with the same queueing, read-ahead bounds and cancellation as file readers and writers: the
//! event loop only takes chunks from a queue.
//!
//! Remaining limit, as for files: a worker waits while its server is slow to answer (up to the
//! NBD timeout), so `N` hung servers can hold `N` workers.

pub(crate) mod conn;
pub mod map;
pub(crate) mod sink;
pub(crate) mod source;

pub use conn::{timeout, Conn};
pub use map::{map, map_as, Status};
pub use source::SourceOptions;

use crate::reader::{FileReader, ReaderOptions};
use crate::writer::{FileWriter, WriterOptions};
use engine::{Chunk, Notify, VolumeError, VolumeReader, VolumeWriter, WriteProgress};
use nbd::Uri;
use std::task::Poll;

/// The size of an export (a connection just to ask).
pub fn export_size(uri: &Uri) -> Result<u64, crate::Error> {
    let conn = conn::Conn::open(uri, &[], 1)?;
    let size = conn.export().size;
    conn.disconnect();
    Ok(size)
}

/// Reads an NBD export.
pub struct NbdReader(FileReader);

impl NbdReader {
    /// `options.pool` picks the workers; the other reader options do not apply (see
    /// `source`).
    pub fn new(uri: Uri, source: SourceOptions, options: ReaderOptions) -> NbdReader {
        NbdReader(FileReader::with_producer(
            Box::new(source::Source::new(uri, source)),
            options,
        ))
    }
}

impl VolumeReader for NbdReader {
    fn start(&mut self, notify: Notify) {
        self.0.start(notify)
    }
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        self.0.poll_size()
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        self.0.poll_chunk()
    }
    fn poll_failure(&mut self) -> Option<VolumeError> {
        self.0.poll_failure()
    }
    fn cancel(&mut self) {
        self.0.cancel()
    }
}

/// Writes an NBD export in place.
pub struct NbdWriter(FileWriter);

impl NbdWriter {
    /// `allocated`, `destination_is_zero`, `no_sync` and `pool` apply; the export must be at
    /// least as large as the volume.
    pub fn new(uri: Uri, options: WriterOptions) -> NbdWriter {
        let opts = options.clone();
        NbdWriter(FileWriter::with_consumer(
            Box::new(move |size| Box::new(sink::Sink::new(uri, opts, size))),
            options,
        ))
    }
}

impl VolumeWriter for NbdWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        self.0.start(size, notify)
    }
    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        self.0.poll_ready()
    }
    fn write(&mut self, chunk: Chunk) {
        self.0.write(chunk)
    }
    fn poll_progress(&mut self) -> WriteProgress {
        self.0.poll_progress()
    }
    fn cancel(&mut self) {
        self.0.cancel()
    }
}
