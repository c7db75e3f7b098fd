//! `serve`: a directory of volumes (and named block devices) on one listening address.

use crate::error::CliError;
use crate::tls::{Role, TlsArgs};
use clap::Args;
use engine::event_loop::peer::glob_match;
use engine::proto::{Features, Reason};
use engine::{
    Address, AllowList, Engine, EngineConfig, OpenRequest, Provider, UnixPeerPolicy, VolumeError,
    VolumeReader, VolumeWriter,
};
use fdstream::export::{ExportConfig, ExportHandle, ExportServer, Exports};
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
    /// Also serve an NBD export under a name (repeatable): nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH.
    #[arg(long = "nbd-volume", value_name = "NAME=URI")]
    nbd_volumes: Vec<String>,
    /// Where to listen: unix:PATH, tcp:HOST:PORT, tcp:PORT (loopback), or tls:HOST:PORT.
    #[arg(long, value_name = "ADDR", required_unless_present = "nbd")]
    listen: Option<String>,
    /// Also export the pool's volumes to NBD clients (qemu-img, nbdcopy, nbdinfo) on
    /// unix:PATH or tcp:HOST:PORT; read-only unless --nbd-writable.
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Let NBD clients write the exported volumes (in place; sizes stay).
    #[arg(long, requires = "nbd")]
    nbd_writable: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// TLS: admit only client certificates whose subject DN matches this glob, e.g.
    /// 'O=volstream,CN=backup-*' (repeatable; any match admits).
    #[arg(long = "tls-allow-dn", value_name = "PATTERN")]
    allow_dn: Vec<String>,
    /// TLS: admit client certificates with a subject alternative name matching this glob
    /// (repeatable).
    #[arg(long = "tls-allow-san", value_name = "PATTERN")]
    allow_san: Vec<String>,
    /// Unix socket: admit peers running as this uid (repeatable; checked with SO_PEERCRED),
    /// on --listen and --nbd alike.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Unix socket: admit peers whose primary gid is this (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
    /// Listen on a non-loopback TCP address without TLS: anyone who reaches it can read and
    /// write the pool.
    #[arg(long)]
    insecure: bool,
    /// Refuse every upload.
    #[arg(long)]
    read_only: bool,
    /// Allow uploads only from peers whose identity matches this glob (repeatable): a
    /// certificate's subject DN, or 'uid=N,gid=N,pid=N' on a Unix socket. Others may read.
    #[arg(long = "allow-write", value_name = "PATTERN")]
    allow_write: Vec<String>,
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
    /// Keep an interrupted `upload --resume` (what arrived, and its journal) this long after
    /// its last write, e.g. 30m, 12h, 7d, 90s; the client's next `upload --resume` sends only
    /// what is missing. Without it uploads are not resumable.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    resume_keep: Option<std::time::Duration>,
    /// Disk the kept partial uploads may take together, e.g. 500G, 2T, 1048576; over it the
    /// oldest are removed.
    #[arg(long, value_name = "BYTES", value_parser = bytes, requires = "resume_keep",
          default_value = "100G")]
    resume_budget: u64,
    /// Answer HTTP GET /metrics (Prometheus text format) on tcp:HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
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
            unix_peers: UnixPeerPolicy {
                uids: self.allow_uids.clone(),
                gids: self.allow_gids.clone(),
            },
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
    let addr: Option<Address> = match &args.listen {
        Some(a) => Some(a.parse().map_err(CliError::Usage)?),
        None => None,
    };
    let nbd_addr: Option<Address> = match &args.nbd {
        Some(a) => Some(a.parse().map_err(CliError::Usage)?),
        None => None,
    };
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
    for spec in &args.nbd_volumes {
        let (name, uri) = spec
            .split_once('=')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| CliError::Usage(format!("--nbd-volume {spec:?}: expected NAME=URI")))?;
        let uri = crate::endpoint::nbd_uri(uri)?.ok_or_else(|| {
            CliError::Usage(format!("--nbd-volume {spec:?}: {uri:?} is not an NBD URI"))
        })?;
        provider = provider.with_nbd_volume(name, uri);
    }
    match provider.remove_stale_temporaries() {
        Ok(removed) if !removed.is_empty() => {
            let bytes: u64 = removed.iter().map(|r| r.allocated).sum();
            crate::out::tell!(
                "volstream: removed {} temporary file{} ({bytes} bytes) that interrupted uploads left in {}",
                removed.len(),
                if removed.len() == 1 { "" } else { "s" },
                args.pool.display()
            );
        }
        Ok(_) => {}
        Err(e) => crate::out::tell!(
            "volstream: warning: cannot clean up temporary files in {}: {e}",
            args.pool.display()
        ),
    }
    if args.no_sync {
        provider = provider.without_sync();
    }
    if let (Some(keep), false) = (args.resume_keep, args.read_only) {
        provider = provider.with_resume(keep, args.resume_budget);
    }
    provider = provider.with_direct_io(args.direct);
    if args.iohelper {
        provider = provider.with_backend(Backend::Helper(HelperOptions {
            direct: args.direct,
            ..HelperOptions::default()
        }));
    }
    if let Some(Address::Tcp(sock)) = &addr {
        refuse_open_tcp(sock, args.insecure, "read and write the pool")?;
    }
    if let Some(Address::Tcp(sock)) = &nbd_addr {
        let what = if args.nbd_writable {
            "read and write the pool over NBD"
        } else {
            "read the pool over NBD"
        };
        refuse_open_tcp(sock, args.insecure, what)?;
    }
    let unix_policy = !(args.allow_uids.is_empty() && args.allow_gids.is_empty());
    // Every listener must be able to check the policy: a TCP peer proves no uid.
    let unchecked = [&addr, &nbd_addr]
        .into_iter()
        .any(|a| a.as_ref().is_some_and(|a| !matches!(a, Address::Unix(_))));
    if unix_policy && unchecked {
        return Err(CliError::Usage(
            "--allow-uid and --allow-gid apply to unix: listeners (--listen and --nbd)".into(),
        ));
    }
    let tls_policy = !(args.allow_dn.is_empty() && args.allow_san.is_empty());
    if tls_policy && !matches!(addr, Some(Address::Tls { .. })) {
        return Err(CliError::Usage(
            "--tls-allow-dn and --tls-allow-san apply to tls: listeners".into(),
        ));
    }
    if let Some(Address::Unix(path)) = &addr {
        remove_stale_socket(path)?;
    }
    if let Some(Address::Unix(path)) = &nbd_addr {
        remove_stale_socket(path)?;
    }
    let mut config = args.engine_config()?;
    let store = provider.resume_store();
    if store.is_none() {
        // A client must not be told partials are kept when they are not.
        config.connection.features = config.connection.features.without(Features::RESUME);
    }
    if let Some(store) = store {
        // Before the first client: what expired while the server was down is gone.
        sweep_partials(store, args.pool.clone());
    }
    let allow = AllowList {
        subjects: args.allow_dn.clone(),
        alt_names: args.allow_san.clone(),
    };
    if let Some(addr) = &addr {
        args.tls.apply(addr, Role::Server, allow, &mut config)?;
    }
    let provider = Policy {
        inner: provider,
        read_only: args.read_only,
        writers: args.allow_write.clone(),
    };

    // SIGINT/SIGTERM end the service cleanly (the Unix socket path is removed) instead of
    // killing it mid-write: a thread waits for them and asks the loop to shut down.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| CliError::Other(format!("cannot block signals: {e}")))?;

    let mut engine = Engine::new(config)
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    if let Some(addr) = &addr {
        let (_, bound) = engine
            .listen(addr, Arc::new(provider))
            .map_err(|e| CliError::Connect(format!("cannot listen on {addr}: {e}")))?;
        crate::out::tell!("volstream: serving {} on {bound}", args.pool.display());
    }
    let export = match &nbd_addr {
        Some(a) => Some(start_nbd_export(&args, a)?),
        None => None,
    };
    if let Some(spec) = &args.metrics {
        let at = crate::metrics::serve(spec, engine.handle())?;
        if !at.ip().is_loopback() {
            crate::out::tell!(
                "volstream: warning: metrics on {at} without authentication name the volumes and peers"
            );
        }
        crate::out::tell!("volstream: metrics on http://{at}/metrics");
    }
    let handle = engine.handle();
    let export_handle = export.as_ref().map(|(h, _)| h.clone());
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            log::info!("{signal:?}: shutting down");
        }
        if let Some(h) = export_handle {
            h.shutdown();
        }
        handle.shutdown();
    });
    while !engine.is_shut_down() {
        engine
            .turn(None)
            .map_err(|e| CliError::Other(format!("event loop failed: {e}")))?;
    }
    if let Some((_, thread)) = export {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CliError::Other(format!("NBD export failed: {e}"))),
            Err(_) => return Err(CliError::Other("the NBD export thread panicked".into())),
        }
    }
    Ok(())
}

