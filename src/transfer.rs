//! `download` and `upload`: every pair runs concurrently over one connection.

use crate::endpoint::nbd_uri;
use crate::error::CliError;
use crate::events::{self, Events};
use crate::interrupt::Interrupts;
use crate::options::{Direction, Settings};
use crate::out::{say, tell};
use crate::progress::{Bars, Counter, CountingReader, CountingWriter};
use engine::event_loop::{Endpoint, Origin, Transfer};
use engine::proto::{Op, OpenOptions, StreamStats};
use engine::{Engine, TransferError, TransferReport, VolumeReader, VolumeWriter};
use fdstream::nbd::{NbdReader, NbdWriter, SourceOptions};
use fdstream::{Backend, HelperOptions, Location, ReaderOptions, WriteTarget, WriterOptions};
use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

impl Settings {
    fn backend(&self) -> Backend {
        if self.iohelper {
            Backend::Helper(HelperOptions {
                direct: self.direct,
                ..HelperOptions::default()
            })
        } else {
            Backend::InProcess
        }
    }

    fn open_options(&self) -> OpenOptions {
        OpenOptions::default()
            .with_no_sparse(self.no_sparse)
            .with_allocated(self.allocated)
            .with_destination_is_zero(self.destination_is_zero)
            .with_no_extents(self.no_extents)
            .with_force_share(self.force_share && self.direction == Direction::Download)
            .with_top_only(self.top_only && self.direction == Direction::Download)
            .with_overwrite(self.overwrite && self.direction == Direction::Upload)
            // A download's sink is ours (WriterOptions::verify); an upload's is the server's.
            .with_verify(self.verify && self.direction == Direction::Upload)
            .with_qcow2(self.qcow2 && self.direction == Direction::Upload)
            .with_zero_granularity(self.sparse_size)
    }
}

struct Pending {
    volume: String,
    /// As the user named it (`-` for stdin or stdout).
    file: PathBuf,
    count: Counter,
    /// `--update`: what the block digests found.
    update: Option<crate::update::Figures>,
}

/// A download through a partial (crate::resume): its sink's status and what resuming found.
struct Resuming {
    status: Arc<fdstream::writer::JournalStatus>,
    figures: crate::resume::Figures,
}

/// Where a pair's local side is.
enum Local {
    Path(PathBuf),
    /// Our stdin (upload) or stdout (download), named `-` or by a path that is it.
    Stdio(File),
    /// An NBD export.
    Nbd(nbd::Uri),
}

