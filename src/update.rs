//! `--update`: the destination holds an older version of the volume. The local volume's block
//! digests are merged with the server's DIGESTS document as that streams in
//! (fdstream::update), and only the blocks that differ travel, as ranges (docs/PROTOCOL.md
//! 8.4). A download writes them into a copy of FILE that replaces it once its digests equal
//! the source's; an upload sends them in an updating WRITE, whose sink does the same.

use crate::error::CliError;
use engine::event_loop::ConnectionId;
use engine::proto::{Op, OpenOptions, ResumeKey};
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

/// Hashes the local volume and merges the server's digests of `volume` into a plan (the
/// local side being the source when uploading). `None`: the server has no such volume.
fn plan(
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
    local: &std::fs::File,
    shown: &str,
    upload: bool,
) -> Result<Option<(Plan, Figures)>, CliError> {
    let started = Instant::now();
    let digests = blockhash::digests_of(local, blockhash::threads())
        .map_err(|e| CliError::Other(format!("--update: hashing {shown}: {e}")))?;
    let hash_seconds = started.elapsed().as_secs_f64();
    plan_against(
        engine,
        conn,
        volume,
        OpenOptions::default(),
        digests,
        hash_seconds,
        shown,
        upload,
    )
    .map(|p| p.map_err(|_| ()).ok())
}

/// Merges `local`'s digests with the server's DIGESTS of `volume` (opened with `options`).
/// For an upload, the server's NOT_FOUND comes back as `Ok(Err(message))`.
#[allow(clippy::too_many_arguments)]
fn plan_against(
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
    options: OpenOptions,
    digests: fdstream::blockhash::BlockDigests,
    hash_seconds: f64,
    shown: &str,
    upload: bool,
) -> Result<Result<(Plan, Figures), String>, CliError> {
    let started = Instant::now();
    let sink = DigestsSink::new(StreamDiff::new(digests, !upload));
    let plan = sink.plan();
    let report = engine
        .fetch_with(conn, Op::Digests, volume, options, Box::new(sink))
        .recv()
        .map_err(|_| CliError::Other("event loop ended early".into()))?;
    match report.result {
        Err(e) if upload && e.reason == engine::Reason::NotFound => return Ok(Err(e.message)),
        Err(e) => {
            return Err(CliError::Other(format!(
                "--update {shown}: block digests of {volume}: {e}"
            )))
        }
        Ok(()) => {}
    }
    let plan = plan
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| CliError::Other(format!("--update {shown}: no block digests")))?;
    log::info!(
        "update {shown}: {} blocks changed, {} zeroed, {} bytes to send",
        plan.changed_blocks,
        plan.zeroed_blocks,
        plan.range_bytes()
    );
    let figures = Figures {
        changed_blocks: plan.changed_blocks,
        zeroed_blocks: plan.zeroed_blocks,
        range_bytes: plan.range_bytes(),
        digests_wire_bytes: report.stats.wire_bytes,
        copied_bytes: 0,
        reflinked: false,
        hash_seconds,
        digests_seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Ok((plan, figures)))
}

/// Stages the update of `file` from the server's `volume` over `conn`: copies FILE, hashes
/// it, merges the server's digests and gives the copy the source's length.
pub fn prepare(
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
    file: &Path,
) -> Result<Updating, CliError> {
    let shown = file.display().to_string();
    let local_error = |e: fdstream::Error| CliError::Other(format!("--update {shown}: {e}"));
    let staged = Staged::beside(file).map_err(local_error)?;
    let (plan, mut figures) = plan(engine, conn, volume, staged.file(), &shown, false)?
        .ok_or_else(|| CliError::Other(format!("--update {shown}: no block digests")))?;
    figures.copied_bytes = staged.copied;
    figures.reflinked = staged.reflinked;
    staged
        .file()
        .set_len(plan.source.volume_len)
        .map_err(|e| CliError::Other(format!("--update {shown}: setting its length: {e}")))?;
    Ok(Updating {
        staged,
        plan,
        figures,
    })
}

/// An upload's update: what to send, and the checksum the server's result must have.
pub struct UploadUpdate {
    plan: Plan,
    pub figures: Figures,
}

