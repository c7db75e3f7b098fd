//! A userspace delay line for TCP: every byte that arrives on one side leaves on the other a
//! fixed one-way delay later, optionally no faster than a rate cap, and none is lost. This
//! kernel has no netem; a transfer through this proxy sees the round trip a distant host would
//! give it (twice the delay, plus queueing behind the rate cap).
//!
//! Each accepted connection gets a connection to the target and two lines, one per direction.
//! A line is a reader thread that stamps each chunk with the time it may leave and a writer
//! thread that sleeps until then. The rate cap is one link per direction shared by every
//! connection through the proxy (a multi-connection tool gets no more of the path than a
//! single connection would): a chunk leaves once the link has carried every byte read before
//! it, then the delay later. A reader stops reading while the link's backlog exceeds the
//! queue, and while its line holds `rate x delay + queue` (a receiver that does not read), so
//! memory stays bounded (plus the kernel's socket buffers) and TCP's own flow control pushes
//! back on the sender, as a full router queue would without dropping anything.
//!
//! The proxy's own TCP legs run on loopback, so what limits a transfer is the line, not the
//! kernel's windows: a plain TCP stream moves the rate cap as long as the line's limit covers
//! the delay. Protocols with their own end-to-end credit (volstream's WINDOW, NBD's request
//! budget) see the full round trip, since their credit travels the delayed reverse line.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes a reader takes from the socket at once; also the granularity of the rate cap.
const CHUNK: usize = 64 * 1024;
/// Line limit without a rate cap: the line then moves at most this much per delay.
const UNCAPPED_LIMIT: u64 = 256 << 20;
/// Bytes a capped line may hold beyond `rate x delay`: the queue in front of the link.
pub const DEFAULT_QUEUE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct DelayConfig {
    /// Added to every byte in each direction; the round trip is twice this.
    pub delay: Duration,
    /// Bytes per second per direction, shared by every connection through the proxy; `None`
    /// moves as fast as the threads can.
    pub rate: Option<u64>,
    /// With a rate cap, bytes that may wait for the link beyond those in flight on it.
    pub queue: u64,
}

impl DelayConfig {
    pub fn new(delay: Duration, rate: Option<u64>) -> Self {
        DelayConfig {
            delay,
            rate,
            queue: DEFAULT_QUEUE,
        }
    }

    /// The most one direction of one connection holds in user space.
    pub fn line_limit(&self) -> u64 {
        match self.rate {
            Some(rate) => {
                let in_flight = (rate as f64 * self.delay.as_secs_f64()).ceil() as u64;
                in_flight + self.queue.max(CHUNK as u64)
            }
            None => UNCAPPED_LIMIT,
        }
    }
}

/// Counters over every connection the proxy has carried.
#[derive(Debug, Default)]
pub struct DelayStats {
    pub connections: AtomicU64,
    /// Bytes delivered towards the target and back towards the client.
    pub forwarded_out: AtomicU64,
    pub forwarded_back: AtomicU64,
    /// The most any one line held at once.
    pub peak_line_bytes: AtomicU64,
}

/// A running proxy; dropping it closes the listener and every connection it carries.
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<DelayStats>,
    carried: Arc<Carried>,
    listener: Option<JoinHandle<()>>,
}

/// One direction's rate-capped link: when it has carried every byte read so far.
#[derive(Debug)]
struct Link {
    free_at: Mutex<Instant>,
}

/// The connections being carried (so that dropping the proxy can close them) and their threads.
#[derive(Default)]
struct Carried {
    sockets: Mutex<HashMap<u64, [TcpStream; 2]>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Shared by a connection's four threads; the last one out forgets the connection's sockets.
struct Registration {
    id: u64,
    carried: Arc<Carried>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.carried.sockets.lock().unwrap().remove(&self.id);
    }
}

