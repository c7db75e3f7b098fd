//! The `volstream` command: serve, upload, download, attach, list, extents, checksum, demo.
//!
//! Exit codes: 0 success; 1 one or more transfers failed (one line each on stderr); 2 bad
//! usage; 3 the server could not be reached or the service could not start.

mod attach;
mod checksum;
mod cor;
mod demo;
mod destinations;
mod endpoint;
mod error;
mod events;
mod interrupt;
mod metrics;
mod options;
mod out;
mod progress;
mod query;
mod resume;
mod serve;
mod stress;
mod tls;
mod transfer;
mod update;

use clap::{Args, Parser, Subcommand};
use error::CliError;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "volstream",
    version,
    about = "Sparse-aware volume transfers, many streams over one connection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a directory of volumes (and named block devices).
    Serve(serve::ServeArgs),
    /// Download volumes into local files or devices, all over one connection.
    Download(options::DownloadArgs),
    /// Upload local files or devices as volumes, all over one connection.
    Upload(options::UploadArgs),
    /// List a server's volumes.
    List(query::ListArgs),
    /// Export a server's volumes as local NBD disks, read over one connection.
    Attach(attach::AttachArgs),
    /// Show the allocation map of a local file or device, or of a remote volume.
    Extents(query::ExtentsArgs),
    /// A content checksum of a local file or device, or of a remote volume, that does not
    /// depend on how the volume is allocated (holes and written zeroes hash alike).
    Checksum(checksum::ChecksumArgs),
    /// Run a server and a client in this process on a temporary pool and show the result.
    Demo(demo::DemoArgs),
    /// Many parallel streams of generated volumes, verified, with a summary.
    Stress(stress::StressArgs),
    /// Make a CA and server/client certificates for trying TLS (a test setup, not a PKI).
    Certs(tls::CertsArgs),
}

/// Where the server is, and the credentials for a tls: address.
#[derive(Args, Clone)]
pub struct ConnectArg {
    /// Server address: unix:PATH, tcp:HOST:PORT or tls:HOST:PORT [env: VOLSTREAM_ADDR]
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    #[command(flatten)]
    tls: tls::TlsArgs,
}

impl ConnectArg {
    fn address(&self) -> Result<engine::Address, CliError> {
        let text = match &self.connect {
            Some(a) => a.clone(),
            None => std::env::var("VOLSTREAM_ADDR").map_err(|_| {
                CliError::Usage(
                    "no server address: give --connect ADDR or set VOLSTREAM_ADDR".into(),
                )
            })?,
        };
        text.parse().map_err(CliError::Usage)
    }

    /// A client engine's settings for `addr` (TLS credentials when it is a tls: address).
    fn engine_config(&self, addr: &engine::Address) -> Result<engine::EngineConfig, CliError> {
        let mut config = engine::EngineConfig::default();
        self.tls
            .apply(addr, tls::Role::Client, Default::default(), &mut config)?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    engine::memory::keep_freed_buffers();
    // Thousands of volumes at once need more fds than the historical soft limit of 1024; the
    // open-volume budget sizes itself to whatever limit is left.
    fdstream::budget::raise_fd_limit();
    // Quiet unless asked (RUST_LOG): a failed transfer is reported once, in its one line, and
    // warnings about it in between would say the same thing again. Errors are bugs: shown.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, like every other error of this tool.
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad usage")
                .trim_start_matches("error: ");
            out::tell!("volstream: {line} (see --help)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Download(args) => args.settings().and_then(|s| match s.serve_nbd {
            Some(_) => cor::run(s),
            None => transfer::run(s),
        }),
        Command::Upload(args) => args.settings().and_then(transfer::run),
        Command::List(args) => query::list(args),
        Command::Extents(args) => query::extents(args),
        Command::Checksum(args) => checksum::run(args),
        Command::Attach(args) => attach::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Stress(args) => stress::run(args),
        Command::Certs(args) => tls::certs(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out::tell!("volstream: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
