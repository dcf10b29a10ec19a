//! Configuration: YAML text + environment → a validated [`Config`]. Owns every default and every cross-field
//! check. Loading is pure (no network, no files written) so `easel config check` and tests run it as is.
//!
//! Order of precedence: `EASEL_<SECTION>__<KEY>` environment overrides > the file > built-in defaults. `${VAR}`
//! and `${VAR:-default}` in the file are replaced before parsing (`$${` writes a literal `${`).

mod compat;
mod locate;
pub mod raw;
pub mod routes;
pub mod source;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use serde_json_path::JsonPath;
use url::Url;

pub use self::locate::{Segment, locate, parse_path};
use self::raw::RawConfig;
pub use self::routes::{RouteConfig, RouteField, RouteResponse};
pub use self::source::{Environment, MapEnv, ProcessEnv};
use crate::request::{ResponseFormat, Size};

/// The configuration used when no file is given and `./easel.yaml` does not exist.
pub const BUILTIN_DEFAULT: &str = include_str!("builtin.yaml");

/// Environment variables with the `EASEL_` prefix that are not overrides.
const NOT_OVERRIDES: &[&str] = &["EASEL_CONFIG", "EASEL_LOG", "EASEL_ADMIN_TOKEN"];

/// A validated configuration. Invalid states are not representable past this point.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from: a file path or "built-in default".
    pub origin: String,
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub defaults: Defaults,
    pub health: HealthConfig,
    /// Sorted by name.
    pub backends: Vec<Arc<BackendConfig>>,
    /// In file order (the order of `/v1/models`).
    pub models: Vec<Arc<ModelConfig>>,
    pub jobs: JobsConfig,
    /// Sorted by name.
    pub hosts: Vec<HostConfig>,
    /// Extra inbound routes serving legacy image APIs (`routes:`).
    pub routes: Vec<RouteConfig>,
    /// Sorted by name.
    pub working_sets: Vec<WorkingSetConfig>,
    /// `cluster.redis` and its settings; `None` = every limit is per process.
    pub cluster: Option<ClusterConfig>,
}

/// `cluster`: fleet-wide admission and per-key limits through one Redis.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The `redis://` URL (it may carry a password).
    pub redis: Secret,
    /// How long a permit stays taken without renewal (an instance that died frees its slots after this).
    pub lease: Duration,
    pub fallback: ClusterFallback,
}

/// What admission does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterFallback {
    /// Refuse with 503 naming Redis: the fleet-wide limit is never exceeded.
    Closed,
    /// Admit under per-instance limits: `ceil(concurrency / fleet_size)` per gate.
    Local { fleet_size: u32 },
}

/// `auth.key_limits`: limits each API key gets; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub max_parallel: Option<u32>,
}

impl KeyLimits {
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.max_parallel.is_none()
    }
}

/// `hosts.<name>`: a GPU (or GPU group) with at most one active working set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    pub name: String,
    pub mode: HostMode,
    /// Activated at startup.
    pub default_set: Option<String>,
    /// How long a waiter for another set waits while the active set still has work (default 60s).
    pub patience: Duration,
    /// Longest a request waits for a swap before 503 (default 300s).
    pub max_wait: Duration,
    /// Swap waiters per host before 429 (default 32).
    pub queue_depth: u32,
    /// A drain that outlasts this aborts the swap; nothing is killed (default 30m).
    pub drain_timeout: Duration,
    /// Above zero: go idle when nothing ran this long (default 0 = never).
    pub idle_ttl: Duration,
    /// Wait after a failed start before trying again; doubles per failure, capped at 5m (default 15s).
    pub failure_cooldown: Duration,
    /// How often a stream waiting for a swap gets an SSE comment line (default 10s).
    pub keepalive: Duration,
}

/// Whether a request for an inactive set may start a swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMode {
    Auto,
    Manual,
}

impl HostMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Manual => "manual",
        }
    }
}

/// `working_sets.<name>`: managed backends that run together on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSetConfig {
    pub name: String,
    pub host: String,
    /// Sorted, each named once; all have a `process:` block.
    pub backends: Vec<String>,
}

/// Settings of durable jobs as a whole.
#[derive(Debug, Clone, Default)]
pub struct JobsConfig {
    pub webhooks: WebhooksConfig,
}

