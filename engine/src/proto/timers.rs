//! Every deadline of a connection in one table indexed by what it is for, so the next wake-up
//! is one minimum and each deadline is armed and stopped where its cause changes.
//!
//! - `Handshake`: the peer's Hello must arrive in time (armed at creation, stopped by the Hello).
//! - `Idle`: the last complete frame from the peer must be recent.
//! - `Keepalive`: when to send PING; stopped while one is unanswered.
//! - `Frame`: a frame whose first bytes arrived must complete in time (slowloris).
//! - `StreamCheck`: when to look for streams that stopped making progress; counts only while
//!   there are streams.
//! - `RttProbe`: when to PING again to measure the round trip the windows size themselves
//!   with. The first PING goes out with the handshake, while nothing else is in flight, so it
//!   measures the path and not a queue; later ones only while there are streams (or until
//!   a first answer came).

use super::connection::{Connection, Phase};
use super::error::ConnError;
use super::frame::{Frame, StreamId};
use super::store::Store;
use crate::reason::Reason;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    Handshake,
    Idle,
    Keepalive,
    Frame,
    StreamCheck,
    RttProbe,
}

impl Timer {
    const COUNT: usize = 6;

    /// Deadlines that only matter while the connection has streams.
    fn needs_streams(i: usize) -> bool {
        i == Timer::StreamCheck as usize || i == Timer::RttProbe as usize
    }

    /// Deadlines that matter in any case (the RTT probe: until the first sample).
    fn wanted(i: usize, has_streams: bool, probe_anyway: bool) -> bool {
        has_streams || !Timer::needs_streams(i) || (probe_anyway && i == Timer::RttProbe as usize)
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Timers {
    at: [Option<Instant>; Timer::COUNT],
}

impl Timers {
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.at[timer as usize] = Some(at);
    }

    pub fn stop(&mut self, timer: Timer) {
        self.at[timer as usize] = None;
    }

    pub fn stop_all(&mut self) {
        self.at = [None; Timer::COUNT];
    }

    pub fn is_armed(&self, timer: Timer) -> bool {
        self.at[timer as usize].is_some()
    }

    pub fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.at[timer as usize].is_some_and(|at| at <= now)
    }

    /// The earliest armed deadline; the stream check and the RTT probe only when there are
    /// streams, or the probe also without them when `probe_anyway`.
    pub fn next(&self, has_streams: bool, probe_anyway: bool) -> Option<Instant> {
        self.at
            .iter()
            .enumerate()
            .filter(|&(i, _)| Timer::wanted(i, has_streams, probe_anyway))
            .filter_map(|(_, at)| *at)
            .min()
    }
}

impl Connection {
    /// The answer to our PING: the round trip is measured, and keepalive may go on.
    pub(super) fn on_pong(&mut self, data: u64, now: Instant) {
        if let Some((sent_data, at)) = self.ping_sent {
            if sent_data == data {
                let rtt = now.saturating_duration_since(at);
                self.stats.rtt = Some(rtt);
                // The smallest sample is the path's own delay; bigger ones waited in queues
                // (ours, the peer's, the network's) that a larger window would only fill.
                self.stats.min_rtt = Some(self.stats.min_rtt.map_or(rtt, |m| m.min(rtt)));
                self.estimate_path(now);
                self.ping_sent = None;
                let next = now + self.config.keepalive_interval;
                self.timers.set(Timer::Keepalive, next);
            }
        }
    }

    /// Bytes moved each way since the previous PONG, per smallest round trip.
    fn estimate_path(&mut self, now: Instant) {
        let moved = self.stats.bytes_in + self.stats.bytes_out;
        if let (Some((at, before)), Some(rtt)) = (self.rate_mark, self.stats.min_rtt) {
            let interval = now.saturating_duration_since(at).as_nanos().max(1);
            let bdp = (moved - before) as u128 * rtt.as_nanos() / interval;
            self.stats.path_bdp = bdp.min(u64::MAX as u128) as u64;
            self.buffer_hint = self.buffer_hint.max(self.stats.path_bdp);
        }
        self.rate_mark = Some((now, moved));
    }

    /// A complete frame (or the Hello) arrived: the peer is alive.
    pub(super) fn heard(&mut self, now: Instant) {
        self.timers.set(Timer::Idle, now + self.config.idle_timeout);
        if self.ping_sent.is_none() {
            self.timers
                .set(Timer::Keepalive, now + self.config.keepalive_interval);
        }
    }