pub fn run(args: Settings) -> Result<(), CliError> {
    let direction = args.direction;
    // Everything that can be wrong with the local side is found before connecting.
    let locals = args
        .pairs
        .iter()
        .map(|p| local(&args, &p.file))
        .collect::<Result<Vec<_>, _>>()?;
    let named: Vec<(&str, &Path)> = args
        .pairs
        .iter()
        .map(|p| (p.volume.as_str(), Path::new(&p.file)))
        .collect();
    crate::destinations::refuse_duplicates(direction, &named)?;
    // A pair whose volume side is an NBD export is copied on this host; only pairs with a
    // server volume need the connection.
    let volumes = args
        .pairs
        .iter()
        .map(|p| nbd_uri(&p.volume))
        .collect::<Result<Vec<_>, _>>()?;
    if let (true, Some(p)) = (
        args.qcow2,
        args.pairs.iter().zip(&volumes).find(|(_, v)| v.is_some()),
    ) {
        return Err(CliError::Usage(format!(
            "--format qcow2 is for volumes of a server, not the NBD export {}",
            p.0.volume
        )));
    }
    let interrupts = Interrupts::block()?;
    // Local copies look at this between chunks; transfers stop with the event loop.
    let stop = Arc::new(AtomicBool::new(false));
    let engine = if volumes.iter().any(Option::is_none) {
        let addr = args.connect.address()?;
        let (engine, thread) = Engine::spawn(args.connect.engine_config(&addr)?)
            .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
        let (handle, flag) = (engine.clone(), Arc::clone(&stop));
        interrupts.watch(move || {
            flag.store(true, Ordering::SeqCst);
            handle.shutdown();
        });
        let conn = engine
            .connect_blocking(&addr, Duration::from_secs(10))
            .map_err(|e| match interrupts.caught() {
                Some(signal) => CliError::Interrupted {
                    signal,
                    stopped: 0,
                    total: 0,
                    kept: false,
                },
                None => CliError::Connect(format!("cannot connect to {addr}: {e}")),
            })?;
        Some((engine, thread, conn))
    } else {
        let flag = Arc::clone(&stop);
        interrupts.watch(move || flag.store(true, Ordering::SeqCst));
        None
    };

    let options = args.open_options();
    let (done_tx, done_rx) = mpsc::channel();
    let mut pending = Vec::new();
    let mut transfers = Vec::new();
    let mut updating: Vec<Option<crate::update::Updating>> = Vec::new();
    let mut resuming: Vec<Option<Resuming>> = Vec::new();
    // A download that must start over (its source changed under a partial) is submitted
    // again with a sender of its own.
    let mut again_tx = Some(done_tx.clone());
    for (index, ((pair, local), volume)) in args.pairs.iter().zip(locals).zip(volumes).enumerate() {
        let count = Counter::default();
        let done = done_tx.clone();
        let on_done = move |report| {
            let _ = done.send((index, report));
        };
        updating.push(None);
        resuming.push(None);
        let mut figures = None;
        match volume {
            Some(_) if args.update => {
                return Err(CliError::Usage(format!(
                    "--update: {} is an NBD export; updates are read from a server (--connect)",
                    pair.volume
                )));
            }
            Some(_) if args.ranges.is_some() => {
                return Err(CliError::Usage(format!(
                    "--range: {} is an NBD export, copied here whole; ranges are read from a \
                     server (--connect)",
                    pair.volume
                )));
            }
            Some(uri) => {
                let (reader, writer): (Box<dyn VolumeReader>, Box<dyn VolumeWriter>) =
                    match direction {
                        Direction::Download => (
                            nbd_source(&args, uri),
                            Box::new(CountingWriter {
                                inner: download_sink(&args, local)?,
                                count: count.clone(),
                            }),
                        ),
                        Direction::Upload => (
                            Box::new(CountingReader {
                                inner: upload_source(&args, local),
                                count: count.clone(),
                            }),
                            Box::new(NbdWriter::new(uri, writer_options(&args))),
                        ),
                    };
                // On this host: no credit waits on its slots, so it starts now.
                local_copy(
                    pair.volume.clone(),
                    direction,
                    reader,
                    writer,
                    Arc::clone(&stop),
                    on_done,
                );
            }
            None if args.resume_upload => {
                let (Local::Path(file), Some((engine, _, conn))) = (&local, &engine) else {
                    return Err(CliError::Usage(format!(
                        "--resume hashes FILE first: {} must be a regular file",
                        pair.file
                    )));
                };
                let resume = crate::update::prepare_resume(engine, *conn, file, &pair.volume)?;
                figures = resume.figures.clone();
                transfers.push(Transfer {
                    op: Op::Write,
                    name: pair.volume.clone(),
                    options: options
                        .with_update(Some(resume.checksum))
                        .with_resume(Some(resume.key)),
                    ranges: resume.ranges,
                    endpoint: Endpoint::Reader(Box::new(CountingReader {
                        inner: upload_source(&args, local),
                        count: count.clone(),
                    })),
                    on_done: Box::new(on_done),
                });
            }
            None if args.update && direction == Direction::Upload => {
                let (Local::Path(file), Some((engine, _, conn))) = (&local, &engine) else {
                    return Err(CliError::Usage(format!(
                        "--update hashes FILE first: {} must be a file or a device",
                        pair.file
                    )));
                };
                let update = crate::update::prepare_upload(engine, *conn, file, &pair.volume)?;
                let (update_options, ranges) = match &update {
                    // The server has no such volume: it is uploaded whole.
                    None => (options, None),
                    Some(u) => (
                        options.with_overwrite(true).with_update(Some(u.checksum())),
                        u.ranges(),
                    ),
                };
                figures = update.as_ref().map(|u| u.figures.clone());
                match (&update, ranges) {
                    (Some(u), None) => on_done(TransferReport {
                        name: pair.volume.clone(),
                        op: Op::Write,
                        size: u.size(),
                        stats: StreamStats::default(),
                        elapsed: Duration::ZERO,
                        first_byte: None,
                        result: Ok(()),
                    }),
                    (_, ranges) => transfers.push(Transfer {
                        op: Op::Write,
                        name: pair.volume.clone(),
                        options: update_options,
                        ranges,
                        endpoint: Endpoint::Reader(Box::new(CountingReader {
                            inner: upload_source(&args, local),
                            count: count.clone(),
                        })),
                        on_done: Box::new(on_done),
                    }),
                }
            }
            None if args.update => {
                let (Local::Path(file), Some((engine, _, conn))) = (&local, &engine) else {
                    return Err(CliError::Usage(format!(
                        "--update writes into a copy of FILE: {} must be a file",
                        pair.file
                    )));
                };
                let update = crate::update::prepare(engine, *conn, &pair.volume, file)?;
                match update.ranges() {
                    // Nothing differs but perhaps the length: no content to move.
                    None => on_done(TransferReport {
                        name: pair.volume.clone(),
                        op: Op::Read,
                        size: update.size(),
                        stats: StreamStats::default(),
                        elapsed: Duration::ZERO,
                        first_byte: None,
                        result: Ok(()),
                    }),
                    ranges => {
                        let sink_options = WriterOptions {
                            // Our own temporary, written in place.
                            overwrite: true,
                            ranges: ranges.clone(),
                            ..writer_options(&args)
                        };
                        let writer = args.backend().in_place(update.temp_path(), sink_options);
                        transfers.push(Transfer {
                            op: Op::Read,
                            name: pair.volume.clone(),
                            options,
                            ranges,
                            endpoint: Endpoint::Writer(Box::new(CountingWriter {
                                inner: writer,
                                count: count.clone(),
                            })),
                            on_done: Box::new(on_done),
                        });
                    }
                }
                figures = Some(update.figures.clone());
                updating[index] = Some(update);
            }
            None if matches!(&local, Local::Path(p) if crate::resume::applies(&args, p)) => {
                let (Local::Path(file), Some((engine, _, conn))) = (&local, &engine) else {
                    unreachable!("a path, and pairs without an NBD volume are connected");
                };
                let prepared = crate::resume::prepare(&args, engine, *conn, &pair.volume, file)?;
                let (t, r) = journaled(&args, options, &pair.volume, prepared, &count, on_done);
                transfers.push(t);
                resuming[index] = Some(r);
            }
            None => {
                let endpoint = match direction {
                    Direction::Download => Endpoint::Writer(Box::new(CountingWriter {
                        inner: download_sink(&args, local)?,
                        count: count.clone(),
                    })),
                    Direction::Upload => Endpoint::Reader(Box::new(CountingReader {
                        inner: upload_source(&args, local),
                        count: count.clone(),
                    })),
                };
                transfers.push(Transfer {
                    op: match direction {
                        Direction::Download => Op::Read,
                        Direction::Upload => Op::Write,
                    },
                    name: pair.volume.clone(),
                    options,
                    ranges: args.ranges.clone(),
                    endpoint,
                    on_done: Box::new(on_done),
                });
            }
        }
        pending.push(Pending {
            volume: pair.volume.clone(),
            file: PathBuf::from(&pair.file),
            count,
            update: figures,
        });
    }
    drop(done_tx);
    // A download's sink that waits for an open-volume slot would sit on credit the peer has
    // already spent on it, so no more downloads run at once than the budget has slots; the rest
    // start as others end. An upload's source waits for its slot before its OPEN, so all go.
    let in_flight = match direction {
        Direction::Download => fdstream::budget::capacity(),
        Direction::Upload => usize::MAX,
    };
    let mut queued = transfers.into_iter();
    if let Some((engine, _, conn)) = &engine {
        for t in queued.by_ref().take(in_flight) {
            engine.submit(*conn, t);
        }
    }

    // Bars go to stderr, so that is the terminal that decides.
    let bars = (args.progress || (std::io::stderr().is_terminal() && !args.json)).then(|| {
        Bars::start(
            pending
                .iter()
                .map(|p| (p.volume.clone(), p.count.clone(), upload_size(&args, p)))
                .collect(),
        )
    });
    let events = args.json.then(|| {
        let transfers = pending
            .iter()
            .enumerate()
            .map(|(i, p)| events::Transfer {
                op: verb(direction),
                volume: p.volume.clone(),
                file: p.file.display().to_string(),
                count: p.count.clone(),
                update: p.update.clone(),
                resume: resuming[i].as_ref().map(|r| r.figures.clone()),
            })
            .collect();
        Events::start(transfers, args.progress_interval)
    });
    let started = Instant::now();
    let mut reports: Vec<Option<TransferReport>> = pending.iter().map(|_| None).collect();
    let mut ended = 0;
    while ended < pending.len() {
        if interrupts.caught().is_some() {
            again_tx = None;
        }
        let (index, mut report) = match done_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            // The queued transfers were dropped unstarted after an interrupt.
            Err(_) if interrupts.caught().is_some() => break,
            Err(_) => return Err(CliError::Other("event loop ended early".into())),
        };
        if let (Some(r), Some(tx), Some((engine, _, conn))) = (&resuming[index], &again_tx, &engine)
        {
            let changed = r.status.source_changed.load(Ordering::SeqCst);
            if report.result.is_err() && changed && !args.no_restart {
                let file = &pending[index].file;
                let why = match &report.result {
                    Err(e) => e.message.clone(),
                    Ok(()) => unreachable!(),
                };
                tell!("volstream: {}: {why}; starting over", file.display());
                let figures = crate::resume::Figures {
                    restarted: Some(why),
                    ..crate::resume::Figures::default()
                };
                let prepared = crate::resume::fresh(&args, file, figures)?;
                let tx = tx.clone();
                let on_done = move |report| {
                    let _ = tx.send((index, report));
                };
                let count = &pending[index].count;
                let (t, r) = journaled(
                    &args,
                    options,
                    &pending[index].volume,
                    prepared,
                    count,
                    on_done,
                );
                resuming[index] = Some(r);
                engine.submit(*conn, t);
                continue;
            }
        }
        ended += 1;
        if let Some(update) = updating[index].take() {
            if report.result.is_ok() {
                report.result = update.finish();
            }
        }
        if let Some(bars) = &bars {
            bars.finished(index, report.result.is_ok(), report.elapsed);
        }
        if let Some(events) = &events {
            events.ended(index, &report);
        }
        reports[index] = Some(report);
        if interrupts.caught().is_some() {
            queued.by_ref().for_each(drop);
        } else if let Some((engine, _, conn)) = &engine {
            if let Some(t) = queued.next() {
                engine.submit(*conn, t);
            }
        }
    }
    drop(bars);
    drop(queued);
    drop(again_tx);
    let total = pending.len();
    if let Some(events) = events {
        // Dropped unstarted after an interrupt: they end too, as cancelled.
        for (index, _) in reports.iter().enumerate().filter(|(_, r)| r.is_none()) {
            events.not_run(index, "interrupted before it started");
        }
    }
    let reports: Vec<TransferReport> = reports.into_iter().flatten().collect();
    let elapsed = started.elapsed();
    if let Some((engine, thread, _)) = engine {
        engine.shutdown();
        let _ = thread.join();
    }
    // Failed transfers remove their temporaries on the workers and in their helpers; let
    // them before exiting.
    fdstream::Pool::shared().wait_idle(Duration::from_secs(10));
    fdstream::helper::wait_all(Duration::from_secs(10));
    if let Some(signal) = interrupts.caught() {
        return Err(CliError::Interrupted {
            signal,
            stopped: total - reports.iter().filter(|r| r.result.is_ok()).count(),
            total,
            kept: args.resume && resuming.iter().any(Option::is_some),
        });
    }

    let mut failed = 0;
    for (index, (p, r)) in pending.iter().zip(&reports).enumerate() {
        let verb = verb(direction);
        let (from, to) = match direction {
            Direction::Download => (p.volume.clone(), p.file.display().to_string()),
            Direction::Upload => (p.file.display().to_string(), p.volume.clone()),
        };
        if r.result.is_ok() && !args.json {
            let tail = match direction {
                Direction::Download => crate::destinations::device_tail(&p.file, r.size),
                Direction::Upload => None,
            };
            let update = p.update.as_ref().map(|u| {
                format!(
                    "; update: {} blocks changed, {} zeroed, {} bytes of block digests",
                    u.changed_blocks, u.zeroed_blocks, u.digests_wire_bytes
                )
            });
            let resumed = resumed_line(resuming[index].as_ref().map(|r| &r.figures));
            say!(
                "{verb} {from} -> {to}: {} bytes ({} data, {} hole) in {:.2}s{}{}{}",
                r.size,
                r.stats.data_bytes,
                r.stats.hole_bytes,
                r.elapsed.as_secs_f64(),
                tail.map(|t| format!("; {t}")).unwrap_or_default(),
                update.unwrap_or_default(),
                resumed
            );
        }
        if let Err(e) = &r.result {
            failed += 1;
            tell!("volstream: {verb} {from} -> {to}: {e}");
        }
    }
    log::info!(
        "{} transfers in {:.2}s",
        reports.len(),
        elapsed.as_secs_f64()
    );
    if failed > 0 {
        return Err(CliError::Transfers {
            failed,
            total: reports.len(),
        });
    }
    Ok(())
}

