//! `AppState`: the cheap-to-clone handle every handler gets, built once from a validated config.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::task::TaskTracker;

use crate::backends::AnyBackend;
use crate::config::{Capability, Config};
use crate::health::Health;
use crate::ledger::{AnyStore, Millicredits, Settling, Store, to_mc};
use crate::routing::{BackendHandle, Registry};
use crate::storage::FileStore;
use crate::storage::signing::UrlSigner;

/// Shared state. Construct with [`AppState::build`].
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Runtime>,
}

/// Everything a request needs, built together from one config.
#[derive(Debug)]
pub struct Runtime {
    pub config: Config,
    pub registry: Registry,
    /// By backend name.
    pub backends: HashMap<String, Arc<BackendHandle>>,
    /// Sorted by name (for status pages and probes).
    pub backend_list: Vec<Arc<BackendHandle>>,
    pub files: FileStore,
    /// Signs output URLs (`?exp=…&sig=…`).
    pub signer: UrlSigner,
    /// Keys, credits and idempotency records.
    pub ledger: Arc<AnyStore>,
    /// Current price per model: (price row id, millicredits per image). Every model has one (0 = free), so
    /// usage is recorded for all.
    pub prices: HashMap<String, (i64, Millicredits)>,
    pub metrics: PrometheusHandle,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Background work that must finish before the process exits (probes, settlements); shutdown waits on it.
    pub tasks: TaskTracker,
    /// Holds being settled right now (read-your-writes for balances).
    pub settling: Arc<Settling>,
    /// The job runner's slots and wake-up bell (shared by every runtime a reload builds).
    pub jobs: Arc<crate::jobs::Jobs>,
    /// SIGTERM's drain: refuses new requests, counts those still running (shared by every runtime a reload builds).
    pub drain: Arc<crate::http::drain::Drain>,
    /// Supervisors of backends with a `process:` block.
    pub processes: crate::process::Processes,
    /// Hosts and their working sets (one actor per host, started by the server).
    pub sets: crate::sets::Sets,
    /// Fleet-wide admission through Redis (`cluster.redis`) and per-key limits.
    pub cluster: Arc<crate::admission::Cluster>,
    /// The latest failed requests with their messages (for the status page).
    pub recent_errors: Arc<crate::telemetry::recent::RecentErrors>,
}

impl AppState {
    /// Builds adapters, gates and storage. Opens the files directory; contacts no backend.
    pub async fn build(config: Config) -> Result<Self, String> {
        let files = FileStore::from_config(&config.storage).await.map_err(|e| e.to_string())?;
        let secret = config.storage.signing_secret.as_ref().map(|s| s.expose());
        let signer = UrlSigner::load(secret, files.root(), config.storage.url_ttl).await.map_err(|e| e.to_string())?;
        let ledger = Arc::new(AnyStore::open(&config.storage.database, true).await.map_err(|e| e.to_string())?);
        let released = ledger.recover().await.map_err(|e| e.to_string())?;
        if released > 0 {
            tracing::warn!(released, "Released credit holds left by a previous process.");
        }
        let prices = record_prices(&ledger, &config).await?;
        let cluster = Arc::new(crate::admission::Cluster::new(config.cluster.as_ref(), config.auth.key_limits)?);
        let (backends, backend_list) = build_backends(&config, &cluster, None)?;
        let processes = crate::process::Processes::new(
            &backend_list,
            crate::process::state_file_path(&config.storage.files),
            config.health.timeout,
        );
        let sets = crate::sets::Sets::new(&config);
        let registry = Registry::new(config.models.clone());
        let metrics = crate::telemetry::metrics::install();
        Ok(Self {
            inner: Arc::new(Runtime {
                jobs: Arc::new(crate::jobs::Jobs::owned_by(ledger.instance_id())),
                config,
                registry,
                backends,
                backend_list,
                files,
                signer,
                ledger,
                prices,
                metrics,
                started: Instant::now(),
                started_at: SystemTime::now(),
                tasks: TaskTracker::new(),
                settling: Arc::default(),
                drain: Arc::default(),
                processes,
                sets,
                cluster,
                recent_errors: Arc::default(),
            }),
        })
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner
    }

