//! The sink of an updating WRITE (docs/PROTOCOL.md 8.4): the existing volume is copied to a
//! temporary on the worker (fdstream::update::Staged), only the ranges that differ are
//! written into it in place, and it replaces the volume once its volume checksum is the one
//! the OPEN announced; otherwise it is removed and the volume stays as it was.

use super::work::Work;
use super::{Consume, WriteTarget, WriterOptions};
use crate::error::Error;
use crate::fd::Location;
use crate::update::Staged;
use engine::Chunk;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub(crate) struct UpdateWork {
    dir: Arc<OwnedFd>,
    name: CString,
    shown: String,
    options: WriterOptions,
    size: u64,
    checksum: [u8; 32],
    staged: Option<Staged>,
    inner: Option<Work>,
    bytes_written: Arc<AtomicU64>,
}

impl UpdateWork {
    pub(crate) fn new(
        dir: Arc<OwnedFd>,
        name: CString,
        shown: String,
        options: WriterOptions,
        size: u64,
        checksum: [u8; 32],
        bytes_written: Arc<AtomicU64>,
    ) -> Self {
        UpdateWork {
            dir,
            name,
            shown,
            options,
            size,
            checksum,
            staged: None,
            inner: None,
            bytes_written,
        }
    }
}

impl Consume for UpdateWork {
    fn open(&mut self) -> Result<(), Error> {
        if !self.options.overwrite {
            return Err(Error::AlreadyExists(self.shown.clone()));
        }
        let staged = Staged::at(Arc::clone(&self.dir), self.name.clone(), self.shown.clone())?;
        staged
            .file()
            .set_len(self.size)
            .map_err(|e| Error::io(format!("setting the size of {}", self.shown), e))?;
        let target = WriteTarget::InPlace(Location::At {
            dir: Arc::clone(&self.dir),
            name: staged.temp_name().clone(),
            shown: self.shown.clone(),
        });
        // The temporary is ours: written in place, checked by its block digests instead of
        // being read back.
        let options = WriterOptions {
            overwrite: true,
            verify: false,
            destination_is_zero: false,
            ..self.options.clone()
        };
        let mut work = Work::new(target, options, self.size, Arc::clone(&self.bytes_written));
        Consume::open(&mut work)?;
        log::debug!(
            "updating {}: copy of {} bytes (reflink {})",
            self.shown,
            staged.copied,
            staged.reflinked
        );
        self.staged = Some(staged);
        self.inner = Some(work);
        Ok(())
    }

    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        let Some(work) = self.inner.as_mut() else {
            return (0, Err(Error::Cancelled));
        };
        let (done, result) = Consume::handle_batch(work, batch);
        match result {
            Ok(true) => {
                let staged = self.staged.take().expect("opened");
                let threads = crate::blockhash::threads();
                (done, staged.commit(&self.checksum, threads).map(|()| true))
            }
            other => (done, other),
        }
    }

    fn discard(&mut self) {
        if let Some(work) = self.inner.as_mut() {
            Consume::discard(work);
        }
        // Dropping the staged copy removes it.
        self.staged = None;
    }
}
