//! Credit-based flow control, per stream and per connection.
//!
//! The receiver grants credit; the sender spends it on DATA (one unit per payload byte) and HOLE
//! frames (a fixed [`HOLE_COST`], because a hole costs the sink work even though it costs the
//! wire nothing). Credit flows back only as the sink finishes chunks, and only once half a
//! window has accumulated (as h2 and yamux do) so WINDOW frames stay rare. A receive window
//! may tune its own size to the path ([`RecvWindow::tuned`]).

use std::time::{Duration, Instant};

/// Credit a HOLE frame costs, whatever its length.
pub const HOLE_COST: u64 = 4096;
/// No window may exceed this; a WINDOW that would is a protocol violation.
pub const MAX_CREDIT: u64 = u32::MAX as u64;

/// The sending side of a window: how much the peer still lets us send.
#[derive(Debug, Clone, Copy)]
pub struct SendCredit {
    available: u64,
}

/// A WINDOW frame would push credit past [`MAX_CREDIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditOverflow;

impl SendCredit {
    pub fn new(initial: u32) -> Self {
        SendCredit {
            available: initial as u64,
        }
    }

    pub fn available(&self) -> u64 {
        self.available
    }

    pub fn grant(&mut self, increment: u32) -> Result<(), CreditOverflow> {
        let next = self.available + increment as u64;
        if next > MAX_CREDIT {
            return Err(CreditOverflow);
        }
        self.available = next;
        Ok(())
    }

    /// Spends credit the caller checked is there.
    pub fn spend(&mut self, cost: u64) {
        debug_assert!(cost <= self.available);
        self.available -= cost;
    }
}

/// The receiving side of a window: what the peer may still send, what the sink has consumed
/// but we have not yet granted back, and the size the window is moving to.
///
/// `outstanding + buffered + unreturned == size` always holds. A window grows by granting more
/// than was consumed, and shrinks by keeping back consumed credit until it reaches its target:
/// credit already granted is never taken back, so shrinking takes effect as the sink catches
/// up, and the peer sees nothing but WINDOW increments either way.
#[derive(Debug, Clone, Copy)]
pub struct RecvWindow {
    size: u64,
    target: u64,
    /// Granted to the peer and not yet used by it.
    outstanding: u64,
    /// Consumed by the sink, not yet granted back.
    unreturned: u64,
    /// The size the peer was told at first; a window never shrinks below it.
    min: u64,
    /// When credit last went back, once it has (see [`RecvWindow::release_at`]).
    last_update: Option<Instant>,
}

/// The peer sent more than it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowExceeded {
    pub cost: u64,
    pub outstanding: u64,
}

impl RecvWindow {
    /// A window of `window` bytes, the size the peer was told in the handshake. It keeps that
    /// size when credit goes back with [`RecvWindow::release`]; with
    /// [`RecvWindow::release_at`] it sizes itself between that and the cap given from the
    /// round trip and the rate at which its credit is consumed, each time it sends credit
    /// back:
    ///
    /// - If half the window was used and consumed within two round trips of the previous
    ///   return, the window rather than the sink or the link is what limits the sender: it
    ///   doubles. (A sink that keeps up with a window-limited sender returns half a window
    ///   every half round trip; one that keeps up with the link, every `size / 2 / rate`.) So
    ///   the window settles at four to eight times the bytes consumed per round trip, enough
    ///   to cover the path's bandwidth-delay product with room for bursts.
    /// - If the window is more than eight times what the consumption rate needs per round
    ///   trip, the sink (or the sender) is slow: the window aims at four times that, no less
    ///   than `window`, so a slow sink stops holding memory a fast one would need.
    ///
    /// Without a round-trip sample the window keeps its size.
    pub fn new(window: u32) -> Self {
        RecvWindow {
            size: window as u64,
            target: window as u64,
            outstanding: window as u64,
            unreturned: 0,
            min: window as u64,
            last_update: None,
        }
    }

    /// Accounts for a frame that arrived.
    pub fn receive(&mut self, cost: u64) -> Result<(), WindowExceeded> {
        if cost > self.outstanding {
            return Err(WindowExceeded {
                cost,
                outstanding: self.outstanding,
            });
        }
        self.outstanding -= cost;
        Ok(())
    }

    /// Accounts for credit the sink has consumed; returns an increment to send back once half a
    /// window has accumulated. The size does not change.
    pub fn release(&mut self, cost: u64) -> Option<u32> {
        self.unreturned += cost;
        self.absorb();
        self.grant()
    }

