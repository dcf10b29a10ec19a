//! The SQLite ledger: WAL, `synchronous=FULL`, `BEGIN IMMEDIATE` write transactions serialized in-process (other
//! processes, such as `easel keys` beside a running server, wait on SQLite's `busy_timeout`). The serving process
//! holds an exclusive lock file so two servers never recover each other's holds.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::PoisonError;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use tokio::sync::Mutex;

use super::{
    ANONYMOUS_KEY, Balance, Drift, HoldOutcome, IdemClaim, JobChange, JobEnd, JobRecord, JobStat, KeyInfo,
    KeyLimitsChange, KeyOverrides, LedgerError, Made, Millicredits, NewJob, NewKey, OutboxRow, OutputEntry, Principal,
    Store, StoredResponse, UsageRow, WebhookOutcome, hash_secret, new_secret, now_ms, overrides,
};

/// How long a completed idempotency record is kept.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// What a capture takes: whole units at the hold's unit price, or an exact amount.
#[derive(Debug, Clone, Copy)]
enum Capture {
    Units(i64),
    Mc(Millicredits),
}

#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Write transactions in this process go one at a time (SQLite has one writer anyway).
    write: Mutex<()>,
    /// One connection with `synchronous=NORMAL`, for records no more durable than what they describe: a gallery
    /// entry of an output file that itself is written without fsync. Its commits skip the fsync (a power cut may
    /// lose the last few, never corrupt the database); money never goes through it.
    relaxed: SqlitePool,
    /// Gallery records waiting for the next group commit on `relaxed`.
    unrecorded: std::sync::Mutex<Vec<Made>>,
    /// Held for the server's lifetime: the exclusive lock on `<db>.lock`.
    _lock: Option<File>,
    pub path: PathBuf,
}

/// The columns `job_record` reads, in order.
const JOB_COLUMNS: &str = "id, object, key_id, account_id, model, hold_id, request, state, backend, handle, progress, \
     queue_position, lease_epoch, poll_failures, deadline_at, cancel_requested, error_code, error_message, outputs, \
     created_at, updated_at, completed_at, webhook_url";

fn job_record(r: &sqlx::sqlite::SqliteRow) -> Result<JobRecord, LedgerError> {
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
        cancel_requested: r.try_get::<i64, _>(15)? != 0,
        error_code: r.try_get(16)?,
        error_message: r.try_get(17)?,
        outputs: json(r.try_get(18)?),
        created_at: r.try_get(19)?,
        updated_at: r.try_get(20)?,
        completed_at: r.try_get(21)?,
        webhook_url: r.try_get(22)?,
    })
}

/// Inserts a new job in `pending`. It is not due before its deadline: the submit that follows makes it due (a
/// runner must not take a job whose submit is still in flight); startup recovery makes a dead process's due.
async fn insert_job(
    tx: &mut sqlx::SqliteConnection,
    who: &Principal,
    hold_id: &str,
    job: &NewJob,
    now: i64,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO jobs (id, object, key_id, account_id, model, hold_id, request, state, next_poll_at, deadline_at, created_at, updated_at, webhook_url)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?10, ?9, ?8, ?8, ?11)",
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

/// Gallery records taken for one group commit; whatever is left in `batch` when dropped goes back to `back`.
struct Unrecorded<'a> {
    batch: Vec<Made>,
    back: &'a std::sync::Mutex<Vec<Made>>,
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            self.back.lock().unwrap_or_else(PoisonError::into_inner).append(&mut self.batch);
        }
    }
}

/// The file path of a `sqlite://PATH` (or `sqlite:PATH`) URL.
pub fn path_of(url: &str) -> Result<PathBuf, LedgerError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| LedgerError::Db(format!("`{url}` is not a sqlite:// URL")))?;
    let rest = rest.split('?').next().unwrap_or(rest);
    if rest.is_empty() {
        return Err(LedgerError::Db("the sqlite URL names no file".into()));
    }
    Ok(PathBuf::from(rest))
}

