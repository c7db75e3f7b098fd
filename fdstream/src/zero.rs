//! Zero detection: which granularity-sized blocks of a buffer read as zero, so they can travel
//! as holes.

use bytes::Bytes;
use engine::Chunk;

/// Whether every byte of `buf` is zero. Looks at the first 16 bytes first, because non-zero
/// data nearly always shows there, then ORs the rest in 64-byte strides the compiler vectorises.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, rest) = buf.split_at(buf.len().min(16));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    let mut chunks = rest.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// A run of a buffer: data to send, or zeroes to send as a hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    Data { offset: u64, bytes: Bytes },
    Zero { offset: u64, len: u64 },
}

/// A source's output in offset order: holes next to each other (from an extent map, from
/// zero detection, from an NBD hole reply) merged into one chunk, data queued as the slices of
/// the buffer read. Digesting stays with the source, which knows what it has digested.
#[derive(Debug, Default)]
pub(crate) struct Coalesce {
    hole: Option<(u64, u64)>,
}

impl Coalesce {
    pub fn hole(&mut self, offset: u64, len: u64, chunks: &mut Vec<Chunk>) {
        match &mut self.hole {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush(chunks);
                self.hole = Some((offset, len));
            }
        }
    }

    /// `bytes` read at `offset`, split by zero detection at `granularity` (0: off).
    pub fn data(&mut self, offset: u64, bytes: Bytes, granularity: u64, chunks: &mut Vec<Chunk>) {
        for run in split(offset, bytes, granularity) {
            match run {
                Run::Zero { offset, len } => self.hole(offset, len, chunks),
                Run::Data { offset, bytes } => {
                    self.flush(chunks);
                    chunks.push(Chunk::Data { offset, bytes });
                }
            }
        }
    }

    /// Queues the hole being merged, if any: before End, or before the step returns.
    pub fn flush(&mut self, chunks: &mut Vec<Chunk>) {
        if let Some((offset, len)) = self.hole.take() {
            chunks.push(Chunk::Hole { offset, len });
        }
    }
}

/// Splits `bytes`, read at volume offset `offset`, into data and zero runs. Blocks are the
/// intersections with a grid of `granularity` aligned to absolute offsets, so a given block of
/// the volume is judged the same way whatever the read size. Data runs are slices of `bytes`.
pub fn split(offset: u64, bytes: Bytes, granularity: u64) -> Vec<Run> {
    if granularity == 0 || bytes.is_empty() {
        return vec![Run::Data { offset, bytes }];
    }
    let mut runs: Vec<Run> = Vec::new();
    let end = offset + bytes.len() as u64;
    let mut pos = offset;
    // (start, zero) of the run being built.
    let mut run: Option<(u64, bool)> = None;
    let flush = |runs: &mut Vec<Run>, start: u64, stop: u64, zero: bool| {
        let (a, b) = ((start - offset) as usize, (stop - offset) as usize);
        runs.push(if zero {
            Run::Zero {
                offset: start,
                len: stop - start,
            }
        } else {
            Run::Data {
                offset: start,
                bytes: bytes.slice(a..b),
            }
        });
    };
    while pos < end {
        let block_end = ((pos / granularity + 1) * granularity).min(end);
        let slice = &bytes[(pos - offset) as usize..(block_end - offset) as usize];
        let zero = is_zero(slice);
        match run {
            Some((_, z)) if z == zero => {}
            Some((start, z)) => {
                flush(&mut runs, start, pos, z);
                run = Some((pos, zero));
            }
            None => run = Some((pos, zero)),
        }
        pos = block_end;
    }
    if let Some((start, z)) = run {
        flush(&mut runs, start, end, z);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_zero_blocks_on_both_borders() {
        let mut v = vec![0u8; 5 * 4096 + 100];
        v[4096] = 1; // block 1 has data in its first byte
        v[3 * 4096 - 1] = 7; // block 2 has data in its last byte
        let runs = split(8192, Bytes::from(v.clone()), 4096);
        let got: Vec<(u64, u64, bool)> = runs
            .iter()
            .map(|r| match r {
                Run::Data { offset, bytes } => (*offset, bytes.len() as u64, false),
                Run::Zero { offset, len } => (*offset, *len, true),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (8192, 4096, true),
                (8192 + 4096, 8192, false),
                (8192 + 3 * 4096, 2 * 4096 + 100, true)
            ]
        );
        if let Run::Data { bytes, .. } = &runs[1] {
            assert_eq!(&bytes[..], &v[4096..3 * 4096]);
        }
    }

    #[test]
    fn unaligned_start_uses_absolute_grid() {
        let v = vec![0u8; 4096];
        let runs = split(100, Bytes::from(v), 4096);
        assert_eq!(
            runs,
            vec![Run::Zero {
                offset: 100,
                len: 4096
            }]
        );
        let mut v = vec![0u8; 4096];
        v[4095] = 1; // offset 4195: in the second grid block [4096, 8192)
        let runs = split(100, Bytes::from(v), 4096);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            runs[0],
            Run::Zero {
                offset: 100,
                len: 3996
            }
        );
    }

    #[test]
    fn off_means_one_data_run() {
        let runs = split(0, Bytes::from(vec![0u8; 10000]), 0);
        assert!(matches!(&runs[..], [Run::Data { .. }]));
    }

    #[test]
    fn is_zero_sees_a_late_byte() {
        for at in [0, 15, 16, 17, 300, 4095] {
            let mut v = vec![0u8; 4096];
            v[at] = 0x80;
            assert!(!is_zero(&v), "{at}");
        }
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
    }
}
