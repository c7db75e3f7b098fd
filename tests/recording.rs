//! The exact I/O a download does to its destination, for a source whose layout is known (as
//! libnbd's copy/copy-sparse.sh checks nbdcopy against a logging sink): the client runs under
//! strace, and every write, punch, zero-range and allocation on the destination is logged and
//! compared, range by range, with what the layout calls for.

mod common;

use common::*;
use std::fmt;
use std::path::Path;
use std::process::Command;

const SIZE: u64 = 6 * MIB + 8192;
/// Data at the start, in the middle (4 KiB-aligned, not chunk-aligned) and up to the end.
const DATA: [(u64, u64); 3] = [
    (0, MIB),
    (2 * MIB + 4096, 300 * 1024),
    (5 * MIB, MIB + 8192),
];

/// One operation on the destination; adjacent ones of the same kind are merged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write(u64, u64),
    Punch(u64, u64),
    ZeroRange(u64, u64),
    /// fallocate mode 0.
    Allocate(u64, u64),
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, at, len) = match *self {
            Op::Write(a, l) => ("write", a, l),
            Op::Punch(a, l) => ("punch", a, l),
            Op::ZeroRange(a, l) => ("zero", a, l),
            Op::Allocate(a, l) => ("allocate", a, l),
        };
        write!(f, "{name} {at}..{}", at + len)
    }
}

impl Op {
    fn merge(self, next: Op) -> Option<Op> {
        use Op::*;
        match (self, next) {
            (Write(a, l), Write(b, m)) if a + l == b => Some(Write(a, l + m)),
            (Punch(a, l), Punch(b, m)) if a + l == b => Some(Punch(a, l + m)),
            (ZeroRange(a, l), ZeroRange(b, m)) if a + l == b => Some(ZeroRange(a, l + m)),
            (Allocate(a, l), Allocate(b, m)) if a + l == b => Some(Allocate(a, l + m)),
            _ => None,
        }
    }
}

/// The holes between the data extents.
fn holes() -> Vec<(u64, u64)> {
    let mut at = 0;
    let mut out = Vec::new();
    for (off, len) in DATA {
        if off > at {
            out.push((at, off - at));
        }
        at = off + len;
    }
    if at < SIZE {
        out.push((at, SIZE - at));
    }
    out
}

/// The data extents as writes, and each hole as `hole(offset, len)` where it needs work, in
/// offset order.
fn expected(hole: Option<fn(u64, u64) -> Op>) -> Vec<Op> {
    let mut ops: Vec<(u64, Op)> = DATA.iter().map(|&(a, l)| (a, Op::Write(a, l))).collect();
    if let Some(hole) = hole {
        ops.extend(holes().into_iter().map(|(a, l)| (a, hole(a, l))));
    }
    ops.sort_by_key(|(at, _)| *at);
    ops.into_iter().map(|(_, op)| op).collect()
}

/// The operations in an strace log (`-f -y`) on files whose path contains `name`, in order.
fn destination_ops(log: &str, name: &str) -> Vec<Op> {
    // Calls interrupted by another thread's come in two lines; join them by pid.
    let mut pending: std::collections::HashMap<String, String> = Default::default();
    let mut calls = Vec::new();
    for line in log.lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        let rest = rest.trim_start();
        if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_owned(), start.to_owned());
        } else if let Some(resumed) = rest.strip_prefix("<... ") {
            let tail = resumed.split_once("resumed>").map_or("", |(_, t)| t);
            if let Some(start) = pending.remove(pid) {
                calls.push(format!("{start}{tail}"));
            }
        } else {
            calls.push(rest.to_owned());
        }
    }
    let mut ops: Vec<Op> = Vec::new();
    for call in calls {
        let Some((head, ret)) = call.rsplit_once(") = ") else {
            continue;
        };
        let Some((syscall, args)) = head.split_once('(') else {
            continue;
        };
        let Some((fd, args)) = args.split_once(">, ") else {
            continue;
        };
        if !fd.contains(name) {
            continue;
        }
        let num = |s: &str| s.trim().parse::<u64>().ok();
        let ret = ret.split_whitespace().next().and_then(num);
        let last = args.rsplit(", ").next().and_then(num);
        let op = match syscall {
            "pwrite64" | "pwritev" | "pwritev2" => {
                let offset = if syscall == "pwritev2" {
                    args.rsplit(", ").nth(1).and_then(num)
                } else {
                    last
                };
                Op::Write(offset.unwrap(), ret.unwrap())
            }
            "fallocate" => {
                let fields: Vec<&str> = args.split(", ").collect();
                let (mode, at, len) = (fields[0], num(fields[1]), num(fields[2]));
                let (at, len) = (at.unwrap(), len.unwrap());
                if mode.contains("PUNCH_HOLE") {
                    Op::Punch(at, len)
                } else if mode.contains("ZERO_RANGE") {
                    Op::ZeroRange(at, len)
                } else {
                    Op::Allocate(at, len)
                }
            }
            _ => continue,
        };
        match ops.last().and_then(|prev| prev.merge(op)) {
            Some(merged) => *ops.last_mut().unwrap() = merged,
            None => ops.push(op),
        }
    }
    ops
}

