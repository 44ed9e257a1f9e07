//! Call records: admission of an outbound call (idempotency, credits and the
//! hourly quota, decided in one transaction so they hold across processes
//! and under concurrency), the updates of a call's life, settlement, and the
//! queries of the API.
//!
//! Admission starts with a write to the account row (`calls_lock`), which
//! makes the admissions of one account run one at a time: a row lock on
//! PostgreSQL, the database write lock on SQLite. Counting the last hour's
//! calls and inserting the new one then cannot race.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;

use crate::billing::ledger::{self, Reason};
use crate::billing::Spender;
use crate::clock::{now_ms, rfc3339};
use crate::db::{is_unique_violation, Db};
use crate::domain::{OrgId, AgentId, CallId};
pub use crate::domain::Cursor;
use crate::domain::page;
use crate::{Error, Result};

const HOUR_MS: i64 = 3_600_000;

/// A call about to be admitted.
pub struct NewCall<'a> {
    pub account: OrgId,
    pub agent: AgentId,
    /// `outbound` (counted in the hourly quota) or `inbound`.
    pub direction: &'static str,
    /// `sip`, or the CPaaS whose media stream carries the call.
    pub carrier: &'a str,
    /// E.164; unknown for a stream call the provider has not described.
    pub to: Option<&'a str>,
    pub trunk: Option<&'a str>,
    pub from: Option<&'a str>,
    pub metadata: Option<&'a serde_json::Value>,
    pub idempotency_key: Option<&'a str>,
    pub node_id: &'a str,
    /// The key placing the call (its daily cap must cover the first minute).
    pub spender: Option<Spender>,
}

/// The hourly quota after an admission, for the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the oldest call of the window leaves it.
    pub reset_unix: u64,
}

#[derive(Debug)]
pub enum Admission {
    /// A new call, to be placed now.
    Placed { id: CallId, quota: QuotaState },
    /// The idempotency key was used before: that call, nothing placed.
    Replayed { id: CallId },
}

/// Admits a call or refuses it (402 under `min_credits`, 429 over
/// the quota with the seconds until a slot frees).
pub async fn admit(db: &Db, new: NewCall<'_>, hourly_limit: u32, min_credits: u64) -> Result<Admission> {
    let mut tx = db.pool.begin().await?;
    let credits: Option<i64> =
        sqlx::query_scalar("UPDATE accounts SET calls_lock = calls_lock + 1 WHERE id = $1 RETURNING credits")
            .bind(new.account.to_string())
            .fetch_optional(&mut *tx)
            .await?;
    let credits = credits.ok_or_else(|| Error::not_found("account"))?;
    // Read the clock holding the account's lock, so the window and the new
    // call's time are in the order admissions happen.
    let now = now_ms();
    if let Some(key) = new.idempotency_key {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM calls WHERE account_id = $1 AND idempotency_key = $2")
                .bind(new.account.to_string())
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(id) = existing {
            tx.rollback().await?;
            return Ok(Admission::Replayed { id: id.parse()? });
        }
    }
    if credits < i64::try_from(min_credits).unwrap_or(i64::MAX) {
        tx.rollback().await?;
        return Err(Error::PaymentRequired { needed: min_credits, balance: credits.max(0) as u64 });
    }
    if let Some(key) = new.spender.filter(|s| s.capped).map(|s| s.key) {
        if let Some(left) = ledger::cap_headroom_in(&mut tx, key).await?.filter(|left| *left < min_credits) {
            tx.rollback().await?;
            return Err(Error::Forbidden(format!(
                "this API key's daily credit cap leaves {left} credits today (UTC); a call needs {min_credits} for its first minute"
            )));
        }
    }
    let window: Vec<i64> = sqlx::query_scalar(
        "SELECT created_at FROM calls WHERE account_id = $1 AND direction = 'outbound' AND created_at > $2 \
         ORDER BY created_at",
    )
    .bind(new.account.to_string())
    .bind(now - HOUR_MS)
    .fetch_all(&mut *tx)
    .await?;
    let limit = hourly_limit as usize;
    if window.len() >= limit {
        tx.rollback().await?;
        // The slot frees when the call that put the window at its limit
        // is an hour old.
        let frees_at = window[window.len() - limit] + HOUR_MS;
        let retry_after_secs = ((frees_at - now).max(0) as u64).div_ceil(1000).max(1);
        return Err(Error::RateLimited { retry_after_secs });
    }
    let id = CallId::new();
    let metadata = new.metadata.map(|m| m.to_string());
    let inserted = sqlx::query(
        "INSERT INTO calls (id, account_id, agent_id, direction, carrier, to_number, from_number, trunk, status, metadata, \
         node_id, idempotency_key, created_at, key_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11, $12, $13)",
    )
    .bind(id.to_string())
    .bind(new.account.to_string())
    .bind(new.agent.to_string())
    .bind(new.direction)
    .bind(new.carrier)
    // The column predates stream calls and is NOT NULL: '' is "unknown".
    .bind(new.to.unwrap_or(""))
    .bind(new.from)
    .bind(new.trunk)
    .bind(metadata)
    .bind(new.node_id)
    .bind(new.idempotency_key)
    .bind(now)
    .bind(new.spender.map(|s| s.key.to_string()))
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        tx.rollback().await?;
        return Err(if is_unique_violation(&e) { Error::bad_request("Idempotency-Key was used concurrently; retry") } else { e.into() });
    }
    tx.commit().await?;
    let oldest = window.first().copied().unwrap_or(now);
    let quota = QuotaState {
        limit: hourly_limit,
        remaining: (limit - window.len() - 1) as u32,
        reset_unix: ((oldest + HOUR_MS) / 1000) as u64,
    };
    Ok(Admission::Placed { id, quota })
}

