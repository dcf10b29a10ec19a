//! `GET /v1/files/{id}`: stored outputs, by the ids easel issued and nothing else. A signed URL
//! (`?exp=…&sig=…`, as easel hands them out) works without a key until it expires; without a signature, keys mode
//! serves an output only to the key that made it (another key gets the same 404 as a missing file).

use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::config::AuthMode;
use crate::error::Error;
use crate::ledger::{Principal, Store};
use crate::request::RequestError;
use crate::state::AppState;
use crate::storage::signing::SignatureProblem;

pub async fn get_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
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
    let Some((bytes, format)) = state.files.get(&id).await? else {
        return Err(Error::FileNotFound(id).into());
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(format.mime())),
            // Ids are never reused, so the content never changes.
            (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        bytes,
    )
        .into_response())
}
