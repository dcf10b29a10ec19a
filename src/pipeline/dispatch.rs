//! The one dispatch every operation goes through (images now; videos, jobs and text next): order the model's
//! candidates for a capability, take a slot (`admission`), run the operation on the adapter under the backend's
//! timeout, classify the outcome, fall back to the next candidate on a backend fault (never on the client's), feed
//! the circuit breaker and the metrics. Rules that hold for every operation, because they live only here:
//! no new attempt once the client has left, a 4xx the request caused is never retried elsewhere, and the slot is
//! held exactly as long as the operation says (the [`Permit`] is handed to it).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::admission::Permit;
use crate::backends::{BackendError, Failure};
use crate::config::{Capability, ModelConfig};
use crate::error::Error;
use crate::routing::{self, BackendHandle, Candidate};
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// Most upstream attempts for one call (first choice plus fallbacks).
pub const MAX_ATTEMPTS: usize = 3;
/// Slack over the backend's own timeout before easel gives up on an adapter call (adapters time out first).
const TIMEOUT_SLACK: Duration = Duration::from_secs(1);

/// The longest one dispatch over `model` can take: every attempt waiting its whole queue wait and then its whole
/// timeout on the slowest backend. A sync hold's lease is this plus a margin, so the reaper never takes a live one.
pub fn longest(state: &AppState, model: &ModelConfig) -> Duration {
    let slowest = model
        .backends
        .iter()
        .filter_map(|b| state.backends.get(&b.name))
        .map(|h| h.cfg.timeout + h.cfg.queue.wait)
        .max()
        .unwrap_or(Duration::from_secs(600));
    slowest * MAX_ATTEMPTS as u32
}