/// A pair's local side, checked: `-` (or a path that is our stdin or stdout) is that stream,
/// and a pipe to upload needs `--size`.
fn local(args: &Settings, file: &str) -> Result<Local, CliError> {
    if let Some(uri) = nbd_uri(file)? {
        return Ok(Local::Nbd(uri));
    }
    let (stdio, name) = match args.direction {
        Direction::Download => (std::io::stdout().as_fd().try_clone_to_owned(), "stdout"),
        Direction::Upload => (std::io::stdin().as_fd().try_clone_to_owned(), "stdin"),
    };
    let path = Path::new(file);
    let stdio = stdio.map(File::from);
    let is_stdio = file == "-"
        || match (&stdio, std::fs::metadata(path)) {
            // `/dev/stdout`, `/proc/self/fd/1`, or the file stdout is redirected to.
            (Ok(s), Ok(m)) => s
                .metadata()
                .is_ok_and(|s| s.dev() == m.dev() && s.ino() == m.ino()),
            _ => false,
        };
    let local = if is_stdio {
        let stdio =
            stdio.map_err(|e| CliError::Usage(format!("{file}: cannot use {name}: {e}")))?;
        if args.direction == Direction::Download {
            crate::out::data_on_stdout();
        }
        Local::Stdio(stdio)
    } else {
        Local::Path(path.to_owned())
    };
    if args.direction == Direction::Upload && args.size.is_none() {
        let meta = match &local {
            Local::Stdio(f) => f.metadata().ok(),
            Local::Path(p) => std::fs::metadata(p).ok(),
            Local::Nbd(_) => None,
        };
        let ft = meta.map(|m| m.file_type());
        if ft.is_some_and(|t| t.is_fifo() || t.is_char_device() || t.is_socket()) {
            return Err(CliError::Usage(format!(
                "{file} is a pipe, whose length cannot be known before reading it: \
                 give it with --size BYTES"
            )));
        }
    }
    Ok(local)
}

