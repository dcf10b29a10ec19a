//! Admission control: per backend and capability, at most `limit` upstream calls in flight, a bounded FIFO queue
//! behind them, and a deadline for waiting. A full queue or an expired wait is an [`AdmissionError`] carrying a
//! `Retry-After` estimated from the queue position and the observed service time. Slots are RAII [`Permit`]s:
//! dropping one (success, error, timeout, client gone) releases the slot exactly once.
//!
//! With `cluster.redis` a gate's limit holds for the whole fleet: a slot is a lease in Redis ([`fleet`]), the
//! bounded queue stays in each instance, and its head retries whenever a slot frees here or, for slots freed
//! elsewhere, after a short jittered poll. Per-key limits are in [`keys`].

pub mod fleet;
pub mod keys;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use self::fleet::{Fleet, Lease};
use crate::config::{Capability, ClusterConfig, ClusterFallback, KeyLimits};
use crate::telemetry::metrics as m;

/// Service times remembered for the p50 estimate.
const SAMPLES: usize = 128;
/// Assumed service time before any call has finished.
const DEFAULT_SERVICE: Duration = Duration::from_secs(1);

/// Why a request was not admitted; every variant says when to come back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmissionError {
    #[error("backend `{backend}` is busy: {limit} {capability} jobs running and its queue of {depth} is full; retry in {}s", retry_after.as_secs())]
    QueueFull { backend: String, capability: &'static str, limit: u32, depth: u32, retry_after: Duration },
    #[error("backend `{backend}` is busy: waited {}s in its queue without a free slot; retry in {}s", waited.as_secs(), retry_after.as_secs())]
    QueueTimeout { backend: String, waited: Duration, retry_after: Duration },
    #[error("backend `{backend}` is draining and takes no new {capability} jobs; retry in {}s", retry_after.as_secs())]
    Draining { backend: String, capability: &'static str, retry_after: Duration },
    /// `cluster.fallback: closed` and Redis cannot be reached: nothing is admitted rather than risk the limit.
    #[error("{scope} cannot be checked: {error} (`cluster.fallback: closed`)")]
    RedisUnavailable { scope: String, error: String },
}

/// How long a client should wait when Redis is down.
const REDIS_RETRY: Duration = Duration::from_secs(5);
/// Bounds of the jittered poll with which a queue's head looks for slots freed by other instances.
const POLL_MS: std::ops::Range<u64> = 20..80;

impl AdmissionError {
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::QueueFull { retry_after, .. }
            | Self::QueueTimeout { retry_after, .. }
            | Self::Draining { retry_after, .. } => *retry_after,
            Self::RedisUnavailable { .. } => REDIS_RETRY,
        }
    }
}

/// The slots of one backend for one capability.
#[derive(Debug)]
pub struct Gate {
    backend: String,
    capability: Capability,
    limit: u32,
    /// Holds `limit` permits; tokio's semaphore is fair, so waiters are served first come, first served.
    slots: Arc<Semaphore>,
    /// Requests waiting for a slot now; never more than `depth`.
    queued: AtomicU32,
    depth: u32,
    wait: Duration,
    /// Set while a backend is being drained (working sets): no new permits, in-flight work finishes.
    draining: AtomicBool,
    /// Recent service times (permit held), newest last.
    samples: Mutex<VecDeque<Duration>>,
    /// Set with `cluster.redis`: `limit` holds fleet-wide and `slots` is unused.
    shared: Option<Shared>,
}

/// The fleet-wide side of a gate.
#[derive(Debug)]
struct Shared {
    fleet: Arc<Fleet>,
    /// The sorted set of this gate's leases.
    key: String,
    /// `fallback: local`: the per-instance slots used while Redis is down (`ceil(limit / fleet_size)`).
    fallback: Option<Arc<Semaphore>>,
    /// Slots this instance holds now (leases and fallback slots).
    held: AtomicU32,
    /// Rung when this instance frees a slot.
    freed: Arc<Notify>,
    /// Only the head of this instance's queue polls Redis; tokio's mutex is fair, so the queue stays FIFO here.
    head: tokio::sync::Mutex<()>,
}

/// The slot a [`Permit`] holds.
#[derive(Debug)]
enum Slot {
    Local {
        _permit: OwnedSemaphorePermit,
    },
    /// Boxed: a permit travels inside response bodies and streams, so it stays small.
    Lease {
        _lease: Box<Lease>,
    },
}

/// What admission shares across the fleet: Redis (when configured) and the per-key limits.
#[derive(Debug)]
pub struct Cluster {
    pub fleet: Option<Arc<Fleet>>,
    pub keys: keys::KeyLimiter,
}

