//! Backend health: background probes (each adapter's cheap native probe) that flip state only after N consecutive
//! results, plus a circuit breaker fed by live traffic (open after consecutive backend faults, half-open probe
//! after the cooldown). Routing, `/readyz`, `/health` and `/v1/gateway/status` all read the same state.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backends::Failure;
use crate::backends::{BackendError, ProbeReport};
use crate::config::{BackendConfig, BackendKind, HealthCheck, HealthConfig};
use crate::routing::BackendHandle;
use crate::telemetry::metrics as m;

/// The health of one backend.
#[derive(Debug)]
pub struct Health {
    name: String,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    circuit_failures: u32,
    cooldown: Duration,
    state: Mutex<State>,
    /// The client of a configured `health: {path, expect_status}` probe, built on first use.
    check_client: OnceLock<Result<reqwest::Client, String>>,
}

#[derive(Debug, Default)]
struct State {
    /// False until the first probe finished.
    checked: bool,
    healthy: bool,
    ready: bool,
    last_check: Option<SystemTime>,
    latency_ms: Option<u64>,
    error: Option<String>,
    detail: Option<String>,
    ok_streak: u32,
    fail_streak: u32,
    /// Consecutive backend faults seen by live requests.
    call_faults: u32,
    open_until: Option<Instant>,
    open_until_wall: Option<SystemTime>,
    /// A half-open trial request is in flight.
    trial: bool,
}

/// What routing may do with a backend now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The circuit is half-open: this request is the one trial.
    Trial,
    No(String),
}

/// A copy of the state for status pages.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub healthy: bool,
    pub ready: bool,
    pub checked: bool,
    pub last_check: Option<String>,
    pub latency_ms: Option<u64>,
    pub error: Option<String>,
    pub detail: Option<String>,
    pub circuit: &'static str,
    pub cooldown_until: Option<String>,
}

