//! What the fuzz targets run. engine/tests/fuzz_corpus.rs and engine/tests/codec_props.rs include
//! this file with `#[path]`, so replaying the corpus exercises exactly the fuzzed code.
//!
//! Everything here panics on a broken invariant; a panic is what the fuzzer reports as a crash.

use bytes::{Bytes, BytesMut};
use engine::proto::frame::HEADER_LEN;
use engine::proto::{
    Config, ConnError, Connection, Event, Features, Frame, Hello, Op, Reason, Side, StreamId,
    Transmit,
};
use engine::{Chunk, Digest};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The body limit the decode target passes to `Frame::decode`.
pub const DECODE_MAX: u32 = 64 * 1024;

/// Sizes of the successive pieces the connection target reads its input in (each further capped
/// by `input_room`), so frames and the handshake arrive split at many different points. Mostly
/// smaller than a DATA frame, so the driver usually answers an OPEN before the content that
/// follows it arrives (as a real uploader waits for ACCEPT).
pub const PIECES: &[usize] = &[1, 5, 12, 16, 3, 9, 16, 2, 4096];

/// Decodes frames from the front of `data` until the bytes run out or one is refused, checking
/// every frame against `max`. Returns how many frames were decoded.
pub fn decode_frames(data: &[u8], max: u32) -> usize {
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    loop {
        let before = buf.len();
        match Frame::decode(&mut buf, max) {
            Ok(Some(frame)) => {
                let consumed = before - buf.len();
                assert!(consumed >= HEADER_LEN, "{consumed}-byte frame");
                assert!(
                    consumed - HEADER_LEN <= max as usize,
                    "body of {} bytes decoded with a limit of {max}",
                    consumed - HEADER_LEN
                );
                if let Frame::Data { payload, .. } = &frame {
                    assert!(
                        payload.len() + 8 <= max as usize,
                        "DATA payload over the limit"
                    );
                }
                // The decoded value is canonical: it encodes to a frame of the same size that
                // decodes to the same value.
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                assert_eq!(again.len(), consumed, "re-encoding of {frame:?}");
                assert_eq!(Frame::decode(&mut again, max), Ok(Some(frame)));
                assert!(again.is_empty());
                frames += 1;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumed input");
                break;
            }
            Err(_) => break,
        }
    }
    frames
}

/// The server's configuration in the connection target: small limits, so flow control and the
/// stream limit are reachable with small inputs.
pub fn server_config() -> Config {
    Config {
        features: Features::ALL,
        max_frame: 16 * 1024,
        stream_window: 16 * 1024,
        conn_window: 48 * 1024,
        // Small maxima, so that windows that size themselves to a (fuzzed) round trip reach
        // them; what the connection holds is checked against `max_conn_window`.
        max_stream_window: 64 * 1024,
        max_conn_window: 192 * 1024,
        max_streams: 8,
        send_frame: 4096,
        send_buffer: 16 * 1024,
        ..Config::default()
    }
}

/// A valid client `Hello` (what seeds start with).
pub fn client_hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        features: Features::ALL,
        max_frame: 64 * 1024,
        stream_window: 64 * 1024,
        conn_window: 1024 * 1024,
        max_streams: 16,
    }
}

/// The most the input buffer may hold when the driver reads only `input_room` bytes at a time.
pub fn input_bound(config: &Config) -> usize {
    config.max_frame as usize + 64 * 1024 + HEADER_LEN
}

/// Length of the volume the server sends for every `Op::Read` it accepts.
pub const SOURCE_LEN: u64 = 12 * 1024;

/// What happened on one run of [`drive_server`].
#[derive(Debug, Default)]
pub struct Outcome {
    pub connected: bool,
    pub opened: usize,
    pub completed: usize,
    pub aborted: usize,
    /// The error in the `Closed` event, if any.
    pub error: Option<Option<ConnError>>,
}

#[derive(Default)]
struct Driver {
    outcome: Outcome,
    /// Chunks handed to us and not yet released, per stream.
    pending: HashMap<StreamId, u64>,
    digests: HashMap<StreamId, Digest>,
}

