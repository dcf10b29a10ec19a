//! `RawConfig` → `Config`: parse, don't validate. Every problem is collected (not just the first) with its key
//! path; `mod.rs` turns paths into file positions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use serde_json_path::JsonPath;
use url::Url;

use super::raw::{
    RawBackend, RawConfig, RawCredits, RawHost, RawModel, RawModelBackend, RawProcess, RawS3, RawWorkingSet,
};
use super::{
    AuthConfig, AuthMode, BackendConfig, BackendKind, Capability, Config, Defaults, EditTask, FailureMode, HealthCheck,
    HealthConfig, HostConfig, HostMode, HostPattern, ModelBackend, ModelConfig, ModelType, ProcessConfig, QueueConfig,
    S3Config, Secret, ServerConfig, SimulatedFailure, SimulationConfig, StopSignal, StorageConfig, TemplateConfig,
    TokenCredits, WorkingSetConfig,
};
use crate::backends::workflow::Workflow;
use crate::request::{ResponseFormat, Size};

type Problems = Vec<(String, String)>;

/// Converts the raw configuration, or returns every problem as `(key path, message)`.
pub fn validate(raw: RawConfig, origin: &str, base: &Path, admin_token: Option<Secret>) -> Result<Config, Problems> {
    let mut p: Problems = Vec::new();

    let listen = match raw.server.listen.as_deref() {
        None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        Some(s) => match s.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            Some(addr) => addr,
            None => {
                p.push(("server.listen".into(), format!("`{s}` is not a `host:port` address (e.g. 127.0.0.1:8080)")));
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        },
    };
    let public_url = raw.server.public_url.as_deref().and_then(|s| match Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
        _ => {
            p.push(("server.public_url".into(), format!("`{s}` is not an http(s) URL")));
            None
        }
    });
    let server = ServerConfig {
        listen,
        public_url,
        max_body_bytes: bytes(&mut p, "server.max_body", raw.server.max_body.as_deref(), 64 << 20),
        drain_timeout: drain_timeout(&mut p, &raw.server),
        max_image_pixels: raw.server.max_image_pixels.unwrap_or(DEFAULT_MAX_IMAGE_PIXELS),
        decode_memory_bytes: bytes(&mut p, "server.decode_memory", raw.server.decode_memory.as_deref(), 1 << 30),
        tls: raw.server.tls.as_ref().and_then(|t| tls(&mut p, t, base)),
        cors: raw.server.cors.as_ref().map(|c| cors(&mut p, c)),
        ui: raw.server.ui.unwrap_or(true),
    };
    if server.max_image_pixels == 0 {
        p.push(("server.max_image_pixels".into(), "must be at least 1".into()));
    }
    if server.decode_memory_bytes < 1 << 20 {
        p.push(("server.decode_memory".into(), "must be at least 1MiB".into()));
    }

    // Relative storage paths resolve against the config file's folder, as workflow paths do.
    let beside =
        |path: &str| -> PathBuf { if Path::new(path).is_absolute() { PathBuf::from(path) } else { base.join(path) } };
    let database = raw.storage.database.unwrap_or_else(|| "sqlite://data/easel.db".into());
    let database = match database.strip_prefix("sqlite://") {
        Some(file) if !file.is_empty() && file != ":memory:" && !file.starts_with(':') => {
            format!("sqlite://{}", beside(file).display())
        }
        _ => database,
    };
    let files_setting = raw.storage.files.as_deref().unwrap_or("data/files");
    let s3 = match files_setting.strip_prefix("s3://") {
        Some(location) => s3(&mut p, location, raw.storage.s3.as_ref()),
        None => {
            if raw.storage.s3.is_some() {
                p.push(("storage.s3".into(), "is only used with `storage.files: s3://bucket/prefix`".into()));
            }
            None
        }
    };
    let retention = raw.storage.retention.as_deref().and_then(|r| match humantime::parse_duration(r) {
        Ok(d) if d >= Duration::from_secs(60) => Some(d),
        Ok(_) => {
            p.push(("storage.retention".into(), "must be at least 1m (or absent to keep outputs)".into()));
            None
        }
        Err(_) => {
            p.push(("storage.retention".into(), format!("`{r}` is not a duration (e.g. 7d, 12h)")));
            None
        }
    });
    let storage = StorageConfig {
        database,
        // With S3 the local folder still holds this instance's own state (generated keys, process state).
        files: beside(if files_setting.starts_with("s3://") { "data/files" } else { files_setting }),
        s3,
        retention,
        signing_secret: raw.storage.signing_secret.clone().map(Secret::new),
        url_ttl: duration(&mut p, "storage.url_ttl", raw.storage.url_ttl.as_deref(), 24 * 3600),
    };
    if files_setting.starts_with("s3://") && storage.signing_secret.is_none() {
        p.push((
            "storage.signing_secret".into(),
            "is required with `storage.files: s3://…`, so that every instance signs and accepts the same file URLs \
             (e.g. `${EASEL_SIGNING_SECRET}`)"
                .into(),
        ));
    }
    if storage.signing_secret.as_ref().is_some_and(|s| s.expose().len() < 32) {
        p.push((
            "storage.signing_secret".into(),
            "must be at least 32 characters (e.g. `openssl rand -hex 32`)".into(),
        ));
    }
    if storage.url_ttl.is_zero() {
        p.push(("storage.url_ttl".into(), "must be longer than 0s".into()));
    }
    if !storage.database.starts_with("sqlite:") && !crate::ledger::postgres::is_postgres_url(&storage.database) {
        p.push((
            "storage.database".into(),
            "must be `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://…`)".into(),
        ));
    }

    let mode = match raw.auth.mode.as_deref() {
        None | Some("none") => AuthMode::None,
        Some("keys") => AuthMode::Keys,
        Some("static") => AuthMode::Static,
        Some(other) => {
            p.push(("auth.mode".into(), format!("`{other}` is not one of: none, keys, static")));
            AuthMode::None
        }
    };
    let token = raw.auth.token.clone().filter(|t| !t.is_empty()).map(Secret::new);
    match (mode, &token) {
        (AuthMode::Static, None) => {
            p.push((
                "auth.token".into(),
                "`mode: static` needs the token clients send (e.g. `${GATEWAY_BEARER_TOKEN}`)".into(),
            ));
        }
        (AuthMode::Static, Some(t)) if t.expose().len() < 16 => {
            p.push(("auth.token".into(), "must be at least 16 characters".into()));
        }
        (AuthMode::None | AuthMode::Keys, Some(_)) => {
            p.push(("auth.token".into(), "is only used with `mode: static`".into()));
        }
        _ => {}
    }
    let key_limits = key_limits(&mut p, raw.auth.key_limits.as_ref(), mode);
    let auth =
        AuthConfig { mode, public_metrics: raw.auth.public_metrics.unwrap_or(true), admin_token, token, key_limits };
    let cluster = cluster(&mut p, &raw.cluster);

    let response_format = match raw.defaults.response_format.as_deref() {
        None => ResponseFormat::Url,
        Some(s) => ResponseFormat::parse(s).unwrap_or_else(|| {
            p.push(("defaults.response_format".into(), format!("`{s}` is not one of: url, b64_json")));
            ResponseFormat::Url
        }),
    };
    let default_size = size(&mut p, "defaults.size", raw.defaults.size.as_deref()).unwrap_or(Size::new(1024, 1024));
    let n_max = raw.defaults.n_max.unwrap_or(10);
    if !(1..=128).contains(&n_max) {
        p.push(("defaults.n_max".into(), format!("{n_max} is outside 1..=128")));
    }
    let defaults = Defaults { response_format, size: default_size, n_max };

    let health = HealthConfig {
        interval: duration(&mut p, "health.interval", raw.health.interval.as_deref(), 15),
        timeout: duration(&mut p, "health.timeout", raw.health.timeout.as_deref(), 5),
        healthy_threshold: positive(&mut p, "health.healthy_threshold", raw.health.healthy_threshold, 1),
        unhealthy_threshold: positive(&mut p, "health.unhealthy_threshold", raw.health.unhealthy_threshold, 2),
        circuit_failures: positive(&mut p, "health.circuit_failures", raw.health.circuit_failures, 5),
        circuit_cooldown: duration(&mut p, "health.circuit_cooldown", raw.health.circuit_cooldown.as_deref(), 30),
    };

    let declared: BTreeSet<String> = raw.backends.keys().cloned().collect();
    let text_backends = text_backends(&raw.models);
    let mut backends = Vec::new();
    for (name, b) in raw.backends {
        let serves_text = text_backends.contains(&name);
        if let Some(cfg) = backend(&mut p, &name, b, serves_text, base) {
            backends.push(Arc::new(cfg));
        }
    }
    let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
    for b in &backends {
        if let Some(proc_cfg) = &b.process
            && let Some(other) = ports.insert(proc_cfg.port, &b.name)
        {
            p.push((
                format!("backends.{}.process", b.name),
                format!("backends `{other}` and `{}` both run a process on port {}", b.name, proc_cfg.port),
            ));
        }
    }
    let known: BTreeMap<&str, &BackendConfig> = backends.iter().map(|b| (b.name.as_str(), b.as_ref())).collect();

    let mut models = Vec::new();
    let mut seen = BTreeSet::new();
    // Ids and aliases share one name space.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (i, m) in raw.models.iter().enumerate() {
        if let Some(id) = &m.id {
            names.entry(id.clone()).or_insert_with(|| format!("models[{i}]"));
        }
    }
    for (i, m) in raw.models.iter().enumerate() {
        for (j, a) in m.aliases.iter().enumerate() {
            let here = format!("models[{i}]");
            match names.get(a) {
                // Its own id is reported by `model`.
                Some(owner) if *owner == here => {}
                Some(owner) => p.push((format!("{here}.aliases[{j}]"), format!("`{a}` already names {owner}"))),
                None => {
                    names.insert(a.clone(), here);
                }
            }
        }
    }
    for (i, m) in raw.models.into_iter().enumerate() {
        let at = format!("models[{i}]");
        if let Some(id) = &m.id
            && !seen.insert(id.clone())
        {
            p.push((format!("{at}.id"), format!("model `{id}` is defined twice")));
        }
        if let Some(cfg) = model(&mut p, &at, m, &known, &declared, &defaults, base) {
            models.push(Arc::new(cfg));
        }
    }
    if models.is_empty() && !p.iter().any(|(k, _)| k.starts_with("models")) {
        p.push(("models".into(), "no models are defined: add at least one under `models:`".into()));
    }

    let hooks = &raw.jobs.webhooks;
    let webhooks = super::WebhooksConfig {
        secret: hooks.secret.clone().map(Secret::new),
        allow_private: hooks.allow_private.unwrap_or(false),
        backoff: duration(&mut p, "jobs.webhooks.backoff", hooks.backoff.as_deref(), 5),
        max_attempts: positive(&mut p, "jobs.webhooks.max_attempts", hooks.max_attempts, 8),
        timeout: duration(&mut p, "jobs.webhooks.timeout", hooks.timeout.as_deref(), 10),
    };
    if webhooks.secret.as_ref().is_some_and(|s| s.expose().len() < 24) {
        p.push(("jobs.webhooks.secret".into(), "must be at least 24 characters (e.g. `openssl rand -hex 32`)".into()));
    }
    if webhooks.backoff.is_zero() {
        p.push(("jobs.webhooks.backoff".into(), "must be longer than 0s".into()));
    }
    if webhooks.timeout.is_zero() {
        p.push(("jobs.webhooks.timeout".into(), "must be longer than 0s".into()));
    }
    let jobs = super::JobsConfig { webhooks };

    let (hosts, working_sets) = sets(&mut p, raw.hosts, raw.working_sets, &known, &models);
    let routes = super::routes::validate(&mut p, raw.routes, &models);

    if !p.is_empty() {
        return Err(p);
    }
    Ok(Config {
        origin: origin.to_owned(),
        server,
        storage,
        auth,
        defaults,
        health,
        backends,
        models,
        jobs,
        hosts,
        working_sets,
        routes,
        cluster,
    })
}

