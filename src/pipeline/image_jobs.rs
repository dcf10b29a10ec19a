//! Images as durable jobs (`Prefer: respond-async` on generations and edits): `submit` validates, prices, stores
//! the edit inputs and holds the price together with the job row; the job runner then calls `run`, which makes the
//! images through the same `produce` (and so the same dispatch, admission and fallback) as a synchronous request,
//! stores them, and ends the job — capturing what was made, or releasing — in one transaction.
//!
//! An image job runs inside easel (the backends answer synchronously), under a lease this process renews while
//! it works. If easel dies, the lease lapses (or startup recovery clears it) and the job runs again from its
//! stored request: the customer is charged once, when it ends. A job that keeps dying with its process is given
//! up after [`MAX_ATTEMPTS`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::images::{Caller, ImageSource};
use crate::api::images::ImagesRequest;
use crate::backends::progress::Progress;
use crate::backends::{EditInputs, InputImage};
use crate::config::ModelType;
use crate::error::Error;
use crate::ledger::{HoldOutcome, IdemClaim, JobChange, JobEnd, JobRecord, NewJob, Store};
use crate::request::{GenerateImage, RequestError, ResponseFormat};
use crate::state::AppState;

/// Runs of one job that may start before it is given up (each start after the first follows a crash).
pub const MAX_ATTEMPTS: i64 = 3;
/// How often a running job renews its lease and reports progress.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// Previews kept per run (the event stream shows the newest).
const PREVIEWS: u32 = 8;
/// When a job could not get a slot (queue full, no backend up), it tries again after this long.
const RETRY_BUSY: Duration = Duration::from_secs(1);

/// Which operation a job runs.
fn operation(edit: bool) -> &'static str {
    if edit { "edits" } else { "generations" }
}

