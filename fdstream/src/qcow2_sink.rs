//! Uploads that become qcow2 images (OPEN flag QCOW2): the volume's content is the image's
//! guest view, written through a writable `qemu-nbd` on a private socket by the NBD sink
//! ([`crate::nbd`]), so qemu keeps the format and we only speak NBD to it.
//!
//! A new volume is created as a temporary qcow2 of the volume's size (`qemu-img create`),
//! which reads as zeroes: holes need no request, and stay unallocated. It gets its name only
//! after the last write was acknowledged, flushed, verified when asked, and qemu-nbd closed the
//! image and exited with success. An existing qcow2 under `overwrite` is written in place, as a
//! device is (its backing chain checked as for reads); its holes become WRITE_ZEROES, which
//! qemu turns into zero or unallocated clusters, not written zeroes.

use crate::error::Error;
use crate::fd;
use crate::nbd::sink::Sink;
use crate::qemu::{chain_layers, qcow2_header, QemuNbd};
use crate::sink::file_type_at;
use crate::temp;
use crate::writer::{Consume, WriterOptions};
use engine::Chunk;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

pub(crate) struct Qcow2Sink {
    dir: Arc<OwnedFd>,
    pool: PathBuf,
    name: CString,
    shown: String,
    options: WriterOptions,
    size: u64,
    /// The new image's temporary name, and its fd holding the temporary's flock.
    temp: Option<(CString, File)>,
    server: Option<QemuNbd>,
    inner: Option<Sink>,
}

impl Qcow2Sink {
    pub(crate) fn new(
        dir: Arc<OwnedFd>,
        pool: PathBuf,
        name: CString,
        shown: String,
        options: WriterOptions,
        size: u64,
    ) -> Qcow2Sink {
        Qcow2Sink {
            dir,
            pool,
            name,
            shown,
            options,
            size,
            temp: None,
            server: None,
            inner: None,
        }
    }

    fn path(&self, name: &CString) -> PathBuf {
        self.pool.join(name.to_str().unwrap_or_default())
    }

    /// The existing qcow2 image to write in place, if that is what the name holds; refuses
    /// what may not be written over.
    fn existing_image(&self) -> Result<bool, Error> {
        let shown = &self.shown;
        match file_type_at(&self.dir, &self.name)
            .map_err(|e| Error::io(format!("inspecting {shown}"), e))?
        {
            None => Ok(false),
            Some(_) if !self.options.overwrite => Err(Error::AlreadyExists(shown.clone())),
            Some(libc::S_IFREG) => {
                let file = fd::open_beneath(&self.dir, &self.name, libc::O_RDONLY)
                    .map_err(|e| Error::io(format!("opening {shown}"), e))?;
                let Some(header) = qcow2_header(&file).map_err(|e| Error::io(shown.clone(), e))?
                else {
                    return Ok(false); // a raw file, replaced by the new image at the end
                };
                chain_layers(&self.pool, &self.path(&self.name), &header, shown)?;
                if header.size < self.size {
                    return Err(Error::TooSmall {
                        target: shown.clone(),
                        have: header.size,
                        need: self.size,
                    });
                }
                Ok(true)
            }
            Some(_) => Err(Error::Unsupported(format!(
                "{shown} is not a regular file: only a regular file can be replaced"
            ))),
        }
    }

    /// Creates the temporary image, sized, and returns its path.
    fn create_temp(&mut self) -> Result<PathBuf, Error> {
        let shown = &self.shown;
        let name = temp::name(self.name.as_bytes());
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let file = fd::openat(&self.dir, &name, flags, 0o644)
            .map_err(|e| Error::io(format!("creating a temporary file for {shown}"), e))?;
        temp::hold(&file);
        let path = self.path(&name);
        self.temp = Some((name, file));
        // qemu-img truncates the file it is given (the same inode: the flock stays).
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(self.size.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::Qemu(format!(
                    "{shown}: cannot run qemu-img (qemu-utils) to create the qcow2 image: {e}"
                ))
            })?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Qemu(format!(
                "{shown}: qemu-img create failed: {}",
                said.lines().last().unwrap_or("").trim()
            )));
        }
        Ok(path)
    }

    /// After the inner sink committed: qemu-nbd closes the image, then a new one is synced
    /// and renamed into place.
    fn commit(&mut self) -> Result<(), Error> {
        let shown = self.shown.clone();
        if let Some(server) = self.server.take() {
            server.stop(&shown)?;
        }
        let Some((name, file)) = self.temp.take() else {
            return Ok(());
        };
        let renamed = (|| {
            if !self.options.no_sync {
                file.sync_all()
                    .map_err(|e| Error::io(format!("syncing {shown}"), e))?;
            }
            fd::renameat(&self.dir, &name, &self.name, self.options.overwrite).map_err(|e| {
                if e.raw_os_error() == Some(libc::EEXIST) {
                    Error::AlreadyExists(shown.clone())
                } else {
                    Error::io(format!("renaming into {shown}"), e)
                }
            })
        })();
        if renamed.is_err() {
            self.temp = Some((name, file));
        }
        renamed
    }
}

impl Consume for Qcow2Sink {
    fn open(&mut self) -> Result<(), Error> {
        let mut options = self.options.clone();
        let image = if self.existing_image()? {
            self.path(&self.name)
        } else {
            // A new image reads as zeroes; --allocated still writes them.
            options.destination_is_zero = !options.allocated;
            self.create_temp()?
        };
        let server = QemuNbd::start_writable(&image, &self.shown)?;
        let mut inner =
            Sink::new(server.uri().clone(), options, self.size).named(self.shown.clone());
        self.server = Some(server);
        inner.open()?;
        self.inner = Some(inner);
        log::info!("{}: written as qcow2 through qemu-nbd", self.shown);
        Ok(())
    }

    fn handle_batch(&mut self, batch: &[Chunk]) -> (usize, Result<bool, Error>) {
        let Some(inner) = self.inner.as_mut() else {
            return (0, Err(Error::Cancelled));
        };
        match inner.handle_batch(batch) {
            (n, Ok(true)) => (n, self.commit().map(|()| true)),
            other => other,
        }
    }

    fn rename(&mut self, shown: String) {
        self.shown = shown;
    }

    fn discard(&mut self) {
        if let Some(mut inner) = self.inner.take() {
            inner.discard();
        }
        // Killed: a half-written image is removed, or (in place) left as a device would be.
        self.server = None;
        if let Some((name, _file)) = self.temp.take() {
            match fd::unlinkat(&self.dir, &name) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    log::warn!("cannot remove temporary file {name:?}: {e}");
                }
                _ => {}
            }
        }
    }
}
