//! Help, usage errors and the words of failures: what a user reads when something is wrong.

mod common;

use common::*;
use std::process::Output;

/// The CLI's own lines (RUST_LOG=warn adds log lines).
fn said(out: &Output) -> Vec<String> {
    stderr_lines(out)
        .into_iter()
        .filter(|l| l.starts_with("volstream: "))
        .collect()
}

fn one_line(out: &Output) -> String {
    let lines = stderr_lines(out);
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(lines[0].starts_with("volstream: "), "{lines:?}");
    lines[0].clone()
}

fn usage(args: &[&str]) -> String {
    let out = run(bin().args(args));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: {:?}",
        stderr_lines(&out)
    );
    one_line(&out)
}

const NOWHERE: &str = "unix:/nonexistent/volstream.sock";

#[test]
fn a_missing_pair_names_what_is_missing() {
    let line = usage(&["download", "--connect", NOWHERE, "a.raw"]);
    assert!(
        line.contains("\"a.raw\"") && line.contains("FILE"),
        "{line}"
    );
    let line = usage(&["upload", "--connect", NOWHERE, "x", "y", "./local.raw"]);
    assert!(
        line.contains("\"./local.raw\"") && line.contains("VOLUME"),
        "{line}"
    );
    let line = usage(&["download", "--connect", NOWHERE]);
    assert!(line.contains("VOLUME FILE"), "{line}");
    let line = usage(&["upload", "--connect", NOWHERE]);
    assert!(line.contains("FILE VOLUME"), "{line}");
}

#[test]
fn download_and_upload_each_describe_their_own_options() {
    let help = |cmd: &str| {
        let out = run(bin().args([cmd, "--help"]));
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let (down, up) = (help("download"), help("upload"));
    assert!(down.contains("VOLUME FILE"), "{down}");
    assert!(up.contains("FILE VOLUME"), "{up}");
    for only_download in ["--in-place", "--no-sync"] {
        assert!(down.contains(only_download), "{down}");
        assert!(
            !up.contains(only_download),
            "upload has no {only_download}:\n{up}"
        );
    }
    assert!(up.contains("--size"), "{up}");
    assert!(!down.contains("--size"), "{down}");
    assert!(
        !up.contains("Downloads:") && !down.contains("for upload"),
        "{down}\n{up}"
    );
    for text in [&down, &up] {
        assert!(
            text.contains("power of two from 512"),
            "-S says what it takes:\n{text}"
        );
    }
}

#[test]
fn contradictions_and_bad_granularities_are_refused() {
    for cmd in ["download", "upload"] {
        for flags in [
            &["--sparse", "--no-sparse"][..],
            &["--allocated", "--destination-is-zero"][..],
            &["-S", "3"][..],
            &["-S", "1000"][..],
            &["-S", "256"][..],
            &["--sparse-size", "4k"][..],
        ] {
            let mut args = vec![cmd, "--connect", NOWHERE];
            args.extend(flags);
            args.extend(["a", "b"]);
            let line = usage(&args);
            if flags[0] == "-S" || flags[0] == "--sparse-size" {
                assert!(line.contains("power of two from 512"), "{line}");
            }
        }
        // Good granularities pass the parser and fail only at connecting.
        for good in ["0", "512", "65536"] {
            let out = run(bin().args([cmd, "--connect", NOWHERE, "-S", good, "a", "b"]));
            assert_eq!(
                out.status.code(),
                Some(3),
                "-S {good}: {:?}",
                stderr_lines(&out)
            );
        }
    }
}

#[test]
fn serve_without_its_pool_is_bad_usage() {
    let dir = TempDir::new("nopool");
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let missing = dir.join("missing");
    let out = run(bin()
        .args(["serve", "--pool"])
        .arg(&missing)
        .args(["--listen", &listen]));
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    let line = one_line(&out);
    assert!(
        line.contains(missing.to_str().unwrap()) && line.contains("no such directory"),
        "{line}"
    );
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = run(bin()
        .args(["serve", "--pool"])
        .arg(&file)
        .args(["--listen", &listen]));
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    assert!(one_line(&out).contains("not a directory"));
}

/// Failures read as what happened: a local path is no volume, and no category is said twice.
#[test]
fn failures_are_worded_by_their_cause() {
    let dir = TempDir::new("words");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("v.raw"), 4 * MIB, &[(0, MIB)], 2);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let doubled = |line: &str| {
        [
            "timed out",
            "invalid volume name",
            "no such volume",
            "no space left",
        ]
        .iter()
        .any(|c| line.matches(c).count() > 1)
    };

    let missing_dir = dir.join("no-such-dir");
    let out = run(bin()
        .args(["download", "--connect", &listen, "v.raw"])
        .arg(missing_dir.join("copy.raw")));
    assert_eq!(out.status.code(), Some(1));
    let line = &said(&out)[0];
    assert!(
        !line.contains("no such volume"),
        "a local directory is no volume: {line}"
    );
    assert!(
        line.contains(missing_dir.to_str().unwrap()) && line.contains("No such file or directory"),
        "{line}"
    );

    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(dir.join("absent.raw"))
        .arg("new.raw"));
    assert_eq!(out.status.code(), Some(1));
    let line = &said(&out)[0];
    assert!(!line.contains("no such volume"), "{line}");
    assert!(
        line.contains("absent.raw -> new.raw"),
        "upload reads FILE -> VOLUME: {line}"
    );

    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(pool.join("v.raw"))
        .arg("sub/dir.raw"));
    let line = &said(&out)[0];
    assert!(
        line.contains("invalid volume name") && !doubled(line),
        "{line}"
    );

    let out = run(bin()
        .args(["download", "--connect", &listen, "nosuch.raw"])
        .arg(dir.join("n")));
    let line = &said(&out)[0];
    assert!(line.contains("no such volume") && !doubled(line), "{line}");

    // A server that accepts and never speaks: the handshake times out, said once.
    let mute = dir.join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let out = run(bin().args(["list", "--connect", &format!("unix:{}", mute.display())]));
    drop(listener);
    let line = one_line(&out);
    assert!(line.contains("timed out") && !doubled(&line), "{line}");
}

