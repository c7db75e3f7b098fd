//! The NBD export server: a pool's volumes for any NBD client (qemu-img, nbdcopy, nbdinfo,
//! the kernel's nbd-client), with structured replies and `base:allocation`.
//!
//! One mio loop thread owns the listener and every client socket and drives the nbd crate's
//! sans-IO [`nbd::ServerHandshake`] and [`nbd::Server`]; opening volumes, reads, writes, block
//! status and flushes run on the fdstream worker pool ([`volume`]), which hands answers back
//! through a waker. A client that breaks the protocol loses its connection, with the reason
//! logged; nobody else notices.
//!
//! Limits: [`conn::MAX_IN_FLIGHT`] requests and [`conn::MAX_IN_FLIGHT_BYTES`] of payload per
//! client on the workers, one maximal request buffered, a handshake time limit and a limit on
//! how long a half-sent request or an unread reply may wait.

mod conn;
pub mod volume;

pub use conn::Admission;
pub use volume::{Exports, Failure, Outcome, Piece};

use nbd::{ExportInfo, LookupError, Request};

use crate::pool::Pool;
use conn::{Conn, Key, Next, Stream, Wake};
use engine::event_loop::peer::{glob_match, unix_peer};
use engine::{Address, PeerIdentity, UnixPeerPolicy};
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Answers one request, once, from any thread.
pub type Reply = Box<dyn FnOnce(Result<Outcome, Failure>) + Send>;

/// What an export server offers: the pool's files ([`Exports`]), or volumes of a remote
/// server (`crate::attach`). Called on the worker pool, so it may block.
pub trait Catalog: Send + Sync {
    /// Whether any client may write (a read-only client is still told it cannot).
    fn writable(&self) -> bool;
    /// The names a client may ask for.
    fn names(&self) -> io::Result<Vec<String>>;
    /// Opens `name` for a client, for writing if it `may_write` and the catalog is writable.
    /// The reply says only what a client may know.
    fn open(&self, name: &str, may_write: bool) -> Result<Arc<dyn Disk>, LookupError>;
}

/// One opened export.
pub trait Disk: Send + Sync {
    fn info(&self) -> ExportInfo;
    /// Carries out one request the codec already checked against [`Disk::info`]. Runs on a
    /// worker: it may block, or hand `reply` to whoever finishes the work (a remote read).
    fn run(&self, request: &Request, reply: Reply);
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// How the export server treats its clients.
#[derive(Clone)]
pub struct ExportConfig {
    /// Clients connected at once; more are closed on arrival.
    pub max_connections: usize,
    /// Time for the handshake, and for a half-sent request or an unread reply to move.
    pub timeout: Duration,
    /// Workers for the disk I/O (the process-wide pool by default).
    pub pool: Option<Arc<Pool>>,
    /// Unix-socket clients admitted by their credentials (SO_PEERCRED), as for our own
    /// protocol; open by default. A TCP listener with a policy refuses every client, since
    /// a TCP peer proves no uid.
    pub unix_peers: UnixPeerPolicy,
    /// Globs on the client's identity (`uid=N,gid=N,pid=N` on a Unix socket) that may write
    /// a writable export; empty lets every admitted client write.
    pub writers: Vec<String>,
}

impl ExportConfig {
    /// What this export's policy decides about a client proving `identity`.
    pub fn admit(&self, identity: &PeerIdentity) -> Admission {
        if let Some(why) = self.unix_peers.refusal(identity) {
            return Admission::Refused(why);
        }
        let shown = identity.to_string();
        if self.writers.is_empty() || self.writers.iter().any(|p| glob_match(p, &shown)) {
            Admission::ReadWrite
        } else {
            Admission::ReadOnly
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            max_connections: 256,
            timeout: Duration::from_secs(60),
            pool: None,
            unix_peers: UnixPeerPolicy::default(),
            writers: Vec::new(),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// Stops a running [`ExportServer`] from any thread.
#[derive(Clone)]
pub struct ExportHandle(Arc<Wake>);

impl ExportHandle {
    pub fn shutdown(&self) {
        self.0.shutdown.store(true, Ordering::SeqCst);
        let _ = self.0.waker.wake();
    }

    /// NBD clients connected now.
    pub fn clients(&self) -> usize {
        self.0.clients.load(Ordering::SeqCst)
    }
}

pub struct ExportServer {
    poll: Poll,
    listener: Listener,
    conns: Slab<(u64, Conn)>,
    generation: u64,
    exports: Arc<dyn Catalog>,
    wake: Arc<Wake>,
    pool: Arc<Pool>,
    config: ExportConfig,
    scratch: Vec<u8>,
    accepted: u64,
}

impl ExportServer {
    /// Listens on `unix:PATH` or `tcp:HOST:PORT` (a TLS address is refused: this export
    /// speaks plain NBD).
    pub fn bind(
        addr: &Address,
        exports: impl Catalog + 'static,
        config: ExportConfig,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listener = match addr {
            Address::Unix(path) => {
                let l = UnixListener::bind(path)?;
                // As our own listener: only this user without a peer policy; with one, anyone
                // may connect and the policy refuses them by their credentials.
                let mode = if config.unix_peers.is_open() {
                    0o600
                } else {
                    0o666
                };
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                Listener::Unix(l, path.clone())
            }
            Address::Tcp(sock) => Listener::Tcp(TcpListener::bind(*sock)?),
            Address::Tls { .. } => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the NBD export has no TLS: use unix:PATH or tcp:HOST:PORT",
                ))
            }
        };
        match &mut listener {
            Listener::Unix(l, _) => poll.registry().register(l, LISTENER, Interest::READABLE)?,
            Listener::Tcp(l) => poll.registry().register(l, LISTENER, Interest::READABLE)?,
        }
        let wake = Arc::new(Wake {
            ready: Mutex::new(Vec::new()),
            waker: Waker::new(poll.registry(), WAKER)?,
            shutdown: Default::default(),
            clients: Default::default(),
        });
        Ok(ExportServer {
            poll,
            listener,
            conns: Slab::new(),
            generation: 0,
            exports: Arc::new(exports),
            wake,
            pool: config.pool.clone().unwrap_or_else(Pool::shared),
            config,
            scratch: vec![0; 256 << 10],
            accepted: 0,
        })
    }

