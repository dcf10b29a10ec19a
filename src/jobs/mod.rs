//! The job runner: claims due jobs with a lease, polls each on the backend that accepted it (never another),
//! copies outputs into easel's store, and ends it — capture or release in the same transaction. Cancellation
//! and deadlines cancel upstream first. Jobs live in the ledger's database, so a restarted easel resumes them.
//! A running job keeps its backend's admission slot until it ends.

pub mod hooks;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admission::Permit;
use crate::backends::jobs::{JobErrorCode, JobState, OutputKind};
use crate::backends::progress::Preview;
use crate::ledger::{JobChange, JobEnd, JobRecord, Store};
use crate::state::AppState;
use crate::telemetry::metrics as m;

/// How long a claimed job is this instance's before another poller may take it over.
pub(crate) const LEASE: Duration = Duration::from_secs(60);
/// Jobs claimed per round.
const BATCH: u32 = 16;
/// Longest wait between rounds when nothing wakes the runner.
const IDLE: Duration = Duration::from_millis(250);
/// Failed polls in a row after which a job is given up as lost.
const MAX_POLL_FAILURES: i64 = 20;

/// The runner's in-process state: slots held by running jobs, and a bell to poll now.
#[derive(Debug, Default)]
pub struct Jobs {
    /// Job id → (backend, the slot it holds).
    slots: Mutex<HashMap<String, (String, Permit)>>,
    bell: Notify,
    /// Rung after every change this runner makes to a job (event streams wait on it).
    changed: Notify,
    /// This process's name as a lease owner.
    owner: String,
    /// Image jobs running inside this process.
    local: Mutex<HashMap<String, LocalRun>>,
    /// Fires when the process stops: image jobs still running here (past the drain) are abandoned (not ended) and
    /// run again later.
    pub(crate) stopping: CancellationToken,
}

/// An image job this process is running: how to stop it, the lease epoch it holds (a cancel request makes the
/// runner claim the job again, which moves the epoch), and its newest preview.
#[derive(Debug)]
struct LocalRun {
    cancel: CancellationToken,
    epoch: Arc<AtomicI64>,
    /// (sequence number, preview): event streams send a preview once per number.
    preview: Option<(u64, Preview)>,
    /// Counts as work in flight for SIGTERM's drain, which lets the job finish (within `server.drain_timeout`)
    /// rather than abandon it to run again elsewhere.
    _drain: crate::http::drain::InFlight,
}

impl Jobs {
    /// Leases taken under `instance` (this process's row in the shared store), so that another instance can take
    /// them over as soon as this one's instance lease lapses rather than when each job lease does; a random name
    /// without one.
    pub fn owned_by(instance: Option<&str>) -> Self {
        let owner = match instance {
            Some(id) => id.to_owned(),
            None => format!("easel-{}-{:08x}", std::process::id(), rand::random::<u32>()),
        };
        Self { owner, ..Self::default() }
    }

