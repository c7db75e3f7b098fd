//! Incremental sync (`--update`, docs/PROTOCOL.md 8.4): which blocks turn an older copy into
//! the source, found by merging a peer's block digest document, as it streams in, with the
//! local volume's digests; and the temporary the update is written into, a copy of the old
//! destination that gets the final name only once its digests equal the source's.
//!
//! The peer's document is never held: its records are compared as they arrive and forgotten,
//! the blocks to send are kept as at most `2 * MAX_RANGES` ranges (merged across the smallest
//! gaps beyond that, which only rereads blocks that were equal), and the source's checksum is
//! summed on the way, so whatever a peer claims or sends costs a bounded amount of memory.

use crate::blockhash::{BlockDigests, Checksum};
use crate::error::Error;
use crate::extents::{extents_of, ExtentKind};
use crate::fd;
use crate::temp;
use engine::blockmap::{BlockDigest, BlockMapDecoder, BlockMapError, BlockMapHeader, BlockRecord};
use engine::range::MAX_RANGES;
use engine::WriteProgress;
use engine::{Chunk, Digest, Notify, Range, RangeSet, Reason, VolumeError, VolumeWriter};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What an update has to move: the ranges of the source to send (blocks that differ, and
/// blocks the source lacks but the destination holds, which travel as HOLE), and the checksum
/// the result must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub source: BlockMapHeader,
    pub destination: BlockMapHeader,
    /// Sorted, disjoint, at most [`MAX_RANGES`]; empty when the destination is already equal
    /// (apart, perhaps, from its length).
    pub ranges: Vec<Range>,
    /// Blocks whose digests differ or that only the source has.
    pub changed_blocks: u64,
    /// Blocks that read as zero in the source but hold data in the destination.
    pub zeroed_blocks: u64,
    /// The source's volume checksum (8.3): what the result's must be.
    pub checksum: BlockDigest,
}

impl Plan {
    /// The ranges as the set a ranged READ (or an UPDATE write) takes; `None` when empty.
    pub fn range_set(&self) -> Option<Arc<RangeSet>> {
        if self.ranges.is_empty() {
            return None;
        }
        let set = RangeSet::new(self.ranges.clone()).expect("built sorted, disjoint and bounded");
        Some(Arc::new(set))
    }

    pub fn range_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// The merge of a streamed document (the peer's) with the local volume's digests.
pub struct StreamDiff {
    local: BlockDigests,
    /// Local records already merged.
    pos: usize,
    /// The streamed document describes the source (a download) or the destination (an
    /// upload, whose source is the local volume).
    remote_is_source: bool,
    decoder: BlockMapDecoder,
    ranges: Vec<Range>,
    changed_blocks: u64,
    zeroed_blocks: u64,
    /// The source's checksum, summed as the remote document streams (downloads only).
    checksum: Option<Checksum>,
}

impl StreamDiff {
    pub fn new(local: BlockDigests, remote_is_source: bool) -> Self {
        StreamDiff {
            local,
            pos: 0,
            remote_is_source,
            decoder: BlockMapDecoder::new(),
            ranges: Vec::new(),
            changed_blocks: 0,
            zeroed_blocks: 0,
            checksum: None,
        }
    }

    /// Takes the next bytes of the peer's document.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), BlockMapError> {
        let mut batch = Vec::with_capacity(bytes.len() / engine::blockmap::RECORD_LEN + 1);
        self.decoder.feed(bytes, |r| batch.push(r))?;
        let Some(remote) = self.decoder.header() else {
            return Ok(());
        };
        if self.remote_is_source && self.checksum.is_none() {
            self.checksum = Some(Checksum::new(remote));
        }
        for r in batch {
            self.local_until(&remote, r.index);
            let local = self
                .local
                .records
                .get(self.pos)
                .filter(|l| l.index == r.index)
                .map(|l| l.digest);
            if local.is_some() {
                self.pos += 1;
            }
            self.block(&remote, r.index, Some(r.digest), local);
            if let Some(sum) = &mut self.checksum {
                sum.record(&r);
            }
        }
        Ok(())
    }