/// `cluster`: the Redis URL is parsed here (no connection is made); the other keys need it.
fn cluster(p: &mut Problems, c: &super::raw::RawCluster) -> Option<super::ClusterConfig> {
    let lease = duration(p, "cluster.lease", c.lease.as_deref(), 10);
    if lease < Duration::from_secs(1) {
        p.push(("cluster.lease".into(), "must be at least 1s (renewals run every third of it)".into()));
    }
    let fallback = match c.fallback.as_deref() {
        None | Some("closed") => {
            if c.fleet_size.is_some() {
                p.push(("cluster.fleet_size".into(), "is only used with `fallback: local`".into()));
            }
            super::ClusterFallback::Closed
        }
        Some("local") => match c.fleet_size {
            None => {
                p.push((
                    "cluster.fleet_size".into(),
                    "`fallback: local` needs the number of instances, to divide each limit among them".into(),
                ));
                super::ClusterFallback::Closed
            }
            Some(0) => {
                p.push(("cluster.fleet_size".into(), "must be at least 1".into()));
                super::ClusterFallback::Closed
            }
            Some(n) => super::ClusterFallback::Local { fleet_size: n },
        },
        Some(other) => {
            p.push(("cluster.fallback".into(), format!("`{other}` is not one of: closed, local")));
            super::ClusterFallback::Closed
        }
    };
    let Some(url) = c.redis.as_deref() else {
        for (key, set) in [("lease", c.lease.is_some()), ("fallback", c.fallback.is_some())] {
            if set {
                p.push((format!("cluster.{key}"), "is only used with `cluster.redis: redis://…`".into()));
            }
        }
        return None;
    };
    match Url::parse(url) {
        Ok(u) if u.scheme() == "redis" && u.host_str().is_some_and(|h| !h.is_empty()) => {}
        Ok(u) if u.scheme() == "rediss" => {
            p.push(("cluster.redis".into(), "`rediss://` (TLS) is not supported by this build; use `redis://`".into()))
        }
        // The URL is not echoed: it may carry a password.
        _ => p.push(("cluster.redis".into(), "is not a `redis://host:port[/db]` URL".into())),
    }
    Some(super::ClusterConfig { redis: Secret::new(url.to_owned()), lease, fallback })
}

