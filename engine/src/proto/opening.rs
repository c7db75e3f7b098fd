//! How streams begin, from either side: OPEN, then ACCEPT or REJECT (docs/PROTOCOL.md 6.1).
//! The opener numbers the stream and counts it against the peer's limit; the acceptor counts it
//! against its own and asks its driver, which answers with `accept` or `reject`.

use super::connection::{Connection, Phase};
use super::error::ConnError;
use super::event::{Event, OpenError};
use super::frame::{self, Features, Frame, Op, OpenOptions, StreamId};
use super::stream::Stream;
use crate::reason::Reason;

impl Connection {
    pub(super) fn on_open(
        &mut self,
        id: StreamId,
        op: Op,
        options: OpenOptions,
        size: u64,
        name: String,
    ) -> Result<(), ConnError> {
        self.counts.peer_opens(id)?;
        if options.priority() && !self.features().contains(Features::PRIORITY) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} asks for the priority class, which was not negotiated"
            )));
        }
        if options.verify() && !self.features().contains(Features::VERIFY) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} asks for verification, which was not negotiated"
            )));
        }
        if options.qcow2() && !self.features().contains(Features::QCOW2) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} asks for a qcow2 image, which was not negotiated"
            )));
        }
        if self.sent_goaway {
            Frame::Reject {
                stream: id,
                reason: Reason::GoingAway,
                message: "connection is going away".into(),
            }
            .encode(&mut self.control);
            return Ok(());
        }
        self.counts.admit_peer()?;
        let window = self.config.stream_window;
        self.insert(Stream::requested(id, op, options, size, window));
        self.events.push_back(Event::OpenRequested {
            stream: id,
            op,
            name,
            options,
            size,
        });
        Ok(())
    }

    pub(super) fn on_accept(&mut self, id: StreamId, size: u64) -> Result<(), ConnError> {
        let Some(key) = self.lookup(id, "ACCEPT")? else {
            return Ok(());
        };
        let stream = &mut self.store[key];
        if stream.recv_accept().is_err() {
            return Err(ConnError::Protocol(format!("second ACCEPT for {id}")));
        }
        if stream.op == Op::Write && size != stream.size {
            let message = format!(
                "peer accepted {} bytes for a {}-byte upload",
                size, stream.size
            );
            self.abort(id, Reason::Protocol, &message);
            return Ok(());
        }
        stream.size = size;
        stream.progress += 1;
        self.events.push_back(Event::Accepted { stream: id, size });
        self.send.prioritize.schedule(key, stream);
        Ok(())
    }

    pub(super) fn on_reject(
        &mut self,
        id: StreamId,
        reason: Reason,
        message: String,
    ) -> Result<(), ConnError> {
        let Some(key) = self.lookup(id, "REJECT")? else {
            return Ok(());
        };
        if self.store[key].recv_reject().is_err() {
            return Err(ConnError::Protocol(format!(
                "REJECT for {id}, which was already accepted"
            )));
        }
        self.remove(key);
        self.count_failed(reason);
        self.events.push_back(Event::Rejected {
            stream: id,
            reason,
            message,
        });
        Ok(())
    }

    /// Opens a stream towards the peer. For `Op::Write`, `size` is the content's length.
    pub fn open_stream(
        &mut self,
        op: Op,
        name: &str,
        options: OpenOptions,
        size: u64,
    ) -> Result<StreamId, OpenError> {
        match self.phase {
            Phase::Handshake => return Err(OpenError::NotReady),
            Phase::Closed => return Err(OpenError::GoingAway),
            Phase::Open => {}
        }
        if self.sent_goaway || self.peer_goaway {
            return Err(OpenError::GoingAway);
        }
        if name.is_empty() != (op == Op::List) || name.len() > frame::MAX_NAME_LEN {
            return Err(OpenError::InvalidName);
        }
        // Unlike the class, a check that was asked for cannot quietly not happen.
        if options.verify() && !self.features().contains(Features::VERIFY) {
            return Err(OpenError::Unsupported);
        }
        if options.qcow2() && !self.features().contains(Features::QCOW2) {
            return Err(OpenError::Unsupported);
        }
        let id = self.counts.open_local()?;
        // The class is a request of ours: a peer that does not know it serves the stream as bulk.
        let options = options
            .with_priority(options.priority() && self.features().contains(Features::PRIORITY));
        let mut stream = Stream::opened(id, op, options, size, self.config.stream_window);
        self.send
            .init(&mut stream, self.features(), self.peer_stream_window());
        self.insert(stream);
        Frame::Open {
            stream: id,
            op,
            options,
            size,
            name: name.to_owned(),
        }
        .encode(&mut self.control);
        Ok(id)
    }

    /// The credit the peer grants each stream we send on.
    fn peer_stream_window(&self) -> u32 {
        self.peer.map_or(0, |p| p.stream_window)
    }

    /// Accepts a stream the peer asked for. For a read, `size` is the volume's length.
    pub fn accept(&mut self, id: StreamId, size: u64) {
        let Some(key) = self.store.find(id) else {
            return;
        };
        let (features, window) = (self.features(), self.peer_stream_window());
        let stream = &mut self.store[key];
        if stream.accept().is_err() {
            return;
        }
        if stream.op.peer_sends() {
            stream.size = size;
            self.send.init(stream, features, window);
        }
        Frame::Accept {
            stream: id,
            size: stream.size,
        }
        .encode(&mut self.control);
        self.send.prioritize.schedule(key, stream);
    }

    /// Refuses a stream the peer asked for.
    pub fn reject(&mut self, id: StreamId, reason: Reason, message: &str) {
        let Some(key) = self.store.find(id) else {
            return;
        };
        if self.store[key].reject().is_err() {
            return self.abort(id, reason, message);
        }
        Frame::Reject {
            stream: id,
            reason,
            message: message.to_owned(),
        }
        .encode(&mut self.control);
        self.remove(key);
        self.count_failed(reason);
        self.close_if_drained();
    }
}
