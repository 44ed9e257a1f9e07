//! Account settings: the webhook URL (checked by the SSRF guard) and the
//! secret that signs webhook deliveries, shown once when it is generated.

use rand::distr::Alphanumeric;
use rand::Rng;
use sqlx::Row;

use crate::db::Db;
use crate::domain::OrgId;
use crate::net::ssrf::SsrfGuard;
use crate::{Error, Result};

/// A webhook signing secret. Not `Debug`: it must never reach a log line.
pub struct WebhookSecret(String);

impl WebhookSecret {
    fn generate() -> Self {
        let random: String = rand::rng().sample_iter(&Alphanumeric).take(40).map(char::from).collect();
        WebhookSecret(format!("whsec_{random}"))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

pub struct WebhookSettings {
    pub url: Option<String>,
    pub secret_set: bool,
}

pub async fn get(db: &Db, account: OrgId) -> Result<WebhookSettings> {
    let row = sqlx::query("SELECT webhook_url, webhook_secret FROM accounts WHERE id = $1")
        .bind(account.to_string())
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| Error::not_found("account"))?;
    Ok(WebhookSettings {
        url: row.try_get("webhook_url")?,
        secret_set: row.try_get::<Option<String>, _>("webhook_secret")?.is_some(),
    })
}

/// Sets the webhook URL. A secret is generated when the account has none
/// or when `rotate_secret` is asked for; only then is it returned.
pub async fn set_webhook(
    db: &Db,
    guard: &SsrfGuard,
    account: OrgId,
    raw_url: &str,
    rotate_secret: bool,
) -> Result<(String, Option<WebhookSecret>)> {
    let checked = guard.check_url("webhookUrl", raw_url).await?;
    let url = checked.url.to_string();
    let fresh = WebhookSecret::generate();
    // One statement decides whether the new secret is used, so two
    // concurrent first-time calls cannot both believe they set it.
    let row = sqlx::query(
        "UPDATE accounts SET webhook_url = $1, \
         webhook_secret = CASE WHEN $2 = 1 OR webhook_secret IS NULL THEN $3 ELSE webhook_secret END \
         WHERE id = $4 RETURNING webhook_secret",
    )
    .bind(&url)
    .bind(i32::from(rotate_secret))
    .bind(fresh.expose())
    .bind(account.to_string())
    .fetch_optional(&db.pool)
    .await?
    .ok_or_else(|| Error::not_found("account"))?;
    let stored: String = row.try_get(0)?;
    let shown = (stored == fresh.expose()).then_some(fresh);
    Ok((url, shown))
}
