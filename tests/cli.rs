//! The real `volstream` binary end to end: a server process, clients in other processes, real
//! files, Unix and TCP sockets.

mod common;

use common::*;

/// name, size, data extents
type TestVolume = (String, u64, Vec<(u64, u64)>);

/// Many volumes down and back up in one invocation each, content and sparseness verified.
fn round_trip(tag: &str, listen: &str) {
    round_trip_with(tag, listen, &[], &[]);
}

/// `round_trip` with extra options for the server and for every client command (TLS).
fn round_trip_with(tag: &str, listen: &str, server_args: &[String], client_args: &[String]) {
    let dir = TempDir::new(tag);
    let pool = dir.join("pool");
    let local = dir.join("local");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    let volumes: Vec<TestVolume> = (0..6u64)
        .map(|i| {
            let size = 64 * MIB + i * 4096 + 123;
            let data = vec![(0, MIB), (8 * MIB + i * 4096, 2 * MIB), (size - 5000, 5000)];
            (format!("vol{i}.raw"), size, data)
        })
        .collect();
    for (i, (name, size, data)) in volumes.iter().enumerate() {
        sparse_file(&pool.join(name), *size, data, i as u64 + 1);
    }
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let _server = Server::start_with(&pool, listen, &server_args);
    // Every client command of this test, with the transport's options.
    let client = |args: &[&str]| {
        let mut c = bin();
        c.args(args).args(client_args);
        c
    };

    let mut download = client(&["download", "--connect", listen]);
    for (name, _, _) in &volumes {
        download.arg(name).arg(local.join(name));
    }
    let out = run(&mut download);
    assert!(out.status.success(), "download: {:?}", stderr_lines(&out));
    for (name, _, data) in &volumes {
        let (src, dst) = (pool.join(name), local.join(name));
        assert_eq!(read_all(&src), read_all(&dst), "{name} content");
        let data_bytes: u64 = data.iter().map(|d| d.1).sum();
        // Sparse: allocation follows the data (within a block per extent), not the size.
        assert!(
            allocated(&dst) <= data_bytes + 4 * 4096 * data.len() as u64,
            "{name} is sparse"
        );
    }

    let mut upload = client(&["upload", "--json", "--connect", listen]);
    for (name, _, _) in &volumes {
        upload.arg(local.join(name)).arg(format!("up-{name}"));
    }
    let out = run(&mut upload);
    assert!(out.status.success(), "upload: {:?}", stderr_lines(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    let ends: Vec<&str> = json
        .lines()
        .filter(|l| !l.contains("\"event\":\"started\"") && !l.contains("\"event\":\"progress\""))
        .collect();
    assert_eq!(ends.len(), volumes.len(), "{json}");
    assert!(
        ends.iter()
            .all(|l| l.starts_with("{\"event\":\"finished\"") && l.contains("\"ok\":true")),
        "{json}"
    );
    for (name, _, _) in &volumes {
        assert_eq!(
            read_all(&pool.join(name)),
            read_all(&pool.join(format!("up-{name}")))
        );
        assert!(
            allocated(&pool.join(format!("up-{name}"))) <= allocated(&pool.join(name)) + 16 * 4096
        );
    }

    // The server lists what it has, and maps a volume the same way a local look does.
    let out = run(&mut client(&["list", "--json", "--connect", listen]));
    assert!(out.status.success(), "list: {:?}", stderr_lines(&out));
    let listing = String::from_utf8(out.stdout).unwrap();
    for (name, size, _) in &volumes {
        for shown in [name.clone(), format!("up-{name}")] {
            let line = format!("{{\"name\":\"{shown}\",\"size\":{size},");
            assert!(listing.contains(&line), "{line} in {listing}");
        }
    }
    let first = &volumes[0].0;
    let remote = run(&mut client(&[
        "extents",
        "--json",
        "--connect",
        listen,
        first,
    ]));
    assert!(
        remote.status.success(),
        "extents: {:?}",
        stderr_lines(&remote)
    );
    let local_map = run(bin().args(["extents", "--json"]).arg(pool.join(first)));
    assert_eq!(
        String::from_utf8_lossy(&remote.stdout),
        String::from_utf8_lossy(&local_map.stdout)
    );
    assert!(String::from_utf8_lossy(&remote.stdout).contains("\"kind\":\"hole\""));

    // Replacing needs --overwrite; without it the volume is untouched.
    let out = run(client(&["upload", "--connect", listen])
        .arg(local.join(&volumes[1].0))
        .arg(format!("up-{first}")));
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("up-{first}")) && l.contains("exists")),
        "{lines:?}"
    );
    assert_eq!(
        read_all(&pool.join(first)),
        read_all(&pool.join(format!("up-{first}")))
    );
    let out = run(client(&["upload", "--overwrite", "--connect", listen])
        .arg(local.join(&volumes[1].0))
        .arg(format!("up-{first}")));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(
        read_all(&pool.join(&volumes[1].0)),
        read_all(&pool.join(format!("up-{first}")))
    );

    // A missing volume fails alone, with one line naming it; the others succeed.
    let out = run(client(&["download", "--connect", listen, "nosuch.raw"])
        .arg(local.join("nosuch.raw"))
        .arg(&volumes[2].0)
        .arg(local.join("again.raw")));
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("nosuch.raw") && l.contains("no such volume")),
        "{lines:?}"
    );
    assert!(
        !local.join("nosuch.raw").exists(),
        "nothing appears for a failed download"
    );
    assert_eq!(
        read_all(&local.join("again.raw")),
        read_all(&pool.join(&volumes[2].0))
    );
}

