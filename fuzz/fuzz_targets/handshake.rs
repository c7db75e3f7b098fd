//! A server-side `Connection` fed arbitrary peer bytes (handshake first, then frames) through
//! `input_buffer`/`handle_input`, with a driver that answers its events and drains its output.

#![no_main]

use libfuzzer_sys::fuzz_target;
use volstream_fuzz::{drive_server, PIECES};

fuzz_target!(|data: &[u8]| {
    drive_server(data, PIECES);
});
