//! The command lines of `download` and `upload`. Each has its own options and help, since the
//! same flag acts on different things: `--allocated` on a download is about the local file,
//! on an upload a request to the server. Both become one [`Settings`] for `transfer::run`.

use crate::error::CliError;
use crate::ConnectArg;
use clap::Args;
use engine::{Range, RangeSet};
use std::sync::Arc;
use std::time::Duration;

/// `volstream download`.
#[derive(Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    connect: ConnectArg,
    /// The server sends holes as HOLE frames (the default).
    #[arg(long, conflicts_with = "no_sparse")]
    sparse: bool,
    /// The server sends holes as zeroes.
    #[arg(long)]
    no_sparse: bool,
    /// FILE ends fully allocated: holes are written as zeroes, never punched.
    #[arg(long, conflicts_with = "destination_is_zero")]
    allocated: bool,
    /// FILE already reads as zeroes (a new or zeroed device): holes need no work there.
    #[arg(long)]
    destination_is_zero: bool,
    /// The server ignores the volume's extent map and reads every byte (its zero detection
    /// still applies).
    #[arg(long)]
    no_extents: bool,
    /// The server's zero-detection granularity: a power of two from 512, or 0 for off.
    #[arg(short = 'S', long = "sparse-size", value_name = "BYTES", default_value_t = 4096,
          value_parser = granularity)]
    sparse_size: u32,
    /// Write over an existing FILE, a regular file or a block device (without it, one is
    /// refused): a file is replaced by the copy, renamed over it once verified; a device is
    /// written in place.
    #[arg(long)]
    overwrite: bool,
    /// Write into an existing regular FILE in place instead of replacing it (with
    /// --overwrite; block devices always are written in place).
    #[arg(long)]
    in_place: bool,
    /// Skip fdatasync of FILE (faster; a crash may lose the data).
    #[arg(long)]
    no_sync: bool,
    /// Write each FILE from a volstream-iohelper process.
    #[arg(long)]
    iohelper: bool,
    /// Write FILEs with O_DIRECT (bypassing the page cache).
    #[arg(long)]
    direct: bool,
    /// The server reads a VOLUME that is a block device even while it is mounted or held by
    /// another program (the copy may then be inconsistent); without it that is refused.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// For a qcow2 overlay: only its own clusters, what its backing files hold as holes.
    #[arg(long)]
    top_only: bool,
    /// After writing each FILE, read it back (data by its map, holes as holes) and compare it
    /// with what the server sent; a difference fails that volume, naming the first offset
    /// found to differ. Not for stdout.
    #[arg(long)]
    verify: bool,
    /// Only this part of each VOLUME (bytes; repeat for several, in any order, without
    /// overlaps): written at its offset into FILE, which gets the volume's size; the rest of
    /// a new FILE reads as zeroes, of an existing one (--in-place) stays as it was. Needs a
    /// server that serves ranges, a FILE that is a file or device, and no --verify.
    #[arg(long = "range", value_name = "OFFSET:LENGTH", value_parser = range_arg)]
    ranges: Vec<Range>,
    /// Each FILE holds an older version of its VOLUME: only the 64 KiB blocks that differ
    /// travel (found by comparing block digests), written into a copy of FILE that replaces
    /// it once its content equals the server's, checked block by block. A FILE that does not
    /// exist yet is downloaded whole.
    #[arg(long, conflicts_with_all = ["ranges", "in_place", "verify", "iohelper"])]
    update: bool,
    /// Copy-on-read: while the one VOLUME downloads, FILE is an NBD disk on ADDR (unix:PATH
    /// or tcp:HOST:PORT on loopback; export VOLUME, also the default export). Reads of what
    /// has not arrived are fetched at once, ahead of the download; writes stay in FILE and
    /// are never overwritten by it. At the end the bytes that came from the server are
    /// checked against its block digests, and FILE gets its name; the disk is served until
    /// its last client disconnects.
    #[arg(long, value_name = "ADDR",
          conflicts_with_all = ["ranges", "in_place", "verify", "iohelper", "update", "direct"])]
    serve_nbd: Option<String>,
    /// With --serve-nbd: the background download stores at most this many data bytes a
    /// second (suffix K, M or G for KiB, MiB, GiB), leaving the rest of the link to what
    /// the NBD clients read.
    #[arg(long, value_name = "BYTES", requires = "serve_nbd", value_parser = rate_arg)]
    background_rate: Option<u64>,
    /// Continue a download that an earlier run left unfinished (killed, interrupted or cut
    /// off): a FILE is written as `.FILE.volstream-partial` beside it, with a journal of the
    /// ranges already on disk, and only what is missing is read. The whole is then checked
    /// against the server's block digests before it becomes FILE. If the source changed (its
    /// identity or size, or the digests differ), the download says so and starts over (see
    /// --no-restart). With --resume an interrupted download keeps its partial; without it,
    /// a partial left behind is removed and the download starts over. Only for FILEs that are
    /// regular files (not devices, stdout, --in-place, --range, --update, --iohelper or
    /// --no-sync).
    #[arg(long, conflicts_with_all = ["ranges", "in_place", "update", "iohelper", "no_sync", "serve_nbd"])]
    resume: bool,
    /// With --resume: refuse, leaving the partial as it is, instead of starting over when a
    /// partial cannot be resumed (the source changed, or the journal is damaged).
    #[arg(long, requires = "resume")]
    no_restart: bool,
    #[command(flatten)]
    output: OutputArgs,
    /// VOLUME FILE pairs: the server's VOLUME is written to the local FILE (`-` is stdout;
    /// then every message goes to stderr). Either may be an NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH); pairs whose VOLUME is one
    /// are copied here, without --connect.
    #[arg(value_name = "VOLUME FILE")]
    pairs: Vec<String>,
}

