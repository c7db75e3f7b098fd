//! The streams of one connection, and the one place that turns a stream id into a stream.
//!
//! Streams live in a slab. A [`Key`] names one by its slot and its id together, and resolving
//! a key checks both, so a key kept anywhere (the scheduler's lists, a stream parked for
//! credit) can never select the stream that later reuses its slot.
//!
//! Streams this side aborted leave a tombstone: frames the peer sent before it saw the ABORT are
//! then dropped instead of treated as violations. Tombstones are bounded; the oldest are
//! forgotten first.

use super::frame::StreamId;
use super::stream::Stream;
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};

/// A live stream's place in the store, checked against its id on every use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    index: u32,
    id: StreamId,
}

impl Key {
    pub fn id(self) -> StreamId {
        self.id
    }
}

/// What an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    Live(Key),
    /// This side aborted the stream; late frames for it are expected.
    Aborted,
    /// Not a stream now: it never existed, or it ended normally.
    Missing,
}

/// How many aborted streams are remembered.
const TOMBSTONES_MAX: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Store {
    slab: Slab<Stream>,
    ids: HashMap<StreamId, u32>,
    tombstones: HashSet<StreamId>,
    tombstone_order: VecDeque<StreamId>,
}

impl Store {
    pub fn insert(&mut self, stream: Stream) -> Key {
        let id = stream.id;
        let index = self.slab.insert(stream) as u32;
        let previous = self.ids.insert(id, index);
        debug_assert!(previous.is_none(), "{id} inserted twice");
        Key { index, id }
    }

    /// The live stream `id` names.
    pub fn find(&self, id: StreamId) -> Option<Key> {
        self.ids.get(&id).map(|&index| Key { index, id })
    }

    pub fn resolve(&self, id: StreamId) -> Found {
        match self.find(id) {
            Some(key) => Found::Live(key),
            None if self.tombstones.contains(&id) => Found::Aborted,
            None => Found::Missing,
        }
    }

    /// The stream behind `key`, unless it has ended (its slot may hold another stream by now).
    pub fn get(&self, key: Key) -> Option<&Stream> {
        self.slab.get(key.index as usize).filter(|s| s.id == key.id)
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut Stream> {
        self.slab
            .get_mut(key.index as usize)
            .filter(|s| s.id == key.id)
    }

    /// Takes a stream out; its key resolves to nothing from now on.
    pub fn remove(&mut self, key: Key) -> Stream {
        assert!(self.get(key).is_some(), "removing {} twice", key.id);
        self.ids.remove(&key.id);
        self.slab.remove(key.index as usize)
    }

    /// Remembers that this side aborted `id`.
    pub fn bury(&mut self, id: StreamId) {
        if self.tombstones.insert(id) {
            self.tombstone_order.push_back(id);
            if self.tombstone_order.len() > TOMBSTONES_MAX {
                if let Some(old) = self.tombstone_order.pop_front() {
                    self.tombstones.remove(&old);
                }
            }
        }
    }

    pub fn keys(&self) -> Vec<Key> {
        self.slab
            .iter()
            .map(|(index, s)| Key {
                index: index as u32,
                id: s.id,
            })
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Stream> {
        self.slab.iter().map(|(_, s)| s)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Stream> {
        self.slab.iter_mut().map(|(_, s)| s)
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

impl std::ops::Index<Key> for Store {
    type Output = Stream;

    /// For a key just found or inserted; a key kept across calls goes through `get`.
    fn index(&self, key: Key) -> &Stream {
        self.get(key)
            .unwrap_or_else(|| panic!("stale store key for {}", key.id))
    }
}

impl std::ops::IndexMut<Key> for Store {
    fn index_mut(&mut self, key: Key) -> &mut Stream {
        self.get_mut(key)
            .unwrap_or_else(|| panic!("stale store key for {}", key.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{Op, OpenOptions};

    fn stream(id: u32) -> Stream {
        Stream::opened(StreamId(id), Op::Read, OpenOptions::default(), 0, 1024)
    }

    #[test]
    fn a_key_never_selects_the_stream_that_reused_its_slot() {
        let mut store = Store::default();
        let old = store.insert(stream(1));
        store.remove(old);
        let new = store.insert(stream(3));
        assert_eq!(old.index, new.index, "the slab reuses the slot");
        assert!(store.get(old).is_none());
        assert_eq!(store.get(new).map(|s| s.id), Some(StreamId(3)));
        assert_eq!(store.resolve(StreamId(1)), Found::Missing);
    }

    #[test]
    fn tombstones_are_bounded_oldest_first() {
        let mut store = Store::default();
        for id in 1..=TOMBSTONES_MAX as u32 + 1 {
            store.bury(StreamId(id));
        }
        assert_eq!(store.resolve(StreamId(1)), Found::Missing);
        assert_eq!(store.resolve(StreamId(2)), Found::Aborted);
        assert_eq!(store.tombstones.len(), TOMBSTONES_MAX);
    }
}
