//! `Raw*` types: the configuration exactly as users write it. Every struct rejects unknown keys; nothing here
//! is checked beyond its YAML type (that is `validate.rs`'s job).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub backends: BTreeMap<String, RawBackend>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub jobs: RawJobs,
    /// GPU hosts: each runs at most one working set at a time.
    #[serde(default)]
    pub hosts: BTreeMap<String, RawHost>,
    /// Extra inbound routes for legacy image APIs.
    #[serde(default)]
    pub routes: Vec<super::routes::RawRoute>,
    /// Named groups of managed backends that run together on one host.
    #[serde(default)]
    pub working_sets: BTreeMap<String, RawWorkingSet>,
    /// Several instances sharing one Redis for fleet-wide admission and per-key limits.
    #[serde(default)]
    pub cluster: RawCluster,
}

/// `cluster`: what instances of one fleet share.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `redis://[user:password@]host:port[/db]`; absent = every limit is per process.
    pub redis: Option<String>,
    /// How long a permit held by a dead instance stays taken, e.g. `10s`.
    pub lease: Option<String>,
    /// When Redis cannot be reached: `closed` (503) or `local` (per-instance limits).
    pub fallback: Option<String>,
    /// `fallback: local`: instances in the fleet; each takes `ceil(concurrency / fleet_size)`.
    pub fleet_size: Option<u32>,
}

/// `hosts.<name>`: one GPU (or GPU group) that runs at most one working set.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    /// `auto` (a request for an inactive set may swap) or `manual` (409).
    pub mode: Option<String>,
    /// Activated at startup; absent = idle until asked.
    pub default_set: Option<String>,
    pub patience: Option<String>,
    pub max_wait: Option<String>,
    pub queue_depth: Option<u32>,
    pub drain_timeout: Option<String>,
    pub idle_ttl: Option<String>,
    pub failure_cooldown: Option<String>,
    /// SSE comment interval for a stream waiting for a swap.
    pub keepalive: Option<String>,
}

/// `working_sets.<name>`: `{host, backends}`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkingSet {
    pub host: Option<String>,
    #[serde(default)]
    pub backends: Vec<String>,
}

/// Settings of durable jobs as a whole.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobs {
    #[serde(default)]
    pub webhooks: RawWebhooks,
}

/// Client webhooks (`webhook_url` on a job).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    /// Signing key (Standard Webhooks, HMAC-SHA256); absent = generated once into `<files>/.webhook-secret`.
    pub secret: Option<String>,
    /// Accept loopback, link-local and private addresses as targets (default false).
    pub allow_private: Option<bool>,
    /// The first retry's delay; each later one is longer, e.g. `5s`.
    pub backoff: Option<String>,
    /// Attempts before a delivery is given up.
    pub max_attempts: Option<u32>,
    /// How long one attempt may take, e.g. `10s`.
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// `host:port` to listen on.
    pub listen: Option<String>,
    /// Base of the URLs easel hands out for stored outputs.
    pub public_url: Option<String>,
    /// Largest request body accepted on image routes, e.g. `64MiB`.
    pub max_body: Option<String>,
    /// How long in-flight requests and streams get to finish after SIGTERM/SIGINT, e.g. `30s`.
    pub drain_timeout: Option<String>,
    /// The older name of `drain_timeout` (still accepted; setting both is an error).
    pub shutdown_grace: Option<String>,
    /// Most pixels (width × height) an image easel decodes may have, e.g. `50000000`.
    pub max_image_pixels: Option<u64>,
    /// Memory all image decodes together may use at once, e.g. `1GiB`; a decode waits for its share.
    pub decode_memory: Option<String>,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2) with this PEM certificate chain and key.
    pub tls: Option<RawTls>,
    /// Browser clients on other origins.
    pub cors: Option<RawCors>,
    /// Serve the web page at `/ui/` (default true).
    pub ui: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Origins allowed to call the API from a browser (`https://app.example.com`), or `["*"]`.
    pub allow_origins: Option<Vec<String>>,
    /// How long a browser may cache a preflight answer.
    pub max_age: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    /// Also listen here in plain HTTP, answering every request with a redirect to HTTPS.
    pub redirect_http: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub database: Option<String>,
    pub files: Option<String>,
    /// Key for signing output URLs (HMAC-SHA256); absent = generated once into `<files>/.url-signing-key`.
    pub signing_secret: Option<String>,
    /// How long a signed output URL works, e.g. `24h`.
    pub url_ttl: Option<String>,
    /// Delete stored outputs older than this, e.g. `30d`; absent = keep them.
    pub retention: Option<String>,
    /// The S3-compatible service behind `files: s3://bucket/prefix`.
    pub s3: Option<RawS3>,
}

