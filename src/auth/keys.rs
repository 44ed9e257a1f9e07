//! API keys: `sk_live_` + 40 random base62 characters from a CSPRNG.
//!
//! Stored: the first 16 characters as a display/lookup prefix and the SHA-256
//! of the whole key. A presented key is found by its prefix and accepted only
//! if its hash matches in constant time. The secret exists in the create (or
//! rotate) response and nowhere else; it is never logged.

use rand::distr::Alphanumeric;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;

use super::context::AuthContext;
use super::policy::KeyPolicy;
use crate::clock::{now_ms, rfc3339};
use crate::db::{is_foreign_key_violation, is_unique_violation, Db};
use crate::domain::{KeyId, OrgId, Plan, Scopes};
use crate::{Error, Result};

pub const KEY_PREFIX: &str = "sk_live_";
const RANDOM_LEN: usize = 40;
const DISPLAY_LEN: usize = 16;

/// A freshly generated key secret. Not `Debug`, so it cannot end up in logs.
pub struct KeySecret(String);

impl KeySecret {
    fn generate() -> Self {
        // ThreadRng is a CSPRNG (ChaCha) seeded and periodically reseeded from the OS.
        let random: String = rand::rng().sample_iter(&Alphanumeric).take(RANDOM_LEN).map(char::from).collect();
        KeySecret(format!("{KEY_PREFIX}{random}"))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn prefix(&self) -> &str {
        &self.0[..DISPLAY_LEN]
    }
}

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Cheap shape check before any database work.
fn well_formed(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + RANDOM_LEN
        && key.starts_with(KEY_PREFIX)
        && key[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A key as listed: everything but the secret.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    pub scopes: Scopes,
    /// The member of the organisation who holds the key.
    pub member: Option<String>,
    /// The key's own limits (models, client networks, daily credits).
    #[serde(flatten)]
    pub policy: KeyPolicy,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    /// Set when the key was rotated: the id of its successor.
    pub replaced_by: Option<String>,
}

/// A key name: 1-100 characters after trimming.
pub fn validate_name(name: &str) -> Result<&str> {
    validate_text("name", name)
}

/// A display text (`field`): 1-100 characters after trimming, no control characters.
pub fn validate_text<'a>(field: &str, text: &'a str) -> Result<&'a str> {
    let text = text.trim();
    let n = text.chars().count();
    if n == 0 || n > 100 {
        return Err(Error::bad_request(format!("{field} must be 1-100 characters, got {n}")));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::bad_request(format!("{field} must not contain control characters")));
    }
    Ok(text)
}

/// What a new key is: its name, scopes, holder and limits.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub scopes: Scopes,
    pub member: Option<String>,
    pub policy: KeyPolicy,
}

impl NewKey {
    /// Checks the name, the member and the limits.
    pub fn validate(self) -> Result<NewKey> {
        let member = match self.member {
            Some(m) => Some(validate_text("member", &m)?.to_owned()),
            None => None,
        };
        Ok(NewKey { name: validate_name(&self.name)?.to_owned(), member, policy: self.policy.validate()?, ..self })
    }
}

/// Creates a key in `org`; returns its listing and the secret (shown once).
pub async fn create(db: &Db, org: OrgId, new: NewKey) -> Result<(KeyInfo, KeySecret)> {
    let new = new.validate()?;
    let mut tx = db.pool.begin().await?;
    let created = insert(&mut tx, org, &new).await?;
    tx.commit().await?;
    Ok(created)
}

