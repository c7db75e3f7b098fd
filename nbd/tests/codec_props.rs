//! Property tests: sessions between our client and server deliver exactly the disk's content
//! and map whatever the command mix, split of the byte stream and order of READ chunks; both
//! sides survive arbitrary bytes from the peer; the coverage tracker agrees with a naive model.

mod common;

#[allow(dead_code)]
#[path = "../../fuzz/src/nbd.rs"]
mod harness;

use bytes::Bytes;
use common::*;
use nbd::wire::*;
use nbd::{ClientOptions, Command, ExportInfo};
use proptest::prelude::*;

const DISK: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Read(u64, u32),
    Write(u64, Vec<u8>),
    Zero(u64, u32),
    Status(u64, u32),
}

fn arb_range() -> impl Strategy<Value = (u64, u32)> {
    (0..DISK).prop_flat_map(|o| (Just(o), 1..=((DISK - o).min(70_000) as u32)))
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        arb_range().prop_map(|(o, l)| Op::Read(o, l)),
        (0..DISK - 1)
            .prop_flat_map(|o| {
                let max = (DISK - o).min(9000) as usize;
                (Just(o), prop::collection::vec(any::<u8>(), 1..=max))
            })
            .prop_map(|(o, d)| Op::Write(o, d)),
        arb_range().prop_map(|(o, l)| Op::Zero(o, l)),
        arb_range().prop_map(|(o, l)| Op::Status(o, l)),
    ]
}

fn arb_pieces() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![Just(0usize), 1usize..40, 1usize..70_000], 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sessions_deliver_exactly_the_disk(
        blocks in prop::collection::vec(0u64..64, 0..30),
        ops in prop::collection::vec(arb_op(), 1..24),
        pieces in arb_pieces(),
        shuffle in 0usize..7,
        in_flight in 1usize..6,
        seed in any::<u64>(),
    ) {
        let disk = MemDisk::new(DISK, &blocks, seed);
        let mut model = disk.clone();
        let mut s = Session::new(disk, false, in_flight, &pieces);
        s.shuffle = shuffle;
        // Batches of at most `in_flight`, applied to the model in order (the server carries
        // them out in the order it decodes them).
        for batch in ops.chunks(in_flight) {
            let mut expect = Vec::new();
            for op in batch {
                let (cookie, want) = match op {
                    Op::Read(o, l) => {
                        let c = s.send(Command::Read { offset: *o, len: *l });
                        (c, Some(model.data[*o as usize..(*o + *l as u64) as usize].to_vec()))
                    }
                    Op::Write(o, d) => {
                        let c = s.send(Command::Write { offset: *o, data: Bytes::from(d.clone()), fua: false });
                        model.data[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                        for b in *o / BLOCK..=(*o + d.len() as u64 - 1) / BLOCK {
                            model.hole[b as usize] = false;
                        }
                        (c, None)
                    }
                    Op::Zero(o, l) => {
                        let c = s.send(Command::WriteZeroes { offset: *o, len: *l, no_hole: false, fast: false });
                        model.data[*o as usize..(*o + *l as u64) as usize].fill(0);
                        (c, None)
                    }
                    Op::Status(o, l) => {
                        let c = s.send(Command::BlockStatus { offset: *o, len: *l, req_one: false });
                        (c, None)
                    }
                };
                let status = match op {
                    Op::Status(o, l) => Some(model.extents(*o, *l as u64)),
                    _ => None,
                };
                expect.push((cookie, want, status));
            }
            s.run().unwrap();
            for (cookie, want, status) in expect {
                let out = &s.outcomes[&cookie];
                prop_assert_eq!(&out.result, &Some(Ok(())));
                if let Some(w) = want {
                    prop_assert!(out.content == w, "READ content differs");
                }
                if let Some(st) = status {
                    prop_assert_eq!(&out.extents[&1], &st);
                }
            }
            prop_assert!(s.max_seen_in_flight <= in_flight);
        }
        prop_assert_eq!(s.client.in_flight(), 0);
    }

    #[test]
    fn handshakes_agree(
        name in "[a-z0-9/._-]{0,40}",
        size in 0u64..(1 << 50),
        flags in any::<u16>(),
        want_base in any::<bool>(),
        want_depth in any::<bool>(),
        pieces in arb_pieces(),
    ) {
        let mut contexts = Vec::new();
        if want_base { contexts.push(CONTEXT_BASE_ALLOCATION.to_string()); }
        if want_depth { contexts.push(CONTEXT_ALLOCATION_DEPTH.to_string()); }
        let info = ExportInfo {
            size,
            flags: flags & !FLAG_HAS_FLAGS,
            block_size: nbd::BlockSize::default(),
        };
        let mut pipe = Pipe::new(&pieces);
        let (c, s, c_rest, s_rest) = handshake(
            ClientOptions { export: name.clone(), contexts },
            &|n| { assert_eq!(n, name); Ok(info.clone()) },
            &mut pipe,
        ).unwrap();
        prop_assert_eq!(&c, &s);
        prop_assert!(c_rest.is_empty() && s_rest.is_empty());
        prop_assert_eq!(c.size, size);
        prop_assert_eq!(&c.name, &name);
        prop_assert!(c.flags & FLAG_HAS_FLAGS != 0);
        prop_assert_eq!(c.flags & !FLAG_SEND_FAST_ZERO & !FLAG_HAS_FLAGS,
            info.flags & !FLAG_SEND_FAST_ZERO);
        prop_assert_eq!(c.context(CONTEXT_BASE_ALLOCATION).is_some(), want_base);
        // Our server offers no depth.
        prop_assert_eq!(c.context(CONTEXT_ALLOCATION_DEPTH), None);
    }

    #[test]
    fn the_client_survives_any_server_bytes(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        harness::drive_client(&data, harness::PIECES);
    }

    #[test]
    fn the_client_survives_corrupted_sessions(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let seed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/nbd_client/session.bin")).unwrap();
        let mut data = seed.clone();
        for (i, x) in flips {
            let at = i.index(data.len());
            data[at] ^= x | 1;
        }
        harness::drive_client(&data, harness::PIECES);
    }

    #[test]
    fn the_server_survives_any_client_bytes(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        harness::drive_server(&data, harness::PIECES);
    }

    #[test]
    fn the_server_survives_corrupted_sessions(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let seed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/nbd_server/session.bin")).unwrap();
        let mut data = seed.clone();
        for (i, x) in flips {
            let at = i.index(data.len());
            data[at] ^= x | 1;
        }
        harness::drive_server(&data, harness::PIECES);
    }
}
