//! The sink of a resumable download: the volume is written in place into a partial beside its
//! final name, and what arrived is recorded in the partial's journal ([`crate::journal`]) once
//! it is durable, so a later run can fetch only what is missing. At the end the partial gets
//! the final name and the journal goes.
//!
//! Recording: the ranges handled since the last record are kept with running BLAKE3 digests;
//! at most once a second, once at least [`RECORD_BYTES`] are pending (and at the end), the
//! partial is fdatasync'ed and the ranges recorded in one rewrite of the journal. A crash loses
//! at most that much, never records what is not on disk.
//!
//! What the final name gets is verified: a fresh partial by the stream's digest, like any
//! download; a resumed one, whose bytes came from several streams (the killed run's never saw
//! their stream's digest), by the source's volume checksum over the whole content.

use super::work::Work;
use super::{Consume, WriteTarget, WriterOptions};
use crate::error::Error;
use crate::fd;
use crate::journal::{self, Journal, Record};
use engine::{Chunk, Range, RangeSet, VolumeIdentity};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes pending before a record is due (with at least [`RECORD_INTERVAL`] since the last).
pub const RECORD_BYTES: u64 = 64 << 20;
/// Least time between two records: each costs an fdatasync and a journal rewrite.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// How a journaled sink begins and ends.
pub struct Journaled {
    /// The partial, written in place; see [`journal::partial_for`].
    pub partial: PathBuf,
    /// The final name it gets once complete and verified; `None` keeps the complete partial
    /// where it is (a cache), journal and all.
    pub dest: Option<PathBuf>,
    /// Replace an existing `dest` at the rename (else one is refused at open).
    pub overwrite: bool,
    /// A journal adopted from an earlier run: only its missing ranges arrive, and the source
    /// must have its size and identity. `None`: a new partial and journal are created.
    pub adopted: Option<Journal>,
    /// With `adopted`: the source's volume checksum, which the whole content must have
    /// before the rename.
    pub checksum: Option<[u8; 32]>,
    /// Keep the partial and its journal when the transfer fails or is cancelled (for a later
    /// resume); otherwise both are removed. A partial of other content is removed anyway.
    pub keep: bool,
}

/// What a journaled sink found, for the caller to read after the transfer.
#[derive(Default)]
pub struct JournalStatus {
    /// The source is not what the adopted journal describes; the partial was removed.
    pub source_changed: AtomicBool,
    /// Bytes recorded durable (those adopted included).
    pub recorded: AtomicU64,
}

pub(crate) struct JournaledWork {
    plan: Journaled,
    options: WriterOptions,
    size: u64,
    identity: Option<VolumeIdentity>,
    journal: Option<Journal>,
    inner: Option<Work>,
    /// Our own fd on the partial, to fdatasync it before a record.
    file: Option<File>,
    pending: Vec<(Range, blake3::Hasher)>,
    pending_bytes: u64,
    last_record: Instant,
    status: Arc<JournalStatus>,
    bytes_written: Arc<AtomicU64>,
    /// A journal was adopted: its partial is worth keeping even if opening failed.
    was_adopted: bool,
    /// Renamed, or removed, or left for a later run: a later `discard` (a cancel after the
    /// failure) must not touch the paths, which a new run may be using by then.
    settled: bool,
}

impl JournaledWork {
    pub(crate) fn new(
        plan: Journaled,
        options: WriterOptions,
        size: u64,
        identity: Option<VolumeIdentity>,
        status: Arc<JournalStatus>,
        bytes_written: Arc<AtomicU64>,
    ) -> Self {
        JournaledWork {
            was_adopted: plan.adopted.is_some(),
            settled: false,
            plan,
            options,
            size,
            identity,
            journal: None,
            inner: None,
            file: None,
            pending: Vec::new(),
            pending_bytes: 0,
            last_record: Instant::now(),
            status,
            bytes_written,
        }
    }

    fn shown(&self) -> String {
        match &self.plan.dest {
            Some(d) => d.display().to_string(),
            None => self.plan.partial.display().to_string(),
        }
    }

