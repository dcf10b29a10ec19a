//! API keys and per-model credits: keys stored as SHA-256 hashes, balances in integer millicredits, a hold placed
//! before a request reaches a backend, captured for what was produced or released on any failure, an append-only
//! journal, idempotency records, crash recovery and invariant checks. [`Store`] is the seam:
//! [`sqlite::SqliteStore`] is the embedded default, [`postgres::PgStore`] serves several instances on one database,
//! and [`AnyStore`] is whichever the configuration chose.

pub mod any;
pub mod postgres;
pub mod sqlite;

pub use any::AnyStore;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Integer millicredits (1 credit = 1000).
pub type Millicredits = i64;

/// Credits (as configured, possibly fractional) → millicredits, rounded to the nearest.
pub fn to_mc(credits: f64) -> Millicredits {
    (credits * 1000.0).round() as Millicredits
}

/// Millicredits as a credits string without trailing zeros (`12.5`, `100`).
pub fn fmt_credits(mc: Millicredits) -> String {
    let whole = mc / 1000;
    let frac = (mc % 1000).abs();
    if frac == 0 {
        return whole.to_string();
    }
    let s = format!("{whole}.{frac:03}");
    s.trim_end_matches('0').to_owned()
}

/// The caller of an authenticated request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: i64,
    pub account_id: i64,
    pub name: String,
    /// `None` = every model.
    pub allowed_models: Option<Vec<String>>,
    /// The key's own limits, loaded with it (no second lookup per request).
    pub limits: KeyOverrides,
}

impl Principal {
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models.as_ref().is_none_or(|list| list.iter().any(|m| m == model))
    }
}

/// A key as listed (never with its secret).
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    pub allowed_models: Option<Vec<String>>,
    pub created_at: i64,
    pub revoked: bool,
    pub available_mc: Millicredits,
    pub held_mc: Millicredits,
    pub limits: KeyOverrides,
}

/// One per-key limit as stored with a key: the column is NULL for [`Limit::Default`] (`auth.key_limits`
/// applies), 0 for [`Limit::Unlimited`], N for [`Limit::Max`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Limit {
    #[default]
    Default,
    Unlimited,
    Max(u32),
}

impl Limit {
    pub fn from_column(v: Option<i64>) -> Self {
        match v {
            None => Self::Default,
            Some(n) if n <= 0 => Self::Unlimited,
            Some(n) => Self::Max(u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }

    pub fn to_column(self) -> Option<i64> {
        match self {
            Self::Default => None,
            Self::Unlimited => Some(0),
            Self::Max(n) => Some(i64::from(n)),
        }
    }

    /// The limit that holds, given the configured default (`None` = unlimited).
    pub fn resolve(self, default: Option<u32>) -> Option<u32> {
        match self {
            Self::Default => default,
            Self::Unlimited => None,
            Self::Max(n) => Some(n),
        }
    }

    /// `default`, `unlimited` or a whole number of at least 1 (as typed on the command line).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "default" => Ok(Self::Default),
            "unlimited" => Ok(Self::Unlimited),
            t => match t.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(Self::Max(n)),
                _ => Err(format!("`{s}` is not a limit: give a whole number of at least 1, `unlimited` or `default`")),
            },
        }
    }
}

/// As `keys list` shows it: `default`, `unlimited` or the number.
impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Unlimited => f.write_str("unlimited"),
            Self::Max(n) => write!(f, "{n}"),
        }
    }
}

/// In JSON: `null` (the configured default), `"unlimited"`, or the number.
impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Default => s.serialize_none(),
            Self::Unlimited => s.serialize_str("unlimited"),
            Self::Max(n) => s.serialize_u32(*n),
        }
    }
}

/// A key's own `requests_per_minute` and `max_parallel`, each overriding `auth.key_limits` unless `Default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct KeyOverrides {
    pub requests_per_minute: Limit,
    pub max_parallel: Limit,
}

/// A key's limits from its two columns.
pub(crate) fn overrides(rpm: Option<i64>, parallel: Option<i64>) -> KeyOverrides {
    KeyOverrides { requests_per_minute: Limit::from_column(rpm), max_parallel: Limit::from_column(parallel) }
}