impl Driver {
    fn react(&mut self, conn: &mut Connection, now: Instant) {
        while let Some(event) = conn.poll_event() {
            assert!(
                self.outcome.error.is_none(),
                "event after Closed: {event:?}"
            );
            match event {
                Event::Connected { .. } => {
                    assert!(!self.outcome.connected, "second Connected");
                    self.outcome.connected = true;
                }
                Event::OpenRequested {
                    stream,
                    op,
                    name,
                    size,
                    ranges,
                    ..
                } => {
                    self.outcome.opened += 1;
                    if name.starts_with('x') {
                        conn.reject(stream, Reason::NotFound, "no such volume");
                    } else if op == Op::Write {
                        conn.accept(stream, size, None);
                    } else {
                        // An identity, sent only where feature IDENTITY was agreed.
                        conn.accept(stream, SOURCE_LEN, engine::VolumeIdentity::new([7u8; 40]));
                        send_source(conn, stream, ranges.as_deref());
                    }
                }
                Event::Chunk { stream, chunk } => {
                    let digest = self.digests.entry(stream).or_default();
                    match chunk {
                        Chunk::Data { bytes, .. } => digest.update(&bytes),
                        Chunk::Hole { len, .. } => digest.update_zeroes(len),
                        Chunk::End { length, digest: d } => {
                            assert_eq!(digest.len(), length, "End before all content");
                            let ours = digest.value();
                            let pending = self.pending.remove(&stream).unwrap_or(0);
                            conn.release(stream, pending, now);
                            if d.is_some_and(|d| d != ours) {
                                conn.abort(stream, Reason::DigestMismatch, "digest mismatch");
                            } else {
                                conn.stream_verified(stream);
                            }
                            continue;
                        }
                    }
                    // Release every second chunk, so some credit stays held for a while.
                    let pending = self.pending.entry(stream).or_default();
                    *pending += 1;
                    if *pending >= 2 {
                        conn.release(stream, *pending, now);
                        *pending = 0;
                    }
                }
                Event::Completed { .. } => self.outcome.completed += 1,
                Event::Aborted { .. } => self.outcome.aborted += 1,
                Event::Closed { error } => self.outcome.error = Some(error),
                Event::Accepted { .. } | Event::Rejected { .. } | Event::Writable { .. } => {}
            }
        }
    }
}

static PATTERN: [u8; 4096] = {
    let mut p = [0u8; 4096];
    let mut i = 0;
    while i < p.len() {
        p[i] = (i * 7 + 3) as u8;
        i += 1;
    }
    p
};

/// Queues the served volume: data, a hole, data, the end with its digest; of a ranged READ
/// only the pieces inside its ranges, the digest over them.
fn send_source(conn: &mut Connection, stream: StreamId, ranges: Option<&engine::RangeSet>) {
    let data = Bytes::from_static(&PATTERN);
    let whole = [
        Chunk::Data {
            offset: 0,
            bytes: data.clone(),
        },
        Chunk::Hole {
            offset: 4096,
            len: 4096,
        },
        Chunk::Data {
            offset: 8192,
            bytes: data,
        },
    ];
    let all = [engine::Range::new(0, SOURCE_LEN)];
    let wanted = ranges.map_or(&all[..], |r| r.ranges());
    let mut digest = Digest::new();
    let mut chunks = Vec::new();
    for r in wanted {
        for chunk in &whole {
            let offset = match chunk {
                Chunk::Data { offset, .. } | Chunk::Hole { offset, .. } => *offset,
                Chunk::End { .. } => continue,
            };
            let len = chunk.logical_len();
            let (from, to) = (r.offset.max(offset), r.end().min(offset + len));
            if from >= to {
                continue;
            }
            chunks.push(match chunk {
                Chunk::Data { bytes, .. } => {
                    let bytes = bytes.slice((from - offset) as usize..(to - offset) as usize);
                    digest.update(&bytes);
                    Chunk::Data {
                        offset: from,
                        bytes,
                    }
                }
                _ => {
                    digest.update_zeroes(to - from);
                    Chunk::Hole {
                        offset: from,
                        len: to - from,
                    }
                }
            });
        }
    }
    chunks.push(Chunk::End {
        length: SOURCE_LEN,
        digest: Some(digest.value()),
    });
    for chunk in chunks {
        if !conn.can_send(stream) {
            break;
        }
        conn.send_chunk(stream, chunk);
    }
}