/// `auth.key_limits`: each limit at least 1; they need keys to apply to.
fn key_limits(p: &mut Problems, raw: Option<&super::raw::RawKeyLimits>, mode: AuthMode) -> super::KeyLimits {
    let Some(raw) = raw else { return super::KeyLimits::default() };
    let mut at_least_one = |key: &str, v: Option<u32>| match v {
        Some(0) => {
            p.push((format!("auth.key_limits.{key}"), "must be at least 1 (leave it out for no limit)".into()));
            None
        }
        v => v,
    };
    let limits = super::KeyLimits {
        requests_per_minute: at_least_one("requests_per_minute", raw.requests_per_minute),
        max_parallel: at_least_one("max_parallel", raw.max_parallel),
    };
    if mode != AuthMode::Keys {
        p.push(("auth.key_limits".into(), "limits API keys, so it needs `auth.mode: keys`".into()));
    }
    limits
}

/// `server.cors`: origins are `scheme://host[:port]` exactly as browsers send them, or the one entry `*`.
fn cors(p: &mut Problems, c: &super::raw::RawCors) -> super::CorsConfig {
    let max_age = duration(p, "server.cors.max_age", c.max_age.as_deref(), 600);
    let list = c.allow_origins.clone().unwrap_or_default();
    if list.is_empty() {
        p.push(("server.cors.allow_origins".into(), "list the origins (e.g. https://app.example.com) or `*`".into()));
    }
    if list.iter().any(|o| o == "*") {
        if list.len() > 1 {
            p.push(("server.cors.allow_origins".into(), "`*` allows every origin: list nothing else with it".into()));
        }
        return super::CorsConfig { origins: Vec::new(), max_age };
    }
    let mut origins = Vec::new();
    for (i, o) in list.iter().enumerate() {
        let ok = Url::parse(o).ok().filter(|u| {
            matches!(u.scheme(), "http" | "https") && u.path() == "/" && !o.ends_with('/') && u.query().is_none()
        });
        match (ok, reqwest::header::HeaderValue::from_str(o)) {
            (Some(_), Ok(v)) => origins.push(v),
            _ => p.push((
                format!("server.cors.allow_origins[{i}]"),
                format!("`{o}` is not an origin like https://app.example.com (scheme and host, no path)"),
            )),
        }
    }
    super::CorsConfig { origins, max_age }
}

/// `server.tls`: both files (relative to the config file), and a redirect address that is not `server.listen`'s.
fn tls(p: &mut Problems, t: &super::raw::RawTls, base: &Path) -> Option<super::TlsConfig> {
    let file = |p: &mut Problems, key: &str, v: &Option<String>| match v.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(base.join(s)),
        None => {
            p.push((format!("server.tls.{key}"), format!("is required: the PEM {key} file")));
            None
        }
    };
    let (cert, key) = (file(p, "cert", &t.cert), file(p, "key", &t.key));
    let redirect_http =
        t.redirect_http.as_deref().and_then(|s| match s.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            Some(a) => Some(a),
            None => {
                p.push(("server.tls.redirect_http".into(), format!("`{s}` is not a `host:port` address")));
                None
            }
        });
    Some(super::TlsConfig { cert: cert?, key: key?, redirect_http })
}

/// Checks `hosts:` and `working_sets:` against each other, the backends and the models: every set names a
/// declared host and managed backends; a managed backend lies in sets of one host only; a host's `default_set`
/// is one of its sets; a model's `working_set` exists and holds every managed backend the model uses.
fn sets(
    p: &mut Problems,
    raw_hosts: BTreeMap<String, RawHost>,
    raw_sets: BTreeMap<String, RawWorkingSet>,
    known: &BTreeMap<&str, &BackendConfig>,
    models: &[Arc<ModelConfig>],
) -> (Vec<HostConfig>, Vec<WorkingSetConfig>) {
    let mut sets = Vec::new();
    // Managed backend → (host, first set naming it).
    let mut owner: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (name, s) in raw_sets {
        let at = format!("working_sets.{name}");
        let host = match s.host {
            Some(h) if raw_hosts.contains_key(&h) => h,
            Some(h) => {
                let hosts: Vec<&str> = raw_hosts.keys().map(String::as_str).collect();
                p.push((
                    format!("{at}.host"),
                    format!("host `{h}` is not declared under `hosts:` (declared: {})", list(&hosts)),
                ));
                continue;
            }
            None => {
                p.push((at, "needs `host:` (a name under `hosts:`)".into()));
                continue;
            }
        };
        if s.backends.is_empty() {
            p.push((format!("{at}.backends"), "names no backends: list the managed backends of this set".into()));
        }
        let mut members = BTreeSet::new();
        for b in s.backends {
            let Some(cfg) = known.get(b.as_str()) else {
                let names: Vec<&str> = known.keys().copied().collect();
                p.push((format!("{at}.backends"), format!("backend `{b}` is not defined (defined: {})", list(&names))));
                continue;
            };
            if cfg.process.is_none() {
                p.push((
                    format!("{at}.backends"),
                    format!("backend `{b}` has no `process:` block, so easel cannot start or stop it with the set"),
                ));
                continue;
            }
            match owner.get(&b) {
                Some((h, other)) if *h != host => p.push((
                    format!("{at}.backends"),
                    format!(
                        "backend `{b}` is already in working set `{other}` on host `{h}`; a managed backend belongs \
                         to sets of one host only"
                    ),
                )),
                Some(_) => {}
                None => {
                    owner.insert(b.clone(), (host.clone(), name.clone()));
                }
            }
            members.insert(b);
        }
        sets.push(WorkingSetConfig { name, host, backends: members.into_iter().collect() });
    }

    let mut hosts = Vec::new();
    for (name, h) in raw_hosts {
        let at = format!("hosts.{name}");
        let mode = match h.mode.as_deref() {
            None | Some("auto") => HostMode::Auto,
            Some("manual") => HostMode::Manual,
            Some(other) => {
                p.push((format!("{at}.mode"), format!("`{other}` is not one of: auto, manual")));
                HostMode::Auto
            }
        };
        if let Some(d) = &h.default_set {
            match sets.iter().find(|s| s.name == *d) {
                Some(s) if s.host == name => {}
                Some(s) => p.push((
                    format!("{at}.default_set"),
                    format!("working set `{d}` runs on host `{}`, not `{name}`", s.host),
                )),
                None => {
                    let mine: Vec<&str> = sets.iter().filter(|s| s.host == name).map(|s| s.name.as_str()).collect();
                    p.push((
                        format!("{at}.default_set"),
                        format!("working set `{d}` is not defined (sets on this host: {})", list(&mine)),
                    ));
                }
            }
        }
        let cooldown = duration(p, &format!("{at}.failure_cooldown"), h.failure_cooldown.as_deref(), 15);
        let max_wait = duration(p, &format!("{at}.max_wait"), h.max_wait.as_deref(), 300);
        let drain_timeout = duration(p, &format!("{at}.drain_timeout"), h.drain_timeout.as_deref(), 30 * 60);
        let keepalive = duration(p, &format!("{at}.keepalive"), h.keepalive.as_deref(), 10);
        for (key, d) in [
            ("failure_cooldown", cooldown),
            ("max_wait", max_wait),
            ("drain_timeout", drain_timeout),
            ("keepalive", keepalive),
        ] {
            if d.is_zero() {
                p.push((format!("{at}.{key}"), "must be longer than 0s".into()));
            }
        }
        hosts.push(HostConfig {
            mode,
            default_set: h.default_set.clone(),
            patience: duration(p, &format!("{at}.patience"), h.patience.as_deref(), 60),
            max_wait,
            queue_depth: positive(p, &format!("{at}.queue_depth"), h.queue_depth, 32),
            drain_timeout,
            idle_ttl: duration(p, &format!("{at}.idle_ttl"), h.idle_ttl.as_deref(), 0),
            failure_cooldown: cooldown,
            keepalive,
            name,
        });
    }

    for (i, m) in models.iter().enumerate() {
        let managed: Vec<&str> = m
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .filter(|b| known.get(b).is_some_and(|c| c.process.is_some()))
            .collect();
        let Some(ws) = &m.working_set else { continue };
        let at = format!("models[{i}].working_set");
        let Some(set) = sets.iter().find(|s| s.name == *ws) else {
            let names: Vec<&str> = sets.iter().map(|s| s.name.as_str()).collect();
            p.push((
                at,
                format!("working set `{ws}` is not defined under `working_sets:` (defined: {})", list(&names)),
            ));
            continue;
        };
        for b in managed {
            if !set.backends.iter().any(|x| x == b) {
                p.push((
                    at.clone(),
                    format!("model `{}` uses managed backend `{b}`, which is not in its working set `{ws}`", m.id),
                ));
            }
        }
    }
    (hosts, sets)
}

