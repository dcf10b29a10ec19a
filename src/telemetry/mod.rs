//! Telemetry: logging setup (validated `EASEL_LOG` / `EASEL_LOG_FORMAT`), the per-request [`context`], process
//! figures for `/metrics` ([`process`]), the metric names (declared once in [`metrics`]) and the ring of
//! [`recent`] failed requests.

pub mod context;
pub mod metrics;
pub mod process;
pub mod recent;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log output format (`EASEL_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The logging settings read from the environment, checked before anything starts.
#[derive(Debug)]
pub struct LogSettings {
    filter: EnvFilter,
    format: LogFormat,
}

/// Reads `EASEL_LOG` (an `EnvFilter` directive list; default `info`) and `EASEL_LOG_FORMAT` (`text` or `json`;
/// default `text`). A value that does not parse is an error naming the variable and what is wrong.
pub fn log_settings(log: Option<&str>, format: Option<&str>) -> Result<LogSettings, String> {
    let filter = match log.map(str::trim).filter(|s| !s.is_empty()) {
        None => EnvFilter::new("info"),
        Some(directives) => EnvFilter::builder().parse(directives).map_err(|e| {
            format!(
                "EASEL_LOG=`{directives}` is not a valid log filter: {e} (examples: `info`, `debug`, `easel=debug,info`, `easel::access=off`)"
            )
        })?,
    };
    let format = match format.map(str::trim).filter(|s| !s.is_empty()) {
        None => LogFormat::Text,
        Some(f) if f.eq_ignore_ascii_case("text") => LogFormat::Text,
        Some(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
        Some(other) => return Err(format!("EASEL_LOG_FORMAT=`{other}` is not a log format: use `text` or `json`")),
    };
    Ok(LogSettings { filter, format })
}

/// Logs to stderr as `EASEL_LOG` and `EASEL_LOG_FORMAT` say; colour only when stderr is a terminal and
/// `NO_COLOR` is unset. Returns the reason when either variable is invalid (nothing is installed then).
pub fn init_logging() -> Result<(), String> {
    let var = |name: &str| match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    };
    let settings = log_settings(var("EASEL_LOG")?.as_deref(), var("EASEL_LOG_FORMAT")?.as_deref())?;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(settings.filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    // A subscriber already installed (an embedding application, or a test) stays.
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_settings_are_validated() {
        assert!(log_settings(None, None).is_ok());
        assert!(log_settings(Some("easel=debug,info"), Some("json")).is_ok());
        assert_eq!(log_settings(None, Some("JSON")).map(|s| s.format).ok(), Some(LogFormat::Json));
        let e = log_settings(Some("easel=loud"), None).unwrap_err();
        assert!(e.contains("EASEL_LOG") && e.contains("easel=loud"), "{e}");
        let e = log_settings(None, Some("xml")).unwrap_err();
        assert!(e.contains("EASEL_LOG_FORMAT") && e.contains("xml"), "{e}");
    }
}
