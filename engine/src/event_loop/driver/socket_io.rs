//! The socket side of a connection: reading into the protocol state (within a budget per
//! turn, with a check for a TLS peer on a plain connection), and writing its transmit queue out
//! with writev, control frames first when input just produced them.

use super::Driver;
use crate::event_loop::tls::looks_like_tls;
use crate::event_loop::transport::TlsFailure;
use crate::proto::{ConnError, Transmit};
use std::io::{self, IoSlice};
use std::time::Instant;

/// Bytes kept queued for the socket; below this, more frames are scheduled. Small, so a frame
/// for an interactive stream never waits behind a deep local queue. With the streams'
/// `send_buffer`s and the connection's `control_backlog` it bounds what a peer that stops
/// reading makes us hold.
pub const TRANSMIT_TARGET: usize = 256 * 1024;
/// The same while an interactive stream is active: two of its frame size, so the socket never
/// runs dry between writes while an interactive frame waits behind little.
pub const INTERACTIVE_TRANSMIT_TARGET: usize = 64 * 1024;
/// Bytes read, and bytes written, per connection per turn before the loop looks at wake-ups
/// and other connections again. Without it a peer that reads as fast as we write would keep
/// the loop in one writev loop and starve every source's notification.
const READ_BUDGET: usize = 1024 * 1024;
const WRITE_BUDGET: usize = 1024 * 1024;
/// Most segments handed to one writev.
const IOV_MAX: usize = 64;

impl Driver {
    /// Reads what the socket has (up to a budget) and processes it.
    pub fn on_readable(&mut self, now: Instant) {
        self.read_pending = false;
        if self.conn.is_input_paused() && self.conn.input_room() > 0 {
            // Frames read earlier and left unprocessed come before anything new.
            self.conn.handle_input(now);
            self.drain_events(now);
        }
        let mut budget = READ_BUDGET;
        loop {
            let room = self.conn.input_room();
            if room == 0 {
                self.input_stalled = !self.conn.is_closed();
                return;
            }
            match self.transport.read_into(self.conn.input_buffer(), room) {
                Ok(0) => {
                    self.conn.handle_eof();
                    break;
                }
                Ok(n) => {
                    if !self.sniffed && self.conn.input_buffer().len() >= 3 {
                        self.sniffed = true;
                        if looks_like_tls(self.conn.input_buffer()) {
                            let message = "the peer speaks TLS but this connection is plain (use a tls: address on both sides)";
                            self.conn.close(ConnError::Tls(message.into()));
                            break;
                        }
                    }
                    self.conn.record_bytes_in(n);
                    self.conn.handle_input(now);
                    self.send_control(now);
                    self.drain_events(now);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.read_pending = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail_io(e);
                    break;
                }
            }
        }
        self.drain_events(now);
        // PONGs arrive with input; each may shorten the smallest round trip, which bounds
        // the receive buffer, or raise the estimate of the path, which may grow it.
        if let Some(rtt) = self.conn.min_rtt() {
            if self.bounded_at.is_none_or(|at| rtt < at) {
                self.bounded_at = Some(rtt);
                self.receive_bounded |= self.transport.socket.bound_receive_queue(rtt);
            }
        }
        if let Some(bytes) = self.conn.poll_buffer_hint() {
            self.transport
                .socket
                .fit_buffers(bytes, self.receive_bounded);
        }
    }

    /// Ends the connection for a transport failure: TLS (with the reason, to both users) or
    /// the socket's.
    fn fail_io(&mut self, e: io::Error) {
        match TlsFailure::of(&e) {
            Some(message) => {
                // A server's operator needs the line; a client's user gets it in the error.
                if self.provider.is_some() {
                    log::warn!("{}: {message}", self.peer);
                } else {
                    log::info!("{}: {message}", self.peer);
                }
                self.conn.close(ConnError::Tls(message.to_owned()));
            }
            None => self.conn.handle_io_error(e.to_string()),
        }
    }

    pub fn on_writable(&mut self) {
        self.writable = true;
    }

