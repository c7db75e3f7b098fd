//! Which stream sends the next DATA/HOLE/FINISH frame, how large that frame may be, and the
//! connection's send credit.
//!
//! **Start-time fair queuing** (SFQ, Goyal, Vin and Cheng 1996) over the streams that have
//! something queued and credit to send it, one frame per pick. Each ready stream carries a
//! start tag in *virtual time*, which counts the bytes a backlogged stream has been served; the
//! stream with the smallest tag sends one frame, and its next tag is the old one plus that
//! frame's wire bytes. Backlogged streams therefore take turns and get equal byte shares
//! whatever their frame sizes. A stream that becomes ready gets the tag
//! `max(V - LAG, where its last frame ended)`, `V` being the largest tag served so far. A
//! stream that has sent less than its share since it was last busy (an interactive stream, a
//! probe) has fallen behind `V` and gets `V - LAG`: smaller than the tag of every backlogged
//! stream, which is at least `V`. Its frame is the next to go, whether 10 or 1,000 streams are
//! backlogged. `LAG` (set by `send.rs`: four full frames) is the head start a stream can bank
//! by being idle, so fairness among backlogged streams is off by at most `LAG` per time a stream
//! goes idle; it is what lets a below-share stream ride out a dip of the link (a stretch in
//! which its share falls below its rate) without queueing behind itself.
//!
//! Deficit round robin, which this replaces, served such a stream only when the round came back
//! to it, unless it had been idle for a whole round (fq_codel's sparse-flow rule): a probe whose
//! rate was near its share waited a round of every backlogged stream's frame.
//!
//! **Two classes.** Streams opened with `OpenOptions::with_priority` (what a person or a guest waits
//! on) form the priority class, the others the bulk class. The classes share the link by the
//! same rule one level up, with weights `priority_weight : 1`: a priority frame goes ahead of
//! the bulk frames waiting, and while both classes are backlogged the bulk class still gets
//! `1 / (priority_weight + 1)` of the bytes, so priority can never starve it.
//!
//! **The bound.** Control frames (WINDOW, PING/PONG, ACCEPT, ABORT...) are not scheduled here at
//! all: the connection sends them ahead of every frame this module picks. A stream below its
//! fair share that becomes ready is sent after at most `k` frames of other streams:
//! - `k = 1` (the frame being sent when it became ready is never interrupted) if no other
//!   below-share stream of its class is ready at the same time and it is in the priority class
//!   or the priority class is idle;
//! - plus one frame per other below-share stream of its class that became ready before it;
//! - plus up to `priority_weight` priority frames if it is a bulk stream and the priority class
//!   is backlogged.
//!
//! **Frame size adapts.** A frame already on its way is never cut short, so the frame size is
//! what a frame behind it waits. While an interactive stream is active (a priority stream was
//! served while others waited, or a stream with less than one frame queued overtook backlogged
//! ones, within the last `interactive_linger`), frames are at most `interactive_frame` bytes;
//! otherwise at most the full frame size (`send_frame`, within the peer's `max_frame`).
//!
//! A stream whose next frame needs more connection credit than is left is parked with its tag
//! and returns to its queue, still holding that tag, when the peer grants connection credit.

use super::flow::{CreditOverflow, SendCredit};
use super::store::{Key, Store};
use super::stream::{Half, Stream};
use super::transmit::Transmit;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// The two classes of service; a stream's class is fixed by its OPEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Bulk = 0,
    Priority = 1,
}

/// A stream's place in the scheduler; only this module reads or changes it.
#[derive(Debug, Default)]
pub(crate) struct Sched {
    /// In its class's queue, or parked waiting for connection credit.
    queued: bool,
    /// Start tag of its next frame, while queued.
    start: u64,
    /// Where its last frame ended in its class's virtual time.
    finish: u64,
}

/// What sending one frame cost: its bytes on the wire (charged to the stream's tag) and the
/// credit it spent (taken from the connection's).
pub(crate) struct Sent {
    pub wire: usize,
    pub credit: u64,
}

/// How the scheduler sizes frames and weighs the classes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Largest payload of a frame while no interactive stream is active.
    pub frame: usize,
    /// Largest payload of a frame while one is.
    pub interactive_frame: usize,
    /// Bytes on the wire of a full frame: the head start an idle stream may bank.
    pub lag: u64,
    /// The priority class's share against the bulk class's 1.
    pub priority_weight: u64,
    /// How long the small frames stay after an interactive stream was last served.
    pub interactive_linger: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            frame: 1,
            interactive_frame: 1,
            lag: 1,
            priority_weight: 4,
            interactive_linger: Duration::from_millis(100),
        }
    }
}

