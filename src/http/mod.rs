//! The HTTP surface, and the only module that knows axum: routes, layers (in commented order), extractors with
//! OpenAI-shaped rejections, and the single error → status mapping in [`error`].

mod account;
mod auth;
pub mod error;
pub mod extract;
mod files;
mod images;
mod models;
mod ops;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use self::error::{ApiError, ServerFault};
use self::extract::BodyLimit;
use crate::error::Error;
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// Builds the router for `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    // Image routes take large bodies (edits carry images); the limit is enforced while reading, never buffered past.
    let images = Router::new()
        .route("/v1/images/generations", post(images::generations_handler))
        .route("/v1/images/edits", post(images::edits_handler))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)));

    Router::new()
        .merge(images)
        .route("/v1/models", get(models::list_handler))
        .route("/v1/models/{*id}", get(models::get_handler))
        .route("/v1/files/{id}", get(files::get_handler))
        .route("/v1/gateway/status", get(ops::status_handler))
        .route("/healthz", get(ops::healthz_handler))
        .route("/readyz", get(ops::readyz_handler))
        .route("/health", get(ops::health_handler))
        .route("/metrics", get(ops::metrics_handler))
        .route("/v1/me", get(account::me_handler))
        .route("/v1/usage", get(account::usage_handler))
        .route("/v1/admin/keys", post(account::create_key_handler).get(account::list_keys_handler))
        .route("/v1/admin/keys/{key}", axum::routing::delete(account::revoke_key_handler))
        .route("/v1/admin/keys/{key}/credits", post(account::grant_handler))
        .route("/v1/admin/ledger/check", get(account::ledger_check_handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside `observe`: authentication answers are measured and logged like any other.
        .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
        // Outermost: sees every request and the final response (including extractor rejections).
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Where stored outputs are served from: `server.public_url`, else the `Host` the client used.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &state.config.server.public_url {
        return u.as_str().trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| state.config.server.listen.to_string(), str::to_owned);
    let proto =
        headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()).filter(|p| *p == "https").unwrap_or("http");
    format!("{proto}://{host}")
}

async fn not_found(req: Request) -> ApiError {
    Error::RouteNotFound { method: req.method().to_string(), path: req.uri().path().to_owned() }.into()
}

async fn method_not_allowed(req: Request) -> ApiError {
    Error::MethodNotAllowed { method: req.method().to_string(), path: req.uri().path().to_owned() }.into()
}

/// Records request metrics and logs server-side failures once.
async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = static_route(req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()));
    let method = req.method().clone();
    let bytes_in = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let resp = next.run(req).await;
    let status = resp.status();
    let bytes_out = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    m::http_request(route, m::method_label(method.as_str()), status.as_u16(), started.elapsed(), bytes_in, bytes_out);
    if let Some(ServerFault(message)) = resp.extensions().get::<ServerFault>() {
        tracing::warn!(%method, route, status = status.as_u16(), error = %message, "Request failed.");
    }
    resp.into_response()
}

/// Route labels from a fixed set, so metrics never grow with client-chosen paths.
fn static_route(route: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/models",
        "/v1/models/{*id}",
        "/v1/files/{id}",
        "/v1/gateway/status",
        "/healthz",
        "/readyz",
        "/health",
        "/metrics",
        "/v1/me",
        "/v1/usage",
        "/v1/admin/keys",
        "/v1/admin/keys/{key}",
        "/v1/admin/keys/{key}/credits",
        "/v1/admin/ledger/check",
    ];
    ROUTES.iter().find(|r| **r == route).copied().unwrap_or("unmatched")
}
