//! Helpers for the iohelper integration tests: fdstream's test helpers (the same two engines,
//! sparse files and loop devices), plus helper backends.
#![allow(dead_code)]

#[path = "../../../fdstream/tests/common/mod.rs"]
mod fdstream_common;

pub use fdstream_common::*;
use std::path::PathBuf;
use std::time::Duration;

/// The helper backend, with the binary this crate built.
pub fn helper(direct: bool) -> fdstream::Backend {
    fdstream::Backend::Helper(fdstream::HelperOptions {
        program: Some(PathBuf::from(env!("CARGO_BIN_EXE_volstream-iohelper"))),
        direct,
        timeout: Duration::from_secs(30),
    })
}

/// A scratch directory where O_DIRECT works when `direct` (/var/tmp is a disk file system
/// here; /tmp may be tmpfs).
pub fn scratch(direct: bool) -> tempfile::TempDir {
    if direct {
        tempfile::tempdir_in("/var/tmp").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
