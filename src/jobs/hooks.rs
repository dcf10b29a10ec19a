//! Inbound backend webhooks, `POST /v1/hooks/{backend}/{job}?sig=…`: fal and Replicate report a job's end to
//! the URL easel gave them at submit. A valid signature (the URL signer's MAC of the backend and job) lets the
//! body bind an `unknown` job to the upstream id it names, or make a bound job due for its next poll. Nothing
//! else in the body is believed: the poll, with easel's own credentials on the backend's own origin, stays the
//! source of truth, so a replayed or altered delivery changes no outcome.

use crate::error::Error;
use crate::ledger::Store;
use crate::request::RequestError;
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// What a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOutcome {
    /// An `unknown` (or still submitting) job is now bound to the upstream job and polled.
    Adopted,
    /// A bound job is polled now.
    Polled,
    /// The job had already ended; nothing changed (deliveries are retried, so this is normal).
    Ended,
}

impl HookOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adopted => "adopted",
            Self::Polled => "polled",
            Self::Ended => "ended",
        }
    }
}

/// Handles one delivery for `job` on `backend`, signed `sig`, with the backend's own JSON `body`.
pub async fn receive(state: &AppState, backend: &str, job: &str, sig: &str, body: &[u8]) -> Result<HookOutcome, Error> {
    if !state.signer.verify_hook(backend, job, sig) {
        m::job_hook("unknown", "refused");
        return Err(Error::LinkRefused {
            message: "this webhook URL's signature is not easel's for this backend and job".into(),
            code: "invalid_signature",
        });
    }
    // Signed by easel, so `backend` is a name easel configured (maybe since removed).
    let outcome = bind(state, backend, job, body).await;
    m::job_hook(backend, outcome.as_ref().map_or("refused", |o| o.as_str()));
    if let Ok(o) = &outcome {
        tracing::info!(job = %job, backend = %backend, outcome = o.as_str(), "Backend webhook received.");
    }
    outcome
}

async fn bind(state: &AppState, backend: &str, id: &str, body: &[u8]) -> Result<HookOutcome, Error> {
    let Some(job) = state.ledger.job(id).await? else { return Err(Error::JobNotFound(id.to_owned())) };
    if job.is_terminal() {
        return Ok(HookOutcome::Ended);
    }
    if job.backend.as_deref().is_some_and(|b| b != backend) {
        // The job moved to another backend (a fallback before this one accepted): this report is not its.
        return Err(RequestError::param("backend", format!("job `{id}` does not run on backend `{backend}`")).into());
    }
    if job.handle.is_some() {
        state.ledger.poll_job_now(id).await?;
        state.jobs.wake();
        return Ok(HookOutcome::Polled);
    }
    let model = state.config.models.iter().find(|m| m.id == job.model);
    let handle = state.backends.get(backend).zip(model).and_then(|(b, model)| b.adapter.job_from_webhook(model, body));
    let Some(handle) = handle else {
        return Err(RequestError::param(
            "body",
            format!("the webhook body names no job that backend `{backend}` (as configured now) can poll"),
        )
        .into());
    };
    let value = serde_json::to_value(&handle).map_err(|e| Error::Internal(e.to_string()))?;
    if state.ledger.adopt_job(id, backend, &value).await? {
        tracing::info!(job = %id, backend = %backend, upstream = %handle.upstream_id, "Adopted an unknown job from its backend's webhook.");
        state.jobs.changed();
        state.jobs.wake();
        return Ok(HookOutcome::Adopted);
    }
    // Bound (or ended) between the read and the write: as if it had been so before.
    match state.ledger.job(id).await? {
        Some(j) if j.is_terminal() => Ok(HookOutcome::Ended),
        _ => {
            state.ledger.poll_job_now(id).await?;
            state.jobs.wake();
            Ok(HookOutcome::Polled)
        }
    }
}
