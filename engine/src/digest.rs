//! The end-to-end content digest: CRC-32C of the logical volume content, holes counted as zeroes.
//!
//! CRC-32C was chosen because a run of N zero bytes can be folded in with O(log N) work, so a
//! 1 TiB hole costs about a microsecond to hash, and because CPUs compute it fast for data
//! (`crc-fast`, or the wide fold below where the CPU has VPCLMULQDQ without AVX-512).

use std::sync::OnceLock;

/// A running digest of logical content, extended in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    crc: u32,
    len: u64,
}

/// The CRC-32C polynomial in the bit-reflected form the CRC register uses (bit 31 is x^0).
const POLY: u32 = 0x82F6_3B78;

/// a * b mod POLY, both in bit-reflected form.
fn mul_mod_poly(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    for bit in (0..32).rev() {
        if a & (1 << bit) != 0 {
            product ^= b;
        }
        // b *= x, reducing the x^32 term.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    product
}

/// x^(8 * 2^k) mod POLY for k in 0..64: feeding 2^k zero bytes multiplies the register by it.
fn zero_run_factors() -> &'static [u32; 64] {
    static TABLE: OnceLock<[u32; 64]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0u32; 64];
        table[0] = 1 << (31 - 8);
        for k in 1..64 {
            table[k] = mul_mod_poly(table[k - 1], table[k - 1]);
        }
        table
    })
}

/// `register * x^(8 len) mod POLY`: the register after `len` zero bytes.
fn shift(mut register: u32, len: u64) -> u32 {
    let table = zero_run_factors();
    let mut rest = len;
    while rest != 0 {
        let k = rest.trailing_zeros() as usize;
        register = mul_mod_poly(table[k], register);
        rest &= rest - 1;
    }
    register
}

/// The CRC register after `data`, by `crc-fast`.
fn narrow(register: u32, data: &[u8]) -> u32 {
    let mut d = crc_fast::Digest::new_with_init_state(
        crc_fast::CrcAlgorithm::Crc32Iscsi,
        u64::from(register),
    );
    d.update(data);
    !(d.finalize() as u32)
}