impl UploadUpdate {
    /// The ranges to send; `None` when the server's volume is already the same.
    pub fn ranges(&self) -> Option<Arc<RangeSet>> {
        if let Some(set) = self.plan.range_set() {
            return Some(set);
        }
        // Equal blocks but another length (trailing zeroes grew or shrank): the last block,
        // as a HOLE, carries the change.
        let (s, d) = (self.plan.source, self.plan.destination);
        if s.volume_len == d.volume_len || s.blocks() == 0 {
            return None;
        }
        let last = s.blocks() - 1;
        let range = engine::Range::new(last * u64::from(s.block_size), s.block_len(last));
        Some(Arc::new(RangeSet::new(vec![range]).expect("one range")))
    }

    pub fn size(&self) -> u64 {
        self.plan.source.volume_len
    }

    pub fn checksum(&self) -> [u8; 32] {
        self.plan.checksum
    }
}

/// Plans the update of the server's `volume` from the local `file`; `None` when the server
/// has no such volume yet (it is then uploaded whole).
pub fn prepare_upload(
    engine: &EngineHandle,
    conn: ConnectionId,
    file: &Path,
    volume: &str,
) -> Result<Option<UploadUpdate>, CliError> {
    let shown = file.display().to_string();
    let local = std::fs::File::open(file)
        .map_err(|e| CliError::Other(format!("--update: opening {shown}: {e}")))?;
    Ok(plan(engine, conn, volume, &local, &shown, true)?
        .map(|(plan, figures)| UploadUpdate { plan, figures }))
}

/// A resumable upload: how the server's partial is named, what the result must be, and what
/// to send (`None`: the whole content, into a new partial).
pub struct UploadResume {
    pub key: ResumeKey,
    pub checksum: [u8; 32],
    pub ranges: Option<Arc<RangeSet>>,
    pub figures: Option<Figures>,
}

/// Hashes `file`, asks the server for the digests of the partial it kept of this upload, and
/// plans what is missing; a server without one (or whose partial began from another version
/// of FILE, which it then removed) gets the whole content, and the user is told why.
pub fn prepare_resume(
    engine: &EngineHandle,
    conn: ConnectionId,
    file: &Path,
    volume: &str,
) -> Result<UploadResume, CliError> {
    let shown = file.display().to_string();
    let local = std::fs::File::open(file)
        .map_err(|e| CliError::Other(format!("--resume: opening {shown}: {e}")))?;
    let meta = local
        .metadata()
        .map_err(|e| CliError::Other(format!("--resume: inspecting {shown}: {e}")))?;
    let identity = fdstream::identity::of(&meta).ok_or_else(|| {
        CliError::Usage(format!(
            "--resume: {shown} is not a regular file, whose changes its metadata would show"
        ))
    })?;
    let path = std::fs::canonicalize(file)
        .map_err(|e| CliError::Other(format!("--resume: {shown}: {e}")))?;
    let key = fdstream::resume::client_key(&path, volume, &identity);
    let started = Instant::now();
    let digests = blockhash::digests_of(&local, blockhash::threads())
        .map_err(|e| CliError::Other(format!("--resume: hashing {shown}: {e}")))?;
    let hash_seconds = started.elapsed().as_secs_f64();
    let checksum = digests.checksum();
    let options = OpenOptions::default().with_resume(Some(key));
    match plan_against(
        engine,
        conn,
        volume,
        options,
        digests,
        hash_seconds,
        &shown,
        true,
    )? {
        Err(why) => {
            crate::out::tell!("volstream: {volume}: {why}; uploading {shown} whole");
            Ok(UploadResume {
                key,
                checksum,
                ranges: None,
                figures: None,
            })
        }
        Ok((plan, figures)) => {
            crate::out::tell!(
                "volstream: {volume}: resuming, {} of {} bytes to send",
                plan.range_bytes(),
                plan.source.volume_len
            );
            let update = UploadUpdate { plan, figures };
            // A complete partial still needs a stream to be committed: its last block.
            let ranges = update.ranges().or_else(|| last_block(&update));
            Ok(UploadResume {
                key,
                checksum,
                ranges,
                figures: Some(update.figures),
            })
        }
    }
}

fn last_block(update: &UploadUpdate) -> Option<Arc<RangeSet>> {
    let s = update.plan.source;
    let last = s.blocks().checked_sub(1)?;
    let range = engine::Range::new(last * u64::from(s.block_size), s.block_len(last));
    Some(Arc::new(RangeSet::new(vec![range]).expect("one range")))
}
