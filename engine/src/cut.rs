//! Cutting a whole volume's chunks to a range list: for a source that cannot seek (an NBD
//! export, a pipe, memory) asked for some ranges. What is kept is digested as a range-aware
//! source digests what it yields, so the receiver cannot tell the two apart.

use crate::range::RangeSet;
use crate::volume::Chunk;
use crate::Digest;
use std::sync::Arc;

/// Walks chunks in offset order and keeps their parts inside the ranges.
pub struct Cutter {
    ranges: Arc<RangeSet>,
    /// Index of the first range not yet wholly kept.
    index: usize,
    digest: Digest,
}

impl Cutter {
    pub fn new(ranges: Arc<RangeSet>) -> Self {
        Cutter {
            ranges,
            index: 0,
            digest: Digest::new(),
        }
    }

    /// Appends to `out` the parts of `chunk` inside the ranges, in order. `Chunk::End` is
    /// not cut: the caller ends with [`Cutter::end`].
    pub fn cut(&mut self, chunk: &Chunk, out: &mut Vec<Chunk>) {
        let (offset, len) = match chunk {
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
                out.push(match chunk {
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
                });
            }
            if r.end() > end {
                break;
            }
            self.index += 1;
        }
    }

    /// Every range was kept whole: the source need not be read further.
    pub fn is_done(&self) -> bool {
        self.index == self.ranges.len()
    }

    /// Ranges wholly kept and ranges asked for, for messages.
    pub fn progress(&self) -> (usize, usize) {
        (self.index, self.ranges.len())
    }

    /// The end of a volume of `length` bytes, with the digest of what was kept.
    pub fn end(&self, length: u64) -> Chunk {
        Chunk::End {
            length,
            digest: Some(self.digest.value()),
        }
    }
}
