//! Destinations checked before data moves, and names at their limits, with the real binary:
//! two pairs with one destination are refused before connecting, a directory in the way is
//! refused at open, a 240-byte file name and a 255-byte volume name go through (temporaries
//! fit NAME_MAX), and what the server tells a client names volumes, never its paths.

mod common;

use common::*;

#[test]
fn two_pairs_with_one_destination_are_refused_before_connecting() {
    let dir = TempDir::new("dupes");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(dir.join("f"), b"x").unwrap();
    let nobody = format!("unix:{}", dir.join("nobody.sock").display());
    let same = [
        (dir.join("a/x"), dir.join("a/../a/x")),
        (dir.join("f"), dir.join("a/../f")),
    ];
    for (one, other) in same {
        let out = run(bin()
            .args(["download", "--connect", &nobody, "v1"])
            .arg(&one)
            .arg("v2")
            .arg(&other));
        assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
        line_with(&out, "destination of more than one pair");
    }
    let out = run(bin()
        .args(["upload", "--connect", &nobody])
        .arg(dir.join("f"))
        .arg("v")
        .arg(dir.join("f"))
        .arg("v"));
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    line_with(&out, "volume v is the destination of more than one pair");
    // Several volumes into /dev/null are fine (and reach the connection step).
    let out = run(bin().args(["download", "--connect", &nobody]).args([
        "v1",
        "/dev/null",
        "v2",
        "/dev/null",
    ]));
    assert_eq!(out.status.code(), Some(3), "{:?}", stderr_lines(&out));
}

#[test]
fn a_directory_in_the_way_is_refused_at_open_not_after_the_data() {
    let dir = TempDir::new("dir-dest");
    let pool = dir.join("pool");
    std::fs::create_dir_all(pool.join("taken")).unwrap();
    let size = 256 * MIB;
    sparse_file(&pool.join("big"), size, &[(0, size)], 2);
    std::fs::create_dir_all(dir.join("local/taken")).unwrap();
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    let out = run(bin()
        .args([
            "download",
            "--overwrite",
            "--json",
            "--connect",
            &listen,
            "big",
        ])
        .arg(dir.join("local/taken")));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "is a directory");
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let moved: u64 = json
        .split("\"data_bytes\":")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no data_bytes in {json}"));
    assert!(
        moved < size / 8,
        "{moved} of {size} bytes moved first: {json}"
    );

    let out = run(bin()
        .args(["upload", "--overwrite", "--connect", &listen])
        .arg(pool.join("big"))
        .arg("taken"));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    line_with(&out, "is a directory");
    assert!(temporaries(&pool).is_empty());
    assert!(temporaries(&dir.join("local")).is_empty());
}

#[test]
fn long_names_fit_and_errors_never_show_server_paths() {
    let dir = TempDir::new("names");
    let pool = dir.join("pool");
    let local = dir.join("local");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(pool.join("adir")).unwrap();
    sparse_file(&pool.join("vol"), 8 * MIB, &[(MIB, MIB)], 3);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let missing_dev = dir.join("no-such-device");
    let device = format!("gone={}", missing_dev.display());
    let _server = Server::start_with(&pool, &listen, &["--device", &device]);

    // A 240-byte destination and a 255-byte volume name, both ways.
    let file = local.join("f".repeat(240));
    let out = run(bin()
        .args(["download", "--connect", &listen, "vol"])
        .arg(&file));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&file), read_all(&pool.join("vol")));
    let name = "v".repeat(255);
    let out = run(bin()
        .args(["upload", "--connect", &listen])
        .arg(&file)
        .arg(&name));
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&pool.join(&name)), read_all(&pool.join("vol")));
    let out = run(bin().args(["list", "--connect", &listen]));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&name));
    assert!(temporaries(&pool).is_empty() && temporaries(&local).is_empty());

    // Failures on the server: each names the volume, none a path of the server's.
    let dir_text = dir.0.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["download", "nosuch"], "nosuch"),
        (vec!["download", "adir"], "adir"),
        (vec!["download", "gone"], "gone"),
        (vec!["upload", "vol"], "vol"),
        (vec!["upload", "--overwrite", "adir"], "adir"),
        (vec!["upload", "--overwrite", "gone"], "gone"),
    ];
    for (args, volume) in cases {
        let mut cmd = bin();
        cmd.arg(args[0]).args(["--connect", &listen]);
        cmd.args(&args[1..args.len() - 1]);
        if args[0] == "download" {
            cmd.arg(volume).arg(local.join("out"));
        } else {
            cmd.arg(&file).arg(volume);
        }
        let out = run(&mut cmd);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {:?}",
            stderr_lines(&out)
        );
        let line = line_with(&out, volume);
        let told = line
            .split("by peer")
            .nth(1)
            .unwrap_or_else(|| panic!("{args:?}: not the server's error: {line}"));
        assert!(told.contains(volume), "{args:?}: {line}");
        assert!(
            !told.contains(&dir_text),
            "{args:?}: the server showed a path: {line}"
        );
    }
}
