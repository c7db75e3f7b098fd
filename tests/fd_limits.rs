//! Open-file limits: with RLIMIT_NOFILE at 1024 (soft and hard, as `ulimit -n 1024` sets it)
//! for both the client and the server, one download of 10,000 small volumes succeeds and every
//! copy is byte-identical: neither side fails a transfer with EMFILE, they queue instead.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

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

#[test]
fn ten_thousand_volumes_in_one_download_under_a_1024_fd_limit() {
    let dir = TempDir::new("fd-limits");
    let (pool, out) = (dir.join("pool"), dir.join("out"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    for i in 0..VOLUMES {
        // Small and distinct, some with a hole, so a mix-up or a lost tail shows.
        let size = 4096 + (i as u64 % 7) * 512;
        let data = if i % 3 == 0 {
            vec![(0, 1024)]
        } else {
            vec![(0, size)]
        };
        sparse_file(&pool.join(format!("v{i:05}")), size, &data, i as u64 + 1);
    }

    let listen = format!("unix:{}", dir.join("s.sock").display());
    let mut serve = bin();
    serve
        .args(["serve", "--pool"])
        .arg(&pool)
        .args(["--listen", &listen])
        .stderr(Stdio::piped());
    let server = limited(&mut serve).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let sock = dir.join("s.sock");
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let mut cmd = bin();
    cmd.args(["download", "--no-sync", "--json", "--connect", &listen]);
    for i in 0..VOLUMES {
        cmd.arg(format!("v{i:05}"))
            .arg(out.join(format!("v{i:05}")));
    }
    let got = limited(&mut cmd).output().unwrap();
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
        assert_same_sparse(&pool.join(&name), &out.join(&name));
        same += 1;
    }
    assert_eq!(same, VOLUMES);
    println!("{VOLUMES} volumes downloaded under RLIMIT_NOFILE {LIMIT}, all byte-identical");
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