    /// Keeps the admission slot a job took at submit on `backend` until the job ends.
    pub fn hold_slot(&self, job: &str, backend: &str, permit: Permit) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.insert(job.to_owned(), (backend.to_owned(), permit));
        m::jobs_running(backend, slots.values().filter(|(b, _)| b == backend).count());
    }

    fn holds_slot(&self, job: &str) -> bool {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).contains_key(job)
    }

    fn free_slot(&self, job: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((backend, permit)) = slots.remove(job) {
            drop(permit);
            m::jobs_running(&backend, slots.values().filter(|(b, _)| *b == backend).count());
        }
    }

    /// This process's name as a lease owner.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Frees every slot running jobs hold (the process is stopping; the jobs go on elsewhere).
    pub fn free_all_slots(&self) {
        let all: Vec<String> = self.slots.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        for job in all {
            self.free_slot(&job);
        }
    }

    /// Jobs holding a slot, per backend (for `/v1/gateway/status`).
    pub fn running(&self) -> HashMap<String, usize> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut by = HashMap::new();
        for (backend, _) in slots.values() {
            *by.entry(backend.clone()).or_insert(0) += 1;
        }
        by
    }

    /// Registers an image job this process starts running at `epoch`; `None` when it runs here already (then the
    /// run takes the new epoch, and a cancel request reaches it).
    fn start_local(
        &self,
        job: &JobRecord,
        drain: &Arc<crate::http::drain::Drain>,
    ) -> Option<(CancellationToken, Arc<AtomicI64>)> {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(run) = local.get(&job.id) {
            run.epoch.store(job.lease_epoch, Ordering::SeqCst);
            if job.cancel_requested {
                run.cancel.cancel();
            }
            return None;
        }
        let run = LocalRun {
            cancel: CancellationToken::new(),
            epoch: Arc::new(AtomicI64::new(job.lease_epoch)),
            preview: None,
            _drain: drain.enter(),
        };
        let handles = (run.cancel.clone(), run.epoch.clone());
        local.insert(job.id.clone(), run);
        Some(handles)
    }

    /// The image job stopped running here.
    pub(crate) fn end_local(&self, job: &str) {
        self.local.lock().unwrap_or_else(PoisonError::into_inner).remove(job);
    }

    /// Keeps `preview` as the newest of a job running here.
    pub(crate) fn set_preview(&self, job: &str, preview: Preview) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(run) = local.get_mut(job) {
            let seq = run.preview.as_ref().map_or(1, |(n, _)| n + 1);
            run.preview = Some((seq, preview));
        }
        drop(local);
        self.changed();
    }

    /// The newest preview of a job running here, if it is newer than `after`.
    pub fn preview_after(&self, job: &str, after: u64) -> Option<(u64, Preview)> {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.get(job).and_then(|r| r.preview.clone()).filter(|(n, _)| *n > after)
    }

    /// Makes the runner look for due jobs now.
    pub fn wake(&self) {
        self.bell.notify_one();
    }

    /// Tells event streams that a job changed.
    pub fn changed(&self) {
        self.changed.notify_waiters();
    }

    /// Waits for the next change to any job, at most `within` (a change made by another instance is seen then).
    pub async fn next_change(&self, within: Duration) {
        let _ = tokio::time::timeout(within, self.changed.notified()).await;
    }
}

/// Runs until `stop`: claim due jobs, advance each, with the runtime current at each round (a reload's new
/// backends and models apply from the next round).
pub async fn run(live: crate::reload::Live, stop: CancellationToken) {
    loop {
        let state = live.current();
        // A draining instance claims nothing more: what it holds is handed back when it stops.
        let claimed = if state.drain.is_draining() {
            Ok(Vec::new())
        } else {
            state.ledger.claim_jobs(&state.jobs.owner, LEASE, BATCH).await
        };
        match claimed {
            Ok(jobs) => {
                let rounds = jobs.into_iter().map(|job| {
                    // Every call for a job carries the request id it was created under (or the job's id).
                    let id = job.request["request_id"].as_str().unwrap_or(&job.id).to_owned();
                    crate::telemetry::context::RequestContext::new(Some(&id), None).scope(advance(&state, job))
                });
                futures_util::future::join_all(rounds).await;
            }
            Err(e) => tracing::error!(error = %e, "Claiming due jobs failed."),
        }
        tokio::select! {
            () = stop.cancelled() => {
                state.jobs.stopping.cancel();
                return;
            }
            () = state.jobs.bell.notified() => {}
            () = tokio::time::sleep(IDLE) => {}
        }
    }
}

