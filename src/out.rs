//! Where the CLI's text goes, and what happens when nobody reads it.
//!
//! Results (summaries, tables, JSON) go to stdout, except while a download writes volume data
//! there: then they go to stderr, so the data stays clean. A closed pipe ends the process the
//! way it ends any Unix tool: quietly, by SIGPIPE (`volstream extents F | head`). Rust ignores
//! SIGPIPE so that the engine's sockets see EPIPE as an error; the print paths alone restore
//! the default action, at the moment it applies.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static DATA_ON_STDOUT: AtomicBool = AtomicBool::new(false);

/// From now on stdout carries volume data: results are printed to stderr instead.
pub fn data_on_stdout() {
    DATA_ON_STDOUT.store(true, Ordering::Relaxed);
}

pub fn stdout_has_data() -> bool {
    DATA_ON_STDOUT.load(Ordering::Relaxed)
}

/// Writes one line of results; see the module's comment.
pub fn result_line(args: std::fmt::Arguments<'_>) {
    let written = if stdout_has_data() {
        writeln!(io::stderr().lock(), "{args}")
    } else {
        let mut out = io::stdout().lock();
        writeln!(out, "{args}").and_then(|()| out.flush())
    };
    if let Err(e) = written {
        if e.kind() == io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
        // Nowhere is left to say it: a full disk behind a redirection. Fail, do not panic.
        std::process::exit(1);
    }
}

/// Writes one line to stderr. A stderr that cannot be written is not worth a panic.
pub fn error_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// The reader of our output went away: end as a process killed by SIGPIPE does.
fn die_of_sigpipe() -> ! {
    use nix::sys::signal::{raise, signal, SigHandler, Signal};
    // SAFETY: installing the default disposition runs no handler code of ours.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
    let _ = raise(Signal::SIGPIPE);
    // Blocked in this thread (serve blocks only SIGINT/SIGTERM, but be sure): exit as if.
    std::process::exit(128 + Signal::SIGPIPE as i32)
}

/// `println!` for results.
macro_rules! say {
    ($($arg:tt)*) => { $crate::out::result_line(format_args!($($arg)*)) };
}

/// `eprintln!` that cannot panic.
macro_rules! tell {
    ($($arg:tt)*) => { $crate::out::error_line(format_args!($($arg)*)) };
}

pub(crate) use {say, tell};

/// A value as one line of JSON.
pub fn json<T: serde::Serialize>(value: &T) -> String {
    // Only maps with non-string keys fail to serialize; the CLI prints none.
    serde_json::to_string(value).expect("JSON of plain records")
}
