//! Records a consumer skips: undecodable bytes, and envelopes whose payload is of a type this
//! version does not know (a newer writer, or a field number no event uses). Every consumer of
//! the log (the API's folds, the scheduler, the projector, metering) reads records through
//! [`Record::envelope_for`](crate::Record::envelope_for), which logs each skipped record at
//! error level with where it is and counts it here, per consumer and kind; the counts are
//! served in Prometheus' text format ([`prometheus`]) on the API's `/metrics` and on the
//! `--health-listen` endpoint of the other services. A process-wide registry: one service per
//! process in a scale-out deployment; `tributary up` shows each of its consumers apart.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tributary_proto::events::Envelope;

use crate::Record;

/// Why a record was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The bytes are not an envelope.
    Undecodable,
    /// An envelope without a payload this version knows.
    UnknownPayload,
}

impl Skip {
    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Skip::Undecodable => "undecodable",
            Skip::UnknownPayload => "unknown_payload",
        }
    }
}

static SKIPPED: Mutex<BTreeMap<(&'static str, Skip), u64>> = Mutex::new(BTreeMap::new());

/// Counts one record `consumer` skipped.
pub fn count(consumer: &'static str, kind: Skip) {
    if let Ok(mut map) = SKIPPED.lock() {
        *map.entry((consumer, kind)).or_default() += 1;
    }
}

/// How many records `consumer` skipped for `kind` so far in this process.
pub fn skipped(consumer: &str, kind: Skip) -> u64 {
    SKIPPED.lock().map_or(0, |map| {
        map.iter()
            .filter(|((c, k), _)| *c == consumer && *k == kind)
            .map(|(_, n)| *n)
            .sum()
    })
}

/// The counts as a Prometheus counter family `tributary_skipped_records_total` with labels
/// `consumer` and `kind` (only the help and type lines while nothing was skipped).
pub fn prometheus() -> String {
    let mut text = String::from(
        "# HELP tributary_skipped_records_total Log records skipped: undecodable, or of an \
         unknown event type.\n# TYPE tributary_skipped_records_total counter\n",
    );
    if let Ok(map) = SKIPPED.lock() {
        for ((consumer, kind), n) in map.iter() {
            text.push_str(&format!(
                "tributary_skipped_records_total{{consumer=\"{consumer}\",kind=\"{}\"}} {n}\n",
                kind.label()
            ));
        }
    }
    text
}

impl Record {
    /// The envelope of this record if `consumer` should apply it: `None` (logged at error
    /// level and counted) when the bytes do not decode or the payload is of an unknown type.
    pub fn envelope_for(&self, consumer: &'static str) -> Option<Envelope> {
        match self.decode() {
            Ok(env) if env.payload.is_some() => Some(env),
            Ok(env) => {
                count(consumer, Skip::UnknownPayload);
                tracing::error!(
                    consumer,
                    partition = self.partition,
                    offset = self.offset,
                    key = %self.key,
                    event_id = %env.event_id,
                    "skipping an event of an unknown type (written by a newer version?)"
                );
                None
            }
            Err(error) => {
                count(consumer, Skip::Undecodable);
                tracing::error!(
                    consumer,
                    partition = self.partition,
                    offset = self.offset,
                    key = %self.key,
                    %error,
                    "skipping malformed event"
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use prost::Message as _;
    use tributary_proto::events::{envelope::Payload, TenantCreated};

    fn record(data: Vec<u8>) -> Record {
        Record {
            partition: 1,
            offset: 7,
            key: "k".into(),
            data: Bytes::from(data),
        }
    }

    #[test]
    fn garbage_and_unknown_payloads_are_skipped_and_counted_per_consumer() {
        let good = Envelope::new(
            "t",
            "",
            "",
            Payload::TenantCreated(TenantCreated { name: "t".into() }),
        );
        assert!(record(good.encode_to_vec())
            .envelope_for("test-a")
            .is_some());
        assert_eq!(record(vec![0xff, 0xff, 0xff]).envelope_for("test-a"), None);
        // Field 1999, length-delimited: a payload no event of this version has.
        let mut unknown = Envelope {
            payload: None,
            ..good.clone()
        }
        .encode_to_vec();
        unknown.extend_from_slice(&[0xfa, 0x7c, 2, 0x08, 0x01]);
        assert_eq!(record(unknown).envelope_for("test-a"), None);
        assert_eq!(skipped("test-a", Skip::Undecodable), 1);
        assert_eq!(skipped("test-a", Skip::UnknownPayload), 1);
        assert_eq!(skipped("test-b", Skip::Undecodable), 0);
        let text = prometheus();
        assert!(
            text.contains(
                "tributary_skipped_records_total{consumer=\"test-a\",kind=\"undecodable\"} 1"
            ),
            "{text}"
        );
    }
}
