//! Serving a ranged READ from a source that reads only whole volumes (an NBD export, the
//! iohelper's pipe, memory): its chunks are cut to the ranges asked for, the rest dropped, and
//! the digest is computed over what is kept, as a range-aware source would. Correct for any
//! source; it reads what it drops, so sources that can seek say so (`serves_ranges`) and are
//! left alone.

use crate::range::RangeSet;
use crate::volume::{Chunk, Notify, VolumeError, VolumeReader};
use crate::Digest;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;

pub(super) struct Clip {
    inner: Box<dyn VolumeReader>,
    ranges: Arc<RangeSet>,
    /// Index of the first range not yet wholly yielded.
    index: usize,
    digest: Digest,
    /// Pieces of one source chunk that spans several ranges.
    ready: VecDeque<Chunk>,
    size: u64,
}

impl Clip {
    pub fn new(inner: Box<dyn VolumeReader>, ranges: Arc<RangeSet>) -> Self {
        Clip {
            inner,
            ranges,
            index: 0,
            digest: Digest::new(),
            ready: VecDeque::new(),
            size: 0,
        }
    }

    /// The parts of `chunk` inside the ranges, in order, into `ready`.
    fn cut(&mut self, chunk: Chunk) {
        let (offset, len) = match &chunk {
            Chunk::Data { offset, bytes } => (*offset, bytes.len() as u64),
            Chunk::Hole { offset, len } => (*offset, *len),
            Chunk::End { .. } => return,
        };
        let end = offset + len;
        let ranges = self.ranges.ranges();
        while let Some(r) = ranges.get(self.index) {
            if r.offset >= end {
                break;
            }
            let (from, to) = (r.offset.max(offset), r.end().min(end));
            if from < to {
                let piece = match &chunk {
                    Chunk::Data { bytes, .. } => {
                        let bytes = bytes.slice((from - offset) as usize..(to - offset) as usize);
                        self.digest.update(&bytes);
                        Chunk::Data {
                            offset: from,
                            bytes,
                        }
                    }
                    _ => {
                        self.digest.update_zeroes(to - from);
                        Chunk::Hole {
                            offset: from,
                            len: to - from,
                        }
                    }
                };
                self.ready.push_back(piece);
            }
            if r.end() > end {
                break;
            }
            self.index += 1;
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
            if self.index == self.ranges.len() {
                // Nothing more is wanted: the source need not be read to its end.
                self.inner.cancel();
                return Poll::Ready(Ok(Chunk::End {
                    length: self.size,
                    digest: Some(self.digest.value()),
                }));
            }
            match self.inner.poll_chunk() {
                Poll::Ready(Ok(Chunk::End { length, .. })) => {
                    // The source ended before the ranges did: the engine's own check (the
                    // ranges lie inside the size) makes this a source that lied about its size.
                    return Poll::Ready(Err(VolumeError::new(
                        crate::Reason::Internal,
                        format!(
                            "the source ended at {length} before the ranges asked for ({} of {})",
                            self.index,
                            self.ranges.len()
                        ),
                    )));
                }
                Poll::Ready(Ok(chunk)) => self.cut(chunk),
                other => return other,
            }
        }
    }

    fn poll_failure(&mut self) -> Option<VolumeError> {
        self.inner.poll_failure()
    }

    fn cancel(&mut self) {
        self.inner.cancel();
    }
}
