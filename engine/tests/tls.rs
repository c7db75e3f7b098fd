//! The server side of the TLS transport against hostile peers: garbage, truncated and mangled
//! handshakes, and a peer that stops half way. Each must end the connection (with an alert
//! where TLS allows one), hand the protocol core nothing, and leave the server serving others.

mod common;

use common::{pki, tls, Net};
use engine::event_loop::tls::{drive_server, ServerOutcome};
use engine::proto::OpenOptions;
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{AllowList, Engine, EngineConfig, EngineHandle};
use proptest::prelude::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn server_tls() -> &'static engine::TlsConfig {
    static CONFIG: OnceLock<engine::TlsConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let p = pki();
        tls(&p.ca.pem(), Some(&p.server), AllowList::default())
    })
}

/// The first flight of a real TLS 1.3 client (its ClientHello), as it goes on the wire.
fn client_hello() -> Vec<u8> {
    let p = pki();
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from(p.ca.der());
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    wire
}

fn no_plaintext(outcome: &ServerOutcome) -> bool {
    !matches!(outcome, ServerOutcome::Ended { plaintext } if *plaintext > 0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn garbage_gets_no_plaintext_through(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let outcome = drive_server(server_tls(), &input);
        prop_assert!(no_plaintext(&outcome), "{outcome:?}");
    }

    #[test]
    fn truncated_and_mangled_handshakes_get_no_plaintext_through(
        cut in 0usize..2048,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut input = client_hello();
        input.truncate(cut.min(input.len()));
        for (at, xor) in flips {
            if !input.is_empty() {
                let i = at % input.len();
                input[i] ^= xor;
            }
        }
        input.extend_from_slice(&tail);
        let outcome = drive_server(server_tls(), &input);
        prop_assert!(no_plaintext(&outcome), "{outcome:?}");
    }
}

#[test]
fn a_whole_client_hello_alone_waits_and_a_truncated_one_ends_cleanly() {
    let hello = client_hello();
    // The complete hello, then the end: the server answered and saw the stream end.
    assert_eq!(
        drive_server(server_tls(), &hello),
        ServerOutcome::Ended { plaintext: 0 }
    );
    // A record header announcing more than arrives: the end of the stream ends it too.
    assert_eq!(
        drive_server(server_tls(), &hello[..hello.len() / 2]),
        ServerOutcome::Ended { plaintext: 0 }
    );
    // Not TLS at all: a reason naming it.
    match drive_server(server_tls(), b"VOLSTRM\n plain hello") {
        ServerOutcome::Failed(m) => assert!(m.contains("does not speak TLS"), "{m}"),
        other => panic!("{other:?}"),
    }
}

struct Served {
    handle: EngineHandle,
    addr: std::net::SocketAddr,
    tls_addr: engine::Address,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(handshake_timeout: Duration) -> (Served, Synthetic) {
    let mut config = Net::Tls.server(EngineConfig::default());
    config.connection.handshake_timeout = handshake_timeout;
    let (handle, thread) = Engine::spawn(config).unwrap();
    let volume = Synthetic::new(11, 3 << 20, 0.3);
    let mut provider = SyntheticProvider::default();
    provider.insert("v".to_owned(), volume.clone());
    let (_, bound) = handle
        .listen(&Net::Tls.listen_addr("hostile"), Arc::new(provider))
        .unwrap();
    let addr = bound.socket_addr().unwrap();
    (
        Served {
            handle,
            addr,
            tls_addr: bound,
            thread: Some(thread),
        },
        volume,
    )
}

/// Reads until the server closes; returns what it sent. Fails the test if it never does.
fn read_until_closed(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

fn wait_for_no_connections(handle: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle.engine_stats().unwrap().connections > 0 {
        assert!(Instant::now() < deadline, "connections never dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A download by a well-behaved client still works.
fn good_client_downloads(served: &Served, volume: &Synthetic) {
    let (client, thread) = Engine::spawn(Net::Tls.client(EngineConfig::default())).unwrap();
    let conn = client.connect(&served.tls_addr).unwrap();
    let report = client
        .download(
            conn,
            "v",
            OpenOptions::default(),
            Box::new(volume.verifier()),
        )
        .recv_timeout(Duration::from_secs(60))
        .unwrap();
    assert_eq!(report.result, Ok(()));
    let info = client.info(conn).unwrap();
    client.shutdown();
    thread.join().unwrap();
    if let Some(info) = info {
        assert!(info.tls.unwrap().contains("TLS13_AES_128_GCM_SHA256"));
    }
}

#[test]
fn a_peer_that_stops_mid_handshake_is_dropped_at_the_handshake_timeout() {
    let (served, volume) = serve(Duration::from_millis(400));
    let hello = client_hello();
    let mut stalled = TcpStream::connect(served.addr).unwrap();
    stalled.write_all(&hello[..hello.len() / 2]).unwrap();
    let mut silent = TcpStream::connect(served.addr).unwrap();
    // A whole hello, then silence: the server's answer comes, then nothing more from the peer.
    let mut answered_then_silent = TcpStream::connect(served.addr).unwrap();
    answered_then_silent.write_all(&hello).unwrap();
    assert!(read_until_closed(stalled).is_empty());
    let answer = read_until_closed(answered_then_silent);
    assert_eq!(answer.first(), Some(&0x16), "a ServerHello record first");
    let _ = silent.write_all(b"");
    assert!(read_until_closed(silent).is_empty());
    wait_for_no_connections(&served.handle);
    good_client_downloads(&served, &volume);
}

#[test]
fn garbage_gets_an_alert_and_the_server_goes_on() {
    let (served, volume) = serve(Duration::from_secs(10));
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00][..],
        &[
            0x17, 0x03, 0x03, 0x00, 0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
        ][..],
    ] {
        let mut s = TcpStream::connect(served.addr).unwrap();
        s.write_all(garbage).unwrap();
        let answer = read_until_closed(s);
        // A fatal alert record (or, if the peer's bytes were cut off, the close alone).
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "alert expected: {answer:02x?}"
        );
    }
    wait_for_no_connections(&served.handle);
    good_client_downloads(&served, &volume);
}
