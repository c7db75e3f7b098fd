//! `download --range` against a real `serve`: only the ranges travel (`--json` wire_bytes),
//! each lands at its offset, a new file reads zero elsewhere and an existing one (--in-place)
//! keeps what it had; a server reading through the iohelper (whole-volume reads, cut by the
//! engine) gives the same bytes; bad lists get one clear line and leave nothing behind.

mod common;

use common::*;
use std::process::Output;

const KIB: u64 = 1024;

fn ended(out: &Output) -> serde_json::Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished" || v["event"] == "failed")
        .unwrap_or_else(|| panic!("no end line in {:?}", String::from_utf8_lossy(&out.stdout)))
}

/// Whether `copy` holds `source`'s bytes in `ranges` and `fill` everywhere else.
fn check(copy: &[u8], source: &[u8], ranges: &[(u64, u64)], fill: u8) {
    assert_eq!(copy.len(), source.len(), "the copy has the volume's size");
    let mut at = 0usize;
    for &(o, l) in ranges {
        let (o, l) = (o as usize, l as usize);
        assert!(
            copy[at..o].iter().all(|&b| b == fill),
            "outside the ranges before {o}"
        );
        assert!(copy[o..o + l] == source[o..o + l], "range {o}+{l}");
        at = o + l;
    }
    assert!(
        copy[at..].iter().all(|&b| b == fill),
        "outside the ranges at the end"
    );
}

#[test]
fn only_the_ranges_travel_and_land_at_their_offsets() {
    let dir = TempDir::new("ranges");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let size = 64 * MIB;
    // Data at 1 MiB and 40 MiB; the rest holes.
    sparse_file(
        &pool.join("vol"),
        size,
        &[(MIB, 4 * MIB), (40 * MIB, 2 * MIB)],
        9,
    );
    let source = read_all(&pool.join("vol"));
    // Given unsorted: inside data, across a data/hole edge, all hole, the very end.
    let ranges = [
        (2 * MIB + 123, 300 * KIB),
        (39 * MIB, 2 * MIB),
        (20 * MIB, 4096),
        (size - 10, 10),
    ];
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let asked: u64 = ranges.iter().map(|r| r.1).sum();
    let args: Vec<String> = ranges
        .iter()
        .flat_map(|(o, l)| ["--range".to_string(), format!("{o}:{l}")])
        .collect();
    for serve_extra in [&[][..], &["--iohelper"][..]] {
        if serve_extra.contains(&"--iohelper") && !iohelper_built() {
            eprintln!("skipping the iohelper server: volstream-iohelper is not built");
            continue;
        }
        let listen = format!("unix:{}", dir.join("s.sock").display());
        let _server = Server::start_with(&pool, &listen, serve_extra);

        // A new file: the ranges, zeroes elsewhere, only the ranges' data allocated.
        let copy = dir.join("copy");
        let _ = std::fs::remove_file(&copy);
        let out = run(bin()
            .args(["download", "--json", "--connect", &listen])
            .args(&args)
            .arg("vol")
            .arg(&copy));
        assert!(
            out.status.success(),
            "{serve_extra:?} {:?}",
            stderr_lines(&out)
        );
        let end = ended(&out);
        let (data, holes, wire) = (
            end["data_bytes"].as_u64().unwrap(),
            end["hole_bytes"].as_u64().unwrap(),
            end["wire_bytes"].as_u64().unwrap(),
        );
        assert_eq!(data + holes, asked, "{end}");
        // The hole ranges travel as HOLE frames: on the wire, the data asked for and headers.
        assert!(data < asked && wire < data + 64 * KIB, "{end}");
        check(&read_all(&copy), &source, &sorted, 0);
        assert!(
            allocated(&copy) <= data + 64 * KIB,
            "{} allocated",
            allocated(&copy)
        );
        assert!(temporaries(&dir.0).is_empty(), "{:?}", temporaries(&dir.0));

        // An existing file written in place: outside the ranges it keeps its 0xAA.
        let old = dir.join("old");
        filled(&old, size, 0xAA);
        let out = run(bin()
            .args([
                "download",
                "--overwrite",
                "--in-place",
                "--connect",
                &listen,
            ])
            .args(&args)
            .arg("vol")
            .arg(&old));
        assert!(
            out.status.success(),
            "{serve_extra:?} {:?}",
            stderr_lines(&out)
        );
        check(&read_all(&old), &source, &sorted, 0xAA);
    }
}

#[test]
fn bad_range_lists_get_one_clear_line_and_leave_nothing() {
    let dir = TempDir::new("ranges-bad");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("vol"), 4 * MIB, &[(0, MIB)], 3);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let copy = dir.join("copy");
    let download = |ranges: &[&str]| {
        let mut cmd = bin();
        cmd.args(["download", "--connect", &listen]);
        for r in ranges {
            cmd.args(["--range", r]);
        }
        run(cmd.arg("vol").arg(&copy))
    };

    let out = download(&["0:100", "50:100"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    assert!(line_with(&out, "--range").contains("overlaps"));

    let out = download(&["10:0"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));

    // Past the end: only the server knows the size; it refuses the stream, one line.
    let out = download(&["0:10", &format!("{}:2", 4 * MIB - 1)]);
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "past the end");
    assert!(
        line.contains("download vol") && line.contains("4194303+2"),
        "{line}"
    );
    assert!(!copy.exists());
    assert!(temporaries(&dir.0).is_empty(), "{:?}", temporaries(&dir.0));

    // Where a range cannot be written at its offset.
    let out = run(bin().args([
        "download",
        "--connect",
        &listen,
        "--range",
        "0:10",
        "vol",
        "-",
    ]));
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    assert!(line_with(&out, "--range").contains("stdout"));
    let out = download(&["0:10", "--verify"]);
    assert_ne!(out.status.code(), Some(0));
}

/// Bytes the process `pid` has read through read(2) and pread(2), its threads included.
fn bytes_read_by(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_file_source_reads_only_the_ranges() {
    let dir = TempDir::new("ranges-seek");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    // 4 GiB, 192 MiB of it data; the range lies deep inside the data, where a source read
    // whole and cut would have read everything before it.
    let size = 4096 * MIB;
    sparse_file(&pool.join("vol"), size, &[(8 * MIB, 192 * MIB)], 5);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let server = Server::start(&pool, &listen);
    let copy = dir.join("copy");
    let (offset, len) = (150 * MIB + 4096, MIB);
    let before = bytes_read_by(server.child.id());
    let out = run(bin()
        .args(["download", "--json", "--connect", &listen])
        .args(["--range", &format!("{offset}:{len}")])
        .args(["--range", &format!("{}:{}", size - MIB, MIB)])
        .arg("vol")
        .arg(&copy));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let read = bytes_read_by(server.child.id()) - before;
    eprintln!("the server read {read} bytes for 1 MiB of data and 1 MiB of hole");
    // The 1 MiB of data once, a partial buffer on each side, the socket's own bytes.
    assert!(read < 3 * MIB, "the server read {read} bytes");
    assert!(
        read >= MIB,
        "the server read {read} bytes: the range was not read"
    );
    let end = ended(&out);
    assert_eq!(end["data_bytes"].as_u64(), Some(MIB), "{end}");
    let at = |path: &std::path::Path| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; MIB as usize];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    };
    assert!(at(&copy) == at(&pool.join("vol")), "the range's bytes");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), size);
}