/// Creates an image job for a generations (`images` empty) or edits request; returns it as stored.
pub async fn submit(
    state: &AppState,
    caller: &Caller,
    mut wire: ImagesRequest,
    images: Vec<ImageSource>,
    mask: Option<ImageSource>,
    edit: bool,
) -> Result<JobRecord, Error> {
    let sources: Vec<&ImageSource> = images.iter().chain(mask.as_ref()).collect();
    let fingerprint = super::images::fingerprint(caller, &wire, &sources);
    if wire.stream == Some(true) {
        return Err(RequestError::param(
            "stream",
            "`stream: true` cannot be combined with `Prefer: respond-async`; follow the job's events at /v1/jobs/{id}/events instead",
        )
        .into());
    }
    let allow_private = state.config.jobs.webhooks.allow_private;
    let webhook = wire.webhook_url.take();
    let webhook = webhook.as_deref().map(|u| crate::jobs::webhooks::parse_target(u, allow_private)).transpose()?;
    let stored_wire = serde_json::to_value(&wire).map_err(|e| Error::Internal(format!("storing a request: {e}")))?;
    let mut req = GenerateImage::from_wire(wire, &state.config.defaults)?;
    let what = if edit { "image edits" } else { "image generation" };
    let model = state.registry.resolve(req.model.as_deref(), ModelType::Image, what)?;
    req.check_model(&model)?;
    if edit {
        super::images::check_can_edit(state, &model)?;
        if images.is_empty() {
            return Err(RequestError::param(
                "image",
                "an edit needs at least one `image` (multipart `image` or `image[]`, or JSON `images`)",
            )
            .into());
        }
    }
    let who = match &caller.principal {
        Some(p) => p.clone(),
        None => state.ledger.anonymous().await?,
    };
    if !who.may_use(&model.id) {
        let allowed = who.allowed_models.as_ref().map(|m| m.join(", ")).unwrap_or_default();
        return Err(Error::ModelNotAllowed { key: who.name.clone(), model: model.id.clone(), allowed });
    }
    // The inputs are kept in easel's store until the job ends, so a restarted easel can run it again.
    let mut inputs = Vec::with_capacity(images.len());
    for (i, src) in images.into_iter().enumerate() {
        let img = super::images::resolve_input(state, caller, src, i).await?;
        inputs.push(state.files.put(&img.bytes, img.format).await?);
    }
    let mask = match mask {
        Some(m) => {
            let img = super::images::resolve_input(state, caller, m, 0).await?;
            Some(state.files.put(&img.bytes, img.format).await?)
        }
        None => None,
    };
    let (price_id, unit_mc) = state.prices.get(&model.id).copied().unwrap_or((0, 0));
    let unit_mc = if caller.principal.is_some() { unit_mc } else { 0 };
    let id = format!("job_{:032x}", rand::random::<u128>());
    let job = NewJob {
        id: id.clone(),
        object: "job",
        model: model.id.clone(),
        request: serde_json::json!({
            "operation": operation(edit),
            "prompt": req.prompt,
            "n": req.n,
            "wire": stored_wire,
            "inputs": inputs,
            "mask": mask,
            // The runner's later calls for this job carry the request id it was created under.
            "request_id": crate::telemetry::context::request_id().as_deref(),
        }),
        deadline_at: crate::ledger::now_ms() + model.job_timeout.as_millis() as i64,
        due_now: true,
        webhook_url: webhook.map(String::from),
    };
    let claim = caller.idempotency_key.as_ref().map(|key| IdemClaim {
        key: key.clone(),
        method: "POST".into(),
        path: caller.path.into(),
        fingerprint,
    });
    let forget_inputs = |state: &AppState| {
        let (inputs, mask) = input_files(&job.request);
        let state = state.clone();
        async move {
            for f in inputs.iter().chain(mask.iter()) {
                let _ = state.files.delete(f).await;
            }
        }
    };
    let held = state.ledger.hold_job(&who, price_id, i64::from(req.n), unit_mc, claim.as_ref(), &job).await;
    match held {
        Ok(HoldOutcome::Held { .. }) => {}
        Ok(HoldOutcome::Replay { body, .. }) => {
            forget_inputs(state).await;
            let first = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            return match first {
                Some(first) => state.ledger.job(&first).await?.ok_or(Error::JobNotFound(first)),
                None => Err(Error::Internal("a replayed job request has no job id".into())),
            };
        }
        Err(e) => {
            forget_inputs(state).await;
            return Err(e.into());
        }
    }
    if let Some(key) = &caller.idempotency_key {
        let body = serde_json::json!({"id": id}).to_string().into_bytes();
        let record = crate::ledger::StoredResponse { status: 202, content_type: "application/json".into(), body };
        state.ledger.complete_claim(&who, key, &record).await?;
    }
    tracing::info!(job = %id, model = %model.id, n = req.n, "Image job accepted.");
    state.jobs.wake();
    state.ledger.job(&id).await?.ok_or(Error::JobNotFound(id))
}

