//! Expected job durations from past runs: a per-job moving average, folded from finished jobs.

use std::collections::BTreeMap;

/// Expected run time per job key (the pool fold keys by `tenant/project/job`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Durations {
    average_us: BTreeMap<String, i64>,
}

impl Durations {
    /// Folds one finished run: an exponential moving average weighting the new run 1/4.
    pub fn record(&mut self, key: &str, duration_us: i64) {
        let d = duration_us.max(0);
        self.average_us
            .entry(key.to_owned())
            .and_modify(|avg| *avg = (*avg * 3 + d) / 4)
            .or_insert(d);
    }

    /// Expected run time of `key`, or `default_us` for a job never seen finishing.
    pub fn expected(&self, key: &str, default_us: i64) -> i64 {
        self.average_us.get(key).copied().unwrap_or(default_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_past_runs_and_defaults_for_new_jobs() {
        let mut d = Durations::default();
        assert_eq!(d.expected("build", 7), 7);
        d.record("build", 100);
        assert_eq!(d.expected("build", 7), 100);
        d.record("build", 200);
        assert_eq!(d.expected("build", 7), 125);
    }
}
