//! The API guard: authenticates the key, applies the per-key rate limit of
//! the request's class, and stamps the `X-RateLimit-*` headers on whatever
//! the handler answers. Handlers behind it read the caller with `Auth`.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{keys, presented_key};
use crate::limits::RateClass;
use crate::state::AppState;
use crate::Error;

pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let ctx = match presented_key(request.headers()) {
        Ok(key) => keys::authenticate(&state.db, key).await,
        Err(e) => Err(e),
    };
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
    tracing::Span::current().record("account_id", tracing::field::display(ctx.account_id));
    request.extensions_mut().insert(ctx);
    let mut response = next.run(request).await;
    // A handler that answers for a quota of its own (the hourly call
    // quota) has set the headers already.
    if !response.headers().contains_key("x-ratelimit-limit") {
        decision.write_headers(response.headers_mut());
    }
    response
}