/// One line of a call's transcript.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TranscriptLine {
    /// `caller` or `agent`.
    pub role: String,
    pub text: String,
    /// Offsets from the answer of the call, in milliseconds.
    pub start_ms: u64,
    pub end_ms: u64,
    /// The agent was cut off by the caller; `text` is what was heard.
    pub interrupted: bool,
}

/// Where the time of one turn went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnLatency {
    pub turn: u32,
    /// End of caller speech (at the wire) to the first agent audio frame.
    pub voice_to_voice_ms: u32,
    /// End of speech to end of turn decided (the silence the endpointer waits).
    pub endpoint_ms: u32,
    pub asr_ms: u32,
    /// End of speech to the reply's start on the transcript it answers.
    #[serde(default)]
    pub reply_start_ms: u32,
    /// The reply's start to its first token.
    pub llm_first_token_ms: u32,
    /// The reply's start to the text of its first piece.
    #[serde(default)]
    pub llm_first_piece_ms: u32,
    /// Synthesis of the first piece.
    pub tts_first_audio_ms: u32,
    /// The reply was started on the caller's pause, before the turn was
    /// decided (reply start to first frame then overlaps the endpoint).
    #[serde(default)]
    pub speculative: bool,
}

/// The latency of a call's turns, summarised.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Answer to the first greeting packet on the wire.
    pub answer_to_greeting_ms: Option<u32>,
    pub voice_to_voice_p50_ms: Option<u32>,
    pub voice_to_voice_p95_ms: Option<u32>,
    pub turns: Vec<TurnLatency>,
}

impl Latency {
    pub fn summarise(&mut self) {
        let mut v: Vec<u32> = self.turns.iter().map(|t| t.voice_to_voice_ms).collect();
        v.sort_unstable();
        let pct = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied();
        self.voice_to_voice_p50_ms = pct(0.5);
        self.voice_to_voice_p95_ms = pct(0.95);
    }
}

/// A call as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    pub id: String,
    pub agent_id: String,
    /// `outbound`, or `inbound` for a call a provider's stream brought in.
    pub direction: String,
    /// `sip`, or the CPaaS whose media stream carries the call (`twilio`,
    /// `telnyx`, `plivo`, `vonage`).
    pub carrier: String,
    /// The number called (E.164); null when a stream call did not say.
    pub to: Option<String>,
    pub from: Option<String>,
    pub trunk: Option<String>,
    /// queued, ringing, in-progress, completed, busy, no-answer, canceled, failed.
    pub status: String,
    /// Why it ended: remote-hangup, local-hangup, agent-hangup, max-duration,
    /// insufficient-credits, media-timeout, ring-timeout, rejected, canceled,
    /// transport-error, node-lost, shutdown.
    pub end_reason: Option<String>,
    /// The final SIP response code and phrase, when there was one.
    pub sip_code: Option<u16>,
    pub sip_reason: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub created_at: String,
    pub ringing_at: Option<String>,
    pub answered_at: Option<String>,
    pub ended_at: Option<String>,
    /// Connected time (answer to end), in seconds.
    pub duration_seconds: Option<f64>,
    pub billed_minutes: u64,
    pub credits_charged: u64,
    pub transcript: Vec<TranscriptLine>,
    pub latency: Latency,
}

