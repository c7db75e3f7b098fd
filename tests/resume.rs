//! `download --resume` (issue 16) end to end: a real server, a rate-capped TCP proxy between it
//! and the client (so the client can be SIGKILLed mid-transfer, and so the bytes that travel
//! can be counted), real files.

mod common;

use common::proxy::Proxy;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const EXTENT: u64 = 64 * MIB;

/// A volume of `size` bytes with data in every other 64 MiB from the start, `data` bytes in
/// all, random (incompressible, nothing a zero detector skips).
fn source(path: &Path, size: u64, data: u64, seed: u64) -> Vec<(u64, u64)> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut state = seed | 1;
    let mut buf = vec![0u8; EXTENT as usize];
    let extents: Vec<(u64, u64)> = (0..data / EXTENT)
        .map(|k| (2 * k * EXTENT, EXTENT))
        .collect();
    for &(off, len) in &extents {
        for word in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all_at(&buf[..len as usize], off).unwrap();
    }
    extents
}

/// The ranges a partial's journal records, read with no help from the code under test.
fn recorded(journal: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(journal)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("range ")?.split(' ');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Bytes of `extents` outside the `recorded` ranges.
fn missing_data(extents: &[(u64, u64)], recorded: &[(u64, u64)]) -> u64 {
    extents
        .iter()
        .map(|&(off, len)| {
            let covered: u64 = recorded
                .iter()
                .map(|&(r, rl)| (off + len).min(r + rl).saturating_sub(off.max(r)))
                .sum();
            len - covered
        })
        .sum()
}

fn download(proxy: &Proxy, extra: &[&str], volume: &str, dest: &Path) -> std::process::Command {
    let mut c = bin();
    c.args(["download", "--connect"])
        .arg(format!("tcp:{}", proxy.addr))
        .args(extra)
        .arg(volume)
        .arg(dest);
    c
}

/// Starts a download and SIGKILLs it once `bytes` have come through the proxy.
fn kill_after(proxy: &Proxy, volume: &str, dest: &Path, bytes: u64, resume: bool) {
    let before = proxy.down();
    let extra: &[&str] = if resume { &["--resume"] } else { &[] };
    let mut child: Child = download(proxy, extra, volume, dest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while proxy.down() - before < bytes {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the download ended before the kill"
        );
        assert!(Instant::now() < deadline, "the download did not progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(child.id(), 9);
    child.wait().unwrap();
}

fn json_end(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("\"finished\"") || l.contains("\"failed\""))
        .unwrap_or_else(|| panic!("no end event in {text:?}"));
    serde_json::from_str(line).unwrap()
}

fn partial_of(dest: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let name = dest.file_name().unwrap().to_str().unwrap();
    let partial = dest.with_file_name(format!(".{name}.volstream-partial"));
    let journal = dest.with_file_name(format!(".{name}.volstream-partial.journal"));
    (partial, journal)
}

/// The must-show case: 2 GiB of data in a 4.5 GiB volume, the client SIGKILLed at about 30, 60
/// and 90 % of the data, each resumed: only the missing part travels (plus the block digests
/// that check the whole), the result is the source, and no partial or journal is left.
#[test]
fn a_download_killed_at_30_60_90_percent_resumes_with_only_the_missing_bytes() {
    let dir = TempDir::new("resume-kill");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let data = 2048 * MIB;
    let extents = source(&pool.join("big.img"), 4608 * MIB, data, 7);
    let port = free_tcp_port();
    let _server = Server::start(&pool, &format!("tcp:127.0.0.1:{port}"));
    // 400 MB/s: a whole run takes about 5 s, long enough to kill at a chosen point.
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap(), 400_000_000);
    let dest = dir.join("big.img");
    let (partial, journal) = partial_of(&dest);
    for percent in [30u64, 60, 90] {
        kill_after(&proxy, "big.img", &dest, data * percent / 100, false);
        assert!(!dest.exists(), "nothing under the final name after a kill");
        assert!(partial.exists() && journal.exists(), "the partial stays");
        let held = recorded(&journal);
        let missing = missing_data(&extents, &held);
        assert!(
            missing < data,
            "{percent} %: the journal recorded nothing: {held:?}"
        );
        let before = proxy.down();
        let out =
            run(download(&proxy, &["--resume", "--json"], "big.img", &dest).stderr(Stdio::piped()));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let wire = proxy.down() - before;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!said.contains("starting over"), "{said}");
        let end = json_end(&out);
        let resume = &end["resume"];
        assert_eq!(resume["resumed"], true, "{end}");
        let digests = resume["digests_wire_bytes"].as_u64().unwrap();
        let reported = end["wire_bytes"].as_u64().unwrap();
        println!(
            "killed at {percent} %: journal held {} of {data} data bytes; resume moved {wire} \
             bytes through the proxy ({reported} reported as the stream's wire bytes, {digests} \
             of block digests) for {missing} missing data bytes: {:.4}x",
            data - missing,
            wire as f64 / missing as f64
        );
        assert!(wire >= missing, "less than the missing data travelled");
        assert!(
            wire as f64 <= missing as f64 * 1.05 + digests as f64 + MIB as f64,
            "{wire} bytes for {missing} missing"
        );
        assert_same_sparse(&pool.join("big.img"), &dest);
        assert!(
            !partial.exists() && !journal.exists(),
            "partial and journal gone"
        );
        std::fs::remove_file(&dest).unwrap();
    }
}

