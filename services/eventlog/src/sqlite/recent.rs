//! The newest committed records of a [`super::SqliteLog`], kept in memory by the writer so that
//! the subscribers at the head of the log (every service following it live) get a new commit
//! without each running a query for it: in `tributary up` half a dozen subscribers read every
//! event, and those reads cost more than the commit itself.
//!
//! Invariant: the records held are exactly rows of the file, at contiguous offsets. The writer
//! pushes a group only after its commit; a group that does not follow the last record held
//! (another process appended in between, or the writer took its one-by-one path) starts the
//! window afresh, so reads before the window go to SQLite and never skip a row.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::{Offset, Record};

/// A window over the newest records, bounded in count and bytes.
pub(super) struct Recent {
    inner: Mutex<Window>,
    max_records: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Window {
    records: VecDeque<Record>,
    bytes: usize,
}

impl Recent {
    pub(super) fn new(max_records: usize, max_bytes: usize) -> Self {
        Recent {
            inner: Mutex::new(Window::default()),
            max_records,
            max_bytes,
        }
    }

    /// Adds records just committed at contiguous offsets from `records[0].offset`.
    pub(super) fn push(&self, records: Vec<Record>) {
        let Some(first) = records.first().map(|r| r.offset) else {
            return;
        };
        let mut w = self.lock();
        if w.records
            .back()
            .is_some_and(|last| last.offset + 1 != first)
        {
            w.records.clear();
            w.bytes = 0;
        }
        for record in records {
            w.bytes += record.data.len() + record.key.len();
            w.records.push_back(record);
        }
        while w.records.len() > self.max_records || w.bytes > self.max_bytes {
            match w.records.pop_front() {
                Some(r) => w.bytes -= r.data.len() + r.key.len(),
                None => break,
            }
        }
    }

    /// Forgets everything: what the writer stored next may not follow what is held.
    pub(super) fn clear(&self) {
        let mut w = self.lock();
        w.records.clear();
        w.bytes = 0;
    }

    /// Up to `max` records from offset `from`, if the window holds `from`; `None` otherwise (the
    /// caller reads the file).
    pub(super) fn read(&self, from: Offset, max: usize) -> Option<Vec<Record>> {
        let w = self.lock();
        let start = w.records.front()?.offset;
        let index = usize::try_from(from.checked_sub(start)?).ok()?;
        if index >= w.records.len() || max == 0 {
            return None;
        }
        Some(w.records.iter().skip(index).take(max).cloned().collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // A panic while holding the lock cannot leave the window inconsistent in a way that
        // matters more than losing it: start afresh.
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut w = poisoned.into_inner();
            w.records.clear();
            w.bytes = 0;
            w
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(offset: Offset) -> Record {
        Record {
            partition: 0,
            offset,
            key: "k".into(),
            data: Bytes::from(vec![offset as u8; 9]),
        }
    }

    fn offsets(records: Option<Vec<Record>>) -> Option<Vec<Offset>> {
        records.map(|rs| rs.iter().map(|r| r.offset).collect())
    }

    #[test]
    fn reads_inside_the_window_only() {
        let recent = Recent::new(100, 1 << 20);
        assert_eq!(offsets(recent.read(0, 10)), None, "empty");
        recent.push((5..10).map(rec).collect());
        assert_eq!(offsets(recent.read(4, 10)), None, "before: the file");
        assert_eq!(offsets(recent.read(5, 2)), Some(vec![5, 6]));
        assert_eq!(offsets(recent.read(8, 10)), Some(vec![8, 9]));
        assert_eq!(offsets(recent.read(10, 10)), None, "after the end");
        assert_eq!(offsets(recent.read(7, 0)), None);
    }

    #[test]
    fn a_group_that_does_not_follow_starts_the_window_afresh() {
        let recent = Recent::new(100, 1 << 20);
        recent.push((0..3).map(rec).collect());
        recent.push((3..5).map(rec).collect());
        assert_eq!(offsets(recent.read(0, 10)), Some(vec![0, 1, 2, 3, 4]));
        // Offsets 5 and 6 were written by another process.
        recent.push((7..9).map(rec).collect());
        assert_eq!(offsets(recent.read(4, 10)), None);
        assert_eq!(offsets(recent.read(5, 10)), None, "never skips 5 and 6");
        assert_eq!(offsets(recent.read(7, 10)), Some(vec![7, 8]));
        recent.clear();
        assert_eq!(offsets(recent.read(7, 10)), None);
    }

    #[test]
    fn the_window_keeps_the_newest_within_its_bounds() {
        let recent = Recent::new(4, 1 << 20);
        recent.push((0..10).map(rec).collect());
        assert_eq!(offsets(recent.read(5, 10)), None);
        assert_eq!(offsets(recent.read(6, 10)), Some(vec![6, 7, 8, 9]));
        // 10 bytes a record (9 of data, 1 of key): 25 bytes hold two.
        let recent = Recent::new(100, 25);
        recent.push((0..10).map(rec).collect());
        assert_eq!(offsets(recent.read(7, 10)), None);
        assert_eq!(offsets(recent.read(8, 10)), Some(vec![8, 9]));
    }
}
