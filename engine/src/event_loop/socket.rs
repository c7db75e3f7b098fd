//! Addresses and the two kinds of stream socket a connection runs over.

use super::peer::{unix_peer, PeerIdentity};
use bytes::BytesMut;
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::str::FromStr;

/// Where to listen or connect: `unix:PATH`, `tcp:HOST:PORT`, or `tcp:PORT` for 127.0.0.1;
/// `tls:HOST:PORT` (or `tls:PORT`, loopback by the name `localhost`) for TCP with TLS 1.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// TCP with TLS. `name` is the host as written: the name a client checks the server's
    /// certificate against.
    Tls {
        addr: SocketAddr,
        name: String,
    },
}

impl Address {
    /// The TCP address to bind or connect, for `tcp:` and `tls:`.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Address::Unix(_) => None,
            Address::Tcp(a) | Address::Tls { addr: a, .. } => Some(*a),
        }
    }
}

/// `HOST:PORT` or a bare port (loopback) to an address, and the host as written.
fn parse_host_port(s: &str, hostport: &str) -> Result<(SocketAddr, String), String> {
    use std::net::ToSocketAddrs;
    // A bare port means loopback: exposing a pool to the network must be asked for.
    if let Ok(port) = hostport.parse::<u16>() {
        return Ok((SocketAddr::from(([127, 0, 0, 1], port)), "localhost".into()));
    }
    let host = match hostport.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => return Err(format!("bad address {s:?}: expected HOST:PORT")),
    };
    // Name resolution may block; it happens on the caller's thread, never the loop's.
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("bad address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {s:?}: no such host"))?;
    Ok((addr, host.to_owned()))
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
            return parse_host_port(s, hostport).map(|(addr, _)| Address::Tcp(addr));
        }
        if let Some(hostport) = s.strip_prefix("tls:") {
            return parse_host_port(s, hostport).map(|(addr, name)| Address::Tls { addr, name });
        }
        Err(format!(
            "bad address {s:?}: expected unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"
        ))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
            Address::Tls { addr, name } => match name.parse::<std::net::IpAddr>() {
                Ok(_) => write!(f, "tls:{addr}"),
                Err(_) => write!(f, "tls:{name}:{}", addr.port()),
            },
        }
    }
}

pub enum Listener {
    /// With the path it was placed at (the kernel remembers the temporary one it was bound to).
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds; a Unix socket gets file mode `unix_mode` before any client can reach it.
    pub fn bind(addr: &Address, unix_mode: u32) -> io::Result<Listener> {
        Ok(match addr {
            Address::Unix(path) => Listener::Unix(bind_unix(path, unix_mode)?, path.clone()),
            Address::Tcp(a) | Address::Tls { addr: a, .. } => Listener::Tcp(TcpListener::bind(*a)?),
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            Listener::Unix(_, path) => Ok(Address::Unix(path.clone())),
            Listener::Tcp(l) => Ok(Address::Tcp(l.local_addr()?)),
        }
    }

    /// The next connection, a name for logs, and who the kernel says the peer is.
    pub fn accept(&self) -> io::Result<(Socket, String, PeerIdentity)> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                let identity = unix_peer(s.as_raw_fd());
                let name = match &identity {
                    PeerIdentity::Unix { uid, pid, .. } => format!("unix peer {pid} (uid {uid})"),
                    _ => "unix peer".to_owned(),
                };
                Ok((Socket::Unix(s), name, identity))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((
                    Socket::Tcp(s),
                    peer.to_string(),
                    PeerIdentity::Address(peer),
                ))
            }
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.register(registry, token, Interest::READABLE),
            Listener::Tcp(l) => l.register(registry, token, Interest::READABLE),
        }
    }

    /// Stops listening; a Unix socket's path is removed so the next server can bind it.
    pub fn close(&mut self, registry: &Registry) {
        if let Ok(Address::Unix(path)) = self.local_addr() {
            let _ = std::fs::remove_file(path);
        }
        let _ = match self {
            Listener::Unix(l, _) => l.deregister(registry),
            Listener::Tcp(l) => l.deregister(registry),
        };
    }
}

