//! `--verify` reads the destination back after the last write (a download's on the client, an
//! upload's on the server): a device full of 0xAA wrongly said to read as zero
//! (`--destination-is-zero`) passes the stream's digest, since its holes are never written, but
//! fails verification at the first byte of garbage; onto a device that does read as zero, and
//! onto a sparse file, it passes.

mod common;

use common::*;

#[test]
fn verify_finds_garbage_where_the_destination_was_said_to_be_zero() {
    let dir = TempDir::new("verify");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let size = 16 * MIB;
    // Data, then a hole from 1 MiB + 4 KiB, data again at 8 MiB, a hole to the end. The
    // first garbage is in a region that also holds data, which is located to its MiB.
    let data = [(0, MIB + 4096), (8 * MIB, MIB)];
    sparse_file(&pool.join("vol"), size, &data, 5);
    let backing = dir.join("dev");
    filled(&backing, size, 0xAA);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);
    let download = |extra: &[&str], to: &str| {
        run(bin()
            .args(["download", "--overwrite", "--connect", &listen])
            .args(extra)
            .arg("vol")
            .arg(to))
    };

    // What the issue saw: success, with 0xAA left in every hole.
    let out = download(&["--destination-is-zero"], dev.arg());
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_ne!(read_all(&dev.path), read_all(&pool.join("vol")));

    let out = download(&["--destination-is-zero", "--verify"], dev.arg());
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = line_with(&out, "differs from the source");
    assert!(line.contains("in the MiB at byte 1048576"), "{line}");

    // Zeroed, the same device is what --destination-is-zero says: verified.
    filled(&dev.path, size, 0);
    let out = download(&["--destination-is-zero", "--verify"], dev.arg());
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(read_all(&dev.path), read_all(&pool.join("vol")));

    // A new sparse file: holes read back by its map.
    let file = dir.join("copy");
    let out = download(&["--verify"], file.to_str().unwrap());
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_same_sparse(&pool.join("vol"), &file);
    assert_eq!(data_extents(&file).len(), 2);

    // And through the helper, which writes and reads back in its own process.
    if iohelper_built() {
        filled(&dev.path, size, 0xAA);
        let out = download(
            &["--destination-is-zero", "--verify", "--iohelper"],
            dev.arg(),
        );
        assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
        let line = line_with(&out, "differs from the source");
        assert!(line.contains("in the MiB at byte 1048576"), "{line}");
    }
}

/// `upload --verify`: the server's sink reads the volume back the same way. Onto a served
/// device full of 0xAA that the client says reads as zero, the upload fails at the first byte
/// of garbage (in process and with the server's --iohelper); zeroed, and into the pool as a
/// new sparse file, it passes.
#[test]
fn upload_verify_finds_garbage_where_the_served_device_was_said_to_be_zero() {
    let dir = TempDir::new("verify-up");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let size = 16 * MIB;
    let data = [(0, MIB + 4096), (8 * MIB, MIB)];
    let source = dir.join("source");
    sparse_file(&source, size, &data, 7);
    let backing = dir.join("dev");
    filled(&backing, size, 0xAA);
    let Some(dev) = LoopDev::attach(&backing) else {
        return;
    };
    let device = format!("disk={}", dev.arg());
    let upload = |listen: &str, extra: &[&str], volume: &str| {
        run(bin()
            .args(["upload", "--overwrite", "--connect", listen])
            .args(extra)
            .arg(&source)
            .arg(volume))
    };
    let mut servers = vec![("in process", vec!["--device", device.as_str()])];
    if iohelper_built() {
        servers.push((
            "--iohelper",
            vec!["--device", device.as_str(), "--iohelper"],
        ));
    }
    for (i, (how, args)) in servers.iter().enumerate() {
        let listen = format!("unix:{}", dir.join(&format!("s{i}.sock")).display());
        let _server = Server::start_with(&pool, &listen, args);
        filled(&dev.path, size, 0xAA);

        // Unverified, the lie passes: success, with 0xAA left in every hole.
        let out = upload(&listen, &["--destination-is-zero"], "disk");
        assert!(out.status.success(), "{how}: {:?}", stderr_lines(&out));
        assert_ne!(read_all(&dev.path), read_all(&source), "{how}");

        let out = upload(&listen, &["--destination-is-zero", "--verify"], "disk");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{how}: {:?}",
            stderr_lines(&out)
        );
        let line = line_with(&out, "differs from the source");
        assert!(line.contains("in the MiB at byte 1048576"), "{how}: {line}");

        filled(&dev.path, size, 0);
        let out = upload(&listen, &["--destination-is-zero", "--verify"], "disk");
        assert!(out.status.success(), "{how}: {:?}", stderr_lines(&out));
        assert_eq!(read_all(&dev.path), read_all(&source), "{how}");

        // A new file in the pool: its holes read back by its map.
        let name = format!("copy{i}");
        let out = upload(&listen, &["--verify"], &name);
        assert!(out.status.success(), "{how}: {:?}", stderr_lines(&out));
        assert_same_sparse(&source, &pool.join(&name));
        assert_eq!(data_extents(&pool.join(&name)).len(), 2, "{how}");
    }
}
