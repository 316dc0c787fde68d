//! Exponential backoff with jitter, for reconnecting and for re-sending events.

use std::time::Duration;

/// The bounds of a [`Backoff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first delay, and the smallest.
    pub min: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// 100 ms, doubling up to 10 s.
    fn default() -> Self {
        BackoffPolicy {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Delays that double from `min` to `max`; each is drawn at random from the upper half of its
/// step (`[step / 2, step]`, never below `min`), so many agents that lost the same server do not
/// come back in lock step.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    step: Duration,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            policy,
            step: policy.min,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let max = self.policy.max.max(self.policy.min);
        let step = self.step.min(max);
        self.step = step.saturating_mul(2).min(max);
        let low = (step / 2).max(self.policy.min).min(step);
        if low >= step {
            return step;
        }
        let nanos = rand::random_range(low.as_nanos()..=step.as_nanos());
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.step = self.policy.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds_and_grow_to_the_cap() {
        let policy = BackoffPolicy::default();
        for _ in 0..200 {
            let mut b = Backoff::new(policy);
            let mut last_step = Duration::ZERO;
            for i in 0..20 {
                let d = b.next_delay();
                assert!(d >= policy.min, "delay {d:?} below min");
                assert!(d <= policy.max, "delay {d:?} above max");
                let step = policy.min.saturating_mul(1 << i.min(10)).min(policy.max);
                assert!(d <= step, "delay {d:?} above its step {step:?}");
                assert!(d >= step / 2, "delay {d:?} below half its step {step:?}");
                assert!(step >= last_step);
                last_step = step;
            }
            // After enough failures every delay is in the top half of the cap.
            let d = b.next_delay();
            assert!(d >= policy.max / 2);
        }
    }

    #[test]
    fn first_delay_is_the_minimum_and_reset_goes_back_to_it() {
        let policy = BackoffPolicy::default();
        let mut b = Backoff::new(policy);
        assert_eq!(b.next_delay(), policy.min);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.next_delay(), policy.min);
    }

    #[test]
    fn degenerate_policies_do_not_panic() {
        let mut b = Backoff::new(BackoffPolicy {
            min: Duration::from_secs(5),
            max: Duration::from_secs(1),
        });
        assert_eq!(b.next_delay(), Duration::from_secs(5));
        let mut z = Backoff::new(BackoffPolicy {
            min: Duration::ZERO,
            max: Duration::ZERO,
        });
        assert_eq!(z.next_delay(), Duration::ZERO);
    }
}
