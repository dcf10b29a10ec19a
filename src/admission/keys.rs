//! Per-key limits (`auth.key_limits`, or a key's own limits stored with it, which override them): requests per minute in a fixed window that starts with a key's first
//! request, and at most `max_parallel` requests of a key in flight. In-process without `cluster.redis`; with it,
//! the window is a Redis counter and the parallel slots are leases (so both hold fleet-wide). A refusal is a
//! [`KeyLimited`] that says when to retry; every answer carries the numbers for the `x-ratelimit-*` headers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::AdmissionError;
use super::fleet::{Fleet, Lease};
use crate::config::{ClusterFallback, KeyLimits};
use crate::ledger::{KeyOverrides, Limit};

/// Where a limit came from, as the refusal names it.
fn set_by(own: Limit) -> &'static str {
    if own == Limit::Default { "`auth.key_limits`" } else { "the key's own" }
}

/// The window of `requests_per_minute`.
const WINDOW: Duration = Duration::from_secs(60);
/// In-process windows kept before expired ones are swept.
const SWEEP_AT: usize = 1024;
/// When a key at `max_parallel` should retry (no service-time estimate per key).
const PARALLEL_RETRY: Duration = Duration::from_secs(1);

/// The `x-ratelimit-*-requests` numbers of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    /// Until the window starts over.
    pub reset: Duration,
}

/// A key over one of its limits.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyLimited {
    #[error("API key `{key}` made {limit} requests this minute ({set_by} `requests_per_minute`); retry in {}s", retry_after.as_secs().max(1))]
    Rate { key: String, limit: u32, retry_after: Duration, info: RateInfo, set_by: &'static str },
    #[error(
        "API key `{key}` already has {limit} requests in flight ({set_by} `max_parallel`); retry when one finishes"
    )]
    Parallel { key: String, limit: u32, info: Option<RateInfo>, set_by: &'static str },
}

impl KeyLimited {
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Rate { retry_after, .. } => (*retry_after).max(Duration::from_secs(1)),
            Self::Parallel { .. } => PARALLEL_RETRY,
        }
    }

    pub fn info(&self) -> Option<RateInfo> {
        match self {
            Self::Rate { info, .. } => Some(*info),
            Self::Parallel { info, .. } => *info,
        }
    }
}

/// Why a key's request was not let through.
#[derive(Debug, Clone)]
pub enum KeyRefusal {
    Limited(KeyLimited),
    /// Redis is down and `cluster.fallback: closed`.
    Unavailable(AdmissionError),
}

/// Held while a key's request runs: frees its `max_parallel` slot when dropped.
#[derive(Debug)]
pub enum KeySlot {
    None,
    Local(LocalSlot),
    Lease(Lease),
}

/// One in-process parallel slot of a key.
#[derive(Debug)]
pub struct LocalSlot {
    limiter: Arc<Local>,
    key: String,
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        self.limiter.with(|s| {
            if let Some(n) = s.parallel.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.parallel.remove(&self.key);
                }
            }
        });
    }
}

#[derive(Debug, Default)]
struct LocalState {
    /// Key → (window start, requests counted in it).
    windows: HashMap<String, (Instant, u32)>,
    /// Key → requests in flight.
    parallel: HashMap<String, u32>,
}

#[derive(Debug, Default)]
struct Local {
    state: Mutex<LocalState>,
}

impl Local {
    fn with<T>(&self, f: impl FnOnce(&mut LocalState) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn count(&self, key: &str, limit: u32) -> (bool, u32, Duration) {
        let now = Instant::now();
        self.with(|s| {
            if s.windows.len() >= SWEEP_AT {
                s.windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            }
            let entry = s.windows.entry(key.to_owned()).or_insert((now, 0));
            if now.duration_since(entry.0) >= WINDOW {
                *entry = (now, 0);
            }
            let reset = WINDOW.saturating_sub(now.duration_since(entry.0));
            if entry.1 >= limit {
                return (false, entry.1, reset);
            }
            entry.1 += 1;
            (true, entry.1, reset)
        })
    }

    fn take(self: &Arc<Self>, key: &str, limit: u32) -> Option<LocalSlot> {
        let taken = self.with(|s| {
            let n = s.parallel.entry(key.to_owned()).or_insert(0);
            if *n >= limit {
                return false;
            }
            *n += 1;
            true
        });
        taken.then(|| LocalSlot { limiter: Arc::clone(self), key: key.to_owned() })
    }
}

/// The limits of every key, and where they are counted.
#[derive(Debug)]
pub struct KeyLimiter {
    limits: KeyLimits,
    fleet: Option<Arc<Fleet>>,
    local: Arc<Local>,
}

impl KeyLimiter {
    pub fn new(limits: KeyLimits, fleet: Option<Arc<Fleet>>) -> Self {
        Self { limits, fleet, local: Arc::default() }
    }

    /// The limits that hold for a key with these overrides.
    pub fn limits_for(&self, own: &KeyOverrides) -> KeyLimits {
        KeyLimits {
            requests_per_minute: own.requests_per_minute.resolve(self.limits.requests_per_minute),
            max_parallel: own.max_parallel.resolve(self.limits.max_parallel),
        }
    }

