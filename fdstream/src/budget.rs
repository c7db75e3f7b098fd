//! How many volumes the process has open at once: one budget for every reader and writer (in
//! process or in a helper), so that a command with thousands of volumes, or a server with
//! thousands of streams, queues them instead of failing with EMFILE.
//!
//! An in-process [`FileReader`](crate::FileReader) or [`FileWriter`](crate::FileWriter) takes
//! a slot before it opens anything and gives it back when its files are closed; a
//! [`HelperReader`](crate::HelperReader) or [`HelperWriter`](crate::HelperWriter) takes one
//! before its helper is spawned and gives it back once the helper is reaped (the helper's own
//! fds are in its own table, but the parent's socket, pidfd and directory per helper count
//! here). A volume that finds none free waits in line,
//! first come first served, and its job runs again when a slot is handed to it. The number of
//! slots follows the soft RLIMIT_NOFILE when the budget is first used (see [`capacity`]):
//! [`raise_fd_limit`] first, as the CLI does at start.
//!
//! A sink that waits must not hold its peer's credit: a server's writer waits before it
//! accepts an upload, a reader before it reports a size, an upload's source before its OPEN
//! is sent. A download's writer, though, is started when the peer has already begun sending; a
//! host that downloads more volumes at once than the budget holds submits them in waves of at
//! most [`capacity`] (the CLI does), or the streams that wait could take the whole connection
//! window from those that hold slots.

use crate::pool::WeakJobHandle;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// File descriptors a volume may need at once: in process its file and the directory of a new
/// file; for a helper the parent's socket, pidfd and directory (the few more of a spawn in
/// progress, one per pool worker at a time, come from the reserve).
pub const FDS_PER_VOLUME: u64 = 4;

struct Budget {
    capacity: usize,
    open: usize,
    waiting: VecDeque<Arc<Waiter>>,
}

#[derive(Default)]
struct Waiter {
    /// A slot was handed over (under the budget's lock).
    granted: AtomicBool,
    job: Mutex<Option<WeakJobHandle>>,
}

fn budget() -> &'static Mutex<Budget> {
    static BUDGET: OnceLock<Mutex<Budget>> = OnceLock::new();
    BUDGET.get_or_init(|| {
        Mutex::new(Budget {
            capacity: from_fd_limit(),
            open: 0,
            waiting: VecDeque::new(),
        })
    })
}

/// Slots for the soft fd limit: a quarter of the fds (at least 32) are kept for everything
/// else (sockets, the event loop, the host's own), the rest divided by [`FDS_PER_VOLUME`].
fn from_fd_limit() -> usize {
    let soft = fd_limit().0;
    let reserve = (soft / 4).max(32);
    (soft.saturating_sub(reserve) / FDS_PER_VOLUME).clamp(1, 1 << 20) as usize
}

/// The RLIMIT_NOFILE soft and hard limits.
pub fn fd_limit() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } < 0 {
        return (1024, 1024);
    }
    (r.rlim_cur, r.rlim_max)
}

/// Raises the soft RLIMIT_NOFILE to the hard one (the soft default, 1024, dates from select(2),
/// which nothing here uses). Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one struct through a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    r.rlim_cur
}

/// Volumes that may be open at once.
pub fn capacity() -> usize {
    budget().lock().unwrap().capacity
}

/// Sets how many volumes may be open at once (a host that knows its fds better).
pub fn set_capacity(n: usize) {
    let granted = {
        let mut b = budget().lock().unwrap();
        b.capacity = n.max(1);
        b.hand_over()
    };
    wake(granted);
}

/// Volumes open now, and volumes waiting for a slot.
pub fn usage() -> (usize, usize) {
    let b = budget().lock().unwrap();
    (b.open, b.waiting.len())
}

impl Budget {
    /// Gives free slots to the first in line; returns their jobs, to be scheduled unlocked.
    fn hand_over(&mut self) -> Vec<WeakJobHandle> {
        let mut jobs = Vec::new();
        while self.open < self.capacity {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.open += 1;
            w.granted.store(true, Ordering::SeqCst);
            jobs.extend(w.job.lock().unwrap().clone());
        }
        jobs
    }
}

fn wake(jobs: Vec<WeakJobHandle>) {
    for j in jobs {
        j.schedule();
    }
}

/// One volume's slot: held from `try_hold` returning true until dropped.
#[derive(Default)]
pub struct Slot {
    waiter: Option<Arc<Waiter>>,
    held: bool,
}

impl Slot {
    /// True when this volume holds a slot. Otherwise it is in line, and `job` is scheduled
    /// when a slot is handed to it (then call again).
    pub fn try_hold(&mut self, job: &WeakJobHandle) -> bool {
        if self.held {
            return true;
        }
        if let Some(w) = &self.waiter {
            if w.granted.load(Ordering::SeqCst) {
                self.held = true;
                return true;
            }
            return false;
        }
        let mut b = budget().lock().unwrap();
        if b.open < b.capacity && b.waiting.is_empty() {
            b.open += 1;
            self.held = true;
            return true;
        }
        let w = Arc::new(Waiter::default());
        *w.job.lock().unwrap() = Some(job.clone());
        b.waiting.push_back(Arc::clone(&w));
        self.waiter = Some(w);
        false
    }

    /// Gives the slot back (or leaves the line) now rather than on drop.
    pub fn release(&mut self) {
        let granted = {
            let mut b = budget().lock().unwrap();
            let waiter = self.waiter.take();
            let had = self.held
                || waiter
                    .as_ref()
                    .is_some_and(|w| w.granted.load(Ordering::SeqCst));
            self.held = false;
            if had {
                b.open -= 1;
                b.hand_over()
            } else {
                if let Some(w) = waiter {
                    b.waiting.retain(|x| !Arc::ptr_eq(x, &w));
                }
                Vec::new()
            }
        };
        wake(granted);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held || self.waiter.is_some() {
            self.release();
        }
    }
}
