//! Ranges of a volume: the one primitive behind resume (the missing ranges), incremental sync
//! (the differing blocks) and a partial read (`download --range`).
//!
//! A [`RangeSet`] is validated once, where it enters (decoded from a peer, read from a journal,
//! built by a client): sorted, non-overlapping, no empty range, no 64-bit overflow, and at most
//! [`MAX_RANGES`] entries. Everything downstream may rely on that.

use std::fmt;

/// Most ranges one stream may ask for. A data sender holds the list for the stream's life
/// (16 bytes each: 64 KiB at most per stream, so `max_streams` bounds the total); a client with
/// more ranges than this merges the nearest ones ([`RangeSet::coalesce`]) and reads a few bytes
/// it already has.
pub const MAX_RANGES: usize = 4096;

/// Bytes of one range in a RANGES frame: offset, length.
pub const RANGE_WIRE_LEN: usize = 16;
/// Most ranges in one RANGES frame, so that the frame fits the smallest `max_frame` a peer may
/// announce (4096 bytes of body). A stream's whole list is bounded by [`MAX_RANGES`].
pub const RANGES_PER_FRAME: usize = 255;

/// `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

impl Range {
    pub fn new(offset: u64, len: u64) -> Self {
        Range { offset, len }
    }

    /// One past the last byte. Only called on validated ranges, which cannot overflow.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.offset, self.len)
    }
}

/// Why a list of ranges was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeError {
    Empty(Range),
    Overflow(Range),
    /// Not after the previous range (unsorted or overlapping).
    Order {
        previous: Range,
        next: Range,
    },
    TooMany(usize),
    PastEnd {
        range: Range,
        size: u64,
    },
    NoRanges,
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeError::Empty(r) => write!(f, "range {r} is empty"),
            RangeError::Overflow(r) => write!(f, "range {r} overflows 64 bits"),
            RangeError::Order { previous, next } => write!(
                f,
                "range {next} overlaps or comes before range {previous} (ranges must be sorted and disjoint)"
            ),
            RangeError::TooMany(n) => write!(f, "{n} ranges, more than the limit of {MAX_RANGES}"),
            RangeError::PastEnd { range, size } => {
                write!(f, "range {range} runs past the end of the {size}-byte volume")
            }
            RangeError::NoRanges => write!(f, "no ranges"),
        }
    }
}

impl std::error::Error for RangeError {}

/// A validated list of ranges: sorted, disjoint, non-empty ranges, at most [`MAX_RANGES`].
/// Adjacent ranges are allowed (a peer may send them; they mean the same as one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<Range>);

impl RangeSet {
    /// Validates `ranges` as they are; nothing is sorted or merged behind the caller's back.
    pub fn new(ranges: Vec<Range>) -> Result<RangeSet, RangeError> {
        let mut set = RangeSet(Vec::new());
        set.extend(ranges)?;
        Ok(set)
    }

    /// Appends ranges that must come after the ones already held (a list that arrives in
    /// several frames), with the same checks.
    pub fn extend(&mut self, ranges: impl IntoIterator<Item = Range>) -> Result<(), RangeError> {
        for r in ranges {
            if self.0.len() == MAX_RANGES {
                return Err(RangeError::TooMany(MAX_RANGES + 1));
            }
            if r.len == 0 {
                return Err(RangeError::Empty(r));
            }
            if r.offset.checked_add(r.len).is_none() {
                return Err(RangeError::Overflow(r));
            }
            if let Some(prev) = self.0.last() {
                if r.offset < prev.end() {
                    return Err(RangeError::Order {
                        previous: *prev,
                        next: r,
                    });
                }
            }
            self.0.push(r);
        }
        Ok(())
    }

