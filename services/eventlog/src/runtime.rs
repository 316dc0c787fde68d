//! The consumer runtime: every consumer of the log is a [`Fold`] driven by one [`Consumer`].
//!
//! A fold says what it wants ([`Fold::interest`]: the driver skips other records undecoded),
//! where each partition starts ([`Fold::start`]: the positions kept in its own store), how to
//! apply one envelope at a position ([`Fold::apply`]) and what to do when a batch is applied
//! ([`Fold::commit`]: write its rows and the positions in one transaction). The driver does the
//! rest, the same way for every consumer and every log:
//! * **ownership**: every partition of a topic ([`Consumer::follow`]), or the partitions a
//!   consumer group gives it ([`Consumer::run_group`]: Kafka's groups, the one-member group of
//!   a one-partition log), with hand-over on revoke;
//! * **reading**: paged catch-up to the ends the partitions had when it began
//!   ([`Consumer::catch_up`], in an [`Order`] a fold may impose: metering's barriers), then a
//!   subscription from the positions reached; replay and audit are a catch-up from offset 0;
//! * **skipping**: records before a partition's position (re-deliveries of a partition),
//!   records the fold does not want (undecoded), undecodable records and unknown payloads
//!   ([`Record::envelope_for`]: logged and counted per consumer), and re-delivered event ids
//!   ([`SeenIds`], the one dedupe of the code base);
//! * **publishing** the positions applied on a watch channel ([`Consumer::applied`]), so a
//!   reader waits for its own write ([`Applied::reached`]) instead of polling.
//!
//! A batch is applied and committed as a whole: when [`Fold::apply`] or [`Fold::commit`] fails,
//! the positions and the ids seen are rolled back, so the batch is applied again (after the
//! fold reloaded what it needs) instead of being skipped as a duplicate.

use std::collections::BTreeMap;
use std::future::Future;

use tokio::sync::watch;
use tributary_proto::events::Envelope;

use crate::{EventLog, GroupEvent, LogError, Offset, Partition, Record, Topic};

mod interest;
mod seen;
mod sequenced;
pub mod suite;

pub use interest::{peek, Admit, Interest, Peek, JOB_OUTPUT};
pub use seen::SeenIds;
pub use sequenced::{Sequenced, Sequential};

/// Where a record is: its partition and offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub partition: Partition,
    pub offset: Offset,
}

/// What a batch moved in one partition: its next offset was `from`, is `to` now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advance {
    pub partition: Partition,
    pub from: Offset,
    pub to: Offset,
}

/// A consumer's state as a fold of the log; see the [module docs](self).
///
/// `apply` and `commit` are plain `async fn`s (no boxing per event); folds that do no I/O
/// simply never await.
pub trait Fold: Send {
    /// What the fold's errors are; a log error must fit.
    type Error: From<LogError> + Send;

    /// The consumer's name: the label of its skipped-records counter and of its logs.
    fn name(&self) -> &'static str;

    /// The event types it applies; the driver skips the others without decoding them.
    fn interest(&self) -> Interest {
        Interest::ALL
    }

    /// Where to start reading each of `partitions` (just assigned): the next offsets the
    /// fold's own store keeps. Partitions left out start at 0.
    fn start(
        &mut self,
        partitions: &[Partition],
    ) -> impl Future<Output = Result<Vec<(Partition, Offset)>, Self::Error>> + Send {
        let _ = partitions;
        async { Ok(Vec::new()) }
    }

    /// A look at a wanted record before it is decoded: false skips it (a fold that decides
    /// by the record's key, like the API's index of where builds start).
    fn admit(&mut self, record: &Record) -> bool {
        let _ = record;
        true
    }

    /// Applies a record straight from its bytes, when the fold reads records itself
    /// (metering's usage ticks, borrowed from the record without decoding it): `true` = applied,
    /// the driver neither decodes it nor checks its event id (the fold dedupes what it reads this
    /// way itself); `false` (the default) = decode it and [`Self::apply`] it as usual. Called for
    /// every record past the partition's position, before [`Self::interest`] and
    /// [`Self::admit`].
    fn apply_record(
        &mut self,
        at: Position,
        record: &Record,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        let _ = (at, record);
        async { Ok(false) }
    }

