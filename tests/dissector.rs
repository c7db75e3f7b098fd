//! The Wireshark dissector (tools/wireshark/volstream.lua) against the real tshark: a transfer
//! over loopback TCP is captured with tcpdump, and tshark's view of it must agree with the
//! engine's own counters, the sources' holes and docs/PROTOCOL.md.

mod common;

use common::{sparse_file, TempDir, MIB};
use engine::proto::{FrameCounts, Op, OpenOptions, Reason};
use engine::synthetic::Synthetic;
use engine::MemoryWriter;
use engine::{Address, ConnectionId, Engine, EngineConfig, EngineHandle, TransferReport};
use fdstream::{DirProvider, FileReader, FileWriter, ReaderOptions, WriterOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LUA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/wireshark/volstream.lua");
const PROTOCOL_MD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn tshark(args: &[&str]) -> String {
    let out = Command::new("tshark")
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .expect("run tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tshark {args:?} failed: {stderr}");
    // A script that does not load fails only on stderr (errors while dissecting show up as
    // expert info, checked by the callers).
    assert!(
        !stderr.contains("Lua") && !stderr.contains("lua"),
        "the dissector did not load: {stderr}"
    );
    String::from_utf8(out.stdout).expect("tshark prints UTF-8")
}

/// tcpdump writing the loopback traffic of one port to a file.
struct Capture {
    child: Child,
    path: PathBuf,
}

impl Capture {
    /// `None` (the reason printed) when capturing is impossible here.
    fn start(path: &Path, port: u16) -> Option<Capture> {
        if !have("tcpdump") {
            eprintln!("skipping: tcpdump is not installed");
            return None;
        }
        // A large kernel buffer and immediate delivery: loopback moves GB/s and every packet
        // must reach the file for the counts to agree.
        let mut child = Command::new("tcpdump")
            .args([
                "-i",
                "lo",
                "-U",
                "--immediate-mode",
                "-B",
                "131072",
                "-s",
                "0",
            ])
            .arg("-w")
            .arg(path)
            .arg(format!("tcp port {port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                eprintln!("skipping: tcpdump cannot capture on lo (not root?)");
                return None;
            }
            if line.contains("listening on") {
                break;
            }
        }
        // The summary tcpdump prints at exit is read by `stop`.
        child.stderr = Some(stderr.into_inner());
        Some(Capture {
            child,
            path: path.to_owned(),
        })
    }

    /// Waits until the file holds `payload` bytes of TCP payload, then stops tcpdump and checks
    /// that the kernel dropped nothing.
    fn stop_after(mut self, payload: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while Instant::now() < deadline {
            seen = captured_payload(&self.path);
            if seen >= payload {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let mut summary = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut summary)
            .unwrap();
        self.child.wait().unwrap();
        assert_eq!(
            seen, payload,
            "captured TCP payload bytes; tcpdump: {summary}"
        );
        assert!(
            summary.lines().any(|l| l == "0 packets dropped by kernel"),
            "the capture lost packets: {summary}"
        );
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bytes of TCP payload in a pcap file that may still be growing (plain tshark, no dissector):
/// per connection and direction the highest sequence number reached, so a segment the kernel
/// retransmitted (it happens on loopback when a receive window fills) counts once.
fn captured_payload(path: &Path) -> u64 {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(path)
        .args([
            "-n",
            "-T",
            "fields",
            "-e",
            "tcp.stream",
            "-e",
            "tcp.srcport",
        ])
        .args(["-e", "tcp.seq", "-e", "tcp.len"])
        .stderr(Stdio::null())
        .output()
        .expect("run tshark");
    let mut ends: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Vec<u64> = line.split('\t').filter_map(|c| c.parse().ok()).collect();
        // Only segments with payload: a FIN takes a sequence number too.
        if let [stream, port, seq, len] = v[..] {
            if len == 0 {
                continue;
            }
            let end = ends.entry((stream, port)).or_default();
            *end = (*end).max(seq + len);
        }
    }
    // Relative sequence numbers: the first payload byte is 1.
    ends.values().map(|end| end.saturating_sub(1)).sum()
}

/// A volstream Hello as the engine's defaults would announce it, for the raw-socket peers.
fn hello() -> Vec<u8> {
    let mut h = b"VOLSTRM\n".to_vec();
    for v in [1u16, 1] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    for v in [3u32, 1 << 20, 1 << 20, 1 << 24, 16] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h
}

fn header(len: u32, kind: u8, flags: u8, reserved: u16, stream: u32) -> Vec<u8> {
    let mut h = len.to_be_bytes().to_vec();
    h.push(kind);
    h.push(flags);
    h.extend_from_slice(&reserved.to_be_bytes());
    h.extend_from_slice(&stream.to_be_bytes());
    h
}

/// Speaks to the server over a raw socket: the Hello (in two writes, so it may arrive split),
/// then `frames` in one write. Returns the bytes that crossed the wire both ways.
fn raw_peer(addr: &Address, frames: &[u8]) -> u64 {
    let Address::Tcp(addr) = addr else {
        unreachable!()
    };
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let h = hello();
    s.write_all(&h[..5]).unwrap();
    s.write_all(&h[5..]).unwrap();
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs).unwrap();
    s.write_all(frames).unwrap();
    // The server answers a violation with GOAWAY and closes.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(!rest.is_empty(), "the server sent no GOAWAY");
    (h.len() + theirs.len() + frames.len() + rest.len()) as u64
}

/// Holes of a file made by `sparse_file` from its data extents.
fn holes_of(size: u64, data: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut holes = Vec::new();
    let mut at = 0;
    for &(offset, len) in data {
        if offset > at {
            holes.push((at, offset - at));
        }
        at = offset + len;
    }
    if at < size {
        holes.push((at, size - at));
    }
    holes
}

/// Adjacent ranges joined, so a hole sent as several HOLE frames compares as one.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += len,
            _ => out.push((offset, len)),
        }
    }
    out
}

