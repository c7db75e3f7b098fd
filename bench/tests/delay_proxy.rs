//! The delay proxy over real loopback sockets: bytes arrive intact, in order and never early,
//! the rate cap is never exceeded, a receiver that stops reading holds the line at its limit
//! without losing a byte, and dropping the proxy closes what it carries.

use bench::delay::{DelayConfig, DelayProxy};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A deterministic byte sequence, so each side can check the other's bytes without storing them.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

fn send_pattern(s: &mut TcpStream, seed: u64, total: usize) {
    let mut p = Pattern(seed);
    let mut buf = vec![0u8; 100_003]; // odd size: chunks do not line up with the proxy's
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(buf.len());
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        sent += n;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads to EOF, checking every byte against the pattern; returns how many arrived.
fn check_pattern(s: &mut TcpStream, seed: u64) -> usize {
    let mut p = Pattern(seed);
    let mut buf = vec![0u8; 77_777];
    let mut want = vec![0u8; buf.len()];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        p.fill(&mut want[..n]);
        assert!(
            buf[..n] == want[..n],
            "bytes differ in {total}..{}",
            total + n
        );
        total += n;
    }
}

#[test]
fn bytes_cross_both_ways_intact_in_order_and_no_faster_than_the_cap() {
    const TOTAL: usize = 24 << 20;
    let rate = 200_000_000;
    let config = DelayConfig::new(Duration::from_millis(25), Some(rate));
    let server = TcpListener::bind(any_port()).unwrap();
    let target = server.local_addr().unwrap();
    let proxy = DelayProxy::start(any_port(), target, config).unwrap();
    let far = thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let sender = thread::spawn(move || send_pattern(&mut w, 2, TOTAL));
        let got = check_pattern(&mut s, 1);
        sender.join().unwrap();
        got
    });
    let start = Instant::now();
    let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
    let mut w = c.try_clone().unwrap();
    let sender = thread::spawn(move || send_pattern(&mut w, 1, TOTAL));
    let back = check_pattern(&mut c, 2);
    let elapsed = start.elapsed();
    sender.join().unwrap();
    assert_eq!(back, TOTAL, "every byte sent back arrived");
    assert_eq!(far.join().unwrap(), TOTAL, "every byte sent out arrived");
    // The line never releases a byte before the cap allows it, nor before the delay.
    let floor = Duration::from_secs_f64(TOTAL as f64 / rate as f64) + config.delay;
    assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
    let stats = proxy.stats();
    assert_eq!(stats.forwarded_out.load(Ordering::Relaxed), TOTAL as u64);
    assert_eq!(stats.forwarded_back.load(Ordering::Relaxed), TOTAL as u64);
    assert!(stats.peak_line_bytes.load(Ordering::Relaxed) <= config.line_limit());
    eprintln!("24 MiB each way at 50 ms and 200 MB/s: {elapsed:?}");
}

#[test]
fn connections_share_the_rate_cap() {
    const EACH: usize = 8 << 20;
    let rate = 100_000_000;
    let config = DelayConfig::new(Duration::from_millis(5), Some(rate));
    let server = TcpListener::bind(any_port()).unwrap();
    let target = server.local_addr().unwrap();
    let proxy = DelayProxy::start(any_port(), target, config).unwrap();
    let far = thread::spawn(move || {
        let mut senders = Vec::new();
        for seed in 1..=4 {
            let (mut s, _) = server.accept().unwrap();
            senders.push(thread::spawn(move || send_pattern(&mut s, seed, EACH)));
        }
        senders.into_iter().for_each(|t| t.join().unwrap());
    });
    let start = Instant::now();
    // Connected in order so that the server's seeds match.
    let conns: Vec<TcpStream> = (0..4)
        .map(|_| {
            let c = TcpStream::connect(proxy.local_addr()).unwrap();
            thread::sleep(Duration::from_millis(20));
            c
        })
        .collect();
    let readers: Vec<_> = conns
        .into_iter()
        .zip(1..)
        .map(|(mut c, seed)| thread::spawn(move || check_pattern(&mut c, seed)))
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), EACH);
    }
    let elapsed = start.elapsed();
    far.join().unwrap();
    // Four connections through one proxy share one link: together no faster than the cap.
    let floor = Duration::from_secs_f64(4.0 * EACH as f64 / rate as f64);
    assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
}