    fn changed(&self, what: String) -> Error {
        self.status.source_changed.store(true, Ordering::SeqCst);
        Error::SourceChanged {
            target: self.shown(),
            what,
        }
    }

    /// Opens the partial: the adopted one checked against the source, or a new one.
    fn open_partial(&mut self) -> Result<(Journal, Option<std::sync::Arc<RangeSet>>), Error> {
        let shown = self.shown();
        let partial = &self.plan.partial;
        if let Some(dest) = &self.plan.dest {
            match std::fs::symlink_metadata(dest) {
                Ok(m) if m.is_dir() => {
                    return Err(Error::Unsupported(format!("{shown} is a directory")))
                }
                Ok(_) if !self.plan.overwrite => return Err(Error::AlreadyExists(shown)),
                Ok(m) if !m.is_file() => {
                    return Err(Error::Unsupported(format!(
                        "{shown} is not a regular file: only a regular file can be replaced"
                    )))
                }
                _ => {}
            }
        }
        let Some(adopted) = self.plan.adopted.take() else {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(partial)
                .map_err(|e| Error::io(format!("creating {}", partial.display()), e))?;
            crate::sink::size_before_writing(&file, self.size, &shown)?;
            let journal =
                Journal::create(journal::path_for(partial), self.size, self.identity.clone())?;
            self.file = Some(file);
            return Ok((journal, None));
        };
        if adopted.size() != self.size {
            return Err(self.changed(format!(
                "its size was {}, it is {} now",
                adopted.size(),
                self.size
            )));
        }
        if adopted.identity() != self.identity.as_ref() {
            let hex = |i: Option<&VolumeIdentity>| i.map_or("none".into(), |i| i.to_hex());
            return Err(self.changed(format!(
                "its identity was {}, it is {} now",
                hex(adopted.identity()),
                hex(self.identity.as_ref())
            )));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open(partial)
            .map_err(|e| Error::io(format!("opening {}", partial.display()), e))?;
        let missing = RangeSet::new(adopted.missing()).map_err(|e| Error::Journal {
            path: adopted.path().display().to_string(),
            problem: format!("its missing ranges cannot be asked for: {e}"),
        })?;
        self.status
            .recorded
            .store(adopted.recorded_bytes(), Ordering::Relaxed);
        self.file = Some(file);
        Ok((adopted, Some(Arc::new(missing))))
    }

    /// Adds a handled chunk to the pending ranges.
    fn note(&mut self, chunk: &Chunk) {
        let (offset, len) = match chunk {
            Chunk::Data { offset, bytes } => (*offset, bytes.len() as u64),
            Chunk::Hole { offset, len } => (*offset, *len),
            Chunk::End { .. } => return,
        };
        if len == 0 {
            return;
        }
        let joins = self.pending.last().is_some_and(|(r, _)| r.end() == offset);
        if !joins {
            self.pending
                .push((Range::new(offset, 0), blake3::Hasher::new()));
        }
        let (range, hasher) = self.pending.last_mut().expect("just pushed");
        range.len += len;
        match chunk {
            Chunk::Data { bytes, .. } => {
                hasher.update(bytes);
            }
            _ => {
                static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(ZEROES.len() as u64) as usize;
                    hasher.update(&ZEROES[..n]);
                    left -= n as u64;
                }
            }
        }
        self.pending_bytes += len;
    }

    /// Makes the pending ranges durable and records them.
    fn record(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let file = self.file.as_ref().ok_or(Error::Cancelled)?;
        file.sync_data()
            .map_err(|e| Error::io(format!("syncing {}", self.plan.partial.display()), e))?;
        let records: Vec<Record> = self
            .pending
            .drain(..)
            .map(|(range, h)| Record {
                range,
                digest: *h.finalize().as_bytes(),
            })
            .collect();
        let journal = self.journal.as_mut().ok_or(Error::Cancelled)?;
        journal.record_all(&records)?;
        self.status
            .recorded
            .store(journal.recorded_bytes(), Ordering::Relaxed);
        self.pending_bytes = 0;
        self.last_record = Instant::now();
        Ok(())
    }