    /// Writes as much as the socket takes, scheduling frames as room appears.
    pub fn flush(&mut self, now: Instant) {
        self.write_pending = false;
        let mut budget = WRITE_BUDGET;
        loop {
            let target = if self.conn.is_interactive(now) {
                INTERACTIVE_TRANSMIT_TARGET
            } else {
                TRANSMIT_TARGET
            };
            if self.out.len() < target {
                self.conn.poll_transmit(now, &mut self.out, target);
                // Scheduling may free room in stream queues (Writable) or abort streams.
                self.drain_events(now);
            }
            if !self.write_once(now, &mut budget) {
                break;
            }
            // A source's wake-up (an interactive stream's next message) is served at the next
            // turn: ending the burst here bounds its wait to one write, not the whole budget
            // and the work of every source the burst made writable.
            if self.shared.has_pending() {
                self.write_pending = true;
                break;
            }
        }
        if self.input_stalled && self.conn.input_room() > 0 {
            self.input_stalled = false;
            self.read_pending = true;
        }
        let stuck = !self.writable || !self.transport.accepts_plaintext();
        if self.conn.is_closed() && (self.out.is_empty() || stuck) {
            // What could be written of a final GOAWAY (or TLS alert) was written; the peer
            // learns the rest from the close.
            self.drain_events(now);
            if !self.finished {
                self.transport.close();
            }
            self.finished = true;
        }
    }

    /// Sends the control frames that input just produced (a PONG above all) before the events
    /// that input also produced are handled: opening volumes for a batch of OPENs can keep the
    /// loop for milliseconds, and a PONG held behind that makes the peer's round trip, which
    /// sizes its windows, look longer than the path. One write; what the socket does not take
    /// goes with the next flush. Only while the transmit queue has room, as in `flush`: a peer
    /// that sends PINGs and reads nothing fills the connection's control backlog, which pauses
    /// its input, rather than our queue. Not while that backlog holds input paused, either:
    /// `flush` drains it and resumes reading (edge-triggered readiness will not).
    fn send_control(&mut self, now: Instant) {
        if self.writable
            && !self.conn.is_input_paused()
            && self.out.len() < TRANSMIT_TARGET
            && self.conn.poll_control(&mut self.out)
        {
            let mut budget = WRITE_BUDGET;
            self.write_once(now, &mut budget);
        }
    }

    /// One write of the transmit queue (TLS records first). False once nothing more can be
    /// written now: the socket is full, the queue is empty, the budget is spent or the
    /// connection failed.
    fn write_once(&mut self, now: Instant, budget: &mut usize) -> bool {
        if !self.writable {
            return false;
        }
        // TLS records of the handshake or alerts go out even with no frames to send.
        match self.transport.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.writable = false;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                self.fail_io(e);
                self.drain_events(now);
                self.out = Transmit::default();
                return false;
            }
        }
        if self.out.is_empty() || !self.transport.accepts_plaintext() {
            return false;
        }
        if *budget == 0 {
            self.write_pending = true;
            return false;
        }
        let mut slices = [IoSlice::new(&[]); IOV_MAX];
        let n = self.out.io_slices(&mut slices);
        match self.transport.write_vectored(&slices[..n]) {
            Ok(written) => {
                self.out.advance(written);
                *budget = budget.saturating_sub(written);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.writable = false;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                self.fail_io(e);
                self.drain_events(now);
                self.out = Transmit::default();
                false
            }
        }
    }

    /// Bytes this connection holds for the peer: its transmit queue, control backlog and the
    /// streams' send queues.
    pub fn send_queued(&self) -> u64 {
        (self.out.len() + self.transport.queued()) as u64 + self.conn.stats().send_queued
    }

    /// The socket reported an error condition.
    pub fn on_error(&mut self, now: Instant) {
        let message = match self.transport.socket.take_error() {
            Ok(Some(e)) => e.to_string(),
            Ok(None) => return,
            Err(e) => e.to_string(),
        };
        self.conn.handle_io_error(message);
        self.drain_events(now);
    }
}
