//! `verify`: what a writer received, region by region, so that the destination can be read
//! back after the last write and compared with it. The stream's digest covers what was sent,
//! not what the destination holds: a hole skipped on a sink wrongly said to read as zero, or a
//! device that lied about a write, passes it. Reading back finds those, and where.

use crate::error::Error;
use crate::fd::{self, Kind};
use engine::Digest;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Bytes per region: the unit a data mismatch is located to (8 bytes of state per region,
/// 8 MiB per TiB).
const REGION: u64 = 1 << 20;

/// What each region of the volume must read as.
#[derive(Default)]
pub(crate) struct Expected {
    /// Per finished region: `None` when only holes fell in it (it must read as zeroes),
    /// else the digest of its bytes.
    regions: Vec<Option<u32>>,
    current: Digest,
    current_data: bool,
}

impl Expected {
    pub fn data(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = (self.room() as usize).min(bytes.len());
            self.current.update(&bytes[..n]);
            self.current_data = true;
            bytes = &bytes[n..];
            self.close_full();
        }
    }

    pub fn hole(&mut self, mut len: u64) {
        while len > 0 {
            let n = self.room().min(len);
            self.current.update_zeroes(n);
            len -= n;
            self.close_full();
        }
    }

    fn room(&self) -> u64 {
        REGION - self.current.len()
    }

    fn close_full(&mut self) {
        if self.current.len() == REGION {
            self.close();
        }
    }

    fn close(&mut self) {
        let d = std::mem::take(&mut self.current);
        self.regions
            .push(std::mem::take(&mut self.current_data).then(|| d.value()));
    }

    /// Reads the first `size` bytes of `file` back and compares them with what was received;
    /// a hole of a regular file (by SEEK_DATA) reads as zero without being read.
    pub fn check(self, file: &File, kind: Kind, size: u64, shown: &str) -> Result<(), Error> {
        self.check_with(size, shown, |start, buf| {
            read_region(file, kind, start, buf)
                .map_err(|e| Error::io(format!("reading {shown} back at {start}"), e))
        })
    }

    /// [`Expected::check`] with the destination read by `read(offset, buf)`, which fills
    /// `buf` exactly (an NBD export is read back over its connection).
    pub fn check_with(
        mut self,
        size: u64,
        shown: &str,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if !self.current.is_empty() {
            self.close();
        }
        let mut buf = vec![0u8; REGION as usize];
        for (i, want) in self.regions.iter().enumerate() {
            let start = i as u64 * REGION;
            let len = REGION.min(size - start) as usize;
            let buf = &mut buf[..len];
            read(start, buf)?;
            let first = match want {
                None => buf.iter().position(|&b| b != 0).map(|i| start + i as u64),
                Some(crc) => {
                    let mut d = Digest::new();
                    d.update(buf);
                    (d.value() != *crc).then_some(start)
                }
            };
            if let Some(offset) = first {
                return Err(Error::VerifyFailed {
                    target: shown.to_owned(),
                    offset,
                    exact: want.is_none(),
                });
            }
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `start`, zeroes for what a regular file's map says is a hole.
fn read_region(file: &File, kind: Kind, start: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let end = start + buf.len() as u64;
    let mut at = start;
    while at < end {
        let data = match kind {
            Kind::Regular => seek(file, at, libc::SEEK_DATA)?.unwrap_or(end).min(end),
            _ => at,
        };
        buf[(at - start) as usize..(data - start) as usize].fill(0);
        if data >= end {
            break;
        }
        let hole = match kind {
            Kind::Regular => seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end),
            _ => end,
        };
        file.read_exact_at(
            &mut buf[(data - start) as usize..(hole - start) as usize],
            data,
        )?;
        at = hole;
    }
    Ok(())
}

/// lseek with SEEK_DATA or SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(file: &File, from: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match fd::errno(&e) {
            libc::ENXIO => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}
