//! `/api/jobs`: the account's generation jobs (`jobs` scope), newest first
//! with filters and cursor pagination, or one job by `?id=` (the
//! contract's polling form) or `/api/jobs/{id}`. Output URLs are signed at
//! each read, valid for 24 hours from it.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::json::{ok, page_limit, Data};
use crate::auth::Auth;
use crate::clock::{now_ms, rfc3339};
use crate::domain::{Cursor, Scope};
use crate::error::ErrorBody;
use crate::jobs::queue::{self, Job, JobFilter};
use crate::jobs::storage::Storage;
use crate::jobs::{JobKind, JobStatus};
use crate::state::AppState;
use crate::{Error, Result};

/// A job as clients see it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: String,
    /// The same as `id` (the name the generation routes use).
    pub job_id: String,
    #[serde(rename = "type")]
    pub kind: JobKind,
    pub status: JobStatus,
    pub model: String,
    /// 0-100.
    pub progress: u8,
    /// Signed URL of the main output, valid 24 hours.
    pub output_url: Option<String>,
    /// Signed URLs of every output (clips, photos, ad variations).
    pub output_urls: Vec<String>,
    pub output_type: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// A generic message when failed; details are never exposed.
    pub error: Option<String>,
    pub credits_charged: u64,
    pub credits_refunded: u64,
    /// The request as checked, with defaults filled in.
    #[schema(value_type = Object)]
    pub input: Value,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub failed_at: Option<String>,
}

impl JobView {
    pub fn new(job: Job, storage: &Storage) -> Self {
        let output_urls = storage.signed_urls(&job.outputs, now_ms() / 1000);
        let finished = job.finished_at.map(rfc3339);
        JobView {
            job_id: job.id.clone(),
            id: job.id,
            kind: job.kind,
            status: job.status,
            model: job.model,
            progress: job.progress,
            output_url: output_urls.first().cloned(),
            output_urls,
            output_type: job.output_type,
            metadata: job.metadata,
            error: job.error,
            credits_charged: job.cost.get(),
            credits_refunded: job.credits_refunded.get(),
            input: job.input,
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            completed_at: if job.status == JobStatus::Completed { finished.clone() } else { None },
            failed_at: if job.status == JobStatus::Failed { finished } else { None },
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// One job by id (answered as a single object, not a list).
    pub id: Option<String>,
    /// queued | processing | completed | failed
    pub status: Option<String>,
    /// A generation type (`image`, `voice`, ...).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// 1-100, default 20.
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobPage {
    pub data: Vec<JobView>,
    /// Present when more jobs follow.
    pub next_cursor: Option<String>,
}

/// List jobs (or one with `?id=`).
#[utoipa::path(get, path = "/api/jobs", tag = "jobs", params(JobsQuery),
    responses((status = 200, body = JobPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    Auth(auth): Auth,
    query: std::result::Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    auth.require(Scope::Jobs)?;
    let Query(q) = query.map_err(|e| Error::bad_request(format!("invalid query: {}", e.body_text())))?;
    if let Some(id) = &q.id {
        return Ok(ok(JobView::new(queue::get(&state.db, auth.org, id).await?, &state.jobs.storage)));
    }
    let filter = JobFilter {
        status: q.status.as_deref().map(str::parse).transpose()?,
        kind: q.kind.as_deref().map(str::parse).transpose()?,
        limit: page_limit(q.limit, 20)?,
        cursor: q.cursor.as_deref().map(Cursor::decode).transpose()?,
    };
    let (jobs, next) = queue::list(&state.db, auth.org, &filter).await?;
    let data = jobs.into_iter().map(|j| JobView::new(j, &state.jobs.storage)).collect();
    Ok(Json(JobPage { data, next_cursor: next.map(|c| c.encode()) }).into_response())
}

/// One job.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    responses((status = 200, body = Data<JobView>), (status = 404, body = ErrorBody)))]
pub async fn get_job(State(state): State<AppState>, Auth(auth): Auth, Path(id): Path<String>) -> Result<Response> {
    auth.require(Scope::Jobs)?;
    Ok(ok(JobView::new(queue::get(&state.db, auth.org, &id).await?, &state.jobs.storage)))
}
