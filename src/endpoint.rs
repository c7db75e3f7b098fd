//! NBD exports (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`) where a volume
//! name or a local file is accepted.

use crate::error::CliError;

/// An NBD URI, if `s` is meant as one (a malformed one is a usage error, not a file name).
pub fn nbd_uri(s: &str) -> Result<Option<nbd::Uri>, CliError> {
    if !nbd::Uri::is_nbd(s) {
        return Ok(None);
    }
    s.parse().map(Some).map_err(CliError::Usage)
}
