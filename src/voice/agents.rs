//! Voice agents: what an agent is (prompt, greeting, models, limits), the
//! rules its fields follow, and its storage. An agent's models are checked
//! against the engines of this process when it is created or changed, so a
//! call never starts with a model that is not there.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;
use voxgate_agents::{AgentConfig, Engines};

use crate::clock::{now_ms, rfc3339};
use crate::db::Db;
use crate::domain::{OrgId, AgentId};
use crate::{Error, Result};

const NAME_MAX: usize = 100;
const PROMPT_MAX: usize = 20_000;
const GREETING_MAX: usize = 1_000;
const VOICE_MAX: usize = 100;
const MAX_DURATION_SECS: (u32, u32) = (10, 14_400);
const END_PHRASES_MAX: usize = 10;
const END_PHRASE_MAX: usize = 200;

/// The fields of an agent as a client sends them (create, or the result of
/// applying a patch), before validation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentFields {
    /// Display name, 1-100 characters.
    pub name: String,
    /// Instructions for the LLM, 1-20,000 characters.
    pub system_prompt: String,
    /// What the agent says when the call is answered, 0-1,000 characters.
    #[serde(default)]
    pub greeting: String,
    /// `piper` (local), `espeak` (local), `kokoro`, `elevenlabs-v3`, `fish-audio-s1`.
    pub tts_model: String,
    /// `smollm2-135m` (local) or a model of a configured OpenAI-compatible endpoint.
    pub llm_model: String,
    /// Voice id of the TTS engine (its default when absent).
    #[serde(default)]
    pub voice: Option<String>,
    /// ISO 639-1 language code (default `en`).
    #[serde(default)]
    pub language: Option<String>,
    /// The call is ended after this many seconds of connected time (10-14,400).
    #[serde(default)]
    pub max_duration_seconds: Option<u32>,
    /// The call ends after the agent says one of these (up to 10).
    #[serde(default)]
    pub end_call_phrases: Vec<String>,
}

/// A PATCH: the fields to change.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentPatch {
    pub name: Option<String>,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub tts_model: Option<String>,
    pub llm_model: Option<String>,
    pub voice: Option<String>,
    pub language: Option<String>,
    pub max_duration_seconds: Option<u32>,
    pub end_call_phrases: Option<Vec<String>>,
}

/// A stored agent, as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub system_prompt: String,
    pub greeting: String,
    pub tts_model: String,
    pub llm_model: String,
    pub voice: Option<String>,
    pub language: String,
    pub max_duration_seconds: Option<u32>,
    pub end_call_phrases: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl Agent {
    /// What the conversation engine needs to run this agent.
    pub fn engine_config(&self) -> AgentConfig {
        AgentConfig {
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            tts_model: self.tts_model.clone(),
            llm_model: self.llm_model.clone(),
            language: self.language.clone(),
            voice: self.voice.clone(),
            max_duration: self.max_duration_seconds.map(|s| std::time::Duration::from_secs(s.into())),
            end_call_phrases: self.end_call_phrases.clone(),
            ..AgentConfig::default()
        }
    }
}

fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<()> {
    let n = value.chars().count();
    if n < min || n > max || (min > 0 && value.trim().is_empty()) {
        return Err(Error::bad_request(format!("{field} must be {min}-{max} characters (got {n})")));
    }
    Ok(())
}

impl AgentFields {
    /// Checks every bound, then the models against this process's engines.
    pub fn validate(mut self, engines: &Engines) -> Result<AgentFields> {
        check_len("name", &self.name, 1, NAME_MAX)?;
        check_len("systemPrompt", &self.system_prompt, 1, PROMPT_MAX)?;
        check_len("greeting", &self.greeting, 0, GREETING_MAX)?;
        if let Some(v) = &self.voice {
            check_len("voice", v, 1, VOICE_MAX)?;
        }
        let language = self.language.take().unwrap_or_else(|| "en".into());
        let well_formed = language.len() >= 2
            && language.len() <= 12
            && language.split(['-', '_']).all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()));
        if !well_formed {
            return Err(Error::bad_request(format!("language '{language}' is not an ISO language code such as 'en' or 'en-US'")));
        }
        self.language = Some(language);
        if let Some(s) = self.max_duration_seconds {
            let (lo, hi) = MAX_DURATION_SECS;
            if !(lo..=hi).contains(&s) {
                return Err(Error::bad_request(format!("maxDurationSeconds must be {lo}-{hi} (got {s})")));
            }
        }
        if self.end_call_phrases.len() > END_PHRASES_MAX {
            return Err(Error::bad_request(format!("endCallPhrases: at most {END_PHRASES_MAX} phrases")));
        }
        for p in &self.end_call_phrases {
            check_len("endCallPhrases[]", p, 1, END_PHRASE_MAX)?;
        }
        engines
            .check(&self.llm_model, &self.tts_model, self.language.as_deref().unwrap_or("en"))
            .map_err(|e| Error::bad_request(e.to_string()))?;
        Ok(self)
    }
}

