//! `GET /v1/files/{id}`: stored outputs, by the ids easel issued and nothing else.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::error::Error;
use crate::state::AppState;

pub async fn get_handler(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
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
