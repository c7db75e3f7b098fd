//! Copy-on-read downloads (`volstream download --serve-nbd`): a volume is usable as a local
//! NBD disk while it arrives.
//!
//! The destination's partial file is a [`Cache`]: the background download writes into it
//! ([`BackgroundSink`]), the NBD export ([`CorExport`], served by the ordinary export server)
//! reads and writes it, and an [`owners::Owners`] map says whose each byte is:
//!
//! - a READ of bytes that arrived or were written locally is served from the file;
//! - a READ that touches bytes nobody owns yet fetches them at once as one ranged READ stream
//!   (PROTOCOL.md 6.5) opened with PRIORITY, stores what it got (where nobody took it
//!   meanwhile) and is then served from the file;
//! - a WRITE or WRITE_ZEROES goes to the file and makes its bytes local: no arrival, urgent or
//!   background, ever writes over them;
//! - BLOCK_STATUS reports the file's allocation where bytes are owned and the source's
//!   allocation (its EXTENTS, as `attach` keeps it) where they have not arrived, so a client
//!   that skips holes skips only real ones.
//!
//! Every change of the map happens with the write that justifies it, under one lock, so an
//! arrival and a local write of the same bytes are ordered: whichever comes second either
//! yields (an arrival) or wins (a local write). Reads check and store under the lock too, and
//! pread outside it: owned bytes change only by local writes, which NBD lets race with reads.
//!
//! **The urgent class.** An urgent fetch is a stream in the priority class of the server's
//! scheduler (PROTOCOL.md 11, `engine/src/proto/prioritize.rs`): its first frame leaves the
//! server after at most the frame already on the wire (frames shrink to the interactive size
//! while priority streams are active) plus the frames of other urgent fetches ready before it;
//! the background stream keeps at least 1/(priority_weight + 1) of the link. Its credit is its
//! own window, so a background stream that exhausted its window does not hold it back. What is
//! not the scheduler's to promise: the server's read of the bytes, and bytes of the
//! background stream already in the socket buffers ahead of it (bounded by the connection's
//! send buffer); bench/src/bin/cor.rs measures what that costs.
//!
//! At the end ([`verify`]) the bytes that came from the source are checked against the
//! source's block digests (its DIGESTS document): a block that differs must hold a local
//! write, every other block must equal the source's.

pub mod owners;
mod sink;
mod verify;

pub use sink::BackgroundSink;
pub use verify::{verify, Verified};

use crate::attach::{failure, Collect, Map, Once};
use crate::export::volume::Volume;
use crate::export::{Catalog, Disk, Failure, Outcome, Reply};
use crate::fd::{self, Kind};
use crate::punch::Zeroer;
use engine::event_loop::{Endpoint, Transfer};
use engine::proto::{Op, OpenOptions};
use engine::{Chunk, ConnectionId, EngineHandle, Range, RangeSet, TransferReport};
use nbd::wire;
use nbd::{Descriptor, ExportInfo, LookupError, Request};
use owners::{Full, Owners};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// What moved where, for the summary.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes the background stream stored (not those it found owned already).
    pub background_bytes: AtomicU64,
    /// Urgent fetches and the bytes they stored.
    pub urgent_fetches: AtomicU64,
    pub urgent_bytes: AtomicU64,
    /// Bytes written or zeroed through the export.
    pub local_bytes: AtomicU64,
}

struct State {
    owners: Owners,
    /// A write to the partial failed: what the map says of it can no longer be trusted.
    broken: Option<String>,
}

/// An urgent fetch that came back, for the store thread.
struct Fetched {
    cache: Arc<Cache>,
    result: Result<Vec<Chunk>, String>,
    request: Request,
    reply: Once,
}

/// A copy-on-read destination: the partial file, whose bytes are whose, and the connection
/// that fetches what has not arrived.
pub struct Cache {
    file: File,
    size: u64,
    volume: String,
    engine: EngineHandle,
    conn: ConnectionId,
    /// The source's allocation, for the bytes that have not arrived.
    map: Map,
    /// Serves owned bytes (reads, block status, flush) from the partial.
    served: Volume,
    state: Mutex<State>,
    store: mpsc::Sender<Fetched>,
    pub stats: Stats,
}

