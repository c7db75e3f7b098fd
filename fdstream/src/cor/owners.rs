//! Who a copy-on-read destination's bytes belong to: the source (they arrived, by the
//! background stream or an urgent fetch) or the local clients (they wrote them); bytes nobody
//! owns have not arrived. Kept as runs, not a bit per byte: the background stream's arrivals
//! are adjacent and merge into one run, so the map grows with the local writes and the urgent
//! fetches that landed apart from each other, and is bounded by [`MAX_RUNS`].

use engine::Range;
use std::collections::BTreeMap;

/// Runs kept at most (about 48 bytes each: under 50 MiB). A write that would need more is
/// refused rather than forgotten, since a forgotten local run is one the background stream
/// would overwrite.
pub const MAX_RUNS: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Source,
    Local,
}

/// The map is full ([`MAX_RUNS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Sorted, disjoint runs `start -> (end, owner)`; adjacent runs of one owner are merged.
#[derive(Debug, Default)]
pub struct Owners {
    runs: BTreeMap<u64, (u64, Owner)>,
}

impl Owners {
    pub fn new() -> Owners {
        Owners::default()
    }

    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// The runs overlapping `[start, end)`, clipped to it.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, Owner)> + '_ {
        let first = self
            .runs
            .range(..=start)
            .next_back()
            .filter(|(_, &(e, _))| e > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        self.runs
            .range(first..end)
            .map(move |(&s, &(e, o))| (s.max(start), e.min(end), o))
    }

    /// The parts of `range` nobody owns, in order.
    pub fn absent(&self, range: Range) -> Vec<Range> {
        let end = range.end();
        let mut out = Vec::new();
        let mut pos = range.offset;
        for (s, e, _) in self.overlapping(range.offset, end) {
            if s > pos {
                out.push(Range::new(pos, s - pos));
            }
            pos = e;
        }
        if pos < end {
            out.push(Range::new(pos, end - pos));
        }
        out
    }

    /// The parts of `range` the local clients own, in order.
    pub fn local_in(&self, range: Range) -> Vec<Range> {
        self.overlapping(range.offset, range.end())
            .filter(|r| r.2 == Owner::Local)
            .map(|(s, e, _)| Range::new(s, e - s))
            .collect()
    }

    /// Every local run.
    pub fn local(&self) -> Vec<Range> {
        self.runs
            .iter()
            .filter(|(_, r)| r.1 == Owner::Local)
            .map(|(&s, &(e, _))| Range::new(s, e - s))
            .collect()
    }

    /// Whether `[0, size)` is owned throughout.
    pub fn complete(&self, size: u64) -> bool {
        self.absent(Range::new(0, size)).is_empty()
    }

    /// Gives the source what nobody owns in `range` and returns those parts: what an arrival
    /// may write. What is owned already (an earlier arrival, a local write) is left alone.
    pub fn claim_source(&mut self, range: Range) -> Result<Vec<Range>, Full> {
        let absent = self.absent(range);
        if self.runs.len() + absent.len() > MAX_RUNS {
            return Err(Full);
        }
        for r in &absent {
            self.set(r.offset, r.end(), Owner::Source);
        }
        Ok(absent)
    }

    /// The local clients own `range` from now on, whoever did before.
    pub fn claim_local(&mut self, range: Range) -> Result<(), Full> {
        // Splitting the run around it adds at most two.
        if self.runs.len() + 2 > MAX_RUNS {
            return Err(Full);
        }
        self.set(range.offset, range.end(), Owner::Local);
        Ok(())
    }

    fn set(&mut self, start: u64, end: u64, owner: Owner) {
        if start >= end {
            return;
        }
        let mut keys: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        if let Some((&s, &(e, _))) = self.runs.range(..start).next_back() {
            if e > start {
                keys.insert(0, s);
            }
        }
        for key in keys {
            let Some((e, o)) = self.runs.remove(&key) else {
                continue;
            };
            if key < start {
                self.runs.insert(key, (start, o));
            }
            if e > end {
                self.runs.insert(end, (e, o));
            }
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &(e, o))) = self.runs.range(..start).next_back() {
            if e == start && o == owner {
                self.runs.remove(&s);
                start = s;
            }
        }
        if let Some(&(e, o)) = self.runs.get(&end) {
            if o == owner {
                self.runs.remove(&end);
                end = e;
            }
        }
        self.runs.insert(start, (end, owner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(o: u64, l: u64) -> Range {
        Range::new(o, l)
    }

    #[test]
    fn the_source_never_takes_what_was_written_locally() {
        let mut m = Owners::new();
        m.claim_local(r(100, 50)).unwrap();
        assert_eq!(
            m.claim_source(r(0, 200)).unwrap(),
            vec![r(0, 100), r(150, 50)]
        );
        assert!(m.complete(200));
        assert_eq!(m.local(), vec![r(100, 50)]);
        // Source runs on both sides of the local one are not merged across it.
        assert_eq!(m.runs(), 3);
        assert!(m.claim_source(r(0, 200)).unwrap().is_empty());
        // A local write over an arrival splits it.
        m.claim_local(r(10, 10)).unwrap();
        assert_eq!(m.local_in(r(0, 120)), vec![r(10, 10), r(100, 20)]);
        assert_eq!(m.runs(), 5);
    }

    #[test]
    fn adjacent_arrivals_are_one_run() {
        let mut m = Owners::new();
        for i in 0..1000 {
            m.claim_source(r(i * 4096, 4096)).unwrap();
        }
        assert_eq!(m.runs(), 1);
        assert_eq!(m.absent(r(0, 5_000_000)), vec![r(4_096_000, 904_000)]);
    }

    proptest! {
        /// Against a byte array: every byte's owner is the last claim that could take it.
        #[test]
        fn the_map_is_the_byte_array(ops in proptest::collection::vec((any::<bool>(), 0u64..500, 1u64..80), 1..60)) {
            const N: u64 = 600;
            let mut m = Owners::new();
            let mut bytes = [None::<Owner>; N as usize];
            for (local, o, l) in ops {
                let range = r(o, l.min(N - o));
                if local {
                    m.claim_local(range).unwrap();
                    for b in &mut bytes[o as usize..range.end() as usize] {
                        *b = Some(Owner::Local);
                    }
                } else {
                    let got = m.claim_source(range).unwrap();
                    let mut want = Vec::new();
                    for i in o..range.end() {
                        if bytes[i as usize].is_none() {
                            bytes[i as usize] = Some(Owner::Source);
                            match want.last_mut() {
                                Some(w) if Range::end(w) == i => w.len += 1,
                                _ => want.push(r(i, 1)),
                            }
                        }
                    }
                    prop_assert_eq!(got, want);
                }
                // Runs are disjoint, sorted, merged.
                let runs: Vec<_> = m.runs.iter().map(|(&s, &(e, o))| (s, e, o)).collect();
                for w in runs.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0);
                    prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2));
                }
                for i in 0..N {
                    let owner = runs.iter().find(|x| x.0 <= i && i < x.1).map(|x| x.2);
                    prop_assert_eq!(owner, bytes[i as usize]);
                }
            }
        }
    }
}
