//! Credit-based flow control, per stream and per connection.
//!
//! The receiver grants credit; the sender spends it on DATA (one unit per payload byte) and HOLE
//! frames (a fixed [`HOLE_COST`], because a hole costs the sink work even though it costs the
//! wire nothing). Credit flows back only as the sink finishes chunks, and only once half a
//! window has accumulated (as h2 and yamux do) so WINDOW frames stay rare.

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

/// The receiving side of a window: what the peer may still send, and what the sink has
/// consumed but we have not yet granted back.
#[derive(Debug, Clone, Copy)]
pub struct RecvWindow {
    window: u64,
    /// Granted to the peer and not yet used by it.
    outstanding: u64,
    /// Consumed by the sink, not yet granted back.
    unreturned: u64,
}

/// The peer sent more than it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowExceeded {
    pub cost: u64,
    pub outstanding: u64,
}

impl RecvWindow {
    pub fn new(window: u32) -> Self {
        RecvWindow {
            window: window as u64,
            outstanding: window as u64,
            unreturned: 0,
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
    /// window has accumulated.
    pub fn release(&mut self, cost: u64) -> Option<u32> {
        self.unreturned += cost;
        if self.unreturned * 2 < self.window {
            return None;
        }
        let increment = self.unreturned;
        self.unreturned = 0;
        self.outstanding += increment;
        Some(increment as u32)
    }

    /// Bytes received and not yet consumed: what this window makes us hold.
    pub fn buffered(&self) -> u64 {
        self.window - self.outstanding - self.unreturned
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
}