/// One step of one job this instance holds at `job.lease_epoch`.
async fn advance(state: &AppState, job: JobRecord) {
    let id = job.id.clone();
    let epoch = job.lease_epoch;
    if job.object == "job" {
        // An image job runs inside easel, in its own task (the runner goes on polling the others).
        if let Some((cancel, epoch)) = state.jobs.start_local(&job, &state.drain) {
            let work = crate::pipeline::image_jobs::run(state.clone(), job, cancel, epoch);
            state.tasks.spawn(crate::telemetry::context::propagate(work));
        }
        return;
    }
    let end = |state_: &'static str, code: JobErrorCode, message: String| JobEnd::Failed {
        state: state_,
        code: code.as_str(),
        message,
    };
    // A job whose submit was never confirmed: easel stopped in between, or the backend may have received it
    // without a usable answer (`unknown`).
    if matches!(job.state.as_str(), "pending" | "submitting" | "unknown") {
        reconcile(state, &job).await;
        return;
    }
    let backend = job.backend.as_deref().and_then(|b| state.backends.get(b)).cloned();
    let name = job.backend.as_deref().unwrap_or("?");
    let (Some(backend), Some(handle)) = (backend, crate::pipeline::videos::handle_of(&job)) else {
        let why = format!("backend `{name}` that took this job is no longer in the configuration");
        finish(state, &job, end("failed", JobErrorCode::BackendRemoved, why)).await;
        return;
    };
    if !backend.adapter.supports_videos() {
        // Same name, another kind (the configuration changed): it cannot know this job.
        let why = format!("backend `{name}` is now kind `{}`, which runs no jobs", backend.cfg.kind);
        finish(state, &job, end("failed", JobErrorCode::BackendRemoved, why)).await;
        return;
    }
    let adapter = &backend.adapter;
    // A job resumed after a restart runs upstream without the slot it took at submit: count it again as soon as
    // one is free (it never waits for one — the backend is busy with it either way).
    if !state.jobs.holds_slot(&id)
        && let Some(permit) = backend.gate(crate::config::Capability::Videos).and_then(|g| g.try_admit())
    {
        state.jobs.hold_slot(&id, &backend.cfg.name, permit);
    }
    if job.cancel_requested || crate::ledger::now_ms() > job.deadline_at {
        // Cancel upstream first; a job that finished meanwhile is still delivered.
        if let Err(e) = adapter.cancel_job(&handle).await {
            tracing::warn!(job = %id, error = %e, "Cancelling a job upstream failed.");
        }
        let finished = matches!(adapter.poll_job(&handle).await, Ok(p) if p.state == JobState::Succeeded);
        if !finished {
            let e = if job.cancel_requested {
                end("canceled", JobErrorCode::Canceled, "canceled by its owner".into())
            } else {
                end("failed", JobErrorCode::Timeout, "the job did not finish within the model's `job_timeout`".into())
            };
            finish(state, &job, e).await;
            return;
        }
    }
    let every = backend.cfg.poll_interval.as_millis() as i64;
    let poll = tokio::time::timeout(backend.cfg.timeout, adapter.poll_job(&handle)).await;
    m::job_poll(&backend.cfg.name, matches!(poll, Ok(Ok(_))));
    let poll = match poll {
        Ok(Ok(p)) => p,
        Ok(Err(_)) | Err(_) if job.poll_failures + 1 >= MAX_POLL_FAILURES => {
            let why = format!("the backend did not answer {MAX_POLL_FAILURES} polls in a row");
            finish(state, &job, end("failed", JobErrorCode::UpstreamLost, why)).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(job = %id, error = %e, "Polling a job failed; trying again later.");
            let backoff = every * (1 << job.poll_failures.clamp(0, 6));
            let change = JobChange {
                poll_failed: Some(true),
                next_poll_at: Some(crate::ledger::now_ms() + backoff),
                ..JobChange::default()
            };
            update(state, &id, epoch, &change).await;
            return;
        }
        Err(_) => {
            let change = JobChange {
                poll_failed: Some(true),
                next_poll_at: Some(crate::ledger::now_ms() + every),
                ..JobChange::default()
            };
            update(state, &id, epoch, &change).await;
            return;
        }
    };
    for line in &poll.logs {
        tracing::debug!(job = %id, backend = %backend.cfg.name, message = %line, "Job log.");
    }
    let next = Some(crate::ledger::now_ms() + every);
    match poll.state {
        JobState::Queued { position } => {
            let change = JobChange {
                state: Some("queued"),
                queue_position: Some(position.map(i64::from)),
                next_poll_at: next,
                poll_failed: Some(false),
                ..JobChange::default()
            };
            update(state, &id, epoch, &change).await;
        }
        JobState::Running { progress } => {
            let change = JobChange {
                state: Some("running"),
                progress: progress.map(|p| (p * 100.0).floor() as i64),
                queue_position: Some(None),
                next_poll_at: next,
                poll_failed: Some(false),
                ..JobChange::default()
            };
            update(state, &id, epoch, &change).await;
        }
        JobState::Succeeded => {
            update(state, &id, epoch, &JobChange { state: Some("finalizing"), ..JobChange::default() }).await;
            match collect(state, adapter, &handle).await {
                Ok(outputs) => {
                    // Everything held is captured: the clip, or its seconds (fixed at submit).
                    finish(state, &job, JobEnd::Succeeded { units: i64::MAX, outputs }).await;
                }
                Err(message) => {
                    finish(state, &job, end("failed", JobErrorCode::UpstreamFailed, message)).await;
                }
            }
        }
        JobState::Failed { code, message } => finish(state, &job, end("failed", code, message)).await,
        JobState::Lost => {
            let why = "the backend no longer knows this job".to_owned();
            finish(state, &job, end("failed", JobErrorCode::UpstreamLost, why)).await;
        }
    }
}