    /// As [`RecvWindow::release`], and a window about to send credit back first resizes itself
    /// (see [`RecvWindow::new`]) with the round trip `rtt`, growing to at most `cap` (its
    /// maximum, or the share of memory the caller can give it now if that is less).
    pub fn release_at(
        &mut self,
        cost: u64,
        now: Instant,
        rtt: Option<Duration>,
        cap: u64,
    ) -> Option<u32> {
        self.unreturned += cost;
        self.absorb();
        if self.unreturned * 2 < self.size {
            return None;
        }
        let wanted = self.resize(now, rtt);
        if wanted > self.size {
            let grown = wanted.min(cap.min(MAX_CREDIT)).max(self.size);
            self.unreturned += grown - self.size;
            self.size = grown;
            self.target = grown;
        } else {
            self.target = wanted;
            self.absorb();
        }
        self.grant()
    }

    /// Keeps back consumed credit while the window is larger than its target.
    fn absorb(&mut self) {
        let cut = self.unreturned.min(self.size.saturating_sub(self.target));
        self.size -= cut;
        self.unreturned -= cut;
    }

    fn grant(&mut self) -> Option<u32> {
        if self.unreturned == 0 || self.unreturned * 2 < self.size {
            return None;
        }
        let increment = self.unreturned;
        self.unreturned = 0;
        self.outstanding += increment;
        Some(increment as u32)
    }

    /// Bytes received and not yet consumed: what this window makes us hold.
    pub fn buffered(&self) -> u64 {
        self.size - self.outstanding - self.unreturned
    }

    /// The window's current size: the most the peer may have sent that the sink has not
    /// consumed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How far the window has grown past the size the peer was first told.
    pub fn grown(&self) -> u64 {
        self.size - self.min
    }

    /// The size this window should have, now that it is about to return `unreturned`.
    fn resize(&mut self, now: Instant, rtt: Option<Duration>) -> u64 {
        let (size, consumed) = (self.size, self.unreturned);
        let Some(last) = self.last_update.replace(now) else {
            return size;
        };
        let Some(rtt) = rtt.filter(|r| !r.is_zero()) else {
            return size;
        };
        let interval = now
            .saturating_duration_since(last)
            .max(Duration::from_micros(1));
        if interval < 2 * rtt {
            return size.saturating_mul(2);
        }
        // Bytes consumed per round trip at the rate seen since the last return.
        let per_rtt = (consumed as u128 * rtt.as_nanos() / interval.as_nanos()) as u64;
        if size > per_rtt.saturating_mul(8) {
            return per_rtt.saturating_mul(4).clamp(self.min, size);
        }
        size
    }

    /// Credit granted to the peer and not yet used by it: what it may still send.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }
}

/// Credit as one side of a connection counts it. With nothing in flight either way, a sender's
/// `send` equals its peer's `recv` for the connection and for every stream.
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreditView {
    /// Connection credit we may still spend.
    pub send: u64,
    /// Connection credit the peer may still spend.
    pub recv: u64,
    /// Bytes received and not yet consumed by sinks, over the connection.
    pub held: u64,
    /// Per stream: what we may still send on it, or what the peer may still send on it.
    pub streams: Vec<(super::StreamId, StreamCredit)>,
}

#[cfg(feature = "test-support")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCredit {
    Send(u64),
    /// What the peer may still send, and what arrived and is not consumed yet.
    Recv {
        outstanding: u64,
        held: u64,
    },
}