/// `volstream upload`.
#[derive(Args)]
pub struct UploadArgs {
    #[command(flatten)]
    connect: ConnectArg,
    /// Send holes as HOLE frames (the default).
    #[arg(long, conflicts_with = "no_sparse")]
    sparse: bool,
    /// Send holes as zeroes.
    #[arg(long)]
    no_sparse: bool,
    /// The server leaves VOLUME fully allocated: holes written as zeroes, never punched.
    #[arg(long, conflicts_with = "destination_is_zero")]
    allocated: bool,
    /// VOLUME already reads as zeroes on the server (a zeroed device): holes need no work.
    #[arg(long)]
    destination_is_zero: bool,
    /// Ignore FILE's extent map and read every byte (zero detection still applies).
    #[arg(long)]
    no_extents: bool,
    /// Zero-detection granularity for reading FILE: a power of two from 512, or 0 for off.
    #[arg(short = 'S', long = "sparse-size", value_name = "BYTES", default_value_t = 4096,
          value_parser = granularity)]
    sparse_size: u32,
    /// Write over an existing VOLUME on the server, a file (the upload is renamed over it once
    /// verified) or a served device (written in place); without it, one is refused.
    #[arg(long)]
    overwrite: bool,
    /// The length of a FILE that is a pipe (`-` is stdin): a pipe cannot tell it, and the
    /// server needs it before the first byte.
    #[arg(long, value_name = "BYTES")]
    size: Option<u64>,
    /// Read each FILE from a volstream-iohelper process.
    #[arg(long)]
    iohelper: bool,
    /// Read FILEs with O_DIRECT (bypassing the page cache).
    #[arg(long)]
    direct: bool,
    /// Read a FILE that is a block device even while it is mounted or held by another
    /// program (the copy may then be inconsistent); without it that is refused.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The server reads each VOLUME back after writing it (data by its map, holes as holes)
    /// and compares it with what it received before the VOLUME gets its name; a difference
    /// fails that volume, naming the first offset found to differ.
    #[arg(long)]
    verify: bool,
    /// How the server stores each VOLUME: raw, or qcow2 (a new image created through
    /// qemu-img, whose guest view is FILE; an existing qcow2 with --overwrite is written in
    /// place through qemu-nbd).
    #[arg(long, value_name = "FORMAT", default_value = "raw",
          value_parser = ["raw", "qcow2"])]
    format: String,
    /// Each VOLUME holds an older version of its FILE: the server sends its block digests,
    /// only the 64 KiB blocks that differ travel, and the server writes them into a copy of
    /// VOLUME that replaces it once its content equals FILE's, checked block by block (implies
    /// --overwrite). A VOLUME the server does not have is uploaded whole.
    #[arg(long, conflicts_with_all = ["size", "verify", "format"])]
    update: bool,
    /// If the upload breaks off, the server (serve --resume-keep) keeps what arrived; the same
    /// command with --resume then sends only what the server lacks. The partial is found by
    /// FILE's absolute path, the VOLUME and the identity this client connects with; a FILE
    /// that changed since is uploaded anew. The result gets the VOLUME's name only once its
    /// content equals FILE's, checked block by block.
    #[arg(long, conflicts_with_all = ["size", "verify", "format", "update"])]
    resume: bool,
    #[command(flatten)]
    output: OutputArgs,
    /// FILE VOLUME pairs: the local FILE (`-` is stdin, with --size) becomes the server's
    /// VOLUME. Either may be an NBD export (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH); pairs whose VOLUME is one are copied here, without
    /// --connect.
    #[arg(value_name = "FILE VOLUME")]
    pairs: Vec<String>,
}

