//! Conformance checks for consumer groups ([`EventLog::join_group`]), shared by every backend.
//!
//! A partitioned log (Kafka) splits its partitions between members; a single-partition log
//! (SQLite) has one active member per group and the others wait. The checks branch on
//! [`Layout::partitions`] where that matters, and say so.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::mixed_event;
use crate::{EventLog, GroupEvent, GroupSubscription, Offset, Partition, Record, Topic};

/// Kafka rebalances take seconds; waits for the group are this generous.
const GROUP_STALL: Duration = Duration::from_secs(90);

const TOPICS: [Topic; 2] = [Topic::Events, Topic::Logs];

fn event_id(record: &Record) -> String {
    record
        .decode()
        .map(|e| e.event_id)
        .unwrap_or_else(|e| panic!("record {record:?} does not decode: {e}"))
}

/// The partitions a member of a group reading both topics can be assigned: all of them.
fn all_partitions(log: &dyn EventLog) -> BTreeSet<Partition> {
    log.layout().all().collect()
}

/// Appends `n` events (both topics) of keys `<prefix>-0..keys`; returns their event ids.
async fn append_events(log: &dyn EventLog, prefix: &str, n: u64, keys: u64) -> Vec<String> {
    let events: Vec<_> = (0..n)
        .map(|i| mixed_event(&format!("{prefix}-{}", i % keys), i))
        .collect();
    log.append(&events).await.expect("append");
    events.into_iter().map(|e| e.event_id).collect()
}

/// Drives `member` until it has seen every id of `want` (ignoring others), committing after each
/// batch. Returns every event id it saw, in order.
async fn consume_until(
    member: &mut dyn GroupSubscription,
    want: &BTreeSet<String>,
    start_at_zero: bool,
    what: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut missing = want.clone();
    while !missing.is_empty() {
        let event = tokio::time::timeout(GROUP_STALL, member.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: stalled with {} of {} events missing",
                    missing.len(),
                    want.len()
                )
            })
            .unwrap_or_else(|e| panic!("{what}: next: {e}"));
        match event {
            GroupEvent::Assigned(partitions) => {
                if start_at_zero {
                    let zero: Vec<(Partition, Offset)> =
                        partitions.iter().map(|p| (*p, 0)).collect();
                    member.start_at(&zero);
                }
            }
            GroupEvent::Revoked(_) => {}
            GroupEvent::Records(records) => {
                assert!(!records.is_empty(), "{what}: an empty batch");
                let mut positions: BTreeMap<Partition, Offset> = BTreeMap::new();
                for record in &records {
                    let id = event_id(record);
                    missing.remove(&id);
                    seen.push(id);
                    positions.insert(record.partition, record.offset + 1);
                }
                let positions: Vec<_> = positions.into_iter().collect();
                member.commit(&positions).await.expect("commit");
            }
        }
    }
    seen
}

/// A lone member gets every partition and every record; what it commits is where the next
/// member of the group starts; a member that says where to start (`start_at`) starts there.
pub async fn group_member_commits_and_resumes(log: Arc<dyn EventLog>) {
    let first = append_events(&*log, "g", 40, 8).await;
    let mut a = log.join_group("resume", &TOPICS).await.expect("join");
    let seen = consume_until(&mut *a, &first.iter().cloned().collect(), false, "member a").await;
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>().len(),
        seen.len(),
        "member a saw an event twice"
    );
    assert_eq!(
        a.assigned().into_iter().collect::<BTreeSet<_>>(),
        all_partitions(&*log),
        "a lone member owns every partition"
    );
    a.leave().await.expect("leave");

    let second = append_events(&*log, "g", 10, 8).await;
    let mut b = log.join_group("resume", &TOPICS).await.expect("join");
    let seen = consume_until(
        &mut *b,
        &second.iter().cloned().collect(),
        false,
        "member b",
    )
    .await;
    let old: Vec<_> = seen.iter().filter(|id| first.contains(id)).collect();
    assert!(
        old.is_empty(),
        "member b re-read {} events member a had committed: it must resume at the commit",
        old.len()
    );
    b.leave().await.expect("leave");

    let mut c = log.join_group("resume", &TOPICS).await.expect("join");
    let all: BTreeSet<String> = first.iter().chain(&second).cloned().collect();
    let seen = consume_until(&mut *c, &all, true, "member c (start_at 0)").await;
    assert_eq!(seen.len(), all.len(), "start_at(0) reads everything once");
    c.leave().await.expect("leave");

    let mut other = log.join_group("other", &TOPICS).await.expect("join");
    let seen = consume_until(&mut *other, &all, false, "another group").await;
    assert_eq!(
        seen.len(),
        all.len(),
        "another group has positions of its own"
    );
    other.leave().await.expect("leave");
}

