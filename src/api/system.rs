//! Unauthenticated operational endpoints: liveness, readiness, metrics and
//! the OpenAPI document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ErrorBody;
use crate::state::AppState;
use crate::voice::engines::Readiness;
use crate::Error;

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub status: &'static str,
}

/// The rendered OpenAPI document, built once at start.
#[derive(Clone)]
pub struct OpenApiJson(pub Arc<String>);

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "system", responses((status = 200, body = Status)))]
pub async fn health() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: the database answers, and the speech models are not being
/// loaded (a call placed meanwhile would wait for them; a process whose load
/// failed still serves everything but voice agents, which say why).
#[utoipa::path(get, path = "/ready", tag = "system",
    responses((status = 200, body = Status), (status = 503, body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if !state.db.ping().await {
        return Error::Unavailable("database unreachable".into()).into_response();
    }
    if state.engines.readiness() == Readiness::Loading {
        return Error::Unavailable("the speech models are loading".into()).into_response();
    }
    Json(Status { status: "ready" }).into_response()
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/openapi", tag = "system",
    responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn openapi(Extension(doc): Extension<OpenApiJson>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc.0.as_str().to_owned()).into_response()
}
