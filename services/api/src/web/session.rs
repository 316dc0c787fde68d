//! Who is looking: the API token in the session cookie (or an `Authorization: Bearer` header,
//! for scripts and the benchmark), checked exactly like the gRPC API's bearer tokens.
//! [`token_in`] is the one place an HTTP request's token is read: the UI's pages and streams
//! and the `/api/` routes (`http.rs`: artifact downloads) all use it.
//!
//! The cookie holds the token itself, HttpOnly (no script reads it), SameSite=Lax (no
//! cross-site POST carries it) and Secure when the page came over TLS. Nothing is stored on
//! the server: revoking the token (`TokenRevoked`) signs every session of it out.
//!
//! POST forms carry a CSRF token: HMAC-SHA256 keyed by the API token, so only a page rendered
//! for that session can hold it, and it reveals nothing about the token. POSTs whose `Origin`
//! (or `Sec-Fetch-Site`) says they come from another site are refused as well.

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tributary_projections::directory::{Directory, TokenKind};

use crate::auth::{principal_of, Principal};

/// The session cookie's name.
pub const COOKIE: &str = "tributary_session";

/// A signed-in viewer.
#[derive(Clone)]
pub struct Session {
    pub who: Principal,
    token: String,
}

impl std::fmt::Debug for Session {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

/// Why a request is not signed in.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("not signed in")]
    Missing,
    #[error("unknown or revoked token; create one with `tributary admin token-create --tenant TENANT --kind user`")]
    Unknown,
    #[error("a {0} token cannot sign in to the web UI; use a user token")]
    WrongKind(&'static str),
}

impl Session {
    /// Checks `token` against the directory: a live user or admin token.
    pub fn check(directory: &Directory, token: &str) -> Result<Session, Denied> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Denied::Missing);
        }
        let who = principal_of(directory, token).map_err(|_| Denied::Unknown)?;
        if !matches!(who.kind, TokenKind::User | TokenKind::Admin) {
            return Err(Denied::WrongKind(who.kind.name()));
        }
        Ok(Session {
            who,
            token: token.to_owned(),
        })
    }

    /// The session of a request: its cookie, else its bearer header.
    pub fn from_headers(directory: &Directory, headers: &HeaderMap) -> Result<Session, Denied> {
        let token = token_in(headers).ok_or(Denied::Missing)?;
        Session::check(directory, &token)
    }

    /// The CSRF token that POST forms of this session must carry.
    pub fn csrf(&self) -> String {
        csrf_for(&self.token)
    }

    /// Whether `presented` is this session's CSRF token (constant-time).
    pub fn csrf_ok(&self, presented: &str) -> bool {
        let Ok(sig) = hex::decode(presented.trim()) else {
            return false;
        };
        csrf_mac(&self.token).verify_slice(&sig).is_ok()
    }
}

fn csrf_mac(token: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"tributary-web-csrf-v1");
    mac
}

fn csrf_for(token: &str) -> String {
    hex::encode(csrf_mac(token).finalize().into_bytes())
}

/// The token a request presents: the session cookie first, then `Authorization: Bearer`.
pub fn token_in(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for cookie in cookie::Cookie::split_parse(text).flatten() {
            if cookie.name() == COOKIE && !cookie.value().is_empty() {
                return Some(cookie.value().to_owned());
            }
        }
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer)
        .map(str::to_owned)
}

/// Whether the request reached us over TLS (directly or through a proxy that says so).
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value that signs `token` in (`token` = None: signs out).
pub fn set_cookie(token: Option<&str>, secure: bool) -> String {
    // Path `/`: the UI's pages and the `/api/` routes (artifact downloads) both read it.
    let mut c = cookie::Cookie::build((COOKIE, token.unwrap_or("").to_owned()))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Lax)
        .secure(secure);
    c = match token {
        Some(_) => c.max_age(cookie::time::Duration::days(7)),
        None => c.max_age(cookie::time::Duration::ZERO),
    };
    c.build().to_string()
}