    /// The peer's document ended: the plan, or why the document was refused.
    pub fn finish(mut self) -> Result<Plan, BlockMapError> {
        let remote = self.decoder.finish()?;
        self.local_until(&remote, u64::MAX);
        let (source, destination) = self.sides(&remote);
        let checksum = match self.checksum.take() {
            Some(sum) => sum.finish(),
            None if self.remote_is_source => Checksum::new(remote).finish(),
            None => self.local.checksum(),
        };
        Ok(Plan {
            source,
            destination,
            ranges: RangeSet::normalize(self.ranges).ranges().to_vec(),
            changed_blocks: self.changed_blocks,
            zeroed_blocks: self.zeroed_blocks,
            checksum,
        })
    }

    fn sides(&self, remote: &BlockMapHeader) -> (BlockMapHeader, BlockMapHeader) {
        if self.remote_is_source {
            (*remote, self.local.header)
        } else {
            (self.local.header, *remote)
        }
    }

    /// Merges the local records below `end` that the peer has no record for.
    fn local_until(&mut self, remote: &BlockMapHeader, end: u64) {
        while let Some(&BlockRecord { index, digest }) =
            self.local.records.get(self.pos).filter(|l| l.index < end)
        {
            self.pos += 1;
            self.block(remote, index, None, Some(digest));
        }
    }

    /// Block `index` as the two sides have it (`None`: reads as zero there).
    fn block(
        &mut self,
        remote: &BlockMapHeader,
        index: u64,
        theirs: Option<BlockDigest>,
        ours: Option<BlockDigest>,
    ) {
        let (source, destination) = self.sides(remote);
        let (s, d) = if self.remote_is_source {
            (theirs, ours)
        } else {
            (ours, theirs)
        };
        if index >= source.blocks() {
            // Past the source's end: cut off by its length.
            return;
        }
        let same_len = source.block_len(index) == destination.block_len(index);
        match (s, d) {
            (Some(s), d) if d != Some(s) || !same_len => self.changed_blocks += 1,
            (None, Some(_)) => self.zeroed_blocks += 1,
            _ => return,
        }
        let bs = u64::from(source.block_size);
        let (offset, len) = (index * bs, source.block_len(index));
        match self.ranges.last_mut() {
            Some(last) if last.end() == offset => last.len += len,
            _ => self.ranges.push(Range::new(offset, len)),
        }
        if self.ranges.len() > 2 * MAX_RANGES {
            let merged = RangeSet::normalize(std::mem::take(&mut self.ranges));
            self.ranges = merged.ranges().to_vec();
        }
    }
}

/// A sink for a DIGESTS stream that merges the document into a [`StreamDiff`] as it arrives;
/// the plan is in [`DigestsSink::plan`] once the stream succeeded.
pub struct DigestsSink {
    diff: Option<StreamDiff>,
    plan: Arc<Mutex<Option<Plan>>>,
    digest: Digest,
    completed: u64,
    outcome: Option<Result<(), VolumeError>>,
}

impl DigestsSink {
    pub fn new(diff: StreamDiff) -> Self {
        DigestsSink {
            diff: Some(diff),
            plan: Arc::default(),
            digest: Digest::new(),
            completed: 0,
            outcome: None,
        }
    }

    /// Where the plan appears when the document ended well.
    pub fn plan(&self) -> Arc<Mutex<Option<Plan>>> {
        Arc::clone(&self.plan)
    }

    fn fail(&mut self, e: BlockMapError) {
        self.diff = None;
        self.outcome = Some(Err(VolumeError::new(
            Reason::Protocol,
            format!("bad block digests: {e}"),
        )));
    }
}

impl VolumeWriter for DigestsSink {
    fn start(&mut self, _size: u64, _notify: Notify) {}

