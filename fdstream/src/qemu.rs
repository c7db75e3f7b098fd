//! qcow2 volumes in a pool, served as their guest-visible content: `qemu-nbd` (Debian's
//! qemu-utils) exports the image read-only on a private Unix socket for as long as one stream
//! needs it. Where the image's clusters lie in its files as they are, the stream follows
//! `qemu-img map` and reads them there ([`crate::qcow2_map`]); otherwise it reads the export
//! like any other ([`crate::nbd`]). qemu knows the format; we only recognise it (the header's
//! magic), check the backing chain first, and follow qemu's map.
//!
//! Why the chain is checked here: qemu opens an image's backing file by the name in its
//! header, and a peer may upload any bytes into a pool. A backing name that leaves the pool
//! (`/etc/shadow`, `../x`) or that qemu would read as a protocol (`json:{...}`, `nbd://`)
//! would let that peer read what the server can; such an image is refused.

use crate::error::Error;
use crate::fd;
use crate::nbd::source::{Source, SourceOptions};
use crate::qcow2_map::Mapped;
use crate::reader::cut::Cut;
use crate::reader::{Produce, Produced, ReadCore, ReaderOptions};
use nbd::{Endpoint, Uri};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// qemu's own limit on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;
/// Layers followed before a chain is called a loop.
const MAX_LAYERS: usize = 32;
/// How long qemu-nbd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What a qcow2 header says, for the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2 {
    /// Guest-visible size.
    pub size: u64,
    /// The backing file's name as written (empty: none).
    pub backing: Vec<u8>,
    /// Guest data lies at its mapped offsets as is: not encrypted (crypt_method 0) and not in
    /// an external data file (incompatible feature bit 2), so a mapped cluster can be read
    /// from this file directly.
    pub plain: bool,
}