    /// Applies one event, found at `at`.
    fn apply(
        &mut self,
        at: Position,
        env: Envelope,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// A batch was applied: `advances` are the positions it moved (every partition it read,
    /// even when nothing in it was wanted). Persist what it changed with them, atomically.
    fn commit(
        &mut self,
        advances: &[Advance],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = advances;
        async { Ok(()) }
    }

    /// A batch failed with `error` (nothing of it is committed; the positions did not move).
    /// `Some(positions)`: apply it again from these positions (the fold reloaded them from its
    /// store: another member wrote some partitions, it is fenced); `None`: fail with the error.
    fn retry(
        &mut self,
        error: &Self::Error,
    ) -> impl Future<Output = Result<Option<Vec<(Partition, Offset)>>, Self::Error>> + Send {
        let _ = error;
        async { Ok(None) }
    }

    /// `partitions` were revoked (another member owns them now): forget what is theirs.
    fn revoked(&mut self, partitions: &[Partition]) {
        let _ = partitions;
    }
}

/// The order of a catch-up; see [`Consumer::catch_up_in`]. The default ([`LogOrder`]): each
/// partition to its end, in turn.
pub trait Order<F: Fold> {
    /// Before reading, with the ends to reach: may look at the log first (metering scans it for
    /// invoices).
    fn start(
        &mut self,
        log: &dyn EventLog,
        fold: &mut F,
        positions: &BTreeMap<Partition, Offset>,
        ends: &BTreeMap<Partition, Offset>,
    ) -> impl Future<Output = Result<(), F::Error>> + Send {
        let _ = (log, fold, positions, ends);
        async { Ok(()) }
    }

    /// The offset `partition` may not be read past now (`None`: its end).
    fn limit(&self, fold: &F, partition: Partition) -> Option<Offset> {
        let _ = (fold, partition);
        None
    }

    /// Nothing can be read under the limits and some partition is short of its end: true to
    /// read on without limits, false to end the catch-up there.
    fn blocked(&mut self) -> bool {
        false
    }
}

/// Each partition to its end, in turn.
pub struct LogOrder;

impl<F: Fold> Order<F> for LogOrder {}

/// The positions a consumer has applied (and committed): per partition, its next offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub next: BTreeMap<Partition, Offset>,
}

impl Applied {
    /// Whether the record at `offset` of `partition` is applied.
    pub fn reached(&self, partition: Partition, offset: Offset) -> bool {
        self.next.get(&partition).is_some_and(|next| *next > offset)
    }

    /// Whether every partition has reached its offset in `ends` (indexed by partition, like
    /// [`EventLog::end_offsets`]) — partitions the consumer does not read are not looked at.
    pub fn reached_ends(&self, ends: &[Offset]) -> bool {
        self.next
            .iter()
            .all(|(p, next)| ends.get(*p as usize).is_none_or(|end| next >= end))
    }
}

/// Counters of what a consumer skipped (beside the process-wide skipped-records counter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Undecodable records and unknown payloads.
    pub malformed: u64,
    /// Re-delivered event ids.
    pub duplicates: u64,
}

/// Records read per page of a catch-up.
pub const PAGE: usize = 8192;

/// The driver of one [`Fold`]; see the [module docs](self).
pub struct Consumer<F: Fold> {
    fold: F,
    name: &'static str,
    interest: Interest,
    seen: SeenIds,
    positions: BTreeMap<Partition, Offset>,
    applied: watch::Sender<Applied>,
    advances: Vec<Advance>,
    skipped: Skipped,
    page: usize,
}

impl<F: Fold> Consumer<F> {
    /// Drives `fold` with the default window of re-delivered ids ([`SeenIds::default`]).
    pub fn new(fold: F) -> Self {
        Self::with_seen(fold, SeenIds::default())
    }

    /// Drives `fold` remembering ids in `seen` ([`SeenIds::unbounded`] for replay and audit).
    pub fn with_seen(fold: F, seen: SeenIds) -> Self {
        let name = fold.name();
        let interest = fold.interest();
        Consumer {
            fold,
            name,
            interest,
            seen,
            positions: BTreeMap::new(),
            applied: watch::channel(Applied::default()).0,
            advances: Vec::new(),
            skipped: Skipped::default(),
            page: PAGE,
        }
    }