fn list(names: &[&str]) -> String {
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

/// Backend kinds whose adapters make videos (the job operations).
const VIDEO_KINDS: &[BackendKind] =
    &[BackendKind::Fal, BackendKind::Replicate, BackendKind::OpenAi, BackendKind::ComfyUi, BackendKind::Simulated];

fn backend(p: &mut Problems, name: &str, b: RawBackend, serves_text: bool, base: &Path) -> Option<BackendConfig> {
    let at = format!("backends.{name}");
    let start = p.len();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        p.push((at.clone(), "a backend name may only use letters, digits, `_` and `-`".into()));
    }
    let kinds = BackendKind::ALL.map(BackendKind::as_str).join(", ");
    let kind = match b.kind.as_deref() {
        None => {
            p.push((at.clone(), format!("`kind` is required (one of: {kinds})")));
            return None;
        }
        Some(k) => match BackendKind::parse(k) {
            Some(kind) => kind,
            None => {
                p.push((format!("{at}.kind"), format!("`{k}` is not one of: {kinds}")));
                return None;
            }
        },
    };

    // Fields that belong to other kinds are mistakes, not silently ignored.
    use BackendKind::{A1111, ComfyUi, Fal, HuggingFace, InvokeAi, OpenAi, Replicate, Simulated, Template};
    const REMOTE: &[BackendKind] = &[OpenAi, A1111, ComfyUi, InvokeAi, HuggingFace, Fal, Replicate, Template];
    let misplaced: [(&str, bool, &[BackendKind]); 11] = [
        ("url", b.url.is_some(), REMOTE),
        ("api_key", b.api_key.is_some(), REMOTE),
        (
            "max_images_per_call",
            b.max_images_per_call.is_some(),
            &[OpenAi, A1111, ComfyUi, InvokeAi, Fal, Replicate, Simulated],
        ),
        ("poll_interval", b.poll_interval.is_some(), &[ComfyUi, InvokeAi, Fal, Replicate, OpenAi, Simulated]),
        ("queue_id", b.queue_id.is_some(), &[InvokeAi]),
        ("method", b.method.is_some(), &[Template]),
        ("path", b.path.is_some(), &[Template]),
        ("body", b.body.is_some(), &[Template]),
        ("content_type", b.content_type.is_some(), &[Template]),
        ("response", b.response.is_some(), &[Template]),
        ("latency", b.latency.is_some() || b.failure.is_some(), &[Simulated]),
    ];
    for (field, present, kinds) in misplaced {
        if present && !kinds.contains(&kind) {
            let field = if field == "latency" && b.latency.is_none() { "failure" } else { field };
            let valid = kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
            p.push((format!("{at}.{field}"), format!("`{field}` does not apply to kind `{kind}` (only to: {valid})")));
        }
    }

    let default_url = match kind {
        BackendKind::Fal => Some("https://queue.fal.run"),
        BackendKind::Replicate => Some("https://api.replicate.com"),
        _ => None,
    };
    let url = match (kind, b.url.as_deref().or(default_url)) {
        (BackendKind::Simulated, _) => None,
        (_, None) => {
            p.push((
                at.clone(),
                format!("`url` is required for kind `{kind}` (the server's root, e.g. http://127.0.0.1:7860)"),
            ));
            None
        }
        (_, Some(s)) => match Url::parse(s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                let mut u = u;
                // OpenAI SDK users write the base URL with `/v1`; easel appends `/v1/...` itself.
                if kind == BackendKind::OpenAi {
                    let trimmed = u.path().trim_end_matches('/').trim_end_matches("/v1").to_owned();
                    u.set_path(&trimmed);
                }
                Some(u)
            }
            _ => {
                p.push((format!("{at}.url"), format!("`{s}` is not an http(s) URL with a host")));
                None
            }
        },
    };

    let (default_timeout, default_images) = match kind {
        BackendKind::OpenAi => (120, 8),
        BackendKind::A1111 => (600, 1),
        BackendKind::ComfyUi => (600, 2),
        BackendKind::InvokeAi => (600, 1),
        BackendKind::Fal | BackendKind::Replicate => (300, 8),
        BackendKind::HuggingFace => (120, 4),
        BackendKind::Template => (300, 2),
        BackendKind::Simulated => (60, 16),
    };
    let timeout = duration(p, &format!("{at}.timeout"), b.timeout.as_deref(), default_timeout);
    let connect_timeout = duration(p, &format!("{at}.connect_timeout"), b.connect_timeout.as_deref(), 5);

    let mut concurrency = BTreeMap::new();
    let c = b.concurrency.clone().unwrap_or_default();
    concurrency.insert(Capability::Images, c.images.unwrap_or(default_images));
    let videos_default = if VIDEO_KINDS.contains(&kind) { 2 } else { 0 };
    concurrency.insert(Capability::Videos, c.videos.unwrap_or(videos_default));
    concurrency.insert(Capability::Text, text_concurrency(kind, c.text, serves_text));
    if c.videos.is_some_and(|v| v > 0) && !VIDEO_KINDS.contains(&kind) {
        let kinds = VIDEO_KINDS.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
        p.push((format!("{at}.concurrency.videos"), format!("kind `{kind}` makes no videos (video kinds: {kinds})")));
    }
    for (cap, v) in [(Capability::Text, c.text)] {
        if v.is_some_and(|v| v > 0) && !(cap == Capability::Text && kind == BackendKind::OpenAi) {
            p.push((
                format!("{at}.concurrency.{}", cap.as_str()),
                format!("kind `{kind}` does not serve {} in this build", cap.as_str()),
            ));
        }
    }
    if concurrency.values().all(|v| *v == 0) {
        p.push((format!("{at}.concurrency"), "every limit is 0: the backend could serve nothing".into()));
    }

    let q = b.queue.clone().unwrap_or_default();
    let queue = QueueConfig {
        depth: q.depth.unwrap_or(16),
        wait: duration(p, &format!("{at}.queue.wait"), q.wait.as_deref(), 60),
    };

    let mut headers = Vec::new();
    for (k, v) in b.headers.clone().unwrap_or_default() {
        match (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
            (Ok(name), Ok(mut value)) => {
                value.set_sensitive(true);
                headers.push((name, value));
            }
            _ => p.push((format!("{at}.headers.{k}"), "not a valid HTTP header name and value".into())),
        }
    }

    let max_response_bytes = bytes(p, &format!("{at}.max_response"), b.max_response.as_deref(), 64 << 20);
    let max_images_per_call = match kind {
        BackendKind::OpenAi => b.max_images_per_call.unwrap_or(10),
        BackendKind::A1111 => b.max_images_per_call.unwrap_or(4),
        BackendKind::Simulated => b.max_images_per_call.unwrap_or(10),
        // One workflow run makes `batch_size` images; providers take `num_images`.
        BackendKind::ComfyUi | BackendKind::InvokeAi | BackendKind::Fal | BackendKind::Replicate => {
            b.max_images_per_call.unwrap_or(4)
        }
        BackendKind::HuggingFace | BackendKind::Template => 1,
    };
    if max_images_per_call == 0 {
        p.push((format!("{at}.max_images_per_call"), "must be at least 1".into()));
    }

    let template = if kind == BackendKind::Template { template(p, &at, &b) } else { None };
    let simulation = (kind == BackendKind::Simulated).then(|| simulation(p, &at, &b));
    let poll_interval = duration(p, &format!("{at}.poll_interval"), b.poll_interval.as_deref(), 0);
    let poll_interval = if poll_interval.is_zero() { Duration::from_millis(500) } else { poll_interval };
    let queue_id = b.queue_id.clone().unwrap_or_else(|| "default".into());

    let mut allow_output_hosts = Vec::new();
    for (i, h) in b.allow_output_hosts.clone().unwrap_or_default().iter().enumerate() {
        match HostPattern::parse(h) {
            Some(pat) => allow_output_hosts.push(pat),
            None => p.push((
                format!("{at}.allow_output_hosts[{i}]"),
                format!("`{h}` is not a host, `host:port` or `*.domain`"),
            )),
        }
    }
    let health_check = match &b.health {
        None => None,
        Some(h) => {
            let path = h.path.clone().unwrap_or_default();
            let expect_status = h.expect_status.unwrap_or(200);
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                p.push((format!("{at}.health.path"), "must be a path starting with `/`, e.g. /healthz".into()));
            }
            if !(100..=599).contains(&expect_status) {
                p.push((format!("{at}.health.expect_status"), format!("{expect_status} is not an HTTP status")));
            }
            if kind == BackendKind::Simulated {
                p.push((format!("{at}.health"), "a `simulated` backend has no server to probe".into()));
            }
            Some(HealthCheck { path, expect_status })
        }
    };

    let process = b.process.as_ref().and_then(|raw| process(p, &at, base, kind, url.as_ref(), raw));

    if p.len() > start {
        return None;
    }
    Some(BackendConfig {
        name: name.to_owned(),
        kind,
        url,
        api_key: b.api_key.map(Secret::new),
        timeout,
        connect_timeout,
        concurrency,
        queue,
        headers,
        max_response_bytes,
        max_images_per_call,
        template,
        simulation,
        poll_interval,
        queue_id,
        allow_output_hosts,
        health_check,
        process,
    })
}