/// `storage.s3`: where and how to reach an S3-compatible service (AWS, MinIO, R2, …).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key` (MinIO and most self-hosted servers).
    pub path_style: Option<bool>,
    /// Allow a plain-HTTP endpoint.
    pub allow_http: Option<bool>,
    /// Answer `GET /v1/files/{id}` with a redirect to a presigned URL instead of streaming the object.
    pub presign: Option<bool>,
    /// How long a presigned URL works, e.g. `15m`.
    pub presign_ttl: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub mode: Option<String>,
    /// `mode: static`: the one bearer token.
    pub token: Option<String>,
    /// Serve `/metrics` without a key (default true: scrapers rarely carry keys).
    pub public_metrics: Option<bool>,
    /// Limits every API key gets (`mode: keys`).
    pub key_limits: Option<RawKeyLimits>,
}

/// `auth.key_limits`: the default limits of every key.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyLimits {
    pub requests_per_minute: Option<u32>,
    pub max_parallel: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub response_format: Option<String>,
    pub size: Option<String>,
    pub n_max: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    /// Consecutive backend faults on live traffic that open a backend's circuit.
    pub circuit_failures: Option<u32>,
    /// How long an open circuit keeps traffic away before one trial request.
    pub circuit_cooldown: Option<String>,
}

/// One backend. The fields are flat: `validate.rs` checks that only the fields that make sense for `kind` are set.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub kind: Option<String>,
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub concurrency: Option<RawConcurrency>,
    pub queue: Option<RawQueue>,
    /// Extra headers sent on every upstream call.
    pub headers: Option<BTreeMap<String, String>>,
    /// Cap on one upstream response body (and on each downloaded output), e.g. `64MiB`.
    pub max_response: Option<String>,
    /// Most images one upstream call may produce (`openai` `n`, `a1111` `batch_size`).
    pub max_images_per_call: Option<u32>,
    /// Hosts (`host` or `host:port`, `*.suffix` for subdomains) besides the backend's own origin that output URLs
    /// it returns may be downloaded from.
    pub allow_output_hosts: Option<Vec<String>>,
    /// Overrides the kind's own health probe: `GET {url}{path}` must answer `expect_status`.
    pub health: Option<RawHealthCheck>,
    /// A managed server process easel starts, supervises and stops; absent = external (probed, never started).
    pub process: Option<RawProcess>,

    // --- comfyui, invokeai, fal, replicate ---
    /// How often job status is polled when progress events are not available.
    pub poll_interval: Option<String>,
    /// InvokeAI session queue id (default `default`).
    pub queue_id: Option<String>,

    // --- template ---
    pub method: Option<String>,
    pub path: Option<String>,
    pub body: Option<String>,
    pub content_type: Option<String>,
    pub response: Option<RawTemplateResponse>,

    // --- simulated ---
    pub latency: Option<String>,
    pub failure: Option<RawFailure>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// Path under the backend's root, e.g. `/healthz`.
    pub path: Option<String>,
    /// The status a healthy server answers (default 200).
    pub expect_status: Option<u16>,
}

