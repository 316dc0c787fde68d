//! Where a stream over every events partition (a project's live stream) starts, and the resume
//! tokens (SSE ids) it hands out, so a page rendered at some position, or a browser that
//! reconnects, continues with no gap and no duplicate on any number of partitions.
//!
//! Positions are the next offset of each events partition, in partition order. Tokens:
//! * one partition: the offset of the last record delivered (`N`), as the one-partition log
//!   always had; a start position (`from`) is the next offset;
//! * several: the next offsets of every events partition joined by dots (`12.0.7.3`), for an
//!   id and a start alike.
//!
//! A position is never taken beyond the partition's end now (a stale or forged token cannot
//! make the stream skip what comes next).

use tributary_eventlog::{Offset, Partition};

/// The SSE id of a stream whose next offsets are `next` (one per events partition).
pub fn token(next: &[(Partition, Offset)]) -> String {
    let mut next = next.to_vec();
    next.sort_unstable();
    match next.as_slice() {
        [(_, offset)] => offset.saturating_sub(1).to_string(),
        _ => join(&next),
    }
}

/// `next` as a start position (`from=` of the page's stream).
pub fn from_token(next: &[(Partition, Offset)]) -> String {
    match next {
        [(_, offset)] => offset.to_string(),
        _ => join(next),
    }
}

fn join(next: &[(Partition, Offset)]) -> String {
    next.iter()
        .map(|(_, o)| o.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// The next offsets `text` (dotted, one per partition of `ends`) says; None if it is not that.
fn parse(text: &str, ends: &[(Partition, Offset)]) -> Option<Vec<Offset>> {
    let offsets: Vec<Offset> = text
        .trim()
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    (offsets.len() == ends.len()).then_some(offsets)
}

/// Where the stream starts: right after `last_event_id` (a reconnecting browser's), else at
/// `from` (the page's render position), else at `ends` (the log's ends now). Invalid tokens
/// are ignored; every position is at most the partition's end.
pub fn start(
    ends: &[(Partition, Offset)],
    from: Option<&str>,
    last_event_id: Option<&str>,
) -> Vec<(Partition, Offset)> {
    let resumed = last_event_id.and_then(|id| {
        let mut next = parse(id, ends)?;
        if let [one] = next.as_mut_slice() {
            *one += 1; // one partition: the id is the last offset delivered
        }
        Some(next)
    });
    let next = resumed.or_else(|| from.and_then(|f| parse(f, ends)));
    match next {
        Some(next) => ends
            .iter()
            .zip(next)
            .map(|((p, end), at)| (*p, at.min(*end)))
            .collect(),
        None => ends.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_partition_keeps_the_offset_tokens_it_always_had() {
        let ends = [(0, 50)];
        assert_eq!(token(&[(0, 13)]), "12");
        assert_eq!(from_token(&[(0, 13)]), "13");
        assert_eq!(start(&ends, None, Some("12")), vec![(0, 13)]);
        assert_eq!(start(&ends, Some("13"), None), vec![(0, 13)]);
        assert_eq!(start(&ends, Some("99"), None), vec![(0, 50)]);
        assert_eq!(start(&ends, None, None), vec![(0, 50)]);
    }

    #[test]
    fn several_partitions_resume_at_each_partitions_position() {
        let ends = [(0, 10), (1, 20), (2, 30), (3, 40)];
        assert_eq!(token(&[(0, 1), (1, 2), (2, 3), (3, 4)]), "1.2.3.4");
        // The browser's Last-Event-ID wins over the page's `from`.
        assert_eq!(
            start(&ends, Some("0.0.0.0"), Some("1.2.3.4")),
            vec![(0, 1), (1, 2), (2, 3), (3, 4)]
        );
        assert_eq!(
            start(&ends, Some("5.6.7.8"), None),
            vec![(0, 5), (1, 6), (2, 7), (3, 8)]
        );
        // Never beyond the end; a token of another shape is ignored.
        assert_eq!(
            start(&ends, Some("11.0.0.99"), None),
            vec![(0, 10), (1, 0), (2, 0), (3, 40)]
        );
        assert_eq!(start(&ends, Some("1.2"), Some("x")), ends.to_vec());
    }

    proptest! {
        #[test]
        fn a_token_resumes_exactly_where_it_was_taken(
            next in proptest::collection::vec(1u64..1000, 1..6),
        ) {
            let positions: Vec<(Partition, Offset)> =
                next.iter().enumerate().map(|(p, o)| (p as Partition, *o)).collect();
            let ends: Vec<(Partition, Offset)> =
                positions.iter().map(|(p, o)| (*p, o + 5)).collect();
            prop_assert_eq!(start(&ends, None, Some(&token(&positions))), positions.clone());
            prop_assert_eq!(start(&ends, Some(&from_token(&positions)), None), positions);
        }
    }
}