/// Settles a job whose submit was never confirmed. A backend that knows the id easel chose (ComfyUI, InvokeAI)
/// is asked: found → the job polls there; absent → it never ran, and nothing is charged. A backend that cannot
/// tell (fal, Replicate) leaves the job `unknown` until its webhook binds it (`hooks`) or the job's deadline
/// passes; then the hold is released (the operator may absorb one upstream charge; counted in
/// `easel_jobs_ended_total{outcome="upstream_lost"}`). A cancel ends it at once, uncharged.
async fn reconcile(state: &AppState, job: &JobRecord) {
    let end = |code: JobErrorCode, message: String| JobEnd::Failed {
        state: if code == JobErrorCode::Canceled { "canceled" } else { "failed" },
        code: code.as_str(),
        message,
    };
    if job.cancel_requested {
        let why = "canceled by its owner before the backend confirmed the submit; nothing was charged".to_owned();
        finish(state, job, end(JobErrorCode::Canceled, why)).await;
        return;
    }
    if job.state == "pending" {
        // Never handed to a backend (`submitting` is written before any backend is called).
        let why = "easel stopped before submitting the job to a backend; nothing was charged".to_owned();
        finish(state, job, end(JobErrorCode::UpstreamLost, why)).await;
        return;
    }
    if crate::ledger::now_ms() > job.deadline_at {
        let why =
            "the backend never confirmed the submit nor reported the job before its deadline; nothing was charged";
        finish(state, job, end(JobErrorCode::UpstreamLost, why.to_owned())).await;
        return;
    }
    let why = match adopt(state, job).await {
        Adopted::Yes => return,
        Adopted::Later if job.poll_failures + 1 < MAX_POLL_FAILURES => {
            let backoff = 1000 * (1 << job.poll_failures.clamp(0, 6));
            let change = JobChange {
                poll_failed: Some(true),
                next_poll_at: Some(crate::ledger::now_ms() + backoff),
                ..JobChange::default()
            };
            update(state, &job.id, job.lease_epoch, &change).await;
            return;
        }
        Adopted::Later => format!(
            "the backend never confirmed the submit, and did not answer {MAX_POLL_FAILURES} look-ups; nothing was charged"
        ),
        Adopted::Absent(names) => {
            format!("the backend never confirmed the submit, and {names} never received it; nothing was charged")
        }
        Adopted::CannotTell => {
            // Only the backend's own report can bind it now; look again at the deadline.
            let change = JobChange {
                state: Some("unknown"),
                next_poll_at: Some(job.deadline_at + 1),
                poll_failed: Some(false),
                ..JobChange::default()
            };
            update(state, &job.id, job.lease_epoch, &change).await;
            if job.state != "unknown" {
                m::job_unknown(&job.model);
            }
            return;
        }
    };
    finish(state, job, end(JobErrorCode::UpstreamLost, why)).await;
}

/// Downloads a finished job's outputs into easel's store; `[{"kind", "file", "mime"}]`.
async fn collect(
    state: &AppState,
    adapter: &crate::backends::AnyBackend,
    handle: &crate::backends::JobHandle,
) -> Result<serde_json::Value, String> {
    let outputs = adapter.fetch_outputs(handle).await.map_err(|e| e.to_string())?;
    if !outputs.iter().any(|o| o.kind == OutputKind::Video || o.kind == OutputKind::Image) {
        return Err("the backend reported success but returned no video".into());
    }
    let mut stored = Vec::with_capacity(outputs.len());
    for o in outputs {
        let file = state.files.put_media(&o.bytes, o.mime).await.map_err(|e| e.to_string())?;
        let kind = match o.kind {
            OutputKind::Video => "video",
            OutputKind::Thumbnail => "thumbnail",
            OutputKind::Image => "image",
        };
        stored.push(serde_json::json!({"kind": kind, "file": file, "mime": o.mime, "bytes": o.bytes.len()}));
    }
    Ok(serde_json::Value::Array(stored))
}

