//! The end of a copy-on-read download: the destination's blocks against the source's block
//! digests (DIGESTS, PROTOCOL.md 8). The local file is hashed as `--update` hashes it and
//! merged with the source's document as it streams in; every block that differs must hold a
//! local write, since those are the only bytes that are not the source's.

use crate::blockhash;
use crate::error::Error;
use crate::update::{DigestsSink, StreamDiff};
use engine::blockmap::BLOCK_SIZE;
use engine::proto::Op;
use engine::{ConnectionId, EngineHandle, Range};
use std::fs::File;
use std::io;

/// What the check covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub blocks: u64,
    /// Blocks left out because a local write touched them.
    pub local_blocks: u64,
}

/// Checks `file` (the destination, `shown` in messages) against the source `volume`'s block
/// digests, leaving out the blocks `local` touches. Blocks; not for the loop thread.
pub fn verify(
    engine: &EngineHandle,
    conn: ConnectionId,
    volume: &str,
    shown: &str,
    file: &File,
    local: &[Range],
) -> Result<Verified, Error> {
    let ours = blockhash::digests_of(file, blockhash::threads())
        .map_err(|e| Error::io(format!("hashing {shown}"), e))?;
    let blocks = ours.header.blocks();
    let sink = DigestsSink::new(StreamDiff::new(ours, true));
    let plan = sink.plan();
    let report = engine
        .fetch(conn, Op::Digests, volume, Box::new(sink))
        .recv()
        .map_err(|_| Error::Cancelled)?;
    report.result.map_err(|e| {
        Error::io(
            format!("the block digests of {volume}"),
            io::Error::other(e.to_string()),
        )
    })?;
    let plan = plan.lock().unwrap().take().ok_or(Error::Cancelled)?;
    let touched = touched_blocks(local);
    if let Some(offset) = plan.ranges.iter().find_map(|d| first_outside(*d, &touched)) {
        return Err(Error::SourceMismatch {
            target: shown.to_string(),
            offset,
        });
    }
    Ok(Verified {
        blocks,
        local_blocks: touched.iter().map(|r| r.len / BLOCK_SIZE as u64).sum(),
    })
}

/// The blocks `ranges` (sorted, disjoint) touch, as sorted, merged block-aligned ranges.
fn touched_blocks(ranges: &[Range]) -> Vec<Range> {
    let bs = BLOCK_SIZE as u64;
    let mut out: Vec<Range> = Vec::new();
    for r in ranges.iter().filter(|r| r.len > 0) {
        let (start, end) = (r.offset / bs * bs, r.end().div_ceil(bs) * bs);
        match out.last_mut() {
            Some(last) if last.end() >= start => last.len = end.max(last.end()) - last.offset,
            _ => out.push(Range::new(start, end - start)),
        }
    }
    out
}

/// The first offset of `r` that no range of `cover` (sorted, merged) holds.
fn first_outside(r: Range, cover: &[Range]) -> Option<u64> {
    let mut pos = r.offset;
    let i = cover.partition_point(|c| c.end() <= pos);
    for c in &cover[i..] {
        if pos >= r.end() {
            return None;
        }
        if c.offset > pos {
            return Some(pos);
        }
        pos = pos.max(c.end());
    }
    (pos < r.end()).then_some(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE as u64;

    #[test]
    fn a_difference_must_lie_in_blocks_written_locally() {
        let local = [
            Range::new(10, 5),
            Range::new(B + 1, 2 * B),
            Range::new(7 * B, 1),
        ];
        let touched = touched_blocks(&local);
        assert_eq!(touched, vec![Range::new(0, 4 * B), Range::new(7 * B, B)]);
        assert_eq!(first_outside(Range::new(0, 4 * B), &touched), None);
        assert_eq!(
            first_outside(Range::new(3 * B, 2 * B), &touched),
            Some(4 * B)
        );
        assert_eq!(first_outside(Range::new(5 * B, B), &touched), Some(5 * B));
        assert_eq!(first_outside(Range::new(7 * B, B), &touched), None);
        assert_eq!(first_outside(Range::new(8 * B, B), &touched), Some(8 * B));
        assert_eq!(first_outside(Range::new(0, B), &[]), Some(0));
    }
}
