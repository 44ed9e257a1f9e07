//! The durable job queue, in the `jobs` table.
//!
//! - [`submit`] debits the cost and inserts the job in one transaction: a
//!   job exists if and only if it was paid for.
//! - [`claim`] takes the oldest due job with a lease (`locked_by`,
//!   `locked_until`): on PostgreSQL with `FOR UPDATE SKIP LOCKED`, on
//!   SQLite as one `UPDATE` under the single writer. A job whose lease ran
//!   out (its worker died) is due again.
//! - [`heartbeat`] extends the lease; every later write by the worker is
//!   conditional on still holding it, so a job taken over by another worker
//!   is finished by exactly one of them.
//! - [`complete`] and [`fail`] end a job and queue its webhook in the same
//!   transaction; [`fail`] refunds with the debit's key (once, ever).

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::channels::Submitted;
use super::spec::NewJob;
use super::{JobKind, JobStatus, FAILED_MESSAGE};
use crate::billing::ledger::{self, DebitIn, IdempotencyKey, Reason, Spender};
use crate::clock::{now_ms, rfc3339};
use crate::db::{Backend, Db};
use crate::domain::{page, OrgId, Credits, Cursor};
use crate::webhooks::{self, Webhooks};
use crate::{Error, Result};

/// Which API created the job (and so how it is shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Api,
    V1,
}

impl Source {
    fn as_db(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::V1 => "v1",
        }
    }
}

/// One job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub account_id: String,
    pub kind: JobKind,
    pub model: String,
    pub source: Source,
    pub status: JobStatus,
    pub input: Value,
    pub cost: Credits,
    pub progress: u8,
    /// Storage keys of the outputs, the main one first.
    pub outputs: Vec<String>,
    pub output_type: Option<String>,
    pub metadata: Value,
    pub error: Option<String>,
    pub credits_refunded: Credits,
    pub attempts: u32,
    pub max_attempts: u32,
    pub upstream: Option<Submitted>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "id, account_id, kind, model, source, status, input, cost, progress, output_key, output_type, metadata, \
    error, credits_refunded, attempts, max_attempts, upstream, created_at, started_at, finished_at";

fn json_col(row: &AnyRow, col: &str) -> Result<Option<Value>> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| Error::Internal(anyhow::anyhow!("jobs.{col} is not JSON: {e}")))).transpose()
}

