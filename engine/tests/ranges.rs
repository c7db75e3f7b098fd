//! Range reads (feature RANGES, docs/PROTOCOL.md 6.5): exactly the ranges asked for travel, in
//! order; a list longer than a frame travels in several; hostile lists refuse only their
//! stream; protocol misuse ends the connection; a peer without the feature is not asked.

use bytes::{BufMut, BytesMut};
use engine::proto::frame::{Frame, Hello};
use engine::proto::{
    Config, ConnError, Connection, Event, Features, Op, OpenError, OpenOptions, Side, StreamId,
    Transmit,
};
use engine::range::MAX_RANGES;
use engine::testing::{End, Pair, SinkPolicy, Volume};
use engine::{Range, RangeSet, Reason};
use std::time::Instant;

const MIB: u64 = 1024 * 1024;

fn serving(volume: Volume) -> Pair {
    let mut pair = Pair::connected();
    pair.server.volumes.insert("v".into(), volume);
    pair
}

fn set(ranges: &[(u64, u64)]) -> RangeSet {
    RangeSet::new(ranges.iter().map(|&(o, l)| Range::new(o, l)).collect()).unwrap()
}

/// The arrivals of stream `id`, merged where they touch.
fn tiles(pair: &Pair, id: StreamId) -> Vec<(u64, u64)> {
    let mut walk = Vec::<(u64, u64)>::new();
    for a in pair.client.arrivals.iter().filter(|a| a.stream == id) {
        match walk.last_mut() {
            Some(last) if last.0 + last.1 == a.offset => last.1 += a.len,
            _ => walk.push((a.offset, a.len)),
        }
    }
    walk
}

#[test]
fn only_the_ranges_asked_for_arrive_in_order() {
    let volume = Volume {
        size: 8 * MIB,
        chunk: 256 * 1024,
        hole_every: Some(3),
    };
    let mut pair = serving(volume);
    let asked = [(100, 5000), (MIB, 700 * 1024), (7 * MIB, MIB)];
    let id = pair
        .client
        .download_ranges("v", set(&asked), SinkPolicy::Immediate)
        .unwrap();
    assert!(pair.settle(10_000));
    let Some(End::Completed(stats)) = pair.client.end(id).cloned() else {
        panic!("{:?}", pair.client.end(id));
    };
    let total: u64 = asked.iter().map(|r| r.1).sum();
    assert_eq!(stats.data_bytes + stats.hole_bytes, total);
    assert!(stats.hole_bytes > 0, "holes inside ranges travel as holes");
    assert_eq!(tiles(&pair, id), asked);
    let requested = pair.server.events.iter().find_map(|(_, e)| match e {
        Event::OpenRequested { ranges, .. } => ranges.clone(),
        _ => None,
    });
    assert_eq!(requested.as_deref(), Some(&set(&asked)));
}

#[test]
fn touching_ranges_stay_apart_and_a_long_list_takes_several_frames() {
    let mut pair = serving(Volume::data(64 * MIB));
    let mut many: Vec<(u64, u64)> = (0..1000).map(|i| (i * 65536, 512)).collect();
    many.push((1000 * 65536, 512));
    many.push((1000 * 65536 + 512, 512));
    let id = pair
        .client
        .download_ranges("v", set(&many), SinkPolicy::Immediate)
        .unwrap();
    assert!(pair.settle(100_000));
    assert!(
        matches!(pair.client.end(id), Some(End::Completed(s)) if s.data_bytes == 1002 * 512),
        "{:?}",
        pair.client.end(id)
    );
    let frames = pair.client.conn.stats().frames_out.get("RANGES").unwrap();
    assert_eq!(frames, 1002u64.div_ceil(255));
    // No chunk spans the two touching ranges.
    let last: Vec<_> = pair
        .client
        .arrivals
        .iter()
        .filter(|a| a.stream == id && a.offset >= 1000 * 65536)
        .map(|a| (a.offset, a.len))
        .collect();
    assert_eq!(last, [(1000 * 65536, 512), (1000 * 65536 + 512, 512)]);
}

