//! Every metric easel exports, by name, with its labels, in one place. Labels are bounded: route templates,
//! configured backend and model names, outcome enums. Never API keys or user-supplied strings.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::Capability;

pub const HTTP_REQUESTS: &str = "easel_http_requests_total";
pub const HTTP_DURATION: &str = "easel_http_request_duration_seconds";
pub const HTTP_BYTES_IN: &str = "easel_http_request_bytes_total";
pub const HTTP_BYTES_OUT: &str = "easel_http_response_bytes_total";
pub const GENERATIONS: &str = "easel_generation_requests_total";
pub const IMAGES: &str = "easel_images_generated_total";
pub const IMAGES_MISSING: &str = "easel_images_missing_total";
pub const JOBS_ENDED: &str = "easel_jobs_ended_total";
pub const JOBS_UNKNOWN: &str = "easel_jobs_unknown_total";
pub const JOB_HOOKS: &str = "easel_job_webhooks_received_total";
pub const JOB_POLLS: &str = "easel_job_polls_total";
pub const JOBS_RUNNING: &str = "easel_jobs_running";
pub const JOBS: &str = "easel_jobs";
pub const JOB_OLDEST: &str = "easel_job_oldest_age_seconds";
pub const UPSTREAM_CALLS: &str = "easel_backend_requests_total";
pub const UPSTREAM_DURATION: &str = "easel_backend_request_duration_seconds";
pub const FALLBACKS: &str = "easel_backend_fallbacks_total";
pub const BACKEND_HEALTHY: &str = "easel_backend_healthy";
pub const BACKEND_CIRCUIT_OPEN: &str = "easel_backend_circuit_open";
pub const JOB_PROGRESS: &str = "easel_backend_job_progress_ratio";
pub const PROGRESS_EVENTS: &str = "easel_backend_progress_events_total";
pub const LEDGER_DRIFT: &str = "easel_ledger_drift";
pub const ADMISSION_INFLIGHT: &str = "easel_admission_inflight";
pub const ADMISSION_QUEUED: &str = "easel_admission_queue_depth";
pub const ADMISSION_QUEUE_WAIT: &str = "easel_admission_queue_wait_seconds";
pub const ADMISSION_REJECTED: &str = "easel_admission_rejected_total";
pub const WORKING_SET_ACTIVE: &str = "easel_working_set_active";
pub const SWAPS: &str = "easel_swaps_total";
pub const BUILD_INFO: &str = "easel_build_info";
pub const SWAP_PHASE: &str = "easel_swap_phase_seconds";
pub const SWAP_QUEUE: &str = "easel_swap_queue_depth";

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle `/metrics` renders.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "profile" => PROFILE).set(1.0);
                    handle
                }
                // Another recorder is installed (embedding application): render an empty, private one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// The build profile, for `easel_build_info`.
const PROFILE: &str = if cfg!(debug_assertions) { "debug" } else { "release" };

