//! The credits ledger. Every change of a balance is one ledger row with a
//! reason and an idempotency key, written in the same transaction as a
//! conditional update of `accounts.credits`, so:
//! - two concurrent debits can never spend the same credit (the update only
//!   succeeds while `credits >= n`, and the column has `CHECK (credits >= 0)`);
//! - replaying a debit, grant or refund with the same key changes nothing;
//! - `accounts.credits` always equals the sum of the account's ledger deltas.
//!
//! Each transaction starts with a write, so SQLite takes its write lock at
//! the first statement and concurrent writers queue on the busy timeout
//! instead of failing on a stale read snapshot.

use sqlx::{AnyConnection, Row};

use crate::clock::now_ms;
use crate::db::{is_foreign_key_violation, Db};
use crate::domain::{Credits, KeyId, OrgId};
use crate::{Error, Result};

/// Why a balance changed. Stored as text (`as_db`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Credits added by an operator or a purchase.
    Grant,
    /// A generation job of the given kind (`image`, `video`, ...).
    Generation(&'static str),
    /// One started minute of a connected call.
    CallMinute,
    /// Money returned for a failed operation.
    Refund,
}

impl Reason {
    pub fn as_db(self) -> String {
        match self {
            Reason::Grant => "grant".into(),
            Reason::Generation(kind) => format!("generate.{kind}"),
            Reason::CallMinute => "call.minute".into(),
            Reason::Refund => "refund".into(),
        }
    }
}

/// The API key a debit is made with. Its debits (net of their refunds) in
/// the current UTC day may not exceed its daily cap, when it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spender {
    pub key: KeyId,
    /// The key has a daily credit cap (checked in the debit's transaction).
    pub capped: bool,
}

const DAY_MS: i64 = 86_400_000;

/// A client- or system-chosen key that makes a ledger write happen once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 200;

    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(Error::bad_request(format!(
                "idempotency key must be 1-{} characters, got {}",
                Self::MAX_LEN,
                s.len()
            )));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::bad_request("idempotency key must be printable ASCII without spaces"));
        }
        Ok(IdempotencyKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn refund_key(&self) -> String {
        format!("refund:{}", self.0)
    }
}

/// The result of a debit that went through (now or on an earlier call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debit {
    pub amount: Credits,
    /// False when the key had already been applied and nothing changed.
    pub applied: bool,
}

/// The result of a refund request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refund {
    /// The debit's amount went back to the account now.
    Refunded(Credits),
    /// It had been refunded before; nothing changed.
    AlreadyRefunded(Credits),
    /// No debit with that key exists for the account.
    NoSuchDebit,
}

/// Takes `amount` from the account, or fails with `PaymentRequired` (or
/// 403 over the spender's daily cap) and changes nothing.
pub async fn debit(
    db: &Db,
    account: OrgId,
    amount: Credits,
    reason: Reason,
    reference: Option<&str>,
    key: &IdempotencyKey,
    spender: Option<Spender>,
) -> Result<Debit> {
    if amount == Credits::ZERO {
        return Err(Error::bad_request("a debit must be at least 1 credit"));
    }
    let n = amount.to_db()?;
    let mut tx = db.pool.begin().await?;
    match debit_in(&mut tx, account, amount, reason, reference, key, spender).await? {
        DebitIn::Applied => {
            tx.commit().await?;
            Ok(Debit { amount, applied: true })
        }
        DebitIn::Replayed => {
            tx.rollback().await?;
            replayed(db, account, key, -n).await.map(|amount| Debit { amount, applied: false })
        }
        DebitIn::Short => {
            tx.rollback().await?;
            let balance = balance(db, account).await?;
            Err(Error::PaymentRequired { needed: amount.get(), balance: balance.get() })
        }
        DebitIn::OverCap { cap, spent } => {
            tx.rollback().await?;
            Err(over_cap(cap, spent, amount))
        }
    }
}

