//! `Frame::decode` in a loop over arbitrary bytes, with a fixed body limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use volstream_fuzz::{decode_frames, DECODE_MAX};

fuzz_target!(|data: &[u8]| {
    decode_frames(data, DECODE_MAX);
});
