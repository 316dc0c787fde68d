//! The HTTP side of the API server (axum), on the same port as gRPC:
//!
//! * `POST /hooks/github/{tenant}/{project}`: GitHub `push` and `pull_request` webhooks,
//!   verified with the project's secret through `X-Hub-Signature-256` (HMAC-SHA256, compared
//!   in constant time). A missing or bad signature is 401 and triggers nothing.
//! * `GET /api/builds/{build}/artifacts/{job}/{*path}`: download an artifact, with
//!   `Authorization: Bearer <token>` or the web UI's session cookie (a build of another tenant
//!   is 404; the build page links here). The bytes were checked
//!   against the recorded sha256 first (a corrupt object is 500 and sends nothing); the sha256
//!   is in the `X-Tributary-Sha256` header for the client to check again.
//! * `GET /metrics`: Prometheus text format.
//! * `GET /healthz`: liveness.
//! * `GET /readyz`: 503 while the event log does not answer (a Kafka outage).

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::state::ApiState;

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/hooks/github/{tenant}/{project}", post(github))
        .route(
            "/api/builds/{build}/artifacts/{job}/{*path}",
            get(download_artifact),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// `GET /api/builds/{build}/artifacts/{job}/{*path}`.
async fn download_artifact(
    State(state): State<ApiState>,
    Path((build, job, path)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let who = match http_principal(&state, &headers) {
        Ok(who) => who,
        Err(status) => return grpc_to_http(&status),
    };
    let artifact = match crate::artifacts::find(&state, &who, &build, &job, &path).await {
        Ok(a) => a,
        Err(status) => return grpc_to_http(&status),
    };
    let (tmp, file) = match crate::artifacts::fetch_verified(&state, &artifact).await {
        Ok(f) => f,
        Err(status) => return grpc_to_http(&status),
    };
    let file_name = artifact
        .path
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .replace(['"', '\\', '\r', '\n'], "_");
    let body = axum::body::Body::from_stream(crate::artifacts::chunks(tmp, file));
    (
        [
            ("content-type", "application/octet-stream".to_owned()),
            ("content-length", artifact.size.to_string()),
            ("x-tributary-sha256", artifact.sha256.clone()),
            (
                "content-disposition",
                format!("attachment; filename=\"{file_name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// The caller of an HTTP route: the token of `Authorization: Bearer <token>` or of the web
/// UI's session cookie, read by the UI's own parser (`web::session::token_in`) and checked
/// like the UI's sessions (user and admin tokens only).
fn http_principal(
    state: &ApiState,
    headers: &HeaderMap,
) -> Result<crate::auth::Principal, tonic::Status> {
    use crate::web::session::{Denied, Session};
    match state.directory(|d| Session::from_headers(d, headers))? {
        Ok(session) => Ok(session.who),
        Err(Denied::Missing) => Err(tonic::Status::unauthenticated(
            "missing token: send `Authorization: Bearer <token>` or sign in to the web UI",
        )),
        Err(denied @ Denied::Unknown) => Err(tonic::Status::unauthenticated(denied.to_string())),
        Err(denied @ Denied::WrongKind(_)) => {
            Err(tonic::Status::permission_denied(denied.to_string()))
        }
    }
}

fn grpc_to_http(status: &tonic::Status) -> Response {
    use tonic::Code;
    let code = match status.code() {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, status.message())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Verifies `sha256=<hex>` over `body` with `secret`, in constant time.
pub fn signature_valid(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn github(
    State(state): State<ApiState>,
    Path((tenant, project)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let sealed = match state.directory(|d| {
        d.project(&tenant, &project)
            .map(|p| p.sealed_webhook_secret.clone())
    }) {
        Ok(Some(sealed)) => sealed,
        // Same answer for an unknown project as for a bad signature: nothing to learn.
        _ => return error(StatusCode::UNAUTHORIZED, "invalid signature"),
    };
    let Some(secret) = state.server_key.as_ref().and_then(|k| k.open(&sealed)) else {
        return error(StatusCode::UNAUTHORIZED, "invalid signature");
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !signature_valid(&secret, &body, signature) {
        tracing::warn!(%tenant, %project, "webhook with a missing or bad signature refused");
        return error(StatusCode::UNAUTHORIZED, "invalid signature");
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let (git_ref, commit) = match event {
        "push" => {
            let commit = payload["after"].as_str().unwrap_or("");
            if commit.chars().all(|c| c == '0') {
                return (
                    StatusCode::OK,
                    Json(serde_json::json!({ "ignored": "branch deleted" })),
                )
                    .into_response();
            }
            (payload["ref"].as_str().unwrap_or(""), commit)
        }
        "pull_request" => {
            let action = payload["action"].as_str().unwrap_or("");
            if !matches!(action, "opened" | "synchronize" | "reopened") {
                return (
                    StatusCode::OK,
                    Json(serde_json::json!({ "ignored": action })),
                )
                    .into_response();
            }
            let pr = &payload["pull_request"];
            (
                pr["head"]["ref"].as_str().unwrap_or(""),
                pr["head"]["sha"].as_str().unwrap_or(""),
            )
        }
        "ping" => {
            return (StatusCode::OK, Json(serde_json::json!({ "pong": true }))).into_response()
        }
        other => {
            return (
                StatusCode::OK,
                Json(serde_json::json!({ "ignored": other })),
            )
                .into_response()
        }
    };
    if commit.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no commit in the payload");
    }
    match crate::builds::trigger(
        &state,
        &tenant,
        &project,
        git_ref,
        commit,
        "webhook:github",
        "webhook",
    )
    .await
    {
        Ok(resp) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "build_id": resp.build_id })),
        )
            .into_response(),
        Err(status) => error(StatusCode::UNPROCESSABLE_ENTITY, status.message()),
    }
}

/// 200 when the event log answers within 2 s; 503 saying why not (the API keeps running).
async fn readyz(State(state): State<ApiState>) -> Response {
    match state.log.probe(std::time::Duration::from_secs(2)).await {
        Ok(()) => "ok\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the event log does not answer: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    // Events on the log: the sum over its partitions.
    let events: u64 = state
        .log
        .end_offsets()
        .await
        .map_or(0, |ends| ends.iter().sum());
    let (queued, running, agents, requeues) = state
        .cluster
        .read(|c| {
            let jobs = c.builds.builds.values().flat_map(|b| &b.jobs);
            let queued = jobs
                .clone()
                .filter(|j| j.phase == tributary_scheduler::JobPhase::Queued)
                .count();
            let running = c.leases.values().filter(|l| l.started_us.is_some()).count();
            let agents = c
                .agents
                .values()
                .filter(|a| a.connected && !a.revoked)
                .count();
            let requeues: u32 = c
                .build_info
                .values()
                .flat_map(|b| b.jobs.values())
                .map(|j| j.requeues)
                .sum();
            (queued, running, agents, requeues)
        })
        .unwrap_or_default();
    let tails = state.tail_subscribers.load(Ordering::Relaxed);
    let body = format!(
        "# HELP tributary_events_appended_total Events on the log.\n\
         # TYPE tributary_events_appended_total counter\n\
         tributary_events_appended_total {events}\n\
         # HELP tributary_queue_depth Jobs queued, waiting for an agent.\n\
         # TYPE tributary_queue_depth gauge\n\
         tributary_queue_depth {queued}\n\
         # HELP tributary_jobs_running Job attempts started and not finished.\n\
         # TYPE tributary_jobs_running gauge\n\
         tributary_jobs_running {running}\n\
         # HELP tributary_agents_connected Agents with an open work stream.\n\
         # TYPE tributary_agents_connected gauge\n\
         tributary_agents_connected {agents}\n\
         # HELP tributary_lease_requeues_total Job attempts taken back from lost agents (unfinished builds).\n\
         # TYPE tributary_lease_requeues_total counter\n\
         tributary_lease_requeues_total {requeues}\n\
         # HELP tributary_tail_subscribers Open log tails and event watches.\n\
         # TYPE tributary_tail_subscribers gauge\n\
         tributary_tail_subscribers {tails}\n{}",
        tributary_eventlog::skipped::prometheus()
    );
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}
