use tributary_proto::events::envelope::Payload;
use tributary_proto::events::*;

use super::*;
use crate::Phase;

fn record(offset: u64, time_us: i64, build: &str, payload: Payload) -> (u64, Envelope) {
    (
        offset,
        Envelope {
            event_id: format!("e{offset}"),
            tenant: "t".into(),
            project: "p".into(),
            build_id: build.into(),
            time_us,
            payload: Some(payload),
        },
    )
}

fn history() -> Vec<(u64, Envelope)> {
    let plan = Plan {
        jobs: vec![JobPlan {
            id: "a".into(),
            name: "a".into(),
            steps: vec![StepPlan {
                name: "s".into(),
                lines: vec!["true".into()],
            }],
            ..JobPlan::default()
        }],
    };
    let queued = |attempt| {
        Payload::JobQueued(JobQueued {
            job: "a".into(),
            attempt,
        })
    };
    let waiting = |attempt, reason: &str| {
        Payload::JobWaiting(JobWaiting {
            job: "a".into(),
            attempt,
            reason: reason.into(),
        })
    };
    vec![
        record(
            3,
            100,
            "b",
            Payload::BuildTriggered(BuildTriggered::default()),
        ),
        record(
            4,
            110,
            "b",
            Payload::BuildQueued(BuildQueued { plan: Some(plan) }),
        ),
        record(5, 120, "b", queued(1)),
        record(6, 125, "other", queued(1)),
        record(9, 130, "b", waiting(1, "no agent connected")),
        // A clock a little behind: stamped before the record ahead of it.
        record(
            10,
            128,
            "b",
            waiting(1, "all agents are busy (1/1 slots in use)"),
        ),
        record(
            12,
            140,
            "b",
            Payload::JobAssigned(JobAssigned {
                job: "a".into(),
                attempt: 1,
                agent_id: "x".into(),
                ..Default::default()
            }),
        ),
        record(13, 150, "b", waiting(1, "late")),
    ]
}

#[test]
fn an_offset_or_a_time_folds_the_prefix_that_ends_there() {
    let records = history();
    assert!(
        build_at("b", &records, Moment::Offset(2)).is_none(),
        "not yet triggered"
    );
    let at = build_at("b", &records, Moment::Offset(5)).expect("exists");
    assert_eq!((at.offset, at.time_us), (5, 120));
    assert_eq!(at.build.jobs[0].phase, Phase::Queued);
    assert!(at.waiting.is_empty());
    // Between two records: the earlier one.
    assert_eq!(
        build_at("b", &records, Moment::Offset(8)).unwrap().offset,
        6
    );
    let at = build_at("b", &records, Moment::Offset(9)).unwrap();
    assert_eq!(at.waiting["a"], "no agent connected");
    let at = build_at("b", &records, Moment::Offset(11)).unwrap();
    assert_eq!(at.waiting["a"], "all agents are busy (1/1 slots in use)");
    let at = build_at("b", &records, Moment::Offset(99)).unwrap();
    assert_eq!(at.build.jobs[0].phase, Phase::Assigned);
    assert!(at.waiting.is_empty(), "assigned: no longer waiting");

    // Time 129: the record stamped 128 comes after one stamped 130, so it is not reached.
    let at = build_at("b", &records, Moment::Time(129)).unwrap();
    assert_eq!(at.offset, 6);
    assert_eq!(
        build_at("b", &records, Moment::Time(130)).unwrap().offset,
        10
    );
    assert!(build_at("b", &records, Moment::Time(99)).is_none());
}

#[test]
fn moments_are_the_records_that_change_the_page() {
    let marks = moments("b", &history());
    let offsets: Vec<u64> = marks.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [3, 4, 5, 9, 10, 12, 13]);
    assert_eq!(marks[2].label, "job a queued (attempt 1)");
    assert_eq!(marks[5].label, "job a assigned to agent x");
}
