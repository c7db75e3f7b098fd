//! The documents that LIST and EXTENTS streams carry as their content (docs/PROTOCOL.md 6.1),
//! formatted by the serving side and parsed by the asking side: one line per entry, fields
//! separated by TAB, numbers in decimal.
//!
//! - LIST: `name TAB size TAB allocated LF`, one line per volume;
//! - EXTENTS: `offset TAB length TAB kind LF`, one line per extent, `kind` one of `data`,
//!   `hole`, `zero`; where allocation depth is known (an NBD export serving
//!   `qemu:allocation-depth`) `offset TAB length TAB kind TAB depth TAB present TAB zero TAB
//!   data LF`, `kind` one of `data`, `backing`, `zero`, `unallocated`, the flags `0` or `1` and
//!   `depth` a number (0 the top layer, as `qemu-img map` counts) or `-` (not known).

use std::fmt;

/// One volume of a LIST document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeEntry {
    pub name: String,
    /// Logical length in bytes.
    pub size: u64,
    /// Bytes the volume occupies where it is stored.
    pub allocated: u64,
}

/// What a range of a volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated (or at least not known to be a hole).
    Data,
    /// Unallocated: reads as zero.
    Hole,
    /// Allocated but found to read as zero (zero detection), or in a chain of layers reads as
    /// zero without being read.
    Zero,
    /// In a chain of layers: allocated in a layer below the top one.
    Backing,
    /// In a chain of layers: allocated in none of them.
    Unallocated,
}

impl ExtentKind {
    /// The kind's name in an EXTENTS document (and in the CLI's output).
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentKind::Data => "data",
            ExtentKind::Hole => "hole",
            ExtentKind::Zero => "zero",
            ExtentKind::Backing => "backing",
            ExtentKind::Unallocated => "unallocated",
        }
    }

    pub fn from_name(name: &str) -> Option<ExtentKind> {
        match name {
            "data" => Some(ExtentKind::Data),
            "hole" => Some(ExtentKind::Hole),
            "zero" => Some(ExtentKind::Zero),
            "backing" => Some(ExtentKind::Backing),
            "unallocated" => Some(ExtentKind::Unallocated),
            _ => None,
        }
    }
}

impl fmt::Display for ExtentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One extent of an EXTENTS document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentEntry {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
    /// Where the extent lies in a chain of layers, when that is known.
    pub layer: Option<Layer>,
}

impl ExtentEntry {
    /// An extent of a volume without layers.
    pub fn new(offset: u64, len: u64, kind: ExtentKind) -> ExtentEntry {
        ExtentEntry {
            offset,
            len,
            kind,
            layer: None,
        }
    }
}

/// An extent's place in a chain of layers, in the terms of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    /// 0 the top layer, 1 its backing file, ...; `None` for a range in no layer when the
    /// chain's length is not known.
    pub depth: Option<u32>,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zero without being read.
    pub zero: bool,
    /// Allocated (not a hole).
    pub data: bool,
}

/// A line of a document that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    /// The line, as received.
    pub line: String,
    pub problem: &'static str,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed line {:?}: {}", self.line, self.problem)
    }
}

impl std::error::Error for DocumentError {}

pub fn format_list(volumes: &[VolumeEntry]) -> String {
    volumes
        .iter()
        .map(|v| format!("{}\t{}\t{}\n", v.name, v.size, v.allocated))
        .collect()
}

pub fn format_extents(extents: &[ExtentEntry]) -> String {
    extents.iter().map(format_extent).collect()
}

/// One line of an EXTENTS document.
pub fn format_extent(e: &ExtentEntry) -> String {
    let mut line = format!("{}\t{}\t{}", e.offset, e.len, e.kind);
    if let Some(l) = e.layer {
        let depth = l.depth.map_or("-".to_string(), |d| d.to_string());
        let flag = |x: bool| if x { '1' } else { '0' };
        line.push_str(&format!(
            "\t{depth}\t{}\t{}\t{}",
            flag(l.present),
            flag(l.zero),
            flag(l.data)
        ));
    }
    line.push('\n');
    line
}

pub fn parse_list(text: &str) -> Result<Vec<VolumeEntry>, DocumentError> {
    text.lines()
        .map(|line| {
            let [name, size, allocated] = <[&str; 3]>::try_from(fields(line))
                .map_err(|_| bad(line, "expected 3 tab-separated fields"))?;
            Ok(VolumeEntry {
                name: name.to_owned(),
                size: number(line, size)?,
                allocated: number(line, allocated)?,
            })
        })
        .collect()
}

pub fn parse_extents(text: &str) -> Result<Vec<ExtentEntry>, DocumentError> {
    text.lines()
        .map(|line| {
            let fields = fields(line);
            let (plain, layer) = match fields.len() {
                3 => (&fields[..], None),
                7 => (&fields[..3], Some(layer(line, &fields[3..])?)),
                _ => return Err(bad(line, "expected 3 or 7 tab-separated fields")),
            };
            Ok(ExtentEntry {
                offset: number(line, plain[0])?,
                len: number(line, plain[1])?,
                kind: ExtentKind::from_name(plain[2])
                    .ok_or_else(|| bad(line, "unknown extent kind"))?,
                layer,
            })
        })
        .collect()
}

fn bad(line: &str, problem: &'static str) -> DocumentError {
    DocumentError {
        line: line.to_owned(),
        problem,
    }
}

