//! Open-file limits: with RLIMIT_NOFILE at 1024 (soft and hard, as `ulimit -n 1024` sets it)
//! for both the client and the server, one download or upload of 10,000 small volumes succeeds
//! and every copy is byte-identical: neither side fails a transfer with EMFILE, they queue
//! instead. The same with `--iohelper` on both sides, where each volume open in a process is a
//! helper child (its socket, pidfd and directory are the parent's fds).

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const VOLUMES: usize = 10_000;
const LIMIT: u64 = 1024;

/// Runs `cmd` with its soft and hard RLIMIT_NOFILE at `LIMIT`.
fn limited(cmd: &mut Command) -> &mut Command {
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Download,
    Upload,
}

/// Peaks seen in one process while a run lasted: its open fds and its live iohelper children.
#[derive(Default, Clone, Copy, Debug)]
struct Peak {
    fds: usize,
    helpers: usize,
}

/// Samples `pids` every few milliseconds until `stop` is set.
fn watch(pids: Vec<u32>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Peak>> {
    std::thread::spawn(move || {
        let mut peaks = vec![Peak::default(); pids.len()];
        while !stop.load(Ordering::SeqCst) {
            for (peak, &pid) in peaks.iter_mut().zip(&pids) {
                peak.fds = peak.fds.max(fd_count(pid));
                peak.helpers = peak.helpers.max(helper_children(pid));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        peaks
    })
}

/// Children of `pid` that run volstream-iohelper (zombies not yet reaped included).
fn helper_children(pid: u32) -> usize {
    // Each thread's children are listed under that thread (helpers are spawned by workers).
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let children: String = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .collect::<Vec<_>>()
        .join(" ");
    children
        .split_whitespace()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm"))
                .is_ok_and(|comm| comm.starts_with("volstream-ioh"))
        })
        .count()
}

/// Volumes a process with soft RLIMIT_NOFILE `LIMIT` keeps open at once (fdstream's budget:
/// a quarter of the fds kept back, four per volume).
const SLOTS: usize = ((LIMIT - LIMIT / 4) / 4) as usize;

/// `VOLUMES` small volumes in one command, with client and server at `LIMIT` fds, in process
/// or (`iohelper`) with every volume's I/O in a helper process on both sides.
fn many_volumes(tag: &str, way: Way, iohelper: bool) {
    let dir = TempDir::new(tag);
    let (pool, local) = (dir.join("pool"), dir.join("local"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    let (from, to) = match way {
        Way::Download => (&pool, &local),
        Way::Upload => (&local, &pool),
    };
    for i in 0..VOLUMES {
        // Small and distinct, some with a hole, so a mix-up or a lost tail shows.
        let size = 4096 + (i as u64 % 7) * 512;
        let data = if i % 3 == 0 {
            vec![(0, 1024)]
        } else {
            vec![(0, size)]
        };
        sparse_file(&from.join(format!("v{i:05}")), size, &data, i as u64 + 1);
    }
    let helper: &[&str] = if iohelper { &["--iohelper"] } else { &[] };

    let listen = format!("unix:{}", dir.join("s.sock").display());
    let mut serve = bin();
    serve
        .args(["serve", "--pool"])
        .arg(&pool)
        .args(["--listen", &listen])
        .args(helper)
        .stderr(Stdio::piped());
    let server = limited(&mut serve).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let sock = dir.join("s.sock");
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let mut cmd = bin();
    let verb = match way {
        Way::Download => "download",
        Way::Upload => "upload",
    };
    cmd.args([verb, "--json", "--connect", &listen])
        .args(helper);
    if way == Way::Download {
        cmd.arg("--no-sync");
    }
    for i in 0..VOLUMES {
        let (name, file) = (format!("v{i:05}"), local.join(format!("v{i:05}")));
        match way {
            Way::Download => cmd.arg(name).arg(file),
            Way::Upload => cmd.arg(file).arg(name),
        };
    }
    let client = limited(&mut cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = watch(vec![client.id(), server.id()], Arc::clone(&stop));
    let got = client.wait_with_output().unwrap();
    stop.store(true, Ordering::SeqCst);
    let peaks = sampler.join().unwrap();
    kill(server.id(), 15);
    let served = server.wait_with_output().unwrap();
    let lines = stderr_lines(&got);
    assert!(
        got.status.success(),
        "exit {:?}; {} stderr lines, first: {:?}",
        got.status.code(),
        lines.len(),
        lines.iter().take(5).collect::<Vec<_>>()
    );
    let server_errors = String::from_utf8_lossy(&served.stderr);
    assert!(
        !server_errors.contains("Too many open files"),
        "server: {}",
        server_errors.lines().next().unwrap_or_default()
    );
    let mut same = 0;
    for i in 0..VOLUMES {
        let name = format!("v{i:05}");
        assert_same_sparse(&from.join(&name), &to.join(&name));
        same += 1;
    }
    assert_eq!(same, VOLUMES);
    let (c, s) = (peaks[0], peaks[1]);
    println!(
        "{VOLUMES} volumes by {verb}{} under RLIMIT_NOFILE {LIMIT}, all byte-identical; \
         peak fds client {} server {}, peak live iohelpers client {} server {}",
        if iohelper { " --iohelper" } else { "" },
        c.fds,
        s.fds,
        c.helpers,
        s.helpers
    );
    if iohelper {
        // Each helper is a volume open in its parent: no more at once than the budget's slots.
        assert!(
            c.helpers > 0 && s.helpers > 0,
            "no iohelper seen: {peaks:?}"
        );
        assert!(
            c.helpers <= SLOTS && s.helpers <= SLOTS,
            "more helpers at once than the {SLOTS} slots: {peaks:?}"
        );
    }
}

#[test]
fn ten_thousand_volumes_in_one_download_under_a_1024_fd_limit() {
    many_volumes("fd-limits", Way::Download, false);
}

#[test]
fn ten_thousand_volumes_through_iohelpers_in_one_download_under_a_1024_fd_limit() {
    many_volumes("fd-limits-ioh", Way::Download, true);
}

#[test]
fn ten_thousand_volumes_through_iohelpers_in_one_upload_under_a_1024_fd_limit() {
    many_volumes("fd-limits-ioh-up", Way::Upload, true);
}

/// What the test writes into FIFO `i`: `FIFO_SIZE` bytes, every third with only its first KiB
/// data (zero detection makes the rest a hole).
fn fifo_content(i: usize) -> Vec<u8> {
    let mut state = i as u64 * 2 + 1;
    (0..FIFO_SIZE)
        .map(|at| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if i.is_multiple_of(3) && at >= 1024 {
                0
            } else {
                state as u8
            }
        })
        .collect()
}

const FIFO_SIZE: u64 = 8192;

/// FIFO `i`'s write end if a reader has it open (else a non-blocking open fails with ENXIO).
fn writer_of(dir: &std::path::Path, i: usize) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("v{i:05}"));
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => Some(f),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// Feeds every FIFO the client opens, until all are fed or `stop`; returns how many the client
/// had open at once, waiting. First it feeds none: it takes the write end of each FIFO that a
/// helper opened and holds it, until no more are opened for a second (the client opens as
/// many as it may at once), then feeds those and, from then on, each as it is opened.
fn feed(dir: &std::path::Path, stop: &AtomicBool) -> usize {
    let mut unfed: Vec<usize> = (0..VOLUMES).collect();
    let mut held = Vec::new();
    let mut last_opened = std::time::Instant::now();
    while last_opened.elapsed() < std::time::Duration::from_secs(1) && !stop.load(Ordering::SeqCst)
    {
        unfed.retain(|&i| match writer_of(dir, i) {
            Some(f) => {
                held.push((i, f));
                last_opened = std::time::Instant::now();
                false
            }
            None => true,
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let waiting = held.len();
    // 8 KiB fits a FIFO's 64 KiB buffer: these writes do not block. A failed one (the
    // transfer already failed) leaves its volume to the check after the run.
    for (i, mut f) in held {
        let _ = std::io::Write::write_all(&mut f, &fifo_content(i));
    }
    while !unfed.is_empty() && !stop.load(Ordering::SeqCst) {
        unfed.retain(|&i| match writer_of(dir, i) {
            Some(mut f) => {
                let _ = std::io::Write::write_all(&mut f, &fifo_content(i));
                false
            }
            None => true,
        });
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    waiting
}

/// 10,000 uploads from FIFOs with `--iohelper`: a helper reading a FIFO waits until it is
/// fed, so every helper the client spawns stays alive until the test feeds it, and the test
/// feeds none until the client stops opening more. Without the budget counting helpers, the client spawned
/// a helper for every volume at once and failed with EMFILE after a few hundred.
#[test]
fn ten_thousand_uploads_from_slow_fifos_through_iohelpers_under_a_1024_fd_limit() {
    // This process holds the write end of every FIFO the client opens at once.
    fdstream::budget::raise_fd_limit();
    let dir = TempDir::new("fd-limits-fifo");
    let (pool, fifos) = (dir.join("pool"), dir.join("fifos"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&fifos).unwrap();
    for i in 0..VOLUMES {
        let path = std::ffi::CString::new(
            fifos
                .join(format!("v{i:05}"))
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    }
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let mut serve = bin();
    serve
        .args(["serve", "--iohelper", "--pool"])
        .arg(&pool)
        .args(["--listen", &listen])
        .stderr(Stdio::piped());
    let server = limited(&mut serve).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(dir.join("s.sock")).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let mut cmd = bin();
    cmd.args(["upload", "--iohelper", "--json", "--connect", &listen])
        .args(["--size", &FIFO_SIZE.to_string()]);
    for i in 0..VOLUMES {
        cmd.arg(fifos.join(format!("v{i:05}")))
            .arg(format!("v{i:05}"));
    }
    let client = limited(&mut cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (fifos, stop) = (fifos.clone(), Arc::clone(&stop));
        std::thread::spawn(move || feed(&fifos, &stop))
    };
    let sampler = watch(vec![client.id(), server.id()], Arc::clone(&stop));
    let got = client.wait_with_output().unwrap();
    stop.store(true, Ordering::SeqCst);
    let waiting = feeder.join().unwrap();
    let peaks = sampler.join().unwrap();
    kill(server.id(), 15);
    let served = server.wait_with_output().unwrap();
    let lines = stderr_lines(&got);
    assert!(
        got.status.success(),
        "exit {:?}; {} stderr lines, first: {:?}",
        got.status.code(),
        lines.len(),
        lines.iter().take(5).collect::<Vec<_>>()
    );
    let server_errors = String::from_utf8_lossy(&served.stderr);
    assert!(
        !server_errors.contains("Too many open files"),
        "server: {}",
        server_errors.lines().next().unwrap_or_default()
    );
    for i in 0..VOLUMES {
        let name = format!("v{i:05}");
        assert!(
            read_all(&pool.join(&name)) == fifo_content(i),
            "{name} differs from what its FIFO was fed"
        );
    }
    let (c, s) = (peaks[0], peaks[1]);
    println!(
        "{VOLUMES} uploads from FIFOs with --iohelper under RLIMIT_NOFILE {LIMIT}, all \
         byte-identical; {waiting} waited on their FIFOs at once; peak fds client {} server {}, \
         peak live iohelpers client {} server {}",
        c.fds, s.fds, c.helpers, s.helpers
    );
    assert!(
        waiting <= SLOTS && c.helpers <= SLOTS && s.helpers <= SLOTS,
        "more helpers at once than the {SLOTS} slots: {peaks:?}"
    );
}

/// The soft limit of `pid`'s open files, from /proc.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn the_soft_fd_limit_is_raised_to_the_hard_one_at_start() {
    let dir = TempDir::new("fd-raise");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let mut serve = bin();
    serve
        .args(["serve", "--pool"])
        .arg(&pool)
        .args(["--listen", &listen])
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        serve.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = serve.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(dir.join("s.sock")).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let soft = soft_nofile(server.id());
    kill(server.id(), 15);
    let _ = server.wait();
    assert_eq!(soft, 4096);
}