/// Runs `operation` on the first candidate backend of `model` for `capability` that takes it, falling back on
/// backend faults. `usable` skips candidates that cannot do this operation at all (e.g. edits on a backend
/// without them). `operation` gets the backend and its admission slot; it drops the slot when the upstream work
/// ends (a synchronous call) or keeps it for as long as that work runs (a job).
pub async fn dispatch<T, Usable, Op, Fut>(
    state: &AppState,
    model: &ModelConfig,
    capability: Capability,
    gone: &CancellationToken,
    usable: Usable,
    mut operation: Op,
) -> Result<T, Error>
where
    Usable: Fn(&BackendHandle) -> bool,
    Op: FnMut(Arc<BackendHandle>, Permit) -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    // A model in a working set waits here for its set (or learns why it cannot run); the pass counts this
    // request as work on the set's backends until dispatch ends.
    // A forced swap that cuts the set's backends off sends a request still queued for admission back here (auto
    // mode: it waits again as demand for its set) or refuses it (manual mode); running work gets a 503.
    'set: loop {
        let pass = tokio::select! {
            biased;
            () = gone.cancelled() => return Err(Error::ClientGone),
            r = state.sets.ready_for(model) => r?,
        };
        let cut = |p: &Option<crate::sets::Pass>| p.as_ref().is_some_and(crate::sets::Pass::interrupted);
        let until_cut = || async {
            match &pass {
                Some(p) => p.until_interrupted().await,
                None => std::future::pending().await,
            }
        };
        crate::telemetry::context::note_model(&model.id);
        // Every backend of the model is a managed process on its way back (an admin restart, a start, a crash's
        // backoff): the request waits for the first to be back, within the longest queue wait among them, rather
        // than failing against a closed port.
        // Checked without allocating: it stops at the first backend that is not a managed process coming back.
        if !model.backends.is_empty() && model.backends.iter().all(|b| state.processes.coming_back(&b.name)) {
            let coming_back: Vec<_> = model.backends.iter().filter_map(|b| state.backends.get(&b.name)).collect();
            let within = coming_back.iter().map(|h| h.cfg.queue.wait).max().unwrap_or_default();
            let any_back = futures_util::future::select_all(
                coming_back.iter().map(|h| Box::pin(state.processes.until_back(&h.cfg.name, within))),
            );
            tokio::select! {
                biased;
                () = gone.cancelled() => return Err(Error::ClientGone),
                _ = any_back => {}
            }
        }
        let candidates = routing::candidates(model, &state.backends, capability)?;
        let mut last: Option<Error> = None;
        for (attempt, Candidate { handle, trial }) in candidates.into_iter().take(MAX_ATTEMPTS).enumerate() {
            // Never a new attempt for a client that left: its answer would go nowhere and the GPU time is wasted.
            if gone.is_cancelled() {
                if trial {
                    handle.health.release_trial();
                }
                return Err(Error::ClientGone);
            }
            if attempt > 0 {
                tracing::info!(model = %model.id, backend = %handle.cfg.name, attempt, "Falling back to the next backend.");
            }
            let Some(gate) = handle.gate(capability) else { continue };
            if !usable(&handle) {
                continue;
            }
            let admitted = tokio::select! {
                // A slot that frees at the moment the client leaves goes to the next request, not to this one.
                biased;
                () = gone.cancelled() => {
                    if trial {
                        handle.health.release_trial();
                    }
                    return Err(Error::ClientGone);
                }
                r = gate.admit() => r,
                () = until_cut() => {
                    if trial {
                        handle.health.release_trial();
                    }
                    state.sets.cut_off(model, false)?;
                    continue 'set;
                }
            };
            let permit = match admitted {
                Ok(p) if gone.is_cancelled() => {
                    drop(p);
                    if trial {
                        handle.health.release_trial();
                    }
                    return Err(Error::ClientGone);
                }
                Ok(p) if cut(&pass) => {
                    drop(p);
                    if trial {
                        handle.health.release_trial();
                    }
                    state.sets.cut_off(model, false)?;
                    continue 'set;
                }
                Ok(p) => p,
                Err(e) => {
                    if trial {
                        handle.health.release_trial();
                    }
                    m::fallback(&handle.cfg.name, "busy");
                    // A busier answer never hides a more useful one.
                    if !matches!(last, Some(Error::Backend(_))) {
                        last = Some(e.into());
                    }
                    continue;
                }
            };
            crate::telemetry::context::note_backend(&handle.cfg.name);
            let started = Instant::now();
            let limit = handle.cfg.timeout + TIMEOUT_SLACK;
            // Boxed: the upstream call's state (clients, bodies, decoders) is allocated only once admitted, so a
            // request waiting in the queue holds a small future, not the call's.
            let result = match tokio::time::timeout(limit, Box::pin(operation(Arc::clone(&handle), permit))).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::new(
                    &handle.cfg.name,
                    handle.cfg.kind,
                    handle.cfg.endpoint(""),
                    Failure::Timeout(handle.cfg.timeout),
                )),
            };
            let took = started.elapsed();
            match result {
                Ok(value) => {
                    handle.health.record_call(false);
                    m::upstream_call(&handle.cfg.name, handle.cfg.kind.as_str(), "ok", took);
                    return Ok(value);
                }
                Err(_) if cut(&pass) => {
                    // A forced swap interrupted this work: not the backend's fault, and not worth another backend.
                    m::upstream_call(&handle.cfg.name, handle.cfg.kind.as_str(), "interrupted", took);
                    state.sets.cut_off(model, true)?;
                    return Err(Error::Internal("interrupted work had no working set".into()));
                }
                Err(e) => {
                    handle.health.record_call(e.is_backend_fault());
                    m::upstream_call(&handle.cfg.name, handle.cfg.kind.as_str(), e.outcome(), took);
                    tracing::warn!(model = %model.id, backend = %handle.cfg.name, error = %e, "Backend call failed.");
                    let retryable = e.retryable();
                    last = Some(e.into());
                    if !retryable {
                        break;
                    }
                    m::fallback(&handle.cfg.name, "error");
                }
            }
        }
        return Err(last.unwrap_or_else(|| Error::Internal("no backend attempt was made".into())));
    }
}
