//! The end-to-end content digest: CRC-32C of the logical volume content, holes counted as zeroes.
//!
//! CRC-32C was chosen because a run of N zero bytes can be folded in with O(log N) work
//! (`crc32c_combine` against precomputed CRCs of 2^k zeroes), so a 1 TiB hole costs microseconds
//! to hash, and because the `crc32c` crate uses the CPU's CRC instructions for data.

use std::sync::OnceLock;

/// A running digest of logical content, extended in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    crc: u32,
    len: u64,
}

/// CRC-32C of 2^k zero bytes, for k in 0..64.
fn zero_run_crcs() -> &'static [u32; 64] {
    static TABLE: OnceLock<[u32; 64]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0u32; 64];
        table[0] = crc32c::crc32c(&[0]);
        for k in 1..64 {
            let half = 1usize << (k - 1);
            table[k] = crc32c::crc32c_combine(table[k - 1], table[k - 1], half);
        }
        table
    })
}

impl Digest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends the digest with `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.len += data.len() as u64;
    }

    /// Extends the digest with `len` zero bytes without touching memory proportional to `len`.
    pub fn update_zeroes(&mut self, len: u64) {
        let table = zero_run_crcs();
        let mut rest = len;
        while rest != 0 {
            let k = 63 - rest.leading_zeros() as usize;
            self.crc = crc32c::crc32c_combine(self.crc, table[k], 1usize << k);
            rest &= !(1u64 << k);
        }
        self.len += len;
    }

    /// The CRC-32C value of everything seen so far.
    pub fn value(&self) -> u32 {
        self.crc
    }

    /// How many logical bytes were digested.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_match_materialised_zeroes() {
        for &len in &[0u64, 1, 2, 3, 7, 4096, 4097, 65_536 + 13, 1 << 20] {
            let mut folded = Digest::new();
            folded.update(b"head");
            folded.update_zeroes(len);
            folded.update(b"tail");
            let mut plain = Digest::new();
            plain.update(b"head");
            plain.update(&vec![0u8; len as usize]);
            plain.update(b"tail");
            assert_eq!(folded, plain, "zero run of {len}");
        }
    }

    #[test]
    fn different_content_gives_different_digest() {
        let mut a = Digest::new();
        a.update(b"abc");
        let mut b = Digest::new();
        b.update(b"abd");
        assert_ne!(a.value(), b.value());
    }
}