/// Checks a `process:` block without touching the file system beyond `cwd` resolution.
fn process(
    p: &mut Problems,
    at: &str,
    base: &Path,
    kind: BackendKind,
    url: Option<&Url>,
    raw: &RawProcess,
) -> Option<ProcessConfig> {
    let at = format!("{at}.process");
    let start = p.len();
    if matches!(kind, BackendKind::Simulated | BackendKind::Fal | BackendKind::Replicate) {
        p.push((at.clone(), format!("kind `{kind}` has no local server for easel to run; remove `process`")));
        return None;
    }
    let argv = |p: &mut Problems, field: &str, v: Option<&Vec<String>>| -> Option<Vec<String>> {
        let v = v?;
        if v.is_empty() || v[0].trim().is_empty() {
            p.push((
                format!("{at}.{field}"),
                "must list the program and its arguments, e.g. [python, main.py, --port, \"8188\"]".into(),
            ));
            return None;
        }
        Some(v.clone())
    };
    let cmd = match argv(p, "cmd", raw.cmd.as_ref()) {
        Some(c) => c,
        None if raw.cmd.is_none() => {
            p.push((at.clone(), "`cmd` is required: the program and its arguments as a list".into()));
            Vec::new()
        }
        None => Vec::new(),
    };
    let cwd = raw.cwd.as_deref().map(|c| base.join(c));
    let env = raw.env.clone().unwrap_or_default();
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            p.push((format!("{at}.env"), format!("`{k}` is not an environment variable name")));
        }
    }
    let port = match url {
        Some(u) => {
            match u.port() {
                Some(port) => port,
                None => {
                    p.push((
                    at.clone(),
                    format!("the backend's url `{u}` must name the port the process listens on, e.g. http://127.0.0.1:8188"),
                ));
                    0
                }
            }
        }
        None => 0,
    };
    let stop = raw.stop.clone().unwrap_or_default();
    let stop_signal = match stop.signal.as_deref() {
        None => StopSignal::Term,
        Some(s) => StopSignal::parse(s).unwrap_or_else(|| {
            p.push((format!("{at}.stop.signal"), format!("`{s}` is not one of: TERM, INT, HUP, QUIT")));
            StopSignal::Term
        }),
    };
    if stop.signal.is_some() && stop.cmd.is_some() {
        p.push((format!("{at}.stop"), "give either `signal` or `cmd`, not both".into()));
    }
    let stop_cmd = argv(p, "stop.cmd", stop.cmd.as_ref());
    let restart = raw.restart.clone().unwrap_or_default();
    let ready_timeout = duration(p, &format!("{at}.ready_timeout"), raw.ready_timeout.as_deref(), 120);
    let grace = duration(p, &format!("{at}.stop.grace"), stop.grace.as_deref(), 10);
    let restart_backoff = duration(p, &format!("{at}.restart.backoff"), restart.backoff.as_deref(), 5);
    let restart_reset_after = duration(p, &format!("{at}.restart.reset_after"), restart.reset_after.as_deref(), 60);
    if ready_timeout.is_zero() {
        p.push((format!("{at}.ready_timeout"), "must be longer than 0s".into()));
    }
    if p.len() > start {
        return None;
    }
    Some(ProcessConfig {
        cmd,
        cwd,
        env,
        port,
        ready_timeout,
        stop_signal,
        stop_cmd,
        grace,
        restart_max: restart.max.unwrap_or(3),
        restart_backoff,
        restart_reset_after,
    })
}

