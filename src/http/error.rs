//! The only place an error becomes an HTTP status: [`ApiError`] → status, OpenAI error body and `Retry-After`,
//! by exhaustive match (a new error variant does not compile until it is mapped here). The response carries the
//! error text in an extension so the logging middleware can log server-side failures once.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::admission::AdmissionError;
use crate::api::error::{ErrorBody, ErrorObject};
use crate::backends::{BackendError, Failure};
use crate::error::Error;
use crate::ledger::LedgerError;
use crate::routing::RoutingError;
use crate::sets::SetError;

/// An error on its way out.
#[derive(Debug)]
pub struct ApiError(pub Box<Error>);

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        Self(Box::new(e.into()))
    }
}

/// The error message of a 5xx response, for the logging middleware.
#[derive(Debug, Clone)]
pub struct ServerFault(pub String);

/// How one error leaves.
struct Shape {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    retry_after: Option<Duration>,
    /// Adds `WWW-Authenticate: Bearer` (401s).
    bearer_challenge: bool,
    /// Adds `x-should-retry: false`: only an operator can fix it.
    no_retry: bool,
}

impl Shape {
    fn new(status: StatusCode, kind: &'static str, code: &'static str) -> Self {
        Self {
            status,
            kind,
            code: Some(code),
            param: None,
            retry_after: None,
            bearer_challenge: false,
            no_retry: false,
        }
    }
    fn retry(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

const INVALID: &str = "invalid_request_error";
const SERVER: &str = "server_error";

fn shape(e: &Error) -> Shape {
    match e {
        Error::Request(r) => Shape {
            param: r.param.clone(),
            ..Shape::new(StatusCode::BAD_REQUEST, INVALID, r.code.unwrap_or("invalid_request_error"))
        },
        Error::Routing(r) => match r {
            RoutingError::ModelNotFound { .. } => {
                Shape { param: Some("model".into()), ..Shape::new(StatusCode::NOT_FOUND, INVALID, "model_not_found") }
            }
            RoutingError::WrongType { .. } => Shape {
                param: Some("model".into()),
                ..Shape::new(StatusCode::BAD_REQUEST, INVALID, "wrong_model_type")
            },
            RoutingError::NoHealthyBackend { .. } => {
                Shape::new(StatusCode::SERVICE_UNAVAILABLE, SERVER, "backend_unavailable").retry(Duration::from_secs(5))
            }
        },
        Error::Admission(a) => match a {
            AdmissionError::QueueFull { .. } | AdmissionError::QueueTimeout { .. } => {
                Shape::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "backend_busy").retry(a.retry_after())
            }
            AdmissionError::Draining { .. } => {
                Shape::new(StatusCode::SERVICE_UNAVAILABLE, SERVER, "backend_unavailable").retry(a.retry_after())
            }
            AdmissionError::RedisUnavailable { .. } => {
                Shape::new(StatusCode::SERVICE_UNAVAILABLE, SERVER, "redis_unavailable").retry(a.retry_after())
            }
        },
        Error::KeyLimited(k) => {
            Shape::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limited").retry(k.retry_after())
        }
        Error::Backend(b) => backend_shape(b),
        Error::WorkingSet(w) => set_shape(w),
        Error::Storage(_) => Shape::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER, "storage_error"),
        Error::FileNotFound(_) => Shape::new(StatusCode::NOT_FOUND, INVALID, "file_not_found"),
        Error::JobNotFound(_) => Shape::new(StatusCode::NOT_FOUND, INVALID, "not_found"),
        Error::LinkRefused { code, .. } => Shape::new(StatusCode::FORBIDDEN, "permission_error", code),
        Error::RouteNotFound { .. } => Shape::new(StatusCode::NOT_FOUND, INVALID, "not_found"),
        Error::UnsupportedEndpoint { .. } => Shape::new(StatusCode::NOT_FOUND, INVALID, "unsupported_endpoint"),
        Error::MethodNotAllowed { .. } => Shape::new(StatusCode::METHOD_NOT_ALLOWED, INVALID, "method_not_allowed"),
        Error::PayloadTooLarge { .. } => Shape::new(StatusCode::PAYLOAD_TOO_LARGE, INVALID, "request_too_large"),
        Error::UnsupportedMediaType(_) => {
            Shape::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, INVALID, "unsupported_media_type")
        }
        Error::ReloadRefused(_) => Shape::new(StatusCode::BAD_REQUEST, INVALID, "config_rejected"),
        Error::Internal(_) => Shape::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER, "internal_error"),
        Error::Draining => {
            Shape::new(StatusCode::SERVICE_UNAVAILABLE, SERVER, "draining").retry(super::drain::RETRY_ELSEWHERE)
        }
        Error::UpstreamImageTooLarge(_) => Shape::new(StatusCode::BAD_GATEWAY, SERVER, "backend_error"),
        Error::Ledger(l) => match l {
            LedgerError::Insufficient { .. } => {
                Shape::new(StatusCode::PAYMENT_REQUIRED, "insufficient_quota", "insufficient_credits")
            }
            LedgerError::IdempotencyMismatch => {
                Shape::new(StatusCode::UNPROCESSABLE_ENTITY, INVALID, "idempotency_key_mismatch")
            }
            LedgerError::IdempotencyInProgress => {
                Shape::new(StatusCode::CONFLICT, INVALID, "idempotency_in_progress").retry(Duration::from_secs(1))
            }
            LedgerError::UnknownKey(_) => Shape::new(StatusCode::NOT_FOUND, INVALID, "key_not_found"),
            LedgerError::KeyExists(_) => Shape::new(StatusCode::CONFLICT, INVALID, "key_exists"),
            LedgerError::Db(_) => Shape::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER, "ledger_error"),
        },
        Error::Unauthorized(_) => {
            Shape { bearer_challenge: true, ..Shape::new(StatusCode::UNAUTHORIZED, INVALID, "invalid_api_key") }
        }
        Error::ModelNotAllowed { .. } => Shape {
            param: Some("model".into()),
            ..Shape::new(StatusCode::FORBIDDEN, "permission_error", "model_not_allowed")
        },
        // nginx's "client closed request": only logs and metrics ever see it.
        Error::ClientGone => {
            Shape::new(StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST), INVALID, "client_closed_request")
        }
    }
}

