//! The fleet's shared admission state in Redis (`cluster.redis`). A slot is a *lease*: a member of a sorted set
//! per gate (permit id → expiry in Redis's own clock), taken, renewed and released by Lua scripts so that a count
//! and its change are one atomic step. A lease that is not renewed (its instance died) expires after
//! `cluster.lease` and its slot is free again; a live [`Lease`] renews itself every third of that in the background
//! and is released (in a spawned task) when dropped. Per-key request windows live here too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::task::JoinHandle;

use crate::config::{ClusterConfig, ClusterFallback};

/// The longest one Redis call may take before it counts as a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failure, calls fail at once for this long instead of each waiting for a timeout.
const DOWN_BACKOFF: Duration = Duration::from_secs(1);

/// Drops expired leases, then adds `id` if fewer than `limit` remain. Returns {taken (0/1), leases held now}.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if ARGV[4] == '1' or held < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 3)
  return {1, held + 1}
end
return {0, held}
";

/// Permits not yet expired, by Redis's clock.
const LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
";

/// Extends a lease that is still live. A lease already past its expiry is gone (its slot may have been handed
/// out again): it is removed and 0 is returned, never revived.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ms then return 0 end
if tonumber(until_ms) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 3)
return 1
";

/// A fixed window that starts with its first request: {allowed (0/1), requests counted, ms until it resets}.
/// A refused request is not counted.
const WINDOW: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  ttl = tonumber(ARGV[2])
end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return {0, n - 1, ttl}
end
return {1, n, ttl}
";

/// A Redis call that failed (or timed out); the text names Redis.
#[derive(Debug, Clone, thiserror::Error)]
#[error("Redis at `{host}` is unreachable: {reason}")]
pub struct RedisDown {
    pub host: String,
    pub reason: String,
}

/// What `/health` says about Redis.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RedisReport {
    /// `up`, `down`, or `unknown` (not contacted yet).
    pub state: &'static str,
    pub fallback: &'static str,
    pub error: Option<String>,
}

#[derive(Debug)]
enum Link {
    Unknown,
    Up,
    Down { reason: String, retry_at: Instant },
}

