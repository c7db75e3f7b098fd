//! The handshake against scripted peers on real sockets: wrong versions, wrong magic, silence.

use bytes::BytesMut;
use engine::proto::frame::{Hello, HELLO_LEN};
use engine::proto::{Config, Features, OpenOptions, Reason};
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{Address, Engine, EngineConfig};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

fn socket_path(tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("volstream-hs-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn hello(version_min: u16, version_max: u16) -> Vec<u8> {
    let mut buf = BytesMut::new();
    Hello {
        version_min,
        version_max,
        features: Features::ALL,
        max_frame: 1 << 20,
        stream_window: 1 << 20,
        conn_window: 1 << 24,
        max_streams: 16,
    }
    .encode(&mut buf);
    buf.to_vec()
}

/// A fake server that answers with `reply` and keeps the socket open; the engine client's
/// transfer must fail with `expect` in its message.
fn client_against(tag: &str, reply: Vec<u8>, config: EngineConfig, expect: &[&str]) {
    let path = socket_path(tag);
    let listener = UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&reply).unwrap();
        let mut sink = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let (client, thread) = Engine::spawn(config).unwrap();
    let conn = client.connect(&Address::Unix(path)).unwrap();
    let v = Synthetic::new(1, 4096, 0.0);
    let rx = client.download(conn, "x", OpenOptions::default(), Box::new(v.verifier()));
    let report = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("transfer ends");
    let err = report.result.expect_err("transfer must fail");
    for e in expect {
        assert!(err.message.contains(e), "{:?} lacks {e:?}", err.message);
    }
    client.shutdown();
    thread.join().unwrap();
    fake.join().unwrap();
}

#[test]
fn unsupported_version_names_both_versions() {
    client_against(
        "version",
        hello(7, 9),
        EngineConfig::default(),
        &["7..=9", "1..=1"],
    );
}

#[test]
fn wrong_magic_is_refused() {
    client_against(
        "magic",
        b"SSH-2.0-OpenSSH_9.2\r\n and then some more bytes".to_vec(),
        EngineConfig::default(),
        &["bad magic"],
    );
}

#[test]
fn silent_peer_hits_the_handshake_timeout() {
    let config = EngineConfig {
        connection: Config {
            handshake_timeout: Duration::from_millis(300),
            ..Config::default()
        },
        ..EngineConfig::default()
    };
    client_against("silent", Vec::new(), config, &["no handshake"]);
}

#[test]
fn server_refuses_a_peer_with_another_version_and_keeps_serving() {
    let path = socket_path("server-version");
    let mut provider = SyntheticProvider::default();
    let v = Synthetic::new(3, 100_000, 0.3);
    provider.insert("v", v.clone());
    let (server, thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&Address::Unix(path.clone()), Arc::new(provider))
        .unwrap();

    let mut bad = UnixStream::connect(&path).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(&hello(5, 6)).unwrap();
    let mut got = Vec::new();
    bad.read_to_end(&mut got)
        .expect("server closes the connection");
    assert!(got.len() >= HELLO_LEN, "server sent its hello first");

    // A well-behaved client still gets served.
    let (client, client_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let rx = client.download(conn, "v", OpenOptions::default(), Box::new(v.verifier()));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().result,
        Ok(())
    );
    let missing = client.download(conn, "nope", OpenOptions::default(), Box::new(v.verifier()));
    let err = missing
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .result;
    assert_eq!(err.unwrap_err().reason, Reason::NotFound);
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    thread.join().unwrap();
}
