//! The record of webhook deliveries an account can read: each delivery
//! with its payload, state and every attempt (time, HTTP status, error,
//! duration).

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use utoipa::ToSchema;

use crate::clock::rfc3339;
use crate::db::Db;
use crate::domain::{AccountId, Cursor};
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

/// A page of the account's deliveries, newest first.
pub async fn list(db: &Db, account: AccountId, limit: u32, cursor: Option<&Cursor>) -> Result<(Vec<Delivery>, Option<Cursor>)> {
    let mut sql = "SELECT id, event, payload, status, attempts, next_attempt_at, created_at, delivered_at FROM webhook_deliveries \
                   WHERE account_id = $1"
        .to_string();
    if cursor.is_some() {
        sql.push_str(" AND (created_at < $2 OR (created_at = $2 AND id < $3))");
    }
    sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT {}", limit + 1));
    let mut q = sqlx::query(&sql).bind(account.to_string());
    if let Some(c) = cursor {
        q = q.bind(c.created_at).bind(c.id.clone());
    }
    let rows = q.fetch_all(&db.pool).await?;
    let more = rows.len() > limit as usize;
    let mut page = Vec::new();
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        let id: String = row.try_get("id")?;
        let created_at: i64 = row.try_get("created_at")?;
        let status: String = row.try_get("status")?;
        let attempts = sqlx::query(
            "SELECT attempt, at, status, error, duration_ms FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt",
        )
        .bind(&id)
        .fetch_all(&db.pool)
        .await?
        .iter()
        .map(|a| {
            Ok(Attempt {
                attempt: a.try_get::<i64, _>("attempt")?.max(0) as u32,
                at: rfc3339(a.try_get("at")?),
                status: a.try_get::<Option<i64>, _>("status")?.map(|s| s.clamp(0, 999) as u16),
                error: a.try_get("error")?,
                duration_ms: a.try_get::<i64, _>("duration_ms")?.max(0) as u64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let payload: String = row.try_get("payload")?;
        last = Some(Cursor { created_at, id: id.clone() });
        page.push(Delivery {
            next_attempt_at: (status == "pending").then(|| row.try_get("next_attempt_at").map(rfc3339)).transpose()?,
            delivered_at: row.try_get::<Option<i64>, _>("delivered_at")?.map(rfc3339),
            created_at: rfc3339(created_at),
            event: row.try_get("event")?,
            attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
            payload: serde_json::from_str(&payload).unwrap_or(Value::String(payload)),
            attempt_log: attempts,
            status,
            id,
        });
    }
    Ok((page, if more { last } else { None }))
}
