//! `create_video`: the story of `POST /v1/videos`, and the owner-checked reads and changes of a video job.
//!
//! 1. Resolve the video model; price the clip (per clip, or per second of video).
//! 2. Hold the price and create the job row in one transaction (or replay a repeated Idempotency-Key).
//! 3. Submit through the shared dispatch (admission, fallback before the submit is accepted, never after); the
//!    job keeps its backend's slot while it runs upstream.
//! 4. Record the backend and its handle; from here the poller (`jobs`) drives the job to a terminal state, which
//!    captures or releases the hold in the same transaction.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::dispatch::dispatch;
use super::images::{Caller, ImageSource};
use crate::api::videos::VideosRequest;
use crate::backends::{JobHandle, VideoCall};
use crate::config::{BackendKind, Capability, ModelType};
use crate::error::Error;
use crate::ledger::{HoldOutcome, IdemClaim, JobChange, JobEnd, JobRecord, NewJob, Principal, Store, to_mc};
use crate::request::video::GenerateVideo;
use crate::request::video::ReferenceImage;
use crate::request::{RequestError, Size};
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// How long a submit may take before easel stops waiting for the backend's answer.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Validates a `POST /v1/videos` body and runs [`create_video`].
pub async fn create(
    state: &AppState,
    caller: &Caller,
    wire: VideosRequest,
    reference: Option<ImageSource>,
) -> Result<JobRecord, Error> {
    let sources: Vec<&ImageSource> = reference.iter().collect();
    let fingerprint = super::images::fingerprint(caller, &wire, &sources);
    let prompt = match wire.prompt {
        Some(p) if !p.trim().is_empty() => p,
        Some(_) => return Err(RequestError::param("prompt", "`prompt` must not be empty").into()),
        None => return Err(RequestError::param("prompt", "`prompt` is required").into()),
    };
    let seconds = GenerateVideo::parse_seconds(wire.seconds.as_ref())?;
    let size = match wire.size.as_deref() {
        None | Some("auto") => None,
        Some(s) => Some(Size::parse(s).ok_or_else(|| {
            RequestError::param("size", format!("`size` must be WIDTHxHEIGHT like 1280x720, not `{s}`"))
        })?),
    };
    if let Some(e) = &wire.extra {
        crate::request::extra::check(e)?;
    }
    let allow_private = state.config.jobs.webhooks.allow_private;
    let webhook =
        wire.webhook_url.as_deref().map(|u| crate::jobs::webhooks::parse_target(u, allow_private)).transpose()?;
    let reference = match reference {
        Some(src) => {
            let img = super::images::resolve_input(state, caller, src, 0).await?;
            Some(ReferenceImage { bytes: img.bytes, format: img.format })
        }
        None => None,
    };
    let req = GenerateVideo {
        model: wire.model,
        prompt,
        seconds,
        size,
        reference,
        negative_prompt: wire.negative_prompt,
        seed: wire.seed,
        extra: wire.extra,
    };
    create_video(state, caller, req, fingerprint, webhook).await
}

