//! Helpers shared by the end-to-end tests of the `volstream` binary.
#![allow(dead_code)]

pub mod proxy;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_volstream"));
    c.env_remove("VOLSTREAM_ADDR").env("RUST_LOG", "warn");
    c
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("volstream-cli-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sparse file: `size` bytes with pseudo-random data at the given (offset, len) extents.
pub fn sparse_file(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut state = seed | 1;
    for &(off, len) in data {
        let buf: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        f.write_all_at(&buf, off).unwrap();
    }
}

pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}

pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub struct Server {
    pub child: Child,
}

impl Server {
    pub fn start(pool: &Path, listen: &str) -> Server {
        Server::start_with(pool, listen, &[])
    }

    pub fn start_with(pool: &Path, listen: &str, extra: &[&str]) -> Server {
        let child = bin()
            .args(["serve", "--pool"])
            .arg(pool)
            .args(["--listen", listen])
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match listen.strip_prefix("unix:") {
                Some(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                None => {
                    let hostport = listen
                        .strip_prefix("tcp:")
                        .or_else(|| listen.strip_prefix("tls:"))
                        .unwrap();
                    std::net::TcpStream::connect(hostport).is_ok()
                }
            };
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server did not come up on {listen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server shuts down cleanly.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    unsafe { libc_kill(pid as i32, signal) };
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

pub fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Threads of a process.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Names in `dir` that look like volstream temporaries (a download's partial and journal
/// included).
pub fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("volstream-tmp") || n.contains("volstream-partial"))
        .collect()
}

/// Runs a shell command as a test fixture; `None` (with the reason printed) if it fails.
pub fn fixture(cmd: &str) -> Option<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().ok()?;
    if out.status.success() {
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        eprintln!(
            "skipping: `{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        None
    }
}

/// The data extents of a file as (offset, len), from SEEK_DATA/SEEK_HOLE.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

/// Asserts two sparse files have the same length and content, reading only their data
/// extents (outside both, each reads as zero).
pub fn assert_same_sparse(a: &Path, b: &Path) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len(), "{} length", b.display());
    let mut ranges: Vec<(u64, u64)> = data_extents(a);
    ranges.extend(data_extents(b));
    ranges.sort();
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut covered = 0;
    for (start, len) in ranges {
        let end = start + len;
        let mut pos = start.max(covered);
        while pos < end {
            let n = (end - pos).min(MIB) as usize;
            fa.read_exact_at(&mut ba[..n], pos).unwrap();
            fb.read_exact_at(&mut bb[..n], pos).unwrap();
            if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
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

/// A file system made by the test on a loop device over a sparse image, mounted; unmounted
/// and detached on drop.
pub struct Mounted {
    pub dir: PathBuf,
    pub fs: String,
    pub dev: String,
}

impl Mounted {
    /// `None`, with the reason printed, where root, the mkfs tool or the kernel module is
    /// missing.
    pub fn new(fs: &str, work: &Path, size: u64) -> Option<Mounted> {
        Mounted::new_with(fs, work, size, "")
    }

    /// As `new`, with more options for mkfs.
    pub fn new_with(fs: &str, work: &Path, size: u64, mkfs: &str) -> Option<Mounted> {
        let image = work.join(format!("{fs}.img"));
        File::create(&image).unwrap().set_len(size).unwrap();
        let dev = fixture(&format!("losetup -f --show {}", image.display()))?;
        let force = if fs == "ext4" { "-F" } else { "-f" };
        let dir = work.join(format!("{fs}.mnt"));
        std::fs::create_dir_all(&dir).unwrap();
        let made = fixture(&format!("mkfs.{fs} -q {force} {mkfs} {dev}"))
            .and_then(|_| fixture(&format!("mount {dev} {}", dir.display())));
        if made.is_none() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            return None;
        }
        Some(Mounted {
            dir,
            fs: fs.to_owned(),
            dev,
        })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The file system's block size.
    pub fn block(&self) -> u64 {
        std::fs::metadata(&self.dir).unwrap().blksize()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Quietly: a test may have unmounted it already.
        let _ = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The volstream-iohelper next to the binary under test, if it was built.
pub fn iohelper_built() -> bool {
    let helper = Path::new(env!("CARGO_BIN_EXE_volstream")).with_file_name("volstream-iohelper");
    if !helper.exists() {
        eprintln!("SKIP (iohelper part): {} is not built", helper.display());
    }
    helper.exists()
}

/// A CA with a server certificate for `servers` and client certificates for `clients`, made
/// by `volstream certs` in `dir`.
pub fn make_pki(dir: &Path, servers: &[&str], clients: &[&str]) {
    let mut cmd = bin();
    cmd.args(["certs", "--dir"]).arg(dir);
    for s in servers {
        cmd.args(["--server", s]);
    }
    for c in clients {
        cmd.args(["--client", c]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "certs: {:?}", stderr_lines(&out));
}

/// `serve` options for TLS with the certificates in `pki`.
pub fn tls_server_args(pki: &Path) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        pki.join("cacert.pem").display().to_string(),
        "--tls-cert".into(),
        pki.join("servercert.pem").display().to_string(),
        "--tls-key".into(),
        pki.join("serverkey.pem").display().to_string(),
    ]
}

/// Client options for TLS as `client` (a CN given to `make_pki`).
pub fn tls_client_args(pki: &Path, client: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        pki.join("cacert.pem").display().to_string(),
        "--tls-cert".into(),
        pki.join(format!("{client}.pem")).display().to_string(),
        "--tls-key".into(),
        pki.join(format!("{client}-key.pem")).display().to_string(),
    ]
}

/// A loop device over a backing file, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    /// `None` (with the reason printed) when loop devices are not available here.
    pub fn attach(backing: &Path) -> Option<LoopDev> {
        let path = fixture(&format!("losetup -f --show {}", backing.display()))?;
        Some(LoopDev {
            path: PathBuf::from(path),
        })
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A file of `len` bytes of `byte`.
pub fn filled(path: &Path, len: u64, byte: u8) {
    let f = File::create(path).unwrap();
    f.write_all_at(&vec![byte; len as usize], 0).unwrap();
    f.sync_all().unwrap();
}

/// The first line of stderr that contains `needle`, or a panic showing them all.
pub fn line_with(o: &Output, needle: &str) -> String {
    let lines = stderr_lines(o);
    lines
        .iter()
        .find(|l| l.contains(needle))
        .cloned()
        .unwrap_or_else(|| panic!("no stderr line contains {needle:?}: {lines:?}"))
}
/// Whether `tool` runs; prints why a test skips when not.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

/// An NBD server process on a Unix socket (nbdkit or qemu-nbd), killed and reaped on drop.
pub struct NbdPeer {
    pub child: Child,
    pub sock: PathBuf,
}

impl NbdPeer {
    fn start(mut cmd: Command, sock: &Path) -> NbdPeer {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        // The socket file appears at bind, before listen: wait for a connection.
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "NBD server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NbdPeer {
            child,
            sock: sock.to_path_buf(),
        }
    }

    pub fn nbdkit(sock: &Path, args: &[&str]) -> NbdPeer {
        let mut c = Command::new("nbdkit");
        c.args(["-f", "-U"]).arg(sock).args(args);
        NbdPeer::start(c, sock)
    }

    /// `-t`: persistent (the probe for the socket is a client too).
    pub fn qemu_nbd(sock: &Path, args: &[&str], image: &Path) -> NbdPeer {
        let mut c = Command::new("qemu-nbd");
        c.args(["-t", "-k"]).arg(sock).args(args).arg(image);
        NbdPeer::start(c, sock)
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NbdPeer {
    fn drop(&mut self) {
        self.kill();
    }
}