#[test]
fn ranges_past_the_end_refuse_only_that_stream() {
    let mut pair = serving(Volume::data(MIB));
    let bad = pair
        .client
        .download_ranges("v", set(&[(0, 10), (MIB - 1, 2)]), SinkPolicy::Immediate)
        .unwrap();
    let good = pair.client.download("v", SinkPolicy::Immediate).unwrap();
    assert!(pair.settle(10_000));
    assert_eq!(pair.client.end(bad), Some(&End::Rejected(Reason::Protocol)));
    assert!(matches!(pair.client.end(good), Some(End::Completed(_))));
    assert!(
        pair.client.closed_with().is_none(),
        "the connection goes on"
    );
}

#[test]
fn without_the_feature_no_range_read_is_sent() {
    let old = Config {
        features: Features(Features::SPARSE.0 | Features::DIGEST.0),
        ..Config::default()
    };
    let mut pair = Pair::new(Config::default(), old);
    pair.connect();
    pair.server.volumes.insert("v".into(), Volume::data(MIB));
    let asked = pair
        .client
        .download_ranges("v", set(&[(0, 10)]), SinkPolicy::Immediate);
    assert_eq!(asked.err(), Some(OpenError::Unsupported));
    // A whole read still works with the old peer.
    let id = pair.client.download("v", SinkPolicy::Immediate).unwrap();
    assert!(pair.settle(10_000));
    assert!(matches!(pair.client.end(id), Some(End::Completed(_))));
}

#[test]
fn ranges_are_for_reads_only() {
    let mut pair = serving(Volume::data(MIB));
    let write = pair.client.conn.open_ranged(
        Op::Write,
        "v",
        OpenOptions::default(),
        10,
        Some(std::sync::Arc::new(set(&[(0, 1)]))),
    );
    assert_eq!(write, Err(OpenError::Unsupported));
}

/// A server connection fed hand-made frames by a raw client.
struct Raw {
    conn: Connection,
    now: Instant,
}

impl Raw {
    fn new() -> Raw {
        let now = Instant::now();
        let mut raw = Raw {
            conn: Connection::new(Side::Server, Config::default(), now),
            now,
        };
        let mut hello = BytesMut::new();
        Hello {
            version_min: 1,
            version_max: 1,
            features: Features::ALL,
            max_frame: 1 << 20,
            stream_window: 1 << 20,
            conn_window: 1 << 24,
            max_streams: 16,
        }
        .encode(&mut hello);
        raw.feed(&hello);
        raw
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.conn.input_buffer().put_slice(bytes);
        self.conn.handle_input(self.now);
    }

    fn send(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out);
        }
        self.feed(&out);
    }

    fn open(id: u32) -> Frame {
        Frame::Open {
            stream: StreamId(id),
            op: Op::Read,
            options: OpenOptions::default().with_ranges(true),
            size: 0,
            name: "v".into(),
        }
    }

    fn ranges(id: u32, last: bool, ranges: &[(u64, u64)]) -> Frame {
        Frame::Ranges {
            stream: StreamId(id),
            last,
            ranges: ranges.iter().map(|&(o, l)| Range::new(o, l)).collect(),
        }
    }

    /// Everything the server says back, decoded.
    fn replies(&mut self) -> Vec<Frame> {
        let mut out = Transmit::default();
        self.conn.poll_transmit(self.now, &mut out, usize::MAX);
        let mut bytes = BytesMut::new();
        for s in out.segments() {
            bytes.put_slice(s);
        }
        let _hello = bytes.split_to(engine::proto::frame::HELLO_LEN);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = Frame::decode(&mut bytes, 1 << 20) {
            frames.push(f);
        }
        frames
    }

    fn requested(&mut self) -> Vec<Option<std::sync::Arc<RangeSet>>> {
        let mut out = Vec::new();
        while let Some(e) = self.conn.poll_event() {
            if let Event::OpenRequested { ranges, .. } = e {
                out.push(ranges);
            }
        }
        out
    }
}