    /// Builds a set from any ranges (unsorted, overlapping, adjacent): sorted and merged, then
    /// coalesced to fit [`MAX_RANGES`]. For a client that computed what it lacks.
    pub fn normalize(mut ranges: Vec<Range>) -> RangeSet {
        ranges.retain(|r| r.len > 0);
        ranges.sort();
        let mut merged: Vec<Range> = Vec::with_capacity(ranges.len());
        for r in ranges {
            let end = r.offset.saturating_add(r.len);
            match merged.last_mut() {
                Some(last) if r.offset <= last.end() => {
                    last.len = last.len.max(end - last.offset);
                }
                _ => merged.push(Range::new(r.offset, end - r.offset)),
            }
        }
        let mut set = RangeSet(merged);
        set.coalesce(MAX_RANGES);
        set
    }

    /// Merges the ranges separated by the smallest gaps until at most `max` remain: the fewest
    /// extra bytes for a list that must fit a limit.
    pub fn coalesce(&mut self, max: usize) {
        let max = max.max(1);
        if self.0.len() <= max {
            return;
        }
        let mut gaps: Vec<u64> = self
            .0
            .windows(2)
            .map(|w| w[1].offset - w[0].end())
            .collect();
        gaps.sort_unstable();
        // Merge every gap up to the threshold that leaves `max` ranges; ties may leave fewer.
        let threshold = gaps[self.0.len() - max - 1];
        let mut out: Vec<Range> = Vec::with_capacity(max);
        for r in self.0.drain(..) {
            match out.last_mut() {
                Some(last) if r.offset - last.end() <= threshold => {
                    last.len = r.end() - last.offset;
                }
                _ => out.push(r),
            }
        }
        self.0 = out;
    }

    /// Checks that every range lies inside a volume of `size` bytes.
    pub fn check_within(&self, size: u64) -> Result<(), RangeError> {
        match self.0.last() {
            Some(r) if r.end() > size => Err(RangeError::PastEnd { range: *r, size }),
            _ => Ok(()),
        }
    }

    /// The parts of `0..size` not covered by this set.
    pub fn complement(&self, size: u64) -> Vec<Range> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.0 {
            if r.offset >= size {
                break;
            }
            if r.offset > at {
                out.push(Range::new(at, r.offset - at));
            }
            at = at.max(r.end());
        }
        if at < size {
            out.push(Range::new(at, size - at));
        }
        out
    }

    pub fn ranges(&self) -> &[Range] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|r| r.len).sum()
    }
}

/// Walks a validated range list in order: where content must come next, for a sender checking
/// its source and a receiver checking its peer.
#[derive(Debug, Clone, Default)]
pub struct RangeCursor {
    ranges: Option<std::sync::Arc<RangeSet>>,
    index: usize,
    /// Next offset due: inside `ranges[index]`, or the end of the whole when there are none.
    next: u64,
}

impl RangeCursor {
    /// A cursor over the whole volume (`ranges` `None`) or over `ranges`.
    pub fn new(ranges: Option<std::sync::Arc<RangeSet>>) -> Self {
        let next = ranges
            .as_ref()
            .and_then(|r| r.ranges().first().map(|r| r.offset))
            .unwrap_or(0);
        RangeCursor {
            ranges,
            index: 0,
            next,
        }
    }

    /// The offset the next piece must start at.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Takes `offset..offset+len` if it starts where due and stays inside the current range
    /// (or the volume of `size` bytes when there are no ranges). A piece never spans two ranges.
    pub fn take(&mut self, offset: u64, len: u64, size: u64) -> bool {
        if offset != self.next || len == 0 {
            return false;
        }
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let Some(set) = &self.ranges else {
            if end > size {
                return false;
            }
            self.next = end;
            return true;
        };
        let Some(current) = set.ranges().get(self.index) else {
            return false;
        };
        if end > current.end() {
            return false;
        }
        self.next = end;
        if end == current.end() {
            self.index += 1;
            if let Some(r) = set.ranges().get(self.index) {
                self.next = r.offset;
            }
        }
        true
    }

    /// Every byte asked for has been taken.
    pub fn is_done(&self, size: u64) -> bool {
        match &self.ranges {
            None => self.next == size,
            Some(set) => self.index == set.len(),
        }
    }

