//! Remote volumes as local NBD exports (`volstream attach`): a [`Catalog`] for the export
//! server whose disks live on a volstream server at the other end of one engine connection.
//!
//! Each NBD READ becomes its own ranged READ stream (PROTOCOL.md 6.5) for exactly the bytes
//! asked. A stream per request rather than one long-lived stream per volume: a ranged READ's
//! ranges are fixed at OPEN, so a long-lived stream would need new frames to ask for more,
//! while OPEN already costs no more than a request on an open stream would (one round trip);
//! and an attached disk nobody reads holds no stream, no window and no buffer, only its name,
//! size and cached allocation map. Concurrent reads are concurrent streams, each with its own
//! credit, sharing the connection through the fair scheduler.
//!
//! BLOCK_STATUS is answered from the volume's EXTENTS document, fetched once at attach time
//! and kept (bounded by [`MAX_MAP_EXTENTS`]): a client sees the remote holes without a round
//! trip per query. The map may only err towards data: data where the remote has a hole costs a
//! client a read of zeroes, a hole where it has data would be wrong, so a map that is too
//! large or does not parse is replaced by "all data" (and logged).

use crate::export::{Catalog, Disk, Failure, Outcome, Piece, Reply};
use engine::document::{self, ExtentKind};
use engine::event_loop::{Endpoint, Transfer};
use engine::proto::{Op, OpenOptions};
use engine::{
    Chunk, ConnectionId, Digest, EngineHandle, Notify, Range, RangeSet, Reason, TransferReport,
    VolumeError, VolumeWriter, WriteProgress,
};
use nbd::wire::{self, STATE_HOLE, STATE_ZERO};
use nbd::{BlockSize, Descriptor, ExportInfo, LookupError, Request};
use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Extents of one volume's map kept at most (24 bytes each: 1.5 MiB).
pub const MAX_MAP_EXTENTS: usize = 1 << 16;
/// Bytes of a LIST or EXTENTS document accepted at most.
const MAX_DOCUMENT: u64 = 8 << 20;
/// Extents in one block status reply at most; a client asks again for the rest.
const MAX_STATUS_EXTENTS: usize = 4096;
/// How long attaching waits for a document.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why volumes could not be attached.
#[derive(Debug)]
pub enum AttachError {
    /// The server has no volume of that name.
    NoVolume(String),
    /// A document (LIST) could not be fetched or parsed.
    Document(String),
}

impl std::fmt::Display for AttachError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachError::NoVolume(n) => write!(f, "the server has no volume {n:?}"),
            AttachError::Document(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for AttachError {}

/// Which remote volume an export is, and what it is called locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The name NBD clients ask for.
    pub export: String,
    /// The volume's name on the server.
    pub volume: String,
}

/// Attached volumes of one connection, as an export server's catalog.
pub struct Remote {
    /// By export name.
    disks: Vec<(String, Arc<RemoteDisk>)>,
}

/// The remote volumes of one connection.
impl Remote {
    /// Looks the volumes up (one LIST for all, one EXTENTS each). Blocks; not for the loop
    /// thread.
    pub fn attach(
        engine: &EngineHandle,
        conn: ConnectionId,
        attachments: &[Attachment],
    ) -> Result<Remote, AttachError> {
        let list = fetch(engine, conn, Op::List, "")
            .map_err(|e| AttachError::Document(format!("listing the server's volumes: {e}")))?;
        let text = String::from_utf8(list)
            .map_err(|_| AttachError::Document("the server's LIST is not UTF-8".into()))?;
        let entries = document::parse_list(&text)
            .map_err(|e| AttachError::Document(format!("the server's LIST: {e}")))?;
        let mut disks = Vec::with_capacity(attachments.len());
        for a in attachments {
            let size = entries
                .iter()
                .find(|e| e.name == a.volume)
                .ok_or_else(|| AttachError::NoVolume(a.volume.clone()))?
                .size;
            let map = Map::fetch(engine, conn, &a.volume, size);
            log::info!(
                "attached {:?} as {:?}: {size} bytes, {} extents in its map",
                a.volume,
                a.export,
                map.extents.len()
            );
            let disk = RemoteDisk {
                volume: a.volume.clone(),
                size,
                map,
                engine: engine.clone(),
                conn,
            };
            disks.push((a.export.clone(), Arc::new(disk)));
        }
        Ok(Remote { disks })
    }
}

