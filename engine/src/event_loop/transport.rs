//! What a connection's bytes travel over: the socket itself, or TLS on the socket. Either way
//! the driver reads plaintext into the protocol core's input buffer and writes the core's
//! frames as plaintext; only this file knows whether they were encrypted.
//!
//! Contract for TLS, the same as for a bare non-blocking socket: read until `WouldBlock`, write
//! until `WouldBlock` (readiness is edge-triggered), and call [`Transport::flush`] after every
//! read, since reading may produce handshake messages or alerts to send.

use super::socket::Socket;
use super::tls::{describe, session_identity};
use super::PeerIdentity;
use bytes::BytesMut;
use rustls::Connection as TlsConnection;
use std::fmt;
use std::io::{self, BufRead, IoSlice, Write};

/// Ciphertext read from the socket per read(2). rustls takes at most a record's worth per
/// `read_tls`, so it is fed from this buffer rather than with a syscall per 4-16 KiB.
const CIPHERTEXT_READ: usize = 256 * 1024;
/// Encrypted records rustls may hold for the socket before `write` takes no more plaintext.
/// What it holds waits ahead of every frame the scheduler picks later, as the socket's unsent
/// bytes do (`TCP_UNSENT`): four records, the size of the driver's interactive transmit batch.
const CIPHERTEXT_QUEUE: usize = 64 * 1024;

/// A TLS failure, carried inside an `io::Error` so the driver can tell it from a socket error.
#[derive(Debug)]
pub struct TlsFailure(pub String);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

impl TlsFailure {
    /// The TLS failure inside `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<&str> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<TlsFailure>())
            .map(|t| t.0.as_str())
    }
}

fn tls_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure(message))
}

pub struct Transport {
    pub socket: Socket,
    tls: Option<Box<TlsSession>>,
}

struct TlsSession {
    conn: TlsConnection,
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    /// Set once a failure was reported; nothing more is read or decrypted.
    failed: bool,
}

/// Lets rustls write records into the socket.
struct SocketWriter<'a>(&'a mut Socket);

impl Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport {
    pub fn plain(socket: Socket) -> Transport {
        Transport { socket, tls: None }
    }

    pub fn tls(socket: Socket, mut conn: TlsConnection) -> Transport {
        conn.set_buffer_limit(Some(CIPHERTEXT_QUEUE));
        Transport {
            socket,
            tls: Some(Box::new(TlsSession {
                conn,
                inbuf: vec![0; CIPHERTEXT_READ].into_boxed_slice(),
                start: 0,
                end: 0,
                eof: false,
                failed: false,
            })),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads up to `max` bytes of plaintext into `buf`. Returns 0 at the end of the stream.
    pub fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        match &mut self.tls {
            None => self.socket.read_into(buf, max),
            Some(tls) => tls.read_into(&mut self.socket, buf, max),
        }
    }

    /// Whether plaintext handed to `write_vectored` now goes out (TLS: the handshake is over).
    /// Before that the core's frames wait in its own queue, not in rustls's.
    pub fn accepts_plaintext(&self) -> bool {
        match &self.tls {
            None => true,
            Some(tls) => !tls.failed && !tls.conn.is_handshaking(),
        }
    }

    /// Writes plaintext; returns how much was taken. `WouldBlock` means the socket is full.
    pub fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.socket.write_vectored(slices);
        };
        // Records already made go first, so rustls's queue has room for new ones.
        tls.flush(&mut self.socket)?;
        let n = tls.conn.writer().write_vectored(slices)?;
        match tls.flush(&mut self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => {}
            Err(e) => return Err(e),
        }
        if n == 0 {
            // The queue is full and the socket took nothing of it.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Writes TLS records (handshake, alerts, data) queued for the socket; `WouldBlock` if some
    /// remain. A no-op on a plain socket.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            None => Ok(()),
            Some(tls) => tls.flush(&mut self.socket),
        }
    }

    /// An upper bound of the bytes encrypted and not yet taken by the socket (rustls tells
    /// only whether there are any; its queue is capped at `CIPHERTEXT_QUEUE` plus a record).
    pub fn queued(&self) -> usize {
        match &self.tls {
            Some(t) if t.conn.wants_write() => CIPHERTEXT_QUEUE + 16 * 1024,
            _ => 0,
        }
    }

    /// Ends TLS politely (close_notify) before the socket is dropped; best effort.
    pub fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            if !tls.failed && !tls.conn.is_handshaking() {
                tls.conn.send_close_notify();
            }
            let _ = tls.flush(&mut self.socket);
        }
    }

    /// The identity the TLS handshake proved, if any.
    pub fn peer_identity(&self) -> Option<PeerIdentity> {
        self.tls.as_ref().and_then(|t| session_identity(&t.conn))
    }

    /// The negotiated TLS version and cipher suite, e.g. `TLSv1_3 TLS13_AES_128_GCM_SHA256`.
    pub fn tls_summary(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let suite = tls.conn.negotiated_cipher_suite()?;
        Some(format!(
            "{:?} {:?}",
            tls.conn.protocol_version()?,
            suite.suite()
        ))
    }
}

impl TlsSession {
    fn read_into(
        &mut self,
        socket: &mut Socket,
        buf: &mut BytesMut,
        max: usize,
    ) -> io::Result<usize> {
        if self.failed {
            return Err(tls_error("TLS session failed earlier".into()));
        }
        let mut total = 0;
        loop {
            // Plaintext rustls already decrypted comes first: its buffer must be empty before
            // it reads more.
            match self.conn.reader().fill_buf() {
                Ok([]) => return Ok(total),
                Ok(plain) => {
                    let n = plain.len().min(max - total);
                    buf.extend_from_slice(&plain[..n]);
                    self.conn.reader().consume(n);
                    total += n;
                    if total == max {
                        return Ok(total);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify: an end all the same (the protocol
                // core knows whether the stream of frames was complete).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(total),
                Err(e) => return Err(e),
            }
            if self.start < self.end {
                let mut ciphertext = &self.inbuf[self.start..self.end];
                let before = ciphertext.len();
                self.conn.read_tls(&mut ciphertext)?;
                self.start += before - ciphertext.len();
                self.process()?;
                continue;
            }
            if self.eof {
                return Ok(total);
            }
            match socket.read_slice(&mut self.inbuf) {
                Ok(0) => {
                    self.eof = true;
                    // Tells rustls the transport ended, so its reader reports it.
                    self.conn.read_tls(&mut &[][..])?;
                    self.process()?;
                }
                Ok(n) => {
                    self.start = 0;
                    self.end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => return Ok(total),
                Err(e) => return Err(e),
            }
        }
    }

    fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => {
                // rustls queued an alert for the peer; `flush` sends it before the close.
                self.failed = true;
                Err(tls_error(describe(&e)))
            }
        }
    }

    fn flush(&mut self, socket: &mut Socket) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SocketWriter(socket)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
