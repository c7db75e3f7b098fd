//! A helper that hangs, talks nonsense, cannot be started, or dies while writing: its stream
//! aborts with a reason naming it, and nothing half-written is left.

mod common;

use bytes::Bytes;
use common::*;
use engine::proto::Reason;
use engine::{Chunk, Notify, VolumeError, VolumeReader};
use fdstream::helper::{helpers, Role};
use fdstream::{Backend, DirProvider, HelperOptions, ReaderOptions, WriterOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::{Duration, Instant};

fn fake_helper(dir: &Path, script: &str) -> PathBuf {
    let path = dir.join("fake-iohelper");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn backend(program: PathBuf, timeout: Duration) -> Backend {
    Backend::Helper(HelperOptions {
        program: Some(program),
        direct: false,
        timeout,
    })
}

#[test]
fn a_silent_helper_times_out_and_is_killed() {
    let src = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("vol"), MIB, &[(0, MIB)]);
    let program = fake_helper(bin.path(), "exec sleep 60");
    let pair = Pair::new(
        DirProvider::new(src.path())
            .unwrap()
            .with_backend(backend(program, Duration::from_millis(500))),
    );
    let started = Instant::now();
    let out = src.path().join("copy");
    let r = pair.download(
        "vol",
        opts(),
        helper(false).create(&out, WriterOptions::default()),
    );
    let e = r.result.unwrap_err();
    assert!(e.message.contains("sent nothing for"), "{e}");
    assert!(
        e.message.starts_with("iohelper ") || e.message.contains("iohelper "),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!out.exists());
}

#[test]
fn a_helper_speaking_nonsense_fails_its_stream() {
    let src = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("vol"), MIB, &[(0, MIB)]);
    // A header claiming a 4 GiB DATA payload, then silence.
    let program = fake_helper(
        bin.path(),
        r"printf '\002\000\000\000\377\377\377\377\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000' >&3; exec sleep 60",
    );
    let pair = Pair::new(
        DirProvider::new(src.path())
            .unwrap()
            .with_backend(backend(program, Duration::from_secs(30))),
    );
    let r = pair.download(
        "vol",
        opts(),
        helper(false).create(src.path().join("copy"), WriterOptions::default()),
    );
    let e = r.result.unwrap_err();
    assert!(e.message.contains("malformed iohelper message"), "{e}");
}

#[test]
fn a_missing_helper_binary_is_a_clear_error() {
    let src = tempfile::tempdir().unwrap();
    sparse_file(&src.path().join("vol"), MIB, &[(0, MIB)]);
    let pair = Pair::new(DirProvider::new(src.path()).unwrap().with_backend(backend(
        PathBuf::from("/nonexistent/volstream-iohelper"),
        Duration::from_secs(30),
    )));
    let r = pair.download(
        "vol",
        opts(),
        helper(false).create(src.path().join("copy"), WriterOptions::default()),
    );
    let e = r.result.unwrap_err();
    assert!(e.message.contains("/nonexistent/volstream-iohelper"), "{e}");
}

#[test]
fn errors_inside_the_helper_keep_their_reason() {
    let src = tempfile::tempdir().unwrap();
    let pair = Pair::new(
        DirProvider::new(src.path())
            .unwrap()
            .with_backend(helper(false)),
    );
    let r = pair.download(
        "missing",
        opts(),
        helper(false).create(src.path().join("copy"), WriterOptions::default()),
    );
    assert_eq!(r.result.unwrap_err().reason, Reason::NotFound);
    let r = pair.upload(
        "x",
        opts(),
        helper(false).reader(src.path().join("nope"), ReaderOptions::default()),
    );
    assert_eq!(r.result.unwrap_err().reason, Reason::NotFound);
}

/// Yields 1 MiB of data, then nothing, ever: the upload stalls with its sink open.
struct Stuck {
    sent: bool,
}

impl VolumeReader for Stuck {
    fn start(&mut self, _notify: Notify) {}
    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        Poll::Ready(Ok(64 * MIB))
    }
    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Ok(Chunk::Data {
            offset: 0,
            bytes: Bytes::from(pattern(1, MIB as usize)),
        }))
    }
}

#[test]
fn a_writer_helper_killed_mid_upload_leaves_nothing_behind() {
    let dst = tempfile::tempdir().unwrap();
    let pair = Pair::new(
        DirProvider::new(dst.path())
            .unwrap()
            .with_backend(helper(false)),
    );
    let rx = pair
        .client
        .upload(pair.conn, "vol", opts(), Box::new(Stuck { sent: false }));
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let found = helpers()
            .into_iter()
            .find(|h| h.role == Role::Write && h.volume == "vol");
        if let (Some(h), false) = (found, temp_files(dst.path()).is_empty()) {
            break h.pid;
        }
        assert!(
            Instant::now() < deadline,
            "no writer helper with a temporary file"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let e = r.result.unwrap_err();
    assert!(
        e.message
            .contains(&format!("iohelper {pid} killed by signal 9")),
        "{e}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !temp_files(dst.path()).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", temp_files(dst.path()));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!dst.path().join("vol").exists());
}

#[test]
fn direct_on_tmpfs_works_or_falls_back() {
    // /dev/shm is tmpfs: older kernels refuse O_DIRECT there (EINVAL); the helper then logs a
    // warning and reads and writes through the page cache. Either way the copy is exact.
    let Ok(src) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("SKIP: no /dev/shm");
        return;
    };
    let size = 3 * MIB + 77;
    sparse_file(
        &src.path().join("vol"),
        size,
        &[(0, MIB), (2 * MIB, MIB + 77)],
    );
    let pair = Pair::new(
        DirProvider::new(src.path())
            .unwrap()
            .with_backend(helper(true)),
    );
    let out = src.path().join("copy");
    let r = pair.download(
        "vol",
        opts(),
        helper(true).create(&out, WriterOptions::default()),
    );
    assert_eq!(r.result, Ok(()));
    assert_eq!(read_all(&out), read_all(&src.path().join("vol")));
}
