//! `list` and `extents`: what a server has, and where a volume's data is.

use crate::error::CliError;
use crate::out::{json, say};
use crate::tls::Role;
use crate::ConnectArg;
use clap::Args;
use engine::proto::Op;
use engine::synthetic::MemoryWriter;
use engine::{Address, Engine, EngineConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    connect: ConnectArg,
    /// One JSON object per volume.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExtentsArgs {
    /// Ask this server about VOLUME instead of reading a local file.
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// One JSON object per extent.
    #[arg(long)]
    json: bool,
    /// A local file or block device, an NBD export (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH), or with --connect a volume name.
    #[arg(value_name = "FILE|URI|VOLUME")]
    target: String,
}

/// One volume of `list --json`.
#[derive(serde::Serialize)]
struct VolumeLine<'a> {
    name: &'a str,
    size: u64,
    allocated: u64,
}

/// One extent of `extents --json`. Maps of NBD exports with allocation depth and of qemu
/// images carry what `qemu-img map --output=json` says too: `depth` (0 the top layer),
/// `present`, `zero`, `data`.
#[derive(serde::Serialize)]
struct ExtentLine {
    offset: u64,
    length: u64,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    depth: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    present: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zero: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<bool>,
}

impl ExtentLine {
    fn plain(offset: u64, length: u64, kind: String) -> Self {
        ExtentLine {
            offset,
            length,
            kind,
            depth: None,
            present: None,
            zero: None,
            data: None,
        }
    }
}

/// A decimal field of a server's document.
fn number(text: &str) -> Result<u64, CliError> {
    text.parse()
        .map_err(|_| CliError::Other(format!("bad number {text:?} from server")))
}

/// Fetches a document (listing or allocation map) from a server.
fn fetch(addr: &Address, config: EngineConfig, op: Op, name: &str) -> Result<String, CliError> {
    let (engine, thread) = Engine::spawn(config)
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    let conn = engine
        .connect_blocking(addr, Duration::from_secs(10))
        .map_err(|e| CliError::Connect(format!("cannot connect to {addr}: {e}")))?;
    let sink = MemoryWriter::default();
    let content = sink.content();
    let report = engine
        .fetch(conn, op, name, Box::new(sink))
        .recv()
        .map_err(|_| CliError::Other("event loop ended early".into()));
    engine.shutdown();
    let _ = thread.join();
    if let Err(e) = report?.result {
        return Err(CliError::Other(format!("{addr}: {e}")));
    }
    let bytes = content.lock().unwrap().clone();
    String::from_utf8(bytes).map_err(|_| CliError::Other("server sent a non-UTF-8 document".into()))
}

/// Splits a tab-separated document into rows of `columns` fields.
fn rows(text: &str, columns: usize) -> Result<Vec<Vec<&str>>, CliError> {
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() == columns {
                Ok(fields)
            } else {
                Err(CliError::Other(format!(
                    "malformed line from server: {line:?}"
                )))
            }
        })
        .collect()
}

pub fn list(args: ListArgs) -> Result<(), CliError> {
    let addr = args.connect.address()?;
    let text = fetch(&addr, args.connect.engine_config(&addr)?, Op::List, "")?;
    let rows = rows(&text, 3)?;
    if args.json {
        for r in rows {
            let line = VolumeLine {
                name: r[0],
                size: number(r[1])?,
                allocated: number(r[2])?,
            };
            say!("{}", json(&line));
        }
        return Ok(());
    }
    say!("{:<32} {:>16} {:>16}", "NAME", "SIZE", "ALLOCATED");
    for r in rows {
        say!("{:<32} {:>16} {:>16}", r[0], r[1], r[2]);
    }
    Ok(())
}

pub fn extents(args: ExtentsArgs) -> Result<(), CliError> {
    let lines: Vec<ExtentLine> = match &args.connect {
        Some(addr) => {
            let addr: Address = addr.parse().map_err(CliError::Usage)?;
            let mut config = EngineConfig::default();
            args.tls
                .apply(&addr, Role::Client, Default::default(), &mut config)?;
            let text = fetch(&addr, config, Op::Extents, &args.target)?;
            text.lines()
                .map(remote_line)
                .collect::<Result<_, CliError>>()?
        }
        None => match crate::endpoint::nbd_uri(&args.target)? {
            Some(uri) => fdstream::nbd::map(&uri)
                .map_err(|e| CliError::Other(format!("{uri}: {e}")))?
                .iter()
                .map(|s| ExtentLine {
                    offset: s.offset,
                    length: s.len,
                    kind: s.kind().to_string(),
                    depth: s.depth.and_then(|d| d.checked_sub(1)),
                    present: s.present(),
                    zero: s.depth.map(|_| s.zero()),
                    data: s.depth.map(|_| s.data()),
                })
                .collect(),
            None => {
                let path = PathBuf::from(&args.target);
                fdstream::extents(&path)
                    .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?
                    .into_iter()
                    .map(|e| {
                        ExtentLine::plain(e.offset, e.len, format!("{:?}", e.kind).to_lowercase())
                    })
                    .collect()
            }
        },
    };
    if args.json {
        for line in lines {
            say!("{}", json(&line));
        }
        return Ok(());
    }
    let layered = lines.iter().any(|l| l.present.is_some());
    if layered {
        say!("{:>16} {:>16} {:>5} KIND", "OFFSET", "LENGTH", "DEPTH");
    } else {
        say!("{:>16} {:>16} KIND", "OFFSET", "LENGTH");
    }
    for l in lines {
        if layered {
            let depth = l.depth.map_or("-".to_string(), |d| d.to_string());
            say!("{:>16} {:>16} {depth:>5} {}", l.offset, l.length, l.kind);
        } else {
            say!("{:>16} {:>16} {}", l.offset, l.length, l.kind);
        }
    }
    Ok(())
}

/// A line of a server's allocation map: `offset TAB length TAB kind`, and for layered images
/// `TAB depth TAB present TAB zero TAB data` (depth `-` where unknown; flags 0 or 1).
fn remote_line(line: &str) -> Result<ExtentLine, CliError> {
    let bad = || CliError::Other(format!("malformed line from server: {line:?}"));
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 3 && f.len() != 7 {
        return Err(bad());
    }
    let mut l = ExtentLine::plain(number(f[0])?, number(f[1])?, f[2].to_string());
    if f.len() == 7 {
        let flag = |s: &str| match s {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(bad()),
        };
        l.depth = match f[3] {
            "-" => None,
            d => Some(d.parse().map_err(|_| bad())?),
        };
        l.present = Some(flag(f[4])?);
        l.zero = Some(flag(f[5])?);
        l.data = Some(flag(f[6])?);
    }
    Ok(l)
}
