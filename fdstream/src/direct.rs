//! Writes that keep `--direct`'s promise whatever the network delivered. O_DIRECT needs the
//! offset, the length and the memory aligned; received chunks are aligned in offset and length
//! (but for a volume's tail) and almost never in memory. Aligned pieces in unaligned memory go
//! through an aligned bounce buffer; the few pieces O_DIRECT cannot take at all (an unaligned
//! tail or offset, zeroes from a static buffer) go through the page cache and are dropped from
//! it once on disk, at commit (see [`drop_cached`]).

use crate::fd::{self, AlignedBuf, Kind};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The bounce buffer's size: one worker run's worth of data, allocated once per volume.
const BOUNCE: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct DirectWrites {
    bounce: Option<AlignedBuf>,
    /// Some bytes went through the page cache.
    pub cached: bool,
}

impl DirectWrites {
    /// Writes `buf` at `offset` into `file`, which has O_DIRECT set, with alignment `align`.
    pub fn write(
        &mut self,
        file: &File,
        kind: Kind,
        offset: u64,
        buf: &[u8],
        align: u64,
    ) -> io::Result<()> {
        let head = if offset.is_multiple_of(align) {
            buf.len() - buf.len() % align as usize
        } else {
            0
        };
        if head > 0 {
            if (buf.as_ptr() as usize).is_multiple_of(align as usize) {
                fd::write_full(file, kind, offset, &buf[..head])?;
            } else {
                let bounce = self
                    .bounce
                    .get_or_insert_with(|| AlignedBuf::new(BOUNCE, align as usize));
                let mut done = 0;
                while done < head {
                    let n = (head - done).min(BOUNCE);
                    bounce.as_mut_full()[..n].copy_from_slice(&buf[done..done + n]);
                    fd::write_full(file, kind, offset + done as u64, &bounce.as_mut_full()[..n])?;
                    done += n;
                }
            }
        }
        if head < buf.len() {
            self.cached = true;
            fd::buffered(file, true, || {
                fd::write_full(file, kind, offset + head as u64, &buf[head..])
            })?;
        }
        Ok(())
    }
}

/// Drops `file`'s pages from the page cache. Only clean pages go, so whatever went through
/// the cache must have been synced first.
pub(crate) fn drop_cached(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise on an fd we own; offset 0 and length 0 mean the whole file.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}
