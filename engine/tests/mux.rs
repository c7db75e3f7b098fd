//! Many streams over one connection, end to end through two engines on real sockets.

use engine::proto::OpenOptions;
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{Address, Engine, EngineConfig, EngineHandle};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

fn volume(i: u64) -> Synthetic {
    Synthetic::new(0xC0FFEE + i, MIB, 0.3)
}

fn server(addr: &str, count: u64) -> (EngineHandle, Address, std::thread::JoinHandle<()>) {
    let mut provider = SyntheticProvider::default();
    for i in 0..count {
        provider.insert(format!("vol{i}"), volume(i));
    }
    let (handle, thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, bound) = handle
        .listen(&addr.parse().unwrap(), Arc::new(provider))
        .unwrap();
    (handle, bound, thread)
}

fn unix_addr(tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("volstream-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    format!("unix:{}", dir.display())
}

/// Moves `count` volumes over one connection: even ones downloaded, odd ones uploaded when
/// `mixed`; checks every byte and hole at the sink.
fn many_streams(addr: &str, count: u64, mixed: bool) {
    let (server, bound, server_thread) = server(addr, count);
    let (client, client_thread) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&bound).unwrap();

    let mut pending = Vec::new();
    for i in 0..count {
        let v = volume(i);
        let name = format!("vol{i}");
        if mixed && i % 2 == 1 {
            let rx = client.upload(conn, &name, OpenOptions::default(), Box::new(v.reader()));
            pending.push((i, rx, None));
        } else {
            let verifier = v.verifier();
            let report = verifier.report();
            let rx = client.download(conn, &name, OpenOptions::default(), Box::new(verifier));
            pending.push((i, rx, Some(report)));
        }
    }
    let mut hole_bytes_total = 0;
    for (i, rx, verify) in pending {
        let report = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("volume {i} did not finish"));
        assert_eq!(report.result, Ok(()), "volume {i}");
        let v = volume(i);
        assert_eq!(report.size, v.size);
        assert_eq!(report.stats.data_bytes, v.data_bytes(), "volume {i} data");
        assert_eq!(
            report.stats.hole_bytes,
            v.size - v.data_bytes(),
            "volume {i} holes travel as HOLE frames"
        );
        hole_bytes_total += report.stats.hole_bytes;
        if let Some(verify) = verify {
            assert_eq!(verify.mismatched_bytes.load(Ordering::Relaxed), 0);
            assert_eq!(verify.holes_over_data.load(Ordering::Relaxed), 0);
            assert_eq!(verify.data_bytes.load(Ordering::Relaxed), v.data_bytes());
            assert_eq!(
                verify.hole_bytes.load(Ordering::Relaxed),
                v.size - v.data_bytes()
            );
        }
    }
    assert!(hole_bytes_total > 0, "the generated volumes have holes");
    let stats = client.stats(conn).unwrap().expect("connection still open");
    assert_eq!(stats.streams_completed, count);
    assert_eq!(stats.streams_aborted, 0);
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
}

#[test]
fn five_hundred_streams_over_one_unix_connection() {
    many_streams(&unix_addr("mux500"), 500, false);
}

#[test]
fn five_hundred_streams_over_one_tcp_connection_both_directions() {
    many_streams("tcp:127.0.0.1:0", 500, true);
}