    fn write(&mut self, chunk: Chunk) {
        self.completed += 1;
        if self.outcome.is_some() {
            return;
        }
        match chunk {
            Chunk::Data { bytes, .. } => {
                self.digest.update(&bytes);
                if let Some(Err(e)) = self.diff.as_mut().map(|d| d.feed(&bytes)) {
                    self.fail(e);
                }
            }
            Chunk::Hole { len, .. } => {
                // A document has no zero runs worth a hole; read as zeroes it is refused
                // anyway, at a bounded cost: fed a block at a time.
                self.digest.update_zeroes(len);
                let zeroes = [0u8; 4096];
                let mut left = len;
                while left > 0 && self.outcome.is_none() {
                    let n = left.min(zeroes.len() as u64) as usize;
                    if let Some(Err(e)) = self.diff.as_mut().map(|d| d.feed(&zeroes[..n])) {
                        self.fail(e);
                    }
                    left -= n as u64;
                }
            }
            Chunk::End { digest, .. } => {
                let ours = self.digest.value();
                if let Some(theirs) = digest.filter(|d| *d != ours) {
                    self.outcome = Some(Err(VolumeError::new(
                        Reason::DigestMismatch,
                        format!("block digests: digest {ours:#010x}, sender says {theirs:#010x}"),
                    )));
                    return;
                }
                match self.diff.take().map(StreamDiff::finish) {
                    Some(Ok(plan)) => {
                        *self.plan.lock().unwrap() = Some(plan);
                        self.outcome = Some(Ok(()));
                    }
                    Some(Err(e)) => self.fail(e),
                    None => self.outcome = Some(Err(VolumeError::new(Reason::Cancelled, ""))),
                }
            }
        }
    }

    fn poll_progress(&mut self) -> WriteProgress {
        WriteProgress {
            completed: self.completed,
            outcome: self.outcome.clone(),
        }
    }
}

/// The temporary an update is written into: beside the final name, starting as a copy of the
/// old destination (reflinked where the file system can, else its data extents copied), held
/// like every temporary (see [`temp`]) and removed on drop unless committed.
pub struct Staged {
    dir: Arc<OwnedFd>,
    temp: CString,
    final_name: CString,
    file: Option<File>,
    shown: String,
    path: PathBuf,
    /// Bytes of data copied from the old destination (0 when reflinked).
    pub copied: u64,
    pub reflinked: bool,
}

impl Staged {
    /// Stages an update of `path`: a new temporary holding a copy of it, or empty when `path`
    /// does not exist yet.
    pub fn beside(path: &Path) -> Result<Staged, Error> {
        let shown = path.display().to_string();
        let dir_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let final_name = path
            .file_name()
            .and_then(|n| CString::new(n.as_bytes()).ok())
            .ok_or_else(|| Error::InvalidName(shown.clone()))?;
        let dir = fd::open_dir(&dir_path)
            .map_err(|e| Error::io(format!("opening {shown}'s directory"), e))?;
        let mut staged = Staged::at(Arc::new(dir), final_name, shown)?;
        staged.path = dir_path.join(std::ffi::OsStr::from_bytes(staged.temp.as_bytes()));
        Ok(staged)
    }

    /// Stages an update of `final_name` inside `dir` (a server's pool), as [`Staged::beside`].
    pub fn at(dir: Arc<OwnedFd>, final_name: CString, shown: String) -> Result<Staged, Error> {
        let old = match fd::open_beneath(&dir, &final_name, libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("opening {shown}"), e)),
        };
        if let Some(old) = &old {
            let meta = old
                .metadata()
                .map_err(|e| Error::io(format!("inspecting {shown}"), e))?;
            if !meta.is_file() {
                return Err(Error::Unsupported(format!(
                    "an update replaces a regular file; {shown} is not one"
                )));
            }
            // The digests of a qcow2 container's bytes would not describe its guest view.
            if crate::qemu::qcow2_header(old)
                .map_err(|e| Error::io(shown.clone(), e))?
                .is_some()
            {
                return Err(Error::Unsupported(format!(
                    "{shown} is a qcow2 image, which cannot be updated by blocks"
                )));
            }
        }
        let temp_name = temp::name(final_name.as_bytes());
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let file = fd::openat(&dir, &temp_name, flags, 0o644)
            .map_err(|e| Error::io(format!("creating a temporary file for {shown}"), e))?;
        temp::hold(&file);
        let mut staged = Staged {
            path: PathBuf::from(std::ffi::OsStr::from_bytes(temp_name.as_bytes())),
            dir,
            temp: temp_name,
            final_name,
            file: Some(file),
            shown,
            copied: 0,
            reflinked: false,
        };
        if let Some(old) = old {
            let file = staged.file.as_ref().expect("just created");
            let copy = || -> io::Result<(bool, u64)> {
                file.set_permissions(old.metadata()?.permissions())?;
                copy_sparse(&old, file)
            };
            let (reflinked, copied) = copy()
                .map_err(|e| Error::io(format!("copying {} to update it", staged.shown), e))?;
            staged.reflinked = reflinked;
            staged.copied = copied;
        }
        Ok(staged)
    }

    /// The temporary's name in its directory.
    pub fn temp_name(&self) -> &CString {
        &self.temp
    }

    /// The directory the temporary and the final name are in.
    pub fn dir(&self) -> &Arc<OwnedFd> {
        &self.dir
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("until committed")
    }

    /// The temporary's path, for a writer that opens it in place.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the temporary the final name if its block digests have `checksum`; otherwise
    /// removes it and leaves the old destination as it was.
    pub fn commit(mut self, checksum: &BlockDigest, threads: usize) -> Result<(), Error> {
        let file = self.file.take().expect("committed once");
        let same = has_checksum(&file, checksum, threads)
            .map_err(|e| Error::io(format!("hashing the updated copy of {}", self.shown), e))?;
        if !same {
            return Err(Error::UpdateMismatch(self.shown.clone()));
        }
        file.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.shown), e))?;
        drop(file);
        fd::renameat(&self.dir, &self.temp, &self.final_name, true)
            .map_err(|e| Error::io(format!("renaming into {}", self.shown), e))?;
        self.temp = CString::default();
        // The rename itself must survive a crash too.
        // SAFETY: fsync on a valid directory fd.
        unsafe { libc::fsync(self.dir.as_raw_fd()) };
        Ok(())
    }
}

