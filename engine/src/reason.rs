//! Why a stream or a connection ended, as one vocabulary for the protocol (ABORT, REJECT and
//! GOAWAY carry its code) and for sources and sinks (a [`VolumeError`](crate::VolumeError) names
//! one). It sits below both, so neither depends on the other for it.

use std::fmt;

/// Why a stream or connection ended. Unknown codes from newer peers are kept, not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Protocol,
    Internal,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    InvalidName,
    Io,
    NoSpace,
    DigestMismatch,
    Cancelled,
    TooManyStreams,
    FlowControl,
    Timeout,
    ConnectionLost,
    Unsupported,
    GoingAway,
    /// A block device sink is smaller than the volume (found at open, before any write).
    DeviceTooSmall,
    Other(u32),
}

impl Reason {
    pub fn code(self) -> u32 {
        match self {
            Reason::Protocol => 1,
            Reason::Internal => 2,
            Reason::NotFound => 3,
            Reason::AlreadyExists => 4,
            Reason::PermissionDenied => 5,
            Reason::InvalidName => 6,
            Reason::Io => 7,
            Reason::NoSpace => 8,
            Reason::DigestMismatch => 9,
            Reason::Cancelled => 10,
            Reason::TooManyStreams => 11,
            Reason::FlowControl => 12,
            Reason::Timeout => 13,
            Reason::ConnectionLost => 14,
            Reason::Unsupported => 15,
            Reason::GoingAway => 16,
            Reason::DeviceTooSmall => 17,
            Reason::Other(code) => code,
        }
    }

    pub fn from_code(code: u32) -> Reason {
        match code {
            1 => Reason::Protocol,
            2 => Reason::Internal,
            3 => Reason::NotFound,
            4 => Reason::AlreadyExists,
            5 => Reason::PermissionDenied,
            6 => Reason::InvalidName,
            7 => Reason::Io,
            8 => Reason::NoSpace,
            9 => Reason::DigestMismatch,
            10 => Reason::Cancelled,
            11 => Reason::TooManyStreams,
            12 => Reason::FlowControl,
            13 => Reason::Timeout,
            14 => Reason::ConnectionLost,
            15 => Reason::Unsupported,
            16 => Reason::GoingAway,
            17 => Reason::DeviceTooSmall,
            other => Reason::Other(other),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Reason::Protocol => "protocol error",
            Reason::Internal => "internal error",
            Reason::NotFound => "no such volume",
            Reason::AlreadyExists => "volume exists",
            Reason::PermissionDenied => "permission denied",
            Reason::InvalidName => "invalid volume name",
            Reason::Io => "I/O error",
            Reason::NoSpace => "no space left",
            Reason::DigestMismatch => "digest mismatch",
            Reason::Cancelled => "cancelled",
            Reason::TooManyStreams => "too many streams",
            Reason::FlowControl => "flow-control violation",
            Reason::Timeout => "timed out",
            Reason::ConnectionLost => "connection lost",
            Reason::Unsupported => "unsupported",
            Reason::GoingAway => "going away",
            Reason::DeviceTooSmall => "device too small",
            Reason::Other(code) => return write!(f, "error code {code}"),
        };
        f.write_str(text)
    }
}

/// The codes docs/PROTOCOL.md defines, in code order (PROTOCOL is 1), named as there.
const NAMES: [&str; 17] = [
    "PROTOCOL",
    "INTERNAL",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "INVALID_NAME",
    "IO",
    "NO_SPACE",
    "DIGEST_MISMATCH",
    "CANCELLED",
    "TOO_MANY_STREAMS",
    "FLOW_CONTROL",
    "TIMEOUT",
    "CONNECTION_LOST",
    "UNSUPPORTED",
    "GOING_AWAY",
    "DEVICE_TOO_SMALL",
];

impl Reason {
    /// The code's name in docs/PROTOCOL.md (`NOT_FOUND`); `None` for a code it does not define.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Reason::Other(_) => None,
            defined => NAMES.get(defined.code() as usize - 1).copied(),
        }
    }
}

/// Streams counted by the reason they ended with. A fixed array, so counting never allocates;
/// every code the protocol does not define shares one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonCounts([u64; NAMES.len() + 1]);

impl ReasonCounts {
    fn slot(reason: Reason) -> usize {
        match reason.name() {
            Some(_) => reason.code() as usize,
            None => 0,
        }
    }

    pub fn record(&mut self, reason: Reason) {
        self.0[Self::slot(reason)] += 1;
    }

    /// Streams that ended with `reason` (for an undefined code: with any undefined code).
    pub fn get(&self, reason: Reason) -> u64 {
        self.0[Self::slot(reason)]
    }

    /// Each defined reason with its count, in code order, then the undefined codes as `None`.
    pub fn iter(&self) -> impl Iterator<Item = (Option<Reason>, u64)> + '_ {
        let defined = (1..=NAMES.len() as u32).map(|code| Some(Reason::from_code(code)));
        defined
            .chain(std::iter::once(None))
            .map(|reason| (reason, self.0[reason.map_or(0, Self::slot)]))
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn add(&mut self, other: &ReasonCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0.iter()) {
            *mine += theirs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_codes_and_undefined_codes_share_a_slot() {
        assert_eq!(Reason::NotFound.name(), Some("NOT_FOUND"));
        assert_eq!(Reason::GoingAway.name(), Some("GOING_AWAY"));
        assert_eq!(Reason::DeviceTooSmall.name(), Some("DEVICE_TOO_SMALL"));
        // Every defined code has its name, so none falls into the shared slot.
        for code in 1..=NAMES.len() as u32 {
            assert!(Reason::from_code(code).name().is_some(), "{code}");
        }
        assert_eq!(Reason::from_code(NAMES.len() as u32 + 1).name(), None);
        assert_eq!(Reason::Other(0).name(), None);
        let mut counts = ReasonCounts::default();
        counts.record(Reason::Timeout);
        counts.record(Reason::Other(77));
        counts.record(Reason::Other(0));
        assert_eq!(counts.get(Reason::Timeout), 1);
        assert_eq!(counts.get(Reason::Other(99)), 2);
        assert_eq!(counts.total(), 3);
        let listed: Vec<_> = counts.iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(listed, [(Some(Reason::Timeout), 1), (None, 2)]);
    }

    /// The names are docs/PROTOCOL.md's section 5 table, code for code: a code added there
    /// and not here would be counted and labelled as OTHER.
    #[test]
    fn names_are_the_protocol_documents_table() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let section = doc.split("## 5. Reason codes").nth(1).unwrap();
        let table: Vec<(u32, &str)> = section
            .lines()
            .take_while(|l| !l.starts_with("## "))
            .filter_map(|l| {
                let mut cols = l.split('|').map(str::trim).skip(1);
                Some((cols.next()?.parse().ok()?, cols.next()?))
            })
            .collect();
        let ours: Vec<(u32, &str)> = (1..).zip(NAMES).collect();
        assert_eq!(table, ours);
    }
}
