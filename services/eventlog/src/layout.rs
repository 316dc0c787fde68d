//! Where an event goes: the log's partitions, its two topics, and the key → partition hash.
//!
//! Pure functions over plain data, shared by every backend and by consumers that need to know
//! which partition holds a build's events.
//!
//! A log has `events` partitions for state events and, unless `logs` is 0, `logs` partitions of
//! its own for [`LogChunk`](tributary_proto::events::LogChunk) payloads (large, short-lived:
//! Kafka gives them a topic with its own retention). Partitions are numbered `0..events` for the
//! events topic, then `events..events + logs` for the logs topic. With `logs == 0` chunks share
//! the events partitions (the SQLite backend: one partition holding everything).
//!
//! Within a topic, an event's partition is `murmur2(key) % partitions` over its
//! [`Envelope::partition_key`] (the build id), the hash Kafka's Java clients use, so all events of
//! one build are in one partition, in append order. A build's chunks and its state events are in
//! different partitions when the topics are split: their relative order is not kept.

use std::ops::Range;

use tributary_proto::events::envelope::Payload;
use tributary_proto::events::Envelope;

/// Index of a partition of the log, `0..Layout::partitions()`.
pub type Partition = u32;

/// The two streams of events a log carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Every event but log chunks: the state of builds, jobs, agents, tenants.
    Events,
    /// [`LogChunk`](tributary_proto::events::LogChunk)s: job output.
    Logs,
}

impl Topic {
    /// The topic `event` belongs to.
    pub fn of(event: &Envelope) -> Topic {
        match event.payload {
            Some(Payload::LogChunk(_)) => Topic::Logs,
            _ => Topic::Events,
        }
    }
}

/// How a log's partitions are laid out; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Partitions of the events topic (at least 1).
    pub events: u32,
    /// Partitions of the logs topic; 0: log chunks share the events partitions.
    pub logs: u32,
}

impl Layout {
    /// One partition holding every event (the SQLite backend).
    pub const SINGLE: Layout = Layout { events: 1, logs: 0 };

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.events + self.logs
    }

    /// Every partition, `0..partitions()`.
    pub fn all(&self) -> Range<Partition> {
        0..self.partitions()
    }

    /// The partitions that hold `topic`'s events.
    pub fn topic_partitions(&self, topic: Topic) -> Range<Partition> {
        match topic {
            Topic::Logs if self.logs > 0 => self.events..self.events + self.logs,
            _ => 0..self.events,
        }
    }

    /// The partition holding the events of `topic` with partition key `key`.
    pub fn partition_for(&self, topic: Topic, key: &str) -> Partition {
        let range = self.topic_partitions(topic);
        let n = range.end - range.start;
        range.start + partition_of_key(key.as_bytes(), n)
    }

    /// The partition `event` is appended to.
    pub fn partition_of(&self, event: &Envelope) -> Partition {
        self.partition_for(Topic::of(event), &event.partition_key())
    }

    /// The topic partition `partition` belongs to, and its index within that topic; `None` if
    /// there is no such partition.
    pub fn locate(&self, partition: Partition) -> Option<(Topic, u32)> {
        if partition < self.events {
            Some((Topic::Events, partition))
        } else if partition < self.partitions() {
            Some((Topic::Logs, partition - self.events))
        } else {
            None
        }
    }
}

/// `murmur2(key) % partitions`, as Kafka's Java producer partitions keyed records (positive hash,
/// modulo). `partitions` 0 is treated as 1.
pub fn partition_of_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// MurmurHash2 with Kafka's seed, bit for bit `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tributary_proto::events::{BuildQueued, LogChunk};

    #[test]
    fn murmur2_matches_kafka() {
        // The vectors of Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (data, expected) in cases {
            assert_eq!(
                murmur2(data) as i32,
                expected,
                "murmur2({:?})",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn chunks_go_to_the_logs_partitions_when_split() {
        let chunk = Envelope::new("t", "p", "build-1", Payload::LogChunk(LogChunk::default()));
        let state = Envelope::new(
            "t",
            "p",
            "build-1",
            Payload::BuildQueued(BuildQueued::default()),
        );
        let split = Layout { events: 4, logs: 3 };
        assert!(split
            .topic_partitions(Topic::Logs)
            .contains(&split.partition_of(&chunk)));
        assert!(split
            .topic_partitions(Topic::Events)
            .contains(&split.partition_of(&state)));
        assert_eq!(Layout::SINGLE.partition_of(&chunk), 0);
        assert_eq!(Layout::SINGLE.partition_of(&state), 0);
        let shared = Layout { events: 4, logs: 0 };
        assert_eq!(shared.partition_of(&chunk), shared.partition_of(&state));
    }

    proptest! {
        #[test]
        fn every_key_lands_in_its_topic(key in ".{0,40}", events in 1u32..20, logs in 0u32..20) {
            let layout = Layout { events, logs };
            for topic in [Topic::Events, Topic::Logs] {
                let p = layout.partition_for(topic, &key);
                prop_assert!(layout.topic_partitions(topic).contains(&p));
                let (located, index) = layout.locate(p).expect("a partition of the layout");
                let expected = if logs == 0 { Topic::Events } else { topic };
                prop_assert_eq!(located, expected);
                prop_assert_eq!(layout.topic_partitions(located).start + index, p);
            }
            prop_assert_eq!(layout.locate(layout.partitions()), None);
        }
    }
}