/// Binds a Unix socket under a temporary name, sets its mode, then renames it into place: no
/// client ever sees the path with the umask's permissions.
fn bind_unix(path: &std::path::Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn connect(addr: &Address) -> io::Result<Socket> {
        Ok(match addr {
            Address::Unix(path) => Socket::Unix(UnixStream::connect(path)?),
            Address::Tcp(a) | Address::Tls { addr: a, .. } => {
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
            Address::Tcp(a) | Address::Tls { addr: a, .. } => {
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
    /// 3.5 GB/s). Best effort: the kernel caps the size at net.core.wmem_max.
    ///
    /// A TCP socket keeps the kernel's autotuning of its buffers but holds at most
    /// [`TCP_UNSENT`] bytes it has not sent yet (TCP_NOTSENT_LOWAT): the scheduler can only put
    /// an interactive frame ahead of what is still ours, and without the limit a receiver
    /// slower than the link (TLS decryption) let 4 MiB (tcp_wmem's maximum) wait unsent in the
    /// sender's socket, ahead of every frame. Bytes sent and not yet acknowledged are not
    /// limited by it, so a long path keeps its window.
    pub fn tune(&self) {
        match self {
            // 256 KiB gives 512 KiB (see set_send_buffer).
            Socket::Unix(s) => set_send_buffer(s.as_fd(), 256 * 1024),
            Socket::Tcp(s) => {
                let unsent = TCP_UNSENT as libc::c_int;
                if let Err(e) = setsockopt_int(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_NOTSENT_LOWAT,
                    unsent,
                ) {
                    log::debug!("TCP_NOTSENT_LOWAT: {e}");
                }
            }
        }
    }

    /// Bounds what a TCP socket's receive buffer holds on a path whose round trip is short, so
    /// that when this side's loop is slower than the link the bytes it has not read yet stay
    /// about one round trip of the fastest link we plan for ([`FASTEST_PATH`]), not the
    /// 6-32 MiB receive autotuning grows to. Those bytes are a FIFO ahead of every interactive
    /// frame: with TLS, 6.5 MB waited there (16 ms at the 0.4 GB/s the receiver decrypted).
    /// Bounded, the excess waits in the sender's stream queues, where the scheduler can let an
    /// interactive frame go first. A path whose round trip needs more than autotuning gives
    /// is left alone. Call it with the smallest round trip seen, whenever it shrinks; returns
    /// whether the buffer is now set (autotuning is then off for it).
    pub fn bound_receive_queue(&self, min_rtt: std::time::Duration) -> bool {
        let Socket::Tcp(s) = self else {
            return false;
        };
        let limits = buffer_limits();
        let Some(size) = receive_bound(min_rtt, limits.tcp_rmem_max, limits.rmem_max) else {
            return false;
        };
        let fd = s.as_raw_fd();
        if getsockopt_int(fd, libc::SO_RCVBUF).is_some_and(|current| current == size * 2) {
            return true;
        }
        // The kernel doubles what is set, for its own bookkeeping.
        match setsockopt_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            size.min(i32::MAX as u64) as libc::c_int,
        ) {
            Ok(()) => {
                log::debug!("SO_RCVBUF {size} for a round trip of {min_rtt:?}");
                true
            }
            Err(e) => {
                log::debug!("SO_RCVBUF: {e}");
                false
            }
        }
    }

    /// Lets a TCP socket's kernel buffers hold `bytes` of payload each way (the path's
    /// bandwidth-delay product as the connection estimates it) where the kernel's autotuning
    /// would stop short and the kernel lets us set more. A sender's buffer must hold a round
    /// trip of unacknowledged bytes and a receiver's advertises about half its size as TCP's
    /// window, and Linux autotunes each only up to net.ipv4.tcp_wmem / tcp_rmem's maximum
    /// (4 MiB and 6 MiB by default: 80 MB/s at 50 ms). Setting a size ends autotuning for that
    /// buffer, and the kernel caps what is set at net.core.wmem_max / rmem_max, so a buffer is
    /// set only when that gives it more than autotuning could. Unix sockets keep [`tune`].
    ///
    /// [`tune`]: Socket::tune
    /// `receive_bounded` says [`Socket::bound_receive_queue`] set the receive buffer, which
    /// then grows only this way.
    pub fn fit_buffers(&self, bytes: u64, receive_bounded: bool) {
        let Socket::Tcp(s) = self else {
            return;
        };
        let limits = buffer_limits();
        for (option, name, autotune_max, set_max) in [
            (
                libc::SO_SNDBUF,
                "SO_SNDBUF",
                limits.tcp_wmem_max,
                limits.wmem_max,
            ),
            (
                libc::SO_RCVBUF,
                "SO_RCVBUF",
                limits.tcp_rmem_max,
                limits.rmem_max,
            ),
        ] {
            let fd = s.as_raw_fd();
            let Some(current) = getsockopt_int(fd, option) else {
                continue;
            };
            let autotune_max = match option {
                libc::SO_RCVBUF if receive_bounded => current,
                _ => autotune_max,
            };
            let Some(value) = buffer_to_set(bytes, current, autotune_max, set_max) else {
                continue;
            };
            let v = value.min(i32::MAX as u64) as libc::c_int;
            if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, option, v) {
                log::debug!("{name}: {e}");
                continue;
            }
            log::debug!(
                "{name} {current} -> {:?} for a path of {bytes} bytes",
                getsockopt_int(fd, option)
            );
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

    /// Reads up to `max` bytes into the spare capacity of `buf` (see [`read_into`]).
    pub fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        read_into(self.as_fd(), buf, max)
    }

    /// Reads into an initialised buffer (TLS ciphertext).
    pub fn read_slice(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
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

/// What the kernel lets a socket's buffers reach: by autotuning, and by setting them.
#[derive(Debug, Clone, Copy)]
struct BufferLimits {
    tcp_wmem_max: u64,
    tcp_rmem_max: u64,
    wmem_max: u64,
    rmem_max: u64,
}

/// Read once from /proc/sys (a virtual file system, no disk); Linux's defaults where missing.
fn buffer_limits() -> BufferLimits {
    static LIMITS: std::sync::OnceLock<BufferLimits> = std::sync::OnceLock::new();
    *LIMITS.get_or_init(|| {
        let read = |path: &str, field: usize, default: u64| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.split_whitespace().nth(field)?.parse().ok())
                .unwrap_or(default)
        };
        BufferLimits {
            tcp_wmem_max: read("/proc/sys/net/ipv4/tcp_wmem", 2, 4 << 20),
            tcp_rmem_max: read("/proc/sys/net/ipv4/tcp_rmem", 2, 6 << 20),
            wmem_max: read("/proc/sys/net/core/wmem_max", 0, 212_992),
            rmem_max: read("/proc/sys/net/core/rmem_max", 0, 212_992),
        }
    })
}

/// Unsent bytes a TCP socket may hold (see [`Socket::tune`]): two of the driver's
/// interactive transmit batches, so the socket never runs dry between two writes.
pub const TCP_UNSENT: usize = 128 * 1024;

/// The link speed a short path is given receive buffer for (see
/// [`Socket::bound_receive_queue`]): 4 GB/s, about the most this engine moves on one connection.
pub const FASTEST_PATH: u64 = 4_000_000_000;

/// The least receive buffer [`Socket::bound_receive_queue`] leaves (as the kernel counts it,
/// payload and overhead): about half of it is TCP's window.
const RECEIVE_FLOOR: u64 = 512 * 1024;

/// The receive buffer (as set, before the kernel doubles it) for a path with round trip
/// `rtt`: twice [`FASTEST_PATH`]'s bytes per round trip as the kernel counts them, at least
/// [`RECEIVE_FLOOR`]; `None` where autotuning (up to `autotune_max`) would not give more or
/// the kernel does not allow setting that much.
fn receive_bound(rtt: std::time::Duration, autotune_max: u64, set_max: u64) -> Option<u64> {
    let path = (FASTEST_PATH as u128 * rtt.as_nanos() / 1_000_000_000) as u64;
    let counted = path.saturating_mul(2).max(RECEIVE_FLOOR);
    (counted < autotune_max && counted / 2 <= set_max).then_some(counted / 2)
}

fn setsockopt_int(
    fd: i32,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `value` for the given length; the fd is open.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: i32, option: libc::c_int) -> Option<u64> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`; the fd is open.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0 && v >= 0).then_some(v as u64)
}

/// The value to set a socket buffer to so that it holds `bytes` of payload, or `None` where
/// setting would not help: it already does, autotuning (up to `autotune_max`) will get there,
/// or what the kernel allows setting (it doubles the value, capped at `set_max`, for its own
/// bookkeeping) is no more than autotuning reaches anyway. `current` is what the kernel
/// reports now.
fn buffer_to_set(bytes: u64, current: u64, autotune_max: u64, set_max: u64) -> Option<u64> {
    // The kernel's buffer counts overhead too; room for twice the payload keeps TCP's window
    // (half the receive buffer at the default tcp_adv_win_scale) at the path's size.
    let wanted = bytes.saturating_mul(2);
    if current >= wanted || autotune_max >= wanted {
        return None;
    }
    let value = bytes.min(set_max);
    (value * 2 > current.max(autotune_max)).then_some(value)
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
        }
    }
}

/// Reads up to `max` bytes from `fd` into the spare capacity of `buf` without zero-filling
/// it first (a receive buffer is refilled at every readiness; zeroing it would cost as much as
/// the read). Returns 0 at end of stream. Also the iohelper client's socket read.
pub fn read_into(fd: BorrowedFd<'_>, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let want = spare.len().min(max);
    // SAFETY: read(2) writes at most `want` bytes into memory we own and reports how many;
    // only those are exposed with set_len.
    let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised `n` bytes past the length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Asks for a send buffer of `bytes` on the socket `fd` (the kernel doubles the value for its
/// bookkeeping and caps it at net.core.wmem_max). Best effort: a refusal is logged and the
/// default stays. Connections ask for little ([`Socket::tune`]); the iohelper's sockets, which
/// carry nothing interactive, for more.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if let Err(e) = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, size) {
        log::debug!("SO_SNDBUF: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_set_only_where_that_beats_autotuning() {
        const M: u64 = 1 << 20;
        // 6 MB path, this machine's limits: the send side autotunes to 4 MiB only, setting
        // gives 8 MiB; the receive side autotunes to 32 MiB and is left alone.
        assert_eq!(buffer_to_set(6 * M, M, 4 * M, 4 * M), Some(4 * M));
        assert_eq!(buffer_to_set(6 * M, M, 32 * M, 4 * M), None);
        // A small path needs nothing.
        assert_eq!(buffer_to_set(M, 256 << 10, 4 * M, 4 * M), None);
        // Stock limits (rmem_max 208 KiB): setting would lock the buffer small.
        assert_eq!(buffer_to_set(6 * M, M, 4 * M, 212_992), None);
        // Already big enough.
        assert_eq!(buffer_to_set(2 * M, 4 * M, M, 64 * M), None);
        // Room to set what is wanted.
        assert_eq!(buffer_to_set(8 * M, M, 4 * M, 64 * M), Some(8 * M));
    }

    #[test]
    fn a_short_path_bounds_its_receive_buffer_and_a_long_one_keeps_autotuning() {
        const M: u64 = 1 << 20;
        let us = std::time::Duration::from_micros;
        // Loopback: the floor (set as half, the kernel doubles it).
        assert_eq!(receive_bound(us(30), 32 * M, 4 * M), Some(256 << 10));
        // 0.2 ms: two round trips of 4 GB/s, 1.6 MB as counted, 0.8 MB set.
        assert_eq!(receive_bound(us(200), 32 * M, 4 * M), Some(800_000));
        // 2 ms: more than rmem_max lets us set; 50 ms: more than autotuning gives anyway.
        assert_eq!(receive_bound(us(2000), 32 * M, 4 * M), None);
        assert_eq!(receive_bound(us(50_000), 32 * M, 64 * M), None);
        // Stock autotuning (6 MiB) already is the bound for a 1 ms path.
        assert_eq!(receive_bound(us(1000), 6 * M, 64 * M), None);
    }

    #[test]
    fn a_tcp_socket_holds_little_unsent_and_a_bounded_receive_buffer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = Socket::Tcp(TcpStream::from_std(c));
        s.tune();
        let fd = s.as_fd().as_raw_fd();
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`; the fd is open.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((r, v as usize), (0, TCP_UNSENT));
        let limits = buffer_limits();
        let rtt = std::time::Duration::from_micros(50);
        let bounded = s.bound_receive_queue(rtt);
        let after = getsockopt_int(fd, libc::SO_RCVBUF).unwrap();
        match receive_bound(rtt, limits.tcp_rmem_max, limits.rmem_max) {
            Some(size) => assert!(bounded && after == size * 2, "{after} for {size}"),
            None => assert!(!bounded),
        }
    }

    /// Bytes in a TCP socket's queue it has not sent yet (SIOCOUTQNSD), or has received and
    /// not yet been read (FIONREAD).
    fn queued(fd: i32, request: libc::c_ulong) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: both ioctls write one int; the fd is open.
        let r = unsafe { libc::ioctl(fd, request as _, &mut n) };
        assert_eq!(r, 0, "ioctl {request:#x}: {}", io::Error::last_os_error());
        n as usize
    }

    #[test]
    fn a_reader_that_falls_behind_leaves_little_unsent_and_unread_on_a_short_path() {
        const SIOCOUTQNSD: libc::c_ulong = 0x894b;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        c.set_nonblocking(true).unwrap();
        let (mut sender, receiver) = (
            Socket::Tcp(TcpStream::from_std(c)),
            Socket::Tcp(TcpStream::from_std(r)),
        );
        sender.tune();
        let bounded = receiver.bound_receive_queue(std::time::Duration::from_micros(50));
        // The receiver reads nothing: write until the sender's socket takes no more (loopback
        // moves what the window allows at once; a second pass catches what was in flight).
        let block = vec![7u8; 64 * 1024];
        let mut written = 0;
        for _ in 0..2 {
            while written < 256 << 20 {
                match sender.write_vectored(&[IoSlice::new(&block)]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let unsent = queued(sender.as_fd().as_raw_fd(), SIOCOUTQNSD);
        let unread = queued(
            receiver.as_fd().as_raw_fd(),
            libc::FIONREAD as libc::c_ulong,
        );
        let rcvbuf =
            getsockopt_int(receiver.as_fd().as_raw_fd(), libc::SO_RCVBUF).unwrap() as usize;
        eprintln!("{written} written: {unsent} unsent, {unread} unread, SO_RCVBUF {rcvbuf} (bounded: {bounded})");
        // One write may go past the mark before the socket stops taking more.
        assert!(unsent <= TCP_UNSENT + block.len(), "{unsent} unsent");
        if bounded {
            assert!(
                unread <= rcvbuf,
                "{unread} unread with a {rcvbuf}-byte buffer"
            );
        }
    }

    #[test]
    fn a_tcp_socket_gets_the_buffers_the_path_needs_where_the_kernel_allows() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = Socket::Tcp(TcpStream::from_std(c));
        let fd = s.as_fd().as_raw_fd();
        let before = getsockopt_int(fd, libc::SO_SNDBUF).unwrap();
        let limits = buffer_limits();
        let path = 64 << 20;
        s.fit_buffers(path, false);
        let after = getsockopt_int(fd, libc::SO_SNDBUF).unwrap();
        match buffer_to_set(path, before, limits.tcp_wmem_max, limits.wmem_max) {
            Some(v) => assert_eq!(after, v * 2, "set, and the kernel doubled it"),
            None => assert_eq!(after, before, "left to autotuning"),
        }
        eprintln!("SO_SNDBUF {before} -> {after} for a 64 MiB path ({limits:?})");
    }

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
        assert_eq!(
            "tls:localhost:7700".parse::<Address>(),
            Ok(Address::Tls {
                addr: "127.0.0.1:7700".parse().unwrap(),
                name: "localhost".into()
            })
        );
        assert_eq!(
            "tls:[::1]:9".parse::<Address>(),
            Ok(Address::Tls {
                addr: "[::1]:9".parse().unwrap(),
                name: "::1".into()
            })
        );
        assert_eq!(
            "tls:[::1]:9".parse::<Address>().unwrap().to_string(),
            "tls:[::1]:9"
        );
        assert_eq!(
            "tls:7".parse::<Address>().unwrap().to_string(),
            "tls:localhost:7"
        );
        assert!("unix:".parse::<Address>().is_err());
        assert!("pigeon:1".parse::<Address>().is_err());
        assert!("tcp:no-such-host.invalid:1".parse::<Address>().is_err());
    }
}
