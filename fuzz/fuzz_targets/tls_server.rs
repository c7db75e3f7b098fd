//! The server side of the engine's TLS transport fed arbitrary peer bytes (garbage, truncated
//! and mangled records) over a socket pair, read and flushed as the loop does. It must never
//! panic nor hand the protocol core plaintext that no authenticated peer sent.

#![no_main]

use engine::event_loop::tls::{drive_server, ServerOutcome};
use engine::{AllowList, Credentials, TlsConfig};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// A self-signed certificate serving as CA and server certificate: the fuzzer never gets far
/// enough for the chain to matter, only for the server to need one.
fn config() -> &'static TlsConfig {
    static CONFIG: OnceLock<TlsConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = made.cert.pem();
        let key = made.signing_key.serialize_pem();
        let credentials = Credentials::from_pem(&cert, Some((&cert, &key))).unwrap();
        TlsConfig::new(&credentials, AllowList::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let ServerOutcome::Ended { plaintext } = drive_server(config(), data) {
        assert_eq!(plaintext, 0, "plaintext from an unauthenticated peer");
    }
});