#[derive(Args)]
struct OutputArgs {
    /// Draw progress bars on stderr (the default when stderr is a terminal, without --json).
    #[arg(long)]
    progress: bool,
    /// Print JSON lines instead of text: each transfer's started, progress, and finished or
    /// failed events (on stdout, or on stderr when stdout carries a volume).
    #[arg(long)]
    json: bool,
    /// Seconds between a transfer's --json progress events (at most one each, and only when
    /// bytes moved).
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = interval)]
    progress_interval: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Download,
    Upload,
}

/// One pair: a volume on the server and a local file.
pub struct Pair {
    pub volume: String,
    /// `-`: stdout for a download, stdin for an upload.
    pub file: String,
}

/// What `transfer::run` needs, whichever command it came from. Options the direction does
/// not have are off.
pub struct Settings {
    pub direction: Direction,
    pub connect: ConnectArg,
    pub no_sparse: bool,
    pub allocated: bool,
    pub destination_is_zero: bool,
    pub no_extents: bool,
    pub sparse_size: u32,
    pub overwrite: bool,
    pub in_place: bool,
    pub no_sync: bool,
    pub size: Option<u64>,
    pub iohelper: bool,
    pub direct: bool,
    pub force_share: bool,
    /// Downloads: only a qcow2 overlay's own clusters.
    pub top_only: bool,
    pub verify: bool,
    /// Uploads: the server writes a qcow2 image.
    pub qcow2: bool,
    /// Downloads: only these ranges of each volume.
    pub ranges: Option<Arc<RangeSet>>,
    /// Only the blocks that differ from what the destination holds travel.
    pub update: bool,
    /// Uploads: resumable, continuing the partial the server kept, if any.
    pub resume_upload: bool,
    /// Downloads: adopt a partial left behind, keep it when interrupted.
    pub resume: bool,
    /// Downloads: refuse instead of starting over when a partial cannot be resumed.
    pub no_restart: bool,
    pub progress: bool,
    pub json: bool,
    pub progress_interval: Duration,
    pub pairs: Vec<Pair>,
    /// `download --serve-nbd`: where FILE is exported while it arrives.
    pub serve_nbd: Option<String>,
    pub background_rate: Option<u64>,
}

