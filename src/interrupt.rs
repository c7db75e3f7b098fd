//! SIGINT and SIGTERM during transfers: instead of dying with temporaries left behind, the
//! command stops its transfers (each writer removes its temporary), waits for that, and says
//! so in one line. A second signal exits at once.

use crate::error::CliError;
use nix::sys::signal::{SigSet, Signal};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// The signals a transfer command handles itself.
pub struct Interrupts {
    set: SigSet,
    caught: Arc<AtomicI32>,
}

impl Interrupts {
    /// Blocks SIGINT and SIGTERM in this thread and so in every thread it starts later (the
    /// event loop, the workers): call it before any of them. Until `watch`, a signal waits.
    pub fn block() -> Result<Interrupts, CliError> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.thread_block()
            .map_err(|e| CliError::Other(format!("cannot block signals: {e}")))?;
        Ok(Interrupts {
            set,
            caught: Arc::default(),
        })
    }

    /// Starts the thread that takes the signals: the first runs `stop` there.
    pub fn watch(&self, stop: impl FnOnce() + Send + 'static) {
        let (set, caught) = (self.set, Arc::clone(&self.caught));
        std::thread::spawn(move || {
            let Ok(signal) = set.wait() else { return };
            caught.store(signal as i32, Ordering::SeqCst);
            stop();
            if let Ok(again) = set.wait() {
                crate::out::tell!("volstream: {again:?} again: exiting without cleaning up");
                std::process::exit(128 + again as i32);
            }
        });
    }

    /// The signal that arrived, if one did.
    pub fn caught(&self) -> Option<Signal> {
        Signal::try_from(self.caught.load(Ordering::SeqCst)).ok()
    }
}
