//! The input side of a connection: the bounded buffer the driver reads socket bytes into,
//! frame decoding, the pause while the control backlog is full (a peer that sends faster than
//! it reads our answers is not buffered for without bound), and the frame clock that fails a
//! frame whose first bytes came but whose rest does not (slowloris).

use super::connection::{Connection, Phase};
use super::error::ConnError;
use super::frame::{self, Frame};
use super::timers::Timer;
use bytes::BytesMut;
use std::time::Instant;

impl Connection {
    /// Where the driver reads socket bytes to. Reading at most `input_room` bytes into it keeps
    /// the buffer bounded by one maximal frame plus one read.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// How many more bytes the driver should read now. Zero while the connection is closed,
    /// and while the control backlog is full: the driver must then try again after it sent
    /// something, and call `handle_input` even if nothing new was read (see
    /// [`Connection::is_input_paused`]).
    pub fn input_room(&self) -> usize {
        if self.phase == Phase::Closed || self.backlog_full() {
            return 0;
        }
        let cap = self.config.max_frame as usize + frame::HEADER_LEN + 64 * 1024;
        cap.saturating_sub(self.input.len())
    }

    /// Processes everything in the input buffer, or as much as the control backlog allows.
    pub fn handle_input(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            self.input.clear();
            return;
        }
        if let Err(error) = self.process_input(now) {
            self.fail(error);
        }
    }

    /// Complete frames may be waiting in the input buffer, unprocessed because the control
    /// backlog was full: once `input_room` is non-zero again, call `handle_input`.
    pub fn is_input_paused(&self) -> bool {
        self.input_paused
    }

    fn backlog_full(&self) -> bool {
        self.control.len() >= self.config.control_backlog as usize
    }

    /// Counts bytes read from the socket (statistics only).
    pub fn record_bytes_in(&mut self, n: usize) {
        self.stats.bytes_in += n as u64;
    }

    fn process_input(&mut self, now: Instant) -> Result<(), ConnError> {
        if self.phase == Phase::Handshake {
            self.read_peer_hello(now)?;
        }
        // A pause is ours, not the peer's: the frame clock restarts when processing resumes.
        let mut progressed = std::mem::take(&mut self.input_paused);
        while self.phase == Phase::Open {
            if self.backlog_full() {
                self.input_paused = true;
                break;
            }
            match Frame::decode(&mut self.input, self.config.max_frame)? {
                Some(frame) => {
                    self.stats.frames_in.record(frame.kind());
                    self.heard(now);
                    progressed = true;
                    self.handle_frame(frame, now)?;
                }
                None => break,
            }
        }
        // The frame clock runs while the buffer holds the start of a frame that is not complete,
        // from when the last complete one was taken (or the first bytes came).
        let partial = self.phase == Phase::Open && !self.input.is_empty() && !self.input_paused;
        if !partial {
            self.timers.stop(Timer::Frame);
        } else if progressed || !self.timers.is_armed(Timer::Frame) {
            let deadline = now + self.config.frame_timeout;
            self.timers.set(Timer::Frame, deadline);
        }
        Ok(())
    }
}
