//! Our NBD client fed arbitrary server bytes: the handshake, then replies to the requests it
//! keeps in flight.

#![no_main]

use libfuzzer_sys::fuzz_target;
// Included, not through the library: the engine's tests include that library, and know
// nothing of the nbd crate.
#[path = "../src/nbd.rs"]
mod harness;

use harness::{drive_client, PIECES};

fuzz_target!(|data: &[u8]| {
    drive_client(data, PIECES);
});
