//! Text route handlers (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`): take the body as bytes,
//! run the text pipeline in its own task (so a disconnect cannot interrupt settlement), and write the upstream's
//! answer: a whole body with its status, or its event stream relayed as it arrives. An `Idempotency-Key` header is
//! checked here as on the image routes; a replayed answer says so with `Idempotent-Replayed: true`.

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::error::ApiError;
use crate::error::Error;
use crate::ledger::Principal;
use crate::pipeline::text::{TextOut, TextRoute};
use crate::state::AppState;

/// `POST /v1/chat/completions`.
pub async fn chat_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    handle(state, principal, &headers, body, TextRoute::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    handle(state, principal, &headers, body, TextRoute::Completions).await
}

/// `POST /v1/embeddings`.
pub async fn embeddings_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    handle(state, principal, &headers, body, TextRoute::Embeddings).await
}

async fn handle(
    state: AppState,
    principal: Option<Extension<Principal>>,
    headers: &HeaderMap,
    body: Bytes,
    route: TextRoute,
) -> Result<Response, ApiError> {
    let (caller, _) = super::images::caller(headers, principal, route.path(), None)?;
    let _gone_on_drop = caller.gone.clone().drop_guard();
    let task = tokio::spawn(crate::telemetry::context::propagate(async move {
        crate::pipeline::text::text(&state, &caller, route, &body).await
    }));
    let answer = task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let streaming = matches!(answer.body, TextOut::Stream(_));
    let default_type = if streaming { "text/event-stream" } else { "application/json" };
    let content_type = answer
        .content_type
        .and_then(|v| HeaderValue::from_str(&v).ok())
        .unwrap_or(HeaderValue::from_static(default_type));
    let mut resp = match answer.body {
        TextOut::Whole(bytes) => Response::new(Body::from(bytes)),
        TextOut::Stream(relay) => Response::new(Body::from_stream(relay)),
    };
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    for (k, v) in &answer.headers {
        if let (Ok(k), Ok(v)) = (header::HeaderName::try_from(k.as_str()), HeaderValue::from_bytes(v)) {
            headers.append(k, v);
        }
    }
    headers.insert(header::CONTENT_TYPE, content_type);
    if answer.replayed {
        headers.insert(header::HeaderName::from_static("idempotent-replayed"), HeaderValue::from_static("true"));
    }
    if streaming {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(header::HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    }
    Ok(resp)
}
