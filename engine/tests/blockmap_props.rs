//! Property tests of the block digest document (engine::blockmap): every valid document
//! round-trips however it is cut, and any bytes either decode canonically or are refused (the
//! checks of the fuzz target's harness).

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod harness;

use engine::blockmap::{self, BlockMapDecoder, BlockMapHeader, BlockRecord, BLOCK_SIZE};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn arb_document() -> impl Strategy<Value = (BlockMapHeader, Vec<BlockRecord>)> {
    (0u64..(1 << 40)).prop_flat_map(|len| {
        let header = BlockMapHeader::new(len);
        let blocks = header.blocks();
        let record = (0..blocks.max(1), any::<[u8; 32]>());
        proptest::collection::vec(record, 0..if blocks == 0 { 1 } else { 64 }).prop_map(
            move |records| {
                let unique: BTreeMap<u64, [u8; 32]> =
                    records.into_iter().filter(|(i, _)| *i < blocks).collect();
                let records = unique
                    .into_iter()
                    .map(|(index, digest)| BlockRecord { index, digest })
                    .collect();
                (header, records)
            },
        )
    })
}

proptest! {
    #[test]
    fn documents_round_trip_in_any_pieces(
        (header, records) in arb_document(),
        cuts in proptest::collection::vec(1usize..100, 1..20),
    ) {
        let bytes = blockmap::encode(&header, &records);
        prop_assert_eq!(bytes.len(), blockmap::HEADER_LEN + blockmap::RECORD_LEN * records.len());
        let mut decoder = BlockMapDecoder::new();
        let mut got = Vec::new();
        let mut rest = &bytes[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*cut).min(rest.len()));
            decoder.feed(now, |r| got.push(r)).unwrap();
            rest = later;
        }
        prop_assert_eq!(decoder.finish().unwrap(), header);
        prop_assert_eq!(&got, &records);
        prop_assert_eq!(harness::decode_block_map(&bytes), Some(records.len()));
    }

    #[test]
    fn any_bytes_decode_canonically_or_are_refused(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        harness::decode_block_map(&bytes);
    }

    #[test]
    fn a_changed_byte_of_a_document_is_caught_or_harmless(
        (header, records) in arb_document(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = blockmap::encode(&header, &records);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        // Whatever it decodes to is a valid document (the harness checks order, bounds and
        // canonical form); the block size is never anything but 64 KiB.
        if let Ok((h, _)) = blockmap::decode(&bytes) {
            prop_assert_eq!(h.block_size, BLOCK_SIZE);
        }
        harness::decode_block_map(&bytes);
    }
}
