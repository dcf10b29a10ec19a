//! The server: builds the runtime from a config, serves on a listener until shutdown, and runs the background
//! work (health probes) under a task tracker. Shutdown drains: `/readyz` turns 503 and new requests get 503
//! `draining` while in-flight requests and streams finish (up to `server.drain_timeout`); then it stops
//! accepting, stops background tasks, hands its job leases back and releases its Redis permits.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ledger::Store;
use crate::state::AppState;

/// How often the ledger invariants are re-checked (the `easel_ledger_drift` metric).
const LEDGER_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// After the drain, how long idle connections get to close before the listener is dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the last Redis releases may take on the way out.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A built gateway, ready to serve.
pub struct Server {
    state: AppState,
    /// Where a reload reads the configuration again (`None`: reload is refused, saying so).
    source: Option<crate::reload::ConfigSource>,
    /// The certificate served when `server.tls` is set (checked at build, reloaded on SIGHUP).
    certs: Option<std::sync::Arc<crate::tls::Certs>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("reloadable", &self.source.is_some()).finish_non_exhaustive()
    }
}

impl Server {
    /// Builds adapters, gates and storage, then runs one round of health probes (bounded by `health.timeout`) so
    /// the first requests see real backend state.
    pub async fn build(config: Config) -> Result<Self, String> {
        // A certificate that cannot be read is an error before anything else starts.
        let certs = config.server.tls.as_ref().map(crate::tls::Certs::load).transpose()?;
        let state = AppState::build(config).await?;
        check_ledger(&state).await;
        state.processes.launch_except(&state.sets.members()).await;
        crate::health::probe_all(&state.backend_list, state.config.health.timeout).await;
        // Redis down at startup is not fatal: `cluster.fallback` decides, and `/health` shows it.
        if let Some(fleet) = &state.cluster.fleet {
            let _ = fleet.ping().await;
        }
        Ok(Self { state, certs, source: None })
    }

    /// Lets SIGHUP and `POST /v1/admin/reload` read the configuration again from `source`.
    pub fn with_config_source(mut self, source: crate::reload::ConfigSource) -> Self {
        self.source = Some(source);
        self
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let background = CancellationToken::new();
        let tracker = self.state.tasks.clone();
        let live = crate::reload::Live::new(self.state.clone(), self.source.clone());
        tracker.spawn(crate::health::run(live.clone(), background.clone()));
        tracker.spawn(crate::jobs::run(live.clone(), background.clone()));
        self.state.sets.run(&self.state.processes, &self.state.backends, &tracker, &background);
        reload_on_sighup(live.clone(), self.certs.clone(), background.clone());
        tracker.spawn(crate::jobs::webhooks::run(self.state.clone(), background.clone()));
        tracker.spawn(crate::storage::retention::run(self.state.clone(), background.clone()));
        tracker.spawn({
            let (state, cancel) = (self.state.clone(), background.clone());
            async move {
                let mut every = tokio::time::interval(LEDGER_CHECK_INTERVAL);
                every.tick().await;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = every.tick() => check_ledger(&state).await,
                    }
                }
            }
        });

        let app = crate::http::LiveRouter::new(live);
        let stop = CancellationToken::new();
        let stop_signal = stop.clone();
        let draining = self.state.clone();
        let drained = async move {
            shutdown.await;
            drain(&draining).await;
            stop_signal.cancel();
        };
        let serve = match &self.certs {
            Some(certs) => {
                let tls_port = listener.local_addr()?.port();
                if let Some(addr) = self.state.config.server.tls.as_ref().and_then(|t| t.redirect_http) {
                    let plain = TcpListener::bind(addr).await?;
                    let redirect = crate::tls::redirect_router(tls_port, self.state.config.server.public_url.clone());
                    let until = stop.clone();
                    tokio::spawn(
                        async move { crate::http::serve::serve(plain, redirect, until.cancelled_owned()).await },
                    );
                }
                let tls = crate::tls::listen(listener, certs.clone(), stop.clone()).map_err(std::io::Error::other)?;
                tokio::spawn(crate::http::serve::serve(tls, app, drained))
            }
            None => {
                // Small writes (stream events, progress) leave at once instead of waiting for the peer's ACK.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(crate::http::serve::serve(listener, app, drained))
            }
        };
        let result = tokio::select! {
            r = serve => r.map_err(std::io::Error::other),
            () = async { stop.cancelled().await; tokio::time::sleep(CLOSE_GRACE).await } => Ok(()),
        };
        background.cancel();
        self.state.processes.shutdown().await;
        tracker.close();
        tracker.wait().await;
        hand_back(&self.state).await;
        result
    }
}

/// SIGHUP reloads the configuration, then the TLS certificate when there is one (a broken new pair is refused
/// and logged; the old one keeps serving).
fn reload_on_sighup(
    live: crate::reload::Live,
    certs: Option<std::sync::Arc<crate::tls::Certs>>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("Cannot listen for SIGHUP; reload with POST /v1/admin/reload.");
            return;
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    if let Err(why) = live.reload().await {
                        tracing::error!(reason = %why, "SIGHUP: reload refused; still serving the previous configuration.");
                    }
                    match certs.as_ref().map(|c| c.reload()) {
                        None => {}
                        Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded."),
                        Some(Err(e)) => tracing::error!(error = %e, "SIGHUP: the new TLS certificate was refused; still serving the old one."),
                    }
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (live, certs, stop);
}

/// Reaps expired holds and old idempotency records, then checks the ledger invariants; drift is logged and
/// exported, it does not stop serving.
async fn check_ledger(state: &AppState) {
    match state.ledger.reap_expired().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(released = n, "Released credit holds whose lease ran out."),
        Err(e) => tracing::error!(error = %e, "Reaping expired holds failed."),
    }
    match state.ledger.check().await {
        Ok(drift) => {
            crate::telemetry::metrics::ledger_drift(drift.len());
            for d in &drift {
                tracing::error!(account = %d.account, problem = %d.problem, "Ledger drift.");
            }
        }
        Err(e) => tracing::error!(error = %e, "Ledger check failed."),
    }
}

/// SIGTERM: `/readyz` turns 503 at once and new requests get 503 `draining`; waits (at most
/// `server.drain_timeout`) for the requests and streams in flight to finish.
async fn drain(state: &AppState) {
    state.drain.begin();
    let timeout = state.config.server.drain_timeout;
    tracing::info!(
        in_flight = state.drain.in_flight(),
        drain_timeout_s = timeout.as_secs(),
        "Draining: refusing new requests, finishing those in flight."
    );
    if let Err(e) = state.ledger.mark_draining().await {
        tracing::warn!(error = %e, "Marking this instance draining in the ledger failed.");
    }
    if !state.drain.until_idle(timeout).await {
        tracing::warn!(
            in_flight = state.drain.in_flight(),
            drain_timeout_s = timeout.as_secs(),
            "`server.drain_timeout` is over; dropping the requests still in flight."
        );
    }
}

/// The last step of a stop: job and webhook leases go back to the database for another instance, the slots of
/// jobs running here are freed, and the Redis releases under way are given a moment to land.
async fn hand_back(state: &AppState) {
    match state.ledger.hand_back(state.jobs.owner()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "Handed job leases back for another instance to adopt."),
        Err(e) => tracing::warn!(error = %e, "Handing job leases back failed; they lapse on their own."),
    }
    state.jobs.free_all_slots();
    if let Some(fleet) = &state.cluster.fleet {
        fleet.settle_releases(RELEASE_WAIT).await;
    }
    tracing::info!("Stopped.");
}