async fn insert(tx: &mut sqlx::Transaction<'_, sqlx::Any>, account: OrgId, new: &NewKey) -> Result<(KeyInfo, KeySecret)> {
    let (models, nets, cap) = new.policy.to_db()?;
    // A prefix collision (1 in 62^8 per pair) is retried with a new key.
    for _ in 0..3 {
        let secret = KeySecret::generate();
        let id = KeyId::new();
        let now = now_ms();
        let result = sqlx::query(
            "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, scopes, created_at, member, \
             allowed_models, ip_allowlist, daily_credit_cap) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(id.to_string())
        .bind(account.to_string())
        .bind(&new.name)
        .bind(secret.prefix())
        .bind(hash(secret.expose()))
        .bind(new.scopes.to_db())
        .bind(now)
        .bind(new.member.as_deref())
        .bind(models.clone())
        .bind(nets.clone())
        .bind(cap)
        .execute(&mut **tx)
        .await;
        match result {
            Ok(_) => {
                let info = KeyInfo {
                    id: id.to_string(),
                    name: new.name.clone(),
                    prefix: secret.prefix().to_owned(),
                    scopes: new.scopes.clone(),
                    member: new.member.clone(),
                    policy: new.policy.clone(),
                    created_at: rfc3339(now),
                    last_used_at: None,
                    revoked_at: None,
                    replaced_by: None,
                };
                return Ok((info, secret));
            }
            Err(e) if is_unique_violation(&e) => continue,
            Err(e) if is_foreign_key_violation(&e) => {
                return Err(Error::not_found("account"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Internal(anyhow::anyhow!("could not generate a unique key prefix")))
}

const COLUMNS: &str = "id, name, prefix, scopes, member, allowed_models, ip_allowlist, daily_credit_cap, \
                       created_at, last_used_at, revoked_at, replaced_by";

pub async fn list(db: &Db, account: OrgId) -> Result<Vec<KeyInfo>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at DESC, id"
    ))
    .bind(account.to_string())
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(info_from_row).collect()
}

pub async fn get(db: &Db, account: OrgId, id: KeyId) -> Result<KeyInfo> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE account_id = $1 AND id = $2"))
        .bind(account.to_string())
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| Error::not_found("API key"))?;
    info_from_row(&row)
}

/// Revokes a key of the account. Revoking a revoked key changes nothing.
pub async fn revoke(db: &Db, account: OrgId, id: KeyId) -> Result<KeyInfo> {
    sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE account_id = $2 AND id = $3 AND revoked_at IS NULL")
        .bind(now_ms())
        .bind(account.to_string())
        .bind(id.to_string())
        .execute(&db.pool)
        .await?;
    get(db, account, id).await
}

/// Replaces a live key with a new one of the same name, scopes, holder and
/// limits, revoking the old one in the same transaction.
pub async fn rotate(db: &Db, account: OrgId, id: KeyId) -> Result<(KeyInfo, KeySecret)> {
    let mut tx = db.pool.begin().await?;
    let now = now_ms();
    // Revoke first: the write takes the lock and settles concurrent rotations.
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE account_id = $2 AND id = $3 AND revoked_at IS NULL \
         RETURNING name, scopes, member, allowed_models, ip_allowlist, daily_credit_cap",
    )
    .bind(now)
    .bind(account.to_string())
    .bind(id.to_string())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = revoked else {
        tx.rollback().await?;
        let existing = get(db, account, id).await?;
        return Err(Error::bad_request(format!("API key {} is revoked and cannot be rotated", existing.id)));
    };
    let new = NewKey {
        name: row.try_get("name")?,
        scopes: Scopes::from_db(&row.try_get::<String, _>("scopes")?)?,
        member: row.try_get("member")?,
        policy: policy_from_row(&row)?,
    };
    let (info, secret) = insert(&mut tx, account, &new).await?;
    sqlx::query("UPDATE api_keys SET replaced_by = $1 WHERE id = $2")
        .bind(&info.id)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((info, secret))
}

const AUTH_COLUMNS: &str = "k.id, k.account_id, k.key_hash, k.scopes, k.revoked_at, k.last_used_at, \
    k.allowed_models, k.ip_allowlist, k.daily_credit_cap, a.plan";

