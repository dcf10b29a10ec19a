//! Working sets: one actor per host starts and stops its managed backends as a unit, swaps between sets without
//! killing work, and tells requests whether their model can run now, after a swap, or not at all.

mod restart;
pub mod scheduler;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::scheduler::{Action, Event, Host, Outcome, Phase, Settings};
use crate::config::{BackendKind, Config, HostConfig, ModelConfig};
use crate::process::Processes;
use crate::routing::BackendHandle;
use crate::telemetry::metrics as m;

/// How often an actor looks at its members' work.
const TICK: Duration = Duration::from_millis(100);
/// Output lines of a member that gave up, quoted in the 503 its set's requests get.
const FAILURE_LINES: usize = 20;
/// Longest a backend's own busy signal may take to answer.
const NATIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request cannot run on its working set now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SetError {
    #[error(
        "model `{model}` is in working set `{set}`; host `{host}` has {active} active (mode manual); switch with \
         `POST /v1/admin/working-sets/{set}/activate`"
    )]
    Inactive { model: String, set: String, host: String, active: String },
    #[error("model `{model}` waits for working set `{set}` on host `{host}`, and the swap queue is full")]
    Full { model: String, set: String, host: String, retry_after: Duration },
    #[error("model `{model}` waited {waited}s for working set `{set}` to start on host `{host}`; try again shortly")]
    Switching { model: String, set: String, host: String, waited: u64, retry_after: Duration },
    #[error("working set `{set}` on host `{host}` failed to start ({error}); easel retries in {}s", retry_after.as_secs().max(1))]
    Failed { set: String, host: String, error: String, retry_after: Duration },
    #[error("the swap to working set `{set}` on host `{host}` was aborted: running work outlasted `drain_timeout`")]
    Busy { set: String, host: String, retry_after: Duration },
    #[error(
        "the work on working set `{set}` was interrupted: an admin forced host `{host}` to switch sets; try again \
         shortly"
    )]
    Interrupted { set: String, host: String, retry_after: Duration },
    #[error("host `{host}` is already switching to working set `{target}`; wait for it, then ask again")]
    Conflict { host: String, target: String },
    #[error("no working set `{0}`")]
    UnknownSet(String),
    #[error("no host `{0}`")]
    UnknownHost(String),
    #[error("no managed backend `{0}` (only backends with a `process:` block can be restarted)")]
    NotManaged(String),
    #[error(
        "backend `{backend}` has {in_flight} request(s) in flight; wait for them, or restart with `force` to cut them off"
    )]
    InUse { backend: String, in_flight: u32 },
    #[error("backend `{backend}` is not running: {why}")]
    NotRunning { backend: String, why: String },
    #[error("backend `{backend}` did not come back after the restart: {error}")]
    RestartFailed { backend: String, error: String },
}

impl SetError {
    /// `Retry-After`, clamped to 1–60 s so every client honours it.
    pub fn retry_after(&self) -> Option<Duration> {
        let d = match self {
            Self::Full { retry_after, .. }
            | Self::Switching { retry_after, .. }
            | Self::Failed { retry_after, .. }
            | Self::Busy { retry_after, .. }
            | Self::Interrupted { retry_after, .. } => *retry_after,
            Self::Inactive { .. }
            | Self::Conflict { .. }
            | Self::UnknownSet(_)
            | Self::UnknownHost(_)
            | Self::NotManaged(_)
            | Self::InUse { .. }
            | Self::NotRunning { .. }
            | Self::RestartFailed { .. } => return None,
        };
        Some(d.clamp(Duration::from_secs(1), Duration::from_secs(60)))
    }
}

/// Held while a request runs on a working set's backends: counts as their in-flight work for drains, and tells
/// whether a forced swap has since cut those backends off.
#[derive(Debug)]
pub struct Pass {
    counters: Vec<Arc<AtomicU32>>,
    /// One per backend: bumped when a forced activation interrupts it.
    interrupts: Vec<watch::Receiver<u64>>,
}

impl Pass {
    /// True once a forced swap has interrupted (and is stopping) one of the backends this pass was for.
    pub fn interrupted(&self) -> bool {
        self.interrupts.iter().any(|r| r.has_changed().unwrap_or(true))
    }