/// Reads the qcow2 header of `file`: `None` when it is not a qcow2 image (version 2 or 3).
pub fn qcow2_header(file: &File) -> std::io::Result<Option<Qcow2>> {
    let mut head = [0u8; 80];
    let n = read_at_most(file, &mut head, 0)?;
    if n < 72 || &head[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let be32 = |i: usize| u32::from_be_bytes(head[i..i + 4].try_into().unwrap());
    let be64 = |i: usize| u64::from_be_bytes(head[i..i + 8].try_into().unwrap());
    if !matches!(be32(4), 2 | 3) {
        return Ok(None);
    }
    let (offset, len) = (be64(8), be32(16));
    let mut backing = Vec::new();
    if offset != 0 && len != 0 {
        if len > MAX_BACKING_NAME {
            return Err(std::io::Error::other(format!(
                "qcow2 backing file name of {len} bytes"
            )));
        }
        backing = vec![0; len as usize];
        if read_at_most(file, &mut backing, offset)? != backing.len() {
            return Err(std::io::Error::other(
                "qcow2 backing file name past the end",
            ));
        }
    }
    // Version 2 has no feature bits; version 3's header is at least 104 bytes.
    let incompatible = if be32(4) == 3 && n >= 80 { be64(72) } else { 0 };
    const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    Ok(Some(Qcow2 {
        size: be64(24),
        backing,
        plain: be32(32) == 0 && incompatible & EXTERNAL_DATA_FILE == 0,
    }))
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The number of layers of the chain under `image` (in `pool`), counting the image; see
/// [`chain`].
pub fn chain_layers(pool: &Path, image: &Path, top: &Qcow2, shown: &str) -> Result<u32, Error> {
    Ok(1 + backing_layers(pool, image, top, shown)?.len() as u32)
}

/// One image of a backing chain, open.
pub struct Layer {
    pub file: File,
    /// Its qcow2 header; `None` for a raw file (the bottom of a chain).
    pub qcow2: Option<Qcow2>,
}

/// The layers of the chain under `image` (in `pool`), from its backing file down: each must be
/// a regular file inside the pool, named by a plain path. `shown` names the volume in errors.
pub fn backing_layers(
    pool: &Path,
    image: &Path,
    top: &Qcow2,
    shown: &str,
) -> Result<Vec<Layer>, Error> {
    let refuse = |why: String| Error::Unsupported(format!("{shown}: {why}"));
    let root = pool
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving the pool for {shown}"), e))?;
    let mut layers = Vec::new();
    let (mut dir, mut header) = (image.parent().unwrap_or(pool).to_path_buf(), top.clone());
    while !header.backing.is_empty() {
        if layers.len() + 1 >= MAX_LAYERS {
            return Err(refuse(format!("backing chain longer than {MAX_LAYERS}")));
        }
        let name = String::from_utf8(header.backing.clone())
            .map_err(|_| refuse("backing file name is not UTF-8".into()))?;
        // qemu reads `proto:...` and `json:{...}` as protocols, not files.
        if name.contains(':') {
            return Err(refuse(format!("backing file {name:?} is not a plain path")));
        }
        let path = dir.join(&name);
        let real = path
            .canonicalize()
            .map_err(|e| refuse(format!("backing file {name:?}: {e}")))?;
        if !real.starts_with(&root) {
            return Err(refuse(format!("backing file {name:?} is outside the pool")));
        }
        let file = File::open(&real).map_err(|e| refuse(format!("backing file {name:?}: {e}")))?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(refuse(format!(
                "backing file {name:?} is not a regular file"
            )));
        }
        let below =
            qcow2_header(&file).map_err(|e| refuse(format!("backing file {name:?}: {e}")))?;
        layers.push(Layer {
            file,
            qcow2: below.clone(),
        });
        header = match below {
            Some(h) => h,
            None => break, // raw: the bottom of the chain
        };
        dir = real.parent().unwrap_or(&root).to_path_buf();
    }
    Ok(layers)
}

/// A `qemu-nbd` exporting one image on a private socket (read-only unless it was started for
/// writing); killed, reaped and its directory removed on drop.
pub struct QemuNbd {
    child: Child,
    dir: PathBuf,
    uri: Uri,
}

impl QemuNbd {
    /// Starts qemu-nbd for the qcow2 `image` and waits until it listens. `allocation_depth`
    /// adds `qemu:allocation-depth` (which layer holds a range).
    pub fn start(image: &Path, allocation_depth: bool, shown: &str) -> Result<QemuNbd, Error> {
        QemuNbd::spawn(image, allocation_depth, false, shown)
    }

    /// Starts a writable qemu-nbd for the qcow2 `image`: zeroed ranges may be unmapped rather
    /// than written (`--discard=unmap`), so holes stay unallocated.
    pub fn start_writable(image: &Path, shown: &str) -> Result<QemuNbd, Error> {
        QemuNbd::spawn(image, false, true, shown)
    }

    fn spawn(
        image: &Path,
        allocation_depth: bool,
        writable: bool,
        shown: &str,
    ) -> Result<QemuNbd, Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "volstream-qemu-nbd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Only this user may reach the socket.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let sock = dir.join("s");
        let log = dir.join("log");
        let stderr = File::create(&log).map_err(|e| Error::io("qemu-nbd log", e))?;
        let mut cmd = Command::new("qemu-nbd");
        // --persistent: the map and the reader connect one after the other; --shared: both may.
        cmd.args(["--format=qcow2", "--persistent"])
            .arg(format!("--socket={}", sock.display()));
        if writable {
            cmd.args(["--shared=1", "--discard=unmap"]);
        } else {
            cmd.args(["--read-only", "--shared=4"]);
        }
        if allocation_depth {
            cmd.arg("--allocation-depth");
        }
        cmd.arg("--")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // A server blocks SIGTERM in its threads (a signal thread takes it), and a child
        // inherits the mask: qemu-nbd would never see the SIGTERM that `stop` sends.
        // SAFETY: sigemptyset and pthread_sigmask are async-signal-safe, as pre_exec needs.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let mut none = std::mem::zeroed::<libc::sigset_t>();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::Qemu(format!(
                    "{shown}: cannot run qemu-nbd (qemu-utils) to read the qcow2 image: {e}"
                )));
            }
        };
        let mut q = QemuNbd {
            child,
            dir,
            uri: Uri {
                endpoint: Endpoint::Unix(sock.clone()),
                export: String::new(),
            },
        };
        let started = Instant::now();
        // qemu-nbd listens 30-50 ms after exec, and every download of an image waits for it:
        // poll often at first (a fixed 10 ms cost 5 ms on average), then back off.
        let mut pause = Duration::from_millis(1);
        // The socket exists at bind, before listen: wait for a connection to succeed.
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let why = match q.child.try_wait() {
                Ok(Some(status)) => Some(format!("exited ({status})")),
                _ if started.elapsed() > START_TIMEOUT => Some("never listened".to_string()),
                _ => None,
            };
            if let Some(why) = why {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let said = said.lines().last().unwrap_or("").trim().to_string();
                return Err(Error::Qemu(format!("{shown}: qemu-nbd {why}: {said}")));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        Ok(q)
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Ends qemu-nbd with SIGTERM, on which it closes the image cleanly, and waits for it:
    /// an image written through it is complete only once it has exited with success.
    pub fn stop(mut self, shown: &str) -> Result<(), Error> {
        // SAFETY: kill(2) on our own child, not yet reaped (Drop reaps it).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        // Bounded: a qemu-nbd that does not end fails the volume (Drop kills it) instead of
        // holding the worker.
        let started = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < START_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    return Err(Error::Qemu(format!(
                        "{shown}: qemu-nbd did not close the image within {}s",
                        START_TIMEOUT.as_secs()
                    )))
                }
                Err(e) => return Err(Error::io(format!("{shown}: waiting for qemu-nbd"), e)),
            }
        };
        if status.success() {
            return Ok(());
        }
        let said = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let said = said.lines().last().unwrap_or("").trim().to_string();
        Err(Error::Qemu(format!(
            "{shown}: qemu-nbd ended with {status}: {said}"
        )))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A pool file read as a volume: its bytes, or for a qcow2 image its guest view through
