//! `serve --metrics`: a scraper's request head, arbitrary bytes, judged as they arrive.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    volstream_fuzz::metrics_request(data);
});