impl SqliteStore {
    /// Opens (creating) the database and runs migrations. `exclusive` takes the server lock.
    pub async fn open(url: &str, exclusive: bool) -> Result<Self, LedgerError> {
        let path = path_of(url)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| LedgerError::Db(format!("cannot create {}: {e}", dir.display())))?;
        }
        let lock = if exclusive { Some(take_lock(&path)?) } else { None };
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(8).connect_with(options.clone()).await?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| LedgerError::Db(format!("migration failed: {e}")))?;
        let relaxed = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.synchronous(SqliteSynchronous::Normal))
            .await?;
        Ok(Self { pool, write: Mutex::new(()), relaxed, unrecorded: std::sync::Mutex::default(), _lock: lock, path })
    }

    /// A trivial query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn find_key(&self, conn: &mut sqlx::SqliteConnection, key: &str) -> Result<KeyInfo, LedgerError> {
        let row = sqlx::query(
            "SELECT k.id, k.name, k.prefix, k.allowed_models, k.created_at, k.revoked_at, a.available_mc, a.held_mc,
                    k.requests_per_minute, k.max_parallel
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.name = ?1 OR CAST(k.id AS TEXT) = ?1 OR k.prefix = ?1",
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
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let lease_until = lease.map(|l| now + l.as_millis() as i64);
        // The idempotency record of a job lives as long as a sync one would (a day).
        let claim_until = lease_until.unwrap_or(now + IDEMPOTENCY_TTL.as_millis() as i64);
        if let Some(c) = idem {
            let claimed = sqlx::query(
                "INSERT INTO idempotency_records (key_id, idem_key, method, path, fingerprint, state, lease_until, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'in_progress', ?6, ?7, ?8) ON CONFLICT DO NOTHING RETURNING key_id",
            )
            .bind(who.key_id)
            .bind(&c.key)
            .bind(&c.method)
            .bind(&c.path)
            .bind(c.fingerprint.to_vec())
            .bind(claim_until)
            .bind(now)
            .bind(now + IDEMPOTENCY_TTL.as_millis() as i64)
            .fetch_optional(&mut *tx)
            .await?;
            if claimed.is_none() {
                let r = sqlx::query(
                    "SELECT method, path, fingerprint, state, lease_until, hold_id, status_code, content_type, response_body, expires_at
                     FROM idempotency_records WHERE key_id = ?1 AND idem_key = ?2",
                )
                .bind(who.key_id)
                .bind(&c.key)
                .fetch_one(&mut *tx)
                .await?;
                let (method, path, fp): (String, String, Vec<u8>) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                let (state, lease, old_hold): (String, Option<i64>, Option<String>) =
                    (r.try_get(3)?, r.try_get(4)?, r.try_get(5)?);
                let expires: i64 = r.try_get(9)?;
                let expired = expires < now;
                if !expired && (method != c.method || path != c.path || fp != c.fingerprint) {
                    return Err(LedgerError::IdempotencyMismatch);
                }
                if !expired && state == "completed" {
                    let status: i64 = r.try_get(6)?;
                    return Ok(HoldOutcome::Replay {
                        status: status as u16,
                        content_type: r.try_get::<Option<String>, _>(7)?.unwrap_or_default(),
                        body: r.try_get::<Option<Vec<u8>>, _>(8)?.unwrap_or_default(),
                    });
                }
                if !expired && lease.is_some_and(|l| l > now) {
                    return Err(LedgerError::IdempotencyInProgress);
                }
                // An expired record, or an in-progress one whose owner is gone: take it over.
                if let Some(h) = old_hold {
                    self.resolve(&mut tx, &h, None, "idempotency record taken over").await?;
                }
                sqlx::query(
                    "UPDATE idempotency_records SET method = ?3, path = ?4, fingerprint = ?5, state = 'in_progress', lease_until = ?6, hold_id = NULL,
                     status_code = NULL, content_type = NULL, response_body = NULL, created_at = ?7, expires_at = ?8 WHERE key_id = ?1 AND idem_key = ?2",
                )
                .bind(who.key_id)
                .bind(&c.key)
                .bind(&c.method)
                .bind(&c.path)
                .bind(c.fingerprint.to_vec())
                .bind(claim_until)
                .bind(now)
                .bind(now + IDEMPOTENCY_TTL.as_millis() as i64)
                .execute(&mut *tx)
                .await?;
            }
        }
        let amount = units * unit_mc;
        let row = sqlx::query(
            "UPDATE accounts SET available_mc = available_mc - ?2, held_mc = held_mc + ?2, updated_at = ?3
             WHERE id = ?1 AND available_mc >= ?2 RETURNING available_mc, held_mc",
        )
        .bind(who.account_id)
        .bind(amount)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let available: i64 = sqlx::query("SELECT available_mc FROM accounts WHERE id = ?1")
                .bind(who.account_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            // Rolling back drops the idempotency claim too: a retry after a top-up runs again.
            return Err(LedgerError::Insufficient { available_mc: available, amount_mc: amount, units, unit_mc });
        };
        let hold_id = format!("hold_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO holds (id, account_id, key_id, price_id, units, amount_mc, state, kind, lease_until, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'held', ?9, ?7, ?8)",
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
        .execute(&mut *tx)
        .await?;
        if let Some(j) = job {
            insert_job(&mut tx, who, &hold_id, j, now).await?;
        }
        sqlx::query(
            "INSERT INTO ledger_entries (account_id, hold_id, kind, available_delta_mc, held_delta_mc, available_after_mc, held_after_mc, actor, created_at)
             VALUES (?1, ?2, 'hold', ?3, ?4, ?5, ?6, ?7, ?8)",
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
            sqlx::query("UPDATE idempotency_records SET hold_id = ?3, job_id = ?4 WHERE key_id = ?1 AND idem_key = ?2")
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

    async fn resolve(
        &self,
        tx: &mut sqlx::SqliteConnection,
        hold_id: &str,
        units: Option<i64>,
        reason: &str,
    ) -> Result<bool, LedgerError> {
        self.settle(tx, hold_id, units.map(Capture::Units), reason).await
    }

    /// Captures (`Some`) or releases (`None`) an open hold; `false` when it is not open (already settled).
    async fn settle(
        &self,
        tx: &mut sqlx::SqliteConnection,
        hold_id: &str,
        capture: Option<Capture>,
        reason: &str,
    ) -> Result<bool, LedgerError> {
        let units = capture.map(|c| match c {
            Capture::Units(u) => u,
            Capture::Mc(_) => i64::MAX,
        });
        let now = now_ms();
        let Some(h) =
            sqlx::query("SELECT account_id, key_id, units, amount_mc FROM holds WHERE id = ?1 AND state = 'held'")
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
        sqlx::query("UPDATE holds SET state = ?2, captured_units = ?3, captured_mc = ?4, resolved_at = ?5, reason = ?6 WHERE id = ?1")
            .bind(hold_id)
            .bind(state)
            .bind(cap_units)
            .bind(cap)
            .bind(now)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(
            "UPDATE accounts SET held_mc = held_mc - ?2, available_mc = available_mc + ?3, captured_mc = captured_mc + ?4, updated_at = ?5
             WHERE id = ?1 RETURNING available_mc, held_mc",
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
}

fn take_lock(db: &Path) -> Result<File, LedgerError> {
    let lock_path = PathBuf::from(format!("{}.lock", db.display()));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| LedgerError::Db(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => Err(LedgerError::Db(format!(
            "another `easel serve` is using {} (lock {} is held); one server per SQLite database",
            db.display(),
            lock_path.display()
        ))),
    }
}

fn key_info(r: &sqlx::sqlite::SqliteRow) -> Result<KeyInfo, LedgerError> {
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

async fn add_credits(
    tx: &mut sqlx::SqliteConnection,
    account: i64,
    mc: Millicredits,
    actor: &str,
    memo: &str,
) -> Result<(), LedgerError> {
    let now = now_ms();
    let row = sqlx::query(
        "UPDATE accounts SET available_mc = available_mc + ?2, granted_mc = granted_mc + ?2, updated_at = ?3
         WHERE id = ?1 AND available_mc + ?2 >= 0 RETURNING available_mc, held_mc",
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
         VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8)",
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

impl Store for SqliteStore {
    async fn create_key(
        &self,
        name: &str,
        credits_mc: Millicredits,
        models: Option<&[String]>,
        limits: KeyOverrides,
    ) -> Result<NewKey, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let exists = sqlx::query("SELECT 1 FROM api_keys WHERE name = ?1").bind(name).fetch_optional(&mut *tx).await?;
        if exists.is_some() {
            return Err(LedgerError::KeyExists(name.to_owned()));
        }
        let account: i64 = sqlx::query("INSERT INTO accounts (name, updated_at) VALUES (?1, ?2) RETURNING id")
            .bind(format!("key:{name}"))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let secret = new_secret();
        let prefix: String = secret.chars().take(14).collect();
        let models_text = models.map(|m| m.join(","));
        sqlx::query("INSERT INTO api_keys (account_id, name, prefix, secret_sha256, allowed_models, created_at, requests_per_minute, max_parallel) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
            .bind(account)
            .bind(name)
            .bind(&prefix)
            .bind(hash_secret(&secret).to_vec())
            .bind(&models_text)
            .bind(now)
            .bind(limits.requests_per_minute.to_column())
            .bind(limits.max_parallel.to_column())
            .execute(&mut *tx)
            .await?;
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
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.name != ?1 ORDER BY k.id",
        )
        .bind(ANONYMOUS_KEY)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_info).collect()
    }

    async fn set_key_limits(&self, key: &str, change: KeyLimitsChange) -> Result<KeyInfo, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let info = self.find_key(&mut tx, key).await?;
        let rpm = change.requests_per_minute.unwrap_or(info.limits.requests_per_minute);
        let parallel = change.max_parallel.unwrap_or(info.limits.max_parallel);
        sqlx::query("UPDATE api_keys SET requests_per_minute = ?2, max_parallel = ?3 WHERE id = ?1")
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
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let info = self.find_key(&mut tx, key).await?;
        sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
            .bind(info.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let info = self.find_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(info)
    }

    async fn grant(&self, key: &str, credits_mc: Millicredits, actor: &str) -> Result<KeyInfo, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let info = self.find_key(&mut tx, key).await?;
        let account: i64 = sqlx::query("SELECT account_id FROM api_keys WHERE id = ?1")
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
            sqlx::query("SELECT id, account_id FROM api_keys WHERE name = ?1")
                .bind(ANONYMOUS_KEY)
                .fetch_optional(&self.pool)
        };
        let principal = |r: &sqlx::sqlite::SqliteRow| -> Result<Principal, LedgerError> {
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
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let exists =
            sqlx::query("SELECT 1 FROM api_keys WHERE name = ?1").bind(ANONYMOUS_KEY).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            let account: i64 =
                sqlx::query("INSERT INTO accounts (name, updated_at) VALUES ('anonymous', ?1) RETURNING id")
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
            // A random hash no secret maps to, and revoked: nobody can authenticate as this key.
            let unguessable = hash_secret(&new_secret()).to_vec();
            sqlx::query("INSERT INTO api_keys (account_id, name, prefix, secret_sha256, created_at, revoked_at) VALUES (?1, ?2, '', ?3, ?4, ?4)")
                .bind(account)
                .bind(ANONYMOUS_KEY)
                .bind(unguessable)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        drop(_w);
        match find().await? {
            Some(r) => principal(&r),
            None => Err(LedgerError::Db("the anonymous key could not be created".into())),
        }
    }

    async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, LedgerError> {
        let row = sqlx::query(
            "SELECT id, account_id, name, allowed_models, requests_per_minute, max_parallel FROM api_keys WHERE secret_sha256 = ?1 AND revoked_at IS NULL",
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
        let r = sqlx::query("SELECT available_mc, held_mc, granted_mc, captured_mc FROM accounts WHERE id = ?1")
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
        let _w = self.write.lock().await;
        let existing = sqlx::query(
            "SELECT id FROM model_prices WHERE model = ?1 AND unit = ?2 AND price_mc = ?3 AND output_price_mc = ?4",
        )
        .bind(model)
        .bind(unit)
        .bind(price_mc)
        .bind(output_price_mc)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = existing {
            return Ok(r.try_get(0)?);
        }
        let id: i64 = sqlx::query(
            "INSERT INTO model_prices (model, unit, price_mc, output_price_mc, effective_from) VALUES (?1, ?2, ?3, ?4, ?5)
             RETURNING id",
        )
        .bind(model)
        .bind(unit)
        .bind(price_mc)
        .bind(output_price_mc)
        .bind(now_ms())
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
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        self.resolve(&mut tx, hold_id, Some(units), "completed").await?;
        record_made(&mut tx, made, Some(hold_id), now_ms()).await?;
        if let Some((who, key, resp)) = response {
            sqlx::query(
                "UPDATE idempotency_records SET state = 'completed', lease_until = NULL, status_code = ?4, content_type = ?5, response_body = ?6
                 WHERE key_id = ?1 AND idem_key = ?2 AND hold_id = ?3",
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
        let _w = self.write.lock().await;
        sqlx::query(
            "UPDATE idempotency_records SET state = 'completed', lease_until = NULL, status_code = ?3, content_type = ?4, response_body = ?5
             WHERE key_id = ?1 AND idem_key = ?2",
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1")))
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
        // The cursor is a job id; jobs sort by (created_at, id).
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE key_id = ?1 AND object = ?2
             AND (?3 IS NULL OR (created_at, id) {cmp} (SELECT created_at, id FROM jobs WHERE id = ?3))
             ORDER BY created_at {order}, id {order} LIMIT ?4"
        );
        // Built only from constants (the column list and the sort direction).
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
        let _w = self.write.lock().await;
        let now = now_ms();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET lease_owner = ?1, lease_until = ?2, lease_epoch = lease_epoch + 1
             WHERE id IN (SELECT id FROM jobs WHERE state NOT IN ('succeeded', 'failed', 'canceled')
                          AND next_poll_at <= ?3 AND (lease_until IS NULL OR lease_until < ?3)
                          ORDER BY next_poll_at LIMIT ?4)
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
        let _w = self.write.lock().await;
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = COALESCE(?3, state), backend = COALESCE(?4, backend), handle = COALESCE(?5, handle),
                    progress = MAX(progress, COALESCE(?6, progress)),
                    queue_position = CASE WHEN ?7 THEN ?8 ELSE queue_position END,
                    next_poll_at = COALESCE(?9, next_poll_at),
                    poll_failures = CASE ?10 WHEN 1 THEN poll_failures + 1 WHEN 0 THEN 0 ELSE poll_failures END,
                    lease_until = CASE WHEN ?9 IS NULL THEN lease_until ELSE NULL END,
                    updated_at = ?11
             WHERE id = ?1 AND lease_epoch = ?2 AND state NOT IN ('succeeded', 'failed', 'canceled')",
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

    async fn adopt_job(&self, id: &str, backend: &str, handle: &serde_json::Value) -> Result<bool, LedgerError> {
        let _w = self.write.lock().await;
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', backend = ?2, handle = ?3, next_poll_at = ?4, poll_failures = 0,
                    lease_owner = NULL, lease_until = NULL, lease_epoch = lease_epoch + 1, updated_at = ?4
             WHERE id = ?1 AND state IN ('pending', 'submitting', 'unknown') AND (backend IS NULL OR backend = ?2)",
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
        let _w = self.write.lock().await;
        let done = sqlx::query(
            "UPDATE jobs SET next_poll_at = MIN(next_poll_at, ?2)
             WHERE id = ?1 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn end_job(&self, id: &str, epoch: i64, end: &JobEnd) -> Result<bool, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let (state, code, message, outputs, progress) = match end {
            JobEnd::Succeeded { outputs, .. } => ("succeeded", None, None, Some(outputs.to_string()), 100),
            JobEnd::Failed { state, code, message } => (*state, Some(*code), Some(message.as_str()), None, 0),
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET state = ?3, error_code = ?4, error_message = ?5, outputs = ?6,
                    progress = CASE WHEN ?7 = 100 THEN 100 ELSE progress END,
                    lease_owner = NULL, lease_until = NULL, updated_at = ?8, completed_at = ?8
             WHERE id = ?1 AND lease_epoch = ?2 AND state NOT IN ('succeeded', 'failed', 'canceled')
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
                self.resolve(&mut tx, &job.hold_id, Some(*units), "job succeeded").await?;
                // The job's key owns what it made (edits may name these files; unsigned reads need the owner).
                record_made(&mut tx, &Made::of_job(&job, outputs), Some(&job.hold_id), now).await?;
            }
            JobEnd::Failed { code, .. } => {
                self.resolve(&mut tx, &job.hold_id, None, code).await?;
                sqlx::query("DELETE FROM idempotency_records WHERE job_id = ?1").bind(id).execute(&mut *tx).await?;
            }
        }
        // The client's webhook event commits with the terminal state: never lost, never written twice.
        if let Some(url) = &job.webhook_url {
            let (event_id, payload) = crate::jobs::webhooks::event(&job, now);
            sqlx::query(
                "INSERT INTO webhook_outbox (id, job_id, url, payload, next_attempt_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
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

    async fn hand_back(&self, owner: &str) -> Result<u64, LedgerError> {
        let _w = self.write.lock().await;
        let now = now_ms();
        let jobs = sqlx::query(
            "UPDATE jobs SET lease_owner = NULL, lease_until = NULL, lease_epoch = lease_epoch + 1, next_poll_at = ?2
             WHERE lease_owner = ?1 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE webhook_outbox SET lease_owner = NULL, lease_until = NULL
             WHERE lease_owner = ?1 AND delivered_at IS NULL AND gave_up_at IS NULL",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(jobs.rows_affected())
    }

    async fn renew_job(&self, id: &str, epoch: i64, lease: Duration) -> Result<Option<bool>, LedgerError> {
        let _w = self.write.lock().await;
        let row = sqlx::query(
            "UPDATE jobs SET lease_until = ?3 WHERE id = ?1 AND lease_epoch = ?2 AND state NOT IN ('succeeded', 'failed', 'canceled')
             RETURNING cancel_requested",
        )
        .bind(id)
        .bind(epoch)
        .bind(now_ms() + lease.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get::<i64, _>(0).map(|c| c != 0)).transpose().map_err(Into::into)
    }

    async fn claim_webhooks(&self, owner: &str, lease: Duration, limit: u32) -> Result<Vec<OutboxRow>, LedgerError> {
        // A read first: the deliverer asks often, and a write transaction for nothing would queue behind others.
        let due = "SELECT 1 FROM webhook_outbox WHERE delivered_at IS NULL AND gave_up_at IS NULL
                   AND next_attempt_at <= ?1 AND (lease_until IS NULL OR lease_until < ?1) LIMIT 1";
        if sqlx::query(due).bind(now_ms()).fetch_optional(&self.pool).await?.is_none() {
            return Ok(Vec::new());
        }
        let _w = self.write.lock().await;
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE webhook_outbox SET lease_owner = ?1, lease_until = ?2
             WHERE id IN (SELECT id FROM webhook_outbox WHERE delivered_at IS NULL AND gave_up_at IS NULL
                          AND next_attempt_at <= ?3 AND (lease_until IS NULL OR lease_until < ?3)
                          ORDER BY next_attempt_at LIMIT ?4)
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
        let _w = self.write.lock().await;
        let now = now_ms();
        let (delivered, next, gave_up, error) = match outcome {
            WebhookOutcome::Delivered => (Some(now), None, None, None),
            WebhookOutcome::Retry { at, error } => (None, Some(*at), None, Some(error.as_str())),
            WebhookOutcome::GaveUp { error } => (None, None, Some(now), Some(error.as_str())),
        };
        let done = sqlx::query(
            "UPDATE webhook_outbox SET attempts = attempts + 1, lease_owner = NULL, lease_until = NULL,
                    delivered_at = ?3, next_attempt_at = COALESCE(?4, next_attempt_at), gave_up_at = ?5,
                    last_error = COALESCE(?6, last_error)
             WHERE id = ?1 AND lease_owner = ?2 AND delivered_at IS NULL AND gave_up_at IS NULL",
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
        let _w = self.write.lock().await;
        sqlx::query(
            "UPDATE jobs SET cancel_requested = 1, next_poll_at = ?2, lease_until = NULL, updated_at = ?2
             WHERE id = ?1 AND state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_job(&self, id: &str) -> Result<bool, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE idempotency_records SET job_id = NULL WHERE job_id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM jobs WHERE id = ?1 AND state IN ('succeeded', 'failed', 'canceled')")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn capture_mc(&self, hold_id: &str, amount_mc: Millicredits) -> Result<(), LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        self.settle(&mut tx, hold_id, Some(Capture::Mc(amount_mc)), "completed").await?;
        tx.commit().await?;
        Ok(())
    }

    async fn output_owner(&self, id: &str) -> Result<Option<i64>, LedgerError> {
        let row = sqlx::query("SELECT key_id FROM outputs WHERE id = ?1").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get::<Option<i64>, _>(0)).transpose()?.flatten())
    }

    async fn record_outputs(&self, made: &Made) -> Result<(), LedgerError> {
        if made.outputs.is_empty() {
            return Ok(());
        }
        // Group commit: records wait here while a write runs, and the next writer commits all of them at once.
        self.unrecorded.lock().unwrap_or_else(PoisonError::into_inner).push(made.clone());
        let _w = self.write.lock().await;
        let batch = std::mem::take(&mut *self.unrecorded.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            // A writer before us committed ours (it held the write lock until its commit).
            return Ok(());
        }
        // Failed or cancelled, the batch goes back for the next writer to try; this caller learns of a failure.
        let mut batch = Unrecorded { batch, back: &self.unrecorded };
        let mut tx = self.relaxed.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        for m in &batch.batch {
            record_made(&mut tx, m, None, now).await?;
        }
        tx.commit().await?;
        batch.batch.clear();
        Ok(())
    }

    async fn list_outputs(
        &self,
        key_id: Option<i64>,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<OutputEntry>, LedgerError> {
        // `?1 IS NULL` lists every key's; the cursor compares (created_at, id) so equal times still page exactly.
        let rows = sqlx::query(
            "SELECT id, key_id, created_at, model, kind, mime, bytes, request, poster FROM outputs
             WHERE (?1 IS NULL OR key_id = ?1) AND request IS NOT NULL AND kind <> 'thumbnail'
               AND (?2 IS NULL OR (created_at, id) < (SELECT created_at, id FROM outputs WHERE id = ?2))
             ORDER BY created_at DESC, id DESC LIMIT ?3",
        )
        .bind(key_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(output_entry).collect()
    }

    async fn forget_outputs(&self, before_ms: i64) -> Result<u64, LedgerError> {
        let _w = self.write.lock().await;
        let done = sqlx::query("DELETE FROM outputs WHERE created_at < ?1").bind(before_ms).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn release(&self, hold_id: &str, reason: &str) -> Result<(), LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        self.resolve(&mut tx, hold_id, None, reason).await?;
        sqlx::query("DELETE FROM idempotency_records WHERE hold_id = ?1 AND state = 'in_progress'")
            .bind(hold_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn recover(&self) -> Result<u64, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let open: Vec<String> = sqlx::query("SELECT id FROM holds WHERE state = 'held' AND kind = 'sync'")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        for id in &open {
            self.resolve(&mut tx, id, None, "released at startup: the process holding it ended").await?;
        }
        sqlx::query("DELETE FROM idempotency_records WHERE state = 'in_progress'").execute(&mut *tx).await?;
        sqlx::query("DELETE FROM idempotency_records WHERE expires_at < ?1").bind(now_ms()).execute(&mut *tx).await?;
        // Jobs outlive the process: leases of the dead one lapse now, and jobs it was still submitting become due
        // (the runner ends those, releasing their holds).
        sqlx::query(
            "UPDATE jobs SET lease_owner = NULL, lease_until = NULL,
                    next_poll_at = CASE WHEN state IN ('pending', 'submitting') THEN ?1 ELSE next_poll_at END
             WHERE state NOT IN ('succeeded', 'failed', 'canceled')",
        )
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        // Webhook deliveries the dead process was attempting are due again (their event id stays the same).
        sqlx::query(
            "UPDATE webhook_outbox SET lease_owner = NULL, lease_until = NULL
             WHERE lease_owner IS NOT NULL AND delivered_at IS NULL AND gave_up_at IS NULL",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(open.len() as u64)
    }

    async fn reap_expired(&self) -> Result<u64, LedgerError> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let expired: Vec<String> =
            sqlx::query("SELECT id FROM holds WHERE state = 'held' AND kind = 'sync' AND lease_until <= ?1")
                .bind(now_ms())
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        for id in &expired {
            self.resolve(&mut tx, id, None, "released by the reaper: its lease ran out").await?;
            sqlx::query("DELETE FROM idempotency_records WHERE hold_id = ?1 AND state = 'in_progress'")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM idempotency_records WHERE state = 'completed' AND expires_at < ?1")
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(expired.len() as u64)
    }

    async fn check(&self) -> Result<Vec<Drift>, LedgerError> {
        let rows = sqlx::query(
            "SELECT a.name, a.available_mc, a.held_mc, a.granted_mc, a.captured_mc,
                    COALESCE((SELECT SUM(available_delta_mc) FROM ledger_entries e WHERE e.account_id = a.id), 0),
                    COALESCE((SELECT SUM(held_delta_mc) FROM ledger_entries e WHERE e.account_id = a.id), 0),
                    COALESCE((SELECT SUM(amount_mc) FROM holds h WHERE h.account_id = a.id AND h.state = 'held'), 0),
                    COALESCE((SELECT SUM(captured_mc) FROM holds h WHERE h.account_id = a.id AND h.state = 'captured'), 0)
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
            "SELECT strftime('%Y-%m-%d', h.created_at / 1000, 'unixepoch') AS day, p.model, COUNT(*),
                    COALESCE(SUM(h.captured_units), 0), COALESCE(SUM(h.captured_mc), 0)
             FROM holds h JOIN model_prices p ON p.id = h.price_id
             WHERE h.key_id = ?1 AND h.state <> 'held' GROUP BY day, p.model ORDER BY day, p.model",
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

/// Records `made`'s outputs; with a hold, its key owns them.
async fn record_made(
    tx: &mut sqlx::SqliteConnection,
    made: &Made,
    hold_id: Option<&str>,
    now: i64,
) -> Result<(), LedgerError> {
    for o in &made.outputs {
        sqlx::query(
            "INSERT OR IGNORE INTO outputs (id, key_id, hold_id, created_at, model, kind, mime, bytes, request, poster)
             VALUES (?1, (SELECT key_id FROM holds WHERE id = ?2), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
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

fn output_entry(r: &sqlx::sqlite::SqliteRow) -> Result<OutputEntry, LedgerError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::MadeOutput;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("l.db").display());
        (dir, SqliteStore::open(&url, true).await.unwrap())
    }

    #[tokio::test]
    async fn a_price_per_1k_tokens_is_recorded_with_its_unit_and_both_prices() {
        let (_d, s) = store().await;
        let key = s.create_key("alice", 100_000, None, Default::default()).await.unwrap();
        let who = s.authenticate(&key.secret).await.unwrap().unwrap();
        let price = s.upsert_price("chat", "1k_tokens", 500, 1_500).await.unwrap();
        assert_eq!(s.upsert_price("chat", "1k_tokens", 500, 1_500).await.unwrap(), price);
        assert_ne!(s.upsert_price("chat", "1k_tokens", 500, 2_000).await.unwrap(), price, "a new output price");
        assert!(s.upsert_price("chat", "image", 500, 1_500).await.is_err(), "only per-token prices have two");
        let row = sqlx::query("SELECT unit, price_mc, output_price_mc FROM model_prices WHERE id = ?1")
            .bind(price)
            .fetch_one(&s.pool)
            .await
            .unwrap();
        let got: (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(got, ("1k_tokens".to_owned(), 500, 1_500));
        let HoldOutcome::Held { .. } = s.hold(&who, price, 1, 40, Duration::from_secs(60), None).await.unwrap() else {
            panic!()
        };
        // The rebuilt table turned foreign keys off while swapping; every connection has them on again.
        let on: i64 = sqlx::query("PRAGMA foreign_keys").fetch_one(&s.pool).await.unwrap().get(0);
        assert_eq!(on, 1);
        assert!(sqlx::query("PRAGMA foreign_key_check").fetch_all(&s.pool).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn hold_capture_release_keep_the_books_balanced() {
        let (_d, s) = store().await;
        let key = s.create_key("alice", 100_000, None, Default::default()).await.unwrap();
        let who = s.authenticate(&key.secret).await.unwrap().unwrap();
        assert!(s.authenticate("sk-easel-wrong").await.unwrap().is_none());
        let price = s.upsert_price("m", "image", 10_000, 0).await.unwrap();
        assert_eq!(s.upsert_price("m", "image", 10_000, 0).await.unwrap(), price, "same price, same row");
        let HoldOutcome::Held { hold_id } =
            s.hold(&who, price, 4, 10_000, Duration::from_secs(60), None).await.unwrap()
        else {
            panic!()
        };
        assert_eq!(s.balance(who.account_id).await.unwrap().held_mc, 40_000);
        s.capture(&hold_id, 2, None, &Made::default()).await.unwrap();
        s.capture(&hold_id, 2, None, &Made::default()).await.unwrap(); // second settle is a no-op
        let b = s.balance(who.account_id).await.unwrap();
        assert_eq!((b.available_mc, b.held_mc, b.captured_mc), (80_000, 0, 20_000), "2 of 4 produced: 2 charged");
        let HoldOutcome::Held { hold_id } =
            s.hold(&who, price, 1, 10_000, Duration::from_secs(60), None).await.unwrap()
        else {
            panic!()
        };
        s.release(&hold_id, "backend error").await.unwrap();
        assert_eq!(s.balance(who.account_id).await.unwrap().available_mc, 80_000);
        let err = s.hold(&who, price, 9, 10_000, Duration::from_secs(60), None).await.unwrap_err();
        assert!(err.to_string().contains("balance is 80 credits and this request costs 90"), "{err}");
        assert!(s.check().await.unwrap().is_empty());
        let usage = s.usage(who.key_id).await.unwrap();
        assert_eq!((usage[0].requests, usage[0].images, usage[0].credits_mc), (2, 2, 20_000));
    }

    #[tokio::test]
    async fn an_exact_capture_charges_that_amount_never_more_than_held() {
        let (_d, s) = store().await;
        let key = s.create_key("carol", 10_000, None, Default::default()).await.unwrap();
        let who = s.authenticate(&key.secret).await.unwrap().unwrap();
        let price = s.upsert_price("chat", "request", 0, 0).await.unwrap();
        let HoldOutcome::Held { hold_id } = s.hold(&who, price, 1, 3_000, Duration::from_secs(60), None).await.unwrap()
        else {
            panic!()
        };
        s.capture_mc(&hold_id, 1_234).await.unwrap();
        s.capture_mc(&hold_id, 1_000).await.unwrap(); // settled already: a no-op
        let b = s.balance(who.account_id).await.unwrap();
        assert_eq!((b.available_mc, b.held_mc, b.captured_mc), (8_766, 0, 1_234));
        let HoldOutcome::Held { hold_id } = s.hold(&who, price, 1, 1_000, Duration::from_secs(60), None).await.unwrap()
        else {
            panic!()
        };
        s.capture_mc(&hold_id, 5_000).await.unwrap();
        assert_eq!(s.balance(who.account_id).await.unwrap().captured_mc, 2_234, "clamped to the 1_000 held");
        assert!(s.check().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn recovery_releases_orphaned_holds_and_a_second_server_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("l.db").display());
        let s = SqliteStore::open(&url, true).await.unwrap();
        assert!(SqliteStore::open(&url, true).await.unwrap_err().to_string().contains("another `easel serve`"));
        let key = s.create_key("bob", 5_000, None, Default::default()).await.unwrap();
        let who = s.authenticate(&key.secret).await.unwrap().unwrap();
        let price = s.upsert_price("m", "image", 1_000, 0).await.unwrap();
        s.hold(&who, price, 3, 1_000, Duration::from_secs(60), None).await.unwrap();
        assert_eq!(s.reap_expired().await.unwrap(), 0, "a live lease is not reaped");
        s.hold(&who, price, 1, 1_000, Duration::ZERO, None).await.unwrap();
        assert_eq!(s.reap_expired().await.unwrap(), 1, "an expired lease is");
        assert_eq!(s.recover().await.unwrap(), 1);
        assert_eq!(s.balance(who.account_id).await.unwrap().available_mc, 5_000);
        assert!(s.check().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn outputs_without_a_key_are_listed_and_forgotten_by_age() {
        let (_dir, s) = store().await;
        let out = |id: &str| MadeOutput {
            id: id.into(),
            kind: "image".into(),
            mime: "image/png".into(),
            bytes: 3,
            poster: None,
        };
        let thumb = MadeOutput { kind: "thumbnail".into(), ..out("img_t") };
        let made = Made { model: "m".into(), request: r#"{"prompt":"p"}"#.into(), outputs: vec![out("img_a"), thumb] };
        s.record_outputs(&made).await.unwrap();
        let listed = s.list_outputs(None, 10, None).await.unwrap();
        assert_eq!(listed.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["img_a"], "thumbnails are not listed");
        assert_eq!((listed[0].key_id, listed[0].request.as_deref()), (None, Some(r#"{"prompt":"p"}"#)));
        assert_eq!(s.output_owner("img_a").await.unwrap(), None, "made without a key: nobody owns it");
        assert!(s.list_outputs(Some(1), 10, None).await.unwrap().is_empty(), "not any key's");
        assert_eq!(s.forget_outputs(listed[0].created_at).await.unwrap(), 0, "nothing older than itself");
        assert_eq!(s.forget_outputs(listed[0].created_at + 1).await.unwrap(), 2);
        assert!(s.list_outputs(None, 10, None).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_are_committed_together_and_each_is_listed_when_its_call_returns() {
        let (_dir, s) = store().await;
        let s = std::sync::Arc::new(s);
        let calls = (0..40).map(|i| {
            let s = std::sync::Arc::clone(&s);
            tokio::spawn(async move {
                let id = format!("img_{i:02}");
                let output = MadeOutput {
                    id: id.clone(),
                    kind: "image".into(),
                    mime: "image/png".into(),
                    bytes: 1,
                    poster: None,
                };
                s.record_outputs(&Made { model: "m".into(), request: "{}".into(), outputs: vec![output] })
                    .await
                    .unwrap();
                // Returned Ok: this call's record is committed, whichever call's transaction carried it.
                assert_eq!(s.output_owner(&id).await.unwrap(), None);
                let listed = s.list_outputs(None, 100, None).await.unwrap();
                assert!(listed.iter().any(|o| o.id == id), "{id} is listed once its call has returned");
            })
        });
        for call in futures_util::future::join_all(calls).await {
            call.unwrap();
        }
        assert_eq!(s.list_outputs(None, 100, None).await.unwrap().len(), 40);
        assert!(s.unrecorded.lock().unwrap().is_empty(), "nothing is left waiting");
    }
}
