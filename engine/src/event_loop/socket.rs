//! Addresses and the two kinds of stream socket a connection runs over.

use bytes::BytesMut;
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::fmt;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;

/// Where to listen or connect: `unix:PATH`, `tcp:HOST:PORT`, or `tcp:PORT` for 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("bad address {s:?}: empty socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = s.strip_prefix("tcp:") {
            use std::net::ToSocketAddrs;
            // A bare port means loopback: exposing a pool to the network must be asked for.
            if let Ok(port) = hostport.parse::<u16>() {
                return Ok(Address::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
            }
            // Name resolution may block; it happens on the caller's thread, never the loop's.
            return hostport
                .to_socket_addrs()
                .map_err(|e| format!("bad address {s:?}: {e}"))?
                .next()
                .map(Address::Tcp)
                .ok_or_else(|| format!("bad address {s:?}: no such host"));
        }
        Err(format!(
            "bad address {s:?}: expected unix:PATH or tcp:HOST:PORT"
        ))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        Ok(match addr {
            Address::Unix(path) => Listener::Unix(UnixListener::bind(path)?),
            Address::Tcp(a) => Listener::Tcp(TcpListener::bind(*a)?),
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            Listener::Unix(l) => l
                .local_addr()?
                .as_pathname()
                .map(|p| Address::Unix(p.to_owned()))
                .ok_or_else(|| io::Error::other("unnamed unix socket")),
            Listener::Tcp(l) => Ok(Address::Tcp(l.local_addr()?)),
        }
    }

    pub fn accept(&self) -> io::Result<(Socket, String)> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                Ok((Socket::Unix(s), "unix peer".to_owned()))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Socket::Tcp(s), peer.to_string()))
            }
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.register(registry, token, Interest::READABLE),
            Listener::Tcp(l) => l.register(registry, token, Interest::READABLE),
        }
    }

    /// Stops listening; a Unix socket's path is removed so the next server can bind it.
    pub fn close(&mut self, registry: &Registry) {
        if let Ok(Address::Unix(path)) = self.local_addr() {
            let _ = std::fs::remove_file(path);
        }
        let _ = match self {
            Listener::Unix(l) => l.deregister(registry),
            Listener::Tcp(l) => l.deregister(registry),
        };
    }
}

pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn connect(addr: &Address) -> io::Result<Socket> {
        Ok(match addr {
            Address::Unix(path) => Socket::Unix(UnixStream::connect(path)?),
            Address::Tcp(a) => {
                let s = TcpStream::connect(*a)?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
        })
    }

    /// Connects on the caller's thread, waiting at most `timeout`, so a host or CLI learns at
    /// once that a server is unreachable; hand the result to `Engine::attach`.
    pub fn connect_blocking(addr: &Address, timeout: std::time::Duration) -> io::Result<Socket> {
        Ok(match addr {
            Address::Unix(path) => {
                let s = std::os::unix::net::UnixStream::connect(path)?;
                s.set_nonblocking(true)?;
                Socket::Unix(UnixStream::from_std(s))
            }
            Address::Tcp(a) => {
                let s = std::net::TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Socket::Tcp(TcpStream::from_std(s))
            }
        })
    }

    /// Lets a Unix socket hold more in flight than the kernel's default (208 KiB): with the
    /// default the receiving loop woke for about every frame, 7,000 context switches per GiB;
    /// with this, about 4,500 and 10-20 % less CPU on each side. Kept small because a frame of an
    /// interactive stream waits behind whatever the socket holds (512 KiB is ~0.15 ms at
    /// 3.5 GB/s). TCP keeps the kernel's autotuning. Best effort: the kernel caps the size at
    /// net.core.wmem_max.
    pub fn tune(&self) {
        if let Socket::Unix(s) = self {
            // The kernel doubles the value for its bookkeeping: 256 KiB gives 512 KiB.
            let size: libc::c_int = 256 * 1024;
            // SAFETY: setsockopt reads `size` for the given length; the fd is open.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                log::debug!("SO_SNDBUF: {}", io::Error::last_os_error());
            }
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Socket::Unix(s) => s,
            Socket::Tcp(s) => s,
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.source()
            .register(registry, token, Interest::READABLE | Interest::WRITABLE)
    }

    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.source().deregister(registry)
    }

    fn raw_fd(&self) -> i32 {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Reads up to `max` bytes into the spare capacity of `buf` without zero-filling it first.
    /// Returns 0 at end of stream.
    pub fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        buf.reserve(max);
        let spare = buf.spare_capacity_mut();
        let want = spare.len().min(max);
        // SAFETY: read(2) writes at most `want` bytes into memory we own and reports how many;
        // only those are exposed with set_len.
        let n = unsafe { libc::read(self.raw_fd(), spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }

    pub fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(slices),
            Socket::Tcp(s) => s.write_vectored(slices),
        }
    }

    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Socket::Unix(s) => s.take_error(),
            Socket::Tcp(s) => s.take_error(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_a_bare_port_is_loopback() {
        assert_eq!(
            "tcp:7700".parse::<Address>(),
            Ok(Address::Tcp("127.0.0.1:7700".parse().unwrap()))
        );
        assert_eq!(
            "tcp:[::1]:9".parse::<Address>(),
            Ok(Address::Tcp("[::1]:9".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Address>(),
            Ok(Address::Unix("/run/x.sock".into()))
        );
        assert!("unix:".parse::<Address>().is_err());
        assert!("pigeon:1".parse::<Address>().is_err());
        assert!("tcp:no-such-host.invalid:1".parse::<Address>().is_err());
    }
}
