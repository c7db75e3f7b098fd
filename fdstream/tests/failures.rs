//! Failed transfers leave nothing behind, and a stuck sink stalls only its own stream.

mod common;

use common::*;
use engine::proto::Reason;
use engine::{Chunk, Notify, OpenRequest, Provider, VolumeError, VolumeReader, VolumeWriter};
use fdstream::{DirProvider, FileReader, FileWriter, ReaderOptions, WriterOptions};
use std::io::Read;
use std::path::Path;
use std::sync::mpsc::TryRecvError;
use std::task::Poll;
use std::time::{Duration, Instant};

/// A reader that corrupts its final digest, or fails after `fail_after` chunks.
struct Liar {
    inner: FileReader,
    fail_after: Option<u64>,
    chunks: u64,
}

impl VolumeReader for Liar {
    fn start(&mut self, notify: Notify) {
        self.inner.start(notify)
    }
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        self.inner.poll_size()
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        if self.fail_after.is_some_and(|n| self.chunks >= n) {
            return Poll::Ready(Err(VolumeError::new(Reason::Io, "injected read failure")));
        }
        match self.inner.poll_chunk() {
            Poll::Ready(Ok(Chunk::End { length, digest })) => Poll::Ready(Ok(Chunk::End {
                length,
                digest: digest.map(|d| d ^ 1),
            })),
            Poll::Ready(Ok(c)) => {
                self.chunks += 1;
                Poll::Ready(Ok(c))
            }
            other => other,
        }
    }
    fn cancel(&mut self) {
        self.inner.cancel()
    }
}

/// Serves a directory, but every reader lies about its digest.
struct LyingProvider {
    inner: DirProvider,
    dir: std::path::PathBuf,
}

impl Provider for LyingProvider {
    fn open_read(&self, r: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        // The same name checks as the honest provider.
        drop(self.inner.open_read(r)?);
        Ok(Box::new(Liar {
            inner: FileReader::open(self.dir.join(&r.name), fdstream::reader_options(&r.options)),
            fail_after: None,
            chunks: 0,
        }))
    }
    fn open_write(&self, r: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError> {
        self.inner.open_write(r)
    }
}

fn wait_clean(dir: &Path, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let temps = temp_files(dir);
        let exists = dir.join(name).exists();
        if temps.is_empty() && !exists {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {temps:?}, final name exists: {exists}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn digest_mismatch_on_upload_leaves_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = src.path().join("vol");
    sparse_file(&vol, 6 * MIB, &[(0, 2 * MIB), (4 * MIB, MIB)]);
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let liar = Liar {
        inner: FileReader::open(&vol, ReaderOptions::default()),
        fail_after: None,
        chunks: 0,
    };
    let r = pair.upload("vol", opts(), liar);
    assert_eq!(r.result.unwrap_err().reason, Reason::DigestMismatch);
    wait_clean(dst.path(), "vol");
}

#[test]
fn failure_mid_upload_leaves_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let vol = src.path().join("vol");
    sparse_file(&vol, 16 * MIB, &[(0, 16 * MIB)]);
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let liar = Liar {
        inner: FileReader::open(&vol, ReaderOptions::default()),
        fail_after: Some(5),
        chunks: 0,
    };
    let r = pair.upload("vol", opts(), liar);
    assert!(r.result.is_err());
    wait_clean(dst.path(), "vol");
}

#[test]
fn digest_mismatch_on_download_leaves_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("vol"), 6 * MIB, &[(MIB, 2 * MIB)]);
    let provider = LyingProvider {
        inner: DirProvider::new(src.path()).unwrap(),
        dir: src.path().to_path_buf(),
    };
    init_log();
    let sock = tempfile::tempdir().unwrap();
    let addr = format!("unix:{}", sock.path().join("s").display());
    let (server, t1) = engine::Engine::spawn(engine::EngineConfig::default()).unwrap();
    let (_, bound) = server
        .listen(&addr.parse().unwrap(), std::sync::Arc::new(provider))
        .unwrap();
    let (client, t2) = engine::Engine::spawn(engine::EngineConfig::default()).unwrap();
    let conn = client.connect(&bound).unwrap();
    let out = dst.path().join("vol");
    let r = client
        .download(
            conn,
            "vol",
            opts(),
            Box::new(FileWriter::create(&out, WriterOptions::default())),
        )
        .recv_timeout(Duration::from_secs(30))
        .unwrap();
    assert_eq!(r.result.unwrap_err().reason, Reason::DigestMismatch);
    wait_clean(dst.path(), "vol");
    client.shutdown();
    server.shutdown();
    t1.join().unwrap();
    t2.join().unwrap();
}

#[test]
fn a_fifo_nobody_reads_stalls_only_its_own_stream() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    for i in 0..21u64 {
        sparse_file(
            &src.path().join(format!("v{i}")),
            6 * MIB,
            &[(0, MIB), (3 * MIB, 2 * MIB + i * 4096)],
        );
    }
    let fifo = dst.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let pair = Pair::new(DirProvider::new(src.path()).unwrap());
    let stuck = pair.client.download(
        pair.conn,
        "v0",
        opts(),
        Box::new(FileWriter::in_place(&fifo, WriterOptions::default())),
    );
    std::thread::sleep(Duration::from_millis(100));
    let others: Vec<_> = (1..21)
        .map(|i| {
            let out = dst.path().join(format!("v{i}"));
            let rx = pair.client.download(
                pair.conn,
                &format!("v{i}"),
                opts(),
                Box::new(FileWriter::create(&out, WriterOptions::default())),
            );
            (i, rx)
        })
        .collect();
    for (i, rx) in others {
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("v{i} stalled behind the FIFO"));
        assert_eq!(r.result, Ok(()), "v{i}");
        assert_eq!(
            read_all(&dst.path().join(format!("v{i}"))),
            read_all(&src.path().join(format!("v{i}")))
        );
    }
    assert!(matches!(stuck.try_recv(), Err(TryRecvError::Empty)));
    // Release it: read the FIFO to its end; the stream then finishes with the right bytes.
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::fs::File::open(&fifo)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    });
    let r = stuck.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(r.result, Ok(()));
    let got = reader.join().unwrap();
    assert_eq!(got, read_all(&src.path().join("v0")));
}

#[test]
fn a_fifo_source_needs_a_size_and_works_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut r = FileReader::open(&fifo, ReaderOptions::default());
    r.start(Notify::noop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let e = loop {
        match r.poll_size() {
            Poll::Ready(res) => break res.unwrap_err(),
            Poll::Pending => assert!(Instant::now() < deadline, "no answer"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(e.reason, Reason::Unsupported, "{e}");

    // With a size: read sequentially, zero blocks still become holes.
    let mut content = pattern(7, 3 * MIB as usize);
    content[MIB as usize..2 * MIB as usize].fill(0);
    let feed = content.clone();
    let path = fifo.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all(&feed)
            .unwrap();
    });
    let dst = tempfile::tempdir().unwrap();
    let pair = Pair::new(DirProvider::new(dst.path()).unwrap());
    let reader = FileReader::open(
        &fifo,
        ReaderOptions {
            stream_size: Some(content.len() as u64),
            ..ReaderOptions::default()
        },
    );
    let r = pair.upload("piped", opts(), reader);
    writer.join().unwrap();
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.stats.hole_bytes, MIB);
    assert_eq!(read_all(&dst.path().join("piped")), content);
}
