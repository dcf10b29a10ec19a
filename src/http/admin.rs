//! `GET /v1/admin/processes` (the managed backend processes, their state and last output lines) and
//! `POST /v1/admin/reload` (read the configuration again; see [`crate::reload`]).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde_json::json;

use super::error::ApiError;
use crate::process::ring::MAX_LINES;
use crate::request::RequestError;
use crate::state::AppState;

/// Output lines shown per backend when `?lines` is not given.
const DEFAULT_LINES: usize = 20;

/// Lists every backend with a `process:` block; `?lines=N` (0 to 500) sets how many output lines each shows.
pub async fn processes_handler(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(unknown) = query.keys().find(|k| k.as_str() != "lines") {
        return Err(RequestError::param(
            unknown,
            format!("unknown query parameter `{unknown}`; only `lines` is accepted"),
        )
        .into());
    }
    let lines = match query.get("lines") {
        None => DEFAULT_LINES,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n <= MAX_LINES => n,
            _ => {
                return Err(RequestError::param(
                    "lines",
                    format!("`lines` must be a whole number from 0 to {MAX_LINES}, not `{v}`"),
                )
                .into());
            }
        },
    };
    Ok(Json(json!({"object": "list", "data": state.processes.snapshots(lines)})))
}

/// Reloads the configuration: 200 with what changed, or 400 `config_rejected` saying why nothing changed.
pub async fn reload_handler(live: Option<Extension<crate::reload::Live>>) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(Extension(live)) = live else {
        return Err(crate::error::Error::Internal("this router was built without a reloadable runtime".into()).into());
    };
    match live.reload().await {
        Ok(report) => Ok(Json(json!({"reloaded": true, "report": report}))),
        Err(why) => {
            tracing::warn!(reason = %why, "Reload refused; still serving the previous configuration.");
            Err(crate::error::Error::ReloadRefused(why).into())
        }
    }
}
