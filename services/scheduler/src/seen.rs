//! Skipping re-delivered events: a bounded memory of the event ids a consumer has applied.
//!
//! Kafka delivers at least once and its producer may store a retried event twice (at a new
//! offset). A retry lands close to the original, so remembering the last `capacity` ids is
//! enough to skip it; an id older than that is forgotten (oldest first).

use std::collections::{HashSet, VecDeque};

/// The last `capacity` event ids seen, oldest first.
#[derive(Clone, Debug)]
pub struct SeenIds {
    capacity: usize,
    ids: HashSet<String>,
    order: VecDeque<String>,
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

    /// True the first time `id` is seen (apply the event), false for a re-delivery (skip it).
    /// An empty id (an event written without one) is always new.
    pub fn first_time(&mut self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        self.ids.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

impl Default for SeenIds {
    /// Room for 65,536 ids (a few MB): far more than a producer retry's window.
    fn default() -> Self {
        SeenIds::new(65_536)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_is_skipped_and_empty_ids_never_are() {
        let mut seen = SeenIds::new(4);
        assert!(seen.first_time("a"));
        assert!(seen.first_time("b"));
        assert!(!seen.first_time("a"));
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
}
