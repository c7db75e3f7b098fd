//! `download --serve-nbd ADDR VOLUME FILE`: FILE is an NBD disk while it downloads
//! (copy-on-read, fdstream::cor). FILE is written under a partial name beside it and gets its
//! name once complete and checked against the source's block digests; the export serves the
//! same file throughout, before and after the rename.

use crate::error::CliError;
use crate::interrupt::Interrupts;
use crate::options::Settings;
use crate::serve::{refuse_open_tcp, remove_stale_socket};
use engine::proto::OpenOptions;
use engine::{Address, Engine};
use fdstream::cor::{self, BackgroundSink, Cache, CorExport};
use fdstream::export::{ExportConfig, ExportServer};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The partial beside `dest`: a fixed name, so a later run finds what an earlier one left.
fn partial_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".{name}.volstream-cor"))
}

fn export_address(text: &str) -> Result<Address, CliError> {
    let addr: Address = text.parse().map_err(CliError::Usage)?;
    match &addr {
        Address::Unix(path) => remove_stale_socket(path)?,
        Address::Tcp(sock) => refuse_open_tcp(sock, false, "read and write the download")?,
        Address::Tls { .. } => {
            return Err(CliError::Usage(format!(
                "--serve-nbd {addr}: the NBD export has no TLS: use unix:PATH or tcp:HOST:PORT"
            )))
        }
    }
    Ok(addr)
}

pub fn run(args: Settings) -> Result<(), CliError> {
    let [pair] = args.pairs.as_slice() else {
        return Err(CliError::Usage(
            "--serve-nbd serves one download: give one VOLUME FILE pair".into(),
        ));
    };
    let (volume, dest) = (pair.volume.as_str(), PathBuf::from(&pair.file));
    if pair.file == "-" || crate::endpoint::nbd_uri(volume)?.is_some() {
        return Err(CliError::Usage(
            "--serve-nbd downloads a server's VOLUME into a FILE (not stdout, not from an NBD URI)"
                .into(),
        ));
    }
    match std::fs::symlink_metadata(&dest) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(CliError::Usage(format!(
                "{}: --serve-nbd writes a regular file",
                dest.display()
            )))
        }
        Ok(_) if !args.overwrite => {
            return Err(CliError::Usage(format!(
                "{} exists (--overwrite replaces it once the download is complete)",
                dest.display()
            )))
        }
        _ => {}
    }
    let serve = export_address(args.serve_nbd.as_deref().unwrap_or_default())?;
    let interrupts = Interrupts::block()?;
    let addr = args.connect.address()?;
    let (engine, engine_thread) = Engine::spawn(args.connect.engine_config(&addr)?)
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    let conn = engine
        .connect_blocking(&addr, Duration::from_secs(10))
        .map_err(|e| CliError::Connect(format!("cannot connect to {addr}: {e}")))?;
    let size = fdstream::attach::volume_size(&engine, conn, volume)
        .map_err(|e| CliError::Other(format!("{addr}: {e}")))?;

    let partial = partial_path(&dest);
    let shown = dest.display().to_string();
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        let _ = std::fs::remove_file(&partial);
        CliError::Other(format!("{volume} -> {shown}: {what}: {e}"))
    };
    // Nothing of an earlier run is trusted: without a journal its bytes say nothing.
    let _ = std::fs::remove_file(&partial);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)
        .and_then(|f| f.set_len(size).map(|()| f))
        .map_err(|e| failed(&format!("creating {}", partial.display()), &e))?;
    let cache = Cache::new(file, size, volume, &engine, conn)
        .map_err(|e| failed("starting the copy-on-read cache", &e))?;
    let mut server = ExportServer::bind(
        &serve,
        CorExport::new(volume, cache.clone()),
        ExportConfig::default(),
    )
    .map_err(|e| failed(&format!("cannot listen for NBD on {serve}"), &e))?;
    crate::out::tell!(
        "volstream: downloading {volume} to {shown}, served meanwhile over NBD on {} as {volume}",
        server.local_addr()
    );
    let export = server.handle();
    let export_thread = std::thread::Builder::new()
        .name("nbd-cor".into())
        .spawn(move || server.run())
        .map_err(|e| failed("cannot start the NBD export", &e))?;
    let (stop_export, stop_engine) = (export.clone(), engine.clone());
    interrupts.watch(move || {
        stop_export.shutdown();
        stop_engine.shutdown();
    });

    let sink = BackgroundSink::new(cache.clone(), args.background_rate);
    let options = OpenOptions::default().with_zero_granularity(args.sparse_size);
    let report = engine
        .download(conn, volume, options, Box::new(sink))
        .recv();
    let outcome = (|| {
        if let Some(signal) = interrupts.caught() {
            return Err(CliError::Interrupted {
                signal,
                stopped: 1,
                total: 1,
                kept: false,
            });
        }
        let report = report.map_err(|_| failed("the event loop ended early", &""))?;
        report.result.map_err(|e| failed("download", &e))?;
        if !cache.complete() {
            return Err(failed("download", &"the stream ended with bytes missing"));
        }
        let local = cache.local();
        let checked = cor::verify(&engine, conn, volume, &shown, cache.file(), &local)
            .map_err(|e| failed("verify", &e))?;
        cache
            .file()
            .sync_all()
            .and_then(|()| std::fs::rename(&partial, &dest))
            .map_err(|e| failed(&format!("renaming {}", partial.display()), &e))?;
        let s = &cache.stats;
        crate::out::say!(
            "volstream: {volume} -> {shown}: {size} bytes, complete and verified ({} by the \
             download, {} in {} reads fetched ahead of it, {} written through NBD; {} of {} \
             blocks checked against the source's digests, the rest hold local writes)",
            s.background_bytes.load(Ordering::Relaxed),
            s.urgent_bytes.load(Ordering::Relaxed),
            s.urgent_fetches.load(Ordering::Relaxed),
            s.local_bytes.load(Ordering::Relaxed),
            checked.blocks - checked.local_blocks,
            checked.blocks,
        );
        Ok(())
    })();
    if outcome.is_ok() {
        // The disk stays usable for the clients that have it open.
        while export.clients() > 0 && interrupts.caught().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        let _ = std::fs::remove_file(&partial);
    }
    export.shutdown();
    let _ = export_thread.join();
    engine.shutdown();
    let _ = engine_thread.join();
    outcome
}
