//! The codec against NBD implementations nobody here wrote: nbdkit and qemu-nbd as servers for
//! our client; nbdinfo, qemu-img, qemu-io and nbdcopy as clients of our server (served from a
//! thread of this test over a Unix socket). Skips with a reason where a tool is missing.

mod common;

use bytes::{Bytes, BytesMut};
use common::MemDisk;
use nbd::wire::*;
use nbd::{
    Client, ClientHandshake, ClientOptions, Command, Export, HandshakeEvent, Reply, Request,
    Server, ServerHandshake,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    let ok = Proc::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nbd-peers-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Reaper(Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a server accepts connections on `path` (the file appears at bind, before
/// listen).
fn wait_for(path: &Path) {
    let t = Instant::now();
    while UnixStream::connect(path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking client over a Unix socket, for these tests only.
struct Conn {
    sock: UnixStream,
    input: BytesMut,
    client: Client,
}

impl Conn {
    fn open(path: &Path, export: &str, contexts: &[&str]) -> Conn {
        let mut sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut hs = ClientHandshake::new(ClientOptions {
            export: export.into(),
            contexts: contexts.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap();
        let mut input = BytesMut::new();
        let export = loop {
            if let Some(e) = hs.handle_input(&mut input).unwrap() {
                break e;
            }
            while let Some(b) = hs.poll_transmit() {
                sock.write_all(&b).unwrap();
            }
            read_some(&mut sock, &mut input);
        };
        Conn {
            sock,
            input,
            client: Client::new(export, 8),
        }
    }

    fn export(&self) -> &Export {
        self.client.export()
    }

    /// Sends `cmd` and collects every reply piece up to its Done.
    fn call(&mut self, cmd: Command) -> Vec<Reply> {
        let cookie = self.client.send(cmd).unwrap();
        while let Some(b) = self.client.poll_transmit() {
            self.sock.write_all(&b).unwrap();
        }
        let mut out = Vec::new();
        loop {
            while let Some(r) = self.client.decode(&mut self.input).unwrap() {
                let done = matches!(&r, Reply::Done { cookie: c, .. } if *c == cookie);
                out.push(r);
                if done {
                    return out;
                }
            }
            read_some(&mut self.sock, &mut self.input);
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let mut buf = vec![0xAAu8; len as usize];
        for r in self.call(Command::Read { offset, len }) {
            match r {
                Reply::Data {
                    offset: o, bytes, ..
                } => {
                    let at = (o - offset) as usize;
                    buf[at..at + bytes.len()].copy_from_slice(&bytes);
                }
                Reply::Hole {
                    offset: o, len: l, ..
                } => {
                    let at = (o - offset) as usize;
                    buf[at..at + l as usize].fill(0);
                }
                Reply::Done { result, .. } => result.unwrap(),
                r => panic!("{r:?}"),
            }
        }
        buf
    }

    fn ok(&mut self, cmd: Command) -> Result<(), nbd::CommandError> {
        match self.call(cmd).pop() {
            Some(Reply::Done { result, .. }) => result,
            r => panic!("{r:?}"),
        }
    }

    /// Block status over `[offset, offset+len)`: per context, (start, len, flags).
    fn status(&mut self, offset: u64, len: u32) -> HashMap<u32, Vec<(u64, u32, u32)>> {
        let mut map = HashMap::new();
        for r in self.call(Command::BlockStatus {
            offset,
            len,
            req_one: false,
        }) {
            match r {
                Reply::BlockStatus {
                    context,
                    offset,
                    extents,
                    ..
                } => {
                    let mut at = offset;
                    let v: Vec<_> = extents
                        .iter()
                        .map(|d| {
                            let e = (at, d.len, d.flags);
                            at += d.len as u64;
                            e
                        })
                        .collect();
                    map.insert(context, v);
                }
                Reply::Done { result, .. } => result.unwrap(),
                r => panic!("{r:?}"),
            }
        }
        map
    }
}

fn read_some(sock: &mut UnixStream, input: &mut BytesMut) {
    let mut buf = [0u8; 256 * 1024];
    let n = sock.read(&mut buf).unwrap();
    assert!(n > 0, "server closed the connection");
    input.extend_from_slice(&buf[..n]);
}

#[test]
fn nbdkit_memory_as_server() {
    if !have("nbdkit") {
        return;
    }
    let dir = tmp("nbdkit");
    let sock = dir.join("s");
    let _kit = Reaper(
        Proc::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "8M"])
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let mut c = Conn::open(
        &sock,
        "",
        &[CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH],
    );
    let e = c.export().clone();
    assert_eq!(e.size, 8 << 20);
    assert!(e.structured && e.can_write_zeroes() && !e.read_only());
    // nbdkit knows base:allocation, not qemu's depth.
    assert!(e.context(CONTEXT_BASE_ALLOCATION).is_some());
    assert_eq!(e.context(CONTEXT_ALLOCATION_DEPTH), None);
    let base = e.context(CONTEXT_BASE_ALLOCATION).unwrap();

    let data = Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    c.ok(Command::Write {
        offset: 1 << 20,
        data: data.clone(),
        fua: false,
    })
    .unwrap();
    assert_eq!(c.read(1 << 20, data.len() as u32), data.to_vec());
    assert!(c.read(4 << 20, 1 << 20).iter().all(|&b| b == 0));
    let st = c.status(0, 8 << 20);
    let ext = &st[&base];
    assert_eq!(ext[0].2, STATE_HOLE | STATE_ZERO);
    assert!(
        ext.iter().any(|&(s, _, f)| s <= 1 << 20 && f == 0),
        "{ext:?}"
    );
    assert_eq!(ext.iter().map(|e| e.1 as u64).sum::<u64>(), 8 << 20);
    c.ok(Command::WriteZeroes {
        offset: 1 << 20,
        len: 4096,
        no_hole: false,
        fast: false,
    })
    .unwrap();
    assert!(c.read(1 << 20, 4096).iter().all(|&b| b == 0));
    if e.can_flush() {
        c.ok(Command::Flush).unwrap();
    }
    c.client.disconnect();
    while let Some(b) = c.client.poll_transmit() {
        c.sock.write_all(&b).unwrap();
    }
}

#[test]
fn nbdkit_error_filter_gives_command_errors() {
    if !have("nbdkit") {
        return;
    }
    let dir = tmp("nbdkit-err");
    let sock = dir.join("s");
    let _kit = Reaper(
        Proc::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args([
                "--filter=error",
                "pattern",
                "4M",
                "error-pread=EIO",
                "error-pread-rate=1",
            ])
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let mut c = Conn::open(&sock, "", &[]);
    let r = c.call(Command::Read {
        offset: 0,
        len: 4096,
    });
    match r.last() {
        Some(Reply::Done { result: Err(e), .. }) => assert_eq!(e.errno, EIO),
        r => panic!("{r:?}"),
    }
    // The connection survives a failed command.
    assert!(c.client.can_send());
}

#[test]
fn qemu_nbd_reports_allocation_depth() {
    if !have("qemu-nbd") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tmp("qemu");
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    let run = |args: &[&str]| {
        let st = Proc::new(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        "4M",
    ]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x11 0 64k",
        base.to_str().unwrap(),
    ]);
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x22 1M 64k",
        top.to_str().unwrap(),
    ]);
    let sock = dir.join("s");
    let _q = Reaper(
        Proc::new("qemu-nbd")
            .args(["-r", "-A", "-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(&top)
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let mut c = Conn::open(
        &sock,
        "",
        &[CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH],
    );
    let e = c.export().clone();
    assert!(e.read_only());
    let depth = e.context(CONTEXT_ALLOCATION_DEPTH).expect("depth context");
    let st = c.status(0, 4 << 20);
    let d = &st[&depth];
    // Backing data at depth 2, the top's own at depth 1, the rest nowhere (0).
    assert_eq!(d[0], (0, 65536, 2), "{d:?}");
    assert!(d.contains(&(1 << 20, 65536, 1)), "{d:?}");
    assert!(d.iter().any(|&(_, _, f)| f == 0), "{d:?}");
    assert_eq!(c.read(0, 4)[..], [0x11; 4]);
    assert_eq!(c.read(1 << 20, 4)[..], [0x22; 4]);
    assert!(c
        .client
        .send(Command::Write {
            offset: 0,
            data: Bytes::from_static(b"x"),
            fua: false
        })
        .is_err());
}

/// Serves `disk` on a Unix socket, one thread per connection, until the test ends.
fn serve(path: &Path, disk: Arc<Mutex<MemDisk>>, writable: bool) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let _ = serve_one(conn, disk, writable);
            });
        }
    });
}

fn serve_one(
    mut sock: UnixStream,
    disk: Arc<Mutex<MemDisk>>,
    writable: bool,
) -> Result<(), String> {
    let mut hs = ServerHandshake::new();
    let mut input = BytesMut::new();
    let info = disk.lock().unwrap().info(!writable);
    let flush = |hs: &mut ServerHandshake, sock: &mut UnixStream| {
        while let Some(b) = hs.poll_transmit() {
            sock.write_all(&b).map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    let export = 'hs: loop {
        flush(&mut hs, &mut sock)?;
        loop {
            match hs.handle_input(&mut input) {
                Ok(Some(HandshakeEvent::Lookup { .. })) => {
                    if let Some(HandshakeEvent::Ready(e)) =
                        hs.answer(Ok(info.clone())).map_err(|e| e.to_string())?
                    {
                        flush(&mut hs, &mut sock)?;
                        break 'hs e;
                    }
                }
                Ok(Some(HandshakeEvent::List)) => {
                    hs.answer_list(&["".into()]).map_err(|e| e.to_string())?
                }
                Ok(Some(HandshakeEvent::Ready(e))) => break 'hs e,
                Ok(None) => break,
                Err(e) => {
                    let _ = flush(&mut hs, &mut sock);
                    return Err(e.to_string());
                }
            }
        }
        flush(&mut hs, &mut sock)?;
        let mut buf = [0u8; 65536];
        let n = sock.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        input.extend_from_slice(&buf[..n]);
    };
    let mut server = Server::new(export, 16);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        while let Some(req) = server.decode(&mut input).map_err(|e| e.to_string())? {
            let mut d = disk.lock().unwrap();
            match req {
                Request::Read {
                    cookie,
                    offset,
                    len,
                } => {
                    let mut pos = offset;
                    let end = offset + len as u64;
                    while pos < end {
                        let next = ((pos / 4096 + 1) * 4096).min(end);
                        if d.hole[(pos / 4096) as usize] {
                            server.reply_hole(cookie, pos, (next - pos) as u32).unwrap();
                        } else {
                            let b = Bytes::copy_from_slice(&d.data[pos as usize..next as usize]);
                            server.reply_data(cookie, pos, b).unwrap();
                        }
                        pos = next;
                    }
                    server.reply_done(cookie).unwrap();
                }
                Request::Write {
                    cookie,
                    offset,
                    data,
                    ..
                } => {
                    let o = offset as usize;
                    d.data[o..o + data.len()].copy_from_slice(&data);
                    for b in offset / 4096..=(offset + data.len() as u64 - 1) / 4096 {
                        d.hole[b as usize] = false;
                    }
                    server.reply_done(cookie).unwrap();
                }
                Request::WriteZeroes {
                    cookie,
                    offset,
                    len,
                    fast,
                    ..
                } => {
                    if fast {
                        server.reply_error(cookie, ENOTSUP, "").unwrap();
                    } else {
                        d.data[offset as usize..(offset + len as u64) as usize].fill(0);
                        server.reply_done(cookie).unwrap();
                    }
                }
                Request::BlockStatus {
                    cookie,
                    offset,
                    len,
                    req_one,
                } => {
                    let mut ext = d.extents(offset, len as u64);
                    if req_one {
                        ext.truncate(1);
                    }
                    server.reply_block_status(cookie, 1, &ext).unwrap();
                    server.reply_done(cookie).unwrap();
                }
                Request::Trim { cookie, .. } | Request::Flush { cookie } => {
                    server.reply_done(cookie).unwrap()
                }
                Request::Disconnect => {}
            }
        }
        while let Some(b) = server.poll_transmit() {
            sock.write_all(&b).map_err(|e| e.to_string())?;
        }
        if server.is_disconnected() {
            return Ok(());
        }
        let n = sock.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        input.extend_from_slice(&buf[..n]);
    }
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

#[test]
fn nbdinfo_maps_our_server() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tmp("nbdinfo");
    let sock = dir.join("s");
    let disk = MemDisk::new(1 << 20, &[0, 1, 10, 200], 5);
    serve(&sock, Arc::new(Mutex::new(disk)), false);
    let out = Proc::new("nbdinfo")
        .args(["--map", &uri(&sock)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want = [
        ("0", "8192", "0"),
        ("8192", "32768", "3"),
        ("40960", "4096", "0"),
        ("45056", "774144", "3"),
        ("819200", "4096", "0"),
        ("823296", "225280", "3"),
    ];
    assert_eq!(rows.len(), want.len(), "{text}");
    for (r, w) in rows.iter().zip(want) {
        assert_eq!((r[0], r[1], r[2]), w, "{text}");
    }
    let out = Proc::new("nbdinfo").arg(uri(&sock)).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("export-size: 1048576"), "{text}");
    assert!(text.contains("is_read_only: true"), "{text}");
    assert!(text.contains("base:allocation"), "{text}");
}

#[test]
fn qemu_img_and_qemu_io_read_and_write_our_server() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tmp("qemu-client");
    let sock = dir.join("s");
    let disk = Arc::new(Mutex::new(MemDisk::new(2 << 20, &[0, 7, 300], 11)));
    serve(&sock, Arc::clone(&disk), true);
    let out_file = dir.join("out.raw");
    let st = Proc::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri(&sock)])
        .arg(&out_file)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(&out_file).unwrap(), disk.lock().unwrap().data);
    let st = Proc::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 65536 8192", &uri(&sock)])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(disk.lock().unwrap().data[65536..65536 + 8192]
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn nbdcopy_writes_into_our_server() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tmp("nbdcopy");
    let sock = dir.join("s");
    let disk = Arc::new(Mutex::new(MemDisk::new(4 << 20, &[], 1)));
    serve(&sock, Arc::clone(&disk), true);
    let src = dir.join("src.raw");
    let mut content = vec![0u8; 4 << 20];
    for (i, b) in content.iter_mut().enumerate().skip(1 << 20).take(100_000) {
        *b = (i % 253) as u8 + 1;
    }
    std::fs::write(&src, &content).unwrap();
    let out = Proc::new("nbdcopy")
        .arg(&src)
        .arg(uri(&sock))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(disk.lock().unwrap().data, content);
}
