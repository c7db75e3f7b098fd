//! A ranged read of a producer that reads only whole volumes (a qcow2 image through qemu-nbd,
//! known to be one only once it is opened): its chunks cut to the ranges by
//! [`engine::cut::Cutter`], and its reading stopped once the last range is through.

use super::{Produce, Produced};
use crate::error::Error;
use engine::cut::Cutter;
use engine::{Chunk, RangeSet};
use std::sync::Arc;

pub(crate) struct Cut<P> {
    inner: P,
    /// None: the whole volume is read, as `inner` yields it.
    cutter: Option<Cutter>,
    size: u64,
}

impl<P: Produce> Cut<P> {
    pub(crate) fn new(inner: P, ranges: Option<Arc<RangeSet>>) -> Self {
        Cut {
            inner,
            cutter: ranges.map(Cutter::new),
            size: 0,
        }
    }
}

impl<P: Produce> Produce for Cut<P> {
    fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    fn close(&mut self) {
        self.inner.close()
    }

    fn serves_ranges(&self) -> bool {
        self.cutter.is_some()
    }

    fn step(&mut self) -> Result<Produced, Error> {
        let p = self.inner.step()?;
        let Some(cutter) = &mut self.cutter else {
            return Ok(p);
        };
        if let Some(size) = p.size {
            self.size = size;
        }
        let mut out = Produced {
            size: p.size,
            identity: p.identity,
            ..Produced::default()
        };
        for chunk in &p.chunks {
            if let Chunk::End { length, .. } = chunk {
                if !cutter.is_done() {
                    let (kept, asked) = cutter.progress();
                    return Err(Error::Unsupported(format!(
                        "the volume ended at {length} before the ranges asked for \
                         ({kept} of {asked})"
                    )));
                }
            }
            cutter.cut(chunk, &mut out.chunks);
        }
        if cutter.is_done() {
            out.chunks.push(cutter.end(self.size));
            out.end = true;
            self.inner.close();
        }
        Ok(out)
    }
}