/// Runs a server-side connection on `data` as the peer's bytes, read in pieces of the sizes in
/// `pieces` (cycled, each capped by `input_room`), answering events like a driver would and
/// discarding everything it transmits; then the peer closes. Panics on a broken invariant.
pub fn drive_server(data: &[u8], pieces: &[usize]) -> Outcome {
    let config = server_config();
    let bound = input_bound(&config);
    let conn_window = config.max_conn_window as u64;
    let mut now = Instant::now();
    let mut conn = Connection::new(Side::Server, config, now);
    let mut driver = Driver::default();
    let mut out = Transmit::default();
    let mut rest = data;
    let mut piece = 0;
    while !rest.is_empty() {
        let room = conn.input_room();
        if room == 0 {
            assert!(conn.is_closed(), "no input room on an open connection");
            break;
        }
        let n = pieces[piece % pieces.len()].clamp(1, room).min(rest.len());
        piece += 1;
        conn.input_buffer().extend_from_slice(&rest[..n]);
        conn.record_bytes_in(n);
        rest = &rest[n..];
        assert!(
            conn.input_buffer().len() <= bound,
            "input buffer over its bound"
        );
        now += Duration::from_millis(1);
        conn.handle_input(now);
        conn.handle_timeout(now);
        driver.react(&mut conn, now);
        conn.poll_transmit(now, &mut out, 256 * 1024);
        out.advance(out.len());
        driver.react(&mut conn, now);
        assert!(
            conn.input_buffer().len() <= bound,
            "input buffer over its bound"
        );
        let buffered = conn.stats().recv_buffered;
        assert!(
            buffered <= conn_window,
            "{buffered} bytes buffered with a connection window of at most {conn_window}"
        );
    }
    conn.handle_eof();
    driver.react(&mut conn, now);
    assert!(conn.is_closed());
    assert_eq!(
        conn.stream_count(),
        0,
        "streams left after the connection closed"
    );
    assert!(driver.outcome.error.is_some(), "no Closed event");
    driver.outcome
}

/// Judges `data` as a scraper's request head the way `serve --metrics` does: as it arrives in
/// pieces, stopping at the first verdict. An unfinished head is never judged, a finished one
/// always is.
pub fn metrics_request(data: &[u8]) -> engine::metrics::Request {
    use engine::metrics::{request, Request, MAX_REQUEST};
    let data = &data[..data.len().min(MAX_REQUEST + 64)];
    let (mut end, mut verdict) = (0, request(&[]));
    for piece in PIECES.iter().cycle() {
        if verdict != Request::Incomplete || end == data.len() {
            break;
        }
        end = (end + piece).min(data.len());
        verdict = request(&data[..end]);
    }
    let ended = data[..end].windows(4).any(|w| w == b"\r\n\r\n");
    match verdict {
        Request::Incomplete => assert!(!ended && end < MAX_REQUEST, "a head left unjudged"),
        Request::TooLong => assert!(end >= MAX_REQUEST, "a short head called too long"),
        Request::Metrics => assert!(data.starts_with(b"GET /metrics"), "not a scrape"),
        Request::NotFound | Request::MethodNotAllowed => assert!(ended, "judged unfinished"),
    }
    verdict
}

/// Decodes `data` as a DIGESTS document, fed in pieces of every size of [`PIECES`] and whole:
/// every way of cutting gives the same records or the same error, records are sorted and
/// inside the volume, and a decoded document re-encodes to the bytes it came from. Returns the
/// records of a document that decodes.
pub fn decode_block_map(data: &[u8]) -> Option<usize> {
    use engine::blockmap::{self, BlockMapDecoder};
    let whole = blockmap::decode(data);
    let mut decoder = BlockMapDecoder::new();
    let mut records = Vec::new();
    let mut rest = data;
    let mut result = Ok(());
    for piece in PIECES.iter().cycle() {
        if rest.is_empty() || result.is_err() {
            break;
        }
        let (now, later) = rest.split_at((*piece).min(rest.len()));
        result = decoder.feed(now, |r| records.push(r));
        rest = later;
    }
    let pieces = result.and_then(|()| decoder.finish()).map(|h| (h, records));
    assert_eq!(whole, pieces, "cutting the input changed the outcome");
    let (header, records) = whole.ok()?;
    assert!(records.windows(2).all(|w| w[0].index < w[1].index));
    assert!(records.iter().all(|r| r.index < header.blocks()));
    assert_eq!(blockmap::encode(&header, &records), data, "not canonical");
    Some(records.len())
}
