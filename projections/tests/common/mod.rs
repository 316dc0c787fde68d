//! Synthetic but realistic build histories for the projection tests.

use tributary_proto::events::envelope::Payload;
use tributary_proto::events::*;

pub fn env(build: &str, time_us: i64, payload: Payload) -> Envelope {
    Envelope {
        event_id: tributary_proto::new_id(),
        tenant: "acme".into(),
        project: "web".into(),
        build_id: build.into(),
        time_us,
        payload: Some(payload),
    }
}

/// Every event of one build: `jobs` jobs of two steps with three lines each, log chunks on
/// every line; job 0 fails at its second step's second line on attempt 1 and succeeds on
/// attempt 2 when `retry`; the last job needs job 0.
pub fn build_history(build: &str, jobs: usize, retry: bool) -> Vec<Envelope> {
    let mut t = 1_700_000_000_000_000i64;
    let mut tick = || {
        t += 1000;
        t
    };
    let plan = Plan {
        jobs: (0..jobs)
            .map(|j| JobPlan {
                id: format!("job{j}"),
                name: format!("job{j}"),
                needs: if j + 1 == jobs && j > 0 {
                    vec!["job0".into()]
                } else {
                    vec![]
                },
                retry: u32::from(retry),
                steps: (0..2)
                    .map(|s| StepPlan {
                        name: format!("s{s}"),
                        lines: (0..3).map(|l| format!("echo {j}.{s}.{l}")).collect(),
                    })
                    .collect(),
                ..JobPlan::default()
            })
            .collect(),
    };
    let mut out = vec![
        env(
            build,
            tick(),
            Payload::BuildTriggered(BuildTriggered {
                who: "ann".into(),
                source: "cli".into(),
                commit: "abc123".into(),
                pipeline_path: ".tributary.yml".into(),
                ..Default::default()
            }),
        ),
        env(
            build,
            tick(),
            Payload::BuildQueued(BuildQueued { plan: Some(plan) }),
        ),
    ];
    let mut failed_any = false;
    for j in 0..jobs {
        let job = format!("job{j}");
        let attempts = if j == 0 && retry { 2 } else { 1 };
        for attempt in 1..=attempts {
            out.push(env(
                build,
                tick(),
                Payload::JobQueued(JobQueued {
                    job: job.clone(),
                    attempt,
                }),
            ));
            out.push(env(
                build,
                tick(),
                Payload::JobAssigned(JobAssigned {
                    job: job.clone(),
                    attempt,
                    agent_id: "agent-1".into(),
                    lease_id: format!("lease-{j}-{attempt}"),
                    deadline_us: 0,
                }),
            ));
            // A second scheduler's late assignment of the same attempt: must be ignored.
            out.push(env(
                build,
                tick(),
                Payload::JobAssigned(JobAssigned {
                    job: job.clone(),
                    attempt,
                    agent_id: "agent-2".into(),
                    lease_id: "late".into(),
                    deadline_us: 0,
                }),
            ));
            out.push(env(
                build,
                tick(),
                Payload::JobStarted(JobStarted {
                    job: job.clone(),
                    attempt,
                    agent_id: "agent-1".into(),
                    ..Default::default()
                }),
            ));
            let fail_here = j == 0 && attempt == 1;
            let mut job_failed = false;
            'steps: for s in 0..2u32 {
                out.push(env(
                    build,
                    tick(),
                    Payload::StepStarted(StepStarted {
                        job: job.clone(),
                        attempt,
                        step: s,
                        name: format!("s{s}"),
                    }),
                ));
                for l in 0..3u32 {
                    out.push(env(
                        build,
                        tick(),
                        Payload::LineStarted(LineStarted {
                            job: job.clone(),
                            attempt,
                            step: s,
                            line: l,
                            text: format!("echo {j}.{s}.{l}"),
                        }),
                    ));
                    for c in 0..2 {
                        out.push(env(
                            build,
                            tick(),
                            Payload::LogChunk(LogChunk {
                                job: job.clone(),
                                attempt,
                                step: s,
                                line: l,
                                stream: Stream::Stdout as i32,
                                data: format!("out {c} of {j}.{s}.{l}\n").into_bytes(),
                                ..Default::default()
                            }),
                        ));
                    }
                    let code = if fail_here && s == 1 && l == 1 { 3 } else { 0 };
                    out.push(env(
                        build,
                        tick(),
                        Payload::LineExited(LineExited {
                            job: job.clone(),
                            attempt,
                            step: s,
                            line: l,
                            exit_code: code,
                            duration_us: 1000,
                        }),
                    ));
                    if code != 0 {
                        out.push(env(
                            build,
                            tick(),
                            Payload::StepFinished(StepFinished {
                                job: job.clone(),
                                attempt,
                                step: s,
                                status: Status::Failed as i32,
                                exit_code: code,
                                duration_us: 3000,
                            }),
                        ));
                        job_failed = true;
                        break 'steps;
                    }
                }
                out.push(env(
                    build,
                    tick(),
                    Payload::StepFinished(StepFinished {
                        job: job.clone(),
                        attempt,
                        step: s,
                        status: Status::Succeeded as i32,
                        exit_code: 0,
                        duration_us: 3000,
                    }),
                ));
            }
            out.push(env(
                build,
                tick(),
                Payload::JobFinished(JobFinished {
                    job: job.clone(),
                    attempt,
                    status: if job_failed {
                        Status::Failed
                    } else {
                        Status::Succeeded
                    } as i32,
                    exit_code: if job_failed { 3 } else { 0 },
                    duration_us: 10_000,
                    reason: if job_failed {
                        "line 2 of step \"s1\" exited with 3".into()
                    } else {
                        String::new()
                    },
                    no_retry: false,
                }),
            ));
            failed_any |= job_failed && attempt == attempts;
        }
    }
    out.push(env(
        build,
        tick(),
        Payload::BuildFinished(BuildFinished {
            status: if failed_any {
                Status::Failed
            } else {
                Status::Succeeded
            } as i32,
            duration_us: 99,
            reason: String::new(),
        }),
    ));
    out
}

/// Interleaves several builds' histories (round-robin), keeping each build's order.
pub fn interleave(histories: Vec<Vec<Envelope>>) -> Vec<Envelope> {
    let mut iters: Vec<_> = histories.into_iter().map(|h| h.into_iter()).collect();
    let mut out = Vec::new();
    loop {
        let mut any = false;
        for it in &mut iters {
            if let Some(e) = it.next() {
                out.push(e);
                any = true;
            }
        }
        if !any {
            return out;
        }
    }
}
