//! Driving the loop from other threads: [`EngineHandle`] queues a [`Command`] and wakes the
//! loop, which runs the queued commands, then the streams that sources and sinks woke, at its
//! next turn (`Engine::run_wakeups`).

use super::driver::{Endpoint, Transfer, WakeKey};
use super::{
    Address, ConnectionId, ConnectionInfo, Engine, EngineSnapshot, EngineStats, ListenerId,
    Provider, Socket, TransferReport,
};
use crate::proto::{ConnStats, Op, OpenOptions};
use crate::volume::{VolumeReader, VolumeWriter};
use mio::Waker;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(super) enum Command {
    Connect {
        addr: Address,
        reply: mpsc::Sender<io::Result<ConnectionId>>,
    },
    Attach {
        socket: Socket,
        addr: Address,
        reply: mpsc::Sender<io::Result<ConnectionId>>,
    },
    Info {
        conn: ConnectionId,
        reply: mpsc::Sender<Option<ConnectionInfo>>,
    },
    Listen {
        addr: Address,
        provider: Arc<dyn Provider>,
        reply: mpsc::Sender<io::Result<(ListenerId, Address)>>,
    },
    Transfer {
        conn: ConnectionId,
        transfer: Transfer,
    },
    Stats {
        conn: ConnectionId,
        reply: mpsc::Sender<Option<ConnStats>>,
    },
    EngineStats {
        reply: mpsc::Sender<EngineStats>,
    },
    Snapshot {
        reply: mpsc::Sender<EngineSnapshot>,
    },
    GoAway {
        conn: ConnectionId,
    },
    Ping {
        conn: ConnectionId,
    },
    Shutdown,
}

/// State shared between the loop and other threads: the waker, and what woke it.
pub(crate) struct Shared {
    waker: Waker,
    queue: Mutex<Wakeups>,
    /// `queue` holds something: lets a long write burst end early so the turn can serve it.
    pending: AtomicBool,
}

#[derive(Default)]
pub(super) struct Wakeups {
    commands: Vec<Command>,
    streams: Vec<WakeKey>,
}

impl Shared {
    pub(super) fn new(waker: Waker) -> Shared {
        Shared {
            waker,
            queue: Mutex::default(),
            pending: AtomicBool::new(false),
        }
    }

    pub(super) fn wake(&self, key: WakeKey) {
        let first = {
            let mut q = self.queue.lock().unwrap();
            q.streams.push(key);
            self.pending.store(true, Ordering::Release);
            q.streams.len() == 1 && q.commands.is_empty()
        };
        if first {
            let _ = self.waker.wake();
        }
    }

    fn command(&self, command: Command) {
        self.queue.lock().unwrap().commands.push(command);
        self.pending.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Whether wake-ups or commands wait for the next turn.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    fn take(&self) -> Wakeups {
        let mut q = self.queue.lock().unwrap();
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    }
}

/// Drives an engine from other threads. Cloneable and `Send`. Methods that answer block the
/// calling thread until the loop replies: do not call them from the loop's own thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) shared: Arc<Shared>,
}

/// The loop is gone.
fn loop_gone() -> io::Error {
    io::Error::other("volstream event loop is not running")
}