impl DownloadArgs {
    pub fn settings(self) -> Result<Settings, CliError> {
        let pairs = pairs(&self.pairs, Direction::Download)?;
        let ranges = range_set(self.ranges)?;
        if ranges.is_some() && (self.verify || self.iohelper) {
            return Err(CliError::Usage(
                "--range cannot be combined with --verify or --iohelper yet".into(),
            ));
        }
        Ok(Settings {
            direction: Direction::Download,
            connect: self.connect,
            no_sparse: self.no_sparse,
            allocated: self.allocated,
            destination_is_zero: self.destination_is_zero,
            no_extents: self.no_extents,
            sparse_size: self.sparse_size,
            overwrite: self.overwrite,
            in_place: self.in_place,
            no_sync: self.no_sync,
            size: None,
            iohelper: self.iohelper,
            direct: self.direct,
            force_share: self.force_share,
            top_only: self.top_only,
            verify: self.verify,
            qcow2: false,
            ranges,
            update: self.update,
            resume_upload: false,
            resume: self.resume,
            no_restart: self.no_restart,
            progress: self.output.progress,
            json: self.output.json,
            progress_interval: self.output.progress_interval,
            pairs,
            serve_nbd: self.serve_nbd,
            background_rate: self.background_rate,
        })
    }
}

impl UploadArgs {
    pub fn settings(self) -> Result<Settings, CliError> {
        let pairs = pairs(&self.pairs, Direction::Upload)?;
        Ok(Settings {
            direction: Direction::Upload,
            connect: self.connect,
            no_sparse: self.no_sparse,
            allocated: self.allocated,
            destination_is_zero: self.destination_is_zero,
            no_extents: self.no_extents,
            sparse_size: self.sparse_size,
            overwrite: self.overwrite,
            in_place: false,
            no_sync: false,
            size: self.size,
            iohelper: self.iohelper,
            direct: self.direct,
            force_share: self.force_share,
            top_only: false,
            verify: self.verify,
            qcow2: self.format == "qcow2",
            ranges: None,
            update: self.update,
            resume_upload: self.resume,
            resume: false,
            no_restart: false,
            progress: self.output.progress,
            json: self.output.json,
            progress_interval: self.output.progress_interval,
            pairs,
            serve_nbd: None,
            background_rate: None,
        })
    }
}

/// The positional arguments as pairs; what is missing is named.
fn pairs(args: &[String], direction: Direction) -> Result<Vec<Pair>, CliError> {
    let (first, second) = match direction {
        Direction::Download => ("VOLUME", "FILE"),
        Direction::Upload => ("FILE", "VOLUME"),
    };
    if args.is_empty() {
        return Err(CliError::Usage(format!(
            "nothing to transfer: give {first} {second} pairs"
        )));
    }
    if args.len() % 2 == 1 {
        let last = &args[args.len() - 1];
        return Err(CliError::Usage(format!(
            "{first} {last:?} has no {second}: arguments come in {first} {second} pairs"
        )));
    }
    let stdio = args.chunks(2).filter(|p| p[side(direction)] == "-").count();
    if stdio > 1 {
        let stream = match direction {
            Direction::Download => "stdout",
            Direction::Upload => "stdin",
        };
        return Err(CliError::Usage(format!(
            "`-` ({stream}) can be the {second} of one pair only, not {stdio}"
        )));
    }
    Ok(args
        .chunks(2)
        .map(|p| Pair {
            volume: p[1 - side(direction)].clone(),
            file: p[side(direction)].clone(),
        })
        .collect())
}

/// Which of a pair's two arguments is the local file.
fn side(direction: Direction) -> usize {
    match direction {
        Direction::Download => 1,
        Direction::Upload => 0,
    }
}

/// `-S`: zero detection compares aligned blocks; below a sector, or not a power of two, the
/// blocks would not line up with anything a disk or filesystem allocates.
fn granularity(text: &str) -> Result<u32, String> {
    const RULE: &str = "a power of two from 512 (e.g. 4096), or 0 to turn zero detection off";
    let value: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes: {RULE}"))?;
    if value == 0 || (value >= 512 && value.is_power_of_two()) {
        Ok(value)
    } else {
        Err(format!("{value} bytes is no granularity: {RULE}"))
    }
}

