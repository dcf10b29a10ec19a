//! Authentication at the router: with `auth.mode: keys` every route needs `Authorization: Bearer <key>` except
//! the named [`PUBLIC_ROUTES`] (with `mode: static`, the one configured token instead of a key); the admin API (and the gateway status page) needs `EASEL_ADMIN_TOKEN` in every
//! mode. A valid key becomes a [`Principal`] request extension. Generation, text and video requests of a key
//! then pass its limits (its own, stored with it, else `auth.key_limits`) (429 `rate_limited` with OpenAI's `x-ratelimit-*-requests` headers).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::admission::keys::{KeyRefusal, RateInfo};
use crate::config::AuthMode;
use crate::error::Error;
use crate::ledger::Store;
use crate::state::AppState;

/// Routes anyone may call, in every mode. `/metrics` joins them when `auth.public_metrics` is true.
pub const PUBLIC_ROUTES: &[&str] = &["/healthz", "/readyz", "/health"];

/// Stored outputs; with a signature in the query they need no key.
const FILES_PREFIX: &str = "/v1/files/";

/// Backends' webhooks: the signature in the URL is their authorization (checked by the hooks pipeline).
const HOOKS_PREFIX: &str = "/v1/hooks/";

/// Routes that need the admin token (prefix match).
const ADMIN_PREFIX: &str = "/v1/admin/";

pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let token = bearer(&req);
    let auth = &state.config.auth;
    let is_static_token = |given: Option<&str>| matches!((&auth.token, given), (Some(t), Some(g)) if constant_time_eq(t.expose().as_bytes(), g.as_bytes()));
    // Seed 004's gateway: its one token also opens the status page.
    if path == "/v1/gateway/status" && auth.mode == AuthMode::Static && is_static_token(token) {
        return next.run(req).await;
    }
    if path.starts_with(ADMIN_PREFIX) || (path == "/v1/gateway/status" && auth.mode != AuthMode::None) {
        return match (&auth.admin_token, token) {
            (None, _) => unauthorized("the admin API is disabled: start easel with EASEL_ADMIN_TOKEN set"),
            (Some(expected), Some(given)) if constant_time_eq(expected.expose().as_bytes(), given.as_bytes()) => {
                next.run(req).await
            }
            _ => unauthorized("this route needs the admin token (Authorization: Bearer $EASEL_ADMIN_TOKEN)"),
        };
    }
    if auth.mode == AuthMode::None || PUBLIC_ROUTES.contains(&path) || (path == "/metrics" && auth.public_metrics) {
        return next.run(req).await;
    }
    // A signed output URL carries its own authorization (checked by the files handler): `<img src>` sends no key.
    if path.starts_with(FILES_PREFIX) && req.uri().query().is_some_and(|q| q.contains("sig=")) {
        return next.run(req).await;
    }
    if path.starts_with(HOOKS_PREFIX) {
        return next.run(req).await;
    }
    if auth.mode == AuthMode::Static {
        return if is_static_token(token) {
            next.run(req).await
        } else {
            unauthorized("this gateway needs its bearer token: send `Authorization: Bearer <token>`")
        };
    }
    let Some(secret) = token else {
        return unauthorized("no API key: send `Authorization: Bearer <key>` (create one with `easel keys create`)");
    };
    // Boxed (here and the key limits' admit): the middleware's future stays small for every request, whatever
    // the store's or Redis's futures weigh.
    match Box::pin(state.ledger.authenticate(secret)).await {
        Ok(Some(principal)) => {
            crate::telemetry::context::note_key(&principal.name);
            let limited = state.cluster.keys.applies(&principal.limits) && is_generation(&state, &req);
            let key = principal.name.clone();
            let own = principal.limits;
            req.extensions_mut().insert(principal);
            if !limited {
                return next.run(req).await;
            }
            match Box::pin(state.cluster.keys.admit(&key, &own)).await {
                Ok((slot, info)) => {
                    let mut resp = next.run(req).await;
                    rate_headers(&mut resp, info);
                    // The parallel slot is held until the answer is fully sent (streams included).
                    resp.map(|body| Body::new(super::Holding::new(body, slot)))
                }
                Err(KeyRefusal::Limited(e)) => {
                    let info = e.info();
                    let mut resp = ApiError::from(e).into_response();
                    rate_headers(&mut resp, info);
                    resp
                }
                Err(KeyRefusal::Unavailable(e)) => ApiError::from(e).into_response(),
            }
        }
        Ok(None) => unauthorized("invalid API key: it is unknown or revoked"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Routes that cost backend work and count against a key's limits.
const LIMITED_ROUTES: &[&str] = &[
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
];

fn is_generation(state: &AppState, req: &Request) -> bool {
    let path = req.uri().path();
    req.method() == Method::POST
        && (LIMITED_ROUTES.contains(&path) || state.config.routes.iter().any(|r| r.path == path))
}

/// OpenAI's names: `x-ratelimit-{limit,remaining,reset}-requests` (reset as `1m0s`, `59s`).
fn rate_headers(resp: &mut Response, info: Option<RateInfo>) {
    let Some(info) = info else { return };
    let secs = info.reset.as_secs_f64().ceil() as u64;
    let reset = if secs >= 60 { format!("{}m{}s", secs / 60, secs % 60) } else { format!("{secs}s") };
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit-requests", info.limit.to_string()),
        ("x-ratelimit-remaining-requests", info.remaining.to_string()),
        ("x-ratelimit-reset-requests", reset),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn unauthorized(message: &str) -> Response {
    ApiError::from(Error::Unauthorized(message.to_owned())).into_response()
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
