//! Property tests of the wire codec (frames, Hello), flow-control accounting and a connection fed
//! hostile input.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod harness;

use bytes::{BufMut, Bytes, BytesMut};
use engine::proto::flow::{RecvWindow, SendCredit, WindowExceeded, HOLE_COST, MAX_CREDIT};
use engine::proto::frame::{HEADER_LEN, HELLO_LEN, MAGIC, MAX_MESSAGE_LEN, MAX_NAME_LEN};
use engine::proto::{
    Connection, DecodeError, Event, Features, Frame, Hello, Op, OpenOptions, Reason, ResumeKey,
    Side, StreamId, Transmit,
};
use engine::{Digest, VolumeIdentity, MAX_IDENTITY_LEN};
use proptest::prelude::*;
use proptest::sample::Index;
use std::io::IoSlice;
use std::time::{Duration, Instant};

// ---- strategies ----

/// Cuts `s` to at most `max` bytes at a char boundary.
fn clip(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 1..=80)
            .prop_map(|c| clip(c.into_iter().collect(), MAX_NAME_LEN)),
        (1..=MAX_NAME_LEN).prop_map(|n| "n".repeat(n)),
        // Multi-byte characters right up to the limit.
        (1..=MAX_NAME_LEN / 3).prop_map(|n| "€".repeat(n)),
    ]
}

fn arb_message() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..=300)
            .prop_map(|c| clip(c.into_iter().collect(), MAX_MESSAGE_LEN)),
        (0..=MAX_MESSAGE_LEN).prop_map(|n| "m".repeat(n)),
    ]
}

/// Reasons as the decoder produces them (a known code is never `Other`).
fn arb_reason() -> impl Strategy<Value = Reason> {
    prop_oneof![0u32..=20, any::<u32>()].prop_map(Reason::from_code)
}

/// No identity, or 1 to `MAX_IDENTITY_LEN` arbitrary bytes.
fn arb_identity() -> impl Strategy<Value = Option<VolumeIdentity>> {
    proptest::option::of(
        proptest::collection::vec(any::<u8>(), 1..=MAX_IDENTITY_LEN)
            .prop_map(|v| VolumeIdentity::new(v).unwrap()),
    )
}

fn arb_stream() -> impl Strategy<Value = StreamId> {
    prop_oneof![1u32..=16, 1..=u32::MAX].prop_map(StreamId)
}

fn arb_payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..300),
        // Around the size where the decoder stops copying payloads and shares the buffer.
        1 => prop::collection::vec(any::<u8>(), 16 * 1024 - 4..16 * 1024 + 4),
    ]
    .prop_map(Bytes::from)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            arb_stream(),
            prop_oneof![Just(Op::Read), Just(Op::Write), Just(Op::Digests)],
            0u16..8192,
            any::<u32>(),
            any::<u64>(),
            arb_name(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(stream, op, flags, zero_granularity, size, name, bytes)| {
                Frame::Open {
                    stream,
                    op,
                    // Each of the known flag bits, set through its setter.
                    options: OpenOptions::default()
                        .with_allocated(flags & 1 != 0)
                        .with_destination_is_zero(flags & 2 != 0)
                        .with_no_extents(flags & 4 != 0)
                        .with_overwrite(flags & 8 != 0)
                        .with_no_sparse(flags & 16 != 0)
                        .with_force_share(flags & 32 != 0)
                        .with_priority(flags & 64 != 0)
                        .with_top_only(flags & 128 != 0)
                        .with_verify(flags & 256 != 0)
                        .with_qcow2(flags & 512 != 0)
                        .with_ranges(flags & 1024 != 0)
                        // The trailers after the name: UPDATE's checksum, RESUME's key.
                        .with_update((flags & 2048 != 0).then_some(bytes))
                        .with_resume((flags & 4096 != 0).then(|| ResumeKey {
                            token: bytes,
                            source: [bytes[0] ^ 0x5a; 32],
                        }))
                        .with_zero_granularity(zero_granularity),
                    size,
                    name,
                }
            }),
        (arb_stream(), any::<u64>(), arb_identity()).prop_map(|(stream, size, identity)| {
            Frame::Accept {
                stream,
                size,
                identity,
            }
        }),
        (arb_stream(), arb_reason(), arb_message()).prop_map(|(stream, reason, message)| {
            Frame::Reject {
                stream,
                reason,
                message,
            }
        }),
        (arb_stream(), any::<u64>(), arb_payload()).prop_map(|(stream, offset, payload)| {
            Frame::Data {
                stream,
                offset,
                payload,
            }
        }),
        (arb_stream(), any::<u64>(), any::<u64>()).prop_map(|(stream, offset, len)| Frame::Hole {
            stream,
            offset,
            len
        }),
        (prop_oneof![Just(StreamId(0)), arb_stream()], any::<u32>())
            .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
        (
            arb_stream(),
            any::<u64>(),
            any::<Option<u32>>(),
            any::<bool>()
        )
            .prop_map(|(stream, length, digest, ack)| Frame::Finish {
                stream,
                length,
                digest,
                ack
            }),
        (arb_stream(), arb_reason(), arb_message()).prop_map(|(stream, reason, message)| {
            Frame::Abort {
                stream,
                reason,
                message,
            }
        }),
        any::<u64>().prop_map(|data| Frame::Ping { data }),
        any::<u64>().prop_map(|data| Frame::Pong { data }),
        (any::<u32>(), arb_reason(), arb_message()).prop_map(|(last, reason, message)| {
            Frame::GoAway {
                last_stream: StreamId(last),
                reason,
                message,
            }
        }),
        // Any ranges round-trip: the codec carries them, the stream validates them.
        (
            arb_stream(),
            any::<bool>(),
            prop::collection::vec((any::<u64>(), any::<u64>()), 1..=255)
        )
            .prop_map(|(stream, last, ranges)| Frame::Ranges {
                stream,
                last,
                ranges: ranges
                    .into_iter()
                    .map(|(o, l)| engine::Range::new(o, l))
                    .collect(),
            }),
    ]
}

