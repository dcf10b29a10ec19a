//! The ledger the configuration chose: SQLite (`sqlite://…`, the embedded default) or PostgreSQL
//! (`postgres://…`, for several instances on one database), behind one [`Store`] by delegation.

use std::time::Duration;

use super::postgres::{PgStore, is_postgres_url};
use super::sqlite::SqliteStore;
use super::{
    Balance, Drift, HoldOutcome, IdemClaim, InstanceRow, JobChange, JobEnd, JobRecord, JobStat, KeyInfo,
    KeyLimitsChange, KeyOverrides, LedgerError, Made, Millicredits, NewJob, NewKey, OutboxRow, OutputEntry, Principal,
    Store, StoredResponse, UsageRow, WebhookOutcome,
};

#[derive(Debug)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Runs `$body` with `$s` bound to the store inside, whichever it is.
macro_rules! each_store {
    ($any:expr, $s:ident => $body:expr) => {
        match $any {
            AnyStore::Sqlite($s) => $body,
            AnyStore::Postgres($s) => $body,
        }
    };
}

impl AnyStore {
    /// Opens the database of `url` and runs its migrations. `serving` marks the serving process: SQLite takes
    /// its exclusive lock file, PostgreSQL registers and heartbeats an instance row.
    pub async fn open(url: &str, serving: bool) -> Result<Self, LedgerError> {
        if is_postgres_url(url) {
            Ok(Self::Postgres(PgStore::open(url, serving).await?))
        } else {
            Ok(Self::Sqlite(SqliteStore::open(url, serving).await?))
        }
    }

    /// A trivial query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        each_store!(self, s => s.ping().await)
    }

    /// This serving process's instance row on PostgreSQL (`None` on SQLite, one server per file).
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(p) => p.instance(),
        }
    }

    /// The database, for messages: the SQLite file, or the PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(s) => s.path.display().to_string(),
            Self::Postgres(p) => p.shown.clone(),
        }
    }
}

impl Store for AnyStore {
    async fn create_key(
        &self,
        name: &str,
        credits_mc: Millicredits,
        models: Option<&[String]>,
        limits: KeyOverrides,
    ) -> Result<NewKey, LedgerError> {
        each_store!(self, s => s.create_key(name, credits_mc, models, limits).await)
    }

