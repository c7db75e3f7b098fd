//! The worker threads that do every blocking call for every stream, so the event loop never
//! does.
//!
//! Each stream registers one [`Job`]. A job is in the pool's queue at most once and runs on at
//! most one worker at a time, so a stream's I/O stays sequential and in order. A run does a
//! bounded amount of work (one buffer, one chunk, one slice of a hole) and then goes to the back
//! of the queue if it has more, so streams interleave round-robin.
//!
//! Remaining limit: a single system call that blocks (a write to a FIFO nobody reads, an
//! NFS server gone away) pins its worker until it returns. With `N` workers, `N` such streams
//! stall everything; one stuck stream leaves `N - 1` workers for the rest.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;

/// Workers in the pool shared by default.
pub const DEFAULT_WORKERS: usize = 4;

/// What a run of a job asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More work is ready: queue the job again (behind the others).
    Again,
    /// Nothing to do until someone calls [`JobHandle::schedule`].
    Idle,
}

/// One stream's work. `run` does a bounded amount and returns.
pub trait Job: Send + Sync + 'static {
    fn run(&self) -> Step;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Queued,
    Running,
    /// Scheduled while running: queue it again when the run ends, whatever it returns.
    RunningAgain,
}

struct Slot {
    job: Box<dyn Job>,
    state: Mutex<State>,
}

struct Inner {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Signalled when the queue is empty and no job runs.
    idle: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Arc<Slot>>,
    running: usize,
    shutdown: bool,
}

impl Inner {
    fn push(&self, slot: Arc<Slot>) {
        self.queue.lock().unwrap().jobs.push_back(slot);
        self.wake.notify_one();
    }
}

/// A fixed set of worker threads. Dropping the pool stops its workers once they finish their
/// current runs; jobs still queued are dropped.
pub struct Pool {
    inner: Arc<Inner>,
    workers: usize,
}

impl Pool {
    pub fn new(workers: usize) -> std::io::Result<Arc<Pool>> {
        let workers = workers.max(1);
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            idle: Condvar::new(),
        });
        for i in 0..workers {
            let inner = Arc::clone(&inner);
            thread::Builder::new()
                .name(format!("fdstream-{i}"))
                .spawn(move || work(&inner))?;
        }
        Ok(Arc::new(Pool { inner, workers }))
    }

    /// The process-wide pool ([`DEFAULT_WORKERS`] threads, or `VOLSTREAM_WORKERS`).
    pub fn shared() -> Arc<Pool> {
        static SHARED: OnceLock<Arc<Pool>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let n = std::env::var("VOLSTREAM_WORKERS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(DEFAULT_WORKERS);
                Pool::new(n).expect("cannot start fdstream worker threads")
            })
            .clone()
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Waits (at most `timeout`) until no job is queued or running, e.g. so a process that is
    /// about to exit lets cancelled writers remove their temporaries. True if it got there.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let q = self.inner.queue.lock().unwrap();
        let (_q, result) = self
            .inner
            .idle
            .wait_timeout_while(q, timeout, |q| !q.jobs.is_empty() || q.running > 0)
            .unwrap();
        !result.timed_out()
    }

    /// Adds a job, idle until its handle schedules it.
    pub fn register(&self, job: impl Job) -> JobHandle {
        JobHandle {
            slot: Arc::new(Slot {
                job: Box::new(job),
                state: Mutex::new(State::Idle),
            }),
            pool: Arc::clone(&self.inner),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.queue.lock().unwrap().shutdown = true;
        self.inner.wake.notify_all();
    }
}

/// Schedules one registered job; cheap to clone and to call from any thread.
#[derive(Clone)]
pub struct JobHandle {
    slot: Arc<Slot>,
    pool: Arc<Inner>,
}

/// A [`JobHandle`] that does not keep its job alive: for a job that must wake itself (the
/// open-volume budget hands it a slot) without a reference cycle.
#[derive(Clone)]
pub struct WeakJobHandle {
    slot: std::sync::Weak<Slot>,
    pool: std::sync::Weak<Inner>,
}