fn template(p: &mut Problems, at: &str, b: &RawBackend) -> Option<TemplateConfig> {
    let method = match b.method.as_deref().unwrap_or("POST").to_ascii_uppercase().as_str() {
        "GET" => reqwest::Method::GET,
        "POST" => reqwest::Method::POST,
        "PUT" => reqwest::Method::PUT,
        other => {
            p.push((format!("{at}.method"), format!("`{other}` is not one of: GET, POST, PUT")));
            return None;
        }
    };
    let Some(path) = b.path.clone() else {
        p.push((at.to_owned(), "`path` is required for kind `template` (e.g. /generate)".into()));
        return None;
    };
    if !path.starts_with('/') {
        p.push((format!("{at}.path"), format!("`{path}` must start with `/`")));
    }
    let content_type = b.content_type.clone().unwrap_or_else(|| "application/json".into());
    let body = b.body.clone().unwrap_or_default();
    if method != reqwest::Method::GET && body.is_empty() {
        p.push((
            at.to_owned(),
            "`body` is required for a POST/PUT template (a minijinja template of the request)".into(),
        ));
    }
    if let Err(e) = crate::backends::template::check_body(&body, content_type.contains("json")) {
        p.push((format!("{at}.body"), e));
    }
    let images = match b.response.as_ref().and_then(|r| r.images.as_deref()) {
        None => None,
        Some(expr) => match JsonPath::parse(expr) {
            Ok(path) => Some(path),
            Err(e) => {
                p.push((format!("{at}.response.images"), format!("`{expr}` is not a JSON path: {e}")));
                None
            }
        },
    };
    Some(TemplateConfig { method, path, body, content_type, images })
}

fn simulation(p: &mut Problems, at: &str, b: &RawBackend) -> SimulationConfig {
    let latency = duration(p, &format!("{at}.latency"), b.latency.as_deref(), 0);
    let failure = b.failure.as_ref().and_then(|f| {
        let every = f.every.unwrap_or(1);
        if every == 0 {
            p.push((format!("{at}.failure.every"), "must be at least 1".into()));
        }
        let mode = match f.mode.as_deref().unwrap_or("status") {
            "status" => {
                let status = f.status.unwrap_or(500);
                if !(400..=599).contains(&status) {
                    p.push((format!("{at}.failure.status"), format!("{status} is not an HTTP error status (400-599)")));
                }
                FailureMode::Status(status)
            }
            "timeout" => FailureMode::Timeout,
            other => {
                p.push((format!("{at}.failure.mode"), format!("`{other}` is not one of: status, timeout")));
                return None;
            }
        };
        let message = f.message.clone().unwrap_or_else(|| "simulated failure".into());
        Some(SimulatedFailure { mode, message, every: every.max(1) })
    });
    SimulationConfig { latency, failure }
}

fn model(
    p: &mut Problems,
    at: &str,
    m: RawModel,
    backends: &BTreeMap<&str, &BackendConfig>,
    declared: &BTreeSet<String>,
    defaults: &Defaults,
    base: &Path,
) -> Option<ModelConfig> {
    let start = p.len();
    let id = match m.id {
        Some(id) if !id.is_empty() && !id.chars().any(char::is_whitespace) => id,
        Some(id) => {
            p.push((format!("{at}.id"), format!("`{id}` is not a valid model id (non-empty, no spaces)")));
            return None;
        }
        None => {
            p.push((at.to_owned(), "`id` is required".into()));
            return None;
        }
    };
    let job_timeout = duration(p, &format!("{at}.job_timeout"), m.job_timeout.as_deref(), 30 * 60);
    if m.credits.is_some() && m.credits_per_second.is_some() {
        p.push((
            format!("{at}.credits_per_second"),
            "set `credits` (per item) or `credits_per_second`, not both".into(),
        ));
    }
    if m.credits_per_second.is_some_and(|c| !c.is_finite() || c < 0.0) {
        p.push((format!("{at}.credits_per_second"), "must be a number >= 0".into()));
    }
    let kind = match m.kind.as_deref().unwrap_or("image") {
        "image" => ModelType::Image,
        "video" => ModelType::Video,
        "text" => ModelType::Text,
        other => {
            p.push((format!("{at}.type"), format!("`{other}` is not one of: image, video, text")));
            return None;
        }
    };
    if m.backends.is_empty() {
        p.push((format!("{at}.backends"), "list at least one backend".into()));
    }
    let edit_task = match m.edit_task.as_deref() {
        None => None,
        Some(t) => match EditTask::parse(t) {
            Some(task) if kind == ModelType::Image => Some(task),
            Some(_) => {
                p.push((format!("{at}.edit_task"), "only image models take edits".into()));
                None
            }
            None => {
                p.push((format!("{at}.edit_task"), format!("`{t}` is not one of: image-to-image, inpainting")));
                None
            }
        },
    };
    let mut list = Vec::new();
    if m.max_images_per_call == Some(0) {
        p.push((format!("{at}.max_images_per_call"), "must be at least 1".into()));
    }
    for (j, b) in m.backends.into_iter().enumerate() {
        let (name, weight, per_call) = match b {
            RawModelBackend::Name(n) => (n, 1, None),
            RawModelBackend::Weighted(w) => (w.name, w.weight.unwrap_or(1), w.max_images_per_call),
        };
        if per_call == Some(0) {
            p.push((format!("{at}.backends[{j}].max_images_per_call"), "must be at least 1".into()));
        }
        // This backend's per-call maximum for this model: its own entry's, else the model's, else the backend's.
        let max_images_per_call = per_call.or(m.max_images_per_call);
        match backends.get(name.as_str()) {
            // Declared but invalid: its own problems are already reported.
            None if declared.contains(&name) => {}
            None => {
                let names = declared.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
                p.push((format!("{at}.backends[{j}]"), format!("no backend named `{name}` (defined: {names})")));
            }
            Some(b) if kind == ModelType::Text => text_backend(p, &format!("{at}.backends[{j}]"), b),
            Some(b) if kind == ModelType::Image && b.limit(Capability::Images) == 0 => {
                p.push((
                    format!("{at}.backends[{j}]"),
                    format!("backend `{name}` has concurrency.images 0, so it serves no image model"),
                ));
            }
            Some(b) if kind == ModelType::Video && !VIDEO_KINDS.contains(&b.kind) => {
                let kinds = VIDEO_KINDS.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
                p.push((
                    format!("{at}.backends[{j}]"),
                    format!("backend `{name}` is kind `{}`, which makes no videos (video kinds: {kinds})", b.kind),
                ));
            }
            Some(b) if kind == ModelType::Video && b.limit(Capability::Videos) == 0 => {
                p.push((
                    format!("{at}.backends[{j}]"),
                    format!("backend `{name}` has concurrency.videos 0, so it serves no video model"),
                ));
            }
            Some(_) => {}
        }
        if weight == 0 {
            p.push((format!("{at}.backends[{j}]"), "weight must be at least 1".into()));
        }
        list.push(ModelBackend { name, weight, max_images_per_call });
    }
    let needs_workflow: Vec<&str> = list
        .iter()
        .filter_map(|b| backends.get(b.name.as_str()))
        .filter(|b| matches!(b.kind, BackendKind::ComfyUi | BackendKind::InvokeAi))
        .map(|b| b.name.as_str())
        .collect();
    let workflow = match (&m.workflow, needs_workflow.is_empty()) {
        (Some(path), false) => match Workflow::load(path, base) {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                p.push((format!("{at}.workflow"), e));
                None
            }
        },
        (Some(_), true) => {
            p.push((
                format!("{at}.workflow"),
                "`workflow` is only used by comfyui and invokeai backends, and this model has none".into(),
            ));
            None
        }
        (None, false) => {
            p.push((at.to_owned(), format!("`workflow` is required: backend `{}` runs a workflow template (a JSON file with {{{{ prompt }}}}-style placeholders)", needs_workflow.join("`, `"))));
            None
        }
        (None, true) => None,
    };
    let sizes = m.sizes.as_ref().map(|list| {
        list.iter().enumerate().filter_map(|(j, s)| size(p, &format!("{at}.sizes[{j}]"), Some(s))).collect::<Vec<_>>()
    });
    let max_size = size(p, &format!("{at}.max_size"), m.max_size.as_deref()).unwrap_or(Size::new(4096, 4096));
    let default_size = size(p, &format!("{at}.default_size"), m.default_size.as_deref())
        .or_else(|| sizes.as_ref().and_then(|s| s.first().copied()))
        .unwrap_or(defaults.size);
    if let Some(s) = &sizes
        && !s.contains(&default_size)
    {
        p.push((format!("{at}.default_size"), format!("{default_size} is not in `sizes`")));
    }
    let max_n = m.max_n.unwrap_or(defaults.n_max);
    if !(1..=128).contains(&max_n) {
        p.push((format!("{at}.max_n"), format!("{max_n} is outside 1..=128")));
    }
    let (credits, token_credits) = credits(p, at, m.credits.as_ref(), kind);
    if m.max_output_tokens == Some(0) {
        p.push((format!("{at}.max_output_tokens"), "must be at least 1".into()));
    }
    if p.len() > start {
        return None;
    }
    for (i, a) in m.aliases.iter().enumerate() {
        if a.is_empty() || a.chars().any(char::is_whitespace) {
            p.push((format!("{at}.aliases[{i}]"), format!("`{a}` is not a valid model id (non-empty, no spaces)")));
        } else if *a == id {
            p.push((format!("{at}.aliases[{i}]"), format!("`{a}` is the model's own id")));
        }
    }
    let variation_prompt = match m.variation_prompt {
        Some(v) if v.trim().is_empty() => {
            p.push((format!("{at}.variation_prompt"), "must not be empty (leave it out for the default)".into()));
            return None;
        }
        Some(v) => v,
        None => DEFAULT_VARIATION_PROMPT.to_owned(),
    };
    Some(ModelConfig {
        variation_prompt,
        aliases: m.aliases,
        upstream_model: m.upstream_model.unwrap_or_else(|| id.clone()),
        id,
        kind,
        backends: list,
        credits,
        token_credits,
        max_output_tokens: m.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
        working_set: m.working_set,
        description: m.description,
        sizes,
        default_size,
        max_size,
        max_n,
        max_prompt_chars: m.max_prompt_chars.unwrap_or(32_000) as usize,
        steps: m.steps,
        guidance_scale: m.guidance_scale,
        negative_prompt: m.negative_prompt,
        workflow,
        credits_per_second: m.credits_per_second,
        job_timeout,
        edit_task,
    })
}

