//! Opening a long log at its end: where a build's live stream starts so that at most a given
//! number of log bytes come before the live part, and how many lines each job had before that
//! point (so line numbers stay those of the whole log). The page then never holds more than
//! the tail of a 100 MB log; the raw log and "load all" have the rest.

use std::collections::BTreeMap;

/// One `LogChunk` of the build, in log order.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub offset: u64,
    pub job: String,
    pub bytes: u64,
    /// Newlines in the chunk.
    pub lines: u64,
}

/// What comes before the start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    /// First offset to replay; 0 when nothing is skipped.
    pub from: u64,
    pub bytes: u64,
    /// Lines before `from`, per job.
    pub lines: BTreeMap<String, u64>,
}

/// The latest start such that the chunks from it on hold at least `tail_bytes` (or all of
/// them): only whole chunks are skipped, oldest first.
pub fn tail_start(chunks: &[Chunk], tail_bytes: u64) -> Skipped {
    let mut kept = 0u64;
    let mut first_kept = chunks.len();
    for (i, c) in chunks.iter().enumerate().rev() {
        if kept >= tail_bytes {
            break;
        }
        kept += c.bytes;
        first_kept = i;
    }
    let mut skipped = Skipped::default();
    let Some(start) = chunks.get(first_kept) else {
        return skipped;
    };
    if first_kept == 0 {
        return skipped;
    }
    skipped.from = start.offset;
    for c in &chunks[..first_kept] {
        skipped.bytes += c.bytes;
        *skipped.lines.entry(c.job.clone()).or_default() += c.lines;
    }
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(offset: u64, job: &str, bytes: u64, lines: u64) -> Chunk {
        Chunk {
            offset,
            job: job.into(),
            bytes,
            lines,
        }
    }

    #[test]
    fn a_short_log_is_replayed_whole() {
        let chunks = [chunk(3, "a", 10, 1), chunk(5, "b", 10, 2)];
        assert_eq!(tail_start(&chunks, 100), Skipped::default());
        assert_eq!(tail_start(&[], 100), Skipped::default());
    }

    #[test]
    fn a_long_log_starts_at_its_tail_with_line_counts_per_job() {
        let chunks = [
            chunk(3, "a", 100, 10),
            chunk(4, "b", 100, 5),
            chunk(7, "a", 100, 10),
            chunk(9, "a", 100, 10),
        ];
        let s = tail_start(&chunks, 150);
        assert_eq!(s.from, 7);
        assert_eq!(s.bytes, 200);
        assert_eq!(s.lines["a"], 10);
        assert_eq!(s.lines["b"], 5);
    }

    proptest! {
        #[test]
        fn the_tail_holds_what_was_asked_and_nothing_is_lost(
            sizes in proptest::collection::vec(1u64..1000, 0..40),
            tail in 0u64..20_000,
        ) {
            let chunks: Vec<Chunk> = sizes.iter().enumerate()
                .map(|(i, &b)| chunk(i as u64 * 2, if i % 3 == 0 { "a" } else { "b" }, b, b / 10))
                .collect();
            let s = tail_start(&chunks, tail);
            let total: u64 = sizes.iter().sum();
            let kept: u64 = chunks.iter().filter(|c| c.offset >= s.from).map(|c| c.bytes).sum();
            prop_assert_eq!(kept + s.bytes, total);
            prop_assert!(kept >= tail.min(total));
            // Skipping one chunk less would still hold the tail: we skip as much as we may.
            if s.from > 0 {
                let next_kept: u64 = chunks.iter().filter(|c| c.offset > s.from).map(|c| c.bytes).sum();
                prop_assert!(next_kept < tail);
            }
            let lines: u64 = s.lines.values().sum();
            let expect: u64 = chunks.iter().filter(|c| c.offset < s.from).map(|c| c.lines).sum();
            prop_assert_eq!(lines, expect);
        }
    }
}
