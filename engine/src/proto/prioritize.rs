//! Which stream sends the next DATA/HOLE/FINISH frame, and the connection's send credit.
//!
//! Deficit round robin in bytes, with a quantum of one full frame, over the streams that have
//! something queued and credit to send it: a bulk stream sends one frame per round, a stream of
//! small messages as many as add up to one frame. Like fq_codel (RFC 8290 §4) there are two
//! lists: a stream that becomes active after being idle joins `new_flows` and is served ahead
//! of the backlogged `old_flows` for its first round. An interactive stream that sends a little
//! now and then is therefore never behind more than the frame on the wire, however many bulk
//! streams there are.
//!
//! Unlike fq_codel, a stream that empties leaves the lists at once instead of lingering in
//! `old_flows`: fq_codel does that to stop flows gaming the new list, but here every stream is our
//! own and the latency of a stream that sends every millisecond is what matters. A bulk stream
//! that stalls on its own credit re-enters as new, which costs the others at most one frame per
//! window it was granted.
//!
//! A stream whose next frame needs more connection credit than is left is parked; when the peer
//! grants connection credit, each parked stream goes back to the list it came from, so an
//! interactive stream that had just woken up does not queue behind every bulk stream for it.

use super::flow::{CreditOverflow, SendCredit};
use super::store::{Key, Store};
use super::stream::Stream;
use super::transmit::Transmit;
use std::collections::VecDeque;

/// A stream's place in the scheduler; only this module reads or changes it.
#[derive(Debug, Default)]
pub(crate) struct Sched {
    /// In one of the lists, or parked waiting for connection credit.
    queued: bool,
    /// Bytes the stream may still send in the current round.
    deficit: i64,
}

/// What sending one frame cost: its bytes on the wire (charged to the round) and the credit it
/// spent (taken from the connection's).
pub(crate) struct Sent {
    pub wire: usize,
    pub credit: u64,
}

#[derive(Debug)]
pub(crate) struct Prioritize {
    new_flows: VecDeque<Key>,
    old_flows: VecDeque<Key>,
    /// Streams ready to send but waiting for connection credit, and whether each was a new flow.
    parked: Vec<(Key, bool)>,
    /// Connection credit the peer granted and we have not spent.
    credit: SendCredit,
}

impl Default for Prioritize {
    fn default() -> Self {
        Prioritize {
            new_flows: VecDeque::new(),
            old_flows: VecDeque::new(),
            parked: Vec::new(),
            credit: SendCredit::new(0),
        }
    }
}

impl Prioritize {
    /// The connection window the peer announced in its Hello.
    pub fn set_credit(&mut self, initial: u32) {
        self.credit = SendCredit::new(initial);
    }

    /// Connection credit left.
    #[cfg(feature = "test-support")]
    pub fn credit(&self) -> u64 {
        self.credit.available()
    }

    /// Puts a stream that has something it may send into the new flows, unless it is queued.
    pub fn schedule(&mut self, key: Key, stream: &mut Stream) {
        if !stream.sched.queued && stream.credit_needed().is_some() {
            stream.sched.queued = true;
            self.new_flows.push_back(key);
        }
    }

    /// The peer granted connection credit: parked streams go back to their lists.
    pub fn grant(&mut self, increment: u32, store: &Store) -> Result<(), CreditOverflow> {
        self.credit.grant(increment)?;
        for (key, was_new) in std::mem::take(&mut self.parked) {
            if store.get(key).is_none() {
                continue;
            }
            if was_new {
                self.new_flows.push_back(key);
            } else {
                self.old_flows.push_back(key);
            }
        }
        Ok(())
    }

    /// Whether a frame could go out now.
    pub fn wants_transmit(&self) -> bool {
        !(self.new_flows.is_empty() && self.old_flows.is_empty()) && self.credit.available() > 0
    }

    fn pop(&mut self) -> Option<(Key, bool)> {
        match self.new_flows.pop_front() {
            Some(key) => Some((key, true)),
            None => self.old_flows.pop_front().map(|key| (key, false)),
        }
    }

