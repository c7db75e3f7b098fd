//! [`DirProvider`]: serves the regular files of one directory, and block devices named by the
//! host, as volumes.
//!
//! Names are checked on the loop thread (cheap, no I/O); opening happens on a worker, relative
//! to a directory fd opened once, with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so a name
//! cannot be swapped for a symlink between a check and the open.

use crate::document::DocumentReader;
use crate::error::Error;
use crate::fd;
use crate::fd::Location;
use crate::helper::Backend;
use crate::pool::Pool;
use crate::reader::{FileReader, ReaderOptions};
use crate::resume::ResumeStore;
use crate::temp;
use crate::writer::FileWriter;
use crate::writer::{WriteTarget, WriterOptions};
use bytes::Bytes;
use engine::document::{self, VolumeEntry};
use engine::proto::OpenOptions;
use engine::Reason;
use engine::{OpenRequest, Provider, VolumeError, VolumeReader, VolumeWriter};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to read a volume for a stream whose OPEN carried `open` (the one place OPEN options
/// become reader options; a zero granularity of 0 turns zero detection off, as on the wire).
pub fn reader_options(open: &OpenOptions) -> ReaderOptions {
    ReaderOptions {
        zero_granularity: open.zero_granularity(),
        no_extents: open.no_extents(),
        force_share: open.force_share(),
        top_only: open.top_only(),
        ..ReaderOptions::default()
    }
}

/// How to write a volume for a stream whose OPEN carried `open` (the one place OPEN options
/// become writer options).
pub fn writer_options(open: &OpenOptions) -> WriterOptions {
    WriterOptions {
        allocated: open.allocated(),
        destination_is_zero: open.destination_is_zero(),
        overwrite: open.overwrite(),
        verify: open.verify(),
        ..WriterOptions::default()
    }
}

/// One volume as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    /// Logical length in bytes.
    pub size: u64,
    /// Bytes the volume occupies on disk (st_blocks * 512; the size for devices).
    pub allocated: u64,
    pub device: bool,
}

pub struct DirProvider {
    dir: Arc<OwnedFd>,
    path: PathBuf,
    devices: HashMap<String, PathBuf>,
    nbd_volumes: HashMap<String, nbd::Uri>,
    pool: Option<Arc<Pool>>,
    no_sync: bool,
    direct: bool,
    backend: Backend,
    resume: Option<Arc<ResumeStore>>,
}

