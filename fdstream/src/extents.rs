//! Allocation maps: SEEK_DATA/SEEK_HOLE for files, asked one range at a time as reading goes,
//! and a zero-detection map for block devices.

use crate::fd::{self, Kind};
use crate::zero;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// An extent of a map is what an EXTENTS document lists (the engine's document codec).
pub use engine::document::{ExtentEntry as Extent, ExtentKind};

/// What the filesystem says about the bytes at one offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Data up to this offset.
    Data(u64),
    /// A hole up to this offset.
    Hole(u64),
}

/// SEEK_DATA/SEEK_HOLE at `pos` of a file of `size` bytes. `Ok(None)` means the file system
/// cannot tell (no SEEK_DATA support): treat everything as data.
pub fn segment_at(file: &File, pos: u64, size: u64) -> io::Result<Option<Segment>> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a valid fd has no memory effects.
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match fd::errno(&e) {
            // ENXIO: no data at or after pos.
            libc::ENXIO => Ok(Some(Segment::Hole(size))),
            libc::EINVAL | libc::EOPNOTSUPP | libc::ENOTTY => Ok(None),
            _ => Err(e),
        };
    }
    let data = data as u64;
    if data > pos {
        return Ok(Some(Segment::Hole(data.min(size))));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        let e = io::Error::last_os_error();
        return match fd::errno(&e) {
            libc::ENXIO => Ok(Some(Segment::Data(size))),
            _ => Err(e),
        };
    }
    Ok(Some(Segment::Data((hole as u64).min(size).max(pos + 1))))
}

fn push(map: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    if let Some(last) = map.last_mut() {
        if last.kind == kind && last.offset + last.len == offset {
            last.len += len;
            return;
        }
    }
    map.push(Extent::new(offset, len, kind));
}

/// The allocation map of a file (Data and Hole, from SEEK_DATA/SEEK_HOLE) or a block device
/// (Data and Zero, by reading the whole device and finding 4 KiB blocks of zeroes). Blocks the
/// calling thread; reads a device completely.
pub fn extents(path: &Path) -> io::Result<Vec<Extent>> {
    extents_of(&File::open(path)?)
}

/// [`extents`] of a file already open.
pub fn extents_of(file: &File) -> io::Result<Vec<Extent>> {
    let kind = Kind::of(file)?;
    let size = fd::size_of(file, kind)?.ok_or_else(|| {
        io::Error::new(io::ErrorKind::Unsupported, "a stream has no allocation map")
    })?;
    let mut map = Vec::new();
    let mut pos = 0;
    match kind {
        Kind::Regular => {
            while pos < size {
                match segment_at(file, pos, size)? {
                    None => {
                        push(&mut map, pos, size - pos, ExtentKind::Data);
                        pos = size;
                    }
                    Some(Segment::Data(end)) => {
                        push(&mut map, pos, end - pos, ExtentKind::Data);
                        pos = end;
                    }
                    Some(Segment::Hole(end)) => {
                        push(&mut map, pos, end - pos, ExtentKind::Hole);
                        pos = end;
                    }
                }
            }
        }
        _ => {
            const BUF: u64 = 1 << 20;
            let mut buf = vec![0u8; BUF as usize];
            while pos < size {
                let n = (size - pos).min(BUF) as usize;
                fd::read_full(file, kind, pos, &mut buf[..n])?;
                for run in zero::split(pos, bytes::Bytes::copy_from_slice(&buf[..n]), 4096) {
                    match run {
                        zero::Run::Data { offset, bytes } => {
                            push(&mut map, offset, bytes.len() as u64, ExtentKind::Data)
                        }
                        zero::Run::Zero { offset, len } => {
                            push(&mut map, offset, len, ExtentKind::Zero)
                        }
                    }
                }
                pos += n as u64;
            }
        }
    }
    Ok(map)
}
