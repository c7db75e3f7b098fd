//! Small wrappers over the system calls the readers and writers share: what kind of volume an
//! fd is, its size, positional reads that do not stop short, and name resolution that cannot
//! escape a directory.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::PathBuf;
use std::sync::Arc;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// How a volume's fd can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Seekable, sparse-capable, sized by `st_size`.
    Regular,
    /// Seekable, fixed size (BLKGETSIZE64), holes only by zero detection.
    Block,
    /// Sequential only (pipe, FIFO, character device, socket): no seeking, no size.
    Stream,
}

impl Kind {
    pub fn of(file: &File) -> io::Result<Kind> {
        let ft = file.metadata()?.file_type();
        Ok(if ft.is_file() {
            Kind::Regular
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        } else {
            Kind::Stream
        })
    }
}

/// The length of a regular file or block device; `None` for streams.
pub fn size_of(file: &File, kind: Kind) -> io::Result<Option<u64>> {
    match kind {
        Kind::Regular => Ok(Some(file.metadata()?.len())),
        Kind::Block => {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
            unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
            Ok(Some(size))
        }
        Kind::Stream => Ok(None),
    }
}

/// The length of the block device at `path`; `None` if it is not one.
pub fn block_device_size(path: &std::path::Path) -> io::Result<Option<u64>> {
    if !std::fs::metadata(path)?.file_type().is_block_device() {
        return Ok(None);
    }
    size_of(&File::open(path)?, Kind::Block)
}

