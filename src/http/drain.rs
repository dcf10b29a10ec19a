//! Graceful drain: the flag SIGTERM raises, the count of requests still running (a streamed answer counts until
//! its body ends), and the middleware that answers new requests with 503 `draining` while the rest finish.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

use crate::http::error::ApiError;
use crate::state::AppState;

/// The Retry-After a draining instance sends: enough for a load balancer to pick another instance.
pub const RETRY_ELSEWHERE: Duration = Duration::from_secs(1);

/// This process's drain state, shared by every runtime a reload builds.
#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    /// When the drain began (Unix ms), for `/v1/gateway/status`.
    since: Mutex<Option<i64>>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// One request being served; dropping it (when its response body ends or is dropped) counts it done.
#[derive(Debug)]
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// When the drain began (Unix ms), `None` while serving.
    pub fn since(&self) -> Option<i64> {
        *self.since.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts draining: from now on new requests are refused. Returns false when it had started already.
    pub fn begin(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        if first {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            *self.since.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
        }
        first
    }

    /// Requests still being served.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Counts one more piece of work in flight until the returned guard drops (a request, or an image job running
    /// in this process).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    /// Waits until no request is in flight, at most `within`; true when they all finished.
    pub async fn until_idle(&self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let idle = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }
}

/// Paths a load balancer and operators still read while an instance drains (its own state, not new work).
fn always_served(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/health" | "/metrics" | "/v1/gateway/status")
}

/// Counts every request until its response body ends; while draining, refuses new ones with 503 `draining` and
/// Retry-After (the ops endpoints still answer). One step of the front middleware (`http::front`).
pub async fn gate(state: &AppState, req: Request, next: Next) -> Response {
    let drain = &state.drain;
    if always_served(req.uri().path()) {
        return next.run(req).await;
    }
    if drain.is_draining() {
        return ApiError::from(crate::error::Error::Draining).into_response();
    }
    let guard = drain.enter();
    next.run(req).await.map(|body| Body::new(super::Holding::new(body, guard)))
}
