//! Volume I/O in a `volstream-iohelper` subprocess: [`HelperReader`] and [`HelperWriter`]
//! behave as [`FileReader`](crate::FileReader) and [`FileWriter`](crate::FileWriter) do (the
//! helper runs their synchronous cores, [`ReadCore`](crate::reader::ReadCore) and
//! [`WriteCore`](crate::writer::WriteCore)), but a crash, a hang or a stuck system call costs
//! one stream, not the process. [`Backend`] picks between the two and builds either kind the
//! same way.
//!
//! Threads and who does what:
//! - a pool worker spawns each helper (fork/exec may block; the loop thread must not):
//!   `spawn`;
//! - one watcher thread for all helpers (a mio Poll) reads every helper socket into its
//!   stream's queue, flushes what the loop could not write, reaps helpers through pidfds and
//!   enforces the timeouts: `watcher`, acting on each helper's `entry`. One thread rather than
//!   one per helper: hundreds of streams must not cost hundreds of threads, and the socket reads
//!   are cheap next to the disk I/O they carry;
//! - the loop thread only takes decoded chunks from a queue and does non-blocking writes of
//!   messages to a socket (IPC, never disk I/O): `reader`, `writer`.
//!
//! Memory stays bounded: a reader helper sends DATA only within the credit the parent granted
//! (returned as the loop takes chunks), and the parent checks it; a writer helper is sent no
//! more than the engine's stream window.
//!
//! Every helper is waited for (no zombies) by pid, never with `waitpid(-1)`, so the host's
//! other children are left alone. All parent fds are close-on-exec; the helper gets /dev/null
//! as stdin and stdout, the parent's stderr (inherited, so its log lines land where the
//! parent's do; nothing on the protocol goes there), its socket (fd 3) and its volume or
//! directory (fd 4).
//!
//! A helper is a volume open in this process as much as an in-process one is: it is spawned
//! only once it holds a slot of the [open-volume budget](crate::budget), and the slot is given
//! back when it has been reaped. The helper's own fds are in its own table, but the parent
//! keeps its end of the socketpair, the pidfd and, for a new file, the directory (the
//! temporary's cleanup needs it) for as long as the helper lives; during the spawn itself also
//! the child's end, the volume fd, /dev/null for stdin and stdout and std's exec-error pipe,
//! which come from the budget's reserve (one spawn per pool worker at a time). A reader that
//! waits in line reports no size and a writer is not ready, so no waiting helper holds credit.

mod entry;
mod options;
mod reader;
mod spawn;
mod watcher;
pub mod wire;
mod writer;

pub use options::{Backend, HelperOptions};
pub use reader::HelperReader;
pub use writer::HelperWriter;

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The helper binary's name, looked for next to the current executable.
pub const PROGRAM: &str = "volstream-iohelper";
/// Data a reader helper may have in flight toward the parent (as the in-process read-ahead).
pub const READ_WINDOW: u64 = 4 << 20;
/// The helper's socket and volume fds, as the helper sees them.
pub const SOCK_FD: RawFd = 3;
pub const VOLUME_FD: RawFd = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
}

/// A running helper, as [`helpers`] lists it.
#[derive(Debug, Clone)]
pub struct HelperInfo {
    pub pid: u32,
    pub role: Role,
    /// The volume it works on.
    pub volume: String,
}

/// The helpers of this process that have been spawned and not yet reaped.
pub fn helpers() -> Vec<HelperInfo> {
    watcher::entries()
        .iter()
        .filter_map(|e| {
            let st = e.st.lock().unwrap();
            Some(HelperInfo {
                pid: st.pid? as u32,
                role: st.side.role(),
                volume: e.shown.clone(),
            })
        })
        .collect()
}

/// Waits (at most `timeout`) until every helper of this process has exited and been reaped,
/// e.g. so that cancelled writers' temporaries are gone before the process exits. True if so.
pub fn wait_all(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !helpers().is_empty() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