/// HELP text (and unit) for every family, so each one renders with `# HELP` and `# TYPE`.
fn describe() {
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route template, method and status.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time from request to the last response byte, by route.");
    describe_counter!(HTTP_BYTES_IN, Unit::Bytes, "Request body bytes declared by clients (Content-Length), by route.");
    describe_counter!(HTTP_BYTES_OUT, Unit::Bytes, "Response body bytes sent to clients, by route.");
    describe_counter!(GENERATIONS, "Generation requests by model and outcome.");
    describe_counter!(IMAGES, "Images returned to clients, by model.");
    describe_counter!(IMAGES_MISSING, "Images asked for but missing from a partial answer, by model.");
    describe_counter!(JOBS_ENDED, "Jobs that reached a terminal state, by model and outcome.");
    describe_counter!(
        JOBS_UNKNOWN,
        "Jobs whose submit may have reached the backend without an answer (state unknown), by model."
    );
    describe_counter!(JOB_HOOKS, "Inbound backend webhooks, by backend and outcome.");
    describe_counter!(JOB_POLLS, "Upstream job status polls, by backend and outcome.");
    describe_gauge!(JOBS_RUNNING, "Jobs holding a backend slot right now, by backend.");
    describe_gauge!(JOBS, "Unfinished jobs by object and state.");
    describe_gauge!(JOB_OLDEST, Unit::Seconds, "Age of the oldest unfinished job, by object.");
    describe_counter!(UPSTREAM_CALLS, "Calls to backends, by backend, kind and outcome.");
    describe_histogram!(UPSTREAM_DURATION, Unit::Seconds, "Duration of backend calls, by backend.");
    describe_counter!(FALLBACKS, "Requests moved to the next backend, by the backend left and why.");
    describe_gauge!(BACKEND_HEALTHY, "1 when the backend's health probes pass, else 0.");
    describe_gauge!(BACKEND_CIRCUIT_OPEN, "1 while the backend's circuit breaker is open, else 0.");
    describe_gauge!(JOB_PROGRESS, "Progress of the backend's current job, 0 to 1.");
    describe_counter!(PROGRESS_EVENTS, "Progress events received from backends.");
    describe_gauge!(LEDGER_DRIFT, "Broken ledger invariants found by the last check (should be 0).");
    describe_gauge!(ADMISSION_INFLIGHT, "Requests holding an admission slot, by backend and capability.");
    describe_gauge!(ADMISSION_QUEUED, "Requests waiting for an admission slot, by backend and capability.");
    describe_histogram!(ADMISSION_QUEUE_WAIT, Unit::Seconds, "Time spent waiting for an admission slot.");
    describe_counter!(ADMISSION_REJECTED, "Requests refused admission, by backend, capability and reason.");
    describe_gauge!(WORKING_SET_ACTIVE, "1 for the working set a host has active, 0 for its others.");
    describe_counter!(SWAPS, "Working-set swaps that ended, by outcome.");
    describe_histogram!(
        SWAP_PHASE,
        Unit::Seconds,
        "Time a host spent in one phase of a working-set swap (draining, stopping, starting), by host and phase."
    );
    describe_gauge!(SWAP_QUEUE, "Requests waiting on a host for a working-set swap, by host.");
    describe_gauge!(BUILD_INFO, "Always 1; the labels say which easel build is running.");
}

/// One HTTP exchange. Labels are `'static` (route templates, method names), and the handles are registered once
/// per route, method and status, so recording allocates nothing and hashes no key into the registry.
pub fn http_request(
    route: &'static str,
    method: &'static str,
    status: u16,
    took: Duration,
    bytes_in: u64,
    bytes_out: u64,
) {
    let key = (route, method, status_label(status));
    let record = |h: &HttpHandles| {
        h.requests.increment(1);
        h.duration.record(took.as_secs_f64());
        if bytes_in > 0 {
            h.bytes_in.increment(bytes_in);
        }
        h.bytes_out.increment(bytes_out);
    };
    if HANDLE.get().is_none() {
        return record(&HttpHandles::new(key));
    }
    if let Some(h) = HTTP_HANDLES.read().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return record(h);
    }
    let mut handles = HTTP_HANDLES.write().unwrap_or_else(PoisonError::into_inner);
    record(handles.entry(key).or_insert_with(|| HttpHandles::new(key)));
}