/// An upload's length for its bar: `--size` for a pipe, else the file's (a device's is found
/// when it opens).
fn upload_size(args: &Settings, p: &Pending) -> Option<u64> {
    if args.direction != Direction::Upload {
        return None;
    }
    let meta = std::fs::metadata(&p.file).ok();
    match meta {
        Some(m) if m.is_file() => Some(m.len()),
        _ => args.size,
    }
}

/// An NBD export read on this host (in process: its I/O is a socket, which a helper process
/// would not isolate better).
fn nbd_source(args: &Settings, uri: nbd::Uri) -> Box<dyn VolumeReader> {
    Box::new(NbdReader::new(
        uri,
        SourceOptions {
            no_extents: args.no_extents,
            top_only: args.top_only,
            zero_granularity: args.sparse_size,
        },
        ReaderOptions::default(),
    ))
}

/// A pair with no server volume: copied on this host and reported like a transfer.
fn local_copy(
    name: String,
    direction: Direction,
    reader: Box<dyn VolumeReader>,
    writer: Box<dyn VolumeWriter>,
    stop: Arc<AtomicBool>,
    on_done: impl FnOnce(TransferReport) + Send + 'static,
) {
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = fdstream::copy::copy_until(reader, writer, &stop);
        let stats = result.as_ref().cloned().unwrap_or_default();
        on_done(TransferReport {
            name,
            op: match direction {
                Direction::Download => Op::Read,
                Direction::Upload => Op::Write,
            },
            size: stats.size,
            stats: StreamStats {
                data_bytes: stats.data_bytes,
                hole_bytes: stats.hole_bytes,
                ..StreamStats::default()
            },
            elapsed: started.elapsed(),
            // A local copy does not time its first byte.
            first_byte: None,
            // Both ends are this host's: whichever failed describes itself.
            result: result.map(|_| ()).map_err(|e| TransferError {
                reason: e.reason,
                message: e.message,
                origin: Origin::Local,
            }),
        });
    });
}

