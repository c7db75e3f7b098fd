//! The journal of a partial volume: which ranges of a temporary are written and durable, with
//! their digests, and the identity of the source they came from. A resumable download keeps
//! one beside its temporary; attach/copy-on-read keeps one beside its cache. Whoever holds it:
//!
//! 1. [`Journal::create`] a new one (or [`Journal::adopt`] one left behind, which checks it),
//! 2. writes a range into the partial, `fdatasync`s the partial, then [`Journal::record`]s the
//!    range with its digest (the journal is durable when `record` returns),
//! 3. asks [`Journal::missing`] what is still to fetch,
//! 4. [`Journal::finish`]es: every recorded range read back and checked against its digest,
//!    the partial synced and renamed to its final name, the journal removed.
//!
//! The format is text, one record per line, rewritten whole (temporary, fsync, rename) on each
//! record so that it is always sorted and never half-written:
//!
//! ```text
//! volstream-journal 1
//! size 2147483648
//! identity 5f1c...            (or `identity -` when the source reported none)
//! range 0 67108864 3a7b...    (offset, length, BLAKE3 of the range's bytes)
//! ...
//! check 9e0d...               (BLAKE3 of every byte above)
//! ```
//!
//! Rewriting costs one small file per record; a caller records every few tens of MiB, so a
//! 1 TiB volume's journal stays under a megabyte. A journal that was cut, edited, or whose
//! ranges overlap, are unsorted, empty or run past the size is refused with the line at fault:
//! nothing in it is trusted, and the caller starts over.

use crate::error::Error;
use engine::{Range, VolumeIdentity};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &str = "volstream-journal 1";
/// Most records a journal may hold: a bound on what adopting one reads and keeps, whatever
/// the file says (a caller records at most every 64 KiB... and in practice every 64 MiB).
pub const MAX_RECORDS: usize = 1 << 20;
/// Longest journal accepted (`MAX_RECORDS` lines of at most ~110 bytes).
const MAX_LEN: u64 = 128 << 20;

/// One durable range of the partial and the BLAKE3 digest of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub range: Range,
    pub digest: [u8; 32],
}

/// What a journal says about its partial.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
    size: u64,
    identity: Option<VolumeIdentity>,
    records: Vec<Record>,
}

