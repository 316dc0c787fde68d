//! The build page's history slider: the build's steps (the records that changed what the page
//! shows) as JSON, fetched once, and the page's summary as it stood at any of them, folded by
//! the server from the build's own records with the projector's fold
//! ([`tributary_projections::history`]), so every position shows exactly what was.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use tributary_projections::history::{self, Moment};
use tributary_projections::Phase;

use super::format::utc;
use super::{api_session, WebError};
use crate::history::build_records;
use crate::state::ApiState;

/// One position of the slider.
#[derive(Serialize)]
pub struct Step {
    pub offset: u64,
    pub time_us: i64,
    /// `2026-12-07 21:03:05 UTC`.
    pub time: String,
    pub label: String,
}

/// `GET /ui/builds/{id}/history.json`: the build's steps in log order.
pub async fn steps(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vec<Step>>, WebError> {
    let session = api_session(&state, &headers)?;
    let records = build_records(&state, &session.who, &id).await?;
    Ok(Json(
        history::moments(&id, &records)
            .into_iter()
            .map(|m| Step {
                offset: m.offset,
                time_us: m.time_us,
                time: utc(m.time_us),
                label: m.label,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
pub struct AtQuery {
    offset: u64,
}

/// `GET /ui/builds/{id}/at?offset=N`: the summary fragment of the build as it stood right after
/// its record at offset N (no actions: the past cannot be canceled).
pub async fn at(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<AtQuery>,
    headers: HeaderMap,
) -> Result<Markup, WebError> {
    let session = api_session(&state, &headers)?;
    let records = build_records(&state, &session.who, &id).await?;
    let Some(mut at) = history::build_at(&id, &records, Moment::Offset(q.offset)) else {
        return Err(WebError::NotFound(format!(
            "build {id} did not exist yet at offset {}",
            q.offset
        )));
    };
    // Waiting reasons of that moment, where the page shows a job's reason.
    for job in &mut at.build.jobs {
        if let Some(reason) = at.waiting.get(&job.id) {
            if job.phase == Phase::Queued && job.reason.is_empty() {
                job.reason = format!("waiting: {reason}");
            }
        }
    }
    Ok(html! {
        p.asof #asof data-offset=(at.offset) {
            "As of offset " (at.offset) ", " (utc(at.time_us))
        }
        (super::build::past_summary_markup(&at.build, &session, at.time_us))
    })
}