fn writer_options(args: &Settings) -> WriterOptions {
    WriterOptions {
        allocated: args.allocated,
        destination_is_zero: args.destination_is_zero,
        overwrite: args.overwrite,
        no_sync: args.no_sync,
        direct: args.direct,
        verify: args.verify,
        ranges: args.ranges.clone(),
        ..WriterOptions::default()
    }
}

fn upload_source(args: &Settings, local: Local) -> Box<dyn VolumeReader> {
    let options = ReaderOptions {
        zero_granularity: args.sparse_size,
        no_extents: args.no_extents,
        stream_size: args.size,
        direct: args.direct,
        force_share: args.force_share,
        ..ReaderOptions::default()
    };
    let from = match local {
        Local::Path(p) => Location::Path(p),
        Local::Stdio(f) => Location::Open(f),
        Local::Nbd(uri) => return nbd_source(args, uri),
    };
    args.backend().read(from, options)
}

fn download_sink(args: &Settings, local: Local) -> Result<Box<dyn VolumeWriter>, CliError> {
    let options = writer_options(args);
    let backend = args.backend();
    let file = match local {
        Local::Path(p) => p,
        Local::Stdio(_) | Local::Nbd(_) if args.ranges.is_some() => {
            return Err(CliError::Usage(
                "--range writes each range at its offset: FILE must be a file or a device, \
                 not stdout or an NBD export"
                    .into(),
            ))
        }
        Local::Stdio(f) => return Ok(backend.write(WriteTarget::from_file(f), options)),
        // An export is a device: written in place.
        Local::Nbd(uri) => return Ok(Box::new(NbdWriter::new(uri, options))),
    };
    let meta = std::fs::metadata(&file).ok();
    let is_special = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device() || m.file_type().is_fifo());
    if is_special || (args.in_place && meta.is_some()) {
        return Ok(backend.in_place(&file, options));
    }
    if args.in_place {
        return Err(CliError::Usage(format!(
            "--in-place needs an existing destination, {} does not exist",
            file.display()
        )));
    }
    Ok(backend.create(&file, options))
}

