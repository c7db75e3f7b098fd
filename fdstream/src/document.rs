//! Small generated documents (the volume list, an allocation map) served as stream content.
//! Building one stats files or reads a whole device, so it happens on a worker, like any read.

use crate::error::Error;
use crate::pool::{Job, Pool, Step};
use bytes::Bytes;
use engine::{Chunk, Digest, Notify, VolumeError, VolumeReader};
use std::sync::{Arc, Mutex};
use std::task::Poll;

type Build = Box<dyn FnOnce() -> Result<Bytes, Error> + Send>;

#[derive(Default)]
struct Shared {
    build: Option<Build>,
    result: Option<Result<Bytes, VolumeError>>,
    notify: Option<Notify>,
}

struct BuildJob(Arc<Mutex<Shared>>);

impl Job for BuildJob {
    fn run(&self) -> Step {
        let build = self.0.lock().unwrap().build.take();
        if let Some(build) = build {
            let result = build().map_err(VolumeError::from);
            let notify = {
                let mut shared = self.0.lock().unwrap();
                shared.result = Some(result);
                shared.notify.clone()
            };
            if let Some(n) = notify {
                n.notify();
            }
        }
        Step::Idle
    }
}

/// A reader whose content is built once, off the loop, by a closure.
pub struct DocumentReader {
    shared: Arc<Mutex<Shared>>,
    pool: Arc<Pool>,
    content: Option<Bytes>,
    sent: bool,
}

impl DocumentReader {
    pub fn new(
        pool: Option<Arc<Pool>>,
        build: impl FnOnce() -> Result<Bytes, Error> + Send + 'static,
    ) -> Self {
        DocumentReader {
            shared: Arc::new(Mutex::new(Shared {
                build: Some(Box::new(build)),
                ..Shared::default()
            })),
            pool: pool.unwrap_or_else(Pool::shared),
            content: None,
            sent: false,
        }
    }
}

impl VolumeReader for DocumentReader {
    fn start(&mut self, notify: Notify) {
        self.shared.lock().unwrap().notify = Some(notify);
        self.pool
            .register(BuildJob(Arc::clone(&self.shared)))
            .schedule();
    }

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        match self.shared.lock().unwrap().result.take() {
            None => Poll::Pending,
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(content)) => {
                let size = content.len() as u64;
                self.content = Some(content);
                Poll::Ready(Ok(size))
            }
        }
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        let content = self.content.clone().unwrap_or_default();
        if !self.sent && !content.is_empty() {
            self.sent = true;
            return Poll::Ready(Ok(Chunk::Data {
                offset: 0,
                bytes: content,
            }));
        }
        Poll::Ready(Ok(Chunk::End {
            length: content.len() as u64,
            digest: Some(digest(&content)),
        }))
    }
}

fn digest(content: &[u8]) -> u32 {
    let mut d = Digest::new();
    d.update(content);
    d.value()
}