/// A change to a key's limits; `None` leaves that limit as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLimitsChange {
    pub requests_per_minute: Option<Limit>,
    pub max_parallel: Option<Limit>,
}

impl KeyLimitsChange {
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.max_parallel.is_none()
    }
}

/// A new key and its secret, shown once.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub info: KeyInfo,
    pub secret: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Balance {
    pub available_mc: Millicredits,
    pub held_mc: Millicredits,
    pub granted_mc: Millicredits,
    pub captured_mc: Millicredits,
}

/// An Idempotency-Key claim for one request.
#[derive(Debug, Clone)]
pub struct IdemClaim {
    pub key: String,
    pub method: String,
    pub path: String,
    pub fingerprint: [u8; 32],
}

/// What placing a hold did.
#[derive(Debug, Clone)]
pub enum HoldOutcome {
    Held {
        hold_id: String,
    },
    /// The same Idempotency-Key completed before: replay this response, charge nothing.
    Replay {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
}

/// A stored response for an idempotent request.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// One usage row: requests, images and credits by model and UTC day.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRow {
    pub day: String,
    pub model: String,
    pub requests: i64,
    pub images: i64,
    pub credits: String,
    pub credits_mc: Millicredits,
}

/// A broken invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub account: String,
    pub problem: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credits: the balance is {} credits and this request costs {} ({units} × {} credits)", fmt_credits(*available_mc), fmt_credits(*amount_mc), fmt_credits(*unit_mc))]
    Insufficient { available_mc: Millicredits, amount_mc: Millicredits, units: i64, unit_mc: Millicredits },
    #[error(
        "this Idempotency-Key was used with a different request (method, path or body); use a new key for a new request"
    )]
    IdempotencyMismatch,
    #[error("a request with this Idempotency-Key is still in progress; retry shortly to get its result")]
    IdempotencyInProgress,
    #[error("no API key named or numbered `{0}`")]
    UnknownKey(String),
    #[error("an API key named `{0}` already exists")]
    KeyExists(String),
    #[error("ledger database: {0}")]
    Db(String),
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.to_string())
    }
}

