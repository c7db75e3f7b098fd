//! The identity a file server reports for a volume (engine's `VolumeIdentity`): a value that
//! changes whenever the file's content may have changed, so a client holding part of it can
//! tell whether that part still belongs to it.

use engine::VolumeIdentity;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

/// A regular file's identity: BLAKE3 over device, inode, size, and the modification and change
/// times to the nanosecond (a write moves mtime; faking mtime back with `touch -d` moves
/// ctime). Hashed so that peers learn nothing about the host's inodes.
///
/// A block device has none: nothing in its metadata moves when its content is written, so a
/// partial copy of it can only be trusted through the content check at the end.
pub fn of(meta: &Metadata) -> Option<VolumeIdentity> {
    if !meta.file_type().is_file() {
        return None;
    }
    let mut h = blake3::Hasher::new();
    h.update(b"volstream file identity v1\0");
    for v in [
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ] {
        h.update(&v.to_le_bytes());
    }
    VolumeIdentity::new(h.finalize().as_bytes().to_vec())
}
