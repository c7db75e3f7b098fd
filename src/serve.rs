//! `serve`: a directory of volumes (and named block devices) on one listening address.

use crate::error::CliError;
use clap::Args;
use engine::{Address, Engine, EngineConfig};
use fdstream::{Backend, DirProvider, HelperOptions};
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct ServeArgs {
    /// Directory whose regular files are the volumes.
    #[arg(long, value_name = "DIR")]
    pool: PathBuf,
    /// Also serve a block device under a name (repeatable).
    #[arg(long = "device", value_name = "NAME=/dev/PATH")]
    devices: Vec<String>,
    /// Where to listen: unix:PATH, tcp:HOST:PORT, or tcp:PORT (loopback).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Skip fdatasync of uploads before confirming them (benchmarks only).
    #[arg(long)]
    no_sync: bool,
    /// Run each volume's reads and writes in a volstream-iohelper process.
    #[arg(long)]
    iohelper: bool,
    /// Read and write volumes with O_DIRECT (bypassing the page cache).
    #[arg(long)]
    direct: bool,
    /// Streams one client may have open at once.
    #[arg(long, default_value_t = 1024)]
    max_streams: u32,
    /// Clients connected at once; more are closed on arrival.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds without a complete frame from a client before it is dropped.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds a stream may make no progress before it is aborted.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    stream_timeout: u64,
}

impl ServeArgs {
    fn engine_config(&self) -> Result<EngineConfig, CliError> {
        if self.max_streams == 0 || self.max_connections == 0 || self.idle_timeout == 0 {
            return Err(CliError::Usage(
                "--max-streams, --max-connections and --idle-timeout must be at least 1".into(),
            ));
        }
        let mut config = EngineConfig {
            max_connections: self.max_connections,
            ..EngineConfig::default()
        };
        let c = &mut config.connection;
        c.max_streams = self.max_streams;
        c.idle_timeout = std::time::Duration::from_secs(self.idle_timeout);
        c.keepalive_interval = c.keepalive_interval.min(c.idle_timeout / 2);
        c.stream_timeout = std::time::Duration::from_secs(self.stream_timeout.max(1));
        Ok(config)
    }
}

pub fn run(args: ServeArgs) -> Result<(), CliError> {
    let addr: Address = args.listen.parse().map_err(CliError::Usage)?;
    // A pool that is not there is a mistake in the command line, not a service that failed.
    match std::fs::metadata(&args.pool) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CliError::Usage(format!(
                "--pool {}: not a directory",
                args.pool.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::Usage(format!(
                "--pool {}: no such directory",
                args.pool.display()
            )))
        }
        Err(_) => {} // DirProvider says what is wrong.
    }
    let mut provider = DirProvider::new(&args.pool).map_err(|e| {
        CliError::Connect(format!("cannot serve pool {}: {e}", args.pool.display()))
    })?;
    for spec in &args.devices {
        let Some((name, path)) = spec.split_once('=') else {
            return Err(CliError::Usage(format!(
                "--device {spec:?}: expected NAME=/dev/PATH"
            )));
        };
        provider = provider.with_device(name, path);
    }
    if args.no_sync {
        provider = provider.without_sync();
    }
    provider = provider.with_direct_io(args.direct);
    if args.iohelper {
        provider = provider.with_backend(Backend::Helper(HelperOptions {
            direct: args.direct,
            ..HelperOptions::default()
        }));
    }
    if let Address::Tcp(sock) = &addr {
        if !sock.ip().is_loopback() {
            crate::out::tell!(
                "volstream: warning: listening on {sock} without authentication: anyone who can reach it can read and write the pool"
            );
        }
    }
    if let Address::Unix(path) = &addr {
        remove_stale_socket(path)?;
    }

    // SIGINT/SIGTERM end the service cleanly (the Unix socket path is removed) instead of
    // killing it mid-write: a thread waits for them and asks the loop to shut down.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| CliError::Other(format!("cannot block signals: {e}")))?;

    let mut engine = Engine::new(args.engine_config()?)
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    let (_, bound) = engine
        .listen(&addr, Arc::new(provider))
        .map_err(|e| CliError::Connect(format!("cannot listen on {addr}: {e}")))?;
    crate::out::tell!("volstream: serving {} on {bound}", args.pool.display());
    let handle = engine.handle();
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            log::info!("{signal:?}: shutting down");
        }
        handle.shutdown();
    });
    while !engine.is_shut_down() {
        engine
            .turn(None)
            .map_err(|e| CliError::Other(format!("event loop failed: {e}")))?;
    }
    Ok(())
}

/// A socket file left by a server that died is removed; a live one is an error.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), CliError> {
    if !path.exists() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(CliError::Connect(format!(
            "{} is in use by a running server",
            path.display()
        )));
    }
    std::fs::remove_file(path)
        .map_err(|e| CliError::Connect(format!("cannot remove stale {}: {e}", path.display())))
}
