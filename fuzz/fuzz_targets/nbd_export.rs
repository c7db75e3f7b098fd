//! The export server of `serve --nbd` as a whole (loop, connection, disk work) fed one
//! client's arbitrary bytes over a real socket.

#![no_main]

use libfuzzer_sys::fuzz_target;
#[path = "../src/nbd_export.rs"]
mod harness;

use harness::{drive_export, PIECES};

fuzz_target!(|data: &[u8]| {
    drive_export(data, PIECES);
});
