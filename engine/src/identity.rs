//! A volume's identity (feature IDENTITY, docs/PROTOCOL.md 6.2.1): opaque bytes a server puts
//! in a READ's ACCEPT that change whenever the volume's content may have changed. A client that
//! holds part of a volume (a resumable download) compares them with what it recorded: equal
//! means the part it holds still belongs to this content; anything else means starting over.
//! Only equality is defined; what the bytes mean is the server's business (fdstream sends a
//! file's device, inode, size and change times; a provider may send a generation it keeps).

use std::fmt;

/// Longest identity on the wire, so a peer cannot make us hold more.
pub const MAX_IDENTITY_LEN: usize = 64;

/// 1 to [`MAX_IDENTITY_LEN`] opaque bytes, compared for equality only.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VolumeIdentity(Vec<u8>);

impl VolumeIdentity {
    /// `None` when `bytes` is empty or longer than [`MAX_IDENTITY_LEN`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<Self> {
        let bytes = bytes.into();
        (1..=MAX_IDENTITY_LEN)
            .contains(&bytes.len())
            .then_some(VolumeIdentity(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lower-case hex, for journals and messages.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The inverse of [`VolumeIdentity::to_hex`].
    pub fn from_hex(text: &str) -> Option<Self> {
        if !text.len().is_multiple_of(2) || !text.is_ascii() {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
            .collect();
        Self::new(bytes?)
    }
}

impl fmt::Debug for VolumeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeIdentity({})", self.to_hex())
    }
}

impl fmt::Display for VolumeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_hex_round_trips() {
        assert!(VolumeIdentity::new(vec![]).is_none());
        assert!(VolumeIdentity::new(vec![0; MAX_IDENTITY_LEN + 1]).is_none());
        let id = VolumeIdentity::new(vec![0, 1, 0xab, 0xff]).unwrap();
        assert_eq!(id.to_hex(), "0001abff");
        assert_eq!(VolumeIdentity::from_hex("0001abff"), Some(id));
        assert_eq!(VolumeIdentity::from_hex("0001abf"), None);
        assert_eq!(VolumeIdentity::from_hex("zz"), None);
        assert_eq!(VolumeIdentity::from_hex(""), None);
    }
}
