//! A state folded in the order its records are read, each event with its place in that order
//! (0, 1, 2...): the scheduler's cluster state, the autoscaler's pool, the API's in-memory read
//! models. One [`Fold`] serves them all; the state only says how to apply one event.

use tributary_proto::events::Envelope;

use super::{Fold, Interest, Position};
use crate::LogError;

/// A state that folds events in the order read; `sequence` is the event's place in it.
pub trait Sequential: Send {
    fn apply(&mut self, sequence: u64, env: &Envelope);
}

/// [`Sequential`] state as the consumer runtime drives it.
pub struct Sequenced<S> {
    pub state: S,
    name: &'static str,
    interest: Interest,
    sequence: u64,
}

impl<S> Sequenced<S> {
    /// Folds `state` as consumer `name` (its skipped-records counter and logs), reading the
    /// events `interest` admits.
    pub fn new(name: &'static str, interest: Interest, state: S) -> Self {
        Sequenced {
            state,
            name,
            interest,
            sequence: 0,
        }
    }
}

impl<S: Sequential> Fold for Sequenced<S> {
    type Error = LogError;

    fn name(&self) -> &'static str {
        self.name
    }

    fn interest(&self) -> Interest {
        self.interest
    }

    async fn apply(&mut self, _at: Position, env: Envelope) -> Result<(), LogError> {
        self.state.apply(self.sequence, &env);
        self.sequence += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;
    use prost::Message;
    use tributary_proto::events::{envelope::Payload, JobQueued, LogChunk};

    #[derive(Default)]
    struct Seen(Vec<(u64, String)>);

    impl Sequential for Seen {
        fn apply(&mut self, sequence: u64, env: &Envelope) {
            self.0.push((sequence, env.type_name().to_owned()));
        }
    }

    #[tokio::test]
    async fn events_get_their_place_in_the_order_read_and_unwanted_ones_take_none() {
        let fold = Sequenced::new(
            "test",
            Interest::except(&super::super::JOB_OUTPUT),
            Seen::default(),
        );
        let mut consumer = super::super::Consumer::new(fold);
        let queued = |job: &str| {
            Envelope::new(
                "t",
                "p",
                "b",
                Payload::JobQueued(JobQueued {
                    job: job.into(),
                    attempt: 1,
                }),
            )
        };
        let chunk = Envelope::new("t", "p", "b", Payload::LogChunk(LogChunk::default()));
        let records: Vec<Record> = [queued("a"), chunk, queued("b")]
            .iter()
            .enumerate()
            .map(|(i, e)| Record {
                partition: 0,
                offset: 10 + i as u64,
                key: "b".into(),
                data: e.encode_to_vec().into(),
            })
            .collect();
        consumer.apply(&records).await.expect("apply");
        assert_eq!(
            consumer.fold().state.0,
            vec![(0, "job_queued".to_owned()), (1, "job_queued".to_owned())]
        );
        assert_eq!(consumer.position(0), 13);
    }
}