/// `process:` on a backend.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcess {
    /// The argv list: binary first, then its arguments.
    pub cmd: Option<Vec<String>>,
    pub cwd: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    /// Longest the native probe may take to pass after spawning.
    pub ready_timeout: Option<String>,
    pub stop: Option<RawProcessStop>,
    pub restart: Option<RawProcessRestart>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessStop {
    /// `TERM` (default), `INT`, `HUP` or `QUIT`, sent to the whole process group.
    pub signal: Option<String>,
    /// Run instead of signalling (e.g. `[docker, stop, comfy]`); the group is still killed after `grace`.
    pub cmd: Option<Vec<String>>,
    pub grace: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessRestart {
    /// Restarts after unexpected exits before the backend is marked failed (0 = never restart).
    pub max: Option<u32>,
    /// The first delay; doubled per consecutive restart.
    pub backoff: Option<String>,
    /// Staying ready this long forgets earlier crashes.
    pub reset_after: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConcurrency {
    pub images: Option<u32>,
    pub videos: Option<u32>,
    pub text: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub depth: Option<u32>,
    pub wait: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTemplateResponse {
    /// JSON path (RFC 9535) selecting the images in a JSON response; absent = the body is the image.
    pub images: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFailure {
    /// `status` (answer with an error status) or `timeout` (never answer).
    pub mode: Option<String>,
    pub status: Option<u16>,
    pub message: Option<String>,
    /// Fail every Nth call (1 = every call).
    pub every: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub id: Option<String>,
    /// Other ids clients may use for this model (`gpt-image-1`, `dall-e-3`).
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub backends: Vec<RawModelBackend>,
    pub upstream_model: Option<String>,
    pub workflow: Option<String>,
    /// A number (per image, or per request on a text model) or, on a text model, `{per_request}` or
    /// `{input_per_1k, output_per_1k}`.
    pub credits: Option<RawCredits>,
    /// Text models: the completion tokens a request is assumed to ask for when it sets no `max_tokens` (the
    /// credit hold's estimate).
    pub max_output_tokens: Option<u32>,
    pub working_set: Option<String>,
    pub description: Option<String>,
    /// Sizes the model accepts (`WxH`); absent = any size within `max_size`.
    pub sizes: Option<Vec<String>>,
    pub default_size: Option<String>,
    pub max_size: Option<String>,
    pub max_n: Option<u32>,
    /// Images one upstream call may make for this model, on every backend that sets none for it (default: each
    /// backend's own `max_images_per_call`).
    pub max_images_per_call: Option<u32>,
    pub max_prompt_chars: Option<u32>,
    /// Defaults for easel's extension fields when the request leaves them out.
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub negative_prompt: Option<String>,
    /// The prompt `/v1/images/variations` edits with (absent = a neutral default).
    pub variation_prompt: Option<String>,
    /// Video models: price per second of video instead of per clip (`credits`).
    pub credits_per_second: Option<f64>,
    /// Jobs (videos): how long one may take before easel cancels it upstream and refunds it, e.g. `30m`.
    pub job_timeout: Option<String>,
    /// `huggingface` backends: the task edits of this model run as (`image-to-image` or `inpainting`); absent =
    /// the model takes no edits there.
    pub edit_task: Option<String>,
}

/// `backends: [a, b]` or `backends: [{name: a, weight: 2}]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawModelBackend {
    Name(String),
    Weighted(RawWeightedBackend),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedBackend {
    pub name: String,
    pub weight: Option<u32>,
    /// Images one call to this backend may make for this model (dall-e-3 takes 1); default: the model's.
    pub max_images_per_call: Option<u32>,
}

/// `credits: 2` or `credits: {per_request: 2}` or `credits: {input_per_1k: 0.5, output_per_1k: 1.5}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawCredits {
    Flat(f64),
    Rates(RawCreditRates),
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCreditRates {
    pub per_request: Option<f64>,
    pub input_per_1k: Option<f64>,
    pub output_per_1k: Option<f64>,
}