/// What the members of [`group_members_split_and_hand_over`] did.
#[derive(Default)]
struct Shared {
    /// Per member, the partitions it owns.
    owned: HashMap<&'static str, BTreeSet<Partition>>,
    /// Every (member, event id) processed, in order.
    processed: Vec<(&'static str, String)>,
    /// Records delivered for a partition the member did not own.
    violations: Vec<String>,
}

/// A member's loop: processes records (remembering their event ids), commits after every batch
/// and on revoke; leaves when `stop` turns true.
async fn member(
    name: &'static str,
    mut sub: Box<dyn GroupSubscription>,
    shared: Arc<Mutex<Shared>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut positions: BTreeMap<Partition, Offset> = BTreeMap::new();
    loop {
        if *stop.borrow_and_update() {
            sub.leave().await.expect("leave");
            let mut shared = shared.lock().expect("lock");
            shared.owned.remove(name);
            return;
        }
        let event = tokio::select! {
            event = sub.next() => event.unwrap_or_else(|e| panic!("{name}: next: {e}")),
            _ = stop.changed() => continue,
        };
        match event {
            GroupEvent::Assigned(partitions) => {
                let mut shared = shared.lock().expect("lock");
                shared.owned.entry(name).or_default().extend(partitions);
            }
            GroupEvent::Revoked(partitions) => {
                let commit: Vec<_> = positions
                    .iter()
                    .filter(|(p, _)| partitions.contains(p))
                    .map(|(p, o)| (*p, *o))
                    .collect();
                sub.commit(&commit).await.expect("commit on revoke");
                let mut shared = shared.lock().expect("lock");
                if let Some(owned) = shared.owned.get_mut(name) {
                    owned.retain(|p| !partitions.contains(p));
                }
            }
            GroupEvent::Records(records) => {
                let mut batch: BTreeMap<Partition, Offset> = BTreeMap::new();
                {
                    let mut shared = shared.lock().expect("lock");
                    for record in &records {
                        let owns = shared
                            .owned
                            .get(name)
                            .is_some_and(|o| o.contains(&record.partition));
                        if !owns {
                            shared.violations.push(format!(
                                "{name} got offset {} of partition {} it does not own",
                                record.offset, record.partition
                            ));
                        }
                        shared.processed.push((name, event_id(record)));
                        batch.insert(record.partition, record.offset + 1);
                    }
                }
                positions.extend(batch.iter());
                let batch: Vec<_> = batch.into_iter().collect();
                sub.commit(&batch).await.expect("commit");
            }
        }
    }
}

async fn wait_for(shared: &Arc<Mutex<Shared>>, what: &str, done: impl Fn(&Shared) -> bool) {
    let deadline = tokio::time::Instant::now() + GROUP_STALL;
    loop {
        if done(&shared.lock().expect("lock")) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn processed_all(shared: &Shared, ids: &[String]) -> bool {
    let seen: BTreeSet<&String> = shared.processed.iter().map(|(_, id)| id).collect();
    ids.iter().all(|id| seen.contains(id))
}

/// Two members of a group: on a partitioned log they split the partitions (each owns some, none
/// both); on a single-partition log the second waits. When the first leaves, the second owns
/// every partition. Every event is processed exactly once (members commit after each batch and
/// on revoke), and no member gets a record of a partition it does not own.
pub async fn group_members_split_and_hand_over(log: Arc<dyn EventLog>) {
    let all = all_partitions(&*log);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut ids = append_events(&*log, "h", 60, 24).await;

    let (stop_a, stop_a_rx) = watch::channel(false);
    let (stop_b, stop_b_rx) = watch::channel(false);
    let a = log.join_group("split", &TOPICS).await.expect("join a");
    let task_a = tokio::spawn(member("a", a, shared.clone(), stop_a_rx));
    wait_for(&shared, "a owns every partition", |s| {
        s.owned.get("a").is_some_and(|o| *o == all)
    })
    .await;
    wait_for(&shared, "a processed the first events", |s| {
        processed_all(s, &ids)
    })
    .await;

    let b = log.join_group("split", &TOPICS).await.expect("join b");
    let task_b = tokio::spawn(member("b", b, shared.clone(), stop_b_rx));
    if all.len() > 1 {
        wait_for(&shared, "a and b split the partitions", |s| {
            let a = s.owned.get("a").cloned().unwrap_or_default();
            let b = s.owned.get("b").cloned().unwrap_or_default();
            !a.is_empty()
                && !b.is_empty()
                && a.is_disjoint(&b)
                && a.union(&b).copied().collect::<BTreeSet<_>>() == all
        })
        .await;
    }
    let more = append_events(&*log, "h2", 40, 24).await;
    ids.extend(more);
    wait_for(
        &shared,
        "the members processed the events appended while both ran",
        |s| processed_all(s, &ids),
    )
    .await;
    if all.len() == 1 {
        let shared = shared.lock().expect("lock");
        assert!(
            shared.owned.get("b").is_none_or(|o| o.is_empty()),
            "on a single-partition log the second member waits while the first owns partition 0"
        );
        assert!(
            shared.processed.iter().all(|(m, _)| *m == "a"),
            "only the active member processes records"
        );
    }

    stop_a.send(true).expect("stop a");
    tokio::time::timeout(GROUP_STALL, task_a)
        .await
        .expect("a leaves in time")
        .expect("member a");
    wait_for(&shared, "b owns every partition after a left", |s| {
        s.owned.get("b").is_some_and(|o| *o == all)
    })
    .await;
    let last = append_events(&*log, "h3", 40, 24).await;
    ids.extend(last);
    wait_for(&shared, "b processed everything", |s| {
        processed_all(s, &ids)
    })
    .await;
    stop_b.send(true).expect("stop b");
    tokio::time::timeout(GROUP_STALL, task_b)
        .await
        .expect("b leaves in time")
        .expect("member b");

    let shared = shared.lock().expect("lock");
    assert!(shared.violations.is_empty(), "{:?}", shared.violations);
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for (_, id) in &shared.processed {
        *counts.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} events were processed twice although every batch was committed: {twice:?}",
        twice.len()
    );
    assert_eq!(counts.len(), ids.len(), "every event processed");
    if all.len() > 1 {
        assert!(
            shared.processed.iter().any(|(m, _)| *m == "b")
                && shared.processed.iter().any(|(m, _)| *m == "a"),
            "both members processed records"
        );
    }
}
