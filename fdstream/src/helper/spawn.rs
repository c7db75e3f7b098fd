//! Starting a helper process, on a pool worker (fork and exec may block; the loop thread must
//! not).

use super::entry::{Entry, Side};
use super::watcher::{pidfd_open, watcher};
use super::wire::Msg;
use super::{PROGRAM, SOCK_FD, VOLUME_FD};
use crate::pool::{Job, JobHandle, Pool, Step};
use engine::event_loop::socket::set_send_buffer;
use engine::Reason;
use engine::VolumeError;
use mio::net::UnixStream;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A socket's default send buffer (about 200 KiB) holds less than one read buffer, so every
/// megabyte would cost several wake-ups of each side; ask for a few (the kernel caps it at
/// net.core.wmem_max). Larger than the engine's connections ask for: nothing interactive
/// shares a helper's socket.
const SEND_BUFFER: usize = 4 << 20;

/// Runs `launch` (which spawns the helper) on a pool worker once the entry holds a slot of
/// the open-volume budget; until then it waits in line, and the budget schedules it again.
struct Spawn {
    entry: Arc<Entry>,
    launch: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Job for Spawn {
    fn run(&self) -> Step {
        let entry = &self.entry;
        if entry.st.lock().unwrap().cancelled.is_some() {
            // Cancelled before it ran: nothing to start, and the place in line is someone's.
            drop(self.launch.lock().unwrap().take());
            entry.slot.lock().unwrap().release();
            return Step::Idle;
        }
        let me = entry.spawner.get().expect("set when registered");
        if !entry.slot.lock().unwrap().try_hold(me) {
            return Step::Idle;
        }
        let Some(launch) = self.launch.lock().unwrap().take() else {
            return Step::Idle;
        };
        launch();
        // No helper came of it (it failed first): no fds stand behind the slot.
        if entry.st.lock().unwrap().pid.is_none() {
            entry.slot.lock().unwrap().release();
        }
        Step::Idle
    }
}

/// Runs `launch` once on a worker of `pool` (the shared pool by default), when the budget has
/// a slot for `entry`. The handle keeps the job alive while it waits in line.
pub(super) fn on_pool(
    pool: Option<Arc<Pool>>,
    entry: Arc<Entry>,
    launch: impl FnOnce() + Send + 'static,
) -> JobHandle {
    let pool = pool.unwrap_or_else(Pool::shared);
    let handle = pool.register(Spawn {
        entry: Arc::clone(&entry),
        launch: Mutex::new(Some(Box::new(launch))),
    });
    let _ = entry.spawner.set(handle.downgrade());
    handle.schedule();
    handle
}

/// What the helper is given: its command line, and the fd that becomes its fd 4.
#[derive(Default)]
pub(super) struct Launch {
    args: Vec<OsString>,
    fd: Option<OwnedFd>,
    /// Kept by the parent to remove a dead writer's temporary file.
    pub dir: Option<Arc<OwnedFd>>,
}

impl Launch {
    pub fn new(command: &str) -> Launch {
        Launch {
            args: vec![command.into()],
            ..Launch::default()
        }
    }

    pub fn flag(&mut self, name: &str, on: bool) {
        if on {
            self.args.push(name.into());
        }
    }

    pub fn value(&mut self, name: &str, v: impl Into<OsString>) {
        self.args.push(name.into());
        self.args.push(v.into());
    }

    /// Hands the helper `fd` as its fd 4, behind the argument `name` (and `v`, if any).
    pub fn fd(&mut self, fd: OwnedFd, name: &str, v: Option<OsString>) {
        self.args.push(name.into());
        self.args.extend(v);
        self.fd = Some(fd);
    }
}

/// Where the helper was looked for, and how to get it.
fn missing_program(program: &Path) -> String {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| "this program".into());
    let looked = if program.components().count() > 1 {
        format!("{} does not exist", program.display())
    } else {
        format!("{PROGRAM} is neither beside {beside} nor on PATH")
    };
    format!(
        "{looked}: build it with `cargo build --release` in the volstream \
         workspace (it is a default member) or set VOLSTREAM_IOHELPER to its path"
    )
}

/// Starts the helper for `entry` and hands it to the watcher; `first` is sent before anything
/// the loop queued. A failure fails the stream.
pub(super) fn spawn(entry: &Arc<Entry>, program: PathBuf, launch: Launch, first: Option<Msg>) {
    if let Err(e) = try_spawn(entry, &program, launch, first) {
        entry.fail(VolumeError::new(
            Reason::Internal,
            format!("cannot run the iohelper: {e}"),
        ));
    }
}

fn try_spawn(
    entry: &Arc<Entry>,
    program: &Path,
    launch: Launch,
    first: Option<Msg>,
) -> io::Result<()> {
    let w = watcher()?;
    let (parent, child) = std::os::unix::net::UnixStream::pair()?;
    parent.set_nonblocking(true)?;
    for s in [&parent, &child] {
        set_send_buffer(s.as_fd(), SEND_BUFFER);
    }
    let sock_raw = child.as_raw_fd();
    let vol_raw = launch.fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let mut cmd = std::process::Command::new(program);
    // stderr is inherited on purpose: the helper logs there, as the parent does.
    cmd.args(&launch.args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2, close, close_range) between fork
    // and exec.
    // The fds are first copied above 10 so that moving one to 3 cannot clobber the other.
    unsafe {
        cmd.pre_exec(move || {
            let a = libc::fcntl(sock_raw, libc::F_DUPFD, 10);
            if a < 0 {
                return Err(io::Error::last_os_error());
            }
            let b = if vol_raw >= 0 {
                libc::fcntl(vol_raw, libc::F_DUPFD, 10)
            } else {
                -1
            };
            if vol_raw >= 0 && b < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::dup2(a, SOCK_FD) < 0 || (b >= 0 && libc::dup2(b, VOLUME_FD) < 0) {
                return Err(io::Error::last_os_error());
            }
            libc::close(a);
            if b >= 0 {
                libc::close(b);
            }
            // Ours are all close-on-exec, but a host may have left others inheritable
            // (a jobserver pipe, a log file): mark everything above 4 close-on-exec too.
            // Not closed outright: std's exec-error pipe must live until the exec.
            libc::syscall(
                libc::SYS_close_range,
                VOLUME_FD + 1,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let child_proc = cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            return io::Error::new(e.kind(), missing_program(program));
        }
        io::Error::new(e.kind(), format!("starting {}: {e}", program.display()))
    })?;
    let pid = child_proc.id() as i32;
    // The helper has its copies; ours must not linger.
    drop(child);
    drop(launch.fd);
    drop(child_proc);
    let pidfd = pidfd_open(pid);
    let mut sock = UnixStream::from_std(parent);
    let mut st = entry.st.lock().unwrap();
    st.pid = Some(pid);
    if let Side::Write(w) = &mut st.side {
        w.dir = launch.dir;
    }
    st.last_activity = Some(Instant::now());
    w.add(entry, &mut sock, pidfd.as_ref())?;
    st.pidfd = pidfd;
    st.sock = Some(sock);
    if let Some(m) = first {
        st.push(&m);
        if let (Msg::Credit(n), Side::Read(r)) = (&m, &mut st.side) {
            r.granted += n;
        }
    }
    if st.cancelled.is_some() {
        st.hang_up();
    } else {
        let _ = st.flush();
    }
    log::debug!("iohelper {pid} started for {}", entry.shown);
    Ok(())
}
