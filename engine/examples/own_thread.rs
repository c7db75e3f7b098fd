//! Embedding mode 1: the engine runs its own loop thread; the host talks to it through a
//! cloneable, `Send` handle from any thread.
//!
//! Run: `cargo run -p volstream-engine --example own_thread`

use engine::proto::OpenOptions;
use engine::synthetic::{Synthetic, SyntheticProvider};
use engine::{Address, Engine, EngineConfig};
use std::sync::Arc;

fn main() -> std::io::Result<()> {
    let socket = std::env::temp_dir().join(format!("volstream-example-{}", std::process::id()));
    let _ = std::fs::remove_file(&socket);

    // The serving side: the host's provider decides which names exist (access control).
    let mut provider = SyntheticProvider::default();
    let volume = Synthetic::new(1, 64 << 20, 0.5);
    provider.insert("disk0", volume.clone());
    let (server, server_thread) = Engine::spawn(EngineConfig::default())?;
    let (_, addr) = server.listen(&Address::Unix(socket), Arc::new(provider))?;

    // The client side, driven from two host threads through clones of one handle.
    let (client, client_thread) = Engine::spawn(EngineConfig::default())?;
    let conn = client.connect(&addr)?;
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            let volume = volume.clone();
            std::thread::spawn(move || {
                let rx = client.download(
                    conn,
                    "disk0",
                    OpenOptions::default(),
                    Box::new(volume.verifier()),
                );
                rx.recv().expect("report")
            })
        })
        .collect();
    for worker in workers {
        let report = worker.join().unwrap();
        println!(
            "{}: {:?}, {} data bytes, {} hole bytes in {:?}",
            report.name,
            report.result,
            report.stats.data_bytes,
            report.stats.hole_bytes,
            report.elapsed
        );
    }
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();
    Ok(())
}