/// Creates a video job and submits it; returns the job as stored after the submit.
pub async fn create_video(
    state: &AppState,
    caller: &Caller,
    req: GenerateVideo,
    fingerprint: [u8; 32],
    webhook: Option<url::Url>,
) -> Result<JobRecord, Error> {
    // 1. The model and the price.
    let model = state.registry.resolve(req.model.as_deref(), ModelType::Video, "video generation")?;
    let who = principal(state, caller).await?;
    if !who.may_use(&model.id) {
        let allowed = who.allowed_models.as_ref().map(|m| m.join(", ")).unwrap_or_default();
        return Err(Error::ModelNotAllowed { key: who.name.clone(), model: model.id.clone(), allowed });
    }
    let (price_id, unit_mc) = state.prices.get(&model.id).copied().unwrap_or((0, 0));
    let (units, unit_mc) = match model.credits_per_second {
        Some(per_second) => (i64::from(req.seconds), to_mc(per_second)),
        None => (1, unit_mc),
    };
    let unit_mc = if caller.principal.is_some() { unit_mc } else { 0 };

    // 2. Hold and create the job together.
    let id = format!("video_{:032x}", rand::random::<u128>());
    let size = req.size.unwrap_or(model.default_size);
    let job = NewJob {
        id: id.clone(),
        object: "video",
        model: model.id.clone(),
        request: serde_json::json!({
            "prompt": req.prompt,
            "seconds": req.seconds.to_string(),
            "size": size.to_string(),
            "has_reference": req.reference.is_some(),
            // The runner's later calls for this job carry the request id it was created under.
            "request_id": crate::telemetry::context::request_id().as_deref(),
            "model_as_sent": req.model,
        }),
        deadline_at: crate::ledger::now_ms() + model.job_timeout.as_millis() as i64,
        due_now: false,
        webhook_url: webhook.map(String::from),
    };
    let claim = caller.idempotency_key.as_ref().map(|key| IdemClaim {
        key: key.clone(),
        method: "POST".into(),
        path: caller.path.into(),
        fingerprint,
    });
    match state.ledger.hold_job(&who, price_id, units, unit_mc, claim.as_ref(), &job).await? {
        HoldOutcome::Replay { body, .. } => {
            // The first request's job, as it stands now.
            let first = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            return match first {
                Some(first) => state.ledger.job(&first).await?.ok_or(Error::FileNotFound(first)),
                None => Err(Error::Internal("a replayed video request has no job id".into())),
            };
        }
        HoldOutcome::Held { .. } => {}
    }

    // 3. Submit: fallback happens only until a backend accepts it, and never after a backend may have received
    //    it (a timeout, a broken connection, an unreadable success): that would risk running the clip twice.
    let client_ref = id.clone();
    // The job outlives the HTTP request: a client that leaves does not stop the submit.
    let never = CancellationToken::new();
    let submitted = dispatch(
        state,
        &model,
        Capability::Videos,
        &never,
        |h| h.adapter.supports_videos(),
        |handle, permit| {
            let (req, model, client_ref) = (&req, &model, &client_ref);
            async move {
                // Written before the backend is called, so a restart knows whom to ask about this job.
                let submitting = JobChange {
                    state: Some("submitting"),
                    backend: Some(handle.cfg.name.clone()),
                    ..JobChange::default()
                };
                if let Err(e) = state.ledger.update_job(client_ref, 0, &submitting).await {
                    tracing::error!(job = %client_ref, error = %e, "Recording a job's backend before its submit failed.");
                }
                let hook = hook_url(state, &handle.cfg.name, client_ref);
                let call = VideoCall { request: req, model, client_ref, webhook: hook.as_deref() };
                let r = tokio::time::timeout(SUBMIT_TIMEOUT, handle.adapter.submit_video(call)).await;
                let r = r.unwrap_or_else(|_| {
                    Err(crate::backends::BackendError::new(
                        &handle.cfg.name,
                        handle.cfg.kind,
                        handle.cfg.endpoint(""),
                        crate::backends::Failure::Timeout(SUBMIT_TIMEOUT),
                    ))
                });
                match r {
                    Ok(h) => Ok((handle, h, permit)),
                    Err(e) if e.maybe_received() => Err(e.finally()),
                    Err(e) => Err(e),
                }
            }
        },
    )
    .await;
    let (handle, upstream, permit) = match submitted {
        Ok(s) => s,
        Err(Error::Backend(b)) if b.final_attempt => {
            // The backend may have the job: it stays held as `unknown` until it is found (ComfyUI / InvokeAI by
            // the id easel chose), reported by the backend's webhook (fal, Replicate), or released at its deadline.
            tracing::warn!(job = %id, backend = %b.backend, error = %b, "A video submit got no usable answer; the job is unknown until the backend reports it or its deadline passes.");
            if state.config.server.public_url.is_none() && matches!(b.kind, BackendKind::Fal | BackendKind::Replicate) {
                tracing::warn!(job = %id, "Without `server.public_url` the backend cannot report this job; it will be released at its deadline.");
            }
            let change = JobChange {
                state: Some("unknown"),
                backend: Some(b.backend.clone()),
                next_poll_at: Some(crate::ledger::now_ms()),
                ..JobChange::default()
            };
            state.ledger.update_job(&id, 0, &change).await?;
            m::job_unknown(&model.id);
            answered(state, caller, &who, &id).await?;
            state.jobs.wake();
            return state.ledger.job(&id).await?.ok_or(Error::JobNotFound(id));
        }
        Err(e) => {
            let (code, message) = match &e {
                Error::Backend(b) if !b.retryable() => ("upstream_rejected", e.to_string()),
                _ => ("upstream_failed", e.to_string()),
            };
            let end = JobEnd::Failed { state: "failed", code, message };
            if let Err(le) = state.ledger.end_job(&id, 0, &end).await {
                tracing::error!(job = %id, error = %le, "Ending a job whose submit failed; the poller ends it later.");
            }
            return Err(e);
        }
    };

    // 4. Bound to the backend that accepted it.
    state.jobs.hold_slot(&id, &handle.cfg.name, permit);
    let change = JobChange {
        state: Some("queued"),
        backend: Some(handle.cfg.name.clone()),
        handle: serde_json::to_value(&upstream).ok(),
        next_poll_at: Some(crate::ledger::now_ms()),
        ..JobChange::default()
    };
    // `false` when the backend's webhook was faster and already bound the job to the same upstream job.
    if !state.ledger.update_job(&id, 0, &change).await? {
        tracing::debug!(job = %id, "The job was bound by its webhook before the submit returned.");
    }
    answered(state, caller, &who, &id).await?;
    tracing::info!(job = %id, backend = %handle.cfg.name, upstream = %upstream.upstream_id, "Video job submitted.");
    state.jobs.wake();
    state.ledger.job(&id).await?.ok_or(Error::FileNotFound(id))
}

