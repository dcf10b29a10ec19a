//! Working-set admin routes: `GET /v1/admin/hosts`, `POST /v1/admin/working-sets/{name}/activate` and
//! `POST /v1/admin/hosts/{host}/unload`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use crate::request::RequestError;
use crate::state::AppState;

/// Every host: state, active and target set, phase, elapsed time, demand and members.
pub async fn hosts_handler(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": state.sets.views()}))
}

/// Makes a working set active: 202 at once, or with `?wait=true` 200 once it is active. Idempotent; 409 while
/// the host switches to another set.
pub async fn activate_handler(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if let Some(unknown) = query.keys().find(|k| k.as_str() != "wait") {
        return Err(RequestError::param(
            unknown,
            format!("unknown query parameter `{unknown}`; only `wait` is accepted"),
        )
        .into());
    }
    let wait = match query.get("wait").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(RequestError::param("wait", format!("`wait` must be true or false, not `{v}`")).into()),
    };
    let active = state.sets.activate(&name, wait).await?;
    let status = if active { StatusCode::OK } else { StatusCode::ACCEPTED };
    let body = json!({"working_set": name, "active": active, "status_url": "/v1/admin/hosts"});
    Ok((status, Json(body)).into_response())
}

/// Drains the host's active set, stops it and leaves the host idle: 202 with the status URL. Running work
/// finishes first; nothing is killed.
pub async fn unload_handler(State(state): State<AppState>, Path(host): Path<String>) -> Result<Response, ApiError> {
    state.sets.unload(&host)?;
    let body = json!({"host": host, "unloading": true, "status_url": "/v1/admin/hosts"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