/// Client webhooks: how they are signed, which targets are allowed, and how deliveries are retried.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// Signs deliveries; `None` = a key generated into the files directory on first start.
    pub secret: Option<Secret>,
    /// Loopback, link-local and private targets are refused unless this is set.
    pub allow_private: bool,
    /// The first retry's delay; later ones are 6, 24, 120 and then 720 times it (5s, 30s, 2m, 10m, 1h, 1h, …).
    pub backoff: Duration,
    /// Attempts before a delivery is given up.
    pub max_attempts: u32,
    /// How long one attempt may take.
    pub timeout: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            secret: None,
            allow_private: false,
            backoff: Duration::from_secs(5),
            max_attempts: 8,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base for output URLs; `None` = derived from the request's `Host` header.
    pub public_url: Option<Url>,
    pub max_body_bytes: usize,
    /// `server.drain_timeout`: after SIGTERM, how long in-flight requests and streams may take before the
    /// process exits anyway.
    pub drain_timeout: Duration,
    /// Most pixels an image easel decodes (client inputs, masks, upstream outputs it transcodes) may have.
    pub max_image_pixels: u64,
    /// Memory budget shared by all image decodes in the process.
    pub decode_memory_bytes: usize,
    /// HTTPS instead of plain HTTP.
    pub tls: Option<TlsConfig>,
    /// `server.cors`: `None` = no CORS headers (browsers on other origins are refused by the browser).
    pub cors: Option<CorsConfig>,
    /// `server.ui`: the web page at `/ui/` (and `/` redirecting there).
    pub ui: bool,
}

/// Which browser origins may call the API.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Empty = any origin (`*`).
    pub origins: Vec<HeaderValue>,
    pub max_age: Duration,
}

/// `server.tls`: PEM files (read at start and again on SIGHUP), and an optional plain-HTTP redirect listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub redirect_http: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub database: String,
    /// The outputs folder (local storage); with S3, the folder for this instance's own state files.
    pub files: PathBuf,
    /// `files: s3://…`: outputs live in an S3-compatible bucket instead of `files`.
    pub s3: Option<S3Config>,
    /// Outputs older than this are deleted by a background task; `None` = kept forever.
    pub retention: Option<Duration>,
    /// Signs output URLs; `None` = a key generated into the files directory on first start.
    pub signing_secret: Option<Secret>,
    /// Lifetime of a signed output URL.
    pub url_ttl: Duration,
}

/// `storage.files: s3://bucket/prefix` with `storage.s3`: outputs in an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty = the bucket's root.
    pub prefix: String,
    /// `None` = AWS's endpoint for `region`.
    pub endpoint: Option<Url>,
    pub region: String,
    /// `None` (both) = credentials from the environment's instance metadata.
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub path_style: bool,
    pub allow_http: bool,
    /// Redirect file downloads to presigned URLs instead of streaming them through easel.
    pub presign: bool,
    pub presign_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub public_metrics: bool,
    /// From `EASEL_ADMIN_TOKEN`: guards `/v1/admin/*` (and `/v1/gateway/status` when keys are on).
    pub admin_token: Option<Secret>,
    /// `auth.mode: static`: the one bearer token every non-public route needs (seed 004's
    /// `GATEWAY_BEARER_TOKEN`); it also opens `/v1/gateway/status`.
    pub token: Option<Secret>,
    /// `auth.key_limits`: the limits of every key.
    pub key_limits: KeyLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    None,
    Keys,
    /// One static bearer token, no accounts and no credits.
    Static,
}

#[derive(Debug, Clone)]
pub struct Defaults {
    pub response_format: ResponseFormat,
    pub size: Size,
    pub n_max: u32,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successful probes before an unhealthy backend counts as healthy again.
    pub healthy_threshold: u32,
    /// Consecutive failed probes before a healthy backend counts as unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive backend faults on live traffic that open the circuit.
    pub circuit_failures: u32,
    /// How long an open circuit keeps traffic away before one trial request.
    pub circuit_cooldown: Duration,
}

/// Every backend protocol easel speaks. The string form is the config `kind`, the metric label and the log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    OpenAi,
    A1111,
    ComfyUi,
    InvokeAi,
    HuggingFace,
    Fal,
    Replicate,
    Template,
    Simulated,
}

