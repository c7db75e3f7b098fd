//! Helpers shared by the fdstream integration tests: two engines over a unix socket, sparse
//! test files, content and allocation checks, and loop devices that always detach.
#![allow(dead_code)]

use engine::proto::OpenOptions;
use engine::{
    ConnectionId, Engine, EngineConfig, EngineHandle, TransferReport, VolumeReader, VolumeWriter,
};
use fdstream::{extents, DirProvider, ExtentKind};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A server engine serving a directory and a client engine connected to it.
pub struct Pair {
    pub server: EngineHandle,
    pub client: EngineHandle,
    pub conn: ConnectionId,
    threads: Vec<JoinHandle<()>>,
    _sock: tempfile::TempDir,
}

impl Pair {
    pub fn new(provider: DirProvider) -> Pair {
        init_log();
        let sock = tempfile::tempdir().unwrap();
        let addr = format!("unix:{}", sock.path().join("s").display());
        let (server, t1) = Engine::spawn(EngineConfig::default()).unwrap();
        let (_, bound) = server
            .listen(&addr.parse().unwrap(), Arc::new(provider))
            .unwrap();
        let (client, t2) = Engine::spawn(EngineConfig::default()).unwrap();
        let conn = client.connect(&bound).unwrap();
        Pair {
            server,
            client,
            conn,
            threads: vec![t1, t2],
            _sock: sock,
        }
    }

    pub fn download(
        &self,
        name: &str,
        options: OpenOptions,
        writer: impl VolumeWriter + 'static,
    ) -> TransferReport {
        self.client
            .download(self.conn, name, options, Box::new(writer))
            .recv_timeout(Duration::from_secs(60))
            .expect("download did not finish in 60 s")
    }

    pub fn upload(
        &self,
        name: &str,
        options: OpenOptions,
        reader: impl VolumeReader + 'static,
    ) -> TransferReport {
        self.client
            .upload(self.conn, name, options, Box::new(reader))
            .recv_timeout(Duration::from_secs(60))
            .expect("upload did not finish in 60 s")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.client.shutdown();
        self.server.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `options` that may write over an existing destination (files and devices alike).
pub fn overwriting(options: fdstream::WriterOptions) -> fdstream::WriterOptions {
    fdstream::WriterOptions {
        overwrite: true,
        ..options
    }
}

/// The CLI's defaults: zero detection at 4 KiB, every option off.
pub fn opts() -> OpenOptions {
    OpenOptions::default().with_zero_granularity(4096)
}

/// Deterministic non-zero-looking bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Creates a sparse file of `size` bytes with pattern data at the given (offset, len) ranges.
pub fn sparse_file(path: &Path, size: u64, data: &[(u64, u64)]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(off ^ i as u64, len as usize), off)
            .unwrap();
    }
}

pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub fn data_bytes(path: &Path) -> (u64, usize) {
    let map = extents(path).unwrap();
    let data: Vec<_> = map.iter().filter(|e| e.kind == ExtentKind::Data).collect();
    (data.iter().map(|e| e.len).sum(), data.len())
}

/// Asserts two volumes have the same length and content: compares the union of both files'
/// data extents byte by byte (outside it both read as zero).
pub fn assert_same(a: &Path, b: &Path) {
    let fa = File::open(a).unwrap();
    let fb = File::open(b).unwrap();
    let la = volume_len(&fa);
    let lb = volume_len(&fb);
    assert_eq!(la, lb, "lengths of {} and {}", a.display(), b.display());
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for p in [a, b] {
        for e in extents(p).unwrap() {
            if e.kind != ExtentKind::Hole {
                ranges.push((e.offset, e.offset + e.len));
            }
        }
    }
    ranges.sort();
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut covered = 0;
    for (start, end) in ranges {
        let mut pos = start.max(covered);
        while pos < end {
            let n = (end - pos).min(MIB) as usize;
            fa.read_exact_at(&mut ba[..n], pos).unwrap();
            fb.read_exact_at(&mut bb[..n], pos).unwrap();
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap();
                panic!(
                    "{} and {} differ at {}",
                    a.display(),
                    b.display(),
                    pos + i as u64
                );
            }
            pos += n as u64;
        }
        covered = covered.max(end);
    }
}

pub fn volume_len(f: &File) -> u64 {
    let meta = f.metadata().unwrap();
    if meta.file_type().is_file() {
        meta.len()
    } else {
        use std::io::{Seek, SeekFrom};
        let mut f = f;
        f.seek(SeekFrom::End(0)).unwrap()
    }
}

/// Every byte of a (small) volume.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Asserts the destination is as sparse as the source: allocation equal to the source's data
/// within one 4 KiB block per extent (plus one for a file system index block).
pub fn assert_sparse_like(src_data: u64, src_extents: usize, dst: &Path) {
    let have = allocated(dst);
    let slack = 4096 * (src_extents as u64 + 1);
    assert!(
        have + slack >= src_data && have <= src_data + slack,
        "{} allocates {have} bytes, source data is {src_data} in {src_extents} extents",
        dst.display()
    );
}

/// A loop device over a backing file, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    /// `None` (with the reason printed) when loop devices are not available here.
    pub fn attach(backing: &Path) -> Option<LoopDev> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let path = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                Some(LoopDev {
                    path: PathBuf::from(path),
                })
            }
            Ok(o) => {
                eprintln!(
                    "SKIP: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run losetup: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

/// Files in `dir` whose names contain "volstream-tmp" (left-over temporaries).
pub fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("volstream-tmp"))
        .collect()
}

/// The volume the option tests copy: data, holes, and a partial last block.
pub const OPTIONS_SIZE: u64 = 24 * MIB + 512;
pub const OPTIONS_DATA: [(u64, u64); 3] =
    [(MIB, MIB), (6 * MIB, 4 * MIB), (20 * MIB, 4 * MIB + 512)];

/// Writes the option tests' volume as `vol` in `dir`.
pub fn options_source(dir: &Path) -> PathBuf {
    let p = dir.join("vol");
    sparse_file(&p, OPTIONS_SIZE, &OPTIONS_DATA);
    p
}

/// A file of `len` bytes of 0xAA: old data that holes must replace.
pub fn filled(path: &Path, len: u64) {
    let f = File::create(path).unwrap();
    f.write_all_at(&vec![0xAA; len as usize], 0).unwrap();
}
