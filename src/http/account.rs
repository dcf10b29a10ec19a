//! The caller's account (`/v1/me`, `/v1/usage`) and the admin API for keys, their credits and their own limits
//! (`/v1/admin/*`).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::parse_json;
use crate::error::Error;
use crate::ledger::{KeyInfo, KeyLimitsChange, KeyOverrides, Limit, Principal, Store, fmt_credits, to_mc};
use crate::state::AppState;

fn no_key() -> ApiError {
    Error::Unauthorized("this route describes an API key: run easel with `auth.mode: keys` and send one".into()).into()
}

/// `GET /v1/me`: the calling key, its balance and the models it may use (with their prices).
pub async fn me_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(Extension(p)) = principal else { return Err(no_key()) };
    state.settling.wait(Some(p.account_id), crate::ledger::SETTLE_WAIT).await;
    let b = state.ledger.balance(p.account_id).await?;
    let models: Vec<serde_json::Value> = state
        .registry
        .all()
        .iter()
        .filter(|m| p.may_use(&m.id))
        .map(|m| json!({"id": m.id, "credits_per_image": fmt_credits(state.prices.get(&m.id).map_or(0, |x| x.1))}))
        .collect();
    Ok(Json(json!({
        "object": "api_key",
        "name": p.name,
        "credits": {"available": fmt_credits(b.available_mc), "held": fmt_credits(b.held_mc), "available_mc": b.available_mc, "held_mc": b.held_mc},
        "allowed_models": p.allowed_models,
        "models": models,
    })))
}

/// `GET /v1/usage`: the calling key's requests, images and credits by model and day.
pub async fn usage_handler(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(Extension(p)) = principal else { return Err(no_key()) };
    state.settling.wait(Some(p.account_id), crate::ledger::SETTLE_WAIT).await;
    let rows = state.ledger.usage(p.key_id).await?;
    Ok(Json(json!({"object": "list", "key": p.name, "data": rows})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    credits: f64,
    models: Option<Vec<String>>,
    #[serde(default)]
    requests_per_minute: serde_json::Value,
    #[serde(default)]
    max_parallel: serde_json::Value,
}

/// Limit fields of the admin API.
const LIMIT_FIELDS: [&str; 2] = ["requests_per_minute", "max_parallel"];

/// One limit in JSON: `null` (the configured default), `"unlimited"`, or a whole number of at least 1.
fn limit_from_json(field: &str, v: &serde_json::Value) -> Result<Limit, ApiError> {
    match v {
        serde_json::Value::Null => Ok(Limit::Default),
        serde_json::Value::String(s) if s == "unlimited" => Ok(Limit::Unlimited),
        serde_json::Value::Number(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => Ok(Limit::Max(n)),
            _ => Err(limit_error(field, v)),
        },
        _ => Err(limit_error(field, v)),
    }
}

fn limit_error(field: &str, v: &serde_json::Value) -> ApiError {
    crate::request::RequestError::param(
        field,
        format!("`{field}` must be a whole number of at least 1, \"unlimited\", or null for the configured default (not {v})"),
    )
    .into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    credits: f64,
}

fn key_json(k: &KeyInfo) -> serde_json::Value {
    json!({
        "id": k.id, "name": k.name, "prefix": k.prefix, "allowed_models": k.allowed_models, "revoked": k.revoked,
        "created_at": k.created_at, "credits": {"available": fmt_credits(k.available_mc), "held": fmt_credits(k.held_mc)},
        "limits": k.limits,
    })
}

/// `POST /v1/admin/keys` `{name, credits?, models?, requests_per_minute?, max_parallel?}` → the key with its
/// secret (shown once).
pub async fn create_key_handler(State(state): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: CreateKey = parse_json(&body)?;
    if req.name.trim().is_empty() || !req.credits.is_finite() || req.credits < 0.0 {
        return Err(crate::request::RequestError::new("`name` must be non-empty and `credits` a number >= 0").into());
    }
    let limits = KeyOverrides {
        requests_per_minute: limit_from_json("requests_per_minute", &req.requests_per_minute)?,
        max_parallel: limit_from_json("max_parallel", &req.max_parallel)?,
    };
    let new = state.ledger.create_key(req.name.trim(), to_mc(req.credits), req.models.as_deref(), limits).await?;
    let mut v = key_json(&new.info);
    v["secret"] = json!(new.secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `GET /v1/admin/keys`.
pub async fn list_keys_handler(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = state.ledger.list_keys().await?;
    Ok(Json(json!({"object": "list", "data": keys.iter().map(key_json).collect::<Vec<_>>()})))
}

/// `DELETE /v1/admin/keys/{key}` (name, id or prefix).
pub async fn revoke_key_handler(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(key_json(&state.ledger.revoke_key(&key).await?)))
}

/// `POST /v1/admin/keys/{key}/credits` `{credits}` (negative to take back).
pub async fn grant_handler(
    State(state): State<AppState>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: Grant = parse_json(&body)?;
    if !req.credits.is_finite() {
        return Err(crate::request::RequestError::param("credits", "`credits` must be a number").into());
    }
    Ok(Json(key_json(&state.ledger.grant(&key, to_mc(req.credits), "admin-api").await?)))
}

/// `POST /v1/admin/keys/{key}/limits` `{requests_per_minute?, max_parallel?}`: a field left out stays as it is,
/// `null` goes back to `auth.key_limits`; at least one field.
pub async fn limits_handler(
    State(state): State<AppState>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: serde_json::Map<String, serde_json::Value> = parse_json(&body)?;
    if let Some(unknown) = req.keys().find(|k| !LIMIT_FIELDS.contains(&k.as_str())) {
        return Err(crate::request::RequestError::param(
            unknown,
            format!("unknown field `{unknown}`; only `requests_per_minute` and `max_parallel` can be set"),
        )
        .into());
    }
    let field = |name: &str| req.get(name).map(|v| limit_from_json(name, v)).transpose();
    let change =
        KeyLimitsChange { requests_per_minute: field("requests_per_minute")?, max_parallel: field("max_parallel")? };
    if change.is_empty() {
        return Err(crate::request::RequestError::new("give `requests_per_minute` and/or `max_parallel`").into());
    }
    Ok(Json(key_json(&state.ledger.set_key_limits(&key, change).await?)))
}

/// `GET /v1/admin/ledger/check`: the invariants; 200 when clean, 500 with the drift otherwise.
pub async fn ledger_check_handler(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.settling.wait(None, crate::ledger::SETTLE_WAIT).await;
    let drift = state.ledger.check().await?;
    crate::telemetry::metrics::ledger_drift(drift.len());
    let status = if drift.is_empty() { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    Ok((status, Json(json!({"clean": drift.is_empty(), "drift": drift}))).into_response())
}