/// Removes expired and over-budget partial uploads now (before the first client) and then
/// periodically, on a thread of its own (it stats the pool).
fn sweep_partials(store: Arc<fdstream::resume::ResumeStore>, pool: PathBuf) {
    let interval = store.sweep_interval();
    let sweep = move || match store.sweep() {
        Ok(removed) => {
            for r in removed {
                crate::out::tell!(
                    "volstream: removed partial upload {} ({} bytes, {})",
                    r.name,
                    r.allocated,
                    r.why
                );
            }
        }
        Err(e) => crate::out::tell!(
            "volstream: warning: cannot sweep partial uploads in {}: {e}",
            pool.display()
        ),
    };
    sweep();
    std::thread::Builder::new()
        .name("resume-sweep".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            sweep();
        })
        .expect("spawning a thread");
}

/// Parses 90s, 30m, 12h, 7d or a plain number of seconds.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with s, m, h or d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(factor)
        .filter(|&s| s > 0)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{text:?}: out of range (at least 1s)"))
}

/// Parses a byte count with an optional K, M, G or T suffix (powers of 1024).
fn bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with K, M, G or T"))?;
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: the suffix is K, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?}: out of range"))
}

/// Starts the NBD export of the pool on its own loop thread.
fn start_nbd_export(
    args: &ServeArgs,
    addr: &Address,
) -> Result<(ExportHandle, std::thread::JoinHandle<std::io::Result<()>>), CliError> {
    let mut exports = Exports::new(&args.pool, args.nbd_writable && !args.read_only)
        .map_err(|e| CliError::Connect(format!("cannot export {}: {e}", args.pool.display())))?;
    for spec in &args.devices {
        if let Some((name, path)) = spec.split_once('=') {
            exports = exports.with_device(name, path);
        }
    }
    let config = ExportConfig {
        max_connections: args.max_connections,
        timeout: std::time::Duration::from_secs(args.idle_timeout),
        pool: None,
        unix_peers: UnixPeerPolicy {
            uids: args.allow_uids.clone(),
            gids: args.allow_gids.clone(),
        },
        writers: args.allow_write.clone(),
    };
    let mut server = ExportServer::bind(addr, exports, config)
        .map_err(|e| CliError::Connect(format!("cannot listen for NBD on {addr}: {e}")))?;
    crate::out::tell!(
        "volstream: exporting {} over NBD on {} ({})",
        args.pool.display(),
        server.local_addr(),
        if args.nbd_writable && !args.read_only {
            "writable"
        } else {
            "read-only"
        }
    );
    let handle = server.handle();
    let thread = std::thread::Builder::new()
        .name("nbd-export".into())
        .spawn(move || server.run())
        .map_err(|e| CliError::Other(format!("cannot start the NBD export: {e}")))?;
    Ok((handle, thread))
}

