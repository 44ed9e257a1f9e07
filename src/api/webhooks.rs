//! `/api/webhooks/deliveries`: what was sent to the account's webhook URL,
//! and how every attempt went (`settings` scope, where the URL is set).

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::json::page_limit;
use crate::auth::Auth;
use crate::domain::{Cursor, Scope};
use crate::error::ErrorBody;
use crate::state::AppState;
use crate::webhooks::deliveries::{self, Delivery};
use crate::{Error, Result};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// 1-100, default 20.
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    pub data: Vec<Delivery>,
    pub next_cursor: Option<String>,
}

/// Webhook deliveries, newest first, each with every attempt.
#[utoipa::path(get, path = "/api/webhooks/deliveries", tag = "webhooks", params(DeliveriesQuery),
    responses((status = 200, body = DeliveryPage), (status = 400, body = ErrorBody)))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    Auth(auth): Auth,
    query: std::result::Result<Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    auth.require(Scope::Settings)?;
    let Query(q) = query.map_err(|e| Error::bad_request(format!("invalid query: {}", e.body_text())))?;
    let limit = page_limit(q.limit, 20)?;
    let cursor = q.cursor.as_deref().map(Cursor::decode).transpose()?;
    let (data, next) = deliveries::list(&state.db, auth.org, limit, cursor.as_ref()).await?;
    Ok(Json(DeliveryPage { data, next_cursor: next.map(|c| c.encode()) }).into_response())
}
