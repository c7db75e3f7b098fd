//! The mio event loop: listeners, connections, and the wake-ups from sources, sinks and other
//! threads, all on one thread that never blocks except in `Poll::poll`.
//!
//! Two ways to run it:
//! - [`Engine::spawn`] runs the loop on its own thread; drive it through the cloneable, `Send`
//!   [`EngineHandle`];
//! - embed it in a host loop: watch [`Engine::as_raw_fd`] for readability and call
//!   [`Engine::turn`] with a zero timeout when it fires (and at [`Engine::next_deadline`]).

mod driver;
mod handle;
pub mod peer;
mod provider;
mod report;
pub mod snapshot;
pub mod socket;
pub mod tls;
mod token;
mod transport;

pub use driver::{Endpoint, OnDone, Transfer, INTERACTIVE_TRANSMIT_TARGET, TRANSMIT_TARGET};
pub use handle::EngineHandle;
pub(crate) use handle::Shared;
pub use peer::{CertIdentity, PeerIdentity, UnixPeerPolicy};
pub use provider::{OpenRequest, Provider};
pub use report::{Origin, TransferError, TransferReport};
pub use snapshot::{ConnectionSnapshot, EngineSnapshot, StreamSnapshot};
pub use socket::Address;
pub use tls::{AllowList, Credentials, TlsConfig, TlsError};
use transport::Transport;

use crate::proto::{Config, ConnStats, Connection, Reason, ReasonCounts, Side, StreamStats};
use driver::Driver;
use mio::{Events, Poll, Waker};
use slab::Slab;
use socket::Listener;
pub use socket::Socket;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use token::Source;

/// Names a connection of an engine. Carries a generation so a stale id never reaches the
/// connection that later reused its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    slot: u32,
    generation: u32,
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.slot, self.generation)
    }
}

/// Names a listener of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(usize);

/// Engine-wide counters: what an operator watches to see that hostile or stuck peers do not
/// make the engine grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub connections: usize,
    /// Bytes held for peers over all connections (see [`EngineStats::max_send_queued`]).
    pub send_queued: u64,
    /// The most bytes any one connection holds for its peer: transmit queue, control backlog
    /// and stream send queues. Bounded by `TRANSMIT_TARGET`, `control_backlog` and each open
    /// stream's `send_buffer` (plus a frame or chunk of slack each), whatever the peer does.
    pub max_send_queued: u64,
    /// Credit-bearing bytes received and not yet consumed by sinks, over all connections.
    pub recv_buffered: u64,
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Protocol limits for every connection.
    pub connection: Config,
    /// Connections accepted at once; more are closed on arrival, before any Hello. Each costs
    /// memory bounded by `connection` (see its `Default`), so this bounds the engine's.
    pub max_connections: usize,
    /// Certificates for `tls:` listeners and connections; without it they are refused.
    pub tls: Option<TlsConfig>,
    /// Who may connect to Unix listeners (checked with SO_PEERCRED). Open by default, and then
    /// the socket file is created mode 0600 (the server's user only); with a policy it is
    /// 0666 and the policy decides.
    pub unix_peers: UnixPeerPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            connection: Config::default(),
            max_connections: 256,
            tls: None,
            unix_peers: UnixPeerPolicy::default(),
        }
    }
}

/// What an engine knows about one of its connections.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: String,
    pub identity: PeerIdentity,
    /// The TLS version and cipher suite, once negotiated; `None` on a plain connection.
    pub tls: Option<String>,
}

/// The event loop and everything it owns.
pub struct Engine {
    poll: Poll,
    events: Events,
    shared: Arc<Shared>,
    config: EngineConfig,
    listeners: Slab<(Listener, Arc<dyn Provider>, Security)>,
    conns: Slab<Driver>,
    generation: u32,
    shutdown: bool,
    /// Why recently dropped connections ended, for transfers submitted after the fact.
    graveyard: std::collections::VecDeque<(ConnectionId, Reason, String)>,
    /// Counters of the connections dropped so far, and how many ended for each reason.
    ended: ConnStats,
    ended_connections: ReasonCounts,
}

