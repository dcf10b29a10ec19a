//! `/v1/images/*` handlers: extract, call the pipeline, write the body. The pipeline runs in its own task so a
//! client that disconnects cannot interrupt settlement: the hold is always captured or released.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::error::ApiError;
use super::extract::{EditBody, ImageBody};
use crate::api::images::{ImagesRequest, StreamMeta, sse_event};
use crate::backends::progress::{Preview, Progress};
use crate::error::Error;
use crate::ledger::{Principal, valid_idempotency_key};
use crate::pipeline::images::{Answer, Caller, Delivered, Settlement};
use crate::request::RequestError;
use crate::state::AppState;

/// `POST /v1/images/generations`.
pub async fn generations_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    ImageBody(body): ImageBody<ImagesRequest>,
) -> Result<Response, ApiError> {
    let (listen, meta) = streaming(&body, false);
    let Asked { base, job, caller, previews } = asked(&state, headers, principal, "/v1/images/generations", listen)?;
    if job {
        let task = tokio::spawn(crate::telemetry::context::propagate(async move {
            let job = crate::pipeline::image_jobs::submit(&state, &caller, body, Vec::new(), None, false).await?;
            Ok::<_, Error>(accepted(&state, &job, &base).await)
        }));
        return Ok(task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??);
    }
    let gone_on_drop = caller.gone.clone().drop_guard();
    let task = tokio::spawn(crate::telemetry::context::propagate(async move {
        crate::pipeline::images::generate_images(&state, &caller, body, &base).await
    }));
    match previews {
        Some(rx) => Box::pin(stream(task, rx, meta, gone_on_drop)).await,
        None => respond(task.await),
    }
}

/// `POST /v1/images/edits`.
pub async fn edits_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: EditBody,
) -> Result<Response, ApiError> {
    edit(state, principal, headers, body, "/v1/images/edits").await
}

/// `POST /v1/images/variations`: an edit of the one `image` without a mask, prompted by the model's
/// `variation_prompt` (see `pipeline::images::prepare_variation`).
pub async fn variations_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    mut body: EditBody,
) -> Result<Response, ApiError> {
    crate::pipeline::images::prepare_variation(&state, &mut body.fields, &body.images, body.mask.is_some())?;
    edit(state, principal, headers, body, "/v1/images/variations").await
}

/// The edit story behind both routes: a job with `Prefer: respond-async`, a stream, or a whole answer.
async fn edit(
    state: AppState,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: EditBody,
    path: &'static str,
) -> Result<Response, ApiError> {
    let (listen, meta) = streaming(&body.fields, true);
    let Asked { base, job, caller, previews } = asked(&state, headers, principal, path, listen)?;
    if job {
        let task = tokio::spawn(crate::telemetry::context::propagate(async move {
            let job =
                crate::pipeline::image_jobs::submit(&state, &caller, body.fields, body.images, body.mask, true).await?;
            Ok::<_, Error>(accepted(&state, &job, &base).await)
        }));
        return Ok(task.await.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??);
    }
    let gone_on_drop = caller.gone.clone().drop_guard();
    let task = tokio::spawn(crate::telemetry::context::propagate(async move {
        crate::pipeline::images::edit_images(&state, &caller, body.fields, body.images, body.mask, &base).await
    }));
    match previews {
        Some(rx) => Box::pin(stream(task, rx, meta, gone_on_drop)).await,
        None => respond(task.await),
    }
}

/// What an image request asks in its headers, read before it waits. The `HeaderMap` is dropped here: its values
/// share hyper's read buffer for the connection, which a request queued for a busy backend would otherwise keep
/// alive (8 KB per waiter) next to the buffer hyper reads the connection into while it waits.
struct Asked {
    /// Where stored outputs are linked from.
    base: String,
    /// `Prefer: respond-async`: a job, not an answer.
    job: bool,
    caller: Caller,
    /// Previews for a streamed answer (never for a job).
    previews: Option<mpsc::UnboundedReceiver<Preview>>,
}

fn asked(
    state: &AppState,
    headers: HeaderMap,
    principal: Option<Extension<Principal>>,
    path: &'static str,
    listen: Option<u32>,
) -> Result<Asked, ApiError> {
    let job = respond_async(&headers);
    let (caller, previews) = caller(&headers, principal, path, listen.filter(|_| !job))?;
    Ok(Asked { base: super::base_url(state, &headers), job, caller, previews })
}

