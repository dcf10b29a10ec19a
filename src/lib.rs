//! easel: one OpenAI-compatible gateway in front of image, video and text generation backends.
//!
//! # Layout
//!
//! The modules follow the order a request travels:
//!
//! - [`cli`]: the command line (`serve`, `config check`); translates flags into library calls.
//! - [`config`]: YAML + environment → a validated [`config::Config`]; every default and cross-field check.
//! - [`server`]: binding, graceful shutdown, the background task tracker.
//! - [`state`]: [`state::AppState`], the cheap-to-clone handle every handler receives.
//! - [`reload`]: config reload: the live runtime handle, swapped without dropping work.
//! - [`http`]: the HTTP surface, the only module that knows axum; the one place errors become statuses.
//! - [`api`]: wire types of the OpenAI-compatible API (serde only).
//! - [`request`]: wire types → validated domain requests (no I/O).
//! - [`pipeline`]: one function per operation, the readable story of a request.
//! - [`routing`]: the model registry; model → ordered backend candidates.
//! - [`admission`]: per-backend concurrency limits, bounded queue, RAII permits, 429 + Retry-After.
//! - [`backends`]: one adapter per upstream protocol; never touches axum, storage or the ledger.
//! - [`ledger`]: API keys, credit holds and settlement, idempotency records (SQLite).
//! - [`jobs`]: the job runner: durable video jobs polled on the backend that took them, settled once.
//! - [`health`]: background probes per backend, with thresholds; feeds routing and `/readyz`.
//! - [`process`]: managed backend processes (`process:`): spawn, readiness, restarts, group stop, leftovers.
//! - [`sets`]: working sets: one actor per host swaps its managed backends as a unit without killing work.
//! - [`media`]: image format sniffing, transcoding and base64.
//! - [`storage`]: stored outputs under unguessable ids.
//! - [`telemetry`]: logging setup and the metric names, declared once.

pub mod admission;
pub mod api;
pub mod backends;
pub mod cli;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod jobs;
pub mod ledger;
pub mod media;
pub mod pipeline;
pub mod process;
pub mod reload;
pub mod request;
pub mod routing;
pub mod server;
pub mod sets;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tls;