    /// Resolves when a forced swap interrupts one of its backends (never for a pass without backends).
    pub async fn until_interrupted(&self) {
        let mut rxs: Vec<watch::Receiver<u64>> = self.interrupts.clone();
        if rxs.is_empty() {
            return std::future::pending().await;
        }
        let waits = rxs.iter_mut().map(|r| Box::pin(async move { r.changed().await.is_ok() }));
        let (changed, _, _) = futures_util::future::select_all(waits).await;
        if !changed {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        for c in &self.counters {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A host's name and the receiving end of its actor's channel (taken once by [`Sets::run`]).
type Inbox = (String, mpsc::UnboundedReceiver<Msg>);

enum Msg {
    Request { id: u64, set: String, needs: BTreeSet<String>, reply: oneshot::Sender<Outcome> },
    Activate { id: u64, set: String, force: bool, reply: Option<oneshot::Sender<Outcome>> },
    Cancel { id: u64 },
    Unload,
    Started { ok: bool, error: Option<String> },
    Stopped,
}

/// What `GET /v1/admin/hosts` shows for one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub host: String,
    pub mode: &'static str,
    /// `idle`, `starting`, `active`, `degraded` (a member restarts after a crash), `draining`, `stopping` or
    /// `failed` (the last set failed and is held off).
    pub state: &'static str,
    #[serde(flatten)]
    pub phase: Phase,
    /// Members restarting after a crash.
    pub degraded: Vec<String>,
    /// The set that failed and is held off: its name, seconds left and why.
    pub failed: Option<serde_json::Value>,
    pub active_set: Option<String>,
    pub target_set: Option<String>,
    /// Seconds in the current phase.
    pub elapsed_s: f64,
    /// Waiters per set: count and oldest wait in seconds.
    pub demand: BTreeMap<String, serde_json::Value>,
    pub swap_queue_depth: usize,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub backend: String,
    pub process: &'static str,
    pub pid: Option<u32>,
    /// Restarts after crashes since easel started.
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub in_flight: u32,
}

struct HostShared {
    cfg: HostConfig,
    tx: mpsc::UnboundedSender<Msg>,
    view: Mutex<Option<HostView>>,
    /// What the actor knows, for quick reads (model status).
    snapshot: Mutex<(Phase, BTreeSet<String>, BTreeMap<String, Duration>)>,
    /// The scheduler's swap-time estimate in milliseconds (Retry-After for interrupted work).
    estimate_ms: AtomicU64,
}

/// Every host's actor handle, plus which set each model belongs to. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sets {
    hosts: Arc<BTreeMap<String, Arc<HostShared>>>,
    /// Set → (host, members).
    sets: Arc<BTreeMap<String, (String, BTreeSet<String>)>>,
    /// Easel's requests on each managed backend that passed the set check (dispatch is running).
    passes: Arc<HashMap<String, Arc<AtomicU32>>>,
    /// Per managed backend: how often a forced activation interrupted it (passes watch it).
    interrupts: Arc<HashMap<String, watch::Sender<u64>>>,
    next_id: Arc<AtomicU64>,
    receivers: Arc<Mutex<Vec<Inbox>>>,
}

impl std::fmt::Debug for Sets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sets").field("hosts", &self.hosts.keys().collect::<Vec<_>>()).finish()
    }
}

/// A model's place: host, set and the managed backends it needs.
struct Place<'a> {
    host: &'a Arc<HostShared>,
    set: &'a str,
    needs: BTreeSet<String>,
}

impl Sets {
    /// One (not yet running) actor per host; [`Sets::run`] starts them.
    pub fn new(config: &Config) -> Self {
        let mut hosts = BTreeMap::new();
        let mut receivers = Vec::new();
        for h in &config.hosts {
            let (tx, rx) = mpsc::unbounded_channel();
            receivers.push((h.name.clone(), rx));
            let shared = HostShared {
                cfg: h.clone(),
                tx,
                view: Mutex::new(None),
                snapshot: Mutex::new((Phase::Idle, BTreeSet::new(), BTreeMap::new())),
                estimate_ms: AtomicU64::new(10_000),
            };
            hosts.insert(h.name.clone(), Arc::new(shared));
        }
        let sets = config
            .working_sets
            .iter()
            .map(|s| (s.name.clone(), (s.host.clone(), s.backends.iter().cloned().collect())))
            .collect();
        let passes = config
            .working_sets
            .iter()
            .flat_map(|s| s.backends.iter())
            .map(|b| (b.clone(), Arc::new(AtomicU32::new(0))))
            .collect();
        let interrupts = config
            .working_sets
            .iter()
            .flat_map(|s| s.backends.iter())
            .map(|b| (b.clone(), watch::Sender::new(0)))
            .collect();
        Self {
            hosts: Arc::new(hosts),
            sets: Arc::new(sets),
            passes: Arc::new(passes),
            interrupts: Arc::new(interrupts),
            next_id: Arc::default(),
            receivers: Arc::new(Mutex::new(receivers)),
        }
    }