fn encode(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    out
}

/// Body length announced in an encoded frame's header.
fn body_len(encoded: &[u8]) -> u32 {
    u32::from_be_bytes(encoded[..4].try_into().unwrap())
}

/// A plausible header with a short random body: reaches the body parser far more often than
/// uniformly random bytes do.
fn arb_raw_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..=13,
        prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![8 => Just(0u16), 1 => any::<u16>()],
        prop_oneof![Just(0u32), 1u32..=4, any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)],
    )
        .prop_map(|(kind, flags, reserved, stream, body, len)| {
            let mut out = Vec::with_capacity(HEADER_LEN + body.len());
            out.put_u32(len.unwrap_or(body.len() as u32));
            out.put_u8(kind);
            out.put_u8(flags);
            out.put_u16(reserved);
            out.put_u32(stream);
            out.extend_from_slice(&body);
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // ---- frames ----

    #[test]
    fn every_frame_round_trips(frame in arb_frame()) {
        let mut buf = encode(&frame);
        let len = buf.len();
        let body = body_len(&buf);
        prop_assert_eq!(len, HEADER_LEN + body as usize);
        prop_assert_eq!(Frame::decode(&mut buf, body), Ok(Some(frame.clone())));
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
        // With any larger limit too.
        let mut buf = encode(&frame);
        prop_assert_eq!(Frame::decode(&mut buf, u32::MAX), Ok(Some(frame)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn frame_sequences_decode_across_any_split(
        frames in prop::collection::vec(arb_frame(), 1..8),
        cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for frame in &frames {
            wire.extend_from_slice(&encode(frame));
            ends.push(wire.len());
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut decoded = Vec::new();
        for cut in cuts {
            buf.extend_from_slice(&wire[fed..cut]);
            fed = cut;
            loop {
                let before = buf.len();
                match Frame::decode(&mut buf, 1 << 20) {
                    Ok(Some(frame)) => decoded.push(frame),
                    Ok(None) => {
                        prop_assert_eq!(buf.len(), before, "partial input was consumed");
                        break;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("valid input refused: {e}"))),
                }
            }
            // Exactly the frames wholly present have come out, and nothing else was consumed.
            let complete = ends.iter().filter(|&&end| end <= fed).count();
            prop_assert_eq!(decoded.len(), complete);
            let consumed = if complete == 0 { 0 } else { ends[complete - 1] };
            prop_assert_eq!(buf.len(), fed - consumed);
        }
        prop_assert_eq!(decoded, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic_or_exceed_the_limit(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max in prop_oneof![0u32..64, 64u32..4096, Just(harness::DECODE_MAX)],
    ) {
        // decode_frames asserts the limit, canonical re-encoding and no consumption on None.
        harness::decode_frames(&bytes, max);
    }

    #[test]
    fn plausible_garbage_never_panics_or_exceeds_the_limit(
        frames in prop::collection::vec(arb_raw_frame(), 1..6),
        max in prop_oneof![0u32..64, Just(1024u32)],
    ) {
        let wire: Vec<u8> = frames.concat();
        harness::decode_frames(&wire, max);
    }

    #[test]
    fn truncated_frames_are_incomplete_or_too_large(
        frame in arb_frame(),
        cut in any::<Index>(),
        max in prop_oneof![Just(u32::MAX), 0u32..2048],
    ) {
        let full = encode(&frame);
        let len = body_len(&full);
        let cut = cut.index(full.len());
        let mut buf = BytesMut::from(&full[..cut]);
        let result = Frame::decode(&mut buf, max);
        if cut >= HEADER_LEN && len > max {
            prop_assert_eq!(result, Err(DecodeError::FrameTooLarge { len, max }));
        } else {
            prop_assert_eq!(result, Ok(None));
            prop_assert_eq!(buf.len(), cut, "truncated input was consumed");
        }
    }

    #[test]
    fn oversized_header_is_refused_from_the_header_alone(
        kind in any::<u8>(),
        flags in any::<u8>(),
        reserved in any::<u16>(),
        stream in any::<u32>(),
        max in prop_oneof![0u32..4096, any::<u32>()],
        excess in 1u32..=u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        prop_assume!(max < u32::MAX);
        let len = max.saturating_add(excess);
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_u8(kind);
        buf.put_u8(flags);
        buf.put_u16(reserved);
        buf.put_u32(stream);
        buf.extend_from_slice(&tail);
        prop_assert_eq!(
            Frame::decode(&mut buf, max),
            Err(DecodeError::FrameTooLarge { len, max })
        );
    }

    #[test]
    fn an_accept_identity_outside_its_bounds_is_refused(
        len in prop_oneof![Just(0usize), (MAX_IDENTITY_LEN + 1)..200],
        flagged in any::<bool>(),
    ) {
        // Without the flag any extra byte is wrong; with it, 1..=MAX_IDENTITY_LEN bytes.
        prop_assume!(flagged || len > 0);
        let mut buf = BytesMut::new();
        buf.put_u32(8 + len as u32);
        buf.put_u8(2);
        buf.put_u8(u8::from(flagged));
        buf.put_u16(0);
        buf.put_u32(2);
        buf.put_u64(1 << 20);
        buf.extend_from_slice(&vec![0xa5; len]);
        prop_assert!(
            matches!(Frame::decode(&mut buf, u32::MAX), Err(DecodeError::BadLength { .. })),
            "{len} bytes of identity, flag {flagged}"
        );
    }

    // ---- Hello ----

    #[test]
    fn hello_round_trips(
        version_min in any::<u16>(),
        version_max in any::<u16>(),
        features in any::<u32>(),
        max_frame in any::<u32>(),
        stream_window in any::<u32>(),
        conn_window in any::<u32>(),
        max_streams in any::<u32>(),
    ) {
        let hello = Hello {
            version_min,
            version_max,
            features: Features(features),
            max_frame,
            stream_window,
            conn_window,
            max_streams,
        };
        let mut out = BytesMut::new();
        hello.encode(&mut out);
        prop_assert_eq!(out.len(), HELLO_LEN);
        prop_assert_eq!(&out[..8], &MAGIC[..]);
        // Field offsets as docs/PROTOCOL.md gives them.
        prop_assert_eq!(&out[8..10], &version_min.to_be_bytes()[..]);
        prop_assert_eq!(&out[10..12], &version_max.to_be_bytes()[..]);
        prop_assert_eq!(&out[12..16], &features.to_be_bytes()[..]);
        prop_assert_eq!(&out[16..20], &max_frame.to_be_bytes()[..]);
        prop_assert_eq!(&out[20..24], &stream_window.to_be_bytes()[..]);
        prop_assert_eq!(&out[24..28], &conn_window.to_be_bytes()[..]);
        prop_assert_eq!(&out[28..32], &max_streams.to_be_bytes()[..]);
        let bytes: [u8; HELLO_LEN] = out[..].try_into().unwrap();
        prop_assert_eq!(Hello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn hello_with_bad_magic_is_refused(
        rest in prop::array::uniform24(any::<u8>()),
        at in 0usize..8,
        flip in 1u8..=255,
    ) {
        let mut bytes = [0u8; HELLO_LEN];
        bytes[..8].copy_from_slice(&MAGIC);
        bytes[8..].copy_from_slice(&rest);
        bytes[at] ^= flip;
        prop_assert_eq!(Hello::decode(&bytes), Err(DecodeError::BadMagic));
        // A connection refuses it as soon as the differing byte arrives.
        let mut conn = Connection::new(Side::Server, harness::server_config(), Instant::now());
        conn.input_buffer().extend_from_slice(&bytes[..=at]);
        conn.handle_input(Instant::now());
        prop_assert!(conn.is_closed());
    }
}

// ---- flow control ----

#[derive(Debug, Clone)]
enum FlowOp {
    /// The peer sends a frame costing this much.
    Receive(u64),
    /// The sink finishes this fraction (in 1/256) of what is buffered.
    Release(u8),
}

fn arb_flow_op() -> impl Strategy<Value = FlowOp> {
    prop_oneof![
        3 => prop_oneof![0u64..=64, Just(HOLE_COST), 1u64..=1 << 20, any::<u64>()]
            .prop_map(FlowOp::Receive),
        2 => any::<u8>().prop_map(FlowOp::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn recv_window_accounts_exactly(
        window in prop_oneof![1u32..=64, 8192u32..=1 << 20, Just(u32::MAX)],
        ops in prop::collection::vec(arb_flow_op(), 0..64),
    ) {
        let w = window as u64;
        let mut rw = RecvWindow::new(window);
        // The model: what the peer may still send, what the sink holds, what awaits return.
        let (mut outstanding, mut buffered, mut unreturned) = (w, 0u64, 0u64);
        let (mut consumed, mut returned) = (0u64, 0u64);
        for op in ops {
            match op {
                FlowOp::Receive(cost) => {
                    let result = rw.receive(cost);
                    if cost > outstanding {
                        prop_assert_eq!(result, Err(WindowExceeded { cost, outstanding }));
                    } else {
                        prop_assert_eq!(result, Ok(()));
                        outstanding -= cost;
                        buffered += cost;
                    }
                }
                FlowOp::Release(fraction) => {
                    let cost = buffered * fraction as u64 / 255;
                    buffered -= cost;
                    consumed += cost;
                    unreturned += cost;
                    let increment = rw.release(cost);
                    if unreturned * 2 >= w {
                        prop_assert_eq!(increment, Some(unreturned as u32));
                        returned += unreturned;
                        outstanding += unreturned;
                        unreturned = 0;
                    } else {
                        prop_assert_eq!(increment, None);
                    }
                }
            }
            prop_assert_eq!(rw.buffered(), buffered);
            prop_assert!(rw.buffered() <= w);
            prop_assert_eq!(outstanding + buffered + unreturned, w);
        }
        // Everything the sink consumed is returned, or waiting for the half-window threshold.
        prop_assert_eq!(returned + unreturned, consumed);
        prop_assert!(unreturned * 2 < w);
        // Finishing everything returns all of it, once.
        rw.release(buffered);
        prop_assert_eq!(rw.buffered(), 0);
        let rest = unreturned + buffered;
        if rest * 2 >= w {
            prop_assert!(rw.receive(w).is_ok());
            prop_assert!(rw.receive(1).is_err());
        } else {
            prop_assert!(rw.receive(w - rest).is_ok());
            prop_assert!(rw.receive(1).is_err());
        }
    }

    /// A sender that spends only the credit it has, against a receiver whose WINDOW increments
    /// are delivered at once: the receiver never sees a violation, the sender's credit never
    /// overflows, and credit returned equals credit consumed.
    #[test]
    fn sender_and_receiver_stay_in_step(
        window in prop_oneof![1u32..=64, 8192u32..=1 << 20, Just(u32::MAX)],
        ops in prop::collection::vec(arb_flow_op(), 0..64),
    ) {
        let mut credit = SendCredit::new(window);
        let mut rw = RecvWindow::new(window);
        let (mut sent, mut released, mut granted) = (0u64, 0u64, 0u64);
        for op in ops {
            match op {
                FlowOp::Receive(cost) => {
                    let cost = cost.min(credit.available());
                    credit.spend(cost);
                    prop_assert_eq!(rw.receive(cost), Ok(()));
                    sent += cost;
                }
                FlowOp::Release(fraction) => {
                    let cost = rw.buffered() * fraction as u64 / 255;
                    released += cost;
                    if let Some(increment) = rw.release(cost) {
                        prop_assert!(increment as u64 * 2 >= window as u64);
                        prop_assert_eq!(credit.grant(increment), Ok(()));
                        granted += increment as u64;
                    }
                }
            }
            prop_assert!(credit.available() <= window as u64);
            prop_assert_eq!(rw.buffered(), sent - released);
            let unreturned = released - granted;
            prop_assert_eq!(credit.available() + rw.buffered() + unreturned, window as u64);
            // Whatever the sender may still send, the receiver accepts; one unit more it refuses.
            let mut probe = rw;
            prop_assert_eq!(probe.receive(credit.available()), Ok(()));
            prop_assert!(probe.receive(1).is_err());
        }
    }

    /// A tuned window against a sender that spends what it has, with the sink's pace, the
    /// round trip and the memory the connection can spare all varying: the books balance
    /// (credit + held + unreturned = size), the size stays between the initial window and
    /// both the maximum and the cap, the peer never overruns it, and a sink that has consumed
    /// everything never leaves the sender without credit.
    #[test]
    fn a_tuned_window_stays_bounded_and_live(
        initial in 8192u32..=4 << 20,
        max_factor in 1u64..=64,
        ops in prop::collection::vec(
            (arb_flow_op(), 0u64..=100_000, prop::option::of(1u64..=200_000), any::<u8>()),
            0..200,
        ),
    ) {
        let max = initial as u64 * max_factor;
        let start = Instant::now();
        let mut now = start;
        let mut credit = SendCredit::new(initial);
        let mut rw = RecvWindow::new(initial);
        let mut ceiling = initial as u64;
        for (op, advance_us, rtt_us, cap_share) in ops {
            now += Duration::from_micros(advance_us);
            match op {
                FlowOp::Receive(cost) => {
                    let cost = cost.min(credit.available());
                    credit.spend(cost);
                    prop_assert_eq!(rw.receive(cost), Ok(()));
                }
                FlowOp::Release(fraction) => {
                    let cost = rw.buffered() * fraction as u64 / 255;
                    // The connection may lend between nothing more and the whole maximum.
                    let cap = rw.size() + (max - rw.size().min(max)) * cap_share as u64 / 255;
                    ceiling = ceiling.max(cap.min(max));
                    let rtt = rtt_us.map(Duration::from_micros);
                    if let Some(increment) = rw.release_at(cost, now, rtt, cap) {
                        prop_assert!(increment as u64 * 2 >= rw.size());
                        prop_assert_eq!(credit.grant(increment), Ok(()));
                    }
                    if rw.buffered() == 0 {
                        prop_assert!(credit.available() > 0, "everything consumed, no credit");
                    }
                }
            }
            prop_assert!(rw.size() >= initial as u64 && rw.size() <= max);
            prop_assert!(rw.size() <= ceiling, "grew past every cap given");
            prop_assert!(credit.available() + rw.buffered() <= rw.size());
            let mut probe = rw;
            prop_assert_eq!(probe.receive(credit.available()), Ok(()));
            prop_assert!(probe.receive(1).is_err());
        }
    }

    #[test]
    fn send_credit_refuses_overflow(
        initial in any::<u32>(),
        grants in prop::collection::vec(any::<u32>(), 0..16),
    ) {
        let mut credit = SendCredit::new(initial);
        let mut model = initial as u64;
        for g in grants {
            let result = credit.grant(g);
            if model + g as u64 > MAX_CREDIT {
                prop_assert!(result.is_err());
            } else {
                prop_assert!(result.is_ok());
                model += g as u64;
            }
            prop_assert_eq!(credit.available(), model);
            credit.spend(model / 3);
            model -= model / 3;
        }
    }

    #[test]
    fn digest_folds_zero_runs_like_zero_bytes(
        parts in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64).prop_map(Ok),
                (0u64..5000).prop_map(Err),
            ],
            0..8,
        ),
    ) {
        let mut folded = Digest::new();
        let mut plain = Digest::new();
        let mut flat = Vec::new();
        for part in parts {
            match part {
                Ok(bytes) => {
                    folded.update(&bytes);
                    plain.update(&bytes);
                    flat.extend_from_slice(&bytes);
                }
                Err(zeroes) => {
                    folded.update_zeroes(zeroes);
                    plain.update(&vec![0; zeroes as usize]);
                    flat.resize(flat.len() + zeroes as usize, 0);
                }
            }
        }
        prop_assert_eq!(folded, plain);
        prop_assert_eq!(folded.value(), crc32c::crc32c(&flat));
        prop_assert_eq!(folded.len(), flat.len() as u64);
    }
}

// ---- a connection fed hostile input ----

/// Frames a client could plausibly send the server, with stream ids, offsets and sizes from small
/// ranges so that streams really open, receive content in and out of order, and finish.
fn arb_peer_frame() -> impl Strategy<Value = Frame> {
    let stream = || {
        prop_oneof![
            4 => (0u32..4).prop_map(|n| StreamId(2 * n + 1)),
            1 => (1u32..=8).prop_map(StreamId),
        ]
    };
    let name = || prop_oneof![Just("vol".to_owned()), Just("x".to_owned()), arb_name()];
    let offset = || prop_oneof![Just(0u64), 0u64..256, any::<u64>()];
    let size = || prop_oneof![0u64..256, Just(harness::SOURCE_LEN), any::<u64>()];
    prop_oneof![
        3 => (stream(), any::<bool>(), size(), name())
            .prop_map(|(stream, write, size, name)| Frame::Open {
                stream,
                op: if write { Op::Write } else { Op::Read },
                options: OpenOptions::default(),
                size,
                name,
            }),
        4 => (stream(), offset(), prop::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(stream, offset, payload)| Frame::Data {
                stream,
                offset,
                payload: payload.into(),
            }),
        2 => (stream(), offset(), prop_oneof![0u64..256, any::<u64>()])
            .prop_map(|(stream, offset, len)| Frame::Hole { stream, offset, len }),
        2 => (
            prop_oneof![Just(StreamId(0)), stream()],
            prop_oneof![0u32..=65_536, any::<u32>()],
        )
            .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
        2 => (stream(), size(), any::<Option<u32>>(), any::<bool>())
            .prop_map(|(stream, length, digest, ack)| Frame::Finish {
                stream,
                length,
                digest,
                ack,
            }),
        1 => (stream(), arb_reason()).prop_map(|(stream, reason)| Frame::Abort {
            stream,
            reason,
            message: "stop".into(),
        }),
        1 => (stream(), arb_reason()).prop_map(|(stream, reason)| Frame::Reject {
            stream,
            reason,
            message: String::new(),
        }),
        1 => (stream(), any::<u64>(), arb_identity()).prop_map(|(stream, size, identity)| {
            Frame::Accept {
                stream,
                size,
                identity,
            }
        }),
        1 => any::<u64>().prop_map(|data| Frame::Ping { data }),
        1 => any::<u64>().prop_map(|data| Frame::Pong { data }),
        1 => (0u32..8, arb_reason()).prop_map(|(last, reason)| Frame::GoAway {
            last_stream: StreamId(last),
            reason,
            message: String::new(),
        }),
    ]
}

#[derive(Debug, Clone)]
enum PeerInput {
    Frame(Frame),
    Garbage(Vec<u8>),
}

fn hello_bytes(hello: &Hello) -> Vec<u8> {
    let mut out = BytesMut::new();
    hello.encode(&mut out);
    out.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn connection_survives_random_bytes_after_hello(
        garbage in prop::collection::vec(any::<u8>(), 0..4096),
        pieces in prop::collection::vec(1usize..5000, 1..6),
    ) {
        let mut input = hello_bytes(&harness::client_hello());
        input.extend_from_slice(&garbage);
        let outcome = harness::drive_server(&input, &pieces);
        prop_assert!(outcome.connected);
    }

    #[test]
    fn connection_survives_hostile_frame_sequences(
        items in prop::collection::vec(
            prop_oneof![
                30 => arb_peer_frame().prop_map(PeerInput::Frame),
                1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(PeerInput::Garbage),
            ],
            0..40,
        ),
        pieces in prop::collection::vec(prop_oneof![4 => 1usize..=16, 1 => 1usize..100_000], 1..6),
    ) {
        let mut input = hello_bytes(&harness::client_hello());
        for item in &items {
            match item {
                PeerInput::Frame(frame) => input.extend_from_slice(&encode(frame)),
                PeerInput::Garbage(bytes) => input.extend_from_slice(bytes),
            }
        }
        let outcome = harness::drive_server(&input, &pieces);
        prop_assert!(outcome.connected);
    }

    #[test]
    fn input_buffer_stays_bounded_under_a_huge_frame(
        body in prop_oneof![Just(harness::server_config().max_frame), 4096u32..=16 * 1024],
        pieces in prop::collection::vec(1usize..200_000, 1..4),
    ) {
        // A DATA frame of the largest allowed size for an unknown stream, fed slowly: the buffer
        // holds it whole before it is decoded (and refused), but never more than the bound.
        let mut input = hello_bytes(&harness::client_hello());
        let mut header = BytesMut::new();
        engine::proto::frame::encode_data_header(&mut header, StreamId(1), 0, body as usize - 8);
        input.extend_from_slice(&header);
        input.resize(input.len() + body as usize - 8, 0xAB);
        input.extend_from_slice(&input.clone()[HELLO_LEN..]);
        let outcome = harness::drive_server(&input, &pieces);
        prop_assert!(outcome.connected);
        prop_assert!(matches!(outcome.error, Some(Some(_))), "{:?}", outcome.error);
    }
}

// ---- a connection fed mostly valid sessions ----

#[derive(Debug, Clone)]
enum Part {
    Data(usize),
    Hole(u64),
}

/// A client uploading to stream `id`: OPEN, content in order, FINISH. Also returns how the server
/// should end the stream: `Some(true)` completed, `Some(false)` aborted (bad digest), `None`
/// rejected (the server rejects names starting with 'x').
fn arb_upload(id: u32) -> impl Strategy<Value = (Vec<Frame>, Option<bool>)> {
    (
        prop::collection::vec(
            prop_oneof![
                (1usize..300).prop_map(Part::Data),
                prop_oneof![1u64..100, 1u64..1 << 40].prop_map(Part::Hole),
            ],
            0..6,
        ),
        any::<bool>(),
        prop_oneof![6 => Just(true), 1 => Just(false)],
        prop_oneof![8 => Just(false), 1 => Just(true)],
    )
        .prop_map(move |(parts, with_digest, digest_ok, rejected)| {
            let stream = StreamId(id);
            let size = parts
                .iter()
                .map(|p| match p {
                    Part::Data(n) => *n as u64,
                    Part::Hole(n) => *n,
                })
                .sum();
            let name = if rejected { "xvol" } else { "vol" };
            let mut frames = vec![Frame::Open {
                stream,
                op: Op::Write,
                options: OpenOptions::default(),
                size,
                name: name.into(),
            }];
            if rejected {
                return (frames, None);
            }
            let mut digest = Digest::new();
            let mut offset = 0;
            for part in parts {
                match part {
                    Part::Data(n) => {
                        let payload: Vec<u8> =
                            (0..n).map(|i| (offset as usize + i) as u8).collect();
                        digest.update(&payload);
                        frames.push(Frame::Data {
                            stream,
                            offset,
                            payload: payload.into(),
                        });
                        offset += n as u64;
                    }
                    Part::Hole(len) => {
                        digest.update_zeroes(len);
                        frames.push(Frame::Hole {
                            stream,
                            offset,
                            len,
                        });
                        offset += len;
                    }
                }
            }
            let value = digest.value() ^ u32::from(!digest_ok);
            frames.push(Frame::Finish {
                stream,
                length: size,
                digest: with_digest.then_some(value),
                ack: false,
            });
            (frames, Some(digest_ok || !with_digest))
        })
}

/// A client downloading on stream `id`: OPEN, maybe WINDOW, then the FINISH acknowledgement
/// (the server sends the whole source as soon as it accepts).
fn arb_download(id: u32) -> impl Strategy<Value = (Vec<Frame>, Option<bool>)> {
    (any::<bool>(), 0u32..65_536).prop_map(move |(window, increment)| {
        let stream = StreamId(id);
        let mut frames = vec![Frame::Open {
            stream,
            op: Op::Read,
            options: OpenOptions::default(),
            size: 0,
            name: "disk".into(),
        }];
        if window {
            frames.push(Frame::Window { stream, increment });
        }
        frames.push(Frame::Finish {
            stream,
            length: harness::SOURCE_LEN,
            digest: None,
            ack: true,
        });
        (frames, Some(true))
    })
}

fn arb_script(id: u32) -> impl Strategy<Value = (Vec<Frame>, Option<bool>)> {
    prop_oneof![3 => arb_upload(id), 1 => arb_download(id)]
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(Frame),
    Delete,
    Duplicate,
    Garbage(Vec<u8>),
}

fn arb_mutation() -> impl Strategy<Value = (Index, Mutation)> {
    (
        any::<Index>(),
        prop_oneof![
            3 => arb_peer_frame().prop_map(Mutation::Insert),
            1 => Just(Mutation::Delete),
            1 => Just(Mutation::Duplicate),
            1 => prop::collection::vec(any::<u8>(), 1..24).prop_map(Mutation::Garbage),
        ],
    )
}

/// Interleaves the scripts (keeping each one's order) as `order` picks. Streams open in script
/// order, as new stream ids must increase.
fn interleave(scripts: &[Vec<Frame>], order: &[Index]) -> Vec<Frame> {
    let mut cursors = vec![0; scripts.len()];
    let mut out = Vec::new();
    for i in 0.. {
        let live: Vec<usize> = (0..scripts.len())
            .filter(|&s| cursors[s] < scripts[s].len())
            .filter(|&s| cursors[s] > 0 || cursors[..s].iter().all(|&c| c > 0))
            .collect();
        if live.is_empty() {
            break;
        }
        let pick = if order.is_empty() {
            live[0]
        } else {
            live[order[i % order.len()].index(live.len())]
        };
        out.push(scripts[pick][cursors[pick]].clone());
        cursors[pick] += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Well-behaved sessions on up to four streams, interleaved and read a few bytes at a time:
    /// every stream ends as the client meant it to.
    #[test]
    fn valid_sessions_complete(
        scripts in (1usize..=4).prop_flat_map(|n| {
            (0..n as u32).map(|k| arb_script(2 * k + 1)).collect::<Vec<_>>()
        }),
        order in prop::collection::vec(any::<Index>(), 0..16),
        pieces in prop::collection::vec(1usize..=16, 1..6),
    ) {
        let frames: Vec<Vec<Frame>> = scripts.iter().map(|(f, _)| f.clone()).collect();
        let input = client_bytes(&interleave(&frames, &order));
        let outcome = harness::drive_server(&input, &pieces);
        let completed = scripts.iter().filter(|(_, end)| *end == Some(true)).count();
        let aborted = scripts.iter().filter(|(_, end)| *end == Some(false)).count();
        prop_assert_eq!(outcome.opened, scripts.len());
        prop_assert_eq!(outcome.completed, completed, "{:?}", outcome);
        prop_assert_eq!(outcome.aborted, aborted, "{:?}", outcome);
        prop_assert!(
            matches!(outcome.error, Some(Some(engine::proto::ConnError::PeerClosed))),
            "{:?}", outcome
        );
    }

    /// The same sessions with frames inserted, dropped, repeated or replaced by garbage, read in
    /// pieces of any size: no panic, and the harness's invariants hold throughout.
    #[test]
    fn mutated_sessions_never_break_invariants(
        scripts in (1usize..=4).prop_flat_map(|n| {
            (0..n as u32).map(|k| arb_script(2 * k + 1)).collect::<Vec<_>>()
        }),
        order in prop::collection::vec(any::<Index>(), 0..16),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
        pieces in prop::collection::vec(prop_oneof![4 => 1usize..=16, 1 => 1usize..100_000], 1..6),
    ) {
        let frames: Vec<Vec<Frame>> = scripts.iter().map(|(f, _)| f.clone()).collect();
        let mut items: Vec<Vec<u8>> = interleave(&frames, &order)
            .iter()
            .map(|f| encode(f).to_vec())
            .collect();
        for (at, mutation) in mutations {
            let i = at.index(items.len() + 1);
            match mutation {
                Mutation::Insert(frame) => items.insert(i, encode(&frame).to_vec()),
                Mutation::Garbage(bytes) => items.insert(i, bytes),
                Mutation::Delete if i < items.len() => {
                    items.remove(i);
                }
                Mutation::Duplicate if i < items.len() => items.insert(i, items[i].clone()),
                Mutation::Delete | Mutation::Duplicate => {}
            }
        }
        let mut input = hello_bytes(&harness::client_hello());
        input.extend(items.concat());
        let outcome = harness::drive_server(&input, &pieces);
        prop_assert!(outcome.connected);
    }
}

// ---- fixed cases ----

/// Builds a client's bytes: Hello, then `frames`.
fn client_bytes(frames: &[Frame]) -> Vec<u8> {
    let mut input = hello_bytes(&harness::client_hello());
    for frame in frames {
        input.extend_from_slice(&encode(frame));
    }
    input
}

#[test]
fn digest_is_standard_crc32c() {
    // The check value docs/PROTOCOL.md gives.
    let mut d = Digest::new();
    d.update(b"1234");
    d.update(b"56789");
    assert_eq!(d.value(), 0xE306_9283);
    assert_eq!(d.len(), 9);
}

#[test]
fn upload_with_sparse_content_completes() {
    let mut digest = Digest::new();
    digest.update(&[7; 60]);
    digest.update_zeroes(40);
    let input = client_bytes(&[
        Frame::Open {
            stream: StreamId(1),
            op: Op::Write,
            options: OpenOptions::default(),
            size: 100,
            name: "vol".into(),
        },
        Frame::Data {
            stream: StreamId(1),
            offset: 0,
            payload: Bytes::from_static(&[7; 60]),
        },
        Frame::Hole {
            stream: StreamId(1),
            offset: 60,
            len: 40,
        },
        Frame::Finish {
            stream: StreamId(1),
            length: 100,
            digest: Some(digest.value()),
            ack: false,
        },
    ]);
    // The uploader's content must not arrive before the server has seen (and accepted) OPEN.
    let open_end = HELLO_LEN + HEADER_LEN + 16 + 3;
    for pieces in [&[open_end, 1][..], &[open_end, 7, 13], &[open_end, 100_000]] {
        let outcome = harness::drive_server(&input, pieces);
        assert!(outcome.connected);
        assert_eq!(outcome.completed, 1, "{outcome:?}");
        assert_eq!(outcome.aborted, 0, "{outcome:?}");
    }
}

/// Everything the connection has sent since the last call, decoded (its Hello skipped).
fn sent_frames(conn: &mut Connection, now: Instant, hello_seen: &mut bool) -> Vec<Frame> {
    let mut out = Transmit::default();
    conn.poll_transmit(now, &mut out, 1 << 20);
    let mut slices = [IoSlice::new(&[]); 64];
    let n = out.io_slices(&mut slices);
    let mut wire = BytesMut::new();
    for slice in &slices[..n] {
        wire.extend_from_slice(slice);
    }
    if !*hello_seen {
        let _ = wire.split_to(HELLO_LEN);
        *hello_seen = true;
    }
    let mut frames = Vec::new();
    while let Some(frame) = Frame::decode(&mut wire, u32::MAX).unwrap() {
        frames.push(frame);
    }
    assert!(wire.is_empty());
    frames
}

/// Regression: a chunk out of order aborts its stream, and the connection credit it consumed
/// must come back exactly once. It used to come back twice (once with the stream's unconsumed
/// credit, once more explicitly), which granted the peer credit it never spent and made
/// `stats().recv_buffered` underflow (a panic with overflow checks on).
#[test]
fn out_of_order_chunk_returns_connection_credit_once() {
    let config = harness::server_config();
    let now = Instant::now();
    let mut conn = Connection::new(Side::Server, config.clone(), now);
    let mut hello_seen = false;
    let open = |id| Frame::Open {
        stream: StreamId(id),
        op: Op::Write,
        options: OpenOptions::default(),
        size: 1 << 20,
        name: "vol".into(),
    };
    conn.input_buffer()
        .extend_from_slice(&client_bytes(&[open(1)]));
    conn.handle_input(now);
    let mut events = Vec::new();
    while let Some(e) = conn.poll_event() {
        events.push(e);
    }
    assert!(
        matches!(events[1], Event::OpenRequested { .. }),
        "{events:?}"
    );
    conn.accept(StreamId(1), 1 << 20, None);
    // One in-order chunk the sink holds on to, then one out of order: the stream is aborted.
    let chunk = |id, offset, len| Frame::Data {
        stream: StreamId(id),
        offset,
        payload: Bytes::from(vec![1; len]),
    };
    conn.input_buffer()
        .extend_from_slice(&encode(&chunk(1, 0, 10_000)));
    conn.input_buffer()
        .extend_from_slice(&encode(&chunk(1, 12_345, 5_000)));
    conn.handle_input(now);
    let mut aborted = false;
    while let Some(e) = conn.poll_event() {
        aborted |= matches!(
            e,
            Event::Aborted {
                stream: StreamId(1),
                ..
            }
        );
    }
    assert!(aborted);
    assert!(!conn.is_closed());
    // Everything the stream held went back to the connection window.
    assert_eq!(conn.stats().recv_buffered, 0);
    let frames = sent_frames(&mut conn, now, &mut hello_seen);
    assert!(
        frames.iter().any(|f| matches!(
            f,
            Frame::Abort {
                stream: StreamId(1),
                ..
            }
        )),
        "{frames:?}"
    );
    // Another stream's chunk, consumed by its sink, crosses the half-window mark: the WINDOW
    // returns exactly what the peer spent on both streams.
    conn.input_buffer().extend_from_slice(&encode(&open(3)));
    conn.handle_input(now);
    while conn.poll_event().is_some() {}
    conn.accept(StreamId(3), 1 << 20, None);
    conn.input_buffer()
        .extend_from_slice(&encode(&chunk(3, 0, 12_000)));
    conn.handle_input(now);
    let mut chunks = 0;
    while let Some(e) = conn.poll_event() {
        chunks += matches!(
            e,
            Event::Chunk {
                stream: StreamId(3),
                ..
            }
        ) as u64;
    }
    assert_eq!(chunks, 1);
    conn.release(StreamId(3), 1, now);
    assert_eq!(conn.stats().recv_buffered, 0);
    let returned: u64 = sent_frames(&mut conn, now, &mut hello_seen)
        .iter()
        .filter_map(|f| match f {
            Frame::Window { stream, increment } if stream.is_connection() => {
                Some(*increment as u64)
            }
            _ => None,
        })
        .sum();
    assert_eq!(returned, 10_000 + 5_000 + 12_000);
    assert!(returned * 2 >= config.conn_window as u64);
}
