//! `download` to a file goes through a partial and its journal (fdstream::journal, the sink
//! fdstream::writer::Journaled): `.NAME.volstream-partial` and `.NAME.volstream-partial.journal`
//! beside FILE, renamed to FILE only once complete and verified. `--resume` adopts what an
//! earlier run left (killed, interrupted, or cut off): only the ranges its journal lacks are
//! read, and the whole content must then have the source's volume checksum (DIGESTS): the
//! killed run's bytes never saw their stream's digest, so nothing less would check them.
//! Without `--resume` a partial left behind is removed and the download starts over.

use crate::error::CliError;
use crate::options::{Direction, Settings};
use crate::out::tell;
use engine::event_loop::ConnectionId;
use engine::proto::Op;
use engine::{EngineHandle, RangeSet};
use fdstream::blockhash::BlockDigests;
use fdstream::journal::{self, Journal};
use fdstream::update::{DigestsSink, StreamDiff};
use fdstream::writer::Journaled;
use serde::Serialize;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

/// What resuming a download found and cost, for `--json` and the summary line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// A partial was adopted.
    pub resumed: bool,
    /// Bytes the adopted journal held recorded (not read again).
    pub adopted_bytes: u64,
    /// Bytes asked for: what the journal lacked.
    pub missing_bytes: u64,
    /// Bytes on the wire for the source's block digests (the check over the whole).
    pub digests_wire_bytes: u64,
    /// Why an existing partial could not be resumed (the download started over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarted: Option<String>,
}

/// A download prepared to go through a partial.
pub struct Prepared {
    pub plan: Journaled,
    /// The ranges to read; `None` for the whole volume.
    pub ranges: Option<Arc<RangeSet>>,
    pub figures: Figures,
}

/// Whether a download to `file` goes through a partial: a regular file (or one to be
/// created) written by this process, replaced by rename. Devices, pipes, stdout, NBD exports,
/// `--in-place`, `--range`, `--update` and `--iohelper` downloads do not; nor `--no-sync`
/// ones, whose journal could record what a crash then loses.
pub fn applies(args: &Settings, file: &Path) -> bool {
    let special = std::fs::metadata(file).is_ok_and(|m| {
        let t = m.file_type();
        t.is_block_device() || t.is_char_device() || t.is_fifo() || t.is_socket()
    });
    args.direction == Direction::Download
        && !special
        && !args.in_place
        && args.ranges.is_none()
        && !args.update
        && !args.iohelper
        && !args.no_sync
}

fn remove(path: &Path) -> Result<(), CliError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CliError::Other(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Removes `dest`'s partial and journal, if any.
pub fn remove_partial(dest: &Path) -> Result<(), CliError> {
    let partial = journal::partial_for(dest);
    remove(&partial)?;
    remove(&journal::path_for(&partial))
}

/// A new partial for `dest`, replacing whatever partial was there.
pub fn fresh(args: &Settings, dest: &Path, figures: Figures) -> Result<Prepared, CliError> {
    remove_partial(dest)?;
    Ok(Prepared {
        plan: Journaled {
            partial: journal::partial_for(dest),
            dest: Some(dest.to_owned()),
            overwrite: args.overwrite,
            adopted: None,
            checksum: None,
            keep: args.resume,
        },
        ranges: None,
        figures,
    })
}

/// Prepares the download of `volume` into `dest`: adopts its partial with `--resume`
/// (fetching the source's block digests for the final check), or starts a new one.
pub fn prepare(
    args: &Settings,
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
    dest: &Path,
) -> Result<Prepared, CliError> {
    if !args.resume {
        return fresh(args, dest, Figures::default());
    }
    let partial = journal::partial_for(dest);
    let journal_path = journal::path_for(&partial);
    let adopted = match Journal::adopt(&journal_path) {
        Err(fdstream::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            // Nothing to resume: a first run with --resume.
            return fresh(args, dest, Figures::default());
        }
        Err(e) => return restart(args, dest, e.to_string()),
        Ok(j) => j,
    };
    match std::fs::metadata(&partial) {
        Ok(m) if m.is_file() && m.len() == adopted.size() => {}
        Ok(m) => {
            let why = format!(
                "{} is {} bytes, its journal says {}",
                partial.display(),
                m.len(),
                adopted.size()
            );
            return restart(args, dest, why);
        }
        Err(e) => return restart(args, dest, format!("{}: {e}", partial.display())),
    }
    let missing = adopted.missing();
    if missing.is_empty() {
        // Killed between its last record and the rename: rare enough to read again.
        return restart(
            args,
            dest,
            "its partial is complete but was never checked".into(),
        );
    }
    let ranges = match RangeSet::new(missing) {
        Ok(set) => Arc::new(set),
        Err(e) => return restart(args, dest, format!("its missing ranges: {e}")),
    };
    let (checksum, volume_len, digests_wire_bytes) = match source_checksum(engine, conn, volume) {
        Ok(c) => c,
        // A server without block digests (older ones lack ranges too) cannot check a
        // resumed whole: it is read whole instead.
        Err(e) => return restart(args, dest, e.to_string()),
    };
    if volume_len != adopted.size() {
        let why = format!(
            "the source is {volume_len} bytes now, the partial {}",
            adopted.size()
        );
        return restart(args, dest, why);
    }
    let figures = Figures {
        resumed: true,
        adopted_bytes: adopted.recorded_bytes(),
        missing_bytes: ranges.ranges().iter().map(|r| r.len).sum(),
        digests_wire_bytes,
        restarted: None,
    };
    log::info!(
        "resuming {}: {} bytes recorded, {} missing in {} ranges",
        dest.display(),
        figures.adopted_bytes,
        figures.missing_bytes,
        ranges.len()
    );
    Ok(Prepared {
        plan: Journaled {
            partial,
            dest: Some(dest.to_owned()),
            overwrite: args.overwrite,
            adopted: Some(adopted),
            checksum: Some(checksum),
            keep: true,
        },
        ranges: Some(ranges),
        figures,
    })
}

/// The partial cannot be resumed: say why and start over, or refuse with `--no-restart`.
pub fn restart(args: &Settings, dest: &Path, why: String) -> Result<Prepared, CliError> {
    if args.no_restart {
        return Err(CliError::Other(format!(
            "{}: cannot resume ({why}); the partial was left as it is (--no-restart)",
            dest.display()
        )));
    }
    tell!(
        "volstream: {}: cannot resume ({why}); starting over",
        dest.display()
    );
    fresh(
        args,
        dest,
        Figures {
            restarted: Some(why),
            ..Figures::default()
        },
    )
}

/// The source's volume checksum (docs/PROTOCOL.md 8.3), its length and the DIGESTS stream's
/// wire bytes.
fn source_checksum(
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
) -> Result<([u8; 32], u64, u64), CliError> {
    // Merged with nothing: every block of the source "differs", and the plan's checksum is
    // the source's, summed as the document streams by.
    let none = BlockDigests {
        header: engine::blockmap::BlockMapHeader::new(0),
        records: Vec::new(),
    };
    let sink = DigestsSink::new(StreamDiff::new(none, true));
    let plan = sink.plan();
    let report = engine
        .fetch(conn, Op::Digests, volume, Box::new(sink))
        .recv()
        .map_err(|_| CliError::Other("event loop ended early".into()))?;
    if let Err(e) = report.result {
        return Err(CliError::Other(format!(
            "--resume: block digests of {volume}: {e}"
        )));
    }
    let plan = plan
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| CliError::Other(format!("--resume: no block digests of {volume}")))?;
    Ok((
        plan.checksum,
        plan.source.volume_len,
        report.stats.wire_bytes,
    ))
}
