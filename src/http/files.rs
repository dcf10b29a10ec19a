//! `GET /v1/files`: the stored outputs newest first (the caller's own with keys on), for the gallery.
//! `GET /v1/files/{id}`: stored outputs, by the ids easel issued and nothing else. A signed URL
//! (`?exp=…&sig=…`, as easel hands them out) works without a key until it expires; without a signature, keys mode
//! serves an output only to the key that made it (another key gets the same 404 as a missing file). [`send`] is
//! the one way outputs leave storage (here and for video content): streamed, with single-range `Range` support,
//! from the local folder or S3 alike, or as a redirect to a presigned S3 URL.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::ApiError;
use crate::api::files::FileList;
use crate::config::AuthMode;
use crate::error::Error;
use crate::ledger::{Principal, Store};
use crate::request::RequestError;
use crate::state::AppState;
use crate::storage::Opened;
use crate::storage::signing::SignatureProblem;

/// `GET /v1/files?limit=&after=&purpose=output&order=desc`.
pub async fn list_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<FileList>, ApiError> {
    let (mut limit, mut after) = (20u32, None);
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => limit = super::extract::list_limit(&v)?,
            "after" if !v.is_empty() => after = Some(v.into_owned()),
            "purpose" if v == "output" => {}
            "purpose" => {
                return Err(RequestError::param(
                    "purpose",
                    format!("this gateway stores only generated outputs (`purpose=output`), not `{v}`"),
                )
                .into());
            }
            "order" if v == "desc" => {}
            "order" => {
                return Err(RequestError::param(
                    "order",
                    format!("outputs are listed newest first (`order=desc`), not `{v}`"),
                )
                .into());
            }
            other => return Err(RequestError::param(other, format!("unknown query parameter `{other}`")).into()),
        }
    }
    let who = principal.as_ref().map(|Extension(p)| p);
    let base = super::base_url(&state, &headers);
    Ok(Json(crate::pipeline::outputs::list(&state, who, after.as_deref(), limit, &base).await?))
}

pub async fn get_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (mut exp, mut sig) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "exp" => exp = Some(v.into_owned()),
            "sig" => sig = Some(v.into_owned()),
            _ => {}
        }
    }
    match (exp, sig) {
        (Some(exp), Some(sig)) => state.signer.verify(&id, &exp, &sig).map_err(|p| match p {
            SignatureProblem::Invalid => Error::LinkRefused {
                message: format!(
                    "the signature of this link to `{id}` is not valid (altered, or from another gateway)"
                ),
                code: "invalid_signature",
            },
            SignatureProblem::Expired { at } => Error::LinkRefused {
                message: format!(
                    "this link to `{id}` expired at {at} (Unix time); fetch the file with the API key that made it, \
                     or generate again for a new link"
                ),
                code: "link_expired",
            },
        })?,
        (None, None) if state.config.auth.mode == AuthMode::Keys => {
            // The auth layer let this through only with a valid key.
            let Some(Extension(who)) = principal else {
                return Err(
                    Error::Unauthorized("an unsigned file URL needs the API key that made the file".into()).into()
                );
            };
            state.settling.wait(Some(who.account_id), crate::ledger::SETTLE_WAIT).await;
            if state.ledger.output_owner(&id).await? != Some(who.key_id) {
                return Err(Error::FileNotFound(id).into());
            }
        }
        (None, None) => {}
        _ => {
            return Err(RequestError::new(
                "a signed file URL needs both `exp` and `sig`; use the URL as easel gave it",
            )
            .with_code("invalid_signature")
            .into());
        }
    }
    if crate::storage::mime_of(&id).is_none() {
        return Err(Error::FileNotFound(id).into());
    }
    // Ids are never reused, so the content never changes.
    send(&state, &id, &headers, "private, max-age=31536000, immutable").await
}

/// Sends a stored output: streamed whole (200) or the one range a `Range` header asks for (206, or 416 when it
/// lies outside the object), or a redirect to a presigned S3 URL when `storage.s3.presign` is on.
pub async fn send(state: &AppState, id: &str, headers: &HeaderMap, cache: &'static str) -> Result<Response, ApiError> {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let Some(opened) = state.files.open_media(id, range).await? else {
        return Err(Error::FileNotFound(id.to_owned()).into());
    };
    let nosniff = (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    let bytes_unit = (header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    Ok(match opened {
        Opened::Redirect(url) => match HeaderValue::from_str(url.as_str()) {
            Ok(location) => (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location), (header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            )
                .into_response(),
            Err(_) => return Err(Error::Internal(format!("the presigned URL for `{id}` is not a header value")).into()),
        },
        Opened::Unsatisfiable { size } => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, header_value(format!("bytes */{size}"))), bytes_unit],
        )
            .into_response(),
        Opened::Body { stream, mime, range, size, partial } => {
            let length = (header::CONTENT_LENGTH, header_value((range.end - range.start).to_string()));
            let common = [
                (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
                (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
                nosniff,
                bytes_unit,
                length,
            ];
            let body = Body::from_stream(stream);
            if partial {
                let content_range =
                    header_value(format!("bytes {}-{}/{size}", range.start, range.end.saturating_sub(1)));
                (StatusCode::PARTIAL_CONTENT, common, [(header::CONTENT_RANGE, content_range)], body).into_response()
            } else {
                (common, body).into_response()
            }
        }
    })
}

/// A header value from text easel formatted itself (digits, spaces, `-`, `*`, `/`).
fn header_value(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""))
}
