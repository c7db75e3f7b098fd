//! The handshake against scripted peers on real sockets: wrong versions, wrong magic, silence.

use bytes::BytesMut;
use engine::proto::frame::{Frame, Hello, HELLO_LEN};
use engine::proto::{Config, Features, Op, OpenOptions, Reason, StreamId};
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{
    Address, Engine, EngineConfig, OpenRequest, Provider, VolumeError, VolumeReader, VolumeWriter,
};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// A provider whose opens wait until the test lets them through (or a minute passes): the
/// server's loop is busy opening a volume for as long as the test wants.
struct GatedProvider {
    inner: SyntheticProvider,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Provider for GatedProvider {
    fn open_read(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        let (lock, cv) = &*self.open;
        let guard = lock.lock().unwrap();
        let _ = cv
            .wait_timeout_while(guard, Duration::from_secs(60), |open| !*open)
            .unwrap();
        self.inner.open_read(request)
    }

    fn open_write(&self, request: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        self.inner.open_write(request)
    }
}

/// Reads until `buf` holds `len` bytes, for at most `within`.
fn read_bytes_until(
    sock: &mut UnixStream,
    buf: &mut BytesMut,
    len: usize,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    while buf.len() < len && Instant::now() < deadline {
        match sock.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    buf.len() >= len
}

/// Reads frames (after the server's Hello) until one matches, for at most `within`.
fn read_frame_until(
    sock: &mut UnixStream,
    buf: &mut BytesMut,
    within: Duration,
    until: impl Fn(&Frame) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        while let Some(frame) = Frame::decode(buf, 1 << 20).expect("the server's frames decode") {
            if until(&frame) {
                return true;
            }
        }
        match sock.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    false
}

/// The PING a side sends with its handshake sizes the peer's windows by the round trip it
/// measures, so the answer must not wait behind work the same input caused: here the OPEN
/// that arrives with the PING keeps the server's loop in the provider until the PONG has
/// been read. A server that answered only after handling all of its input never would.
#[test]
fn a_ping_is_answered_before_the_opens_that_came_with_it_are_handled() {
    let path = socket_path("pong-first");
    let mut inner = SyntheticProvider::default();
    inner.insert("v", Synthetic::new(4, 100_000, 0.0));
    let open = Arc::new((Mutex::new(false), Condvar::new()));
    let provider = GatedProvider {
        inner,
        open: open.clone(),
    };
    let (server, thread) = Engine::spawn(EngineConfig::default()).unwrap();
    server
        .listen(&Address::Unix(path.clone()), Arc::new(provider))
        .unwrap();

    let mut sock = UnixStream::connect(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut input = hello(1, 1);
    let mut frames = BytesMut::new();
    Frame::Ping { data: 77 }.encode(&mut frames);
    Frame::Open {
        stream: StreamId(1),
        op: Op::Read,
        options: OpenOptions::default(),
        size: 0,
        name: "v".into(),
    }
    .encode(&mut frames);
    input.extend_from_slice(&frames);
    sock.write_all(&input).unwrap();

    // The server's Hello, then its PONG, both while the open waits.
    let mut buf = BytesMut::new();
    let hello_came = read_bytes_until(&mut sock, &mut buf, HELLO_LEN, Duration::from_secs(30));
    let answered = hello_came && {
        let _ = buf.split_to(HELLO_LEN);
        read_frame_until(&mut sock, &mut buf, Duration::from_secs(30), |f| {
            *f == Frame::Pong { data: 77 }
        })
    };
    // Let the open through either way, so that the server can stop.
    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    assert!(
        answered,
        "no Hello and PONG while the server was opening the volume"
    );
    // The open then goes ahead as usual.
    assert!(
        read_frame_until(&mut sock, &mut buf, Duration::from_secs(30), |f| matches!(
            f,
            Frame::Accept { stream, .. } if *stream == StreamId(1)
        )),
        "the download was accepted once the open finished"
    );
    drop(sock);
    server.shutdown();
    thread.join().unwrap();
}