/// Completes the request's Idempotency-Key claim with the job's id (a repeat returns the job as it stands).
async fn answered(state: &AppState, caller: &Caller, who: &Principal, id: &str) -> Result<(), Error> {
    if let Some(key) = &caller.idempotency_key {
        let body = serde_json::json!({"id": id}).to_string().into_bytes();
        let record = crate::ledger::StoredResponse { status: 200, content_type: "application/json".into(), body };
        state.ledger.complete_claim(who, key, &record).await?;
    }
    Ok(())
}

/// easel's signed webhook URL for `job` on `backend` (`{public_url}/v1/hooks/{backend}/{job}?sig=…`); `None`
/// without `server.public_url`, since a backend elsewhere cannot reach an address easel guesses.
pub fn hook_url(state: &AppState, backend: &str, job: &str) -> Option<String> {
    let base = state.config.server.public_url.as_ref()?;
    let sig = state.signer.hook_sig(backend, job);
    Some(format!("{}/v1/hooks/{backend}/{job}?sig={sig}", base.as_str().trim_end_matches('/')))
}

/// The caller's principal; without keys, the ledger's anonymous one.
async fn principal(state: &AppState, caller: &Caller) -> Result<Principal, Error> {
    match &caller.principal {
        Some(p) => Ok(p.clone()),
        None => Ok(state.ledger.anonymous().await?),
    }
}

/// A job the caller owns (another key's job is "not found", as if it did not exist).
pub async fn owned_job(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, Error> {
    let who = principal(state, caller).await?;
    match state.ledger.job(id).await? {
        Some(job) if job.key_id == who.key_id => Ok(job),
        _ => Err(Error::JobNotFound(id.to_owned())),
    }
}

/// A video job the caller owns; an image job is not a video (`/v1/jobs/{id}` serves it), so it is "not found"
/// under `/v1/videos`.
pub async fn owned_video(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, Error> {
    match owned_job(state, caller, id).await? {
        job if job.object == "video" => Ok(job),
        _ => Err(Error::JobNotFound(id.to_owned())),
    }
}

/// The caller's video jobs, newest first unless `ascending`, after the cursor.
pub async fn list_videos(
    state: &AppState,
    caller: &Caller,
    after: Option<&str>,
    limit: u32,
    ascending: bool,
) -> Result<(Vec<JobRecord>, bool), Error> {
    let who = principal(state, caller).await?;
    Ok(state.ledger.list_jobs(who.key_id, "video", after, limit, ascending).await?)
}

/// Cancels a job the caller owns: the poller cancels upstream and releases the hold.
pub async fn cancel(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, Error> {
    let job = owned_job(state, caller, id).await?;
    if !job.is_terminal() {
        state.ledger.request_cancel(id).await?;
        state.jobs.wake();
    }
    owned_job(state, caller, id).await
}

/// Deletes a finished job the caller owns, with its stored outputs (OpenAI: only completed or failed jobs).
pub async fn delete(state: &AppState, caller: &Caller, id: &str) -> Result<(), Error> {
    let job = owned_job(state, caller, id).await?;
    if !job.is_terminal() {
        return Err(crate::request::RequestError::param(
            "video_id",
            format!("video `{id}` is still {}; cancel it first (POST /v1/videos/{id}/cancel)", job.state),
        )
        .with_code("job_not_finished")
        .into());
    }
    let files = job.outputs.as_ref().map(crate::ledger::output_files).unwrap_or_default();
    for file in files {
        state.files.delete(&file).await?;
    }
    state.ledger.delete_job(id).await?;
    Ok(())
}

/// The stored file of a completed job's output of `kind` (`video` or `thumbnail`).
pub fn output_file(job: &JobRecord, kind: &str) -> Option<String> {
    job.outputs
        .as_ref()?
        .as_array()?
        .iter()
        .find(|o| o["kind"] == kind)
        .and_then(|o| o["file"].as_str().map(str::to_owned))
}

/// The backend's handle stored with a submitted job (`None` before the submit returned).
pub fn handle_of(job: &JobRecord) -> Option<JobHandle> {
    job.handle.clone().and_then(|h| serde_json::from_value(h).ok())
}
