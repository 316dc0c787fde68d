//! The tenant's projects, and one project's builds (the table follows the project's events).

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use maud::{html, Markup};
use serde::Deserialize;
use tributary_projections::Build;

use super::format::{build_label, elapsed, short_commit, utc};
use super::layout::{badge, page};
use super::{api_session, page_session, urlencode, WebError};
use crate::state::{internal, ApiState, Mark};

const LIST_LIMIT: u32 = 100;

pub async fn home(State(state): State<ApiState>, headers: HeaderMap) -> Result<Markup, WebError> {
    let session = page_session(&state, &headers, "/ui/")?;
    let end = state.log_end().await?;
    state.wait_directory(&end).await?;
    let projects: Vec<(String, String)> = state.directory(|d| {
        d.projects_of(&session.who.tenant)
            .map(|p| (p.name.clone(), p.repository.clone()))
            .collect()
    })?;
    let mut rows = Vec::new();
    for (name, repo) in projects {
        let last = state
            .store
            .list_builds_for(&session.who.tenant, Some(&name), None, 1)
            .await
            .map_err(internal)?;
        rows.push((name, repo, last.into_iter().next()));
    }
    let now = tributary_proto::now_us();
    Ok(page(
        "Projects",
        Some(&session),
        html! {
            h1 { "Projects" }
            @if rows.is_empty() {
                p.empty { "No projects yet. Add one with "
                    code { "tributary project add NAME --repo PATH_OR_URL" } "." }
            } @else {
                table.list {
                    thead { tr { th { "project" } th { "last build" } th.wide { "repository" } th { "when" } } }
                    tbody {
                        @for (name, repo, last) in &rows {
                            tr {
                                td { a href={"/ui/projects/" (urlencode(name))} { (name) } }
                                td { @if let Some(b) = last {
                                    a href={"/ui/builds/" (b.id)} { (badge(b.phase)) " " (build_label(b.number, &b.id)) }
                                } @else { "–" } }
                                td.wide.mono { (repo) }
                                td { @if let Some(b) = last { (super::format::ago(b.triggered_us, now)) } }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// The rows of a project's builds table (the page renders them, and the script re-fetches
/// them when the project's events say something changed).
pub fn build_rows(builds: &[Build], now_us: i64) -> Markup {
    html! {
        @for b in builds {
            tr data-build=(b.id) data-status=(b.phase.name()) {
                td { a href={"/ui/builds/" (b.id)} { (build_label(b.number, &b.id)) } }
                td { (badge(b.phase)) }
                td.mono { (b.git_ref) }
                td.mono { span title=(b.commit) { (short_commit(&b.commit)) } }
                td.wide { (b.who) }
                td.wide { time datetime=(b.triggered_us) { (utc(b.triggered_us)) } }
                td { (elapsed(b.started_us, b.finished_us, now_us).unwrap_or_else(|| "–".into())) }
            }
        }
        @if builds.is_empty() {
            tr { td colspan="7" .empty { "No builds yet. Trigger one with "
                code { "tributary trigger PROJECT" } "." } }
        }
    }
}

/// The project's latest builds, read once the read model has folded the log up to the
/// returned position (a start token of the project's live stream, [`super::resume`]).
async fn project_builds(
    state: &ApiState,
    tenant: &str,
    project: &str,
    after: Option<&str>,
) -> Result<(Vec<Build>, String), WebError> {
    let known = state.directory(|d| d.project(tenant, project).is_some())?;
    if !known {
        return Err(WebError::NotFound(format!("no project {project}")));
    }
    // With the viewer's position: at least there. Without: every build of the tenant
    // triggered so far, and the live stream goes on from where the read model is (read before
    // the rows: an event both in the rows and on the stream is applied twice, harmlessly; none
    // is missed).
    let end = match after {
        Some(_) => {
            let end = after_end(state, after).await?;
            state.wait_builds(&end).await?;
            end
        }
        None => {
            state.wait_builds(&state.starts.newest_of(tenant)?).await?;
            Mark(state.model.now())
        }
    };
    let builds = state
        .store
        .list_builds_for(tenant, Some(project), None, LIST_LIMIT)
        .await
        .map_err(internal)?;
    // The page's live stream starts there, in every events partition.
    let events = state
        .log
        .layout()
        .topic_partitions(tributary_eventlog::Topic::Events);
    let from: Vec<(u32, u64)> = end
        .0
        .into_iter()
        .filter(|(p, _)| events.contains(p))
        .collect();
    Ok((builds, super::resume::from_token(&from)))
}

pub async fn builds(
    State(state): State<ApiState>,
    Path(project): Path<String>,
    headers: HeaderMap,
) -> Result<Markup, WebError> {
    let here = format!("/ui/projects/{}", urlencode(&project));
    let session = page_session(&state, &headers, &here)?;
    let (builds, end) = project_builds(&state, &session.who.tenant, &project, None)
        .await
        .map_err(|e| e.in_page(&session))?;
    let now = tributary_proto::now_us();
    Ok(page(
        &project,
        Some(&session),
        html! {
            h1 { (project) " " small { "builds" } }
            p.hint { "Updates live. Trigger with " code { "tributary trigger " (project) } "." }
            table.list #builds data-live={(here) "/live?from=" (end)} data-rows={(here) "/rows"} {
                thead { tr {
                    th { "build" } th { "status" } th { "ref" } th { "commit" }
                    th.wide { "by" } th.wide { "triggered" } th { "duration" }
                } }
                tbody { (build_rows(&builds, now)) }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct After {
    after: Option<String>,
}

pub async fn rows(
    State(state): State<ApiState>,
    Path(project): Path<String>,
    Query(q): Query<After>,
    headers: HeaderMap,
) -> Result<Markup, WebError> {
    let session = api_session(&state, &headers)?;
    let (builds, _) =
        project_builds(&state, &session.who.tenant, &project, q.after.as_deref()).await?;
    Ok(build_rows(&builds, tributary_proto::now_us()))
}

/// How far the builds read model must have folded before answering: up to and including
/// `after` (the id of an event the viewer saw on the project's live stream: an offset on one
/// partition, a position per events partition on several, [`super::resume`]; never beyond
/// the log), else the end.
pub async fn after_end(state: &ApiState, after: Option<&str>) -> Result<Mark, WebError> {
    let ends = super::live::events_ends(state).await?;
    Ok(Mark(super::resume::start(&ends, None, after)))
}
