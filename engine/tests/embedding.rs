//! The two embedding modes: a handle used from many host threads, and a host-driven loop.

use engine::event_loop::{Endpoint, Transfer};
use engine::proto::OpenOptions;
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{
    Address, Chunk, Engine, EngineConfig, EngineHandle, EngineSnapshot, Notify, Reason,
    TransferReport, VolumeWriter, WriteProgress,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn socket(tag: &str) -> Address {
    let p = std::env::temp_dir().join(format!("volstream-embed-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    Address::Unix(p)
}

fn provider(volumes: &[Synthetic]) -> Arc<SyntheticProvider> {
    let mut p = SyntheticProvider::default();
    for (i, v) in volumes.iter().enumerate() {
        p.insert(format!("d{i}"), v.clone());
    }
    Arc::new(p)
}

#[test]
fn handle_is_shared_by_host_threads() {
    let volumes: Vec<Synthetic> = (0..8).map(|i| Synthetic::new(i, 2 << 20, 0.4)).collect();
    let (server, st) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&socket("threads"), provider(&volumes))
        .unwrap();
    let (client, ct) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let threads: Vec<_> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let client = client.clone();
            let v = v.clone();
            std::thread::spawn(move || {
                let rx = client.download(
                    conn,
                    &format!("d{i}"),
                    OpenOptions::default(),
                    Box::new(v.verifier()),
                );
                rx.recv_timeout(Duration::from_secs(30)).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().result, Ok(()));
    }
    client.shutdown();
    server.shutdown();
    ct.join().unwrap();
    st.join().unwrap();
}

#[test]
fn host_loop_drives_engines_through_their_fd() {
    let volumes: Vec<Synthetic> = (0..6)
        .map(|i| Synthetic::new(10 + i, 4 << 20, 0.5))
        .collect();
    let mut server = Engine::new(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&socket("hostloop"), provider(&volumes))
        .unwrap();
    let mut client = Engine::new(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let reports: Arc<Mutex<Vec<TransferReport>>> = Arc::default();
    for (i, v) in volumes.iter().enumerate() {
        let reports = Arc::clone(&reports);
        client.submit(
            conn,
            Transfer {
                op: engine::proto::Op::Read,
                name: format!("d{i}"),
                options: OpenOptions::default(),
                ranges: None,
                endpoint: Endpoint::Writer(Box::new(v.verifier())),
                on_done: Box::new(move |r| reports.lock().unwrap().push(r)),
            },
        );
    }
    let start = Instant::now();
    let mut turns_without_readiness = 0;
    while reports.lock().unwrap().len() < volumes.len() {
        assert!(start.elapsed() < Duration::from_secs(30), "stalled");
        let mut fds = [server.as_raw_fd(), client.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let now = Instant::now();
        let wait = [server.next_deadline(), client.next_deadline()]
            .into_iter()
            .flatten()
            .map(|d| d.saturating_duration_since(now).as_millis() as i32)
            .min()
            .unwrap_or(1000);
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        if ready == 0 {
            turns_without_readiness += 1;
        }
        // turn() with a zero timeout never blocks.
        let t = Instant::now();
        server.turn(Some(Duration::ZERO)).unwrap();
        client.turn(Some(Duration::ZERO)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    for r in reports.lock().unwrap().iter() {
        assert_eq!(r.result, Ok(()), "{}", r.name);
        assert!(r.stats.hole_bytes > 0);
    }
    assert!(turns_without_readiness < 100, "the fd signals readiness");
}

#[test]
fn snapshot_counts_failures_by_reason_and_keeps_what_ended_connections_counted() {
    let volume = Synthetic::new(3, 1 << 20, 0.5);
    let (server, st) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&socket("snapshot"), provider(std::slice::from_ref(&volume)))
        .unwrap();
    let (client, ct) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let ok = client.download(
        conn,
        "d0",
        OpenOptions::default(),
        Box::new(volume.verifier()),
    );
    let missing = client.download(
        conn,
        "nope",
        OpenOptions::default(),
        Box::new(volume.verifier()),
    );
    let ok = ok.recv_timeout(Duration::from_secs(30)).unwrap();
    let missing = missing.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(ok.result, Ok(()));
    assert_eq!(missing.result.unwrap_err().reason, Reason::NotFound);

    let live = client.snapshot().unwrap();
    assert_eq!(live.connections.len(), 1);
    let c = &live.connections[0];
    assert_eq!(c.id, conn);
    assert!(c.streams.is_empty(), "both streams ended: {:?}", c.streams);
    assert_eq!(c.stats.streams_completed, 1);
    assert_eq!(c.stats.aborts.get(Reason::NotFound), 1);
    assert_eq!(c.stats.aborts.total(), c.stats.streams_aborted);
    assert_eq!(c.stats.data_bytes_in, ok.stats.data_bytes);
    assert_eq!(c.stats.hole_bytes_in, ok.stats.hole_bytes);
    assert_eq!(c.stats.frames_in.get("HOLE"), Some(ok.stats.hole_frames));
    assert!(ok.first_byte.is_some());

    // Once the connection is gone its counters stay in the totals.
    client.go_away(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ended = loop {
        let s = client.snapshot().unwrap();
        if s.connections.is_empty() {
            break s;
        }
        assert!(Instant::now() < deadline, "connection did not close");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(ended.ended_connections.total(), 1);
    assert_eq!(ended.ended_connections.get(Reason::GoingAway), 1);
    let totals = ended.totals();
    assert_eq!(totals.streams_completed, 1);
    assert_eq!(totals.aborts.get(Reason::NotFound), 1);
    assert_eq!(totals.data_bytes_in, ok.stats.data_bytes);
    assert!(
        totals.bytes_out > c.stats.bytes_out,
        "the GOAWAY counts too"
    );
    assert_eq!(totals.frames_out.get("GOAWAY"), Some(1));
    client.shutdown();
    server.shutdown();
    ct.join().unwrap();
    st.join().unwrap();
}

/// A sink that takes chunks and never finishes them: its stream stays open.
struct Stuck;

impl VolumeWriter for Stuck {
    fn start(&mut self, _size: u64, _notify: Notify) {}
    fn write(&mut self, _chunk: Chunk) {}
    fn poll_progress(&mut self) -> WriteProgress {
        WriteProgress::default()
    }
}

/// Waits until `engine` has no connection left, and returns how they ended.
fn ended(engine: &EngineHandle) -> EngineSnapshot {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = engine.snapshot().unwrap();
        if s.connections.is_empty() {
            return s;
        }
        assert!(Instant::now() < deadline, "the connection did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// docs/PROTOCOL.md: a side that stops with nothing left to do sends GOAWAY GOING_AWAY (the
/// peer sees a clean close); CANCELLED is for transfers cut off.
#[test]
fn shutting_down_after_the_transfers_is_a_graceful_goaway_and_during_them_cancels() {
    let volume = Synthetic::new(4, 8 << 20, 0.2);
    let (server, st) = Engine::spawn(EngineConfig::default()).unwrap();
    let (_, addr) = server
        .listen(&socket("goaway"), provider(std::slice::from_ref(&volume)))
        .unwrap();

    // A finished download, then the client's engine stops.
    let (client, ct) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let done = client.download(
        conn,
        "d0",
        OpenOptions::default(),
        Box::new(volume.verifier()),
    );
    assert_eq!(
        done.recv_timeout(Duration::from_secs(30)).unwrap().result,
        Ok(())
    );
    client.shutdown();
    ct.join().unwrap();
    let after = ended(&server);
    assert_eq!(
        after.ended_connections.get(Reason::GoingAway),
        1,
        "{after:?}"
    );
    assert_eq!(after.ended_connections.total(), 1);
    assert_eq!(after.totals().frames_in.get("GOAWAY"), Some(1));
    assert_eq!(after.totals().aborts.total(), 0);

    // A download still running when the client's engine stops: cut off, and said so.
    let (client, ct) = Engine::spawn(EngineConfig::default()).unwrap();
    let conn = client.connect(&addr).unwrap();
    let cut = client.download(conn, "d0", OpenOptions::default(), Box::new(Stuck));
    let deadline = Instant::now() + Duration::from_secs(30);
    while server
        .snapshot()
        .unwrap()
        .connections
        .iter()
        .all(|c| c.streams.is_empty())
    {
        assert!(Instant::now() < deadline, "the download never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    client.shutdown();
    ct.join().unwrap();
    let report = cut.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(report.result.unwrap_err().reason, Reason::Cancelled);
    // The server never counts it as graceful. It reads the GOAWAY CANCELLED, or, when the
    // client's socket closed with content it had not read (the stuck sink stopped its
    // reading), the reset may reach the server first: then the connection was lost.
    let after = ended(&server);
    let ends = after.ended_connections;
    assert_eq!(ends.get(Reason::GoingAway), 1, "{after:?}");
    assert_eq!(ends.total(), 2, "{after:?}");
    assert_eq!(
        ends.get(Reason::Cancelled) + ends.get(Reason::ConnectionLost),
        1,
        "{after:?}"
    );
    let aborts = after.totals().aborts;
    assert_eq!(aborts.total(), 1, "{after:?}");
    assert_eq!(
        aborts.get(Reason::Cancelled) + aborts.get(Reason::ConnectionLost),
        1,
        "{after:?}"
    );
    server.shutdown();
    st.join().unwrap();
}
