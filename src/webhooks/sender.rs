//! The webhook sender: claims due deliveries, POSTs them through the SSRF
//! guard, and schedules retries (the contract: up to 3, after 10 s, 60 s and
//! 300 s; a delivery fails after the last one). Claims are leases written
//! with a conditional update, so several processes sharing one database
//! never send the same attempt twice.

use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::{signature, Webhooks};
use crate::clock::now_ms;
use crate::config::WebhooksConfig;
use crate::db::Db;
use crate::net::ssrf::SsrfGuard;

const BATCH: i64 = 32;

struct Due {
    id: String,
    account_id: String,
    event: String,
    payload: String,
    attempts: i64,
}

/// Runs until `shutdown`.
pub async fn run(webhooks: Webhooks, config: WebhooksConfig, ssrf: SsrfGuard, shutdown: CancellationToken) {
    let client = match ssrf.client(Duration::from_secs(config.timeout_secs)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client could not be built; webhooks are not sent");
            return;
        }
    };
    let wake = webhooks.wake();
    let db = webhooks.db.clone();
    let poll = Duration::from_millis(config.poll_interval_ms);
    loop {
        match claim(&db, &config).await {
            Ok(batch) => {
                for due in batch {
                    tokio::spawn(deliver(db.clone(), client.clone(), ssrf.clone(), config.clone(), due));
                }
            }
            Err(e) => tracing::warn!(error = %e, "webhook queue unavailable"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

async fn claim(db: &Db, config: &WebhooksConfig) -> crate::Result<Vec<Due>> {
    let now = now_ms();
    let rows = sqlx::query(
        "SELECT id, account_id, event, payload, attempts, next_attempt_at FROM webhook_deliveries \
         WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2",
    )
    .bind(now)
    .bind(BATCH)
    .fetch_all(&db.pool)
    .await?;
    // The lease outlasts one attempt; a process that dies mid-attempt
    // leaves the delivery to be picked up again when it expires.
    let lease_until = now + (config.timeout_secs as i64 + 30) * 1000;
    let mut claimed = Vec::new();
    for row in rows {
        let id: String = row.try_get("id")?;
        let seen: i64 = row.try_get("next_attempt_at")?;
        let won = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE id = $2 AND status = 'pending' AND next_attempt_at = $3",
        )
        .bind(lease_until)
        .bind(&id)
        .bind(seen)
        .execute(&db.pool)
        .await?
        .rows_affected()
            == 1;
        if won {
            claimed.push(Due {
                id,
                account_id: row.try_get("account_id")?,
                event: row.try_get("event")?,
                payload: row.try_get("payload")?,
                attempts: row.try_get("attempts")?,
            });
        }
    }
    Ok(claimed)
}

async fn deliver(db: Db, client: reqwest::Client, ssrf: SsrfGuard, config: WebhooksConfig, due: Due) {
    let started_at = now_ms();
    let clock = std::time::Instant::now();
    let outcome = attempt(&db, &client, &ssrf, &due).await;
    let duration_ms = clock.elapsed().as_millis() as i64;
    let attempts = due.attempts + 1;
    let now = now_ms();
    let (last_status, last_error) = match &outcome {
        Ok(status) => (Some(*status), None),
        Err((status, error)) => (*status, Some(error.clone())),
    };
    let (state, next) = match &outcome {
        Ok(status) => {
            tracing::info!(delivery = %due.id, event = %due.event, status, "webhook delivered");
            ("delivered", now)
        }
        Err((_, error)) => {
            let retry = config.retry_delays_secs.get((attempts - 1) as usize).copied();
            tracing::warn!(delivery = %due.id, event = %due.event, attempts, error = %error, retry_in_secs = ?retry, "webhook delivery failed");
            match retry {
                Some(secs) => ("pending", now + secs as i64 * 1000),
                None => ("failed", now),
            }
        }
    };
    let result = async {
        let mut tx = db.pool.begin().await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = $3, last_status = $4, \
             last_error = $5, delivered_at = $6 WHERE id = $7",
        )
        .bind(state)
        .bind(attempts)
        .bind(next)
        .bind(last_status.map(i64::from))
        .bind(&last_error)
        .bind((state == "delivered").then_some(now))
        .bind(&due.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (delivery_id, attempt) DO NOTHING",
        )
        .bind(&due.id)
        .bind(attempts)
        .bind(started_at)
        .bind(last_status.map(i64::from))
        .bind(&last_error)
        .bind(duration_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(delivery = %due.id, error = %e, "webhook delivery state not saved; it will be retried when its lease ends");
    }
}

/// One POST. The URL and secret are read now, so a changed URL applies to
/// retries, and the URL is checked again (DNS may have changed).
async fn attempt(db: &Db, client: &reqwest::Client, ssrf: &SsrfGuard, due: &Due) -> Result<u16, (Option<u16>, String)> {
    let row = sqlx::query("SELECT webhook_url, webhook_secret FROM accounts WHERE id = $1")
        .bind(&due.account_id)
        .fetch_optional(&db.pool)
        .await
        .map_err(|e| (None, format!("database: {e}")))?;
    let (url, secret): (Option<String>, Option<String>) = match row {
        Some(r) => (r.try_get(0).ok().flatten(), r.try_get(1).ok().flatten()),
        None => (None, None),
    };
    let (Some(url), Some(secret)) = (url, secret) else {
        return Err((None, "the account has no webhook URL any more".into()));
    };
    let checked = ssrf.check_url("webhookUrl", &url).await.map_err(|e| (None, e.to_string()))?;
    let timestamp = now_ms() / 1000;
    let response = client
        .post(checked.url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("voxgate-webhooks/", env!("CARGO_PKG_VERSION")))
        .header("x-webhook-id", &due.id)
        .header("x-webhook-event", &due.event)
        .header("x-webhook-signature", signature(&secret, timestamp, &due.payload))
        .body(due.payload.clone())
        .send()
        .await
        .map_err(|e| (None, format!("request failed: {}", without_url(&e))))?;
    let status = response.status().as_u16();
    if response.status().is_success() {
        Ok(status)
    } else {
        Err((Some(status), format!("endpoint answered {status}")))
    }
}

/// reqwest's error text without the URL (which may carry a token in its query).
fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), "<webhook url>");
    }
    msg
}
