//! Bytes waiting for the socket, as a queue of shared segments handed to writev.
//!
//! Headers are encoded into one growing scratch buffer and split off; payloads are the `Bytes`
//! the source produced. Nothing on the data path is copied before the kernel does.

use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::IoSlice;

#[derive(Debug, Default)]
pub struct Transmit {
    segments: VecDeque<Bytes>,
    len: usize,
}

impl Transmit {
    pub fn push(&mut self, segment: Bytes) {
        if !segment.is_empty() {
            self.len += segment.len();
            self.segments.push_back(segment);
        }
    }

    /// Moves all of `other`'s segments behind ours.
    pub fn append(&mut self, other: &mut Transmit) {
        self.len += std::mem::take(&mut other.len);
        self.segments.append(&mut other.segments);
    }

    /// The segments, front first.
    pub fn segments(&self) -> impl Iterator<Item = &Bytes> {
        self.segments.iter()
    }

    /// Bytes not yet written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `slices` with the front segments; returns how many were filled.
    pub fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, segment) in slices.iter_mut().zip(self.segments.iter()) {
            *slot = IoSlice::new(segment);
            n += 1;
        }
        n
    }

    /// Drops `written` bytes from the front, after a (possibly partial) write.
    pub fn advance(&mut self, mut written: usize) {
        self.len -= written;
        while written > 0 {
            let front = self
                .segments
                .front_mut()
                .expect("advance past queued bytes");
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.segments.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_resume_mid_segment() {
        let mut t = Transmit::default();
        t.push(Bytes::from_static(b"abc"));
        t.push(Bytes::from_static(b"defg"));
        t.advance(4);
        assert_eq!(t.len(), 3);
        let mut slices = [IoSlice::new(&[]); 4];
        let n = t.io_slices(&mut slices);
        assert_eq!(n, 1);
        assert_eq!(&*slices[0], b"efg");
    }
}
