//! A DIGESTS stream's content (a block digest document) from a peer, arbitrary bytes, fed
//! whole and in pieces.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    volstream_fuzz::decode_block_map(data);
});
