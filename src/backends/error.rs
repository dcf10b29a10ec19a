//! `BackendError`: what went wrong with one upstream call, as data: who caused it, whether another backend could
//! help (fallback), and what the user needs to know (backend, URL, upstream message, hint). The HTTP status is
//! chosen from this in `http::error`, nowhere else.

use std::fmt;
use std::time::Duration;

use crate::config::BackendKind;

/// One failed upstream call.
#[derive(Debug, Clone, thiserror::Error)]
pub struct BackendError {
    /// The configured backend name.
    pub backend: String,
    pub kind: BackendKind,
    /// The URL that was called (never with credentials).
    pub url: String,
    pub failure: Failure,
    /// No other backend may be tried after this one: the request may have reached it (an ambiguous video
    /// submit), so another attempt could run the work twice.
    pub final_attempt: bool,
}

/// How the call failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// No connection could be made (refused, DNS, TLS).
    Connect(String),
    /// No complete answer in time.
    Timeout(Duration),
    /// The connection was made and then broke before a complete answer (reset, closed mid-response): the
    /// request may have arrived.
    Disconnected(String),
    /// The backend answered with an HTTP error status.
    Status {
        status: u16,
        /// The upstream's own message, excerpted.
        message: String,
        /// What the user should check, when the adapter knows more than the status says.
        hint: Option<String>,
        /// From the upstream's `Retry-After` or an equivalent (Hugging Face `estimated_time`).
        retry_after: Option<Duration>,
    },
    /// The backend refused the request's content (validation, safety): the client's to fix.
    Rejected(String),
    /// The backend answered success, but not in the shape its protocol defines.
    InvalidResponse(String),
    /// The backend accepted the job and then failed it (ComfyUI `execution_error`, an InvokeAI item `failed`, a
    /// Replicate prediction `failed`), or the job was cancelled.
    JobFailed(String),
    /// The backend kind cannot do this operation.
    Unsupported(&'static str),
    /// This model cannot use a field the request sent (an edit image or mask its workflow has no input for):
    /// the client's to fix, named by `param`.
    UnusableField { param: &'static str, message: String },
    /// easel's own configuration (a body or workflow template) could not be rendered for this request: a server
    /// fault (500), not the client's and not the backend's.
    Config(String),
}

impl BackendError {
    pub fn new(backend: &str, kind: BackendKind, url: impl Into<String>, failure: Failure) -> Self {
        Self { backend: backend.to_owned(), kind, url: url.into(), failure, final_attempt: false }
    }

    /// Marks this failure as the last attempt: dispatch tries no other backend after it.
    pub fn finally(mut self) -> Self {
        self.final_attempt = true;
        self
    }

    /// Whether the request may have been received and acted on although no usable answer came back: a timeout,
    /// a connection broken after it was made, a success answer easel could not read, or a gateway's 502/504.
    /// (A refused connection or a definite error status means the backend did not take the work.)
    pub fn maybe_received(&self) -> bool {
        match &self.failure {
            Failure::Timeout(_) | Failure::Disconnected(_) | Failure::InvalidResponse(_) => true,
            Failure::Status { status, .. } => matches!(status, 502 | 504),
            _ => false,
        }
    }

    /// Whether trying another backend could succeed: true for faults of this backend, false for faults of the
    /// request (a 4xx the client caused would fail everywhere).
    pub fn retryable(&self) -> bool {
        if self.final_attempt {
            return false;
        }
        match &self.failure {
            Failure::Connect(_)
            | Failure::Timeout(_)
            | Failure::Disconnected(_)
            | Failure::InvalidResponse(_)
            | Failure::JobFailed(_) => true,
            Failure::Status { status, .. } => !matches!(status, 400 | 413 | 415 | 422),
            Failure::Rejected(_) | Failure::Unsupported(_) | Failure::UnusableField { .. } | Failure::Config(_) => {
                false
            }
        }
    }

    /// Whether this failure says the backend itself is in trouble (feeds the circuit breaker).
    pub fn is_backend_fault(&self) -> bool {
        match &self.failure {
            Failure::Connect(_) | Failure::Timeout(_) | Failure::Disconnected(_) | Failure::InvalidResponse(_) => true,
            Failure::Status { status, .. } => *status >= 500,
            // The server is alive and answering; the job (or its workflow) failed.
            Failure::Rejected(_)
            | Failure::Unsupported(_)
            | Failure::UnusableField { .. }
            | Failure::JobFailed(_)
            | Failure::Config(_) => false,
        }
    }

    /// A short outcome label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match &self.failure {
            Failure::Connect(_) => "connect_error",
            Failure::Timeout(_) => "timeout",
            Failure::Disconnected(_) => "disconnected",
            Failure::Status { status, .. } if *status >= 500 => "upstream_5xx",
            Failure::Status { .. } => "upstream_4xx",
            Failure::Rejected(_) => "rejected",
            Failure::InvalidResponse(_) => "invalid_response",
            Failure::JobFailed(_) => "job_failed",
            Failure::Unsupported(_) | Failure::UnusableField { .. } => "unsupported",
            Failure::Config(_) => "config_error",
        }
    }

    /// The hint shown after the message for a status, when the adapter gave none.
    fn default_hint(&self, status: u16) -> Option<String> {
        let kind = self.kind;
        match status {
            404 | 405 => Some(format!(
                "the server does not serve this path for kind `{kind}`: check that `url` is the server's root and that it really is a `{kind}` server (`easel doctor` probes it)"
            )),
            401 | 403 => Some(format!(
                "the backend refused easel's credentials: check `api_key` (or `headers`) of backend `{}`",
                self.backend
            )),
            _ => None,
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, kind, url) = (&self.backend, self.kind, &self.url);
        match &self.failure {
            Failure::Connect(detail) => {
                write!(
                    f,
                    "backend `{name}` ({kind}) is unreachable at {url}: {detail}; is the server running and is `url` right?"
                )
            }
            Failure::Timeout(after) => {
                write!(
                    f,
                    "backend `{name}` ({kind}) did not answer within {} at {url}; raise `timeout` if generations take longer",
                    humantime::format_duration(*after)
                )
            }
            Failure::Disconnected(detail) => {
                write!(
                    f,
                    "backend `{name}` ({kind}) broke the connection before answering at {url}: {detail}; did the server crash or restart, or does a proxy in between close slow requests?"
                )
            }
            Failure::Status { status, message, hint, .. } => {
                write!(f, "backend `{name}` ({kind}) answered HTTP {status} at {url}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                match hint.clone().or_else(|| self.default_hint(*status)) {
                    Some(h) => write!(f, " (hint: {h})"),
                    None => Ok(()),
                }
            }
            Failure::Rejected(message) => write!(f, "backend `{name}` ({kind}) rejected the request: {message}"),
            Failure::InvalidResponse(detail) => {
                write!(f, "backend `{name}` ({kind}) sent a response easel cannot use from {url}: {detail}")
            }
            Failure::JobFailed(detail) => write!(f, "backend `{name}` ({kind}) failed the job: {detail}"),
            Failure::Unsupported(op) => write!(f, "backend `{name}` ({kind}) cannot {op}"),
            Failure::UnusableField { message, .. } => f.write_str(message),
            Failure::Config(detail) => write!(f, "backend `{name}` ({kind}) is misconfigured in easel: {detail}"),
        }
    }
}