    /// Reads catch-ups `page` records at a time.
    pub fn page(mut self, page: usize) -> Self {
        self.page = page.max(1);
        self
    }

    pub fn fold(&self) -> &F {
        &self.fold
    }

    pub fn fold_mut(&mut self) -> &mut F {
        &mut self.fold
    }

    pub fn into_fold(self) -> F {
        self.fold
    }

    /// The positions applied, as they move.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    /// The sender of [`Self::applied`], to hand to readers that outlive this consumer.
    pub fn applied_sender(&self) -> &watch::Sender<Applied> {
        &self.applied
    }

    /// The next offset of each partition read so far.
    pub fn positions(&self) -> &BTreeMap<Partition, Offset> {
        &self.positions
    }

    /// The next offset of `partition`.
    pub fn position(&self, partition: Partition) -> Offset {
        self.positions.get(&partition).copied().unwrap_or(0)
    }

    /// What was skipped so far.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// Starts `partitions` where the fold says ([`Fold::start`]); the others at 0.
    pub async fn start(&mut self, partitions: &[Partition]) -> Result<(), F::Error> {
        let stored = self.fold.start(partitions).await?;
        for p in partitions {
            let at = stored
                .iter()
                .find(|(q, _)| q == p)
                .map_or(0, |(_, offset)| *offset);
            self.positions.insert(*p, at);
        }
        self.publish();
        Ok(())
    }

    /// Sets the positions of some partitions (the fold reloaded its store: fenced).
    pub fn set_positions(&mut self, positions: &[(Partition, Offset)]) {
        self.positions.extend(positions.iter().copied());
        self.publish();
    }

    fn publish(&self) {
        let positions = &self.positions;
        self.applied.send_if_modified(|a| {
            if a.next == *positions {
                return false;
            }
            a.next.clone_from(positions);
            true
        });
    }

    /// Applies `records` (any partitions, each in offset order) and commits them as a batch;
    /// on an error the fold may have it applied again ([`Fold::retry`]).
    pub async fn apply(&mut self, records: &[Record]) -> Result<(), F::Error> {
        loop {
            let error = match self.try_apply(records).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            match self.fold.retry(&error).await? {
                Some(positions) => self.set_positions(&positions),
                None => return Err(error),
            }
        }
    }