fn report(rx: Receiver<TransferReport>) -> TransferReport {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("transfer report")
}

/// Waits until `conn` has had its PING answered: afterwards everything either side sent
/// before it has been received. (A PONG more than before, not a round trip: the connection
/// measured one at its handshake already.)
fn quiesce(client: &EngineHandle, conn: ConnectionId) -> engine::proto::ConnStats {
    let pongs = |s: &engine::proto::ConnStats| s.frames_in.get("PONG").unwrap();
    let before = pongs(&client.stats(conn).unwrap().expect("connection is open"));
    client.ping(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = client.stats(conn).unwrap().expect("connection is open");
        if pongs(&stats) > before {
            return stats;
        }
        assert!(Instant::now() < deadline, "no PONG: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One tshark output row of `-T fields`: each field's occurrences.
struct Row {
    stream: u32,
    src_port: u16,
    fields: Vec<Vec<String>>,
}

fn rows(out: &str) -> Vec<Row> {
    out.lines()
        .map(|line| {
            let mut cols = line.split('\t');
            let stream = cols.next().unwrap().parse().unwrap();
            let src_port = cols.next().unwrap().parse().unwrap();
            let fields = cols
                .map(|c| {
                    c.split(';')
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .collect();
            Row {
                stream,
                src_port,
                fields,
            }
        })
        .collect()
}

/// Frames of each type (by name) per direction (true: from the server) of tcp.stream 0.
fn type_counts(rows: &[Row], server_port: u16) -> BTreeMap<(bool, String), u64> {
    let mut counts = BTreeMap::new();
    for row in rows.iter().filter(|r| r.stream == 0) {
        for kind in &row.fields[0] {
            let code: usize = kind.parse().unwrap();
            let name = match code.checked_sub(1).and_then(|i| FrameCounts::NAMES.get(i)) {
                Some(name) => name.to_string(),
                None => format!("type {code}"),
            };
            *counts
                .entry((row.src_port == server_port, name))
                .or_insert(0) += 1;
        }
    }
    counts
}

fn engine_counts(stats: &engine::proto::ConnStats) -> BTreeMap<(bool, String), u64> {
    let mut counts = BTreeMap::new();
    for (from_server, frames) in [(false, stats.frames_out), (true, stats.frames_in)] {
        for (name, n) in frames.iter().filter(|(_, n)| *n > 0) {
            counts.insert((from_server, name.to_owned()), n);
        }
    }
    counts
}

#[test]
fn tshark_sees_what_the_engine_counted() {
    if !have("tshark") {
        eprintln!("skipping: tshark is not installed");
        return;
    }
    let dir = TempDir::new("dissector");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    // Holes at the start, between extents and at the end; extents 64 KiB-aligned so every file
    // system keeps them exactly.
    let disk_data = [(MIB, 256 << 10), (3 * MIB, 64 << 10), (5 * MIB, MIB)];
    sparse_file(&pool.join("disk.raw"), 8 * MIB, &disk_data, 1);
    sparse_file(&pool.join("dense.raw"), MIB, &[(0, MIB)], 2);
    sparse_file(&pool.join("up.raw"), MIB, &[(0, MIB)], 3);
    // Over half the 2 MiB stream window of data, so the server returns credit with WINDOW.
    let up_data = [(0, 128 << 10), (2 * MIB, 3 * MIB / 2)];
    let up_source = dir.join("up-source.raw");
    sparse_file(&up_source, 6 * MIB, &up_data, 4);

    // Keepalive would add PINGs at times of its own choosing; the test pings when it wants.
    let mut config = EngineConfig::default();
    config.connection.keepalive_interval = Duration::from_secs(3600);
    config.connection.idle_timeout = Duration::from_secs(7200);
    let (server, server_thread) = Engine::spawn(config.clone()).unwrap();
    let provider = DirProvider::new(&pool).unwrap();
    let (_, addr) = server
        .listen(
            &Address::Tcp("127.0.0.1:0".parse().unwrap()),
            Arc::new(provider),
        )
        .unwrap();
    let Address::Tcp(sock) = &addr else {
        unreachable!()
    };
    let port = sock.port();
    let pcap = dir.join("capture.pcap");
    let Some(capture) = Capture::start(&pcap, port) else {
        server.shutdown();
        server_thread.join().unwrap();
        return;
    };

    let (client, client_thread) = Engine::spawn(config).unwrap();
    let conn = client
        .connect_blocking(&addr, Duration::from_secs(10))
        .unwrap();
    // In the priority class: both engines announce PRIORITY, so the dissector must not flag it.
    let download = client.download(
        conn,
        "disk.raw",
        OpenOptions::default().with_priority(true),
        Box::new(FileWriter::create(
            dir.join("disk.copy"),
            WriterOptions::default(),
        )),
    );
    let upload = client.upload(
        conn,
        "up.raw",
        // Read back by the server before it gets its name: both announce VERIFY.
        OpenOptions::default()
            .with_overwrite(true)
            .with_verify(true)
            .with_zero_granularity(4096),
        Box::new(FileReader::open(&up_source, ReaderOptions::default())),
    );
    let missing = client.download(
        conn,
        "missing.raw",
        OpenOptions::default(),
        Box::new(MemoryWriter::default()),
    );
    let list = client.fetch(conn, Op::List, "", Box::new(MemoryWriter::default()));
    // A sink expecting 4 KiB refuses the 1 MiB volume once accepted: the client ABORTs.
    let wrong = Synthetic::new(9, 4096, 0.0);
    let aborted = client.download(
        conn,
        "dense.raw",
        OpenOptions::default(),
        Box::new(wrong.verifier()),
    );
    assert_eq!(report(download).result, Ok(()));
    assert_eq!(report(upload).result, Ok(()));
    assert_eq!(report(list).result, Ok(()));
    assert_eq!(
        report(missing).result.map_err(|e| e.reason),
        Err(Reason::NotFound)
    );
    assert_eq!(
        report(aborted).result.map_err(|e| e.reason),
        Err(Reason::Internal)
    );
    let stats = quiesce(&client, conn);
    assert_eq!(
        std::fs::read(dir.join("disk.copy")).unwrap(),
        std::fs::read(pool.join("disk.raw")).unwrap()
    );

    // Peers that break the rules, each on its own connection (tcp.streams 1 to 4): a frame
    // with reserved header bits set behind a valid PING in the same segment, a HOLE with an
    // impossible body length, a frame longer than the server's max_frame, and an OPEN in the
    // priority class from a peer whose Hello did not announce PRIORITY, and one that asks for
    // verification from a peer whose Hello did not announce VERIFY.
    let mut reserved = header(8, 9, 0, 0, 0);
    reserved.extend_from_slice(&7u64.to_be_bytes());
    reserved.extend(header(8, 9, 0, 0x0100, 0));
    reserved.extend_from_slice(&8u64.to_be_bytes());
    let mut short_hole = header(15, 5, 0, 0, 1);
    short_hole.extend_from_slice(&[0; 15]);
    let too_long = header(u32::MAX, 4, 0, 0, 1);
    let name = b"disk.raw";
    let mut unnegotiated_priority = header(16 + name.len() as u32, 1, 0, 0, 1);
    // Op READ, then the PRIORITY option bit (docs/PROTOCOL.md 4.3).
    unnegotiated_priority.extend([1, 64]);
    unnegotiated_priority.extend_from_slice(&(name.len() as u16).to_be_bytes());
    unnegotiated_priority.extend_from_slice(&[0; 12]);
    unnegotiated_priority.extend_from_slice(name);
    // OPEN's header flag VERIFY (docs/PROTOCOL.md 4.3), op READ, no options.
    let mut unnegotiated_verify = header(16 + name.len() as u32, 1, 1, 0, 1);
    unnegotiated_verify.extend([1, 0]);
    unnegotiated_verify.extend_from_slice(&(name.len() as u16).to_be_bytes());
    unnegotiated_verify.extend_from_slice(&[0; 12]);
    unnegotiated_verify.extend_from_slice(name);
    let mut raw_bytes = 0;
    for frames in [
        &reserved,
        &short_hole,
        &too_long,
        &unnegotiated_priority,
        &unnegotiated_verify,
    ] {
        raw_bytes += raw_peer(&addr, frames);
    }

    capture.stop_after(stats.bytes_in + stats.bytes_out + raw_bytes);
    client.shutdown();
    server.shutdown();
    client_thread.join().unwrap();
    server_thread.join().unwrap();

    let pcap = pcap.to_str().unwrap();
    let lua = format!("lua_script:{LUA}");
    let decode_as = format!("tcp.port=={port},volstream");
    let fields = [
        "-e",
        "tcp.stream",
        "-e",
        "tcp.srcport",
        "-e",
        "volstream.type",
        "-e",
        "volstream.hole.offset",
        "-e",
        "volstream.hole.len",
        "-e",
        "tcp.reassembled.length",
        "-e",
        "_ws.expert.message",
        "-e",
        "volstream.goaway.reason",
        "-e",
        "volstream.open.options.PRIORITY",
        "-e",
        "volstream.flags.VERIFY",
    ];
    let common_args = [
        "-n",
        "-r",
        pcap,
        "-X",
        &lua,
        "-o",
        "tcp.desegment_tcp_streams:TRUE",
        "-Y",
        "volstream || _ws.lua.error",
        "-T",
        "fields",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=;",
    ];
    let by_port: Vec<&str> = common_args
        .iter()
        .copied()
        .chain(["-d", &decode_as])
        .chain(fields)
        .collect();
    let rows_by_port = rows(&tshark(&by_port));
    // Without the port rule and with the port preference off, the Hello heuristic alone.
    let by_heuristic: Vec<&str> = common_args
        .iter()
        .copied()
        .chain(["-o", "volstream.port:0"])
        .chain(fields)
        .collect();
    let rows_by_heuristic = rows(&tshark(&by_heuristic));

    for row in rows_by_port.iter().chain(&rows_by_heuristic) {
        for message in &row.fields[4] {
            assert!(!message.starts_with("Lua Error"), "{message}");
        }
    }

    // Every frame type either way, as the engine counted it on the client's connection.
    let seen = type_counts(&rows_by_port, port);
    assert_eq!(
        seen,
        engine_counts(&stats),
        "tshark (left) vs engine (right)"
    );
    assert_eq!(type_counts(&rows_by_heuristic, port), seen);
    for (from_server, kind) in [
        (false, "OPEN"),
        (false, "DATA"),
        (false, "HOLE"),
        (false, "WINDOW"),
        (false, "FINISH"),
        (false, "ABORT"),
        (false, "PING"),
        (true, "ACCEPT"),
        (true, "REJECT"),
        (true, "DATA"),
        (true, "HOLE"),
        (true, "WINDOW"),
        (true, "FINISH"),
        (true, "PONG"),
    ] {
        assert!(
            seen.contains_key(&(from_server, kind.to_owned())),
            "the transfer had no {kind} frame (from server: {from_server}): {seen:?}"
        );
    }

    // Both paths of the reassembly ran: frames split over segments, several in one segment.
    let main: Vec<&Row> = rows_by_port.iter().filter(|r| r.stream == 0).collect();
    assert!(main.iter().any(|r| !r.fields[3].is_empty()));
    assert!(main.iter().any(|r| r.fields[0].len() > 1));

    // HOLE frames each way cover exactly the holes of that way's source.
    let holes = |from_server: bool| {
        let mut ranges = Vec::new();
        for row in main.iter().filter(|r| (r.src_port == port) == from_server) {
            let offsets = &row.fields[1];
            let lens = &row.fields[2];
            assert_eq!(offsets.len(), lens.len());
            for (o, l) in offsets.iter().zip(lens) {
                ranges.push((o.parse().unwrap(), l.parse().unwrap()));
            }
        }
        merged(ranges)
    };
    assert_eq!(holes(true), holes_of(8 * MIB, &disk_data), "download");
    assert_eq!(holes(false), holes_of(6 * MIB, &up_data), "upload");

    // Expert info: none of the dissector's on the good connection, the right one on each bad.
    let expert_texts = dissector_expert_texts(&lua);
    let flagged = |stream: u32| -> BTreeSet<String> {
        rows_by_port
            .iter()
            .filter(|r| r.stream == stream)
            .flat_map(|r| r.fields[4].iter().cloned())
            .filter(|m| expert_texts.iter().any(|t| m.starts_with(t.as_str())))
            .collect()
    };
    assert_eq!(flagged(0), BTreeSet::new());
    // The good connection's priority download, decoded as such (tshark prints a set boolean
    // as 1 or True).
    let priority_opens = main
        .iter()
        .flat_map(|r| &r.fields[6])
        .filter(|v| *v == "1" || *v == "True")
        .count();
    assert_eq!(
        priority_opens, 1,
        "OPENs with the PRIORITY option on tcp.stream 0"
    );
    let verify_opens = main
        .iter()
        .flat_map(|r| &r.fields[7])
        .filter(|v| *v == "1" || *v == "True")
        .count();
    assert_eq!(
        verify_opens, 1,
        "OPENs with the VERIFY option on tcp.stream 0"
    );
    let expect = [
        (1, "Reserved header bits are not zero"),
        (2, "Body length impossible for this frame type"),
        (
            3,
            "Frame body exceeds the receiver's max_frame (4294967295 bytes, max_frame 262208)",
        ),
        (
            4,
            "OPEN asks for the priority class although PRIORITY was not negotiated",
        ),
        (
            5,
            "OPEN asks for verification although VERIFY was not negotiated",
        ),
    ];
    for (stream, text) in expect {
        let messages = flagged(stream);
        assert!(
            messages.iter().any(|m| m.starts_with(text)),
            "tcp.stream {stream}: expected expert info {text:?}, got {messages:?}"
        );
        // The server's answer, decoded: GOAWAY with reason PROTOCOL (1).
        let reasons: Vec<&String> = rows_by_port
            .iter()
            .filter(|r| r.stream == stream && r.src_port == port)
            .flat_map(|r| &r.fields[5])
            .collect();
        assert_eq!(reasons, ["1"], "tcp.stream {stream}");
    }
}

/// The summaries of the dissector's expert infos, as tshark registered them.
fn dissector_expert_texts(lua: &str) -> Vec<String> {
    registered(lua, "fields")
        .into_iter()
        .filter(|cols| cols[0] == "F" && cols[2].starts_with("volstream.expert."))
        .map(|cols| cols[1].clone())
        .collect()
}

/// `tshark -G report` with the dissector loaded, split into tab-separated columns.
fn registered(lua: &str, report: &str) -> Vec<Vec<String>> {
    tshark(&["-G", report, "-X", lua])
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// The first markdown table after the first line starting with `marker`: its rows' cells,
/// without the header and separator rows.
fn table_after(doc: &str, marker: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(marker))
        .unwrap_or_else(|| panic!("PROTOCOL.md has no {marker:?}"));
    let body: Vec<Vec<String>> = lines[start..]
        .iter()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect();
    body.into_iter().skip(2).collect()
}

#[test]
fn dissector_names_what_protocol_md_names() {
    if !have("tshark") {
        eprintln!("skipping: tshark is not installed");
        return;
    }
    let doc = std::fs::read_to_string(PROTOCOL_MD).unwrap();
    let lua = format!("lua_script:{LUA}");
    let fields = registered(&lua, "fields");
    let values = registered(&lua, "values");
    // abbrev -> (display name, bitmask)
    let field: BTreeMap<&str, (&str, &str)> = fields
        .iter()
        .filter(|c| c[0] == "F" && c.len() >= 7)
        .map(|c| (c[2].as_str(), (c[1].as_str(), c[6].as_str())))
        .collect();
    let value_names = |abbrev: &str| -> BTreeMap<u32, String> {
        values
            .iter()
            .filter(|c| c[0] == "V" && c[1] == abbrev)
            .map(|c| (c[2].parse().unwrap(), c[3].clone()))
            .collect()
    };
    let assert_field = |abbrev: &str, name: &str| {
        assert_eq!(
            field.get(abbrev).map(|f| f.0),
            Some(name),
            "dissector field {abbrev}"
        );
    };

    // Section 2: the Hello; 4.1: the header.
    for row in table_after(&doc, "## 2. The Hello record") {
        assert_field(&format!("volstream.hello.{}", row[2]), &row[2]);
    }
    for row in table_after(&doc, "### 4.1 Header") {
        assert_field(&format!("volstream.{}", row[2]), &row[2]);
    }

    // 4.2: the types, and each type's body fields (OPEN's table; the others' `names`).
    let types: BTreeMap<u32, String> = table_after(&doc, "### 4.2 Frame types")
        .iter()
        .map(|row| (row[0].parse().unwrap(), row[1].clone()))
        .collect();
    assert_eq!(value_names("volstream.type"), types);
    let names: Vec<&str> = FrameCounts::NAMES.to_vec();
    assert_eq!(types.values().collect::<Vec<_>>(), names, "engine names");
    for row in table_after(&doc, "**OPEN**") {
        let name = row[2].split(':').next().unwrap();
        assert_field(&format!("volstream.open.{name}"), name);
    }
    let mut body_fields = 0;
    for paragraph in doc
        .split("\n\n")
        .filter(|p| p.starts_with("**") && p.contains(" — "))
    {
        let (kinds, text) = paragraph.split_once(" — ").unwrap();
        for kind in kinds.split("**").filter(|k| types.values().any(|t| t == k)) {
            for ident in text.split('`').skip(1).step_by(2) {
                if ident.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    assert_field(&format!("volstream.{}.{ident}", kind.to_lowercase()), ident);
                    body_fields += 1;
                }
            }
        }
    }
    assert!(
        body_fields >= 10,
        "found only {body_fields} body fields in PROTOCOL.md"
    );
    let ops: BTreeMap<u32, String> = table_after(&doc, "**OPEN**")[0][2]
        .split([':', ','])
        .filter_map(|part| {
            let (code, rest) = part.trim().split_once(" = ")?;
            Some((code.parse().ok()?, rest.split(' ').next()?.to_owned()))
        })
        .collect();
    assert_eq!(ops.len(), 5, "{ops:?}");
    assert_eq!(value_names("volstream.open.op"), ops);

    // Flag and option bits by name and value: 3.2, FINISH's flags, 4.3.
    let bits = [
        ("### 3.2 Feature bits", "volstream.hello.features", 2, 1),
        ("**FINISH**", "volstream.flags", 0, 1),
        ("### 4.3 OPEN options flags", "volstream.open.options", 2, 1),
    ];
    for (marker, prefix, name_col, value_col) in bits {
        for row in table_after(&doc, marker)
            .iter()
            .filter(|r| !r[name_col].is_empty())
        {
            let abbrev = format!("{prefix}.{}", row[name_col]);
            let mask = u32::from_str_radix(row[value_col].trim_start_matches("0x"), 16).unwrap();
            let got = field
                .get(abbrev.as_str())
                .map(|f| u32::from_str_radix(f.1.trim_start_matches("0x"), 16).unwrap());
            assert_eq!(got, Some(mask), "{abbrev}");
        }
    }

    // Section 5: reasons, the same in REJECT, ABORT and GOAWAY.
    let reasons: BTreeMap<u32, String> = table_after(&doc, "## 5. Reason codes")
        .iter()
        .map(|row| (row[0].parse().unwrap(), row[1].clone()))
        .collect();
    assert_eq!(reasons.len(), 17);
    for kind in ["reject", "abort", "goaway"] {
        assert_eq!(value_names(&format!("volstream.{kind}.reason")), reasons);
    }
    for (code, name) in &reasons {
        let engine = format!("{:?}", Reason::from_code(*code));
        assert_eq!(
            engine.replace('_', "").to_lowercase(),
            name.replace('_', "").to_lowercase()
        );
    }
}
