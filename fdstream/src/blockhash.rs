//! Block digests of a volume and what is built on them: the allocation-independent checksum
//! (`volstream checksum`) and the difference of two volumes (`--update`).
//!
//! A volume is cut into [`BLOCK_SIZE`] blocks; a block's digest is BLAKE3 of its bytes. Blocks
//! that read as zero (holes, written zeroes) get no record: their digest is known without
//! reading, so a hole costs nothing and the same content hashes alike however it is allocated.
//! Hashing runs on scoped threads of the calling worker, never on an event loop.

use crate::extents::{extents_of, ExtentKind};
use crate::fd::{self, Kind};
use crate::zero;
use engine::blockmap::{BlockDigest, BlockMapHeader, BlockRecord, BLOCK_SIZE};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Names the checksum's construction, in `checksum --json` and in docs/PROTOCOL.md 8.3.
pub const ALGORITHM: &str = "volstream-blake3-64k";
/// Blocks one job reads with one pread (8 MiB): large enough for sequential throughput, small
/// enough that a few threads share a sparse volume's data evenly.
const JOB_BLOCKS: u64 = 128;
/// Domain separation: this checksum is not BLAKE3 of the volume's bytes.
const CONTEXT: &[u8] = b"volstream block checksum v1\0";

/// A volume's block digests: its header and one record per block that does not read as zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigests {
    pub header: BlockMapHeader,
    pub records: Vec<BlockRecord>,
}

impl BlockDigests {
    /// The document a DIGESTS stream carries.
    pub fn encode(&self) -> Vec<u8> {
        engine::blockmap::encode(&self.header, &self.records)
    }

    /// The volume's checksum: independent of allocation, since zero blocks enter it as the
    /// digest of zeroes whether they were read or not.
    pub fn checksum(&self) -> BlockDigest {
        let mut sum = Checksum::new(self.header);
        for r in &self.records {
            sum.record(r);
        }
        sum.finish()
    }
}

/// The volume checksum (docs/PROTOCOL.md 8.3) built record by record, so a document that
/// arrives as a stream is summed without being held.
pub struct Checksum {
    header: BlockMapHeader,
    hasher: blake3::Hasher,
    /// The next block to enter the sum.
    next: u64,
    full_zero: BlockDigest,
}

impl Checksum {
    pub fn new(header: BlockMapHeader) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(CONTEXT);
        hasher.update(&u64::from(header.block_size).to_le_bytes());
        hasher.update(&header.volume_len.to_le_bytes());
        Checksum {
            header,
            hasher,
            next: 0,
            full_zero: *blake3::hash(&vec![0u8; header.block_size as usize]).as_bytes(),
        }
    }

    /// Records must come in increasing index order, each below the block count (as a
    /// decoded document's do).
    pub fn record(&mut self, r: &BlockRecord) {
        self.zeroes_until(r.index);
        self.hasher.update(&r.digest);
        self.next = r.index + 1;
    }

    pub fn finish(mut self) -> BlockDigest {
        self.zeroes_until(self.header.blocks());
        *self.hasher.finalize().as_bytes()
    }

    fn zeroes_until(&mut self, end: u64) {
        for index in self.next..end {
            match self.header.block_len(index) {
                len if len == u64::from(self.header.block_size) => {
                    self.hasher.update(&self.full_zero)
                }
                len => self
                    .hasher
                    .update(blake3::hash(&vec![0u8; len as usize]).as_bytes()),
            };
        }
        self.next = self.next.max(end);
    }
}

