//! `storage.retention`: a background task that deletes stored outputs older than the configured age, in the
//! local folder and in S3 alike (by each object's last-modified time). Several instances sweeping one bucket is
//! harmless: deleting an already deleted object succeeds. The gallery's records of those outputs go with them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::ledger::Store;
use crate::state::AppState;

/// How often to sweep: a tenth of the retention, between one minute and one hour.
fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600))
}

/// Sweeps until `stop`; returns at once when retention is off.
pub async fn run(state: AppState, stop: CancellationToken) {
    let Some(retention) = state.config.storage.retention else { return };
    let mut every = tokio::time::interval(interval(retention));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else { continue };
        match state.files.delete_older_than(cutoff).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "Deleted outputs older than the retention."),
            Err(e) => tracing::warn!(error = %e, "Cannot sweep old outputs; trying again later."),
        }
        // The gallery forgets them too (their records, by the time they were made).
        let before_ms = cutoff.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        if let Err(e) = state.ledger.forget_outputs(before_ms).await {
            tracing::warn!(error = %e, "Cannot forget old outputs' records; trying again later.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_often_enough_but_not_constantly() {
        assert_eq!(interval(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(interval(Duration::from_secs(3600)), Duration::from_secs(360));
        assert_eq!(interval(Duration::from_secs(30 * 86400)), Duration::from_secs(3600));
    }
}
