//! Signing in with an API token, and out.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::html;
use serde::Deserialize;

use super::layout::page;
use super::session::{over_tls, safe_next, set_cookie, Session};
use super::{api_session, check_post, WebError};
use crate::state::ApiState;

#[derive(Deserialize, Default)]
pub struct Next {
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
pub struct Credentials {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
pub struct Csrf {
    #[serde(default)]
    pub csrf: String,
}

fn form_page(next: &str, error: Option<&str>) -> maud::Markup {
    page(
        "Sign in",
        None,
        html! {
            section.signin {
                h1 { "Sign in" }
                p { "Paste an API token of your tenant. An admin creates one with "
                    code { "tributary admin token-create --tenant TENANT --kind user" } "." }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/ui/login" {
                    input type="hidden" name="next" value=(safe_next(next));
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="current-password"
                        placeholder="trib_…" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

pub async fn form(Query(q): Query<Next>) -> maud::Markup {
    form_page(&q.next, None)
}

pub async fn submit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(c): Form<Credentials>,
) -> Result<Response, WebError> {
    if !super::session::same_origin(&headers) {
        return Err(WebError::Forbidden("a sign-in posted from another site"));
    }
    match state.directory(|d| Session::check(d, &c.token))? {
        Ok(session) => {
            tracing::info!(tenant = %session.who.tenant, token = %session.who.name, "web sign-in");
            let cookie = set_cookie(Some(c.token.trim()), over_tls(&headers));
            Ok((
                [(header::SET_COOKIE, cookie)],
                Redirect::to(safe_next(&c.next)),
            )
                .into_response())
        }
        Err(denied) => Ok((
            StatusCode::UNAUTHORIZED,
            form_page(&c.next, Some(&denied.to_string())),
        )
            .into_response()),
    }
}

pub async fn logout(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<Csrf>,
) -> Result<Response, WebError> {
    let session = api_session(&state, &headers)?;
    check_post(&session, &headers, &f.csrf)?;
    let cookie = set_cookie(None, over_tls(&headers));
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response())
}