/// The size of the server's volume `name`, from its LIST. Blocks; not for the loop thread.
pub fn volume_size(
    engine: &EngineHandle,
    conn: ConnectionId,
    name: &str,
) -> Result<u64, AttachError> {
    let list = fetch(engine, conn, Op::List, "")
        .map_err(|e| AttachError::Document(format!("listing the server's volumes: {e}")))?;
    let text = String::from_utf8(list)
        .map_err(|_| AttachError::Document("the server's LIST is not UTF-8".into()))?;
    let entries = document::parse_list(&text)
        .map_err(|e| AttachError::Document(format!("the server's LIST: {e}")))?;
    entries
        .iter()
        .find(|e| e.name == name)
        .map(|e| e.size)
        .ok_or_else(|| AttachError::NoVolume(name.to_string()))
}

/// Fetches a document stream's content, at most [`MAX_DOCUMENT`] bytes.
fn fetch(engine: &EngineHandle, conn: ConnectionId, op: Op, name: &str) -> Result<Vec<u8>, String> {
    let (sink, got) = Collect::new(0, MAX_DOCUMENT, false);
    let report = engine
        .fetch(conn, op, name, Box::new(sink))
        .recv_timeout(DOCUMENT_TIMEOUT)
        .map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => "no answer in time".to_string(),
            mpsc::RecvTimeoutError::Disconnected => "the event loop ended".to_string(),
        })?;
    if let Err(e) = report.result {
        return Err(e.to_string());
    }
    let chunks = std::mem::take(&mut got.lock().unwrap().chunks);
    let mut bytes = Vec::new();
    for c in chunks {
        match c {
            Chunk::Data { bytes: b, .. } => bytes.extend_from_slice(&b),
            Chunk::Hole { len, .. } => bytes.resize(bytes.len() + len as usize, 0),
            Chunk::End { .. } => {}
        }
    }
    Ok(bytes)
}

/// A volume's allocation as NBD states: sorted, disjoint `(offset, end, flags)`, gaps data.
#[derive(Debug, Clone, Default)]
pub(crate) struct Map {
    extents: Vec<(u64, u64, u32)>,
}

impl Map {
    pub(crate) fn fetch(engine: &EngineHandle, conn: ConnectionId, volume: &str, size: u64) -> Map {
        let parsed = fetch(engine, conn, Op::Extents, volume).and_then(|doc| {
            let text = String::from_utf8(doc).map_err(|_| "not UTF-8".to_string())?;
            let entries = document::parse_extents(&text).map_err(|e| e.to_string())?;
            Map::from_entries(&entries, size)
        });
        parsed.unwrap_or_else(|why| {
            log::warn!("{volume:?}: its allocation map is not used ({why}): all data");
            Map::default()
        })
    }

    /// Keeps only what says "zero" or "hole", checked against `size`.
    fn from_entries(entries: &[document::ExtentEntry], size: u64) -> Result<Map, String> {
        let mut extents: Vec<(u64, u64, u32)> = Vec::new();
        let mut last_end = 0u64;
        for e in entries {
            let end = e
                .offset
                .checked_add(e.len)
                .filter(|&end| end <= size && e.offset >= last_end)
                .ok_or_else(|| {
                    format!(
                        "extent {}+{} is out of order or past the end",
                        e.offset, e.len
                    )
                })?;
            last_end = end;
            let flags = match e.kind {
                ExtentKind::Hole | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
                ExtentKind::Zero => STATE_ZERO,
                ExtentKind::Data | ExtentKind::Backing => continue,
            };
            match extents.last_mut() {
                Some(last) if last.1 == e.offset && last.2 == flags => last.1 = end,
                _ if e.len == 0 => {}
                _ => extents.push((e.offset, end, flags)),
            }
            if extents.len() > MAX_MAP_EXTENTS {
                return Err(format!("more than {MAX_MAP_EXTENTS} extents"));
            }
        }
        Ok(Map { extents })
    }

    /// The state at `pos` and where it ends.
    fn at(&self, pos: u64, size: u64) -> (u64, u32) {
        let i = self.extents.partition_point(|e| e.1 <= pos);
        match self.extents.get(i) {
            Some(&(start, end, flags)) if start <= pos => (end, flags),
            Some(&(start, _, _)) => (start, 0),
            None => (size, 0),
        }
    }

