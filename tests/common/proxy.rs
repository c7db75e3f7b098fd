//! A TCP proxy for tests: forwards every connection to a target, caps the target-to-client
//! direction at a rate (so a client can be killed mid-transfer), counts the bytes it
//! forwarded that way (what travelled on the wire), and can cut every open connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub addr: SocketAddr,
    /// Bytes forwarded from the target to clients, all connections together.
    pub down: Arc<AtomicU64>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Forwards to `target`, at most `rate` bytes per second towards the client.
    pub fn start(target: SocketAddr, rate: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, a, o) = (Arc::clone(&down), Arc::clone(&accepted), Arc::clone(&open));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                {
                    let mut o = o.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, None, None));
                let d = Arc::clone(&d);
                std::thread::spawn(move || pump(s2, c2, Some(rate), Some(d)));
            }
        });
        Proxy {
            addr,
            down,
            accepted,
            open,
        }
    }

    /// Cuts every connection open now (both directions), as a lost network would.
    pub fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rate: Option<u64>, count: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0u8; 64 << 10];
    let started = Instant::now();
    let mut moved = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        moved += n as u64;
        if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(moved as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