const COLUMNS: &str = "id, agent_id, direction, carrier, to_number, from_number, trunk, status, end_reason, sip_code, \
    sip_reason, metadata, created_at, ringing_at, answered_at, ended_at, billed_minutes, credits_charged, \
    transcript, latency";

fn from_row(row: &AnyRow) -> Result<CallRecord> {
    let json = |col: &str| -> Result<Option<serde_json::Value>> {
        let s: Option<String> = row.try_get(col)?;
        Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
    };
    let answered: Option<i64> = row.try_get("answered_at")?;
    let ended: Option<i64> = row.try_get("ended_at")?;
    let ts = |v: Option<i64>| v.map(rfc3339);
    let transcript = json("transcript")?.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default();
    let latency = json("latency")?.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default();
    let code: Option<i64> = row.try_get("sip_code")?;
    Ok(CallRecord {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        direction: row.try_get("direction")?,
        carrier: row.try_get("carrier")?,
        to: Some(row.try_get::<String, _>("to_number")?).filter(|t| !t.is_empty()),
        from: row.try_get("from_number")?,
        trunk: row.try_get("trunk")?,
        status: row.try_get("status")?,
        end_reason: row.try_get("end_reason")?,
        sip_code: code.and_then(|c| u16::try_from(c).ok()),
        sip_reason: row.try_get("sip_reason")?,
        metadata: json("metadata")?,
        created_at: rfc3339(row.try_get("created_at")?),
        ringing_at: ts(row.try_get("ringing_at")?),
        answered_at: ts(answered),
        ended_at: ts(ended),
        duration_seconds: answered.map(|a| (ended.unwrap_or_else(now_ms) - a).max(0) as f64 / 1000.0),
        billed_minutes: row.try_get::<i64, _>("billed_minutes")?.max(0) as u64,
        credits_charged: row.try_get::<i64, _>("credits_charged")?.max(0) as u64,
        transcript,
        latency,
    })
}

/// The account's call (another account's call is "not found").
pub async fn get(db: &Db, account: OrgId, id: CallId) -> Result<CallRecord> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM calls WHERE id = $1 AND account_id = $2"))
        .bind(id.to_string())
        .bind(account.to_string())
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| Error::not_found("call"))?;
    from_row(&row)
}

/// Filters of `GET /api/voice-agent/calls`, parsed.
#[derive(Debug, Default)]
pub struct CallFilter {
    pub status: Option<String>,
    pub agent: Option<AgentId>,
    /// `created_at >= from` (ms).
    pub from: Option<i64>,
    /// `created_at < to` (ms).
    pub to: Option<i64>,
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// A page of the account's calls, newest first, and the cursor of the next.
pub async fn list(db: &Db, account: OrgId, f: &CallFilter) -> Result<(Vec<CallRecord>, Option<Cursor>)> {
    let mut sql = format!("SELECT {COLUMNS} FROM calls WHERE account_id = $1");
    let mut n = 1;
    for (present, column) in [
        (f.status.is_some(), "status = "),
        (f.agent.is_some(), "agent_id = "),
        (f.from.is_some(), "created_at >= "),
        (f.to.is_some(), "created_at < "),
    ] {
        if present {
            n += 1;
            sql.push_str(&format!(" AND {column}${n}"));
        }
    }
    sql.push_str(&Cursor::sql_page(f.cursor.as_ref(), n, f.limit));
    let mut q = sqlx::query(&sql).bind(account.to_string());
    if let Some(s) = &f.status {
        q = q.bind(s.clone());
    }
    if let Some(a) = f.agent {
        q = q.bind(a.to_string());
    }
    if let Some(v) = f.from {
        q = q.bind(v);
    }
    if let Some(v) = f.to {
        q = q.bind(v);
    }
    if let Some(c) = &f.cursor {
        q = q.bind(c.created_at).bind(c.id.clone());
    }
    let rows = q.fetch_all(&db.pool).await?;
    page(&rows, f.limit, |row| Ok((from_row(row)?, Cursor { created_at: row.try_get("created_at")?, id: row.try_get("id")? })))
}

/// A change in a call's life, applied by the call writer.
#[derive(Debug, Clone)]
pub enum CallUpdate {
    Dialing { sip_call_id: String },
    Ringing { at: i64 },
    Answered { at: i64 },
    Ended(Settlement),
}

/// How a call ended, with what it leaves behind.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub status: String,
    pub reason: String,
    pub sip_code: Option<u16>,
    pub sip_reason: Option<String>,
    pub at: i64,
    pub transcript: Vec<TranscriptLine>,
    pub latency: Latency,
}

