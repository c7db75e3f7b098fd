//! Opening a sink: everything that would make a write fail at the end (a directory in the way,
//! an existing destination without `overwrite`, a device too small or in use) is found here,
//! before the first byte is written.
//!
//! One rule for what may be written over: a destination that exists, a regular file or a
//! block device, is written only with `overwrite` (a new file is then renamed over the file;
//! a device, or a file written in place, takes the volume where it is). A FIFO or character
//! device holds nothing to lose and needs no permission, nor does an fd handed over open.

use crate::error::Error;
use crate::fd::{self, Kind, Location};
use crate::temp;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Creates the temporary `temp` for the new file `name`, sized, and held (see [`temp`]).
pub(crate) fn create_temp(
    dir: &OwnedFd,
    name: &CString,
    temp: &CString,
    shown: &str,
    overwrite: bool,
    size: u64,
) -> Result<File, Error> {
    if name.as_bytes().is_empty() {
        return Err(Error::InvalidName(shown.to_owned()));
    }
    // Whatever would refuse the rename at the end refuses now.
    match file_type_at(dir, name).map_err(|e| Error::io(format!("inspecting {shown}"), e))? {
        None => {}
        Some(libc::S_IFDIR) => return Err(Error::Unsupported(format!("{shown} is a directory"))),
        Some(_) if !overwrite => return Err(Error::AlreadyExists(shown.to_owned())),
        Some(libc::S_IFREG) => {}
        Some(_) => {
            return Err(Error::Unsupported(format!(
                "{shown} is not a regular file: only a regular file can be replaced"
            )))
        }
    }
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let file = fd::openat(dir, temp, flags, 0o644)
        .map_err(|e| Error::io(format!("creating a temporary file for {shown}"), e))?;
    temp::hold(&file);
    if let Err(e) = size_before_writing(&file, size, shown) {
        let _ = fd::unlinkat(dir, temp);
        return Err(e);
    }
    Ok(file)
}

/// Gives a new or shorter regular file its final length before the first write, so no write
/// extends it: a write past EOF is what makes XFS preallocate speculatively beyond it, and in
/// a sparse copy those preallocations end up inside the file, allocated, between the data.
pub(crate) fn size_before_writing(file: &File, size: u64, shown: &str) -> Result<(), Error> {
    file.set_len(size)
        .map_err(|e| Error::io(format!("setting the size of {shown} to {size}"), e))
}

/// An existing destination opened for writing in place, with its kind and current length.
pub(crate) struct InPlace {
    pub file: File,
    pub kind: Kind,
    pub have: Option<u64>,
}

/// Opens a destination to be written in place and checks it can take `size` bytes.
pub(crate) fn open_in_place(
    location: Location,
    overwrite: bool,
    size: u64,
) -> Result<InPlace, Error> {
    let shown = location.describe();
    let file = match location {
        Location::Open(f) => f,
        Location::Path(p) | Location::Named(p, _) => open_path(&p, &shown, overwrite)?,
        Location::At { dir, name, .. } => {
            if !overwrite {
                return Err(Error::AlreadyExists(shown));
            }
            fd::open_beneath(&dir, &name, libc::O_RDWR)
                .map_err(|e| Error::io(format!("opening {shown}"), e))?
        }
    };
    let kind = Kind::of(&file).map_err(|e| Error::io(format!("inspecting {shown}"), e))?;
    let have = fd::size_of(&file, kind).map_err(|e| Error::io(format!("sizing {shown}"), e))?;
    if let (Kind::Block, Some(have)) = (kind, have) {
        if have < size {
            return Err(Error::TooSmall {
                target: shown,
                have,
                need: size,
            });
        }
    }
    Ok(InPlace { file, kind, have })
}

/// Opens an existing sink by path without creating or truncating it. A block device is opened
/// exclusively (O_EXCL), so the kernel refuses one that is mounted or claimed before anything
/// is written; a FIFO is opened write-only, which waits (on a worker) for a reader.
fn open_path(path: &Path, shown: &str, overwrite: bool) -> Result<File, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("opening {shown}"), e))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::Unsupported(format!("{shown} is a directory")));
    }
    let holds_data = ft.is_file() || ft.is_block_device();
    if holds_data && !overwrite {
        return Err(Error::AlreadyExists(shown.to_owned()));
    }
    let mut o = std::fs::OpenOptions::new();
    o.read(holds_data).write(true);
    if ft.is_block_device() {
        o.custom_flags(libc::O_EXCL);
    }
    o.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) if ft.is_block_device() => Error::InUse {
            target: shown.to_owned(),
            reading: false,
        },
        _ => Error::io(format!("opening {shown}"), e),
    })
}

/// The type (`S_IFMT` bits) of `name` in `dir`, not following a symlink; `None` if absent.
pub(crate) fn file_type_at(
    dir: &OwnedFd,
    name: &std::ffi::CStr,
) -> std::io::Result<Option<libc::mode_t>> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid dir fd, NUL-terminated name, and a stat buffer of the right size.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: fstatat succeeded, so the buffer is initialised.
    Ok(Some(unsafe { st.assume_init() }.st_mode & libc::S_IFMT))
}