impl Cache {
    /// `file` is the partial, `size` bytes long (holes where nothing arrived), `volume` the
    /// server's name for the source. Looks the source's allocation up (blocks).
    pub fn new(
        file: File,
        size: u64,
        volume: &str,
        engine: &EngineHandle,
        conn: ConnectionId,
    ) -> io::Result<Arc<Cache>> {
        let map = Map::fetch(engine, conn, volume, size);
        let served = Volume::of_file(file.try_clone()?, size, true);
        let (store, stored) = mpsc::channel::<Fetched>();
        std::thread::Builder::new()
            .name("cor-store".into())
            .spawn(move || {
                for f in stored {
                    f.cache.finish_fetch(f.result, &f.request, f.reply);
                }
            })?;
        Ok(Arc::new(Cache {
            file,
            size,
            volume: volume.to_string(),
            engine: engine.clone(),
            conn,
            map,
            served,
            state: Mutex::new(State {
                owners: Owners::new(),
                broken: None,
            }),
            store,
            stats: Stats::default(),
        }))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether every byte arrived or was written locally.
    pub fn complete(&self) -> bool {
        self.state.lock().unwrap().owners.complete(self.size)
    }

    /// Whether every byte of `[offset, offset + len)` arrived or was written locally.
    pub fn complete_in(&self, offset: u64, len: u64) -> bool {
        let owners = &self.state.lock().unwrap().owners;
        owners.absent(Range::new(offset, len)).is_empty()
    }

    /// The ranges written locally.
    pub fn local(&self) -> Vec<Range> {
        self.state.lock().unwrap().owners.local()
    }

    /// Why the partial can no longer be trusted, if it cannot.
    pub fn broken(&self) -> Option<String> {
        self.state.lock().unwrap().broken.clone()
    }

    /// Stores a chunk that came from the source where nobody owns its bytes yet; returns the
    /// bytes stored.
    pub fn arrive(&self, chunk: &Chunk) -> Result<u64, String> {
        let (offset, len) = match chunk {
            Chunk::Data { offset, bytes } => (*offset, bytes.len() as u64),
            Chunk::Hole { offset, len } => (*offset, *len),
            Chunk::End { .. } => return Ok(0),
        };
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(format!(
                "{offset}+{len} runs past the volume's {}",
                self.size
            ));
        }
        let mut state = self.state.lock().unwrap();
        if let Some(why) = &state.broken {
            return Err(why.clone());
        }
        let pieces = state
            .owners
            .claim_source(Range::new(offset, len))
            .map_err(|Full| "the arrival map is full".to_string())?;
        let mut stored = 0;
        for p in pieces {
            let r = match chunk {
                Chunk::Data { bytes, .. } => {
                    let at = (p.offset - offset) as usize;
                    fd::write_full(
                        &self.file,
                        Kind::Regular,
                        p.offset,
                        &bytes[at..at + p.len as usize],
                    )
                }
                // A partial may hold earlier bytes there (a resumed one): they must go.
                _ => Zeroer::new(Kind::Regular, false)
                    .zero(&self.file, p.offset, p.len)
                    .map(drop),
            };
            if let Err(e) = r {
                let why = format!("writing {}+{} of the partial: {e}", p.offset, p.len);
                log::error!("{why}");
                state.broken = Some(why.clone());
                return Err(why);
            }
            stored += p.len;
        }
        Ok(stored)
    }