/// qemu-nbd. Which one is decided on the first step (a worker), after opening it as the
/// provider opens files.
pub(crate) struct PoolFile {
    dir: Arc<OwnedFd>,
    name: CString,
    shown: String,
    /// The file's path, which qemu-nbd needs (it resolves backing names against it).
    path: PathBuf,
    pool: PathBuf,
    options: ReaderOptions,
    state: State,
    /// The top file's: a changed backing file is caught only by the content check at the end.
    identity: Option<engine::VolumeIdentity>,
}

enum State {
    Undecided,
    Raw(Box<ReadCore>),
    /// The source is dropped before its server. A ranged read is cut to its ranges (qemu-nbd
    /// is read whole).
    Image {
        source: Box<Cut<Source>>,
        _server: QemuNbd,
    },
    /// Read by its map; a ranged read is cut to its ranges.
    Mapped {
        mapped: Box<Cut<Mapped>>,
        _server: QemuNbd,
    },
    Closed,
}

impl PoolFile {
    pub(crate) fn new(
        dir: Arc<OwnedFd>,
        name: CString,
        shown: String,
        pool: PathBuf,
        options: ReaderOptions,
    ) -> PoolFile {
        let path = pool.join(name.to_str().unwrap_or_default());
        PoolFile {
            dir,
            name,
            shown,
            path,
            pool,
            options,
            state: State::Undecided,
            identity: None,
        }
    }

    fn decide(&mut self) -> Result<State, Error> {
        let file = fd::open_beneath(&self.dir, &self.name, libc::O_RDONLY | libc::O_NONBLOCK)
            .map_err(|e| Error::io(format!("opening {}", self.shown), e))?;
        let meta = file.metadata().ok();
        let is_file = meta.as_ref().is_some_and(|m| m.is_file());
        self.identity = meta.as_ref().and_then(crate::identity::of);
        let header = match is_file {
            true => qcow2_header(&file).map_err(|e| Error::io(self.shown.clone(), e))?,
            false => None,
        };
        let Some(header) = header else {
            return Ok(State::Raw(Box::new(ReadCore::at(
                Arc::clone(&self.dir),
                self.name.clone(),
                self.shown.clone(),
                &self.options,
            ))));
        };
        let below = backing_layers(&self.pool, &self.path, &header, &self.shown)?;
        // --top-only needs qemu:allocation-depth to tell the layers apart.
        let server = QemuNbd::start(&self.path, self.options.top_only, &self.shown)?;
        let plain = |h: &Option<Qcow2>| h.as_ref().is_none_or(|h| h.plain);
        if !self.options.no_extents && header.plain && below.iter().all(|l| plain(&l.qcow2)) {
            let mut files = vec![file];
            files.extend(below.into_iter().map(|l| l.file));
            let mapped = Mapped::new(
                &self.path,
                header.size,
                files,
                server.uri().clone(),
                self.options.top_only,
                self.options.zero_granularity,
                self.shown.clone(),
            );
            log::info!("{}: qcow2, read by its map (qemu-nbd holds it)", self.shown);
            return Ok(State::Mapped {
                mapped: Box::new(Cut::new(mapped, self.options.ranges.clone())),
                _server: server,
            });
        }
        let source = Source::new(
            server.uri().clone(),
            SourceOptions {
                no_extents: self.options.no_extents,
                top_only: self.options.top_only,
                zero_granularity: self.options.zero_granularity,
            },
        )
        .named(self.shown.clone());
        let source = Cut::new(source, self.options.ranges.clone());
        log::info!("{}: qcow2, read through qemu-nbd", self.shown);
        Ok(State::Image {
            source: Box::new(source),
            _server: server,
        })
    }
}

impl Produce for PoolFile {
    /// Raw files seek to the ranges; images are cut to them.
    fn serves_ranges(&self) -> bool {
        self.options.ranges.is_some()
    }

    fn is_open(&self) -> bool {
        match &self.state {
            State::Raw(core) => core.is_open(),
            State::Image { source, .. } => source.is_open(),
            State::Mapped { mapped, .. } => mapped.is_open(),
            State::Undecided | State::Closed => false,
        }
    }

    fn step(&mut self) -> Result<Produced, Error> {
        if matches!(self.state, State::Undecided) {
            self.state = self.decide()?;
        }
        let mut p = match &mut self.state {
            State::Raw(core) => core.step(),
            State::Image { source, .. } => source.step(),
            State::Mapped { mapped, .. } => mapped.step(),
            State::Undecided | State::Closed => Err(Error::Cancelled),
        }?;
        if p.size.is_some() && p.identity.is_none() {
            p.identity = self.identity.clone();
        }
        Ok(p)
    }

    fn close(&mut self) {
        match &mut self.state {
            State::Image { source, .. } => source.close(),
            State::Mapped { mapped, .. } => mapped.close(),
            _ => {}
        }
        self.state = State::Closed;
    }
}