impl Health {
    pub fn new(name: &str, cfg: &HealthConfig) -> Self {
        Self {
            name: name.to_owned(),
            healthy_threshold: cfg.healthy_threshold,
            unhealthy_threshold: cfg.unhealthy_threshold,
            circuit_failures: cfg.circuit_failures,
            cooldown: cfg.circuit_cooldown,
            state: Mutex::new(State { healthy: true, ..State::default() }),
            check_client: OnceLock::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Records a probe result; the first one sets the state directly, later ones after the thresholds.
    pub fn record_probe(&self, result: &Result<ProbeReport, BackendError>, took: Duration) {
        let (was, healthy, error) = self.with(|s| {
            // Before the first probe a backend counts as up, so a first failing probe logs "down" once.
            let was = s.healthy;
            s.last_check = Some(SystemTime::now());
            s.latency_ms = Some(took.as_millis() as u64);
            match result {
                Ok(report) => {
                    s.ok_streak += 1;
                    s.fail_streak = 0;
                    s.detail = Some(report.detail.clone());
                    s.error = None;
                    if !s.checked || s.ok_streak >= self.healthy_threshold {
                        s.healthy = true;
                    }
                    s.ready = s.healthy && report.ready;
                    if !report.ready {
                        s.error = Some(format!("not ready: {}", report.detail));
                    }
                }
                Err(e) => {
                    s.fail_streak += 1;
                    s.ok_streak = 0;
                    s.error = Some(e.to_string());
                    if !s.checked || s.fail_streak >= self.unhealthy_threshold {
                        s.healthy = false;
                        s.ready = false;
                    }
                }
            }
            s.checked = true;
            (was, s.healthy, s.error.clone())
        });
        m::backend_health(&self.name, healthy);
        match (was, healthy) {
            (true, false) => tracing::warn!(
                backend = %self.name,
                reason = error.as_deref().unwrap_or("unknown"),
                "Backend is down."
            ),
            (false, true) => tracing::info!(backend = %self.name, "Backend is up again."),
            _ => {}
        }
    }

    /// Records the end of a live upstream call for the circuit breaker.
    pub fn record_call(&self, backend_fault: bool) {
        let opened = self.with(|s| {
            let was_trial = std::mem::take(&mut s.trial);
            if !backend_fault {
                s.call_faults = 0;
                s.open_until = None;
                s.open_until_wall = None;
                return Some(false);
            }
            s.call_faults += 1;
            if was_trial || s.call_faults >= self.circuit_failures {
                s.open_until = Some(Instant::now() + self.cooldown);
                s.open_until_wall = Some(SystemTime::now() + self.cooldown);
                return Some(true);
            }
            None
        });
        if let Some(open) = opened {
            m::circuit(&self.name, open);
            if open {
                tracing::warn!(backend = %self.name, cooldown_s = self.cooldown.as_secs(), "Circuit opened after consecutive backend failures.");
            }
        }
    }

    /// Whether routing may send a request now.
    pub fn admit(&self) -> Admit {
        self.with(|s| {
            if !s.healthy {
                return Admit::No(s.error.clone().unwrap_or_else(|| "unhealthy".into()));
            }
            match s.open_until {
                None => Admit::Yes,
                Some(until) if Instant::now() < until => Admit::No(format!(
                    "circuit open after {} consecutive failures (cooling down {}s)",
                    s.call_faults,
                    until.saturating_duration_since(Instant::now()).as_secs().max(1)
                )),
                Some(_) if s.trial => Admit::No("circuit half-open: a trial request is in flight".into()),
                Some(_) => {
                    s.trial = true;
                    Admit::Trial
                }
            }
        })
    }

    /// Gives back an unused half-open trial (the request never reached the backend).
    pub fn release_trial(&self) {
        self.with(|s| s.trial = false);
    }

    pub fn is_healthy(&self) -> bool {
        self.with(|s| s.healthy)
    }

    pub fn is_ready(&self) -> bool {
        self.with(|s| s.ready && s.open_until.is_none_or(|u| Instant::now() >= u))
    }

    pub fn snapshot(&self) -> Snapshot {
        self.with(|s| {
            let open = s.open_until.is_some_and(|u| Instant::now() < u);
            Snapshot {
                healthy: s.healthy,
                ready: s.ready,
                checked: s.checked,
                last_check: s.last_check.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                latency_ms: s.latency_ms,
                error: s.error.clone(),
                detail: s.detail.clone(),
                circuit: if open {
                    "open"
                } else if s.open_until.is_some() {
                    "half_open"
                } else {
                    "closed"
                },
                cooldown_until: if open {
                    s.open_until_wall.map(|t| humantime::format_rfc3339_seconds(t).to_string())
                } else {
                    None
                },
            }
        })
    }
}

/// Probes every backend once, concurrently, each bounded by the probe timeout.
pub async fn probe_all(backends: &[Arc<BackendHandle>], timeout: Duration) {
    let probes = backends.iter().map(|b| async move {
        let started = Instant::now();
        let result = probe_one(b, timeout).await;
        b.health.record_probe(&result, started.elapsed());
    });
    futures_util::future::join_all(probes).await;
}

/// One probe of one backend (its configured `health` check, else the kind's native probe), bounded by `timeout`;
/// records nothing.
pub async fn probe_one(b: &BackendHandle, timeout: Duration) -> Result<ProbeReport, BackendError> {
    let probe = async {
        match &b.cfg.health_check {
            Some(check) => configured_probe(&b.cfg, check, &b.health, timeout).await,
            None => b.adapter.probe().await,
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::new(
            &b.cfg.name,
            b.cfg.kind,
            b.cfg.endpoint(""),
            crate::backends::Failure::Timeout(timeout),
        )),
    }
}

/// `GET {url}{path}` with the backend's headers and key; healthy when the status is `expect_status`.
async fn configured_probe(
    cfg: &BackendConfig,
    check: &HealthCheck,
    health: &Health,
    timeout: Duration,
) -> Result<ProbeReport, BackendError> {
    let url = cfg.endpoint(&check.path);
    let fail = |failure| BackendError::new(&cfg.name, cfg.kind, url.clone(), failure);
    let client = health
        .check_client
        .get_or_init(|| {
            let mut headers = reqwest::header::HeaderMap::new();
            for (k, v) in &cfg.headers {
                headers.insert(k.clone(), v.clone());
            }
            reqwest::Client::builder()
                .default_headers(headers)
                .connect_timeout(cfg.connect_timeout.min(timeout))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| fail(Failure::InvalidResponse(format!("cannot build the health-check client: {e}"))))?;
    let mut rb = client.get(&url).timeout(timeout);
    if let Some(key) = &cfg.api_key {
        rb = match cfg.kind {
            BackendKind::Fal => rb.header(reqwest::header::AUTHORIZATION, format!("Key {}", key.expose())),
            _ => rb.bearer_auth(key.expose()),
        };
    }
    let resp = rb.send().await.map_err(|e| fail(crate::backends::client::transport_failure(&e, timeout)))?;
    let status = resp.status().as_u16();
    if status == check.expect_status {
        return Ok(ProbeReport { ready: true, detail: format!("health check GET {} answered {status}", check.path) });
    }
    Err(fail(Failure::Status {
        status,
        message: format!("health check GET {} answered {status}, expected {}", check.path, check.expect_status),
        hint: None,
        retry_after: None,
    }))
}

/// Probes on an interval until cancelled.
pub async fn run(live: crate::reload::Live, cancel: CancellationToken) {
    let cfg: HealthConfig = live.current().config.health.clone();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; the first round ran at startup
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {
                // The backends configured now (a reload's new ones are probed from the next round).
                let state = live.current();
                probe_all(&state.backend_list, state.config.health.timeout).await;
            }
        }
    }
}

/// The `redis` entry of `/health` with `cluster.redis` set (`None` without it).
pub fn redis_report(cluster: &crate::admission::Cluster) -> Option<crate::admission::fleet::RedisReport> {
    cluster.fleet.as_ref().map(|f| f.report())
}