    /// Bytes taken so far, for messages.
    pub fn describe(&self, size: u64) -> String {
        match &self.ranges {
            None => format!("{} of {size} bytes", self.next),
            Some(set) => format!("{} of {} ranges", self.index, set.len()),
        }
    }
}

/// Appends the body of a RANGES frame (at most [`RANGES_PER_FRAME`] of `ranges`; the caller
/// splits longer lists).
pub(crate) fn put_ranges(out: &mut bytes::BytesMut, ranges: &[Range]) {
    use bytes::BufMut;
    for r in &ranges[..ranges.len().min(RANGES_PER_FRAME)] {
        out.put_u64(r.offset);
        out.put_u64(r.len);
    }
}

/// Parses the body of a RANGES frame, whose length the header check bounded to
/// [`RANGES_PER_FRAME`] whole ranges: the allocation is bounded by the frame, not the peer's
/// word. Validation of the list is the stream's (`RangeSet::extend`).
pub(crate) fn parse_ranges(mut body: &[u8]) -> Vec<Range> {
    use bytes::Buf;
    let mut ranges = Vec::with_capacity(body.len() / RANGE_WIRE_LEN);
    while body.len() >= RANGE_WIRE_LEN {
        ranges.push(Range::new(body.get_u64(), body.get_u64()));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> Range {
        Range::new(offset, len)
    }

    #[test]
    fn hostile_lists_are_refused_with_their_fault() {
        assert_eq!(
            RangeSet::new(vec![r(0, 0)]),
            Err(RangeError::Empty(r(0, 0)))
        );
        assert!(matches!(
            RangeSet::new(vec![r(10, 5), r(0, 5)]),
            Err(RangeError::Order { .. })
        ));
        assert!(matches!(
            RangeSet::new(vec![r(0, 10), r(5, 10)]),
            Err(RangeError::Order { .. })
        ));
        assert!(matches!(
            RangeSet::new(vec![r(u64::MAX, 2)]),
            Err(RangeError::Overflow(_))
        ));
        let many: Vec<Range> = (0..=MAX_RANGES as u64).map(|i| r(i * 2, 1)).collect();
        assert!(matches!(RangeSet::new(many), Err(RangeError::TooMany(_))));
        let set = RangeSet::new(vec![r(0, 5), r(5, 5)]).unwrap();
        assert_eq!(
            set.check_within(9),
            Err(RangeError::PastEnd {
                range: r(5, 5),
                size: 9
            })
        );
        assert_eq!(set.check_within(10), Ok(()));
    }

    #[test]
    fn coalescing_merges_the_smallest_gaps_first() {
        let mut set = RangeSet::new(vec![r(0, 1), r(2, 1), r(100, 1), r(103, 1)]).unwrap();
        set.coalesce(2);
        assert_eq!(set.ranges(), &[r(0, 3), r(100, 4)]);
        let norm = RangeSet::normalize(vec![r(10, 5), r(0, 3), r(2, 4), r(15, 1)]);
        assert_eq!(norm.ranges(), &[r(0, 6), r(10, 6)]);
    }

    #[test]
    fn the_complement_is_what_is_missing() {
        let set = RangeSet::new(vec![r(2, 3), r(7, 1)]).unwrap();
        assert_eq!(set.complement(10), vec![r(0, 2), r(5, 2), r(8, 2)]);
        assert_eq!(RangeSet::default().complement(4), vec![r(0, 4)]);
    }

    #[test]
    fn a_cursor_walks_ranges_and_refuses_what_is_not_due() {
        let set = std::sync::Arc::new(RangeSet::new(vec![r(10, 4), r(20, 2)]).unwrap());
        let mut c = RangeCursor::new(Some(set));
        assert!(!c.take(0, 1, 100), "before the first range");
        assert!(c.take(10, 2, 100));
        assert!(!c.take(12, 3, 100), "spans past the range");
        assert!(c.take(12, 2, 100));
        assert_eq!(c.next(), 20);
        assert!(!c.is_done(100));
        assert!(c.take(20, 2, 100));
        assert!(c.is_done(100));
        assert!(!c.take(22, 1, 100), "nothing more was asked for");
    }
}