    /// Whether a key with these overrides has any limit at all.
    pub fn applies(&self, own: &KeyOverrides) -> bool {
        !self.limits_for(own).is_empty()
    }

    /// Counts one request of `key` and takes a parallel slot; the slot must live as long as the request.
    /// `own` are the key's stored limits (carried on its principal), each replacing the configured default.
    pub async fn admit(&self, key: &str, own: &KeyOverrides) -> Result<(KeySlot, Option<RateInfo>), KeyRefusal> {
        let limits = self.limits_for(own);
        let info = match limits.requests_per_minute {
            None => None,
            Some(limit) => {
                let (allowed, counted, reset) = match self.remote() {
                    Some(fleet) => match fleet.count(&format!("easel:key:{key}:rpm"), limit, WINDOW).await {
                        Ok(r) => r,
                        Err(e) => self.on_down(e, || self.local.count(key, limit))?,
                    },
                    None => self.local.count(key, limit),
                };
                let info = RateInfo { limit, remaining: limit.saturating_sub(counted), reset };
                if !allowed {
                    return Err(KeyRefusal::Limited(KeyLimited::Rate {
                        key: key.to_owned(),
                        limit,
                        retry_after: reset,
                        info,
                        set_by: set_by(own.requests_per_minute),
                    }));
                }
                Some(info)
            }
        };
        let Some(limit) = limits.max_parallel else { return Ok((KeySlot::None, info)) };
        let slot = match self.remote() {
            Some(fleet) => match fleet.acquire(&format!("easel:key:{key}:parallel"), limit, false).await {
                Ok(lease) => lease.map(KeySlot::Lease),
                Err(e) => self.on_down(e, || self.local.take(key, limit).map(KeySlot::Local))?,
            },
            None => self.local.take(key, limit).map(KeySlot::Local),
        };
        match slot {
            Some(slot) => Ok((slot, info)),
            None => Err(KeyRefusal::Limited(KeyLimited::Parallel {
                key: key.to_owned(),
                limit,
                info,
                set_by: set_by(own.max_parallel),
            })),
        }
    }

    fn remote(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// Redis is down: `closed` refuses, `local` counts in this process (each instance allows the whole limit).
    fn on_down<T>(&self, e: super::fleet::RedisDown, local: impl FnOnce() -> T) -> Result<T, KeyRefusal> {
        match self.fleet.as_ref().map(|f| f.fallback) {
            Some(ClusterFallback::Local { .. }) => Ok(local()),
            _ => Err(KeyRefusal::Unavailable(AdmissionError::RedisUnavailable {
                scope: "per-key limits".into(),
                error: e.to_string(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rpm_and_parallel_hold_in_process() {
        let none = KeyOverrides::default();
        let limiter = KeyLimiter::new(KeyLimits { requests_per_minute: Some(2), max_parallel: None }, None);
        let (_, info) = limiter.admit("k", &none).await.unwrap();
        assert_eq!(info.unwrap().remaining, 1);
        limiter.admit("k", &none).await.unwrap();
        let Err(KeyRefusal::Limited(e)) = limiter.admit("k", &none).await else { panic!("third request admitted") };
        assert!(matches!(e, KeyLimited::Rate { .. }));
        assert_eq!(e.info().unwrap().remaining, 0);
        limiter.admit("other", &none).await.unwrap();

        let limiter = KeyLimiter::new(KeyLimits { requests_per_minute: None, max_parallel: Some(1) }, None);
        let (held, _) = limiter.admit("k", &none).await.unwrap();
        assert!(matches!(limiter.admit("k", &none).await, Err(KeyRefusal::Limited(KeyLimited::Parallel { .. }))));
        drop(held);
        limiter.admit("k", &none).await.unwrap();
    }

    #[tokio::test]
    async fn a_keys_own_limits_replace_the_default() {
        let limiter = KeyLimiter::new(KeyLimits { requests_per_minute: Some(1), max_parallel: Some(1) }, None);
        let own = KeyOverrides { requests_per_minute: Limit::Max(3), max_parallel: Limit::Unlimited };
        let mut slots = Vec::new();
        for _ in 0..3 {
            slots.push(limiter.admit("own", &own).await.unwrap());
        }
        let Err(KeyRefusal::Limited(e)) = limiter.admit("own", &own).await else { panic!("fourth request admitted") };
        assert!(e.to_string().contains("the key's own"), "{e}");
        assert_eq!(e.info().unwrap().limit, 3);

        let unlimited = KeyOverrides { requests_per_minute: Limit::Unlimited, max_parallel: Limit::Unlimited };
        assert!(!limiter.applies(&unlimited));
        let plain = KeyOverrides::default();
        limiter.admit("plain", &plain).await.unwrap();
        let Err(KeyRefusal::Limited(e)) = limiter.admit("plain", &plain).await else { panic!("default not applied") };
        assert!(e.to_string().contains("`auth.key_limits`"), "{e}");
    }
}
