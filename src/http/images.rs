//! `/v1/images/*` handlers: extract, call the pipeline, write the body. The pipeline runs in its own task so a
//! client that disconnects cannot interrupt settlement: the hold is always captured or released.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::extract::{EditBody, ImageBody};
use crate::api::images::ImagesRequest;
use crate::error::Error;
use crate::ledger::{Principal, valid_idempotency_key};
use crate::pipeline::images::{Caller, Delivered, Settlement};
use crate::request::RequestError;
use crate::state::AppState;

/// `POST /v1/images/generations`.
pub async fn generations_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    ImageBody(body): ImageBody<ImagesRequest>,
) -> Result<Response, ApiError> {
    let base = super::base_url(&state, &headers);
    let caller = caller(&headers, principal, "/v1/images/generations")?;
    let _gone_on_drop = caller.gone.clone().drop_guard();
    let task =
        tokio::spawn(async move { crate::pipeline::images::generate_images(&state, &caller, body, &base).await });
    respond(task.await)
}

/// `POST /v1/images/edits`.
pub async fn edits_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: EditBody,
) -> Result<Response, ApiError> {
    let base = super::base_url(&state, &headers);
    let caller = caller(&headers, principal, "/v1/images/edits")?;
    let _gone_on_drop = caller.gone.clone().drop_guard();
    let task = tokio::spawn(async move {
        crate::pipeline::images::edit_images(&state, &caller, body.fields, body.images, body.mask, &base).await
    });
    respond(task.await)
}

pub(super) fn caller(
    headers: &HeaderMap,
    principal: Option<Extension<Principal>>,
    path: &'static str,
) -> Result<Caller, ApiError> {
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
    Ok(Caller { principal: principal.map(|Extension(p)| p), idempotency_key, path, gone: CancellationToken::new() })
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

/// A whole response body that settles its hold: captured when hyper takes the body to write it to the client's
/// connection, released (by the settlement's drop) when the response is dropped before that.
struct SettledBody {
    data: Option<Bytes>,
    settlement: Option<Settlement>,
}

impl SettledBody {
    fn new(data: Bytes, settlement: Option<Settlement>) -> Self {
        Self { data: Some(data), settlement }
    }
}

impl HttpBody for SettledBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let data = self.data.take();
        if data.is_some()
            && let Some(s) = self.settlement.take()
        {
            s.delivered();
        }
        Poll::Ready(data.map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
