//! The HTTP surface, and the only module that knows axum: routes, layers (in commented order), extractors with
//! OpenAI-shaped rejections, and the single error → status mapping in [`error`].

mod account;
mod admin;
mod auth;
mod chat;
pub mod drain;
pub mod error;
pub mod extract;
mod files;
mod fleet;
mod hooks;
mod images;
mod jobs;
mod legacy;
mod models;
mod ops;
pub mod serve;
mod sets;
mod ui;
mod videos;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt};
use http_body::Body as _;
use tracing::Instrument;

use self::error::{ApiError, ServerFault};
use crate::error::Error;
use crate::state::AppState;
use crate::telemetry::context::RequestContext;
use crate::telemetry::metrics as m;

/// Serves whatever runtime `live` holds: each request goes to the router of the current runtime (built once
/// per reload), carrying `live` as an extension for the reload route. A request keeps the runtime it started
/// with until it ends.
#[derive(Clone)]
pub struct LiveRouter {
    live: crate::reload::Live,
    cached: std::sync::Arc<std::sync::RwLock<Routed>>,
}

/// A runtime's router and the body limit its requests start with (see [`router`]), for one config generation.
type Routed = (u64, Router, DefaultBodyLimit);

impl LiveRouter {
    pub fn new(live: crate::reload::Live) -> Self {
        let first = routed(&live);
        Self { live, cached: std::sync::Arc::new(std::sync::RwLock::new(first)) }
    }

    /// The router of the current runtime, rebuilt only when a reload changed it.
    fn router(&self) -> (Router, DefaultBodyLimit) {
        use std::sync::PoisonError;
        let generation = self.live.generation();
        {
            let cached = self.cached.read().unwrap_or_else(PoisonError::into_inner);
            if cached.0 == generation {
                return (cached.1.clone(), cached.2);
            }
        }
        let mut cached = self.cached.write().unwrap_or_else(PoisonError::into_inner);
        if cached.0 != generation {
            *cached = routed(&self.live);
        }
        (cached.1.clone(), cached.2)
    }
}

fn routed(live: &crate::reload::Live) -> Routed {
    let state = live.current();
    let limit = DefaultBodyLimit::max(state.config.server.max_body_bytes);
    (live.generation(), router(state), limit)
}

impl tower::Service<Request> for LiveRouter {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = <Router as tower::Service<Request>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        req.extensions_mut().insert(self.live.clone());
        let (router, limit) = self.router();
        // The body limit is set here, around the router, not as a route layer (which would box a service clone
        // and a future per request on the hot routes); routes that take small bodies set a smaller one.
        tower::Service::call(&mut tower::Layer::layer(&limit, router), req)
    }
}

/// Builds the router for `state`. Requests reach it with `server.max_body_bytes` as their body limit (see
/// [`LiveRouter`]): the image and text routes read bodies up to it, every other route up to [`SMALL_BODY`].
fn router(state: AppState) -> Router {
    crate::media::configure(state.config.server.max_image_pixels, state.config.server.decode_memory_bytes);
    // Image routes take large bodies (edits carry images); the limit is enforced while reading, never buffered past.
    let mut images = Router::new()
        .route("/v1/images/generations", post(images::generations_handler))
        .route("/v1/images/edits", post(images::edits_handler))
        .route("/v1/images/variations", post(images::variations_handler))
        .route("/v1/videos", post(videos::create_handler).get(videos::list_handler));
    // Legacy routes from `routes:` (validated at load: plain paths that never shadow easel's own).
    for r in &state.config.routes {
        images = images.route(&r.path, post(legacy::handler));
    }
    let text = Router::new()
        .route("/v1/chat/completions", post(chat::chat_handler))
        .route("/v1/completions", post(chat::completions_handler))
        .route("/v1/embeddings", post(chat::embeddings_handler));

    let rest = Router::new()
        .route("/v1/models", get(models::list_handler))
        .route("/v1/models/{*id}", get(models::get_handler))
        .route("/v1/files", get(files::list_handler))
        .route("/v1/files/{id}", get(files::get_handler))
        .route("/v1/videos/{id}", get(videos::get_handler).delete(videos::delete_handler))
        .route("/v1/videos/{id}/content", get(videos::content_handler))
        .route("/v1/videos/{id}/cancel", post(videos::cancel_handler))
        .route("/v1/jobs/{id}", get(jobs::get_handler).delete(jobs::delete_handler))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel_handler))
        .route("/v1/jobs/{id}/events", get(jobs::events_handler))
        .route("/v1/hooks/{backend}/{job}", post(hooks::hook_handler))
        .route("/v1/videos/{id}/events", get(jobs::events_handler))
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
        .route("/v1/admin/keys/{key}/limits", post(account::limits_handler))
        .route("/v1/admin/ledger/check", get(account::ledger_check_handler))
        .route("/v1/admin/reload", post(admin::reload_handler))
        .route("/v1/admin/processes", get(admin::processes_handler))
        .route("/v1/admin/hosts", get(sets::hosts_handler))
        .route("/v1/admin/working-sets/{name}/activate", post(sets::activate_handler))
        .route("/v1/admin/hosts/{host}/unload", post(sets::unload_handler))
        .route("/v1/admin/backends/{name}/restart", post(sets::restart_handler))
        .layer(DefaultBodyLimit::max(SMALL_BODY));
    let app = images
        .merge(text)
        .merge(rest)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside `observe`: authentication answers are measured and logged like any other.
        .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
        // The web page needs no key (its API calls carry one); added after `authenticate`, so outside it.
        .merge(if state.config.server.ui { ui::routes() } else { Router::new() })
        // Unread-body draining, observation and the drain gate, in one layer (see `front`).
        .layer(middleware::from_fn_with_state(state.clone(), front));
    // Preflights are answered before authentication (browsers send no key on them). Without `server.cors`, no
    // layer at all: even an identity layer costs each request a boxed clone and future.
    let app = match cors(&state) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.with_state(state)
}

