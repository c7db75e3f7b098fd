//! Making a range of an existing volume read as zero: the zeroing cascade of nbdcopy/nbdkit.
//!
//! Try, in order, fallocate(PUNCH_HOLE|KEEP_SIZE), fallocate(ZERO_RANGE), the BLKZEROOUT ioctl
//! (block devices), and finally writing zeroes. A method that answers "not supported" is
//! switched off for the rest of this sink's life, so the cost of finding out is paid once.
//! Discard (BLKDISCARD) is never used: it does not promise that the range reads back as zero.

use crate::fd::{self, Kind};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Largest buffer of zeroes written at once when nothing better works.
const ZERO_BUF: usize = 1 << 20;
static ZEROES: [u8; ZERO_BUF] = [0; ZERO_BUF];

/// How a zeroed range was made to read as zero (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Punch,
    ZeroRange,
    ZeroOut,
    Write,
    /// fallocate mode 0 on a range known to be unwritten (a fresh file): allocates zeroes.
    Allocate,
}

/// Per-sink zeroing state: which methods still look worth trying.
#[derive(Debug, Clone)]
pub struct Zeroer {
    kind: Kind,
    /// The result must stay allocated: never punch.
    allocated: bool,
    punch: bool,
    zero_range: bool,
    zeroout: bool,
    allocate: bool,
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        fd::errno(e),
        libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::ENOSYS | libc::ENODEV
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd has no memory effects.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Zeroer {
    pub fn new(kind: Kind, allocated: bool) -> Self {
        Zeroer {
            kind,
            allocated,
            punch: !allocated && kind != Kind::Stream,
            zero_range: kind != Kind::Stream,
            zeroout: kind == Kind::Block,
            allocate: kind == Kind::Regular,
        }
    }

    /// Makes `[offset, offset + len)` of an existing volume read as zero.
    pub fn zero(&mut self, file: &File, offset: u64, len: u64) -> io::Result<Method> {
        if len == 0 {
            return Ok(Method::Write);
        }
        if self.punch {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(file, mode, offset, len) {
                Ok(()) => return Ok(Method::Punch),
                Err(e) if unsupported(&e) => {
                    log::debug!("punching holes unsupported ({e}), trying the next method");
                    self.punch = false;
                }
                Err(e) => return Err(e),
            }
        }
        if self.zero_range {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(file, mode, offset, len) {
                Ok(()) => return Ok(Method::ZeroRange),
                Err(e) if unsupported(&e) => {
                    log::debug!("ZERO_RANGE unsupported ({e}), trying the next method");
                    self.zero_range = false;
                }
                Err(e) => return Err(e),
            }
        }
        if self.zeroout {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64 through the pointer, which is valid.
            match unsafe { blkzeroout(file.as_raw_fd(), &range) } {
                Ok(_) => return Ok(Method::ZeroOut),
                Err(e) => {
                    let e = io::Error::from(e);
                    if !unsupported(&e) {
                        return Err(e);
                    }
                    log::debug!("BLKZEROOUT unsupported ({e}), writing zeroes");
                    self.zeroout = false;
                }
            }
        }
        write_zeroes(file, self.kind, offset, len)?;
        Ok(Method::Write)
    }

    /// Allocates a range of a fresh file that is known to read as zero already (used for
    /// ALLOCATED sinks); falls back to writing zeroes.
    pub fn allocate(&mut self, file: &File, offset: u64, len: u64) -> io::Result<Method> {
        if self.allocate {
            match fallocate(file, 0, offset, len) {
                Ok(()) => return Ok(Method::Allocate),
                Err(e) if unsupported(&e) => self.allocate = false,
                Err(e) => return Err(e),
            }
        }
        write_zeroes(file, self.kind, offset, len)?;
        Ok(Method::Write)
    }

    /// fallocate mode 0 only: true when the range is now allocated, false when the file
    /// system cannot (the caller then writes zeroes where it must).
    pub fn allocate_only(&mut self, file: &File, offset: u64, len: u64) -> io::Result<bool> {
        match fallocate(file, 0, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                self.allocate = false;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub fn allocated(&self) -> bool {
        self.allocated
    }
}

pub fn write_zeroes(file: &File, kind: Kind, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(ZERO_BUF as u64) as usize;
        fd::write_full(file, kind, offset, &ZEROES[..n])?;
        offset += n as u64;
    }
    Ok(())
}
