//! `download --serve-nbd`: the destination is an NBD disk while it downloads. The download is
//! paced (`--background-rate`) so that "mid-download" is real: the tests check that it is still
//! running after the NBD clients are done. Mid-download, 200 `qemu-io` reads at places not yet
//! downloaded and a `qemu-img convert` of the export give the source's bytes; writes through the
//! export survive the download's end, so the result differs from the source exactly there.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The source's content comes in 4 KiB granules, each one byte repeated, so a `qemu-io
/// read -P` checks a granule without the test holding the source.
const GRANULE: u64 = 4096;

fn granule_byte(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) % 251) as u8 + 1
}

/// `size` bytes: every granule data except each 16th run of 64 (holes, reading as zero).
fn patterned_source(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for i in 0..size / GRANULE {
        if is_hole(i) {
            continue;
        }
        f.write_all_at(&[granule_byte(i); GRANULE as usize], i * GRANULE)
            .unwrap();
    }
}

fn is_hole(granule: u64) -> bool {
    (granule / 64) % 16 == 5
}

fn expected_byte(granule: u64) -> u8 {
    if is_hole(granule) {
        0
    } else {
        granule_byte(granule)
    }
}

/// Partials and temporaries left in the test's directory.
fn partials(dir: &TempDir) -> Vec<String> {
    std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("volstream-"))
        .collect()
}

fn tools() -> bool {
    have("qemu-io") && have("qemu-img")
}

