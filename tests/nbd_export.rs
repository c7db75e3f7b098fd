//! `serve --nbd`: the pool's volumes for NBD clients nobody here wrote. `nbdinfo --map` agrees
//! with `volstream extents` (a fragmented file, a 1 TiB thin one mapped without reading it),
//! `qemu-img convert` and `nbdcopy` copy identical sparse files out, `nbdcopy` writes into a
//! writable export, and hostile clients lose only their own connection.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// A `volstream serve` with an NBD export; its stderr goes to a file the test can read.
struct Exported {
    child: Child,
    nbd: PathBuf,
    listen: String,
    log: PathBuf,
}

impl Exported {
    fn start(pool: &Path, dir: &TempDir, extra: &[&str]) -> Exported {
        let listen = format!("unix:{}", dir.join("s").display());
        let nbd = dir.join("n");
        let log = dir.join("serve.log");
        let child = bin()
            .args(["serve", "--pool"])
            .arg(pool)
            .args(["--listen", &listen, "--nbd"])
            .arg(format!("unix:{}", nbd.display()))
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while UnixStream::connect(&nbd).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the NBD export never listened: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Exported {
            child,
            nbd,
            listen,
            log,
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bytes the server process has read through read(2)-like calls so far.
    fn read_bytes(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.child.id())).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        kill(self.child.id(), 15);
        let _ = self.child.wait();
    }
}

fn tools() -> bool {
    have("nbdinfo") && have("nbdcopy") && have("qemu-img") && have("qemu-io")
}

/// (offset, length, hole) runs, adjacent runs of the same kind joined.
fn joined(runs: impl Iterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (o, l, h) in runs {
        match out.last_mut() {
            Some(last) if last.2 == h && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, h)),
        }
    }
    out
}

fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, bool)> {
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
    joined(v.as_array().unwrap().iter().map(|e| {
        let t = e["type"].as_u64().unwrap();
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            t & 1 != 0,
        )
    }))
}

fn our_extents(listen: &str, volume: &str) -> Vec<(u64, u64, bool)> {
    let out = run(bin().args(["extents", "--json", "--connect", listen, volume]));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    joined(String::from_utf8(out.stdout).unwrap().lines().map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        (
            v["offset"].as_u64().unwrap(),
            v["length"].as_u64().unwrap(),
            v["kind"] == "hole",
        )
    }))
}

#[test]
fn nbdinfo_map_equals_our_extents_for_a_fragmented_file_and_a_thin_tib() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("nbd-export-map");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let frag = pool.join("frag.raw");
    let pieces: Vec<(u64, u64)> = (0..40)
        .map(|i| (i * 3 * MIB + (i % 5) * 4096, 64 * 1024 + i * 8192))
        .collect();
    sparse_file(&frag, 128 * MIB + 777, &pieces, 11);
    let thin = pool.join("thin.raw");
    sparse_file(
        &thin,
        1 << 40,
        &[(0, 4096), (512 * GIB, MIB), ((1 << 40) - 4096, 4096)],
        5,
    );
    let server = Exported::start(&pool, &dir, &[]);

    let map = nbdinfo_map(&server.uri("frag.raw"));
    assert!(map.len() >= 80, "{} runs", map.len());
    assert_eq!(map, our_extents(&server.listen, "frag.raw"));

    let before = server.read_bytes();
    let map = nbdinfo_map(&server.uri("thin.raw"));
    assert_eq!(map, our_extents(&server.listen, "thin.raw"));
    assert_eq!(map.len(), 5, "{map:?}");
    assert_eq!(map.iter().map(|r| r.1).sum::<u64>(), 1 << 40);
    // Mapping 1 TiB asked the file system, it did not read the volume.
    let read = server.read_bytes() - before;
    assert!(read < MIB, "the map read {read} bytes");
    // Through our own NBD client too.
    let out = run(bin()
        .args(["extents", "--json"])
        .arg(server.uri("thin.raw")));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 5);
}

#[test]
fn qemu_img_and_nbdcopy_copy_identical_sparse_files_out() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("nbd-export-copy");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let src = pool.join("disk.raw");
    sparse_file(
        &src,
        256 * MIB + 512,
        &[
            (0, 70_000),
            (17 * MIB, 9 * MIB),
            (200 * MIB, 5 * MIB),
            (256 * MIB - 4096, 4608),
        ],
        3,
    );
    let server = Exported::start(&pool, &dir, &[]);
    let uri = server.uri("disk.raw");

    let by_qemu = dir.join("qemu.raw");
    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&by_qemu));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_nbdcopy = dir.join("nbdcopy.raw");
    let out = run(Command::new("nbdcopy").arg(&uri).arg(&by_nbdcopy));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for copy in [&by_qemu, &by_nbdcopy] {
        assert_same_sparse(&src, copy);
        assert!(
            allocated(copy) <= allocated(&src) + MIB,
            "{}: {} bytes allocated, the source {}",
            copy.display(),
            allocated(copy),
            allocated(&src)
        );
    }
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&src));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Nothing went wrong on the way.
    assert!(
        !server.log().contains(" WARN ") && !server.log().contains(" ERROR "),
        "{}",
        server.log()
    );
}

