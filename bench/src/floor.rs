//! What a socket alone costs: the latency floor an interactive message cannot beat, and the
//! copy rate a single stream cannot beat, both measured without the engine.
//!
//! - [`latency_floor`]: one Unix socket, a sender writing bulk frames back to back, and a 4 KiB
//!   probe message written at the next frame boundary after it is born. The probe waits for the
//!   frame being written and for everything the socket buffer holds; no scheduler can do better
//!   over the same socket.
//! - [`bare_copy`]: one Unix socketpair, one thread writing a buffer in large writes and another
//!   reading and dropping it.
//!
//! Both set the same send buffer the engine sets on its Unix sockets (`SO_SNDBUF` 256 KiB, which
//! the kernel doubles), so the engine is compared with the socket it really uses.

use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the engine asks of the kernel for a Unix socket's send buffer (see engine's `Socket::tune`).
pub const ENGINE_SNDBUF: usize = 256 * 1024;

const KIND_BULK: u8 = 1;
const KIND_PROBE: u8 = 2;
/// Frame header of the floor's own little wire format: length (u32), kind (u8), birth (u64).
const HEADER: usize = 13;

pub struct FloorConfig {
    /// Payload bytes of each bulk frame.
    pub frame: usize,
    /// Payload bytes of each probe message.
    pub message: usize,
    pub messages: u64,
    pub interval: Duration,
}

impl Default for FloorConfig {
    fn default() -> Self {
        FloorConfig {
            frame: 64 * 1024,
            message: 4096,
            messages: 2000,
            interval: Duration::from_millis(1),
        }
    }
}

/// Probe latencies in microseconds, and the bulk rate meanwhile.
pub struct FloorResult {
    pub histogram: Histogram<u64>,
    pub link_gbps: f64,
}

impl FloorResult {
    pub fn json(&self) -> serde_json::Value {
        let h = &self.histogram;
        serde_json::json!({
            "messages": h.len(),
            "p50_us": h.value_at_quantile(0.5),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
            "link_GBps": (self.link_gbps * 1000.0).round() / 1000.0,
        })
    }
}

pub fn set_sndbuf(socket: &UnixStream, bytes: usize) {
    let _ = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::SndBuf, &bytes);
}

/// Runs the probe against back-to-back bulk frames on one socket.
pub fn latency_floor(config: &FloorConfig) -> FloorResult {
    let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
    set_sndbuf(&tx, ENGINE_SNDBUF);
    let epoch = Instant::now();
    let (born_tx, born_rx) = mpsc::channel::<u64>();
    let stop = Arc::new(AtomicBool::new(false));

    let (frame, message) = (config.frame, config.message);
    let sender = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut bulk = vec![0u8; HEADER + frame];
            bulk[..4].copy_from_slice(&(frame as u32).to_be_bytes());
            bulk[4] = KIND_BULK;
            let mut probe = vec![0u8; HEADER + message];
            probe[..4].copy_from_slice(&(message as u32).to_be_bytes());
            probe[4] = KIND_PROBE;
            let mut bulk_bytes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // The next frame boundary: a waiting probe goes before the next bulk frame.
                while let Ok(born) = born_rx.try_recv() {
                    probe[5..13].copy_from_slice(&born.to_be_bytes());
                    if tx.write_all(&probe).is_err() {
                        return bulk_bytes;
                    }
                }
                if tx.write_all(&bulk).is_err() {
                    return bulk_bytes;
                }
                bulk_bytes += bulk.len() as u64;
            }
            bulk_bytes
        })
    };
    let receiver = std::thread::spawn(move || {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let (mut start, mut end) = (0, 0);
        loop {
            // Whole frames at the front are parsed; a partial one moves to the start.
            while end - start >= HEADER {
                let len = u32::from_be_bytes(buf[start..start + 4].try_into().unwrap()) as usize;
                if end - start < HEADER + len {
                    break;
                }
                if buf[start + 4] == KIND_PROBE {
                    let born = u64::from_be_bytes(buf[start + 5..start + 13].try_into().unwrap());
                    let now = epoch.elapsed().as_nanos() as u64;
                    let _ = histogram.record(now.saturating_sub(born) / 1000);
                }
                start += HEADER + len;
            }
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            match rx.read(&mut buf[end..]) {
                Ok(0) | Err(_) => return histogram,
                Ok(n) => end += n,
            }
        }
    });

    // Let the bulk sender fill the socket before the first probe.
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let mut next = Instant::now();
    for _ in 0..config.messages {
        let born = epoch.elapsed().as_nanos() as u64;
        let _ = born_tx.send(born);
        next += config.interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // The last probe's frame boundary.
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let bulk_bytes = sender.join().expect("sender");
    let elapsed = started.elapsed().as_secs_f64();
    let histogram = receiver.join().expect("receiver");
    FloorResult {
        histogram,
        link_gbps: bulk_bytes as f64 / elapsed / 1e9,
    }
}

/// Copies `total` bytes of `block`, repeated, over a Unix socketpair in `write_size` writes;
/// returns GB/s. Give it the block the engine's source repeats: the kernel's copy out of a
/// buffer that stays in L2 costs less per byte than out of one that does not.
pub fn bare_copy(total: u64, block: &[u8], write_size: usize) -> f64 {
    let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
    set_sndbuf(&tx, ENGINE_SNDBUF);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; write_size];
        let mut got = 0u64;
        loop {
            match rx.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n as u64,
            }
        }
    });
    let start = Instant::now();
    let mut sent = 0u64;
    let mut at = 0;
    while sent < total {
        let n = (total - sent)
            .min(write_size as u64)
            .min((block.len() - at) as u64) as usize;
        tx.write_all(&block[at..at + n]).expect("bare copy write");
        at = (at + n) % block.len();
        sent += n as u64;
    }
    drop(tx);
    let got = reader.join().expect("reader");
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(got, total, "bare copy lost bytes");
    total as f64 / elapsed / 1e9
}
