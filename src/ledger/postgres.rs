//! The PostgreSQL ledger, for several easel instances on one database: READ COMMITTED transactions whose money
//! moves are conditional `UPDATE … RETURNING`s or `SELECT … FOR UPDATE` (a hold never oversells), job and webhook
//! claims with `FOR UPDATE SKIP LOCKED` and lease-epoch fencing, and an `instances` row per serving process,
//! heartbeated, so that only the sync holds of an instance whose lease lapsed are released by the others.
//! Lock order is always idempotency record → hold → account, so no two transactions wait on each other in a cycle.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Row};

use super::{
    ANONYMOUS_KEY, Balance, Drift, HoldOutcome, IdemClaim, InstanceRow, JobChange, JobEnd, JobRecord, JobStat, KeyInfo,
    KeyLimitsChange, KeyOverrides, LedgerError, Made, Millicredits, NewJob, NewKey, OutboxRow, OutputEntry, Principal,
    Store, StoredResponse, UsageRow, WebhookOutcome, hash_secret, new_secret, now_ms, overrides,
};

/// How long a completed idempotency record is kept.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// An instance that has not renewed its row for this long is dead: its sync holds are released by the others.
pub const INSTANCE_LEASE: Duration = Duration::from_secs(10);
/// How often a serving instance renews its row.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(3);
/// The advisory lock that serializes creating the anonymous key across instances.
const ANONYMOUS_LOCK: i64 = 0x6561_7365_6c00_0001;

/// What a capture takes: whole units at the hold's unit price, or an exact amount.
#[derive(Debug, Clone, Copy)]
enum Capture {
    Units(i64),
    Mc(Millicredits),
}

#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    /// This serving process's row in `instances`; `None` for the command line, which places no holds.
    instance: Option<String>,
    /// The database, without its password, for messages.
    pub shown: String,
    heartbeat: Option<tokio::task::AbortHandle>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

/// The columns `job_record` reads, in order (JSON columns as text).
const JOB_COLUMNS: &str = "id, object, key_id, account_id, model, hold_id, request::text, state, backend, handle::text, \
     progress, queue_position, lease_epoch, poll_failures, deadline_at, cancel_requested, error_code, error_message, \
     outputs::text, created_at, updated_at, completed_at, webhook_url";

/// An instance that renewed its lease counts as live; anything else (no row, a lapsed row) as dead.
const DEAD_INSTANCE: &str = "NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = h.instance_id AND i.lease_until >= $1)";

fn job_record(r: &PgRow) -> Result<JobRecord, LedgerError> {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    Ok(JobRecord {
        id: r.try_get(0)?,
        object: r.try_get(1)?,
        key_id: r.try_get(2)?,
        account_id: r.try_get(3)?,
        model: r.try_get(4)?,
        hold_id: r.try_get(5)?,
        request: json(Some(r.try_get(6)?)).unwrap_or_default(),
        state: r.try_get(7)?,
        backend: r.try_get(8)?,
        handle: json(r.try_get(9)?),
        progress: r.try_get(10)?,
        queue_position: r.try_get(11)?,
        lease_epoch: r.try_get(12)?,
        poll_failures: r.try_get(13)?,
        deadline_at: r.try_get(14)?,
        cancel_requested: r.try_get(15)?,
        error_code: r.try_get(16)?,
        error_message: r.try_get(17)?,
        outputs: json(r.try_get(18)?),
        created_at: r.try_get(19)?,
        updated_at: r.try_get(20)?,
        completed_at: r.try_get(21)?,
        webhook_url: r.try_get(22)?,
    })
}

fn key_info(r: &PgRow) -> Result<KeyInfo, LedgerError> {
    let models: Option<String> = r.try_get(3)?;
    let revoked: Option<i64> = r.try_get(5)?;
    Ok(KeyInfo {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        prefix: r.try_get(2)?,
        allowed_models: models.map(|m| m.split(',').map(str::to_owned).collect()),
        created_at: r.try_get(4)?,
        revoked: revoked.is_some(),
        available_mc: r.try_get(6)?,
        held_mc: r.try_get(7)?,
        limits: overrides(r.try_get(8)?, r.try_get(9)?),
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "23505")
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` without its password (a `sqlite://` one as it is).
pub fn redact(url: &str) -> String {
    if !is_postgres_url(url) {
        return url.to_owned();
    }
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "postgres://…".to_owned(),
    }
}

async fn renew(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO instances (id, started_at, lease_until) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until",
    )
    .bind(id)
    .bind(now)
    .bind(now + INSTANCE_LEASE.as_millis() as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts a new job in `pending`; it is not due before its deadline unless `due_now` (the submit makes it due).
async fn insert_job(
    tx: &mut PgConnection,
    who: &Principal,
    hold_id: &str,
    job: &NewJob,
    now: i64,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO jobs (id, object, key_id, account_id, model, hold_id, request, state, next_poll_at, deadline_at, created_at, updated_at, webhook_url)
         VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, 'pending', $10, $9, $8, $8, $11)",
    )
    .bind(&job.id)
    .bind(job.object)
    .bind(who.key_id)
    .bind(who.account_id)
    .bind(&job.model)
    .bind(hold_id)
    .bind(job.request.to_string())
    .bind(now)
    .bind(job.deadline_at)
    .bind(if job.due_now { now } else { job.deadline_at })
    .bind(job.webhook_url.as_deref())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn add_credits(
    tx: &mut PgConnection,
    account: i64,
    mc: Millicredits,
    actor: &str,
    memo: &str,
) -> Result<(), LedgerError> {
    let now = now_ms();
    let row = sqlx::query(
        "UPDATE accounts SET available_mc = available_mc + $2, granted_mc = granted_mc + $2, updated_at = $3
         WHERE id = $1 AND available_mc + $2 >= 0 RETURNING available_mc, held_mc",
    )
    .bind(account)
    .bind(mc)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(LedgerError::Db("the adjustment would make the balance negative".into()));
    };
    sqlx::query(
        "INSERT INTO ledger_entries (account_id, kind, available_delta_mc, held_delta_mc, available_after_mc, held_after_mc, actor, memo, created_at)
         VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8)",
    )
    .bind(account)
    .bind(if mc >= 0 { "grant" } else { "adjust" })
    .bind(mc)
    .bind(row.try_get::<i64, _>(0)?)
    .bind(row.try_get::<i64, _>(1)?)
    .bind(actor)
    .bind(memo)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records `made`'s outputs; with a hold, its key owns them.
