//! `/api/keys`: list, create, revoke and rotate API keys (Enterprise plan,
//! `keys` scope). A key's secret appears only in the create and rotate
//! responses.

use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::json::{created, ok, ApiJson, Data};
use crate::auth::keys::{self, KeyInfo, KeySecret, NewKey};
use crate::auth::{Auth, KeyPolicy};
use crate::domain::{KeyId, Plan, Scope, Scopes};
use crate::error::ErrorBody;
use crate::state::AppState;
use crate::{Error, Result};

const FEATURE: &str = "API key management";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateKeyRequest {
    /// Display name, 1-100 characters.
    pub name: String,
    /// Scopes for the new key (default: the caller's own). A key can only
    /// grant scopes it holds.
    pub scopes: Option<Scopes>,
    /// The member of the organisation who will hold the key.
    pub member: Option<String>,
    /// Models the key may use (default: the caller's list, or all). Like
    /// the other limits, it must be within the caller's own.
    pub allowed_models: Option<Vec<String>>,
    /// Client networks (CIDRs) the key is accepted from.
    #[schema(value_type = Option<Vec<String>>)]
    pub ip_allowlist: Option<Vec<ipnet::IpNet>>,
    /// Credits the key may spend per UTC day.
    #[schema(value_type = Option<u64>)]
    pub daily_credit_cap: Option<crate::domain::Credits>,
}

/// A new key: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    pub id: String,
    /// The secret (`sk_live_...`). Store it now: it is not shown again.
    pub key: String,
    pub name: String,
    pub prefix: String,
    pub scopes: Scopes,
    pub member: Option<String>,
    #[serde(flatten)]
    pub policy: KeyPolicy,
    pub created_at: String,
    /// For a rotation: the id of the key this one replaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

fn created_key(info: KeyInfo, secret: KeySecret, replaces: Option<String>) -> CreatedKey {
    CreatedKey {
        id: info.id,
        key: secret.expose().to_owned(),
        name: info.name,
        prefix: info.prefix,
        scopes: info.scopes,
        member: info.member,
        policy: info.policy,
        created_at: info.created_at,
        replaces,
    }
}

fn key_id(raw: &str) -> Result<KeyId> {
    raw.parse().map_err(|_| Error::not_found("API key"))
}

/// List API keys (without secrets).
#[utoipa::path(get, path = "/api/keys", tag = "keys",
    responses((status = 200, body = Data<Vec<KeyInfo>>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list_keys(State(state): State<AppState>, Auth(auth): Auth) -> Result<Response> {
    auth.require(Scope::Keys)?;
    auth.require_plan(Plan::Enterprise, FEATURE)?;
    Ok(ok(keys::list(&state.db, auth.org).await?))
}

/// Create an API key. The secret is in this response only.
#[utoipa::path(post, path = "/api/keys", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 201, body = Data<CreatedKey>), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    Auth(auth): Auth,
    ApiJson(body): ApiJson<CreateKeyRequest>,
) -> Result<Response> {
    auth.require(Scope::Keys)?;
    auth.require_plan(Plan::Enterprise, FEATURE)?;
    let scopes = auth.scopes.grant(body.scopes, "create a key")?;
    let wanted = KeyPolicy {
        allowed_models: body.allowed_models,
        ip_allowlist: body.ip_allowlist,
        daily_credit_cap: body.daily_credit_cap,
    };
    let policy = auth.policy.narrow(wanted.validate()?)?;
    let new = NewKey { name: body.name, scopes, member: body.member, policy };
    let (info, secret) = keys::create(&state.db, auth.org, new).await?;
    tracing::info!(key_id = %info.id, prefix = %info.prefix, "API key created");
    Ok(created(created_key(info, secret, None)))
}

/// Show one API key (without its secret).
#[utoipa::path(get, path = "/api/keys/{id}", tag = "keys", params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = Data<KeyInfo>), (status = 404, body = ErrorBody)))]
pub async fn get_key(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Keys)?;
    auth.require_plan(Plan::Enterprise, FEATURE)?;
    Ok(ok(keys::get(&state.db, auth.org, key_id(&id)?).await?))
}

/// Revoke an API key. It stops working at once; revoking twice is harmless.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "keys", params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = Data<KeyInfo>), (status = 404, body = ErrorBody)))]
pub async fn revoke_key(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Keys)?;
    auth.require_plan(Plan::Enterprise, FEATURE)?;
    let info = keys::revoke(&state.db, auth.org, key_id(&id)?).await?;
    tracing::info!(key_id = %info.id, "API key revoked");
    Ok(ok(info))
}

/// Rotate an API key: a new key with the same name and scopes replaces it,
/// and the old one is revoked.
#[utoipa::path(post, path = "/api/keys/{id}/rotate", tag = "keys", params(("id" = String, Path, description = "Key id")),
    responses((status = 201, body = Data<CreatedKey>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn rotate_key(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Keys)?;
    auth.require_plan(Plan::Enterprise, FEATURE)?;
    let old = key_id(&id)?;
    let (info, secret) = keys::rotate(&state.db, auth.org, old).await?;
    tracing::info!(old_key_id = %old, key_id = %info.id, "API key rotated");
    Ok(created(created_key(info, secret, Some(old.to_string()))))
}
