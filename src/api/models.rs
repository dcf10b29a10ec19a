//! `/v1/models` wire shapes: OpenAI's list and model objects, plus easel's `meta`.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub meta: ModelMeta,
}

#[derive(Debug, Serialize)]
pub struct ModelMeta {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Other ids that name this model.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub backends: Vec<BackendRef>,
    pub working_set: Option<String>,
    /// The host the model's working set runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub credits: Option<f64>,
    /// What one use costs, with its unit; `None` when the model is free.
    pub pricing: Option<Pricing>,
    /// `ready` (a backend can take it now), `loading` (backends known, none ready yet, or its working set is
    /// starting), `inactive` (its working set is not active) or `unavailable`.
    pub status: &'static str,
    pub description: Option<String>,
    pub default_size: String,
    pub sizes: Option<Vec<String>>,
    pub max_n: u32,
    /// True when every backend is easel's procedural `simulated` backend: no model runs.
    pub simulated: bool,
}

#[derive(Debug, Serialize)]
pub struct BackendRef {
    pub name: String,
    pub kind: &'static str,
    pub healthy: bool,
}

/// A model's price: `unit` is `image`, `second`, `request` or `1k_tokens`; `credits` per unit, or for `1k_tokens`
/// the input and output prices per 1K tokens.
#[derive(Debug, Serialize)]
pub struct Pricing {
    pub unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_per_1k: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_per_1k: Option<f64>,
}