async fn record_made(tx: &mut PgConnection, made: &Made, hold_id: Option<&str>, now: i64) -> Result<(), LedgerError> {
    for o in &made.outputs {
        sqlx::query(
            "INSERT INTO outputs (id, key_id, hold_id, created_at, model, kind, mime, bytes, request, poster)
             VALUES ($1, (SELECT key_id FROM holds WHERE id = $2), $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT DO NOTHING",
        )
        .bind(&o.id)
        .bind(hold_id)
        .bind(now)
        .bind(&made.model)
        .bind(&o.kind)
        .bind(&o.mime)
        .bind(o.bytes)
        .bind(&made.request)
        .bind(&o.poster)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

fn output_entry(r: &sqlx::postgres::PgRow) -> Result<OutputEntry, LedgerError> {
    Ok(OutputEntry {
        id: r.try_get(0)?,
        key_id: r.try_get(1)?,
        created_at: r.try_get(2)?,
        model: r.try_get(3)?,
        kind: r.try_get(4)?,
        mime: r.try_get(5)?,
        bytes: r.try_get(6)?,
        request: r.try_get(7)?,
        poster: r.try_get(8)?,
    })
}

/// Locks the idempotency records of a hold first (the lock order), before the hold itself is settled.
async fn lock_claims_of(tx: &mut PgConnection, hold_id: &str) -> Result<(), LedgerError> {
    sqlx::query("SELECT 1 FROM idempotency_records WHERE hold_id = $1 FOR UPDATE")
        .bind(hold_id)
        .fetch_all(&mut *tx)
        .await?;
    Ok(())
}

/// Captures (`Some`) or releases (`None`) an open hold; `false` when it is not open (already settled). The hold
/// row is locked, so two settles of one hold never both apply.
async fn settle(
    tx: &mut PgConnection,
    hold_id: &str,
    capture: Option<Capture>,
    reason: &str,
) -> Result<bool, LedgerError> {
    let units = capture.map(|c| match c {
        Capture::Units(u) => u,
        Capture::Mc(_) => i64::MAX,
    });
    let now = now_ms();
    let Some(h) = sqlx::query(
        "SELECT account_id, key_id, units, amount_mc FROM holds WHERE id = $1 AND state = 'held' FOR UPDATE",
    )
    .bind(hold_id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(false);
    };
    let (account, key_id, held_units, amount): (i64, i64, i64, i64) =
        (h.try_get(0)?, h.try_get(1)?, h.try_get(2)?, h.try_get(3)?);
    let (state, cap_units) = match units {
        Some(u) => ("captured", u.clamp(0, held_units)),
        None => ("released", 0),
    };
    let cap = match capture {
        Some(Capture::Mc(mc)) => mc.clamp(0, amount),
        _ if held_units > 0 => amount / held_units * cap_units,
        _ => 0,
    };
    sqlx::query(
        "UPDATE holds SET state = $2, captured_units = $3, captured_mc = $4, resolved_at = $5, reason = $6
         WHERE id = $1 AND state = 'held'",
    )
    .bind(hold_id)
    .bind(state)
    .bind(cap_units)
    .bind(cap)
    .bind(now)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query(
        "UPDATE accounts SET held_mc = held_mc - $2, available_mc = available_mc + $3, captured_mc = captured_mc + $4, updated_at = $5
         WHERE id = $1 RETURNING available_mc, held_mc",
    )
    .bind(account)
    .bind(amount)
    .bind(amount - cap)
    .bind(cap)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let kind = if units.is_some() { "capture" } else { "release" };
    sqlx::query(
        "INSERT INTO ledger_entries (account_id, hold_id, kind, available_delta_mc, held_delta_mc, available_after_mc, held_after_mc, actor, memo, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(account)
    .bind(hold_id)
    .bind(kind)
    .bind(amount - cap)
    .bind(-amount)
    .bind(row.try_get::<i64, _>(0)?)
    .bind(row.try_get::<i64, _>(1)?)
    .bind(format!("key:{key_id}"))
    .bind(reason)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

impl PgStore {
    /// Connects and runs the migrations (one instance at a time: sqlx takes an advisory lock). `serving` gives
    /// this process an instance row and heartbeats it in the background while the store lives.
    pub async fn open(url: &str, serving: bool) -> Result<Self, LedgerError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| LedgerError::Db(format!("migration failed: {e}")))?;
        let (instance, heartbeat) = if serving {
            let id = format!("easel-{}", uuid::Uuid::now_v7().simple());
            renew(&pool, &id).await?;
            let (beat_pool, beat_id) = (pool.clone(), id.clone());
            let task = tokio::spawn(async move {
                let mut every = tokio::time::interval(HEARTBEAT_EVERY);
                loop {
                    every.tick().await;
                    if let Err(e) = renew(&beat_pool, &beat_id).await {
                        tracing::warn!(error = %e, instance = %beat_id, "Renewing this instance's lease failed.");
                    }
                }
            });
            (Some(id), Some(task.abort_handle()))
        } else {
            (None, None)
        };
        Ok(Self { pool, instance, shown: redact(url), heartbeat })
    }

    /// A trivial query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// This serving process's instance id.
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    async fn find_key(&self, conn: &mut PgConnection, key: &str) -> Result<KeyInfo, LedgerError> {
        let row = sqlx::query(
            "SELECT k.id, k.name, k.prefix, k.allowed_models, k.created_at, k.revoked_at, a.available_mc, a.held_mc,
                    k.requests_per_minute, k.max_parallel
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.name = $1 OR CAST(k.id AS TEXT) = $1 OR k.prefix = $1",
        )
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| key_info(&r)).transpose()?.ok_or_else(|| LedgerError::UnknownKey(key.to_owned()))
    }

    /// Places a hold (a sync hold with a lease, or a job's hold with its job row, in the same transaction).
    #[expect(clippy::too_many_arguments, reason = "one transaction's inputs")]
    async fn hold_with(
        &self,
        who: &Principal,
        price_id: i64,
        units: i64,
        unit_mc: Millicredits,
        lease: Option<Duration>,
        idem: Option<&IdemClaim>,
        job: Option<&NewJob>,
    ) -> Result<HoldOutcome, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let lease_until = lease.map(|l| now + l.as_millis() as i64);
        let claim_until = lease_until.unwrap_or(now + IDEMPOTENCY_TTL.as_millis() as i64);
        let expires_at = now + IDEMPOTENCY_TTL.as_millis() as i64;
        if let Some(c) = idem {
            // A record deleted between our conflict and our read (its request was refunded) is claimed again.
            let mut attempts = 0;
            loop {
                attempts += 1;
                let claimed = sqlx::query(
                    "INSERT INTO idempotency_records (key_id, idem_key, method, path, fingerprint, state, lease_until, instance_id, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, 'in_progress', $6, $7, $8, $9) ON CONFLICT DO NOTHING RETURNING key_id",
                )
                .bind(who.key_id)
                .bind(&c.key)
                .bind(&c.method)
                .bind(&c.path)
                .bind(c.fingerprint.to_vec())
                .bind(claim_until)
                .bind(self.instance.as_deref())
                .bind(now)
                .bind(expires_at)
                .fetch_optional(&mut *tx)
                .await?;
                if claimed.is_some() {
                    break;
                }
                let r = sqlx::query(
                    "SELECT r.method, r.path, r.fingerprint, r.state, r.lease_until, r.hold_id, r.status_code, r.content_type,
                            r.response_body, r.expires_at,
                            (r.instance_id IS NULL OR EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance_id AND i.lease_until >= $3))
                     FROM idempotency_records r WHERE r.key_id = $1 AND r.idem_key = $2 FOR UPDATE",
                )
                .bind(who.key_id)
                .bind(&c.key)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(r) = r else {
                    if attempts < 3 {
                        continue;
                    }
                    return Err(LedgerError::IdempotencyInProgress);
                };
                let (method, path, fp): (String, String, Vec<u8>) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                let (state, lease, old_hold): (String, Option<i64>, Option<String>) =
                    (r.try_get(3)?, r.try_get(4)?, r.try_get(5)?);
                let expires: i64 = r.try_get(9)?;
                let owner_alive: bool = r.try_get(10)?;
                let expired = expires < now;
                if !expired && (method != c.method || path != c.path || fp != c.fingerprint) {
                    return Err(LedgerError::IdempotencyMismatch);
                }
                if !expired && state == "completed" {
                    let status: i64 = r.try_get::<Option<i64>, _>(6)?.unwrap_or(200);
                    return Ok(HoldOutcome::Replay {
                        status: status as u16,
                        content_type: r.try_get::<Option<String>, _>(7)?.unwrap_or_default(),
                        body: r.try_get::<Option<Vec<u8>>, _>(8)?.unwrap_or_default(),
                    });
                }
                if !expired && owner_alive && lease.is_some_and(|l| l > now) {
                    return Err(LedgerError::IdempotencyInProgress);
                }
                // An expired record, or an in-progress one whose instance or lease is gone: take it over.
                if let Some(h) = old_hold {
                    settle(&mut tx, &h, None, "idempotency record taken over").await?;
                }
                sqlx::query(
                    "UPDATE idempotency_records SET method = $3, path = $4, fingerprint = $5, state = 'in_progress', lease_until = $6, hold_id = NULL,
                     job_id = NULL, instance_id = $7, status_code = NULL, content_type = NULL, response_body = NULL, created_at = $8, expires_at = $9
                     WHERE key_id = $1 AND idem_key = $2",
                )
                .bind(who.key_id)
                .bind(&c.key)
                .bind(&c.method)
                .bind(&c.path)
                .bind(c.fingerprint.to_vec())
                .bind(claim_until)
                .bind(self.instance.as_deref())
                .bind(now)
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
                break;
            }
        }
        let amount = units * unit_mc;
        // The one conditional update that makes overselling impossible: concurrent holds on an account queue on
        // its row and each re-checks the balance it finds.
        let row = sqlx::query(
            "UPDATE accounts SET available_mc = available_mc - $2, held_mc = held_mc + $2, updated_at = $3
             WHERE id = $1 AND available_mc >= $2 RETURNING available_mc, held_mc",
        )
        .bind(who.account_id)
        .bind(amount)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let available: i64 = sqlx::query("SELECT available_mc FROM accounts WHERE id = $1")
                .bind(who.account_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            // Rolling back drops the idempotency claim too: a retry after a top-up runs again.
            return Err(LedgerError::Insufficient { available_mc: available, amount_mc: amount, units, unit_mc });
        };
        let hold_id = format!("hold_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO holds (id, account_id, key_id, price_id, units, amount_mc, state, kind, lease_until, instance_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'held', $9, $7, $10, $8)",
        )
        .bind(&hold_id)
        .bind(who.account_id)
        .bind(who.key_id)
        .bind(price_id)
        .bind(units)
        .bind(amount)
        .bind(lease_until)
        .bind(now)
        .bind(if job.is_some() { "job" } else { "sync" })
        .bind(self.instance.as_deref())
        .execute(&mut *tx)
        .await?;
        if let Some(j) = job {
            insert_job(&mut tx, who, &hold_id, j, now).await?;
        }
        sqlx::query(
            "INSERT INTO ledger_entries (account_id, hold_id, kind, available_delta_mc, held_delta_mc, available_after_mc, held_after_mc, actor, created_at)
             VALUES ($1, $2, 'hold', $3, $4, $5, $6, $7, $8)",
        )
        .bind(who.account_id)
        .bind(&hold_id)
        .bind(-amount)
        .bind(amount)
        .bind(row.try_get::<i64, _>(0)?)
        .bind(row.try_get::<i64, _>(1)?)
        .bind(format!("key:{}", who.key_id))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if let Some(c) = idem {
            sqlx::query("UPDATE idempotency_records SET hold_id = $3, job_id = $4 WHERE key_id = $1 AND idem_key = $2")
                .bind(who.key_id)
                .bind(&c.key)
                .bind(&hold_id)
                .bind(job.map(|j| j.id.as_str()))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(HoldOutcome::Held { hold_id })
    }

    /// Releases the sync holds whose lease ran out or whose instance is dead (each in its own transaction, in the
    /// lock order, re-checked under the lock), forgets their in-progress claims, and makes due the jobs a dead
    /// instance was still submitting. Returns how many holds it released.
    async fn sweep(&self, reason: &str) -> Result<u64, LedgerError> {
        let now = now_ms();
        let orphaned = format!("h.state = 'held' AND h.kind = 'sync' AND (h.lease_until <= $1 OR {DEAD_INSTANCE})");
        let ids: Vec<String> =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT h.id FROM holds h WHERE {orphaned} ORDER BY h.id")))
                .bind(now)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        let mut released = 0;
        for id in &ids {
            let mut tx = self.pool.begin().await?;
            lock_claims_of(&mut tx, id).await?;
            let still = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT 1 FROM holds h WHERE {orphaned} AND h.id = $2 FOR UPDATE"
            )))
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if still.is_none() {
                continue;
            }
            if settle(&mut tx, id, None, reason).await? {
                released += 1;
            }
            sqlx::query("DELETE FROM idempotency_records WHERE hold_id = $1 AND state = 'in_progress'")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        // Claims a dead instance was running (a job's, whose hold outlives it) are forgotten: a retry runs again.
        sqlx::query(
            "DELETE FROM idempotency_records r WHERE r.state = 'in_progress' AND r.instance_id IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance_id AND i.lease_until >= $1)",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        // Jobs a dead instance was still submitting become due (the runner ends them, releasing their holds).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs j SET next_poll_at = $1 WHERE j.state IN ('pending', 'submitting') AND j.next_poll_at > $1
             AND EXISTS (SELECT 1 FROM holds h WHERE h.id = j.hold_id AND {DEAD_INSTANCE})"
        )))
        .bind(now)
        .execute(&self.pool)
        .await?;
        // Rows of instances long dead, once nothing open refers to them.
        sqlx::query(
            "DELETE FROM instances i WHERE i.lease_until < $1
             AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.instance_id = i.id AND h.state = 'held')",
        )
        .bind(now - 3_600_000)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM idempotency_records WHERE state = 'completed' AND expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(released)
    }
}

