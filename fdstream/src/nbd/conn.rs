//! [`Conn`]: one blocking connection to an NBD server, driving the sans-IO codec of the `nbd`
//! crate. It runs on a pool worker (never on the event loop); reads and writes time out, so a
//! server that stops answering fails its stream instead of holding the worker forever.

use crate::error::Error;
use bytes::{Bytes, BytesMut};
use nbd::{Client, ClientHandshake, ClientOptions, Command, Cookie, Endpoint, Export, Reply, Uri};
use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long a server may take to answer before its stream fails (`VOLSTREAM_NBD_TIMEOUT`
/// seconds overrides).
pub fn timeout() -> Duration {
    let secs = std::env::var("VOLSTREAM_NBD_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(60.0);
    Duration::from_secs_f64(secs)
}

/// Bytes read from the socket at a time (more when a chunk needs more).
const READ_CHUNK: usize = 256 * 1024;

enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write_vectored(bufs),
            Sock::Tcp(s) => s.write_vectored(bufs),
        }
    }
}

pub struct Conn {
    sock: Sock,
    input: BytesMut,
    client: Client,
    /// The URI, for messages.
    shown: String,
    out: Vec<Bytes>,
}

impl Conn {
    /// Connects and negotiates, asking for `contexts`; at most `in_flight` requests will be
    /// outstanding.
    pub fn open(uri: &Uri, contexts: &[&str], in_flight: usize) -> Result<Conn, Error> {
        Conn::open_as(uri, uri.to_string(), contexts, in_flight)
    }

    /// [`Conn::open`], called `shown` in messages (an export we started, whose private
    /// socket path means nothing to a peer).
    pub fn open_as(
        uri: &Uri,
        shown: String,
        contexts: &[&str],
        in_flight: usize,
    ) -> Result<Conn, Error> {
        let wait = timeout();
        let sock = match &uri.endpoint {
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path)
                    .map_err(|e| Error::io(format!("connecting to {shown}"), e))?;
                s.set_read_timeout(Some(wait))
                    .and_then(|_| s.set_write_timeout(Some(wait)))
                    .map_err(|e| Error::io("setting socket timeouts", e))?;
                Sock::Unix(s)
            }
            Endpoint::Tcp { host, port } => {
                let s = connect_tcp(host, *port, wait)
                    .map_err(|e| Error::io(format!("connecting to {shown}"), e))?;
                // Requests are small and must not wait for Nagle.
                s.set_nodelay(true)
                    .and_then(|_| s.set_read_timeout(Some(wait)))
                    .and_then(|_| s.set_write_timeout(Some(wait)))
                    .map_err(|e| Error::io("setting socket options", e))?;
                Sock::Tcp(s)
            }
        };
        let mut hs = ClientHandshake::new(ClientOptions {
            export: uri.export.clone(),
            contexts: contexts.iter().map(|c| c.to_string()).collect(),
        })
        .map_err(|e| Error::Nbd {
            context: shown.clone(),
            source: e,
        })?;
        let mut conn = Conn {
            sock,
            input: BytesMut::new(),
            client: Client::new(placeholder_export(), 1),
            shown,
            out: Vec::new(),
        };
        let export = loop {
            match hs.handle_input(&mut conn.input) {
                Ok(Some(e)) => break e,
                Ok(None) => {}
                Err(e) => return Err(conn.nbd_error("handshake", e)),
            }
            while let Some(b) = hs.poll_transmit() {
                conn.out.push(b);
            }
            conn.flush()?;
            let need = hs.needed(&conn.input);
            conn.fill(need, "handshake")?;
        };
        log::debug!(
            "{}: export of {} bytes, flags {:#x}, contexts {:?}",
            conn.shown,
            export.size,
            export.flags,
            export.contexts
        );
        conn.client = Client::new(export, in_flight);
        Ok(conn)
    }

    pub fn export(&self) -> &Export {
        self.client.export()
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn can_send(&self) -> bool {
        self.client.can_send()
    }

    /// Queues a request (sent by the next `flush` or `recv`).
    pub fn send(&mut self, cmd: Command) -> Result<Cookie, Error> {
        self.client.send(cmd).map_err(|e| Error::Nbd {
            context: self.shown.clone(),
            source: e,
        })
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), Error> {
        while let Some(b) = self.client.poll_transmit() {
            self.out.push(b);
        }
        let mut at = 0; // pieces fully written
        let mut skip = 0; // bytes of out[at] already written
        while at < self.out.len() {
            let slices: Vec<IoSlice<'_>> = std::iter::once(&self.out[at][skip..])
                .chain(self.out[at + 1..].iter().map(|b| &b[..]))
                .take(64)
                .map(IoSlice::new)
                .collect();
            let mut n = match self.sock.write_vectored(&slices) {
                Ok(0) => {
                    return Err(Error::io(
                        format!("writing to {}", self.shown),
                        io::ErrorKind::WriteZero.into(),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error("writing to", e)),
            };
            while n > 0 {
                let left = self.out[at].len() - skip;
                if n >= left {
                    n -= left;
                    at += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        self.out.clear();
        Ok(())
    }

    /// The next reply piece, sending what is queued first and waiting for the server.
    pub fn recv(&mut self) -> Result<Reply, Error> {
        self.flush()?;
        loop {
            match self.client.decode(&mut self.input) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(self.nbd_error("reply", e)),
            }
            let need = self.client.needed(&self.input);
            self.fill(need, "reply")?;
        }
    }

    /// Ends the session politely (NBD_CMD_DISC); errors do not matter any more.
    pub fn disconnect(mut self) {
        self.client.disconnect();
        let _ = self.flush();
    }

    /// Reads until `input` holds at least `need` bytes (and at least one more than now).
    fn fill(&mut self, need: usize, what: &str) -> Result<(), Error> {
        let want = need.saturating_sub(self.input.len()).max(1);
        self.input.reserve(want.max(READ_CHUNK));
        let start = self.input.len();
        while self.input.len() < start + want {
            let spare = self.input.spare_capacity_mut();
            // SAFETY: the kernel writes at most `spare.len()` bytes into the spare capacity;
            // only what it reports written is marked initialised.
            let n = unsafe {
                libc::read(
                    self.sock.fd(),
                    spare.as_mut_ptr() as *mut libc::c_void,
                    spare.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io_error(&format!("waiting for the {what} of"), e));
            }
            if n == 0 {
                return Err(Error::io(
                    format!("{}: the server closed the connection", self.shown),
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            // SAFETY: `n` bytes were just written by the kernel.
            unsafe { self.input.set_len(self.input.len() + n as usize) };
        }
        Ok(())
    }

    fn io_error(&self, what: &str, e: io::Error) -> Error {
        let e = if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::TimedOut, "no answer within the NBD timeout")
        } else {
            e
        };
        Error::io(format!("{what} {}", self.shown), e)
    }

    fn nbd_error(&self, what: &str, e: nbd::Error) -> Error {
        Error::Nbd {
            context: format!("{}: {what}", self.shown),
            source: e,
        }
    }
}

fn connect_tcp(host: &str, port: u16, wait: Duration) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, wait) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Stands in for the export until the handshake gave the real one.
fn placeholder_export() -> Export {
    Export {
        name: String::new(),
        size: 0,
        flags: nbd::wire::FLAG_HAS_FLAGS,
        structured: false,
        contexts: Vec::new(),
        block_size: nbd::BlockSize::default(),
    }
}