/// The prompt of `/v1/images/variations` on a model that sets no `variation_prompt`: neutral, so the variation
/// stays close to the input (every backend's edit needs some prompt; OpenAI's refuses an empty one).
pub const DEFAULT_VARIATION_PROMPT: &str = "a variation of this image";

/// Completion tokens a text request is assumed to ask for when it sets no `max_tokens` (the hold's estimate).
const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 4096;
/// `concurrency.text` of an `openai` backend that a text model uses and that sets none.
const DEFAULT_TEXT_CONCURRENCY: u32 = 8;

/// Names of the backends listed by `type: text` models.
fn text_backends(models: &[RawModel]) -> BTreeSet<String> {
    models
        .iter()
        .filter(|m| m.kind.as_deref() == Some("text"))
        .flat_map(|m| m.backends.iter())
        .map(|b| match b {
            RawModelBackend::Name(n) => n.clone(),
            RawModelBackend::Weighted(w) => w.name.clone(),
        })
        .collect()
}

/// A backend's text limit: as configured, else a default for an `openai` backend a text model uses.
fn text_concurrency(kind: BackendKind, configured: Option<u32>, serves_text: bool) -> u32 {
    match configured {
        Some(v) => v,
        None if serves_text && kind == BackendKind::OpenAi => DEFAULT_TEXT_CONCURRENCY,
        None => 0,
    }
}

/// A text model's backend must speak the OpenAI text API and have text capacity.
fn text_backend(p: &mut Problems, at: &str, b: &BackendConfig) {
    if b.kind != BackendKind::OpenAi {
        p.push((
            at.to_owned(),
            format!("backend `{}` is kind `{}`; a text model needs `openai`-kind backends", b.name, b.kind),
        ));
    } else if b.limit(Capability::Text) == 0 {
        p.push((at.to_owned(), format!("backend `{}` has concurrency.text 0, so it serves no text model", b.name)));
    }
}

/// `credits`: a number (per image; per request on a text model), or on a text model `{per_request}` or
/// `{input_per_1k, output_per_1k}`.
fn credits(
    p: &mut Problems,
    at: &str,
    raw: Option<&RawCredits>,
    kind: ModelType,
) -> (Option<f64>, Option<TokenCredits>) {
    let at = format!("{at}.credits");
    let check = |p: &mut Problems, key: &str, v: f64| {
        if v < 0.0 || !v.is_finite() {
            let at = if key.is_empty() { at.clone() } else { format!("{at}.{key}") };
            p.push((at, "must be a number >= 0".into()));
        }
        v
    };
    match raw {
        None => (None, None),
        Some(RawCredits::Flat(c)) => (Some(check(p, "", *c)), None),
        Some(RawCredits::Rates(_)) if kind != ModelType::Text => {
            p.push((at.clone(), "must be a number (credits per image)".into()));
            (None, None)
        }
        Some(RawCredits::Rates(r)) => match (r.per_request, r.input_per_1k, r.output_per_1k) {
            (Some(c), None, None) => (Some(check(p, "per_request", c)), None),
            (None, i, o) if i.is_some() || o.is_some() => {
                let input_per_1k = check(p, "input_per_1k", i.unwrap_or(0.0));
                let output_per_1k = check(p, "output_per_1k", o.unwrap_or(0.0));
                (None, Some(TokenCredits { input_per_1k, output_per_1k }))
            }
            _ => {
                p.push((at.clone(), "set either `per_request` or `input_per_1k`/`output_per_1k`".into()));
                (None, None)
            }
        },
    }
}

fn size(p: &mut Problems, at: &str, s: Option<&str>) -> Option<Size> {
    let s = s?;
    match Size::parse(s) {
        Some(size) => Some(size),
        None => {
            p.push((at.to_owned(), format!("`{s}` is not a size like 1024x1024")));
            None
        }
    }
}