impl DirProvider {
    /// Serves the files directly inside `dir` (opened now, once).
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let path = dir.as_ref().to_path_buf();
        Ok(DirProvider {
            dir: Arc::new(fd::open_dir(&path)?),
            path,
            devices: HashMap::new(),
            nbd_volumes: HashMap::new(),
            pool: None,
            no_sync: false,
            direct: false,
            backend: Backend::InProcess,
            resume: None,
        })
    }

    /// Also serves the block device at `path` under `name` (written in place).
    pub fn with_device(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.devices.insert(name.into(), path.into());
        self
    }

    /// Also serves the NBD export at `uri` under `name` (read through it, written in place).
    pub fn with_nbd_volume(mut self, name: impl Into<String>, uri: nbd::Uri) -> Self {
        self.nbd_volumes.insert(name.into(), uri);
        self
    }

    /// Runs readers and writers on `pool` instead of the process-wide one.
    pub fn with_pool(mut self, pool: Arc<Pool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Runs each volume's reads and writes in process (the default) or in an iohelper.
    /// Listings and allocation maps are always built in process.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Reads and writes volumes with O_DIRECT (either backend).
    pub fn with_direct_io(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Skips fdatasync before reporting uploads as done (benchmarks).
    pub fn without_sync(mut self) -> Self {
        self.no_sync = true;
        self
    }

    /// Keeps interrupted resumable uploads in the pool (see [`crate::resume`]).
    pub fn with_resume(mut self, keep: std::time::Duration, budget: u64) -> Self {
        self.resume = Some(Arc::new(ResumeStore::new(self.path.clone(), keep, budget)));
        self
    }

    /// Where partial uploads are kept, if they are.
    pub fn resume_store(&self) -> Option<Arc<ResumeStore>> {
        self.resume.clone()
    }

    /// The store a stream that names a partial upload needs.
    fn store_for(&self, request: &OpenRequest) -> Result<Arc<ResumeStore>, VolumeError> {
        if self.nbd_volumes.contains_key(&request.name) || self.devices.contains_key(&request.name)
        {
            return Err(VolumeError::new(
                Reason::Unsupported,
                format!(
                    "{}: only a file of the pool is uploaded resumably",
                    request.name
                ),
            ));
        }
        self.resume.clone().ok_or_else(|| {
            VolumeError::new(
                Reason::Unsupported,
                "this server keeps no partial uploads (serve --resume-keep)",
            )
        })
    }

    fn name(&self, name: &str) -> Result<std::ffi::CString, VolumeError> {
        fd::plain_name(name).ok_or_else(|| Error::InvalidName(name.to_owned()).into())
    }

    /// Removes the temporaries that interrupted uploads left in the directory (their writers
    /// are gone; see [`temp::remove_stale`]). Blocks; a server calls it once at start.
    pub fn remove_stale_temporaries(&self) -> io::Result<Vec<temp::Removed>> {
        temp::remove_stale(&self.dir)
    }

    /// The served volumes with their sizes and allocation. Blocks (stats every file); call it
    /// off the loop thread.
    pub fn list(&self) -> io::Result<Vec<VolumeInfo>> {
        list_volumes(&self.path, &self.devices, &self.nbd_volumes)
    }

    /// A volume as messages to peers call it: by its name, never by a path on this host.
    fn shown(&self, name: &str) -> String {
        name.to_owned()
    }

    /// An upload written as a qcow2 image of the pool through qemu-nbd.
    fn open_qcow2_write(
        &self,
        request: &OpenRequest,
        options: WriterOptions,
    ) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        let unsupported = |why: &str| {
            Err(VolumeError::new(
                Reason::Unsupported,
                format!("{}: {why}", request.name),
            ))
        };
        if self.nbd_volumes.contains_key(&request.name) || self.devices.contains_key(&request.name)
        {
            return unsupported("a qcow2 image is written only as a file of the pool");
        }
        if !matches!(self.backend, Backend::InProcess) {
            // A helper writes a file's bytes; qemu-nbd is the one that writes qcow2.
            return unsupported("qcow2 images are not written through --iohelper");
        }
        let (dir, pool, name) = (
            Arc::clone(&self.dir),
            self.path.clone(),
            self.name(&request.name)?,
        );
        let (shown, opts) = (self.shown(&request.name), options.clone());
        Ok(Box::new(FileWriter::with_consumer(
            Box::new(move |size| {
                Box::new(crate::qcow2_sink::Qcow2Sink::new(
                    dir, pool, name, shown, opts, size,
                ))
            }),
            options,
        )))
    }
}

impl Provider for DirProvider {
    fn open_list(&self, _request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        let (path, devices) = (self.path.clone(), self.devices.clone());
        let exports = self.nbd_volumes.clone();
        Ok(self.document(move || {
            let volumes = list_volumes(&path, &devices, &exports).map_err(|e| {
                log::warn!("listing {}: {e}", path.display());
                Error::io("listing the volumes", e)
            })?;
            let entries: Vec<VolumeEntry> = volumes
                .into_iter()
                .map(|v| VolumeEntry {
                    name: v.name,
                    size: v.size,
                    allocated: v.allocated,
                })
                .collect();
            Ok(Bytes::from(document::format_list(&entries)))
        }))
    }

    fn open_extents(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        if let Some(uri) = self.nbd_volumes.get(&request.name) {
            let uri = uri.clone();
            return Ok(self.document(move || {
                let map = crate::nbd::map(&uri)?;
                let map: Vec<_> = map.iter().map(|s| s.entry(None)).collect();
                Ok(Bytes::from(document::format_extents(&map)))
            }));
        }
        let shown = self.shown(&request.name);
        let (open, image): (Box<dyn FnOnce() -> io::Result<File> + Send>, _) =
            match self.devices.get(&request.name) {
                Some(path) => {
                    let path = path.clone();
                    (Box::new(move || File::open(path)), None)
                }
                None => {
                    let (dir, name) = (Arc::clone(&self.dir), self.name(&request.name)?);
                    let image = (self.path.clone(), self.path.join(&request.name));
                    (
                        Box::new(move || {
                            fd::open_beneath(&dir, &name, libc::O_RDONLY | libc::O_NONBLOCK)
                        }),
                        Some(image),
                    )
                }
            };
        Ok(self.document(move || {
            let file = open().map_err(|e| Error::io(format!("opening {shown}"), e))?;
            if let Some((pool, path)) = image {
                if let Some(text) = image_map(&file, &pool, &path, &shown)? {
                    return Ok(Bytes::from(text));
                }
            }
            let map = crate::extents::extents_of(&file)
                .map_err(|e| Error::io(format!("mapping {shown}"), e))?;
            Ok(Bytes::from(document::format_extents(&map)))
        }))
    }

