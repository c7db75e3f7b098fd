//! `upload --resume` against `serve --resume-keep` (issue 16): the server is SIGKILLed in the
//! middle of an upload and restarted; the same command then sends only what the server's
//! journal did not record, and the result equals the source. Another peer (another uid)
//! cannot adopt the partial; a source that changed in between is uploaded anew, not merged;
//! expired and over-budget partials are removed when the server starts.

mod common;

use common::*;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 30;
/// Twelve 64 MiB extents, 16 MiB holes between them: 768 MiB of data.
fn layout() -> Vec<(u64, u64)> {
    (0..12).map(|i| (i * 80 * MIB, 64 * MIB)).collect()
}

fn data_bytes() -> u64 {
    layout().iter().map(|e| e.1).sum()
}

struct Pool {
    _dir: TempDir,
    pool: PathBuf,
    source: PathBuf,
    listen: String,
    sock: PathBuf,
}

impl Pool {
    fn new(tag: &str) -> Pool {
        let dir = TempDir::new(tag);
        let pool = dir.join("pool");
        std::fs::create_dir(&pool).unwrap();
        let source = dir.join("source.raw");
        sparse_file(&source, SIZE, &layout(), 11);
        // Another uid reads the source and reaches the socket.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o644)).unwrap();
        let sock = dir.join("sock");
        let listen = format!("unix:{}", sock.display());
        Pool {
            _dir: dir,
            pool,
            source,
            listen,
            sock,
        }
    }

    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec!["--resume-keep", "1h"];
        args.extend_from_slice(extra);
        let server = Server::start_with(&self.pool, &self.listen, &args);
        std::fs::set_permissions(&self.sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        server
    }

    fn upload(&self, volume: &str, extra: &[&str]) -> std::process::Command {
        let mut cmd = bin();
        cmd.args(["upload", "--json", "--resume", "--connect", &self.listen])
            .args(extra)
            .arg(&self.source)
            .arg(volume);
        cmd
    }

    /// The journals of the partials kept in the pool.
    fn journals(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.pool)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with(".volstream-resume-") && n.ends_with(".journal")
            })
            .collect();
        v.sort();
        v
    }

    /// Starts an upload of `volume` and SIGKILLs the server once its journal records at
    /// least a quarter of the data; returns the bytes recorded then.
    fn interrupted_upload(&self, volume: &str, server: Server) -> u64 {
        let before = self.journals();
        let mut client: Child = self
            .upload(volume, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let recorded = loop {
            let fresh: Vec<PathBuf> = self
                .journals()
                .into_iter()
                .filter(|j| !before.contains(j))
                .collect();
            let recorded = fresh.first().map_or(0, |j| recorded(j));
            if recorded >= data_bytes() / 4 {
                break recorded;
            }
            if let Some(status) = client.try_wait().unwrap() {
                panic!("the upload ended ({status}) before the server could be killed");
            }
            assert!(Instant::now() < deadline, "no progress in the journal");
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut server = server;
        kill(server.child.id(), 9);
        let _ = server.child.wait();
        let status = client.wait().unwrap();
        assert!(!status.success(), "the client noticed the server's death");
        assert!(
            !self.pool.join(volume).exists(),
            "nothing under the final name"
        );
        recorded
    }
}

/// Bytes the journal records (it is replaced atomically, so any read is whole).
fn recorded(journal: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(journal) else {
        return 0;
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("range "))
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
        .sum()
}

fn finished(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .expect("a finished event")
}

fn same_content(a: &Path, b: &Path) {
    assert_same_sparse(a, b);
    assert_eq!(
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len()
    );
}

#[test]
fn a_killed_server_resumes_with_only_the_missing_part() {
    let p = Pool::new("upres");
    let recorded = p.interrupted_upload("disk.raw", p.serve(&[]));
    let journals = p.journals();
    assert_eq!(journals.len(), 1, "the partial's journal stayed");
    let journal_before = std::fs::read(&journals[0]).unwrap();

    let _server = p.serve(&[]);
    // Another uid connects with the same command: it cannot see (or take) the partial.
    let out = run(p.upload("disk.raw", &[]).uid(65534).gid(65534));
    let other = finished(&out);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no partial upload"),
        "another peer is told it has none: {text}"
    );
    let whole = other["wire_bytes"].as_u64().unwrap();
    assert!(
        whole >= data_bytes(),
        "another peer sends everything: {whole}"
    );
    same_content(&p.source, &p.pool.join("disk.raw"));
    assert_eq!(
        std::fs::read(&journals[0]).unwrap(),
        journal_before,
        "the first peer's partial is untouched"
    );
    std::fs::remove_file(p.pool.join("disk.raw")).unwrap();

    // The first peer resumes: only what the journal lacked travels.
    let out = run(&mut p.upload("disk.raw", &[]));
    let event = finished(&out);
    let wire = event["wire_bytes"].as_u64().unwrap();
    let missing = data_bytes() - recorded;
    println!(
        "upload --resume: data {} B, recorded before the kill {recorded} B, missing {missing} \
         B, on the wire after the restart {wire} B ({:.3} of the missing part), block digests \
         {} B",
        data_bytes(),
        wire as f64 / missing as f64,
        event["update"]["digests_wire_bytes"]
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resuming"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever was written but not yet recorded when the server died is sent again; nothing
    // recorded is (a record's last partial block at most).
    assert!(wire >= missing, "{wire} < {missing}");
    assert!(
        wire <= missing + missing / 20 + 4 * MIB,
        "{wire} is more than the missing {missing} plus 5 %"
    );
    same_content(&p.source, &p.pool.join("disk.raw"));
    assert!(p.journals().is_empty(), "the journal is gone");
    let leftovers: Vec<_> = std::fs::read_dir(&p.pool)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "disk.raw")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_changed_source_is_uploaded_anew_and_old_partials_expire() {
    let p = Pool::new("upres-changed");
    p.interrupted_upload("v.raw", p.serve(&[]));
    // The source changes while the server is down.
    let f = std::fs::File::options()
        .write(true)
        .open(&p.source)
        .unwrap();
    f.write_all_at(&[0x5a; 4096], 3 * MIB).unwrap();
    drop(f);
    let server = p.serve(&[]);
    let out = run(&mut p.upload("v.raw", &[]));
    let event = finished(&out);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("source changed"), "{text}");
    assert!(event["wire_bytes"].as_u64().unwrap() >= data_bytes());
    same_content(&p.source, &p.pool.join("v.raw"));
    assert!(p.journals().is_empty());

    // A partial older than --resume-keep is removed when the server starts.
    p.interrupted_upload("w.raw", server);
    assert_eq!(p.journals().len(), 1);
    std::thread::sleep(Duration::from_millis(2100));
    let server = Server::start_with(&p.pool, &p.listen, &["--resume-keep", "2s"]);
    assert!(p.journals().is_empty(), "expired at start");
    drop(server);

    // Over the budget, the oldest goes.
    p.interrupted_upload("x.raw", p.serve(&[]));
    assert_eq!(p.journals().len(), 1);
    let _server = p.serve(&["--resume-budget", "1M"]);
    assert!(p.journals().is_empty(), "over budget at start");
}