fn set_shape(w: &SetError) -> Shape {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    let shape = match w {
        SetError::Inactive { .. } => Shape {
            param: Some("model".into()),
            no_retry: true,
            ..Shape::new(StatusCode::CONFLICT, INVALID, "working_set_inactive")
        },
        SetError::Full { .. } => Shape::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "backend_busy"),
        SetError::Switching { .. } | SetError::Interrupted { .. } => {
            Shape::new(unavailable, SERVER, "working_set_switching")
        }
        SetError::Failed { .. } => Shape::new(unavailable, SERVER, "working_set_failed"),
        SetError::Busy { .. } => Shape::new(unavailable, SERVER, "working_set_busy"),
        SetError::Conflict { .. } => Shape::new(StatusCode::CONFLICT, INVALID, "working_set_switching"),
        SetError::UnknownSet(_) => Shape::new(StatusCode::NOT_FOUND, INVALID, "working_set_not_found"),
        SetError::UnknownHost(_) => Shape::new(StatusCode::NOT_FOUND, INVALID, "host_not_found"),
        SetError::NotManaged(_) => Shape::new(StatusCode::NOT_FOUND, INVALID, "backend_not_found"),
        SetError::InUse { .. } => Shape::new(StatusCode::CONFLICT, INVALID, "backend_in_use"),
        SetError::NotRunning { .. } => Shape::new(StatusCode::CONFLICT, INVALID, "backend_not_running"),
        SetError::RestartFailed { .. } => Shape::new(StatusCode::BAD_GATEWAY, SERVER, "backend_restart_failed"),
    };
    match w.retry_after() {
        Some(after) => shape.retry(after),
        None => shape,
    }
}

fn backend_shape(b: &BackendError) -> Shape {
    match &b.failure {
        Failure::Connect(_) => {
            Shape::new(StatusCode::SERVICE_UNAVAILABLE, SERVER, "backend_unavailable").retry(Duration::from_secs(5))
        }
        Failure::Timeout(_) => Shape::new(StatusCode::GATEWAY_TIMEOUT, SERVER, "backend_timeout"),
        Failure::Disconnected(_) => Shape::new(StatusCode::BAD_GATEWAY, SERVER, "backend_error"),
        Failure::Status { status, retry_after, .. } => match status {
            // The upstream judged the request's content: pass its verdict on as the client's to fix.
            400 | 413 | 415 | 422 => Shape::new(StatusCode::BAD_REQUEST, INVALID, "backend_rejected_request"),
            429 => Shape::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limited")
                .retry(retry_after.unwrap_or(Duration::from_secs(5))),
            503 => Shape::new(StatusCode::SERVICE_UNAVAILABLE, SERVER, "backend_unavailable")
                .retry(retry_after.unwrap_or(Duration::from_secs(5))),
            _ => Shape::new(StatusCode::BAD_GATEWAY, SERVER, "backend_error"),
        },
        Failure::Rejected(_) => Shape::new(StatusCode::BAD_REQUEST, INVALID, "backend_rejected_request"),
        Failure::InvalidResponse(_) | Failure::JobFailed(_) => {
            Shape::new(StatusCode::BAD_GATEWAY, SERVER, "backend_error")
        }
        Failure::Unsupported(_) => Shape::new(StatusCode::BAD_REQUEST, INVALID, "unsupported_operation"),
        Failure::Config(_) => Shape::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER, "config_error"),
        Failure::UnusableField { param, .. } => Shape {
            param: Some((*param).to_owned()),
            ..Shape::new(StatusCode::BAD_REQUEST, INVALID, "unsupported_operation")
        },
    }
}

impl ApiError {
    /// The OpenAI-shaped body alone, for an error that must travel inside an answer already begun (an SSE
    /// `error` event).
    pub fn body(&self) -> Vec<u8> {
        error_json(&shape(&self.0), &self.0.to_string())
    }
}

fn error_json(shape: &Shape, message: &str) -> Vec<u8> {
    let request_id = crate::telemetry::context::request_id();
    let body = ErrorBody {
        error: ErrorObject {
            message,
            kind: shape.kind,
            param: shape.param.as_deref(),
            code: shape.code,
            request_id: request_id.as_deref(),
        },
    };
    serde_json::to_vec(&body).unwrap_or_else(|_| {
        br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_vec()
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let shape = shape(&self.0);
        let message = self.0.to_string();
        let json = error_json(&shape, &message);
        let mut resp = (shape.status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json)
            .into_response();
        if let Some(after) = shape.retry_after {
            // Whole seconds, never 0.
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if shape.no_retry {
            resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if shape.bearer_challenge {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if shape.status.is_server_error() {
            resp.extensions_mut().insert(ServerFault(message));
        }
        resp
    }
}