/// The journal beside `partial`.
pub fn path_for(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// Where a resumable download of `dest` keeps its partial: `.NAME.volstream-partial` beside
/// it (the journal is [`path_for`] that). The name depends on `dest` alone, so a later run
/// finds it; it is not a [`crate::temp`] name, so no cleanup of dead writers' temporaries
/// removes it.
pub fn partial_for(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let mut partial = b".".to_vec();
    partial.extend_from_slice(&crate::temp::stem(name));
    partial.extend_from_slice(PARTIAL_MARK.as_bytes());
    dest.with_file_name(std::ffi::OsStr::from_bytes(&partial))
}

/// What follows the stem in a partial's name.
pub const PARTIAL_MARK: &str = ".volstream-partial";

fn bad(path: &Path, line: usize, why: impl std::fmt::Display) -> Error {
    Error::Journal {
        path: path.display().to_string(),
        problem: format!("line {line}: {why}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Journal {
    /// A new journal at `path` for a partial of `size` bytes from a source of `identity`,
    /// with nothing recorded. Replaces any journal there.
    pub fn create(
        path: impl Into<PathBuf>,
        size: u64,
        identity: Option<VolumeIdentity>,
    ) -> Result<Journal, Error> {
        let journal = Journal {
            path: path.into(),
            size,
            identity,
            records: Vec::new(),
        };
        journal.save()?;
        Ok(journal)
    }

    /// Reads and checks the journal at `path`. `Error::Journal` names what is wrong with it;
    /// `Error::Io` with `NotFound` means there is none.
    pub fn adopt(path: impl Into<PathBuf>) -> Result<Journal, Error> {
        let path = path.into();
        let shown = path.display().to_string();
        let file = File::open(&path).map_err(|e| Error::io(format!("opening {shown}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("inspecting {shown}"), e))?
            .len();
        if len > MAX_LEN {
            return Err(bad(&path, 0, format!("{len} bytes, more than any journal")));
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(&mut text, 0)
            .map_err(|e| Error::io(format!("reading {shown}"), e))?;
        Self::parse(path, &text)
    }

    fn parse(path: PathBuf, text: &[u8]) -> Result<Journal, Error> {
        let text = std::str::from_utf8(text).map_err(|_| bad(&path, 0, "not text"))?;
        if !text.ends_with('\n') {
            return Err(bad(
                &path,
                text.lines().count(),
                "cut short (no final newline)",
            ));
        }
        let lines: Vec<&str> = text.lines().collect();
        let n = lines.len();
        let last = lines.last().copied().unwrap_or_default();
        let Some(check) = last.strip_prefix("check ").and_then(unhex32) else {
            return Err(bad(
                &path,
                n,
                "cut short or edited (no check line at the end)",
            ));
        };
        let body = &text[..text.len() - last.len() - 1];
        if *blake3::hash(body.as_bytes()).as_bytes() != check {
            return Err(bad(
                &path,
                n,
                "edited or damaged (its check does not match)",
            ));
        }
        if lines.first() != Some(&MAGIC) {
            return Err(bad(&path, 1, format!("not a journal (expected {MAGIC:?})")));
        }
        let size = lines
            .get(1)
            .and_then(|l| l.strip_prefix("size "))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad(&path, 2, "expected `size BYTES`"))?;
        let identity = match lines.get(2).and_then(|l| l.strip_prefix("identity ")) {
            Some("-") => None,
            Some(h) => Some(
                VolumeIdentity::from_hex(h)
                    .ok_or_else(|| bad(&path, 3, "the identity is not 1 to 64 hex bytes"))?,
            ),
            None => return Err(bad(&path, 3, "expected `identity HEX` or `identity -`")),
        };
        let records = &lines[3..n - 1];
        if records.len() > MAX_RECORDS {
            return Err(bad(&path, n, format!("more than {MAX_RECORDS} ranges")));
        }
        let mut journal = Journal {
            path,
            size,
            identity,
            records: Vec::with_capacity(records.len()),
        };
        for (i, line) in records.iter().enumerate() {
            let at = i + 4;
            let fields: Vec<&str> = line.split(' ').collect();
            let (offset, len, digest) = match fields[..] {
                ["range", o, l, d] => (o.parse::<u64>(), l.parse::<u64>(), unhex32(d)),
                _ => {
                    return Err(bad(
                        &journal.path,
                        at,
                        "expected `range OFFSET LENGTH DIGEST`",
                    ))
                }
            };
            let (Ok(offset), Ok(len), Some(digest)) = (offset, len, digest) else {
                return Err(bad(
                    &journal.path,
                    at,
                    "a field is not a number or a digest",
                ));
            };
            let record = Record {
                range: Range::new(offset, len),
                digest,
            };
            journal
                .check(&record)
                .map_err(|why| bad(&journal.path, at, why))?;
            journal.records.push(record);
        }
        Ok(journal)
    }

    /// Whether `record` may follow the ones held (used for adopted and new records alike).
    fn check(&self, record: &Record) -> Result<(), String> {
        let r = record.range;
        if r.len == 0 {
            return Err(format!("range {r} is empty"));
        }
        match r.offset.checked_add(r.len) {
            Some(end) if end <= self.size => {}
            _ => return Err(format!("range {r} runs past the {}-byte volume", self.size)),
        }
        if let Some(prev) = self.records.last() {
            if r.offset < prev.range.end() {
                return Err(format!(
                    "range {r} overlaps or comes before range {} (ranges are kept sorted)",
                    prev.range
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The partial's length: the source volume's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The source's identity when the partial was begun.
    pub fn identity(&self) -> Option<&VolumeIdentity> {
        self.identity.as_ref()
    }

    /// The durable ranges, sorted, not overlapping.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Bytes recorded.
    pub fn recorded_bytes(&self) -> u64 {
        self.records.iter().map(|r| r.range.len).sum()
    }

    /// What is not recorded yet, in order.
    pub fn missing(&self) -> Vec<Range> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.records {
            if r.range.offset > at {
                out.push(Range::new(at, r.range.offset - at));
            }
            at = r.range.end();
        }
        if at < self.size {
            out.push(Range::new(at, self.size - at));
        }
        out
    }

    /// Records `range` of the partial with the BLAKE3 `digest` of its bytes. The caller has
    /// made those bytes durable (fdatasync) first; the journal is durable when this returns.
    /// A range that overlaps one recorded, is empty or runs past the size is refused.
    pub fn record(&mut self, range: Range, digest: [u8; 32]) -> Result<(), Error> {
        self.record_all(&[Record { range, digest }])
    }

    /// Records several ranges at once (one rewrite of the journal for all of them), as
    /// [`Journal::record`]; on an error none of them is recorded.
    pub fn record_all(&mut self, records: &[Record]) -> Result<(), Error> {
        let before = self.records.clone();
        for r in records {
            let at = self
                .records
                .partition_point(|h| h.range.offset < r.range.offset);
            let range = r.range;
            let overlaps =
                |h: &Record| h.range.offset < range.end() && range.offset < h.range.end();
            let outside = range.len == 0
                || range
                    .offset
                    .checked_add(range.len)
                    .is_none_or(|e| e > self.size);
            let near = &self.records[at.saturating_sub(1)..(at + 1).min(self.records.len())];
            if outside || near.iter().any(overlaps) || self.records.len() == MAX_RECORDS {
                self.records = before;
                return Err(Error::Journal {
                    path: self.path.display().to_string(),
                    problem: format!(
                        "range {range} overlaps a recorded one, lies outside, or is one too many"
                    ),
                });
            }
            self.records.insert(at, *r);
        }
        if let Err(e) = self.save() {
            self.records = before;
            return Err(e);
        }
        Ok(())
    }

    fn render(&self) -> String {
        let mut text = format!("{MAGIC}\nsize {}\n", self.size);
        match &self.identity {
            Some(id) => text.push_str(&format!("identity {}\n", id.to_hex())),
            None => text.push_str("identity -\n"),
        }
        for r in &self.records {
            text.push_str(&format!(
                "range {} {} {}\n",
                r.range.offset,
                r.range.len,
                hex(&r.digest)
            ));
        }
        let check = blake3::hash(text.as_bytes());
        text.push_str(&format!("check {}\n", hex(check.as_bytes())));
        text
    }

    /// Writes the journal under a temporary name, syncs it, renames it over the old one and
    /// syncs the directory: a crash leaves the old journal or the new, never a mix.
    fn save(&self) -> Result<(), Error> {
        let shown = self.path.display().to_string();
        let io = |what: &str, e: io::Error| Error::io(format!("{what} {shown}"), e);
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io("writing", e))?;
        f.write_all(self.render().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replacing", e))?;
        sync_dir(&self.path).map_err(|e| io("syncing the directory of", e))
    }

    /// Reads every recorded range of `partial` back and compares it with its digest: what a
    /// crash, a full disk or another writer did to the partial since it was recorded.
    pub fn verify(&self, partial: &File) -> Result<(), Error> {
        let mut buf = vec![0u8; 1 << 20];
        for r in &self.records {
            let mut h = blake3::Hasher::new();
            let mut at = r.range.offset;
            while at < r.range.end() {
                let n = ((r.range.end() - at) as usize).min(buf.len());
                partial
                    .read_exact_at(&mut buf[..n], at)
                    .map_err(|e| Error::io(format!("reading back range {}", r.range), e))?;
                h.update(&buf[..n]);
                at += n as u64;
            }
            if *h.finalize().as_bytes() != r.digest {
                return Err(Error::Journal {
                    path: self.path.display().to_string(),
                    problem: format!(
                        "range {} of the partial no longer has the recorded digest",
                        r.range
                    ),
                });
            }
        }
        Ok(())
    }

    /// Finishes a complete partial: every byte recorded, each range read back against its
    /// digest, the partial synced and renamed to `final_path`, the journal removed. Nothing
    /// reaches the final name unless all of that held.
    pub fn finish(self, partial: &Path, final_path: &Path) -> Result<(), Error> {
        if let Some(gap) = self.missing().first() {
            return Err(Error::Journal {
                path: self.path.display().to_string(),
                problem: format!("range {gap} was never recorded"),
            });
        }
        let shown = partial.display().to_string();
        let file = File::open(partial).map_err(|e| Error::io(format!("opening {shown}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("inspecting {shown}"), e))?
            .len();
        if len != self.size {
            return Err(Error::Length {
                expected: self.size,
                got: len,
            });
        }
        self.verify(&file)?;
        file.sync_all()
            .map_err(|e| Error::io(format!("syncing {shown}"), e))?;
        std::fs::rename(partial, final_path)
            .map_err(|e| Error::io(format!("renaming {shown}"), e))?;
        self.remove()?;
        sync_dir(final_path).map_err(|e| Error::io(format!("syncing {shown}'s directory"), e))
    }

    /// Removes the journal (a partial given up, or finished).
    pub fn remove(self) -> Result<(), Error> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", self.path.display()), e))
            }
            _ => Ok(()),
        }
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("journal-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn digest_of(bytes: &[u8]) -> [u8; 32] {
        *blake3::hash(bytes).as_bytes()
    }

    /// Writes `text` with a valid check line, as a forger (or a bug) would.
    fn forge(path: &Path, body: &str) {
        let check = blake3::hash(body.as_bytes());
        std::fs::write(path, format!("{body}check {}\n", hex(check.as_bytes()))).unwrap();
    }

    #[test]
    fn records_survive_adoption_and_finish_renames() {
        let dir = temp("finish");
        let (partial, done) = (dir.join("v.part"), dir.join("v"));
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&partial, &data).unwrap();
        let id = VolumeIdentity::new(vec![9; 32]);
        let mut j = Journal::create(path_for(&partial), 300, id.clone()).unwrap();
        j.record(Range::new(200, 100), digest_of(&data[200..]))
            .unwrap();
        j.record(Range::new(0, 100), digest_of(&data[..100]))
            .unwrap();
        assert!(j.record(Range::new(50, 100), [0; 32]).is_err(), "overlap");
        assert!(
            j.record(Range::new(250, 100), [0; 32]).is_err(),
            "past the end"
        );
        let j = Journal::adopt(path_for(&partial)).unwrap();
        assert_eq!(j.identity(), id.as_ref());
        assert_eq!(j.missing(), vec![Range::new(100, 100)]);
        assert_eq!(j.recorded_bytes(), 200);
        let mut j = j;
        assert!(matches!(
            j.clone().finish(&partial, &done),
            Err(Error::Journal { .. })
        ));
        j.record(Range::new(100, 100), digest_of(&data[100..200]))
            .unwrap();
        j.finish(&partial, &done).unwrap();
        assert_eq!(std::fs::read(&done).unwrap(), data);
        assert!(!partial.exists() && !path_for(&partial).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_partial_is_not_finished() {
        let dir = temp("damaged");
        let (partial, done) = (dir.join("v.part"), dir.join("v"));
        std::fs::write(&partial, [1u8; 64]).unwrap();
        let mut j = Journal::create(path_for(&partial), 64, None).unwrap();
        j.record(Range::new(0, 64), digest_of(&[1u8; 64])).unwrap();
        File::options()
            .write(true)
            .open(&partial)
            .unwrap()
            .write_all_at(&[2], 10)
            .unwrap();
        let e = j.finish(&partial, &done).unwrap_err();
        assert!(e.to_string().contains("no longer has"), "{e}");
        assert!(!done.exists(), "nothing under the final name");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_journals_are_refused_with_the_line_at_fault() {
        let dir = temp("hostile");
        let path = dir.join("j");
        let mut j = Journal::create(&path, 1 << 20, VolumeIdentity::new(vec![1; 8])).unwrap();
        j.record(Range::new(0, 4096), [3; 32]).unwrap();
        j.record(Range::new(8192, 4096), [4; 32]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let refused = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            match Journal::adopt(&path) {
                Err(Error::Journal { problem, .. }) => problem,
                other => panic!("adopted {other:?}"),
            }
        };
        // Cut anywhere: refused.
        for cut in [1, good.len() / 2, good.len() - 1] {
            let why = refused(&good[..cut]);
            assert!(
                why.contains("cut short") || why.contains("check"),
                "{cut}: {why}"
            );
        }
        // One digit changed: refused.
        let mut edited = good.clone();
        let at = String::from_utf8_lossy(&good).find("8192").unwrap();
        edited[at] = b'9';
        assert!(refused(&edited).contains("check does not match"));
        // Well-formed but wrong lists (a valid check line, as a bug would write them).
        let head = format!("{MAGIC}\nsize 65536\nidentity -\n");
        let d = hex(&[0; 32]);
        let cases = [
            (format!("range 100 10 {d}\nrange 105 10 {d}\n"), "overlaps"),
            (
                format!("range 100 10 {d}\nrange 0 10 {d}\n"),
                "comes before",
            ),
            (format!("range 65530 10 {d}\n"), "past the"),
            (format!("range 10 0 {d}\n"), "empty"),
            (format!("range 18446744073709551615 2 {d}\n"), "past the"),
            ("range 1 2 zz\n".to_string(), "not a number or a digest"),
            ("bogus\n".to_string(), "expected `range"),
        ];
        for (records, want) in cases {
            forge(&path, &format!("{head}{records}"));
            match Journal::adopt(&path) {
                Err(Error::Journal { problem, .. }) => {
                    assert!(problem.contains(want), "{records:?}: {problem}")
                }
                other => panic!("{records:?} adopted: {other:?}"),
            }
        }
        forge(&path, "volstream-journal 2\nsize 1\nidentity -\n");
        assert!(matches!(Journal::adopt(&path), Err(Error::Journal { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