impl Cluster {
    /// Builds the Redis client without contacting it.
    pub fn new(cfg: Option<&ClusterConfig>, key_limits: KeyLimits) -> Result<Self, String> {
        let fleet = cfg.map(Fleet::new).transpose()?;
        Ok(Self { keys: keys::KeyLimiter::new(key_limits, fleet.clone()), fleet })
    }

    /// A gate: in-process without Redis, fleet-wide with it.
    pub fn gate(&self, backend: &str, capability: Capability, limit: u32, depth: u32, wait: Duration) -> Arc<Gate> {
        match &self.fleet {
            None => Gate::new(backend, capability, limit, depth, wait),
            Some(fleet) => Gate::shared(backend, capability, limit, depth, wait, Arc::clone(fleet)),
        }
    }
}

/// Numbers for `/v1/gateway/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GateStatus {
    pub limit: u32,
    pub available: u32,
    pub inflight: u32,
    pub queued: u32,
    pub queue_depth: u32,
    pub p50_ms: Option<u64>,
    pub draining: bool,
}

impl Gate {
    pub fn new(backend: &str, capability: Capability, limit: u32, depth: u32, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            backend: backend.to_owned(),
            capability,
            limit,
            slots: Arc::new(Semaphore::new(limit as usize)),
            queued: AtomicU32::new(0),
            depth,
            wait,
            draining: AtomicBool::new(false),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            shared: None,
        })
    }

    /// A gate whose `limit` holds across every instance sharing `fleet`'s Redis.
    pub fn shared(
        backend: &str,
        capability: Capability,
        limit: u32,
        depth: u32,
        wait: Duration,
        fleet: Arc<Fleet>,
    ) -> Arc<Self> {
        let fallback = match fleet.fallback {
            ClusterFallback::Closed => None,
            ClusterFallback::Local { fleet_size } => {
                Some(Arc::new(Semaphore::new(limit.div_ceil(fleet_size) as usize)))
            }
        };
        let shared = Shared {
            key: format!("easel:gate:{backend}:{}", capability.as_str()),
            fleet,
            fallback,
            held: AtomicU32::new(0),
            freed: Arc::new(Notify::new()),
            head: tokio::sync::Mutex::new(()),
        };
        Arc::new(Self {
            backend: backend.to_owned(),
            capability,
            limit,
            slots: Arc::new(Semaphore::new(0)),
            queued: AtomicU32::new(0),
            depth,
            wait,
            draining: AtomicBool::new(false),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            shared: Some(shared),
        })
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Slots in use (with Redis: held by this instance).
    pub fn inflight(&self) -> u32 {
        match &self.shared {
            None => self.limit.saturating_sub(self.slots.available_permits() as u32),
            Some(s) => s.held.load(Ordering::Acquire),
        }
    }

    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Acquire)
    }

    /// True when a request would have to wait.
    pub fn saturated(&self) -> bool {
        match &self.shared {
            None => self.slots.available_permits() == 0,
            // Other instances' slots are not known without a round trip: judge by this instance's share.
            Some(s) => s.held.load(Ordering::Acquire) >= self.limit || self.queued() > 0,
        }
    }

    /// A slot now if one is free, without queueing: for work that runs anyway and should be counted (a job
    /// resumed after a restart, running upstream already).
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        if self.draining.load(Ordering::Acquire) {
            return None;
        }
        if let Some(shared) = &self.shared {
            // Redis cannot be asked synchronously: count the running work with a lease taken regardless of the
            // limit (it runs upstream either way), added in the background.
            return Some(self.permit(
                Slot::Lease { _lease: Box::new(Lease::adopt(Arc::clone(&shared.fleet), shared.key.clone())) },
                Duration::ZERO,
            ));
        }
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .map(|p| self.permit(Slot::Local { _permit: p }, Duration::ZERO))
    }

    /// Waits for a slot (bounded by the queue depth and wait), or says when to retry.
    pub async fn admit(self: &Arc<Self>) -> Result<Permit, AdmissionError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(AdmissionError::Draining {
                backend: self.backend.clone(),
                capability: self.capability.as_str(),
                retry_after: self.retry_after(0),
            });
        }
        if let Some(shared) = &self.shared {
            return self.admit_shared(shared).await;
        }
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(self.permit(Slot::Local { _permit: permit }, Duration::ZERO));
        }
        let position = self.join_queue()?;
        let guard = QueueSlot { gate: self };
        m::admission_queued(&self.backend, self.capability, self.queued());
        let started = Instant::now();
        let acquired = tokio::time::timeout(self.wait, Arc::clone(&self.slots).acquire_owned()).await;
        drop(guard);
        let waited = started.elapsed();
        m::admission_queue_wait(&self.backend, self.capability, waited);
        match acquired {
            Ok(Ok(permit)) => Ok(self.permit(Slot::Local { _permit: permit }, waited)),
            // The semaphore is never closed; treat it like a timeout rather than panic.
            Ok(Err(_)) | Err(_) => Err(self.timed_out(waited, position)),
        }
    }

    fn timed_out(&self, waited: Duration, position: u32) -> AdmissionError {
        m::admission_rejected(&self.backend, self.capability, "queue_timeout");
        AdmissionError::QueueTimeout { backend: self.backend.clone(), waited, retry_after: self.retry_after(position) }
    }

    /// The fleet-wide path: take a lease now if none is queued here, else queue (bounded, per instance) and let
    /// the head of the queue retry whenever a slot frees here and on a short jittered poll for the others.
    async fn admit_shared(self: &Arc<Self>, shared: &Shared) -> Result<Permit, AdmissionError> {
        if self.queued() == 0
            && let Some(slot) = self.try_shared(shared).await?
        {
            return Ok(self.permit(slot, Duration::ZERO));
        }
        let position = self.join_queue()?;
        let guard = QueueSlot { gate: self };
        m::admission_queued(&self.backend, self.capability, self.queued());
        let started = Instant::now();
        let acquired = tokio::time::timeout(self.wait, async {
            let _head = shared.head.lock().await;
            loop {
                if let Some(slot) = self.try_shared(shared).await? {
                    return Ok(slot);
                }
                let poll = Duration::from_millis(rand::random_range(POLL_MS));
                tokio::select! {
                    () = shared.freed.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
        })
        .await;
        drop(guard);
        let waited = started.elapsed();
        m::admission_queue_wait(&self.backend, self.capability, waited);
        match acquired {
            Ok(Ok(slot)) => Ok(self.permit(slot, waited)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.timed_out(waited, position)),
        }
    }

    /// One attempt at a fleet-wide slot. Redis down: `closed` refuses, `local` takes a per-instance slot.
    async fn try_shared(&self, shared: &Shared) -> Result<Option<Slot>, AdmissionError> {
        match shared.fleet.acquire(&shared.key, self.limit, false).await {
            Ok(lease) => Ok(lease.map(|l| Slot::Lease { _lease: Box::new(l.notifying(Arc::clone(&shared.freed))) })),
            Err(e) => match &shared.fallback {
                Some(local) => Ok(Arc::clone(local).try_acquire_owned().ok().map(|p| Slot::Local { _permit: p })),
                None => {
                    m::admission_rejected(&self.backend, self.capability, "redis_unavailable");
                    Err(AdmissionError::RedisUnavailable {
                        scope: format!("the fleet-wide limit of backend `{}`", self.backend),
                        error: e.to_string(),
                    })
                }
            },
        }
    }

    /// Joins the queue if there is room (returns the position), else the 429 answer.
    fn join_queue(&self) -> Result<u32, AdmissionError> {
        // The compare-exchange keeps `queued <= depth` under races.
        let mut current = self.queued.load(Ordering::Acquire);
        loop {
            if current >= self.depth {
                m::admission_rejected(&self.backend, self.capability, "queue_full");
                return Err(AdmissionError::QueueFull {
                    backend: self.backend.clone(),
                    capability: self.capability.as_str(),
                    limit: self.limit,
                    depth: self.depth,
                    retry_after: self.room_after(),
                });
            }
            match self.queued.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(current),
                Err(now) => current = now,
            }
        }
    }

    fn permit(self: &Arc<Self>, slot: Slot, _waited: Duration) -> Permit {
        if let Some(s) = &self.shared {
            s.held.fetch_add(1, Ordering::AcqRel);
        }
        m::admission_inflight(&self.backend, self.capability, self.inflight());
        Permit { gate: Arc::clone(self), _slot: slot, started: Instant::now() }
    }

    /// Seconds until a request at queue position `position` is likely to get a slot; never 0.
    pub fn retry_after(&self, position: u32) -> Duration {
        let p50 = self.p50().unwrap_or(DEFAULT_SERVICE);
        let waves = u64::from(position / self.limit.max(1) + 1);
        let secs = (p50.as_secs_f64() * waves as f64).ceil() as u64;
        Duration::from_secs(secs.max(1))
    }

    /// Seconds until a full queue is likely to have room again: the head of the queue moves on to a slot about
    /// every `p50 / limit` while every slot is busy (that is when a retry gets in; how long it then waits is the
    /// queue's `wait`). Never 0.
    pub fn room_after(&self) -> Duration {
        let p50 = self.p50().unwrap_or(DEFAULT_SERVICE);
        Duration::from_secs((p50.as_secs_f64() / f64::from(self.limit.max(1))).ceil().max(1.0) as u64)
    }

    /// Median of recent service times.
    pub fn p50(&self) -> Option<Duration> {
        let samples = self.samples.lock().ok()?;
        if samples.is_empty() {
            return None;
        }
        let mut v: Vec<Duration> = samples.iter().copied().collect();
        v.sort_unstable();
        Some(v[v.len() / 2])
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// True when nothing is in flight (for drains).
    pub fn idle(&self) -> bool {
        self.inflight() == 0
    }

    /// With `cluster.redis`: permits held across the whole fleet now (`None` without Redis, or Redis down).
    pub async fn fleet_inflight(&self) -> Option<u64> {
        let shared = self.shared.as_ref()?;
        shared.fleet.live(&shared.key).await.ok()
    }

    pub fn status(&self) -> GateStatus {
        let available = self.limit.saturating_sub(self.inflight());
        GateStatus {
            limit: self.limit,
            available,
            inflight: self.limit.saturating_sub(available),
            queued: self.queued(),
            queue_depth: self.depth,
            p50_ms: self.p50().map(|d| d.as_millis() as u64),
            draining: self.draining.load(Ordering::Acquire),
        }
    }

    fn record(&self, took: Duration) {
        if let Ok(mut s) = self.samples.lock() {
            if s.len() == SAMPLES {
                s.pop_front();
            }
            s.push_back(took);
        }
    }
}

/// Leaves the queue when dropped, including when the waiting request is cancelled.
struct QueueSlot<'a> {
    gate: &'a Gate,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        let now = self.gate.queued.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        m::admission_queued(&self.gate.backend, self.gate.capability, now);
    }
}