    /// Sends PING when the peer has been quiet for the keepalive interval.
    pub(super) fn keepalive(&mut self, now: Instant) {
        if self.timers.is_expired(Timer::Keepalive, now) {
            self.ping(now);
        }
    }

    /// Sends a PING now (the answer's round trip lands in `stats().rtt`).
    pub fn ping(&mut self, now: Instant) {
        if self.phase == Phase::Open && self.ping_sent.is_none() {
            self.ping_counter += 1;
            Frame::Ping {
                data: self.ping_counter,
            }
            .encode(&mut self.control);
            self.ping_sent = Some((self.ping_counter, now));
            self.timers.stop(Timer::Keepalive);
        }
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers
            .next(!self.store.is_empty(), self.stats.min_rtt.is_none())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let error = if self.timers.is_expired(Timer::Handshake, now) {
            ConnError::Timeout(format!(
                "no handshake within {:?}",
                self.config.handshake_timeout
            ))
        } else if self.timers.is_expired(Timer::Frame, now) {
            ConnError::Timeout(format!(
                "incomplete frame ({} of its bytes buffered) for {:?}",
                self.input.len(),
                self.config.frame_timeout
            ))
        } else if self.timers.is_expired(Timer::Idle, now) {
            ConnError::Timeout(format!(
                "nothing heard from the peer for {:?}",
                self.config.idle_timeout
            ))
        } else {
            self.keepalive(now);
            let has_streams = !self.store.is_empty();
            if self.phase == Phase::Open {
                if has_streams && self.timers.is_expired(Timer::StreamCheck, now) {
                    self.check_stalled_streams(now);
                }
                let probe = has_streams || self.stats.min_rtt.is_none();
                if probe && self.timers.is_expired(Timer::RttProbe, now) {
                    // At most one PING is outstanding; a keepalive one measures as well.
                    self.ping(now);
                    self.timers
                        .set(Timer::RttProbe, now + self.config.rtt_interval);
                }
            }
            return;
        };
        self.fail(error);
    }

    /// Aborts streams whose progress has not moved for `stream_timeout`.
    fn check_stalled_streams(&mut self, now: Instant) {
        let timeout = self.config.stream_timeout;
        let next = now + stream_check_interval(timeout);
        self.timers.set(Timer::StreamCheck, next);
        for id in stalled_streams(&mut self.store, now, timeout) {
            log::warn!("{:?} {id} made no progress for {timeout:?}", self.side);
            self.abort(id, Reason::Timeout, &format!("no progress for {timeout:?}"));
        }
    }
}

/// Looks at every stream's progress counter: a stream whose counter has not moved for
/// `timeout` is returned. The first look at a stream starts its watch.
pub(crate) fn stalled_streams(store: &mut Store, now: Instant, timeout: Duration) -> Vec<StreamId> {
    let mut stalled = Vec::new();
    for stream in store.iter_mut() {
        match stream.watch {
            Some((seen, _)) if seen != stream.progress => {
                stream.watch = Some((stream.progress, now))
            }
            Some((_, since)) if now.saturating_duration_since(since) >= timeout => {
                stalled.push(stream.id)
            }
            Some(_) => {}
            None => stream.watch = Some((stream.progress, now)),
        }
    }
    stalled
}

/// How often streams are checked for progress: a pass over the streams per interval, not per
/// turn, while a stall is still noticed within a quarter of its timeout (at most a second late).
pub(crate) fn stream_check_interval(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_the_earliest_armed_deadline() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut timers = Timers::default();
        assert_eq!(timers.next(true, false), None);
        timers.set(Timer::Idle, t0 + 3 * s);
        timers.set(Timer::StreamCheck, t0 + s);
        timers.set(Timer::Keepalive, t0 + 2 * s);
        assert_eq!(timers.next(true, false), Some(t0 + s));
        assert_eq!(
            timers.next(false, false),
            Some(t0 + 2 * s),
            "no streams to check"
        );
        timers.stop(Timer::Keepalive);
        assert_eq!(timers.next(false, false), Some(t0 + 3 * s));
        timers.set(Timer::RttProbe, t0);
        assert_eq!(
            timers.next(false, false),
            Some(t0 + 3 * s),
            "no streams to probe for"
        );
        assert_eq!(
            timers.next(false, true),
            Some(t0),
            "the first probe goes anyway"
        );
        assert!(timers.is_expired(Timer::Idle, t0 + 3 * s));
        assert!(!timers.is_expired(Timer::Keepalive, t0 + 3 * s), "stopped");
    }
}
