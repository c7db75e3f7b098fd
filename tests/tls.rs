//! Who may connect, and what they may do: each refusal ends with one clear line at the client
//! and moves nothing; the allowed peers around it still work.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Output;

/// The single line a failed command printed about its transfer (besides the summary).
fn failure_line(out: &Output) -> String {
    let lines: Vec<String> = stderr_lines(out)
        .into_iter()
        .filter(|l| !l.contains("transfers failed"))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    lines[0].clone()
}

/// Downloads `vol` into `dest` with `client_args`; expects a failure whose line says `why`,
/// and that nothing arrived.
fn refused_download(listen: &str, client_args: &[String], vol: &str, dest: &Path, why: &str) {
    let out = run(bin()
        .args(["download", "--connect", listen])
        .args(client_args)
        .arg(vol)
        .arg(dest));
    assert_eq!(out.status.code(), Some(1), "{:?}", stderr_lines(&out));
    let line = failure_line(&out);
    assert!(line.contains(why), "{line:?} should say {why:?}");
    assert!(!dest.exists(), "nothing is written for a refused download");
    assert!(out.stdout.is_empty());
}

fn write_pem(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A client certificate signed by the CA in `pki` that expired years ago.
fn expired_client(pki: &Path) -> Vec<String> {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("cakey.pem")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(pki.join("cacert.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "volstream");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    write_pem(&pki.join("expired.pem"), &cert.pem());
    write_pem(&pki.join("expired-key.pem"), &key.serialize_pem());
    tls_client_args(pki, "expired")
}

#[test]
fn tls_refusals_each_say_why_and_move_nothing() {
    let dir = TempDir::new("tls-refusals");
    let (pki, other_pki, pool, out) = (
        dir.join("pki"),
        dir.join("other-pki"),
        dir.join("pool"),
        dir.join("out"),
    );
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    make_pki(&pki, &["localhost", "127.0.0.1"], &["client", "intruder"]);
    make_pki(&other_pki, &["localhost"], &["client"]);
    sparse_file(&pool.join("v.raw"), 8 * MIB, &[(MIB, MIB)], 7);

    let listen = format!("tls:127.0.0.1:{}", free_tcp_port());
    let mut server_args = tls_server_args(&pki);
    server_args.extend(["--tls-allow-dn".into(), "O=volstream,CN=client".into()]);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let _server = Server::start_with(&pool, &listen, &server_args);

    // The allowed client works, so the refusals below are the refusals' doing.
    let ok = out.join("ok.raw");
    let got = run(bin()
        .args(["download", "--connect", &listen])
        .args(tls_client_args(&pki, "client"))
        .arg("v.raw")
        .arg(&ok));
    assert!(got.status.success(), "{:?}", stderr_lines(&got));
    assert_eq!(read_all(&ok), read_all(&pool.join("v.raw")));

    let ca_only = vec![
        "--tls-ca".to_owned(),
        pki.join("cacert.pem").display().to_string(),
    ];
    refused_download(
        &listen,
        &ca_only,
        "v.raw",
        &out.join("no-cert.raw"),
        "requires a client certificate",
    );
    // A client of another CA: the server does not know its CA (and the client would not trust
    // the server either; the server's verdict arrives first or the client's, both say so).
    let mut foreign = tls_client_args(&other_pki, "client");
    foreign[1] = pki.join("cacert.pem").display().to_string();
    refused_download(
        &listen,
        &foreign,
        "v.raw",
        &out.join("foreign.raw"),
        "does not trust our certificate",
    );
    refused_download(
        &listen,
        &expired_client(&pki),
        "v.raw",
        &out.join("expired.raw"),
        "expired",
    );
    refused_download(
        &listen,
        &tls_client_args(&pki, "intruder"),
        "v.raw",
        &out.join("intruder.raw"),
        "not in the allow list",
    );
    // A plain client against the TLS server.
    refused_download(
        &listen.replace("tls:", "tcp:"),
        &[],
        "v.raw",
        &out.join("plain.raw"),
        "the peer speaks TLS but this connection is plain",
    );
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let dir = TempDir::new("tls-name");
    let (pki, pool, out) = (dir.join("pki"), dir.join("pool"), dir.join("out"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    make_pki(&pki, &["server.invalid"], &["client"]);
    sparse_file(&pool.join("v.raw"), 4 * MIB, &[(0, MIB)], 3);
    let port = free_tcp_port();
    let server_args = tls_server_args(&pki);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let _server = Server::start_with(&pool, &format!("tls:127.0.0.1:{port}"), &server_args);
    refused_download(
        &format!("tls:127.0.0.1:{port}"),
        &tls_client_args(&pki, "client"),
        "v.raw",
        &out.join("v.raw"),
        "not valid for the name we connected to",
    );
}

#[test]
fn a_tls_client_against_a_plain_server_is_told_so() {
    let dir = TempDir::new("tls-vs-plain");
    let (pki, pool, out) = (dir.join("pki"), dir.join("pool"), dir.join("out"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    make_pki(&pki, &["127.0.0.1"], &["client"]);
    sparse_file(&pool.join("v.raw"), 4 * MIB, &[(0, MIB)], 3);
    let port = free_tcp_port();
    let _server = Server::start(&pool, &format!("tcp:127.0.0.1:{port}"));
    refused_download(
        &format!("tls:127.0.0.1:{port}"),
        &tls_client_args(&pki, "client"),
        "v.raw",
        &out.join("v.raw"),
        "does not speak TLS",
    );
}

#[test]
fn serve_refuses_a_public_plain_listener_without_insecure() {
    let dir = TempDir::new("tls-insecure");
    let out = run(bin()
        .args(["serve", "--pool"])
        .arg(&dir.0)
        .args(["--listen", "tcp:0.0.0.0:1"]));
    assert_eq!(out.status.code(), Some(2));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("without TLS") && lines[0].contains("--insecure"));
}

#[test]
fn a_unix_peer_with_a_uid_not_allowed_is_refused() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root to run a client as another uid");
        return;
    }
    let dir = TempDir::new("unix-uid");
    let (pool, out) = (dir.join("pool"), dir.join("out"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    // The unprivileged client must be able to reach the socket and write its destination.
    use std::os::unix::fs::PermissionsExt;
    for d in [&dir.0, &out] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    sparse_file(&pool.join("v.raw"), 4 * MIB, &[(0, MIB)], 5);
    let sock = dir.join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let _server = Server::start_with(&pool, &listen, &["--allow-uid", "0"]);
    // Restrictive by policy, open by mode: the kernel's credentials decide.
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);

    let dest = out.join("nobody.raw");
    let result = run(bin()
        .args(["download", "--connect", &listen, "v.raw"])
        .arg(&dest)
        .uid(65534)
        .gid(65534));
    assert_eq!(result.status.code(), Some(1), "{:?}", stderr_lines(&result));
    let line = failure_line(&result);
    assert!(
        line.contains("uid 65534") && line.contains("may not use this socket"),
        "{line}"
    );
    assert!(!dest.exists());

    let dest = out.join("root.raw");
    let result = run(bin()
        .args(["download", "--connect", &listen, "v.raw"])
        .arg(&dest));
    assert!(result.status.success(), "{:?}", stderr_lines(&result));
    assert_eq!(read_all(&dest), read_all(&pool.join("v.raw")));
}

#[test]
fn unix_sockets_are_created_for_the_owner_only_without_a_policy() {
    let dir = TempDir::new("unix-mode");
    let sock = dir.join("s.sock");
    let _server = Server::start(&dir.0, &format!("unix:{}", sock.display()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn the_provider_refuses_writes_for_one_identity_and_allows_its_reads() {
    let dir = TempDir::new("tls-writers");
    let (pki, pool, out) = (dir.join("pki"), dir.join("pool"), dir.join("out"));
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    make_pki(&pki, &["127.0.0.1"], &["reader", "writer"]);
    sparse_file(&pool.join("v.raw"), 6 * MIB, &[(MIB, 2 * MIB)], 9);
    let listen = format!("tls:127.0.0.1:{}", free_tcp_port());
    let mut server_args = tls_server_args(&pki);
    server_args.extend(["--allow-write".into(), "O=volstream,CN=writer".into()]);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let _server = Server::start_with(&pool, &listen, &server_args);

    let reader = tls_client_args(&pki, "reader");
    let got = out.join("v.raw");
    let result = run(bin()
        .args(["download", "--connect", &listen])
        .args(&reader)
        .arg("v.raw")
        .arg(&got));
    assert!(result.status.success(), "{:?}", stderr_lines(&result));
    assert_eq!(read_all(&got), read_all(&pool.join("v.raw")));

    let result = run(bin()
        .args(["upload", "--connect", &listen])
        .args(&reader)
        .arg(&got)
        .arg("from-reader.raw"));
    assert_eq!(result.status.code(), Some(1));
    let line = failure_line(&result);
    assert!(
        line.contains("permission denied") && line.contains("CN=reader may not write"),
        "{line}"
    );
    assert!(!pool.join("from-reader.raw").exists());
    assert!(
        temporaries(&pool).is_empty(),
        "no temporary left: {:?}",
        temporaries(&pool)
    );

    let result = run(bin()
        .args(["upload", "--connect", &listen])
        .args(tls_client_args(&pki, "writer"))
        .arg(&got)
        .arg("from-writer.raw"));
    assert!(result.status.success(), "{:?}", stderr_lines(&result));
    assert_eq!(read_all(&pool.join("from-writer.raw")), read_all(&got));
}