/// One upstream slot. Dropping it releases the slot and records how long it was held.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    _slot: Slot,
    started: Instant,
}

impl Permit {
    pub fn backend(&self) -> &str {
        &self.gate.backend
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.record(self.started.elapsed());
        // The slot itself is released when `_slot` drops right after this; report the count it will have.
        m::admission_inflight(&self.gate.backend, self.gate.capability, self.gate.inflight().saturating_sub(1));
        if let Some(s) = &self.gate.shared {
            s.held.fetch_sub(1, Ordering::AcqRel);
            // A lease rings `freed` itself once its release reached Redis; a fallback slot is free right away.
            if matches!(self._slot, Slot::Local { .. }) {
                s.freed.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_bounded_and_permits_release_on_drop() {
        let gate = Gate::new("b", Capability::Images, 1, 1, Duration::from_secs(5));
        let first = gate.admit().await.unwrap();
        assert_eq!(gate.inflight(), 1);
        let g2 = Arc::clone(&gate);
        let waiter = tokio::spawn(async move { g2.admit().await.map(|_| ()) });
        // Wait until the second request is queued (observable state, no sleeping).
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let err = gate.admit().await.unwrap_err();
        assert!(matches!(err, AdmissionError::QueueFull { .. }), "{err}");
        assert!(err.retry_after() >= Duration::from_secs(1));
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(gate.inflight(), 0);
        assert_eq!(gate.queued(), 0);
    }

    #[test]
    fn a_full_queue_has_room_again_when_the_next_slot_frees() {
        let gate = Gate::new("b", Capability::Images, 4, 1000, Duration::from_secs(600));
        for _ in 0..5 {
            gate.record(Duration::from_secs(10));
        }
        // Four slots each busy for 10 s: one frees about every 2.5 s, and the head of the queue takes it.
        assert_eq!(gate.room_after(), Duration::from_secs(3));
        // Where the thousandth waiter would be served is another matter (a waiter that ran out of time).
        assert_eq!(gate.retry_after(1000), Duration::from_secs(2510));
        let fast = Gate::new("f", Capability::Images, 2, 10, Duration::from_secs(5));
        fast.record(Duration::from_millis(200));
        assert_eq!(fast.room_after(), Duration::from_secs(1), "never 0");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_expires_with_a_retry_after() {
        let gate = Gate::new("b", Capability::Images, 1, 4, Duration::from_secs(2));
        let _held = gate.admit().await.unwrap();
        let err = gate.admit().await.unwrap_err();
        assert!(matches!(err, AdmissionError::QueueTimeout { .. }), "{err}");
        assert_eq!(gate.queued(), 0, "a timed-out waiter leaves the queue");
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_the_queue() {
        let gate = Gate::new("b", Capability::Images, 1, 4, Duration::from_secs(60));
        let _held = gate.admit().await.unwrap();
        for _ in 0..100 {
            let g = Arc::clone(&gate);
            let task = tokio::spawn(async move { g.admit().await.map(|_| ()) });
            while gate.queued() == 0 {
                tokio::task::yield_now().await;
            }
            task.abort();
            let _ = task.await;
        }
        assert_eq!(gate.queued(), 0);
        assert_eq!(gate.inflight(), 1);
    }
}