async fn update(state: &AppState, id: &str, epoch: i64, change: &JobChange) {
    match state.ledger.update_job(id, epoch, change).await {
        Ok(true) => state.jobs.changed(),
        Ok(false) => tracing::debug!(job = %id, "Another poller holds this job now."),
        Err(e) => tracing::error!(job = %id, error = %e, "Updating a job failed."),
    }
}

async fn finish(state: &AppState, job: &JobRecord, end: JobEnd) {
    end_at(state, job, job.lease_epoch, end).await;
}

/// Ends `job` at lease `epoch`: the terminal state and the hold's capture or release commit together. `false`
/// when this poller did not end it (already ended, fenced out by another poller, or the write failed).
pub(crate) async fn end_at(state: &AppState, job: &JobRecord, epoch: i64, end: JobEnd) -> bool {
    let id = job.id.as_str();
    match state.ledger.end_job(id, epoch, &end).await {
        Ok(true) => {
            state.jobs.free_slot(id);
            state.jobs.changed();
            m::job_ended(
                &job.model,
                match &end {
                    JobEnd::Succeeded { .. } => "completed",
                    JobEnd::Failed { code, .. } => code,
                },
            );
            match &end {
                JobEnd::Succeeded { .. } => tracing::info!(job = %id, "Job completed."),
                JobEnd::Failed { code, message, .. } => {
                    tracing::info!(job = %id, code, message, "Job ended without output.")
                }
            }
            true
        }
        Ok(false) => {
            tracing::debug!(job = %id, "The job had already ended, or another poller holds it.");
            false
        }
        // The job stays claimed until its lease lapses; the next round ends it.
        Err(e) => {
            tracing::error!(job = %id, error = %e, "Ending a job failed.");
            false
        }
    }
}

/// What asking the model's backends about an unconfirmed submit found.
enum Adopted {
    /// One has it: the job now polls there.
    Yes,
    /// The named backends answered that they have no such job.
    Absent(String),
    /// No backend could tell.
    CannotTell,
    /// A backend that could tell did not answer: ask again later.
    Later,
}

/// Asks each video backend of the job's model whether it has the job easel submitted as `job.id`; records the
/// first one that does (backend, handle, state `queued`) so the next round polls it.
async fn adopt(state: &AppState, job: &JobRecord) -> Adopted {
    let Some(model) = state.config.models.iter().find(|m| m.id == job.model) else { return Adopted::CannotTell };
    let (mut absent, mut unanswered, mut cannot_tell) = (Vec::new(), false, false);
    // A job that names its backend was submitted there only (no fallback after an ambiguous submit).
    let asked = model.backends.iter().filter(|b| job.backend.as_deref().is_none_or(|named| named == b.name));
    for b in asked {
        let Some(backend) = state.backends.get(&b.name).filter(|h| h.adapter.supports_videos()) else { continue };
        let found = tokio::time::timeout(backend.cfg.timeout, backend.adapter.find_job(&job.id)).await;
        match found {
            Ok(Ok(crate::backends::JobLookup::Found(handle))) => {
                tracing::info!(job = %job.id, backend = %b.name, upstream = %handle.upstream_id, "Adopted a job whose submit was never confirmed.");
                let change = JobChange {
                    state: Some("queued"),
                    backend: Some(b.name.clone()),
                    handle: serde_json::to_value(&handle).ok(),
                    next_poll_at: Some(crate::ledger::now_ms()),
                    poll_failed: Some(false),
                    ..JobChange::default()
                };
                update(state, &job.id, job.lease_epoch, &change).await;
                state.jobs.wake();
                return Adopted::Yes;
            }
            Ok(Ok(crate::backends::JobLookup::Absent)) => absent.push(format!("`{}`", b.name)),
            Ok(Ok(crate::backends::JobLookup::CannotTell)) => cannot_tell = true,
            Ok(Err(e)) => {
                unanswered = true;
                tracing::warn!(job = %job.id, backend = %b.name, error = %e, "Looking up an unconfirmed job failed.");
            }
            Err(_) => {
                unanswered = true;
                tracing::warn!(job = %job.id, backend = %b.name, "Looking up an unconfirmed job timed out.");
            }
        }
    }
    if unanswered {
        Adopted::Later
    } else if cannot_tell || absent.is_empty() {
        Adopted::CannotTell
    } else {
        Adopted::Absent(format!("backend {}", absent.join(", ")))
    }
}
