//! The sink of a resumable upload (an updating WRITE with RESUME, docs/PROTOCOL.md 8.5): the
//! content goes into the partial the server keeps for this volume, peer and token
//! ([`crate::resume`]); every few tens of MiB the partial is fdatasync'd and only then are
//! the runs written since recorded in its journal, with their BLAKE3 digests. At the end the
//! partial gets the volume's name if its volume checksum is the one the OPEN announced.
//! A stream that breaks off leaves the partial and journal for a later `upload --resume`.

use super::work::Work;
use super::{Consume, WriteTarget, WriterOptions};
use crate::error::Error;
use crate::fd::{self, Location};
use crate::journal::{Journal, Record};
use crate::resume::{self, ResumeStore};
use engine::proto::ResumeKey;
use engine::{Chunk, Range};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Data written between two fdatasyncs (and journal records): what a crash can cost.
const DURABLE_EVERY: u64 = 64 << 20;

/// A run of data written since the last record, and the digest of its bytes so far.
struct Run {
    start: u64,
    end: u64,
    hash: blake3::Hasher,
}

pub(crate) struct ResumeWork {
    store: Arc<ResumeStore>,
    dir: Arc<OwnedFd>,
    final_name: CString,
    volume: String,
    owner: String,
    key: ResumeKey,
    options: WriterOptions,
    size: u64,
    checksum: [u8; 32],
    partial: String,
    file: Option<File>,
    journal: Option<Journal>,
    inner: Option<Work>,
    run: Option<Run>,
    pending: Vec<Record>,
    unsynced: u64,
    bytes_written: Arc<AtomicU64>,
}

/// What a resumable upload's sink is given besides the stream.
pub(crate) struct ResumeTarget {
    pub store: Arc<ResumeStore>,
    pub dir: Arc<OwnedFd>,
    pub final_name: CString,
    pub volume: String,
    pub owner: String,
    pub key: ResumeKey,
    pub checksum: [u8; 32],
}

impl ResumeWork {
    pub(crate) fn new(
        t: ResumeTarget,
        options: WriterOptions,
        size: u64,
        bytes_written: Arc<AtomicU64>,
    ) -> Self {
        let partial = ResumeStore::partial_name(&t.volume, &t.owner, &t.key.token);
        ResumeWork {
            store: t.store,
            dir: t.dir,
            final_name: t.final_name,
            volume: t.volume,
            owner: t.owner,
            key: t.key,
            options,
            size,
            checksum: t.checksum,
            partial,
            file: None,
            journal: None,
            inner: None,
            run: None,
            pending: Vec::new(),
            unsynced: 0,
            bytes_written,
        }
    }

