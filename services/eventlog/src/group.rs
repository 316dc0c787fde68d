//! Consumer groups: members that split a log's partitions between them.
//!
//! A member joins with [`EventLog::join_group`](crate::EventLog::join_group) and then calls
//! [`GroupSubscription::next`] in a loop. It sees:
//! * [`GroupEvent::Assigned`]: it now owns these partitions. Before its next call to `next` it may
//!   say where to start reading each of them ([`GroupSubscription::start_at`], e.g. the offsets
//!   its own database stored with its state); partitions it says nothing about start at the
//!   group's committed position, or at the beginning.
//! * [`GroupEvent::Records`]: records of partitions it owns, each partition in offset order.
//! * [`GroupEvent::Revoked`]: these partitions go to another member. Before its next call to
//!   `next` it finishes what it was doing with their records and commits
//!   ([`GroupSubscription::commit`]); no record of a revoked partition is delivered after
//!   `Revoked` (until it is assigned again).
//!
//! The handshake is the call to `next`: the group waits for it (up to a generous deadline) before
//! handing the partitions over, so a revoked partition is never processed by two members at once
//! past a commit.
//!
//! Backends: Kafka uses Kafka's group membership (the cooperative-sticky assignor; see
//! [`kafka`](crate::kafka)); a single-partition log (SQLite) has groups of one active member
//! ([`SingleMemberGroup`]): the first member of a group owns partition 0, a second one waits
//! (its `next` returns nothing) until the first leaves or is dropped, then owns it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{LogError, Offset, Partition, Record, Subscription};

/// What a group member sees next; see the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub enum GroupEvent {
    /// These partitions are now the member's.
    Assigned(Vec<Partition>),
    /// These partitions are no longer the member's: commit what was processed of them before
    /// calling `next` again.
    Revoked(Vec<Partition>),
    /// Records of partitions the member owns (never empty).
    Records(Vec<Record>),
}

/// A member of a consumer group; see the [module docs](self).
#[async_trait]
pub trait GroupSubscription: Send {
    /// The next assignment change or batch of records, waiting for them. Calling it again
    /// acknowledges the previous `Assigned`/`Revoked`. Returns [`LogError::Closed`] when the log
    /// is shut down.
    async fn next(&mut self) -> Result<GroupEvent, LogError>;

    /// Right after [`GroupEvent::Assigned`]: start reading these partitions at these offsets.
    /// Ignored at any other time, and for partitions not just assigned.
    fn start_at(&mut self, positions: &[(Partition, Offset)]);

    /// Stores `positions` (the next offset to process, per partition) as the group's committed
    /// positions, through this member. Right after [`GroupEvent::Revoked`], the commit of the
    /// revoked partitions is made as part of the hand-over.
    async fn commit(&mut self, positions: &[(Partition, Offset)]) -> Result<(), LogError>;

    /// The partitions this member owns now.
    fn assigned(&self) -> Vec<Partition>;

    /// Leaves the group: its partitions go to the other members at once (without waiting for a
    /// session timeout). Commit first what should be kept.
    async fn leave(self: Box<Self>) -> Result<(), LogError>;
}

/// The three things a one-partition log offers a [`SingleMemberGroup`].
#[async_trait]
pub trait SinglePartitionPort: Send + Sync + 'static {
    /// A subscription to partition 0 from `from`.
    fn subscribe(&self, from: Offset) -> Box<dyn Subscription>;
    /// Stores `next` as `group`'s position.
    async fn commit(&self, group: &str, next: Offset) -> Result<(), LogError>;
    /// `group`'s stored position.
    async fn committed(&self, group: &str) -> Result<Option<Offset>, LogError>;
}

/// Which member of each group of a one-partition log is active: a one-permit semaphore per
/// group, held by the active member. Shared by the log's [`SingleMemberGroup`]s.
#[derive(Clone, Default)]
pub struct GroupSlots {
    slots: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl GroupSlots {
    fn slot(&self, group: &str) -> Arc<Semaphore> {
        let mut slots = match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots
            .entry(group.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone()
    }
}

/// A group member on a one-partition log: owns partition 0 while no other member of its group
/// (on the same log handle) does. Members of one group in other processes are not coordinated:
/// run one process per single-partition log.
pub struct SingleMemberGroup<P: SinglePartitionPort> {
    port: P,
    group: String,
    slot: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    start: Option<Offset>,
    sub: Option<Box<dyn Subscription>>,
}

impl<P: SinglePartitionPort> SingleMemberGroup<P> {
    pub fn new(port: P, slots: &GroupSlots, group: &str) -> Self {
        SingleMemberGroup {
            port,
            group: group.to_owned(),
            slot: slots.slot(group),
            permit: None,
            start: None,
            sub: None,
        }
    }
}

#[async_trait]
impl<P: SinglePartitionPort> GroupSubscription for SingleMemberGroup<P> {
    async fn next(&mut self) -> Result<GroupEvent, LogError> {
        if self.permit.is_none() {
            let permit = self
                .slot
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| LogError::Closed)?;
            self.permit = Some(permit);
            return Ok(GroupEvent::Assigned(vec![0]));
        }
        if self.sub.is_none() {
            let from = match self.start.take() {
                Some(from) => from,
                None => self.port.committed(&self.group).await?.unwrap_or(0),
            };
            self.sub = Some(self.port.subscribe(from));
        }
        match &mut self.sub {
            Some(sub) => Ok(GroupEvent::Records(sub.next_batch().await?)),
            None => Err(LogError::Closed),
        }
    }

    fn start_at(&mut self, positions: &[(Partition, Offset)]) {
        if self.permit.is_some() && self.sub.is_none() {
            if let Some((_, offset)) = positions.iter().find(|(p, _)| *p == 0) {
                self.start = Some(*offset);
            }
        }
    }

    async fn commit(&mut self, positions: &[(Partition, Offset)]) -> Result<(), LogError> {
        let mut next = None;
        for (partition, offset) in positions {
            if *partition != 0 {
                return Err(LogError::Invalid(format!(
                    "this log has one partition, 0: cannot commit partition {partition}"
                )));
            }
            next = Some(*offset);
        }
        match next {
            Some(next) => self.port.commit(&self.group, next).await,
            None => Ok(()),
        }
    }

    fn assigned(&self) -> Vec<Partition> {
        if self.permit.is_some() {
            vec![0]
        } else {
            Vec::new()
        }
    }

    async fn leave(self: Box<Self>) -> Result<(), LogError> {
        // Dropping the permit hands partition 0 to the next waiting member.
        Ok(())
    }
}
