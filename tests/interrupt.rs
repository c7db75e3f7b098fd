//! Interrupted transfers leave no temporaries, with the real binary: a client stopped by SIGINT
//! or SIGTERM (also a whole process group, as Ctrl-C does, with --iohelper) removes its own
//! and says so in one line; a server killed mid-upload leaves one, which the next server on
//! that pool removes at start, while a temporary whose writer lives stays.

mod common;

use common::*;
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

/// Waits for `child` to exit (at most a minute, so a broken build fails instead of hanging).
fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the client did not exit after the signal");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_temporary(dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while temporaries(dir).is_empty() {
        assert!(Instant::now() < deadline, "no temporary appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn interrupted_download(tag: &str, signal: i32, extra: &[&str], group: bool) {
    let dir = TempDir::new(tag);
    let (pool, local) = (dir.join("pool"), dir.join("local"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    sparse_file(&pool.join("big"), 256 * MIB, &[(0, 256 * MIB)], 1);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let server = Server::start(&pool, &listen);

    let mut cmd = bin();
    cmd.env("RUST_LOG", "error")
        .args(["download", "--no-sync", "--connect", &listen])
        .args(extra)
        .arg("big")
        .arg(local.join("big"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if group {
        cmd.process_group(0);
    }
    let mut client = cmd.spawn().unwrap();
    wait_for_temporary(&local);
    // The server stops sending: the download cannot finish before the signal is handled.
    kill(server.child.id(), SIGSTOP);
    if group {
        kill_group(client.id(), signal);
    } else {
        kill(client.id(), signal);
    }
    let status = wait(&mut client);
    kill(server.child.id(), SIGCONT);
    let mut err = String::new();
    std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut err).unwrap();
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("volstream:"))
        .collect();
    assert_eq!(ours.len(), 1, "{tag}: {err}");
    assert!(ours[0].contains("interrupted"), "{tag}: {err}");
    assert_eq!(status.code(), Some(128 + signal), "{tag}: {err}");
    assert!(
        temporaries(&local).is_empty(),
        "{tag}: {:?}",
        temporaries(&local)
    );
    assert!(!local.join("big").exists(), "{tag}");
}

fn kill_group(pid: u32, signal: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: signalling the process group the test started.
    unsafe { kill(-(pid as i32), signal) };
}

#[test]
fn sigint_and_sigterm_remove_the_clients_temporaries() {
    interrupted_download("int", SIGINT, &[], false);
    interrupted_download("term", SIGTERM, &[], false);
    if iohelper_built() {
        // Ctrl-C reaches the helpers too: they die at once, and the client cleans up.
        interrupted_download("int-helper", SIGINT, &["--iohelper"], true);
    }
}

#[test]
fn a_restarted_server_removes_what_a_killed_one_left_and_lists_none() {
    let dir = TempDir::new("stale");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&dir.join("big"), 256 * MIB, &[(0, 256 * MIB)], 2);
    // A writer that lives (this test) and a file that is no temporary at all stay.
    let live = format!(".keep.volstream-tmp-{}-0", std::process::id());
    std::fs::write(pool.join(&live), b"in use").unwrap();
    std::fs::write(pool.join(".hidden"), b"not ours").unwrap();
    let listen = format!("unix:{}", dir.join("s.sock").display());

    let server = Server::start(&pool, &listen);
    let mut upload = bin()
        .args(["upload", "--connect", &listen])
        .arg(dir.join("big"))
        .arg("big")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while temporaries(&pool).len() < 2 {
        assert!(Instant::now() < deadline, "no temporary appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(server.child.id(), SIGKILL);
    drop(server);
    let _ = upload.wait();
    let left: Vec<String> = temporaries(&pool)
        .into_iter()
        .filter(|n| n != &live)
        .collect();
    assert_eq!(
        left.len(),
        1,
        "the killed server left its temporary: {left:?}"
    );

    let mut restarted = bin()
        .args(["serve", "--pool"])
        .arg(&pool)
        .args(["--listen", &listen])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = Vec::new();
    let mut lines = std::io::BufReader::new(restarted.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let serving = line.contains("serving");
        said.push(line);
        if serving {
            break;
        }
    }
    let out = run(bin().args(["list", "--connect", &listen]));
    kill(restarted.id(), SIGTERM);
    let _ = restarted.wait();
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(!listing.contains("volstream-tmp"), "{listing}");
    assert_eq!(temporaries(&pool), vec![live.clone()], "{said:?}");
    assert!(pool.join(".hidden").exists());
    assert!(
        said.iter()
            .any(|l| l.contains("removed 1 temporary file") && l.contains("interrupted uploads")),
        "{said:?}"
    );
}