/// The stored inputs of an image job's request (edits), for its run and for cleaning up after it.
fn input_files(request: &serde_json::Value) -> (Vec<String>, Option<String>) {
    let inputs = request["inputs"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    (inputs, request["mask"].as_str().map(str::to_owned))
}

/// How a run ended that does not end the job.
enum Outcome {
    End(JobEnd),
    /// No slot now (the queue is full or no backend is up): try again later, until the deadline.
    Busy(String),
    /// easel is stopping: the job is left as it is and runs again after the restart.
    Abandoned,
}

/// Runs one image job this process claimed at `job.lease_epoch`, to its end (or to "busy, try later").
pub async fn run(state: AppState, job: JobRecord, cancel: CancellationToken, epoch: Arc<std::sync::atomic::AtomicI64>) {
    let id = job.id.clone();
    let failed = |code: &'static str, message: String| Outcome::End(JobEnd::Failed { state: "failed", code, message });
    let outcome = if job.cancel_requested {
        Outcome::End(JobEnd::Failed { state: "canceled", code: "canceled", message: "canceled by its owner".into() })
    } else if crate::ledger::now_ms() > job.deadline_at {
        failed("timeout", "the job did not finish within the model's `job_timeout`".into())
    } else if job.poll_failures >= MAX_ATTEMPTS {
        failed("upstream_lost", format!("easel stopped {MAX_ATTEMPTS} times while running this job; giving up"))
    } else {
        let start = JobChange { state: Some("running"), poll_failed: Some(true), ..JobChange::default() };
        match state.ledger.update_job(&id, epoch.load(Ordering::SeqCst), &start).await {
            Ok(true) => {
                state.jobs.changed();
                execute(&state, &job, &cancel, &epoch).await
            }
            Ok(false) => {
                state.jobs.end_local(&id);
                return;
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "Starting an image job failed; its lease lapses and it runs later.");
                state.jobs.end_local(&id);
                return;
            }
        }
    };
    let epoch_now = epoch.load(Ordering::SeqCst);
    match outcome {
        Outcome::Abandoned => {
            tracing::info!(job = %id, "easel is stopping; the image job runs again after the restart.");
            // Not a crash: the attempts start over.
            let change = JobChange { poll_failed: Some(false), ..JobChange::default() };
            let _ = state.ledger.update_job(&id, epoch_now, &change).await;
            state.jobs.end_local(&id);
        }
        Outcome::Busy(why) => {
            tracing::info!(job = %id, reason = %why, "No slot for an image job now; trying again shortly.");
            let change = JobChange {
                state: Some("queued"),
                next_poll_at: Some(crate::ledger::now_ms() + RETRY_BUSY.as_millis() as i64),
                // Waiting for a slot is not a crash: the attempts start over.
                poll_failed: Some(false),
                ..JobChange::default()
            };
            if let Err(e) = state.ledger.update_job(&id, epoch_now, &change).await {
                tracing::error!(job = %id, error = %e, "Rescheduling an image job failed.");
            }
            state.jobs.end_local(&id);
            state.jobs.changed();
        }
        Outcome::End(end) => {
            state.jobs.end_local(&id);
            if !crate::jobs::end_at(&state, &job, epoch_now, end).await {
                // Another poller holds the job now (or ending failed and it runs again): it needs the inputs.
                return;
            }
            let (inputs, mask) = input_files(&job.request);
            for f in inputs.iter().chain(mask.iter()) {
                if let Err(e) = state.files.delete(f).await {
                    tracing::warn!(job = %id, file = %f, error = %e, "Deleting a finished job's input failed.");
                }
            }
        }
    }
}