impl BackendKind {
    pub const ALL: [BackendKind; 9] = [
        BackendKind::OpenAi,
        BackendKind::A1111,
        BackendKind::ComfyUi,
        BackendKind::InvokeAi,
        BackendKind::HuggingFace,
        BackendKind::Fal,
        BackendKind::Replicate,
        BackendKind::Template,
        BackendKind::Simulated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::OpenAi => "openai",
            BackendKind::A1111 => "a1111",
            BackendKind::ComfyUi => "comfyui",
            BackendKind::InvokeAi => "invokeai",
            BackendKind::HuggingFace => "huggingface",
            BackendKind::Fal => "fal",
            BackendKind::Replicate => "replicate",
            BackendKind::Template => "template",
            BackendKind::Simulated => "simulated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a backend can be asked to do; admission limits are kept per capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    Images,
    Videos,
    Text,
}

impl Capability {
    pub const ALL: [Capability; 3] = [Capability::Images, Capability::Videos, Capability::Text];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Images => "images",
            Capability::Videos => "videos",
            Capability::Text => "text",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    pub kind: BackendKind,
    /// The server's root; `None` only for `simulated`.
    pub url: Option<Url>,
    pub api_key: Option<Secret>,
    /// Bound on one whole upstream call (connect, send, wait, read).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Upstream calls in flight at once, per capability.
    pub concurrency: BTreeMap<Capability, u32>,
    pub queue: QueueConfig,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub max_response_bytes: usize,
    pub max_images_per_call: u32,
    pub template: Option<TemplateConfig>,
    pub simulation: Option<SimulationConfig>,
    /// Job status polling period (comfyui history fallback, invokeai, fal, replicate).
    pub poll_interval: Duration,
    /// InvokeAI session queue id.
    pub queue_id: String,
    /// Hosts besides the backend's own origin that its output URLs may point to (see [`HostPattern`]).
    pub allow_output_hosts: Vec<HostPattern>,
    /// A configured probe that replaces the kind's own.
    pub health_check: Option<HealthCheck>,
    /// A managed server process; `None` = external (probed, never started or stopped).
    pub process: Option<ProcessConfig>,
}

/// `process:` on a backend: how easel runs, probes, restarts and stops the server behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// argv; never empty.
    pub cmd: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// The port from the backend's `url` the process must listen on.
    pub port: u16,
    /// Longest the kind's native probe may take to pass after spawning (default 120s).
    pub ready_timeout: Duration,
    /// Sent to the process group to stop it (default TERM).
    pub stop_signal: StopSignal,
    /// Run instead of signalling; the group is still killed after `grace`.
    pub stop_cmd: Option<Vec<String>>,
    /// Time between the stop signal and SIGKILL to the group (default 10s).
    pub grace: Duration,
    /// Restarts after unexpected exits before the backend is marked failed (default 3).
    pub restart_max: u32,
    /// First restart delay, doubled per consecutive restart (default 5s, capped at 5m).
    pub restart_backoff: Duration,
    /// Staying ready this long forgets earlier crashes (default 60s).
    pub restart_reset_after: Duration,
}

/// The signal a managed process group is stopped with before SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
    Hup,
    Quit,
}

impl StopSignal {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
            "TERM" => Some(Self::Term),
            "INT" => Some(Self::Int),
            "HUP" => Some(Self::Hup),
            "QUIT" => Some(Self::Quit),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Term => "TERM",
            Self::Int => "INT",
            Self::Hup => "HUP",
            Self::Quit => "QUIT",
        }
    }
}

/// `health: { path, expect_status }` on a backend.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Starts with `/`; appended to the backend's root.
    pub path: String,
    pub expect_status: u16,
}

/// One `allow_output_hosts` entry: an exact host, or `*.suffix` for any subdomain of `suffix`; with an optional
/// port (absent = any port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lowercase host without brackets; for a wildcard, the suffix after `*.`.
    pub host: String,
    pub wildcard: bool,
    pub port: Option<u16>,
}

impl HostPattern {
    /// Parses `host`, `host:port`, `*.suffix`, `[v6]:port`; `None` when it is none of those.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let url = Url::parse(&format!("http://{rest}/")).ok()?;
        if url.path() != "/" || url.username() != "" || url.password().is_some() || url.query().is_some() {
            return None;
        }
        let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if host.is_empty() {
            return None;
        }
        // `Url` drops the default port 80; keep it when it was written.
        let port = url.port().or_else(|| rest.ends_with(":80").then_some(80));
        Some(Self { host, wildcard, port })
    }

    /// Whether `host` (lowercase, no brackets) and `port` match.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

