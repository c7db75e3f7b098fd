//! Our NBD server fed arbitrary client bytes: the handshake, then requests its host answers.

#![no_main]

use libfuzzer_sys::fuzz_target;
// Included, not through the library: the engine's tests include that library, and know
// nothing of the nbd crate.
#[path = "../src/nbd.rs"]
mod harness;

use harness::{drive_server, PIECES};

fuzz_target!(|data: &[u8]| {
    drive_server(data, PIECES);
});