/// A ready stream in its class's queue, ordered by start tag, then by when it was queued.
#[derive(Debug)]
struct Entry {
    tag: u64,
    seq: u64,
    key: Key,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.tag, self.seq) == (other.tag, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the smallest tag first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.tag, other.seq).cmp(&(self.tag, self.seq))
    }
}

/// The streams of one class and the class's own place in the class-level queue.
#[derive(Debug, Default)]
struct ClassQueue {
    heap: BinaryHeap<Entry>,
    /// Virtual time among the class's streams: the largest start tag served.
    vtime: u64,
    /// Whether the class is in the class-level queue (its heap is not empty).
    active: bool,
    /// The class's start tag in the class-level virtual time, while active.
    start: u64,
    /// Where the class's last frame ended in the class-level virtual time.
    finish: u64,
}

#[derive(Debug)]
pub(crate) struct Prioritize {
    classes: [ClassQueue; 2],
    /// Class-level virtual time: the largest class start tag served.
    vtime: u64,
    /// Ticket for first-come order among equal tags.
    seq: u64,
    /// Streams ready to send but waiting for connection credit; they keep their tags.
    parked: Vec<Key>,
    /// Connection credit the peer granted and we have not spent.
    credit: SendCredit,
    policy: Policy,
    /// Until when frames stay small: an interactive stream was served recently.
    interactive_until: Option<Instant>,
    /// The peer's connection window, which `credit` starts at.
    window: u64,
    /// Times a stream had content queued but had to wait for credit.
    stalls: u64,
}

impl Default for Prioritize {
    fn default() -> Self {
        Prioritize {
            classes: Default::default(),
            vtime: 0,
            seq: 0,
            parked: Vec::new(),
            credit: SendCredit::new(0),
            policy: Policy::default(),
            interactive_until: None,
            window: 0,
            stalls: 0,
        }
    }
}

impl Stream {
    fn class(&self) -> Class {
        if self.options.priority() {
            Class::Priority
        } else {
            Class::Bulk
        }
    }

    fn queued_payload(&self) -> usize {
        match &self.half {
            Half::Send(send) => send.queued_bytes,
            Half::Recv(_) => 0,
        }
    }
}

impl Prioritize {
    /// The connection window the peer announced in its Hello.
    pub fn set_credit(&mut self, initial: u32) {
        self.credit = SendCredit::new(initial);
        self.window = initial as u64;
    }

    /// Connection credit spent and not yet granted back.
    pub fn credit_in_use(&self) -> u64 {
        self.window.saturating_sub(self.credit.available())
    }

    /// Times a stream had content queued but had to wait for its own or the connection's
    /// credit.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// Counts a stream that leaves the queues with content it may not send yet: out of its
    /// own credit (it comes back with the peer's WINDOW).
    fn note_stream_stall(&mut self, stream: &mut Stream) {
        if stream.has_queued() {
            stream.stats.credit_stalls += 1;
            self.stalls += 1;
        }
    }

    /// Connection credit left.
    #[cfg(feature = "test-support")]
    pub fn credit(&self) -> u64 {
        self.credit.available()
    }

    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// How far a class's tag advances per wire byte: the inverse of its weight, scaled so both
    /// are integers.
    fn class_cost(&self, class: Class, wire: u64) -> u64 {
        match class {
            Class::Priority => wire,
            Class::Bulk => wire * self.policy.priority_weight.max(1),
        }
    }

    /// Puts a stream that has something it may send into its class's queue, unless it is
    /// queued. Its tag starts where its last frame ended, or at most one frame before the
    /// class's virtual time if it has fallen further behind by sending less than its share.
    pub fn schedule(&mut self, key: Key, stream: &mut Stream) {
        if stream.sched.queued || stream.credit_needed().is_none() {
            return;
        }
        stream.sched.queued = true;
        let class = &self.classes[stream.class() as usize];
        stream.sched.start = stream
            .sched
            .finish
            .max(class.vtime.saturating_sub(self.policy.lag));
        self.enqueue(key, stream);
    }

    /// Puts a queued stream into its class's heap under its current start tag, and its class
    /// into the class-level queue if it was idle.
    fn enqueue(&mut self, key: Key, stream: &Stream) {
        let class = stream.class();
        let lag = self.class_cost(class, self.policy.lag);
        self.seq += 1;
        let vtime = self.vtime;
        let queue = &mut self.classes[class as usize];
        queue.heap.push(Entry {
            tag: stream.sched.start,
            seq: self.seq,
            key,
        });
        if !queue.active {
            queue.active = true;
            queue.start = queue.finish.max(vtime.saturating_sub(lag));
        }
    }

