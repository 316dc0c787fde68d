//! The web UI, served under `/ui/` by the API server's axum router (same port as gRPC).
//!
//! Server-rendered HTML (maud) plus one small script for the live parts; styles and script are
//! embedded in the binary ([`assets`]), no CDN. Everything comes from the existing read
//! models: the builds store, the directory and the cluster fold in [`ApiState`], and the event
//! log for live streams ([`live`]).
//!
//! * [`session`]: sign-in with an API token kept in an HttpOnly cookie; CSRF for POSTs.
//! * [`projects`]: the projects of the tenant, and each project's builds (live-updating).
//! * [`build`]: a build's jobs (DAG), steps and lines with exit codes, cancel, re-run failed.
//! * [`history`]: the build page's history slider (its steps, and the build at each).
//! * [`live`]: Server-Sent Events: a build's log and status (replay, then follow; resumable
//!   by offset), a project's changes; the raw log download.
//! * [`agents`]: agents the tenant can use, their labels, current jobs and last heartbeat.
//! * [`usage`]: the tenant's metered machine time and invoices (metering read model).
//!
//! Every handler resolves the session first and shows only its tenant's data; another
//! tenant's build is "not found", exactly like the gRPC API.

pub mod agents;
pub mod assets;
pub mod build;
pub mod dag;
pub mod format;
pub mod history;
pub mod layout;
pub mod live;
pub mod login;
pub mod projects;
pub mod resume;
pub mod session;
pub mod tail;
pub mod usage;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::state::ApiState;
use session::{Denied, Session};

/// The UI's routes (to merge into the API's router); `metering` feeds the usage page (None:
/// the page says metering is not running).
pub fn router(state: ApiState, metering: Option<crate::metering::MeteringReader>) -> Router {
    let usage = Router::new()
        .route("/ui/usage", get(usage::page))
        .with_state(usage::UsageState {
            api: state.clone(),
            metering,
        });
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(projects::home))
        .route("/ui/login", get(login::form).post(login::submit))
        .route("/ui/logout", post(login::logout))
        .route("/ui/projects/{project}", get(projects::builds))
        .route("/ui/projects/{project}/rows", get(projects::rows))
        .route("/ui/projects/{project}/live", get(live::project))
        .route("/ui/builds/{id}", get(build::page))
        .route("/ui/builds/{id}/summary", get(build::summary))
        .route("/ui/builds/{id}/events", get(live::build))
        .route("/ui/builds/{id}/history.json", get(history::steps))
        .route("/ui/builds/{id}/at", get(history::at))
        .route("/ui/builds/{id}/log.txt", get(live::log_txt))
        .route("/ui/builds/{id}/cancel", post(build::cancel))
        .route("/ui/builds/{id}/rerun", post(build::rerun))
        .route("/ui/agents", get(agents::page))
        .route(assets::CSS_PATH, get(assets::css))
        .route(assets::JS_PATH, get(assets::js))
        .with_state(state)
        .merge(usage)
        .layer(axum::middleware::map_response(security_headers))
}

/// Headers on every UI response: a strict content security policy (our own script and
/// styles only, no framing), no sniffing, no referrer to other sites.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Why a UI request failed, as the page (or status) the viewer gets.
#[derive(Debug)]
pub enum WebError {
    /// A page that needs a session: go sign in, then come back to `next`.
    SignIn {
        next: String,
    },
    /// A stream, fragment or form that needs a session: 401.
    Unauthorized(Denied),
    /// A POST without this session's CSRF token, or from another site: 403.
    Forbidden(&'static str),
    NotFound(String),
    BadRequest(String),
    /// The log or a read model is not available now: 503.
    Unavailable(String),
    /// An error on a page of a signed-in viewer: the page keeps its navigation.
    InPage(Box<WebError>, Box<Session>),
}

impl WebError {
    /// Shows this error inside the signed-in page shell.
    pub fn in_page(self, session: &Session) -> WebError {
        WebError::InPage(Box::new(self), Box::new(session.clone()))
    }
}

impl From<tonic::Status> for WebError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::NotFound => WebError::NotFound(s.message().to_owned()),
            tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                WebError::BadRequest(s.message().to_owned())
            }
            _ => WebError::Unavailable(s.message().to_owned()),
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (error, session) = match self {
            WebError::InPage(error, session) => (*error, Some(session)),
            other => (other, None),
        };
        let (status, title, text) = match error {
            WebError::SignIn { next } => {
                let q = format!("/ui/login?next={}", urlencode(&next));
                return Redirect::to(&q).into_response();
            }
            WebError::Unauthorized(d) => (StatusCode::UNAUTHORIZED, "Not signed in", d.to_string()),
            WebError::Forbidden(why) => (StatusCode::FORBIDDEN, "Refused", why.to_owned()),
            WebError::NotFound(what) => (StatusCode::NOT_FOUND, "Not found", what),
            WebError::BadRequest(what) => (StatusCode::BAD_REQUEST, "Cannot do that", what),
            WebError::Unavailable(what) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                format!("{what} (retry in a moment)"),
            ),
            WebError::InPage(inner, _) => return inner.into_response(),
        };
        (status, layout::message(title, session.as_deref(), &text)).into_response()
    }
}

/// The session of a page request; without one, a redirect to the sign-in page.
pub fn page_session(
    state: &ApiState,
    headers: &HeaderMap,
    here: &str,
) -> Result<Session, WebError> {
    let found = state
        .directory(|d| Session::from_headers(d, headers))
        .map_err(WebError::from)?;
    found.map_err(|_| WebError::SignIn {
        next: here.to_owned(),
    })
}

/// The session of a stream, fragment or form request; without one, 401.
pub fn api_session(state: &ApiState, headers: &HeaderMap) -> Result<Session, WebError> {
    state
        .directory(|d| Session::from_headers(d, headers))
        .map_err(WebError::from)?
        .map_err(WebError::Unauthorized)
}

/// Checks a POST: same origin and this session's CSRF token.
pub fn check_post(session: &Session, headers: &HeaderMap, csrf: &str) -> Result<(), WebError> {
    if !session::same_origin(headers) {
        return Err(WebError::Forbidden("a form posted from another site"));
    }
    if !session.csrf_ok(csrf) {
        return Err(WebError::Forbidden(
            "the form's CSRF token is missing or belongs to another session; reload the page",
        ));
    }
    Ok(())
}

/// Percent-encodes a path segment or query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
