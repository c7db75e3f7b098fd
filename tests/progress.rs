//! Progress bars in a real terminal: tmux runs the client in a 60-column pane, the screen is
//! captured when it has exited, and everything written to the pane is recorded.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> Option<String> {
    let out = Command::new("tmux").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = tmux(&["kill-session", "-t", &self.0]);
    }
}

/// `n/m` byte counts on a line, as text.
fn counts(line: &str) -> Option<(String, String)> {
    let slash = line.find(" B/").or_else(|| line.find("B/"))?;
    let (left, right) = line.split_at(slash + 2);
    let done = left.split('[').next_back()?.split(']').next_back()?.trim();
    let total = right[1..]
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Some((done.to_owned(), total))
}

#[test]
fn bars_fit_a_60_column_terminal_and_tell_done_from_failed() {
    if tmux(&["-V"]).is_none() {
        eprintln!("SKIP: tmux is not installed");
        return;
    }
    let dir = TempDir::new("bars");
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    sparse_file(&pool.join("ok.raw"), 48 * MIB, &[(0, 16 * MIB)], 1);
    sparse_file(&pool.join("big.raw"), 64 * MIB, &[(0, 64 * MIB)], 2);
    // A destination that runs out of space part-way: a small tmpfs (root), else none.
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = fixture(&format!(
        "mount -t tmpfs -o size=8m tmpfs {}",
        small.display()
    ));
    let _unmount = mounted.as_ref().map(|_| Unmount(small.clone()));
    let listen = format!("unix:{}", dir.join("s.sock").display());
    let _server = Server::start(&pool, &listen);

    let bin = env!("CARGO_BIN_EXE_volstream");
    let mut pairs = format!(
        "ok.raw {} nosuch.raw {}",
        dir.join("ok.copy").display(),
        dir.join("nosuch.copy").display()
    );
    if mounted.is_some() {
        pairs += &format!(" big.raw {}", small.join("big.copy").display());
    }
    let log = dir.join("pane.log");
    let session = Session(format!("volstream-bars-{}", std::process::id()));
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "60",
        "-y",
        "30",
    ])
    .expect("tmux session");
    tmux(&[
        "pipe-pane",
        "-t",
        &session.0,
        "-o",
        &format!("cat > {}", log.display()),
    ])
    .unwrap();
    let command = format!(
        "clear; env -u RUST_LOG {bin} download --progress --connect {listen} {pairs} >/dev/null; echo EXIT=$?"
    );
    tmux(&["send-keys", "-t", &session.0, &command, "Enter"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let screen = loop {
        let screen = tmux(&["capture-pane", "-p", "-t", &session.0]).unwrap_or_default();
        if screen.lines().any(|l| l.starts_with("EXIT=")) {
            break screen;
        }
        assert!(
            Instant::now() < deadline,
            "client did not finish:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        screen.lines().any(|l| l == "EXIT=1"),
        "a transfer fails:\n{screen}"
    );
    // After `clear` the screen starts with the bars, one row each: a line too long for the
    // pane would leave its tail on a row of its own, a redraw that lost its place a second row.
    let mut labels = vec!["ok.raw", "nosuch.raw", "total"];
    if mounted.is_some() {
        labels.push("big.raw");
    }
    let rows: Vec<&str> = screen
        .lines()
        .take_while(|l| !l.starts_with("volstream:"))
        .collect();
    assert_eq!(rows.len(), labels.len(), "one row per bar:\n{screen}");
    for row in &rows {
        assert!(
            labels
                .iter()
                .any(|l| row.trim_start().starts_with(&format!("{l} "))),
            "{row:?} is no bar: a line wrapped\n{screen}"
        );
    }
    let bar = |label: &str| -> String {
        let lines: Vec<&str> = screen
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{label} ")))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "one line for {label}, redraws do not pile up:\n{screen}"
        );
        lines[0].to_owned()
    };
    let ok = bar("ok.raw");
    assert!(ok.contains("done"), "{ok}");
    assert!(!ok.contains("/s"), "a finished volume shows no rate: {ok}");
    let refused = bar("nosuch.raw");
    assert!(refused.contains("failed"), "{refused}");
    assert!(
        !refused.contains("B/"),
        "no byte counts before the size is known: {refused}"
    );
    if mounted.is_some() {
        let failed = bar("big.raw");
        assert!(failed.contains("failed"), "{failed}");
        let (done, total) = counts(&failed).unwrap_or_else(|| panic!("counts in {failed}"));
        assert_ne!(done, total, "a failed bar is not drawn full: {failed}");
    } else {
        eprintln!("SKIP (part): no tmpfs mount, so no transfer that fails mid-way");
    }
    let recorded = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(!recorded.is_empty(), "pipe-pane recorded the pane");
    assert!(
        !recorded.contains("0 B/0 B"),
        "no frame shows bars of unknown size as 0 B/0 B"
    );
    // Logging is quiet by default: the failure is told in its one line only.
    assert!(!recorded.contains("WARN"), "{recorded}");
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