/// Whether a connection runs TLS, and as which side.
#[derive(Clone)]
enum Security {
    Plain,
    TlsServer(Arc<rustls::ServerConfig>),
    /// The client checks the server's certificate against `name`.
    TlsClient(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
}

/// How many dropped connections' reasons are remembered.
const GRAVEYARD: usize = 256;

impl Engine {
    pub fn new(config: EngineConfig) -> io::Result<Engine> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), Source::Waker.token())?;
        Ok(Engine {
            poll,
            events: Events::with_capacity(1024),
            shared: Arc::new(Shared::new(waker)),
            config,
            listeners: Slab::new(),
            conns: Slab::new(),
            generation: 0,
            shutdown: false,
            graveyard: Default::default(),
            ended: ConnStats::default(),
            ended_connections: ReasonCounts::default(),
        })
    }

    /// Runs an engine on a new thread until [`EngineHandle::shutdown`].
    pub fn spawn(config: EngineConfig) -> io::Result<(EngineHandle, thread::JoinHandle<()>)> {
        let mut engine = Engine::new(config)?;
        let handle = engine.handle();
        let thread = thread::Builder::new()
            .name("volstream-loop".into())
            .spawn(move || {
                while !engine.is_shut_down() {
                    if let Err(e) = engine.turn(None) {
                        log::error!("event loop failed: {e}");
                        break;
                    }
                }
            })?;
        Ok((handle, thread))
    }

    /// A handle for other threads.
    pub fn handle(&self) -> EngineHandle {
        EngineHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    pub fn is_shut_down(&self) -> bool {
        self.shutdown && self.conns.is_empty()
    }

    /// Starts listening; streams opened by peers are resolved by `provider`.
    pub fn listen(
        &mut self,
        addr: &Address,
        provider: Arc<dyn Provider>,
    ) -> io::Result<(ListenerId, Address)> {
        let security = match addr {
            Address::Tls { .. } => {
                let config = self.config.tls.as_ref().and_then(|t| t.server.clone());
                Security::TlsServer(config.ok_or_else(|| {
                    io::Error::other("a tls: listener needs a TLS certificate, key and CA")
                })?)
            }
            _ => Security::Plain,
        };
        let mode = if self.config.unix_peers.is_open() {
            0o600
        } else {
            0o666
        };
        let mut listener = Listener::bind(addr, mode)?;
        let mut bound = listener.local_addr()?;
        if let (Address::Tls { name, .. }, Address::Tcp(a)) = (addr, &bound) {
            bound = Address::Tls {
                addr: *a,
                name: name.clone(),
            };
        }
        let entry = self.listeners.vacant_entry();
        listener.register(self.poll.registry(), Source::Listener(entry.key()).token())?;
        let id = ListenerId(entry.key());
        entry.insert((listener, provider, security));
        log::info!("listening on {bound}");
        Ok((id, bound))
    }

    /// Connects to a server. The connection is usable at once: transfers submitted before the
    /// handshake completes wait for it.
    pub fn connect(&mut self, addr: &Address) -> io::Result<ConnectionId> {
        let security = self.client_security(addr)?;
        let socket = Socket::connect(addr)?;
        self.add_client(socket, addr.to_string(), security)
    }

    /// Runs the client side of the protocol over a plain socket connected elsewhere (see
    /// [`Socket::connect_blocking`]).
    pub fn attach(&mut self, socket: Socket, peer: String) -> io::Result<ConnectionId> {
        self.add_client(socket, peer, Security::Plain)
    }

    /// Like [`Engine::attach`], with TLS when `addr` is a `tls:` address.
    pub fn attach_to(&mut self, socket: Socket, addr: &Address) -> io::Result<ConnectionId> {
        let security = self.client_security(addr)?;
        self.add_client(socket, addr.to_string(), security)
    }

    fn client_security(&self, addr: &Address) -> io::Result<Security> {
        let Address::Tls { name, .. } = addr else {
            return Ok(Security::Plain);
        };
        let config = self.config.tls.as_ref().ok_or_else(|| {
            io::Error::other("a tls: address needs a TLS configuration (at least the CA)")
        })?;
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?}: {e}")))?;
        Ok(Security::TlsClient(Arc::clone(&config.client), name))
    }

    fn add_client(
        &mut self,
        socket: Socket,
        peer: String,
        security: Security,
    ) -> io::Result<ConnectionId> {
        let transport = transport(socket, &security)?;
        self.add_connection(
            transport,
            Side::Client,
            None,
            peer,
            PeerIdentity::Unknown,
            None,
        )
    }

    fn add_connection(
        &mut self,
        mut transport: Transport,
        side: Side,
        provider: Option<Arc<dyn Provider>>,
        peer: String,
        identity: PeerIdentity,
        refusal: Option<String>,
    ) -> io::Result<ConnectionId> {
        self.generation = self.generation.wrapping_add(1) & token::GENERATION_MASK;
        let entry = self.conns.vacant_entry();
        let id = ConnectionId {
            slot: entry.key() as u32,
            generation: self.generation,
        };
        transport.socket.tune();
        transport
            .socket
            .register(self.poll.registry(), Source::Connection(id).token())?;
        let conn = Connection::new(side, self.config.connection.clone(), Instant::now());
        entry.insert(Driver::new(
            id,
            transport,
            conn,
            provider,
            Arc::clone(&self.shared),
            peer,
            identity,
            refusal,
        ));
        Ok(id)
    }

    fn driver(&mut self, id: ConnectionId) -> Option<&mut Driver> {
        self.conns.get_mut(id.slot as usize).filter(|d| d.id == id)
    }

    /// Starts a transfer on a connection; `transfer.on_done` is called when it ends, also when
    /// the connection is unknown or gone.
    pub fn submit(&mut self, conn: ConnectionId, transfer: Transfer) {
        let now = Instant::now();
        match self.driver(conn) {
            Some(driver) => {
                driver.submit(transfer, now);
                driver.flush(now);
            }
            None => {
                let (reason, message) = self
                    .graveyard
                    .iter()
                    .find(|(id, _, _)| *id == conn)
                    .map(|(_, r, m)| (*r, m.clone()))
                    .unwrap_or((Reason::ConnectionLost, "no such connection".into()));
                (transfer.on_done)(TransferReport {
                    name: transfer.name,
                    op: transfer.op,
                    size: 0,
                    stats: StreamStats::default(),
                    elapsed: Duration::ZERO,
                    first_byte: None,
                    result: Err(TransferError {
                        reason,
                        message,
                        origin: Origin::Connection,
                    }),
                })
            }
        }
    }

    /// The peer and transport of a connection, or `None` if it is gone.
    pub fn info(&mut self, conn: ConnectionId) -> Option<ConnectionInfo> {
        self.driver(conn).map(|d| ConnectionInfo {
            peer: d.peer.clone(),
            identity: d.identity.clone(),
            tls: d.transport.tls_summary(),
        })
    }

    /// Connection counters, or `None` if the connection is gone.
    pub fn stats(&mut self, conn: ConnectionId) -> Option<ConnStats> {
        self.driver(conn).map(|d| d.conn.stats())
    }

    /// Counters over all connections.
    pub fn engine_stats(&self) -> EngineStats {
        let mut stats = EngineStats {
            connections: self.conns.len(),
            ..EngineStats::default()
        };
        for (_, d) in self.conns.iter() {
            let queued = d.send_queued();
            stats.send_queued += queued;
            stats.max_send_queued = stats.max_send_queued.max(queued);
            stats.recv_buffered += d.conn.stats().recv_buffered;
        }
        stats
    }

    /// Every connection and stream with its counters and gauges, and the counters of the
    /// connections that have ended.
    pub fn snapshot(&self) -> EngineSnapshot {
        let now = Instant::now();
        EngineSnapshot {
            connections: self.conns.iter().map(|(_, d)| d.snapshot(now)).collect(),
            ended: self.ended,
            ended_connections: self.ended_connections,
        }
    }

    /// Sends GOAWAY: no new streams; the connection closes when its streams are done.
    pub fn go_away(&mut self, conn: ConnectionId) {
        let now = Instant::now();
        if let Some(d) = self.driver(conn) {
            d.conn.go_away();
            d.drain_events(now);
            d.flush(now);
        }
    }

    /// Sends a PING unless one is outstanding; its round trip lands in `stats(conn).rtt`.
    /// Keepalive pings only an idle peer, so a busy connection's RTT is measured this way.
    pub fn ping(&mut self, conn: ConnectionId) {
        let now = Instant::now();
        if let Some(d) = self.driver(conn) {
            d.conn.ping(now);
            d.flush(now);
        }
    }

    /// Stops listening and ends every connection; `is_shut_down` turns true when they are gone.
    /// A connection with nothing in flight ends with the graceful GOAWAY (GOING_AWAY); one with
    /// transfers ends with GOAWAY CANCELLED, and they fail so.
    pub fn shutdown(&mut self) {
        self.shutdown = true;
        for (mut listener, _, _) in self.listeners.drain() {
            listener.close(self.poll.registry());
        }
        let now = Instant::now();
        for (_, d) in self.conns.iter_mut() {
            d.shut_down(now);
            d.flush(now);
        }
        self.reap();
    }

    /// The file descriptor a host loop polls for readability (the epoll instance).
    pub fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// When the engine next needs a turn even without I/O (timers).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter_map(|(_, d)| {
                if d.read_pending || d.write_pending {
                    Some(Instant::now())
                } else {
                    d.conn.poll_timeout()
                }
            })
            .min()
    }

    /// One iteration: wait for readiness (at most `timeout`, `None` = until something happens),
    /// then do all the work it allows. Never blocks beyond the wait.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let now = Instant::now();
        let deadline_wait = self
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        let wait = match (timeout, deadline_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let polled = self.poll.poll(&mut events, wait);
        if let Err(e) = polled {
            self.events = events;
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        let now = Instant::now();
        for event in events.iter() {
            match Source::of(event.token()) {
                Some(Source::Waker) | None => {}
                Some(Source::Listener(slot)) => self.accept(slot),
                Some(Source::Connection(id)) => {
                    let Some(d) = self.driver(id) else { continue };
                    if event.is_writable() {
                        d.on_writable();
                    }
                    if event.is_readable() || event.is_read_closed() {
                        d.on_readable(now);
                    }
                    if event.is_error() {
                        d.on_error(now);
                    }
                }
            }
        }
        self.events = events;
        self.run_wakeups(now);
        for (_, d) in self.conns.iter_mut() {
            if d.read_pending {
                d.on_readable(now);
            }
            d.handle_timeout(now);
            d.flush(now);
        }
        self.reap();
        Ok(())
    }

    fn accept(&mut self, slot: usize) {
        loop {
            let Some((listener, provider, security)) = self.listeners.get(slot) else {
                return;
            };
            let provider = Arc::clone(provider);
            let security = security.clone();
            match listener.accept() {
                Ok((socket, peer, identity)) => {
                    if self.conns.len() >= self.config.max_connections {
                        log::warn!(
                            "refusing connection from {peer}: {} connections open",
                            self.conns.len()
                        );
                        continue;
                    }
                    log::debug!("accepted connection from {peer}");
                    let refusal = match identity {
                        PeerIdentity::Unix { .. } => self.config.unix_peers.refusal(&identity),
                        _ => None,
                    };
                    let added = transport(socket, &security).and_then(|t| {
                        self.add_connection(
                            t,
                            Side::Server,
                            Some(provider),
                            peer,
                            identity,
                            refusal,
                        )
                    });
                    if let Err(e) = added {
                        log::warn!("cannot register connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: try again at the next readiness.
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Drops connections that are over.
    fn reap(&mut self) {
        let done: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, d)| d.finished)
            .map(|(slot, _)| slot)
            .collect();
        for slot in done {
            let mut d = self.conns.remove(slot);
            let _ = d.transport.socket.deregister(self.poll.registry());
            let (reason, message) = match d.conn.error() {
                Some(e) => (e.reason(), e.to_string()),
                None => (Reason::GoingAway, "connection closed".to_owned()),
            };
            self.ended.add_counters(&d.conn.stats());
            self.ended_connections.record(reason);
            if self.graveyard.len() == GRAVEYARD {
                self.graveyard.pop_front();
            }
            self.graveyard.push_back((d.id, reason, message));
            log::debug!("{}: connection dropped", d.peer);
        }
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

/// The transport for a new connection's socket.
fn transport(socket: Socket, security: &Security) -> io::Result<Transport> {
    let tls = match security {
        Security::Plain => return Ok(Transport::plain(socket)),
        Security::TlsServer(config) => {
            rustls::ServerConnection::new(Arc::clone(config)).map(rustls::Connection::from)
        }
        Security::TlsClient(config, name) => {
            rustls::ClientConnection::new(Arc::clone(config), name.clone())
                .map(rustls::Connection::from)
        }
    };
    let tls = tls.map_err(|e| io::Error::other(format!("TLS: {e}")))?;
    Ok(Transport::tls(socket, tls))
}