    /// Everything arrived and is recorded: the whole is checked if it came from several
    /// streams, then gets the final name, and the journal goes.
    fn complete(&mut self) -> Result<(), Error> {
        self.record()?;
        let shown = self.shown();
        let file = self.file.take().ok_or(Error::Cancelled)?;
        if let Some(checksum) = &self.plan.checksum {
            let same = crate::update::has_checksum(&file, checksum, crate::blockhash::threads())
                .map_err(|e| Error::io(format!("hashing {}", self.plan.partial.display()), e))?;
            if !same {
                return Err(self.changed(
                    "the resumed content's block digests differ from the source's".into(),
                ));
            }
        }
        let Some(dest) = self.plan.dest.clone() else {
            return Ok(());
        };
        file.sync_all()
            .map_err(|e| Error::io(format!("syncing {shown}"), e))?;
        drop(file);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = |p: &Path| CString::new(p.file_name().unwrap_or_default().as_bytes());
        let (Ok(from), Ok(to)) = (name(&self.plan.partial), name(&dest)) else {
            return Err(Error::InvalidName(shown));
        };
        let dir_fd =
            fd::open_dir(&dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        fd::renameat(&dir_fd, &from, &to, self.plan.overwrite).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Error::AlreadyExists(shown.clone())
            } else {
                Error::io(format!("renaming into {shown}"), e)
            }
        })?;
        self.settled = true;
        if let Some(journal) = self.journal.take() {
            journal.remove()?;
        }
        // The rename must survive a crash too.
        File::from(dir_fd)
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
    }

    fn open_inner(&mut self) -> Result<(), Error> {
        let (journal, ranges) = self.open_partial()?;
        let fresh = ranges.is_none();
        self.journal = Some(journal);
        // The partial is ours, written in place. A fresh one reads zero wherever nothing is
        // written (holes need work only to be allocated); an adopted one may hold unrecorded
        // bytes of the killed run in its gaps, so its holes are zeroed. Ranges cannot be read
        // back by --verify yet.
        let options = WriterOptions {
            overwrite: true,
            destination_is_zero: fresh && !self.options.allocated,
            verify: self.options.verify && fresh,
            ranges: ranges.clone(),
            ..self.options.clone()
        };
        let target = WriteTarget::in_place(self.plan.partial.clone()).named(self.shown());
        let mut work = Work::new(target, options, self.size, Arc::clone(&self.bytes_written));
        Consume::open(&mut work)?;
        self.inner = Some(work);
        Ok(())
    }

    fn remove_partial(&mut self) {
        self.file = None;
        let journal = journal::path_for(&self.plan.partial);
        for path in [&self.plan.partial, &journal] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    log::warn!("cannot remove {}: {e}", path.display())
                }
                _ => {}
            }
        }
    }
}

impl Consume for JournaledWork {
    fn source_identity(&mut self, identity: Option<VolumeIdentity>) {
        self.identity = identity;
    }

    fn open(&mut self) -> Result<(), Error> {
        let opened = self.open_inner();
        if opened.is_err() {
            // The job reports a failed open without discarding: settle the paths now, before
            // the caller learns of it (and perhaps starts over with the same paths).
            self.discard();
        }
        opened
    }

    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        let Some(work) = self.inner.as_mut() else {
            return (0, Err(Error::Cancelled));
        };
        let (done, result) = Consume::handle_batch(work, batch);
        for chunk in &batch[..done] {
            self.note(chunk);
        }
        let result = match result {
            Ok(true) => self.complete().map(|()| true),
            Ok(false)
                if self.pending_bytes >= RECORD_BYTES
                    && self.last_record.elapsed() >= RECORD_INTERVAL =>
            {
                self.record().map(|()| false)
            }
            other => other,
        };
        (done, result)
    }

    fn discard(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(work) = self.inner.as_mut() {
            Consume::discard(work);
        }
        self.inner = None;
        let changed = self.status.source_changed.load(Ordering::SeqCst);
        if self.plan.keep && !changed && (self.journal.is_some() || self.was_adopted) {
            // What arrived but is not recorded stays unrecorded: a later run fetches it
            // again. Syncing it here would only delay the interrupted command.
            self.file = None;
            return;
        }
        self.journal = None;
        self.remove_partial();
    }
}