impl Store for PgStore {
    async fn create_key(
        &self,
        name: &str,
        credits_mc: Millicredits,
        models: Option<&[String]>,
        limits: KeyOverrides,
    ) -> Result<NewKey, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let exists = sqlx::query("SELECT 1 FROM api_keys WHERE name = $1").bind(name).fetch_optional(&mut *tx).await?;
        if exists.is_some() {
            return Err(LedgerError::KeyExists(name.to_owned()));
        }
        let account = sqlx::query("INSERT INTO accounts (name, updated_at) VALUES ($1, $2) RETURNING id")
            .bind(format!("key:{name}"))
            .bind(now)
            .fetch_one(&mut *tx)
            .await;
        let account: i64 = match account {
            Ok(r) => r.try_get(0)?,
            Err(e) if is_unique_violation(&e) => return Err(LedgerError::KeyExists(name.to_owned())),
            Err(e) => return Err(e.into()),
        };
        let secret = new_secret();
        let prefix: String = secret.chars().take(14).collect();
        let models_text = models.map(|m| m.join(","));
        let inserted = sqlx::query(
            "INSERT INTO api_keys (account_id, name, prefix, secret_sha256, allowed_models, created_at, requests_per_minute, max_parallel) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(account)
        .bind(name)
        .bind(&prefix)
        .bind(hash_secret(&secret).to_vec())
        .bind(&models_text)
        .bind(now)
        .bind(limits.requests_per_minute.to_column())
        .bind(limits.max_parallel.to_column())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(LedgerError::KeyExists(name.to_owned())),
            Err(e) => return Err(e.into()),
        }
        if credits_mc != 0 {
            add_credits(&mut tx, account, credits_mc, "admin", "initial grant").await?;
        }
        let info = self.find_key(&mut tx, name).await?;
        tx.commit().await?;
        Ok(NewKey { info, secret })
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>, LedgerError> {
        let rows = sqlx::query(
            "SELECT k.id, k.name, k.prefix, k.allowed_models, k.created_at, k.revoked_at, a.available_mc, a.held_mc,
                    k.requests_per_minute, k.max_parallel
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.name <> $1 ORDER BY k.id",
        )
        .bind(ANONYMOUS_KEY)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_info).collect()
    }

    async fn set_key_limits(&self, key: &str, change: KeyLimitsChange) -> Result<KeyInfo, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let info = self.find_key(&mut tx, key).await?;
        let rpm = change.requests_per_minute.unwrap_or(info.limits.requests_per_minute);
        let parallel = change.max_parallel.unwrap_or(info.limits.max_parallel);
        sqlx::query("UPDATE api_keys SET requests_per_minute = $2, max_parallel = $3 WHERE id = $1")
            .bind(info.id)
            .bind(rpm.to_column())
            .bind(parallel.to_column())
            .execute(&mut *tx)
            .await?;
        let info = self.find_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(info)
    }

    async fn revoke_key(&self, key: &str) -> Result<KeyInfo, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let info = self.find_key(&mut tx, key).await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(info.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let info = self.find_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(info)
    }

    async fn grant(&self, key: &str, credits_mc: Millicredits, actor: &str) -> Result<KeyInfo, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let info = self.find_key(&mut tx, key).await?;
        let account: i64 = sqlx::query("SELECT account_id FROM api_keys WHERE id = $1")
            .bind(info.id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        add_credits(&mut tx, account, credits_mc, actor, "grant").await?;
        let info = self.find_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(info)
    }

    async fn anonymous(&self) -> Result<Principal, LedgerError> {
        let find = || {
            sqlx::query("SELECT id, account_id FROM api_keys WHERE name = $1")
                .bind(ANONYMOUS_KEY)
                .fetch_optional(&self.pool)
        };
        let principal = |r: &PgRow| -> Result<Principal, LedgerError> {
            Ok(Principal {
                key_id: r.try_get(0)?,
                account_id: r.try_get(1)?,
                name: ANONYMOUS_KEY.to_owned(),
                allowed_models: None,
                limits: KeyOverrides::default(),
            })
        };
        if let Some(r) = find().await? {
            return principal(&r);
        }
        let mut tx = self.pool.begin().await?;
        // Instances starting together create it once.
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ANONYMOUS_LOCK).execute(&mut *tx).await?;
        let now = now_ms();
        let exists =
            sqlx::query("SELECT 1 FROM api_keys WHERE name = $1").bind(ANONYMOUS_KEY).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            let account: i64 =
                sqlx::query("INSERT INTO accounts (name, updated_at) VALUES ('anonymous', $1) RETURNING id")
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
            // A random hash no secret maps to, and revoked: nobody can authenticate as this key.
            let unguessable = hash_secret(&new_secret()).to_vec();
            sqlx::query(
                "INSERT INTO api_keys (account_id, name, prefix, secret_sha256, created_at, revoked_at) VALUES ($1, $2, '', $3, $4, $4)",
            )
            .bind(account)
            .bind(ANONYMOUS_KEY)
            .bind(unguessable)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        match find().await? {
            Some(r) => principal(&r),
            None => Err(LedgerError::Db("the anonymous key could not be created".into())),
        }
    }

    async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, LedgerError> {
        let row = sqlx::query(
            "SELECT id, account_id, name, allowed_models, requests_per_minute, max_parallel FROM api_keys WHERE secret_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(hash_secret(secret).to_vec())
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let models: Option<String> = r.try_get(3)?;
        Ok(Some(Principal {
            key_id: r.try_get(0)?,
            account_id: r.try_get(1)?,
            name: r.try_get(2)?,
            allowed_models: models.map(|m| m.split(',').map(str::to_owned).collect()),
            limits: overrides(r.try_get(4)?, r.try_get(5)?),
        }))
    }

    async fn balance(&self, account_id: i64) -> Result<Balance, LedgerError> {
        let r = sqlx::query("SELECT available_mc, held_mc, granted_mc, captured_mc FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Balance {
            available_mc: r.try_get(0)?,
            held_mc: r.try_get(1)?,
            granted_mc: r.try_get(2)?,
            captured_mc: r.try_get(3)?,
        })
    }

    async fn upsert_price(
        &self,
        model: &str,
        unit: &str,
        price_mc: Millicredits,
        output_price_mc: Millicredits,
    ) -> Result<i64, LedgerError> {
        // Instances starting together may insert the same row: the unique constraint keeps one.
        let inserted = sqlx::query(
            "INSERT INTO model_prices (model, unit, price_mc, output_price_mc, effective_from) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (model, unit, price_mc, output_price_mc) DO NOTHING RETURNING id",
        )
        .bind(model)
        .bind(unit)
        .bind(price_mc)
        .bind(output_price_mc)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = inserted {
            return Ok(r.try_get(0)?);
        }
        let id: i64 = sqlx::query(
            "SELECT id FROM model_prices WHERE model = $1 AND unit = $2 AND price_mc = $3 AND output_price_mc = $4",
        )
        .bind(model)
        .bind(unit)
        .bind(price_mc)
        .bind(output_price_mc)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok(id)
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
        self.hold_with(who, price_id, units, unit_mc, Some(lease), idem, None).await
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
        self.hold_with(who, price_id, units, unit_mc, None, idem, Some(job)).await
    }

    async fn capture(
        &self,
        hold_id: &str,
        units: i64,
        response: Option<(&Principal, &str, &StoredResponse)>,
        made: &Made,
    ) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        if response.is_some() {
            lock_claims_of(&mut tx, hold_id).await?;
        }
        settle(&mut tx, hold_id, Some(Capture::Units(units)), "completed").await?;
        let now = now_ms();
        record_made(&mut tx, made, Some(hold_id), now).await?;
        if let Some((who, key, resp)) = response {
            sqlx::query(
                "UPDATE idempotency_records SET state = 'completed', lease_until = NULL, instance_id = NULL, status_code = $4,
                        content_type = $5, response_body = $6
                 WHERE key_id = $1 AND idem_key = $2 AND hold_id = $3",
            )
            .bind(who.key_id)
            .bind(key)
            .bind(hold_id)
            .bind(i64::from(resp.status))
            .bind(&resp.content_type)
            .bind(&resp.body)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn complete_claim(&self, who: &Principal, key: &str, response: &StoredResponse) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE idempotency_records SET state = 'completed', lease_until = NULL, instance_id = NULL, status_code = $3,
                    content_type = $4, response_body = $5
             WHERE key_id = $1 AND idem_key = $2",
        )
        .bind(who.key_id)
        .bind(key)
        .bind(i64::from(response.status))
        .bind(&response.content_type)
        .bind(&response.body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, LedgerError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_record).transpose()
    }

    async fn list_jobs(
        &self,
        key_id: i64,
        object: &str,
        after: Option<&str>,
        limit: u32,
        ascending: bool,
    ) -> Result<(Vec<JobRecord>, bool), LedgerError> {
        let (cmp, order) = if ascending { (">", "ASC") } else { ("<", "DESC") };
        // Built only from constants (the column list and the sort direction).
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE key_id = $1 AND object = $2
             AND ($3::text IS NULL OR (created_at, id) {cmp} (SELECT j.created_at, j.id FROM jobs j WHERE j.id = $3))
             ORDER BY created_at {order}, id {order} LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(key_id)
            .bind(object)
            .bind(after)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut jobs = rows.iter().map(job_record).collect::<Result<Vec<_>, _>>()?;
        let more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        Ok((jobs, more))
    }

    async fn claim_jobs(&self, owner: &str, lease: Duration, limit: u32) -> Result<Vec<JobRecord>, LedgerError> {
        let now = now_ms();
        // Pollers on several instances each lock the rows they take and skip the ones another is taking. A job
        // whose lease holder (an instance id: see `Jobs::owned_by`) has stopped heartbeating is taken over at once,
        // without waiting for its own job lease.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET lease_owner = $1, lease_until = $2, lease_epoch = lease_epoch + 1
             WHERE id IN (SELECT id FROM jobs WHERE state NOT IN ('succeeded', 'failed', 'canceled')
                          AND next_poll_at <= $3 AND (lease_until IS NULL OR lease_until < $3
                               OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = jobs.lease_owner AND i.lease_until >= $3))
                          ORDER BY next_poll_at LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(owner)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_record).collect()
    }

    async fn update_job(&self, id: &str, epoch: i64, change: &JobChange) -> Result<bool, LedgerError> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = COALESCE($3, state), backend = COALESCE($4, backend), handle = COALESCE($5::jsonb, handle),
                    progress = GREATEST(progress, COALESCE($6, progress)),
                    queue_position = CASE WHEN $7 THEN $8 ELSE queue_position END,
                    next_poll_at = COALESCE($9, next_poll_at),
                    poll_failures = CASE $10::bigint WHEN 1 THEN poll_failures + 1 WHEN 0 THEN 0 ELSE poll_failures END,
                    lease_until = CASE WHEN $9::bigint IS NULL THEN lease_until ELSE NULL END,
                    updated_at = $11
             WHERE id = $1 AND lease_epoch = $2 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(id)
        .bind(epoch)
        .bind(change.state)
        .bind(change.backend.as_deref())
        .bind(change.handle.as_ref().map(ToString::to_string))
        .bind(change.progress.map(|p| p.clamp(0, 99)))
        .bind(change.queue_position.is_some())
        .bind(change.queue_position.flatten())
        .bind(change.next_poll_at)
        .bind(change.poll_failed.map(i64::from))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn end_job(&self, id: &str, epoch: i64, end: &JobEnd) -> Result<bool, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let (state, code, message, outputs, progress): (&str, Option<&str>, Option<&str>, Option<String>, i64) =
            match end {
                JobEnd::Succeeded { outputs, .. } => ("succeeded", None, None, Some(outputs.to_string()), 100),
                JobEnd::Failed { state, code, message } => (*state, Some(*code), Some(message.as_str()), None, 0),
            };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET state = $3, error_code = $4, error_message = $5, outputs = $6::jsonb,
                    progress = CASE WHEN $7 = 100 THEN 100 ELSE progress END,
                    lease_owner = NULL, lease_until = NULL, updated_at = $8, completed_at = $8
             WHERE id = $1 AND lease_epoch = $2 AND state NOT IN ('succeeded', 'failed', 'canceled')
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(id)
        .bind(epoch)
        .bind(state)
        .bind(code)
        .bind(message)
        .bind(outputs)
        .bind(progress)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let job = job_record(&row)?;
        match end {
            JobEnd::Succeeded { units, outputs } => {
                settle(&mut tx, &job.hold_id, Some(Capture::Units(*units)), "job succeeded").await?;
                record_made(&mut tx, &Made::of_job(&job, outputs), Some(&job.hold_id), now).await?;
            }
            JobEnd::Failed { code, .. } => {
                settle(&mut tx, &job.hold_id, None, code).await?;
                sqlx::query("DELETE FROM idempotency_records WHERE job_id = $1").bind(id).execute(&mut *tx).await?;
            }
        }
        // The client's webhook event commits with the terminal state: never lost, never written twice.
        if let Some(url) = &job.webhook_url {
            let (event_id, payload) = crate::jobs::webhooks::event(&job, now);
            sqlx::query(
                "INSERT INTO webhook_outbox (id, job_id, url, payload, next_attempt_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $5)",
            )
            .bind(event_id)
            .bind(id)
            .bind(url)
            .bind(payload)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn adopt_job(&self, id: &str, backend: &str, handle: &serde_json::Value) -> Result<bool, LedgerError> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', backend = $2, handle = $3::jsonb, next_poll_at = $4, poll_failures = 0,
                    lease_owner = NULL, lease_until = NULL, lease_epoch = lease_epoch + 1, updated_at = $4
             WHERE id = $1 AND state IN ('pending', 'submitting', 'unknown') AND (backend IS NULL OR backend = $2)",
        )
        .bind(id)
        .bind(backend)
        .bind(handle.to_string())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn poll_job_now(&self, id: &str) -> Result<bool, LedgerError> {
        let done = sqlx::query(
            "UPDATE jobs SET next_poll_at = LEAST(next_poll_at, $2)
             WHERE id = $1 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn job_stats(&self) -> Result<Vec<JobStat>, LedgerError> {
        let rows = sqlx::query(
            "SELECT object, state, COUNT(*), MIN(created_at) FROM jobs
             WHERE state NOT IN ('succeeded', 'failed', 'canceled') GROUP BY object, state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobStat {
                    object: r.try_get(0)?,
                    state: r.try_get(1)?,
                    count: r.try_get(2)?,
                    oldest_created_at: r.try_get(3)?,
                })
            })
            .collect()
    }

    async fn instances(&self) -> Result<Vec<InstanceRow>, LedgerError> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT id, started_at, lease_until, draining_since FROM instances ORDER BY started_at DESC, id LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let lease_until: i64 = r.try_get(2)?;
                Ok(InstanceRow {
                    id: r.try_get(0)?,
                    started_at: r.try_get(1)?,
                    last_heartbeat: lease_until - INSTANCE_LEASE.as_millis() as i64,
                    draining_since: r.try_get(3)?,
                    alive: lease_until >= now,
                })
            })
            .collect()
    }

    async fn mark_draining(&self) -> Result<(), LedgerError> {
        if let Some(id) = &self.instance {
            sqlx::query("UPDATE instances SET draining_since = COALESCE(draining_since, $2) WHERE id = $1")
                .bind(id)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    async fn hand_back(&self, owner: &str) -> Result<u64, LedgerError> {
        let now = now_ms();
        let jobs = sqlx::query(
            "UPDATE jobs SET lease_owner = NULL, lease_until = NULL, lease_epoch = lease_epoch + 1, next_poll_at = $2
             WHERE lease_owner = $1 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE webhook_outbox SET lease_owner = NULL, lease_until = NULL
             WHERE lease_owner = $1 AND delivered_at IS NULL AND gave_up_at IS NULL",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        // The heartbeat stops and the row's lease ends: the others see this instance gone at once.
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
        if let Some(id) = &self.instance {
            sqlx::query("UPDATE instances SET lease_until = $2 WHERE id = $1")
                .bind(id)
                .bind(now - 1)
                .execute(&self.pool)
                .await?;
        }
        Ok(jobs.rows_affected())
    }

    async fn renew_job(&self, id: &str, epoch: i64, lease: Duration) -> Result<Option<bool>, LedgerError> {
        let row = sqlx::query(
            "UPDATE jobs SET lease_until = $3 WHERE id = $1 AND lease_epoch = $2 AND state NOT IN ('succeeded', 'failed', 'canceled')
             RETURNING cancel_requested",
        )
        .bind(id)
        .bind(epoch)
        .bind(now_ms() + lease.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get::<bool, _>(0)).transpose().map_err(Into::into)
    }

    async fn claim_webhooks(&self, owner: &str, lease: Duration, limit: u32) -> Result<Vec<OutboxRow>, LedgerError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE webhook_outbox SET lease_owner = $1, lease_until = $2
             WHERE id IN (SELECT id FROM webhook_outbox WHERE delivered_at IS NULL AND gave_up_at IS NULL
                          AND next_attempt_at <= $3 AND (lease_until IS NULL OR lease_until < $3)
                          ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING id, job_id, url, payload, attempts",
        )
        .bind(owner)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get(0)?,
                    job_id: r.try_get(1)?,
                    url: r.try_get(2)?,
                    payload: r.try_get(3)?,
                    attempts: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn settle_webhook(&self, id: &str, owner: &str, outcome: &WebhookOutcome) -> Result<bool, LedgerError> {
        let now = now_ms();
        let (delivered, next, gave_up, error) = match outcome {
            WebhookOutcome::Delivered => (Some(now), None, None, None),
            WebhookOutcome::Retry { at, error } => (None, Some(*at), None, Some(error.as_str())),
            WebhookOutcome::GaveUp { error } => (None, None, Some(now), Some(error.as_str())),
        };
        let done = sqlx::query(
            "UPDATE webhook_outbox SET attempts = attempts + 1, lease_owner = NULL, lease_until = NULL,
                    delivered_at = $3, next_attempt_at = COALESCE($4, next_attempt_at), gave_up_at = $5,
                    last_error = COALESCE($6, last_error)
             WHERE id = $1 AND lease_owner = $2 AND delivered_at IS NULL AND gave_up_at IS NULL",
        )
        .bind(id)
        .bind(owner)
        .bind(delivered)
        .bind(next)
        .bind(gave_up)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn request_cancel(&self, id: &str) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE jobs SET cancel_requested = TRUE, next_poll_at = $2, lease_until = NULL, updated_at = $2
             WHERE id = $1 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_job(&self, id: &str) -> Result<bool, LedgerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE idempotency_records SET job_id = NULL WHERE job_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM jobs WHERE id = $1 AND state IN ('succeeded', 'failed', 'canceled')")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn capture_mc(&self, hold_id: &str, amount_mc: Millicredits) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        settle(&mut tx, hold_id, Some(Capture::Mc(amount_mc)), "completed").await?;
        tx.commit().await?;
        Ok(())
    }

    async fn output_owner(&self, id: &str) -> Result<Option<i64>, LedgerError> {
        let row = sqlx::query("SELECT key_id FROM outputs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get::<Option<i64>, _>(0)).transpose()?.flatten())
    }

    async fn record_outputs(&self, made: &Made) -> Result<(), LedgerError> {
        if made.outputs.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // A gallery record is no more durable than the output it describes: no wait for the WAL flush.
        sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
        record_made(&mut tx, made, None, now_ms()).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_outputs(
        &self,
        key_id: Option<i64>,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<OutputEntry>, LedgerError> {
        // `$1 IS NULL` lists every key's; the cursor compares (created_at, id) so equal times still page exactly.
        let rows = sqlx::query(
            "SELECT id, key_id, created_at, model, kind, mime, bytes, request, poster FROM outputs
             WHERE ($1::BIGINT IS NULL OR key_id = $1) AND request IS NOT NULL AND kind <> 'thumbnail'
               AND ($2::TEXT IS NULL OR (created_at, id) < (SELECT created_at, id FROM outputs WHERE id = $2))
             ORDER BY created_at DESC, id DESC LIMIT $3",
        )
        .bind(key_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(output_entry).collect()
    }

    async fn forget_outputs(&self, before_ms: i64) -> Result<u64, LedgerError> {
        let done = sqlx::query("DELETE FROM outputs WHERE created_at < $1").bind(before_ms).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn release(&self, hold_id: &str, reason: &str) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        lock_claims_of(&mut tx, hold_id).await?;
        settle(&mut tx, hold_id, None, reason).await?;
        sqlx::query("DELETE FROM idempotency_records WHERE hold_id = $1 AND state = 'in_progress'")
            .bind(hold_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Other instances may be serving from this database: only the holds of dead instances (lease lapsed) and
    /// holds whose own lease ran out are released; job and webhook leases of a dead instance lapse by themselves.
    async fn recover(&self) -> Result<u64, LedgerError> {
        if let Some(id) = &self.instance {
            renew(&self.pool, id).await?;
        }
        let released = self.sweep("released at startup: the instance holding it is gone").await?;
        sqlx::query("DELETE FROM idempotency_records WHERE expires_at < $1").bind(now_ms()).execute(&self.pool).await?;
        Ok(released)
    }

    async fn reap_expired(&self) -> Result<u64, LedgerError> {
        self.sweep("released by the reaper: its lease or its instance's ran out").await
    }

    async fn check(&self) -> Result<Vec<Drift>, LedgerError> {
        let rows = sqlx::query(
            "SELECT a.name, a.available_mc, a.held_mc, a.granted_mc, a.captured_mc,
                    COALESCE((SELECT SUM(available_delta_mc) FROM ledger_entries e WHERE e.account_id = a.id), 0)::BIGINT,
                    COALESCE((SELECT SUM(held_delta_mc) FROM ledger_entries e WHERE e.account_id = a.id), 0)::BIGINT,
                    COALESCE((SELECT SUM(amount_mc) FROM holds h WHERE h.account_id = a.id AND h.state = 'held'), 0)::BIGINT,
                    COALESCE((SELECT SUM(captured_mc) FROM holds h WHERE h.account_id = a.id AND h.state = 'captured'), 0)::BIGINT
             FROM accounts a ORDER BY a.id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut drift = Vec::new();
        for r in rows {
            let name: String = r.try_get(0)?;
            let v: Vec<i64> = (1..9).map(|i| r.try_get(i)).collect::<Result<_, _>>()?;
            let (available, held, granted, captured, sum_avail, sum_held, open_holds, captured_holds) =
                (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
            let mut problem = |p: String| drift.push(Drift { account: name.clone(), problem: p });
            if available != sum_avail {
                problem(format!("available {available} ≠ journal sum {sum_avail}"));
            }
            if held != sum_held {
                problem(format!("held {held} ≠ journal sum {sum_held}"));
            }
            if held != open_holds {
                problem(format!("held {held} ≠ open holds {open_holds}"));
            }
            if captured != captured_holds {
                problem(format!("captured {captured} ≠ captured holds {captured_holds}"));
            }
            if granted != available + held + captured {
                problem(format!("granted {granted} ≠ available {available} + held {held} + captured {captured}"));
            }
        }
        let dangling = sqlx::query(
            "SELECT h.id FROM holds h WHERE (SELECT COUNT(*) FROM ledger_entries e WHERE e.hold_id = h.id AND e.kind = 'hold') <> 1
             OR (h.state <> 'held' AND (SELECT COUNT(*) FROM ledger_entries e WHERE e.hold_id = h.id AND e.kind IN ('capture', 'release')) <> 1)",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in dangling {
            drift.push(Drift {
                account: String::new(),
                problem: format!(
                    "hold {} does not have exactly one opening and one closing entry",
                    r.try_get::<String, _>(0)?
                ),
            });
        }
        Ok(drift)
    }

    async fn usage(&self, key_id: i64) -> Result<Vec<UsageRow>, LedgerError> {
        let rows = sqlx::query(
            "SELECT to_char(to_timestamp(h.created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, p.model, COUNT(*),
                    COALESCE(SUM(h.captured_units), 0)::BIGINT, COALESCE(SUM(h.captured_mc), 0)::BIGINT
             FROM holds h JOIN model_prices p ON p.id = h.price_id
             WHERE h.key_id = $1 AND h.state <> 'held' GROUP BY day, p.model ORDER BY day, p.model",
        )
        .bind(key_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let mc: i64 = r.try_get(4)?;
                Ok(UsageRow {
                    day: r.try_get(0)?,
                    model: r.try_get(1)?,
                    requests: r.try_get(2)?,
                    images: r.try_get(3)?,
                    credits: super::fmt_credits(mc),
                    credits_mc: mc,
                })
            })
            .collect()
    }
}