/// Makes the images, renewing the lease and reporting progress and previews while the backends work.
async fn execute(
    state: &AppState,
    job: &JobRecord,
    cancel: &CancellationToken,
    epoch: &std::sync::atomic::AtomicI64,
) -> Outcome {
    let failed = |code: &'static str, message: String| Outcome::End(JobEnd::Failed { state: "failed", code, message });
    let edit = job.request["operation"] == "edits";
    let wire: ImagesRequest = match serde_json::from_value(job.request["wire"].clone()) {
        Ok(w) => w,
        Err(e) => return failed("invalid_request", format!("the stored request cannot be read: {e}")),
    };
    let mut req = match GenerateImage::from_wire(wire, &state.config.defaults) {
        Ok(r) => r,
        Err(e) => return failed("invalid_request", e.to_string()),
    };
    let what = if edit { "image edits" } else { "image generation" };
    let model = match state.registry.resolve(Some(&job.model), ModelType::Image, what) {
        Ok(m) => m,
        Err(e) => return failed("backend_removed", e.to_string()),
    };
    // Every image is stored; the job object shows URLs or base64 as the request asked.
    req.response_format = ResponseFormat::Url;
    req.stream = None;
    let edit_inputs = if edit {
        let (inputs, mask) = input_files(&job.request);
        let mut images = Vec::with_capacity(inputs.len());
        for (i, f) in inputs.iter().enumerate() {
            match state.files.get(f).await {
                Ok(Some((bytes, format))) => {
                    images.push(InputImage { bytes, format, name: format!("input-{i}.{}", format.as_str()) })
                }
                _ => return failed("upstream_lost", format!("the job's input `{f}` is no longer stored")),
            }
        }
        let mask = match mask {
            Some(f) => match state.files.get(&f).await {
                Ok(Some((bytes, format))) => {
                    Some(InputImage { bytes, format, name: format!("mask.{}", format.as_str()) })
                }
                _ => return failed("upstream_lost", format!("the job's mask `{f}` is no longer stored")),
            },
            None => None,
        };
        super::images::infer_edit_size(&mut req, &images);
        Some(Arc::new(EditInputs { images, mask }))
    } else {
        None
    };
    let (progress, mut previews) = Progress::listening(PREVIEWS);
    let progress = Arc::new(progress);
    let caller = Caller {
        principal: None,
        idempotency_key: None,
        path: if edit { "/v1/images/edits" } else { "/v1/images/generations" },
        gone: cancel.clone(),
        progress: progress.clone(),
    };
    let work = super::images::produce(state, Arc::new(req), &model, edit_inputs, "", &caller);
    tokio::pin!(work);
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut reported = 0;
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            () = state.jobs.stopping.cancelled() => return Outcome::Abandoned,
            Some(p) = previews.recv() => state.jobs.set_preview(&job.id, p),
            _ = beat.tick() => {
                let now = epoch.load(Ordering::SeqCst);
                match state.ledger.renew_job(&job.id, now, crate::jobs::LEASE).await {
                    Ok(Some(false)) => {}
                    // Its owner asked to cancel, or another poller holds it now: stop the upstream work.
                    Ok(Some(true) | None) => cancel.cancel(),
                    Err(e) => tracing::warn!(job = %job.id, error = %e, "Renewing a job's lease failed."),
                }
                let percent = progress.fraction().map_or(0, |f| (f * 100.0).floor() as i64);
                if percent > reported {
                    reported = percent;
                    let change = JobChange { progress: Some(percent), ..JobChange::default() };
                    if let Ok(true) = state.ledger.update_job(&job.id, now, &change).await {
                        state.jobs.changed();
                    }
                }
            }
        }
    };
    match result {
        Ok((resp, produced, stored)) => {
            let images: Vec<serde_json::Value> = resp
                .data
                .iter()
                .zip(&stored)
                .map(|(item, file)| {
                    serde_json::json!({
                        "file": file.id, "mime": file.mime, "bytes": file.bytes, "revised_prompt": item.revised_prompt,
                    })
                })
                .collect();
            let outputs = serde_json::json!({
                "created": resp.created,
                "images": images,
                "output_format": resp.output_format,
                "size": resp.size,
                "quality": resp.quality,
                "background": resp.background,
                "usage": resp.usage.map(|u| serde_json::json!({
                    "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "total_tokens": u.total_tokens,
                })),
                "partial": resp.partial.as_ref().map(|p| serde_json::json!({
                    "requested": p.requested, "produced": p.produced, "error": p.error,
                })),
            });
            Outcome::End(JobEnd::Succeeded { units: produced as i64, outputs })
        }
        Err(_) if cancel.is_cancelled() => Outcome::End(JobEnd::Failed {
            state: "canceled",
            code: "canceled",
            message: "canceled by its owner".into(),
        }),
        Err(Error::Admission(e)) => Outcome::Busy(e.to_string()),
        // A working set that is switching (or whose swap queue is full, or which easel is restarting) and a model
        // whose backends are all down now: a durable job waits and tries again, until its deadline.
        Err(Error::WorkingSet(w)) if w.retry_after().is_some() => Outcome::Busy(w.to_string()),
        Err(Error::Routing(r @ crate::routing::RoutingError::NoHealthyBackend { .. })) => Outcome::Busy(r.to_string()),
        Err(Error::Backend(b)) if !b.retryable() => failed("upstream_rejected", b.to_string()),
        Err(Error::Backend(b)) => failed("upstream_failed", b.to_string()),
        Err(Error::Request(e)) => failed("invalid_request", e.to_string()),
        Err(e) => failed("upstream_failed", e.to_string()),
    }
}
