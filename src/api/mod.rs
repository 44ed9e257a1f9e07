//! The HTTP API: routes, the middleware stack, and the OpenAPI document
//! generated from the same route list (so every route is documented).

mod agents;
mod auth;
mod calls;
mod dashboard;
mod files;
mod generate;
mod jobs;
mod guard;
pub mod json;
mod keys;
mod media;
mod openai;
mod settings;
mod system;
mod usage;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, Response as HttpResponse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, BoxError, Extension, Router};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;
use crate::Error;

#[derive(OpenApi)]
#[openapi(
    info(title = "voxgate", description = "AI voice agents on the phone, and a generation API."),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("x-api-key" = []))
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("sk_live_... (an API key) or vxt_... (an access token)").build()),
        );
        components.add_security_scheme("x-api-key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))));
        // The guard answers these for every route behind it.
        let error = |what: &str| {
            utoipa::openapi::ResponseBuilder::new()
                .description(what)
                .content("application/json", utoipa::openapi::ContentBuilder::new().schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody"))).build())
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete].into_iter().flatten() {
                op.responses.responses.entry("401".into()).or_insert_with(|| error("Missing, invalid or revoked API key").into());
                op.responses.responses.entry("429".into()).or_insert_with(|| error("Rate limited; see Retry-After").into());
            }
        }
    }
}

/// The routes behind the API guard (key + scope + rate limit).
fn guarded_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(keys::list_keys, keys::create_key))
        .routes(routes!(keys::get_key, keys::revoke_key))
        .routes(routes!(keys::rotate_key))
        .routes(routes!(usage::get_usage))
        .routes(routes!(auth::get_org))
        .routes(routes!(settings::get_settings, settings::set_settings))
        .routes(routes!(agents::list_agents, agents::create_agent))
        .routes(routes!(agents::get_agent, agents::update_agent, agents::delete_agent))
        .routes(routes!(calls::place_call))
        .routes(routes!(calls::place_stream_call))
        .routes(routes!(calls::web_call))
        .routes(routes!(calls::list_calls))
        .routes(routes!(calls::get_call))
        .routes(routes!(calls::hangup_call))
        .routes(routes!(generate::image))
        .routes(routes!(generate::video))
        .routes(routes!(generate::voice))
        .routes(routes!(generate::voice_clone))
        .routes(routes!(generate::avatar))
        .routes(routes!(generate::clip))
        .routes(routes!(generate::b_roll))
        .routes(routes!(generate::text2video))
        .routes(routes!(generate::commercial))
        .routes(routes!(generate::translate))
        .routes(routes!(generate::instant_ad))
        .routes(routes!(generate::photoshoot))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(webhooks::list_deliveries))
}

fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(system::health))
        .routes(routes!(system::ready))
        .routes(routes!(system::metrics))
        .routes(routes!(system::openapi))
        .routes(routes!(auth::exchange))
}

/// The whole application, ready to serve.
pub fn router(state: AppState) -> Router {
    let (guarded, guarded_doc) = OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(guarded_routes()).split_for_parts();
    let (public, public_doc) = public_routes().split_for_parts();
    let mut doc = guarded_doc;
    doc.merge(public_doc);
    let doc_json = system::OpenApiJson(Arc::new(doc.to_pretty_json().unwrap_or_else(|_| "{}".into())));

    // The OpenAI-compatible routes follow OpenAI's own reference, not this
    // document.
    let guarded = guarded
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/images/generations", post(openai::images_generations))
        .route("/v1/videos", post(openai::videos))
        .route("/v1/tasks/{id}", get(openai::get_task))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard::guard));
    let timeout = Duration::from_secs(state.config.request_timeout_secs);
    let request_id = HeaderName::from_static("x-request-id");

    Router::new()
        .merge(guarded)
        .merge(public)
        .route("/files/{*key}", get(files::download))
        .route("/media/{provider}", get(media::stream_query))
        .route("/media/{provider}/{token}", get(media::stream))
        .route("/carriers/twilio/{call}/status", post(media::twilio_status))
        .route("/webrtc/{token}", post(media::webrtc_offer))
        .route("/", get(dashboard::page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(openai::reshape_errors))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(Extension(doc_json))
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::track))
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(DefaultOnResponse::new().level(Level::INFO))
                        .on_failure(DefaultOnFailure::new().level(Level::WARN)),
                )
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(HandleErrorLayer::new(timeout_response))
                .timeout(timeout),
        )
        .with_state(state)
}

/// One span per request; the key never appears (only its organisation, added by
/// the guard), and neither does the query string nor a media stream's token.
fn request_span(request: &Request) -> tracing::Span {
    let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %loggable_path(request.uri().path()),
        request_id = %request_id,
        org_id = tracing::field::Empty,
    )
}

/// The path as logs may show it: `/media/{provider}/{token}` and
/// `/webrtc/{token}` lose their token.
fn loggable_path(path: &str) -> &str {
    if path.starts_with("/webrtc/") {
        return "/webrtc";
    }
    match path.strip_prefix("/media/").and_then(|rest| rest.find('/')) {
        Some(i) => &path[..("/media/".len() + i)],
        None => path,
    }
}

async fn not_found() -> Error {
    Error::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

async fn timeout_response(err: BoxError) -> Response {
    if err.is::<tower::timeout::error::Elapsed>() {
        Error::Unavailable("request timed out".into()).into_response()
    } else {
        Error::Internal(anyhow::anyhow!("middleware error: {err}")).into_response()
    }
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> HttpResponse<axum::body::Body> {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    Error::Internal(anyhow::anyhow!("handler panicked: {detail}")).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_tokens_never_reach_the_request_log() {
        assert_eq!(super::loggable_path("/media/twilio/abc.123.sig"), "/media/twilio");
        assert_eq!(super::loggable_path("/media/twilio"), "/media/twilio");
        assert_eq!(super::loggable_path("/api/jobs"), "/api/jobs");
        assert_eq!(super::loggable_path("/webrtc/abc.123.sig"), "/webrtc");
    }
}
