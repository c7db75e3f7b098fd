//! How helpers are run, and the one place that decides where a volume's I/O runs.

use super::{HelperReader, HelperWriter, PROGRAM};
use crate::fd::Location;
use crate::reader::{FileReader, ReaderOptions};
use crate::writer::{FileWriter, WriteTarget, WriterOptions};
use engine::{VolumeReader, VolumeWriter};
use std::path::PathBuf;
use std::time::Duration;

/// How to run helpers.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    /// The helper binary; by default `$VOLSTREAM_IOHELPER`, else `volstream-iohelper` next to
    /// the current executable (or one directory up, for test and bench binaries in `deps/`).
    pub program: Option<PathBuf>,
    /// O_DIRECT in the helper (see `ReaderOptions::direct`, `WriterOptions::direct`).
    pub direct: bool,
    /// A helper that sends nothing for this long while it has work is killed and its stream
    /// aborted. Default 60 s, or `$VOLSTREAM_IOHELPER_TIMEOUT` seconds.
    pub timeout: Duration,
}

impl Default for HelperOptions {
    fn default() -> Self {
        let secs = std::env::var("VOLSTREAM_IOHELPER_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(60.0);
        HelperOptions {
            program: None,
            direct: false,
            timeout: Duration::from_secs_f64(secs),
        }
    }
}

impl HelperOptions {
    pub fn program(&self) -> PathBuf {
        if let Some(p) = &self.program {
            return p.clone();
        }
        if let Some(p) = std::env::var_os("VOLSTREAM_IOHELPER") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap_or_default();
        let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
        for _ in 0..2 {
            let candidate = dir.join(PROGRAM);
            if candidate.exists() {
                return candidate;
            }
            if !dir.pop() {
                break;
            }
        }
        PathBuf::from(PROGRAM)
    }
}

/// Where a volume's I/O runs. Readers and writers of either backend are built through the same
/// calls and used as trait objects, so callers never match on the backend.
#[derive(Debug, Clone, Default)]
pub enum Backend {
    /// The fdstream worker pool, in this process.
    #[default]
    InProcess,
    /// One `volstream-iohelper` process per volume.
    Helper(HelperOptions),
}

impl Backend {
    /// Reads the volume at `from`.
    pub fn read(&self, from: Location, options: ReaderOptions) -> Box<dyn VolumeReader> {
        match self {
            Backend::InProcess => Box::new(FileReader::new(from, options)),
            Backend::Helper(h) => Box::new(HelperReader::new(from, options, h.clone())),
        }
    }

    /// Writes the volume to `to`.
    pub fn write(&self, to: WriteTarget, options: WriterOptions) -> Box<dyn VolumeWriter> {
        match self {
            Backend::InProcess => Box::new(FileWriter::new(to, options)),
            Backend::Helper(h) => Box::new(HelperWriter::new(to, options, h.clone())),
        }
    }

    /// Reads the file, device or FIFO at `path`.
    pub fn reader(
        &self,
        path: impl Into<PathBuf>,
        options: ReaderOptions,
    ) -> Box<dyn VolumeReader> {
        self.read(Location::Path(path.into()), options)
    }

    /// A new file at `path`, renamed into place once verified.
    pub fn create(
        &self,
        path: impl Into<PathBuf>,
        options: WriterOptions,
    ) -> Box<dyn VolumeWriter> {
        self.write(WriteTarget::create(path), options)
    }

    /// An existing file, device or FIFO, written in place.
    pub fn in_place(
        &self,
        path: impl Into<PathBuf>,
        options: WriterOptions,
    ) -> Box<dyn VolumeWriter> {
        self.write(WriteTarget::in_place(path), options)
    }
}
