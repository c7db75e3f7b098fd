//! The partial uploads a server keeps for `upload --resume` (docs/PROTOCOL.md 8.5).
//!
//! A resumable upload is written into `.volstream-resume-{key}` in the pool, with its
//! [`Journal`] beside it (`{partial}.journal`): the ranges made durable so far, and the
//! identity of the client's source. `key` is BLAKE3 of the volume's name, the peer's identity
//! as the transport proved it (certificate subject, Unix uid; for plain TCP only the address,
//! which proves nothing) and the client's token, so a peer can only ever name its own
//! partials. A partial whose writer is gone stays until it is resumed, or until it is older
//! than the keep time or the partials together exceed the disk budget (oldest first): see
//! [`ResumeStore::sweep`], which a server runs at start and periodically.
//!
//! What the journal does not record may have been written but not synced when the server
//! died, so before the partial is described to a client (its block digests, from which the
//! client computes what to send) everything unrecorded is punched: the partial then reads as
//! zero wherever nothing durable is known, and the digests say so.

use crate::blockhash;
use crate::error::Error;
use crate::fd::Kind;
use crate::journal::{self, Journal};
use crate::punch::Zeroer;
use bytes::Bytes;
use engine::event_loop::peer::PeerIdentity;
use engine::proto::ResumeKey;
use engine::VolumeIdentity;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What every kept partial's name starts with (a dot: never listed or served as a volume).
pub const PREFIX: &str = ".volstream-resume-";

/// Where a server keeps partial uploads, and for how long and how much.
#[derive(Debug, Clone)]
pub struct ResumeStore {
    pool: PathBuf,
    keep: Duration,
    budget: u64,
}

/// Who owns a partial: the part of a peer's identity that stays the same across its
/// connections (not a Unix peer's pid, not a TCP peer's port).
pub fn owner(identity: &PeerIdentity) -> String {
    match identity {
        PeerIdentity::Certificate(c) => format!("certificate {}", c.subject),
        PeerIdentity::Unix { uid, .. } => format!("uid {uid}"),
        PeerIdentity::Address(a) => format!("address {}", a.ip()),
        PeerIdentity::Unknown => "unknown".into(),
    }
}

/// The identity a partial's journal holds for the source `key` names.
pub fn source_identity(key: &ResumeKey) -> VolumeIdentity {
    VolumeIdentity::new(key.source.to_vec()).expect("32 bytes is a valid identity")
}

/// The key a client names its resumable upload of the file at `path` (absolute) as `volume`
/// by: the token depends on the path and volume only, so the client keeps nothing and the
/// same command finds the same partial (the server adds the peer's identity, so the path is
/// no secret another peer could use); the source digest is of the file's `identity`, which
/// moves when its content may have changed.
pub fn client_key(path: &std::path::Path, volume: &str, identity: &VolumeIdentity) -> ResumeKey {
    let mut h = blake3::Hasher::new();
    h.update(b"volstream upload token v1\0");
    for part in [path.as_os_str().as_encoded_bytes(), volume.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    ResumeKey {
        token: *h.finalize().as_bytes(),
        source: *blake3::hash(identity.as_bytes()).as_bytes(),
    }
}

/// A partial that was removed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub name: String,
    pub allocated: u64,
    pub why: &'static str,
}

impl ResumeStore {
    /// Partials in `pool`, kept `keep` after their last write, `budget` bytes on disk at most.
    pub fn new(pool: impl Into<PathBuf>, keep: Duration, budget: u64) -> Self {
        ResumeStore {
            pool: pool.into(),
            keep,
            budget,
        }
    }

