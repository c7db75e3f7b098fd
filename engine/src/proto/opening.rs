//! How streams begin, from either side: OPEN, then ACCEPT or REJECT (docs/PROTOCOL.md 6.1).
//! The opener numbers the stream and counts it against the peer's limit; the acceptor counts it
//! against its own and asks its driver, which answers with `accept` or `reject`.

use super::connection::{Connection, Phase};
use super::error::ConnError;
use super::event::{Event, OpenError};
use super::frame::{self, Features, Frame, Op, OpenOptions, StreamId};
use super::stream::Stream;
use crate::range::{Range, RangeSet};
use crate::reason::Reason;
use crate::VolumeIdentity;
use std::sync::Arc;

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
        if options.update().is_some() && !self.features().contains(Features::UPDATE) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} asks for an update, which was not negotiated"
            )));
        }
        if options.update().is_some() && op != Op::Write {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} asks for an update of a {op:?}: only a WRITE updates"
            )));
        }
        if options.resume().is_some() && !self.features().contains(Features::RESUME) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} names a partial upload, which was not negotiated"
            )));
        }
        let resumes = op == Op::Digests || (op == Op::Write && options.update().is_some());
        if options.resume().is_some() && !resumes {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} names a partial upload for a {op:?}: only an updating WRITE or a \
                 DIGESTS does"
            )));
        }
        let ranged = options.ranges();
        if ranged && !self.features().contains(Features::RANGES) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} announces ranges, which were not negotiated"
            )));
        }
        if ranged && op != Op::Read && options.update().is_none() {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} announces ranges for a {op:?}: only a READ or an updating WRITE \
                 has ranges"
            )));
        }
        if op == Op::Digests && !self.features().contains(Features::BLOCK_DIGESTS) {
            return Err(ConnError::Protocol(format!(
                "OPEN of {id} asks for block digests, which were not negotiated"
            )));
        }
        if self.sent_goaway {
            if ranged {
                // Its RANGES frames are on their way: drop them, not the connection.
                self.store.bury(id);
            }
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
        let mut stream = Stream::requested(id, op, options, size, window);
        if ranged {
            // The driver hears of it once the list is whole (RANGES with LAST).
            stream.pending_ranges = Some((name, RangeSet::default()));
            self.insert(stream);
            return Ok(());
        }
        self.insert(stream);
        self.events.push_back(Event::OpenRequested {
            stream: id,
            op,
            name,
            options,
            size,
            ranges: None,
        });
        Ok(())
    }

    /// Part of the range list of a READ that announced one. The list is checked as it grows;
    /// a bad one refuses the stream (the connection goes on), an unasked one is a violation.
    pub(super) fn on_ranges(
        &mut self,
        id: StreamId,
        last: bool,
        ranges: Vec<Range>,
    ) -> Result<(), ConnError> {
        let Some(key) = self.lookup(id, "RANGES")? else {
            return Ok(());
        };
        let stream = &mut self.store[key];
        let Some((_, set)) = stream.pending_ranges.as_mut() else {
            return Err(ConnError::Protocol(format!(
                "RANGES for {id}, which announced none or whose list was complete"
            )));
        };
        if let Err(e) = set.extend(ranges) {
            let message = format!("bad range list: {e}");
            // Later RANGES of the list are dropped, not taken for a violation.
            self.store.bury(id);
            self.reject(id, Reason::Protocol, &message);
            return Ok(());
        }
        if !last {
            return Ok(());
        }
        let (name, set) = stream.pending_ranges.take().expect("checked above");
        if set.is_empty() {
            self.reject(id, Reason::Protocol, "bad range list: no ranges");
            return Ok(());
        }
        let set = Arc::new(set);
        stream.set_ranges(Some(Arc::clone(&set)));
        self.events.push_back(Event::OpenRequested {
            stream: id,
            op: stream.op,
            name,
            options: stream.options,
            size: stream.size,
            ranges: Some(set),
        });
        Ok(())
    }

    pub(super) fn on_accept(
        &mut self,
        id: StreamId,
        size: u64,
        identity: Option<VolumeIdentity>,
    ) -> Result<(), ConnError> {
        let features = self.features();
        let Some(key) = self.lookup(id, "ACCEPT")? else {
            return Ok(());
        };
        let stream = &mut self.store[key];
        if stream.recv_accept().is_err() {
            return Err(ConnError::Protocol(format!("second ACCEPT for {id}")));
        }
        if identity.is_some() && (stream.op != Op::Read || !features.contains(Features::IDENTITY)) {
            return Err(ConnError::Protocol(format!(
                "ACCEPT for {id} carries an identity, which only a READ between peers with \
                 feature IDENTITY may"
            )));
        }
        if stream.op == Op::Write && size != stream.size {
            let message = format!(
                "peer accepted {} bytes for a {}-byte upload",
                size, stream.size
            );
            self.abort(id, Reason::Protocol, &message);
            return Ok(());
        }
        if let Some(Err(e)) = stream.ranges.as_ref().map(|r| r.check_within(size)) {
            let message = format!("peer accepted a {size}-byte volume: {e}");
            self.abort(id, Reason::Protocol, &message);
            return Ok(());
        }
        stream.size = size;
        stream.progress += 1;
        self.events.push_back(Event::Accepted {
            stream: id,
            size,
            identity,
        });
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
        self.open_ranged(op, name, options, size, None)
    }

    /// Opens a stream, a READ of only `ranges` of the volume when given (their content arrives
    /// in order, each range whole; the FINISH digest covers them). Ranges need the RANGES
    /// feature: without it this answers `OpenError::Unsupported`, and the caller reads the
    /// whole volume or gives up.
    pub fn open_ranged(
        &mut self,
        op: Op,
        name: &str,
        options: OpenOptions,
        size: u64,
        ranges: Option<Arc<RangeSet>>,
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
        if options.update().is_some()
            && (op != Op::Write || !self.features().contains(Features::UPDATE))
        {
            return Err(OpenError::Unsupported);
        }
        if options.resume().is_some()
            && (!self.features().contains(Features::RESUME)
                || !(op == Op::Digests || (op == Op::Write && options.update().is_some())))
        {
            return Err(OpenError::Unsupported);
        }
        if let Some(set) = &ranges {
            let takes = op == Op::Read || (op == Op::Write && options.update().is_some());
            if !takes || set.is_empty() || !self.features().contains(Features::RANGES) {
                return Err(OpenError::Unsupported);
            }
        }
        if op == Op::Digests && !self.features().contains(Features::BLOCK_DIGESTS) {
            return Err(OpenError::Unsupported);
        }
        let id = self.counts.open_local()?;
        // The class is a request of ours: a peer that does not know it serves the stream as bulk.
        let options = options
            .with_priority(options.priority() && self.features().contains(Features::PRIORITY))
            .with_ranges(ranges.is_some());
        let mut stream = Stream::opened(id, op, options, size, self.config.stream_window);
        self.send
            .init(&mut stream, self.features(), self.peer_stream_window());
        stream.set_ranges(ranges.clone());
        self.insert(stream);
        Frame::Open {
            stream: id,
            op,
            options,
            size,
            name: name.to_owned(),
        }
        .encode(&mut self.control);
        if let Some(set) = ranges {
            let parts = set.ranges().chunks(crate::range::RANGES_PER_FRAME);
            let n = parts.len();
            for (i, part) in parts.enumerate() {
                Frame::Ranges {
                    stream: id,
                    last: i + 1 == n,
                    ranges: part.to_vec(),
                }
                .encode(&mut self.control);
            }
        }
        Ok(id)
    }

    /// The credit the peer grants each stream we send on.
    fn peer_stream_window(&self) -> u32 {
        self.peer.map_or(0, |p| p.stream_window)
    }

    /// Accepts a stream the peer asked for. For a read, `size` is the volume's length and
    /// `identity` its identity, sent when the peer has feature IDENTITY.
    pub fn accept(&mut self, id: StreamId, size: u64, identity: Option<VolumeIdentity>) {
        let Some(key) = self.store.find(id) else {
            return;
        };
        let (features, window) = (self.features(), self.peer_stream_window());
        let stream = &mut self.store[key];
        if let Some(Err(e)) = stream.ranges.as_ref().map(|r| r.check_within(size)) {
            let message = format!("bad range list: {e}");
            return self.reject(id, Reason::Protocol, &message);
        }
        if stream.accept().is_err() {
            return;
        }
        if stream.op.peer_sends() {
            stream.size = size;
            self.send.init(stream, features, window);
        }
        let identity =
            identity.filter(|_| stream.op == Op::Read && features.contains(Features::IDENTITY));
        Frame::Accept {
            stream: id,
            size: stream.size,
            identity,
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