    async fn try_apply(&mut self, records: &[Record]) -> Result<(), F::Error> {
        let seen_before = self.seen.len();
        self.advances.clear();
        let result = self.apply_records(records).await;
        let result = match result {
            Ok(()) if self.advances.is_empty() => return Ok(()),
            Ok(()) => self.fold.commit(&self.advances).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                for a in &self.advances {
                    self.positions.insert(a.partition, a.to);
                }
                self.publish();
                Ok(())
            }
            Err(e) => {
                // Applied again later: forget this batch's ids (the positions did not move).
                self.seen
                    .forget_last(self.seen.len().saturating_sub(seen_before));
                Err(e)
            }
        }
    }

    async fn apply_records(&mut self, records: &[Record]) -> Result<(), F::Error> {
        for record in records {
            match self
                .advances
                .iter_mut()
                .find(|a| a.partition == record.partition)
            {
                Some(advance) => {
                    if record.offset < advance.to {
                        continue;
                    }
                    advance.to = record.offset + 1;
                }
                None => {
                    let from = self.position(record.partition);
                    if record.offset < from {
                        continue; // applied before: a re-delivery of the partition
                    }
                    self.advances.push(Advance {
                        partition: record.partition,
                        from,
                        to: record.offset + 1,
                    });
                }
            }
            let at = Position {
                partition: record.partition,
                offset: record.offset,
            };
            if self.fold.apply_record(at, record).await? {
                continue;
            }
            if self.interest.admits(&record.data) == Admit::Skip || !self.fold.admit(record) {
                continue;
            }
            let Some(env) = record.envelope_for(self.name) else {
                self.skipped.malformed += 1; // logged and counted per process
                continue;
            };
            if !self.seen.first_time(&env.event_id) {
                self.skipped.duplicates += 1;
                tracing::debug!(consumer = self.name, event_id = %env.event_id, partition = record.partition, offset = record.offset, "skipping a re-delivered event");
                continue;
            }
            self.fold.apply(at, env).await?;
        }
        Ok(())
    }

    /// Applies every record of `partitions` up to the ends they have now, a page at a time, in
    /// the log's order ([`LogOrder`]).
    pub async fn catch_up(
        &mut self,
        log: &dyn EventLog,
        partitions: impl IntoIterator<Item = Partition>,
    ) -> Result<(), F::Error> {
        let ends = ends_now(log, partitions).await?;
        self.catch_up_in(log, &ends, &mut LogOrder).await
    }

    /// Applies every record before `ends` (the offset not to read, per partition), a page at
    /// a time, in the log's order: a replay of a prefix of the log.
    pub async fn catch_up_to(
        &mut self,
        log: &dyn EventLog,
        ends: &[(Partition, Offset)],
    ) -> Result<(), F::Error> {
        let ends: BTreeMap<Partition, Offset> = ends.iter().copied().collect();
        self.catch_up_in(log, &ends, &mut LogOrder).await
    }

    /// Applies every record before `ends` in `order`: the partition read next is the first one
    /// (by number) short of both its end and its limit.
    pub async fn catch_up_in<O: Order<F>>(
        &mut self,
        log: &dyn EventLog,
        ends: &BTreeMap<Partition, Offset>,
        order: &mut O,
    ) -> Result<(), F::Error> {
        for p in ends.keys() {
            self.positions.entry(*p).or_insert(0);
        }
        order
            .start(log, &mut self.fold, &self.positions, ends)
            .await?;
        // The next page of the partition being read, fetched while the current one is applied
        // (partition, its first offset, the records): reading and folding overlap.
        let mut ahead: Option<(Partition, Offset, Vec<Record>)> = None;
        loop {
            let mut read = false;
            for (&p, &end) in ends {
                let limit = order.limit(&self.fold, p).map_or(end, |l| l.min(end));
                let from = self.position(p);
                if from >= limit {
                    continue;
                }
                let want = usize::try_from(limit - from)
                    .unwrap_or(self.page)
                    .min(self.page);
                let mut records = match ahead.take() {
                    Some((ap, af, records)) if ap == p && af == from => records,
                    _ => log.read_partition(p, from, want).await?,
                };
                records.retain(|r| r.offset < limit);
                if records.is_empty() {
                    continue;
                }
                // Read on while this page is folded, unless a limit (a barrier) holds this
                // partition back: what is past it may not be read yet.
                let next = records.last().map_or(from, |r| r.offset + 1);
                let page = self.page;
                let prefetch = async {
                    if limit < end || next >= end {
                        return Ok(None);
                    }
                    let want = usize::try_from(end - next).unwrap_or(page).min(page);
                    log.read_partition(p, next, want)
                        .await
                        .map(|records| Some((p, next, records)))
                };
                let (applied, fetched) = tokio::join!(self.apply(&records), prefetch);
                applied?;
                ahead = fetched?;
                read = true;
                break;
            }
            if read {
                continue;
            }
            let done = ends.iter().all(|(p, end)| self.position(*p) >= *end);
            if done || !order.blocked() {
                self.publish();
                return Ok(());
            }
        }
    }

    /// A subscription to `partitions` from the positions reached (0 for a partition never
    /// read), for a service that selects on it beside its own work: hand each batch to
    /// [`Self::apply`] (outside the `select!`, which may drop a pending `next_batch` but not an
    /// applied batch).
    pub fn subscribe(
        &mut self,
        log: &dyn EventLog,
        partitions: impl IntoIterator<Item = Partition>,
    ) -> Box<dyn crate::Subscription> {
        let from: Vec<(Partition, Offset)> = partitions
            .into_iter()
            .map(|p| (p, self.position(p)))
            .collect();
        for (p, o) in &from {
            self.positions.insert(*p, *o);
        }
        log.subscribe_partitions(&from)
    }

    /// Catches up on every partition of `topic`, then follows them until `shutdown` resolves
    /// (`Ok`), the log closes or the fold fails.
    pub async fn follow(
        &mut self,
        log: &dyn EventLog,
        topic: Topic,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), F::Error> {
        let partitions: Vec<Partition> = log.layout().topic_partitions(topic).collect();
        tokio::pin!(shutdown);
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            r = self.catch_up(log, partitions.iter().copied()) => r?,
        }
        let mut sub = self.subscribe(log, partitions);
        loop {
            let batch = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                batch = sub.next_batch() => batch?,
            };
            self.apply(&batch).await?;
        }
    }

    /// Runs as a member of consumer group `group` on `topic` until `shutdown` resolves (then it
    /// commits and leaves the group, so its partitions go to the other members at once), the
    /// log closes, or an error. An assigned partition starts where the fold says
    /// ([`Fold::start`]), never at the group's committed offset (kept for lag metrics only); a
    /// revoked one is committed and forgotten ([`Fold::revoked`]) before the hand-over.
    pub async fn run_group(
        &mut self,
        log: &dyn EventLog,
        group: &str,
        topic: Topic,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), F::Error> {
        let mut member = log.join_group(group, &[topic]).await?;
        let name = self.name;
        tokio::pin!(shutdown);
        loop {
            let event = tokio::select! {
                biased;
                () = &mut shutdown => {
                    let owned = member.assigned();
                    member.commit(&self.positions_of(&owned)).await?;
                    member.leave().await?;
                    tracing::info!(consumer = name, partitions = ?owned, "left the group");
                    return Ok(());
                }
                event = member.next() => event?,
            };
            match event {
                GroupEvent::Assigned(partitions) => {
                    self.start(&partitions).await?;
                    let start = self.positions_of(&partitions);
                    member.start_at(&start);
                    tracing::info!(consumer = name, ?start, "partitions assigned");
                }
                GroupEvent::Revoked(partitions) => {
                    member.commit(&self.positions_of(&partitions)).await?;
                    self.fold.revoked(&partitions);
                    for p in &partitions {
                        self.positions.remove(p);
                    }
                    self.publish();
                    tracing::info!(consumer = name, ?partitions, "partitions revoked");
                }
                GroupEvent::Records(records) => self.apply(&records).await?,
            }
        }
    }

    fn positions_of(&self, partitions: &[Partition]) -> Vec<(Partition, Offset)> {
        partitions
            .iter()
            .filter_map(|p| self.positions.get(p).map(|o| (*p, *o)))
            .collect()
    }
}