/// Plain TCP off loopback lets anyone who reaches it in: only with --insecure.
pub(crate) fn refuse_open_tcp(
    sock: &std::net::SocketAddr,
    insecure: bool,
    what: &str,
) -> Result<(), CliError> {
    if sock.ip().is_loopback() {
        return Ok(());
    }
    if !insecure {
        return Err(CliError::Usage(format!(
            "refusing to serve {sock} without TLS: use tls:{sock}, or --insecure to let anyone who can reach it {what}"
        )));
    }
    crate::out::tell!(
        "volstream: warning: listening on {sock} without authentication (--insecure): anyone who can reach it can {what}"
    );
    Ok(())
}

/// The pool's access rules, applied per OPEN with the identity the transport proved.
struct Policy<P> {
    inner: P,
    read_only: bool,
    /// Globs on the peer identity; empty lets every admitted peer write.
    writers: Vec<String>,
}

impl<P: Provider> Provider for Policy<P> {
    fn open_read(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        self.inner.open_read(request)
    }

    fn open_write(&self, request: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        if self.read_only {
            return Err(VolumeError::new(
                Reason::PermissionDenied,
                "this server is read-only",
            ));
        }
        let identity = request.identity.to_string();
        if !self.writers.is_empty() && !self.writers.iter().any(|p| glob_match(p, &identity)) {
            log::warn!(
                "{}: {identity} may not write {:?}",
                request.peer,
                request.name
            );
            return Err(VolumeError::new(
                Reason::PermissionDenied,
                format!("{identity} may not write volumes here"),
            ));
        }
        self.inner.open_write(request)
    }

    fn open_list(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        self.inner.open_list(request)
    }

    fn open_extents(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        self.inner.open_extents(request)
    }

    fn open_digests(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        self.inner.open_digests(request)
    }
}

/// A socket file left by a server that died is removed; a live one is an error.
pub(crate) fn remove_stale_socket(path: &std::path::Path) -> Result<(), CliError> {
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
