//! Faults end to end with the real binary: peers killed mid-transfer, a server restarted, a full
//! filesystem, a source that returns EIO. The affected transfers fail with a reason, the others
//! complete, nothing half-written appears under a volume's name, and the server's fds return to
//! their baseline.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

const SIGKILL: i32 = 9;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

fn unix_listen(dir: &TempDir) -> String {
    format!("unix:{}", dir.join("s.sock").display())
}

/// A dense file big enough that a transfer is still running when it is interrupted.
fn big_file(path: &std::path::Path, size: u64) {
    sparse_file(path, size, &[(0, size)], 77);
}

/// Waits until `pid`'s open fds drop back to `baseline` (connections are torn down
/// asynchronously after a peer dies).
fn wait_fds(pid: u32, baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = fd_count(pid);
        if now <= baseline || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn client_killed_mid_upload_leaves_nothing_and_the_server_goes_on() {
    let dir = TempDir::new("kill-upload");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    big_file(&dir.join("big"), 1 << 30);
    sparse_file(&pool.join("small"), 4 * MIB, &[(0, MIB)], 3);
    let listen = unix_listen(&dir);
    let server = Server::start(&pool, &listen);
    // One transfer first, so the worker pool (started on first use) is part of the baseline.
    let out = run(bin()
        .args(["download", "--connect", &listen, "small"])
        .arg(dir.join("warm")));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let baseline = fd_count(server.child.id());
    let threads = thread_count(server.child.id());

    let mut upload = bin()
        .args(["upload", "--connect", &listen])
        .arg(dir.join("big"))
        .arg("big")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Let data flow, then kill the client without warning. The server is stopped meanwhile,
    // so that a loaded machine cannot finish the transfer before the kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while temporaries(&pool).is_empty() {
        assert!(Instant::now() < deadline, "no temporary appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    kill(server.child.id(), SIGSTOP);
    kill(upload.id(), SIGKILL);
    let _ = upload.wait();
    kill(server.child.id(), SIGCONT);

    assert_eq!(
        wait_fds(server.child.id(), baseline),
        baseline,
        "server fds back to baseline"
    );
    assert_eq!(
        thread_count(server.child.id()),
        threads,
        "server threads back to baseline"
    );
    assert!(
        !pool.join("big").exists(),
        "nothing under the volume's name"
    );
    assert!(
        temporaries(&pool).is_empty(),
        "temporary removed: {:?}",
        temporaries(&pool)
    );
    let out = run(bin()
        .args(["download", "--connect", &listen, "small"])
        .arg(dir.join("small-copy")));
    assert!(
        out.status.success(),
        "server still serves: {:?}",
        stderr_lines(&out)
    );
    assert_eq!(
        read_all(&dir.join("small-copy")),
        read_all(&pool.join("small"))
    );
}

#[test]
fn client_killed_mid_download_leaves_the_server_serving() {
    let dir = TempDir::new("kill-download");
    let pool = dir.join("pool");
    let local = dir.join("local");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    big_file(&pool.join("big"), 1 << 30);
    sparse_file(&pool.join("small"), 4 * MIB, &[(MIB, MIB)], 4);
    let listen = unix_listen(&dir);
    let server = Server::start(&pool, &listen);
    let baseline = fd_count(server.child.id());

    let mut download = bin()
        .args(["download", "--connect", &listen, "big"])
        .arg(local.join("big"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // As above: the server stopped, the client killed mid-download.
    let deadline = Instant::now() + Duration::from_secs(30);
    while temporaries(&local).is_empty() {
        assert!(Instant::now() < deadline, "no temporary appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    kill(server.child.id(), SIGSTOP);
    kill(download.id(), SIGKILL);
    let _ = download.wait();
    kill(server.child.id(), SIGCONT);

    // The killed client had no chance to clean up its temporary, but nothing appears under
    // the final name.
    assert!(!local.join("big").exists());
    assert_eq!(
        wait_fds(server.child.id(), baseline),
        baseline,
        "server fds back to baseline"
    );
    let out = run(bin()
        .args(["download", "--connect", &listen, "small"])
        .arg(local.join("small")));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(
        read_all(&local.join("small")),
        read_all(&pool.join("small"))
    );
}

#[test]
fn server_killed_mid_transfer_fails_the_transfers_then_a_restart_serves_again() {
    let dir = TempDir::new("restart");
    let pool = dir.join("pool");
    let local = dir.join("local");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    big_file(&pool.join("big"), 1 << 30);
    big_file(&local.join("up"), 512 * MIB);
    let listen = unix_listen(&dir);
    let server = Server::start(&pool, &listen);

    let mut client = bin()
        .args(["download", "--connect", &listen, "big"])
        .arg(local.join("big"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut uploader = bin()
        .args(["upload", "--connect", &listen])
        .arg(local.join("up"))
        .arg("up")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (temporaries(&local).is_empty() || temporaries(&pool).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let server_pid = server.child.id();
    kill(server_pid, SIGKILL);
    drop(server);

    let out = client.wait_with_output_timeout();
    assert_eq!(out.0, Some(1), "download fails: {}", out.1);
    assert!(
        out.1.contains("big") && out.1.contains("connection"),
        "{}",
        out.1
    );
    let out = uploader.wait_with_output_timeout();
    assert_eq!(out.0, Some(1), "upload fails: {}", out.1);
    assert!(!local.join("big").exists(), "nothing under the final name");
    assert!(
        temporaries(&local).is_empty(),
        "client removed its temporary"
    );
    assert!(
        !pool.join("up").exists(),
        "nothing under the final name on the server"
    );

    // The killed server left its temporary (it had no chance); a restart serves normally.
    let server = Server::start(&pool, &listen);
    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(local.join("up"))
        .arg("up"));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&local.join("up")), read_all(&pool.join("up")));
    drop(server);
}

trait WaitTimeout {
    fn wait_with_output_timeout(&mut self) -> (Option<i32>, String);
}

impl WaitTimeout for std::process::Child {
    fn wait_with_output_timeout(&mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            if Instant::now() > deadline {
                let _ = self.kill();
                panic!("child did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_full_filesystem_fails_the_upload_that_does_not_fit_only() {
    let dir = TempDir::new("enospc");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    if fixture(&format!(
        "mount -t tmpfs -o size=24m volstream-test {}",
        pool.display()
    ))
    .is_none()
    {
        eprintln!("skipping: needs root to mount a small tmpfs");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(pool.clone());
    big_file(&dir.join("too-big"), 64 * MIB);
    sparse_file(&dir.join("fits"), 8 * MIB, &[(0, 4 * MIB)], 5);
    let listen = unix_listen(&dir);
    let _server = Server::start(&pool, &listen);
    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(dir.join("too-big"))
        .arg("too-big")
        .arg(dir.join("fits"))
        .arg("fits"));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let lines = stderr_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("too-big") && l.contains("no space")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("<-> fits")), "{lines:?}");
    assert!(!pool.join("too-big").exists());
    assert!(temporaries(&pool).is_empty(), "{:?}", temporaries(&pool));
    assert_eq!(read_all(&dir.join("fits")), read_all(&pool.join("fits")));
}

#[test]
fn a_source_returning_eio_fails_its_transfer_only() {
    let dir = TempDir::new("eio");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("good"), 8 * MIB, &[(0, 2 * MIB)], 6);
    // A volume whose reads past 2 MiB fail with EIO: qemu's blkdebug driver injecting errors
    // into a raw image, exported as a file through FUSE by qemu-storage-daemon.
    let image = dir.join("base.img");
    sparse_file(&image, 8 * MIB, &[(0, 8 * MIB)], 7);
    let mnt = dir.join("bad.img");
    std::fs::File::create(&mnt).unwrap();
    let conf = dir.join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"4096\"\nonce = \"off\"\nimmediately = \"on\"\n",
    )
    .unwrap();
    let daemon = std::process::Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", image.display()),
        ])
        .args([
            "--blockdev",
            &format!(
                "driver=blkdebug,node-name=d0,config={},image=f0",
                conf.display()
            ),
        ])
        .args(["--blockdev", "driver=raw,node-name=r0,file=d0"])
        .args([
            "--export",
            &format!(
                "type=fuse,id=e0,node-name=r0,mountpoint={},writable=off",
                mnt.display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(daemon) = daemon else {
        eprintln!("skipping: qemu-storage-daemon is not installed");
        return;
    };
    struct Stop(std::process::Child, std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.1).status();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Stop(daemon, mnt.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&mnt).map_or(0, |m| m.len()) != 8 * MIB {
        if Instant::now() > deadline {
            eprintln!("skipping: the FUSE export did not appear (no FUSE here?)");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let device = format!("bad={}", mnt.display());
    let listen = unix_listen(&dir);
    let _server = Server::start_with(&pool, &listen, &["--device", &device]);
    let out = run(bin()
        .args(["download", "--connect", &listen, "bad"])
        .arg(dir.join("bad-copy"))
        .arg("good")
        .arg(dir.join("good-copy")));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let lines = stderr_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("bad") && l.contains("I/O error")),
        "{lines:?}"
    );
    assert!(!dir.join("bad-copy").exists());
    assert_eq!(
        read_all(&dir.join("good-copy")),
        read_all(&pool.join("good"))
    );
}
