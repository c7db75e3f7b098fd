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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    const FILL: u8 = 0xa5;
    const SIZE: u64 = 64 * 1024;

    /// Ranges around block and sector boundaries: aligned, one byte off either way, one byte.
    const RANGES: [(u64, u64); 7] = [
        (4096, 8192),
        (4095, 8194),
        (4097, 8190),
        (1, 1),
        (12287, 2),
        (0, 4096),
        (SIZE - 4097, 4097),
    ];

    fn fill(file: &File) {
        file.write_all_at(&vec![FILL; SIZE as usize], 0).unwrap();
        file.sync_all().unwrap();
    }

    /// A zeroer that tries `method` first, then writes zeroes.
    fn only(kind: Kind, method: Method) -> Zeroer {
        Zeroer {
            kind,
            allocated: false,
            punch: method == Method::Punch,
            zero_range: method == Method::ZeroRange,
            zeroout: method == Method::ZeroOut,
            allocate: method == Method::Allocate,
        }
    }

    /// The range reads as zero and every byte outside it still holds `FILL`.
    fn assert_zeroed(file: &File, offset: u64, len: u64, how: &str) {
        let mut all = vec![0u8; SIZE as usize];
        file.read_exact_at(&mut all, 0).unwrap();
        let (start, end) = (offset as usize, (offset + len) as usize);
        assert!(all[start..end].iter().all(|&b| b == 0), "{how}: not zero");
        let outside = all[..start].iter().chain(&all[end..]);
        let first_bad = outside.clone().position(|&b| b != FILL);
        assert_eq!(
            first_bad, None,
            "{how}: a byte outside {start}..{end} changed"
        );
        if start > 0 {
            assert_eq!(all[start - 1], FILL, "{how}: byte before");
        }
        if end < all.len() {
            assert_eq!(all[end], FILL, "{how}: byte after");
        }
    }

    fn each_method_on(file: &File, kind: Kind, methods: &[Method]) {
        for &method in methods {
            for (offset, len) in RANGES {
                fill(file);
                let used = only(kind, method).zero(file, offset, len).unwrap();
                // A method the file system or device refuses (or refuses for an unaligned
                // range) falls back to writing zeroes; either way only the range changes.
                assert!(
                    used == method || used == Method::Write,
                    "{method:?} gave {used:?}"
                );
                let how = format!("{method:?} (used {used:?}) of {offset}+{len}");
                assert_zeroed(file, offset, len, &how);
            }
        }
    }

    #[test]
    fn zeroing_a_file_range_leaves_both_borders_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        each_method_on(
            &file,
            Kind::Regular,
            &[Method::Punch, Method::ZeroRange, Method::Write],
        );
    }

    #[test]
    fn allocating_a_fresh_range_leaves_written_neighbours_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        for (offset, len) in RANGES {
            // Written everywhere but the range, which was never written (a fresh file's hole).
            file.set_len(0).unwrap();
            file.set_len(SIZE).unwrap();
            let before = vec![FILL; offset as usize];
            let after = vec![FILL; (SIZE - offset - len) as usize];
            file.write_all_at(&before, 0).unwrap();
            file.write_all_at(&after, offset + len).unwrap();
            let used = only(Kind::Regular, Method::Allocate)
                .allocate(&file, offset, len)
                .unwrap();
            let file = File::open(dir.path().join("f")).unwrap();
            assert_zeroed(&file, offset, len, &format!("{used:?} of {offset}+{len}"));
        }
    }

    /// A loop device over a file in `dir`; detached when dropped.
    struct Loop(String);

    impl Loop {
        fn attach(backing: &Path) -> Option<Loop> {
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(backing)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned()))
                }
                Ok(o) => {
                    let why = String::from_utf8_lossy(&o.stderr);
                    eprintln!(
                        "SKIP: losetup failed (loop devices need root): {}",
                        why.trim()
                    );
                    None
                }
                Err(e) => {
                    eprintln!("SKIP: cannot run losetup: {e}");
                    None
                }
            }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    #[test]
    fn zeroing_a_block_device_range_leaves_both_borders_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        File::create(&backing).unwrap().set_len(SIZE).unwrap();
        let Some(dev) = Loop::attach(&backing) else {
            return;
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev.0)
            .unwrap();
        assert_eq!(Kind::of(&file).unwrap(), Kind::Block);
        each_method_on(
            &file,
            Kind::Block,
            &[
                Method::Punch,
                Method::ZeroRange,
                Method::ZeroOut,
                Method::Write,
            ],
        );
    }
}