    /// The runtime a reload to `config` gives: new models, prices and routes; the same handle (admission counts,
    /// health, circuit) for every backend whose definition did not change, a new one for each that did; backends
    /// no longer configured stay reachable by name (not routed to) so their running jobs finish there. Storage,
    /// the ledger, the job runner, managed processes and hosts are shared with this runtime: the caller has
    /// checked that their settings did not change.
    pub async fn rebuild(&self, config: Config) -> Result<Self, String> {
        let prices = record_prices(&self.ledger, &config).await?;
        let (mut backends, backend_list) = build_backends(&config, &self.cluster, Some(self))?;
        for (name, old) in &self.backends {
            backends.entry(name.clone()).or_insert_with(|| Arc::clone(old));
        }
        let registry = Registry::new(config.models.clone());
        Ok(Self {
            inner: Arc::new(Runtime {
                config,
                registry,
                backends,
                backend_list,
                files: self.files.clone(),
                signer: self.signer.clone(),
                ledger: Arc::clone(&self.ledger),
                prices,
                metrics: self.metrics.clone(),
                started: self.started,
                started_at: self.started_at,
                tasks: self.tasks.clone(),
                settling: Arc::clone(&self.settling),
                jobs: Arc::clone(&self.jobs),
                drain: Arc::clone(&self.drain),
                cluster: Arc::clone(&self.cluster),
                processes: self.processes.clone(),
                sets: self.sets.clone(),
                recent_errors: Arc::clone(&self.recent_errors),
            }),
        })
    }
}

/// Records every model's current price; returns (price row id, millicredits) by model.
async fn record_prices(
    ledger: &crate::ledger::AnyStore,
    config: &Config,
) -> Result<HashMap<String, (i64, Millicredits)>, String> {
    let mut prices = HashMap::new();
    for m in &config.models {
        let mc = m.credits.map_or(0, to_mc);
        let (unit, price, output) = price_row(m, mc);
        let id = ledger.upsert_price(&m.id, unit, price, output).await.map_err(|e| e.to_string())?;
        prices.insert(m.id.clone(), (id, mc));
    }
    Ok(prices)
}

type Backends = (HashMap<String, Arc<BackendHandle>>, Vec<Arc<BackendHandle>>);

/// The backends of `config`, by name and sorted; a backend defined exactly as in `previous` keeps its handle.
fn build_backends(
    config: &Config,
    cluster: &crate::admission::Cluster,
    previous: Option<&Runtime>,
) -> Result<Backends, String> {
    let mut backends = HashMap::new();
    let mut backend_list = Vec::new();
    for cfg in &config.backends {
        let kept = previous.and_then(|p| p.backends.get(&cfg.name)).filter(|h| same_backend(&h.cfg, cfg));
        let handle = match kept {
            Some(h) => Arc::clone(h),
            None => {
                let adapter = AnyBackend::build(Arc::clone(cfg))?;
                let gates = Capability::ALL
                    .into_iter()
                    .filter(|c| cfg.limit(*c) > 0)
                    .map(|c| (c, cluster.gate(&cfg.name, c, cfg.limit(c), cfg.queue.depth, cfg.queue.wait)))
                    .collect();
                Arc::new(BackendHandle {
                    cfg: Arc::clone(cfg),
                    adapter,
                    gates,
                    health: Health::new(&cfg.name, &config.health),
                })
            }
        };
        backends.insert(cfg.name.clone(), Arc::clone(&handle));
        backend_list.push(handle);
    }
    Ok((backends, backend_list))
}

/// Whether two definitions of a backend are the same in every setting, secrets included (their `Debug` hides
/// them, so they are compared apart).
pub fn same_backend(a: &crate::config::BackendConfig, b: &crate::config::BackendConfig) -> bool {
    format!("{a:?}") == format!("{b:?}")
        && a.api_key.as_ref().map(|k| k.expose()) == b.api_key.as_ref().map(|k| k.expose())
        && a.headers == b.headers
}

impl Runtime {
    /// Process start in Unix seconds (the `created` of models).
    pub fn started_unix(&self) -> u64 {
        self.started_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }
}

impl std::ops::Deref for AppState {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        &self.inner
    }
}

/// The unit and prices a model's price row records: per 1K tokens (input, output), per second of video, per
/// text or video request, or per image.
fn price_row(m: &crate::config::ModelConfig, mc: crate::ledger::Millicredits) -> (&'static str, i64, i64) {
    match (m.token_credits, m.credits_per_second) {
        (Some(t), _) => ("1k_tokens", to_mc(t.input_per_1k), to_mc(t.output_per_1k)),
        (None, Some(s)) => ("second", to_mc(s), 0),
        (None, None) if m.kind != crate::config::ModelType::Image => ("request", mc, 0),
        (None, None) => ("image", mc, 0),
    }
}
