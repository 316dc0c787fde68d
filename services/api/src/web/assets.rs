//! The UI's stylesheet and script, embedded in the binary (no CDN: servers may be offline).

use axum::http::header;
use axum::response::IntoResponse;

pub const CSS_PATH: &str = "/ui/static/app.css";
pub const JS_PATH: &str = "/ui/static/app.js";

const CSS: &str = include_str!("../../web/app.css");
const JS: &str = include_str!("../../web/app.js");

pub async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
}

pub async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
}
