//! The crate's one error type, and how each case is reported to the peer.

use engine::proto::Reason;
use engine::VolumeError;
use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// A system call failed while doing `context`.
    Io {
        context: String,
        source: io::Error,
    },
    InvalidName(String),
    AlreadyExists(String),
    NotFound(String),
    /// The volume is of a kind this side cannot serve that way (a directory, a FIFO without a
    /// known size, ...).
    Unsupported(String),
    /// A block device is mounted or claimed by another program (the kernel refused O_EXCL).
    InUse {
        target: String,
        /// As a source (which `force_share` would read anyway) rather than a sink.
        reading: bool,
    },
    /// The sink is smaller than the volume.
    TooSmall {
        target: String,
        have: u64,
        need: u64,
    },
    /// The content received is not what the sender says it sent.
    DigestMismatch {
        ours: u32,
        theirs: u32,
    },
    /// The stream ended at a different length than announced or reached.
    Length {
        expected: u64,
        got: u64,
    },
    /// A write into a device or an existing file failed part-way: `[from, to)` was not written
    /// (everything before `from` was).
    Partial {
        from: u64,
        to: u64,
        cause: Box<Error>,
    },
    /// Read back after writing, the destination differs from what was received: at `offset`
    /// exactly, or (`exact` false) somewhere in the 1 MiB from `offset`.
    VerifyFailed {
        target: String,
        offset: u64,
        exact: bool,
    },
    Cancelled,
    /// An iohelper process failed: it died, hung, or broke the helper protocol.
    Helper(String),
    /// An NBD connection failed: the server refused the handshake or broke the protocol.
    Nbd {
        context: String,
        source: nbd::Error,
    },
    /// An NBD server failed a command.
    NbdCommand {
        context: String,
        source: nbd::CommandError,
    },
    /// qemu-img or qemu-nbd failed, or could not be run.
    Qemu(String),
    /// A partial's journal ([`crate::journal`]) cannot be trusted: cut short, edited, or
    /// describing ranges it cannot hold. Nothing in it is used.
    Journal {
        path: String,
        problem: String,
    },
    /// An updated copy's block digests differ from the source's (`--update`): the source
    /// changed during the update, or a block went wrong. The copy did not get the final name.
    UpdateMismatch(String),
    /// A resumable upload found no partial it may continue (none kept, expired, begun from
    /// another source, or in use): the message says which; the client starts over.
    NoPartial(String),
    /// A copy-on-read destination's block that came from the source (no local write in it)
    /// differs from the source's block digest.
    SourceMismatch {
        target: String,
        offset: u64,
    },
    /// A partial being resumed belongs to other content than the source's now (its identity
    /// or size changed, or the whole's block digests differ): nothing of it is used.
    SourceChanged {
        target: String,
        what: String,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Error::Io { source, .. } => io_reason(source),
            Error::InvalidName(_) => Reason::InvalidName,
            Error::AlreadyExists(_) => Reason::AlreadyExists,
            Error::NotFound(_) => Reason::NotFound,
            Error::Unsupported(_) => Reason::Unsupported,
            Error::InUse { .. } => Reason::PermissionDenied,
            Error::TooSmall { .. } => Reason::DeviceTooSmall,
            Error::DigestMismatch { .. } => Reason::DigestMismatch,
            Error::Length { .. } => Reason::Protocol,
            Error::Partial { cause, .. } => cause.reason(),
            Error::VerifyFailed { .. } => Reason::DigestMismatch,
            Error::Cancelled => Reason::Cancelled,
            Error::Helper(_) => Reason::Io,
            Error::Nbd { source, .. } => match source {
                nbd::Error::Refused { reply, .. } if *reply == nbd::wire::REP_ERR_UNKNOWN => {
                    Reason::NotFound
                }
                nbd::Error::Refused { reply, .. }
                    if *reply == nbd::wire::REP_ERR_POLICY
                        || *reply == nbd::wire::REP_ERR_TLS_REQD =>
                {
                    Reason::PermissionDenied
                }
                nbd::Error::Unsupported(_) | nbd::Error::Invalid(_) => Reason::Unsupported,
                _ => Reason::Io,
            },
            Error::NbdCommand { source, .. } => match source.errno {
                nbd::wire::ENOSPC => Reason::NoSpace,
                nbd::wire::EPERM => Reason::PermissionDenied,
                nbd::wire::ENOTSUP => Reason::Unsupported,
                _ => Reason::Io,
            },
            Error::Qemu(_) => Reason::Io,
            Error::Journal { .. } => Reason::Io,
            Error::UpdateMismatch(_) => Reason::DigestMismatch,
            Error::NoPartial(_) => Reason::NotFound,
            Error::SourceMismatch { .. } => Reason::DigestMismatch,
            Error::SourceChanged { .. } => Reason::DigestMismatch,
        }
    }
}

