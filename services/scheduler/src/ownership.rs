//! Which partitions a scheduler decides for, as it gains and loses them.
//!
//! Several scheduler services share one partitioned log: each decides only for the builds of
//! the partitions it owns (ownership comes from the consumer group; on a one-partition log it
//! is `{0}` forever). A partition it gains is *caught up* first: the scheduler folds it up to
//! the end it had when it was gained, so it has seen every `JobAssigned` the previous owner
//! appended before deciding for it. A partition it loses is dropped at once. Pure state; the
//! service ([`crate::service`]) does the I/O.

use std::collections::{BTreeMap, BTreeSet};

use tributary_eventlog::{Offset, Partition};

/// The partitions a scheduler decides for, and those it is catching up on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    deciding: BTreeSet<Partition>,
    /// Gained partitions and the offset their fold must reach before deciding for them.
    catching_up: BTreeMap<Partition, Option<Offset>>,
}

impl Ownership {
    pub fn new() -> Self {
        Self::default()
    }

    /// The owner now wants exactly `wanted`: partitions not in it stop being decided for at
    /// once. Returns the partitions newly gained: the caller measures each one's end offset and
    /// passes it to [`Ownership::caught_up_at`]; until then they are not decided for.
    pub fn want(&mut self, wanted: &BTreeSet<Partition>) -> Vec<Partition> {
        self.deciding.retain(|p| wanted.contains(p));
        self.catching_up.retain(|p, _| wanted.contains(p));
        let gained: Vec<Partition> = wanted
            .iter()
            .filter(|p| !self.deciding.contains(p) && !self.catching_up.contains_key(p))
            .copied()
            .collect();
        for p in &gained {
            self.catching_up.insert(*p, None);
        }
        gained
    }

    /// `partition`, gained, is decided for once its fold reaches `end`.
    pub fn caught_up_at(&mut self, partition: Partition, end: Offset) {
        if let Some(target) = self.catching_up.get_mut(&partition) {
            *target = Some(end);
        }
    }

    /// The fold is at `positions` (next offset per partition): partitions caught up move to
    /// the deciding set. Returns those that did.
    pub fn folded(&mut self, positions: &[(Partition, Offset)]) -> Vec<Partition> {
        let ready: Vec<Partition> = self
            .catching_up
            .iter()
            .filter(|(p, target)| {
                target.is_some_and(|end| positions.iter().any(|(q, at)| q == *p && *at >= end))
            })
            .map(|(p, _)| *p)
            .collect();
        for p in &ready {
            self.catching_up.remove(p);
            self.deciding.insert(*p);
        }
        ready
    }

    /// Whether decisions for builds of `partition` may be made now.
    pub fn decides(&self, partition: Partition) -> bool {
        self.deciding.contains(&partition)
    }

    /// The partitions decided for now.
    pub fn deciding(&self) -> &BTreeSet<Partition> {
        &self.deciding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ps: &[Partition]) -> BTreeSet<Partition> {
        ps.iter().copied().collect()
    }

    #[test]
    fn a_gained_partition_is_decided_for_only_after_catching_up_to_its_end() {
        let mut o = Ownership::new();
        assert_eq!(o.want(&set(&[0, 2])), vec![0, 2]);
        assert!(!o.decides(0) && !o.decides(2));
        // Folded past the end before the end is known: still not decided for.
        assert!(o.folded(&[(0, 100), (2, 100)]).is_empty());
        o.caught_up_at(0, 10);
        o.caught_up_at(2, 50);
        assert_eq!(o.folded(&[(0, 9), (2, 50)]), vec![2]);
        assert!(!o.decides(0) && o.decides(2));
        assert_eq!(o.folded(&[(0, 10), (2, 50)]), vec![0]);
        assert_eq!(o.deciding(), &set(&[0, 2]));
    }

    #[test]
    fn a_lost_partition_stops_at_once_and_regaining_it_catches_up_again() {
        let mut o = Ownership::new();
        o.want(&set(&[1]));
        o.caught_up_at(1, 0);
        o.folded(&[(1, 0)]);
        assert!(o.decides(1));
        assert!(o.want(&set(&[])).is_empty());
        assert!(!o.decides(1));
        assert_eq!(o.want(&set(&[1])), vec![1]);
        assert!(!o.decides(1));
        o.caught_up_at(1, 7);
        assert!(o.folded(&[(1, 6)]).is_empty());
        assert_eq!(o.folded(&[(1, 7)]), vec![1]);
    }

    #[test]
    fn wanting_the_same_set_again_changes_nothing() {
        let mut o = Ownership::new();
        o.want(&set(&[0]));
        o.caught_up_at(0, 3);
        assert!(o.want(&set(&[0])).is_empty());
        assert_eq!(o.folded(&[(0, 3)]), vec![0]);
        assert!(o.want(&set(&[0])).is_empty());
        assert!(o.decides(0));
    }

    #[test]
    fn losing_a_partition_while_catching_up_forgets_it() {
        let mut o = Ownership::new();
        o.want(&set(&[0, 1]));
        o.want(&set(&[1]));
        o.caught_up_at(0, 0);
        o.caught_up_at(1, 0);
        assert_eq!(o.folded(&[(0, 5), (1, 5)]), vec![1]);
        assert!(!o.decides(0));
    }
}
