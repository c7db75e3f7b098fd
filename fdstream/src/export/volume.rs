//! The export server's disk side: finding a pool volume for an NBD client and carrying out its
//! requests. Everything here blocks and runs on the worker pool, never on the loop.

use crate::extents::{segment_at, Segment};
use crate::fd::{self, Kind};
use crate::punch::Zeroer;
use bytes::Bytes;
use nbd::wire::{self, STATE_HOLE, STATE_ZERO};
use nbd::{BlockSize, Descriptor, ExportInfo, LookupError, Request};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Catalog, Disk, Reply};

/// The largest READ or WRITE payload offered: the protocol's default, so a client that never
/// asked for size constraints is not refused.
pub const MAX_PAYLOAD: u32 = wire::DEFAULT_MAX_PAYLOAD;
/// Extents in one block status reply at most; a client asks again for the rest.
const MAX_EXTENTS: usize = 4096;

/// What the server exports: the regular files directly in a pool directory, and named block
/// devices.
pub struct Exports {
    dir: OwnedFd,
    path: PathBuf,
    devices: HashMap<String, PathBuf>,
    writable: bool,
}

impl Exports {
    /// Exports the pool at `path` (opened now, once), read-only unless `writable`.
    pub fn new(path: &Path, writable: bool) -> io::Result<Exports> {
        Ok(Exports {
            dir: fd::open_dir(path)?,
            path: path.to_path_buf(),
            devices: HashMap::new(),
            writable,
        })
    }

    /// Also exports the block device at `path` as `name`.
    pub fn with_device(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.devices.insert(name.into(), path.into());
        self
    }
}

impl Catalog for Exports {
    fn writable(&self) -> bool {
        self.writable
    }

    fn names(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> =
            crate::provider::list_volumes(&self.path, &self.devices, &HashMap::new())?
                .into_iter()
                .map(|v| v.name)
                .collect();
        names.sort();
        Ok(names)
    }

    /// No paths of this host in the reply.
    fn open(&self, name: &str, may_write: bool) -> Result<Arc<dyn Disk>, LookupError> {
        let writable = self.writable && may_write;
        let unknown = |why: String| LookupError {
            reply: wire::REP_ERR_UNKNOWN,
            message: why,
        };
        let flags = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let file = if let Some(path) = self.devices.get(name) {
            std::fs::OpenOptions::new()
                .read(true)
                .write(writable)
                .open(path)
        } else {
            let Some(cname) = fd::plain_name(name) else {
                return Err(unknown(format!("{name:?} is not a volume name")));
            };
            open_in_pool(&self.dir, &cname, flags)
        };
        let file = file.map_err(|e| {
            log::info!("NBD export {name:?}: {e}");
            match e.kind() {
                io::ErrorKind::NotFound => unknown(format!("no volume {name:?}")),
                _ => LookupError {
                    reply: wire::REP_ERR_UNKNOWN,
                    message: format!("cannot open {name:?}: {}", errno_text(&e)),
                },
            }
        })?;
        let io_error = |e: io::Error| LookupError {
            reply: wire::REP_ERR_UNKNOWN,
            message: format!("{name:?}: {}", errno_text(&e)),
        };
        let kind = Kind::of(&file).map_err(io_error)?;
        if kind == Kind::Stream {
            return Err(unknown(format!("{name:?} is not a file or block device")));
        }
        if kind == Kind::Regular
            && crate::qemu::qcow2_header(&file)
                .map_err(io_error)?
                .is_some()
        {
            // Its bytes are a container, not the guest's disk; exporting them as a disk would
            // hand clients something that looks right and is not.
            return Err(LookupError {
                reply: wire::REP_ERR_POLICY,
                message: format!("{name:?} is a qcow2 image, which this export does not serve"),
            });
        }
        let size = fd::size_of(&file, kind)
            .map_err(io_error)?
            .unwrap_or_default();
        Ok(Arc::new(Volume {
            file,
            kind,
            size,
            writable,
        }))
    }
}

fn open_in_pool(dir: &OwnedFd, name: &CString, flags: libc::c_int) -> io::Result<File> {
    fd::open_beneath(dir, name, flags)
}

/// The text of an error without its "(os error N)" tail.
fn errno_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// One piece of a READ's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data { offset: u64, bytes: Bytes },
    Hole { offset: u64, len: u32 },
}

/// What a request came to.
#[derive(Debug)]
pub enum Outcome {
    Read(Vec<Piece>),
    Status(Vec<Descriptor>),
    Done,
}

/// A failed request, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub errno: u32,
    pub message: String,
}

/// An open export.
pub struct Volume {
    file: File,
    kind: Kind,
    size: u64,
    writable: bool,
}

