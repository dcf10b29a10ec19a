//! The web page (`server.ui`): static files from the repository's `ui/` folder, compiled into the binary, served
//! at `/ui/` with `/` redirecting there. The page talks to the public API like any other client.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::error::ApiError;
use crate::error::Error;
use crate::state::AppState;

/// One embedded file: its name under `/ui/`, its media type and its bytes.
struct Asset {
    name: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $mime:expr) => {
        Asset { name: $name, mime: $mime, bytes: include_bytes!(concat!("../../ui/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the page is made of.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("playground.js", JS),
    asset!("mask.js", JS),
    asset!("fleet.js", JS),
    asset!("gallery.js", JS),
    asset!("account.js", JS),
];

/// The page loads nothing from elsewhere; outputs may come from `server.public_url`, so images and media may.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data: blob: http: https:; media-src 'self' blob: http: https:; \
                   object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The page's routes: served outside authentication (the page holds no secret; its API calls carry the key).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { serve("index.html") }))
        .route("/ui/{*path}", get(asset_handler))
}

/// `GET /ui/{path}`.
async fn asset_handler(Path(path): Path<String>) -> Response {
    serve(&path)
}

fn serve(name: &str) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::from(Error::RouteNotFound { method: "GET".into(), path: format!("/ui/{name}") })
            .into_response();
    };
    let mut resp = a.bytes.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.mime));
    // Names carry no hash: browsers revalidate each time (the files are small).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if a.mime.starts_with("text/html") {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    }
    resp
}
