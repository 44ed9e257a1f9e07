//! The record of webhook deliveries an account can read: each delivery
//! with its payload, state and every attempt (time, HTTP status, error,
//! duration).

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use utoipa::ToSchema;

use crate::clock::rfc3339;
use crate::db::Db;
use crate::domain::{page, OrgId, Cursor};
use crate::Result;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub event: String,
    /// pending | delivered | failed
    pub status: String,
    pub attempts: u32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub created_at: String,
    /// The body that is sent (the same bytes on every attempt).
    #[schema(value_type = Object)]
    pub payload: Value,
    pub attempt_log: Vec<Attempt>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub attempt: u32,
    pub at: String,
    /// The endpoint's HTTP status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A page of the account's deliveries, newest first, with their attempts
/// (read in one query for the whole page).
pub async fn list(db: &Db, account: OrgId, limit: u32, cursor: Option<&Cursor>) -> Result<(Vec<Delivery>, Option<Cursor>)> {
    let sql = format!(
        "SELECT id, event, payload, status, attempts, next_attempt_at, created_at, delivered_at FROM webhook_deliveries \
         WHERE account_id = $1{}",
        Cursor::sql_page(cursor, 1, limit)
    );
    let mut q = sqlx::query(&sql).bind(account.to_string());
    if let Some(c) = cursor {
        q = q.bind(c.created_at).bind(c.id.clone());
    }
    let rows = q.fetch_all(&db.pool).await?;
    let (mut deliveries, next) = page(&rows, limit, |row| {
        let id: String = row.try_get("id")?;
        let created_at: i64 = row.try_get("created_at")?;
        let status: String = row.try_get("status")?;
        let payload: String = row.try_get("payload")?;
        let delivery = Delivery {
            next_attempt_at: (status == "pending").then(|| row.try_get("next_attempt_at").map(rfc3339)).transpose()?,
            delivered_at: row.try_get::<Option<i64>, _>("delivered_at")?.map(rfc3339),
            created_at: rfc3339(created_at),
            event: row.try_get("event")?,
            attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
            payload: serde_json::from_str(&payload).unwrap_or(Value::String(payload)),
            attempt_log: Vec::new(),
            status,
            id: id.clone(),
        };
        Ok((delivery, Cursor { created_at, id }))
    })?;
    if deliveries.is_empty() {
        return Ok((deliveries, next));
    }
    let placeholders: Vec<String> = (1..=deliveries.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT delivery_id, attempt, at, status, error, duration_ms FROM webhook_attempts \
         WHERE delivery_id IN ({}) ORDER BY attempt",
        placeholders.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for d in &deliveries {
        q = q.bind(d.id.clone());
    }
    for a in q.fetch_all(&db.pool).await? {
        let delivery_id: String = a.try_get("delivery_id")?;
        let attempt = Attempt {
            attempt: a.try_get::<i64, _>("attempt")?.max(0) as u32,
            at: rfc3339(a.try_get("at")?),
            status: a.try_get::<Option<i64>, _>("status")?.map(|s| s.clamp(0, 999) as u16),
            error: a.try_get("error")?,
            duration_ms: a.try_get::<i64, _>("duration_ms")?.max(0) as u64,
        };
        if let Some(d) = deliveries.iter_mut().find(|d| d.id == delivery_id) {
            d.attempt_log.push(attempt);
        }
    }
    Ok((deliveries, next))
}
