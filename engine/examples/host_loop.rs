//! Embedding mode 2: the host runs its own poll loop, watches the engine's file descriptor next
//! to its own, and calls the non-blocking `Engine::turn` when it is readable or a deadline
//! passed.
//!
//! Run: `cargo run -p volstream-engine --example host_loop`

use engine::event_loop::{Endpoint, Transfer};
use engine::proto::OpenOptions;
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{Address, Engine, EngineConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let socket = std::env::temp_dir().join(format!("volstream-hostloop-{}", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut provider = SyntheticProvider::default();
    let volumes: Vec<Synthetic> = (0..4).map(|i| Synthetic::new(i, 16 << 20, 0.5)).collect();
    for (i, v) in volumes.iter().enumerate() {
        provider.insert(format!("disk{i}"), v.clone());
    }
    // Both engines live on this one thread, driven by the host's loop below.
    let mut server = Engine::new(EngineConfig::default())?;
    let (_, addr) = server.listen(&Address::Unix(socket), Arc::new(provider))?;
    let mut client = Engine::new(EngineConfig::default())?;
    let conn = client.connect(&addr)?;

    let finished = Arc::new(AtomicUsize::new(0));
    for (i, v) in volumes.iter().enumerate() {
        let finished = Arc::clone(&finished);
        client.submit(
            conn,
            Transfer {
                op: engine::proto::Op::Read,
                name: format!("disk{i}"),
                options: OpenOptions::default(),
                ranges: None,
                endpoint: Endpoint::Writer(Box::new(v.verifier())),
                on_done: Box::new(move |report| {
                    println!("{}: {:?}", report.name, report.result);
                    finished.fetch_add(1, Ordering::SeqCst);
                }),
            },
        );
    }

    let start = Instant::now();
    while finished.load(Ordering::SeqCst) < volumes.len() {
        host_poll(&[&server, &client], Duration::from_millis(100));
        server.turn(Some(Duration::ZERO))?;
        client.turn(Some(Duration::ZERO))?;
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "transfers stalled"
        );
    }
    println!(
        "all {} transfers done in {:?}",
        volumes.len(),
        start.elapsed()
    );
    Ok(())
}

/// The host's own wait: poll(2) on the engines' descriptors, bounded by their deadlines.
fn host_poll(engines: &[&Engine], max: Duration) {
    let now = Instant::now();
    let wait = engines
        .iter()
        .filter_map(|e| e.next_deadline())
        .map(|d| d.saturating_duration_since(now))
        .fold(max, Duration::min);
    let mut fds: Vec<libc::pollfd> = engines
        .iter()
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: fds is a valid array of pollfd for the duration of the call.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            wait.as_millis() as i32,
        )
    };
}
