//! `POST /api/auth/token`: the token exchange (seed 004). An app id (a
//! key's id) and user key (its secret) buy an access token for
//! `Authorization: Bearer`, valid 24 hours unless asked shorter, carrying
//! the organisation and (a subset of) the key's scopes. The key's IP
//! allowlist applies to the exchange too; revoking the key ends its tokens.
//!
//! `GET /api/org`: the organisation the caller's key belongs to.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::Extension;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::guard::check_client;
use super::json::{ok, ApiJson, Data};
use crate::auth::tokens::{self, Claims, MAX_TTL_SECS, MIN_TTL_SECS};
use crate::auth::{keys, Auth};
use crate::clock::{now_ms, rfc3339};
use crate::domain::{Credits, Plan, Scopes};
use crate::error::ErrorBody;
use crate::state::AppState;
use crate::{Error, Result};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenRequest {
    /// The API key's id (shown with the key when it was created).
    pub app_id: String,
    /// The API key itself (`sk_live_...`).
    pub user_key: String,
    /// Scopes for the token, within the key's (default: the key's).
    pub scopes: Option<Scopes>,
    /// Seconds the token lives, 60-86400 (default 86400).
    pub expires_in: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessToken {
    /// Send as `Authorization: Bearer <accessToken>`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    pub expires_in: u64,
    pub expires_at: String,
    pub scopes: Scopes,
    pub org_id: String,
}

/// Exchange an app id and user key for a short-lived access token.
#[utoipa::path(post, path = "/api/auth/token", tag = "auth", request_body = TokenRequest, security(()),
    responses((status = 200, body = Data<AccessToken>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn exchange(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Response> {
    let ttl = req.expires_in.unwrap_or(MAX_TTL_SECS);
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl) {
        return Err(Error::bad_request(format!("expiresIn must be {MIN_TTL_SECS}-{MAX_TTL_SECS} seconds (got {ttl})")));
    }
    let ctx = keys::verify_pair(&state.db, &req.app_id, &req.user_key).await?;
    check_client(&state, &ctx, peer.map(|Extension(c)| c.0.ip()), &headers)?;
    let scopes = ctx.scopes.grant(req.scopes, "issue a token")?;
    let now = now_ms() / 1000;
    let claims = Claims { kid: ctx.key_id, org: ctx.org, scopes, iat: now, exp: now + ttl as i64 };
    let access_token = tokens::issue(&state.jobs.storage, &claims)?;
    tracing::info!(key_id = %ctx.key_id, org_id = %ctx.org, expires_in = ttl, "access token issued");
    Ok(ok(AccessToken {
        access_token,
        token_type: "Bearer".into(),
        expires_in: ttl,
        expires_at: rfc3339(claims.exp * 1000),
        scopes: claims.scopes,
        org_id: ctx.org.to_string(),
    }))
}

/// The caller's organisation.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrgView {
    pub id: String,
    pub name: String,
    pub plan: Plan,
    #[schema(value_type = u64)]
    pub credits: Credits,
    pub created_at: String,
    /// The calling key's id and holder.
    pub key_id: String,
    /// Set when the caller used an access token: when it expires.
    pub token_expires_at: Option<String>,
}

/// The organisation of the calling key (any scope).
#[utoipa::path(get, path = "/api/org", tag = "auth",
    responses((status = 200, body = Data<OrgView>), (status = 401, body = ErrorBody)))]
pub async fn get_org(State(state): State<AppState>, Auth(auth): Auth) -> Result<Response> {
    let org = crate::orgs::get(&state.db, auth.org).await?;
    Ok(ok(OrgView {
        id: org.id.to_string(),
        name: org.name,
        plan: org.plan,
        credits: org.credits,
        created_at: org.created_at,
        key_id: auth.key_id.to_string(),
        token_expires_at: auth.token_expires.map(|e| rfc3339(e * 1000)),
    }))
}
