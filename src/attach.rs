//! `attach`: a server's volumes as local NBD exports, read over one connection.

use crate::error::CliError;
use crate::interrupt::Interrupts;
use crate::serve::{refuse_open_tcp, remove_stale_socket};
use crate::ConnectArg;
use clap::Args;
use engine::{Address, Engine};
use fdstream::attach::{Attachment, Remote};
use fdstream::export::{ExportConfig, ExportServer};
use std::time::Duration;

#[derive(Args)]
pub struct AttachArgs {
    #[command(flatten)]
    connect: ConnectArg,
    /// Where the volumes without their own address are exported: unix:PATH or
    /// tcp:HOST:PORT (loopback), each under its name.
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Volumes of the server: NAME (exported on --nbd as NAME) or NAME=ADDR (on its own
    /// socket, unix:PATH, tcp:HOST:PORT or a path, as NAME and as the default export).
    #[arg(value_name = "NAME[=ADDR]", required = true)]
    volumes: Vec<String>,
}

/// The exports of one address.
struct Group {
    addr: Address,
    attachments: Vec<Attachment>,
}

fn groups(args: &AttachArgs) -> Result<Vec<Group>, CliError> {
    let shared: Option<Address> = match &args.nbd {
        Some(a) => Some(a.parse().map_err(CliError::Usage)?),
        None => None,
    };
    let mut groups: Vec<Group> = Vec::new();
    for spec in &args.volumes {
        let (name, addr) = match spec.split_once('=') {
            Some((name, addr)) => {
                let addr = if addr.contains(':') {
                    addr.to_string()
                } else {
                    format!("unix:{addr}")
                };
                (name, addr.parse().map_err(CliError::Usage)?)
            }
            None => (
                spec.as_str(),
                shared.clone().ok_or_else(|| {
                    CliError::Usage(format!(
                        "{spec}: no --nbd ADDR to export it on (or give {spec}=ADDR)"
                    ))
                })?,
            ),
        };
        if name.is_empty() {
            return Err(CliError::Usage(format!("{spec:?}: no volume name")));
        }
        let attachment = Attachment {
            export: name.to_string(),
            volume: name.to_string(),
        };
        match groups.iter_mut().find(|g| g.addr == addr) {
            Some(g) if g.attachments.contains(&attachment) => {
                return Err(CliError::Usage(format!(
                    "{name} is attached twice on {addr}"
                )))
            }
            Some(g) => g.attachments.push(attachment),
            None => groups.push(Group {
                addr,
                attachments: vec![attachment],
            }),
        }
    }
    for g in &groups {
        match &g.addr {
            Address::Unix(path) => remove_stale_socket(path)?,
            Address::Tcp(sock) => refuse_open_tcp(sock, false, "read the attached volumes")?,
            Address::Tls { .. } => {
                return Err(CliError::Usage(format!(
                    "{}: the NBD export has no TLS: use unix:PATH or tcp:HOST:PORT",
                    g.addr
                )))
            }
        }
    }
    Ok(groups)
}

pub fn run(args: AttachArgs) -> Result<(), CliError> {
    let groups = groups(&args)?;
    let interrupts = Interrupts::block()?;
    let addr = args.connect.address()?;
    let (engine, engine_thread) = Engine::spawn(args.connect.engine_config(&addr)?)
        .map_err(|e| CliError::Other(format!("cannot start the event loop: {e}")))?;
    let conn = engine
        .connect_blocking(&addr, Duration::from_secs(10))
        .map_err(|e| CliError::Connect(format!("cannot connect to {addr}: {e}")))?;
    let mut servers = Vec::new();
    for g in &groups {
        let remote = Remote::attach(&engine, conn, &g.attachments)
            .map_err(|e| CliError::Other(format!("{addr}: {e}")))?;
        let server = ExportServer::bind(&g.addr, remote, ExportConfig::default())
            .map_err(|e| CliError::Connect(format!("cannot listen for NBD on {}: {e}", g.addr)))?;
        crate::out::tell!(
            "volstream: attached {} of {addr} over NBD on {} (read-only)",
            g.attachments
                .iter()
                .map(|a| a.volume.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            server.local_addr()
        );
        servers.push(server);
    }
    let handles: Vec<_> = servers.iter().map(|s| s.handle()).collect();
    let stopper = engine.clone();
    interrupts.watch(move || {
        for h in &handles {
            h.shutdown();
        }
        stopper.shutdown();
    });
    let threads = servers
        .into_iter()
        .map(|mut s| {
            std::thread::Builder::new()
                .name("nbd-attach".into())
                .spawn(move || s.run())
                .map_err(|e| CliError::Other(format!("cannot start the NBD export: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(format!("NBD export failed: {e}")),
            Err(_) => failed = Some("the NBD export thread panicked".into()),
        }
    }
    engine.shutdown();
    let _ = engine_thread.join();
    match failed {
        Some(why) => Err(CliError::Other(why)),
        None => Ok(()),
    }
}