fn from_row(row: &AnyRow) -> Result<Job> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    let source: String = row.try_get("source")?;
    let outputs = match json_col(row, "output_key")? {
        Some(v) => serde_json::from_value(v).map_err(|e| Error::Internal(e.into()))?,
        None => Vec::new(),
    };
    let upstream = match json_col(row, "upstream")? {
        Some(v) => Some(serde_json::from_value(v).map_err(|e| Error::Internal(e.into()))?),
        None => None,
    };
    Ok(Job {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        kind: kind.parse()?,
        model: row.try_get("model")?,
        source: if source == "v1" { Source::V1 } else { Source::Api },
        status: status.parse()?,
        input: json_col(row, "input")?.unwrap_or(Value::Null),
        cost: Credits::from_db(row.try_get("cost")?)?,
        progress: row.try_get::<i64, _>("progress")?.clamp(0, 100) as u8,
        outputs,
        output_type: row.try_get("output_type")?,
        metadata: json_col(row, "metadata")?.unwrap_or_else(|| Value::Object(Default::default())),
        error: row.try_get("error")?,
        credits_refunded: Credits::from_db(row.try_get("credits_refunded")?)?,
        attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")?.max(0) as u32,
        upstream,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// The ledger key of a job's debit (and, derived from it, of its refund).
pub fn debit_key(job_id: &str) -> Result<IdempotencyKey> {
    IdempotencyKey::parse(&format!("job:{job_id}"))
}

/// Charges the job's cost (to `spender`'s daily cap too) and queues it, or
/// fails with 402 (403 over the cap) and changes nothing.
pub async fn submit(
    db: &Db,
    account: OrgId,
    spender: Spender,
    new: &NewJob,
    source: Source,
    max_attempts: u32,
) -> Result<Job> {
    let id = uuid::Uuid::new_v4().to_string();
    let key = debit_key(&id)?;
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    match ledger::debit_in(&mut tx, account, new.cost, Reason::Generation(new.kind.as_str()), Some(&id), &key, Some(spender)).await? {
        DebitIn::Applied => {}
        DebitIn::OverCap { cap, spent } => {
            tx.rollback().await?;
            return Err(ledger::over_cap(cap, spent, new.cost));
        }
        DebitIn::Short => {
            tx.rollback().await?;
            let balance = ledger::balance(db, account).await?;
            return Err(Error::PaymentRequired { needed: new.cost.get(), balance: balance.get() });
        }
        DebitIn::Replayed => {
            tx.rollback().await?;
            return Err(Error::Internal(anyhow::anyhow!("a fresh job id collided in the ledger")));
        }
    }
    let row = sqlx::query(&format!(
        "INSERT INTO jobs (id, account_id, kind, model, source, status, input, cost, max_attempts, run_after, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, $9, $9) RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(account.to_string())
    .bind(new.kind.as_str())
    .bind(&new.model)
    .bind(source.as_db())
    .bind(new.input.to_string())
    .bind(new.cost.to_db()?)
    .bind(i64::from(max_attempts.max(1)))
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let job = from_row(&row)?;
    tx.commit().await?;
    Ok(job)
}

/// One of the account's jobs.
pub async fn get(db: &Db, account: OrgId, id: &str) -> Result<Job> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(Error::not_found("job"));
    }
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 AND account_id = $2"))
        .bind(id)
        .bind(account.to_string())
        .fetch_optional(&db.pool)
        .await?;
    from_row(&row.ok_or_else(|| Error::not_found("job"))?)
}

/// Filters of the job list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// A page of the account's jobs, newest first, and the cursor of the next.
pub async fn list(db: &Db, account: OrgId, f: &JobFilter) -> Result<(Vec<Job>, Option<Cursor>)> {
    let mut sql = format!("SELECT {COLUMNS} FROM jobs WHERE account_id = $1");
    let mut n = 1;
    for (present, column) in [(f.status.is_some(), "status"), (f.kind.is_some(), "kind")] {
        if present {
            n += 1;
            sql.push_str(&format!(" AND {column} = ${n}"));
        }
    }
    sql.push_str(&Cursor::sql_page(f.cursor.as_ref(), n, f.limit));
    let mut q = sqlx::query(&sql).bind(account.to_string());
    if let Some(s) = f.status {
        q = q.bind(s.as_str());
    }
    if let Some(k) = f.kind {
        q = q.bind(k.as_str());
    }
    if let Some(c) = &f.cursor {
        q = q.bind(c.created_at).bind(c.id.clone());
    }
    let rows = q.fetch_all(&db.pool).await?;
    page(&rows, f.limit, |row| {
        let job = from_row(row)?;
        let cursor = Cursor { created_at: job.created_at, id: job.id.clone() };
        Ok((job, cursor))
    })
}

/// Takes the oldest due job (queued, or processing with an expired lease)
/// for `node` until `now + lease_ms`.
pub async fn claim(db: &Db, node: &str, lease_ms: i64) -> Result<Option<Job>> {
    let now = now_ms();
    let lock = match db.backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let sql = format!(
        "UPDATE jobs SET status = 'processing', locked_by = $1, locked_until = $2, attempts = attempts + 1, \
         started_at = COALESCE(started_at, $3) \
         WHERE id = (SELECT id FROM jobs WHERE (status = 'queued' AND run_after <= $3) \
                     OR (status = 'processing' AND locked_until < $3) ORDER BY run_after, created_at LIMIT 1{lock}) \
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql).bind(node).bind(now + lease_ms).bind(now).fetch_optional(&db.pool).await?;
    row.as_ref().map(from_row).transpose()
}

/// Extends `node`'s lease; false when the lease is lost (the job was taken
/// over or ended), and the worker must stop.
pub async fn heartbeat(db: &Db, id: &str, node: &str, lease_ms: i64, progress: Option<u8>) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE jobs SET locked_until = $1, progress = COALESCE($2, progress) \
         WHERE id = $3 AND status = 'processing' AND locked_by = $4",
    )
    .bind(now_ms() + lease_ms)
    .bind(progress.map(i64::from))
    .bind(id)
    .bind(node)
    .execute(&db.pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Records the upstream task the job was submitted as.
pub async fn set_upstream(db: &Db, id: &str, node: &str, upstream: &Submitted) -> Result<bool> {
    let text = serde_json::to_string(upstream).map_err(|e| Error::Internal(e.into()))?;
    let n = sqlx::query("UPDATE jobs SET upstream = $1 WHERE id = $2 AND status = 'processing' AND locked_by = $3")
        .bind(text)
        .bind(id)
        .bind(node)
        .execute(&db.pool)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Puts the job back in the queue to run after `delay_ms`: a retryable
/// failure with attempts left, or (`spend_attempt` false) a job this process
/// gives back because it is stopping, which must not cost the job a run.
pub async fn requeue(db: &Db, id: &str, node: &str, delay_ms: i64, spend_attempt: bool) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE jobs SET status = 'queued', run_after = $1, attempts = attempts - $2, locked_by = NULL, locked_until = NULL \
         WHERE id = $3 AND status = 'processing' AND locked_by = $4",
    )
    .bind(now_ms() + delay_ms)
    .bind(i64::from(!spend_attempt))
    .bind(id)
    .bind(node)
    .execute(&db.pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Puts back in the queue every job leased by `node`, which died: they run
/// again at once elsewhere (the lost run counts as an attempt, so a job
/// that kills its workers does not loop forever). Returns how many.
pub async fn requeue_node(db: &Db, node: &str) -> Result<u64> {
    let now = now_ms();
    Ok(sqlx::query(
        "UPDATE jobs SET status = 'queued', run_after = $1, locked_by = NULL, locked_until = NULL \
         WHERE status = 'processing' AND locked_by = $2",
    )
    .bind(now)
    .bind(node)
    .execute(&db.pool)
    .await?
    .rows_affected())
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct Finished {
    pub outputs: Vec<String>,
    pub output_type: String,
    pub metadata: Value,
    /// The signed URL of the main output, for the webhook.
    pub output_url: Option<String>,
}

/// Ends the job as completed and queues `job.completed`. False when
/// `node` no longer holds it (nothing changed).
pub async fn complete(db: &Db, hooks: &Webhooks, job: &Job, node: &str, done: Finished) -> Result<bool> {
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    let n = sqlx::query(
        "UPDATE jobs SET status = 'completed', progress = 100, output_key = $1, output_type = $2, metadata = $3, \
         finished_at = $4, locked_by = NULL, locked_until = NULL WHERE id = $5 AND status = 'processing' AND locked_by = $6",
    )
    .bind(serde_json::to_string(&done.outputs).map_err(|e| Error::Internal(e.into()))?)
    .bind(&done.output_type)
    .bind(done.metadata.to_string())
    .bind(now)
    .bind(&job.id)
    .bind(node)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    let data = serde_json::json!({
        "jobId": job.id,
        "type": job.kind,
        "status": "completed",
        "outputUrl": done.output_url,
        "outputType": done.output_type,
        "metadata": done.metadata,
        "createdAt": rfc3339(job.created_at),
        "completedAt": rfc3339(now),
    });
    announce(tx, hooks, job.account_id.parse()?, "job.completed", data).await?;
    Ok(true)
}

/// Queues the webhook of a job's end in the transaction that ends it, and
/// commits.
async fn announce(mut tx: sqlx::Transaction<'_, sqlx::Any>, hooks: &Webhooks, account: OrgId, event: &str, data: Value) -> Result<()> {
    let queued = webhooks::enqueue_in(&mut tx, account, event, data).await?;
    tx.commit().await?;
    if queued {
        hooks.notify();
    }
    Ok(())
}

/// Ends the job as failed, refunds its cost (once: the ledger key is the
/// debit's) and queues `job.failed`. False when `node` no longer holds it
/// (nothing changed).
pub async fn fail(db: &Db, hooks: &Webhooks, job: &Job, node: &str) -> Result<bool> {
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    let n = sqlx::query(
        "UPDATE jobs SET status = 'failed', error = $1, finished_at = $2, locked_by = NULL, locked_until = NULL \
         WHERE id = $3 AND status = 'processing' AND locked_by = $4",
    )
    .bind(FAILED_MESSAGE)
    .bind(now)
    .bind(&job.id)
    .bind(node)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    let account: OrgId = job.account_id.parse()?;
    let refunded = ledger::refund_in(&mut tx, account, &debit_key(&job.id)?).await?.unwrap_or(Credits::ZERO);
    sqlx::query("UPDATE jobs SET credits_refunded = $1 WHERE id = $2")
        .bind(refunded.to_db()?)
        .bind(&job.id)
        .execute(&mut *tx)
        .await?;
    let data = serde_json::json!({
        "jobId": job.id,
        "type": job.kind,
        "status": "failed",
        "error": FAILED_MESSAGE,
        "creditsRefunded": refunded.get(),
        "createdAt": rfc3339(job.created_at),
        "failedAt": rfc3339(now),
    });
    announce(tx, hooks, account, "job.failed", data).await?;
    Ok(true)
}