/// The summary line's note on a download that adopted a partial.
fn resumed_line(figures: Option<&crate::resume::Figures>) -> String {
    match figures {
        Some(f) if f.resumed => format!(
            "; resumed: {} bytes were there, {} read, {} bytes of block digests",
            f.adopted_bytes, f.missing_bytes, f.digests_wire_bytes
        ),
        Some(f) if f.restarted.is_some() => "; started over".into(),
        _ => String::new(),
    }
}

/// A download through a partial (crate::resume) as a transfer.
fn journaled(
    args: &Settings,
    options: OpenOptions,
    volume: &str,
    prepared: crate::resume::Prepared,
    count: &Counter,
    on_done: impl FnOnce(TransferReport) + Send + 'static,
) -> (Transfer, Resuming) {
    let (writer, status) = fdstream::FileWriter::journaled(prepared.plan, writer_options(args));
    count.add(prepared.figures.adopted_bytes);
    let transfer = Transfer {
        op: Op::Read,
        name: volume.to_owned(),
        options,
        ranges: prepared.ranges,
        endpoint: Endpoint::Writer(Box::new(CountingWriter {
            inner: writer,
            count: count.clone(),
        })),
        on_done: Box::new(on_done),
    };
    let resuming = Resuming {
        status,
        figures: prepared.figures,
    };
    (transfer, resuming)
}

fn verb(direction: Direction) -> &'static str {
    match direction {
        Direction::Download => "download",
        Direction::Upload => "upload",
    }
}
