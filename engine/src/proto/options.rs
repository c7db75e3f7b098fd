//! Per-stream options carried in OPEN, and their encoding (the flag bits exist only here, but
//! for VERIFY, which is one of OPEN's header flags since this byte is full; the frame codec is
//! the only caller of [`OpenOptions::from_wire`] and [`OpenOptions::wire_flags`]).
//!
//! They mean what the nbdcopy/qemu-img flags of the same names mean and are interpreted by
//! whichever side touches the volume (fdstream's provider turns them into reader and writer
//! options).

/// Flag bits of OPEN (docs/PROTOCOL.md 4.3).
mod bits {
    pub const ALLOCATED: u8 = 1;
    pub const DESTINATION_IS_ZERO: u8 = 2;
    pub const NO_EXTENTS: u8 = 4;
    pub const OVERWRITE: u8 = 8;
    pub const NO_SPARSE: u8 = 16;
    pub const FORCE_SHARE: u8 = 32;
    pub const PRIORITY: u8 = 64;
    pub const TOP_ONLY: u8 = 128;
    #[cfg(test)]
    pub const KNOWN: u8 = 255;
}

/// What a stream's opener asks for. All off, and zero detection off, by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    allocated: bool,
    destination_is_zero: bool,
    no_extents: bool,
    overwrite: bool,
    no_sparse: bool,
    force_share: bool,
    priority: bool,
    top_only: bool,
    /// Carried in OPEN's header flags, not the options byte (which is full): see frame.rs.
    verify: bool,
    /// Also in OPEN's header flags.
    qcow2: bool,
    /// Also a header flag: the OPEN is followed by RANGES frames (set by the connection when it
    /// opens a ranged read; see `Connection::open_ranges`).
    ranges: bool,
    /// Also a header flag: a WRITE that updates the existing volume, which must end with this
    /// volume checksum (docs/PROTOCOL.md 8.3, 8.4); carried after OPEN's name.
    update: Option<[u8; 32]>,
    /// Also a header flag: the partial upload this WRITE continues or this DIGESTS describes
    /// (docs/PROTOCOL.md 8.5); carried after the name (and the update's checksum).
    resume: Option<ResumeKey>,
    zero_granularity: u32,
}

/// What names a partial upload: a token the client derives (the server keys the partial by it,
/// the volume and the peer's identity) and a digest of the source's identity, which must be
/// the one the partial was begun from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResumeKey {
    pub token: [u8; 32],
    pub source: [u8; 32],
}

impl OpenOptions {
    /// The sink must end fully allocated (zeroes written instead of holes punched).
    pub fn with_allocated(mut self, on: bool) -> Self {
        self.allocated = on;
        self
    }

    /// The sink already reads as zeroes: holes need no work.
    pub fn with_destination_is_zero(mut self, on: bool) -> Self {
        self.destination_is_zero = on;
        self
    }

    /// The source ignores its extent map and reads everything.
    pub fn with_no_extents(mut self, on: bool) -> Self {
        self.no_extents = on;
        self
    }

    /// An existing volume may be replaced (uploads).
    pub fn with_overwrite(mut self, on: bool) -> Self {
        self.overwrite = on;
        self
    }

    /// Holes are sent as zero DATA on this stream even when SPARSE was negotiated.
    pub fn with_no_sparse(mut self, on: bool) -> Self {
        self.no_sparse = on;
        self
    }

    /// The source may be read although it is in use (a mounted block device), as qemu-img's
    /// `-U`; the copy may then be inconsistent.
    pub fn with_force_share(mut self, on: bool) -> Self {
        self.force_share = on;
        self
    }

    /// The stream is in the priority class (someone waits on it); only with the PRIORITY
    /// feature.
    pub fn with_priority(mut self, on: bool) -> Self {
        self.priority = on;
        self
    }

    /// For a layered source (a qcow2 overlay): only its own clusters are data, what its
    /// backing files hold reads as holes. Other sources ignore it.
    pub fn with_top_only(mut self, on: bool) -> Self {
        self.top_only = on;
        self
    }

    /// The sink reads the volume back after its last write and compares it with what it
    /// received before the volume gets its name; only with the VERIFY feature.
    pub fn with_verify(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }

    /// The sink writes the volume as a qcow2 image (a new one, or an existing one through
    /// qemu); only with the QCOW2 feature.
    pub fn with_qcow2(mut self, on: bool) -> Self {
        self.qcow2 = on;
        self
    }

