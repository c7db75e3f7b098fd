//! `list` and `extents`: what a server has, and where a volume's data is.

use crate::error::CliError;
use crate::out::{json, say};
use crate::tls::Role;
use crate::ConnectArg;
use clap::Args;
use engine::document::{self, ExtentEntry};
use engine::proto::Op;
use engine::{Address, Engine, EngineConfig, MemoryWriter};
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
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    depth: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    present: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zero: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<bool>,
}

impl From<&ExtentEntry> for ExtentLine {
    fn from(e: &ExtentEntry) -> Self {
        ExtentLine {
            offset: e.offset,
            length: e.len,
            kind: e.kind.as_str(),
            depth: e.layer.and_then(|l| l.depth),
            present: e.layer.map(|l| l.present),
            zero: e.layer.map(|l| l.zero),
            data: e.layer.map(|l| l.data),
        }
    }
}

/// Fetches a document (listing or allocation map) from a server.
fn fetch(addr: &Address, config: EngineConfig, op: Op, name: &str) -> Result<String, CliError> {
    let bytes = fetch_bytes(addr, config, op, name)?;
    String::from_utf8(bytes).map_err(|_| CliError::Other("server sent a non-UTF-8 document".into()))
}

/// Fetches the content of a document stream (`op` LIST, EXTENTS or DIGESTS) from a server.
pub fn fetch_bytes(
    addr: &Address,
    config: EngineConfig,
    op: Op,
    name: &str,
) -> Result<Vec<u8>, CliError> {
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
    let bytes = std::mem::take(&mut *content.lock().unwrap());
    Ok(bytes)
}

fn malformed(e: document::DocumentError) -> CliError {
    CliError::Other(format!("server sent a bad document: {e}"))
}

pub fn list(args: ListArgs) -> Result<(), CliError> {
    let addr = args.connect.address()?;
    let text = fetch(&addr, args.connect.engine_config(&addr)?, Op::List, "")?;
    let volumes = document::parse_list(&text).map_err(malformed)?;
    if args.json {
        for v in &volumes {
            let line = VolumeLine {
                name: &v.name,
                size: v.size,
                allocated: v.allocated,
            };
            say!("{}", json(&line));
        }
        return Ok(());
    }
    say!("{:<32} {:>16} {:>16}", "NAME", "SIZE", "ALLOCATED");
    for v in &volumes {
        say!("{:<32} {:>16} {:>16}", v.name, v.size, v.allocated);
    }
    Ok(())
}

pub fn extents(args: ExtentsArgs) -> Result<(), CliError> {
    let extents: Vec<ExtentEntry> = match &args.connect {
        Some(addr) => {
            let addr: Address = addr.parse().map_err(CliError::Usage)?;
            let mut config = EngineConfig::default();
            args.tls
                .apply(&addr, Role::Client, Default::default(), &mut config)?;
            let text = fetch(&addr, config, Op::Extents, &args.target)?;
            document::parse_extents(&text).map_err(malformed)?
        }
        None => match crate::endpoint::nbd_uri(&args.target)? {
            Some(uri) => fdstream::nbd::map(&uri)
                .map_err(|e| CliError::Other(format!("{uri}: {e}")))?
                .iter()
                .map(|s| s.entry(None))
                .collect(),
            None => {
                let path = PathBuf::from(&args.target);
                fdstream::extents(&path)
                    .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?
            }
        },
    };
    if args.json {
        for e in &extents {
            say!("{}", json(&ExtentLine::from(e)));
        }
        return Ok(());
    }
    let layered = extents.iter().any(|e| e.layer.is_some());
    if layered {
        say!("{:>16} {:>16} {:>5} KIND", "OFFSET", "LENGTH", "DEPTH");
    } else {
        say!("{:>16} {:>16} KIND", "OFFSET", "LENGTH");
    }
    for e in &extents {
        if layered {
            let depth = e.layer.and_then(|l| l.depth);
            let depth = depth.map_or("-".to_string(), |d| d.to_string());
            say!("{:>16} {:>16} {depth:>5} {}", e.offset, e.len, e.kind);
        } else {
            say!("{:>16} {:>16} {}", e.offset, e.len, e.kind);
        }
    }
    Ok(())
}
