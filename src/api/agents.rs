//! `/api/voice-agent/agents`: create, list, read, change and delete voice
//! agents (`agents` scope). Models are checked against this process's
//! engines; one that is not installed or configured is a 400 naming it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::json::{created, ok, ApiJson, Data};
use crate::auth::Auth;
use crate::domain::{AgentId, Scope};
use crate::error::ErrorBody;
use crate::state::AppState;
use crate::voice::agents::{self, Agent, AgentFields, AgentPatch};
use crate::{Error, Result};

fn agent_id(raw: &str) -> Result<AgentId> {
    raw.parse().map_err(|_| Error::not_found("agent"))
}

/// Create a voice agent.
#[utoipa::path(post, path = "/api/voice-agent/agents", tag = "voice-agent", request_body = AgentFields,
    responses((status = 201, body = Data<Agent>), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_agent(State(state): State<AppState>, Auth(auth): Auth, ApiJson(body): ApiJson<AgentFields>) -> Result<Response> {
    auth.require(Scope::Agents)?;
    let engines = state.engines.get().await?;
    let fields = body.validate(&engines)?;
    auth.require_agent_models(&fields.llm_model, &fields.tts_model)?;
    Ok(created(agents::create(&state.db, auth.org, fields).await?))
}

/// List the account's voice agents.
#[utoipa::path(get, path = "/api/voice-agent/agents", tag = "voice-agent",
    responses((status = 200, body = Data<Vec<Agent>>), (status = 403, body = ErrorBody)))]
pub async fn list_agents(State(state): State<AppState>, Auth(auth): Auth) -> Result<Response> {
    auth.require(Scope::Agents)?;
    Ok(ok(agents::list(&state.db, auth.org).await?))
}

/// One voice agent.
#[utoipa::path(get, path = "/api/voice-agent/agents/{id}", tag = "voice-agent",
    responses((status = 200, body = Data<Agent>), (status = 404, body = ErrorBody)))]
pub async fn get_agent(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Agents)?;
    Ok(ok(agents::get(&state.db, auth.org, agent_id(&id)?).await?))
}

/// Change some fields of a voice agent (the same bounds as on creation).
#[utoipa::path(patch, path = "/api/voice-agent/agents/{id}", tag = "voice-agent", request_body = AgentPatch,
    responses((status = 200, body = Data<Agent>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_agent(
    State(state): State<AppState>,
    Auth(auth): Auth,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<AgentPatch>,
) -> Result<Response> {
    auth.require(Scope::Agents)?;
    let id = agent_id(&id)?;
    let current = agents::get(&state.db, auth.org, id).await?;
    let engines = state.engines.get().await?;
    let fields = patch.apply(current).validate(&engines)?;
    auth.require_agent_models(&fields.llm_model, &fields.tts_model)?;
    Ok(ok(agents::update(&state.db, auth.org, id, fields).await?))
}

/// Delete a voice agent (its past calls remain).
#[utoipa::path(delete, path = "/api/voice-agent/agents/{id}", tag = "voice-agent",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_agent(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Agents)?;
    agents::delete(&state.db, auth.org, agent_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