/// Whether the client asked for a job instead of waiting (`Prefer: respond-async`, RFC 7240).
fn respond_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|p| p.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async")))
    })
}

/// `202 Accepted` for a job: `Location` names it, `Preference-Applied` says the preference was honoured.
async fn accepted(state: &AppState, job: &crate::ledger::JobRecord, base: &str) -> Response {
    let body = super::jobs::public(state, job, base).await;
    let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        headers.insert(header::LOCATION, v);
    }
    headers.insert("preference-applied", HeaderValue::from_static("respond-async"));
    resp
}

/// For `stream: true`: how many previews to listen for (the pipeline validates `partial_images`; an out-of-range
/// value never gets that far) and the fields every event repeats.
fn streaming(body: &ImagesRequest, edit: bool) -> (Option<u32>, StreamMeta) {
    let listen = (body.stream == Some(true)).then(|| body.partial_images.unwrap_or(0).min(3));
    let size = body.size.clone().unwrap_or_else(|| "auto".into());
    let meta = StreamMeta {
        prefix: StreamMeta::prefix(edit),
        size,
        quality: StreamMeta::quality(body.quality.as_deref()),
        background: StreamMeta::background(body.background.as_deref()),
    };
    (listen, meta)
}

type Task = tokio::task::JoinHandle<Result<Delivered, Error>>;

/// A streamed answer. Until the first preview or the end, nothing is sent, so a request the pipeline refuses gets
/// an ordinary JSON error. Then `…partial_image` events go out as previews arrive, and the `completed` event last:
/// the hold is captured only when that event is handed to the connection. A client that leaves before drops the
/// body, which cancels the work (`gone`) and releases the hold.
async fn stream(
    mut task: Task,
    mut previews: mpsc::UnboundedReceiver<Preview>,
    meta: StreamMeta,
    gone_on_drop: DropGuard,
) -> Result<Response, ApiError> {
    let first = tokio::select! {
        biased;
        p = previews.recv() => p,
        joined = &mut task => {
            let fresh = match joined {
                Ok(Ok(Delivered::Fresh(answer))) => answer,
                other => return respond(other),
            };
            let state = Streamed { task: None, previews, meta, index: 0, answer: Some(fresh), _gone: gone_on_drop };
            return Ok(sse(state));
        }
    };
    let mut state = Streamed { task: Some(task), previews, meta, index: 0, answer: None, _gone: gone_on_drop };
    let Some(first) = first else {
        // Every sender is gone: the pipeline has finished.
        return match state.task.take() {
            Some(t) => match t.await {
                Ok(Ok(Delivered::Fresh(answer))) => {
                    state.answer = Some(answer);
                    Ok(sse(state))
                }
                other => respond(other),
            },
            None => Err(Error::Internal("the streamed request lost its task".into()).into()),
        };
    };
    let head = state.partial(&first);
    let rest = futures_util::stream::unfold(state, next_event);
    let body = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(head) }).chain(rest);
    Ok(event_stream(Body::from_stream(body)))
}

/// What a streamed body still has to send.
struct Streamed {
    task: Option<Task>,
    previews: mpsc::UnboundedReceiver<Preview>,
    meta: StreamMeta,
    index: u32,
    answer: Option<Box<Answer>>,
    /// Dropped with the body: the client is gone.
    _gone: DropGuard,
}

impl Streamed {
    fn partial(&mut self, p: &Preview) -> Bytes {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let event = self.meta.partial(&p.bytes, p.format.as_str(), self.index, created);
        self.index += 1;
        event
    }
}

fn sse(state: Streamed) -> Response {
    event_stream(Body::from_stream(futures_util::stream::unfold(state, next_event)))
}