    fn open_digests(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        if self.nbd_volumes.contains_key(&request.name) {
            return Err(VolumeError::new(
                Reason::Unsupported,
                format!(
                    "{} is an NBD export, which has no block digests here",
                    request.name
                ),
            ));
        }
        let shown = self.shown(&request.name);
        if let Some(key) = request.options.resume() {
            let store = self.store_for(request)?;
            self.name(&request.name)?;
            let owner = crate::resume::owner(&request.identity);
            return Ok(self.document(move || {
                store.digests(&shown, &owner, &key, crate::blockhash::threads())
            }));
        }
        let open: Box<dyn FnOnce() -> io::Result<File> + Send> = match self
            .devices
            .get(&request.name)
        {
            Some(path) => {
                let path = path.clone();
                Box::new(move || File::open(path))
            }
            None => {
                let (dir, name) = (Arc::clone(&self.dir), self.name(&request.name)?);
                Box::new(move || fd::open_beneath(&dir, &name, libc::O_RDONLY | libc::O_NONBLOCK))
            }
        };
        Ok(self.document(move || {
            let file = open().map_err(|e| Error::io(format!("opening {shown}"), e))?;
            // The digests of a qcow2 container's bytes would not describe what a reader of the
            // volume gets (its guest view).
            if crate::qemu::qcow2_header(&file)
                .map_err(|e| Error::io(shown.clone(), e))?
                .is_some()
            {
                return Err(Error::Unsupported(format!(
                    "{shown} is a qcow2 image, which has no block digests here"
                )));
            }
            let digests = crate::blockhash::digests_of(&file, crate::blockhash::threads())
                .map_err(|e| Error::io(format!("hashing {shown}"), e))?;
            Ok(Bytes::from(digests.encode()))
        }))
    }

    fn open_read(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        let mut options = reader_options(&request.options);
        options.pool = self.pool.clone();
        options.direct = self.direct;
        // Readers that can seek read only these; the others are cut by the engine.
        options.ranges = request.ranges.clone();
        if let Some(uri) = self.nbd_volumes.get(&request.name) {
            let source = crate::nbd::SourceOptions {
                no_extents: options.no_extents,
                zero_granularity: options.zero_granularity,
                top_only: options.top_only,
            };
            return Ok(Box::new(crate::nbd::NbdReader::new(
                uri.clone(),
                source,
                options,
            )));
        }
        let location = match self.devices.get(&request.name) {
            Some(path) => Location::Named(path.clone(), self.shown(&request.name)),
            None => {
                let name = self.name(&request.name)?;
                log::debug!(
                    "{} reads {} (fd {})",
                    request.peer,
                    request.name,
                    self.dir.as_raw_fd()
                );
                if matches!(self.backend, Backend::InProcess) {
                    // A qcow2 image is read as its guest view (decided on the worker). A
                    // helper reads the file as it is.
                    let file = crate::qemu::PoolFile::new(
                        Arc::clone(&self.dir),
                        name,
                        self.shown(&request.name),
                        self.path.clone(),
                        options.clone(),
                    );
                    return Ok(Box::new(FileReader::with_producer(Box::new(file), options)));
                }
                Location::At {
                    dir: Arc::clone(&self.dir),
                    name,
                    shown: self.shown(&request.name),
                }
            }
        };
        Ok(self.backend.read(location, options))
    }