    /// Managed backends that belong to a working set: their host's actor starts them, not easel's launch.
    pub fn members(&self) -> BTreeSet<String> {
        self.sets.values().flat_map(|(_, m)| m.iter().cloned()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    fn place<'a>(&'a self, model: &'a ModelConfig) -> Option<Place<'a>> {
        let set = model.working_set.as_deref()?;
        let (host, members) = self.sets.get(set)?;
        let host = self.hosts.get(host)?;
        let needs: BTreeSet<String> =
            model.backends.iter().map(|b| b.name.clone()).filter(|b| members.contains(b)).collect();
        if needs.is_empty() {
            return None;
        }
        Some(Place { host, set, needs })
    }

    /// `(host, set)` of a model in a working set.
    pub fn of(&self, model: &ModelConfig) -> Option<(String, String)> {
        let set = model.working_set.as_deref()?;
        let (host, _) = self.sets.get(set)?;
        Some((host.clone(), set.to_owned()))
    }

    /// `/v1/models` `meta.status` for a model in a working set: `ready`, `loading`, `inactive` or `unavailable`.
    pub fn status(&self, model: &ModelConfig) -> Option<&'static str> {
        let place = self.place(model)?;
        let snap = place.host.snapshot.lock().ok()?;
        let (phase, running, failed) = &*snap;
        let leaving = match phase {
            Phase::Draining { leaving, .. } | Phase::Stopping { leaving, .. } => Some(leaving),
            _ => None,
        };
        let up = place.needs.iter().all(|b| running.contains(b) && !leaving.is_some_and(|l| l.contains(b)));
        Some(if up {
            "ready"
        } else if failed.contains_key(place.set) {
            "unavailable"
        } else if matches!(phase, Phase::Starting { set, .. } if set == place.set)
            || matches!(phase, Phase::Draining { to: Some(t), .. } | Phase::Stopping { to: Some(t), .. } if t == place.set)
        {
            "loading"
        } else {
            "inactive"
        })
    }

    /// For a model whose working set does not serve it right now: how often a waiting stream gets an SSE comment.
    pub fn keepalive(&self, model: &ModelConfig) -> Option<Duration> {
        let place = self.place(model)?;
        (self.status(model)? != "ready").then_some(place.host.cfg.keepalive)
    }

    /// Waits until `model`'s working set serves it (or says why not). `None` for a model outside working sets.
    /// The returned [`Pass`] must live as long as the request's work on the backend.
    pub async fn ready_for(&self, model: &ModelConfig) -> Result<Option<Pass>, SetError> {
        let Some(place) = self.place(model) else { return Ok(None) };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        // Watched from before the request, so an interrupt between the answer and the work is not missed.
        let interrupts: Vec<watch::Receiver<u64>> =
            place.needs.iter().filter_map(|b| self.interrupts.get(b).map(watch::Sender::subscribe)).collect();
        let msg = Msg::Request { id, set: place.set.to_owned(), needs: place.needs.clone(), reply };
        if place.host.tx.send(msg).is_err() {
            return Err(SetError::Switching {
                model: model.id.clone(),
                set: place.set.to_owned(),
                host: place.host.cfg.name.clone(),
                waited: 0,
                retry_after: Duration::from_secs(5),
            });
        }
        // A request that goes away stops waiting; the swap goes on.
        let guard = CancelOnDrop { tx: &place.host.tx, id, armed: true };
        let outcome = rx.await;
        let mut guard = guard;
        guard.armed = false;
        let host = place.host.cfg.name.clone();
        let set = place.set.to_owned();
        match outcome {
            Ok(Outcome::Ready) => {
                // The actor counted the pass before it answered, so no drain can miss this request.
                let counters = place.needs.iter().filter_map(|b| self.passes.get(b).cloned()).collect();
                Ok(Some(Pass { counters, interrupts }))
            }
            Ok(Outcome::Inactive { active }) => Err(SetError::Inactive {
                model: model.id.clone(),
                set,
                host,
                active: active.map_or_else(|| "no set".to_owned(), |a| format!("`{a}`")),
            }),
            Ok(Outcome::Full { retry_after }) => {
                Err(SetError::Full { model: model.id.clone(), set, host, retry_after })
            }
            Ok(Outcome::Switching { retry_after }) => Err(SetError::Switching {
                model: model.id.clone(),
                set,
                host,
                waited: started.elapsed().as_secs(),
                retry_after,
            }),
            Ok(Outcome::Failed { retry_after, error }) => Err(SetError::Failed { set, host, error, retry_after }),
            Ok(Outcome::Busy { retry_after }) => Err(SetError::Busy { set, host, retry_after }),
            Ok(Outcome::Conflict { target }) => Err(SetError::Conflict { host, target }),
            Ok(Outcome::Gone) | Err(_) => Err(SetError::Switching {
                model: model.id.clone(),
                set,
                host,
                waited: started.elapsed().as_secs(),
                retry_after: Duration::from_secs(5),
            }),
        }
    }

    /// What a request whose backends a forced swap cut off gets. Work that never reached the backend (queued for
    /// admission): in auto mode `Ok` (it waits again, as demand for its set); in manual mode 409 inactive. Work that
    /// was running: 503 `working_set_switching`.
    pub fn cut_off(&self, model: &ModelConfig, running: bool) -> Result<(), SetError> {
        let Some(place) = self.place(model) else { return Ok(()) };
        let host = place.host.cfg.name.clone();
        let set = place.set.to_owned();
        if running {
            let retry_after = Duration::from_millis(place.host.estimate_ms.load(Ordering::Relaxed));
            return Err(SetError::Interrupted { set, host, retry_after });
        }
        if place.host.cfg.mode != crate::config::HostMode::Manual {
            return Ok(());
        }
        let active = place
            .host
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().and_then(|v| v.target_set.clone().or(v.active_set.clone())));
        let active = active.map_or_else(|| "no set".to_owned(), |a| format!("`{a}`"));
        Err(SetError::Inactive { model: model.id.clone(), set, host, active })
    }

