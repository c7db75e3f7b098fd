//! `volstream-iohelper`: one volume's reads or writes, out of the volstream process.
//!
//! Started by fdstream's `HelperReader` / `HelperWriter` with its socket as fd 3 and, where
//! the parent opened something, the volume or its directory as fd 4:
//!
//! ```text
//! volstream-iohelper read  --shown NAME (--path P | --fd | --dir-fd NAME) [--granularity N]
//!                          [--no-extents] [--force-share] [--stream-size N] [--direct]
//! volstream-iohelper write --shown NAME --size N (--path P | --fd | --create NAME [--temp NAME]
//!                          | --in-dir NAME)
//!                          [--allocated] [--destination-is-zero] [--overwrite] [--no-sync] [--verify] [--direct]
//! ```
//!
//! It runs fdstream's own synchronous cores (`ReadCore`, `WriteCore`), so its results are those
//! of the in-process workers, and speaks `fdstream::helper::wire` on the socket. The parent
//! closing the socket means "stop": a writer then removes its temporary file. Exit status 0
//! after success or cancellation, 1 after an error it reported, 2 for a bad command line.

use bytes::{Bytes, BytesMut};
use engine::Chunk;
use fdstream::helper::wire::{self, Msg};
use fdstream::helper::{SOCK_FD, VOLUME_FD};
use fdstream::{AlignedBuf, Error, ReadCore, ReaderOptions, WriteCore, WriteTarget, WriterOptions};
use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Default)]
struct Args {
    role: String,
    shown: String,
    path: Option<PathBuf>,
    fd: bool,
    dir_name: Option<OsString>,
    create: Option<OsString>,
    temp: Option<OsString>,
    in_dir: Option<OsString>,
    granularity: u32,
    no_extents: bool,
    force_share: bool,
    stream_size: Option<u64>,
    direct: bool,
    size: u64,
    allocated: bool,
    destination_is_zero: bool,
    overwrite: bool,
    no_sync: bool,
    verify: bool,
}

fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let mut a = Args {
        granularity: 4096,
        ..Args::default()
    };
    a.role = it
        .next()
        .and_then(|r| r.into_string().ok())
        .ok_or("missing role (read or write)")?;
    let num = |v: Option<OsString>, name: &str| -> Result<u64, String> {
        v.and_then(|v| v.into_string().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number"))
    };
    while let Some(arg) = it.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("bad argument {a:?}"))?;
        match arg.as_str() {
            "--shown" => a.shown = it.next().unwrap_or_default().to_string_lossy().into(),
            "--path" => a.path = Some(it.next().ok_or("--path needs a value")?.into()),
            "--fd" => a.fd = true,
            "--dir-fd" => a.dir_name = Some(it.next().ok_or("--dir-fd needs a name")?),
            "--create" => a.create = Some(it.next().ok_or("--create needs a name")?),
            "--temp" => a.temp = Some(it.next().ok_or("--temp needs a name")?),
            "--in-dir" => a.in_dir = Some(it.next().ok_or("--in-dir needs a name")?),
            "--granularity" => a.granularity = num(it.next(), &arg)? as u32,
            "--no-extents" => a.no_extents = true,
            "--force-share" => a.force_share = true,
            "--stream-size" => a.stream_size = Some(num(it.next(), &arg)?),
            "--direct" => a.direct = true,
            "--size" => a.size = num(it.next(), &arg)?,
            "--allocated" => a.allocated = true,
            "--destination-is-zero" => a.destination_is_zero = true,
            "--overwrite" => a.overwrite = true,
            "--no-sync" => a.no_sync = true,
            "--verify" => a.verify = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() {
    engine::memory::keep_freed_buffers();
    // As volstream: quiet unless RUST_LOG asks; failures reach the parent, which reports them.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("volstream-iohelper: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: the parent put our socket at fd 3; nothing else in this process owns it.
    let sock = unsafe { UnixStream::from_raw_fd(SOCK_FD) };
    if sock.peer_addr().is_err() && sock.local_addr().is_err() {
        eprintln!("volstream-iohelper: fd {SOCK_FD} is not the parent's socket");
        std::process::exit(2);
    }
    let mut conn = Conn { sock };
    let r = match args.role.as_str() {
        "read" => read(&args, &mut conn),
        "write" => write(&args, &mut conn),
        other => {
            eprintln!("volstream-iohelper: unknown role {other}");
            std::process::exit(2);
        }
    };
    match r {
        Ok(()) => {}
        Err(Failure::Reported) => std::process::exit(1),
        Err(Failure::Socket(e)) => {
            // The parent went away or hung up: nothing to tell anyone.
            log::debug!("socket: {e}");
        }
    }
}

enum Failure {
    /// Told the parent with an ERROR message.
    Reported,
    Socket(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Socket(e)
    }
}

struct Conn {
    sock: UnixStream,
}

impl Conn {
    fn send(&mut self, msg: &Msg) -> io::Result<()> {
        let parts = msg.encode();
        let mut slices: Vec<IoSlice> = parts.iter().map(|b| IoSlice::new(b)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match self.sock.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn report(&mut self, e: Error) -> Failure {
        log::debug!("{e}");
        let msg = Msg::Error {
            reason: e.reason(),
            message: e.to_string(),
        };
        match self.send(&msg) {
            Ok(()) => Failure::Reported,
            Err(e) => Failure::Socket(e),
        }
    }

    /// Whether a message can be read without waiting.
    fn readable(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }

    /// The next message; `None` when the parent hung up. DATA payloads go straight into
    /// aligned memory when `align` is given (for O_DIRECT writes).
    fn recv(&mut self, align: Option<u64>) -> io::Result<Option<Msg>> {
        let mut h = [0u8; wire::HEADER_LEN];
        match self.sock.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let header = wire::Header::parse(&h).map_err(|e| io::Error::other(e.to_string()))?;
        let payload = match align {
            Some(a) if header.len > 0 => {
                let mut buf = AlignedBuf::new(header.len, a as usize);
                self.sock.read_exact(&mut buf.as_mut_full()[..header.len])?;
                buf.set_len(header.len);
                buf.into_bytes()
            }
            _ => self.read_new(header.len)?,
        };
        header
            .finish(payload)
            .map(Some)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl Conn {
    /// `len` bytes into a new buffer, without zero-filling it first (the kernel fills it).
    fn read_new(&mut self, len: usize) -> io::Result<Bytes> {
        fdstream::read_stream(&self.sock, len).map(BytesMut::freeze)
    }
}

fn volume_fd() -> OwnedFd {
    // SAFETY: the parent put the volume (or its directory) at fd 4 when it passed one.
    unsafe { OwnedFd::from_raw_fd(VOLUME_FD) }
}

fn cstring(name: OsString) -> Result<CString, Failure> {
    CString::new(name.into_vec()).map_err(|_| Failure::Socket(io::Error::other("NUL in a name")))
}

fn read(a: &Args, conn: &mut Conn) -> Result<(), Failure> {
    let options = ReaderOptions {
        zero_granularity: a.granularity,
        no_extents: a.no_extents,
        stream_size: a.stream_size,
        direct: a.direct,
        force_share: a.force_share,
        // The helper reads a volume's own bytes; layered images are read in process.
        top_only: false,
        // Ranged READs of a helper's volume are cut by the engine (the helper reads whole).
        ranges: None,
        pool: None,
    };
    let mut core = if let Some(p) = &a.path {
        ReadCore::open(p, &options).named(a.shown.clone())
    } else if a.fd {
        ReadCore::from_file(File::from(volume_fd()), &options)
    } else if let Some(name) = a.dir_name.clone() {
        ReadCore::at(
            Arc::new(volume_fd()),
            cstring(name)?,
            a.shown.clone(),
            &options,
        )
    } else {
        return Err(conn.report(Error::Unsupported("no volume given".into())));
    };
    let mut credit = 0u64;
    loop {
        // Read ahead only with credit in hand, and take whatever else has arrived.
        while credit == 0 || conn.readable() {
            match conn.recv(None)? {
                Some(Msg::Credit(n)) => credit = credit.saturating_add(n),
                Some(other) => return Err(conn.report(unexpected(&other))),
                None => return Ok(()),
            }
        }
        let p = core.step().map_err(|e| conn.report(e))?;
        if let Some(size) = p.size {
            conn.send(&Msg::Size(size))?;
        }
        for chunk in p.chunks {
            if let Chunk::Data { bytes, .. } = &chunk {
                let len = bytes.len() as u64;
                while credit < len {
                    match conn.recv(None)? {
                        Some(Msg::Credit(n)) => credit = credit.saturating_add(n),
                        Some(other) => return Err(conn.report(unexpected(&other))),
                        None => return Ok(()),
                    }
                }
                credit -= len;
            }
            conn.send(&Msg::from_chunk(chunk))?;
        }
        if p.end {
            return Ok(());
        }
    }
}

fn unexpected(m: &Msg) -> Error {
    Error::Helper(format!("iohelper got an unexpected message {m:?}"))
}

fn write(a: &Args, conn: &mut Conn) -> Result<(), Failure> {
    let options = WriterOptions {
        allocated: a.allocated,
        destination_is_zero: a.destination_is_zero,
        overwrite: a.overwrite,
        no_sync: a.no_sync,
        direct: a.direct,
        verify: a.verify,
        pool: None,
        // The CLI refuses --range with --iohelper: a helper writes whole volumes.
        ranges: None,
    };
    let target = if let Some(p) = &a.path {
        WriteTarget::in_place(p).named(a.shown.clone())
    } else if a.fd {
        WriteTarget::from_file(File::from(volume_fd()))
    } else if let Some(name) = a.create.clone() {
        WriteTarget::create_at(Arc::new(volume_fd()), cstring(name)?, a.shown.clone())
    } else if let Some(name) = a.in_dir.clone() {
        let dir = volume_fd();
        let name = cstring(name)?;
        // SAFETY: valid dir fd and NUL-terminated name; returns a new fd or -1.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(conn.report(Error::io(format!("opening {}", a.shown), e)));
        }
        // SAFETY: a fresh fd owned by nobody else.
        WriteTarget::from_file(unsafe { File::from_raw_fd(fd) })
    } else {
        return Err(conn.report(Error::Unsupported("no volume given".into())));
    };
    let mut core = WriteCore::new(target, a.size, options);
    if let Some(temp) = a.temp.clone() {
        core = core.with_temp_name(cstring(temp)?);
    }
    if let Err(e) = core.open() {
        core.discard();
        return Err(conn.report(e));
    }
    if let Some(temp) = core.temp_name() {
        conn.send(&Msg::Temp(temp.as_bytes().to_vec()))?;
    }
    conn.send(&Msg::Ready)?;
    let align = core.direct_align();
    let mut queue: VecDeque<Chunk> = VecDeque::new();
    let mut completed = 0u64;
    loop {
        while queue.is_empty() || (queue.len() < 64 && conn.readable()) {
            let msg = match conn.recv(align) {
                Ok(Some(m)) => m,
                // Hung up (cancelled) or the socket broke: nothing may be committed.
                Ok(None) => {
                    core.discard();
                    return Ok(());
                }
                Err(e) => {
                    core.discard();
                    return Err(e.into());
                }
            };
            match msg.into_chunk() {
                Ok(c) => queue.push_back(c),
                Err(other) => {
                    core.discard();
                    return Err(conn.report(unexpected(&other)));
                }
            }
        }
        let batch: Vec<Chunk> = fdstream::writer::take_batch(&queue);
        let (done, result) = core.handle_batch(&batch);
        queue.drain(..done);
        completed += done as u64;
        conn.send(&Msg::Progress(completed))?;
        match result {
            Ok(true) => {
                conn.send(&Msg::Done)?;
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => {
                core.discard();
                return Err(conn.report(e));
            }
        }
    }
}