impl BackendConfig {
    /// The URL with `path` appended to the root (which may carry a path prefix).
    pub fn endpoint(&self, path: &str) -> String {
        let base = self.url.as_ref().map_or("", |u| u.as_str()).trim_end_matches('/');
        format!("{base}{path}")
    }

    /// `endpoint(path)` as a parsed URL, built from the root parsed once at load: only the path and query are
    /// set, so the scheme and host (and their IDNA mapping) are not parsed again per request. `None` (the caller
    /// then parses the string form) when there is no root, the root carries a query or fragment, or `path` has a
    /// fragment or does not start with `/`.
    pub fn endpoint_url(&self, path: &str) -> Option<Url> {
        let root = self.url.as_ref()?;
        if root.query().is_some()
            || root.fragment().is_some()
            || root.cannot_be_a_base()
            || path.contains('#')
            || !(path.is_empty() || path.starts_with('/'))
        {
            return None;
        }
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let mut url = root.clone();
        let prefix = root.path().trim_end_matches('/');
        if prefix.is_empty() {
            url.set_path(path);
        } else {
            url.set_path(&format!("{prefix}{path}"));
        }
        url.set_query(query);
        Some(url)
    }

    /// The configured limit for a capability (0 = this backend does not serve it).
    pub fn limit(&self, capability: Capability) -> u32 {
        self.concurrency.get(&capability).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Requests allowed to wait for a slot; past it, 429.
    pub depth: u32,
    /// Longest a request waits for a slot; past it, 429.
    pub wait: Duration,
}

/// A string that never prints itself.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A custom HTTP image server, described by a request template and a response rule.
#[derive(Debug, Clone)]
pub struct TemplateConfig {
    pub method: reqwest::Method,
    pub path: String,
    /// The body template source (minijinja), already checked to render valid JSON with sample values.
    pub body: String,
    pub content_type: String,
    /// Where the images are in a JSON response; `None` = the response body is the image.
    pub images: Option<JsonPath>,
}

#[derive(Debug, Clone)]
pub struct SimulationConfig {
    pub latency: Duration,
    pub failure: Option<SimulatedFailure>,
}

#[derive(Debug, Clone)]
pub struct SimulatedFailure {
    pub mode: FailureMode,
    pub message: String,
    /// Fail every Nth call (1 = every call).
    pub every: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Status(u16),
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Image,
    Video,
    Text,
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Image => "image",
            ModelType::Video => "video",
            ModelType::Text => "text",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub id: String,
    /// Other ids that name this model (unique across the registry).
    pub aliases: Vec<String>,
    pub kind: ModelType,
    /// Preference order = fallback order.
    pub backends: Vec<ModelBackend>,
    pub upstream_model: String,
    pub credits: Option<f64>,
    /// Text models charged per token (`credits` is then `None`).
    pub token_credits: Option<TokenCredits>,
    /// Text models: completion tokens assumed for the credit hold when a request sets no `max_tokens`.
    pub max_output_tokens: u32,
    pub working_set: Option<String>,
    pub description: Option<String>,
    pub sizes: Option<Vec<Size>>,
    pub default_size: Size,
    pub max_size: Size,
    pub max_n: u32,
    pub max_prompt_chars: usize,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub negative_prompt: Option<String>,
    /// The prompt `/v1/images/variations` runs its edit with.
    pub variation_prompt: String,
    /// The workflow template of comfyui/invokeai backends.
    pub workflow: Option<Arc<crate::backends::workflow::Workflow>>,
    /// Video models priced per second of video (else `credits` per clip).
    pub credits_per_second: Option<f64>,
    /// Longest a job of this model may run before easel cancels it upstream and refunds it.
    pub job_timeout: Duration,
    /// The Hugging Face task `/v1/images/edits` runs as on `huggingface` backends; `None` = no edits there.
    pub edit_task: Option<EditTask>,
}

/// `edit_task:` on a model served by `huggingface` backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditTask {
    /// An image (no mask) and a prompt.
    ImageToImage,
    /// An image, a mask and a prompt.
    Inpainting,
}