    /// Admin: make `set` active. With `wait`, returns once it is (or failed); else at once after it was accepted.
    /// With `force`, the leaving members' work is interrupted instead of drained, and a drain toward another set is
    /// aborted (a stop or start already under way still conflicts).
    pub async fn activate(&self, set: &str, wait: bool, force: bool) -> Result<bool, SetError> {
        let Some((host, _)) = self.sets.get(set) else { return Err(SetError::UnknownSet(set.to_owned())) };
        let Some(h) = self.hosts.get(host) else { return Err(SetError::UnknownSet(set.to_owned())) };
        let switching = h.view.lock().ok().and_then(|v| {
            v.as_ref().and_then(|v| {
                let draining = matches!(v.phase, Phase::Draining { .. });
                v.target_set.clone().filter(|_| !(force && draining))
            })
        });
        if let Some(target) = switching
            && target != set
        {
            return Err(SetError::Conflict { host: host.clone(), target });
        }
        let already = h
            .view
            .lock()
            .ok()
            .is_some_and(|v| v.as_ref().is_some_and(|v| matches!(&v.phase, Phase::Active { set: s } if s == set)));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let _ = h.tx.send(Msg::Activate { id, set: set.to_owned(), force, reply: Some(reply) });
        if !wait {
            return Ok(already);
        }
        match rx.await {
            Ok(Outcome::Ready) => Ok(true),
            Ok(Outcome::Conflict { target }) => Err(SetError::Conflict { host: host.clone(), target }),
            Ok(Outcome::Failed { retry_after, error }) => {
                Err(SetError::Failed { set: set.to_owned(), host: host.clone(), error, retry_after })
            }
            Ok(Outcome::Busy { retry_after }) => {
                Err(SetError::Busy { set: set.to_owned(), host: host.clone(), retry_after })
            }
            _ => Ok(false),
        }
    }

    /// Admin: drain the host's active set (running work finishes, nothing is killed), stop it and go idle.
    pub fn unload(&self, host: &str) -> Result<(), SetError> {
        let h = self.hosts.get(host).ok_or_else(|| SetError::UnknownHost(host.to_owned()))?;
        h.tx.send(Msg::Unload).map_err(|_| SetError::UnknownHost(host.to_owned()))
    }

