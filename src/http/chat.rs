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
use crate::pipeline::text::{TextOut, TextRoute, Waiting};
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
    // The client is gone when this handler ends early, or, for an answer still on its way, when its body is dropped.
    let mut gone_on_drop = Some(caller.gone.clone().drop_guard());
    let task = tokio::spawn(crate::telemetry::context::propagate(async move {
        crate::pipeline::text::text(&state, &caller, route, &body).await
    }));
    let answer = task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let streaming = matches!(answer.body, TextOut::Stream(_) | TextOut::Waiting(_));
    let default_type = if streaming { "text/event-stream" } else { "application/json" };
    let content_type = answer
        .content_type
        .and_then(|v| HeaderValue::from_str(&v).ok())
        .unwrap_or(HeaderValue::from_static(default_type));
    let mut resp = match answer.body {
        TextOut::Whole(bytes) => Response::new(Body::from(bytes)),
        TextOut::Stream(relay) => Response::new(Body::from_stream(relay)),
        TextOut::Waiting(w) => Response::new(Body::from_stream(waiting(w, gone_on_drop.take()))),
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

/// The body of a stream answered before its working set was ready: `: keepalive` comments every `every` until the
/// dispatch answers, then the upstream's stream as it arrives, or an `error` event when it failed (a status can no
/// longer say so). Dropping the body (the client left) fires `gone`, which abandons the wait.
fn waiting(
    w: Waiting,
    gone: Option<tokio_util::sync::DropGuard>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    enum Step {
        Wait(Waiting, tokio::time::Interval),
        Relay(crate::pipeline::text::Relay),
        Done,
    }
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + w.every, w.every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = (Step::Wait(w, every), gone);
    futures_util::stream::unfold(start, |(step, gone)| async move {
        match step {
            Step::Wait(mut w, mut every) => tokio::select! {
                _ = every.tick() => Some((Ok(Bytes::from_static(b": keepalive\n\n")), (Step::Wait(w, every), gone))),
                answer = &mut w.answer => match answer {
                    Ok(Ok((status, _, _, TextOut::Stream(relay)))) if (200..300).contains(&status) => {
                        Some((Ok(Bytes::new()), (Step::Relay(relay), gone)))
                    }
                    Ok(Ok((status, _, _, body))) => {
                        Some((Ok(error_event(upstream_error(status, body))), (Step::Done, gone)))
                    }
                    Ok(Err(e)) => Some((Ok(error_event(ApiError::from(e).body())), (Step::Done, gone))),
                    Err(_) => {
                        let e = ApiError::from(Error::Internal("the request task ended without an answer".into()));
                        Some((Ok(error_event(e.body())), (Step::Done, gone)))
                    }
                },
            },
            Step::Relay(mut relay) => {
                let item = futures_util::StreamExt::next(&mut relay).await?;
                Some((item, (Step::Relay(relay), gone)))
            }
            Step::Done => None,
        }
    })
}

/// An upstream answer that was not a stream: its own error body when it has one, else a generic one.
fn upstream_error(status: u16, body: TextOut) -> Vec<u8> {
    if let TextOut::Whole(bytes) = &body
        && serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v.get("error").is_some())
    {
        return bytes.to_vec();
    }
    let message = format!("the backend answered {status} instead of a stream");
    serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": "backend_error"}})
        .to_string()
        .into_bytes()
}

fn error_event(json: Vec<u8>) -> Bytes {
    let mut out = b"event: error\ndata: ".to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