    /// A local write or zeroing of `range`, done by `write` under the lock.
    fn local_change(
        &self,
        range: Range,
        write: impl FnOnce() -> io::Result<()>,
    ) -> Result<Outcome, Failure> {
        let mut state = self.state.lock().unwrap();
        if let Some(why) = &state.broken {
            return Err(failure(wire::EIO, why.clone()));
        }
        if state.owners.claim_local(range) == Err(Full) {
            log::error!("{}: the arrival map is full: write refused", self.volume);
            return Err(failure(
                wire::ENOSPC,
                "too many separate local writes".into(),
            ));
        }
        // Local now even if the write fails: its bytes are the client's business, not the
        // source's, from the moment it asked.
        let r = write();
        drop(state);
        r.map_err(|e| {
            log::warn!(
                "{}: local write {}+{}: {e}",
                self.volume,
                range.offset,
                range.len
            );
            failure(wire::EIO, e.to_string())
        })?;
        self.stats
            .local_bytes
            .fetch_add(range.len, Ordering::Relaxed);
        Ok(Outcome::Done)
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Fetches the bytes of `request` (a READ) nobody owns, then answers it from the file.
    fn fetch(self: &Arc<Self>, absent: &[Range], request: Request, reply: Reply) {
        let reply = Once(Some(reply));
        let (first, last) = (absent[0], absent[absent.len() - 1]);
        let span = Range::new(first.offset, last.end() - first.offset);
        let ranges = match RangeSet::new(vec![span]) {
            Ok(r) => Arc::new(r),
            Err(e) => return reply.send(Err(failure(wire::EINVAL, e.to_string()))),
        };
        let (sink, got) = Collect::new(span.offset, span.len, true);
        let cache = Arc::clone(self);
        let store = self.store.clone();
        self.stats.urgent_fetches.fetch_add(1, Ordering::Relaxed);
        self.engine.submit(
            self.conn,
            Transfer {
                op: Op::Read,
                name: self.volume.clone(),
                options: OpenOptions::default().with_priority(true),
                ranges: Some(ranges),
                endpoint: Endpoint::Writer(Box::new(sink)),
                on_done: Box::new(move |report: TransferReport| {
                    let result = report
                        .result
                        .map(|()| std::mem::take(&mut got.lock().unwrap().chunks))
                        .map_err(|e| e.to_string());
                    // On the loop thread: the writes wait for the store thread.
                    let _ = store.send(Fetched {
                        cache,
                        result,
                        request,
                        reply,
                    });
                }),
            },
        );
    }

    fn finish_fetch(&self, result: Result<Vec<Chunk>, String>, request: &Request, reply: Once) {
        let chunks = match result {
            Ok(c) => c,
            Err(e) => {
                log::warn!("{}: fetching for {request:?}: {e}", self.volume);
                return reply.send(Err(failure(wire::EIO, e)));
            }
        };
        for c in &chunks {
            match self.arrive(c) {
                Ok(n) => {
                    self.stats.urgent_bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => return reply.send(Err(failure(wire::EIO, e))),
            }
        }
        let mut reply = reply;
        if let Some(reply) = reply.0.take() {
            self.served.run(request, reply);
        }
    }

    /// Block status: the file's where bytes are owned, the source's where they are not.
    fn status(&self, offset: u64, len: u32, req_one: bool) -> Result<Vec<Descriptor>, Failure> {
        let end = offset + len as u64;
        let absent = self
            .state
            .lock()
            .unwrap()
            .owners
            .absent(Range::new(offset, len as u64));
        let mut pieces: Vec<(Range, bool)> = Vec::new();
        let mut pos = offset;
        for a in absent {
            if a.offset > pos {
                pieces.push((Range::new(pos, a.offset - pos), true));
            }
            pieces.push((a, false));
            pos = a.end();
        }
        if pos < end {
            pieces.push((Range::new(pos, end - pos), true));
        }
        let mut out: Vec<Descriptor> = Vec::new();
        for (r, owned) in pieces {
            let part = if owned {
                let request = Request::BlockStatus {
                    cookie: 0,
                    offset: r.offset,
                    len: r.len as u32,
                    req_one,
                };
                let (tx, rx) = mpsc::channel();
                self.served
                    .run(&request, Box::new(move |o| drop(tx.send(o))));
                match rx.recv() {
                    Ok(Ok(Outcome::Status(d))) => d,
                    Ok(Err(f)) => return Err(f),
                    _ => return Err(failure(wire::EIO, "no block status".into())),
                }
            } else {
                self.map.status(r.offset, r.len as u32, req_one, self.size)
            };
            for d in part {
                match out.last_mut() {
                    Some(last) if last.flags == d.flags => last.len += d.len,
                    _ => out.push(d),
                }
            }
            if req_one {
                break;
            }
        }
        Ok(out)
    }
}

/// The export of one copy-on-read destination, under its volume's name (and as the default
/// export).
pub struct CorExport {
    name: String,
    cache: Arc<Cache>,
}

impl CorExport {
    pub fn new(name: &str, cache: Arc<Cache>) -> CorExport {
        CorExport {
            name: name.to_string(),
            cache,
        }
    }
}

impl Catalog for CorExport {
    fn writable(&self) -> bool {
        true
    }

    fn names(&self) -> io::Result<Vec<String>> {
        Ok(vec![self.name.clone()])
    }

    fn open(&self, name: &str, may_write: bool) -> Result<Arc<dyn Disk>, LookupError> {
        if !name.is_empty() && name != self.name {
            return Err(LookupError {
                reply: wire::REP_ERR_UNKNOWN,
                message: format!("no export {name:?} (this one is {:?})", self.name),
            });
        }
        Ok(Arc::new(CorDisk {
            cache: Arc::clone(&self.cache),
            writable: may_write,
        }))
    }
}

struct CorDisk {
    cache: Arc<Cache>,
    writable: bool,
}

impl Disk for CorDisk {
    fn info(&self) -> ExportInfo {
        let mut info = self.cache.served.info();
        if !self.writable {
            info.flags = (info.flags
                & !(wire::FLAG_SEND_FLUSH | wire::FLAG_SEND_FUA | wire::FLAG_SEND_WRITE_ZEROES))
                | wire::FLAG_READ_ONLY;
        }
        info
    }

    fn run(&self, request: &Request, reply: Reply) {
        let cache = &self.cache;
        match *request {
            Request::Read { offset, len, .. } => {
                let absent = {
                    let state = cache.state.lock().unwrap();
                    if let Some(why) = &state.broken {
                        return reply(Err(failure(wire::EIO, why.clone())));
                    }
                    state.owners.absent(Range::new(offset, len as u64))
                };
                if absent.is_empty() {
                    cache.served.run(request, reply)
                } else {
                    cache.fetch(&absent, request.clone(), reply)
                }
            }
            Request::BlockStatus {
                offset,
                len,
                req_one,
                ..
            } => reply(cache.status(offset, len, req_one).map(Outcome::Status)),
            Request::Write { .. } | Request::WriteZeroes { .. } if !self.writable => {
                reply(Err(failure(wire::EPERM, "read-only".into())))
            }
            Request::Write {
                offset,
                ref data,
                fua,
                ..
            } => reply(
                cache.local_change(Range::new(offset, data.len() as u64), || {
                    fd::write_full(&cache.file, Kind::Regular, offset, data)?;
                    cache.sync_if(fua)
                }),
            ),
            Request::WriteZeroes {
                offset,
                len,
                no_hole,
                fua,
                ..
            } => reply(cache.local_change(Range::new(offset, len as u64), || {
                Zeroer::new(Kind::Regular, no_hole).zero(&cache.file, offset, len as u64)?;
                cache.sync_if(fua)
            })),
            _ => cache.served.run(request, reply),
        }
    }
}