impl DelayProxy {
    /// Listens on `listen` (port 0 picks one) and forwards each connection to `target`.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        config: DelayConfig,
    ) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DelayStats::default());
        let carried = Arc::new(Carried::default());
        let now = Instant::now();
        let links = Arc::new([now, now].map(|t| Link {
            free_at: Mutex::new(t),
        }));
        let accept = {
            let (stop, stats, carried) = (stop.clone(), stats.clone(), carried.clone());
            let links = links.clone();
            std::thread::Builder::new()
                .name("delay-accept".into())
                .spawn(move || {
                    for (id, client) in (0u64..).zip(listener.incoming()) {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let client = match client {
                            Ok(c) => c,
                            Err(e) => {
                                log::warn!("delay proxy: accept: {e}");
                                continue;
                            }
                        };
                        let registration = Registration {
                            id,
                            carried: carried.clone(),
                        };
                        match carry(client, target, config, &stats, &links, registration) {
                            Ok(handles) => {
                                let mut threads = carried.threads.lock().unwrap();
                                threads.retain(|t| !t.is_finished());
                                threads.extend(handles);
                            }
                            Err(e) => log::warn!("delay proxy: connecting to {target}: {e}"),
                        }
                    }
                })?
        };
        Ok(DelayProxy {
            addr,
            stop,
            stats,
            carried,
            listener: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &DelayStats {
        &self.stats
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The accept thread blocks in accept(); one more connection wakes it to see the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        for pair in self.carried.sockets.lock().unwrap().values() {
            for s in pair {
                // Wakes threads blocked in read() or write() on either leg.
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let threads = std::mem::take(&mut *self.carried.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Connects `client` to `target` through two delay lines; returns their four threads.
fn carry(
    client: TcpStream,
    target: SocketAddr,
    config: DelayConfig,
    stats: &Arc<DelayStats>,
    links: &Arc<[Link; 2]>,
    registration: Registration,
) -> io::Result<Vec<JoinHandle<()>>> {
    let server = TcpStream::connect(target)?;
    // The line decides when bytes leave; Nagle on our side would add a loopback round trip.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    stats.connections.fetch_add(1, Ordering::Relaxed);
    registration
        .carried
        .sockets
        .lock()
        .unwrap()
        .insert(registration.id, [client.try_clone()?, server.try_clone()?]);
    let registration = Arc::new(registration);
    let mut handles = spawn_line(
        client.try_clone()?,
        server.try_clone()?,
        config,
        stats,
        (links, 0),
        &registration,
    )?;
    handles.extend(spawn_line(
        server,
        client,
        config,
        stats,
        (links, 1),
        &registration,
    )?);
    Ok(handles)
}

struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct LineState {
    chunks: VecDeque<Chunk>,
    held: u64,
    /// The reader saw EOF or an error: nothing more will come.
    ended: bool,
    /// The writer failed: the reader should stop too.
    broken: bool,
}

struct Line {
    state: Mutex<LineState>,
    changed: Condvar,
    limit: u64,
}

fn spawn_line(
    from: TcpStream,
    to: TcpStream,
    config: DelayConfig,
    stats: &Arc<DelayStats>,
    (links, direction): (&Arc<[Link; 2]>, usize),
    registration: &Arc<Registration>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let outward = direction == 0;
    let line = Arc::new(Line {
        state: Mutex::new(LineState::default()),
        changed: Condvar::new(),
        limit: config.line_limit(),
    });
    let name = if outward { "out" } else { "back" };
    let reader = {
        let (line, stats, from) = (line.clone(), stats.clone(), from.try_clone()?);
        let (registration, links) = (registration.clone(), links.clone());
        std::thread::Builder::new()
            .name(format!("delay-read-{name}"))
            .spawn(move || {
                read_side(&line, &links[direction], from, config, &stats);
                drop(registration);
            })?
    };
    let writer = {
        let stats = stats.clone();
        let registration = registration.clone();
        std::thread::Builder::new()
            .name(format!("delay-write-{name}"))
            .spawn(move || {
                write_side(&line, from, to, &stats, outward);
                drop(registration);
            })?
    };
    Ok(vec![reader, writer])
}

fn read_side(
    line: &Line,
    link: &Link,
    mut from: TcpStream,
    config: DelayConfig,
    stats: &DelayStats,
) {
    let queue_time = config
        .rate
        .map(|rate| Duration::from_secs_f64(config.queue as f64 / rate as f64));
    loop {
        let room = {
            let mut s = line.state.lock().unwrap();
            while s.held >= line.limit && !s.broken {
                s = line.changed.wait(s).unwrap();
            }
            if s.broken {
                break;
            }
            (line.limit - s.held).min(CHUNK as u64) as usize
        };
        if let Some(queue_time) = queue_time {
            // The link's queue is full: wait for it rather than let every connection's reader
            // pile more onto it.
            loop {
                let backlog = link
                    .free_at
                    .lock()
                    .unwrap()
                    .saturating_duration_since(Instant::now());
                if backlog <= queue_time {
                    break;
                }
                std::thread::sleep(backlog - queue_time);
            }
        }
        let mut bytes = vec![0u8; room];
        let n = match from.read(&mut bytes) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        bytes.truncate(n);
        if n < room / 2 {
            // Small reads (a ping, a request) should not hold a whole chunk's memory.
            bytes.shrink_to_fit();
        }
        let now = Instant::now();
        let leaves_link = match config.rate {
            Some(rate) => {
                let mut free_at = link.free_at.lock().unwrap();
                *free_at = (*free_at).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
                *free_at
            }
            None => now,
        };
        let mut s = line.state.lock().unwrap();
        s.held += n as u64;
        stats.peak_line_bytes.fetch_max(s.held, Ordering::Relaxed);
        s.chunks.push_back(Chunk {
            due: leaves_link + config.delay,
            bytes,
        });
        line.changed.notify_all();
    }
    line.state.lock().unwrap().ended = true;
    line.changed.notify_all();
}

fn write_side(line: &Line, from: TcpStream, mut to: TcpStream, stats: &DelayStats, outward: bool) {
    let counter = if outward {
        &stats.forwarded_out
    } else {
        &stats.forwarded_back
    };
    loop {
        let chunk = {
            let mut s = line.state.lock().unwrap();
            loop {
                if let Some(c) = s.chunks.front() {
                    let now = Instant::now();
                    if c.due <= now {
                        break s.chunks.pop_front();
                    }
                    let wait = c.due - now;
                    s = line.changed.wait_timeout(s, wait).unwrap().0;
                } else if s.ended {
                    break None;
                } else {
                    s = line.changed.wait(s).unwrap();
                }
            }
        };
        let Some(chunk) = chunk else {
            // Everything read has been delivered: pass the half-close on.
            let _ = to.shutdown(Shutdown::Write);
            return;
        };
        let ok = to.write_all(&chunk.bytes).is_ok();
        let mut s = line.state.lock().unwrap();
        s.held -= chunk.bytes.len() as u64;
        if ok {
            counter.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        } else {
            s.broken = true;
        }
        line.changed.notify_all();
        drop(s);
        if !ok {
            // The far side is gone: stop the reader and tell the near side.
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
}