impl EditTask {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "image-to-image" => Some(Self::ImageToImage),
            "inpainting" => Some(Self::Inpainting),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ImageToImage => "image-to-image",
            Self::Inpainting => "inpainting",
        }
    }
}

/// Credits per 1,000 tokens of a text model (1 credit per 1K tokens = 1 millicredit per token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenCredits {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

#[derive(Debug, Clone)]
pub struct ModelBackend {
    pub name: String,
    pub weight: u32,
    /// Images one call may make for this model here (the entry's, else the model's); `None` = the backend's own.
    pub max_images_per_call: Option<u32>,
}

/// One thing wrong with a configuration, pointing at where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `file:line:column` or `file` or the environment variable that caused it.
    pub at: String,
    /// Key path, e.g. `backends.gpu.url`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.at, self.message)
        } else {
            write!(f, "{}: {}: {}", self.at, self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration at once.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "invalid configuration ({n} problem{})", if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(at: impl Into<String>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { problems: vec![Problem { at: at.into(), path: path.into(), message: message.into() }] }
    }
}

/// Which file to read: an explicit path (`--config`, `EASEL_CONFIG`), else `./easel.yaml` when present, else
/// the built-in default.
pub fn resolve_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let local = PathBuf::from("easel.yaml");
    local.is_file().then_some(local)
}

/// The configuration text a compatibility mode's environment variables produce (for `easel config check`).
pub fn compat_text(env: &dyn Environment) -> Option<String> {
    compat::from_env(env).ok().flatten().map(|(text, _)| text)
}

/// Reads and validates the configuration at `path` (or, for `None`, a compatibility mode or the built-in default).
pub fn load(path: Option<&Path>, env: &dyn Environment) -> Result<Config, ConfigError> {
    match path {
        Some(p) => {
            let origin = p.display().to_string();
            let text = std::fs::read_to_string(p)
                .map_err(|e| ConfigError::one(&origin, "", format!("cannot read the configuration file: {e}")))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            from_str(&text, &origin, &base, env)
        }
        None => match compat::from_env(env)? {
            Some((text, origin)) => from_str(&text, &origin, Path::new("."), env),
            None => from_str(BUILTIN_DEFAULT, "built-in default", Path::new("."), env),
        },
    }
}

/// Validates configuration text. `origin` names it in messages; relative paths in it resolve against `base`.
pub fn from_str(text: &str, origin: &str, base: &Path, env: &dyn Environment) -> Result<Config, ConfigError> {
    let text = interpolate(text, origin, env)?;
    let overrides = overrides(env);
    let raw =
        if overrides.is_empty() { parse(&text, origin)? } else { parse_with_overrides(&text, origin, &overrides)? };
    let admin_token = env.get("EASEL_ADMIN_TOKEN").filter(|t| !t.is_empty()).map(Secret::new);
    validate::validate(raw, origin, base, admin_token).map_err(|problems| {
        let problems = problems
            .into_iter()
            .map(|(path, message)| {
                let at = match overrides.iter().find(|o| path.starts_with(&o.path)) {
                    Some(o) => format!("environment {}", o.var),
                    None => match locate(&text, &parse_path(&path)) {
                        Some((line, col)) => format!("{origin}:{line}:{col}"),
                        None => origin.to_owned(),
                    },
                };
                Problem { at, path, message }
            })
            .collect();
        ConfigError { problems }
    })
}