/// `storage.files: s3://<location>` with its `storage.s3` block. Never echoes a credential.
fn s3(p: &mut Problems, location: &str, raw: Option<&RawS3>) -> Option<S3Config> {
    let default = RawS3::default();
    let raw = raw.unwrap_or(&default);
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    let prefix = prefix.trim_matches('/');
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    let mut ok = true;
    if !bucket_ok {
        p.push((
            "storage.files".into(),
            format!(
                "`{bucket}` is not an S3 bucket name (3 to 63 lowercase letters, digits, `-` and `.`); \
                 write `s3://bucket/prefix`"
            ),
        ));
        ok = false;
    }
    if !prefix.is_empty() && prefix.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        p.push(("storage.files".into(), format!("the key prefix `{prefix}` has an empty, `.` or `..` segment")));
        ok = false;
    }
    let allow_http = raw.allow_http.unwrap_or(false);
    let endpoint = raw.endpoint.as_deref().and_then(|e| match Url::parse(e) {
        Ok(u) if u.scheme() == "https" || (u.scheme() == "http" && allow_http) => Some(u),
        Ok(u) if u.scheme() == "http" => {
            p.push((
                "storage.s3.endpoint".into(),
                format!("`{e}` is plain HTTP; set `storage.s3.allow_http: true` to allow it"),
            ));
            ok = false;
            Some(u)
        }
        _ => {
            p.push(("storage.s3.endpoint".into(), format!("`{e}` is not an http(s) URL")));
            ok = false;
            None
        }
    });
    let region = raw.region.clone().unwrap_or_else(|| "us-east-1".into());
    if region.is_empty() {
        p.push(("storage.s3.region".into(), "must not be empty (S3-compatible servers accept `us-east-1`)".into()));
        ok = false;
    }
    let key_id = raw.access_key_id.clone().filter(|k| !k.is_empty()).map(Secret::new);
    let secret = raw.secret_access_key.clone().filter(|k| !k.is_empty()).map(Secret::new);
    match (&key_id, &secret) {
        (Some(_), None) => {
            p.push(("storage.s3.secret_access_key".into(), "is needed with `access_key_id`".into()));
            ok = false;
        }
        (None, Some(_)) => {
            p.push(("storage.s3.access_key_id".into(), "is needed with `secret_access_key`".into()));
            ok = false;
        }
        _ => {}
    }
    let presign_ttl = duration(p, "storage.s3.presign_ttl", raw.presign_ttl.as_deref(), 3600);
    if presign_ttl.is_zero() || presign_ttl > Duration::from_secs(7 * 24 * 3600) {
        p.push(("storage.s3.presign_ttl".into(), "must be between 1s and 7d (S3's limit for presigned URLs)".into()));
        ok = false;
    }
    ok.then(|| S3Config {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        endpoint,
        region,
        access_key_id: key_id,
        secret_access_key: secret,
        path_style: raw.path_style.unwrap_or(false),
        allow_http,
        presign: raw.presign.unwrap_or(false),
        presign_ttl,
    })
}

fn duration(p: &mut Problems, at: &str, s: Option<&str>, default_secs: u64) -> Duration {
    match s {
        None => Duration::from_secs(default_secs),
        Some(s) => humantime::parse_duration(s).unwrap_or_else(|_| {
            p.push((at.to_owned(), format!("`{s}` is not a duration (e.g. 500ms, 30s, 5m)")));
            Duration::from_secs(default_secs)
        }),
    }
}

fn positive(p: &mut Problems, at: &str, v: Option<u32>, default: u32) -> u32 {
    match v {
        Some(0) => {
            p.push((at.to_owned(), "must be at least 1".into()));
            default
        }
        Some(v) => v,
        None => default,
    }
}

/// Parses `1048576`, `512KiB`, `64MiB`, `10MB`, `1GiB`.
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// 48 megapixels: an 8K (7680×4320) image and a 6928×6928 square fit.
const DEFAULT_MAX_IMAGE_PIXELS: u64 = 48_000_000;

fn bytes(p: &mut Problems, at: &str, s: Option<&str>, default: usize) -> usize {
    match s {
        None => default,
        Some(s) => parse_bytes(s).unwrap_or_else(|| {
            p.push((at.to_owned(), format!("`{s}` is not a size in bytes (e.g. 64MiB, 10MB, 1048576)")));
            default
        }),
    }
}

/// `server.drain_timeout` (or its older name `server.shutdown_grace`, not both): 30 s by default, at most an hour.
fn drain_timeout(p: &mut Problems, server: &super::raw::RawServer) -> Duration {
    let (field, value) = match (server.drain_timeout.as_deref(), server.shutdown_grace.as_deref()) {
        (Some(_), Some(_)) => {
            p.push((
                "server.drain_timeout".into(),
                "set `drain_timeout` or its older name `shutdown_grace`, not both".into(),
            ));
            return Duration::from_secs(30);
        }
        (None, Some(v)) => ("server.shutdown_grace", Some(v)),
        (v, None) => ("server.drain_timeout", v),
    };
    let d = duration(p, field, value, 30);
    if d > Duration::from_secs(3600) {
        p.push((field.into(), format!("{}s is longer than the 1h a drain may take", d.as_secs())));
    }
    d
}

#[cfg(test)]
mod cluster_tests {
    use std::path::Path;

    use super::super::{ClusterFallback, MapEnv, from_str};

    const BASE: &str = "backends:\n  sim:\n    kind: simulated\nmodels:\n  - id: m\n    backends: [sim]\n";

    #[test]
    fn cluster_and_key_limits_are_typed_with_defaults() {
        let text = format!(
            "cluster: {{redis: 'redis://:pw@127.0.0.1:6380/2', fallback: local, fleet_size: 3}}\nauth: {{mode: keys, key_limits: {{requests_per_minute: 60, max_parallel: 2}}}}\n{BASE}"
        );
        let cfg = from_str(&text, "easel.yaml", Path::new("."), &MapEnv::default()).unwrap();
        let cluster = cfg.cluster.unwrap();
        assert_eq!(cluster.lease, std::time::Duration::from_secs(10));
        assert_eq!(cluster.fallback, ClusterFallback::Local { fleet_size: 3 });
        assert!(!format!("{cluster:?}").contains("pw"), "the URL's password never reaches logs");
        assert_eq!(cfg.auth.key_limits.requests_per_minute, Some(60));
        assert_eq!(cfg.auth.key_limits.max_parallel, Some(2));
        assert!(from_str(BASE, "easel.yaml", Path::new("."), &MapEnv::default()).unwrap().cluster.is_none());
    }

    #[test]
    fn every_cluster_problem_is_reported_before_any_connection() {
        let text = format!(
            "cluster: {{redis: 'http://nope', lease: 10ms, fallback: local}}\nauth: {{key_limits: {{requests_per_minute: 0}}}}\n{BASE}"
        );
        let err = from_str(&text, "easel.yaml", Path::new("."), &MapEnv::default()).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "cluster.redis",
            "cluster.lease",
            "cluster.fleet_size",
            "auth.key_limits.requests_per_minute",
            "auth.key_limits",
        ] {
            assert!(paths.contains(&want), "no problem at {want}: {err}");
        }
        let text = format!("cluster: {{fallback: closed, fleet_size: 2}}\n{BASE}");
        let err = from_str(&text, "easel.yaml", Path::new("."), &MapEnv::default()).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"cluster.fleet_size") && paths.contains(&"cluster.fallback"), "{err}");
    }
}