    fn open_write(&self, request: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        let mut options = writer_options(&request.options);
        options.pool = self.pool.clone();
        options.no_sync = self.no_sync;
        options.direct = self.direct;
        if request.options.qcow2() {
            return self.open_qcow2_write(request, options);
        }
        if let Some(uri) = self.nbd_volumes.get(&request.name) {
            if options.verify {
                // The NBD sink does not read back; a check that was asked for must not be
                // skipped quietly.
                return Err(VolumeError::new(
                    Reason::Unsupported,
                    format!(
                        "{} is an NBD export, which cannot be verified",
                        request.name
                    ),
                ));
            }
            return Ok(Box::new(crate::nbd::NbdWriter::new(uri.clone(), options)));
        }
        let shown = self.shown(&request.name);
        if let (Some(key), Some(checksum)) = (request.options.resume(), request.options.update()) {
            let store = self.store_for(request)?;
            options.ranges = request.ranges.clone();
            let target = crate::writer::ResumeTarget {
                store,
                dir: Arc::clone(&self.dir),
                final_name: self.name(&request.name)?,
                volume: shown,
                owner: crate::resume::owner(&request.identity),
                key,
                checksum,
            };
            return Ok(Box::new(FileWriter::resume_at(target, options)));
        }
        if let Some(checksum) = request.options.update() {
            if self.devices.contains_key(&request.name) {
                return Err(VolumeError::new(
                    Reason::Unsupported,
                    format!("{shown} is a device, which is not updated through a copy"),
                ));
            }
            options.ranges = request.ranges.clone();
            let name = self.name(&request.name)?;
            let dir = Arc::clone(&self.dir);
            return Ok(Box::new(FileWriter::update_at(
                dir, name, shown, checksum, options,
            )));
        }
        let target = match self.devices.get(&request.name) {
            Some(path) => WriteTarget::InPlace(Location::Named(path.clone(), shown)),
            None => WriteTarget::create_at(Arc::clone(&self.dir), self.name(&request.name)?, shown),
        };
        Ok(self.backend.write(target, options))
    }
}

pub(crate) fn list_volumes(
    path: &Path,
    devices: &HashMap<String, PathBuf>,
    exports: &HashMap<String, nbd::Uri>,
) -> io::Result<Vec<VolumeInfo>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if fd::plain_name(&name).is_none() {
            continue;
        }
        // symlink_metadata: a symlink is not served, so it is not listed.
        let meta = match entry.metadata() {
            Ok(m) if m.file_type().is_file() => m,
            _ => continue,
        };
        // A qcow2 image's size is its guest's; one that cannot be read is listed as a file.
        let size = File::open(entry.path())
            .ok()
            .and_then(|f| crate::qemu::qcow2_header(&f).ok().flatten())
            .map_or(meta.len(), |h| h.size);
        out.push(VolumeInfo {
            name,
            size,
            allocated: meta.blocks() * 512,
            device: false,
        });
    }
    for (name, path) in devices {
        // A device that went away is missing from the list, not the end of it.
        let sized = File::open(path).and_then(|f| {
            let kind = fd::Kind::of(&f)?;
            fd::size_of(&f, kind)
        });
        let size = match sized {
            Ok(size) => size.unwrap_or(0),
            Err(e) => {
                log::warn!("device {name} ({}): {e}", path.display());
                continue;
            }
        };
        out.push(VolumeInfo {
            name: name.clone(),
            size,
            allocated: size,
            device: true,
        });
    }
    for (name, uri) in exports {
        // An export that cannot be reached is listed with size 0 rather than hiding the rest.
        let size = crate::nbd::export_size(uri).unwrap_or_else(|e| {
            log::warn!("listing {name}: {e}");
            0
        });
        out.push(VolumeInfo {
            name: name.clone(),
            size,
            allocated: size,
            device: true,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The allocation map of a qcow2 image through qemu-nbd, with each range's layer, as an
/// EXTENTS document; `None` when `file` is not a qcow2 image.
fn image_map(file: &File, pool: &Path, path: &Path, shown: &str) -> Result<Option<String>, Error> {
    let Some(header) =
        crate::qemu::qcow2_header(file).map_err(|e| Error::io(shown.to_string(), e))?
    else {
        return Ok(None);
    };
    let layers = crate::qemu::chain_layers(pool, path, &header, shown)?;
    let server = crate::qemu::QemuNbd::start(path, true, shown)?;
    let map = crate::nbd::map_as(server.uri(), shown.to_string())?;
    let map: Vec<_> = map.iter().map(|s| s.entry(Some(layers))).collect();
    Ok(Some(document::format_extents(&map)))
}

impl DirProvider {
    fn document(
        &self,
        build: impl FnOnce() -> Result<Bytes, Error> + Send + 'static,
    ) -> Box<dyn VolumeReader> {
        Box::new(DocumentReader::new(self.pool.clone(), build))
    }
}
