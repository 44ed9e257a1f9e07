//! Organisations (stored as `accounts`): each owns its credits, its
//! members' API keys, agents, calls, jobs and webhooks. Nothing of one
//! organisation is reachable with another's key: every query of those
//! objects takes the caller's [`OrgId`].

use serde::Serialize;
use sqlx::Row;

use crate::billing::{self, IdempotencyKey};
use crate::clock::{now_ms, rfc3339};
use crate::db::Db;
use crate::domain::{OrgId, Credits, Plan};
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub plan: Plan,
    pub credits: Credits,
    pub created_at: String,
}

/// Creates an organisation; its opening balance is a ledger grant like any other.
pub async fn create(db: &Db, name: &str, plan: Plan, credits: Credits) -> Result<Org> {
    let name = crate::auth::keys::validate_name(name)?;
    let id = OrgId::new();
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

pub async fn get(db: &Db, id: OrgId) -> Result<Org> {
    let row = sqlx::query("SELECT id, name, plan, credits, created_at FROM accounts WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| Error::not_found("account"))?;
    from_row(&row)
}

pub async fn list(db: &Db) -> Result<Vec<Org>> {
    let rows = sqlx::query("SELECT id, name, plan, credits, created_at FROM accounts ORDER BY created_at, id")
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(from_row).collect()
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<Org> {
    let id: String = row.try_get("id")?;
    let plan: String = row.try_get("plan")?;
    Ok(Org {
        id: id.parse()?,
        name: row.try_get("name")?,
        plan: plan.parse()?,
        credits: Credits::from_db(row.try_get("credits")?)?,
        created_at: rfc3339(row.try_get("created_at")?),
    })
}