/// The HTTP metrics of one route, method and status (the last three per route only).
struct HttpHandles {
    requests: Counter,
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl HttpHandles {
    fn new((route, method, status): (&'static str, &'static str, &'static str)) -> Self {
        Self {
            requests: counter!(HTTP_REQUESTS, "route" => route, "method" => method, "status" => status),
            duration: histogram!(HTTP_DURATION, "route" => route),
            bytes_in: counter!(HTTP_BYTES_IN, "route" => route),
            bytes_out: counter!(HTTP_BYTES_OUT, "route" => route),
        }
    }
}

/// Route templates, methods and statuses are all fixed sets, so this map stays small.
type HttpKey = (&'static str, &'static str, &'static str);
static HTTP_HANDLES: LazyLock<RwLock<HashMap<HttpKey, HttpHandles>>> = LazyLock::new(Default::default);

/// Status codes as static labels (the ones easel answers), without formatting a string per request.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        400 => "400",
        401 => "401",
        402 => "402",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

/// Method names as static labels.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Handles of one metric by configured name (a model's or a backend's id), then by its static labels.
type Handles<T> = LazyLock<RwLock<HashMap<Box<str>, HashMap<(&'static str, &'static str), T>>>>;

/// The handle of a metric for `name` and `tags`, registered on first use and then reused: recording on the
/// request path neither allocates a label nor hashes a whole key into the registry. Names come from the
/// configuration, so the maps stay as small as it. Before the recorder is installed nothing is kept (a handle
/// made then would record nowhere forever).
fn cached<T: Clone>(
    handles: &Handles<T>,
    name: &str,
    tags: (&'static str, &'static str),
    make: impl FnOnce(String) -> T,
) -> T {
    if HANDLE.get().is_none() {
        return make(name.to_owned());
    }
    if let Some(h) = handles.read().unwrap_or_else(PoisonError::into_inner).get(name).and_then(|m| m.get(&tags)) {
        return h.clone();
    }
    let mut map = handles.write().unwrap_or_else(PoisonError::into_inner);
    map.entry(name.into()).or_default().entry(tags).or_insert_with(|| make(name.to_owned())).clone()
}

static GENERATION_COUNTERS: Handles<Counter> = LazyLock::new(Default::default);
static IMAGE_COUNTERS: Handles<Counter> = LazyLock::new(Default::default);
static UPSTREAM_COUNTERS: Handles<Counter> = LazyLock::new(Default::default);
static UPSTREAM_HISTOGRAMS: Handles<Histogram> = LazyLock::new(Default::default);
static INFLIGHT_GAUGES: Handles<Gauge> = LazyLock::new(Default::default);

pub fn generation(model: &str, outcome: &'static str, images: u64) {
    cached(&GENERATION_COUNTERS, model, (outcome, ""), |m| counter!(GENERATIONS, "model" => m, "outcome" => outcome))
        .increment(1);
    if images > 0 {
        cached(&IMAGE_COUNTERS, model, ("", ""), |m| counter!(IMAGES, "model" => m)).increment(images);
    }
}

/// A job reached a terminal state: `completed`, or its error code (`upstream_failed`, `timeout`, `upstream_lost`, ...).
pub fn job_ended(model: &str, outcome: &str) {
    let outcome: &'static str = match outcome {
        "completed" => "completed",
        "upstream_failed" => "upstream_failed",
        "upstream_rejected" => "upstream_rejected",
        "timeout" => "timeout",
        "upstream_lost" => "upstream_lost",
        "backend_removed" => "backend_removed",
        "canceled" => "canceled",
        _ => "other",
    };
    counter!(JOBS_ENDED, "model" => model.to_owned(), "outcome" => outcome).increment(1);
}

/// A job's submit ended without a usable answer, so whether the backend has it is unknown.
pub fn job_unknown(model: &str) {
    counter!(JOBS_UNKNOWN, "model" => model.to_owned()).increment(1);
}

/// An inbound webhook: `adopted` (bound an unknown job), `polled` (made a job due), `ended` (the job had ended),
/// `refused` (bad signature or body).
pub fn job_hook(backend: &str, outcome: &'static str) {
    counter!(JOB_HOOKS, "backend" => backend.to_owned(), "outcome" => outcome).increment(1);
}

/// One poll of a job upstream: `ok` or `error`.
pub fn job_poll(backend: &str, ok: bool) {
    counter!(JOB_POLLS, "backend" => backend.to_owned(), "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

/// Jobs holding a slot on a backend right now.
pub fn jobs_running(backend: &str, n: usize) {
    gauge!(JOBS_RUNNING, "backend" => backend.to_owned()).set(n as f64);
}

/// Unfinished jobs by object and state, and the age of the oldest per object, from the ledger (set at every
/// scrape; states with no job read 0).
pub fn job_stats(stats: &[crate::ledger::JobStat], now_ms: i64) {
    const OBJECTS: [&str; 2] = ["video", "job"];
    const STATES: [&str; 6] = ["pending", "submitting", "queued", "running", "finalizing", "unknown"];
    for object in OBJECTS {
        for state in STATES {
            let n = stats.iter().find(|s| s.object == object && s.state == state).map_or(0, |s| s.count);
            gauge!(JOBS, "object" => object, "state" => state).set(n as f64);
        }
        let oldest = stats.iter().filter(|s| s.object == object).map(|s| s.oldest_created_at).min();
        let age = oldest.map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
        gauge!(JOB_OLDEST, "object" => object).set(age);
    }
}

/// Images a request asked for that its answer lacks (a partial result: some upstream calls failed).
pub fn images_missing(model: &str, missing: u64) {
    counter!(IMAGES_MISSING, "model" => model.to_owned()).increment(missing);
}

pub fn upstream_call(backend: &str, kind: &'static str, outcome: &'static str, took: Duration) {
    cached(
        &UPSTREAM_COUNTERS,
        backend,
        (kind, outcome),
        |b| counter!(UPSTREAM_CALLS, "backend" => b, "kind" => kind, "outcome" => outcome),
    )
    .increment(1);
    cached(&UPSTREAM_HISTOGRAMS, backend, ("", ""), |b| histogram!(UPSTREAM_DURATION, "backend" => b))
        .record(took.as_secs_f64());
}

pub fn fallback(from: &str, reason: &'static str) {
    counter!(FALLBACKS, "backend" => from.to_owned(), "reason" => reason).increment(1);
}

pub fn backend_health(backend: &str, healthy: bool) {
    gauge!(BACKEND_HEALTHY, "backend" => backend.to_owned()).set(if healthy { 1.0 } else { 0.0 });
}

pub fn circuit(backend: &str, open: bool) {
    gauge!(BACKEND_CIRCUIT_OPEN, "backend" => backend.to_owned()).set(if open { 1.0 } else { 0.0 });
}

pub fn admission_inflight(backend: &str, capability: Capability, n: u32) {
    let cap = capability.as_str();
    cached(&INFLIGHT_GAUGES, backend, (cap, ""), |b| gauge!(ADMISSION_INFLIGHT, "backend" => b, "capability" => cap))
        .set(f64::from(n));
}

pub fn admission_queued(backend: &str, capability: Capability, n: u32) {
    gauge!(ADMISSION_QUEUED, "backend" => backend.to_owned(), "capability" => capability.as_str()).set(f64::from(n));
}

pub fn admission_queue_wait(backend: &str, capability: Capability, waited: Duration) {
    histogram!(ADMISSION_QUEUE_WAIT, "backend" => backend.to_owned(), "capability" => capability.as_str())
        .record(waited.as_secs_f64());
}

pub fn admission_rejected(backend: &str, capability: Capability, reason: &'static str) {
    counter!(ADMISSION_REJECTED, "backend" => backend.to_owned(), "capability" => capability.as_str(), "reason" => reason).increment(1);
}

/// Progress reported by a backend for its current job (ComfyUI/InvokeAI steps, fal logs): 0.0–1.0.
pub fn job_progress(backend: &str, done: f64, total: f64) {
    if total > 0.0 {
        gauge!(JOB_PROGRESS, "backend" => backend.to_owned()).set((done / total).clamp(0.0, 1.0));
    }
    counter!(PROGRESS_EVENTS, "backend" => backend.to_owned()).increment(1);
}

/// Broken ledger invariants found by the last check; must be 0.
pub fn ledger_drift(problems: usize) {
    gauge!(LEDGER_DRIFT).set(problems as f64);
}

/// 1 for the working set a host has active, 0 for its others.
pub fn working_set_active(host: &str, set: &str, active: bool) {
    gauge!(WORKING_SET_ACTIVE, "host" => host.to_owned(), "set" => set.to_owned()).set(if active { 1.0 } else { 0.0 });
}

/// A host left a swap phase (`draining`, `stopping` or `starting`) after `took`.
pub fn swap_phase(host: &str, phase: &'static str, took: Duration) {
    histogram!(SWAP_PHASE, "host" => host.to_owned(), "phase" => phase).record(took.as_secs_f64());
}

/// Requests waiting on `host` for a swap.
pub fn swap_queue_depth(host: &str, depth: usize) {
    gauge!(SWAP_QUEUE, "host" => host.to_owned()).set(depth as f64);
}

/// A swap (or first activation) ended: `ok`, `failed` or `aborted`.
pub fn swap(outcome: &'static str) {
    counter!(SWAPS, "outcome" => outcome).increment(1);
}