/// Whether the volume checksum (docs/PROTOCOL.md 8.3) of `file`'s content is `checksum`: the
/// check that lets a copy assembled from several streams (an update, a resumed download) take
/// the final name.
pub fn has_checksum(file: &File, checksum: &BlockDigest, threads: usize) -> io::Result<bool> {
    Ok(crate::blockhash::digests_of(file, threads)?.checksum() == *checksum)
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.temp.as_bytes().is_empty() {
            return;
        }
        if let Err(e) = fd::unlinkat(&self.dir, &self.temp) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove temporary file {:?}: {e}", self.temp);
            }
        }
    }
}

/// Makes `to` (new, empty) a copy of `from`, as sparse as it: a reflink where the file system
/// shares blocks between files (nothing is read or written), else only `from`'s data extents,
/// with copy_file_range (in the kernel) or, where that is refused, read and write. Returns
/// whether it was a reflink and the bytes copied.
pub fn copy_sparse(from: &File, to: &File) -> io::Result<(bool, u64)> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are valid.
    if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0 {
        return Ok((true, 0));
    }
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut copied = 0;
    let mut kernel = true;
    for e in extents_of(from)? {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let (mut at, end) = (e.offset, (e.offset + e.len).min(len));
        while at < end {
            let n = (end - at).min(1 << 30) as usize;
            let done = if kernel {
                copy_range(from, to, at, n).or_else(|e| match e.raw_os_error() {
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        kernel = false;
                        Ok(0)
                    }
                    _ => Err(e),
                })?
            } else {
                read_write(from, to, at, n)?
            };
            if done == 0 && kernel {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended at {at} while copying"),
                ));
            }
            at += done as u64;
            copied += done as u64;
        }
    }
    Ok((false, copied))
}

