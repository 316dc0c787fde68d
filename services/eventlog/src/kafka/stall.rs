//! Noticing a subscribed partition that librdkafka stopped fetching.
//!
//! After a broker restart, librdkafka can leave a partition of an `assign()`ed consumer in a
//! fetch state it never leaves: the consumer keeps polling, other partitions flow, and that
//! partition's new records never come (confluentinc/librdkafka#5153, fede1024/rust-rdkafka#597;
//! seen here in the broker-restart test: the API's and the schedulers' folds stopped on two of
//! four partitions while a fresh subscription read them fine). Nothing reports it, so the
//! subscription thread checks, every `period`, each partition that made no progress since the
//! last check against the partition's high watermark, and declares it stalled when the records
//! it saw there at one check are still not fetched at the next one. A healthy consumer fetches a
//! new record within `fetch.wait.max.ms` (100 ms), so a stall is never a slow fetch; the thread
//! then replaces its consumer (`kafka.rs`), assigned at the offsets it expects next.
//!
//! [`StallWatch`] is the pure decision; the thread gives it the offsets and asks the
//! watermarks.

use std::time::{Duration, Instant};

use crate::Offset;

/// What a subscription thread knows of one partition between checks.
#[derive(Clone, Copy, Debug, Default)]
struct Watched {
    /// The next offset expected, as of the last check.
    next_at_check: Offset,
    /// A high watermark beyond `next_at_check` seen at the last check: records that existed
    /// then and had not been fetched.
    unfetched_to: Option<Offset>,
}

/// The stall check of one subscription's partitions (in the subscription's order).
#[derive(Debug)]
pub(super) struct StallWatch {
    period: Duration,
    last_check: Instant,
    partitions: Vec<Watched>,
}

impl StallWatch {
    /// Watches partitions expecting `nexts`, checking every `period`.
    pub fn new(period: Duration, now: Instant, nexts: &[Offset]) -> Self {
        let mut watch = StallWatch {
            period,
            last_check: now,
            partitions: Vec::new(),
        };
        watch.reset(now, nexts);
        watch
    }

    /// Whether a check is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now.duration_since(self.last_check) >= self.period
    }

    /// A check at `now`: `nexts[i]` is partition i's next offset now, `high(i)` its high
    /// watermark (asked only of the partitions that made no progress since the last check;
    /// `None` when it cannot be had, as while the broker is away: then no other partition is
    /// asked in this check, so a check does not wait on each in turn). Returns the stalled
    /// partitions' indices: no progress for a whole period though records were there to fetch at
    /// its start.
    pub fn check(
        &mut self,
        now: Instant,
        nexts: &[Offset],
        mut high: impl FnMut(usize) -> Option<Offset>,
    ) -> Vec<usize> {
        self.last_check = now;
        let mut stalled = Vec::new();
        let mut answering = true;
        for (i, (watched, &next)) in self.partitions.iter_mut().zip(nexts).enumerate() {
            if next != watched.next_at_check {
                *watched = Watched {
                    next_at_check: next,
                    unfetched_to: None,
                };
                continue;
            }
            if watched.unfetched_to.is_some_and(|to| to > next) {
                stalled.push(i);
                watched.unfetched_to = None;
                continue;
            }
            let seen = answering.then(|| high(i)).flatten();
            answering = seen.is_some();
            watched.unfetched_to = seen.filter(|h| *h > next);
        }
        stalled
    }

    /// Starts over from `nexts`: after the thread could not fetch for a while of its own accord
    /// (its reader applied back pressure), so an old suspicion proves nothing.
    pub fn reset(&mut self, now: Instant, nexts: &[Offset]) {
        self.last_check = now;
        self.partitions = nexts
            .iter()
            .map(|&next| Watched {
                next_at_check: next,
                unfetched_to: None,
            })
            .collect();
    }

    /// The time between checks (back pressure longer than half of it calls for a
    /// [`StallWatch::reset`]).
    pub fn period(&self) -> Duration {
        self.period
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(5);

    #[test]
    fn a_partition_behind_its_watermark_for_a_whole_period_is_stalled() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(P, t0, &[10, 4]);
        assert!(!watch.due(t0 + Duration::from_secs(4)));
        assert!(watch.due(t0 + P));
        // No progress on either; partition 0 has records up to 12, partition 1 is at its end.
        let highs = [12, 4];
        assert!(watch.check(t0 + P, &[10, 4], |i| Some(highs[i])).is_empty());
        // Still at 10 a period later: stalled. Partition 1 is idle, not stalled.
        assert_eq!(
            watch.check(t0 + 2 * P, &[10, 4], |i| Some(highs[i])),
            vec![0]
        );
    }

    #[test]
    fn progress_or_an_unknown_watermark_clears_the_suspicion() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(P, t0, &[10, 4]);
        // Neither moved and both have records to fetch: both are suspect.
        assert!(watch.check(t0 + P, &[10, 4], |_| Some(20)).is_empty());
        // Partition 0 moved on (cleared); partition 1 did not (stalled). Neither is asked again.
        let mut asked = Vec::new();
        let stalled = watch.check(t0 + 2 * P, &[11, 4], |i| {
            asked.push(i);
            Some(20)
        });
        assert_eq!(stalled, vec![1]);
        assert!(
            asked.is_empty(),
            "a moving or confirmed partition is not asked: {asked:?}"
        );
        // The broker away: no watermark, no suspicion, however long; after the first question
        // left unanswered, no other partition is asked in that check.
        let mut watch = StallWatch::new(P, t0, &[10, 4]);
        for k in 1..5 {
            let mut asked = Vec::new();
            let stalled = watch.check(t0 + k * P, &[10, 4], |i| {
                asked.push(i);
                None
            });
            assert!(stalled.is_empty());
            assert_eq!(asked, [0]);
        }
    }

    #[test]
    fn a_reset_after_back_pressure_forgets_what_was_seen() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(P, t0, &[10]);
        assert!(watch.check(t0 + P, &[10], |_| Some(30)).is_empty());
        watch.reset(t0 + 2 * P, &[10]);
        assert!(!watch.due(t0 + 2 * P));
        assert!(watch.check(t0 + 3 * P, &[10], |_| Some(30)).is_empty());
        assert_eq!(watch.check(t0 + 4 * P, &[10], |_| Some(30)), vec![0]);
    }
}
