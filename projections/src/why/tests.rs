use tributary_proto::events::envelope::Payload;
use tributary_proto::events::*;

use super::*;

struct Log {
    records: Vec<(u64, Envelope)>,
    t: i64,
}

impl Log {
    fn new() -> Log {
        let mut log = Log {
            records: Vec::new(),
            t: 1_700_000_000_000_000,
        };
        log.push(Payload::BuildTriggered(BuildTriggered {
            who: "ann".into(),
            number: 7,
            ..Default::default()
        }));
        let job = |id: &str, needs: &[&str], retry| JobPlan {
            id: id.into(),
            name: id.into(),
            needs: needs.iter().map(|n| (*n).to_owned()).collect(),
            retry,
            runs_on: vec!["gpu".into()],
            ..JobPlan::default()
        };
        log.push(Payload::BuildQueued(BuildQueued {
            plan: Some(Plan {
                jobs: vec![
                    job("train", &[], 1),
                    job("report", &["train"], 0),
                    job("other", &[], 0),
                ],
            }),
        }));
        log
    }

    /// Appends at one second after the previous event.
    fn push(&mut self, payload: Payload) -> &mut Log {
        self.t += 1_000_000;
        let offset = self.records.len() as u64 * 2; // offsets need not be dense
        self.records.push((
            offset,
            Envelope {
                event_id: format!("e{offset}"),
                tenant: "t".into(),
                project: "p".into(),
                build_id: "b".into(),
                time_us: self.t,
                payload: Some(payload),
            },
        ));
        self
    }

    fn queued(&mut self, job: &str, attempt: u32) -> &mut Log {
        self.push(Payload::JobQueued(JobQueued {
            job: job.into(),
            attempt,
        }))
    }

    fn waiting(&mut self, job: &str, attempt: u32, reason: &str) -> &mut Log {
        self.push(Payload::JobWaiting(JobWaiting {
            job: job.into(),
            attempt,
            reason: reason.into(),
        }))
    }

    fn assigned(&mut self, job: &str, attempt: u32, agent: &str) -> &mut Log {
        let deadline_us = self.t + 11_000_000;
        self.push(Payload::JobAssigned(JobAssigned {
            job: job.into(),
            attempt,
            agent_id: agent.into(),
            lease_id: format!("lease-{attempt}"),
            deadline_us,
        }))
    }

    fn started(&mut self, job: &str, attempt: u32, agent: &str) -> &mut Log {
        self.push(Payload::JobStarted(JobStarted {
            job: job.into(),
            attempt,
            agent_id: agent.into(),
            executor: "host".into(),
            ..Default::default()
        }))
    }

    fn finished(
        &mut self,
        job: &str,
        attempt: u32,
        status: Status,
        code: i32,
        why: &str,
    ) -> &mut Log {
        self.push(Payload::JobFinished(JobFinished {
            job: job.into(),
            attempt,
            status: status as i32,
            exit_code: code,
            duration_us: 1,
            reason: why.into(),
            no_retry: false,
        }))
    }
}

fn kinds(h: &JobHistory) -> Vec<(&'static str, u32)> {
    h.decisions
        .iter()
        .map(|d| (d.kind.name(), d.attempt))
        .collect()
}