/// One failure, one report: quiet logging by default, and with RUST_LOG=warn each failed
/// stream's sink is logged once (it was logged again for every chunk already queued).
#[test]
fn a_failure_is_reported_once() {
    let dir = TempDir::new("once");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("dense.raw"), 64 * MIB, &[(0, 64 * MIB)], 6);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let missing = dir.join("missing");
    let download = || {
        let mut cmd = bin();
        cmd.args(["download", "--connect", &listen]);
        for i in 0..6 {
            cmd.arg("dense.raw").arg(missing.join(format!("c{i}")));
        }
        cmd
    };
    let out = run(download().env_remove("RUST_LOG"));
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(
        lines.len(),
        7,
        "six failures and the count, nothing else: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with("volstream: ")),
        "{lines:?}"
    );

    let out = run(download().env("RUST_LOG", "warn"));
    let lines = stderr_lines(&out);
    let logged = lines.iter().filter(|l| l.contains("sink failed")).count();
    assert_eq!(logged, 6, "each failed sink logged once: {lines:?}");
}

/// `cargo build --release` (the workspace's default members) builds the helper, and without
/// it `--iohelper` says how to get it.
#[test]
fn the_iohelper_is_built_by_default_and_missing_it_is_explained() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let defaults: Vec<&str> = meta["workspace_default_members"]
        .as_array()
        .expect("cargo lists default members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let helper_package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "volstream-iohelper")
        })
        .expect("a package builds volstream-iohelper");
    assert!(
        defaults.contains(&helper_package["id"].as_str().unwrap()),
        "a default member: {defaults:?}"
    );

    // A volstream binary alone in a directory, with nothing on PATH.
    let dir = TempDir::new("nohelper");
    let lone = dir.join("volstream");
    std::fs::copy(env!("CARGO_BIN_EXE_volstream"), &lone).unwrap();
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("v.raw"), MIB, &[(0, 4096)], 1);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let out = run(std::process::Command::new(&lone)
        .env_remove("VOLSTREAM_IOHELPER")
        .env_remove("RUST_LOG")
        .env("PATH", dir.join("empty"))
        .args(["download", "--iohelper", "--connect", &listen, "v.raw"])
        .arg(dir.join("copy.raw")));
    assert_eq!(out.status.code(), Some(1));
    let line = &said(&out)[0];
    assert!(line.contains("volstream-iohelper"), "{line}");
    assert!(
        line.contains("cargo build --release") && line.contains("VOLSTREAM_IOHELPER"),
        "{line}"
    );
}