/// The body limit of every route that is not an image or text route: keys, grants, webhooks (axum's default).
const SMALL_BODY: usize = 2 << 20;

/// CORS from `server.cors`; without it, no CORS headers at all.
fn cors(state: &AppState) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::Method;
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    let c = state.config.server.cors.as_ref()?;
    let origin = if c.origins.is_empty() { AllowOrigin::any() } else { AllowOrigin::list(c.origins.clone()) };
    let layer = CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            header::RETRY_AFTER,
            header::LOCATION,
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static("idempotent-replayed"),
            header::HeaderName::from_static("preference-applied"),
        ])
        .max_age(c.max_age);
    Some(layer)
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
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    if path.starts_with("/v1/") {
        return Error::UnsupportedEndpoint { method, path }.into();
    }
    Error::RouteNotFound { method, path }.into()
}

async fn method_not_allowed(req: Request) -> ApiError {
    Error::MethodNotAllowed { method: req.method().to_string(), path: req.uri().path().to_owned() }.into()
}

/// The request id header, read from clients, set on every response and sent to backends.
pub const REQUEST_ID: &str = "x-request-id";
/// W3C trace context, passed through to backends when valid.
pub const TRACEPARENT: &str = "traceparent";

/// The one middleware every route passes (one layer, not three: each `from_fn` layer boxes the inner service and
/// its future per request). Outside in: whatever answer is chosen, the client may finish sending its body before
/// it is read (`drain_unread`); every request and its final response, extractor rejections included, is observed
/// (`observe`); while draining (SIGTERM) new work is refused and what runs is counted until its body ends
/// (`drain::gate`).
async fn front(State(state): State<AppState>, req: Request, next: Next) -> Response {
    drain_unread(req, |req| observe(&state, req, |req| drain::gate(&state, req, next))).await
}

/// Gives the request its context (request id, trace context, a slot for what handles it) and log span; sets
/// `X-Request-Id` on the answer, whatever it is; records request metrics and the access-log line when the last
/// response byte has gone (or the client left); logs server-side failures once and keeps them in the ring of
/// recent errors.
async fn observe<F, Fut>(state: &AppState, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let route = static_route(req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()));
    let method = req.method().clone();
    let (ctx, bytes_in) = {
        let text = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let bytes_in: u64 = text(header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()).unwrap_or(0);
        (RequestContext::new(text(REQUEST_ID), text(TRACEPARENT)), bytes_in)
    };
    let span = tracing::info_span!("request", request_id = %ctx.id);
    let resp = ctx.clone().scope(next(req)).instrument(span.clone()).await;
    let status = resp.status();
    let mut resp = openai_shaped(resp, &ctx.id).await;
    if let Ok(v) = HeaderValue::from_str(&ctx.id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    if let Some(ServerFault(message)) = resp.extensions().get::<ServerFault>() {
        span.in_scope(|| {
            tracing::warn!(%method, route, status = status.as_u16(), error = %message, "Request failed.");
        });
        let h = ctx.handling();
        state.recent_errors.push(crate::telemetry::recent::RecentError {
            at_ms: 0,
            request_id: ctx.id.to_string(),
            method: method.to_string(),
            route: route.to_owned(),
            status: status.as_u16(),
            model: h.model,
            backend: h.backend,
            message: message.clone(),
        });
    }
    let finish =
        Finish { ctx, method: m::method_label(method.as_str()), route, status: status.as_u16(), started, bytes_in };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(Metered { inner: body, sent: 0, finish: Some(finish) }))
}

/// What the access log and request metrics need once the response body has ended.
struct Finish {
    ctx: RequestContext,
    method: &'static str,
    route: &'static str,
    status: u16,
    started: Instant,
    bytes_in: u64,
}

impl Finish {
    /// One access-log line (target `easel::access`) and the request metrics. Never a secret: the key's name only.
    fn done(self, sent: u64, complete: bool) {
        let took = self.started.elapsed();
        m::http_request(self.route, self.method, self.status, took, self.bytes_in, sent);
        let h = self.ctx.handling();
        tracing::info!(
            target: "easel::access",
            request_id = %self.ctx.id,
            method = self.method,
            route = self.route,
            status = self.status,
            bytes = sent,
            duration_ms = took.as_millis() as u64,
            model = h.model.as_deref().unwrap_or("-"),
            backend = h.backend.as_deref().unwrap_or("-"),
            key = h.key.as_deref().unwrap_or("-"),
            complete,
            "access"
        );
    }
}

