//! The gateway's own endpoints: liveness, readiness, per-backend health, Prometheus metrics, admission status.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::admission::GateStatus;
use crate::health::Snapshot;
use crate::ledger::Store;
use crate::state::AppState;

/// `GET /healthz`: the process serves.
pub async fn healthz_handler() -> &'static str {
    "ok"
}

/// `GET /readyz`: config loaded, storage writable, at least one backend ready; else 503 with the reasons.
pub async fn readyz_handler(State(state): State<AppState>) -> Response {
    if state.drain.is_draining() {
        let body = json!({"status": "draining", "reasons": ["this instance is draining (SIGTERM): it finishes what it runs and takes nothing new"], "in_flight": state.drain.in_flight()});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let mut reasons = Vec::new();
    if let Err(e) = state.files.check().await {
        reasons.push(e.to_string());
    }
    if let Err(e) = state.ledger.ping().await {
        reasons.push(e.to_string());
    }
    let ready: Vec<&str> =
        state.backend_list.iter().filter(|b| b.health.is_ready()).map(|b| b.cfg.name.as_str()).collect();
    if ready.is_empty() {
        let why: Vec<String> = state
            .backend_list
            .iter()
            .map(|b| format!("{}: {}", b.cfg.name, b.health.snapshot().error.unwrap_or_else(|| "not ready".into())))
            .collect();
        reasons.push(format!("no backend is ready ({})", why.join("; ")));
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready", "ready_backends": ready}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "reasons": reasons}))).into_response()
    }
}

#[derive(Serialize)]
struct BackendHealth {
    kind: &'static str,
    url: Option<String>,
    #[serde(flatten)]
    state: Snapshot,
}

/// `GET /health`: every backend with its last probe. 200 when at least one backend is healthy, else 503.
pub async fn health_handler(State(state): State<AppState>) -> Response {
    let backends: BTreeMap<&str, BackendHealth> = state
        .backend_list
        .iter()
        .map(|b| {
            (
                b.cfg.name.as_str(),
                BackendHealth {
                    kind: b.cfg.kind.as_str(),
                    url: b.cfg.url.as_ref().map(ToString::to_string),
                    state: b.health.snapshot(),
                },
            )
        })
        .collect();
    let healthy = backends.values().filter(|b| b.state.healthy).count();
    let status = match healthy {
        0 => "unhealthy",
        n if n == backends.len() => "healthy",
        _ => "degraded",
    };
    let code = if healthy == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let mut body = json!({"status": status, "version": env!("CARGO_PKG_VERSION"), "backends": backends});
    if let Some(redis) = crate::health::redis_report(&state.cluster) {
        body["redis"] = json!(redis);
    }
    (code, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics_handler(State(state): State<AppState>) -> Response {
    match state.ledger.job_stats().await {
        Ok(stats) => crate::telemetry::metrics::job_stats(&stats, crate::ledger::now_ms()),
        Err(e) => tracing::warn!(error = %e, "Reading job counts for /metrics failed."),
    }
    let mut text = state.metrics.render();
    text.push_str(&crate::telemetry::process::render());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], text).into_response()
}

#[derive(Serialize)]
struct BackendStatus {
    kind: &'static str,
    url: Option<String>,
    admission: BTreeMap<&'static str, GateStatus>,
    #[serde(flatten)]
    health: Snapshot,
}

/// `GET /v1/gateway/status`: admission and health per backend, and the fleet's view: the instances sharing the
/// store and, with Redis, the permits held fleet-wide per backend.
pub async fn status_handler(State(state): State<AppState>) -> Json<serde_json::Value> {
    let fleet = crate::http::fleet::view(&state).await;
    let backends: BTreeMap<&str, BackendStatus> = state
        .backend_list
        .iter()
        .map(|b| {
            let admission = b.gates.iter().map(|(c, g)| (c.as_str(), g.status())).collect();
            (
                b.cfg.name.as_str(),
                BackendStatus {
                    kind: b.cfg.kind.as_str(),
                    url: b.cfg.url.as_ref().map(ToString::to_string),
                    admission,
                    health: b.health.snapshot(),
                },
            )
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "config": state.config.origin,
        "backends": backends,
        // Jobs (videos) holding a backend slot while they run upstream, per backend.
        "jobs_running": state.jobs.running(),
        // Hosts with their working sets (empty without `hosts:`).
        "hosts": state.sets.views(),
        "instance": fleet.this,
        "fleet": fleet.fleet,
        // The latest failed requests (5xx), newest first, with the message each client got.
        "recent_errors": state.recent_errors.newest_first(),
    }))
}
