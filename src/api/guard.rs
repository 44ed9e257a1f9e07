//! The API guard: authenticates the key (or an access token issued for
//! one), checks the key's client networks, applies the per-key rate limit
//! of the request's class, and stamps the `X-RateLimit-*` headers on
//! whatever the handler answers. Handlers behind it read the caller with
//! `Auth`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{keys, presented_key, tokens, AuthContext};
use crate::clock::now_ms;
use crate::limits::RateClass;
use crate::net::client_ip;
use crate::state::AppState;
use crate::{Error, Result};

/// Who is calling, from the request's credential and address.
pub async fn authenticate(state: &AppState, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<AuthContext> {
    let presented = presented_key(headers)?;
    let ctx = if tokens::is_token(presented) {
        let claims = tokens::verify(&state.jobs.storage, presented, now_ms() / 1000)?;
        let mut ctx = keys::authenticate_token_key(&state.db, claims.kid).await?;
        if ctx.org != claims.org || !ctx.scopes.covers(&claims.scopes) {
            return Err(Error::Unauthorized("Invalid access token"));
        }
        ctx.scopes = claims.scopes;
        ctx.token_expires = Some(claims.exp);
        ctx
    } else {
        keys::authenticate(&state.db, presented).await?
    };
    check_client(state, &ctx, peer, headers)?;
    Ok(ctx)
}

/// 403 unless the key is accepted from the request's client address
/// (found behind the configured load balancers).
pub fn check_client(state: &AppState, ctx: &AuthContext, peer: Option<IpAddr>, headers: &HeaderMap) -> Result<()> {
    if ctx.policy.ip_allowlist.is_none() {
        return Ok(());
    }
    let peer =
        peer.ok_or_else(|| Error::Forbidden("the client's address is unknown, so the key's ipAllowlist cannot be checked".into()))?;
    ctx.policy.require_ip(client_ip(peer, headers, &state.config.trusted_proxies))
}

pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let (parts, body) = request.into_parts();
    let ctx = authenticate(&state, &parts.headers, peer).await;
    let mut request = Request::from_parts(parts, body);
    let ctx = match ctx {
        Ok(ctx) => ctx,
        Err(e) => return e.into_response(),
    };
    let class = RateClass::of(request.method(), request.uri().path());
    let decision = state.limiter.check(class, ctx.key_id);
    if let Some(retry_after_secs) = decision.retry_after {
        let mut response = Error::RateLimited { retry_after_secs }.into_response();
        decision.write_headers(response.headers_mut());
        return response;
    }
    state.key_usage.mark(ctx.key_id, ctx.last_used_at);
    tracing::Span::current().record("org_id", tracing::field::display(ctx.org));
    request.extensions_mut().insert(ctx);
    let mut response = next.run(request).await;
    // A handler that answers for a quota of its own (the hourly call
    // quota) has set the headers already.
    if !response.headers().contains_key("x-ratelimit-limit") {
        decision.write_headers(response.headers_mut());
    }
    response
}