/// Replaces `${VAR}` and `${VAR:-default}`; an unset variable without a default is an error at its position.
fn interpolate(text: &str, origin: &str, env: &dyn Environment) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (n, full) in text.split_inclusive('\n').enumerate() {
        // Comments are left alone: `${` in a comment is documentation, not a variable.
        let (line, comment) = full.split_at(comment_start(full));
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            if rest[..i].ends_with('$') {
                out.push_str(&rest[..i - 1]);
                out.push_str("${");
                rest = &rest[i + 2..];
                continue;
            }
            out.push_str(&rest[..i]);
            let Some(close) = rest[i..].find('}') else {
                problems.push(Problem {
                    at: format!("{origin}:{}:{}", n + 1, line.len() - rest.len() + i + 1),
                    path: String::new(),
                    message: "unterminated `${` (write `$${` for a literal)".into(),
                });
                out.push_str(&rest[i..]);
                rest = "";
                break;
            };
            let expr = &rest[i + 2..i + close];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            match (env.get(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => problems.push(Problem {
                    at: format!("{origin}:{}:{}", n + 1, line.len() - rest.len() + i + 1),
                    path: String::new(),
                    message: format!(
                        "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                    ),
                }),
            }
            rest = &rest[i + close + 1..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    if problems.is_empty() { Ok(out) } else { Err(ConfigError { problems }) }
}

/// Byte offset where a YAML comment starts on this line (`#` at the start or after a space, outside quotes), or
/// the line's length.
fn comment_start(line: &str) -> usize {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single && prev != '\\' => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return i,
            _ => {}
        }
        prev = c;
    }
    line.len()
}

/// Parses YAML into the raw types, with the key path and position of the first error.
fn parse(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let at = match e.location() {
            Some(loc) if loc.line() > 0 => format!("{origin}:{}:{}", loc.line(), loc.column()),
            _ => origin.to_owned(),
        };
        let path = if path == "." { String::new() } else { path };
        let first = Problem { at, path, message: in_words(&yaml_message(&e.to_string())) };
        ConfigError { problems: every_problem(text, origin, first) }
    })
}

/// The first problem, then every other one serde would stop at: each offending key is taken out of a copy of
/// the tree and the rest checked again, so one run lists all unknown keys and type errors.
fn every_problem(text: &str, origin: &str, first: Problem) -> Vec<Problem> {
    let Ok(mut tree) = serde_saphyr::from_str::<serde_json::Value>(text) else { return vec![first] };
    let mut problems = vec![first];
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..64 {
        let path = match serde_path_to_error::deserialize::<_, RawConfig>(&tree) {
            Ok(_) => break,
            Err(e) => {
                let path = e.path().to_string();
                let message = in_words(&e.into_inner().to_string());
                // A required key taken out here is not the file's mistake.
                let derived = message.starts_with("missing") && removed.iter().any(|r| path.starts_with(r.as_str()));
                if !derived && !problems.iter().any(|p| p.path == path) {
                    let at = match locate(text, &parse_path(&path)) {
                        Some((line, col)) => format!("{origin}:{line}:{col}"),
                        None => origin.to_owned(),
                    };
                    problems.push(Problem { at, path: path.clone(), message });
                }
                path
            }
        };
        if path.is_empty() || path == "." || !remove_path(&mut tree, &parse_path(&path)) {
            break;
        }
        removed.push(path);
    }
    problems
}

/// Takes the node at `path` out of `tree`; `false` when there is none.
fn remove_path(tree: &mut serde_json::Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut node = tree;
    for seg in parents {
        node = match (seg, node) {
            (Segment::Key(k), serde_json::Value::Object(m)) => match m.get_mut(k) {
                Some(n) => n,
                None => return false,
            },
            (Segment::Index(i), serde_json::Value::Array(a)) => match a.get_mut(*i) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Key(k), serde_json::Value::Object(m)) => m.remove(k).is_some(),
        // An element of a list cannot go without shifting the others: blank it instead.
        (Segment::Index(i), serde_json::Value::Array(a)) if *i < a.len() => {
            a[*i] = serde_json::Value::Null;
            true
        }
        _ => false,
    }
}

