//! `--iohelper` and `--direct` on serve, download and upload: the real binaries, with each
//! volume's I/O in a volstream-iohelper process on both sides.

mod common;

use common::*;

#[test]
fn serve_download_upload_through_helpers() {
    let helper =
        std::path::Path::new(env!("CARGO_BIN_EXE_volstream")).with_file_name("volstream-iohelper");
    if !helper.exists() {
        eprintln!(
            "SKIP: {} is not built (run the workspace's tests)",
            helper.display()
        );
        return;
    }
    let dir = TempDir::new("iohelper-cli");
    let pool = dir.join("pool");
    let local = dir.join("local");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    let size = 24 * MIB + 4097;
    let data = vec![(0, MIB), (8 * MIB, 3 * MIB), (size - 5000, 5000)];
    sparse_file(&pool.join("a"), size, &data, 1);
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start_with(&pool, &listen, &["--iohelper", "--direct"]);

    for extra in [&["--iohelper"][..], &["--iohelper", "--direct"][..]] {
        let out_file = local.join(format!("a{}", extra.len()));
        let out = run(bin()
            .args(["download", "--connect", &listen])
            .args(extra)
            .arg("a")
            .arg(&out_file));
        assert!(out.status.success(), "{:?}", stderr_lines(&out));
        assert_eq!(read_all(&out_file), read_all(&pool.join("a")));
        let data_bytes: u64 = data.iter().map(|d| d.1).sum();
        assert!(allocated(&out_file) <= data_bytes + 4 * 4096 * data.len() as u64);

        let name = format!("up{}", extra.len());
        let out = run(bin()
            .args(["upload", "--connect", &listen])
            .args(extra)
            .arg(&out_file)
            .arg(&name));
        assert!(out.status.success(), "{:?}", stderr_lines(&out));
        assert_eq!(read_all(&pool.join(&name)), read_all(&pool.join("a")));
    }
}