    /// The peer granted connection credit: parked streams go back to their queues.
    pub fn grant(&mut self, increment: u32, store: &Store) -> Result<(), CreditOverflow> {
        self.credit.grant(increment)?;
        for key in std::mem::take(&mut self.parked) {
            if let Some(stream) = store.get(key) {
                self.enqueue(key, stream);
            }
        }
        Ok(())
    }

    /// Whether a frame could go out now.
    pub fn wants_transmit(&self) -> bool {
        self.classes.iter().any(|c| c.active) && self.credit.available() > 0
    }

    /// Whether an interactive stream was served within the linger time: frames are small and
    /// a driver should keep little queued ahead of the socket.
    pub fn is_interactive(&self, now: Instant) -> bool {
        self.interactive_until.is_some_and(|until| now < until)
    }

    /// The class whose turn it is: the smaller class tag, priority on a tie.
    fn pick_class(&self) -> Option<Class> {
        let [bulk, priority] = &self.classes;
        match (bulk.active, priority.active) {
            (false, false) => None,
            (true, false) => Some(Class::Bulk),
            (false, true) => Some(Class::Priority),
            (true, true) if bulk.start < priority.start => Some(Class::Bulk),
            (true, true) => Some(Class::Priority),
        }
    }

    /// Sends frames, one pick at a time, until `out` holds `limit` bytes or no stream may send.
    /// `send` puts one frame of the stream into `out` with at most the payload it is given
    /// (within the frame size and the connection credit; the stream checked it may send), and
    /// says what that cost.
    pub fn poll(
        &mut self,
        store: &mut Store,
        now: Instant,
        out: &mut Transmit,
        limit: usize,
        mut send: impl FnMut(&mut Stream, usize, &mut Transmit) -> Sent,
    ) {
        while out.len() < limit {
            let Some(class) = self.pick_class() else {
                break;
            };
            let queue = &mut self.classes[class as usize];
            let Some(entry) = queue.heap.pop() else {
                queue.active = false;
                continue;
            };
            let waiting = !queue.heap.is_empty();
            // A stream that ended while queued leaves its key behind; it resolves to nothing.
            let Some(stream) = store.get_mut(entry.key) else {
                queue.active = !queue.heap.is_empty();
                continue;
            };
            let Some(need) = stream.credit_needed() else {
                stream.sched.queued = false;
                queue.active = !queue.heap.is_empty();
                self.note_stream_stall(stream);
                continue;
            };
            if need > self.credit.available() {
                self.parked.push(entry.key);
                queue.active = !queue.heap.is_empty();
                stream.stats.credit_stalls += 1;
                self.stalls += 1;
                continue;
            }
            // Overtaking: a tag below the class's virtual time was earned by sending less than
            // a share, and a small queue says the stream is not a bulk one coming back.
            let early = entry.tag < queue.vtime;
            let other_class = self.classes[1 - class as usize].active;
            let interactive = match class {
                Class::Priority => waiting || other_class,
                Class::Bulk => early && waiting && stream.queued_payload() < self.policy.frame,
            };
            if interactive {
                self.interactive_until = Some(now + self.policy.interactive_linger);
            }
            let frame = if self.is_interactive(now) {
                self.policy.interactive_frame
            } else {
                self.policy.frame
            };
            let max_payload = (frame as u64).min(self.credit.available()) as usize;
            let sent = send(stream, max_payload.max(1), out);
            self.credit.spend(sent.credit);

            let lag = self.policy.lag;
            let class_cost = self.class_cost(class, sent.wire as u64);
            let queue = &mut self.classes[class as usize];
            queue.vtime = queue.vtime.max(entry.tag);
            stream.sched.finish = entry.tag + sent.wire as u64;
            self.vtime = self.vtime.max(queue.start);
            queue.finish = queue.start + class_cost;
            queue.start = queue.finish;
            if stream.credit_needed().is_some() {
                // Still backlogged: the next frame starts where this one ended.
                stream.sched.start = stream.sched.finish.max(queue.vtime.saturating_sub(lag));
                let stream: &Stream = stream;
                self.enqueue(entry.key, stream);
            } else {
                stream.sched.queued = false;
                queue.active = !queue.heap.is_empty();
                self.note_stream_stall(stream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{Op, OpenOptions, StreamId};
    use crate::volume::Chunk;
    use bytes::Bytes;

    const FRAME: usize = 100;

    fn policy() -> Policy {
        Policy {
            frame: FRAME,
            interactive_frame: FRAME / 4,
            lag: FRAME as u64,
            priority_weight: 4,
            interactive_linger: Duration::from_millis(10),
        }
    }

    /// An open sending stream with `chunks` chunks of `size` bytes queued and ample credit.
    fn sender(store: &mut Store, id: u32, chunks: u64, size: usize, priority: bool) -> Key {
        let options = OpenOptions::default().with_priority(priority);
        let mut s = Stream::requested(StreamId(id), Op::Read, options, 0, 0);
        s.accept().unwrap();
        if let Half::Send(send) = &mut s.half {
            send.credit = SendCredit::new(u32::MAX);
            for i in 0..chunks {
                send.queue.push_back(Chunk::Data {
                    offset: i * size as u64,
                    bytes: Bytes::from(vec![7; size]),
                });
                send.queued_bytes += size;
            }
        }
        store.insert(s)
    }

    fn scheduler(credit: u32) -> Prioritize {
        let mut p = Prioritize::default();
        p.set_credit(credit);
        p.set_policy(policy());
        p
    }

    /// Polls until `frames` frames went out (or nothing may go): each frame sends what the
    /// front chunk holds, up to the payload allowed, for that many bytes of credit and wire.
    /// Returns the streams served and each frame's payload, in order.
    fn serve(p: &mut Prioritize, store: &mut Store, frames: usize) -> Vec<(u32, usize)> {
        let mut order = Vec::new();
        let mut out = Transmit::default();
        let now = Instant::now();
        while order.len() < frames {
            let before = order.len();
            p.poll(store, now, &mut out, 1, |stream, max, out| {
                let send = stream.send_half().unwrap();
                let Some(Chunk::Data { bytes, .. }) = send.queue.front_mut() else {
                    unreachable!()
                };
                let n = max.min(bytes.len());
                let _ = bytes.split_to(n);
                if bytes.is_empty() {
                    send.queue.pop_front();
                }
                send.queued_bytes -= n;
                out.push(Bytes::from_static(b"f"));
                order.push((stream.id.0, n));
                Sent {
                    wire: n,
                    credit: n as u64,
                }
            });
            out.advance(out.len());
            if order.len() == before {
                break;
            }
        }
        order
    }

    fn ids(served: &[(u32, usize)]) -> Vec<u32> {
        served.iter().map(|s| s.0).collect()
    }

    #[test]
    fn backlogged_streams_take_turns_and_share_bytes_equally() {
        let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
        // Different frame sizes: shares are counted in bytes, not frames.
        for (id, size) in [(1, 100), (3, 50), (5, 25)] {
            let key = sender(&mut store, id, 1000, size, false);
            p.schedule(key, &mut store[key]);
        }
        let served = serve(&mut p, &mut store, 700);
        let bytes = |id| -> usize { served.iter().filter(|s| s.0 == id).map(|s| s.1).sum() };
        let (a, b, c) = (bytes(1), bytes(3), bytes(5));
        for x in [a, b, c] {
            let mean = (a + b + c) / 3;
            assert!(x.abs_diff(mean) <= 2 * FRAME, "shares {a} {b} {c}");
        }
    }

    #[test]
    fn a_newly_ready_stream_goes_next_however_many_are_backlogged() {
        for backlog in [3, 100, 1000] {
            let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
            for i in 0..backlog {
                let key = sender(&mut store, 2 * i + 1, 3, FRAME, false);
                p.schedule(key, &mut store[key]);
            }
            // Past the first round (in which no stream has been served, so none is behind the
            // others), and half into the next, so the backlog holds tags on both sides of the
            // virtual time.
            serve(&mut p, &mut store, backlog as usize * 3 / 2 + 1);
            let probe = sender(&mut store, 9999, 1, 40, false);
            p.schedule(probe, &mut store[probe]);
            assert_eq!(ids(&serve(&mut p, &mut store, 1)), [9999], "{backlog}");
        }
    }

    /// Queues one more chunk on a sending stream and schedules it.
    fn push(p: &mut Prioritize, store: &mut Store, key: Key, size: usize) {
        let send = store[key].send_half().unwrap();
        let offset = send.cursor.next();
        assert!(send.cursor.take(offset, size as u64, u64::MAX));
        send.queue.push_back(Chunk::Data {
            offset,
            bytes: Bytes::from(vec![1; size]),
        });
        send.queued_bytes += size;
        p.schedule(key, &mut store[key]);
    }

    #[test]
    fn a_stream_below_its_share_keeps_overtaking_and_one_above_does_not() {
        // Between two messages of the probe, 10 frames go out. With 10 backlogged streams its
        // share is about a frame per 11; below that it is served first every time, above it
        // queues like everyone else.
        for (message, overtakes) in [
            (FRAME / 2, true),
            (FRAME * 9 / 10, true),
            (3 * FRAME, false),
        ] {
            let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
            // Frames keep one size here, so shares are easy to count.
            p.policy.interactive_frame = FRAME;
            for i in 0..10 {
                let key = sender(&mut store, 2 * i + 1, 10_000, FRAME, false);
                p.schedule(key, &mut store[key]);
            }
            serve(&mut p, &mut store, 25);
            let probe = sender(&mut store, 9001, 0, 0, false);
            let mut first = 0;
            for _ in 0..100 {
                push(&mut p, &mut store, probe, message);
                first += (serve(&mut p, &mut store, 10)[0].0 == 9001) as u32;
            }
            assert_eq!(
                first == 100,
                overtakes,
                "{message}-byte messages: first {first}/100"
            );
        }
    }

    #[test]
    fn priority_goes_first_but_bulk_keeps_its_share() {
        let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
        for i in 0..5 {
            let key = sender(&mut store, 2 * i + 1, 10_000, FRAME, false);
            p.schedule(key, &mut store[key]);
        }
        serve(&mut p, &mut store, 7);
        let prio = sender(&mut store, 101, 10_000, FRAME, true);
        p.schedule(prio, &mut store[prio]);
        let served = serve(&mut p, &mut store, 1000);
        assert_eq!(served[0].0, 101, "priority goes first");
        let prio_bytes: usize = served.iter().filter(|s| s.0 == 101).map(|s| s.1).sum();
        let all: usize = served.iter().map(|s| s.1).sum();
        let share = prio_bytes as f64 / all as f64;
        // Weight 4 against 1: 80 % of the bytes, and the bulk class the other 20 %.
        assert!((share - 0.8).abs() < 0.02, "priority share {share}");
    }

    #[test]
    fn frames_shrink_while_an_interactive_stream_is_active() {
        let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
        for i in 0..4 {
            let key = sender(&mut store, 2 * i + 1, 1000, FRAME, false);
            p.schedule(key, &mut store[key]);
        }
        let before = serve(&mut p, &mut store, 8);
        assert!(before.iter().all(|s| s.1 == FRAME), "{before:?}");
        let probe = sender(&mut store, 99, 1, 10, false);
        p.schedule(probe, &mut store[probe]);
        let after = serve(&mut p, &mut store, 8);
        assert_eq!(after[0], (99, 10));
        assert!(after[1..].iter().all(|s| s.1 == FRAME / 4), "{after:?}");
        assert!(p.is_interactive(Instant::now()));
        assert!(!p.is_interactive(Instant::now() + Duration::from_millis(11)));
    }

    #[test]
    fn a_lone_bulk_stream_keeps_full_frames() {
        let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
        let key = sender(&mut store, 1, 100, FRAME, false);
        p.schedule(key, &mut store[key]);
        let served = serve(&mut p, &mut store, 100);
        assert!(served.iter().all(|s| s.1 == FRAME));
        assert!(!p.is_interactive(Instant::now()));
    }

    #[test]
    fn streams_parked_for_connection_credit_keep_their_place() {
        let (mut p, mut store) = (scheduler(250), Store::default());
        let a = sender(&mut store, 1, 10, FRAME, false);
        let b = sender(&mut store, 3, 10, FRAME, false);
        p.schedule(a, &mut store[a]);
        p.schedule(b, &mut store[b]);
        // 250 credit: two full frames and a 50-byte one, then everything parks.
        assert_eq!(
            serve(&mut p, &mut store, 100),
            [(1, 100), (3, 100), (1, 50)]
        );
        assert!(!p.wants_transmit());
        p.grant(1000, &store).unwrap();
        // Stream 3 is behind in bytes: it goes first, and the two alternate again.
        assert_eq!(ids(&serve(&mut p, &mut store, 4)), [3, 1, 3, 1]);
    }

    #[test]
    fn a_key_left_behind_by_an_ended_stream_is_skipped() {
        let (mut p, mut store) = (scheduler(u32::MAX), Store::default());
        let gone = sender(&mut store, 1, 1, FRAME, false);
        p.schedule(gone, &mut store[gone]);
        store.remove(gone);
        let reused = sender(&mut store, 3, 1, FRAME, false);
        assert_eq!(serve(&mut p, &mut store, 100), []);
        p.schedule(reused, &mut store[reused]);
        assert_eq!(ids(&serve(&mut p, &mut store, 100)), [3]);
        assert!(!p.wants_transmit());
    }
}