/// serde's wording in the words of a configuration file: "text", "a whole number", "a list", "a map".
fn in_words(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (key, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<String> = tail
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .split(", ")
            .map(|k| k.trim_matches('`').to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        let hint =
            crate::routing::nearest(key, &expected).map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default();
        return format!("unknown key `{key}`{hint}; the keys here are: {}", expected.join(", "));
    }
    let words = |t: &str| -> String {
        let t = t.trim();
        match t {
            "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" | "an integer" => "a whole number".into(),
            "f32" | "f64" | "a float" => "a number".into(),
            "a boolean" | "bool" => "true or false".into(),
            "a string" | "string" => "text".into(),
            "a sequence" | "sequence" => "a list".into(),
            "a map" | "map" => "a map".into(),
            _ if t.starts_with("struct ") => "a map of settings".into(),
            _ if t.starts_with("a sequence") => "a list".into(),
            _ if t.starts_with("string ") => format!("the text {}", &t["string ".len()..]),
            _ if t.starts_with("integer ") => format!("the number {}", &t["integer ".len()..]),
            _ if t.starts_with("floating point ") => format!("the number {}", &t["floating point ".len()..]),
            _ if t.starts_with("boolean ") => format!("`{}`", &t["boolean ".len()..]),
            _ => t.to_owned(),
        }
    };
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((got, want)) = rest.split_once(", expected ")
    {
        return format!("expected {}, got {}", words(want), words(got));
    }
    message.to_owned()
}

/// serde-saphyr's message without its `error: line L column C:` prefix and source snippet.
fn yaml_message(full: &str) -> String {
    let first = full.lines().next().unwrap_or(full);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.split_once(": ") {
        Some((pos, msg)) if pos.starts_with("line ") => msg.to_owned(),
        _ => first.to_owned(),
    }
}

struct Override {
    var: String,
    path: String,
    segments: Vec<String>,
    value: String,
}

fn overrides(env: &dyn Environment) -> Vec<Override> {
    env.with_prefix("EASEL_")
        .into_iter()
        .filter(|(k, _)| !NOT_OVERRIDES.contains(&k.as_str()) && k.contains("__"))
        .map(|(var, value)| {
            let segments: Vec<String> = var["EASEL_".len()..].split("__").map(str::to_ascii_lowercase).collect();
            Override { path: segments.join("."), var, segments, value }
        })
        .collect()
}

fn parse_with_overrides(text: &str, origin: &str, overrides: &[Override]) -> Result<RawConfig, ConfigError> {
    // Check the file alone first, so its own mistakes keep their line and column.
    parse(text, origin)?;
    let mut tree: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| ConfigError::one(origin, "", yaml_message(&e.to_string())))?;
    if tree.is_null() {
        tree = serde_json::Value::Object(serde_json::Map::new());
    }
    // Values go in typed (numbers, booleans) first; a key that wants a string gets the text instead.
    let mut as_text = vec![false; overrides.len()];
    loop {
        let mut candidate = tree.clone();
        for (o, text_only) in overrides.iter().zip(&as_text) {
            let value = if *text_only { serde_json::Value::String(o.value.clone()) } else { scalar(&o.value) };
            set_path(&mut candidate, &o.segments, value)
                .map_err(|m| ConfigError::one(format!("environment {}", o.var), &o.path, m))?;
        }
        match serde_path_to_error::deserialize::<_, RawConfig>(&candidate) {
            Ok(raw) => return Ok(raw),
            Err(e) => {
                let path = e.path().to_string();
                let hit = overrides.iter().position(|o| path == o.path || path.starts_with(&format!("{}.", o.path)));
                match hit {
                    Some(i) if !as_text[i] => as_text[i] = true,
                    Some(i) => {
                        return Err(ConfigError::one(
                            format!("environment {}", overrides[i].var),
                            path,
                            e.into_inner().to_string(),
                        ));
                    }
                    None => return Err(ConfigError::one(origin, path, e.into_inner().to_string())),
                }
            }
        }
    }
}

fn scalar(s: &str) -> serde_json::Value {
    if let Ok(i) = s.parse::<i64>() {
        return i.into();
    }
    if let Ok(f) = s.parse::<f64>() {
        return f.into();
    }
    match s {
        "true" => true.into(),
        "false" => false.into(),
        _ => serde_json::Value::String(s.to_owned()),
    }
}

fn set_path(tree: &mut serde_json::Value, segments: &[String], value: serde_json::Value) -> Result<(), String> {
    let Some((last, parents)) = segments.split_last() else { return Err("empty override path".into()) };
    let mut node = tree;
    for seg in parents {
        node = match node {
            serde_json::Value::Array(items) => {
                let i: usize = seg.parse().map_err(|_| format!("`{seg}` is not a list index"))?;
                let len = items.len();
                items.get_mut(i).ok_or_else(|| format!("index {i} is past the end of a list of {len}"))?
            }
            serde_json::Value::Object(map) => {
                map.entry(seg.clone()).or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()))
            }
            _ => return Err(format!("`{seg}` is inside a value that is not a mapping")),
        };
    }
    match node {
        serde_json::Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        serde_json::Value::Array(items) => {
            let i: usize = last.parse().map_err(|_| format!("`{last}` is not a list index"))?;
            let len = items.len();
            let slot = items.get_mut(i).ok_or_else(|| format!("index {i} is past the end of a list of {len}"))?;
            *slot = value;
            Ok(())
        }
        _ => Err(format!("`{last}` is inside a value that is not a mapping")),
    }
}

#[cfg(test)]
mod tests;