fn event_stream(body: Body) -> Response {
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The next event: a preview while the pipeline runs, then its answer (capturing the hold as it is handed over)
/// or an `error` event.
async fn next_event(mut s: Streamed) -> Option<(Result<Bytes, std::convert::Infallible>, Streamed)> {
    if let Some(task) = s.task.as_mut() {
        let joined = tokio::select! {
            biased;
            Some(p) = s.previews.recv() => {
                let event = s.partial(&p);
                return Some((Ok(event), s));
            }
            joined = task => joined,
        };
        s.task = None;
        // Previews sent before the end still go out first.
        if let Ok(p) = s.previews.try_recv() {
            let event = s.partial(&p);
            s.answer = match joined {
                Ok(Ok(Delivered::Fresh(a))) => Some(a),
                other => {
                    let bytes = error_event(other).await;
                    return Some((Ok(bytes), Streamed { task: None, ..s }));
                }
            };
            return Some((Ok(event), s));
        }
        match joined {
            Ok(Ok(Delivered::Fresh(a))) => s.answer = Some(a),
            other => {
                let bytes = error_event(other).await;
                return Some((Ok(bytes), s));
            }
        }
    }
    if let Ok(p) = s.previews.try_recv() {
        let event = s.partial(&p);
        return Some((Ok(event), s));
    }
    let mut answer = s.answer.take()?;
    if let Some(settlement) = answer.settlement.take() {
        settlement.delivered();
    }
    Some((Ok(answer.body.into_bytes()), s))
}

/// A failure after the stream began: an `error` event with OpenAI's error object (the SDK raises on it).
async fn error_event(joined: Result<Result<Delivered, Error>, tokio::task::JoinError>) -> Bytes {
    let err = match joined {
        Ok(Err(e)) => ApiError::from(e),
        Ok(Ok(Delivered::Replayed(_) | Delivered::Fresh(_))) => {
            ApiError::from(Error::Internal("a streamed request was answered without a stream".into()))
        }
        Err(e) => ApiError::from(Error::Internal(format!("the request task failed: {e}"))),
    };
    let body = axum::body::to_bytes(err.into_response().into_body(), usize::MAX).await.unwrap_or_default();
    let data: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    sse_event("error", &data)
}

pub(super) fn caller(
    headers: &HeaderMap,
    principal: Option<Extension<Principal>>,
    path: &'static str,
    listen: Option<u32>,
) -> Result<(Caller, Option<mpsc::UnboundedReceiver<Preview>>), ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if valid_idempotency_key(k) => Some(k.to_owned()),
            _ => {
                return Err(RequestError::new(
                    "the Idempotency-Key header must be 1 to 255 printable ASCII characters",
                )
                .with_code("invalid_idempotency_key")
                .into());
            }
        },
    };
    let (progress, previews) = match listen {
        Some(wanted) => {
            let (p, rx) = Progress::listening(wanted);
            (p, Some(rx))
        }
        None => (Progress::silent(), None),
    };
    let caller = Caller {
        principal: principal.map(|Extension(p)| p),
        idempotency_key,
        path,
        gone: CancellationToken::new(),
        progress: Arc::new(progress),
    };
    Ok((caller, previews))
}

fn respond(joined: Result<Result<Delivered, Error>, tokio::task::JoinError>) -> Result<Response, ApiError> {
    let delivered = joined.map_err(|e| Error::Internal(format!("the request task failed: {e}")))??;
    let json = HeaderValue::from_static("application/json");
    Ok(match delivered {
        Delivered::Fresh(answer) => {
            let mut resp = Response::new(Body::new(SettledBody::new(answer.body, answer.settlement)));
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, json);
            if let Some(p) = &answer.partial
                && let Ok(v) = HeaderValue::from_str(&format!("produced={}, requested={}", p.produced, p.requested))
            {
                headers.insert(PARTIAL_HEADER, v);
            }
            resp
        }
        Delivered::Replayed(stored) => {
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let ct = HeaderValue::from_str(&stored.content_type).unwrap_or(json);
            (
                status,
                [
                    (header::CONTENT_TYPE, ct),
                    (header::HeaderName::from_static("idempotent-replayed"), HeaderValue::from_static("true")),
                ],
                stored.body,
            )
                .into_response()
        }
    })
}

/// Set on an answer with fewer images than asked for: `produced=2, requested=4` (the body's `partial` says why).
pub const PARTIAL_HEADER: header::HeaderName = header::HeaderName::from_static("easel-partial-result");

/// A whole response body that settles its hold: captured when hyper takes the body's last chunk to write it to
/// the client's connection, released (by the settlement's drop) when the response is dropped before that.
pub(super) struct SettledBody {
    /// The chunks still to send, in reverse (the next one last).
    data: Vec<Bytes>,
    settlement: Option<Settlement>,
}

impl SettledBody {
    pub(super) fn new(data: crate::api::images::BodyChunks, settlement: Option<Settlement>) -> Self {
        let mut data = data.into_chunks();
        data.retain(|c| !c.is_empty());
        data.reverse();
        Self { data, settlement }
    }
}

impl HttpBody for SettledBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let data = self.data.pop();
        if self.data.is_empty()
            && let Some(s) = self.settlement.take()
        {
            s.delivered();
        }
        Poll::Ready(data.map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.iter().map(|d| d.len() as u64).sum())
    }
}
