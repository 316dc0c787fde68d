//! A build's page: header, cancel / re-run buttons, the jobs as a DAG, the artifacts with
//! download links, each job's steps and lines with exit codes and durations, and one live log
//! per job (filled by the script from [`super::live::build`]).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;
use tributary_projections::{Build, Phase};
use tributary_proto::events::ArtifactUploaded;

use super::format::{build_label, bytes, duration_us, elapsed, short_commit, utc};
use super::layout::{self, badge, exit_code};
use super::login::Csrf;
use super::session::Session;
use super::{api_session, check_post, page_session, urlencode, WebError};
use crate::builds::build_of;
use crate::state::{internal, ApiState};

pub async fn page(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Markup, WebError> {
    let here = format!("/ui/builds/{}", urlencode(&id));
    let session = page_session(&state, &headers, &here)?;
    let build = build_of(&state, &session.who, &id)
        .await
        .map_err(|e| WebError::from(e).in_page(&session))?;
    let artifacts = artifacts_of(&state, &session, &build)
        .await
        .map_err(|e| e.in_page(&session))?;
    let notes = crate::builds::runs_on_notes(&state, &build)
        .await
        .map_err(|e| WebError::from(e).in_page(&session))?;
    let now = tributary_proto::now_us();
    Ok(page_markup(&build, &artifacts, &notes, &session, now))
}

/// The build's artifacts (read from the log), once a job has succeeded (only succeeded
/// attempts upload): a running build's page does not re-read its log on every refresh.
async fn artifacts_of(
    state: &ApiState,
    session: &Session,
    b: &Build,
) -> Result<Vec<ArtifactUploaded>, WebError> {
    if !b.jobs.iter().any(|j| j.phase == Phase::Succeeded) {
        return Ok(Vec::new());
    }
    Ok(crate::artifacts::list(state, &session.who, &b.id).await?)
}

/// Where the browser downloads an artifact: the HTTP API's route, which takes the session
/// cookie as well as a bearer token.
pub fn artifact_href(build_id: &str, a: &ArtifactUploaded) -> String {
    format!(
        "/api/builds/{}/artifacts/{}/{}",
        urlencode(build_id),
        urlencode(&a.job).replace('/', "%2F"),
        urlencode(&a.path)
    )
}

fn artifacts_markup(build_id: &str, artifacts: &[ArtifactUploaded]) -> Markup {
    html! {
        @if !artifacts.is_empty() {
            section.artifacts {
                h2 { "Artifacts" }
                table.list #artifacts {
                    thead { tr { th { "job" } th { "path" } th.num { "size" } th { "sha256" } } }
                    tbody {
                        @for a in artifacts {
                            tr data-job=(a.job) data-path=(a.path) {
                                td { (a.job) }
                                td.mono { a.download href=(artifact_href(build_id, a)) download { (a.path) } }
                                td.num { (bytes(a.size)) }
                                td.mono title=(a.sha256) { (short_commit(&a.sha256)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn page_markup(
    b: &Build,
    artifacts: &[ArtifactUploaded],
    notes: &BTreeMap<String, String>,
    session: &Session,
    now_us: i64,
) -> Markup {
    let base = format!("/ui/builds/{}", urlencode(&b.id));
    let title = format!("{} {}", b.project, build_label(b.number, &b.id));
    layout::page(
        &title,
        Some(session),
        html! {
            (history_markup(&base))
            div #summary data-summary={(base) "/summary"} { (summary_markup(b, artifacts, notes, session, now_us)) }
            section.logs #logs data-events={(base) "/events"} data-status=(b.phase.name()) {
                h2 { "Logs" }
                @for (i, job) in b.jobs.iter().enumerate() {
                    details.joblog #{"log-" (i)} open data-job=(job.id) data-index=(i) {
                        summary {
                            span.jobname { (job.name) }
                            @for (k, v) in &job.matrix { span.chip { (k) "=" (v) } }
                            " "
                            a.raw href={(base) "/log.txt?job=" (urlencode(&job.id))} { "raw" }
                        }
                        div.log role="log" aria-live="off" tabindex="0" {}
                        button.follow type="button" hidden { "↓ follow" }
                    }
                }
                noscript { p { "The live log needs JavaScript; the raw logs are linked above." } }
            }
        },
    )
}

/// The history slider (filled by the script from [`super::history`]): the build at each of
/// its steps, without leaving the page.
fn history_markup(base: &str) -> Markup {
    html! {
        details.history #history data-steps={(base) "/history.json"} data-at={(base) "/at"} {
            summary { "History" }
            div.histctl {
                input #history-slider type="range" min="0" max="0" value="0" step="1" disabled aria-label="step of the build's history";
                button #history-now type="button" disabled { "Now" }
            }
            p.hint #history-label { "Open to step through the build's events." }
        }
    }
}

/// The summary of the build at a past moment (`now_us`: that moment): no actions.
pub fn past_summary_markup(b: &Build, session: &Session, now_us: i64) -> Markup {
    summary_with(b, &[], &BTreeMap::new(), session, now_us, false)
}

/// Everything on the page that comes from the read model (re-fetched as the build moves).
fn summary_markup(
    b: &Build,
    artifacts: &[ArtifactUploaded],
    notes: &BTreeMap<String, String>,
    session: &Session,
    now_us: i64,
) -> Markup {
    summary_with(b, artifacts, notes, session, now_us, true)
}

fn summary_with(
    b: &Build,
    artifacts: &[ArtifactUploaded],
    notes: &BTreeMap<String, String>,
    session: &Session,
    now_us: i64,
    actions: bool,
) -> Markup {
    let base = format!("/ui/builds/{}", urlencode(&b.id));
    html! {
        header.build data-status=(b.phase.name()) {
            h1 {
                a href={"/ui/projects/" (urlencode(&b.project))} { (b.project) }
                " " (build_label(b.number, &b.id)) " " (badge(b.phase))
            }
            dl.facts {
                dt { "ref" } dd.mono { @if b.git_ref.is_empty() { "(default branch)" } @else { (b.git_ref) } }
                dt { "commit" } dd.mono title=(b.commit) { (short_commit(&b.commit)) }
                dt { "by" } dd { (b.who) @if !b.source.is_empty() { " (" (b.source) ")" } }
                dt { "triggered" } dd { (utc(b.triggered_us)) }
                dt { "duration" } dd #duration { (elapsed(b.started_us, b.finished_us, now_us).unwrap_or_else(|| "–".into())) }
            }
            @if !b.reason.is_empty() { p.reason { (b.reason) } }
            div.actions {
                @if actions && !b.phase.is_terminal() {
                    form method="post" action={(base) "/cancel"} {
                        input type="hidden" name="csrf" value=(session.csrf());
                        button.danger #cancel type="submit" { "Cancel build" }
                    }
                }
                @if actions && b.phase.is_terminal() && b.phase != Phase::Succeeded {
                    form method="post" action={(base) "/rerun"} {
                        input type="hidden" name="csrf" value=(session.csrf());
                        button #rerun type="submit" { "Re-run failed jobs" }
                    }
                }
            }
        }
        @if !b.jobs.is_empty() {
            div.dagbox { (super::dag::svg(&b.jobs)) }
        }
        (artifacts_markup(&b.id, artifacts))
        section.jobs {
            @for (i, job) in b.jobs.iter().enumerate() {
                article.job #{"job-" (i)} data-job=(job.id) data-status=(job.phase.name()) {
                    h2 {
                        (job.name) " " (badge(job.phase))
                        @for (k, v) in &job.matrix { " " span.chip { (k) "=" (v) } }
                    }
                    p.jobfacts {
                        @if job.attempt > 1 { "attempt " (job.attempt) " · " }
                        @if !job.agent_id.is_empty() { "agent " span.mono { (job.agent_id) } " · " }
                        @if let Some(d) = elapsed(job.started_us, job.finished_us, now_us) { (d) " · " }
                        (exit_code(job.exit_code))
                        @if !job.needs.is_empty() { " · needs " (job.needs.join(", ")) }
                        " · " a href={"#log-" (i)} { "log" }
                    }
                    @if !job.reason.is_empty() { p.reason { (job.reason) } }
                    @if let Some(note) = notes.get(&job.id) { p.runs-on-note { (note) } }
                    @for (s, step) in job.steps.iter().enumerate() {
                        div.step data-status=(step.phase.name()) {
                            h3 {
                                (step.name) " " (badge(step.phase)) " "
                                @if let Some(d) = step.duration_us { span.dur { (duration_us(d)) } }
                            }
                            ol.lines {
                                @for (l, line) in step.lines.iter().enumerate() {
                                    li.line #{"line-" (i) "-" (s) "-" (l)} data-status=(line.phase.name()) {
                                        code.cmd { "$ " (line.text) }
                                        span.result {
                                            (exit_code(line.exit_code))
                                            @if let Some(d) = line.duration_us { " · " span.dur { (duration_us(d)) } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct After {
    after: Option<String>,
}

/// The summary fragment, once the read model has folded the offset the viewer saw (`after`).
pub async fn summary(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<After>,
    headers: HeaderMap,
) -> Result<Markup, WebError> {
    let session = api_session(&state, &headers)?;
    let end = match q.after.as_deref() {
        Some(after) => super::projects::after_end(&state, Some(after)).await?,
        None => match state.build_start(&id).await? {
            Some(start) => start.seen(),
            None => return Err(WebError::NotFound(format!("no build {id}"))),
        },
    };
    state.wait_builds(&end).await?;
    match state.store.load_build(&id).await.map_err(internal)? {
        Some(b) if b.tenant == session.who.tenant => {
            let artifacts = artifacts_of(&state, &session, &b).await?;
            let notes = crate::builds::runs_on_notes(&state, &b).await?;
            Ok(summary_markup(
                &b,
                &artifacts,
                &notes,
                &session,
                tributary_proto::now_us(),
            ))
        }
        _ => Err(WebError::NotFound(format!("no build {id}"))),
    }
}

pub async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<Csrf>,
) -> Result<Response, WebError> {
    let session = api_session(&state, &headers)?;
    check_post(&session, &headers, &f.csrf)?;
    crate::builds::cancel(&state, &session.who, &id, "canceled from the web UI").await?;
    tracing::info!(build_id = %id, who = %session.who.name, "build canceled from the web UI");
    Ok(Redirect::to(&format!("/ui/builds/{}", urlencode(&id))).into_response())
}

pub async fn rerun(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<Csrf>,
) -> Result<Response, WebError> {
    let session = api_session(&state, &headers)?;
    check_post(&session, &headers, &f.csrf)?;
    let new = crate::builds::rerun_failed(&state, &session.who, &id).await?;
    Ok(Redirect::to(&format!("/ui/builds/{}", urlencode(&new.build_id))).into_response())
}