/// A response body that counts the bytes it yields and finishes the request's record when it ends or is
/// dropped (a client that leaves mid-stream), so streamed answers are measured too.
struct Metered {
    inner: Body,
    sent: u64,
    finish: Option<Finish>,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Poll::Ready(None) => self.end(true),
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Metered {
    fn end(&mut self, complete: bool) {
        if let Some(f) = self.finish.take() {
            f.done(self.sent, complete);
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Ended without an error when everything was sent (or there was nothing to send).
        let complete = self.inner.is_end_stream();
        self.end(complete);
    }
}

/// Most of an unread request body easel reads and discards after answering early (413, 401, 404, ...), so a
/// client still uploading can finish and read the answer instead of seeing a broken pipe.
const DRAIN_BYTES: u64 = 256 << 20;
/// How long easel keeps reading such a body.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// A request body that, when dropped unfinished, hands what is left back to [`drain_unread`].
struct Returning {
    inner: Option<BodyDataStream>,
    back: Option<tokio::sync::oneshot::Sender<BodyDataStream>>,
    done: bool,
}

impl Stream for Returning {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let next = Pin::new(inner).poll_next(cx);
        if matches!(next, Poll::Ready(None)) {
            self.done = true;
        }
        next
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if !self.done
            && let (Some(rest), Some(back)) = (self.inner.take(), self.back.take())
        {
            let _ = back.send(rest);
        }
    }
}

/// Reads and discards (bounded in bytes and time) the part of the request body the handler left unread, then
/// answers. A body declared larger than the cap is not read: the answer says `Connection: close` instead.
async fn drain_unread<F, Fut>(req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let (back, mut rest) = tokio::sync::oneshot::channel();
    let body = Body::from_stream(Returning { inner: Some(body.into_data_stream()), back: Some(back), done: false });
    let mut resp = next(Request::from_parts(parts, body)).await;
    let Ok(mut rest) = rest.try_recv() else { return resp };
    if declared.is_some_and(|n| n > DRAIN_BYTES) {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let drained = tokio::time::timeout(DRAIN_TIME, async {
        let mut read = 0u64;
        while let Some(chunk) = rest.next().await {
            let Ok(chunk) = chunk else { return false };
            read += chunk.len() as u64;
            if read > DRAIN_BYTES {
                return false;
            }
        }
        true
    })
    .await;
    if !matches!(drained, Ok(true)) {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Gives an error answer that is not easel's own (a framework rejection: a path or query that does not parse,
/// a malformed header) OpenAI's error shape, keeping its status and text.
async fn openai_shaped(resp: Response, request_id: &str) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message =
        if text.is_empty() { status.canonical_reason().unwrap_or("request refused").to_owned() } else { text };
    let (kind, code) = match status {
        StatusCode::NOT_FOUND => ("invalid_request_error", "not_found"),
        StatusCode::METHOD_NOT_ALLOWED => ("invalid_request_error", "method_not_allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "request_too_large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("invalid_request_error", "unsupported_media_type"),
        s if s.is_server_error() => ("server_error", "internal_error"),
        _ => ("invalid_request_error", "invalid_request_error"),
    };
    let body = crate::api::error::ErrorBody {
        error: crate::api::error::ErrorObject {
            message: &message,
            kind,
            param: None,
            code: Some(code),
            request_id: Some(request_id),
        },
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::from_parts(parts, Body::from(json));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp
}

/// Route labels from a fixed set, so metrics never grow with client-chosen paths.
fn static_route(route: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{*id}",
        "/v1/files",
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
        "/v1/admin/keys/{key}/limits",
        "/v1/admin/ledger/check",
        "/v1/admin/reload",
        "/v1/admin/processes",
        "/v1/admin/hosts",
        "/v1/admin/working-sets/{name}/activate",
        "/v1/admin/hosts/{host}/unload",
        "/v1/admin/backends/{name}/restart",
        "/v1/videos",
        "/v1/videos/{id}",
        "/v1/videos/{id}/content",
        "/v1/videos/{id}/cancel",
        "/v1/jobs/{id}",
        "/v1/hooks/{backend}/{job}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/events",
        "/v1/videos/{id}/events",
    ];
    ROUTES.iter().find(|r| **r == route).copied().unwrap_or("unmatched")
}

/// A response body that keeps `G` (a key's parallel slot, the drain's in-flight count) until the body ends or is
/// dropped, with the inner body's size passed on (a known length stays a `Content-Length`).
pub(crate) struct Holding<G> {
    body: Body,
    _held: G,
}

impl<G> Holding<G> {
    pub(crate) fn new(body: Body, held: G) -> Self {
        Self { body, _held: held }
    }
}

impl<G: Unpin> http_body::Body for Holding<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
