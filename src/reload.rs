//! Config reload (SIGHUP and `POST /v1/admin/reload`): the [`Live`] handle holding the current runtime, and
//! the reload itself. The new file is read and validated first; a bad file, or a change to settings that only a
//! restart can apply, changes nothing and says why. A request keeps the runtime it started with (its backends,
//! prices and admission slots) until it ends; requests after the reload get the new one. Backends whose
//! definition did not change keep their handle, so their admission counts, health and circuit carry over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;

use crate::config::Config;
use crate::state::{AppState, same_backend};

/// Where a reload reads the configuration from (the file easel was started with, with the same overrides).
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// The current runtime, swapped by a reload. Cheap to clone.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<AppState>,
    /// Moves on at every reload (the HTTP layer rebuilds its router when it sees a new one).
    generation: AtomicU64,
    source: Option<ConfigSource>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("generation", &self.generation()).finish_non_exhaustive()
    }
}

/// What a reload changed, for the log and the admin API's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    /// The configuration's origin (its file).
    pub config: String,
    pub generation: u64,
    pub models: Vec<String>,
    /// Backends kept as they were (admission counts and health carried over).
    pub unchanged_backends: Vec<String>,
    /// Backends new or redefined (fresh admission counts; requests still running on an old definition finish
    /// there).
    pub changed_backends: Vec<String>,
    /// Backends no longer configured: no new work goes there; work already there finishes.
    pub removed_backends: Vec<String>,
}

impl Live {
    pub fn new(state: AppState, source: Option<ConfigSource>) -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::new(state),
                generation: AtomicU64::new(0),
                source,
                reloading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The runtime new work should use.
    pub fn current(&self) -> AppState {
        self.inner.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Reads the configuration again and, if it is valid and needs no restart, serves it from now on.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let Some(source) = &self.inner.source else {
            return Err("this easel was not started from a configuration it can read again".into());
        };
        let _one = self.inner.reloading.lock().await;
        let config = source()?;
        let old = self.current();
        let needs_restart = restart_only_changes(&old.config, &config);
        if !needs_restart.is_empty() {
            return Err(format!(
                "{} can only change at a restart; restart easel, or undo that change in {} and reload again",
                needs_restart.join(", "),
                config.origin
            ));
        }
        let new = old.rebuild(config).await?;
        let report = report(&old, &new);
        *self.inner.current.write().unwrap_or_else(PoisonError::into_inner) = new;
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let report = Reloaded { generation, ..report };
        tracing::info!(
            config = %report.config,
            generation,
            changed = %report.changed_backends.join(","),
            removed = %report.removed_backends.join(","),
            "Configuration reloaded."
        );
        Ok(report)
    }
}

fn report(old: &AppState, new: &AppState) -> Reloaded {
    let (mut unchanged, mut changed) = (Vec::new(), Vec::new());
    for b in &new.backend_list {
        match old.backends.get(&b.cfg.name) {
            Some(o) if Arc::ptr_eq(o, b) => unchanged.push(b.cfg.name.clone()),
            _ => changed.push(b.cfg.name.clone()),
        }
    }
    let removed = old
        .backend_list
        .iter()
        .filter(|o| !new.config.backends.iter().any(|b| b.name == o.cfg.name))
        .map(|o| o.cfg.name.clone())
        .collect();
    Reloaded {
        config: new.config.origin.clone(),
        generation: 0,
        models: new.config.models.iter().map(|m| m.id.clone()).collect(),
        unchanged_backends: unchanged,
        changed_backends: changed,
        removed_backends: removed,
    }
}

/// The settings that differ between `old` and `new` and that a running easel cannot change: where it listens,
/// its certificate, its storage and database, its hosts and working sets, and managed processes (a reload never
/// starts, stops or restarts a server process).
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("`server.listen`".to_owned());
    }
    if format!("{:?}", old.server.tls) != format!("{:?}", new.server.tls) {
        changed.push("`server.tls`".to_owned());
    }
    // `Debug` hides secrets, so they are compared apart.
    let secrets = |c: &Config| {
        let s3 = c.storage.s3.as_ref();
        [
            c.storage.signing_secret.as_ref(),
            s3.and_then(|s| s.access_key_id.as_ref()),
            s3.and_then(|s| s.secret_access_key.as_ref()),
        ]
        .map(|s| s.map(|s| s.expose().to_owned()))
    };
    if format!("{:?}", old.storage) != format!("{:?}", new.storage) || secrets(old) != secrets(new) {
        changed.push("`storage`".to_owned());
    }
    if format!("{:?}", old.jobs.webhooks) != format!("{:?}", new.jobs.webhooks)
        || old.jobs.webhooks.secret.as_ref().map(|s| s.expose())
            != new.jobs.webhooks.secret.as_ref().map(|s| s.expose())
    {
        changed.push("`jobs.webhooks`".to_owned());
    }
    if format!("{:?}", old.health.interval) != format!("{:?}", new.health.interval) {
        changed.push("`health.interval`".to_owned());
    }
    if format!("{:?}", old.cluster) != format!("{:?}", new.cluster)
        || old.cluster.as_ref().map(|c| c.redis.expose().to_owned())
            != new.cluster.as_ref().map(|c| c.redis.expose().to_owned())
        || format!("{:?}", old.auth.key_limits) != format!("{:?}", new.auth.key_limits)
    {
        changed.push("`cluster` / `auth.key_limits`".to_owned());
    }
    if old.hosts != new.hosts || format!("{:?}", old.working_sets) != format!("{:?}", new.working_sets) {
        changed.push("`hosts` / `working_sets`".to_owned());
    }
    let managed =
        |c: &Config| c.backends.iter().filter(|b| b.process.is_some()).map(|b| b.name.clone()).collect::<Vec<_>>();
    let (was, is) = (managed(old), managed(new));
    for name in was.iter().chain(is.iter().filter(|n| !was.contains(n))) {
        let before = old.backends.iter().find(|b| &b.name == name);
        let after = new.backends.iter().find(|b| &b.name == name);
        let same = matches!((before, after), (Some(a), Some(b)) if same_backend(a, b));
        if !same {
            changed.push(format!("managed backend `{name}`"));
        }
    }
    changed
}