impl AgentPatch {
    /// The agent's fields with this patch applied (not yet validated).
    pub fn apply(self, a: Agent) -> AgentFields {
        AgentFields {
            name: self.name.unwrap_or(a.name),
            system_prompt: self.system_prompt.unwrap_or(a.system_prompt),
            greeting: self.greeting.unwrap_or(a.greeting),
            tts_model: self.tts_model.unwrap_or(a.tts_model),
            llm_model: self.llm_model.unwrap_or(a.llm_model),
            voice: self.voice.or(a.voice),
            language: Some(self.language.unwrap_or(a.language)),
            max_duration_seconds: self.max_duration_seconds.or(a.max_duration_seconds),
            end_call_phrases: self.end_call_phrases.unwrap_or(a.end_call_phrases),
        }
    }
}

const COLUMNS: &str = "id, name, system_prompt, greeting, tts_model, llm_model, voice, language, \
                       max_duration_secs, end_call_phrases, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<Agent> {
    let phrases: String = row.try_get("end_call_phrases")?;
    let max: Option<i64> = row.try_get("max_duration_secs")?;
    Ok(Agent {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        system_prompt: row.try_get("system_prompt")?,
        greeting: row.try_get("greeting")?,
        tts_model: row.try_get("tts_model")?,
        llm_model: row.try_get("llm_model")?,
        voice: row.try_get("voice")?,
        language: row.try_get("language")?,
        max_duration_seconds: max.and_then(|s| u32::try_from(s).ok()),
        end_call_phrases: serde_json::from_str(&phrases).map_err(|e| Error::Internal(e.into()))?,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
    })
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds the agent's fields as `$1`-`$9`, in the order both the insert and
/// the update name them.
fn bind_fields<'q>(q: AnyQuery<'q>, f: &'q AgentFields) -> Result<AnyQuery<'q>> {
    let phrases = serde_json::to_string(&f.end_call_phrases).map_err(|e| Error::Internal(e.into()))?;
    Ok(q.bind(&f.name)
        .bind(&f.system_prompt)
        .bind(&f.greeting)
        .bind(&f.tts_model)
        .bind(&f.llm_model)
        .bind(&f.voice)
        .bind(f.language.as_deref().unwrap_or("en"))
        .bind(f.max_duration_seconds.map(i64::from))
        .bind(phrases))
}

pub async fn create(db: &Db, account: OrgId, f: AgentFields) -> Result<Agent> {
    let id = AgentId::new();
    let now = now_ms();
    bind_fields(sqlx::query(
        "INSERT INTO agents (name, system_prompt, greeting, tts_model, llm_model, voice, language, max_duration_secs, \
         end_call_phrases, created_at, updated_at, id, account_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12)",
    ), &f)?
    .bind(now)
    .bind(id.to_string())
    .bind(account.to_string())
    .execute(&db.pool)
    .await?;
    get(db, account, id).await
}

/// The account's agent; another account's agent is "not found" too, so ids
/// reveal nothing across accounts.
pub async fn get(db: &Db, account: OrgId, id: AgentId) -> Result<Agent> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM agents WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL"
    ))
    .bind(id.to_string())
    .bind(account.to_string())
    .fetch_optional(&db.pool)
    .await?
    .ok_or_else(|| Error::not_found("agent"))?;
    from_row(&row)
}

pub async fn list(db: &Db, account: OrgId) -> Result<Vec<Agent>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM agents WHERE account_id = $1 AND deleted_at IS NULL ORDER BY created_at, id"
    ))
    .bind(account.to_string())
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

pub async fn update(db: &Db, account: OrgId, id: AgentId, f: AgentFields) -> Result<Agent> {
    let update = bind_fields(sqlx::query(
        "UPDATE agents SET name = $1, system_prompt = $2, greeting = $3, tts_model = $4, llm_model = $5, voice = $6, \
         language = $7, max_duration_secs = $8, end_call_phrases = $9, updated_at = $10 \
         WHERE id = $11 AND account_id = $12 AND deleted_at IS NULL",
    ), &f)?;
    change_live_agent(db, update, account, id).await?;
    get(db, account, id).await
}

/// Deletes the agent for new calls; its past calls keep pointing at it.
pub async fn delete(db: &Db, account: OrgId, id: AgentId) -> Result<()> {
    let delete = sqlx::query("UPDATE agents SET deleted_at = $1 WHERE id = $2 AND account_id = $3 AND deleted_at IS NULL");
    change_live_agent(db, delete, account, id).await?;
    Ok(())
}

/// Runs a change whose last parameters are (now, agent id, account id);
/// 404 when no live agent of the account matched.
async fn change_live_agent(db: &Db, q: AnyQuery<'_>, account: OrgId, id: AgentId) -> Result<()> {
    let changed = q.bind(now_ms()).bind(id.to_string()).bind(account.to_string()).execute(&db.pool).await?.rows_affected();
    if changed == 0 {
        return Err(Error::not_found("agent"));
    }
    Ok(())
}