fn copy_range(from: &File, to: &File, at: u64, len: usize) -> io::Result<usize> {
    let (mut off_in, mut off_out) = (at as libc::loff_t, at as libc::loff_t);
    loop {
        // SAFETY: valid fds and offsets owned by this frame.
        let r = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn read_write(from: &File, to: &File, at: u64, len: usize) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(8 << 20)];
    let n = from.read_at(&mut buf, at)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the file ended at {at} while copying"),
        ));
    }
    to.write_all_at(&buf[..n], at)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockhash::digests_of;
    use engine::blockmap::BLOCK_SIZE;
    use std::os::unix::fs::FileExt;

    const BS: u64 = BLOCK_SIZE as u64;

    fn plan(source: &BlockDigests, dest: &BlockDigests, piece: usize) -> Plan {
        let mut diff = StreamDiff::new(dest.clone(), true);
        for chunk in source.encode().chunks(piece) {
            diff.feed(chunk).unwrap();
        }
        diff.finish().unwrap()
    }

    fn rec(index: u64, byte: u8) -> BlockRecord {
        BlockRecord {
            index,
            digest: [byte; 32],
        }
    }

    #[test]
    fn the_plan_names_changed_and_zeroed_blocks_and_the_source_checksum() {
        let source = BlockDigests {
            header: BlockMapHeader::new(10 * BS),
            records: vec![rec(1, 1), rec(2, 2), rec(5, 5), rec(9, 9)],
        };
        let dest = BlockDigests {
            header: BlockMapHeader::new(12 * BS),
            records: vec![rec(1, 1), rec(2, 7), rec(3, 3), rec(4, 4), rec(11, 1)],
        };
        for piece in [1, 13, 40, 4096] {
            let p = plan(&source, &dest, piece);
            assert_eq!(
                p.ranges,
                [Range::new(2 * BS, 4 * BS), Range::new(9 * BS, BS)]
            );
            assert_eq!((p.changed_blocks, p.zeroed_blocks), (3, 2));
            assert_eq!(p.checksum, source.checksum());
            // Uploading the same: the local side is the source.
            let mut up = StreamDiff::new(source.clone(), false);
            up.feed(&dest.encode()).unwrap();
            assert_eq!(up.finish().unwrap(), p);
        }
        // A shorter destination's last block differs in length even if its bytes match.
        let short = BlockDigests {
            header: BlockMapHeader::new(9 * BS + 10),
            records: vec![rec(1, 1), rec(2, 2), rec(5, 5), rec(9, 9)],
        };
        assert_eq!(plan(&source, &short, 40).ranges, [Range::new(9 * BS, BS)]);
    }

    #[test]
    fn a_hostile_document_costs_bounded_memory() {
        // Every other block of a huge volume differs: the plan stays within the range limit.
        let blocks = 4 * MAX_RANGES as u64;
        let source = BlockDigests {
            header: BlockMapHeader::new(2 * blocks * BS),
            records: (0..blocks).map(|i| rec(2 * i, 1)).collect(),
        };
        let dest = BlockDigests {
            header: source.header,
            records: vec![],
        };
        let p = plan(&source, &dest, 4096);
        assert!(p.ranges.len() <= MAX_RANGES);
        let covered = RangeSet::new(p.ranges.clone()).unwrap();
        for r in &source.records {
            let at = r.index * BS;
            assert!(covered
                .ranges()
                .iter()
                .any(|c| c.offset <= at && at < c.end()));
        }
        let mut bad = StreamDiff::new(dest, true);
        let mut doc = source.encode();
        doc[20] = 0xff;
        assert!(bad.feed(&doc).is_err());
    }

    #[test]
    fn a_sparse_copy_keeps_the_holes_and_the_bytes() {
        let dir = std::env::temp_dir().join(format!("update-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let from_path = dir.join("from");
        let from = File::create(&from_path).unwrap();
        from.set_len(1000 * BS + 7).unwrap();
        from.write_all_at(&[3u8; 5000], 17 * BS).unwrap();
        from.write_all_at(&[4u8; 7], 1000 * BS).unwrap();
        let staged = Staged::beside(&from_path).unwrap();
        let to = staged.file();
        assert_eq!(to.metadata().unwrap().len(), 1000 * BS + 7);
        let reread = File::open(&from_path).unwrap();
        let (a, b) = (digests_of(&reread, 2).unwrap(), digests_of(to, 2).unwrap());
        assert_eq!(a, b);
        use std::os::unix::fs::MetadataExt;
        assert!(
            to.metadata().unwrap().blocks() * 512 < 100 * BS,
            "stays sparse"
        );
        let temp = staged.path().to_owned();
        assert!(temp.exists());
        drop(staged);
        assert!(!temp.exists(), "an uncommitted temporary is removed");
        let staged = Staged::beside(&from_path).unwrap();
        staged.file().write_all_at(b"x", 5).unwrap();
        let wrong = a.checksum();
        assert!(matches!(
            staged.commit(&wrong, 2),
            Err(Error::UpdateMismatch(_))
        ));
        assert_eq!(digests_of(&File::open(&from_path).unwrap(), 2).unwrap(), a);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