/// What [`debit_in`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebitIn {
    Applied,
    /// The key was used before; nothing changed.
    Replayed,
    /// The balance is below the amount; the caller must roll back.
    Short,
    /// The spender's daily cap would be passed; the caller must roll back.
    OverCap { cap: u64, spent: u64 },
}

/// The 403 of [`DebitIn::OverCap`] for a debit of `amount`.
pub fn over_cap(cap: u64, spent: u64, amount: Credits) -> Error {
    Error::Forbidden(format!(
        "this API key's daily credit cap of {cap} credits would be passed: {spent} spent today (UTC), {amount} more needed"
    ))
}

/// [`debit`] inside the caller's transaction (which must be rolled back
/// unless this returns `Applied`).
pub async fn debit_in(
    conn: &mut AnyConnection,
    account: OrgId,
    amount: Credits,
    reason: Reason,
    reference: Option<&str>,
    key: &IdempotencyKey,
    spender: Option<Spender>,
) -> Result<DebitIn> {
    let n = amount.to_db()?;
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO ledger (id, account_id, delta, reason, reference, idempotency_key, created_at, key_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (account_id, idempotency_key) DO NOTHING",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(account.to_string())
    .bind(-n)
    .bind(reason.as_db())
    .bind(reference)
    .bind(key.as_str())
    .bind(now)
    .bind(spender.map(|s| s.key.to_string()))
    .execute(&mut *conn)
    .await
    .map_err(|e| if is_foreign_key_violation(&e) { Error::not_found("account") } else { e.into() })?
    .rows_affected();
    if inserted == 0 {
        return Ok(DebitIn::Replayed);
    }
    if let Some(spender) = spender.filter(|s| s.capped) {
        // The write to the key's row makes the capped debits of one key
        // count one at a time; the sum then includes this debit.
        let cap: Option<Option<i64>> =
            sqlx::query_scalar("UPDATE api_keys SET cap_lock = cap_lock + 1 WHERE id = $1 RETURNING daily_credit_cap")
                .bind(spender.key.to_string())
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(cap) = cap.flatten() {
            // The sum counts this debit already.
            let spent = spent_today(conn, spender.key, now).await?;
            if spent > cap {
                return Ok(DebitIn::OverCap { cap: cap.max(0) as u64, spent: (spent - n).max(0) as u64 });
            }
        }
    }
    let updated = sqlx::query(
        "UPDATE accounts SET credits = credits - $1 WHERE id = $2 AND credits >= $1 RETURNING credits",
    )
    .bind(n)
    .bind(account.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(if updated.is_some() { DebitIn::Applied } else { DebitIn::Short })
}

/// Adds `amount` to the account, once per key.
pub async fn grant(db: &Db, account: OrgId, amount: Credits, key: &IdempotencyKey) -> Result<Credits> {
    if amount == Credits::ZERO {
        return Err(Error::bad_request("a grant must be at least 1 credit"));
    }
    let n = amount.to_db()?;
    let mut tx = db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO ledger (id, account_id, delta, reason, reference, idempotency_key, created_at) \
         SELECT $1, id, $2, $3, NULL, $4, $5 FROM accounts WHERE id = $6 \
         ON CONFLICT (account_id, idempotency_key) DO NOTHING",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(n)
    .bind(Reason::Grant.as_db())
    .bind(key.as_str())
    .bind(now_ms())
    .bind(account.to_string())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        let updated = sqlx::query("UPDATE accounts SET credits = credits + $1 WHERE id = $2")
            .bind(n)
            .bind(account.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated != 1 {
            tx.rollback().await?;
            return Err(Error::not_found("account"));
        }
        tx.commit().await?;
    } else {
        tx.rollback().await?;
        // Either the key was used already or the account does not exist.
        replayed(db, account, key, n).await?;
    }
    balance(db, account).await
}

/// Returns the credits of the debit made with `debit_key`, once.
pub async fn refund(db: &Db, account: OrgId, debit_key: &IdempotencyKey) -> Result<Refund> {
    let mut tx = db.pool.begin().await?;
    if let Some(n) = refund_in(&mut tx, account, debit_key).await? {
        tx.commit().await?;
        return Ok(Refund::Refunded(n));
    }
    tx.rollback().await?;
    let previous: Option<i64> =
        sqlx::query_scalar("SELECT delta FROM ledger WHERE account_id = $1 AND idempotency_key = $2")
            .bind(account.to_string())
            .bind(debit_key.refund_key())
            .fetch_optional(&db.pool)
            .await?;
    match previous {
        Some(n) => Ok(Refund::AlreadyRefunded(Credits::from_db(n)?)),
        None => Ok(Refund::NoSuchDebit),
    }
}

/// [`refund`] inside the caller's transaction: the amount returned now, or
/// `None` when there is no such debit or it was refunded before.
pub async fn refund_in(conn: &mut AnyConnection, account: OrgId, debit_key: &IdempotencyKey) -> Result<Option<Credits>> {
    let row = sqlx::query(
        "INSERT INTO ledger (id, account_id, delta, reason, reference, idempotency_key, refund_of, created_at, key_id) \
         SELECT $1, account_id, -delta, $2, reference, $3, idempotency_key, $4, key_id FROM ledger \
         WHERE account_id = $5 AND idempotency_key = $6 AND delta < 0 \
         ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING delta",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(Reason::Refund.as_db())
    .bind(debit_key.refund_key())
    .bind(now_ms())
    .bind(account.to_string())
    .bind(debit_key.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let n: i64 = row.try_get(0)?;
    sqlx::query("UPDATE accounts SET credits = credits + $1 WHERE id = $2")
        .bind(n)
        .bind(account.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(Some(Credits::from_db(n)?))
}

/// What key `key` may still spend today (UTC) under its daily cap; `None`
/// when it has no cap.
pub async fn cap_headroom(db: &Db, key: KeyId) -> Result<Option<u64>> {
    let mut conn = db.pool.acquire().await?;
    cap_headroom_in(&mut conn, key).await
}

/// [`cap_headroom`] on the caller's connection (inside its transaction).
pub async fn cap_headroom_in(conn: &mut AnyConnection, key: KeyId) -> Result<Option<u64>> {
    let cap: Option<Option<i64>> = sqlx::query_scalar("SELECT daily_credit_cap FROM api_keys WHERE id = $1")
        .bind(key.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(cap) = cap.flatten() else { return Ok(None) };
    let spent = spent_today(conn, key, now_ms()).await?;
    Ok(Some((cap - spent).max(0) as u64))
}

/// Credits `key` spent since the start of the UTC day of `now`, net of refunds.
async fn spent_today(conn: &mut AnyConnection, key: KeyId, now: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(-delta), 0) AS BIGINT) FROM ledger WHERE key_id = $1 AND created_at >= $2",
    )
    .bind(key.to_string())
    .bind(now - now.rem_euclid(DAY_MS))
    .fetch_one(&mut *conn)
    .await?)
}

/// The account's current balance.
pub async fn balance(db: &Db, account: OrgId) -> Result<Credits> {
    let v: Option<i64> = sqlx::query_scalar("SELECT credits FROM accounts WHERE id = $1")
        .bind(account.to_string())
        .fetch_optional(&db.pool)
        .await?;
    Credits::from_db(v.ok_or_else(|| Error::not_found("account"))?)
}

/// The amount recorded under `key`, which must equal `expected_delta`: one
/// key names one operation, and reusing it for another amount is a client bug.
async fn replayed(db: &Db, account: OrgId, key: &IdempotencyKey, expected_delta: i64) -> Result<Credits> {
    let delta: Option<i64> =
        sqlx::query_scalar("SELECT delta FROM ledger WHERE account_id = $1 AND idempotency_key = $2")
            .bind(account.to_string())
            .bind(key.as_str())
            .fetch_optional(&db.pool)
            .await?;
    match delta {
        None => Err(Error::not_found("account")),
        Some(d) if d == expected_delta => Credits::from_db(d.abs()),
        Some(_) => Err(Error::bad_request(format!(
            "idempotency key '{}' was already used for a different operation",
            key.as_str()
        ))),
    }
}