/// Applies one update. Status only moves forward: an update that arrives
/// after the call ended changes nothing.
pub async fn apply(db: &Db, id: CallId, update: &CallUpdate) -> Result<bool> {
    let id_s = id.to_string();
    let q = match update {
        CallUpdate::Dialing { sip_call_id } => {
            sqlx::query("UPDATE calls SET sip_call_id = $1 WHERE id = $2 AND ended_at IS NULL").bind(sip_call_id.clone()).bind(id_s)
        }
        CallUpdate::Ringing { at } => sqlx::query(
            "UPDATE calls SET status = 'ringing', ringing_at = $1 WHERE id = $2 AND status = 'queued'",
        )
        .bind(*at)
        .bind(id_s),
        CallUpdate::Answered { at } => sqlx::query(
            "UPDATE calls SET status = 'in-progress', answered_at = $1 WHERE id = $2 AND status IN ('queued', 'ringing')",
        )
        .bind(*at)
        .bind(id_s),
        CallUpdate::Ended(s) => {
            let transcript = serde_json::to_string(&s.transcript).map_err(|e| Error::Internal(e.into()))?;
            let latency = serde_json::to_string(&s.latency).map_err(|e| Error::Internal(e.into()))?;
            sqlx::query(
                "UPDATE calls SET status = $1, end_reason = $2, sip_code = $3, sip_reason = $4, ended_at = $5, \
                 transcript = $6, latency = $7 WHERE id = $8 AND ended_at IS NULL",
            )
            .bind(s.status.clone())
            .bind(s.reason.clone())
            .bind(s.sip_code.map(i64::from))
            .bind(s.sip_reason.clone())
            .bind(s.at)
            .bind(transcript)
            .bind(latency)
            .bind(id_s)
        }
    };
    let changed = q.execute(&db.pool).await?.rows_affected() > 0;
    if changed && matches!(update, CallUpdate::Ended(_)) {
        sync_billing(db, id).await?;
    }
    Ok(changed)
}

/// Copies the call's minutes and credits from the ledger (the one source
/// of truth) into the call row. Idempotent.
pub async fn sync_billing(db: &Db, id: CallId) -> Result<()> {
    sqlx::query(
        "UPDATE calls SET \
         billed_minutes = (SELECT COUNT(*) FROM ledger WHERE reference = $1 AND reason = $2), \
         credits_charged = (SELECT COALESCE(SUM(-delta), 0) FROM ledger WHERE reference = $1 AND reason = $2) \
         WHERE id = $1",
    )
    .bind(id.to_string())
    .bind(Reason::CallMinute.as_db())
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Asks the node running call `id` of `org` to hang it up; false when the
/// call has ended (or is not the organisation's).
pub async fn request_hangup(db: &Db, org: OrgId, id: CallId) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE calls SET hangup_requested_at = $1 WHERE id = $2 AND account_id = $3 AND ended_at IS NULL",
    )
    .bind(now_ms())
    .bind(id.to_string())
    .bind(org.to_string())
    .execute(&db.pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The calls of `node_id` still running whose hang-up another node asked for.
pub async fn hangups_requested(db: &Db, node_id: &str) -> Result<Vec<CallId>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM calls WHERE node_id = $1 AND ended_at IS NULL AND hangup_requested_at IS NOT NULL",
    )
    .bind(node_id)
    .fetch_all(&db.pool)
    .await?;
    ids.iter().map(|id| id.parse()).collect()
}

/// Calls of `node_id` created before `before` (ms) that never ended: the
/// process died with them. Each is closed as failed (`node-lost`) with the
/// minutes already debited and no more; returns those this call closed
/// with their organisations (for the `call.ended` webhooks, sent once).
pub async fn close_lost(db: &Db, node_id: &str, before: i64) -> Result<Vec<(CallId, OrgId)>> {
    let rows = sqlx::query("SELECT id, account_id FROM calls WHERE node_id = $1 AND ended_at IS NULL AND created_at < $2")
        .bind(node_id)
        .bind(before)
        .fetch_all(&db.pool)
        .await?;
    let mut closed = Vec::new();
    for row in rows {
        let id: CallId = row.try_get::<String, _>("id")?.parse()?;
        let account: OrgId = row.try_get::<String, _>("account_id")?.parse()?;
        let settlement = Settlement {
            status: "failed".into(),
            reason: "node-lost".into(),
            sip_code: None,
            sip_reason: None,
            at: now_ms(),
            transcript: Vec::new(),
            latency: Latency::default(),
        };
        if apply(db, id, &CallUpdate::Ended(settlement)).await? {
            closed.push((id, account));
        }
    }
    Ok(closed)
}