/// Turns a presented key into who is calling, or 401.
pub async fn authenticate(db: &Db, presented: &str) -> Result<AuthContext> {
    const INVALID: Error = Error::Unauthorized("Invalid API key");
    if !well_formed(presented) {
        return Err(INVALID);
    }
    let row = sqlx::query(&format!(
        "SELECT {AUTH_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.prefix = $1"
    ))
    .bind(&presented[..DISPLAY_LEN])
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Err(INVALID) };
    let stored: String = row.try_get("key_hash")?;
    if !bool::from(stored.as_bytes().ct_eq(hash(presented).as_bytes())) {
        return Err(INVALID);
    }
    if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
        return Err(Error::Unauthorized("API key has been revoked"));
    }
    context_from_row(&row)
}

/// Who is calling with an access token issued for key `id`: the key as it
/// is now (so revoking it ends its tokens at once), or 401.
pub async fn authenticate_token_key(db: &Db, id: KeyId) -> Result<AuthContext> {
    let row = sqlx::query(&format!(
        "SELECT {AUTH_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = $1"
    ))
    .bind(id.to_string())
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else { return Err(Error::Unauthorized("Invalid access token")) };
    if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
        return Err(Error::Unauthorized("the API key of this access token has been revoked"));
    }
    context_from_row(&row)
}

/// The key whose id is `id` when `presented` is its secret, for the token
/// exchange (app id + user key); 401 otherwise, the same for every cause.
pub async fn verify_pair(db: &Db, id: &str, presented: &str) -> Result<AuthContext> {
    const INVALID: Error = Error::Unauthorized("Invalid appId or userKey");
    let ctx = authenticate(db, presented).await.map_err(|e| match e {
        Error::Unauthorized(_) => INVALID,
        e => e,
    })?;
    if ctx.key_id.to_string() != id {
        return Err(INVALID);
    }
    Ok(ctx)
}

fn context_from_row(row: &sqlx::any::AnyRow) -> Result<AuthContext> {
    let key_id: String = row.try_get("id")?;
    let org: String = row.try_get("account_id")?;
    let plan: String = row.try_get("plan")?;
    Ok(AuthContext {
        key_id: key_id.parse()?,
        org: org.parse()?,
        plan: plan.parse::<Plan>()?,
        scopes: Scopes::from_db(&row.try_get::<String, _>("scopes")?)?,
        policy: policy_from_row(row)?,
        last_used_at: row.try_get("last_used_at")?,
        token_expires: None,
    })
}

fn policy_from_row(row: &sqlx::any::AnyRow) -> Result<KeyPolicy> {
    KeyPolicy::from_db(row.try_get("allowed_models")?, row.try_get("ip_allowlist")?, row.try_get("daily_credit_cap")?)
}

fn info_from_row(row: &sqlx::any::AnyRow) -> Result<KeyInfo> {
    Ok(KeyInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        scopes: Scopes::from_db(&row.try_get::<String, _>("scopes")?)?,
        member: row.try_get("member")?,
        policy: policy_from_row(row)?,
        created_at: rfc3339(row.try_get("created_at")?),
        last_used_at: row.try_get::<Option<i64>, _>("last_used_at")?.map(rfc3339),
        revoked_at: row.try_get::<Option<i64>, _>("revoked_at")?.map(rfc3339),
        replaced_by: row.try_get("replaced_by")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = KeySecret::generate();
        let b = KeySecret::generate();
        assert!(well_formed(a.expose()));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.prefix().len(), 16);
        assert!(a.expose().starts_with(a.prefix()));
    }

    #[test]
    fn malformed_keys_are_rejected_before_lookup() {
        assert!(!well_formed("sk_live_short"));
        assert!(!well_formed(&format!("sk_test_{}", "a".repeat(40))));
        assert!(!well_formed(&format!("sk_live_{}!", "a".repeat(39))));
        assert!(!well_formed(&format!("sk_live_{}é", "a".repeat(38))));
    }
}