    /// The OPEN announces a range list (RANGES frames follow it): for codecs and tests, since
    /// `Connection::open_stream` sets it from the list it is given and ignores it otherwise.
    pub fn with_ranges(mut self, on: bool) -> Self {
        self.ranges = on;
        self
    }

    /// A WRITE that updates the existing volume (only the ranges that differ arrive) and
    /// commits only if the result's volume checksum is `checksum`; only with the UPDATE
    /// feature.
    pub fn with_update(mut self, checksum: Option<[u8; 32]>) -> Self {
        self.update = checksum;
        self
    }

    /// The partial upload this WRITE (with UPDATE) continues, or whose digests a DIGESTS asks
    /// for; only with the RESUME feature.
    pub fn with_resume(mut self, key: Option<ResumeKey>) -> Self {
        self.resume = key;
        self
    }

    /// Zero-detection granularity in bytes (`-S`); 0 turns zero detection off.
    pub fn with_zero_granularity(mut self, bytes: u32) -> Self {
        self.zero_granularity = bytes;
        self
    }

    pub fn allocated(&self) -> bool {
        self.allocated
    }

    pub fn destination_is_zero(&self) -> bool {
        self.destination_is_zero
    }

    pub fn no_extents(&self) -> bool {
        self.no_extents
    }

    pub fn overwrite(&self) -> bool {
        self.overwrite
    }

    pub fn no_sparse(&self) -> bool {
        self.no_sparse
    }

    pub fn force_share(&self) -> bool {
        self.force_share
    }

    pub fn priority(&self) -> bool {
        self.priority
    }

    pub fn top_only(&self) -> bool {
        self.top_only
    }

    pub fn verify(&self) -> bool {
        self.verify
    }

    pub fn qcow2(&self) -> bool {
        self.qcow2
    }

    /// The stream reads only the ranges its opener listed (RANGES frames after OPEN).
    pub fn ranges(&self) -> bool {
        self.ranges
    }

    /// The volume checksum an updating WRITE must end with.
    pub fn update(&self) -> Option<[u8; 32]> {
        self.update
    }

    /// The partial upload the stream names.
    pub fn resume(&self) -> Option<ResumeKey> {
        self.resume
    }

    pub fn zero_granularity(&self) -> u32 {
        self.zero_granularity
    }

    /// The options of an OPEN's flags byte and granularity; `None` for a flag this version
    /// does not know.
    pub(super) fn from_wire(flags: u8, zero_granularity: u32) -> Option<Self> {
        // All eight bits are defined (TOP_ONLY took the last): no flag byte is unknown. The
        // Option stays for the next version's flags, which this one will refuse.
        let on = |bit: u8| flags & bit != 0;
        Some(OpenOptions {
            allocated: on(bits::ALLOCATED),
            destination_is_zero: on(bits::DESTINATION_IS_ZERO),
            no_extents: on(bits::NO_EXTENTS),
            overwrite: on(bits::OVERWRITE),
            no_sparse: on(bits::NO_SPARSE),
            force_share: on(bits::FORCE_SHARE),
            priority: on(bits::PRIORITY),
            top_only: on(bits::TOP_ONLY),
            // From OPEN's header flags (the frame codec sets it).
            verify: false,
            qcow2: false,
            ranges: false,
            update: None,
            resume: None,
            zero_granularity,
        })
    }

    /// The flags byte of OPEN.
    pub(super) fn wire_flags(&self) -> u8 {
        [
            (self.allocated, bits::ALLOCATED),
            (self.destination_is_zero, bits::DESTINATION_IS_ZERO),
            (self.no_extents, bits::NO_EXTENTS),
            (self.overwrite, bits::OVERWRITE),
            (self.no_sparse, bits::NO_SPARSE),
            (self.force_share, bits::FORCE_SHARE),
            (self.priority, bits::PRIORITY),
            (self.top_only, bits::TOP_ONLY),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, bit)| flags | bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_byte_round_trips() {
        for flags in 0..=bits::KNOWN {
            let options = OpenOptions::from_wire(flags, 512).unwrap();
            assert_eq!(options.wire_flags(), flags);
            assert_eq!(options.zero_granularity(), 512);
        }
        // Every bit of the byte has a meaning now: nothing is left to refuse.
        assert_eq!(bits::KNOWN, u8::MAX);
        let o = OpenOptions::default()
            .with_overwrite(true)
            .with_no_sparse(true);
        assert_eq!(o.wire_flags(), bits::OVERWRITE | bits::NO_SPARSE);
        assert!(o.overwrite() && o.no_sparse() && !o.allocated());
    }
}