/// The most useful message in an upstream error body, whatever its dialect: OpenAI `error.message`, Hugging
/// Face `error` (string or list), FastAPI `detail` (string or pydantic list), A1111 `errors`, or plain text.
pub fn upstream_message(body: &[u8]) -> String {
    const MAX: usize = 500;
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => json_message(&v).unwrap_or_else(|| v.to_string()),
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    excerpt(&text, MAX)
}

fn json_message(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let obj = v.as_object()?;
    if let Some(Value::Object(e)) = obj.get("error")
        && let Some(Value::String(m)) = e.get("message")
    {
        return Some(m.clone());
    }
    // A1111: {"error": "RuntimeError", "detail": "", "errors": "model 'x' not found"}
    if let Some(Value::String(errors)) = obj.get("errors")
        && !errors.is_empty()
    {
        let class = obj.get("error").and_then(Value::as_str).unwrap_or("");
        return Some(if class.is_empty() { errors.clone() } else { format!("{class}: {errors}") });
    }
    match obj.get("detail") {
        Some(Value::String(d)) if !d.is_empty() => return Some(d.clone()),
        Some(Value::Array(items)) => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| {
                    let loc = i.get("loc").and_then(Value::as_array).map(|l| {
                        l.iter()
                            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
                            .collect::<Vec<_>>()
                            .join(".")
                    });
                    let msg = i.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                    match loc {
                        Some(loc) if !loc.is_empty() => format!("{loc}: {msg}"),
                        _ => msg.to_owned(),
                    }
                })
                .collect();
            return Some(parts.join("; "));
        }
        _ => {}
    }
    match obj.get("error") {
        Some(Value::String(s)) => return Some(s.clone()),
        Some(Value::Array(items)) => {
            return Some(
                items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        _ => {}
    }
    for key in ["message", "error_description", "title"] {
        if let Some(Value::String(s)) = obj.get(key) {
            return Some(s.clone());
        }
    }
    None
}

/// `estimated_time` (seconds) from a JSON error body, as Hugging Face sends while a model loads.
pub fn estimated_time(body: &[u8]) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let secs = v.get("estimated_time")?.as_f64()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// At most `max` characters of `s`, marked when cut.
pub fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let cut: String = s.chars().take(max).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_dialect_of_error_body() {
        assert_eq!(upstream_message(br#"{"error":{"message":"bad size","type":"invalid_request_error"}}"#), "bad size");
        assert_eq!(
            upstream_message(br#"{"error":"Model x is currently loading","estimated_time":3.0}"#),
            "Model x is currently loading"
        );
        assert_eq!(upstream_message(br#"{"error":["a","b"]}"#), "a; b");
        assert_eq!(
            upstream_message(br#"{"detail":[{"loc":["body","steps"],"msg":"value is not a valid integer","type":"type_error.integer"}]}"#),
            "body.steps: value is not a valid integer"
        );
        assert_eq!(
            upstream_message(br#"{"error":"RuntimeError","detail":"","body":"","errors":"model 'x' not found"}"#),
            "RuntimeError: model 'x' not found"
        );
        assert_eq!(upstream_message(br#"{"detail":"Sampler not found"}"#), "Sampler not found");
        assert_eq!(upstream_message(b"Internal Server Error"), "Internal Server Error");
    }

    #[test]
    fn client_faults_are_not_retried_elsewhere() {
        let e = |status| {
            BackendError::new(
                "b",
                BackendKind::OpenAi,
                "u",
                Failure::Status { status, message: String::new(), hint: None, retry_after: None },
            )
        };
        assert!(!e(400).retryable());
        assert!(!e(422).retryable());
        assert!(e(500).retryable());
        assert!(e(404).retryable());
        assert!(e(503).is_backend_fault());
        assert!(!e(404).is_backend_fault());
    }
}
