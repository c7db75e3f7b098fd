//! The handshake: each side sends its `Hello` at once, then checks the peer's and agrees on a
//! version and features (docs/PROTOCOL.md section 3).

use super::config::Config;
use super::connection::{Connection, Phase};
use super::error::{ConnError, DecodeError};
use super::event::Event;
use super::flow::HOLE_COST;
use super::frame::{self, Features, Hello, HELLO_LEN, MIN_MAX_FRAME, VERSION_MAX, VERSION_MIN};
use super::timers::Timer;
use bytes::{Buf, BytesMut};
use std::time::Instant;

/// What both sides use once the handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    pub version: u16,
    pub features: Features,
}

/// Our Hello: the versions we speak and the limits we enforce as a receiver.
pub(crate) fn hello(config: &Config) -> Hello {
    Hello {
        version_min: VERSION_MIN,
        version_max: VERSION_MAX,
        features: config.features,
        max_frame: config.max_frame,
        stream_window: config.stream_window,
        conn_window: config.conn_window,
        max_streams: config.max_streams,
    }
}

/// Takes the peer's Hello off the front of `input` once all of it is there. A peer that is not
/// speaking volstream is refused as soon as its first bytes disagree with the magic.
fn read_hello(input: &mut BytesMut) -> Result<Option<Hello>, ConnError> {
    if input.len() < HELLO_LEN {
        let seen = input.len().min(frame::MAGIC.len());
        if input[..seen] != frame::MAGIC[..seen] {
            return Err(DecodeError::BadMagic.into());
        }
        return Ok(None);
    }
    let bytes: [u8; HELLO_LEN] = input[..HELLO_LEN].try_into().expect("HELLO_LEN bytes");
    input.advance(HELLO_LEN);
    Ok(Some(Hello::decode(&bytes)?))
}

/// Checks the peer's Hello against what we speak and need.
fn agree(config: &Config, peer: &Hello) -> Result<Agreed, ConnError> {
    let version = VERSION_MAX.min(peer.version_max);
    if peer.version_min > peer.version_max || version < VERSION_MIN.max(peer.version_min) {
        return Err(ConnError::Handshake(format!(
            "peer speaks protocol versions {}..={}, we speak {}..={}",
            peer.version_min, peer.version_max, VERSION_MIN, VERSION_MAX
        )));
    }
    if peer.max_frame < MIN_MAX_FRAME {
        return Err(ConnError::Handshake(format!(
            "peer's max frame {} is below the minimum {}",
            peer.max_frame, MIN_MAX_FRAME
        )));
    }
    if (peer.stream_window as u64) < 2 * HOLE_COST || peer.conn_window < peer.stream_window {
        return Err(ConnError::Handshake(format!(
            "peer's windows (stream {}, connection {}) are too small",
            peer.stream_window, peer.conn_window
        )));
    }
    Ok(Agreed {
        version,
        features: config.features.intersect(peer.features),
    })
}

impl Connection {
    /// Takes the peer's Hello from the input once all of it is there; the connection is open
    /// when the two sides agree.
    pub(super) fn read_peer_hello(&mut self, now: Instant) -> Result<(), ConnError> {
        let Some(peer) = read_hello(&mut self.input)? else {
            return Ok(());
        };
        let agreed = agree(&self.config, &peer)?;
        self.counts.set_local_max(peer.max_streams);
        self.send.connected(&peer, &self.config);
        self.agreed = Some(agreed);
        self.peer = Some(peer);
        self.phase = Phase::Open;
        self.timers.stop(Timer::Handshake);
        self.heard(now);
        // The first round trip is measured at once, ahead of any OPEN: nothing else is in
        // flight, so it measures the path and not a queue (see `timers`).
        self.ping(now);
        self.timers
            .set(Timer::RttProbe, now + self.config.rtt_interval);
        log::debug!(
            "{:?} handshake done: version {}, features {:#x}",
            self.side,
            agreed.version,
            agreed.features.0
        );
        self.events.push_back(Event::Connected {
            version: agreed.version,
            features: agreed.features,
        });
        Ok(())
    }
}
