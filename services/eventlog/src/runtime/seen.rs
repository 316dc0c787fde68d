//! Skipping re-delivered events: the one memory of applied event ids, kept by the driver.
//!
//! Kafka delivers at least once and its producer may store a retried event twice (at a new
//! offset). A retry lands close to the original, so remembering the last `capacity` ids is
//! enough to skip it; an id older than that is forgotten (oldest first). Replay and audit keep
//! every id ([`SeenIds::unbounded`]).
//!
//! Ids are kept as 128-bit keys, not strings: a UUID (every id Tributary writes) is its own
//! key; any other text is hashed to 128 bits. No allocation per event once the window is full.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

/// The last `capacity` event ids seen, oldest first.
#[derive(Clone, Debug)]
pub struct SeenIds {
    capacity: usize,
    ids: HashSet<u128>,
    order: VecDeque<u128>,
}

impl SeenIds {
    /// Remembers up to `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        SeenIds {
            capacity: capacity.max(1),
            ids: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers every id (replay and audit: a duplicate anywhere is applied once).
    pub fn unbounded() -> Self {
        SeenIds::new(usize::MAX)
    }

    /// True the first time `id` is seen (apply the event), false for a re-delivery (skip it).
    /// An empty id (an event written without one) is always new.
    pub fn first_time(&mut self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        let key = key(id);
        if !self.ids.insert(key) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        self.order.push_back(key);
        true
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Forgets the `n` ids remembered last (a batch that was not committed: it is applied
    /// again). Ids those pushed out of the window stay forgotten.
    pub fn forget_last(&mut self, n: usize) {
        for _ in 0..n {
            match self.order.pop_back() {
                Some(key) => {
                    self.ids.remove(&key);
                }
                None => return,
            }
        }
    }
}

impl Default for SeenIds {
    /// Room for 65,536 ids (about 3 MB): far more than a producer retry's window.
    fn default() -> Self {
        SeenIds::new(65_536)
    }
}

/// The 128-bit key of an event id.
fn key(id: &str) -> u128 {
    if id.len() == 36 {
        if let Ok(uuid) = uuid::Uuid::try_parse(id) {
            return uuid.as_u128();
        }
    }
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_is_skipped_and_empty_ids_never_are() {
        let mut seen = SeenIds::new(4);
        let a = uuid::Uuid::now_v7().to_string();
        assert!(seen.first_time(&a));
        assert!(seen.first_time("b"));
        assert!(!seen.first_time(&a));
        assert!(!seen.first_time("b"));
        assert!(seen.first_time(""));
        assert!(seen.first_time(""));
    }

    #[test]
    fn the_oldest_id_is_forgotten_beyond_capacity() {
        let mut seen = SeenIds::new(2);
        assert!(seen.first_time("a"));
        assert!(seen.first_time("b"));
        assert!(seen.first_time("c")); // forgets a
        assert!(!seen.first_time("b"));
        assert!(!seen.first_time("c"));
        assert!(seen.first_time("a"));
    }

    #[test]
    fn the_last_ids_can_be_forgotten_for_a_batch_applied_again() {
        let mut seen = SeenIds::new(8);
        assert!(seen.first_time("a"));
        assert!(seen.first_time("b"));
        assert!(seen.first_time("c"));
        seen.forget_last(2);
        assert!(!seen.first_time("a"));
        assert!(seen.first_time("b"));
        assert!(seen.first_time("c"));
        assert_eq!(seen.len(), 3);
    }
}