/// `--range OFFSET:LENGTH`, in bytes.
fn range_arg(text: &str) -> Result<Range, String> {
    let bad = || format!("{text:?} is not OFFSET:LENGTH in bytes (e.g. 1048576:65536)");
    let (offset, len) = text.split_once(':').ok_or_else(bad)?;
    let offset: u64 = offset.parse().map_err(|_| bad())?;
    let len: u64 = len.parse().map_err(|_| bad())?;
    if len == 0 {
        return Err(format!("{text:?}: the length must be more than 0"));
    }
    offset
        .checked_add(len)
        .map(|_| Range::new(offset, len))
        .ok_or_else(|| format!("{text:?} runs past 2^64 bytes"))
}

/// The `--range`s as one list, in order; overlapping ones are refused (they are a mistake,
/// and the protocol takes only disjoint ranges).
fn range_set(mut ranges: Vec<Range>) -> Result<Option<Arc<RangeSet>>, CliError> {
    if ranges.is_empty() {
        return Ok(None);
    }
    ranges.sort();
    RangeSet::new(ranges)
        .map(|set| Some(Arc::new(set)))
        .map_err(|e| CliError::Usage(format!("--range: {e}")))
}

/// A positive number of seconds, at most an hour.
fn interval(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if value > 0.0 && value <= 3600.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!("{text} s: expected more than 0 and at most 3600"))
    }
}

/// `--background-rate`: bytes a second, with an optional K, M or G (binary) suffix.
fn rate_arg(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a rate (BYTES, or with K, M or G)"))?;
    n.checked_shl(shift)
        .filter(|&r| r > 0 && r >> shift == n)
        .ok_or_else(|| format!("{text:?} is not a rate above zero that fits 64 bits"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn granularity_is_zero_or_a_power_of_two_from_512() {
        for ok in ["0", "512", "4096", "1048576", "2147483648"] {
            assert!(super::granularity(ok).is_ok(), "{ok}");
        }
        for bad in ["1", "3", "256", "4097", "-1", "4k", ""] {
            assert!(super::granularity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_are_offset_colon_length_and_disjoint() {
        use engine::Range;
        assert_eq!(super::range_arg("4096:512"), Ok(Range::new(4096, 512)));
        for bad in ["4096", "a:1", "1:", "5:0", "18446744073709551615:2", "-1:2"] {
            assert!(super::range_arg(bad).is_err(), "{bad}");
        }
        let set = super::range_set(vec![Range::new(100, 10), Range::new(0, 10)]).unwrap();
        assert_eq!(set.unwrap().len(), 2, "sorted, not refused");
        let overlap = super::range_set(vec![Range::new(0, 10), Range::new(5, 10)]);
        assert!(overlap.unwrap_err().to_string().contains("overlaps"));
        assert!(super::range_set(vec![]).unwrap().is_none());
    }

    #[test]
    fn intervals_are_positive_seconds() {
        assert_eq!(
            super::interval("0.25"),
            Ok(std::time::Duration::from_millis(250))
        );
        for bad in ["0", "-1", "NaN", "inf", "3601", "1s", ""] {
            assert!(super::interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_take_binary_suffixes_and_refuse_zero_and_overflow() {
        assert_eq!(super::rate_arg("1500"), Ok(1500));
        assert_eq!(super::rate_arg("4K"), Ok(4096));
        assert_eq!(super::rate_arg("10M"), Ok(10 << 20));
        assert_eq!(super::rate_arg("2g"), Ok(2 << 30));
        assert!(super::rate_arg("0").is_err());
        assert!(super::rate_arg("M").is_err());
        assert!(super::rate_arg("1.5M").is_err());
        assert!(super::rate_arg("99999999999G").is_err());
    }
}