#[test]
fn serve_download_upload_over_unix() {
    let sock = std::env::temp_dir().join(format!("volstream-cli-{}.sock", std::process::id()));
    round_trip("unix", &format!("unix:{}", sock.display()));
}

#[test]
fn serve_download_upload_over_tcp() {
    round_trip("tcp", &format!("tcp:127.0.0.1:{}", free_tcp_port()));
}

#[test]
fn serve_download_upload_over_tls() {
    let pki = TempDir::new("tls-pki");
    make_pki(&pki.0, &["localhost", "127.0.0.1"], &["client"]);
    round_trip_with(
        "tls",
        &format!("tls:127.0.0.1:{}", free_tcp_port()),
        &tls_server_args(&pki.0),
        &tls_client_args(&pki.0, "client"),
    );
}

#[test]
fn local_extents_show_data_and_holes() {
    let dir = TempDir::new("extents");
    let f = dir.join("f.raw");
    sparse_file(&f, 16 * MIB, &[(4 * MIB, MIB)], 9);
    let out = run(bin().args(["extents", "--json"]).arg(&f));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let data: Vec<&str> = text.lines().filter(|l| l.contains("\"data\"")).collect();
    assert_eq!(data.len(), 1, "{text}");
    assert!(
        data[0].contains(&format!("\"offset\":{}", 4 * MIB)),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("\"hole\"")), "{text}");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["download", "--connect", "unix:/nonexistent", "only-one"],
        vec!["download", "--bogus-flag", "a", "b"],
        vec!["download", "--connect", "carrier-pigeon:5", "a", "b"],
        vec!["download", "a", "b"],
        vec!["frobnicate"],
    ];
    for args in cases {
        let out = run(bin().args(&args));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {:?}",
            stderr_lines(&out)
        );
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
        assert!(lines[0].starts_with("volstream: "), "{lines:?}");
    }
}

#[test]
fn unreachable_server_exits_3_with_one_line() {
    let dir = TempDir::new("unreachable");
    for addr in [
        format!("unix:{}", dir.join("nobody.sock").display()),
        format!("tcp:127.0.0.1:{}", free_tcp_port()),
    ] {
        let out = run(bin()
            .args(["download", "--connect", &addr, "v"])
            .arg(dir.join("v")));
        assert_eq!(
            out.status.code(),
            Some(3),
            "{addr}: {:?}",
            stderr_lines(&out)
        );
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("cannot connect"), "{lines:?}");
        let out = run(bin().args(["list", "--connect", &addr]));
        assert_eq!(out.status.code(), Some(3));
    }
}

#[test]
fn demo_runs_and_verifies_every_volume() {
    let dir = TempDir::new("demo");
    let out = run(bin().args(["demo", "--dir"]).arg(&dir.0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", stderr_lines(&out));
    assert_eq!(stdout.matches("identical").count(), 5, "{stdout}");
    assert!(stdout.contains("1.0 TiB"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "the demo cleans up after itself");
}

#[test]
fn stress_verifies_every_stream_and_reports_json() {
    let out = run(bin().args([
        "stress",
        "--streams",
        "40",
        "--size",
        "1048576",
        "--hole-ratio",
        "0.5",
        "--json",
    ]));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"completed\":40,"), "{json}");
    assert!(json.contains("\"errors\":0,"), "{json}");
    assert!(
        !json.contains("\"hole_bytes\":0,"),
        "holes travel as holes: {json}"
    );

    let out = run(bin().args([
        "stress",
        "--churn",
        "--duration",
        "2",
        "--streams",
        "10",
        "--size",
        "262144",
        "--json",
    ]));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"churn\":true"), "{json}");
    assert!(json.contains("\"errors\":0,"), "{json}");
    assert!(
        !json.contains("\"completed\":10,"),
        "churn keeps opening streams: {json}"
    );
}

/// Receiving reuses its buffers. glibc hands every freed buffer of 128 KiB or more back to
/// the kernel unless told otherwise (engine::memory::keep_freed_buffers); the next buffer then
/// faults in fresh pages. Measured on a 256 MiB download: 14,200-16,900 page faults without the
/// policy, about 1,600 with it (most of them loading the program).
#[test]
fn a_download_reuses_its_buffers_instead_of_faulting_in_new_ones() {
    let dir = TempDir::new("faults");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("dense.raw"), 256 * MIB, &[(0, 256 * MIB)], 11);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let copy = dir.join("copy.raw");
    // Reaped by the wait4 below, which std's Child::wait cannot replace: it drops the rusage.
    #[allow(clippy::zombie_processes)]
    let child = bin()
        .args(["download", "--no-sync", "--connect", &listen, "dense.raw"])
        .arg(&copy)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; both out-pointers are valid for the call.
    let (pid, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let pid = libc::wait4(child.id() as i32, &mut status, 0, &mut usage);
        (pid, usage)
    };
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "download failed: {status:#x}"
    );
    assert!(
        read_all(&pool.join("dense.raw")) == read_all(&copy),
        "content differs"
    );
    assert!(
        usage.ru_minflt < 4_000,
        "{} page faults receiving 256 MiB",
        usage.ru_minflt
    );
}