    /// Where clients connect, as an NBD URI prefix (`nbd://127.0.0.1:10809` or
    /// `nbd+unix:///?socket=PATH` without the export name).
    pub fn local_addr(&self) -> String {
        match &self.listener {
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }

    pub fn handle(&self) -> ExportHandle {
        ExportHandle(Arc::clone(&self.wake))
    }

    /// Serves until [`ExportHandle::shutdown`].
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !self.wake.shutdown.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = self
                .conns
                .iter()
                .filter_map(|(_, (_, c))| c.deadline())
                .min()
                .map(|d| d.saturating_duration_since(now));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => {}
                    Token(t) => self.drive(t - FIRST_CONN, None, now),
                }
            }
            let ready = std::mem::take(&mut *self.wake.ready.lock().unwrap());
            for key in ready {
                self.drive(key.slot, Some(key.generation), now);
            }
            let late: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, (_, c))| c.deadline().is_some_and(|d| d <= now))
                .map(|(slot, _)| slot)
                .collect();
            for slot in late {
                let peer = self.conns[slot].1.peer.clone();
                self.close(
                    slot,
                    Some(format!(
                        "no progress for {}s: dropped",
                        self.config.timeout.as_secs()
                    )),
                );
                log::debug!("{peer}: timed out");
            }
        }
        log::info!("NBD export on {} shutting down", self.local_addr());
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            self.close(slot, None);
        }
        Ok(())
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let accepted = match &self.listener {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| (Stream::Unix(s), None)),
                Listener::Tcp(l) => l.accept().map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (Stream::Tcp(s), Some(a))
                }),
            };
            let (mut stream, addr): (Stream, Option<std::net::SocketAddr>) = match accepted {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the client waits in the backlog for a later try.
                    log::warn!("NBD export: accept failed: {e}");
                    return;
                }
            };
            self.accepted += 1;
            let identity = match (&stream, addr) {
                (Stream::Unix(s), _) => unix_peer(std::os::fd::AsRawFd::as_raw_fd(s)),
                (_, Some(a)) => PeerIdentity::Address(a),
                _ => PeerIdentity::Unknown,
            };
            let peer = match addr {
                Some(a) => format!("NBD client {a}"),
                None => format!("NBD client #{} (unix, {identity})", self.accepted),
            };
            let admission = self.config.admit(&identity);
            match &admission {
                Admission::Refused(why) => log::warn!("{peer}: refused: {why}"),
                Admission::ReadOnly if self.exports.writable() => {
                    log::info!("{peer}: read-only: {identity} may not write")
                }
                _ => {}
            }
            if self.conns.len() >= self.config.max_connections {
                log::warn!(
                    "{peer}: refused, {} clients already connected",
                    self.conns.len()
                );
                continue;
            }
            self.generation += 1;
            let entry = self.conns.vacant_entry();
            let slot = entry.key();
            let token = Token(slot + FIRST_CONN);
            if let Err(e) = self.poll.registry().register(
                stream.source(),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("{peer}: cannot watch its socket: {e}");
                continue;
            }
            log::debug!("{peer}: connected");
            let key = Key {
                slot,
                generation: self.generation,
            };
            let conn = Conn::new(
                stream,
                peer,
                admission,
                key,
                Arc::clone(&self.exports),
                Arc::clone(&self.wake),
                &self.pool,
                self.config.timeout,
                now,
            );
            entry.insert((self.generation, conn));
            self.wake.clients.fetch_add(1, Ordering::SeqCst);
            self.drive(slot, Some(self.generation), now);
        }
    }

    fn drive(&mut self, slot: usize, generation: Option<u64>, now: Instant) {
        let Some((g, conn)) = self.conns.get_mut(slot) else {
            return;
        };
        if generation.is_some_and(|want| want != *g) {
            return;
        }
        if let Next::Close(why) = conn.drive(&mut self.scratch, now) {
            self.close(slot, why);
        }
    }

    fn close(&mut self, slot: usize, why: Option<String>) {
        let (_, mut conn) = self.conns.remove(slot);
        self.wake.clients.fetch_sub(1, Ordering::SeqCst);
        match why {
            Some(why) => log::warn!("{}: closing the connection: {why}", conn.peer),
            None => log::debug!("{}: disconnected", conn.peer),
        }
        let _ = self.poll.registry().deregister(conn.stream.source());
        conn.close();
    }
}

impl Drop for ExportServer {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}
