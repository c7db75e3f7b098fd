//! The parts of a READ a server has answered so far, to refuse overlapping chunks and to tell
//! whether a successful reply covered the whole request.

/// Disjoint, sorted, merged half-open ranges, at most `MAX_PIECES` of them: chunks that leave
/// more gaps than that are refused rather than tracked at a cost the server chooses.
#[derive(Debug, Default, Clone)]
pub struct Ranges {
    pieces: Vec<(u64, u64)>,
    total: u64,
}

pub const MAX_PIECES: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum AddError {
    Overlap,
    TooFragmented,
}

impl Ranges {
    /// Adds `[start, end)`; refuses a range that overlaps one already added.
    pub fn add(&mut self, start: u64, end: u64) -> Result<(), AddError> {
        debug_assert!(start < end);
        // The first piece that ends after `start`.
        let i = self.pieces.partition_point(|&(_, e)| e <= start);
        if let Some(&(s, _)) = self.pieces.get(i) {
            if s < end {
                return Err(AddError::Overlap);
            }
        }
        let joins_left = i > 0 && self.pieces[i - 1].1 == start;
        let joins_right = self.pieces.get(i).is_some_and(|&(s, _)| s == end);
        match (joins_left, joins_right) {
            (true, true) => {
                self.pieces[i - 1].1 = self.pieces[i].1;
                self.pieces.remove(i);
            }
            (true, false) => self.pieces[i - 1].1 = end,
            (false, true) => self.pieces[i].0 = start,
            (false, false) => {
                if self.pieces.len() >= MAX_PIECES {
                    return Err(AddError::TooFragmented);
                }
                self.pieces.insert(i, (start, end));
            }
        }
        self.total += end - start;
        Ok(())
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_refuses_overlap() {
        let mut r = Ranges::default();
        r.add(10, 20).unwrap();
        r.add(30, 40).unwrap();
        assert_eq!(r.add(15, 16), Err(AddError::Overlap));
        assert_eq!(r.add(5, 11), Err(AddError::Overlap));
        assert_eq!(r.add(39, 50), Err(AddError::Overlap));
        assert_eq!(r.add(0, 100), Err(AddError::Overlap));
        r.add(20, 30).unwrap();
        assert_eq!(r.pieces, vec![(10, 40)]);
        r.add(0, 10).unwrap();
        r.add(40, 41).unwrap();
        assert_eq!(r.pieces, vec![(0, 41)]);
        assert_eq!(r.total(), 41);
    }

    #[test]
    fn bounded_pieces() {
        let mut r = Ranges::default();
        for i in 0..MAX_PIECES as u64 {
            r.add(i * 2, i * 2 + 1).unwrap();
        }
        let end = MAX_PIECES as u64 * 2;
        assert_eq!(r.add(end + 1, end + 2), Err(AddError::TooFragmented));
        // Filling a gap never needs a new piece.
        r.add(1, 2).unwrap();
    }
}
