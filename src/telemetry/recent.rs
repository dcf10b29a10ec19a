//! The gateway's most recent failed requests (5xx answers) with their full messages, kept in a small in-memory
//! ring (oldest dropped first) for `GET /v1/gateway/status` and the fleet page. Nothing here survives a restart.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many failures are kept.
pub const KEEP: usize = 50;

/// One failed request.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub request_id: String,
    pub method: String,
    /// The matched route template (`/v1/images/generations`), never the raw path with ids or queries.
    pub route: String,
    pub status: u16,
    /// The model and backend the request was handled with, when it got that far.
    pub model: Option<String>,
    pub backend: Option<String>,
    /// The error message as the client got it.
    pub message: String,
}

/// The ring, shared by every runtime a reload builds.
#[derive(Debug, Default)]
pub struct RecentErrors {
    ring: Mutex<VecDeque<RecentError>>,
}

impl RecentErrors {
    /// Adds a failure; `at_ms` is filled in here.
    pub fn push(&self, mut e: RecentError) {
        e.at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut ring = match self.ring.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if ring.len() == KEEP {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// Newest first.
    pub fn newest_first(&self) -> Vec<RecentError> {
        let ring = match self.ring.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        ring.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(n: usize) -> RecentError {
        RecentError {
            at_ms: 0,
            request_id: format!("req-{n}"),
            method: "POST".into(),
            route: "/v1/images/generations".into(),
            status: 502,
            model: None,
            backend: None,
            message: format!("failure {n}"),
        }
    }

    #[test]
    fn keeps_the_newest_and_drops_the_oldest() {
        let r = RecentErrors::default();
        for n in 0..KEEP + 3 {
            r.push(failure(n));
        }
        let got = r.newest_first();
        assert_eq!(got.len(), KEEP);
        assert_eq!(got[0].request_id, format!("req-{}", KEEP + 2));
        assert_eq!(got[KEEP - 1].request_id, "req-3");
        assert!(got[0].at_ms > 0);
    }
}