fn fields(line: &str) -> Vec<&str> {
    line.split('\t').collect()
}

/// `depth TAB present TAB zero TAB data`.
fn layer(line: &str, fields: &[&str]) -> Result<Layer, DocumentError> {
    let flag = |s: &str| match s {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad(line, "a flag is not 0 or 1")),
    };
    let depth = match fields[0] {
        "-" => None,
        d => Some(
            d.parse()
                .map_err(|_| bad(line, "depth is not a number or -"))?,
        ),
    };
    Ok(Layer {
        depth,
        present: flag(fields[1])?,
        zero: flag(fields[2])?,
        data: flag(fields[3])?,
    })
}

fn number(line: &str, field: &str) -> Result<u64, DocumentError> {
    field.parse().map_err(|_| bad(line, "not a decimal number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documents_round_trip_and_name_kinds_explicitly() {
        let volumes = vec![
            VolumeEntry {
                name: "a.raw".into(),
                size: 1 << 40,
                allocated: 4096,
            },
            VolumeEntry {
                name: "b c".into(),
                size: 0,
                allocated: 0,
            },
        ];
        let text = format_list(&volumes);
        assert_eq!(text, "a.raw\t1099511627776\t4096\nb c\t0\t0\n");
        assert_eq!(parse_list(&text).unwrap(), volumes);

        let extents = [
            (0, 4096, ExtentKind::Data),
            (4096, 8192, ExtentKind::Hole),
            (12288, 512, ExtentKind::Zero),
        ]
        .map(|(offset, len, kind)| ExtentEntry::new(offset, len, kind));
        let text = format_extents(&extents);
        assert_eq!(text, "0\t4096\tdata\n4096\t8192\thole\n12288\t512\tzero\n");
        assert_eq!(parse_extents(&text).unwrap(), extents);

        let layered = [
            (ExtentKind::Data, Some(0), true, false, true),
            (ExtentKind::Backing, Some(1), true, false, true),
            (ExtentKind::Zero, Some(0), true, true, true),
            (ExtentKind::Unallocated, None, false, true, false),
        ]
        .map(|(kind, depth, present, zero, data)| ExtentEntry {
            layer: Some(Layer {
                depth,
                present,
                zero,
                data,
            }),
            ..ExtentEntry::new(0, 512, kind)
        });
        let text = format_extents(&layered);
        assert_eq!(
            text,
            "0\t512\tdata\t0\t1\t0\t1\n0\t512\tbacking\t1\t1\t0\t1\n\
             0\t512\tzero\t0\t1\t1\t1\n0\t512\tunallocated\t-\t0\t1\t0\n"
        );
        assert_eq!(parse_extents(&text).unwrap(), layered);
    }

    #[test]
    fn malformed_lines_are_refused_with_the_line() {
        for (text, problem) in [
            ("a\t1\n", "expected 3 tab-separated fields"),
            ("a\t1\t2\t3\n", "expected 3 tab-separated fields"),
            ("a\tx\t2\n", "not a decimal number"),
            ("a\t-1\t2\n", "not a decimal number"),
        ] {
            let e = parse_list(text).unwrap_err();
            assert_eq!((e.line.as_str(), e.problem), (text.trim_end(), problem));
        }
        let e = parse_extents("0\t1\tData\n").unwrap_err();
        assert_eq!(e.problem, "unknown extent kind", "kind names are exact");
        for (text, problem) in [
            ("0\t1\tdata\t0\n", "expected 3 or 7 tab-separated fields"),
            ("0\t1\tdata\t0\t1\t2\t1\n", "a flag is not 0 or 1"),
            ("0\t1\tdata\tx\t1\t0\t1\n", "depth is not a number or -"),
        ] {
            assert_eq!(parse_extents(text).unwrap_err().problem, problem);
        }
    }

    fn kind() -> impl Strategy<Value = ExtentKind> {
        proptest::sample::select(vec![
            ExtentKind::Data,
            ExtentKind::Hole,
            ExtentKind::Zero,
            ExtentKind::Backing,
            ExtentKind::Unallocated,
        ])
    }

    fn extent() -> impl Strategy<Value = ExtentEntry> {
        let layer = proptest::option::of(
            (
                proptest::option::of(any::<u32>()),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(depth, present, zero, data)| Layer {
                    depth,
                    present,
                    zero,
                    data,
                }),
        );
        (any::<u64>(), any::<u64>(), kind(), layer).prop_map(|(offset, len, kind, layer)| {
            ExtentEntry {
                layer,
                ..ExtentEntry::new(offset, len, kind)
            }
        })
    }

    proptest! {
        #[test]
        fn every_document_round_trips(
            extents in proptest::collection::vec(extent(), 0..20),
            names in proptest::collection::vec("[^\t\n\r]{1,12}", 0..8),
            size in any::<u64>(),
        ) {
            prop_assert_eq!(parse_extents(&format_extents(&extents)).unwrap(), extents);
            let volumes: Vec<VolumeEntry> = names
                .into_iter()
                .map(|name| VolumeEntry { name, size, allocated: size / 2 })
                .collect();
            prop_assert_eq!(parse_list(&format_list(&volumes)).unwrap(), volumes);
        }

        /// A peer's document is any bytes: it parses or is refused, never panics.
        #[test]
        fn any_text_parses_or_is_refused(text in "[0-9a-z\\t\\n-]{0,200}") {
            let _ = parse_extents(&text);
            let _ = parse_list(&text);
        }
    }
}
