//! Telemetry: logging setup and the metric names (declared once in [`metrics`]).

pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `EASEL_LOG` (default `info`); `json` output when `EASEL_LOG_FORMAT=json`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_env("EASEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("EASEL_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