    pub(crate) fn status(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
        size: u64,
    ) -> Vec<Descriptor> {
        let end = offset + len as u64;
        let mut out: Vec<Descriptor> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_STATUS_EXTENTS {
            let (to, flags) = self.at(pos, size);
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
        out
    }
}

/// One attached volume.
struct RemoteDisk {
    volume: String,
    size: u64,
    map: Map,
    engine: EngineHandle,
    conn: ConnectionId,
}

impl RemoteDisk {
    fn read(&self, offset: u64, len: u32, reply: Reply) {
        let reply = Once(Some(reply));
        let ranges = match RangeSet::new(vec![Range::new(offset, len as u64)]) {
            Ok(r) => Arc::new(r),
            Err(e) => return reply.send(Err(failure(wire::EINVAL, e.to_string()))),
        };
        let (sink, got) = Collect::new(offset, len as u64, true);
        let volume = self.volume.clone();
        self.engine.submit(
            self.conn,
            Transfer {
                op: Op::Read,
                name: self.volume.clone(),
                options: OpenOptions::default(),
                ranges: Some(ranges),
                endpoint: Endpoint::Writer(Box::new(sink)),
                on_done: Box::new(move |report: TransferReport| {
                    let result = match report.result {
                        Ok(()) => {
                            let chunks = std::mem::take(&mut got.lock().unwrap().chunks);
                            Ok(Outcome::Read(
                                chunks.into_iter().filter_map(piece).collect(),
                            ))
                        }
                        Err(e) => {
                            log::warn!("reading {volume:?} at {offset}+{len}: {e}");
                            Err(failure(wire::EIO, e.to_string()))
                        }
                    };
                    reply.send(result)
                }),
            },
        );
    }
}

pub(crate) fn piece(c: Chunk) -> Option<Piece> {
    match c {
        Chunk::Data { offset, bytes } => Some(Piece::Data { offset, bytes }),
        // Within one request, so at most its u32 length.
        Chunk::Hole { offset, len } => Some(Piece::Hole {
            offset,
            len: len as u32,
        }),
        Chunk::End { .. } => None,
    }
}

pub(crate) fn failure(errno: u32, message: String) -> Failure {
    Failure { errno, message }
}

/// A reply that is sent exactly once: if the transfer's completion is dropped unrun (the event
/// loop stopped), the client still gets an error instead of waiting forever.
pub(crate) struct Once(pub(crate) Option<Reply>);

impl Once {
    pub(crate) fn send(mut self, result: Result<Outcome, Failure>) {
        if let Some(r) = self.0.take() {
            r(result)
        }
    }
}

impl Drop for Once {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r(Err(failure(
                wire::EIO,
                "the connection to the server is gone".into(),
            )))
        }
    }
}

impl Catalog for Remote {
    fn writable(&self) -> bool {
        false
    }

    fn names(&self) -> io::Result<Vec<String>> {
        Ok(self.disks.iter().map(|(n, _)| n.clone()).collect())
    }

    fn open(&self, name: &str, _may_write: bool) -> Result<Arc<dyn Disk>, LookupError> {
        // The default export "" is the only volume, where there is only one.
        let found = match (name, self.disks.as_slice()) {
            ("", [(_, d)]) => Some(d),
            _ => self.disks.iter().find(|(n, _)| n == name).map(|(_, d)| d),
        };
        match found {
            Some(d) => Ok(Arc::clone(d) as Arc<dyn Disk>),
            None => Err(LookupError {
                reply: wire::REP_ERR_UNKNOWN,
                message: format!("no attached volume {name:?}"),
            }),
        }
    }
}

impl Disk for RemoteDisk {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            size: self.size,
            // Every client reads the same remote volume: multi-conn holds.
            flags: wire::FLAG_READ_ONLY | wire::FLAG_CAN_MULTI_CONN,
            block_size: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: crate::export::volume::MAX_PAYLOAD,
            },
        }
    }

    fn run(&self, request: &Request, reply: Reply) {
        match *request {
            Request::Read { offset, len, .. } => self.read(offset, len, reply),
            Request::BlockStatus {
                offset,
                len,
                req_one,
                ..
            } => reply(Ok(Outcome::Status(
                self.map.status(offset, len, req_one, self.size),
            ))),
            Request::Flush { .. } => reply(Ok(Outcome::Done)),
            _ => reply(Err(failure(wire::EPERM, "read-only".into()))),
        }
    }
}

/// What a [`Collect`] sink received.
#[derive(Default)]
pub(crate) struct Collected {
    pub(crate) chunks: Vec<Chunk>,
}

/// A sink that keeps a stream's chunks in memory: the bytes of one NBD READ, or a document.
/// It takes only contiguous chunks from `next` within `limit` bytes, so a peer can neither
/// send what was not asked nor make it hold more.
pub(crate) struct Collect {
    got: Arc<Mutex<Collected>>,
    next: u64,
    end: u64,
    /// The content must fill `[next, end)` exactly (a READ), not merely fit (a document).
    exact: bool,
    digest: Digest,
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
}

impl Collect {
    pub(crate) fn new(offset: u64, limit: u64, exact: bool) -> (Collect, Arc<Mutex<Collected>>) {
        let got = Arc::new(Mutex::new(Collected::default()));
        let sink = Collect {
            got: Arc::clone(&got),
            next: offset,
            end: offset + limit,
            exact,
            digest: Digest::new(),
            completed: 0,
            outcome: None,
        };
        (sink, got)
    }