/// Reads exactly `buf.len()` bytes at `offset` (or sequentially for streams), retrying short
/// reads; an early end of file is an error because the volume changed under us.
pub fn read_full(file: &File, kind: Kind, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = match kind {
            Kind::Stream => io::Read::read(&mut &*file, buf),
            _ => file.read_at(buf, offset),
        };
        match n {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("volume ended early at {offset}"),
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes from a pipe or socket into a new buffer, without zero-filling it.
pub fn read_stream(stream: &impl AsRawFd, len: usize) -> io::Result<bytes::BytesMut> {
    read_new(stream, Kind::Stream, 0, len)
}

/// Reads `len` bytes at `offset` into a new buffer without zero-filling it first (the kernel
/// fills it; a memset of every buffer costs as much as the zero scan).
pub fn read_new(
    file: &impl AsRawFd,
    kind: Kind,
    offset: u64,
    len: usize,
) -> io::Result<bytes::BytesMut> {
    let mut buf = bytes::BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        let at = offset + buf.len() as u64;
        let spare = buf.spare_capacity_mut();
        // SAFETY: the kernel writes at most `want` bytes into the spare capacity, which is at
        // least `want` bytes long; we only mark as initialised what it reports written.
        let n = unsafe {
            let ptr = spare.as_mut_ptr() as *mut libc::c_void;
            match kind {
                Kind::Stream => libc::read(file.as_raw_fd(), ptr, want),
                _ => libc::pread(file.as_raw_fd(), ptr, want, at as libc::off_t),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("volume ended early at {at}"),
            ));
        }
        // SAFETY: n bytes past the current length were just written by the kernel.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(buf)
}

/// Writes all of `buf` at `offset` (or sequentially for streams).
pub fn write_full(file: &File, kind: Kind, mut offset: u64, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = match kind {
            Kind::Stream => io::Write::write(&mut &*file, buf),
            _ => file.write_at(buf, offset),
        };
        match n {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Checks that a volume name is one plain directory entry.
pub fn plain_name(name: &str) -> Option<CString> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && name.len() <= 255
        && !name.contains('\0')
        // Listings are tab- and line-separated; control characters have no place in a name.
        && !name.chars().any(char::is_control);
    if ok {
        CString::new(name).ok()
    } else {
        None
    }
}

/// Opens `name` inside `dir` without following symlinks or leaving the directory, in one
/// system call, so there is no window between checking a name and opening it.
pub fn open_beneath(dir: &OwnedFd, name: &CStr, flags: libc::c_int) -> io::Result<File> {
    // The kernel's struct open_how (libc's is non-exhaustive, so it cannot be built here).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: the arguments are a valid fd, a NUL-terminated name and a properly sized
    // open_how; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just gave us this fd and nobody else owns it.
        return Ok(unsafe { File::from_raw_fd(fd as libc::c_int) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // Kernels before 5.6: the name has no '/' (checked by the caller), so O_NOFOLLOW on the
    // one component is enough to stay inside the directory.
    openat(dir, name, flags | libc::O_NOFOLLOW, 0)
}

pub fn openat(
    dir: &OwnedFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    // SAFETY: valid dir fd and NUL-terminated name; returns a new fd or -1.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

pub fn unlinkat(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames inside one directory; with `replace == false` an existing target is an error
/// (EEXIST) decided atomically by the kernel.
pub fn renameat(dir: &OwnedFd, from: &CStr, to: &CStr, replace: bool) -> io::Result<()> {
    if replace {
        refuse_non_regular(dir, to)?;
    }
    let flags = if replace { 0 } else { libc::RENAME_NOREPLACE };
    // SAFETY: valid dir fd and NUL-terminated names.
    let r = unsafe {
        libc::renameat2(
            dir.as_raw_fd(),
            from.as_ptr(),
            dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !replace && err.raw_os_error() == Some(libc::EINVAL) {
        // Filesystems without RENAME_NOREPLACE: link(2) refuses an existing target too.
        // SAFETY: valid dir fd and NUL-terminated names.
        let r = unsafe {
            libc::linkat(
                dir.as_raw_fd(),
                from.as_ptr(),
                dir.as_raw_fd(),
                to.as_ptr(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        return unlinkat(dir, from);
    }
    Err(err)
}

/// Only a regular file may be replaced by an upload: a symlink in the pool (to anywhere) or a
/// device node stays as the host made it.
fn refuse_non_regular(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    match crate::sink::file_type_at(dir, name)? {
        None | Some(libc::S_IFREG) => Ok(()),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "only a regular file can be replaced",
        )),
    }
}

/// Where a volume lives, resolved by whichever worker opens it.
pub enum Location {
    Path(PathBuf),
    /// A path, called by another name in messages (a served device by its volume name).
    Named(PathBuf, String),
    /// A plain name inside a directory held open.
    At {
        dir: Arc<OwnedFd>,
        name: CString,
        shown: String,
    },
    Open(File),
}

impl Location {
    /// The same place, called `shown` in messages.
    pub fn named(self, shown: impl Into<String>) -> Location {
        match self {
            Location::Path(p) | Location::Named(p, _) => Location::Named(p, shown.into()),
            Location::At { dir, name, .. } => Location::At {
                dir,
                name,
                shown: shown.into(),
            },
            open @ Location::Open(_) => open,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Location::Path(p) => p.display().to_string(),
            Location::Named(_, shown) | Location::At { shown, .. } => shown.clone(),
            Location::Open(f) => format!("fd {}", f.as_raw_fd()),
        }
    }
}

/// Smallest O_DIRECT alignment used for buffers, offsets and lengths: page size covers every
/// logical block size below it, and larger ones are asked of the device.
pub const DIRECT_ALIGN: u64 = 4096;

nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);

/// The O_DIRECT alignment for `file`: max(logical block size, 4096).
pub fn direct_align(file: &File, kind: Kind) -> u64 {
    if kind != Kind::Block {
        return DIRECT_ALIGN;
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    match unsafe { blksszget(file.as_raw_fd(), &mut size) } {
        Ok(_) if size > 0 => DIRECT_ALIGN.max(size as u64),
        _ => DIRECT_ALIGN,
    }
}

/// Turns O_DIRECT on or off for the open file description. Used both to enable direct I/O on
/// an fd received from elsewhere and to drop it briefly for unaligned pieces (a partial final
/// block, zeroes from a static buffer), which O_DIRECT would refuse with EINVAL.
pub fn set_direct(file: &File, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments has no memory effects.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    if want == flags {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, want) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` with O_DIRECT off when `direct` is set, restoring it afterwards.
pub fn buffered<T>(file: &File, direct: bool, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if !direct {
        return f();
    }
    set_direct(file, false)?;
    let r = f();
    set_direct(file, true)?;
    r
}

/// Heap memory aligned for O_DIRECT, owned by a `Bytes` through `Bytes::from_owner`.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain owned memory with no interior references to other threads.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only (`as_ref`); mutation needs `&mut`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Uninitialised-then-zeroed memory of `cap` bytes (rounded up to `align`), length 0.
    pub fn new(cap: usize, align: usize) -> AlignedBuf {
        let cap = cap.div_ceil(align).max(1) * align;
        let layout = std::alloc::Layout::from_size_align(cap, align).expect("bad alignment");
        // SAFETY: the layout has a non-zero size. Zeroed so that `as_mut_full` never exposes
        // uninitialised bytes; the cost is small next to the disk I/O it serves.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len: 0,
            layout,
        }
    }

    /// The whole capacity, to be filled by the caller before `set_len`.
    pub fn as_mut_full(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.layout.size());
        self.len = len;
    }

    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialised and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Reads `len` bytes at an aligned `offset` into aligned memory (the fd may have O_DIRECT).
pub fn read_aligned(file: &File, offset: u64, len: usize, align: u64) -> io::Result<bytes::Bytes> {
    let mut buf = AlignedBuf::new(len, align as usize);
    let mut done = 0;
    while done < len {
        let at = offset + done as u64;
        match file.read_at(&mut buf.as_mut_full()[done..len], at) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("volume ended early at {at}"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.set_len(len);
    Ok(buf.into_bytes())
}

/// Whether a write of `buf` at `offset` meets O_DIRECT's rules.
pub fn is_aligned(offset: u64, buf: &[u8], align: u64) -> bool {
    offset.is_multiple_of(align)
        && (buf.len() as u64).is_multiple_of(align)
        && (buf.as_ptr() as usize).is_multiple_of(align as usize)
}

pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::plain_name;

    #[test]
    fn plain_names_only() {
        for bad in ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "nul\0byte"] {
            assert!(plain_name(bad).is_none(), "{bad:?}");
        }
        let long = "x".repeat(256);
        assert!(plain_name(&long).is_none());
        for good in ["disk", "vm-1.img", "a..b", "x".repeat(255).as_str()] {
            assert!(plain_name(good).is_some(), "{good:?}");
        }
    }
}
