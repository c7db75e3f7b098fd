//! Volume names are plain names: nothing outside the pool is ever read or written, whatever a
//! client asks for (`..`, absolute paths, slashes, hidden names, symlinks out of the pool).

mod common;

use common::*;

#[test]
fn names_that_leave_the_pool_are_refused() {
    let dir = TempDir::new("confine");
    let pool = dir.join("pool");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    sparse_file(&outside.join("secret"), MIB, &[(0, MIB)], 1);
    sparse_file(&pool.join("fine"), MIB, &[(0, 4096)], 2);
    std::os::unix::fs::symlink(outside.join("secret"), pool.join("escape")).unwrap();
    std::os::unix::fs::symlink(&outside, pool.join("dirlink")).unwrap();
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();

    let hostile = [
        "../outside/secret",
        "/etc/passwd",
        "escape",
        "dirlink/secret",
        ".hidden",
        "..",
        "a/../../outside/secret",
    ];
    for name in hostile {
        let out = run(bin()
            .args(["download", "--connect", &listen, name])
            .arg(local.join("copy")));
        assert_eq!(out.status.code(), Some(1), "download {name:?} must fail");
        let lines = stderr_lines(&out);
        assert!(
            lines.iter().any(|l| l.contains("invalid volume name")
                || l.contains("permission denied")
                || l.contains("no such volume")),
            "{name:?}: {lines:?}"
        );
        assert!(!local.join("copy").exists(), "{name:?} produced a file");

        let out = run(bin()
            .args(["upload", "--overwrite", "--connect", &listen])
            .arg(pool.join("fine"))
            .arg(name));
        assert_eq!(out.status.code(), Some(1), "upload {name:?} must fail");
    }
    // Nothing outside the pool changed, and nothing new appeared in it.
    assert_eq!(read_all(&outside.join("secret")).len() as u64, MIB);
    let mut outside_names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    outside_names.sort();
    assert_eq!(outside_names, vec![std::ffi::OsString::from("secret")]);
    let out = run(bin().args(["list", "--connect", &listen]));
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listing.contains("fine"), "{listing}");
    assert!(
        !listing.contains("escape") && !listing.contains("dirlink"),
        "symlinks are not volumes: {listing}"
    );
    assert!(!std::path::Path::new("/etc/passwd.volstream-tmp").exists());
}