fn strace_available() -> bool {
    match Command::new("strace").arg("-V").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            // scripts/test installs it; a machine without it cannot run this test.
            eprintln!("SKIP: strace is not installed");
            false
        }
    }
}

/// Downloads `src.img` from a server into `dst` under strace; returns the destination's log.
fn traced_download(work: &Path, listen: &str, dst: &Path, args: &[&str]) -> Vec<Op> {
    let log = work.join(format!(
        "strace-{}.log",
        dst.file_name().unwrap().to_string_lossy()
    ));
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-s", "0", "-o"])
        .arg(&log)
        .args(["-e", "trace=pwrite64,pwritev,pwritev2,fallocate"])
        .arg(env!("CARGO_BIN_EXE_volstream"))
        .env_remove("VOLSTREAM_ADDR")
        .env("RUST_LOG", "warn")
        .args(["download", "--connect", listen, "--no-sync"])
        .args(args)
        .arg("src.img")
        .arg(dst)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {:?}", stderr_lines(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    let name = dst.file_name().unwrap().to_string_lossy().into_owned();
    destination_ops(&text, &name)
}

fn dense_copy_of_old_data(path: &Path) {
    std::fs::write(path, vec![0xaau8; SIZE as usize]).unwrap();
}

#[test]
fn a_download_does_exactly_the_io_its_source_layout_needs() {
    if !strace_available() {
        return;
    }
    let work = TempDir::new("recording");
    let pool = work.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let src = pool.join("src.img");
    sparse_file(&src, SIZE, &DATA, 11);
    let listen = format!("unix:{}", work.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    // A new file: the data is written once, the holes need nothing.
    let new = work.join("new.img");
    let ops = traced_download(&work.0, &listen, &new, &[]);
    assert_eq!(ops, expected(None), "new file");
    assert_eq!(read_all(&new), read_all(&src));

    // A new file that must end allocated: allocated whole when opened, then the data.
    let allocated = work.join("allocated.img");
    let ops = traced_download(&work.0, &listen, &allocated, &["--allocated"]);
    let mut want = vec![Op::Allocate(0, SIZE)];
    want.extend(expected(None));
    assert_eq!(ops, want, "new allocated file");

    // An existing file full of old data, in place: each hole is punched.
    let in_place = work.join("in-place.img");
    dense_copy_of_old_data(&in_place);
    let ops = traced_download(&work.0, &listen, &in_place, &["--in-place", "--overwrite"]);
    assert_eq!(ops, expected(Some(Op::Punch)), "in place");
    assert_eq!(read_all(&in_place), read_all(&src));

    // The same, but it must stay allocated: holes are zeroed, not punched.
    let kept = work.join("kept.img");
    dense_copy_of_old_data(&kept);
    let ops = traced_download(
        &work.0,
        &listen,
        &kept,
        &["--in-place", "--overwrite", "--allocated"],
    );
    assert_eq!(ops, expected(Some(Op::ZeroRange)), "in place, allocated");
    assert_eq!(read_all(&kept), read_all(&src));

    // A destination that already reads as zero: holes need nothing.
    let zero = work.join("zero.img");
    std::fs::File::create(&zero).unwrap().set_len(SIZE).unwrap();
    let ops = traced_download(
        &work.0,
        &listen,
        &zero,
        &["--in-place", "--overwrite", "--destination-is-zero"],
    );
    assert_eq!(ops, expected(None), "destination is zero");

    // The I/O helper does the same I/O from its own process.
    if iohelper_built() {
        let helped = work.join("helped.img");
        dense_copy_of_old_data(&helped);
        let ops = traced_download(
            &work.0,
            &listen,
            &helped,
            &["--in-place", "--overwrite", "--iohelper"],
        );
        assert_eq!(
            ops,
            expected(Some(Op::Punch)),
            "in place through the iohelper"
        );
        assert_eq!(read_all(&helped), read_all(&src));
    }
}
