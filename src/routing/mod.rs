//! Routing: the model registry (public id → model config) and the choice of backends for a request: healthy,
//! circuit-closed candidates, free ones first in preference order, then the least loaded (by weight).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::admission::Gate;
use crate::backends::AnyBackend;
use crate::config::{BackendConfig, Capability, ModelConfig, ModelType};
use crate::health::{Admit, Health};

/// A backend as the runtime holds it: config, adapter, admission gates and health.
#[derive(Debug)]
pub struct BackendHandle {
    pub cfg: Arc<BackendConfig>,
    pub adapter: AnyBackend,
    /// One gate per capability with a non-zero limit.
    pub gates: BTreeMap<Capability, Arc<Gate>>,
    pub health: Health,
}

impl BackendHandle {
    pub fn gate(&self, capability: Capability) -> Option<&Arc<Gate>> {
        self.gates.get(&capability)
    }
}

/// Why no backend could be chosen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RoutingError {
    #[error("{}", not_found_message(.requested, .available, .nearest.as_deref()))]
    ModelNotFound { requested: String, available: Vec<String>, nearest: Option<String> },
    #[error("model `{model}` is {} {actual} model, served by {}; {operation} needs a {wanted} model", article(.actual), served_by(.actual))]
    WrongType { model: String, actual: &'static str, wanted: &'static str, operation: &'static str },
    #[error("no backend of model `{model}` can take requests now: {}", .reasons.join("; "))]
    NoHealthyBackend { model: String, reasons: Vec<String> },
}

fn article(kind: &str) -> &'static str {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

/// The endpoint that serves a model type, for error messages.
fn served_by(kind: &str) -> &'static str {
    match kind {
        "image" => "POST /v1/images/generations",
        "video" => "POST /v1/videos",
        _ => "POST /v1/chat/completions",
    }
}

fn not_found_message(requested: &str, available: &[String], nearest: Option<&str>) -> String {
    let mut msg = format!("model `{requested}` does not exist");
    match nearest {
        Some(n) => msg.push_str(&format!("; did you mean `{n}`?")),
        None => msg.push('.'),
    }
    msg.push_str(&format!(" Available models: {}", available.join(", ")));
    msg
}

/// Models by id, in configuration order.
#[derive(Debug)]
pub struct Registry {
    models: Vec<Arc<ModelConfig>>,
    by_id: HashMap<String, Arc<ModelConfig>>,
}

impl Registry {
    pub fn new(models: Vec<Arc<ModelConfig>>) -> Self {
        let by_id = models
            .iter()
            .flat_map(|m| std::iter::once(&m.id).chain(&m.aliases).map(move |name| (name.clone(), Arc::clone(m))))
            .collect();
        Self { models, by_id }
    }

    pub fn all(&self) -> &[Arc<ModelConfig>] {
        &self.models
    }

    pub fn get(&self, id: &str) -> Option<&Arc<ModelConfig>> {
        self.by_id.get(id)
    }

    /// The model a request names (or the first of `kind` when it names none), checked against `kind`.
    pub fn resolve(
        &self,
        requested: Option<&str>,
        kind: ModelType,
        operation: &'static str,
    ) -> Result<Arc<ModelConfig>, RoutingError> {
        let model = match requested {
            Some(id) => self.by_id.get(id).cloned().ok_or_else(|| self.not_found(id))?,
            None => {
                self.models.iter().find(|m| m.kind == kind).cloned().ok_or_else(|| self.not_found("(none given)"))?
            }
        };
        if model.kind != kind {
            return Err(RoutingError::WrongType {
                model: model.id.clone(),
                actual: model.kind.as_str(),
                wanted: kind.as_str(),
                operation,
            });
        }
        Ok(model)
    }

    pub fn not_found(&self, requested: &str) -> RoutingError {
        let available: Vec<String> =
            self.models.iter().flat_map(|m| std::iter::once(&m.id).chain(&m.aliases)).cloned().collect();
        let nearest = nearest(requested, &available);
        RoutingError::ModelNotFound { requested: requested.to_owned(), available, nearest }
    }
}

/// The closest id by edit distance (case-insensitive), when it is close enough to be a likely typo.
pub fn nearest(requested: &str, ids: &[String]) -> Option<String> {
    let req = requested.to_ascii_lowercase();
    ids.iter()
        .map(|id| (levenshtein(&req, &id.to_ascii_lowercase()), id))
        .filter(|(d, id)| {
            *d <= (id.len().max(req.len()) / 2).max(2)
                || id.to_ascii_lowercase().contains(&req)
                || req.contains(&id.to_ascii_lowercase())
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, id)| id.clone())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A backend chosen for one attempt; `trial` marks a half-open circuit's single trial request.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub handle: Arc<BackendHandle>,
    pub trial: bool,
}

/// Orders a model's backends for one request: those that may take traffic, free ones first (preference order),
/// then saturated ones by load per weight. Fails when none may take traffic, with each one's reason.
pub fn candidates(
    model: &ModelConfig,
    backends: &HashMap<String, Arc<BackendHandle>>,
    capability: Capability,
) -> Result<Vec<Candidate>, RoutingError> {
    let mut free = Vec::new();
    let mut busy = Vec::new();
    let mut reasons = Vec::new();
    for (pref, mb) in model.backends.iter().enumerate() {
        let Some(handle) = backends.get(&mb.name) else { continue };
        let Some(gate) = handle.gate(capability) else {
            reasons.push(format!("`{}` does not serve {}", mb.name, capability.as_str()));
            continue;
        };
        let trial = match handle.health.admit() {
            Admit::Yes => false,
            Admit::Trial => true,
            Admit::No(why) => {
                reasons.push(format!("`{}` ({}): {why}", mb.name, handle.cfg.kind));
                continue;
            }
        };
        let c = Candidate { handle: Arc::clone(handle), trial };
        if gate.saturated() {
            let load = f64::from(gate.inflight() + gate.queued()) / f64::from(gate.limit().max(1) * mb.weight.max(1));
            busy.push((load, pref, c));
        } else {
            free.push(c);
        }
    }
    busy.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    free.extend(busy.into_iter().map(|(_, _, c)| c));
    if free.is_empty() {
        return Err(RoutingError::NoHealthyBackend { model: model.id.clone(), reasons });
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_not_strangers() {
        let ids = vec!["sdxl".to_owned(), "flux-dev".to_owned(), "easel-sim".to_owned()];
        assert_eq!(nearest("sdx1", &ids).as_deref(), Some("sdxl"));
        assert_eq!(nearest("flux", &ids).as_deref(), Some("flux-dev"));
        assert_eq!(nearest("EASEL-SIM", &ids).as_deref(), Some("easel-sim"));
        assert_eq!(nearest("completely-different-thing", &ids), None);
    }
}