    /// Every host as the admin sees it.
    pub fn views(&self) -> Vec<HostView> {
        self.hosts.values().filter_map(|h| h.view.lock().ok().and_then(|v| v.clone())).collect()
    }

    /// Starts one actor per host (and activates its `default_set`); they end with `cancel`.
    pub fn run(
        &self,
        processes: &Processes,
        backends: &HashMap<String, Arc<BackendHandle>>,
        tasks: &tokio_util::task::TaskTracker,
        cancel: &CancellationToken,
    ) {
        let receivers = self.receivers.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        for (name, rx) in receivers {
            let Some(shared) = self.hosts.get(&name).cloned() else { continue };
            let sets: BTreeMap<String, BTreeSet<String>> = self
                .sets
                .iter()
                .filter(|(_, (h, _))| *h == name)
                .map(|(s, (_, members))| (s.clone(), members.clone()))
                .collect();
            let members: BTreeSet<String> = sets.values().flatten().cloned().collect();
            let actor = Actor {
                host: Host::new(Settings {
                    mode: shared.cfg.mode,
                    patience: shared.cfg.patience,
                    max_wait: shared.cfg.max_wait,
                    queue_depth: shared.cfg.queue_depth,
                    drain_timeout: shared.cfg.drain_timeout,
                    failure_cooldown: shared.cfg.failure_cooldown,
                    idle_ttl: shared.cfg.idle_ttl,
                    sets,
                }),
                shared: Arc::clone(&shared),
                processes: processes.clone(),
                members: members.iter().filter_map(|b| backends.get(b).cloned()).collect(),
                passes: Arc::clone(&self.passes),
                interrupts: Arc::clone(&self.interrupts),
                replies: HashMap::new(),
                epoch: Instant::now(),
                phase_since: Instant::now(),
                http: reqwest::Client::builder().timeout(NATIVE_TIMEOUT).build().unwrap_or_default(),
            };
            if let Some(set) = &shared.cfg.default_set {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let _ = shared.tx.send(Msg::Activate { id, set: set.clone(), force: false, reply: None });
            }
            tasks.spawn(actor.run(rx, cancel.clone()));
        }
    }
}

struct CancelOnDrop<'a> {
    tx: &'a mpsc::UnboundedSender<Msg>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Msg::Cancel { id: self.id });
        }
    }
}

/// Reads a native busy answer (see [`Actor::native_busy`]).
fn native_busy_in(kind: BackendKind, v: &serde_json::Value) -> bool {
    let non_empty = |k: &str| v.get(k).and_then(|x| x.as_array()).is_some_and(|a| !a.is_empty());
    let count = |x: Option<&serde_json::Value>| x.and_then(serde_json::Value::as_u64).unwrap_or(0);
    match kind {
        BackendKind::ComfyUi => non_empty("queue_running") || non_empty("queue_pending"),
        BackendKind::InvokeAi => {
            let q = v.get("queue");
            let items =
                ["pending", "in_progress", "waiting"].iter().map(|k| count(q.and_then(|q| q.get(*k)))).sum::<u64>();
            items > 0 || v.pointer("/processor/is_processing").and_then(serde_json::Value::as_bool).unwrap_or(false)
        }
        BackendKind::A1111 => count(v.pointer("/state/job_count")) > 0,
        BackendKind::OpenAi => v.as_array().is_some_and(|slots| {
            slots.iter().any(|s| s.get("is_processing").and_then(serde_json::Value::as_bool).unwrap_or(false))
        }),
        _ => false,
    }
}