    async fn set_key_limits(&self, key: &str, change: KeyLimitsChange) -> Result<KeyInfo, LedgerError> {
        each_store!(self, s => s.set_key_limits(key, change).await)
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, LedgerError> {
        each_store!(self, s => s.list_keys().await)
    }

    async fn revoke_key(&self, key: &str) -> Result<KeyInfo, LedgerError> {
        each_store!(self, s => s.revoke_key(key).await)
    }

    async fn grant(&self, key: &str, credits_mc: Millicredits, actor: &str) -> Result<KeyInfo, LedgerError> {
        each_store!(self, s => s.grant(key, credits_mc, actor).await)
    }

    async fn anonymous(&self) -> Result<Principal, LedgerError> {
        each_store!(self, s => s.anonymous().await)
    }

    async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, LedgerError> {
        each_store!(self, s => s.authenticate(secret).await)
    }

    async fn balance(&self, account_id: i64) -> Result<Balance, LedgerError> {
        each_store!(self, s => s.balance(account_id).await)
    }

    async fn upsert_price(
        &self,
        model: &str,
        unit: &str,
        price_mc: Millicredits,
        output_price_mc: Millicredits,
    ) -> Result<i64, LedgerError> {
        each_store!(self, s => s.upsert_price(model, unit, price_mc, output_price_mc).await)
    }

    async fn hold(
        &self,
        who: &Principal,
        price_id: i64,
        units: i64,
        unit_mc: Millicredits,
        lease: Duration,
        idem: Option<&IdemClaim>,
    ) -> Result<HoldOutcome, LedgerError> {
        each_store!(self, s => s.hold(who, price_id, units, unit_mc, lease, idem).await)
    }

    async fn capture(
        &self,
        hold_id: &str,
        units: i64,
        response: Option<(&Principal, &str, &StoredResponse)>,
        made: &Made,
    ) -> Result<(), LedgerError> {
        each_store!(self, s => s.capture(hold_id, units, response, made).await)
    }

    async fn record_outputs(&self, made: &Made) -> Result<(), LedgerError> {
        each_store!(self, s => s.record_outputs(made).await)
    }

    async fn list_outputs(
        &self,
        key_id: Option<i64>,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<OutputEntry>, LedgerError> {
        each_store!(self, s => s.list_outputs(key_id, limit, after).await)
    }

    async fn forget_outputs(&self, before_ms: i64) -> Result<u64, LedgerError> {
        each_store!(self, s => s.forget_outputs(before_ms).await)
    }

    async fn hold_job(
        &self,
        who: &Principal,
        price_id: i64,
        units: i64,
        unit_mc: Millicredits,
        idem: Option<&IdemClaim>,
        job: &NewJob,
    ) -> Result<HoldOutcome, LedgerError> {
        each_store!(self, s => s.hold_job(who, price_id, units, unit_mc, idem, job).await)
    }

    async fn complete_claim(&self, who: &Principal, key: &str, response: &StoredResponse) -> Result<(), LedgerError> {
        each_store!(self, s => s.complete_claim(who, key, response).await)
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, LedgerError> {
        each_store!(self, s => s.job(id).await)
    }

    async fn list_jobs(
        &self,
        key_id: i64,
        object: &str,
        after: Option<&str>,
        limit: u32,
        ascending: bool,
    ) -> Result<(Vec<JobRecord>, bool), LedgerError> {
        each_store!(self, s => s.list_jobs(key_id, object, after, limit, ascending).await)
    }

    async fn claim_jobs(&self, owner: &str, lease: Duration, limit: u32) -> Result<Vec<JobRecord>, LedgerError> {
        each_store!(self, s => s.claim_jobs(owner, lease, limit).await)
    }

    async fn update_job(&self, id: &str, epoch: i64, change: &JobChange) -> Result<bool, LedgerError> {
        each_store!(self, s => s.update_job(id, epoch, change).await)
    }

    async fn end_job(&self, id: &str, epoch: i64, end: &JobEnd) -> Result<bool, LedgerError> {
        each_store!(self, s => s.end_job(id, epoch, end).await)
    }

    async fn adopt_job(&self, id: &str, backend: &str, handle: &serde_json::Value) -> Result<bool, LedgerError> {
        each_store!(self, s => s.adopt_job(id, backend, handle).await)
    }

    async fn poll_job_now(&self, id: &str) -> Result<bool, LedgerError> {
        each_store!(self, s => s.poll_job_now(id).await)
    }

    async fn job_stats(&self) -> Result<Vec<JobStat>, LedgerError> {
        each_store!(self, s => s.job_stats().await)
    }

    async fn renew_job(&self, id: &str, epoch: i64, lease: Duration) -> Result<Option<bool>, LedgerError> {
        each_store!(self, s => s.renew_job(id, epoch, lease).await)
    }

    async fn claim_webhooks(&self, owner: &str, lease: Duration, limit: u32) -> Result<Vec<OutboxRow>, LedgerError> {
        each_store!(self, s => s.claim_webhooks(owner, lease, limit).await)
    }

    async fn settle_webhook(&self, id: &str, owner: &str, outcome: &WebhookOutcome) -> Result<bool, LedgerError> {
        each_store!(self, s => s.settle_webhook(id, owner, outcome).await)
    }

    async fn request_cancel(&self, id: &str) -> Result<(), LedgerError> {
        each_store!(self, s => s.request_cancel(id).await)
    }

    async fn delete_job(&self, id: &str) -> Result<bool, LedgerError> {
        each_store!(self, s => s.delete_job(id).await)
    }

    async fn capture_mc(&self, hold_id: &str, amount_mc: Millicredits) -> Result<(), LedgerError> {
        each_store!(self, s => s.capture_mc(hold_id, amount_mc).await)
    }

    async fn output_owner(&self, id: &str) -> Result<Option<i64>, LedgerError> {
        each_store!(self, s => s.output_owner(id).await)
    }

    async fn release(&self, hold_id: &str, reason: &str) -> Result<(), LedgerError> {
        each_store!(self, s => s.release(hold_id, reason).await)
    }

    async fn recover(&self) -> Result<u64, LedgerError> {
        each_store!(self, s => s.recover().await)
    }

    async fn reap_expired(&self) -> Result<u64, LedgerError> {
        each_store!(self, s => s.reap_expired().await)
    }

    async fn check(&self) -> Result<Vec<Drift>, LedgerError> {
        each_store!(self, s => s.check().await)
    }

    async fn usage(&self, key_id: i64) -> Result<Vec<UsageRow>, LedgerError> {
        each_store!(self, s => s.usage(key_id).await)
    }

    async fn instances(&self) -> Result<Vec<InstanceRow>, LedgerError> {
        each_store!(self, s => s.instances().await)
    }

    async fn mark_draining(&self) -> Result<(), LedgerError> {
        each_store!(self, s => s.mark_draining().await)
    }

    async fn hand_back(&self, owner: &str) -> Result<u64, LedgerError> {
        each_store!(self, s => s.hand_back(owner).await)
    }
}