    /// The partial's file name for `volume` uploaded by `owner` with `token`.
    pub fn partial_name(volume: &str, owner: &str, token: &[u8; 32]) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"volstream partial upload v1\0");
        for part in [volume.as_bytes(), owner.as_bytes(), &token[..]] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        format!("{PREFIX}{}", h.finalize().to_hex())
    }

    /// The partial's and its journal's paths.
    pub fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let partial = self.pool.join(name);
        let journal = journal::path_for(&partial);
        (partial, journal)
    }

    /// Removes a partial and its journal (what is gone already is no error).
    pub fn remove(&self, name: &str) {
        let (partial, journal) = self.paths(name);
        for p in [partial, journal] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", p.display());
                }
            }
        }
    }

    /// Adopts the partial `name` of `volume` begun from the source `key` names: its journal
    /// checked, the partial locked against other writers. A partial that cannot be continued
    /// is removed, and the error says why in one line.
    pub fn adopt(&self, volume: &str, name: &str, key: &ResumeKey) -> Result<Adopted, Error> {
        let (partial, journal_path) = self.paths(name);
        let journal = match Journal::adopt(&journal_path) {
            Ok(j) => j,
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NoPartial(format!(
                    "the server holds no partial upload of {volume} from this source for this peer"
                )));
            }
            Err(e) => {
                log::warn!("partial upload of {volume}: {e}; removing it");
                self.remove(name);
                return Err(Error::NoPartial(format!(
                    "the partial upload of {volume} had an unusable journal and was removed"
                )));
            }
        };
        if journal.identity() != Some(&source_identity(key)) {
            self.remove(name);
            return Err(Error::NoPartial(format!(
                "the source changed since the partial upload of {volume} began; the partial \
                 was removed"
            )));
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&partial)
        {
            Ok(f) => f,
            Err(e) => {
                log::warn!("partial upload of {volume}: {e}; removing its journal");
                self.remove(name);
                return Err(Error::NoPartial(format!(
                    "the partial upload of {volume} is gone (its journal was removed)"
                )));
            }
        };
        if !lock(&file) {
            return Err(Error::NoPartial(format!(
                "the partial upload of {volume} is being written by another upload"
            )));
        }
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("inspecting the partial upload of {volume}"), e))?
            .len();
        if len != journal.size() {
            self.remove(name);
            return Err(Error::NoPartial(format!(
                "the partial upload of {volume} has {len} bytes, its journal says {}; removed",
                journal.size()
            )));
        }
        Ok(Adopted { file, journal })
    }

    /// The block digests (a DIGESTS document) of the partial `key` names, after everything
    /// the journal does not record was punched. Blocks; run it on a worker.
    pub fn digests(
        &self,
        volume: &str,
        owner: &str,
        key: &ResumeKey,
        threads: usize,
    ) -> Result<Bytes, Error> {
        let name = Self::partial_name(volume, owner, &key.token);
        let adopted = self.adopt(volume, &name, key)?;
        adopted.punch_unrecorded(volume)?;
        let digests = blockhash::digests_of(&adopted.file, threads)
            .map_err(|e| Error::io(format!("hashing the partial upload of {volume}"), e))?;
        log::info!(
            "partial upload of {volume}: {} of {} bytes recorded",
            adopted.journal.recorded_bytes(),
            adopted.journal.size()
        );
        Ok(Bytes::from(digests.encode()))
    }

    /// Removes the partials whose last write is older than the keep time, then the oldest
    /// until the rest fit the budget. A partial being written (its lock held) is left alone.
    pub fn sweep(&self) -> io::Result<Vec<Removed>> {
        let now = SystemTime::now();
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.pool)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(hex) = name.strip_prefix(PREFIX) else {
                continue;
            };
            // Only the partials themselves; their journals go with them.
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let (partial, journal) = self.paths(&name);
            let Ok(file) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&partial)
            else {
                continue;
            };
            let meta = file.metadata()?;
            if !meta.is_file() || !lock(&file) {
                continue;
            }
            let touched = [
                Some(meta.modified()?),
                std::fs::metadata(&journal)
                    .ok()
                    .and_then(|m| m.modified().ok()),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(now);
            let allocated = meta.blocks() * 512;
            let age = now.duration_since(touched).unwrap_or_default();
            if age > self.keep {
                drop(file);
                self.remove(&name);
                removed.push(Removed {
                    name,
                    allocated,
                    why: "expired",
                });
                continue;
            }
            kept.push((touched, name, allocated, file));
        }
        kept.sort_by_key(|k| k.0);
        let mut total: u64 = kept.iter().map(|k| k.2).sum();
        for (_, name, allocated, file) in kept {
            if total <= self.budget {
                break;
            }
            drop(file);
            self.remove(&name);
            total -= allocated;
            removed.push(Removed {
                name,
                allocated,
                why: "over the disk budget",
            });
        }
        Ok(removed)
    }

    /// How often a server sweeps: often enough that a partial outlives its keep time by at
    /// most a quarter of it (and a minute at most).
    pub fn sweep_interval(&self) -> Duration {
        (self.keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// A partial taken over by one writer (its flock held as long as `file` is open).
pub struct Adopted {
    pub file: File,
    pub journal: Journal,
}

impl Adopted {
    /// Makes everything the journal does not record read as zero: written, perhaps, but never
    /// synced, so not to be trusted.
    pub fn punch_unrecorded(&self, volume: &str) -> Result<(), Error> {
        let mut zeroer = Zeroer::new(Kind::Regular, false);
        for gap in self.journal.missing() {
            zeroer
                .zero(&self.file, gap.offset, gap.len)
                .map_err(|e| Error::io(format!("clearing the unrecorded part of {volume}"), e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing the partial upload of {volume}"), e))
    }
}

/// Takes the partial's lock, which its writer holds while it lives (as `temp::hold` does for
/// temporaries); false when another open file holds it.
pub(crate) fn lock(file: &File) -> bool {
    // SAFETY: flock on a valid fd; the lock goes with the fd.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}
