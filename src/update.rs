//! `download --update`: the local FILE holds an older version of the volume. Its block
//! digests are merged with the server's DIGESTS document as that streams in
//! (fdstream::update), only the blocks that differ are read (as ranges) into a copy of FILE,
//! and the copy replaces FILE once its digests equal the source's (docs/PROTOCOL.md 8.4).

use crate::error::CliError;
use engine::event_loop::ConnectionId;
use engine::proto::Op;
use engine::{EngineHandle, RangeSet, TransferError};
use fdstream::blockhash;
use fdstream::update::{DigestsSink, Plan, Staged, StreamDiff};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What an update found and moved besides the content, for `--json` and the summary line.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Blocks whose content differs, or that only the source has (these travel as DATA).
    pub changed_blocks: u64,
    /// Blocks that read as zero in the source but held data here (these travel as HOLE).
    pub zeroed_blocks: u64,
    /// Bytes of the ranges asked for (blocks merged to fit the range limit included).
    pub range_bytes: u64,
    /// Bytes on the wire for the server's block digests.
    pub digests_wire_bytes: u64,
    /// Data bytes copied locally to start the updated copy (0 with a reflink).
    pub copied_bytes: u64,
    pub reflinked: bool,
    /// Hashing the local file, and receiving and merging the server's digests.
    pub hash_seconds: f64,
    pub digests_seconds: f64,
}

/// A pair being updated: the copy it is written into and what the copy must become.
pub struct Updating {
    staged: Staged,
    plan: Plan,
    pub figures: Figures,
}

impl Updating {
    /// The ranges to read, `None` when the copy is already equal to the source.
    pub fn ranges(&self) -> Option<Arc<RangeSet>> {
        self.plan.range_set()
    }

    /// Where the ranges are written, in place.
    pub fn temp_path(&self) -> &Path {
        self.staged.path()
    }

    pub fn size(&self) -> u64 {
        self.plan.source.volume_len
    }

    /// The copy replaces FILE if its block digests are the source's.
    pub fn finish(self) -> Result<(), TransferError> {
        self.staged
            .commit(&self.plan.checksum, blockhash::threads())
            .map_err(|e| TransferError {
                reason: e.reason(),
                message: e.to_string(),
                origin: engine::event_loop::Origin::Local,
            })
    }
}

/// Stages the update of `file` from the server's `volume` over `conn`: copies FILE, hashes
/// it, merges the server's digests and gives the copy the source's length.
pub fn prepare(
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
    file: &Path,
) -> Result<Updating, CliError> {
    let shown = file.display();
    let local_error = |e: fdstream::Error| CliError::Other(format!("--update {shown}: {e}"));
    let started = Instant::now();
    let staged = Staged::beside(file).map_err(local_error)?;
    let local = blockhash::digests_of(staged.file(), blockhash::threads())
        .map_err(|e| CliError::Other(format!("--update: hashing {shown}: {e}")))?;
    let hash_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let sink = DigestsSink::new(StreamDiff::new(local, true));
    let plan = sink.plan();
    let report = engine
        .fetch(conn, Op::Digests, volume, Box::new(sink))
        .recv()
        .map_err(|_| CliError::Other("event loop ended early".into()))?;
    if let Err(e) = report.result {
        return Err(CliError::Other(format!(
            "--update {shown}: block digests of {volume}: {e}"
        )));
    }
    let plan = plan
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| CliError::Other(format!("--update {shown}: no block digests")))?;
    staged
        .file()
        .set_len(plan.source.volume_len)
        .map_err(|e| CliError::Other(format!("--update {shown}: setting its length: {e}")))?;
    log::info!(
        "update {shown}: {} blocks changed, {} zeroed, {} bytes to read",
        plan.changed_blocks,
        plan.zeroed_blocks,
        plan.range_bytes()
    );
    let figures = Figures {
        changed_blocks: plan.changed_blocks,
        zeroed_blocks: plan.zeroed_blocks,
        range_bytes: plan.range_bytes(),
        digests_wire_bytes: report.stats.wire_bytes,
        copied_bytes: staged.copied,
        reflinked: staged.reflinked,
        hash_seconds,
        digests_seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Updating {
        staged,
        plan,
        figures,
    })
}
