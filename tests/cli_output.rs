//! What the CLI prints and where: JSON documents, results on a closed pipe, volume data on
//! stdout with everything else on stderr.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

/// A file of `count` 4 KiB data extents, 256 KiB apart.
fn many_extents(path: &std::path::Path, count: u64) {
    let data: Vec<(u64, u64)> = (0..count).map(|i| (i * 256 * 1024, 4096)).collect();
    sparse_file(path, count * 256 * 1024, &data, 3);
}

/// Runs the command with stdout read for one line and then closed, as `| head -1` does.
fn first_line_then_close(
    cmd: &mut std::process::Command,
) -> (String, std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The reader is dropped here: every later write of the child meets a closed pipe.
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (line, status, err)
}

/// `volstream extents FILE | head` and the like: the tool ends as Unix tools do when their
/// reader goes, by SIGPIPE, saying nothing (it panicked with exit 101 before).
#[test]
fn a_closed_stdout_ends_the_process_quietly() {
    let dir = TempDir::new("epipe");
    let f = dir.join("many.raw");
    many_extents(&f, 4000);
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    for i in 0..3000 {
        std::fs::File::create(pool.join(format!("volume-with-a-long-name-{i:05}.raw"))).unwrap();
    }
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    let file = f.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &["extents", file],
        &["extents", "--json", file],
        &["list", "--connect", &listen],
        &["list", "--json", "--connect", &listen],
    ];
    for args in cases {
        let mut cmd = bin();
        cmd.args(args);
        let (line, status, err) = first_line_then_close(&mut cmd);
        assert!(!line.is_empty(), "{cmd:?} printed nothing");
        assert_eq!(err, "", "{cmd:?}: nothing on stderr");
        assert_eq!(
            status.signal(),
            Some(libc::SIGPIPE),
            "{cmd:?} ends by SIGPIPE, not {status:?}"
        );
    }
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{:?}", stderr_lines(out));
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Every `--json` document parses as JSON with the fields documented, names with quotes,
/// backslashes and non-ASCII characters included.
#[test]
fn json_output_parses_with_typed_fields() {
    let dir = TempDir::new("json");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let name = "a \"quoted\" \\ vol\u{e9}.raw";
    sparse_file(&pool.join(name), 4 * MIB, &[(MIB, 8192)], 5);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    let listing = json_lines(&run(bin().args(["list", "--json", "--connect", &listen])));
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0]["name"], name);
    assert_eq!(listing[0]["size"], 4 * MIB);
    assert_eq!(listing[0]["allocated"], 8192);

    let copy = dir.join("copy \"1\".raw");
    let events = json_lines(&run(bin()
        .args(["download", "--json", "--connect", &listen, name])
        .arg(&copy)));
    assert_eq!(events[0]["event"], "started", "{events:?}");
    let r = events.last().unwrap();
    assert_eq!(r["event"], "finished", "{events:?}");
    assert_eq!(r["index"], 0);
    assert_eq!(r["op"], "download");
    assert_eq!(r["volume"], name);
    assert_eq!(r["file"], copy.to_str().unwrap());
    assert_eq!(r["ok"], true);
    assert_eq!(r["size"], 4 * MIB);
    assert_eq!(r["data_bytes"], 8192);
    assert!(r["seconds"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(r.get("error").is_none(), "{r}");

    let map = json_lines(&run(bin().args(["extents", "--json"]).arg(&copy)));
    let kinds: Vec<(u64, u64, &str)> = map
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(kinds.contains(&(MIB, 8192, "data")), "{kinds:?}");

    let stress = json_lines(&run(bin().args([
        "stress",
        "--streams",
        "3",
        "--size",
        "65536",
        "--json",
    ])));
    assert_eq!(stress[0]["completed"], 3);
    assert_eq!(stress[0]["errors"], 0);
    assert!(stress[0]["data_GBps"].is_number(), "{}", stress[0]);
}

/// `-` is stdout for a download (so is a path that is stdout): the data alone goes there,
/// every message to stderr.
#[test]
fn a_download_to_stdout_keeps_the_data_clean() {
    let dir = TempDir::new("stdout");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(
        &pool.join("v.raw"),
        8 * MIB + 77,
        &[(MIB, 5000), (8 * MIB, 77)],
        4,
    );
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let want = read_all(&pool.join("v.raw"));
    for (file, extra) in [("-", None), ("/dev/stdout", None), ("-", Some("--json"))] {
        let mut cmd = bin();
        cmd.args(["download", "--connect", &listen]);
        cmd.args(extra).args(["v.raw", file]);
        let out = cmd.current_dir(&dir.0).output().unwrap();
        assert!(out.status.success(), "{file}: {:?}", stderr_lines(&out));
        assert!(
            out.stdout == want,
            "{file} {extra:?}: stdout is the volume, nothing else"
        );
        let err = stderr_lines(&out);
        match extra {
            // The events, every line of them JSON, on stderr.
            Some(_) => {
                let events: Vec<serde_json::Value> = err
                    .iter()
                    .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
                    .collect();
                assert_eq!(events[0]["event"], "started", "{err:?}");
                let end = events.last().unwrap();
                assert_eq!(end["event"], "finished", "{err:?}");
                assert_eq!(end["ok"], true);
                assert_eq!(end["file"], "-");
            }
            None => {
                assert_eq!(err.len(), 1, "{err:?}");
                assert!(
                    err[0].contains("v.raw") && err[0].contains("bytes"),
                    "{err:?}"
                )
            }
        }
        assert!(!dir.join("-").exists(), "`-` is no file name");
    }
}

/// `upload --size BYTES - NAME` reads a pipe, zero detection included; a pipe without a
/// size is refused before connecting, and one longer than its size fails without a volume.
#[test]
fn an_upload_reads_a_pipe_of_a_given_size() {
    let dir = TempDir::new("stdin");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let src = dir.join("src.raw");
    sparse_file(&src, 6 * MIB + 5, &[(0, 4096), (5 * MIB, MIB + 5)], 8);
    let content = read_all(&src);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    let upload = |size: Option<usize>, name: &str| {
        let mut cmd = bin();
        cmd.args(["upload", "--json", "--connect", &listen]);
        if let Some(size) = size {
            cmd.args(["--size", &size.to_string()]);
        }
        let mut child = cmd
            .args(["-", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = content.clone();
        // Fed through a real pipe, in pieces, from another thread.
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            for piece in data.chunks(100_000) {
                if stdin.write_all(piece).is_err() {
                    break;
                }
            }
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    };

    let out = upload(Some(content.len()), "piped.raw");
    let events = json_lines(&out);
    assert_eq!(read_all(&pool.join("piped.raw")), content);
    let report = events.last().unwrap();
    assert_eq!(report["event"], "finished", "{events:?}");
    assert_eq!(report["size"], content.len());
    let holes = report["hole_bytes"].as_u64().unwrap();
    assert!(
        holes >= 4 * MIB,
        "zero detection applies to a pipe: {report}"
    );

    let out = upload(None, "nosize.raw");
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    let err = stderr_lines(&out);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("--size"), "{err:?}");
    assert!(
        !err[0].contains("ReaderOptions"),
        "no internal names: {err:?}"
    );
    assert!(!pool.join("nosize.raw").exists());

    let out = upload(Some(content.len() - 10), "short.raw");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("more than"),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!pool.join("short.raw").exists(), "nothing under the name");
}
