//! The receiving direction: what a data receiver accepts, and how its credit goes back.
//!
//! Every DATA or HOLE frame is charged to the connection window before anything else (a frame
//! for a stream we dropped spent credit too), then to its stream's window. Content must arrive
//! in order and inside the stream's size; a sender that breaks that harms only its own stream,
//! which is aborted before the sink sees the chunk. Credit goes back as the sink finishes
//! chunks ([`RecvSide::release`]), never before.

use super::config::Config;
use super::connection::Connection;
use super::error::ConnError;
use super::event::Event;
use super::flow::{RecvWindow, HOLE_COST};
use super::frame::{self, Features, Frame, StreamId};
use super::stream::{Half, Stream};
use crate::reason::Reason;
use crate::volume::Chunk;
use bytes::{Bytes, BytesMut};
use std::time::{Duration, Instant};

/// What the connection does with a frame the rules let through.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Hand the chunk to the stream's sink.
    Deliver(Chunk),
    /// Abort the stream (the peer's fault, the connection goes on) with this message.
    Abort(String),
}

/// The connection window, and the memory budget windows grow within.
#[derive(Debug)]
pub(crate) struct RecvSide {
    /// The connection window we granted the peer.
    window: RecvWindow,
    max_window: u64,
    max_stream_window: u64,
    /// How far the windows of receiving streams have grown past `stream_window`, together,
    /// and how far they may.
    stream_growth: u64,
    growth_budget: u64,
    peak_buffered: u64,
    peak_window: u64,
}

impl RecvSide {
    pub fn new(config: &Config) -> Self {
        RecvSide {
            window: RecvWindow::new(config.conn_window),
            max_window: config.max_conn_window as u64,
            max_stream_window: config.max_stream_window as u64,
            stream_growth: 0,
            growth_budget: config.max_conn_window as u64 / 2,
            peak_buffered: 0,
            peak_window: config.conn_window as u64,
        }
    }

    /// Credit-bearing bytes received and not yet consumed by sinks, over all streams.
    pub fn buffered(&self) -> u64 {
        self.window.buffered()
    }

    /// Connection credit the peer may still spend.
    #[cfg(feature = "test-support")]
    pub fn outstanding(&self) -> u64 {
        self.window.outstanding()
    }

    /// (now, at most) of what `buffered` counts, and of the connection window's size.
    pub fn peaks(&self) -> (u64, u64, u64) {
        (self.peak_buffered, self.window.size(), self.peak_window)
    }

    /// Charges a DATA or HOLE frame of `cost` to the connection window.
    pub fn charge(&mut self, id: StreamId, cost: u64) -> Result<(), ConnError> {
        self.window.receive(cost).map_err(|e| {
            ConnError::FlowControl(format!(
                "{id} sent {} credit with {} left on the connection",
                e.cost, e.outstanding
            ))
        })?;
        self.peak_buffered = self.peak_buffered.max(self.window.buffered());
        Ok(())
    }

    /// A DATA or HOLE frame for a live stream, already charged to the connection.
    pub fn on_content(
        &mut self,
        stream: &mut Stream,
        offset: u64,
        len: u64,
        cost: u64,
        chunk: Chunk,
    ) -> Result<Verdict, ConnError> {
        let (id, size, open) = (stream.id, stream.size, stream.is_open());
        let (Half::Recv(recv), true) = (&mut stream.half, open) else {
            return Err(ConnError::Protocol(format!(
                "DATA/HOLE for {id}, which is not receiving"
            )));
        };
        recv.window.receive(cost).map_err(|e| {
            ConnError::FlowControl(format!(
                "{id} sent {} credit with {} left on the stream",
                e.cost, e.outstanding
            ))
        })?;
        recv.unconsumed.push_back(cost);
        let buffered = recv.window.buffered();
        stream.progress += 1;
        let stats = &mut stream.stats;
        stats.peak_buffered = stats.peak_buffered.max(buffered);
        stats.window = recv.window.size();
        stats.peak_window = stats.peak_window.max(stats.window);
        match &chunk {
            Chunk::Data { .. } => {
                stats.wire_bytes += (frame::DATA_OVERHEAD as u64) + len;
                stats.data_bytes += len;
                stats.data_frames += 1;
            }
            _ => {
                stats.wire_bytes += frame::HOLE_LEN as u64;
                stats.hole_bytes += len;
                stats.hole_frames += 1;
            }
        }
        let expected = recv.cursor.next();
        if !recv.cursor.take(offset, len, size) {
            // `cost` is already in `unconsumed`, which goes back to the connection window when
            // the aborted stream leaves the store.
            let outside = if stream.ranges.is_some() {
                "outside the ranges asked for"
            } else {
                "past the end"
            };
            return Ok(Verdict::Abort(format!(
                "chunk at {offset}+{len} out of order or {outside} (expected offset {expected}, size {size})"
            )));
        }
        Ok(Verdict::Deliver(chunk))
    }

    /// The data sender's FINISH (not the acknowledgement): the sink gets the `End` chunk once
    /// all content arrived.
    pub fn on_finish(
        &mut self,
        stream: &mut Stream,
        length: u64,
        digest: Option<u32>,
    ) -> Result<Verdict, ConnError> {
        let (id, size, open) = (stream.id, stream.size, stream.is_open());
        let (Half::Recv(recv), true) = (&mut stream.half, open) else {
            return Err(ConnError::Protocol(format!(
                "FINISH for {id}, which is not receiving"
            )));
        };
        if length != size || !recv.cursor.is_done(size) {
            let message = format!(
                "FINISH at {length} but {} arrived (size {size})",
                recv.cursor.describe(size)
            );
            return Ok(Verdict::Abort(message));
        }
        stream.recv_finish().expect("an open stream may finish");
        Ok(Verdict::Deliver(Chunk::End { length, digest }))
    }