#[test]
fn a_job_that_waited_for_a_label_was_requeued_and_retried_is_explained_step_by_step() {
    let mut log = Log::new();
    log.queued("train", 1)
        .waiting(
            "train",
            1,
            "no connected agent has labels [gpu]; no generic agent connected",
        )
        // The same reason again (a second scheduler replica): shown once.
        .waiting(
            "train",
            1,
            "no connected agent has labels [gpu]; no generic agent connected",
        )
        .waiting(
            "train",
            1,
            "all agents with labels [gpu] are busy (1/1 slots in use)",
        )
        .assigned("train", 1, "a1")
        // A late assignment of the same attempt by another scheduler: ignored by the fold.
        .assigned("train", 1, "a9")
        .started("train", 1, "a1")
        .push(Payload::JobRequeued(JobRequeued {
            job: "train".into(),
            attempt: 1,
            agent_id: "a1".into(),
            lease_id: "lease-1".into(),
            reason: "agent a1 disconnected: stream closed".into(),
        }))
        .queued("train", 2)
        .assigned("train", 2, "a2")
        .started("train", 2, "a2")
        .finished(
            "train",
            2,
            Status::Failed,
            5,
            "line 1 of step \"s\" exited with 5",
        )
        .queued("train", 3)
        .assigned("train", 3, "a2")
        .started("train", 3, "a2")
        .finished("train", 3, Status::Succeeded, 0, "")
        .queued("report", 1);

    let all = explain("b", &log.records, None);
    assert_eq!(
        all.iter().map(|h| h.job.as_str()).collect::<Vec<_>>(),
        ["train", "report", "other"],
        "plan order"
    );
    let train = &explain("b", &log.records, Some("train"))[0];
    assert_eq!(
        kinds(train),
        [
            ("queued", 1),
            ("waiting", 1),
            ("waiting", 1),
            ("assigned", 1),
            ("started", 1),
            ("requeued", 1),
            ("queued", 2),
            ("assigned", 2),
            ("started", 2),
            ("failed", 2),
            ("retried", 3),
            ("assigned", 3),
            ("started", 3),
            ("succeeded", 3),
        ]
    );
    let text = |i: usize| train.decisions[i].text.as_str();
    assert_eq!(text(0), "queued: it needs no other job");
    assert!(
        text(1).contains("no connected agent has labels [gpu]"),
        "{}",
        text(1)
    );
    assert!(text(2).contains("busy (1/1 slots in use)"), "{}", text(2));
    assert_eq!(
        text(3),
        "assigned to agent a1 after 4.0s in the queue (lease lease-1, 10.0s to renew)"
    );
    assert_eq!(text(4), "started on agent a1 (host)");
    assert_eq!(
        text(5),
        "attempt 1 taken back from agent a1: agent a1 disconnected: stream closed"
    );
    assert_eq!(
        text(6),
        "queued again as attempt 2 after attempt 1 was requeued"
    );
    assert!(
        text(9).starts_with("failed (exit 5) after running 1.0s: line 1"),
        "{}",
        text(9)
    );
    assert_eq!(
        text(10),
        "retried after exit 5 on attempt 2: line 1 of step \"s\" exited with 5; attempt 3 \
         queued (retry 1 of 1)"
    );
    // Decisions carry their record's offset and time, in log order.
    assert!(train
        .decisions
        .windows(2)
        .all(|w| w[0].offset < w[1].offset && w[0].time_us < w[1].time_us));

    let report = &all[1];
    assert_eq!(kinds(report), [("pending", 0), ("queued", 1)]);
    assert_eq!(report.decisions[0].text, "waits for its needs: train");
    assert_eq!(
        report.decisions[1].text,
        "queued: needs met (train succeeded 1.0s earlier)"
    );
    assert!(all[2].decisions.is_empty(), "never queued: nothing decided");
}

#[test]
fn skips_cancels_reuse_and_kept_jobs_say_why_and_by_whom() {
    let mut log = Log::new();
    log.queued("train", 1)
        .assigned("train", 1, "a1")
        .started("train", 1, "a1")
        .finished(
            "train",
            1,
            Status::Failed,
            2,
            "line 1 of step \"s\" exited with 2",
        )
        .finished(
            "report",
            0,
            Status::Skipped,
            -1,
            "needs train, which failed",
        )
        .push(Payload::JobReused(JobReused {
            job: "other".into(),
            attempt: 1,
            from_build: "b0".into(),
            from_job: "other".into(),
            from_attempt: 1,
            from_number: 6,
            ..Default::default()
        }));
    let all = explain("b", &log.records, None);
    // A failure with no retry left is the end: no "retried".
    assert_eq!(kinds(&all[0]).last(), Some(&("failed", 1)));
    assert_eq!(kinds(&all[1]), [("pending", 0), ("skipped", 0)]);
    assert_eq!(
        all[1].decisions[1].text,
        "skipped: needs train, which failed"
    );
    assert_eq!(kinds(&all[2]), [("reused", 1)]);
    assert!(all[2].decisions[0]
        .text
        .contains("reused from build 6 (b0)"));

    let mut log = Log::new();
    log.queued("train", 1)
        .waiting("train", 1, "no agent connected")
        .push(Payload::BuildCanceled(BuildCanceled {
            who: "bob".into(),
            reason: "wrong branch".into(),
        }))
        .finished("train", 1, Status::Canceled, -1, "build canceled");
    let train = &explain("b", &log.records, Some("train"))[0];
    assert_eq!(
        kinds(train),
        [("queued", 1), ("waiting", 1), ("canceled", 1)]
    );
    assert_eq!(
        train.decisions[2].text,
        "canceled by bob (wrong branch): build canceled"
    );

    // A waiting reason of an attempt that is no longer queued is not a decision.
    let mut log = Log::new();
    log.queued("train", 1)
        .assigned("train", 1, "a1")
        .waiting("train", 1, "late");
    let train = &explain("b", &log.records, Some("train"))[0];
    assert_eq!(kinds(train), [("queued", 1), ("assigned", 1)]);
}

#[test]
fn a_job_name_selects_every_matrix_instance_and_other_builds_are_ignored() {
    let mut log = Log::new();
    log.queued("train", 1);
    let mut other = log.records[2].clone();
    other.1.build_id = "elsewhere".into();
    log.records.push((100, other.1));
    let h = explain("b", &log.records, Some("train"));
    assert_eq!(h.len(), 1);
    assert_eq!(kinds(&h[0]), [("queued", 1)]);
    assert!(explain("b", &log.records, Some("nope")).is_empty());
    assert!(explain("unknown", &log.records, None).is_empty());
}

#[test]
fn durations_read_like_a_person_would_write_them() {
    assert_eq!(duration(-5), "0ms");
    assert_eq!(duration(850_000), "850ms");
    assert_eq!(duration(4_250_000), "4.2s");
    assert_eq!(duration(184_000_000), "3m04s");
    assert_eq!(duration(3_720_000_000), "1h02m");
}
