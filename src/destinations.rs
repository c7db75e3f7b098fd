//! What the CLI checks about its pairs before it connects, and what it says about a device
//! afterwards.

use crate::error::CliError;
use crate::options::Direction;
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Refuses a command in which two pairs write to the same place: one of them would lose
/// (at the rename, or by overwriting the other in place) after all its data had moved.
/// `pairs` are (volume, local path).
pub fn refuse_duplicates(direction: Direction, pairs: &[(&str, &Path)]) -> Result<(), CliError> {
    let mut seen: HashMap<String, String> = HashMap::new();
    for (volume, path) in pairs {
        let (key, shown) = match direction {
            Direction::Upload => (format!("volume {volume}"), format!("volume {volume}")),
            Direction::Download => match identity(path) {
                Some(key) => (key, path.display().to_string()),
                None => continue,
            },
        };
        if let Some(first) = seen.insert(key, shown.clone()) {
            let also = if first == shown {
                String::new()
            } else {
                format!(" (as {first})")
            };
            return Err(CliError::Usage(format!(
                "{shown} is the destination of more than one pair{also}"
            )));
        }
    }
    Ok(())
}

/// What a download's destination is, the same whatever path names it; `None` for a character
/// device (several volumes may go to /dev/null) or a path whose directory does not exist (the
/// transfer reports that itself).
fn identity(path: &Path) -> Option<String> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.file_type().is_char_device() {
            return None;
        }
        return Some(format!("{}:{}", meta.dev(), meta.ino()));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).ok()?;
    Some(dir.join(path.file_name()?).display().to_string())
}

/// For a download onto a block device larger than the volume: what became of the rest.
pub fn device_tail(path: &Path, size: u64) -> Option<String> {
    let device = fdstream::block_device_size(path).ok().flatten()?;
    (device > size).then(|| {
        format!("the device is {device} bytes: bytes {size}..{device} were left as they were")
    })
}
