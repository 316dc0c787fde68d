//! Time travel and "why" on the API (`get --at`, `why`, the web UI's history slider): a
//! build's own records, read from the log by partition key from where the build starts, handed
//! to the pure functions of [`tributary_projections::history`] and
//! [`tributary_projections::why`]. Nothing is kept: every answer is folded from the log.
//!
//! On a partitioned log (Kafka) a build's records are the ones in its events partition, and an
//! offset is an offset of that partition (the `offset` `tributary events --json` and
//! `tributary watch` print for its events); its log chunks are in the logs topic and are not
//! folded, which leaves out only byte counters (no phase or exit code depends on them).

use std::collections::HashSet;

use tonic::Status;
use tributary_eventlog::Topic;
use tributary_projections::history::{self, BuildAt, Moment};
use tributary_projections::why;
use tributary_proto::api::{self, get_build_request::At};
use tributary_proto::events::Envelope;

use crate::auth::Principal;
use crate::builds::{authorize_on_log, to_api};
use crate::state::{internal, ApiState};

/// Records read per page.
const PAGE: usize = 4096;

/// Build `build_id`'s records of its events partition, in offset order, each event once
/// (a re-delivered copy is skipped by event id, as every fold does), up to the partition's end
/// when asked. Another tenant's build is NOT_FOUND.
pub async fn build_records(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
) -> Result<Vec<(u64, Envelope)>, Status> {
    let start = authorize_on_log(state, who, build_id).await?;
    let partition = state.log.layout().partition_for(Topic::Events, build_id);
    let ends = state.log.end_offsets().await.map_err(internal)?;
    let end = ends.get(partition as usize).copied().unwrap_or(0);
    let mut seen = HashSet::new();
    let mut records = Vec::new();
    let mut from = start.events;
    while from < end {
        let page = state
            .log
            .read_key(build_id, from, PAGE)
            .await
            .map_err(internal)?;
        let Some(last) = page.last() else { break };
        from = last.offset + 1;
        for record in page.into_iter().filter(|r| r.offset < end) {
            if let Some(env) = record.envelope_for("api-history") {
                if seen.insert(env.event_id.clone()) {
                    records.push((record.offset, env));
                }
            }
        }
    }
    Ok(records)
}

/// The moment a `GetBuildRequest.at` names.
pub fn moment(at: &At) -> Moment {
    match at {
        At::AtOffset(o) => Moment::Offset(*o),
        At::AtTimeUs(t) => Moment::Time(*t),
    }
}

/// The build as it stood at `at`, as the API shows builds (with the waiting reasons the
/// scheduler had recorded by then).
pub async fn get_at(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
    at: &At,
) -> Result<api::Build, Status> {
    let records = build_records(state, who, build_id).await?;
    let moment = moment(at);
    let Some(at) = history::build_at(build_id, &records, moment) else {
        let first = records.first().map(|(o, _)| *o).unwrap_or_default();
        return Err(Status::not_found(format!(
            "build {build_id} did not exist yet at {}: its first event is at offset {first}",
            match moment {
                Moment::Offset(o) => format!("offset {o}"),
                Moment::Time(t) => format!("time {t} µs"),
            }
        )));
    };
    Ok(api_at(&at))
}

/// A [`BuildAt`] as the API's build.
pub fn api_at(at: &BuildAt) -> api::Build {
    let mut build = to_api(&at.build);
    for job in &mut build.jobs {
        if let Some(reason) = at.waiting.get(&job.id) {
            job.waiting_for = reason.clone();
        }
    }
    build.as_of_offset = at.offset;
    build.as_of_us = at.time_us;
    build
}

/// Each job's decisions (every job, or those `job` names: an id or a matrix job's name).
pub async fn explain(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
    job: &str,
) -> Result<api::ExplainBuildResponse, Status> {
    let records = build_records(state, who, build_id).await?;
    let wanted = (!job.is_empty()).then_some(job);
    let jobs = why::explain(build_id, &records, wanted);
    if jobs.is_empty() {
        let known = why::explain(build_id, &records, None);
        return Err(Status::not_found(if known.is_empty() {
            format!("build {build_id} has no jobs (its pipeline was not planned)")
        } else {
            format!(
                "no job {job} in build {build_id}; its jobs: {}",
                known
                    .iter()
                    .map(|h| h.job.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }));
    }
    Ok(api::ExplainBuildResponse {
        jobs: jobs
            .into_iter()
            .map(|h| api::JobHistory {
                job: h.job,
                decisions: h
                    .decisions
                    .into_iter()
                    .map(|d| api::JobDecision {
                        offset: d.offset,
                        time_us: d.time_us,
                        kind: d.kind.name().into(),
                        attempt: d.attempt,
                        text: d.text,
                    })
                    .collect(),
            })
            .collect(),
    })
}