fn io_reason(e: &io::Error) -> Reason {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => return Reason::NoSpace,
        Some(libc::ELOOP) | Some(libc::EXDEV) => return Reason::InvalidName,
        Some(libc::EOPNOTSUPP) => return Reason::Unsupported,
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::NotFound => Reason::NotFound,
        io::ErrorKind::AlreadyExists => Reason::AlreadyExists,
        io::ErrorKind::PermissionDenied => Reason::PermissionDenied,
        _ => Reason::Io,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::InvalidName(n) => write!(f, "invalid volume name {n:?}"),
            Error::AlreadyExists(n) => write!(f, "{n} exists (overwrite not requested)"),
            Error::NotFound(n) => write!(f, "{n} not found"),
            Error::Unsupported(m) => f.write_str(m),
            Error::InUse { target, reading } => {
                write!(
                    f,
                    "{target} is in use (mounted, or held by another program)"
                )?;
                if *reading {
                    f.write_str(
                        ": a copy of it may be inconsistent; -U/--force-share reads it anyway",
                    )
                } else {
                    f.write_str("; nothing was written to it")
                }
            }
            Error::TooSmall { target, have, need } => {
                write!(
                    f,
                    "device too small: {target}: device is {have} bytes, volume is {need}"
                )
            }
            Error::DigestMismatch { ours, theirs } => write!(
                f,
                "content digest {ours:#010x} differs from the sender's {theirs:#010x}"
            ),
            Error::Length { expected, got } => {
                write!(f, "stream ended at {got} bytes, expected {expected}")
            }
            Error::Partial { from, to, cause } => write!(
                f,
                "{cause}; bytes {from}..{to} were not written (everything before {from} was)"
            ),
            Error::VerifyFailed {
                target,
                offset,
                exact: true,
            } => write!(
                f,
                "verify: {target} read back differs from the source at byte {offset}"
            ),
            Error::VerifyFailed { target, offset, .. } => write!(
                f,
                "verify: {target} read back differs from the source in the MiB at byte {offset}"
            ),
            Error::Cancelled => f.write_str("cancelled"),
            Error::Helper(m) => f.write_str(m),
            Error::Nbd { context, source } => write!(f, "{context}: {source}"),
            Error::NbdCommand { context, source } => {
                write!(f, "{context}: the NBD server failed it: {source}")
            }
            Error::Qemu(m) => f.write_str(m),
            Error::Journal { path, problem } => write!(f, "journal {path}: {problem}"),
            Error::NoPartial(why) => f.write_str(why),
            Error::SourceMismatch { target, offset } => write!(
                f,
                "{target}: the block at {offset} came from the source but differs from the \
                 source's block digest (did the source change during the download?)"
            ),
            Error::UpdateMismatch(target) => write!(
                f,
                "{target}: the updated copy's block digests differ from the source's (did the \
                 source change during the update?); {target} was left as it was"
            ),
            Error::SourceChanged { target, what } => write!(
                f,
                "{target}: the source changed since its partial was written ({what})"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Partial { cause, .. } => Some(cause.as_ref()),
            Error::Nbd { source, .. } => Some(source),
            Error::NbdCommand { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for VolumeError {
    fn from(e: Error) -> Self {
        // A peer shows the reason as the category before the message: do not say it twice.
        let message = match &e {
            Error::InvalidName(name) => format!("{name:?}"),
            _ => e.to_string(),
        };
        VolumeError::new(e.reason(), message)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