/// x^n mod POLY, bit-reflected.
fn x_pow(n: u32) -> u32 {
    let mut b: u32 = 1 << 31;
    for _ in 0..n {
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    b
}

/// CRC-32C of large buffers folded 256 bits at a time with VPCLMULQDQ on AVX2.
///
/// `crc-fast` uses wide carry-less multiplication only with AVX-512; on CPUs with VPCLMULQDQ but
/// no AVX-512 (AMD Zen 3, this project's VM) it runs the three-way `crc32q` loop, ~14 GB/s,
/// and the sender's and receiver's digests were a quarter of a one-stream transfer's CPU time.
/// This path is ~1.5x that.
///
/// Eight 128-bit lanes hold 128 bytes; each round multiplies every lane forward by 128 bytes
/// (x^1024 mod P, split over its two 64-bit halves) and adds the next 128 bytes. What is left is
/// a 128-byte message with the same CRC as everything folded, so the plain `crc32` instruction
/// finishes it, and the tail, with no Barrett reduction.
mod wide {
    use std::sync::OnceLock;

    /// Shorter buffers are not worth the set-up.
    const MIN: usize = 256;
    const BLOCK: usize = 128;

    /// Multipliers for one lane half moved forward by `BLOCK` bytes: the carry-less product of
    /// two bit-reflected operands lands 33 degrees above where the lane reads it, so the first
    /// (higher) half needs x^(8 BLOCK + 64 - 33) and the second x^(8 BLOCK - 33).
    fn keys() -> (u64, u64) {
        static KEYS: OnceLock<(u64, u64)> = OnceLock::new();
        *KEYS.get_or_init(|| {
            let fold = 8 * BLOCK as u32;
            (
                u64::from(super::x_pow(fold + 31)),
                u64::from(super::x_pow(fold - 33)),
            )
        })
    }

    /// The register after `data`, or None if the CPU or the length does not suit.
    #[cfg(target_arch = "x86_64")]
    pub fn update(register: u32, data: &[u8]) -> Option<u32> {
        let usable = data.len() >= MIN
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
            && std::arch::is_x86_feature_detected!("sse4.2");
        // SAFETY: the features the function is compiled for were detected just above.
        usable.then(|| unsafe { fold(register, data, keys()) })
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn update(_register: u32, _data: &[u8]) -> Option<u32> {
        None
    }

    /// `data.len() >= BLOCK`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
    unsafe fn fold(register: u32, data: &[u8], (first, second): (u64, u64)) -> u32 {
        use std::arch::x86_64::*;
        debug_assert!(data.len() >= BLOCK);
        // SAFETY (all loads): every offset read is at most data.len() - 32.
        let load = |offset: usize| unsafe { _mm256_loadu_si256(data.as_ptr().add(offset).cast()) };
        let keys = _mm256_set_epi64x(second as i64, first as i64, second as i64, first as i64);
        let mut lanes = [load(0), load(32), load(64), load(96)];
        // The register joins the first four bytes: CRC(r, M) = CRC(0, M with r xored in front).
        lanes[0] = _mm256_xor_si256(lanes[0], _mm256_set_epi64x(0, 0, 0, i64::from(register)));
        let mut offset = BLOCK;
        while offset + BLOCK <= data.len() {
            for (i, lane) in lanes.iter_mut().enumerate() {
                let high = _mm256_clmulepi64_epi128(*lane, keys, 0x00);
                let low = _mm256_clmulepi64_epi128(*lane, keys, 0x11);
                *lane = _mm256_xor_si256(_mm256_xor_si256(high, low), load(offset + 32 * i));
            }
            offset += BLOCK;
        }
        let mut folded = [0u8; BLOCK];
        for (i, lane) in lanes.iter().enumerate() {
            // SAFETY: 32 bytes at 32 * i, within the 128-byte array.
            unsafe { _mm256_storeu_si256(folded.as_mut_ptr().add(32 * i).cast(), *lane) };
        }
        let mut crc = 0u64;
        let mut words = folded.chunks_exact(8).chain(data[offset..].chunks_exact(8));
        for word in &mut words {
            crc = _mm_crc32_u64(crc, u64::from_le_bytes(word.try_into().unwrap()));
        }
        let mut crc = crc as u32;
        for &byte in data[offset..].chunks_exact(8).remainder() {
            crc = _mm_crc32_u8(crc, byte);
        }
        crc
    }
}

impl Digest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends the digest with `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.crc = !wide::update(!self.crc, data).unwrap_or_else(|| narrow(!self.crc, data));
        self.len += data.len() as u64;
    }

    /// Extends the digest with `len` zero bytes without touching memory proportional to `len`.
    /// (`crc32c_combine` did the same with a 32x32 matrix squaring per bit of the length:
    /// 8 % of a sparse 64 GiB copy's CPU time.)
    pub fn update_zeroes(&mut self, len: u64) {
        self.crc = !shift(!self.crc, len);
        self.len += len;
    }

    /// Extends the digest with the content that `next` digested, as if its bytes came now:
    /// content whose digest is already known (a block sent many times) costs O(log len), not a
    /// pass over it. The register is linear in its start value, so after A then B it is
    /// `(reg_A ^ !0) * x^(8|B|) ^ reg_B`; in digest values, `crc_A * x^(8|B|) ^ crc_B`.
    pub fn append(&mut self, next: &Digest) {
        self.crc = shift(self.crc, next.len) ^ next.crc;
        self.len += next.len;
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
        for &len in &[
            0u64,
            1,
            2,
            3,
            7,
            255,
            4096,
            4097,
            65_536 + 13,
            1 << 20,
            (3 << 20) + 5,
        ] {
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
    fn zero_runs_split_anyhow_give_the_same_digest() {
        let mut whole = Digest::new();
        whole.update_zeroes(1 << 40);
        let mut parts = Digest::new();
        parts.update_zeroes((1 << 39) + 12_345);
        parts.update_zeroes((1 << 39) - 12_345);
        assert_eq!(whole, parts);
        assert_ne!(whole.value(), Digest::new().value());
    }

    fn bytes(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn the_wide_fold_agrees_with_crc_fast() {
        if wide::update(0, &[0; 4096]).is_none() {
            eprintln!("skipping: this CPU lacks AVX2 and VPCLMULQDQ, the wide fold is not used");
            return;
        }
        // Every tail length and round count near the edges, and a transfer-sized buffer.
        let lens = (256..=520).chain([1000, 4096, 65_536 + 17, 128 << 10, (1 << 20) + 3]);
        for (i, len) in lens.enumerate() {
            let data = bytes(len, i as u64 + 1);
            for register in [0xFFFF_FFFF, 0, 0x1234_5678] {
                assert_eq!(
                    wide::update(register, &data),
                    Some(narrow(register, &data)),
                    "{len} bytes from register {register:08x}"
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn split_updates_match_one_crc_fast_pass(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            cut in 0usize..3000,
        ) {
            let cut = cut.min(data.len());
            let mut split = Digest::new();
            split.update(&data[..cut]);
            split.update(&data[cut..]);
            proptest::prop_assert_eq!(split.value(), !narrow(!0, &data));
        }
    }

    proptest::proptest! {
        #[test]
        fn appending_a_digest_matches_digesting_its_bytes(
            head in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            zeroes in 0u64..(1 << 42),
        ) {
            let mut next = Digest::new();
            next.update(&tail);
            next.update_zeroes(zeroes);
            let mut joined = Digest::new();
            joined.update(&head);
            joined.append(&next);
            let mut plain = Digest::new();
            plain.update(&head);
            plain.update(&tail);
            plain.update_zeroes(zeroes);
            proptest::prop_assert_eq!(joined, plain);
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
