//! Moving content between a connection's streams and their local endpoints: a source's chunks
//! into its stream while there is room, a sink's progress back as credit and its verdict, and
//! the gates (size, ready) an endpoint passes before its stream opens.

use super::{failure, note_first_byte, Driver, Endpoint, Gate};
use crate::event_loop::Origin;
use crate::proto::StreamStats;
use crate::volume::VolumeError;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

impl Driver {
    /// Polls a local endpoint after a notification or a protocol event.
    pub fn service(&mut self, key: u64, now: Instant) {
        let Some(local) = self.locals.get_mut(&key) else {
            return;
        };
        local.armed.store(false, Ordering::Release);
        match (local.gate, &mut local.endpoint) {
            (Gate::Size, Endpoint::Reader(reader)) => match reader.poll_size() {
                Poll::Pending => {}
                Poll::Ready(Ok(size)) => {
                    local.size = size;
                    match local.stream {
                        Some(stream) => {
                            local.gate = Gate::Open;
                            let identity = reader.identity();
                            self.conn.accept(stream, size, identity);
                            self.pull(key, now);
                        }
                        None => {
                            local.gate = Gate::Accept;
                            self.waiting.push_back(key);
                            self.open_waiting(now);
                        }
                    }
                }
                Poll::Ready(Err(e)) => self.refuse(key, e, now),
            },
            (Gate::Ready, Endpoint::Writer(writer)) => match writer.poll_ready() {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    local.gate = Gate::Open;
                    let (stream, size) = (local.stream.unwrap(), local.size);
                    self.conn.accept(stream, size, None);
                    self.progress(key, now);
                }
                Poll::Ready(Err(e)) => self.refuse(key, e, now),
            },
            (Gate::Open, Endpoint::Reader(_)) => self.pull(key, now),
            (Gate::Open, Endpoint::Writer(_)) => self.progress(key, now),
            _ => {}
        }
    }

    /// A local endpoint failed before its stream was open.
    pub(super) fn refuse(&mut self, key: u64, error: VolumeError, now: Instant) {
        let stream = self.locals[&key].stream;
        match stream {
            Some(stream) if self.locals[&key].on_done.is_none() => {
                log::info!("{}: refusing {stream}: {error}", self.peer);
                self.conn.reject(stream, error.reason, &error.message);
                self.by_stream.remove(&stream);
                self.locals.remove(&key);
            }
            Some(stream) => {
                self.conn.abort(stream, error.reason, &error.message);
                if let Some(local) = self.locals.get_mut(&key) {
                    local.failure = Some(error);
                }
                self.drain_events(now);
            }
            None => {
                let error = failure(error.reason, error.message, Origin::Local);
                self.end_local(key, StreamStats::default(), Err(error), now);
            }
        }
    }

    /// Moves chunks from a reader into its stream while there is room.
    pub(super) fn pull(&mut self, key: u64, now: Instant) {
        let Some(local) = self.locals.get_mut(&key).filter(|l| l.failure.is_none()) else {
            return;
        };
        let (Some(stream), Endpoint::Reader(reader)) = (local.stream, &mut local.endpoint) else {
            return;
        };
        loop {
            if !self.conn.can_send(stream) {
                // The stream is full; a failure the source already knows need not wait until
                // the peer has taken everything queued before it.
                if let Some(e) = reader.poll_failure() {
                    log::warn!("{}: {stream} source failed: {}", self.peer, e.message);
                    self.conn.abort(stream, e.reason, &e.message);
                    local.failure = Some(e);
                }
                return;
            }
            match reader.poll_chunk() {
                Poll::Pending => return,
                Poll::Ready(Ok(chunk)) => {
                    note_first_byte(&mut local.first_byte, local.started, &chunk, now);
                    self.conn.send_chunk(stream, chunk);
                }
                Poll::Ready(Err(e)) => {
                    log::warn!("{}: {stream} source failed: {}", self.peer, e.message);
                    self.conn.abort(stream, e.reason, &e.message);
                    local.failure = Some(e);
                    return;
                }
            }
        }
    }

    /// Passes a writer's progress on: credit for finished chunks, and the verdict at the end.
    pub(super) fn progress(&mut self, key: u64, now: Instant) {
        // A failed sink's verdict stays failed; asking again would report it again for every
        // chunk that was already queued behind the failure.
        let Some(local) = self.locals.get_mut(&key).filter(|l| l.failure.is_none()) else {
            return;
        };
        let (Some(stream), Endpoint::Writer(writer)) = (local.stream, &mut local.endpoint) else {
            return;
        };
        let progress = writer.poll_progress();
        let fresh = progress.completed.saturating_sub(local.released);
        local.released = progress.completed;
        if fresh > 0 {
            self.conn.release(stream, fresh, now);
        }
        match progress.outcome {
            Some(Ok(())) => self.conn.stream_verified(stream),
            Some(Err(e)) => {
                log::warn!("{}: {stream} sink failed: {}", self.peer, e.message);
                self.conn.abort(stream, e.reason, &e.message);
                local.failure = Some(e);
            }
            None => {}
        }
    }
}
