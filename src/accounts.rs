//! Accounts: who owns keys, credits and (later) agents, calls and jobs.

use serde::Serialize;
use sqlx::Row;

use crate::billing::{self, IdempotencyKey};
use crate::clock::{now_ms, rfc3339};
use crate::db::Db;
use crate::domain::{AccountId, Credits, Plan};
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub plan: Plan,
    pub credits: Credits,
    pub created_at: String,
}

/// Creates an account; its opening balance is a ledger grant like any other.
pub async fn create(db: &Db, name: &str, plan: Plan, credits: Credits) -> Result<Account> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::bad_request("name must be 1-100 characters"));
    }
    let id = AccountId::new();
    let now = now_ms();
    sqlx::query("INSERT INTO accounts (id, name, plan, credits, created_at) VALUES ($1, $2, $3, 0, $4)")
        .bind(id.to_string())
        .bind(name)
        .bind(plan.as_str())
        .bind(now)
        .execute(&db.pool)
        .await?;
    if credits > Credits::ZERO {
        let key = IdempotencyKey::parse(&format!("opening:{id}"))?;
        billing::grant(db, id, credits, &key).await?;
    }
    get(db, id).await
}

pub async fn get(db: &Db, id: AccountId) -> Result<Account> {
    let row = sqlx::query("SELECT id, name, plan, credits, created_at FROM accounts WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| Error::not_found("account"))?;
    from_row(&row)
}

pub async fn list(db: &Db) -> Result<Vec<Account>> {
    let rows = sqlx::query("SELECT id, name, plan, credits, created_at FROM accounts ORDER BY created_at, id")
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(from_row).collect()
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<Account> {
    let id: String = row.try_get("id")?;
    let plan: String = row.try_get("plan")?;
    Ok(Account {
        id: id.parse()?,
        name: row.try_get("name")?,
        plan: plan.parse()?,
        credits: Credits::from_db(row.try_get("credits")?)?,
        created_at: rfc3339(row.try_get("created_at")?),
    })
}