/// A source changed between the kill and the resume is detected (its identity changed), and
/// the download starts over instead of merging old and new; with --no-restart it is refused.
/// A download without --resume removes a stale partial and starts over.
#[test]
fn a_changed_source_is_detected_not_merged() {
    let dir = TempDir::new("resume-changed");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let data = 512 * MIB;
    let src = pool.join("v.img");
    source(&src, 1024 * MIB, data, 3);
    let port = free_tcp_port();
    let _server = Server::start(&pool, &format!("tcp:127.0.0.1:{port}"));
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap(), 100_000_000);
    let dest = dir.join("v.img");
    let (partial, journal) = partial_of(&dest);
    kill_after(&proxy, "v.img", &dest, data * 6 / 10, false);
    assert!(!recorded(&journal).is_empty());
    // A block the killed run already has changes at the source.
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&[0x5a; 4096], 4096)
        .unwrap();

    let out =
        run(download(&proxy, &["--resume", "--no-restart"], "v.img", &dest).stderr(Stdio::piped()));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("source changed"), "{text}");
    assert!(!dest.exists());

    // Without --no-restart: one line, and a whole new download.
    assert!(!journal.exists(), "a partial of other content is removed");
    kill_after(&proxy, "v.img", &dest, data / 2, false);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&[0xa5; 4096], 8192)
        .unwrap();
    let out = run(download(&proxy, &["--resume", "--json"], "v.img", &dest).stderr(Stdio::piped()));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("starting over"), "{text}");
    assert_same_sparse(&src, &dest);
    assert!(!partial.exists() && !journal.exists());

    // A stale partial without --resume: removed, and the download is whole.
    std::fs::remove_file(&dest).unwrap();
    kill_after(&proxy, "v.img", &dest, data / 3, false);
    let before = proxy.down();
    let out = run(download(&proxy, &["--json"], "v.img", &dest).stderr(Stdio::piped()));
    assert!(out.status.success());
    assert!(
        proxy.down() - before >= data,
        "a download without --resume reads everything"
    );
    assert_same_sparse(&src, &dest);
    assert!(!partial.exists() && !journal.exists());
}

