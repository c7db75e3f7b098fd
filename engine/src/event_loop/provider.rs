//! What a serving engine asks its host: a volume by name ([`OpenRequest`]), answered by the
//! host's [`Provider`] with a source or sink.

use super::PeerIdentity;
use crate::proto::OpenOptions;
use crate::range::RangeSet;
use crate::reason::Reason;
use crate::volume::{VolumeError, VolumeReader, VolumeWriter};
use std::sync::Arc;

/// What a server asks its host for: a volume by name, for reading or writing.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub name: String,
    pub options: OpenOptions,
    /// For writes, the length of the content the peer will send.
    pub size: u64,
    /// For a READ of only some ranges: the validated list. A reader that can seek reads only
    /// them and says so (`VolumeReader::serves_ranges`); any other is read whole and cut.
    pub ranges: Option<Arc<RangeSet>>,
    /// Where the request came from, for logs (an address, or a Unix peer's pid and uid).
    pub peer: String,
    /// Who asks, as the transport proved it: the place for access control.
    pub identity: PeerIdentity,
}

/// Resolves volume names on the serving side; the place for access control. Called on the
/// loop thread: it must only decide and build the reader or writer, whose `start` does the
/// opening off the loop.
pub trait Provider: Send + Sync {
    fn open_read(&self, request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError>;
    fn open_write(&self, request: &OpenRequest) -> Result<Box<dyn VolumeWriter>, VolumeError>;

    /// The volume list, as content: a LIST document ([`crate::document::format_list`]).
    fn open_list(&self, _request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        Err(VolumeError::new(
            Reason::Unsupported,
            "listing is not offered",
        ))
    }

    /// A volume's allocation map, as content: an EXTENTS document
    /// ([`crate::document::format_extents`]).
    fn open_extents(&self, _request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        Err(VolumeError::new(
            Reason::Unsupported,
            "allocation maps are not offered",
        ))
    }

    /// A volume's block digests, as content: a document of `engine::blockmap`.
    fn open_digests(&self, _request: &OpenRequest) -> Result<Box<dyn VolumeReader>, VolumeError> {
        Err(VolumeError::new(
            Reason::Unsupported,
            "block digests are not offered",
        ))
    }
}
