//! Which stream sends the next DATA/HOLE frame.
//!
//! Deficit round robin with a quantum of one frame over the streams that have something queued
//! and credit to send it, with fq_codel's two lists (RFC 8290 §4): a stream that becomes active
//! after being idle joins `new_flows` and is served ahead of the backlogged `old_flows` for its
//! first frame. An interactive stream that sends a little now and then is therefore never behind
//! more than the frame on the wire, however many bulk streams there are.
//!
//! Unlike fq_codel, a stream that empties leaves the lists at once instead of lingering in
//! `old_flows`: fq_codel does that to stop flows gaming the new list, but here every stream is our
//! own and the latency of a stream that sends every millisecond is what matters. A bulk stream
//! that stalls on credit re-enters as new, which costs the others at most one frame per window
//! it was granted.

use super::frame::StreamId;
use std::collections::VecDeque;

/// A stream's slot in the connection's store, checked against its id on use so that an entry
/// left behind by a closed stream can never select the stream that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub slot: usize,
    pub id: StreamId,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    new_flows: VecDeque<Entry>,
    old_flows: VecDeque<Entry>,
}

impl Scheduler {
    /// A stream that was idle has something to send.
    pub fn activate(&mut self, entry: Entry) {
        self.new_flows.push_back(entry);
    }

    /// A stream that just sent a frame still has something to send.
    pub fn requeue(&mut self, entry: Entry) {
        self.old_flows.push_back(entry);
    }

    /// The next stream to serve one frame.
    /// The next stream to serve, and whether it came from the new flows.
    pub fn pop(&mut self) -> Option<(Entry, bool)> {
        match self.new_flows.pop_front() {
            Some(e) => Some((e, true)),
            None => self.old_flows.pop_front().map(|e| (e, false)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.new_flows.is_empty() && self.old_flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u32) -> Entry {
        Entry {
            slot: n as usize,
            id: StreamId(n),
        }
    }

    #[test]
    fn newly_active_stream_overtakes_backlog() {
        let mut s = Scheduler::default();
        for n in 1..=3 {
            s.requeue(e(n));
        }
        s.activate(e(9));
        assert_eq!(s.pop(), Some((e(9), true)));
        assert_eq!(s.pop(), Some((e(1), false)));
        s.requeue(e(1));
        assert_eq!(s.pop(), Some((e(2), false)));
        assert_eq!(s.pop(), Some((e(3), false)));
        assert_eq!(s.pop(), Some((e(1), false)));
        assert_eq!(s.pop(), None);
    }
}