#[test]
fn no_byte_arrives_before_the_delay() {
    let config = DelayConfig::new(Duration::from_millis(10), None);
    let server = TcpListener::bind(any_port()).unwrap();
    let proxy = DelayProxy::start(any_port(), server.local_addr().unwrap(), config).unwrap();
    let echo = thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut one_way = Vec::new();
        let mut b = [0u8; 16];
        // First a one-way check: the client's send time travels inside the message.
        s.read_exact(&mut b).unwrap();
        let sent = u128::from_le_bytes(b);
        one_way.push(epoch_nanos() - sent);
        // Then echo single bytes until EOF.
        let mut one = [0u8; 1];
        while s.read(&mut one).unwrap() == 1 {
            s.write_all(&one).unwrap();
        }
        one_way
    });
    let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
    c.set_nodelay(true).unwrap();
    c.write_all(&epoch_nanos().to_le_bytes()).unwrap();
    let mut rtts = Vec::new();
    for i in 0..20u8 {
        let t = Instant::now();
        c.write_all(&[i]).unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
        assert_eq!(one[0], i, "echo in order");
        rtts.push(t.elapsed());
    }
    c.shutdown(Shutdown::Write).unwrap();
    let one_way = echo.join().unwrap();
    assert!(
        one_way[0] >= config.delay.as_nanos(),
        "one way {} ns",
        one_way[0]
    );
    for rtt in &rtts {
        assert!(*rtt >= 2 * config.delay, "round trip {rtt:?}");
    }
    rtts.sort();
    eprintln!(
        "ping-pong through 2 x 10 ms: min {:?}, median {:?}, max {:?}",
        rtts[0], rtts[10], rtts[19]
    );
}

fn epoch_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn a_receiver_that_stops_reading_fills_the_line_to_its_limit_and_loses_nothing() {
    let config = DelayConfig {
        delay: Duration::from_millis(5),
        rate: Some(50_000_000),
        queue: 512 << 10,
    };
    let server = TcpListener::bind(any_port()).unwrap();
    let proxy = DelayProxy::start(any_port(), server.local_addr().unwrap(), config).unwrap();
    let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
    let (mut far, _) = server.accept().unwrap();
    // Write without blocking until the sender, the line and the receiver's kernel buffers are
    // all full and no more goes in for a while.
    c.set_nonblocking(true).unwrap();
    let mut p = Pattern(7);
    let mut buf = vec![0u8; 65536];
    let mut pending = 0..0;
    let mut written = 0usize;
    let mut idle = 0;
    while idle < 10 {
        if pending.is_empty() {
            p.fill(&mut buf);
            pending = 0..buf.len();
        }
        match c.write(&buf[pending.clone()]) {
            Ok(n) => {
                written += n;
                pending.start += n;
                idle = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                idle += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let peak = proxy.stats().peak_line_bytes.load(Ordering::Relaxed);
    assert!(peak <= config.line_limit(), "line held {peak}");
    assert!(
        peak + 65536 >= config.line_limit(),
        "the line filled up ({peak} of {}) before the sender blocked",
        config.line_limit()
    );
    assert!(
        written < 1 << 30,
        "the sender was pushed back ({written} bytes)"
    );
    // Now read: exactly what was written arrives, in order.
    c.set_nonblocking(false).unwrap();
    let mut w = c.try_clone().unwrap();
    let rest = buf[pending].to_vec();
    let finish = thread::spawn(move || {
        w.write_all(&rest).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        written + rest.len()
    });
    let got = check_pattern(&mut far, 7);
    assert_eq!(got, finish.join().unwrap());
}

#[test]
fn dropping_the_proxy_closes_a_connection_that_is_stuck() {
    let config = DelayConfig::new(Duration::from_millis(5), Some(10_000_000));
    let server = TcpListener::bind(any_port()).unwrap();
    let proxy = DelayProxy::start(any_port(), server.local_addr().unwrap(), config).unwrap();
    let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
    let (_far, _) = server.accept().unwrap(); // never reads
    let mut w = c.try_clone().unwrap();
    // This writer blocks once everything is full; the proxy's drop must still return.
    let writer = thread::spawn(move || {
        let buf = vec![0u8; 65536];
        while w.write_all(&buf).is_ok() {}
    });
    thread::sleep(Duration::from_millis(200));
    drop(proxy);
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "the client sees the close");
    writer.join().unwrap();
}
