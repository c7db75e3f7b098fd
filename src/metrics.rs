//! `serve --metrics tcp:HOST:PORT`: the engine's counters in the Prometheus text format on
//! `GET /metrics`.
//!
//! Served by one small thread with a blocking listener, not by the event loop: an HTTP request
//! is a rare event, and a scraper that connects and says nothing, or reads slowly, then holds
//! only this thread (for at most the socket timeouts), never the loop that moves volumes. The
//! loop's share is building the snapshot when asked, so every scrape is one consistent moment.
//! Scrapes are answered one at a time.

use crate::error::CliError;
use engine::{Address, EngineHandle};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Listens on `spec` (`tcp:HOST:PORT`) and answers scrapes on a thread of its own. Returns the
/// bound address.
pub fn serve(spec: &str, engine: EngineHandle) -> Result<SocketAddr, CliError> {
    let addr = match spec.parse::<Address>().map_err(CliError::Usage)? {
        Address::Tcp(addr) => addr,
        Address::Unix(_) | Address::Tls { .. } => {
            return Err(CliError::Usage(format!(
                "--metrics {spec}: expected tcp:HOST:PORT"
            )))
        }
    };
    let listener = TcpListener::bind(addr)
        .map_err(|e| CliError::Connect(format!("cannot listen for metrics on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Other(format!("metrics listener: {e}")))?;
    std::thread::Builder::new()
        .name("volstream-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &engine) {
                            log::debug!("metrics request failed: {e}");
                        }
                    }
                    Err(e) => log::warn!("metrics listener: {e}"),
                }
            }
        })
        .map_err(|e| CliError::Other(format!("cannot start the metrics thread: {e}")))?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, engine: &EngineHandle) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    if path != "/metrics" {
        return respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"try /metrics\n",
        );
    }
    let snapshot = match engine.snapshot() {
        Ok(snapshot) => snapshot,
        Err(e) => {
            let body = format!("{e}\n");
            return respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                body.as_bytes(),
            );
        }
    };
    let body = engine::metrics::prometheus(&snapshot);
    respond(
        &mut stream,
        "200 OK",
        engine::metrics::CONTENT_TYPE,
        body.as_bytes(),
    )?;
    // Keepalive pings only idle peers; pinging at each scrape keeps every connection's RTT at
    // most one scrape interval old.
    for c in &snapshot.connections {
        engine.ping(c.id);
    }
    Ok(())
}

/// The request line and headers, up to the blank line.
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST {
            return Err(io::Error::other("request head too long"));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request ended",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}
