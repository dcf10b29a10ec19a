//! Working-set admin routes: `GET /v1/admin/hosts`, `POST /v1/admin/working-sets/{name}/activate`,
//! `POST /v1/admin/hosts/{host}/unload` and `POST /v1/admin/backends/{name}/restart`.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
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
/// the host switches to another set. `force` (`?force=true` or a JSON body `{"force": true}`) interrupts the
/// leaving members' work instead of draining it, and aborts a drain toward another set.
pub async fn activate_handler(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(unknown) = query.keys().find(|k| !matches!(k.as_str(), "wait" | "force")) {
        return Err(RequestError::param(
            unknown,
            format!("unknown query parameter `{unknown}`; only `wait` and `force` are accepted"),
        )
        .into());
    }
    let wait = flag(&query, "wait")?;
    let force = flag(&query, "force")? || body_force(&body)?;
    let active = state.sets.activate(&name, wait, force).await?;
    let status = if active { StatusCode::OK } else { StatusCode::ACCEPTED };
    let body = json!({"working_set": name, "active": active, "force": force, "status_url": "/v1/admin/hosts"});
    Ok((status, Json(body)).into_response())
}

fn flag(query: &HashMap<String, String>, key: &str) -> Result<bool, RequestError> {
    match query.get(key).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(RequestError::param(key, format!("`{key}` must be true or false, not `{v}`"))),
    }
}

/// An empty body, or `{"force": bool}`.
fn body_force(body: &[u8]) -> Result<bool, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Activate {
        #[serde(default)]
        force: bool,
    }
    serde_json::from_slice::<Activate>(body)
        .map(|a| a.force)
        .map_err(|e| RequestError::new(format!("the body must be empty or `{{\"force\": true|false}}`: {e}")))
}

/// Drains the host's active set, stops it and leaves the host idle: 202 with the status URL. Running work
/// finishes first; nothing is killed.
pub async fn unload_handler(State(state): State<AppState>, Path(host): Path<String>) -> Result<Response, ApiError> {
    state.sets.unload(&host)?;
    let body = json!({"host": host, "unloading": true, "status_url": "/v1/admin/hosts"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Restarts one managed backend (stop with grace, start, readiness probe) and answers 200 once it is ready. 409
/// while it has requests in flight unless `force` (`?force=true` or `{"force": true}`), or while its host does not
/// run it; 404 for a backend easel does not manage.
pub async fn restart_handler(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(unknown) = query.keys().find(|k| k.as_str() != "force") {
        return Err(RequestError::param(
            unknown,
            format!("unknown query parameter `{unknown}`; only `force` is accepted"),
        )
        .into());
    }
    let force = flag(&query, "force")? || body_force(&body)?;
    let ready = state.sets.restart(&state.processes, &state.backends, &name, force).await?;
    let body = json!({"backend": name, "state": ready.as_str(), "status_url": "/v1/admin/processes"});
    Ok((StatusCode::OK, Json(body)).into_response())
}