/// The ledger's operations; each mutation is one transaction.
pub trait Store: Send + Sync {
    fn create_key(
        &self,
        name: &str,
        credits_mc: Millicredits,
        models: Option<&[String]>,
        limits: KeyOverrides,
    ) -> impl Future<Output = Result<NewKey, LedgerError>> + Send;
    fn list_keys(&self) -> impl Future<Output = Result<Vec<KeyInfo>, LedgerError>> + Send;
    /// Sets or clears a key's own limits (by name, id or prefix); returns the key as it is now.
    fn set_key_limits(
        &self,
        key: &str,
        change: KeyLimitsChange,
    ) -> impl Future<Output = Result<KeyInfo, LedgerError>> + Send;
    fn revoke_key(&self, key: &str) -> impl Future<Output = Result<KeyInfo, LedgerError>> + Send;
    fn grant(
        &self,
        key: &str,
        credits_mc: Millicredits,
        actor: &str,
    ) -> impl Future<Output = Result<KeyInfo, LedgerError>> + Send;
    /// The principal of requests made without a key (`auth.mode: none`), so that an Idempotency-Key means the
    /// same there: one reserved account and key (revoked, so no secret can ever authenticate as it), made once.
    fn anonymous(&self) -> impl Future<Output = Result<Principal, LedgerError>> + Send;
    fn authenticate(&self, secret: &str) -> impl Future<Output = Result<Option<Principal>, LedgerError>> + Send;
    fn balance(&self, account_id: i64) -> impl Future<Output = Result<Balance, LedgerError>> + Send;
    /// Records the price of a model; returns the price row id (a new row when the price changed). `unit` is
    /// `image`, `second`, `request` or `1k_tokens`; only `1k_tokens` has an `output_price_mc` (else 0), and then
    /// both prices are millicredits per 1K tokens (`price_mc` the input's).
    fn upsert_price(
        &self,
        model: &str,
        unit: &str,
        price_mc: Millicredits,
        output_price_mc: Millicredits,
    ) -> impl Future<Output = Result<i64, LedgerError>> + Send;
    /// Claims the Idempotency-Key (if any) and holds `units × unit_mc`, in one transaction.
    fn hold(
        &self,
        who: &Principal,
        price_id: i64,
        units: i64,
        unit_mc: Millicredits,
        lease: Duration,
        idem: Option<&IdemClaim>,
    ) -> impl Future<Output = Result<HoldOutcome, LedgerError>> + Send;
    /// Captures `units` (≤ held), stores the response for the Idempotency-Key and records the stored outputs in
    /// `made` (the hold's key as their owner), in one transaction.
    fn capture(
        &self,
        hold_id: &str,
        units: i64,
        response: Option<(&Principal, &str, &StoredResponse)>,
        made: &Made,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Records outputs made without a key (`auth.mode` `none` or `static`): listed, owned by nobody.
    fn record_outputs(&self, made: &Made) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Stored outputs, newest first: `key_id`'s own, or every one for `None`; at most `limit`, starting after the
    /// output `after` (a cursor: an id from an earlier page). Thumbnails are not listed (their video names them).
    fn list_outputs(
        &self,
        key_id: Option<i64>,
        limit: u32,
        after: Option<&str>,
    ) -> impl Future<Output = Result<Vec<OutputEntry>, LedgerError>> + Send;
    /// Forgets the outputs recorded before `before_ms` (retention deleted their files); returns how many.
    fn forget_outputs(&self, before_ms: i64) -> impl Future<Output = Result<u64, LedgerError>> + Send;
    /// Like `hold` for a job: the hold (kind `job`, no lease: the job's own deadline bounds it) and the job row
    /// (state `pending`) commit together.
    fn hold_job(
        &self,
        who: &Principal,
        price_id: i64,
        units: i64,
        unit_mc: Millicredits,
        idem: Option<&IdemClaim>,
        job: &NewJob,
    ) -> impl Future<Output = Result<HoldOutcome, LedgerError>> + Send;
    /// Completes a job's Idempotency-Key claim with the answer to replay (the job's id is in it).
    fn complete_claim(
        &self,
        who: &Principal,
        key: &str,
        response: &StoredResponse,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
    fn job(&self, id: &str) -> impl Future<Output = Result<Option<JobRecord>, LedgerError>> + Send;
    /// A key's jobs of one object kind, newest first (or oldest with `ascending`), after the cursor id.
    fn list_jobs(
        &self,
        key_id: i64,
        object: &str,
        after: Option<&str>,
        limit: u32,
        ascending: bool,
    ) -> impl Future<Output = Result<(Vec<JobRecord>, bool), LedgerError>> + Send;
    /// Leases up to `limit` jobs that are due (not terminal, `next_poll_at` passed, lease free or lapsed) to `owner`
    /// for `lease`; each returned record carries its new `lease_epoch`.
    fn claim_jobs(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<JobRecord>, LedgerError>> + Send;
    /// Applies a non-terminal change if the job is still at `epoch` (else `Ok(false)`: another poller owns it).
    fn update_job(
        &self,
        id: &str,
        epoch: i64,
        change: &JobChange,
    ) -> impl Future<Output = Result<bool, LedgerError>> + Send;
    /// Ends a job at `epoch` and captures or releases its hold, in one transaction (`Ok(false)` if fenced out or
    /// already ended).
    fn end_job(&self, id: &str, epoch: i64, end: &JobEnd) -> impl Future<Output = Result<bool, LedgerError>> + Send;
    /// Binds a job whose submit was never confirmed (`pending`, `submitting` or `unknown`) to the upstream job a
    /// backend reported for it: state `queued`, due now, on `backend` only if the job names no other backend.
    /// The lease epoch moves on, so a poller still holding the job is fenced out. `Ok(false)` when the job is
    /// not in such a state (already bound, or ended).
    fn adopt_job(
        &self,
        id: &str,
        backend: &str,
        handle: &serde_json::Value,
    ) -> impl Future<Output = Result<bool, LedgerError>> + Send;
    /// Makes an unfinished job due for its next poll now (a webhook said it changed); `Ok(false)` if it ended.
    fn poll_job_now(&self, id: &str) -> impl Future<Output = Result<bool, LedgerError>> + Send;
    /// Unfinished jobs by object and state: how many, and the creation time (Unix ms) of the oldest.
    fn job_stats(&self) -> impl Future<Output = Result<Vec<JobStat>, LedgerError>> + Send;
    /// Extends this poller's lease on a job it still holds at `epoch`; `None` when another poller holds it now (or
    /// it ended), else whether its owner asked to cancel it.
    fn renew_job(
        &self,
        id: &str,
        epoch: i64,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<bool>, LedgerError>> + Send;
    /// Leases up to `limit` webhook deliveries that are due (not delivered, not given up, lease free or lapsed)
    /// to `owner` for `lease`.
    fn claim_webhooks(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, LedgerError>> + Send;
    /// Records an attempt's outcome if `owner` still holds the delivery (`Ok(false)` otherwise).
    fn settle_webhook(
        &self,
        id: &str,
        owner: &str,
        outcome: &WebhookOutcome,
    ) -> impl Future<Output = Result<bool, LedgerError>> + Send;
    /// Marks a job for cancellation and makes it due now (the poller cancels upstream and releases).
    fn request_cancel(&self, id: &str) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Deletes a terminal job's row (its outputs are deleted by the caller).
    fn delete_job(&self, id: &str) -> impl Future<Output = Result<bool, LedgerError>> + Send;
    /// Captures exactly `amount_mc` of a hold (clamped to what is held; the rest returns to the balance), for
    /// charges that are not a whole number of units (text priced per token).
    fn capture_mc(
        &self,
        hold_id: &str,
        amount_mc: Millicredits,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// The key that made a stored output, if one did.
    fn output_owner(&self, id: &str) -> impl Future<Output = Result<Option<i64>, LedgerError>> + Send;
    /// Returns the whole hold and forgets the Idempotency-Key, in one transaction.
    fn release(&self, hold_id: &str, reason: &str) -> impl Future<Output = Result<(), LedgerError>> + Send;
    /// Releases the open sync holds whose process is gone, with their in-progress idempotency records, and frees
    /// the leases of jobs and webhook deliveries; returns how many holds were released. SQLite (one server per
    /// file) releases every open sync hold; PostgreSQL only those of instances whose lease lapsed.
    fn recover(&self) -> impl Future<Output = Result<u64, LedgerError>> + Send;
    /// Releases sync holds whose lease ran out while this process lives (a settle that failed), and on PostgreSQL
    /// those of instances that died since; returns how many.
    fn reap_expired(&self) -> impl Future<Output = Result<u64, LedgerError>> + Send;
    fn check(&self) -> impl Future<Output = Result<Vec<Drift>, LedgerError>> + Send;
    fn usage(&self, key_id: i64) -> impl Future<Output = Result<Vec<UsageRow>, LedgerError>> + Send;
    /// The serving instances sharing this database, newest first (SQLite: none; one server per file).
    fn instances(&self) -> impl Future<Output = Result<Vec<InstanceRow>, LedgerError>> + Send {
        async { Ok(Vec::new()) }
    }
    /// Marks this instance draining, for the others' view (SQLite: nothing to tell).
    fn mark_draining(&self) -> impl Future<Output = Result<(), LedgerError>> + Send {
        async { Ok(()) }
    }
    /// At the end of a drain: hands the leases `owner` holds on unfinished jobs and webhook deliveries back (the
    /// epoch moves on, fencing anything of this process still running), so another instance takes them at once;
    /// on PostgreSQL the instance row's lease ends too. Returns how many jobs were handed back.
    fn hand_back(&self, owner: &str) -> impl Future<Output = Result<u64, LedgerError>> + Send;
}

/// One serving instance in the shared database (`/v1/gateway/status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceRow {
    pub id: String,
    /// Unix ms.
    pub started_at: i64,
    /// Unix ms of its last heartbeat.
    pub last_heartbeat: i64,
    /// Unix ms its drain began, if it is draining.
    pub draining_since: Option<i64>,
    /// Its lease has not lapsed.
    pub alive: bool,
}

/// Now, in Unix milliseconds: the one clock of the ledger's and the jobs' timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Longest a read of a key's balance or outputs waits for that key's answers to settle (normally milliseconds).
pub const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// Settlements in flight, per account. An answer's hold is settled just after its body is handed to the client, so
/// a balance read right after could see it still held; readers wait (bounded) for their account's settlements.
#[derive(Debug, Default)]
pub struct Settling {
    counts: StdMutex<HashMap<i64, usize>>,
    changed: Notify,
}

/// One settlement in flight; dropping it marks it done.
#[derive(Debug)]
pub struct SettlingGuard {
    of: Arc<Settling>,
    account: i64,
}

impl Settling {
    /// Marks a settlement for `account` as started.
    pub fn begin(self: &Arc<Self>, account: i64) -> SettlingGuard {
        *self.counts.lock().unwrap_or_else(PoisonError::into_inner).entry(account).or_default() += 1;
        SettlingGuard { of: Arc::clone(self), account }
    }

    fn pending(&self, account: Option<i64>) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match account {
            Some(a) => counts.get(&a).copied().unwrap_or(0),
            None => counts.values().sum(),
        }
    }

    /// Waits until `account` (every account for `None`) has no settlement in flight, at most `within`.
    pub async fn wait(&self, account: Option<i64>, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending(account) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for SettlingGuard {
    fn drop(&mut self) {
        let mut counts = self.of.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.account);
            }
        }
        drop(counts);
        self.of.changed.notify_waiters();
    }
}

/// A job to create together with its hold.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Public id (`video_<hex>`).
    pub id: String,
    /// `video` (OpenAI's video object) or `job`.
    pub object: &'static str,
    pub model: String,
    /// The normalized request, as JSON (shown back in the job object).
    pub request: serde_json::Value,
    /// Unix milliseconds after which easel cancels the job upstream and refunds it.
    pub deadline_at: i64,
    /// The runner takes the job up at once (image jobs run inside easel); otherwise the submit drives it and the
    /// runner looks at it only at its deadline, or after a restart.
    pub due_now: bool,
    /// Where to POST the job's terminal event (checked by `jobs::webhooks::parse_target`).
    pub webhook_url: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: String,
    pub object: String,
    pub key_id: i64,
    pub account_id: i64,
    pub model: String,
    pub hold_id: String,
    pub request: serde_json::Value,
    /// Internal state (see the migration); the API maps it to OpenAI's four statuses.
    pub state: String,
    pub backend: Option<String>,
    /// The backend's handle (JSON), set once submitted.
    pub handle: Option<serde_json::Value>,
    pub progress: i64,
    pub queue_position: Option<i64>,
    pub lease_epoch: i64,
    pub poll_failures: i64,
    pub deadline_at: i64,
    pub cancel_requested: bool,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// Stored outputs: `[{"kind": "video", "file": "vid_….mp4", "mime": "video/mp4"}]`.
    pub outputs: Option<serde_json::Value>,
    pub created_at: i64,
    pub updated_at: i64,
    pub completed_at: Option<i64>,
    /// The client's webhook target, if it named one.
    pub webhook_url: Option<String>,
}

impl JobRecord {
    pub fn is_terminal(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed" | "canceled")
    }
}

/// A non-terminal change a poller (or the submit) applies to a job it holds.
#[derive(Debug, Clone, Default)]
pub struct JobChange {
    pub state: Option<&'static str>,
    pub backend: Option<String>,
    pub handle: Option<serde_json::Value>,
    pub progress: Option<i64>,
    pub queue_position: Option<Option<i64>>,
    /// Unix ms of the next poll.
    pub next_poll_at: Option<i64>,
    /// `Some(true)` counts one more failed poll, `Some(false)` resets the count.
    pub poll_failed: Option<bool>,
}

/// How a job ends.
#[derive(Debug, Clone)]
pub enum JobEnd {
    /// Made: capture `units` of the hold and keep the outputs.
    Succeeded { units: i64, outputs: serde_json::Value },
    /// Failed or canceled: release the hold.
    Failed { state: &'static str, code: &'static str, message: String },
}

/// Unfinished jobs of one object kind in one state.
#[derive(Debug, Clone)]
pub struct JobStat {
    pub object: String,
    pub state: String,
    pub count: i64,
    pub oldest_created_at: i64,
}

/// One stored output: its id, what it is (`image`, `video` or `thumbnail`), its MIME type and size, and for a
/// video the id of its thumbnail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeOutput {
    pub id: String,
    pub kind: String,
    pub mime: String,
    pub bytes: i64,
    pub poster: Option<String>,
}

/// What one request stored, with the model and the request (JSON text) that made it: the gallery shows both.
#[derive(Debug, Clone, Default)]
pub struct Made {
    pub model: String,
    pub request: String,
    pub outputs: Vec<MadeOutput>,
}

impl Made {
    /// A finished job's outputs: from its `outputs` (see [`output_files`]) and its stored request (an image job's
    /// wire request with its operation; a video job's request as it is).
    pub fn of_job(job: &JobRecord, outputs: &serde_json::Value) -> Self {
        let (list, default_kind) = match outputs.get("images") {
            Some(images) => (images, "image"),
            None => (outputs, "video"),
        };
        let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
        let poster =
            items.iter().find(|o| o["kind"] == "thumbnail").and_then(|o| o["file"].as_str()).map(str::to_owned);
        let outputs = items
            .iter()
            .filter_map(|o| {
                let id = o["file"].as_str()?.to_owned();
                let kind = o["kind"].as_str().unwrap_or(default_kind).to_owned();
                let mime = o["mime"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| crate::storage::mime_of(&id).map(str::to_owned))
                    .unwrap_or_else(|| "application/octet-stream".to_owned());
                let poster = if kind == "video" { poster.clone() } else { None };
                Some(MadeOutput { id, kind, mime, bytes: o["bytes"].as_i64().unwrap_or(0), poster })
            })
            .collect();
        let request = match job.request.get("wire") {
            Some(wire) => {
                let mut shown = wire.clone();
                if let (Some(map), Some(op)) = (shown.as_object_mut(), job.request.get("operation")) {
                    map.insert("operation".into(), op.clone());
                }
                shown
            }
            None => job.request.clone(),
        };
        let mut request = request;
        if let Some(map) = request.as_object_mut() {
            // Where the job came from, for logs; not part of what was asked. Unset fields are left out.
            map.remove("request_id");
            map.retain(|_, v| !v.is_null());
        }
        Self { model: job.model.clone(), request: request.to_string(), outputs }
    }
}

/// A stored output as the gallery lists it.
#[derive(Debug, Clone)]
pub struct OutputEntry {
    pub id: String,
    pub key_id: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub model: Option<String>,
    pub kind: Option<String>,
    pub mime: Option<String>,
    pub bytes: Option<i64>,
    /// The request that made it, as JSON text.
    pub request: Option<String>,
    pub poster: Option<String>,
}

/// The stored file ids in a job's `outputs`: a list of `{"file"}` (videos) or `{"images": [{"file"}]}` (images).
pub fn output_files(outputs: &serde_json::Value) -> Vec<String> {
    let list = outputs.get("images").unwrap_or(outputs);
    list.as_array()
        .map(|a| a.iter().filter_map(|o| o["file"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// A webhook delivery leased to one deliverer.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The event id (`evt_…`), sent as `webhook-id`.
    pub id: String,
    pub job_id: String,
    pub url: String,
    /// The event, exactly as it is sent.
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone)]
pub enum WebhookOutcome {
    Delivered,
    /// Try again at this Unix millisecond.
    Retry {
        at: i64,
        error: String,
    },
    /// No attempt is left.
    GaveUp {
        error: String,
    },
}

/// The reserved key name of [`Store::anonymous`]; hidden from key listings.
pub const ANONYMOUS_KEY: &str = "(anonymous)";

/// A new secret: `sk-easel-` + 43 base62 characters (about 256 random bits).
pub fn new_secret() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let body: String = (0..43).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("sk-easel-{body}")
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Checks an Idempotency-Key value: 1–255 printable ASCII characters.
pub fn valid_idempotency_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_format_and_convert() {
        assert_eq!(to_mc(12.5), 12_500);
        assert_eq!(fmt_credits(12_500), "12.5");
        assert_eq!(fmt_credits(100_000), "100");
        assert_eq!(fmt_credits(1), "0.001");
        assert!(new_secret().starts_with("sk-easel-"));
        assert_ne!(new_secret(), new_secret());
        assert!(valid_idempotency_key("abc-123"));
        assert!(!valid_idempotency_key(""));
        assert!(!valid_idempotency_key("é"));
    }
}
