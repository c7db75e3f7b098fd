//! Two hosts in miniature: network namespaces joined by a veth pair, made by this test. The
//! server runs in one, the clients in the other, and every byte crosses the veth over TLS.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Addresses from the benchmarking range (RFC 2544), only ever inside these namespaces.
const SERVER_IP: &str = "198.18.0.1";
const CLIENT_IP: &str = "198.18.0.2";

/// Two namespaces and the veth between them; removed on drop, whatever happened.
struct Hosts {
    server: String,
    client: String,
    server_if: String,
    client_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    fn create() -> Result<Hosts, String> {
        let pid = std::process::id();
        let hosts = Hosts {
            server: format!("vs-{pid}-srv"),
            client: format!("vs-{pid}-cli"),
            server_if: format!("vs{pid}s"),
            client_if: format!("vs{pid}c"),
        };
        // From here on, Drop cleans up whatever part was made.
        ip(&["netns", "add", &hosts.server])?;
        ip(&["netns", "add", &hosts.client])?;
        ip(&[
            "link",
            "add",
            &hosts.server_if,
            "netns",
            &hosts.server,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.client_if,
            "netns",
            &hosts.client,
        ])?;
        for (ns, dev, addr) in [
            (&hosts.server, &hosts.server_if, SERVER_IP),
            (&hosts.client, &hosts.client_if, CLIENT_IP),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// A command run inside namespace `ns`.
    fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program])
            .env_remove("VOLSTREAM_ADDR")
            .env("RUST_LOG", "warn");
        c
    }

    /// A counter of a namespace's interface, from its own sysfs view.
    fn counter(ns: &str, dev: &str, name: &str) -> u64 {
        let out = Hosts::exec(ns, "cat")
            .arg(format!("/sys/class/net/{dev}/statistics/{name}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        let _ = ip(&["netns", "del", &self.server]);
        let _ = ip(&["netns", "del", &self.client]);
    }
}

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        kill(self.0.id(), 15);
        let _ = self.0.wait();
    }
}

fn volstream() -> &'static str {
    env!("CARGO_BIN_EXE_volstream")
}

fn tls_args(cmd: &mut Command, args: Vec<String>) -> &mut Command {
    cmd.args(args)
}

#[test]
fn many_volumes_cross_a_veth_between_namespaces_over_tls() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: network namespaces need root");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipping: the ip command (iproute2) is not installed");
        return;
    }
    let hosts = match Hosts::create() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("skipping: cannot create network namespaces: {e}");
            return;
        }
    };
    let dir = TempDir::new("netns");
    let (pki, pool, local) = (dir.join("pki"), dir.join("pool"), dir.join("local"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    // The README's cross-host example, command for command.
    make_pki(&pki, &[SERVER_IP, "vmhost.example"], &["backup"]);

    // 16 volumes to download and 16 to upload, sparse with data at both ends and in between.
    let (mut down_bytes, mut up_bytes) = (0, 0);
    let make = |dir: &Path, name: &str, i: u64| -> u64 {
        let size = 24 * MIB + i * 4096 + 17;
        let data = [
            (0, 256 * 1024),
            (6 * MIB + i * 8192, MIB + i * 512),
            (size - 3000, 3000),
        ];
        sparse_file(&dir.join(name), size, &data, 100 + i);
        data.iter().map(|d| d.1).sum()
    };
    for i in 0..16 {
        down_bytes += make(&pool, &format!("down{i}.raw"), i);
        up_bytes += make(&local, &format!("up{i}.raw"), i + 50);
    }

    let listen = format!("tls:{SERVER_IP}:7700");
    let server = Hosts::exec(&hosts.server, volstream())
        .args(["serve", "--pool"])
        .arg(&pool)
        .args(["--listen", &listen])
        .args(tls_server_args(&pki))
        .args(["--tls-allow-dn", "O=volstream,CN=backup"])
        .args(["--allow-write", "O=volstream,CN=backup"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Served(server);

    // The server is up once the client's namespace can list it.
    let client_args = tls_client_args(&pki, "backup");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = tls_args(
            Hosts::exec(&hosts.client, volstream()).args(["list", "--connect", &listen]),
            client_args.clone(),
        )
        .output()
        .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not come up: {:?}",
            stderr_lines(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rx_before = Hosts::counter(&hosts.client, &hosts.client_if, "rx_bytes");
    let tx_before = Hosts::counter(&hosts.client, &hosts.client_if, "tx_bytes");

    let mut download = Hosts::exec(&hosts.client, volstream());
    download.args(["download", "--connect", &listen]);
    tls_args(&mut download, client_args.clone());
    for i in 0..16 {
        download
            .arg(format!("down{i}.raw"))
            .arg(local.join(format!("down{i}.raw")));
    }
    let mut upload = Hosts::exec(&hosts.client, volstream());
    upload.args(["upload", "--connect", &listen]);
    tls_args(&mut upload, client_args.clone());
    for i in 0..16 {
        upload
            .arg(local.join(format!("up{i}.raw")))
            .arg(format!("up{i}.raw"));
    }
    // Both directions at once, over two connections.
    let (down, up) = (download.spawn().unwrap(), upload.spawn().unwrap());
    let (down, up) = (
        down.wait_with_output().unwrap(),
        up.wait_with_output().unwrap(),
    );
    assert!(down.status.success(), "download: {:?}", stderr_lines(&down));
    assert!(up.status.success(), "upload: {:?}", stderr_lines(&up));

    for i in 0..16 {
        for (src, dst) in [
            (
                pool.join(format!("down{i}.raw")),
                local.join(format!("down{i}.raw")),
            ),
            (
                local.join(format!("up{i}.raw")),
                pool.join(format!("up{i}.raw")),
            ),
        ] {
            assert_eq!(read_all(&src), read_all(&dst), "{}", dst.display());
            // Holes stayed holes: the copy allocates about what the original does.
            assert!(
                allocated(&dst) <= allocated(&src) + 16 * 4096,
                "{} is sparse",
                dst.display()
            );
        }
    }
    // Every byte went over the veth, in both directions, with TLS's overhead and little more.
    let rx = Hosts::counter(&hosts.client, &hosts.client_if, "rx_bytes") - rx_before;
    let tx = Hosts::counter(&hosts.client, &hosts.client_if, "tx_bytes") - tx_before;
    assert!(
        rx >= down_bytes && tx >= up_bytes,
        "veth carried rx {rx} tx {tx} for {down_bytes} down, {up_bytes} up"
    );
    assert!(
        rx < down_bytes * 2 && tx < up_bytes * 2,
        "veth carried rx {rx} tx {tx} for {down_bytes} down, {up_bytes} up: holes as data?"
    );
}