impl Volume {
    /// A regular file of `size` bytes already open (for reading and, if `writable`, writing),
    /// served as it is.
    pub fn of_file(file: File, size: u64, writable: bool) -> Volume {
        Volume {
            file,
            kind: Kind::Regular,
            size,
            writable,
        }
    }
}

impl Disk for Volume {
    fn info(&self) -> ExportInfo {
        let mut flags = wire::FLAG_CAN_MULTI_CONN;
        if self.writable {
            // Every connection writes the same file and FLUSH is fdatasync of that file, so
            // a flush on one connection covers writes completed on all: multi-conn holds.
            flags |= wire::FLAG_SEND_FLUSH | wire::FLAG_SEND_FUA | wire::FLAG_SEND_WRITE_ZEROES;
        } else {
            flags |= wire::FLAG_READ_ONLY;
        }
        ExportInfo {
            size: self.size,
            flags,
            block_size: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_PAYLOAD,
            },
        }
    }

    fn run(&self, request: &Request, reply: Reply) {
        reply(self.serve(request))
    }
}

impl Volume {
    fn serve(&self, request: &Request) -> Result<Outcome, Failure> {
        let r = match *request {
            Request::Read { offset, len, .. } => self.read(offset, len).map(Outcome::Read),
            Request::BlockStatus {
                offset,
                len,
                req_one,
                ..
            } => self.status(offset, len, req_one).map(Outcome::Status),
            Request::Write {
                offset,
                ref data,
                fua,
                ..
            } => fd::write_full(&self.file, self.kind, offset, data)
                .and_then(|()| self.sync_if(fua))
                .map(|()| Outcome::Done),
            Request::WriteZeroes {
                offset,
                len,
                no_hole,
                fua,
                ..
            } => Zeroer::new(self.kind, no_hole)
                .zero(&self.file, offset, len as u64)
                .and_then(|_| self.sync_if(fua))
                .map(|()| Outcome::Done),
            Request::Flush { .. } => self.file.sync_data().map(|()| Outcome::Done),
            Request::Trim { .. } | Request::Disconnect => {
                return Err(Failure {
                    errno: wire::EINVAL,
                    message: "not offered".into(),
                })
            }
        };
        r.map_err(|e| {
            log::warn!("NBD export: {request:?} failed: {e}");
            Failure {
                errno: nbd_errno(&e),
                message: errno_text(&e),
            }
        })
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// What the file system says about `pos`: data or hole up to some offset (data to the
    /// end for a device or a file system that cannot tell).
    fn segment(&self, pos: u64) -> io::Result<Segment> {
        if self.kind != Kind::Regular {
            return Ok(Segment::Data(self.size));
        }
        Ok(segment_at(&self.file, pos, self.size)?.unwrap_or(Segment::Data(self.size)))
    }

    fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        let end = offset + len as u64;
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            match self.segment(pos)? {
                Segment::Hole(to) => {
                    let to = to.clamp(pos + 1, end);
                    pieces.push(Piece::Hole {
                        offset: pos,
                        len: (to - pos) as u32,
                    });
                    pos = to;
                }
                Segment::Data(to) => {
                    let to = to.clamp(pos + 1, end);
                    // Not zero-filled first: a memset of every READ's buffer was 18 % of the
                    // export's CPU (perf, nbdcopy reading 1 GiB), as much as the pread itself.
                    let buf = fd::read_new(&self.file, self.kind, pos, (to - pos) as usize)?;
                    pieces.push(Piece::Data {
                        offset: pos,
                        bytes: buf.freeze(),
                    });
                    pos = to;
                }
            }
        }
        Ok(pieces)
    }

    /// `base:allocation` for `[offset, offset + len)`, clipped to the request: data is 0, a
    /// hole reads as zero and is unallocated.
    fn status(&self, offset: u64, len: u32, req_one: bool) -> io::Result<Vec<Descriptor>> {
        let end = offset + len as u64;
        let mut out: Vec<Descriptor> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let (to, flags) = match self.segment(pos)? {
                Segment::Hole(to) => (to, STATE_HOLE | STATE_ZERO),
                Segment::Data(to) => (to, 0),
            };
            let to = to.clamp(pos + 1, end);
            let n = (to - pos) as u32;
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len += n,
                _ => out.push(Descriptor { len: n, flags }),
            }
            pos = to;
            if req_one {
                break;
            }
        }
        Ok(out)
    }
}

fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => wire::EPERM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => wire::ENOSPC,
        Some(libc::ENOMEM) => wire::ENOMEM,
        Some(libc::EINVAL) => wire::EINVAL,
        Some(libc::EOPNOTSUPP) => wire::ENOTSUP,
        _ => wire::EIO,
    }
}