/// A running `download --serve-nbd`, its stderr in a file.
struct Cor {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Cor {
    fn start(listen: &str, volume: &str, dest: &Path, rate: &str, dir: &TempDir) -> Cor {
        let sock = dir.join("cor.sock");
        let log = dir.join("cor.log");
        let child = bin()
            .args(["download", "--connect", listen, "--serve-nbd"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--background-rate", rate, volume])
            .arg(dest)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut c = Cor {
            child: Some(child),
            sock,
            log,
        };
        let t = Instant::now();
        while UnixStream::connect(&c.sock).is_err() {
            assert!(
                c.running() && t.elapsed() < Duration::from_secs(30),
                "the export never listened: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for the end: the summary line it printed.
    fn finish(mut self) -> String {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(out.status.success(), "download failed: {}", self.log());
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Cor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), 9);
            let _ = c.wait();
        }
    }
}

fn check(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The number after `word` in a summary line such as "... 1234 in 200 reads ...".
fn figure_before(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    words[i - 1].parse().unwrap()
}

struct Setup {
    dir: TempDir,
    pool: PathBuf,
    listen: String,
    _server: Server,
}

fn setup(tag: &str, size: u64) -> Setup {
    let dir = TempDir::new(tag);
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    patterned_source(&pool.join("disk"), size);
    let listen = format!("unix:{}", dir.join("s").display());
    let server = Server::start(&pool, &listen);
    Setup {
        dir,
        pool,
        listen,
        _server: server,
    }
}

#[test]
fn mid_download_reads_of_what_has_not_arrived_and_a_convert_are_the_source() {
    if !tools() {
        println!("skipped: qemu-io or qemu-img missing");
        return;
    }
    const SIZE: u64 = 48 * MIB;
    let s = setup("cor-read", SIZE);
    let dest = s.dir.join("dest");
    // 1 MiB/s: the download needs about 45 s, so the second half is absent for 20 s at least.
    let mut cor = Cor::start(&s.listen, "disk", &dest, "1M", &s.dir);

    // 200 distinct granules of the second half, each read and checked against its pattern.
    let half = SIZE / GRANULE / 2;
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut picked: Vec<u64> = Vec::new();
    while picked.len() < 200 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let g = half + state % half;
        if !picked.contains(&g) {
            picked.push(g);
        }
    }
    let mut io = Command::new("qemu-io");
    io.args(["-r", "-f", "raw"]);
    for g in &picked {
        io.arg("-c").arg(format!(
            "read -P {} {} {GRANULE}",
            expected_byte(*g),
            g * GRANULE
        ));
    }
    let out = check(io.arg(cor.uri("disk")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
    assert_eq!(
        text.matches(&format!("read {GRANULE}/{GRANULE} bytes"))
            .count(),
        200,
        "{text}"
    );
    assert!(
        cor.running(),
        "the download ended before the reads: not mid-download"
    );

    // The whole disk, mid-download: what arrived, what the reads fetched and the rest.
    let converted = s.dir.join("converted");
    check(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &cor.uri("disk")])
            .arg(&converted),
    );
    assert!(
        cor.running(),
        "the download ended before the convert: not mid-download"
    );
    assert!(read_all(&converted) == read_all(&s.pool.join("disk")));
    std::fs::remove_file(&converted).unwrap();

    let summary = cor.finish();
    assert!(summary.contains("complete and verified"), "{summary}");
    // Each of the 200 granules was absent when read, so each was a fetch of its own.
    assert!(figure_before(&summary, "reads") >= 200, "{summary}");
    assert!(read_all(&dest) == read_all(&s.pool.join("disk")));
    assert_eq!(partials(&s.dir), Vec::<String>::new());
}

#[test]
fn writes_through_the_export_mid_download_survive_it() {
    if !tools() {
        println!("skipped: qemu-io or qemu-img missing");
        return;
    }
    const SIZE: u64 = 24 * MIB;
    let s = setup("cor-write", SIZE);
    let dest = s.dir.join("dest");
    let mut cor = Cor::start(&s.listen, "disk", &dest, "1M", &s.dir);
    // Unaligned writes where nothing arrived yet, one across a hole, one zeroing, and one at
    // the start, which may have arrived already.
    let writes: [(u64, u64, u8); 5] = [
        (1636, 5000, 0xab),
        (9 * MIB + 333, 70_000, 0xcd),
        (5 * 64 * GRANULE - 10, 100, 0xef),
        (20 * MIB, 3 * GRANULE, 0),
        (23 * MIB + 1, MIB - 1, 0x11),
    ];
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw"]);
    for &(off, len, byte) in &writes {
        let cmd = match byte {
            0 => format!("write -z {off} {len}"),
            b => format!("write -P {b} {off} {len}"),
        };
        io.arg("-c").arg(cmd);
    }
    check(io.arg("-c").arg("flush").arg(cor.uri("disk")));
    assert!(
        cor.running(),
        "the download ended before the writes: not mid-download"
    );

    let summary = cor.finish();
    assert!(summary.contains("complete and verified"), "{summary}");
    let mut want = read_all(&s.pool.join("disk"));
    for &(off, len, byte) in &writes {
        want[off as usize..(off + len) as usize].fill(byte);
    }
    assert!(
        read_all(&dest) == want,
        "the result is not the source with the writes"
    );
    // qemu-img compare agrees: the first difference is in the first write's sector (it
    // reports 512-byte sectors; the source's granule 0 holds another byte).
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&dest)
        .arg(s.pool.join("disk"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 1536!"),
        "{out:?}"
    );
}

#[test]
fn one_pair_a_file_and_no_existing_destination() {
    let s = setup("cor-usage", MIB);
    let dest = s.dir.join("dest");
    std::fs::write(&dest, b"mine").unwrap();
    let sock = format!("unix:{}", s.dir.join("n.sock").display());
    let out = run(bin()
        .args([
            "download",
            "--connect",
            &s.listen,
            "--serve-nbd",
            &sock,
            "disk",
        ])
        .arg(&dest));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_lines(&out)[0].contains("exists"), "{out:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"mine");
    let out = run(bin()
        .args(["download", "--connect", &s.listen, "--serve-nbd", &sock])
        .args(["disk", "a", "disk", "b"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_lines(&out)[0].contains("one VOLUME FILE pair"),
        "{out:?}"
    );
}

#[test]
fn a_source_that_changes_under_what_arrived_fails_the_check_and_leaves_no_file() {
    if !tools() {
        println!("skipped: qemu-io or qemu-img missing");
        return;
    }
    let s = setup("cor-changed", 8 * MIB);
    let dest = s.dir.join("dest");
    let mut cor = Cor::start(&s.listen, "disk", &dest, "1M", &s.dir);
    // The first MiB has arrived after two seconds at 1 MiB/s; the source changes there.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.pool.join("disk"))
        .unwrap()
        .write_all_at(&[0x5a; 100], 4096)
        .unwrap();
    let mut child = cor.child.take().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{}", cor.log());
    assert!(
        cor.log()
            .contains("the block at 0 came from the source but differs"),
        "{}",
        cor.log()
    );
    assert!(!dest.exists());
    assert_eq!(partials(&s.dir), Vec::<String>::new());
}
