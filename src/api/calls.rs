//! `/api/voice-agent/calls`: place an outbound call, list and read calls,
//! hang one up (`calls` scope). Handlers parse and check; the call manager
//! admits and runs the call.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::json::{ok, page_limit, ApiJson, Data};
use crate::auth::Auth;
use crate::billing::ledger::IdempotencyKey;
use crate::domain::{AgentId, CallId, PhoneNumber, Scope};
use crate::error::ErrorBody;
use crate::state::AppState;
use crate::voice::agents;
use crate::voice::calls::{self, CallFilter, CallRecord, Cursor};
use crate::voice::manager::{Outbound, Placed, StreamCall, StreamPlaced};
use crate::voice::streams::StreamKind;
use voxgate_media::streams::protocol::Provider;
use crate::{Error, Result};

const METADATA_MAX_BYTES: usize = 4096;
const TRUNK_MAX: usize = 100;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundRequest {
    /// The voice agent that talks on the call.
    pub agent_id: String,
    /// The number to call, E.164 (`+14155550123`).
    pub phone_number: String,
    /// A configured SIP trunk by name (the first one by default).
    pub trunk: Option<String>,
    /// Your own data, returned with the call and in its webhooks (a JSON
    /// object of at most 4 KB).
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundResponse {
    pub call_id: String,
    /// `queued` for a new call; the call's current status for a replay of
    /// the same `Idempotency-Key`.
    pub status: String,
}

fn call_id(raw: &str) -> Result<CallId> {
    raw.parse().map_err(|_| Error::not_found("call"))
}

/// Start an outbound call: 10 credits per started minute of connected time.
#[utoipa::path(post, path = "/api/voice-agent/calls/outbound", tag = "voice-agent", request_body = OutboundRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key returns the same call instead of placing another")),
    responses((status = 201, body = Data<OutboundResponse>), (status = 200, description = "Replay of an Idempotency-Key", body = Data<OutboundResponse>),
        (status = 400, body = ErrorBody), (status = 402, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn place_call(
    State(state): State<AppState>,
    Auth(auth): Auth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<OutboundRequest>,
) -> Result<Response> {
    auth.require(Scope::Calls)?;
    let idempotency_key = idempotency_key(&headers)?;
    let to = PhoneNumber::parse("phoneNumber", &body.phone_number)?;
    if let Some(t) = &body.trunk {
        if t.is_empty() || t.len() > TRUNK_MAX {
            return Err(Error::bad_request(format!("trunk must be 1-{TRUNK_MAX} characters")));
        }
    }
    check_metadata(body.metadata.as_ref())?;
    let agent = agent_of(&state, auth.org, &body.agent_id).await?;
    auth.require_agent_models(&agent.llm_model, &agent.tts_model)?;
    let placed = state
        .calls
        .place(Outbound {
            account: auth.org,
            spender: Some(auth.spender()),
            agent,
            to,
            trunk: body.trunk,
            metadata: body.metadata,
            idempotency_key,
        })
        .await?;
    match placed {
        Placed::New { id, quota } => {
            let mut response =
                (StatusCode::CREATED, Json(Data { data: OutboundResponse { call_id: id.to_string(), status: "queued".into() } }))
                    .into_response();
            // The hourly call quota, not the per-second write limit, is what
            // matters to a client of this endpoint.
            let h = response.headers_mut();
            h.insert("x-ratelimit-limit", HeaderValue::from(quota.limit));
            h.insert("x-ratelimit-remaining", HeaderValue::from(quota.remaining));
            h.insert("x-ratelimit-reset", HeaderValue::from(quota.reset_unix));
            Ok(response)
        }
        Placed::Replayed { id } => {
            let record = calls::get(&state.db, auth.org, id).await?;
            Ok(ok(OutboundResponse { call_id: record.id, status: record.status }))
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    match headers.get("idempotency-key") {
        Some(v) => {
            let s = v.to_str().map_err(|_| Error::bad_request("Idempotency-Key must be printable ASCII"))?;
            Ok(Some(IdempotencyKey::parse(s)?.as_str().to_owned()))
        }
        None => Ok(None),
    }
}

fn check_metadata(metadata: Option<&serde_json::Value>) -> Result<()> {
    if let Some(m) = metadata {
        if !m.is_object() {
            return Err(Error::bad_request("metadata must be a JSON object"));
        }
        let size = m.to_string().len();
        if size > METADATA_MAX_BYTES {
            return Err(Error::bad_request(format!("metadata must be at most {METADATA_MAX_BYTES} bytes as JSON (got {size})")));
        }
    }
    Ok(())
}

async fn agent_of(state: &AppState, account: crate::domain::OrgId, raw: &str) -> Result<agents::Agent> {
    let agent_id: AgentId = raw.parse().map_err(|_| Error::bad_request(format!("agentId '{raw}' is not a UUID")))?;
    agents::get(&state.db, account, agent_id).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamRequest {
    /// The voice agent that talks on the call.
    pub agent_id: String,
    /// The CPaaS that will connect the stream: `twilio`, `telnyx`, `plivo`
    /// or `vonage` (its message format).
    pub provider: String,
    /// The number the caller reached, E.164, if known (kept with the call).
    pub to: Option<String>,
    /// The caller's number, E.164, if known.
    pub from: Option<String>,
    /// Your own data, returned with the call and in its webhooks (a JSON
    /// object of at most 4 KB).
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamResponse {
    pub call_id: String,
    /// Give this to the provider (TwiML `<Connect><Stream url>`, Telnyx
    /// `stream_url`, Plivo `<Stream>`, Vonage NCCO `connect` websocket uri).
    /// Null for a replay of the same `Idempotency-Key`.
    pub url: Option<String>,
    /// The provider must connect before this time (RFC 3339).
    pub expires_at: Option<String>,
    pub status: String,
}

/// Prepare a call that a CPaaS brings in over a WebSocket media stream:
/// returns a signed, expiring stream URL for the provider. The call is
/// answered when the provider's stream starts and billed like any call
/// (10 credits per started minute of connected time).
#[utoipa::path(post, path = "/api/voice-agent/calls/stream", tag = "voice-agent", request_body = StreamRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key returns the same call instead of preparing another")),
    responses((status = 201, body = Data<StreamResponse>), (status = 200, description = "Replay of an Idempotency-Key", body = Data<StreamResponse>),
        (status = 400, body = ErrorBody), (status = 402, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn place_stream_call(
    State(state): State<AppState>,
    Auth(auth): Auth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<StreamRequest>,
) -> Result<Response> {
    auth.require(Scope::Calls)?;
    let idempotency_key = idempotency_key(&headers)?;
    let provider: Provider = body.provider.parse().map_err(Error::BadRequest)?;
    let to = body.to.as_deref().map(|t| PhoneNumber::parse("to", t)).transpose()?;
    let from = body.from.as_deref().map(|f| PhoneNumber::parse("from", f)).transpose()?;
    check_metadata(body.metadata.as_ref())?;
    let agent = agent_of(&state, auth.org, &body.agent_id).await?;
    auth.require_agent_models(&agent.llm_model, &agent.tts_model)?;
    let call = StreamCall {
        account: auth.org,
        spender: Some(auth.spender()),
        agent,
        kind: StreamKind::Provider(provider),
        to,
        from,
        metadata: body.metadata,
        idempotency_key,
    };
    stream_response(&state, auth.org, state.calls.place_stream(call).await?).await
}

async fn stream_response(state: &AppState, account: crate::domain::OrgId, placed: (Placed, Option<StreamPlaced>)) -> Result<Response> {
    match placed {
        (Placed::New { id, .. }, Some(placed)) => {
            let data = StreamResponse {
                call_id: id.to_string(),
                url: Some(placed.url),
                expires_at: Some(crate::clock::rfc3339(placed.expires * 1000)),
                status: "queued".into(),
            };
            Ok((StatusCode::CREATED, Json(Data { data })).into_response())
        }
        (Placed::New { id, .. } | Placed::Replayed { id }, _) => {
            let record = calls::get(&state.db, account, id).await?;
            Ok(ok(StreamResponse { call_id: record.id, url: None, expires_at: None, status: record.status }))
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// queued, ringing, in-progress, completed, busy, no-answer, canceled, failed.
    pub status: Option<String>,
    pub agent_id: Option<String>,
    /// Calls created at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Calls created before this time (RFC 3339).
    pub to: Option<String>,
    /// Page size, 1-100 (default 50).
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of calls, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallPage {
    pub data: Vec<CallRecord>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

const STATUSES: [&str; 8] = ["queued", "ringing", "in-progress", "completed", "busy", "no-answer", "canceled", "failed"];

fn parse_time(field: &str, raw: &str) -> Result<i64> {
    let t = OffsetDateTime::parse(raw, &Rfc3339)
        .map_err(|_| Error::bad_request(format!("{field} '{raw}' is not an RFC 3339 time such as 2026-11-23T10:00:00Z")))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

impl ListQuery {
    fn filter(self) -> Result<CallFilter> {
        if let Some(s) = &self.status {
            if !STATUSES.contains(&s.as_str()) {
                return Err(Error::bad_request(format!("status '{s}' is not one of {}", STATUSES.join(", "))));
            }
        }
        let limit = page_limit(self.limit, 50)?;
        let agent = match &self.agent_id {
            Some(a) => Some(a.parse().map_err(|_| Error::bad_request(format!("agentId '{a}' is not a UUID")))?),
            None => None,
        };
        let from = self.from.as_deref().map(|v| parse_time("from", v)).transpose()?;
        let to = self.to.as_deref().map(|v| parse_time("to", v)).transpose()?;
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err(Error::bad_request("from must be before to"));
            }
        }
        Ok(CallFilter {
            status: self.status,
            agent,
            from,
            to,
            limit,
            cursor: self.cursor.as_deref().map(Cursor::decode).transpose()?,
        })
    }
}

/// List calls, newest first, with filters and cursor pagination.
#[utoipa::path(get, path = "/api/voice-agent/calls", tag = "voice-agent", params(ListQuery),
    responses((status = 200, body = CallPage), (status = 400, body = ErrorBody)))]
pub async fn list_calls(
    State(state): State<AppState>,
    Auth(auth): Auth,
    query: std::result::Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    auth.require(Scope::Calls)?;
    let Query(query) = query.map_err(|e| Error::bad_request(format!("invalid query: {}", e.body_text())))?;
    let (page, next) = calls::list(&state.db, auth.org, &query.filter()?).await?;
    Ok(Json(CallPage { data: page, next_cursor: next.map(|c| c.encode()) }).into_response())
}

/// One call: status, SIP outcome, times, billing, transcript and latency.
#[utoipa::path(get, path = "/api/voice-agent/calls/{id}", tag = "voice-agent",
    responses((status = 200, body = Data<CallRecord>), (status = 404, body = ErrorBody)))]
pub async fn get_call(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Calls)?;
    Ok(ok(calls::get(&state.db, auth.org, call_id(&id)?).await?))
}

/// Hang up a call: CANCEL while it rings, BYE once answered. A call that
/// already ended is returned as it is. Any node takes the request: one that
/// does not run the call passes it to the one that does (through the
/// database) and answers with the call as it then stands.
#[utoipa::path(post, path = "/api/voice-agent/calls/{id}/hangup", tag = "voice-agent",
    responses((status = 200, body = Data<CallRecord>), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn hangup_call(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Calls)?;
    let id = call_id(&id)?;
    let record = calls::get(&state.db, auth.org, id).await?;
    if record.ended_at.is_some() {
        return Ok(ok(record));
    }
    let waits = if state.calls.hangup(id).await {
        20
    } else {
        // Another node runs it (or it ended a moment ago).
        if !calls::request_hangup(&state.db, auth.org, id).await? {
            return Ok(ok(calls::get(&state.db, auth.org, id).await?));
        }
        tracing::info!(call_id = %id, "hang-up passed to the node running the call");
        60
    };
    // The hang-up is under way; give the dialog a moment to end so the
    // answer shows the outcome in the common case.
    for _ in 0..waits {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let now = calls::get(&state.db, auth.org, id).await?;
        if now.ended_at.is_some() {
            return Ok(ok(now));
        }
    }
    Ok(ok(calls::get(&state.db, auth.org, id).await?))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebCallRequest {
    /// Your own data, returned with the call and in its webhooks (a JSON
    /// object of at most 4 KB).
    pub metadata: Option<serde_json::Value>,
}

/// Start a test call from a browser: returns a short-lived URL where the
/// browser posts its WebRTC SDP offer (`Content-Type: application/sdp`,
/// WHIP-style) and gets the answer. Opus both ways, billed like any call.
#[utoipa::path(post, path = "/api/voice-agent/agents/{id}/web-call", tag = "voice-agent", request_body = WebCallRequest,
    params(("id" = String, Path, description = "The agent")),
    responses((status = 201, body = Data<StreamResponse>), (status = 400, body = ErrorBody), (status = 402, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn web_call(
    State(state): State<AppState>,
    Auth(auth): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response> {
    auth.require(Scope::Calls)?;
    // The body is optional: none is `{}`.
    let body: WebCallRequest = if body.iter().all(u8::is_ascii_whitespace) {
        WebCallRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))?
    };
    let metadata = body.metadata;
    check_metadata(metadata.as_ref())?;
    let agent_id: AgentId = id.parse().map_err(|_| Error::not_found("agent"))?;
    let agent = agents::get(&state.db, auth.org, agent_id).await?;
    auth.require_agent_models(&agent.llm_model, &agent.tts_model)?;
    let call = StreamCall {
        account: auth.org,
        spender: Some(auth.spender()),
        agent,
        kind: StreamKind::WebRtc,
        to: None,
        from: None,
        metadata,
        idempotency_key: None,
    };
    stream_response(&state, auth.org, state.calls.place_stream(call).await?).await
}
