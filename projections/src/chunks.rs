//! Log byte counts from a separate logs topic, folded independently of the build's state events.
//!
//! On Kafka a build's `LogChunk`s are in the logs topic, so their order relative to the build's
//! `JobQueued`/`LineStarted` is not kept: folding them into the build would make the read model
//! depend on how the two topics interleave. Instead chunks add to a counter per
//! (build, job, attempt, step, line) — a sum, so any order gives the same counts — and a job's
//! and line's `log_bytes` are taken from the counters of the job's *current* attempt
//! ([`overlay`]) when the build is read. Pure.

use std::collections::BTreeMap;

use tributary_proto::events::{envelope::Payload, Envelope};

use crate::builds::Build;

/// Which line of which attempt a chunk's bytes belong to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkKey {
    pub build_id: String,
    pub job: String,
    pub attempt: u32,
    pub step: u32,
    pub line: u32,
}

/// Bytes per line of an attempt.
pub type ChunkCounts = BTreeMap<ChunkKey, u64>;

/// The counter a chunk adds to, and how much; `None` for other events.
pub fn chunk_of(env: &Envelope) -> Option<(ChunkKey, u64)> {
    match &env.payload {
        Some(Payload::LogChunk(c)) => Some((
            ChunkKey {
                build_id: env.build_id.clone(),
                job: c.job.clone(),
                attempt: c.attempt,
                step: c.step,
                line: c.line,
            },
            c.data.len() as u64,
        )),
        _ => None,
    }
}

/// Adds `env`'s bytes, if it is a chunk; returns whether it was.
pub fn add(counts: &mut ChunkCounts, env: &Envelope) -> bool {
    match chunk_of(env) {
        Some((key, bytes)) => {
            *counts.entry(key).or_default() += bytes;
            true
        }
        None => false,
    }
}

/// Sets the `log_bytes` of `build`'s jobs and lines from `counts` (the counters of this build),
/// for each job's current attempt, where that attempt has counters. Jobs and lines without any
/// keep what they have (on a log without a logs topic the fold counted their chunks itself).
pub fn overlay(build: &mut Build, counts: &ChunkCounts) {
    for job in &mut build.jobs {
        let mut total = None;
        for (key, bytes) in counts {
            if key.build_id != build.id || key.job != job.id || key.attempt != job.attempt {
                continue;
            }
            *total.get_or_insert(0) += bytes;
            if let Some(line) = job
                .steps
                .get_mut(key.step as usize)
                .and_then(|s| s.lines.get_mut(key.line as usize))
            {
                line.log_bytes = *bytes;
            }
        }
        if let Some(total) = total {
            job.log_bytes = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builds::{Job, Line, Step};
    use proptest::prelude::*;
    use tributary_proto::events::LogChunk;

    fn chunk(job: &str, attempt: u32, step: u32, line: u32, data: &str) -> Envelope {
        Envelope {
            event_id: tributary_proto::new_id(),
            build_id: "b".into(),
            payload: Some(Payload::LogChunk(LogChunk {
                job: job.into(),
                attempt,
                step,
                line,
                data: data.as_bytes().to_vec(),
                ..LogChunk::default()
            })),
            ..Envelope::default()
        }
    }

    fn build(attempt: u32) -> Build {
        Build {
            id: "b".into(),
            jobs: vec![Job {
                id: "j".into(),
                attempt,
                steps: vec![Step {
                    lines: vec![Line::default(), Line::default()],
                    ..Step::default()
                }],
                ..Job::default()
            }],
            ..Build::default()
        }
    }

    #[test]
    fn the_current_attempts_counters_set_job_and_line_bytes() {
        let mut counts = ChunkCounts::new();
        for c in [
            chunk("j", 1, 0, 0, "12345"),
            chunk("j", 2, 0, 0, "ab"),
            chunk("j", 2, 0, 1, "cde"),
            chunk("j", 2, 0, 1, "f"),
        ] {
            assert!(add(&mut counts, &c));
        }
        let mut b = build(2);
        overlay(&mut b, &counts);
        assert_eq!(b.jobs[0].log_bytes, 6);
        assert_eq!(b.jobs[0].steps[0].lines[0].log_bytes, 2);
        assert_eq!(b.jobs[0].steps[0].lines[1].log_bytes, 4);
        let mut first = build(1);
        overlay(&mut first, &counts);
        assert_eq!(
            first.jobs[0].log_bytes, 5,
            "only the current attempt counts"
        );
        let mut none = build(3);
        none.jobs[0].log_bytes = 7;
        overlay(&mut none, &counts);
        assert_eq!(
            none.jobs[0].log_bytes, 7,
            "no counters: the fold's value stays"
        );
    }

    proptest! {
        /// Counts are sums: any order of the chunks gives the same result.
        #[test]
        fn order_does_not_matter(sizes in prop::collection::vec((0u32..3, 0u32..2, 1usize..20), 1..30),
                                 seed in any::<u64>()) {
            let chunks: Vec<Envelope> = sizes
                .iter()
                .map(|(attempt, line, n)| chunk("j", *attempt, 0, *line, &"x".repeat(*n)))
                .collect();
            let mut forward = ChunkCounts::new();
            for c in &chunks {
                add(&mut forward, c);
            }
            let mut shuffled = chunks.clone();
            // A deterministic permutation from the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let mut backward = ChunkCounts::new();
            for c in &shuffled {
                add(&mut backward, c);
            }
            prop_assert_eq!(&forward, &backward);
            let (mut a, mut b) = (build(1), build(1));
            overlay(&mut a, &forward);
            overlay(&mut b, &backward);
            prop_assert_eq!(a, b);
        }
    }
}