#[cfg(feature = "test-support")]
impl super::Connection {
    /// The credit this side counts, for tests that compare both sides' accounting.
    pub fn credit_view(&self) -> CreditView {
        use super::stream::Half;
        let mut streams: Vec<_> = self
            .store
            .keys()
            .into_iter()
            .map(|key| &self.store[key])
            .map(|s| {
                let credit = match &s.half {
                    Half::Send(send) => StreamCredit::Send(send.credit.available()),
                    Half::Recv(recv) => StreamCredit::Recv {
                        outstanding: recv.window.outstanding(),
                        held: recv.unconsumed.iter().sum(),
                    },
                };
                (s.id, credit)
            })
            .collect();
        streams.sort_by_key(|(id, _)| *id);
        CreditView {
            send: self.send.prioritize.credit(),
            recv: self.recv.outstanding(),
            held: self.recv.buffered(),
            streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn receiving_beyond_the_grant_is_refused() {
        let mut w = RecvWindow::new(100);
        assert!(w.receive(60).is_ok());
        assert_eq!(
            w.receive(41),
            Err(WindowExceeded {
                cost: 41,
                outstanding: 40
            })
        );
    }

    #[test]
    fn credit_returns_at_half_window() {
        let mut w = RecvWindow::new(100);
        w.receive(100).unwrap();
        assert_eq!(w.release(49), None);
        assert_eq!(w.buffered(), 51);
        assert_eq!(w.release(1), Some(50));
        assert!(w.receive(50).is_ok());
        assert!(w.receive(1).is_err());
    }

    #[test]
    fn grant_overflow_is_detected() {
        let mut c = SendCredit::new(u32::MAX);
        assert_eq!(c.grant(1), Err(CreditOverflow));
        c.spend(10);
        assert!(c.grant(10).is_ok());
    }

    /// A sender and a receiver `rtt` apart over a link of `rate` bytes/s, the sink consuming
    /// `sink` bytes/s, simulated in steps of `rtt / 50` for `rtts` round trips; returns the
    /// window's largest and last size and the most the receiver held.
    struct Path {
        window: RecvWindow,
        now: Instant,
        credit: u64,
        /// (arrival time, bytes) in flight each way.
        data: VecDeque<(Instant, u64)>,
        grants: VecDeque<(Instant, u64)>,
        held: u64,
        peak_held: u64,
        peak_size: u64,
        delivered: u64,
        max: u64,
    }

    impl Path {
        fn new(initial: u32, max: u64) -> Self {
            Path {
                window: RecvWindow::new(initial),
                now: Instant::now(),
                credit: initial as u64,
                data: VecDeque::new(),
                grants: VecDeque::new(),
                held: 0,
                peak_held: 0,
                peak_size: initial as u64,
                delivered: 0,
                max,
            }
        }

        fn run(&mut self, rtt: Duration, rate: u64, sink: u64, rtts: u32) {
            let step = rtt / 50;
            let per_step = |r: u64| (r as u128 * step.as_nanos() / 1_000_000_000) as u64;
            for _ in 0..rtts * 50 {
                self.now += step;
                while self.grants.front().is_some_and(|g| g.0 <= self.now) {
                    self.credit += self.grants.pop_front().unwrap().1;
                }
                let sent = self.credit.min(per_step(rate));
                if sent > 0 {
                    self.credit -= sent;
                    self.data.push_back((self.now + rtt / 2, sent));
                }
                while self.data.front().is_some_and(|d| d.0 <= self.now) {
                    let n = self.data.pop_front().unwrap().1;
                    self.window
                        .receive(n)
                        .expect("the sender spends only its credit");
                    self.held += n;
                    self.delivered += n;
                }
                self.peak_held = self.peak_held.max(self.held);
                let consumed = self.held.min(per_step(sink));
                self.held -= consumed;
                if let Some(inc) = self
                    .window
                    .release_at(consumed, self.now, Some(rtt), self.max)
                {
                    self.grants.push_back((self.now + rtt / 2, inc as u64));
                }
                self.peak_size = self.peak_size.max(self.window.size());
                assert_eq!(self.window.buffered(), self.held);
            }
        }
    }

    #[test]
    fn a_tuned_window_grows_to_the_path_and_shrinks_for_a_slow_sink() {
        let rtt = Duration::from_millis(20);
        let rate = 200_000_000; // BDP 4 MB
        let mut p = Path::new(256 << 10, 64 << 20);
        p.run(rtt, rate, rate * 2, 60);
        let bdp = rate * 20 / 1000;
        assert!(
            p.peak_size >= bdp,
            "grew to {} for a BDP of {bdp}",
            p.peak_size
        );
        assert!(p.window.size() <= 64 << 20);
        // The sink slows to 1% of the link: the window comes back down.
        let grown = p.window.size();
        p.run(rtt, rate, rate / 100, 200);
        assert!(
            p.window.size() < grown / 4,
            "{} after slowing, {grown} before",
            p.window.size()
        );
        assert!(
            p.window.size() >= 256 << 10,
            "never below the initial window"
        );
    }

    #[test]
    fn a_tuned_window_stops_at_its_maximum_and_holds_no_more() {
        let rtt = Duration::from_millis(50);
        let mut p = Path::new(1 << 20, 8 << 20);
        p.run(rtt, 1_000_000_000, 2_000_000_000, 50);
        assert_eq!(p.peak_size, 8 << 20);
        assert!(p.peak_held <= 8 << 20);
    }

    #[test]
    fn a_window_without_a_round_trip_keeps_its_size() {
        let t = Instant::now();
        let mut w = RecvWindow::new(1000);
        for i in 0..10 {
            w.receive(1000).unwrap();
            assert_eq!(
                w.release_at(1000, t + Duration::from_micros(i), None, u64::MAX),
                Some(1000)
            );
        }
        assert_eq!(w.size(), 1000);
    }

    #[test]
    fn growth_stops_at_the_cap_the_caller_gives() {
        let t = Instant::now();
        let rtt = Some(Duration::from_millis(10));
        let mut w = RecvWindow::new(1000);
        w.receive(1000).unwrap();
        assert_eq!(
            w.release_at(1000, t, rtt, u64::MAX),
            Some(1000),
            "first return: no sample"
        );
        w.receive(1000).unwrap();
        // Returned again within two round trips: wants 2000, the cap allows 1500.
        assert_eq!(
            w.release_at(1000, t + Duration::from_millis(1), rtt, 1500),
            Some(1500)
        );
        assert_eq!(w.size(), 1500);
        assert_eq!(w.buffered(), 0);
    }
}
