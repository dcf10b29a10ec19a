//! The one error type the pipeline returns: each layer's own error, wrapped. `http::error` maps every variant
//! to a status and an OpenAI error body by exhaustive match.

use crate::admission::AdmissionError;
use crate::admission::keys::KeyLimited;
use crate::backends::BackendError;
use crate::ledger::LedgerError;
use crate::request::RequestError;
use crate::routing::RoutingError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// An API key over `auth.key_limits` (429 `rate_limited`).
    #[error(transparent)]
    KeyLimited(#[from] KeyLimited),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The model's working set cannot serve it now (inactive, switching, failed).
    #[error(transparent)]
    WorkingSet(#[from] crate::sets::SetError),
    /// No key, an unknown key or a revoked key (or a wrong admin token).
    #[error("{0}")]
    Unauthorized(String),
    #[error("API key `{key}` may not use model `{model}`; it may use: {allowed}")]
    ModelNotAllowed { key: String, model: String, allowed: String },
    /// The client disconnected before the result was ready (never seen by the client; logged and counted).
    #[error("the client went away before the result was ready")]
    ClientGone,
    /// A signed output URL that is not valid (wrong signature) or no longer valid (expired): 403 with `code`.
    #[error("{message}")]
    LinkRefused { message: String, code: &'static str },
    /// A job id that does not exist, or belongs to another key.
    #[error("no video or job `{0}` for this key")]
    JobNotFound(String),
    /// A stored file id that does not exist (or was never issued).
    #[error("no file `{0}`: it was never issued by this gateway or has been deleted")]
    FileNotFound(String),
    #[error("no route {method} {path}; the API lives under /v1 (e.g. POST /v1/images/generations)")]
    RouteNotFound { method: String, path: String },
    /// An OpenAI-style path easel does not serve (e.g. `/v1/audio/speech`): not a wrong path, a missing feature.
    #[error(
        "easel does not serve {method} {path}; it serves /v1/images/generations, /v1/images/edits, /v1/images/variations, /v1/videos, /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /v1/files and /v1/jobs"
    )]
    UnsupportedEndpoint { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request body is larger than the {limit}-byte limit (`server.max_body`)")]
    PayloadTooLarge { limit: usize },
    #[error(
        "content type `{0}` is not accepted here; send application/json, multipart/form-data or application/x-www-form-urlencoded"
    )]
    UnsupportedMediaType(String),
    /// An upstream output easel must transcode is over a decode limit (the message names it).
    #[error("the backend returned an image easel will not transcode: {0}")]
    UpstreamImageTooLarge(String),
    /// A reload was refused (the new configuration is invalid, or needs a restart); nothing changed.
    #[error("the configuration was not reloaded, and nothing changed: {0}")]
    ReloadRefused(String),
    /// This instance is shutting down (SIGTERM): it finishes what it runs and takes nothing new.
    #[error("this easel instance is shutting down and takes no new requests; retry, another instance will serve it")]
    Draining,
    /// easel's own fault (a bug or the environment), never the client's.
    #[error("internal error: {0}")]
    Internal(String),
}