impl EngineHandle {
    pub fn connect(&self, addr: &Address) -> io::Result<ConnectionId> {
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::Connect {
            addr: addr.clone(),
            reply,
        });
        rx.recv().map_err(|_| loop_gone())?
    }

    /// Connects on the calling thread (at most `timeout`), then hands the socket to the loop.
    pub fn connect_blocking(&self, addr: &Address, timeout: Duration) -> io::Result<ConnectionId> {
        let socket = Socket::connect_blocking(addr, timeout)?;
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::Attach {
            socket,
            addr: addr.clone(),
            reply,
        });
        rx.recv().map_err(|_| loop_gone())?
    }

    pub fn listen(
        &self,
        addr: &Address,
        provider: Arc<dyn Provider>,
    ) -> io::Result<(ListenerId, Address)> {
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::Listen {
            addr: addr.clone(),
            provider,
            reply,
        });
        rx.recv().map_err(|_| loop_gone())?
    }

    /// Starts a transfer; `transfer.on_done` runs on the loop thread when it ends.
    pub fn submit(&self, conn: ConnectionId, transfer: Transfer) {
        self.shared.command(Command::Transfer { conn, transfer });
    }

    /// Downloads `name` into `writer`; returns a receiver for the report.
    pub fn download(
        &self,
        conn: ConnectionId,
        name: &str,
        options: OpenOptions,
        writer: Box<dyn VolumeWriter>,
    ) -> mpsc::Receiver<TransferReport> {
        self.start(conn, Op::Read, name, options, Endpoint::Writer(writer))
    }

    /// Uploads the content of `reader` as `name`; returns a receiver for the report.
    pub fn upload(
        &self,
        conn: ConnectionId,
        name: &str,
        options: OpenOptions,
        reader: Box<dyn VolumeReader>,
    ) -> mpsc::Receiver<TransferReport> {
        self.start(conn, Op::Write, name, options, Endpoint::Reader(reader))
    }

    /// Fetches a document the peer generates (`Op::List`, `Op::Extents`) into `writer`.
    pub fn fetch(
        &self,
        conn: ConnectionId,
        op: Op,
        name: &str,
        writer: Box<dyn VolumeWriter>,
    ) -> mpsc::Receiver<TransferReport> {
        self.start(
            conn,
            op,
            name,
            OpenOptions::default(),
            Endpoint::Writer(writer),
        )
    }

    /// As [`EngineHandle::fetch`], with OPEN options (a DIGESTS of a partial upload).
    pub fn fetch_with(
        &self,
        conn: ConnectionId,
        op: Op,
        name: &str,
        options: OpenOptions,
        writer: Box<dyn VolumeWriter>,
    ) -> mpsc::Receiver<TransferReport> {
        self.start(conn, op, name, options, Endpoint::Writer(writer))
    }

    fn start(
        &self,
        conn: ConnectionId,
        op: Op,
        name: &str,
        options: OpenOptions,
        endpoint: Endpoint,
    ) -> mpsc::Receiver<TransferReport> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            conn,
            Transfer {
                op,
                name: name.to_owned(),
                options,
                ranges: None,
                endpoint,
                on_done: Box::new(move |report| {
                    let _ = tx.send(report);
                }),
            },
        );
        rx
    }

    /// The peer and transport of a connection (`None` once it is gone).
    pub fn info(&self, conn: ConnectionId) -> io::Result<Option<ConnectionInfo>> {
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::Info { conn, reply });
        rx.recv().map_err(|_| loop_gone())
    }

    pub fn stats(&self, conn: ConnectionId) -> io::Result<Option<ConnStats>> {
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::Stats { conn, reply });
        rx.recv().map_err(|_| loop_gone())
    }

    /// Every connection and stream with its counters and gauges (see [`Engine::snapshot`]).
    pub fn snapshot(&self) -> io::Result<EngineSnapshot> {
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::Snapshot { reply });
        rx.recv().map_err(|_| loop_gone())
    }

    /// Counters over all connections of the engine.
    pub fn engine_stats(&self) -> io::Result<EngineStats> {
        let (reply, rx) = mpsc::channel();
        self.shared.command(Command::EngineStats { reply });
        rx.recv().map_err(|_| loop_gone())
    }

    pub fn go_away(&self, conn: ConnectionId) {
        self.shared.command(Command::GoAway { conn });
    }

    /// Sends a PING unless one is outstanding (see [`Engine::ping`]).
    pub fn ping(&self, conn: ConnectionId) {
        self.shared.command(Command::Ping { conn });
    }

    /// Ends every connection and stops the loop thread (see [`Engine::shutdown`]).
    pub fn shutdown(&self) {
        self.shared.command(Command::Shutdown);
    }
}

impl Engine {
    pub(super) fn run_wakeups(&mut self, now: Instant) {
        // Commands may wake streams and streams may not issue commands, so one pass of each.
        let Wakeups { commands, streams } = self.shared.take();
        for command in commands {
            self.run_command(command);
        }
        for key in streams {
            if let Some(d) = self.driver(key.conn) {
                d.service(key.local, now);
            }
        }
    }

    fn run_command(&mut self, command: Command) {
        match command {
            Command::Connect { addr, reply } => {
                let _ = reply.send(self.connect(&addr));
            }
            Command::Attach {
                socket,
                addr,
                reply,
            } => {
                let _ = reply.send(self.attach_to(socket, &addr));
            }
            Command::Info { conn, reply } => {
                let _ = reply.send(self.info(conn));
            }
            Command::Listen {
                addr,
                provider,
                reply,
            } => {
                let _ = reply.send(self.listen(&addr, provider));
            }
            Command::Transfer { conn, transfer } => self.submit(conn, transfer),
            Command::Stats { conn, reply } => {
                let _ = reply.send(self.stats(conn));
            }
            Command::EngineStats { reply } => {
                let _ = reply.send(self.engine_stats());
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::GoAway { conn } => self.go_away(conn),
            Command::Ping { conn } => self.ping(conn),
            Command::Shutdown => self.shutdown(),
        }
    }
}
