//! Names of the temporary files a new volume is written to before it is renamed into place,
//! and the removal of temporaries that a dead process left behind.
//!
//! A temporary is `.{stem}.volstream-tmp-{pid}-{n}` in the final name's directory: `pid` is
//! the writing process, `n` counts its temporaries. The stem is the final name itself when the
//! whole fits NAME_MAX (255 bytes) for any pid and counter; a longer final name is cut to
//! [`CUT`] bytes and followed by `~` and 16 hex digits of its FNV-1a hash, so the stem still
//! depends on the final name alone and [`stem`] finds a volume's temporaries. Its writer holds
//! an flock on a temporary while it lives.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// What separates the stem from the pid and counter.
pub const MARK: &str = ".volstream-tmp-";
/// The longest name a directory entry may have.
pub const NAME_MAX: usize = 255;
/// The longest pid and counter: u32 and u64 in decimal.
const NUMBERS_MAX: usize = 10 + 1 + 20;
/// The longest stem that fits: a leading dot, the stem, the mark, pid, dash, counter.
pub const STEM_MAX: usize = NAME_MAX - 1 - MARK.len() - NUMBERS_MAX;
/// Bytes of a long final name kept in its stem, before `~` and the hash.
pub const CUT: usize = STEM_MAX - 1 - 16;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The stem every temporary of `final_name` carries.
pub fn stem(final_name: &[u8]) -> Vec<u8> {
    if final_name.len() <= STEM_MAX {
        return final_name.to_vec();
    }
    // FNV-1a: fixed, so later versions (resume) derive the same stem from the same name.
    let hash = final_name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let mut cut = CUT;
    // Whole UTF-8 characters only, so a readable name stays readable.
    if std::str::from_utf8(final_name).is_ok() {
        while std::str::from_utf8(&final_name[..cut]).is_err() {
            cut -= 1;
        }
    }
    let mut s = final_name[..cut].to_vec();
    s.extend_from_slice(format!("~{hash:016x}").as_bytes());
    s
}

/// A new temporary name for `final_name` in this process.
pub fn name(final_name: &[u8]) -> CString {
    let mut n = b".".to_vec();
    n.extend_from_slice(&stem(final_name));
    n.extend_from_slice(MARK.as_bytes());
    let (pid, count) = (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    n.extend_from_slice(format!("{pid}-{count}").as_bytes());
    // The final name is a C string already, so there is no NUL in it.
    CString::new(n).expect("no NUL in a file name")
}

/// A temporary's name taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub stem: Vec<u8>,
    pub pid: u32,
    pub n: u64,
}

/// Parses a directory entry's name; `None` if it is not a volstream temporary.
pub fn parse(name: &[u8]) -> Option<Parsed> {
    let rest = name.strip_prefix(b".")?;
    let at = rest
        .windows(MARK.len())
        .rposition(|w| w == MARK.as_bytes())?;
    let (stem, numbers) = (&rest[..at], &rest[at + MARK.len()..]);
    let numbers = std::str::from_utf8(numbers).ok()?;
    let (pid, n) = numbers.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if stem.is_empty() || !all_digits(pid) || !all_digits(n) {
        return None;
    }
    Some(Parsed {
        stem: stem.to_vec(),
        pid: pid.parse().ok()?,
        n: n.parse().ok()?,
    })
}

/// Marks a temporary as in use for as long as `file` (or a copy of its fd) is open.
pub fn hold(file: &File) {
    // SAFETY: flock on a valid fd has no memory effects. A file system without flock leaves
    // the temporary unmarked; removal then goes by the pid alone.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
}

/// A temporary that was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub name: String,
    /// Bytes it occupied on disk.
    pub allocated: u64,
}

/// Removes the temporaries in `dir` whose writer is gone: its pid does not exist and nobody
/// holds the file's flock (a writer in another pid namespace still does). Entries that are not
/// volstream temporaries, or not regular files, are left alone.
pub fn remove_stale(dir: &OwnedFd) -> io::Result<Vec<Removed>> {
    let mut removed = Vec::new();
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        use std::os::unix::ffi::OsStrExt;
        let os_name = entry.file_name();
        let Some(parsed) = parse(os_name.as_bytes()) else {
            continue;
        };
        if parsed.pid == std::process::id() || alive(parsed.pid) {
            continue;
        }
        let Ok(name) = CString::new(os_name.as_bytes()) else {
            continue;
        };
        let Ok(file) = crate::fd::openat(dir, &name, libc::O_RDONLY | libc::O_NOFOLLOW, 0) else {
            continue;
        };
        let meta = file.metadata()?;
        if !meta.is_file() || !lock_free(&file) {
            continue;
        }
        crate::fd::unlinkat(dir, &name)?;
        use std::os::unix::fs::MetadataExt;
        removed.push(Removed {
            name: os_name.to_string_lossy().into_owned(),
            allocated: meta.blocks() * 512,
        });
    }
    Ok(removed)
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn lock_free(file: &File) -> bool {
    // SAFETY: flock on a valid fd; the lock goes with the fd when `file` is dropped.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_fits_and_parses_back() {
        let long_utf8 = "é".repeat(127) + "x";
        for final_name in [
            "disk".to_owned(),
            "x".repeat(STEM_MAX),
            "y".repeat(STEM_MAX + 1),
            "z".repeat(255),
            long_utf8.clone(),
        ] {
            let t = name(final_name.as_bytes());
            assert!(t.as_bytes().len() <= NAME_MAX, "{final_name}: {t:?}");
            // The worst case: the longest pid and counter.
            let worst = 1 + stem(final_name.as_bytes()).len() + MARK.len() + NUMBERS_MAX;
            assert!(worst <= NAME_MAX);
            let p = parse(t.as_bytes()).expect("parses");
            assert_eq!(p.stem, stem(final_name.as_bytes()));
            assert_eq!(p.pid, std::process::id());
        }
        assert_eq!(stem(b"disk"), b"disk");
        let s = stem(long_utf8.as_bytes());
        assert!(std::str::from_utf8(&s).is_ok(), "cut between characters");
        assert_ne!(
            stem(&[b'a'; 255]),
            stem(&[b'a'; 254]),
            "the hash tells them apart"
        );
    }

    #[test]
    fn other_names_are_not_temporaries() {
        for n in [
            "disk",
            ".disk",
            ".volstream-tmp-1-2",
            ".d.volstream-tmp-1",
            ".d.volstream-tmp-x-2",
            ".d.volstream-tmp-1-",
            "d.volstream-tmp-1-2",
        ] {
            assert_eq!(parse(n.as_bytes()), None, "{n}");
        }
        let p = parse(b".a.volstream-tmp-b.volstream-tmp-12-3").unwrap();
        assert_eq!(
            (p.stem.as_slice(), p.pid, p.n),
            (&b"a.volstream-tmp-b"[..], 12, 3)
        );
    }
}
