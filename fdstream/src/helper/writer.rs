//! A volume sink written by a helper process.

use super::entry::{Entry, Side, State, WriteSide};
use super::options::HelperOptions;
use super::spawn::{on_pool, spawn, Launch};
use super::wire::Msg;
use crate::error::Error;
use crate::fd::Location;
use crate::pool::JobHandle;
use crate::writer::{create_dir, WriteTarget, WriterOptions};
use engine::{Chunk, Notify, VolumeError, VolumeWriter, WriteProgress};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

/// A volume sink written by a helper process. Semantics as [`crate::FileWriter`]; built, like
/// it, by [`Backend`](super::Backend).
pub struct HelperWriter {
    target: Option<WriteTarget>,
    options: WriterOptions,
    helper: HelperOptions,
    entry: Option<Arc<Entry>>,
    /// The job that spawns the helper, kept alive while it waits for a slot.
    spawner: Option<JobHandle>,
}

fn side(st: &mut State) -> &mut WriteSide {
    match &mut st.side {
        Side::Write(w) => w,
        Side::Read(_) => unreachable!("a writer's helper reads"),
    }
}

impl HelperWriter {
    pub fn new(target: WriteTarget, options: WriterOptions, helper: HelperOptions) -> Self {
        HelperWriter {
            target: Some(target),
            options,
            helper,
            entry: None,
            spawner: None,
        }
    }

    /// The helper's pid, once it runs.
    pub fn pid(&self) -> Option<u32> {
        self.entry.as_ref()?.pid()
    }
}

/// The helper's command line for writing `size` bytes to `target`.
fn launch(
    entry: &Entry,
    target: WriteTarget,
    size: u64,
    options: &WriterOptions,
    direct: bool,
) -> Result<Launch, Error> {
    let mut l = Launch::new("write");
    l.value("--shown", entry.shown.clone());
    l.value("--size", size.to_string());
    let name_arg = |name: std::ffi::CString| Some(OsString::from_vec(name.into_bytes()));
    let dup = |dir: &OwnedFd| {
        dir.try_clone()
            .map_err(|e| Error::io("duplicating a dir fd", e))
    };
    match target {
        WriteTarget::Create {
            dir,
            dir_path,
            name,
            ..
        } => {
            // The parent opens the directory so that it can remove the temporary file of a
            // helper that died.
            let dir = create_dir(dir, dir_path)?;
            // Named here, so the name is known whenever the helper dies.
            let temp = crate::temp::name(name.as_bytes());
            l.value("--temp", OsString::from_vec(temp.as_bytes().to_vec()));
            side(&mut entry.st.lock().unwrap()).temp = Some(temp);
            l.fd(dup(&dir)?, "--create", name_arg(name));
            l.dir = Some(dir);
        }
        WriteTarget::InPlace(Location::Path(p) | Location::Named(p, _)) => l.value("--path", p),
        WriteTarget::InPlace(Location::Open(f)) => l.fd(OwnedFd::from(f), "--fd", None),
        WriteTarget::InPlace(Location::At { dir, name, .. }) => {
            l.fd(dup(&dir)?, "--in-dir", name_arg(name))
        }
    }
    l.flag("--allocated", options.allocated);
    l.flag("--destination-is-zero", options.destination_is_zero);
    l.flag("--overwrite", options.overwrite);
    l.flag("--no-sync", options.no_sync);
    l.flag("--verify", options.verify);
    l.flag("--direct", direct || options.direct);
    Ok(l)
}

impl VolumeWriter for HelperWriter {
    fn start(&mut self, size: u64, notify: Notify) {
        let Some(target) = self.target.take() else {
            return;
        };
        let side = Side::Write(WriteSide::default());
        let entry = Entry::new(side, target.describe(), notify, self.helper.timeout);
        self.entry = Some(Arc::clone(&entry));
        let (options, helper) = (self.options.clone(), self.helper.clone());
        let spawner = on_pool(
            self.options.pool.clone(),
            Arc::clone(&entry),
            move || match launch(&entry, target, size, &options, helper.direct) {
                Ok(l) => spawn(&entry, helper.program(), l, None),
                Err(e) => entry.fail(e.into()),
            },
        );
        self.spawner = Some(spawner);
    }

    fn poll_ready(&mut self) -> Poll<Result<(), VolumeError>> {
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        match &side(&mut entry.st.lock().unwrap()).ready {
            Some(r) => Poll::Ready(r.clone()),
            None => Poll::Pending,
        }
    }

    fn write(&mut self, chunk: Chunk) {
        let Some(entry) = &self.entry else { return };
        let mut st = entry.st.lock().unwrap();
        if st.cancelled.is_some() {
            return;
        }
        let w = side(&mut st);
        if w.outcome.is_some() {
            return;
        }
        // The helper had nothing to do until now: its silence so far was ours.
        let idle = w.completed == w.sent;
        w.sent += 1;
        if idle {
            st.last_activity = Some(Instant::now());
        }
        st.push(&Msg::from_chunk(chunk));
        if let Err(e) = st.flush() {
            log::debug!("writing to the helper for {}: {e}", entry.shown);
        }
    }

    fn poll_progress(&mut self) -> WriteProgress {
        let Some(entry) = &self.entry else {
            return WriteProgress::default();
        };
        let mut st = entry.st.lock().unwrap();
        let w = side(&mut st);
        WriteProgress {
            completed: w.completed,
            outcome: w.outcome.clone(),
        }
    }

    fn cancel(&mut self) {
        if let Some(entry) = &self.entry {
            entry.cancel();
        }
    }
}

impl Drop for HelperWriter {
    fn drop(&mut self) {
        self.cancel();
    }
}