    /// Sends frames, one stream's round at a time, until `out` holds `limit` bytes or no stream
    /// may send. `send` puts one frame of the stream into `out` within the connection credit it
    /// is given (the stream checked it may send), and says what that cost.
    pub fn poll(
        &mut self,
        store: &mut Store,
        quantum: i64,
        out: &mut Transmit,
        limit: usize,
        mut send: impl FnMut(&mut Stream, u64, &mut Transmit) -> Sent,
    ) {
        while out.len() < limit {
            let Some((key, was_new)) = self.pop() else {
                break;
            };
            // A stream that ended while queued leaves its key behind; it resolves to nothing.
            let Some(stream) = store.get_mut(key) else {
                continue;
            };
            stream.sched.queued = false;
            stream.sched.deficit += quantum;
            let mut blocked = false;
            while let Some(need) = stream.credit_needed() {
                if need > self.credit.available() {
                    blocked = true;
                    break;
                }
                if stream.sched.deficit <= 0 {
                    break;
                }
                let sent = send(stream, self.credit.available(), out);
                self.credit.spend(sent.credit);
                stream.sched.deficit -= sent.wire as i64;
            }
            if blocked {
                stream.sched.queued = true;
                self.parked.push((key, was_new));
            } else if stream.credit_needed().is_some() {
                stream.sched.queued = true;
                self.old_flows.push_back(key);
            } else {
                // An idle stream keeps no credit from the past (classic DRR).
                stream.sched.deficit = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{Op, OpenOptions, StreamId};
    use crate::proto::stream::Half;
    use crate::volume::Chunk;
    use bytes::Bytes;

    /// An open sending stream with `chunks` chunks of 10 bytes queued and ample credit.
    fn sender(store: &mut Store, id: u32, chunks: u64) -> Key {
        let mut s = Stream::requested(StreamId(id), Op::Read, OpenOptions::default(), 0, 0);
        s.accept().unwrap();
        if let Half::Send(send) = &mut s.half {
            send.credit = SendCredit::new(1 << 20);
            for i in 0..chunks {
                let bytes = Bytes::from_static(&[7; 10]);
                send.queue.push_back(Chunk::Data {
                    offset: i * 10,
                    bytes,
                });
            }
        }
        store.insert(s)
    }

    /// Polls until `frames` frames went out (or nothing may go); each frame costs one round and
    /// 10 credit. Returns the streams served, in order.
    fn serve(p: &mut Prioritize, store: &mut Store, frames: usize) -> Vec<u32> {
        let mut order = Vec::new();
        let mut out = Transmit::default();
        p.poll(store, 100, &mut out, frames, |stream, _, out| {
            order.push(stream.id.0);
            stream.send_half().unwrap().queue.pop_front();
            out.push(Bytes::from_static(b"f"));
            Sent {
                wire: 100,
                credit: 10,
            }
        });
        order
    }

    #[test]
    fn a_newly_active_stream_overtakes_the_backlog() {
        let (mut p, mut store) = (Prioritize::default(), Store::default());
        p.set_credit(1 << 20);
        for id in 1..=3 {
            let key = sender(&mut store, id, 2);
            p.schedule(key, &mut store[key]);
        }
        assert_eq!(serve(&mut p, &mut store, 3), [1, 2, 3]);
        let key = sender(&mut store, 9, 1);
        p.schedule(key, &mut store[key]);
        assert_eq!(serve(&mut p, &mut store, 100), [9, 1, 2, 3]);
        assert!(!p.wants_transmit());
    }

    #[test]
    fn streams_parked_for_connection_credit_return_to_their_list() {
        let (mut p, mut store) = (Prioritize::default(), Store::default());
        p.set_credit(20);
        let bulk = sender(&mut store, 1, 3);
        p.schedule(bulk, &mut store[bulk]);
        assert_eq!(serve(&mut p, &mut store, 1), [1]);
        // Its second frame spends the last credit, and it parks as a backlogged (old) flow.
        assert_eq!(serve(&mut p, &mut store, 1), [1]);
        let fresh = sender(&mut store, 3, 1);
        p.schedule(fresh, &mut store[fresh]);
        assert_eq!(
            serve(&mut p, &mut store, 100),
            [] as [u32; 0],
            "parks as new"
        );
        p.grant(100, &store).unwrap();
        assert_eq!(
            serve(&mut p, &mut store, 100),
            [3, 1],
            "the new flow first again"
        );
    }

    #[test]
    fn a_key_left_behind_by_an_ended_stream_is_skipped() {
        let (mut p, mut store) = (Prioritize::default(), Store::default());
        p.set_credit(1 << 20);
        let gone = sender(&mut store, 1, 1);
        p.schedule(gone, &mut store[gone]);
        store.remove(gone);
        let reused = sender(&mut store, 3, 1);
        assert_eq!(serve(&mut p, &mut store, 100), [] as [u32; 0]);
        p.schedule(reused, &mut store[reused]);
        assert_eq!(serve(&mut p, &mut store, 100), [3]);
    }
}
