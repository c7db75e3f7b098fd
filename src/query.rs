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
    /// A local file or block device, or with --connect a volume name.
    #[arg(value_name = "FILE|VOLUME")]
    target: String,
}

/// One volume of `list --json`.
#[derive(serde::Serialize)]
struct VolumeLine<'a> {
    name: &'a str,
    size: u64,
    allocated: u64,
}

/// One extent of `extents --json`.
#[derive(serde::Serialize)]
struct ExtentLine<'a> {
    offset: u64,
    length: u64,
    kind: &'a str,
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
    let lines: Vec<(u64, u64, String)> = match &args.connect {
        Some(addr) => {
            let addr: Address = addr.parse().map_err(CliError::Usage)?;
            let mut config = EngineConfig::default();
            args.tls
                .apply(&addr, Role::Client, Default::default(), &mut config)?;
            let text = fetch(&addr, config, Op::Extents, &args.target)?;
            rows(&text, 3)?
                .into_iter()
                .map(|r| Ok((number(r[0])?, number(r[1])?, r[2].to_owned())))
                .collect::<Result<_, CliError>>()?
        }
        None => {
            let path = PathBuf::from(&args.target);
            fdstream::extents(&path)
                .map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?
                .into_iter()
                .map(|e| (e.offset, e.len, format!("{:?}", e.kind).to_lowercase()))
                .collect()
        }
    };
    if args.json {
        for (offset, length, kind) in lines {
            let line = ExtentLine {
                offset,
                length,
                kind: &kind,
            };
            say!("{}", json(&line));
        }
        return Ok(());
    }
    say!("{:>16} {:>16} KIND", "OFFSET", "LENGTH");
    for (offset, len, kind) in lines {
        say!("{offset:>16} {len:>16} {kind}");
    }
    Ok(())
}
