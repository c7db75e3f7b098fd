//! `serve --metrics tcp:HOST:PORT`: the engine's counters in the Prometheus text format on
//! `GET /metrics`.
//!
//! Served by one small thread with a blocking listener, not by the event loop: an HTTP request
//! is a rare event, and a scraper that connects and says nothing, or reads slowly, then holds
//! only this thread (for at most the socket timeouts), never the loop that moves volumes. The
//! loop's share is building the snapshot when asked, so every scrape is one consistent moment.
//! Scrapes are answered one at a time.

use crate::error::CliError;
use engine::metrics::{self, Request};
use engine::{Address, EngineHandle};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

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
    let (status, body) = match read_request(&mut stream)? {
        Request::Metrics => match engine.snapshot() {
            Ok(snapshot) => {
                let body = metrics::prometheus(&snapshot);
                respond(
                    &mut stream,
                    "200 OK",
                    metrics::CONTENT_TYPE,
                    body.as_bytes(),
                )?;
                // Keepalive pings only idle peers; pinging at each scrape keeps every
                // connection's RTT at most one scrape interval old.
                for c in &snapshot.connections {
                    engine.ping(c.id);
                }
                return Ok(());
            }
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        },
        Request::NotFound => ("404 Not Found", "try /metrics\n".to_owned()),
        Request::MethodNotAllowed => ("405 Method Not Allowed", "GET only\n".to_owned()),
        Request::TooLong => (
            "431 Request Header Fields Too Large",
            "too long\n".to_owned(),
        ),
        // read_request returns none: it reads until the head is complete.
        Request::Incomplete => ("400 Bad Request", "incomplete request\n".to_owned()),
    };
    respond(&mut stream, status, "text/plain", body.as_bytes())
}

/// Reads until the request head is complete (or too long); `metrics::request` judges it.
fn read_request(stream: &mut TcpStream) -> io::Result<Request> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        match metrics::request(&head) {
            Request::Incomplete => {}
            done => return Ok(done),
        }
        let room = (metrics::MAX_REQUEST - head.len()).min(buf.len());
        let n = stream.read(&mut buf[..room])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request ended",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
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
