//! `checksum`: a volume's content checksum from its block digests (fdstream::blockhash), of a
//! local file or device hashed here, or of a remote volume whose server sends the digests.

use crate::error::CliError;
use crate::out::{json, say};
use crate::tls::Role;
use clap::Args;
use engine::blockmap;
use engine::proto::Op;
use engine::{Address, EngineConfig};
use fdstream::blockhash::{self, BlockDigests};
use std::fs::File;

#[derive(Args)]
pub struct ChecksumArgs {
    /// Ask this server for VOLUME's block digests instead of hashing a local file.
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// One JSON object: algorithm, checksum, size, blocks, data_blocks.
    #[arg(long)]
    json: bool,
    /// A local file or block device, or with --connect a volume name.
    #[arg(value_name = "FILE|VOLUME")]
    target: String,
}

#[derive(serde::Serialize)]
struct ChecksumLine<'a> {
    algorithm: &'static str,
    checksum: String,
    target: &'a str,
    size: u64,
    block_size: u32,
    blocks: u64,
    /// Blocks that do not read as zero (hashed; the rest cost nothing).
    data_blocks: usize,
}

pub fn run(args: ChecksumArgs) -> Result<(), CliError> {
    let digests = match &args.connect {
        Some(addr) => {
            let addr: Address = addr.parse().map_err(CliError::Usage)?;
            let mut config = EngineConfig::default();
            args.tls
                .apply(&addr, Role::Client, Default::default(), &mut config)?;
            remote_digests(&addr, config, &args.target)?
        }
        None => local_digests(&args.target)?,
    };
    let sum = blockhash::hex(&digests.checksum());
    if args.json {
        let line = ChecksumLine {
            algorithm: blockhash::ALGORITHM,
            checksum: sum,
            target: &args.target,
            size: digests.header.volume_len,
            block_size: digests.header.block_size,
            blocks: digests.header.blocks(),
            data_blocks: digests.records.len(),
        };
        say!("{}", json(&line));
    } else {
        say!("{sum}  {}", args.target);
    }
    Ok(())
}

pub fn local_digests(path: &str) -> Result<BlockDigests, CliError> {
    let file = File::open(path).map_err(|e| CliError::Other(format!("{path}: {e}")))?;
    blockhash::digests_of(&file, blockhash::threads())
        .map_err(|e| CliError::Other(format!("hashing {path}: {e}")))
}

/// The block digests a server computes for its volume `name`.
pub fn remote_digests(
    addr: &Address,
    config: EngineConfig,
    name: &str,
) -> Result<BlockDigests, CliError> {
    let bytes = crate::query::fetch_bytes(addr, config, Op::Digests, name)?;
    let (header, records) = blockmap::decode(&bytes)
        .map_err(|e| CliError::Other(format!("{addr}: bad block digests for {name}: {e}")))?;
    Ok(BlockDigests { header, records })
}