/// The end of each of `partitions` now.
pub async fn ends_now(
    log: &dyn EventLog,
    partitions: impl IntoIterator<Item = Partition>,
) -> Result<BTreeMap<Partition, Offset>, LogError> {
    let all = log.end_offsets().await?;
    Ok(partitions
        .into_iter()
        .map(|p| (p, all.get(p as usize).copied().unwrap_or(0)))
        .collect())
}

/// Waits until `applied` has reached `position` (the record at it is applied), at most
/// `within`. `Err` says how far the consumer got.
pub async fn wait_applied(
    applied: &mut watch::Receiver<Applied>,
    position: Position,
    within: std::time::Duration,
) -> Result<(), NotApplied> {
    let wait = applied.wait_for(|a| a.reached(position.partition, position.offset));
    let waited = tokio::time::timeout(within, wait)
        .await
        .map(|r| r.map(|_| ()));
    match waited {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(NotApplied {
            position,
            at: None,
            closed: true,
        }),
        Err(_) => Err(NotApplied {
            position,
            at: applied.borrow().next.get(&position.partition).copied(),
            closed: false,
        }),
    }
}

/// A write was not applied in time; see [`wait_applied`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.explain())]
pub struct NotApplied {
    pub position: Position,
    /// The consumer's next offset in that partition when the wait gave up.
    pub at: Option<Offset>,
    /// The consumer stopped.
    pub closed: bool,
}

impl NotApplied {
    fn explain(&self) -> String {
        let Position { partition, offset } = self.position;
        if self.closed {
            return format!(
                "the event at offset {offset} of partition {partition} was written, but the \
                 consumer that reads it stopped: check the server's log"
            );
        }
        match self.at {
            Some(at) => format!(
                "the event at offset {offset} of partition {partition} was written, but the \
                 server has applied that partition only up to offset {at} so far: it is \
                 behind; retry in a moment"
            ),
            None => format!(
                "the event at offset {offset} of partition {partition} was written, but the \
                 server does not read that partition yet: retry in a moment"
            ),
        }
    }
}