impl WeakJobHandle {
    /// Schedules the job if it and its pool still exist.
    pub fn schedule(&self) {
        if let (Some(slot), Some(pool)) = (self.slot.upgrade(), self.pool.upgrade()) {
            JobHandle { slot, pool }.schedule();
        }
    }
}

impl JobHandle {
    pub fn downgrade(&self) -> WeakJobHandle {
        WeakJobHandle {
            slot: Arc::downgrade(&self.slot),
            pool: Arc::downgrade(&self.pool),
        }
    }

    /// Makes sure the job runs (again) soon. Never blocks on the job itself.
    pub fn schedule(&self) {
        let mut state = self.slot.state.lock().unwrap();
        match *state {
            State::Idle => {
                *state = State::Queued;
                drop(state);
                self.pool.push(Arc::clone(&self.slot));
            }
            State::Running => *state = State::RunningAgain,
            State::Queued | State::RunningAgain => {}
        }
    }
}

fn work(inner: &Inner) {
    loop {
        let slot = {
            let mut q = inner.queue.lock().unwrap();
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(slot) = q.jobs.pop_front() {
                    q.running += 1;
                    break slot;
                }
                q = inner.wake.wait(q).unwrap();
            }
        };
        *slot.state.lock().unwrap() = State::Running;
        let step = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.job.run())) {
            Ok(step) => step,
            Err(_) => {
                // A bug in one job must not take a worker away from every other stream.
                log::error!("an fdstream job panicked; it will not run again");
                *slot.state.lock().unwrap() = State::Queued;
                let mut q = inner.queue.lock().unwrap();
                q.running -= 1;
                if q.jobs.is_empty() && q.running == 0 {
                    inner.idle.notify_all();
                }
                continue;
            }
        };
        let again = {
            let mut state = slot.state.lock().unwrap();
            if step == Step::Again || *state == State::RunningAgain {
                *state = State::Queued;
                true
            } else {
                *state = State::Idle;
                false
            }
        };
        let mut q = inner.queue.lock().unwrap();
        if again {
            // This worker pops the queue's front next. When that is this same job, waking
            // another worker only bounced a busy stream between workers (a context switch
            // per run); when other jobs wait in front, someone else must take this one.
            let others_waiting = !q.jobs.is_empty();
            q.jobs.push_back(slot);
            if others_waiting {
                inner.wake.notify_one();
            }
        }
        q.running -= 1;
        if q.jobs.is_empty() && q.running == 0 {
            inner.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    struct Count(Arc<AtomicU64>, u64);
    impl Job for Count {
        fn run(&self) -> Step {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            if n < self.1 {
                Step::Again
            } else {
                Step::Idle
            }
        }
    }

    struct Stuck(Arc<Mutex<()>>);
    impl Job for Stuck {
        fn run(&self) -> Step {
            drop(self.0.lock().unwrap());
            Step::Idle
        }
    }

    #[test]
    fn a_blocked_job_leaves_the_other_workers_running() {
        let pool = Pool::new(2).unwrap();
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        pool.register(Stuck(Arc::clone(&gate))).schedule();
        let counters: Vec<_> = (0..10).map(|_| Arc::new(AtomicU64::new(0))).collect();
        for c in &counters {
            pool.register(Count(Arc::clone(c), 100)).schedule();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.iter().any(|c| c.load(Ordering::SeqCst) < 100) {
            assert!(Instant::now() < deadline, "jobs starved behind a stuck one");
            thread::sleep(Duration::from_millis(1));
        }
        drop(held);
    }

    #[test]
    fn scheduling_while_running_runs_again() {
        let pool = Pool::new(1).unwrap();
        let c = Arc::new(AtomicU64::new(0));
        let h = pool.register(Count(Arc::clone(&c), 1));
        for _ in 0..50 {
            h.schedule();
        }
        thread::sleep(Duration::from_millis(50));
        let n = c.load(Ordering::SeqCst);
        assert!((1..=50).contains(&n), "{n}");
        h.schedule();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(c.load(Ordering::SeqCst), n + 1);
    }
}