    /// A new partial (replacing one of the same key that the client chose not to continue).
    fn begin(&self) -> Result<(File, Journal), Error> {
        let (path, journal_path) = self.store.paths(&self.partial);
        let shown = &self.volume;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&path)
            .map_err(|e| Error::io(format!("creating the partial upload of {shown}"), e))?;
        if !resume::lock(&file) {
            return Err(Error::NoPartial(format!(
                "the partial upload of {shown} is being written by another upload"
            )));
        }
        file.set_len(0)
            .and_then(|()| file.set_len(self.size))
            .map_err(|e| Error::io(format!("sizing the partial upload of {shown}"), e))?;
        let journal = Journal::create(
            journal_path,
            self.size,
            Some(resume::source_identity(&self.key)),
        )?;
        Ok((file, journal))
    }

    /// The partial a ranged (resumed) upload continues; the records its ranges overlap are
    /// dropped, since those bytes are about to change.
    fn continue_partial(&self, ranges: &engine::RangeSet) -> Result<(File, Journal), Error> {
        let adopted = self.store.adopt(&self.volume, &self.partial, &self.key)?;
        if adopted.journal.size() != self.size {
            return Err(Error::NoPartial(format!(
                "the partial upload of {} is of {} bytes, this upload of {}",
                self.volume,
                adopted.journal.size(),
                self.size
            )));
        }
        let overlaps = |r: &Range| {
            ranges
                .ranges()
                .iter()
                .any(|x| x.offset < r.end() && r.offset < x.end())
        };
        let keep: Vec<Record> = adopted
            .journal
            .records()
            .iter()
            .filter(|r| !overlaps(&r.range))
            .copied()
            .collect();
        let path = adopted.journal.path().to_owned();
        let mut journal = Journal::create(path, self.size, adopted.journal.identity().cloned())?;
        journal.record_all(&keep)?;
        Ok((adopted.file, journal))
    }

    fn track(&mut self, chunk: &Chunk) {
        match chunk {
            Chunk::Data { offset, bytes } => {
                let len = bytes.len() as u64;
                match &mut self.run {
                    Some(run) if run.end == *offset => {
                        run.hash.update(bytes);
                        run.end += len;
                    }
                    _ => {
                        self.close_run();
                        let mut hash = blake3::Hasher::new();
                        hash.update(bytes);
                        self.run = Some(Run {
                            start: *offset,
                            end: offset + len,
                            hash,
                        });
                    }
                }
                self.unsynced += len;
            }
            // A hole needs no record: what is unrecorded reads as zero once resumed.
            Chunk::Hole { .. } | Chunk::End { .. } => self.close_run(),
        }
    }

    fn close_run(&mut self) {
        if let Some(run) = self.run.take() {
            self.pending.push(Record {
                range: Range::new(run.start, run.end - run.start),
                digest: *run.hash.finalize().as_bytes(),
            });
        }
    }

    /// fdatasync, then the runs written since the last time go into the journal.
    fn make_durable(&mut self) -> Result<(), Error> {
        self.close_run();
        let (Some(file), Some(journal)) = (&self.file, &mut self.journal) else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        file.sync_data()
            .map_err(|e| Error::io(format!("syncing the partial upload of {}", self.volume), e))?;
        journal.record_all(&self.pending)?;
        log::debug!(
            "partial upload of {}: {} bytes durable",
            self.volume,
            journal.recorded_bytes()
        );
        self.pending.clear();
        self.unsynced = 0;
        Ok(())
    }

    /// The whole volume arrived: it gets its name if its checksum is the announced one.
    fn commit(&mut self) -> Result<(), Error> {
        let file = self.file.take().ok_or(Error::Cancelled)?;
        let journal = self.journal.take().ok_or(Error::Cancelled)?;
        let threads = crate::blockhash::threads();
        let ours = crate::blockhash::digests_of(&file, threads)
            .map_err(|e| Error::io(format!("hashing the upload of {}", self.volume), e))?;
        if ours.checksum() != self.checksum {
            drop(file);
            self.store.remove(&self.partial);
            return Err(Error::UpdateMismatch(self.volume.clone()));
        }
        file.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.volume), e))?;
        let partial = CString::new(self.partial.as_bytes()).expect("a hex name");
        fd::renameat(
            &self.dir,
            &partial,
            &self.final_name,
            self.options.overwrite,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Error::AlreadyExists(self.volume.clone())
            } else {
                Error::io(format!("renaming into {}", self.volume), e)
            }
        })?;
        drop(file);
        journal.remove()?;
        // SAFETY: fsync on a valid directory fd: the rename and the removal survive a crash.
        unsafe { libc::fsync(std::os::fd::AsRawFd::as_raw_fd(&*self.dir)) };
        log::info!(
            "{}: resumable upload of {} bytes committed",
            self.volume,
            self.size
        );
        Ok(())
    }
}

impl Consume for ResumeWork {
    fn open(&mut self) -> Result<(), Error> {
        if !self.options.overwrite
            && fd::open_beneath(
                &self.dir,
                &self.final_name,
                libc::O_RDONLY | libc::O_NONBLOCK,
            )
            .is_ok()
        {
            return Err(Error::AlreadyExists(self.volume.clone()));
        }
        let resuming = self.options.ranges.clone();
        let (file, journal) = match &resuming {
            Some(ranges) => self.continue_partial(ranges)?,
            None => self.begin()?,
        };
        let inner_file = file
            .try_clone()
            .map_err(|e| Error::io(format!("opening the partial upload of {}", self.volume), e))?;
        let target = WriteTarget::InPlace(Location::Open(inner_file).named(self.volume.clone()));
        // The partial is ours: written in place, checked by its block digests at the end.
        let options = WriterOptions {
            overwrite: true,
            verify: false,
            destination_is_zero: resuming.is_none(),
            ..self.options.clone()
        };
        let mut work = Work::new(target, options, self.size, Arc::clone(&self.bytes_written));
        Consume::open(&mut work)?;
        log::debug!(
            "{}: resumable upload for {} ({} bytes already recorded)",
            self.volume,
            self.owner,
            journal.recorded_bytes()
        );
        self.file = Some(file);
        self.journal = Some(journal);
        self.inner = Some(work);
        Ok(())
    }

    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        let Some(work) = self.inner.as_mut() else {
            return (0, Err(Error::Cancelled));
        };
        let (done, result) = Consume::handle_batch(work, batch);
        for chunk in &batch[..done] {
            self.track(chunk);
        }
        match result {
            Ok(true) => (done, self.commit().map(|()| true)),
            Ok(false) if self.unsynced >= DURABLE_EVERY => {
                (done, self.make_durable().map(|()| false))
            }
            other => (done, other),
        }
    }

    fn discard(&mut self) {
        if let Some(work) = self.inner.as_mut() {
            Consume::discard(work);
        }
        self.inner = None;
        // What was written and can be made durable now is kept for a resume.
        if let Err(e) = self.make_durable() {
            log::warn!("partial upload of {}: {e}", self.volume);
        }
        self.file = None;
        self.journal = None;
    }
}
