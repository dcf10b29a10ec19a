//! The per-request context: the request id, the client's W3C `traceparent`, and a slot the pipeline fills with
//! what handled the request (model, backend, key name) for the access log.
//!
//! It travels as a tokio task-local, set by the HTTP layer around each request, rather than as a field of every
//! call struct: the id must reach the one place outbound requests are sent (`backends::client::Http::send`)
//! through every adapter and pipeline, and threading it through each adapter signature would touch all of them
//! for a value none of them reads. The cost is that a task spawned for a request must carry it explicitly:
//! [`propagate`] does that (and keeps the request's log span), and every spawn on a request path uses it.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tracing::Instrument;

/// What one request carries while it is handled.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The `X-Request-Id` (the client's when sane, else generated).
    pub id: Arc<str>,
    /// The client's `traceparent`, when it is valid W3C trace context.
    pub traceparent: Option<Arc<str>>,
    handling: Arc<Mutex<Handling>>,
}

/// What handled the request, as the pipeline learns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handling {
    pub model: Option<String>,
    pub backend: Option<String>,
    pub key: Option<String>,
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// Longest client-chosen request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

impl RequestContext {
    /// Takes the client's id when it is 1–128 visible ASCII characters, else generates one; keeps `traceparent`
    /// only when it is valid.
    pub fn new(client_id: Option<&str>, traceparent: Option<&str>) -> Self {
        let id = match client_id.filter(|id| sane_request_id(id)) {
            Some(id) => Arc::from(id),
            None => Arc::from(format!("req_{}", uuid::Uuid::now_v7().simple())),
        };
        let traceparent = traceparent.map(str::trim).filter(|t| valid_traceparent(t)).map(Arc::from);
        Self { id, traceparent, handling: Arc::default() }
    }

    /// A copy of what the pipeline recorded so far.
    pub fn handling(&self) -> Handling {
        match self.handling.lock() {
            Ok(h) => h.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn note(&self, f: impl FnOnce(&mut Handling)) {
        match self.handling.lock() {
            Ok(mut h) => f(&mut h),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Runs `fut` with this context current.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }
}

/// The current request's context, if this task runs for a request.
pub fn current() -> Option<RequestContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The current request id, if any.
pub fn request_id() -> Option<Arc<str>> {
    CURRENT.try_with(|c| Arc::clone(&c.id)).ok()
}

/// Wraps a future about to be spawned so it runs with the spawning request's context and log span.
///
/// Not an `async` block: one would hold `fut` twice (its captured copy beside the scope future awaiting it), so a
/// spawned request task, and what moving it copies, would be twice the size of its work.
pub fn propagate<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let fut = fut.instrument(tracing::Span::current());
    match current() {
        Some(ctx) => futures_util::future::Either::Left(ctx.scope(fut)),
        None => futures_util::future::Either::Right(fut),
    }
}

/// Records the model the request asked for (a configured model id).
pub fn note_model(model: &str) {
    if let Some(c) = current() {
        c.note(|h| h.model = Some(model.to_owned()));
    }
}

/// Records the backend the request was last sent to.
pub fn note_backend(backend: &str) {
    if let Some(c) = current() {
        c.note(|h| h.backend = Some(backend.to_owned()));
    }
}

/// Records the name of the API key that authenticated the request (its name, never its secret).
pub fn note_key(name: &str) {
    if let Some(c) = current() {
        c.note(|h| h.key = Some(name.to_owned()));
    }
}

/// 1–128 characters, each visible ASCII (`!`..=`~`): safe in a header, a log line and a JSON string.
pub fn sane_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

/// W3C trace context `traceparent`: `vv-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, version
/// not `ff`, ids not all zero. Version 00 has exactly four fields; later versions may append more.
pub fn valid_traceparent(t: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut parts = t.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest_ok = if version == "00" { parts.next().is_none() } else { true };
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && rest_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_taken_only_when_sane() {
        assert!(sane_request_id("abc-123_XYZ.:/"));
        assert!(!sane_request_id(""));
        assert!(!sane_request_id("has space"));
        assert!(!sane_request_id("tab\there"));
        assert!(!sane_request_id("caf\u{e9}"));
        assert!(!sane_request_id(&"x".repeat(129)));
        assert!(sane_request_id(&"x".repeat(128)));
        let generated = RequestContext::new(Some("bad id"), None);
        assert_ne!(&*generated.id, "bad id");
        assert!(sane_request_id(&generated.id));
    }

    #[test]
    fn traceparent_follows_w3c_trace_context() {
        assert!(valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
        assert!(!valid_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert!(valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        assert!(!valid_traceparent("garbage"));
    }

    #[tokio::test]
    async fn a_propagated_future_is_its_work_once_and_runs_in_the_request_context() {
        let work = |n: usize| async move {
            let state = [7u8; 4096];
            tokio::task::yield_now().await;
            (request_id(), state.iter().map(|&b| usize::from(b)).sum::<usize>() + n)
        };
        let alone = std::mem::size_of_val(&work(0));
        let ctx = RequestContext::new(Some("req-1"), None);
        let (wrapped, inside) = ctx
            .scope(async {
                let fut = propagate(work(1));
                (std::mem::size_of_val(&fut), tokio::spawn(fut).await)
            })
            .await;
        // The span and the context add a few words; a second copy of the work would add 4 KB.
        assert!(wrapped < alone + 256, "wrapped {wrapped} bytes around {alone}");
        let (id, sum) = inside.unwrap();
        assert_eq!((id.as_deref(), sum), (Some("req-1"), 7 * 4096 + 1), "the spawned task sees the request id");
        let (id, _) = tokio::spawn(propagate(work(2))).await.unwrap();
        assert_eq!(id, None, "without a request there is no context to carry");
    }
}
