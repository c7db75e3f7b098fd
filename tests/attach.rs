//! `attach`: a server's volumes as local NBD disks. `qemu-img convert` from an attached volume
//! gives what `download` gives, `nbdinfo --map` shows the remote holes (and `qemu-img convert`
//! of a thin 8 GiB volume stays thin, so it believed them), and 100 volumes attached over one
//! connection are each read correctly by concurrent `nbdcopy`s.

mod common;

use common::*;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// A running `volstream attach`, its stderr in a file.
struct Attached {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Attached {
    fn start(listen: &str, names: &[String], dir: &TempDir) -> Attached {
        let sock = dir.join("nbd");
        let log = dir.join("attach.log");
        let child = bin()
            .args(["attach", "--connect", listen, "--nbd"])
            .arg(format!("unix:{}", sock.display()))
            .args(names)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut a = Attached { child, sock, log };
        let t = Instant::now();
        while UnixStream::connect(&a.sock).is_err() {
            assert!(
                a.child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(30),
                "attach never listened: {}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .parse()
            .unwrap()
    }

    /// Sockets the process holds: its NBD listener and its connections.
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        kill(self.child.id(), 15);
        let _ = self.child.wait();
    }
}

fn tools() -> bool {
    have("nbdinfo") && have("nbdcopy") && have("qemu-img")
}

fn check(cmd: &mut Command) {
    let out = cmd.stdout(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The data runs `nbdinfo --map` reports (adjacent ones joined).
fn mapped_data(uri: &str) -> Vec<(u64, u64)> {
    let out = Command::new("nbdinfo")
        .args(["--map", "--json", uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["type"].as_u64().unwrap() & 1 != 0 {
            continue;
        }
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => runs.push((o, l)),
        }
    }
    runs
}

fn download(listen: &str, name: &str, dest: &Path) {
    check(
        bin()
            .args(["download", "--connect", listen, name])
            .arg(dest),
    );
}

#[test]
fn qemu_img_convert_of_an_attached_volume_is_a_download_and_the_map_has_the_holes() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("attach-convert");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    // Data at unaligned places and across MiB boundaries, and a thin 8 GiB volume.
    sparse_file(
        &pool.join("disk"),
        // qemu-img rounds a size up to 512-byte sectors; the content's places need not be.
        300 * MIB + 25 * 512,
        &[
            (0, 3 * MIB + 7),
            (17 * MIB + 4096, 5 * MIB),
            (200 * MIB - 100, 300),
            (300 * MIB + 1, 12345),
        ],
        11,
    );
    sparse_file(
        &pool.join("thin"),
        8 * GIB,
        &[(GIB, 4 * MIB), (7 * GIB + 3 * MIB, MIB)],
        12,
    );
    let listen = format!("unix:{}", dir.join("s").display());
    let _server = Server::start(&pool, &listen);
    let attached = Attached::start(&listen, &["disk".into(), "thin".into()], &dir);

    for name in ["disk", "thin"] {
        let source = pool.join(name);
        let converted = dir.join(&format!("{name}.converted"));
        let downloaded = dir.join(&format!("{name}.downloaded"));
        check(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &attached.uri(name)])
                .arg(&converted),
        );
        download(&listen, name, &downloaded);
        assert_same_sparse(&downloaded, &converted);
        assert_same_sparse(&source, &converted);
        // qemu-img skipped what BLOCK_STATUS called holes: the copy is as thin as the source.
        assert!(
            allocated(&converted) <= allocated(&source) + MIB,
            "{name}: {} allocated, the source {}",
            allocated(&converted),
            allocated(&source)
        );
        // The map is the source's own allocation (to the file system's blocks).
        assert_eq!(
            mapped_data(&attached.uri(name)),
            data_extents(&source),
            "{name}: nbdinfo --map of the attached volume"
        );
        std::fs::remove_file(&converted).unwrap();
        std::fs::remove_file(&downloaded).unwrap();
    }
    // An unknown name is refused at the handshake, not exported empty.
    let out = Command::new("nbdinfo")
        .arg(attached.uri("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the listing names what is attached.
    let out = Command::new("nbdinfo")
        .args(["--list", "--json", &attached.uri("")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["disk", "thin"]);
}

#[test]
fn attaching_a_volume_the_server_lacks_fails_in_one_line() {
    let dir = TempDir::new("attach-missing");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    sparse_file(&pool.join("a"), MIB, &[(0, 4096)], 1);
    let listen = format!("unix:{}", dir.join("s").display());
    let _server = Server::start(&pool, &listen);
    let out = run(bin()
        .args(["attach", "--connect", &listen, "a", "b", "--nbd"])
        .arg(format!("unix:{}", dir.join("n").display())));
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("no volume \"b\""), "{lines:?}");
    assert!(!dir.join("n").exists(), "no export was left listening");
}

#[test]
fn a_hundred_volumes_attached_over_one_connection_read_correctly() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("attach-hundred");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let names: Vec<String> = (0..100).map(|i| format!("v{i:03}")).collect();
    for (i, n) in names.iter().enumerate() {
        let i = i as u64;
        sparse_file(
            &pool.join(n),
            4 * MIB,
            &[(i * 4096, 64 << 10), (3 * MIB, 100 + i)],
            100 + i,
        );
    }
    let listen = format!("unix:{}", dir.join("s").display());
    let _server = Server::start(&pool, &listen);

    // One volume, read once, idle: the baseline the hundred are measured against.
    let one_dir = TempDir::new("attach-one");
    let one = Attached::start(&listen, &names[..1], &one_dir);
    check(
        Command::new("nbdcopy")
            .arg(one.uri(&names[0]))
            .arg(one_dir.join("out")),
    );
    std::thread::sleep(Duration::from_millis(300));
    let (rss_one, sockets_one) = (one.rss_kib(), one.sockets());
    drop(one);

    let attached = Attached::start(&listen, &names, &dir);
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    // All at once: a hundred NBD clients, a hundred concurrent ranged READs on one connection.
    let children: Vec<(String, Child)> = names
        .iter()
        .map(|n| {
            let c = Command::new("nbdcopy")
                .arg(attached.uri(n))
                .arg(out.join(n))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (n.clone(), c)
        })
        .collect();
    for (n, c) in children {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{n}: {} / {}",
            String::from_utf8_lossy(&o.stderr),
            attached.log()
        );
        assert!(
            read_all(&out.join(&n)) == read_all(&pool.join(&n)),
            "{n} differs"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    // The NBD listener and the one connection to the server, as with one volume.
    assert_eq!(attached.sockets(), sockets_one, "{}", attached.log());
    assert_eq!(sockets_one, 2);
    let rss_hundred = attached.rss_kib();
    eprintln!(
        "idle RSS: 1 attached volume {rss_one} KiB, 100 attached {rss_hundred} KiB, {:.1} KiB \
         per further volume (each read once in full, clients gone)",
        (rss_hundred as f64 - rss_one as f64) / 99.0
    );
}

#[test]
fn reads_fail_with_an_error_once_the_server_is_gone() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("attach-gone");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    sparse_file(&pool.join("a"), 8 * MIB, &[(MIB, MIB)], 5);
    let listen = format!("unix:{}", dir.join("s").display());
    let server = Server::start(&pool, &listen);
    let attached = Attached::start(&listen, &["a".into()], &dir);
    check(
        Command::new("nbdcopy")
            .arg(attached.uri("a"))
            .arg(dir.join("before")),
    );
    drop(server);
    // The block status is cached, the bytes are not: the read fails, and says so, instead of
    // waiting for a server that is not coming back or inventing zeroes.
    let out = Command::new("nbdcopy")
        .arg(attached.uri("a"))
        .arg(dir.join("after"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a read without a server succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        attached.log().contains("reading \"a\""),
        "{}",
        attached.log()
    );
}
