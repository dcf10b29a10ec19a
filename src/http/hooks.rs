//! `POST /v1/hooks/{backend}/{job}?sig=…`: where fal and Replicate report a job's end. Needs no API key (the
//! signature in the URL easel gave the backend is the authorization); the work is in [`crate::jobs::hooks`].

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use serde_json::{Value, json};

use super::error::ApiError;
use crate::state::AppState;

pub async fn hook_handler(
    State(state): State<AppState>,
    Path((backend, job)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let sig = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "sig")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let outcome = crate::jobs::hooks::receive(&state, &backend, &job, &sig, &body).await?;
    Ok(Json(json!({"received": true, "job": job, "outcome": outcome.as_str()})))
}