/// A POST is same-origin: its `Origin` (when sent) names the host it was sent to (`Host`, or
/// `X-Forwarded-Host` behind a proxy), and `Sec-Fetch-Site` (when sent) does not say
/// cross-site.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    // Behind a proxy that rewrites Host, X-Forwarded-Host names the host the browser used.
    let hosts = [get("host"), get("x-forwarded-host")];
    match get("origin") {
        Some("null") => false,
        Some(origin) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            hosts
                .iter()
                .flatten()
                .any(|h| origin_host.eq_ignore_ascii_case(h.trim()))
        }
        None => true,
    }
}

/// Where to go after signing in: only a path of the UI (never another site).
pub fn safe_next(next: &str) -> &str {
    let ok = next.starts_with("/ui/") && !next.starts_with("//") && !next.contains('\\');
    if ok {
        next
    } else {
        "/ui/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sha256_hex;
    use axum::http::HeaderValue;
    use tributary_proto::events::{envelope::Payload, Envelope, TokenIssued};

    fn directory_with(token: &str, kind: &str) -> Directory {
        let mut d = Directory::default();
        d.apply(&Envelope::new(
            "acme",
            "",
            "",
            Payload::TokenIssued(TokenIssued {
                token_id: "t1".into(),
                tenant: "acme".into(),
                kind: kind.into(),
                name: "alice".into(),
                sha256: sha256_hex(token),
            }),
        ));
        d
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_or_the_bearer_header_names_the_session() {
        let d = directory_with("trib_secret", "user");
        let s = Session::from_headers(
            &d,
            &headers(&[("cookie", "a=b; tributary_session=trib_secret")]),
        )
        .unwrap();
        assert_eq!(s.who.tenant, "acme");
        let s = Session::from_headers(&d, &headers(&[("authorization", "Bearer trib_secret")]));
        assert!(s.is_ok());
        assert_eq!(
            Session::from_headers(&d, &headers(&[("cookie", "tributary_session=other")])).err(),
            Some(Denied::Unknown)
        );
        assert_eq!(
            Session::from_headers(&d, &headers(&[])).err(),
            Some(Denied::Missing)
        );
    }

    #[test]
    fn agent_and_enrollment_tokens_cannot_sign_in() {
        for kind in ["agent", "enrollment"] {
            let d = directory_with("trib_x", kind);
            assert!(matches!(
                Session::check(&d, "trib_x"),
                Err(Denied::WrongKind(_))
            ));
        }
        assert!(Session::check(&directory_with("trib_x", "admin"), "trib_x").is_ok());
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let a = Session::check(&directory_with("trib_a", "user"), "trib_a").unwrap();
        let b = Session::check(&directory_with("trib_b", "user"), "trib_b").unwrap();
        assert!(a.csrf_ok(&a.csrf()));
        assert!(!a.csrf_ok(&b.csrf()));
        assert!(!a.csrf_ok(""));
        assert!(!a.csrf_ok("zz"));
        assert!(!a.csrf().contains("trib_a"));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        assert!(same_origin(&headers(&[("host", "ci:7700")])));
        assert!(same_origin(&headers(&[
            ("host", "ci:7700"),
            ("origin", "http://ci:7700")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "ci:7700"),
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "ci:7700"),
            ("origin", "null")
        ])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:7700"),
            ("x-forwarded-host", "ci.example"),
            ("origin", "https://ci.example")
        ])));
        assert!(!same_origin(&headers(&[("origin", "https://ci.example")])));
        assert!(!same_origin(&headers(&[
            ("host", "ci:7700"),
            ("sec-fetch-site", "cross-site")
        ])));
    }

    #[test]
    fn cookies_are_http_only_lax_and_secure_over_tls() {
        let c = set_cookie(Some("trib_a"), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Secure"));
        assert_eq!(cookie::Cookie::parse(c.as_str()).unwrap().path(), Some("/"));
        assert!(!set_cookie(Some("trib_a"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }

    #[test]
    fn next_stays_on_the_ui() {
        assert_eq!(safe_next("/ui/builds/x"), "/ui/builds/x");
        assert_eq!(safe_next("https://evil.example/"), "/ui/");
        assert_eq!(safe_next("//evil.example/ui/"), "/ui/");
        assert_eq!(safe_next("/ui/\\evil"), "/ui/");
    }
}
