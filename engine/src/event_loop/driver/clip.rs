//! Serving a ranged READ from a source that reads only whole volumes (an NBD export, the
//! iohelper's pipe, memory): its chunks are cut to the ranges asked for ([`Cutter`]), the rest
//! dropped. Correct for any source; it reads what it drops, so sources that can seek say so
//! (`serves_ranges`) and are left alone.

use crate::cut::Cutter;
use crate::range::RangeSet;
use crate::volume::{Chunk, Notify, VolumeError, VolumeReader};
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;

pub(super) struct Clip {
    inner: Box<dyn VolumeReader>,
    cutter: Cutter,
    /// Pieces of one source chunk that spans several ranges.
    ready: VecDeque<Chunk>,
    size: u64,
}

impl Clip {
    pub fn new(inner: Box<dyn VolumeReader>, ranges: Arc<RangeSet>) -> Self {
        Clip {
            inner,
            cutter: Cutter::new(ranges),
            ready: VecDeque::new(),
            size: 0,
        }
    }
}

impl VolumeReader for Clip {
    fn start(&mut self, notify: Notify) {
        self.inner.start(notify);
    }

    fn poll_size(&mut self) -> Poll<Result<u64, VolumeError>> {
        let size = self.inner.poll_size();
        if let Poll::Ready(Ok(s)) = size {
            self.size = s;
        }
        size
    }

    fn poll_chunk(&mut self) -> Poll<Result<Chunk, VolumeError>> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Poll::Ready(Ok(piece));
            }
            if self.cutter.is_done() {
                // Nothing more is wanted: the source need not be read to its end.
                self.inner.cancel();
                return Poll::Ready(Ok(self.cutter.end(self.size)));
            }
            match self.inner.poll_chunk() {
                Poll::Ready(Ok(Chunk::End { length, .. })) => {
                    // The source ended before the ranges did: the engine's own check (the
                    // ranges lie inside the size) makes this a source that lied about its size.
                    let (kept, asked) = self.cutter.progress();
                    return Poll::Ready(Err(VolumeError::new(
                        crate::Reason::Internal,
                        format!(
                            "the source ended at {length} before the ranges asked for ({kept} of {asked})"
                        ),
                    )));
                }
                Poll::Ready(Ok(chunk)) => {
                    let mut pieces = Vec::new();
                    self.cutter.cut(&chunk, &mut pieces);
                    self.ready.extend(pieces);
                }
                other => return other,
            }
        }
    }

    fn poll_failure(&mut self) -> Option<VolumeError> {
        self.inner.poll_failure()
    }

    fn identity(&self) -> Option<crate::VolumeIdentity> {
        self.inner.identity()
    }

    fn cancel(&mut self) {
        self.inner.cancel();
    }
}
