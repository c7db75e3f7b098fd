//! A volume source read by a helper process.

use super::entry::{Entry, ReadSide, Side, State};
use super::options::HelperOptions;
use super::spawn::{on_pool, spawn, Launch};
use super::wire::Msg;
use super::READ_WINDOW;
use crate::error::Error;
use crate::fd::Location;
use crate::pool::JobHandle;
use crate::reader::ReaderOptions;
use engine::{Chunk, Notify, VolumeError, VolumeReader};
use std::ffi::{CStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

/// A volume source read by a helper process. Semantics as [`crate::FileReader`]; built, like
/// it, by [`Backend`](super::Backend).
pub struct HelperReader {
    location: Option<Location>,
    options: ReaderOptions,
    helper: HelperOptions,
    entry: Option<Arc<Entry>>,
    /// The job that spawns the helper, kept alive while it waits for a slot.
    spawner: Option<JobHandle>,
}

fn side(st: &mut State) -> &mut ReadSide {
    match &mut st.side {
        Side::Read(r) => r,
        Side::Write(_) => unreachable!("a reader's helper writes"),
    }
}

impl HelperReader {
    pub fn new(location: Location, options: ReaderOptions, helper: HelperOptions) -> Self {
        HelperReader {
            location: Some(location),
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

/// The helper's command line for reading `location`.
fn launch(location: Location, options: &ReaderOptions, direct: bool) -> Result<Launch, Error> {
    let mut l = Launch::new("read");
    let location_shown = location.describe();
    l.value("--shown", &location_shown);
    match location {
        Location::Path(p) | Location::Named(p, _) => l.value("--path", p),
        Location::Open(f) => l.fd(OwnedFd::from(f), "--fd", None),
        Location::At { dir, name, .. } => {
            refuse_qcow2(&dir, &name, &location_shown)?;
            let d = dir
                .try_clone()
                .map_err(|e| Error::io("duplicating the pool fd", e))?;
            l.fd(d, "--dir-fd", Some(OsString::from_vec(name.into_bytes())));
        }
    }
    l.value("--granularity", options.zero_granularity.to_string());
    l.flag("--no-extents", options.no_extents);
    l.flag("--force-share", options.force_share);
    if let Some(n) = options.stream_size {
        l.value("--stream-size", n.to_string());
    }
    l.flag("--direct", direct || options.direct);
    Ok(l)
}

/// A helper copies a file's bytes; a qcow2 image in a pool is a volume only as its guest view,
/// which the in-process reader gives through qemu-nbd. Sending the container's bytes under the
/// guest size that LIST reports would hand the client a corrupt disk, so the helper path
/// refuses it instead.
fn refuse_qcow2(dir: &OwnedFd, name: &CStr, shown: &str) -> Result<(), Error> {
    let Ok(file) = crate::fd::open_beneath(dir, name, libc::O_RDONLY | libc::O_NONBLOCK) else {
        // The helper opens it again and reports why it cannot.
        return Ok(());
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    match crate::qemu::qcow2_header(&file) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(Error::Unsupported(format!(
            "{shown} is a qcow2 image, which is read through qemu-nbd, not through --iohelper; serve it without --iohelper"
        ))),
        Err(e) => Err(Error::io(format!("reading the header of {shown}"), e)),
    }
}

impl VolumeReader for HelperReader {
    fn start(&mut self, notify: Notify) {
        let Some(location) = self.location.take() else {
            return;
        };
        let side = Side::Read(ReadSide::default());
        let entry = Entry::new(side, location.describe(), notify, self.helper.timeout);
        self.entry = Some(Arc::clone(&entry));
        let (options, helper) = (self.options.clone(), self.helper.clone());
        let spawner = on_pool(
            self.options.pool.clone(),
            Arc::clone(&entry),
            move || match launch(location, &options, helper.direct) {
                Ok(l) => spawn(&entry, helper.program(), l, Some(Msg::Credit(READ_WINDOW))),
                Err(e) => entry.fail(e.into()),
            },
        );
        self.spawner = Some(spawner);
    }

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        let mut st = entry.st.lock().unwrap();
        let r = side(&mut st);
        match (&r.size, &r.error) {
            (Some(size), _) => Poll::Ready(size.clone()),
            (None, Some(e)) => Poll::Ready(Err(e.clone())),
            (None, None) => Poll::Pending,
        }
    }

    fn poll_failure(&mut self) -> Option<VolumeError> {
        side(&mut self.entry.as_ref()?.st.lock().unwrap())
            .error
            .clone()
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let Some(entry) = &self.entry else {
            return Poll::Pending;
        };
        let mut st = entry.st.lock().unwrap();
        let r = side(&mut st);
        let Some(chunk) = r.queue.pop_front() else {
            return match &r.error {
                Some(e) => Poll::Ready(Err(e.clone())),
                None => Poll::Pending,
            };
        };
        if let Chunk::Data { bytes, .. } = &chunk {
            r.consumed += bytes.len() as u64;
            // Credit goes back in batches of half a window, as the engine's WINDOW frames do.
            if r.consumed >= READ_WINDOW / 2 && !r.ended && r.error.is_none() {
                let n = std::mem::take(&mut r.consumed);
                // The helper was waiting for credit: its silence so far was ours.
                let waited = r.granted == r.received;
                r.granted += n;
                if waited {
                    st.last_activity = Some(Instant::now());
                }
                st.push(&Msg::Credit(n));
                if let Err(e) = st.flush() {
                    log::debug!("granting credit to {}: {e}", entry.shown);
                }
            }
        }
        Poll::Ready(Ok(chunk))
    }

    fn cancel(&mut self) {
        if let Some(entry) = &self.entry {
            entry.cancel();
        }
    }
}

impl Drop for HelperReader {
    fn drop(&mut self) {
        self.cancel();
    }
}
