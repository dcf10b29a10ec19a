//! `GET /v1/admin/processes`: the managed backend processes, their state and last output lines.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
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
