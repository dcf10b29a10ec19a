//! `/v1/models` handlers: the registry in OpenAI's list shape, with easel's `meta`.

use axum::Json;
use axum::extract::{Path, State};

use super::error::ApiError;
use crate::api::models::{BackendRef, ModelList, ModelMeta, ModelObject};
use crate::config::{BackendKind, ModelConfig};
use crate::state::AppState;

/// `GET /v1/models`.
pub async fn list_handler(State(state): State<AppState>) -> Json<ModelList> {
    let data = state.registry.all().iter().map(|m| model_object(&state, m)).collect();
    Json(ModelList { object: "list", data })
}

/// `GET /v1/models/{id}` (ids may contain `/`, as Hugging Face repos do).
pub async fn get_handler(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ModelObject>, ApiError> {
    match state.registry.get(&id) {
        Some(m) => Ok(Json(model_object(&state, m))),
        None => Err(state.registry.not_found(&id).into()),
    }
}

fn model_object(state: &AppState, m: &ModelConfig) -> ModelObject {
    let backends: Vec<BackendRef> = m
        .backends
        .iter()
        .filter_map(|b| state.backends.get(&b.name))
        .map(|h| BackendRef { name: h.cfg.name.clone(), kind: h.cfg.kind.as_str(), healthy: h.health.is_healthy() })
        .collect();
    let any_ready = m.backends.iter().filter_map(|b| state.backends.get(&b.name)).any(|h| h.health.is_ready());
    let status = if any_ready {
        "ready"
    } else if backends.iter().any(|b| b.healthy) {
        "loading"
    } else {
        "unavailable"
    };
    let status = state.sets.status(m).unwrap_or(status);
    let host = state.sets.of(m).map(|(host, _)| host);
    let simulated = !backends.is_empty() && backends.iter().all(|b| b.kind == BackendKind::Simulated.as_str());
    let created = state.started_unix();
    ModelObject {
        id: m.id.clone(),
        object: "model",
        created,
        owned_by: "easel",
        meta: ModelMeta {
            kind: m.kind.as_str(),
            aliases: m.aliases.clone(),
            backends,
            working_set: m.working_set.clone(),
            host,
            credits: m.credits,
            pricing: pricing(m),
            status,
            description: m.description.clone(),
            default_size: m.default_size.to_string(),
            sizes: m.sizes.as_ref().map(|s| s.iter().map(ToString::to_string).collect()),
            max_n: m.max_n,
            simulated,
        },
    }
}

/// The model's price as it is charged: per 1K tokens, per second of video, or per request or image.
fn pricing(m: &crate::config::ModelConfig) -> Option<crate::api::models::Pricing> {
    use crate::api::models::Pricing;
    let per = |unit, credits| Pricing { unit, credits: Some(credits), input_per_1k: None, output_per_1k: None };
    match (m.token_credits, m.credits_per_second, m.credits) {
        (Some(t), _, _) => Some(Pricing {
            unit: "1k_tokens",
            credits: None,
            input_per_1k: Some(t.input_per_1k),
            output_per_1k: Some(t.output_per_1k),
        }),
        (None, Some(s), _) => Some(per("second", s)),
        (None, None, Some(c)) if m.kind != crate::config::ModelType::Image => Some(per("request", c)),
        (None, None, Some(c)) => Some(per("image", c)),
        (None, None, None) => None,
    }
}