/// One instance's handle on the fleet's Redis.
pub struct Fleet {
    conn: ConnectionManager,
    /// Host and port only (never the password), for messages.
    host: String,
    pub(crate) lease: Duration,
    pub(crate) fallback: ClusterFallback,
    /// Prefix of this instance's permit ids (unique per process).
    instance: String,
    link: Mutex<Link>,
    acquire: Script,
    renew: Script,
    window: Script,
    /// Releases on their way to Redis (a drain waits for them before the process exits).
    releases: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("host", &self.host).field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl Fleet {
    /// A lazy client: nothing is contacted until the first call, so a Redis that is down at startup does not stop
    /// the gateway (the fallback decides what admission does meanwhile).
    pub fn new(cfg: &ClusterConfig) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(cfg.redis.expose()).map_err(|e| format!("cluster.redis: {e}"))?;
        let info = client.get_connection_info();
        let host = info.addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| format!("cluster.redis: {e}"))?;
        Ok(Arc::new(Self {
            conn,
            host,
            lease: cfg.lease,
            fallback: cfg.fallback,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            link: Mutex::new(Link::Unknown),
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            releases: tokio_util::task::TaskTracker::new(),
            window: Script::new(WINDOW),
        }))
    }

    fn with_link<T>(&self, f: impl FnOnce(&mut Link) -> T) -> T {
        match self.link.lock() {
            Ok(mut l) => f(&mut l),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Runs one Redis call under [`CALL_TIMEOUT`], tracking whether Redis is reachable. While it is known to be
    /// down, calls fail at once until the back-off ends.
    async fn call<T, F>(&self, op: impl FnOnce(ConnectionManager) -> F) -> Result<T, RedisDown>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let blocked = self.with_link(|l| match l {
            Link::Down { reason, retry_at } if Instant::now() < *retry_at => Some(reason.clone()),
            _ => None,
        });
        if let Some(reason) = blocked {
            return Err(RedisDown { host: self.host.clone(), reason });
        }
        let result = match tokio::time::timeout(CALL_TIMEOUT, op(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}ms", CALL_TIMEOUT.as_millis())),
        };
        match result {
            Ok(v) => {
                let was_down = self.with_link(|l| std::mem::replace(l, Link::Up));
                if matches!(was_down, Link::Down { .. }) {
                    tracing::info!(redis = %self.host, "Redis is reachable again: admission is fleet-wide.");
                }
                Ok(v)
            }
            Err(reason) => {
                let was_up = self.with_link(|l| {
                    let was = !matches!(l, Link::Down { .. });
                    *l = Link::Down { reason: reason.clone(), retry_at: Instant::now() + DOWN_BACKOFF };
                    was
                });
                if was_up {
                    tracing::error!(redis = %self.host, error = %reason, fallback = fallback_name(self.fallback), "Redis is unreachable.");
                }
                Err(RedisDown { host: self.host.clone(), reason })
            }
        }
    }

    /// Takes a lease on `key` if fewer than `limit` are held fleet-wide (`force`: take it regardless, for work
    /// that runs upstream anyway). `None` = all taken.
    pub async fn acquire(self: &Arc<Self>, key: &str, limit: u32, force: bool) -> Result<Option<Lease>, RedisDown> {
        let id = format!("{}:{}", self.instance, uuid::Uuid::now_v7().simple());
        let lease_ms = self.lease.as_millis() as u64;
        let (taken, _held): (u8, u64) = self
            .call(|mut c| {
                let mut inv = self.acquire.key(key);
                inv.arg(limit).arg(&id).arg(lease_ms).arg(if force { "1" } else { "0" });
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok((taken == 1).then(|| Lease::start(Arc::clone(self), key.to_owned(), id)))
    }

    /// Counts one request in `key`'s window of `window`; `(allowed, counted, resets in)`.
    pub async fn count(&self, key: &str, limit: u32, window: Duration) -> Result<(bool, u32, Duration), RedisDown> {
        let (allowed, counted, ttl): (u8, u32, i64) = self
            .call(|mut c| {
                let mut inv = self.window.key(key);
                inv.arg(limit).arg(window.as_millis() as u64);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok((allowed == 1, counted, Duration::from_millis(ttl.max(0) as u64)))
    }

    async fn renew(&self, key: &str, id: &str) -> Result<bool, RedisDown> {
        let lease_ms = self.lease.as_millis() as u64;
        let renewed: u8 = self
            .call(|mut c| {
                let mut inv = self.renew.key(key);
                inv.arg(id).arg(lease_ms);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, key: &str, id: &str) -> Result<(), RedisDown> {
        let _: u8 =
            self.call(|mut c| async move { redis::cmd("ZREM").arg(key).arg(id).query_async(&mut c).await }).await?;
        Ok(())
    }

    /// Waits until the releases already under way have reached Redis (or failed), at most `within`.
    pub async fn settle_releases(&self, within: Duration) {
        self.releases.close();
        let _ = tokio::time::timeout(within, self.releases.wait()).await;
        self.releases.reopen();
    }

    /// Live permits of one gate across the fleet (expired ones not counted).
    pub async fn live(&self, key: &str) -> Result<u64, RedisDown> {
        let key = key.to_owned();
        self.call(|mut c| async move { Script::new(LIVE).key(key).invoke_async(&mut c).await }).await
    }

    pub fn report(&self) -> RedisReport {
        let fallback = fallback_name(self.fallback);
        self.with_link(|l| match l {
            Link::Unknown => RedisReport { state: "unknown", fallback, error: None },
            Link::Up => RedisReport { state: "up", fallback, error: None },
            Link::Down { reason, .. } => RedisReport {
                state: "down",
                fallback,
                error: Some(format!("Redis at `{}` is unreachable: {reason}", self.host)),
            },
        })
    }

    /// True after the last call failed.
    pub fn is_down(&self) -> bool {
        self.with_link(|l| matches!(l, Link::Down { .. }))
    }

    /// Contacts Redis once (at startup, so `/health` knows its state).
    pub async fn ping(&self) -> Result<(), RedisDown> {
        let _: String = self.call(|mut c| async move { redis::cmd("PING").query_async(&mut c).await }).await?;
        Ok(())
    }
}

fn fallback_name(f: ClusterFallback) -> &'static str {
    match f {
        ClusterFallback::Closed => "closed",
        ClusterFallback::Local { .. } => "local",
    }
}

/// One slot held in Redis. Renewed in the background while alive; released when dropped.
pub struct Lease {
    fleet: Arc<Fleet>,
    key: String,
    id: String,
    renewer: JoinHandle<()>,
    /// Rung once the release has reached Redis (the gate's queue head retries then).
    freed: Option<Arc<tokio::sync::Notify>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).field("id", &self.id).finish()
    }
}

impl Lease {
    fn start(fleet: Arc<Fleet>, key: String, id: String) -> Self {
        Self::spawn(fleet, key, id, false)
    }

    /// A lease for work that already runs (a job resumed after a restart): added to Redis in the background
    /// regardless of the limit, then renewed like any other.
    pub fn adopt(fleet: Arc<Fleet>, key: String) -> Self {
        let id = format!("{}:{}", fleet.instance, uuid::Uuid::now_v7().simple());
        Self::spawn(fleet, key, id, true)
    }

    /// Rings `freed` once this lease's release has reached Redis.
    pub fn notifying(mut self, freed: Arc<tokio::sync::Notify>) -> Self {
        self.freed = Some(freed);
        self
    }

    fn spawn(fleet: Arc<Fleet>, key: String, id: String, add_first: bool) -> Self {
        let renewer = tokio::spawn({
            let (fleet, key, id) = (Arc::clone(&fleet), key.clone(), id.clone());
            async move {
                if add_first {
                    let lease_ms = fleet.lease.as_millis() as u64;
                    let added: Result<(u8, u64), _> = fleet
                        .call(|mut c| {
                            let mut inv = fleet.acquire.key(&key);
                            inv.arg(0).arg(&id).arg(lease_ms).arg("1");
                            async move { inv.invoke_async(&mut c).await }
                        })
                        .await;
                    if let Err(e) = added {
                        tracing::warn!(gate = %key, error = %e, "Counting resumed work in Redis failed.");
                    }
                }
                let mut every = tokio::time::interval(fleet.lease / 3);
                every.tick().await;
                loop {
                    every.tick().await;
                    match fleet.renew(&key, &id).await {
                        Ok(true) => {}
                        Ok(false) => {
                            // Redis lost it (expired while unreachable, or flushed): the slot may be someone else's now.
                            tracing::warn!(gate = %key, "A held admission lease had expired in Redis; the slot is no longer counted.");
                            return;
                        }
                        Err(e) => tracing::warn!(gate = %key, error = %e, "Renewing an admission lease failed."),
                    }
                }
            }
        });
        Self { fleet, key, id, renewer, freed: None }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        let (fleet, key, id) = (Arc::clone(&self.fleet), std::mem::take(&mut self.key), std::mem::take(&mut self.id));
        let freed = self.freed.take();
        // Without a runtime (process exit) the lease simply expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let releases = fleet.releases.clone();
            releases.spawn_on(async move {
                if let Err(e) = fleet.release(&key, &id).await {
                    tracing::warn!(gate = %key, error = %e, "Releasing an admission lease failed; it expires on its own.");
                }
                if let Some(freed) = freed {
                    freed.notify_one();
                }
            }, &rt);
        }
    }
}