/// Cancels a backend's queued jobs and interrupts its running one through its native API (ComfyUI, A1111,
/// InvokeAI); other kinds have no such call and simply stop.
async fn interrupt(http: &reqwest::Client, b: &BackendHandle) {
    let calls: Vec<(reqwest::Method, &str, Option<serde_json::Value>)> = match b.cfg.kind {
        BackendKind::ComfyUi => vec![
            (reqwest::Method::POST, "/queue", Some(serde_json::json!({"clear": true}))),
            (reqwest::Method::POST, "/interrupt", None),
        ],
        BackendKind::A1111 => vec![(reqwest::Method::POST, "/sdapi/v1/interrupt", Some(serde_json::json!({})))],
        // Clearing the session queue also cancels the item in progress.
        BackendKind::InvokeAi => vec![(reqwest::Method::PUT, "/api/v1/queue/default/clear", None)],
        _ => return,
    };
    for (method, path, body) in calls {
        let mut req = http.request(method, b.cfg.endpoint(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        if let Err(e) = req.send().await {
            tracing::warn!(backend = %b.cfg.name, path, error = %e, "Interrupting the backend's work failed.");
        }
    }
}

/// The only task that starts or stops a host's processes.
struct Actor {
    host: Host,
    shared: Arc<HostShared>,
    processes: Processes,
    members: Vec<Arc<BackendHandle>>,
    passes: Arc<HashMap<String, Arc<AtomicU32>>>,
    interrupts: Arc<HashMap<String, watch::Sender<u64>>>,
    /// Waiter id → (reply, what it needs).
    replies: HashMap<u64, (Option<oneshot::Sender<Outcome>>, BTreeSet<String>)>,
    epoch: Instant,
    phase_since: Instant,
    http: reqwest::Client,
}

impl Actor {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>, cancel: CancellationToken) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish();
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return,
                msg = rx.recv() => match msg {
                    None => return,
                    Some(msg) => self.event(msg),
                },
                _ = every.tick() => {
                    let busy = self.busy().await;
                    Some(Event::Tick { now: self.now(), busy, down: self.down() })
                }
            };
            let Some(event) = event else { continue };
            let before = self.host.phase.clone();
            let actions = self.host.step(event);
            let replies = self.act(actions);
            match (&before, &self.host.phase) {
                (Phase::Starting { .. }, Phase::Active { .. }) => m::swap("ok"),
                (Phase::Starting { .. }, Phase::Stopping { .. } | Phase::Idle) => m::swap("failed"),
                (Phase::Draining { .. }, Phase::Active { .. } | Phase::Idle) => m::swap("aborted"),
                _ => {}
            }
            if std::mem::discriminant(&self.host.phase) != std::mem::discriminant(&before) {
                let swap_phase = match before {
                    Phase::Draining { .. } => Some("draining"),
                    Phase::Stopping { .. } => Some("stopping"),
                    Phase::Starting { .. } => Some("starting"),
                    Phase::Idle | Phase::Active { .. } => None,
                };
                if let Some(phase) = swap_phase {
                    m::swap_phase(&self.shared.cfg.name, phase, self.phase_since.elapsed());
                }
                self.phase_since = Instant::now();
                tracing::info!(host = %self.shared.cfg.name, phase = ?self.host.phase, "Working set phase.");
            }
            // The view first: whoever is told "ready" then reads the state that made it so.
            self.publish();
            for (id, outcome) in replies {
                self.reply(id, outcome);
            }
        }
    }

    fn event(&mut self, msg: Msg) -> Option<Event> {
        let now = self.now();
        Some(match msg {
            Msg::Request { id, set, needs, reply } => {
                self.replies.insert(id, (Some(reply), needs.clone()));
                Event::Request { id, set, needs, now }
            }
            Msg::Activate { id, set, force, reply } => {
                self.replies.insert(id, (reply, BTreeSet::new()));
                Event::Activate { id, set, now, force }
            }
            Msg::Cancel { id } => Event::Cancel { id },
            Msg::Unload => Event::Unload { now },
            Msg::Started { ok, error } => Event::Started { ok, error, now },
            Msg::Stopped => Event::Stopped { now },
        })
    }

    /// Tells waiter `id` how its wait ended; a "ready" counts a pass on each backend it needs.
    fn reply(&mut self, id: u64, outcome: Outcome) {
        let Some((reply, needs)) = self.replies.remove(&id) else { return };
        let counters: Vec<Arc<AtomicU32>> = needs.iter().filter_map(|b| self.passes.get(b).cloned()).collect();
        let ready = outcome == Outcome::Ready;
        if ready {
            for c in &counters {
                c.fetch_add(1, Ordering::AcqRel);
            }
        }
        let delivered = reply.is_some_and(|r| r.send(outcome).is_ok());
        if ready && !delivered {
            for c in &counters {
                c.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Carries out a step's actions; its replies are returned, to be sent once the new state is published.
    fn act(&mut self, actions: Vec<Action>) -> Vec<(u64, Outcome)> {
        let mut replies = Vec::new();
        for action in actions {
            match action {
                Action::Reply(id, outcome) => replies.push((id, outcome)),
                Action::Start(backends) => {
                    let (processes, tx) = (self.processes.clone(), self.shared.tx.clone());
                    tokio::spawn(async move {
                        let runs = backends.iter().map(|b| processes.start(b));
                        let ends = futures_util::future::join_all(runs).await;
                        let failed: Vec<&String> = backends
                            .iter()
                            .zip(&ends)
                            .filter(|(_, e)| **e != Some(crate::process::State::Ready))
                            .map(|(b, _)| b)
                            .collect();
                        let error = (!failed.is_empty()).then(|| {
                            let snaps = processes.snapshots(1);
                            failed
                                .iter()
                                .map(|b| {
                                    let why = snaps
                                        .iter()
                                        .find(|s| &s.backend == *b)
                                        .and_then(|s| s.error.clone().or_else(|| s.last_exit.clone()))
                                        .unwrap_or_else(|| "not ready".into());
                                    format!("backend `{b}`: {why}")
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        });
                        let _ = tx.send(Msg::Started { ok: failed.is_empty(), error });
                    });
                }
                Action::Interrupt(backends) => {
                    // Passes on these backends learn at once that their work is cut off.
                    for b in &backends {
                        if let Some(tx) = self.interrupts.get(b) {
                            tx.send_modify(|n| *n += 1);
                        }
                    }
                    let targets: Vec<Arc<BackendHandle>> =
                        self.members.iter().filter(|b| backends.contains(&b.cfg.name)).cloned().collect();
                    let http = self.http.clone();
                    // Best effort and bounded by the client's timeout; the stop that follows ends the work anyway.
                    tokio::spawn(async move {
                        futures_util::future::join_all(targets.iter().map(|b| interrupt(&http, b))).await;
                    });
                }
                Action::Stop(backends) => {
                    let (processes, tx) = (self.processes.clone(), self.shared.tx.clone());
                    tokio::spawn(async move {
                        futures_util::future::join_all(backends.iter().map(|b| processes.stop(b))).await;
                        let _ = tx.send(Msg::Stopped);
                    });
                }
            }
        }
        replies
    }

    /// Running members whose process is not up: restarting after a crash (`None`), or given up (`Some(why)`, with
    /// its last output lines, for the 503 that requests for its set get).
    fn down(&self) -> BTreeMap<String, Option<String>> {
        let mut down = BTreeMap::new();
        for name in &self.host.running {
            match self.processes.state(name) {
                Some(crate::process::State::Backoff | crate::process::State::Starting) => {
                    down.insert(name.clone(), None);
                }
                Some(crate::process::State::Failed) => {
                    let why = self.processes.failure(name, FAILURE_LINES).unwrap_or_else(|| "it gave up".into());
                    down.insert(name.clone(), Some(why));
                }
                _ => {}
            }
        }
        down
    }

    /// Running members with work: easel's (permits held or queued, passes) or their own (native busy signal).
    async fn busy(&self) -> BTreeSet<String> {
        let mut busy = BTreeSet::new();
        let draining = matches!(self.host.phase, Phase::Draining { .. });
        for b in &self.members {
            let name = &b.cfg.name;
            if !self.host.running.contains(name) {
                continue;
            }
            let easel = b.gates.values().map(|g| g.inflight() + g.queued()).sum::<u32>()
                + self.passes.get(name).map_or(0, |c| c.load(Ordering::Acquire));
            if easel > 0 || (draining && self.native_busy(b).await) {
                busy.insert(name.clone());
            }
        }
        busy
    }

    /// The backend's own busy signal, which also sees work easel did not submit: ComfyUI `GET /queue` (running or
    /// pending entries), InvokeAI `GET /api/v1/queue/default/status` (pending, in progress or waiting items, or
    /// the processor busy), A1111 `GET /sdapi/v1/progress` (`state.job_count`) and llama.cpp `GET /slots` (a slot
    /// `is_processing`; other OpenAI-compatible servers answer 404 there and count as idle). No answer = idle.
    async fn native_busy(&self, b: &BackendHandle) -> bool {
        let url = match b.cfg.kind {
            BackendKind::ComfyUi => b.cfg.endpoint("/queue"),
            BackendKind::InvokeAi => b.cfg.endpoint("/api/v1/queue/default/status"),
            BackendKind::A1111 => b.cfg.endpoint("/sdapi/v1/progress?skip_current_image=true"),
            BackendKind::OpenAi => {
                let base = b.cfg.endpoint("");
                format!("{}/slots", base.strip_suffix("/v1").unwrap_or(&base))
            }
            _ => return false,
        };
        let Ok(resp) = self.http.get(url).send().await else { return false };
        if !resp.status().is_success() {
            return false;
        }
        let Ok(v) = resp.json::<serde_json::Value>().await else { return false };
        native_busy_in(b.cfg.kind, &v)
    }

    fn publish(&self) {
        let now = self.now();
        let h = &self.host;
        let failed: BTreeMap<String, Duration> =
            h.settings.sets.keys().filter_map(|s| h.failed(s, now).map(|(left, _)| (s.clone(), left))).collect();
        for set in h.settings.sets.keys() {
            let on = h.active() == Some(set.as_str()) && matches!(h.phase, Phase::Active { .. });
            m::working_set_active(&self.shared.cfg.name, set, on);
        }
        m::swap_queue_depth(&self.shared.cfg.name, h.waiting());
        let snaps = self.processes.snapshots(0);
        let view = HostView {
            host: self.shared.cfg.name.clone(),
            mode: self.shared.cfg.mode.as_str(),
            state: h.state(now),
            phase: h.phase.clone(),
            degraded: h.degraded.iter().cloned().collect(),
            failed: h.failed_set(now).map(|(set, left, error)| {
                serde_json::json!({"set": set, "retry_after_s": left.as_secs_f64(), "error": error})
            }),
            active_set: h.active().map(str::to_owned),
            target_set: h.target().map(str::to_owned),
            elapsed_s: self.phase_since.elapsed().as_secs_f64(),
            demand: h
                .demand()
                .into_iter()
                .map(|(s, d)| {
                    let oldest = now.saturating_sub(d.oldest).as_secs_f64();
                    (s, serde_json::json!({"count": d.count, "oldest_s": oldest}))
                })
                .collect(),
            swap_queue_depth: h.waiting(),
            members: self
                .members
                .iter()
                .map(|b| {
                    let snap = snaps.iter().find(|s| s.backend == b.cfg.name);
                    MemberView {
                        backend: b.cfg.name.clone(),
                        process: snap.map_or("external", |s| s.state.as_str()),
                        pid: snap.and_then(|s| s.pid),
                        restarts: snap.map_or(0, |s| s.restarts),
                        last_exit: snap.and_then(|s| s.last_exit.clone()),
                        in_flight: b.gates.values().map(|g| g.inflight()).sum(),
                    }
                })
                .collect(),
        };
        if let Ok(mut v) = self.shared.view.lock() {
            *v = Some(view);
        }
        let estimate = h.last_swap.unwrap_or(Duration::from_secs(10));
        self.shared.estimate_ms.store(u64::try_from(estimate.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if let Ok(mut s) = self.shared.snapshot.lock() {
            *s = (h.phase.clone(), h.running.clone(), failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::native_busy_in;
    use crate::config::BackendKind;

    #[test]
    fn native_busy_signals_are_read_per_kind() {
        let comfy = json!({"queue_running": [], "queue_pending": [[1, "p", {}, {}, []]]});
        assert!(native_busy_in(BackendKind::ComfyUi, &comfy));
        assert!(!native_busy_in(BackendKind::ComfyUi, &json!({"queue_running": [], "queue_pending": []})));
        let invoke = |pending: u64, processing: bool| json!({"queue": {"pending": pending, "in_progress": 0, "completed": 9}, "processor": {"is_processing": processing}});
        assert!(native_busy_in(BackendKind::InvokeAi, &invoke(2, false)));
        assert!(native_busy_in(BackendKind::InvokeAi, &invoke(0, true)));
        assert!(!native_busy_in(BackendKind::InvokeAi, &invoke(0, false)));
        assert!(native_busy_in(BackendKind::A1111, &json!({"progress": 0.3, "state": {"job_count": 1}})));
        assert!(!native_busy_in(BackendKind::A1111, &json!({"progress": 0, "state": {"job_count": 0}})));
        let slots = |busy: bool| json!([{"id": 0, "is_processing": false}, {"id": 1, "is_processing": busy}]);
        assert!(native_busy_in(BackendKind::OpenAi, &slots(true)));
        assert!(!native_busy_in(BackendKind::OpenAi, &slots(false)));
        assert!(!native_busy_in(BackendKind::OpenAi, &json!({"error": {"code": 501}})));
    }
}