#[test]
fn hostile_lists_are_refused_with_their_fault_and_the_connection_goes_on() {
    let cases: [(&[(u64, u64)], &str); 4] = [
        (&[(100, 10), (0, 10)], "overlaps or comes before"),
        (&[(0, 10), (5, 10)], "overlaps or comes before"),
        (&[(7, 0)], "is empty"),
        (&[(u64::MAX, 2)], "overflows"),
    ];
    for (i, (list, fault)) in cases.iter().enumerate() {
        let mut raw = Raw::new();
        let id = 2 * i as u32 + 1;
        // The list's first frame is good, the fault is in the second; frames after it drop.
        raw.send(&[
            Raw::open(id),
            Raw::ranges(id, false, &[(0, 1)]),
            Raw::ranges(id, false, list),
            Raw::ranges(id, true, &[(u64::MAX - 10, 1)]),
        ]);
        assert!(
            raw.requested().is_empty(),
            "{fault}: never reaches the provider"
        );
        assert!(!raw.conn.is_closed(), "{fault}: {:?}", raw.conn.error());
        let reject = raw.replies().into_iter().find_map(|f| match f {
            Frame::Reject {
                reason, message, ..
            } => Some((reason, message)),
            _ => None,
        });
        let (reason, message) = reject.expect(fault);
        assert_eq!(reason, Reason::Protocol);
        assert!(message.contains(fault), "{message:?} should say {fault:?}");
    }
}

#[test]
fn a_list_longer_than_the_limit_is_refused() {
    let mut raw = Raw::new();
    let per_frame: Vec<Vec<(u64, u64)>> = (0..MAX_RANGES as u64 + 1)
        .map(|i| (i * 2, 1))
        .collect::<Vec<_>>()
        .chunks(255)
        .map(<[_]>::to_vec)
        .collect();
    let n = per_frame.len();
    let mut frames = vec![Raw::open(1)];
    for (i, part) in per_frame.iter().enumerate() {
        frames.push(Raw::ranges(1, i + 1 == n, part));
    }
    raw.send(&frames);
    assert!(raw.requested().is_empty());
    assert!(!raw.conn.is_closed());
    let refused = raw.replies().into_iter().any(
        |f| matches!(f, Frame::Reject { message, .. } if message.contains("more than the limit")),
    );
    assert!(refused);
    // Exactly the limit is fine.
    let mut raw = Raw::new();
    let full: Vec<(u64, u64)> = (0..MAX_RANGES as u64).map(|i| (i * 2, 1)).collect();
    let parts: Vec<_> = full.chunks(255).collect();
    let mut frames = vec![Raw::open(1)];
    for (i, part) in parts.iter().enumerate() {
        frames.push(Raw::ranges(1, i + 1 == parts.len(), part));
    }
    raw.send(&frames);
    let requested = raw.requested();
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0].as_ref().unwrap().len(), MAX_RANGES);
}

#[test]
fn misuse_of_ranges_ends_the_connection() {
    // RANGES for a stream that announced none.
    let mut raw = Raw::new();
    raw.send(&[
        Frame::Open {
            stream: StreamId(1),
            op: Op::Read,
            options: OpenOptions::default(),
            size: 0,
            name: "v".into(),
        },
        Raw::ranges(1, true, &[(0, 1)]),
    ]);
    assert!(
        matches!(raw.conn.error(), Some(ConnError::Protocol(m)) if m.contains("announced none"))
    );
    // The RANGES flag on a WRITE.
    let mut raw = Raw::new();
    raw.send(&[Frame::Open {
        stream: StreamId(1),
        op: Op::Write,
        options: OpenOptions::default().with_ranges(true),
        size: 10,
        name: "v".into(),
    }]);
    assert!(matches!(raw.conn.error(), Some(ConnError::Protocol(m)) if m.contains("only a READ")));
    // A second list after the first was complete.
    let mut raw = Raw::new();
    raw.send(&[
        Raw::open(1),
        Raw::ranges(1, true, &[(0, 1)]),
        Raw::ranges(1, true, &[(5, 1)]),
    ]);
    assert!(raw.conn.is_closed());
}