/// Hashes every block of `file` (a regular file or a block device) that may hold data, on up
/// to `threads` threads. A file's holes are skipped without reading (SEEK_DATA); a device is
/// read whole, its zero blocks found by looking.
pub fn digests_of(file: &File, threads: usize) -> io::Result<BlockDigests> {
    let kind = Kind::of(file)?;
    let volume_len = fd::size_of(file, kind)?.ok_or_else(|| {
        io::Error::new(io::ErrorKind::Unsupported, "a stream has no block digests")
    })?;
    let header = BlockMapHeader::new(volume_len);
    let bs = u64::from(BLOCK_SIZE);
    // Runs of blocks that touch data, as [first, end) block indices.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    if kind == Kind::Regular {
        for e in extents_of(file)? {
            if e.kind != ExtentKind::Data || e.len == 0 {
                continue;
            }
            let (first, end) = (e.offset / bs, (e.offset + e.len).div_ceil(bs));
            match runs.last_mut() {
                Some(last) if last.1 >= first => last.1 = last.1.max(end),
                _ => runs.push((first, end)),
            }
        }
    } else if header.blocks() > 0 {
        runs.push((0, header.blocks()));
    }
    let jobs: Vec<(u64, u64)> = runs
        .iter()
        .flat_map(|&(first, end)| {
            (first..end)
                .step_by(JOB_BLOCKS as usize)
                .map(move |s| (s, (s + JOB_BLOCKS).min(end)))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, Vec<BlockRecord>)>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            s.spawn(|| {
                let mut buf = vec![0u8; (JOB_BLOCKS * bs) as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(first, end)) = jobs.get(i) else {
                        return;
                    };
                    match hash_job(file, kind, &header, first, end, &mut buf) {
                        Ok(records) => done.lock().unwrap().push((i, records)),
                        Err(e) => {
                            *failed.lock().unwrap() = Some(e);
                            // The others stop at their next job.
                            next.store(jobs.len(), Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let mut done = done.into_inner().unwrap();
    done.sort_unstable_by_key(|(i, _)| *i);
    let records = done.into_iter().flat_map(|(_, r)| r).collect();
    Ok(BlockDigests { header, records })
}

fn hash_job(
    file: &File,
    kind: Kind,
    header: &BlockMapHeader,
    first: u64,
    end: u64,
    buf: &mut [u8],
) -> io::Result<Vec<BlockRecord>> {
    let bs = u64::from(header.block_size);
    let offset = first * bs;
    let len = (end * bs).min(header.volume_len) - offset;
    let buf = &mut buf[..len as usize];
    fd::read_full(file, kind, offset, buf)?;
    Ok(buf
        .chunks(bs as usize)
        .zip(first..)
        .filter(|(block, _)| !zero::is_zero(block))
        .map(|(block, index)| BlockRecord {
            index,
            digest: *blake3::hash(block).as_bytes(),
        })
        .collect())
}

/// What turns a destination into a copy of a source, in byte ranges `(offset, len)` of whole
/// blocks (the last one may be short), each list sorted and coalesced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockDiff {
    /// Source blocks with data the destination does not have: these travel.
    pub copy: Vec<(u64, u64)>,
    /// Blocks that read as zero in the source but hold data in the destination: these are
    /// punched where the destination is, nothing travels.
    pub zero: Vec<(u64, u64)>,
}

impl BlockDiff {
    pub fn copy_bytes(&self) -> u64 {
        self.copy.iter().map(|r| r.1).sum()
    }
}

/// The difference from `dest` to `source`, which must describe volumes of the same block size.
/// Both record lists are sorted (as documents are), so one merge pass finds it.
pub fn diff(source: &BlockDigests, dest: &BlockDigests) -> BlockDiff {
    let header = source.header;
    let bs = u64::from(header.block_size);
    let mut out = BlockDiff::default();
    let add = |list: &mut Vec<(u64, u64)>, index: u64| {
        let (offset, len) = (index * bs, header.block_len(index));
        match list.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += len,
            _ => list.push((offset, len)),
        }
    };
    let (mut s, mut d) = (
        source.records.iter().peekable(),
        dest.records.iter().peekable(),
    );
    loop {
        match (s.peek(), d.peek()) {
            (None, None) => break,
            (Some(a), Some(b)) if a.index == b.index => {
                if a.digest != b.digest {
                    add(&mut out.copy, a.index);
                }
                s.next();
                d.next();
            }
            (Some(a), b) if b.is_none_or(|b| a.index < b.index) => {
                add(&mut out.copy, a.index);
                s.next();
            }
            (_, Some(b)) => {
                // Data past the source's end is cut off by the final length, not punched.
                if b.index < header.blocks() {
                    add(&mut out.zero, b.index);
                }
                d.next();
            }
            (Some(_), None) => unreachable!("handled by the arm above"),
        }
    }
    out
}

/// Hashing threads for one volume: the machine's cores, at most 4 (one pread stream each
/// keeps a disk busy; more only compete with the transfers a server runs meanwhile).
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

/// Lowercase hex of a digest, as `checksum` prints it.
pub fn hex(digest: &BlockDigest) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn digests(path: &std::path::Path) -> BlockDigests {
        digests_of(&File::open(path).unwrap(), 3).unwrap()
    }

    #[test]
    fn holes_and_written_zeroes_hash_alike_and_data_does_not() {
        let dir = tempdir();
        let bs = u64::from(BLOCK_SIZE);
        let len = 40 * bs + 123;
        let sparse = dir.join("sparse");
        let f = File::create(&sparse).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(b"hello", 3 * bs + 7).unwrap();
        f.write_all_at(&[9u8; 100], len - 100).unwrap();
        // A block of written zeroes is still allocated, and hashes as a hole.
        f.write_all_at(&vec![0u8; bs as usize], 20 * bs).unwrap();
        let dense = dir.join("dense");
        let mut all = vec![0u8; len as usize];
        all[(3 * bs + 7) as usize..][..5].copy_from_slice(b"hello");
        all[(len - 100) as usize..].fill(9);
        File::create(&dense).unwrap().write_all(&all).unwrap();

        let (a, b) = (digests(&sparse), digests(&dense));
        assert_eq!(a, b);
        assert_eq!(
            a.records.iter().map(|r| r.index).collect::<Vec<_>>(),
            [3, 40]
        );
        assert_eq!(a.header.blocks(), 41);
        assert_eq!(a.checksum(), b.checksum());
        f.write_all_at(b"!", 30 * bs).unwrap();
        let c = digests(&sparse);
        assert_ne!(c.checksum(), a.checksum());
        assert_eq!(
            diff(&c, &a),
            BlockDiff {
                copy: vec![(30 * bs, bs)],
                zero: vec![]
            }
        );
        assert_eq!(
            diff(&a, &c),
            BlockDiff {
                copy: vec![],
                zero: vec![(30 * bs, bs)]
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_checksum_covers_the_length() {
        let short = BlockDigests {
            header: BlockMapHeader::new(100),
            records: vec![],
        };
        let long = BlockDigests {
            header: BlockMapHeader::new(101),
            records: vec![],
        };
        assert_ne!(short.checksum(), long.checksum());
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "blockhash-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