    /// The sink finished `chunks` more chunks: their credit goes back to the stream and the
    /// connection (as WINDOW frames into `control`, once half a window has accumulated), and
    /// both windows size themselves to the round trip `rtt` and the sink's pace.
    pub fn release(
        &mut self,
        stream: &mut Stream,
        chunks: u64,
        now: Instant,
        rtt: Option<Duration>,
        control: &mut BytesMut,
    ) {
        stream.progress += 1;
        let id = stream.id;
        let Half::Recv(recv) = &mut stream.half else {
            return;
        };
        let mut cost = 0;
        for _ in 0..chunks {
            match recv.unconsumed.pop_front() {
                Some(c) => cost += c,
                None => break,
            }
        }
        if cost == 0 {
            return;
        }
        let before = recv.window.grown();
        let spare = self.growth_budget.saturating_sub(self.stream_growth);
        let cap = self.max_stream_window.min(recv.window.size() + spare);
        if let Some(increment) = recv.window.release_at(cost, now, rtt, cap) {
            Frame::Window {
                stream: id,
                increment,
            }
            .encode(control);
        }
        self.stream_growth = self.stream_growth + recv.window.grown() - before;
        let stats = &mut stream.stats;
        stats.window = recv.window.size();
        stats.peak_window = stats.peak_window.max(stats.window);
        if let Some(increment) = self.window.release_at(cost, now, rtt, self.max_window) {
            Frame::Window {
                stream: StreamId::CONNECTION,
                increment,
            }
            .encode(control);
        }
        self.peak_window = self.peak_window.max(self.window.size());
    }

    /// Connection credit consumed without a stream to account it to.
    pub fn release_connection(&mut self, cost: u64, control: &mut BytesMut) {
        if let Some(increment) = self.window.release(cost) {
            Frame::Window {
                stream: StreamId::CONNECTION,
                increment,
            }
            .encode(control);
        }
    }

    /// A stream left the store: credit its sink never consumed still belongs to the connection
    /// window.
    pub fn forget(&mut self, stream: &Stream, control: &mut BytesMut) {
        if let Half::Recv(recv) = &stream.half {
            self.stream_growth -= recv.window.grown();
            let held: u64 = recv.unconsumed.iter().sum();
            if held > 0 {
                self.release_connection(held, control);
            }
        }
    }
}

impl Connection {
    pub(super) fn on_data(
        &mut self,
        id: StreamId,
        offset: u64,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        let len = payload.len() as u64;
        let chunk = Chunk::Data {
            offset,
            bytes: payload,
        };
        self.on_content(id, offset, len, len, chunk)
    }

    pub(super) fn on_hole(&mut self, id: StreamId, offset: u64, len: u64) -> Result<(), ConnError> {
        if !self.features().contains(Features::SPARSE) {
            return Err(ConnError::Protocol(
                "HOLE frame although SPARSE was not negotiated".into(),
            ));
        }
        self.on_content(id, offset, len, HOLE_COST, Chunk::Hole { offset, len })
    }

    fn on_content(
        &mut self,
        id: StreamId,
        offset: u64,
        len: u64,
        cost: u64,
        chunk: Chunk,
    ) -> Result<(), ConnError> {
        self.recv.charge(id, cost)?;
        let Some(key) = self.lookup(id, "DATA/HOLE")? else {
            self.recv.release_connection(cost, &mut self.control);
            return Ok(());
        };
        match chunk {
            Chunk::Data { .. } => self.stats.data_bytes_in += len,
            _ => self.stats.hole_bytes_in += len,
        }
        let verdict = self
            .recv
            .on_content(&mut self.store[key], offset, len, cost, chunk)?;
        self.deliver(id, verdict);
        Ok(())
    }

    pub(super) fn on_finish(
        &mut self,
        id: StreamId,
        length: u64,
        digest: Option<u32>,
        ack: bool,
    ) -> Result<(), ConnError> {
        let Some(key) = self.lookup(id, "FINISH")? else {
            return Ok(());
        };
        if ack {
            if self.store[key].recv_ack().is_err() {
                return Err(ConnError::Protocol(format!(
                    "FINISH acknowledgement for {id} before its FINISH"
                )));
            }
            self.end_completed(key);
            return Ok(());
        }
        let digest = digest.filter(|_| self.features().contains(Features::DIGEST));
        let verdict = self.recv.on_finish(&mut self.store[key], length, digest)?;
        self.deliver(id, verdict);
        Ok(())
    }

    fn deliver(&mut self, id: StreamId, verdict: Verdict) {
        match verdict {
            Verdict::Deliver(chunk) => self.events.push_back(Event::Chunk { stream: id, chunk }),
            Verdict::Abort(message) => self.abort(id, Reason::Protocol, &message),
        }
    }

    /// The sink of a receiving stream finished `chunks` more chunks; their credit goes back.
    pub fn release(&mut self, id: StreamId, chunks: u64, now: Instant) {
        if let Some(key) = self.store.find(id) {
            let rtt = self.stats.min_rtt;
            self.recv
                .release(&mut self.store[key], chunks, now, rtt, &mut self.control);
        }
    }

    /// The sink verified and committed a stream that reached `Chunk::End`.
    pub fn stream_verified(&mut self, id: StreamId) {
        let Some(key) = self.store.find(id) else {
            return;
        };
        let stream = &self.store[key];
        if stream.verified().is_err() {
            return;
        }
        Frame::Finish {
            stream: id,
            length: stream.size,
            digest: None,
            ack: true,
        }
        .encode(&mut self.control);
        self.end_completed(key);
    }
}