#[test]
fn the_flag_without_the_feature_ends_the_connection() {
    let now = Instant::now();
    let config = Config {
        features: Features(Features::SPARSE.0 | Features::DIGEST.0),
        ..Config::default()
    };
    let mut raw = Raw {
        conn: Connection::new(Side::Server, config, now),
        now,
    };
    let mut hello = BytesMut::new();
    Hello {
        version_min: 1,
        version_max: 1,
        features: Features::ALL,
        max_frame: 1 << 20,
        stream_window: 1 << 20,
        conn_window: 1 << 24,
        max_streams: 16,
    }
    .encode(&mut hello);
    raw.feed(&hello);
    raw.send(&[Raw::open(1), Raw::ranges(1, true, &[(0, 1)])]);
    assert!(
        matches!(raw.conn.error(), Some(ConnError::Protocol(m)) if m.contains("not negotiated"))
    );
}

/// The server's identity of a volume reaches the client in ACCEPT; a peer without feature
/// IDENTITY gets none (and is not sent the flag), and an identity the client did not agree to
/// is a protocol error.
#[test]
fn accept_carries_the_identity_only_where_agreed() {
    use engine::VolumeIdentity;
    let id = VolumeIdentity::new(vec![0x42; 32]).unwrap();
    let accepted = |pair: &Pair| {
        pair.client.events.iter().find_map(|(_, e)| match e {
            Event::Accepted { identity, .. } => Some(identity.clone()),
            _ => None,
        })
    };
    let mut pair = serving(Volume::data(MIB));
    pair.server.identities.insert("v".into(), id.clone());
    let s = pair.client.download("v", SinkPolicy::Immediate).unwrap();
    assert!(pair.settle(10_000));
    assert!(matches!(pair.client.end(s), Some(End::Completed(_))));
    assert_eq!(accepted(&pair), Some(Some(id.clone())));

    let mut config = Config::default();
    config.features = config.features.without(Features::IDENTITY);
    let mut pair = Pair::new(config, Config::default());
    pair.connect();
    pair.server.volumes.insert("v".into(), Volume::data(MIB));
    pair.server.identities.insert("v".into(), id);
    let s = pair.client.download("v", SinkPolicy::Immediate).unwrap();
    assert!(pair.settle(10_000));
    assert!(matches!(pair.client.end(s), Some(End::Completed(_))));
    assert_eq!(
        accepted(&pair),
        Some(None),
        "an old server sends no identity"
    );
}

#[test]
fn an_unasked_identity_ends_the_connection() {
    let now = Instant::now();
    let config = Config {
        features: Config::default().features.without(Features::IDENTITY),
        ..Config::default()
    };
    let mut raw = Raw {
        conn: Connection::new(Side::Client, config, now),
        now,
    };
    let mut hello = BytesMut::new();
    Hello {
        version_min: 1,
        version_max: 1,
        features: Features::ALL,
        max_frame: 1 << 20,
        stream_window: 1 << 20,
        conn_window: 1 << 24,
        max_streams: 16,
    }
    .encode(&mut hello);
    raw.feed(&hello);
    let id = raw
        .conn
        .open_stream(Op::Read, "v", OpenOptions::default(), 0)
        .unwrap();
    raw.send(&[Frame::Accept {
        stream: id,
        size: 4096,
        identity: engine::VolumeIdentity::new(vec![1; 16]),
    }]);
    assert!(
        matches!(raw.conn.error(), Some(ConnError::Protocol(m)) if m.contains("identity")),
        "{:?}",
        raw.conn.error()
    );
}