    fn fail(&mut self, message: String) {
        if self.outcome.is_none() {
            self.outcome = Some(Err(VolumeError::new(Reason::Protocol, message)));
        }
    }
}

impl VolumeWriter for Collect {
    fn start(&mut self, _size: u64, _notify: Notify) {}

    fn write(&mut self, chunk: Chunk) {
        self.completed += 1;
        if self.outcome.is_some() {
            return;
        }
        let (offset, len) = match &chunk {
            Chunk::Data { offset, bytes } => (*offset, bytes.len() as u64),
            Chunk::Hole { offset, len } => (*offset, *len),
            Chunk::End { digest, .. } => {
                if self.exact && self.next != self.end {
                    return self.fail(format!(
                        "the server ended the range at {}, short of {}",
                        self.next, self.end
                    ));
                }
                let ours = self.digest.value();
                self.outcome = Some(match digest {
                    Some(d) if *d != ours => Err(VolumeError::new(
                        Reason::DigestMismatch,
                        format!("content digest {ours:#010x}, sender says {d:#010x}"),
                    )),
                    _ => Ok(()),
                });
                return;
            }
        };
        if offset != self.next || len > self.end - self.next {
            return self.fail(format!(
                "the server sent {offset}+{len}, expected the next bytes from {} up to {}",
                self.next, self.end
            ));
        }
        match &chunk {
            Chunk::Data { bytes, .. } => self.digest.update(bytes),
            _ => self.digest.update_zeroes(len),
        }
        self.next += len;
        self.got.lock().unwrap().chunks.push(chunk);
    }

    fn poll_progress(&mut self) -> WriteProgress {
        WriteProgress {
            completed: self.completed,
            outcome: self.outcome.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::document::ExtentEntry;

    #[test]
    fn the_map_reports_holes_only_where_the_document_says_so() {
        let entries = [
            ExtentEntry::new(0, 100, ExtentKind::Data),
            ExtentEntry::new(100, 50, ExtentKind::Hole),
            ExtentEntry::new(150, 50, ExtentKind::Zero),
            ExtentEntry::new(300, 100, ExtentKind::Hole),
        ];
        let map = Map::from_entries(&entries, 400).unwrap();
        let s = map.status(0, 400, false, 400);
        let got: Vec<(u32, u32)> = s.iter().map(|d| (d.len, d.flags)).collect();
        assert_eq!(
            got,
            vec![
                (100, 0),
                (50, STATE_HOLE | STATE_ZERO),
                (50, STATE_ZERO),
                (100, 0),
                (100, STATE_HOLE | STATE_ZERO)
            ]
        );
        let one = map.status(120, 200, true, 400);
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].len, one[0].flags), (30, STATE_HOLE | STATE_ZERO));
    }

    #[test]
    fn a_map_out_of_order_or_past_the_end_is_refused() {
        let past = [ExtentEntry::new(0, 500, ExtentKind::Hole)];
        assert!(Map::from_entries(&past, 400).is_err());
        let unsorted = [
            ExtentEntry::new(100, 10, ExtentKind::Hole),
            ExtentEntry::new(50, 10, ExtentKind::Hole),
        ];
        assert!(Map::from_entries(&unsorted, 400).is_err());
        let overflow = [ExtentEntry::new(u64::MAX, 10, ExtentKind::Hole)];
        assert!(Map::from_entries(&overflow, 400).is_err());
    }

    #[test]
    fn a_collector_refuses_bytes_it_did_not_ask_for() {
        let data = |offset, n| Chunk::Data {
            offset,
            bytes: bytes::Bytes::from(vec![7u8; n]),
        };
        let (mut c, _) = Collect::new(1000, 100, true);
        c.write(data(1000, 50));
        c.write(data(1060, 10));
        assert!(matches!(c.poll_progress().outcome, Some(Err(_))));

        let (mut c, _) = Collect::new(1000, 100, true);
        c.write(data(1000, 150));
        assert!(matches!(c.poll_progress().outcome, Some(Err(_))));

        let (mut c, _) = Collect::new(1000, 100, true);
        c.write(data(1000, 50));
        c.write(Chunk::End {
            length: 0,
            digest: None,
        });
        assert!(matches!(c.poll_progress().outcome, Some(Err(_))));

        let (mut c, got) = Collect::new(1000, 100, true);
        c.write(data(1000, 50));
        c.write(Chunk::Hole {
            offset: 1050,
            len: 50,
        });
        c.write(Chunk::End {
            length: 0,
            digest: None,
        });
        assert_eq!(c.poll_progress().outcome, Some(Ok(())));
        assert_eq!(c.poll_progress().completed, 3);
        assert_eq!(got.lock().unwrap().chunks.len(), 2);
    }
}