/// Hostile journals at the CLI: cut, edited, or listing overlapping, unsorted or past-the-end
/// ranges (with a valid check line, as a bug would write them). Each is refused with a line
/// naming the journal and what is wrong; the download starts over and is right, or with
/// --no-restart nothing is touched.
#[test]
fn a_hostile_journal_is_refused_and_nothing_is_corrupted() {
    let dir = TempDir::new("resume-hostile");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let src = pool.join("v.img");
    source(&src, 256 * MIB, 128 * MIB, 5);
    let port = free_tcp_port();
    let _server = Server::start(&pool, &format!("tcp:127.0.0.1:{port}"));
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap(), 2_000_000_000);
    let dest = dir.join("v.img");
    let (partial, journal) = partial_of(&dest);
    let check = |body: &str| format!("{body}check {}\n", blake3::hash(body.as_bytes()).to_hex());
    let head = format!("volstream-journal 1\nsize {}\nidentity -\n", 256 * MIB);
    let d = "0".repeat(64);
    let good = check(&format!("{head}range 0 4096 {d}\nrange 8192 4096 {d}\n"));
    let cases: Vec<(String, &str)> = vec![
        (good[..good.len() / 2].to_string(), "cut short"),
        (good.replace("8192", "8193"), "check does not match"),
        (
            check(&format!("{head}range 0 8192 {d}\nrange 4096 10 {d}\n")),
            "overlaps",
        ),
        (
            check(&format!("{head}range 8192 10 {d}\nrange 0 10 {d}\n")),
            "comes before",
        ),
        (
            check(&format!("{head}range {} 10 {d}\n", 256 * MIB - 5)),
            "past the",
        ),
    ];
    for (text, want) in cases {
        // A partial with garbage where the journal claims data.
        std::fs::write(&partial, vec![0xeeu8; 1 << 20]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&partial)
            .unwrap()
            .set_len(256 * MIB)
            .unwrap();
        std::fs::write(&journal, &text).unwrap();
        let out = run(
            download(&proxy, &["--resume", "--no-restart"], "v.img", &dest).stderr(Stdio::piped()),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{want}: {err}");
        assert!(
            err.contains("journal") && err.contains(want),
            "{want}: {err}"
        );
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap(),
            text,
            "untouched"
        );
        assert!(!dest.exists());
        let out = run(download(&proxy, &["--resume"], "v.img", &dest).stderr(Stdio::piped()));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{want}: {err}");
        assert!(
            err.contains("starting over") && err.contains(want),
            "{want}: {err}"
        );
        assert_same_sparse(&src, &dest);
        assert!(!partial.exists() && !journal.exists());
        std::fs::remove_file(&dest).unwrap();
    }
}

/// SIGINT and SIGTERM: without --resume the partial is removed; with it, kept, and the
/// message says how to continue (which then works).
#[test]
fn an_interrupt_keeps_the_partial_only_with_resume() {
    let dir = TempDir::new("resume-sigint");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let data = 256 * MIB;
    let src = pool.join("v.img");
    source(&src, 512 * MIB, data, 9);
    let port = free_tcp_port();
    let _server = Server::start(&pool, &format!("tcp:127.0.0.1:{port}"));
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap(), 50_000_000);
    let dest = dir.join("v.img");
    let (partial, journal) = partial_of(&dest);
    for (signal, resume) in [(2, false), (15, false), (2, true), (15, true)] {
        let extra: &[&str] = if resume { &["--resume"] } else { &[] };
        let before = proxy.down();
        let child = download(&proxy, extra, "v.img", &dest)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Past the first record (64 MiB, after a second), with enough left for the last
        // round, which resumes the third's partial.
        while proxy.down() - before < data * 3 / 8 {
            std::thread::sleep(Duration::from_millis(5));
        }
        kill(child.id(), signal);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        println!("signal {signal}, resume {resume}: {err}");
        assert_eq!(out.status.code(), Some(128 + signal), "{err}");
        assert!(!dest.exists());
        if resume {
            assert!(err.contains("--resume"), "{err}");
            assert!(partial.exists() && journal.exists(), "kept: {err}");
            assert!(!recorded(&journal).is_empty());
        } else {
            assert!(!partial.exists() && !journal.exists(), "removed: {err}");
        }
    }
    let out = run(download(&proxy, &["--resume", "--json"], "v.img", &dest).stderr(Stdio::piped()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_end(&out)["resume"]["resumed"], true);
    assert_same_sparse(&src, &dest);
    assert!(!partial.exists() && !journal.exists());
}