#[test]
fn nbdcopy_writes_into_a_writable_export_and_not_into_a_read_only_one() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("nbd-export-write");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let src = dir.join("src.raw");
    sparse_file(&src, 64 * MIB, &[(4096, 3 * MIB), (40 * MIB, 100_000)], 9);
    // The destination has old data where the source has holes: it must read as zero after.
    let dst = pool.join("dst.raw");
    sparse_file(&dst, 64 * MIB, &[(20 * MIB, 2 * MIB), (63 * MIB, MIB)], 1);

    {
        let server = Exported::start(&pool, &dir, &[]);
        let out = run(Command::new("nbdcopy").arg(&src).arg(server.uri("dst.raw")));
        assert!(!out.status.success(), "a read-only export took writes");
    }
    let server = Exported::start(&pool, &dir, &["--nbd-writable"]);
    let out = run(Command::new("nbdcopy").arg(&src).arg(server.uri("dst.raw")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_sparse(&src, &dst);
    // And qemu-img writes through it too (a different client, WRITE_ZEROES and FLUSH).
    let out = run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(server.uri("dst.raw")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(server.uri("dst.raw")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_same_sparse(&src, &dst);
    // qemu-io: a pattern written with FUA, a zeroed range, both read back through the export
    // and seen in the file.
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -f -P 0x5a 1M 64k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "read -P 0x5a 1M 64k",
        "-c",
        "read -P 0 2M 1M",
        &server.uri("dst.raw"),
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !said.contains("Pattern verification failed"),
        "{said}"
    );
    let bytes = read_all(&dst);
    assert!(bytes[MIB as usize..MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(bytes[2 * MIB as usize..3 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
}

/// A hand-driven client: the fixed newstyle handshake with NBD_OPT_EXPORT_NAME, then raw
/// requests.
struct RawClient(UnixStream);

impl RawClient {
    fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = RawClient(s);
        let mut greeting = [0u8; 18];
        c.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        c
    }

    fn open(sock: &Path, name: &str) -> (RawClient, u64) {
        let mut c = RawClient::connect(sock);
        // FIXED_NEWSTYLE | NO_ZEROES
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        c.0.write_all(&opt).unwrap();
        let mut reply = [0u8; 10];
        c.0.read_exact(&mut reply).unwrap();
        (c, u64::from_be_bytes(reply[..8].try_into().unwrap()))
    }

    fn request(&mut self, magic: u32, cmd: u16, cookie: u64, offset: u64, len: u32) {
        let mut r = magic.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&r).unwrap();
    }

    /// A simple reply: (errno, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    }

    /// Whether the server closed the connection (after any bytes it still sent).
    fn closed(&mut self) -> bool {
        let mut sink = Vec::new();
        self.0.read_to_end(&mut sink).is_ok()
    }
}

const MAGIC: u32 = 0x2560_9513;

#[test]
fn hostile_clients_lose_their_connection_and_nobody_else_notices() {
    if !tools() {
        return;
    }
    let dir = TempDir::new("nbd-export-hostile");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    sparse_file(&pool.join("v.raw"), 8 * MIB, &[(0, MIB)], 2);
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(pool.join("img.qcow2"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(status.success());
    let mut server = Exported::start(&pool, &dir, &["--nbd-writable"]);

    // A bad option magic after the client flags.
    let mut c = RawClient::connect(&server.nbd);
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.0.write_all(b"NOTAMAGIC-xxxxxxxxxxxxxxx").unwrap();
    assert!(c.closed());

    // A request with a bad magic.
    let (mut c, size) = RawClient::open(&server.nbd, "v.raw");
    assert_eq!(size, 8 * MIB);
    c.request(0xdead_beef, 0, 1, 0, 512);
    assert!(c.closed());

    // A WRITE announcing a payload beyond the maximum: closed before it is buffered.
    let (mut c, _) = RawClient::open(&server.nbd, "v.raw");
    c.request(MAGIC, 1, 2, 0, u32::MAX);
    assert!(c.closed());

    // A read past the end and an unknown command are errors for that request only.
    let (mut c, _) = RawClient::open(&server.nbd, "v.raw");
    c.request(MAGIC, 0, 3, 8 * MIB - 512, 4096);
    assert_eq!(c.simple_reply(), (22, 3));
    c.request(MAGIC, 99, 4, 0, 0);
    assert_eq!(c.simple_reply(), (22, 4));
    c.request(MAGIC, 0, 5, 0, 16);
    assert_eq!(c.simple_reply(), (0, 5));
    let mut data = [0u8; 16];
    c.0.read_exact(&mut data).unwrap();
    assert_eq!(data[..], read_all(&pool.join("v.raw"))[..16]);

    // Unknown names and qcow2 containers are refused with a reason.
    let out = run(Command::new("nbdinfo").arg(server.uri("nope")));
    assert!(!out.status.success());
    let out = run(Command::new("nbdinfo").arg(server.uri("img.qcow2")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("qcow2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A name that climbs out of the pool.
    let out = run(Command::new("nbdinfo").arg(server.uri("..%2Fpool%2Fv.raw")));
    assert!(!out.status.success());

    // Every bad client was named in the log; the server serves on.
    let log = server.log();
    assert!(log.contains("request magic 0xdeadbeef"), "{log}");
    assert!(log.contains("WRITE of 4294967295 bytes"), "{log}");
    assert!(!log.contains("panic"), "{log}");
    assert!(server.alive());
    let out = run(Command::new("nbdinfo").arg(server.uri("v.raw")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(c);
}

/// Runs `cmd` as nobody (uid and gid 65534, no supplementary groups).
fn as_nobody(tool: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", tool]);
    c
}

/// `--allow-uid` / `--allow-gid` and `--allow-write` hold for NBD clients as for our own
/// protocol: by SO_PEERCRED, a uid not allowed is refused the export with the reason (nbdinfo
/// and qemu-img print it), and a client not among the writers gets a read-only export.
#[test]
fn the_export_admits_clients_and_writers_by_their_credentials() {
    if !tools() || !have("setpriv") {
        return;
    }
    let dir = TempDir::new("nbd-export-policy");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    // nobody must reach the socket through the test's directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vol = pool.join("vol.raw");
    sparse_file(&vol, 8 * MIB, &[(0, MIB)], 4);
    let src = dir.join("src.raw");
    sparse_file(&src, 8 * MIB, &[(2 * MIB, MIB)], 5);

    {
        let server = Exported::start(&pool, &dir, &["--allow-uid", "0"]);
        let out = run(Command::new("nbdinfo").args(["--size", &server.uri("vol.raw")]));
        assert!(out.status.success(), "{:?}", stderr_lines(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "8388608");
        // qemu-img prints the server's reason; nbdinfo only that policy refused it.
        for (tool, says) in [
            (
                &["qemu-img", "info"][..],
                "uid 65534 (gid 65534) may not use this socket",
            ),
            (&["nbdinfo", "--size"][..], "server policy prevents"),
        ] {
            let out = run(as_nobody(tool[0])
                .args(&tool[1..])
                .arg(server.uri("vol.raw")));
            assert!(!out.status.success(), "{tool:?} as nobody was admitted");
            let all = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(all.contains(says), "{tool:?}: {all}");
        }
        assert!(
            server.log().contains("refused: uid 65534"),
            "{}",
            server.log()
        );
    }

    // Writers by identity: root is not among them, so its export is read-only.
    {
        let server = Exported::start(
            &pool,
            &dir,
            &["--nbd-writable", "--allow-write", "uid=65534,*"],
        );
        let out = run(Command::new("nbdinfo").args(["--json", &server.uri("vol.raw")]));
        assert!(out.status.success(), "{:?}", stderr_lines(&out));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
        let before = read_all(&vol);
        let out = run(Command::new("nbdcopy").arg(&src).arg(server.uri("vol.raw")));
        assert!(!out.status.success(), "a client not allowed to write wrote");
        assert!(read_all(&vol) == before, "the volume changed");
    }
    let server = Exported::start(&pool, &dir, &["--nbd-writable", "--allow-write", "uid=0,*"]);
    let out = run(Command::new("nbdcopy").arg(&src).arg(server.uri("vol.raw")));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert!(read_all(&vol) == read_all(&src), "the write did not land");
    drop(server);

    // A TCP export proves no uid: a uid policy with it is a usage error.
    let out = run(bin().args(["serve", "--pool"]).arg(&pool).args([
        "--nbd",
        "tcp:127.0.0.1:0",
        "--allow-uid",
        "0",
    ]));
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    assert!(
        line_with(&out, "--allow-uid").contains("unix:"),
        "{:?}",
        stderr_lines(&out)
    );
}
